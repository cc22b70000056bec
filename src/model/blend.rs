//! Per-pixel blends of (N, C, H, W) maps by an (N, 1, H, W) weight `a`, the
//! arithmetic of scale fusion, as single CPU ops with their own backward:
//!
//! - [`mix`]: `a·u + (1 − a)·v` (hierarchical fusion at scales ≥ 1);
//! - [`add_rest`]: `u + (1 − a)·v` (hierarchical fusion below 1, where `u`
//!   is the already weighted, upsampled lower scale);
//! - [`weight`]: `a·u` (explicit attention, and the lower scale's weighting);
//! - [`softmax_channels`]: softmax across the channels of each pixel
//!   (average and max fusion, explicit attention's scale weights, flip).
//!
//! With candle's broadcast ops each of these is three to five passes and
//! new tensors, and the gradient of `a` is a sum over channels that candle
//! reduces with a division per element on one thread; at the input
//! resolution of a training batch these were most of what hierarchical
//! fusion added to a single-scale step. Gradients: `∂u = α·g`, `∂v =
//! (1 − a)·g`, `∂a = Σ_c g·(α′·u − v)`, with `α = a` or 1, `α′` 1 or 0 as
//! `a` enters. Other devices and dtypes use candle's broadcast ops.

use super::cpu;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `a·u + (1 − a)·v`.
pub fn mix(u: &Tensor, v: &Tensor, a: &Tensor) -> Result<Tensor> {
    apply(Kind::Mix, u, v, a)
}

/// `u + (1 − a)·v`.
pub fn add_rest(u: &Tensor, v: &Tensor, a: &Tensor) -> Result<Tensor> {
    apply(Kind::AddRest, u, v, a)
}

/// `a·u`.
pub fn weight(u: &Tensor, a: &Tensor) -> Result<Tensor> {
    apply(Kind::Weight, u, u, a)
}

/// Softmax over dim 1 of an (N, C, H, W) map. candle's softmax on a
/// non-last dim is five generic ops with strided reductions; this is one
/// pass per block of pixels (max, exp-sum, scale), backward
/// `gx = y·(g − Σ_c g·y)`.
pub fn softmax_channels(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() == 4 {
        x.contiguous()?.apply_op1(SoftmaxChannels)
    } else {
        softmax_channels_generic(x)
    }
}

/// Other devices and dtypes: softmax over the last dim of a channels-last
/// copy. candle's CUDA max-reduction over dim 1 of an NCHW map reads out
/// of bounds (compute-sanitizer: `fast_max_f32`, an illegal address on an
/// H200), while its reductions over the last, contiguous dim are sound.
fn softmax_channels_generic(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax(&x.permute((0, 2, 3, 1))?.contiguous()?, candle_core::D::Minus1)?;
    y.permute((0, 3, 1, 2))?.contiguous()
}

struct SoftmaxChannels;

/// Pixels per block of the channel loops.
pub(crate) const BLOCK: usize = 1024;

impl SoftmaxChannels {
    /// Calls `f(plane_offset, len)` for every block of pixels of every item,
    /// in parallel, with the item's `c` planes at `plane_offset + k·hw`.
    fn each(n: usize, c: usize, hw: usize, f: impl Fn(usize, usize) + Sync) {
        let per = hw.div_ceil(BLOCK);
        (0..n * per).into_par_iter().for_each(|i| {
            let (b, p0) = (i / per, (i % per) * BLOCK);
            f(b * c * hw + p0, BLOCK.min(hw - p0));
        });
    }

    fn fwd<T: cpu::Real>(x: &[T], n: usize, c: usize, hw: usize) -> Vec<T> {
        softmax_planes(x, n, c, hw, |_, _, _, _| ()).0
    }

    fn bwd<T: WithDType>(y: &[T], g: &[T], n: usize, c: usize, hw: usize) -> Vec<T> {
        let mut gx = vec![T::zero(); y.len()];
        let out = cpu::SyncPtr(gx.as_mut_ptr());
        Self::each(n, c, hw, |at, len| {
            let mut dot = vec![0f64; len];
            for k in 0..c {
                let (yk, gk) = (&y[at + k * hw..][..len], &g[at + k * hw..][..len]);
                for ((d, a), b) in dot.iter_mut().zip(yk).zip(gk) {
                    *d += a.to_f64() * b.to_f64();
                }
            }
            for k in 0..c {
                // SAFETY: disjoint blocks, as in the forward.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(at + k * hw), len) };
                let (yk, gk) = (&y[at + k * hw..][..len], &g[at + k * hw..][..len]);
                for (((d, a), b), s) in dst.iter_mut().zip(yk).zip(gk).zip(&dot) {
                    *d = T::from_f64(a.to_f64() * (b.to_f64() - s));
                }
            }
        });
        gx
    }
}

/// Softmax across the `c` channels of each pixel of (N, C, HW) `x`, in
/// blocks of pixels in parallel, in the data's precision; also returns
/// `f(item, first pixel, max, exp-sum)` of every block (per pixel of the
/// block: the channel maximum `m` and `Σ_c exp(x_c − m)`).
pub(crate) fn softmax_planes<T: cpu::Real, R: Send>(
    x: &[T],
    n: usize,
    c: usize,
    hw: usize,
    f: impl Fn(usize, usize, &[T], &[T]) -> R + Sync,
) -> (Vec<T>, Vec<R>) {
    let mut y = vec![T::zero(); x.len()];
    let out = cpu::SyncPtr(y.as_mut_ptr());
    let per = hw.div_ceil(BLOCK);
    let parts = (0..n * per)
        .into_par_iter()
        .map(|i| {
            let (b, p0) = (i / per, (i % per) * BLOCK);
            let (at, len) = (b * c * hw + p0, BLOCK.min(hw - p0));
            let mut m = vec![T::zero(); len];
            let mut s = vec![T::zero(); len];
            softmax_block_simd(x, c, hw, at, out, &mut m, &mut s);
            f(b, p0, &m, &s)
        })
        .collect();
    (y, parts)
}

/// One block of [`softmax_planes`]: the `len = m.len()` pixels from `at`
/// of one item's `c` planes; leaves the channel maximum in `m` and the
/// exp-sum in `s`. `y` points at an output of `x`'s length.
#[inline(always)]
fn softmax_block<T: cpu::Real>(
    x: &[T],
    c: usize,
    hw: usize,
    at: usize,
    y: cpu::SyncPtr<T>,
    m: &mut [T],
    s: &mut [T],
) {
    let len = m.len();
    // the block's last plane inside `x`, and so inside `y`
    assert!(c > 0 && at + (c - 1) * hw + len <= x.len() && s.len() == len);
    m.fill(T::from_f64(f64::NEG_INFINITY));
    for k in 0..c {
        for (m, v) in m.iter_mut().zip(&x[at + k * hw..][..len]) {
            // a NaN never replaces the maximum, as f64::max
            *m = if *v > *m { *v } else { *m };
        }
    }
    s.fill(T::zero());
    for k in 0..c {
        // SAFETY: in bounds (asserted above, `y` as long as `x`); callers
        // hand each block a disjoint pixel range of one item, so no two
        // blocks write the same element of `y`.
        let dst = unsafe { std::slice::from_raw_parts_mut(y.get().add(at + k * hw), len) };
        for (((d, v), m), s) in dst
            .iter_mut()
            .zip(&x[at + k * hw..][..len])
            .zip(&*m)
            .zip(s.iter_mut())
        {
            let e = (*v - *m).exp();
            *s += e;
            *d = e;
        }
    }
    for k in 0..c {
        // SAFETY: as above.
        let dst = unsafe { std::slice::from_raw_parts_mut(y.get().add(at + k * hw), len) };
        for (d, s) in dst.iter_mut().zip(&*s) {
            *d /= *s;
        }
    }
}
cpu::simd!(softmax_block_simd, softmax_block, (x: &[T], c: usize, hw: usize, at: usize, y: cpu::SyncPtr<T>, m: &mut [T], s: &mut [T]), cpu::Real);

impl candle_core::CustomOp1 for SoftmaxChannels {
    fn name(&self) -> &'static str {
        "softmax-channels"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(Self::fwd(cpu::slice(s, l)?, n, c, h * w)),
            CpuStorage::F64(_) => CpuStorage::F64(Self::fwd(cpu::slice(s, l)?, n, c, h * w)),
            _ => candle_core::bail!("softmax: f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let (n, c, h, w) = y.dims4()?;
        let (sy, ly) = y.storage_and_layout();
        let (sg, lg) = g.storage_and_layout();
        let (candle_core::Storage::Cpu(sy), candle_core::Storage::Cpu(sg)) = (&*sy, &*sg) else {
            candle_core::bail!("softmax: CPU tensors only");
        };
        let gx = match sy {
            CpuStorage::F32(_) => Tensor::from_vec(
                Self::bwd::<f32>(cpu::slice(sy, ly)?, cpu::slice(sg, lg)?, n, c, h * w),
                y.shape(),
                y.device(),
            )?,
            _ => Tensor::from_vec(
                Self::bwd::<f64>(cpu::slice(sy, ly)?, cpu::slice(sg, lg)?, n, c, h * w),
                y.shape(),
                y.device(),
            )?,
        };
        Ok(Some(gx))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Mix,
    AddRest,
    Weight,
}

fn apply(kind: Kind, u: &Tensor, v: &Tensor, a: &Tensor) -> Result<Tensor> {
    if u.device().is_cpu() && matches!(u.dtype(), DType::F32 | DType::F64) && u.rank() == 4 {
        return u
            .contiguous()?
            .apply_op3(&v.contiguous()?, &a.contiguous()?, Blend { kind });
    }
    let rest = || v.broadcast_mul(&a.affine(-1.0, 1.0)?);
    match kind {
        Kind::Mix => u.broadcast_mul(a)? + rest()?,
        Kind::AddRest => u + rest()?,
        Kind::Weight => u.broadcast_mul(a),
    }
}

struct Blend {
    kind: Kind,
}

impl Blend {
    /// One loop per kind over zipped planes (a `match` inside the loop
    /// kept it from vectorising: 39 instructions per element in callgrind).
    fn fwd<T: WithDType>(&self, u: &[T], v: &[T], a: &[T], c: usize, hw: usize) -> Vec<T> {
        let one = T::one();
        let mut out = vec![T::zero(); u.len()];
        out.par_chunks_mut(hw)
            .zip(u.par_chunks(hw).zip(v.par_chunks(hw)))
            .enumerate()
            .for_each(|(p, (o, (u, v)))| {
                let w = &a[(p / c) * hw..][..hw];
                let it = o.iter_mut().zip(u).zip(v).zip(w);
                match self.kind {
                    Kind::Mix => it.for_each(|(((o, u), v), w)| *o = *w * *u + (one - *w) * *v),
                    Kind::AddRest => it.for_each(|(((o, u), v), w)| *o = *u + (one - *w) * *v),
                    Kind::Weight => it.for_each(|(((o, u), _), w)| *o = *w * *u),
                }
            });
        out
    }

    /// `α·g` (∂u; `None` for `AddRest`, where it is `g` itself) and
    /// `(1 − a)·g` (∂v; `None` for `Weight`).
    fn grads_uv<T: WithDType>(&self, a: &[T], g: &[T], c: usize, hw: usize) -> [Option<Vec<T>>; 2] {
        let one = T::one();
        let gu = (self.kind != Kind::AddRest).then(|| scaled(a, g, c, hw, |w| w));
        let gv = (self.kind != Kind::Weight).then(|| scaled(a, g, c, hw, |w| one - w));
        [gu, gv]
    }

    /// `∂a = Σ_c g·(α′·u − v)`, in blocks of pixels.
    fn grad_a<T: WithDType>(&self, u: &[T], v: &[T], g: &[T], n: usize, c: usize, hw: usize) -> Vec<T> {
        const BLOCK: usize = 4096;
        let mut ga = vec![T::zero(); n * hw];
        ga.par_chunks_mut(hw).enumerate().for_each(|(item, ga)| {
            ga.par_chunks_mut(BLOCK).enumerate().for_each(|(k, o)| {
                for ch in 0..c {
                    let at = (item * c + ch) * hw + k * BLOCK;
                    let g = &g[at..at + o.len()];
                    let (u, v) = (&u[at..at + o.len()], &v[at..at + o.len()]);
                    let it = o.iter_mut().zip(g);
                    match self.kind {
                        Kind::Mix => it
                            .zip(u.iter().zip(v))
                            .for_each(|((o, g), (u, v))| *o += *g * (*u - *v)),
                        Kind::AddRest => it.zip(v).for_each(|((o, g), v)| *o -= *g * *v),
                        Kind::Weight => it.zip(u).for_each(|((o, g), u)| *o += *g * *u),
                    }
                }
            });
        });
        ga
    }
}

/// `f(a)·g` per pixel, `a` broadcast over the `c` channels of each item.
fn scaled<T: WithDType>(a: &[T], g: &[T], c: usize, hw: usize, f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(hw)
        .zip(g.par_chunks(hw))
        .enumerate()
        .for_each(|(p, (o, g))| {
            let w = &a[(p / c) * hw..][..hw];
            o.iter_mut().zip(g).zip(w).for_each(|((o, g), w)| *o = f(*w) * *g);
        });
    out
}

impl Blend {
    /// (∂u unless `AddRest`, ∂v unless `Weight`, ∂a) as tensors, from the
    /// storages of (u, v, a, g).
    fn grad_tensors<T: WithDType>(
        &self,
        slices: &[(&CpuStorage, &Layout)],
        (u, a): (&Tensor, &Tensor),
        c: usize,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Tensor)> {
        let s: Vec<&[T]> = slices
            .iter()
            .map(|(s, l)| cpu::slice(s, l))
            .collect::<Result<_>>()?;
        let (n, _, h, w) = u.dims4()?;
        let [gu, gv] = self.grads_uv(s[2], s[3], c, h * w);
        let ga = self.grad_a(s[0], s[1], s[3], n, c, h * w);
        let t = |v: Vec<T>| Tensor::from_vec(v, u.shape(), u.device());
        Ok((
            gu.map(t).transpose()?,
            gv.map(t).transpose()?,
            Tensor::from_vec(ga, a.shape(), a.device())?,
        ))
    }
}

impl CustomOp3 for Blend {
    fn name(&self) -> &'static str {
        "blend"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        if l2.shape() != l1.shape() || l3.shape().dims() != [n, 1, h, w] {
            candle_core::bail!(
                "blend: {:?}, {:?}, weight {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.fwd(
                cpu::slice(s1, l1)?,
                cpu::slice(s2, l2)?,
                cpu::slice(s3, l3)?,
                c,
                h * w,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(self.fwd(
                cpu::slice(s1, l1)?,
                cpu::slice(s2, l2)?,
                cpu::slice(s3, l3)?,
                c,
                h * w,
            )),
            _ => candle_core::bail!("blend: f32 or f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        u: &Tensor,
        v: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let c = u.dim(1)?;
        let guards = [u, v, a, &g].map(|t| t.storage_and_layout());
        let mut slices = vec![];
        for (s, l) in &guards {
            match &**s {
                candle_core::Storage::Cpu(st) => slices.push((st, *l)),
                _ => candle_core::bail!("blend: CPU tensors only"),
            }
        }
        let (gu, gv, ga) = match slices[0].0 {
            CpuStorage::F32(_) => self.grad_tensors::<f32>(&slices, (u, a), c)?,
            _ => self.grad_tensors::<f64>(&slices, (u, a), c)?,
        };
        drop(guards);
        // ∂u of `AddRest` is the output gradient itself
        let gu = gu.unwrap_or(g);
        Ok((Some(gu), gv, Some(ga)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Each blend and its three gradients against candle's broadcast
    /// expression of the same formula and candle's autograd of it (f64).
    #[test]
    fn blends_match_the_broadcast_formula() {
        let dev = Device::Cpu;
        // one block of pixels, and several with a partial last one
        for (n, c, h, w) in [(2, 3, 4, 5), (2, 3, 70, 90)] {
            let u0 = Tensor::randn(0f64, 1., (n, c, h, w), &dev).unwrap();
            let v0 = Tensor::randn(0f64, 1., (n, c, h, w), &dev).unwrap();
            let a0 = Tensor::rand(0f64, 1., (n, 1, h, w), &dev).unwrap();
            let r = Tensor::randn(0f64, 1., (n, c, h, w), &dev).unwrap();
            let vals = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
            type Formula = fn(&Tensor, &Tensor, &Tensor) -> Tensor;
            let cases: [(Kind, Formula); 3] = [
                (Kind::Mix, |u, v, a| {
                    (u.broadcast_mul(a).unwrap() + v.broadcast_mul(&a.affine(-1.0, 1.0).unwrap()).unwrap())
                        .unwrap()
                }),
                (Kind::AddRest, |u, v, a| {
                    (u + v.broadcast_mul(&a.affine(-1.0, 1.0).unwrap()).unwrap()).unwrap()
                }),
                (Kind::Weight, |u, _v, a| u.broadcast_mul(a).unwrap()),
            ];
            for (kind, formula) in cases {
                let run = |ours: bool| {
                    let (u, v, a) = (
                        Var::from_tensor(&u0).unwrap(),
                        Var::from_tensor(&v0).unwrap(),
                        Var::from_tensor(&a0).unwrap(),
                    );
                    let out = if ours {
                        match kind {
                            Kind::Mix => mix(&u, &v, &a),
                            Kind::AddRest => add_rest(&u, &v, &a),
                            Kind::Weight => weight(&u, &a),
                        }
                        .unwrap()
                    } else {
                        formula(&u, &v, &a)
                    };
                    let g = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let grad = |t: &Var| g.get(t.as_tensor()).map(vals);
                    (vals(&out), grad(&u), grad(&v), grad(&a))
                };
                let (ours, theirs) = (run(true), run(false));
                let close = |x: &[f64], y: &[f64], what: &str| {
                    assert_eq!(x.len(), y.len(), "{kind:?} {what}");
                    for (p, q) in x.iter().zip(y) {
                        assert!((p - q).abs() < 1e-12, "{kind:?} {what}: {p} vs {q}");
                    }
                };
                close(&ours.0, &theirs.0, "forward");
                close(&ours.1.unwrap(), &theirs.1.unwrap(), "du");
                if kind != Kind::Weight {
                    close(&ours.2.unwrap(), &theirs.2.unwrap(), "dv");
                }
                close(&ours.3.unwrap(), &theirs.3.unwrap(), "da");
            }
        }
    }

    /// Softmax across channels (the CPU op and the channels-last path other
    /// devices take) and its gradient against candle's softmax and
    /// autograd (f64), over more than one block of pixels.
    #[test]
    fn softmax_channels_matches_candle() {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f64, 3., (2, 5, 3, 401), &dev).unwrap();
        let r = Tensor::randn(0f64, 1., (2, 5, 3, 401), &dev).unwrap();
        let vals = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let run = |ours: u8| {
            let x = Var::from_tensor(&x0).unwrap();
            let y = match ours {
                0 => softmax_channels(&x).unwrap(),
                1 => softmax_channels_generic(&x).unwrap(),
                _ => candle_nn::ops::softmax(&x, 1).unwrap(),
            };
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (vals(&y), vals(g.get(&x).unwrap()))
        };
        let theirs = run(2);
        for ours in [run(0), run(1)] {
            for (a, b) in ours.0.iter().zip(&theirs.0).chain(ours.1.iter().zip(&theirs.1)) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
        }
    }
}

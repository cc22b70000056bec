//! Per-pixel blends of (N, C, H, W) maps by an (N, 1, H, W) weight `a`, the
//! arithmetic of scale fusion, as single CPU ops with their own backward:
//!
//! - [`mix`]: `a·u + (1 − a)·v` (hierarchical fusion at scales ≥ 1);
//! - [`weight`]: `a·u` (explicit attention);
//! - [`add_rest_up`]: `up(a·up(l)) + (1 − up(a))·up(v)`, hierarchical
//!   fusion below 1 with the bilinear resizes of its operands inside the op
//!   (no resized maps, and no gradients of them);
//! - [`softmax_channels`]: softmax across the channels of each pixel
//!   (average and max fusion, explicit attention's scale weights, flip).
//!
//! With candle's broadcast ops each of these is three to five passes and
//! new tensors, and the gradient of `a` is a sum over channels that candle
//! reduces with a division per element on one thread; at the input
//! resolution of a training batch these were most of what hierarchical
//! fusion added to a single-scale step. Gradients of `mix` and `weight`:
//! `∂u = a·g`, `∂v = (1 − a)·g`, `∂a = Σ_c g·(u − v)` (`v` = 0 for
//! `weight`); `add_rest_up` gives its own. Other devices and dtypes use
//! candle's broadcast ops.

use crate::cpu;
use crate::resize::{resize, PlaneResize};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `a·u + (1 − a)·v`.
pub fn mix(u: &Tensor, v: &Tensor, a: &Tensor) -> Result<Tensor> {
    apply(Kind::Mix, u, v, a)
}

/// `a·u`.
pub fn weight(u: &Tensor, a: &Tensor) -> Result<Tensor> {
    apply(Kind::Weight, u, u, a)
}

/// `up(a·up(l)) + (1 − up(a))·up(v)` at `out` (H, W), where each `up` is
/// the bilinear resize ([`resize`]) of its operand from its own size to the
/// next: hierarchical fusion below 1 as one op. `l` (N, C, h', w') is the
/// lower scale's logits (at the network's resolution, or already at `a`'s
/// size), `a` (N, 1, h, w) its attention at its input size, `v`
/// (N, C, h'', w'') the running prediction at `out`, or smaller (the
/// highest scale's logits at the network's resolution). Equal to
/// `up(weight(up(l), a)) + (1 − up(a))·up(v)` up to rounding, but every
/// resized and weighted map is a plane in the op's loops, never a tensor:
/// no allocations, passes or gradient-store entries for them. Backward,
/// with `m = upᵀ(g)`: `∂l = upᵀ(a·m)`, `∂v = upᵀ((1 − up(a))·g)`, `∂a =
/// Σ_c up(l)·m − upᵀ(Σ_c g·up(v))`. Other devices and dtypes: the separate
/// ops, candle's broadcasts and [`resize`].
pub fn add_rest_up(l: &Tensor, v: &Tensor, a: &Tensor, out: (usize, usize)) -> Result<Tensor> {
    let size = |t: &Tensor| -> Result<(usize, usize)> {
        let (_, _, h, w) = t.dims4()?;
        Ok((h, w))
    };
    let (from_l, from_a, from_v) = (size(l)?, size(a)?, size(v)?);
    if [from_l, from_a, from_v, out]
        .iter()
        .any(|&(h, w)| h == 0 || w == 0)
    {
        candle_core::bail!("add_rest_up of empty maps: {from_l:?}, {from_a:?}, {from_v:?} to {out:?}");
    }
    if l.device().is_cpu() && matches!(l.dtype(), DType::F32 | DType::F64) {
        let resizer = |from: (usize, usize), to| (from != to).then(|| PlaneResize::new(from, to));
        let op = AddRestUp {
            rl: resizer(from_l, from_a),
            ra: PlaneResize::new(from_a, out),
            rv: resizer(from_v, out),
            sizes: [from_l, from_a, from_v, out],
        };
        return l.contiguous()?.apply_op3(&v.contiguous()?, &a.contiguous()?, op);
    }
    add_rest_up_slow(l, v, a, out)
}

/// [`add_rest_up`] as separate ops: [`resize`], [`weight`] and candle's
/// broadcasts (other devices and dtypes).
pub fn add_rest_up_slow(l: &Tensor, v: &Tensor, a: &Tensor, out: (usize, usize)) -> Result<Tensor> {
    let (_, _, ha, wa) = a.dims4()?;
    let up = |t: &Tensor, to: (usize, usize)| resize(t, to.0, to.1);
    let rest = up(v, out)?.broadcast_mul(&up(a, out)?.affine(-1.0, 1.0)?)?;
    up(&weight(&up(l, (ha, wa))?, a)?, out)? + rest
}

struct AddRestUp {
    /// `l`'s resize to `a`'s size, unless it is at that size.
    rl: Option<PlaneResize>,
    /// `a`'s (and `a·up(l)`'s) resize to the output.
    ra: PlaneResize,
    /// `v`'s resize to the output, unless it is at the output size.
    rv: Option<PlaneResize>,
    /// Plane sizes of `l`, `a`, `v` and the output.
    sizes: [(usize, usize); 4],
}

/// `o += (1 − a)·v`.
#[inline(always)]
fn add_rest_row<T: WithDType>(o: &mut [T], a: &[T], v: &[T]) {
    let one = T::one();
    for ((o, a), v) in o.iter_mut().zip(a).zip(v) {
        *o += (one - *a) * *v;
    }
}
cpu::simd!(add_rest_row_simd, add_rest_row, (o: &mut [T], a: &[T], v: &[T]));

/// `o = (1 − a)·g`.
#[inline(always)]
fn rest_row<T: WithDType>(o: &mut [T], a: &[T], g: &[T]) {
    let one = T::one();
    for ((o, a), g) in o.iter_mut().zip(a).zip(g) {
        *o = (one - *a) * *g;
    }
}
cpu::simd!(rest_row_simd, rest_row, (o: &mut [T], a: &[T], g: &[T]));

/// `o = x·y`.
#[inline(always)]
fn product_row<T: WithDType>(o: &mut [T], x: &[T], y: &[T]) {
    for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
        *o = *x * *y;
    }
}
cpu::simd!(product_row_simd, product_row, (o: &mut [T], x: &[T], y: &[T]));

/// `o −= x·y`.
#[inline(always)]
fn sub_product_row<T: WithDType>(o: &mut [T], x: &[T], y: &[T]) {
    for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
        *o -= *x * *y;
    }
}
cpu::simd!(sub_product_row_simd, sub_product_row, (o: &mut [T], x: &[T], y: &[T]));

/// `x` resized by `r` into `buf`, or `x` itself when there is no resize.
fn up_or<'a, T: WithDType>(
    r: &Option<PlaneResize>,
    x: &'a [T],
    tmp: &mut Vec<T>,
    buf: &'a mut Vec<T>,
) -> &'a [T] {
    match r {
        Some(r) => {
            buf.resize(r.out_len(), T::zero());
            r.apply(x, tmp, buf);
            buf
        }
        None => x,
    }
}

/// Scratch planes of one worker.
struct Scratch<T> {
    tmp: Vec<T>,
    l: Vec<T>,
    m: Vec<T>,
    v: Vec<T>,
}

impl<T: WithDType> Scratch<T> {
    fn new() -> Self {
        Scratch {
            tmp: Vec::new(),
            l: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// `buf` resized to `n` elements (contents unspecified).
    fn plane(buf: &mut Vec<T>, n: usize) -> &mut [T] {
        buf.resize(n, T::zero());
        &mut buf[..n]
    }
}

impl AddRestUp {
    /// Plane lengths of `l`, `a`, `v` and the output.
    fn lens(&self) -> [usize; 4] {
        self.sizes.map(|(h, w)| h * w)
    }

    /// `up(a)`, one output-size plane per item.
    fn attention_up<T: WithDType>(&self, a: &[T]) -> Vec<T> {
        let [_, hw, _, out] = self.lens();
        let mut up = vec![T::zero(); a.len() / hw * out];
        up.par_chunks_mut(out)
            .zip(a.par_chunks(hw))
            .for_each_init(Vec::new, |tmp, (o, a)| self.ra.apply(a, tmp, o));
        up
    }

    fn fwd<T: WithDType>(&self, l: &[T], v: &[T], a: &[T], c: usize) -> Vec<T> {
        let [hw_l, hw_a, hw_v, out] = self.lens();
        let a_up = self.attention_up(a);
        let mut y = vec![T::zero(); l.len() / hw_l * out];
        y.par_chunks_mut(out)
            .enumerate()
            .for_each_init(Scratch::new, |s, (p, o)| {
                let item = p / c;
                let lp = up_or(&self.rl, &l[p * hw_l..][..hw_l], &mut s.tmp, &mut s.l);
                let w = Scratch::plane(&mut s.m, hw_a);
                product_row_simd(w, &a[item * hw_a..][..hw_a], lp);
                self.ra.apply(w, &mut s.tmp, o);
                let vp = up_or(&self.rv, &v[p * hw_v..][..hw_v], &mut s.tmp, &mut s.v);
                add_rest_row_simd(o, &a_up[item * out..][..out], vp);
            });
        y
    }

    /// (∂l, ∂v, ∂a). Per plane, with `m = upᵀ(g)`: `∂l = upᵀ(a·m)`, `∂v =
    /// upᵀ((1 − up(a))·g)` and `up(l)·m`; per item, `∂a` as the sum of the
    /// last over the channels minus `upᵀ(Σ_c g·up(v))` (the sum made at the
    /// output size, so each item takes one transposed resize).
    fn grads<T: WithDType>(&self, l: &[T], v: &[T], a: &[T], g: &[T], c: usize) -> [Vec<T>; 3] {
        let [hw_l, hw_a, hw_v, out] = self.lens();
        let planes = g.len() / out;
        let a_up = self.attention_up(a);
        let (mut gl, mut gv, mut pa) = (
            vec![T::zero(); planes * hw_l],
            vec![T::zero(); planes * hw_v],
            vec![T::zero(); planes * hw_a],
        );
        gl.par_chunks_mut(hw_l)
            .zip(gv.par_chunks_mut(hw_v))
            .zip(pa.par_chunks_mut(hw_a))
            .enumerate()
            .for_each_init(Scratch::new, |s, (p, ((gl, gv), pa))| {
                let item = p / c;
                let (g, ap) = (&g[p * out..][..out], &a_up[item * out..][..out]);
                let m = Scratch::plane(&mut s.m, hw_a);
                self.ra.adjoint(g, &mut s.tmp, m);
                let lp = up_or(&self.rl, &l[p * hw_l..][..hw_l], &mut s.tmp, &mut s.l);
                product_row_simd(pa, lp, m);
                let ai = &a[item * hw_a..][..hw_a];
                match &self.rl {
                    Some(r) => {
                        let am = Scratch::plane(&mut s.l, hw_a);
                        product_row_simd(am, ai, m);
                        r.adjoint(am, &mut s.tmp, gl);
                    }
                    None => product_row_simd(gl, ai, m),
                }
                match &self.rv {
                    Some(r) => {
                        let full = Scratch::plane(&mut s.v, out);
                        rest_row_simd(full, ap, g);
                        r.adjoint(full, &mut s.tmp, gv);
                    }
                    None => rest_row_simd(gv, ap, g),
                }
            });
        let mut ga = vec![T::zero(); planes / c * hw_a];
        ga.par_chunks_mut(hw_a)
            .enumerate()
            .for_each_init(Scratch::new, |s, (item, ga)| {
                let minus_sum = Scratch::plane(&mut s.m, out);
                minus_sum.fill(T::zero());
                for p in item * c..(item + 1) * c {
                    let vp = up_or(&self.rv, &v[p * hw_v..][..hw_v], &mut s.tmp, &mut s.v);
                    sub_product_row_simd(minus_sum, &g[p * out..][..out], vp);
                }
                self.ra.adjoint(minus_sum, &mut s.tmp, ga);
                for p in pa[item * c * hw_a..][..c * hw_a].chunks_exact(hw_a) {
                    ga.iter_mut().zip(p).for_each(|(o, x)| *o += *x);
                }
            });
        [gl, gv, ga]
    }

    /// The forward on (l, v, a) storages holding `T`.
    fn run<T: WithDType>(
        &self,
        (sl, ll): (&CpuStorage, &Layout),
        (sv, lv): (&CpuStorage, &Layout),
        (sa, la): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, _, _) = ll.shape().dims4()?;
        let (oh, ow) = self.sizes[3];
        let y = self.fwd::<T>(cpu::slice(sl, ll)?, cpu::slice(sv, lv)?, cpu::slice(sa, la)?, c);
        Ok((T::to_cpu_storage_owned(y), Shape::from((n, c, oh, ow))))
    }

    fn check(&self, ll: &Layout, lv: &Layout, la: &Layout) -> Result<()> {
        let (n, c, _, _) = ll.shape().dims4()?;
        let [(hl, wl), (ha, wa), (hv, wv), _] = self.sizes;
        if ll.shape().dims() != [n, c, hl, wl]
            || lv.shape().dims() != [n, c, hv, wv]
            || la.shape().dims() != [n, 1, ha, wa]
        {
            candle_core::bail!(
                "add_rest_up built for {hl}x{wl}, {hv}x{wv} and weight {ha}x{wa}: got {:?}, {:?}, weight {:?}",
                ll.shape(),
                lv.shape(),
                la.shape()
            );
        }
        Ok(())
    }
}

impl CustomOp3 for AddRestUp {
    fn name(&self) -> &'static str {
        "add-rest-up"
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
        let _span = crate::profile::span("add-rest-up");
        self.check(l1, l2, l3)?;
        cpu::with_real!("add_rest_up", s1, T => self.run::<T>((s1, l1), (s2, l2), (s3, l3)))
    }

    fn bwd(
        &self,
        l: &Tensor,
        v: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = crate::profile::span("add-rest-up backward");
        let g = g.contiguous()?;
        let c = l.dim(1)?;
        fn run<T: WithDType>(op: &AddRestUp, ts: [&Tensor; 4], c: usize) -> Result<[Tensor; 3]> {
            let guards = ts.iter().map(|t| cpu::read(t)).collect::<Result<Vec<_>>>()?;
            let s = guards
                .iter()
                .map(|(st, lay)| cpu::elems::<T>(st, lay))
                .collect::<Result<Vec<_>>>()?;
            let grads = op.grads(s[0], s[1], s[2], s[3], c);
            let mut out = grads
                .into_iter()
                .zip(ts)
                .map(|(x, t)| Tensor::from_vec(x, t.shape(), t.device()));
            let mut next = || out.next().expect("three gradients");
            Ok([next()?, next()?, next()?])
        }
        let [gl, gv, ga] = match l.dtype() {
            DType::F32 => run::<f32>(self, [l, v, a, &g], c)?,
            _ => run::<f64>(self, [l, v, a, &g], c)?,
        };
        Ok((Some(gl), Some(gv), Some(ga)))
    }
}

/// Softmax over dim 1 of an (N, C, H, W) map. candle's softmax on a
/// non-last dim is five generic ops with strided reductions; this is one
/// pass per block of pixels (max, exp-sum, scale), backward
/// `gx = y·(g − Σ_c g·y)`.
pub fn softmax_channels(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() == 4 {
        x.contiguous()?.apply_op1(SoftmaxChannels)
    } else {
        softmax_channels_slow(x)
    }
}

/// Other devices and dtypes: softmax over the last dim of a channels-last
/// copy. candle's CUDA max-reduction over dim 1 of an NCHW map reads out
/// of bounds (compute-sanitizer: `fast_max_f32`, an illegal address on an
/// H200), while its reductions over the last, contiguous dim are sound.
pub fn softmax_channels_slow(x: &Tensor) -> Result<Tensor> {
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
        let _span = crate::profile::span("softmax-channels");
        let (n, c, h, w) = l.shape().dims4()?;
        let out = cpu::with_real!("softmax", s, T => T::to_cpu_storage_owned(Self::fwd::<T>(cpu::slice(s, l)?, n, c, h * w)));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let _span = crate::profile::span("softmax-channels backward");
        let g = g.contiguous()?;
        let (n, c, h, w) = y.dims4()?;
        let (sy, ly) = y.storage_and_layout();
        let (sg, lg) = g.storage_and_layout();
        let (candle_core::Storage::Cpu(sy), candle_core::Storage::Cpu(sg)) = (&*sy, &*sg) else {
            candle_core::bail!("softmax: CPU tensors only");
        };
        let gx = cpu::with_real!("softmax", sy, T => Tensor::from_vec(
            Self::bwd::<T>(cpu::slice(sy, ly)?, cpu::slice(sg, lg)?, n, c, h * w),
            y.shape(),
            y.device(),
        )?);
        Ok(Some(gx))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Mix,
    Weight,
}

fn apply(kind: Kind, u: &Tensor, v: &Tensor, a: &Tensor) -> Result<Tensor> {
    if u.device().is_cpu() && matches!(u.dtype(), DType::F32 | DType::F64) && u.rank() == 4 {
        return u
            .contiguous()?
            .apply_op3(&v.contiguous()?, &a.contiguous()?, Blend { kind });
    }
    match kind {
        Kind::Mix => mix_slow(u, v, a),
        Kind::Weight => weight_slow(u, a),
    }
}

/// [`mix`] with candle's broadcasts (other devices and dtypes).
pub fn mix_slow(u: &Tensor, v: &Tensor, a: &Tensor) -> Result<Tensor> {
    u.broadcast_mul(a)? + v.broadcast_mul(&a.affine(-1.0, 1.0)?)?
}

/// [`weight`] with candle's broadcasts (other devices and dtypes).
pub fn weight_slow(u: &Tensor, a: &Tensor) -> Result<Tensor> {
    u.broadcast_mul(a)
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
                    Kind::Weight => it.for_each(|(((o, u), _), w)| *o = *w * *u),
                }
            });
        out
    }

    /// `a·g` (∂u) and `(1 − a)·g` (∂v; `None` for `Weight`).
    fn grads_uv<T: WithDType>(&self, a: &[T], g: &[T], c: usize, hw: usize) -> (Vec<T>, Option<Vec<T>>) {
        let one = T::one();
        let gu = scaled(a, g, c, hw, |w| w);
        let gv = (self.kind != Kind::Weight).then(|| scaled(a, g, c, hw, |w| one - w));
        (gu, gv)
    }

    /// `∂a = Σ_c g·(u − v)` (`v` = 0 for `Weight`), in blocks of pixels.
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
    /// (∂u, ∂v unless `Weight`, ∂a) as tensors, from the storages of
    /// (u, v, a, g).
    fn grad_tensors<T: WithDType>(
        &self,
        slices: &[(&CpuStorage, &Layout)],
        (u, a): (&Tensor, &Tensor),
        c: usize,
    ) -> Result<(Tensor, Option<Tensor>, Tensor)> {
        let s: Vec<&[T]> = slices
            .iter()
            .map(|(s, l)| cpu::slice(s, l))
            .collect::<Result<_>>()?;
        let (n, _, h, w) = u.dims4()?;
        let (gu, gv) = self.grads_uv(s[2], s[3], c, h * w);
        let ga = self.grad_a(s[0], s[1], s[3], n, c, h * w);
        let t = |v: Vec<T>| Tensor::from_vec(v, u.shape(), u.device());
        Ok((
            t(gu)?,
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
        let _span = crate::profile::span("blend");
        let (n, c, h, w) = l1.shape().dims4()?;
        if l2.shape() != l1.shape() || l3.shape().dims() != [n, 1, h, w] {
            candle_core::bail!(
                "blend: {:?}, {:?}, weight {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        fn run<T: WithDType>(
            b: &Blend,
            s: [(&CpuStorage, &Layout); 3],
            c: usize,
            hw: usize,
        ) -> Result<CpuStorage> {
            let [u, v, a] = s.map(|(s, l)| cpu::slice::<T>(s, l));
            Ok(T::to_cpu_storage_owned(b.fwd(u?, v?, a?, c, hw)))
        }
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        let out = cpu::with_real!("blend", s1, T => run::<T>(self, s, c, h * w)?);
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
        let _span = crate::profile::span("blend backward");
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
        let (gu, gv, ga) =
            cpu::with_real!("blend", slices[0].0, T => self.grad_tensors::<T>(&slices, (u, a), c)?);
        drop(guards);
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
            let u0 = crate::testing::randn(25, 0f64, 1., (n, c, h, w), &dev).unwrap();
            let v0 = crate::testing::randn(26, 0f64, 1., (n, c, h, w), &dev).unwrap();
            let a0 = Tensor::rand(0f64, 1., (n, 1, h, w), &dev).unwrap();
            let r = crate::testing::randn(27, 0f64, 1., (n, c, h, w), &dev).unwrap();
            let vals = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
            type Formula = fn(&Tensor, &Tensor, &Tensor) -> Tensor;
            let cases: [(Kind, Formula); 2] = [
                (Kind::Mix, |u, v, a| {
                    (u.broadcast_mul(a).unwrap() + v.broadcast_mul(&a.affine(-1.0, 1.0).unwrap()).unwrap())
                        .unwrap()
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

    /// `add_rest_up` against the separate ops it stands for (our resizes,
    /// candle's broadcasts) and candle's autograd through them (f64): `l`
    /// smaller than `a` and at its size, `v` at the output size and smaller,
    /// whole and non-integer factors, more than one item.
    #[test]
    fn add_rest_up_equals_resizes_and_broadcasts() {
        let dev = Device::Cpu;
        let vals = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        // (n, c, l size, a size, v size, output size)
        let cases = [
            (2, 3, (2, 3), (4, 6), (8, 12), (8, 12)),
            (2, 3, (4, 6), (4, 6), (2, 3), (8, 12)),
            (1, 2, (2, 3), (5, 7), (3, 4), (11, 13)),
            (2, 1, (6, 6), (6, 6), (6, 6), (6, 6)),
        ];
        for (n, c, (hl, wl), (h, w), (hv, wv), out) in cases {
            let l0 = crate::testing::randn(28, 0f64, 1., (n, c, hl, wl), &dev).unwrap();
            let v0 = crate::testing::randn(29, 0f64, 1., (n, c, hv, wv), &dev).unwrap();
            let a0 = Tensor::rand(0f64, 1., (n, 1, h, w), &dev).unwrap();
            let r = crate::testing::randn(30, 0f64, 1., (n, c, out.0, out.1), &dev).unwrap();
            let run = |ours: bool| {
                let vars = [&l0, &v0, &a0].map(|t| Var::from_tensor(t).unwrap());
                let [l, v, a] = vars.each_ref().map(|v| v.as_tensor());
                let y = if ours {
                    add_rest_up(l, v, a, out).unwrap()
                } else {
                    let up = |t: &Tensor, hw: (usize, usize)| resize(t, hw.0, hw.1).unwrap();
                    // candle's broadcasts, our resize (tested on its own)
                    let low = up(l, (h, w)).broadcast_mul(a).unwrap();
                    let rest = up(v, out)
                        .broadcast_mul(&up(a, out).affine(-1.0, 1.0).unwrap())
                        .unwrap();
                    (up(&low, out) + rest).unwrap()
                };
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let mut all = vec![vals(&y)];
                all.extend([l, v, a].map(|t| vals(g.get(t).unwrap())));
                all
            };
            let (ours, theirs) = (run(true), run(false));
            for (what, (x, y)) in ["forward", "dl", "dv", "da"].iter().zip(ours.iter().zip(&theirs)) {
                assert_eq!(x.len(), y.len(), "{what}");
                for (p, q) in x.iter().zip(y) {
                    assert!(
                        (p - q).abs() < 1e-12,
                        "{what} at {:?}: {p} vs {q}",
                        ((hl, wl), (h, w), (hv, wv), out)
                    );
                }
            }
        }
    }

    #[test]
    fn add_rest_up_refuses_empty_maps() {
        let dev = Device::Cpu;
        let z = |h, w, c| Tensor::zeros((1, c, h, w), DType::F32, &dev).unwrap();
        assert!(add_rest_up(&z(2, 2, 3), &z(4, 4, 3), &z(4, 4, 1), (8, 8)).is_ok());
        assert!(add_rest_up(&z(2, 2, 3), &z(4, 4, 3), &z(4, 4, 1), (0, 8)).is_err());
        assert!(add_rest_up(&z(0, 2, 3), &z(4, 4, 3), &z(4, 4, 1), (8, 8)).is_err());
    }

    /// `add_rest_up`'s gradients against central differences (f64), the
    /// check that does not go through candle's autograd at all.
    #[test]
    fn add_rest_up_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let (u0, v0, a0) = (
            crate::testing::randn(31, 0f64, 1., (1, 2, 2, 3), &dev).unwrap(),
            crate::testing::randn(32, 0f64, 1., (1, 2, 4, 3), &dev).unwrap(),
            Tensor::rand(0f64, 1., (1, 1, 3, 4), &dev).unwrap(),
        );
        let out = (7, 9);
        let r = crate::testing::randn(33, 0f64, 1., (1, 2, 7, 9), &dev).unwrap();
        let loss = |u: &Tensor, v: &Tensor, a: &Tensor| -> Tensor {
            (add_rest_up(u, v, a, out).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let vars = [&u0, &v0, &a0].map(|t| Var::from_tensor(t).unwrap());
        let g = loss(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor())
            .backward()
            .unwrap();
        let eps = 1e-6;
        for k in 0..3 {
            let analytic: Vec<f64> = g
                .get(vars[k].as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f64> = [&u0, &v0, &a0][k].flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..base.len() {
                let at = |d: f64| {
                    let mut x = base.clone();
                    x[i] += d;
                    let mut ops = [u0.clone(), v0.clone(), a0.clone()];
                    ops[k] = Tensor::from_vec(x, ops[k].shape(), &dev).unwrap();
                    loss(&ops[0], &ops[1], &ops[2]).to_scalar::<f64>().unwrap()
                };
                let numeric = (at(eps) - at(-eps)) / (2. * eps);
                assert!(
                    (analytic[i] - numeric).abs() < 1e-6,
                    "operand {k}, element {i}: {} vs {numeric}",
                    analytic[i]
                );
            }
        }
    }

    /// Softmax across channels (the CPU op and the channels-last path other
    /// devices take) and its gradient against candle's softmax and
    /// autograd (f64), over more than one block of pixels.
    #[test]
    fn softmax_channels_matches_candle() {
        let dev = Device::Cpu;
        let x0 = crate::testing::randn(34, 0f64, 3., (2, 5, 3, 401), &dev).unwrap();
        let r = crate::testing::randn(35, 0f64, 1., (2, 5, 3, 401), &dev).unwrap();
        let vals = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let run = |ours: u8| {
            let x = Var::from_tensor(&x0).unwrap();
            let y = match ours {
                0 => softmax_channels(&x).unwrap(),
                1 => softmax_channels_slow(&x).unwrap(),
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

    /// Each op against its `*_slow` route: outputs and gradients (f64).
    #[test]
    fn ops_match_their_slow_routes() {
        use crate::testing::check_against_slow as check;
        let dev = Device::Cpu;
        let t =
            |seed, s: (usize, usize, usize, usize)| crate::testing::randn(seed, 0f64, 1., s, &dev).unwrap();
        let (u, v, a) = (t(40, (2, 3, 5, 7)), t(41, (2, 3, 5, 7)), t(42, (2, 1, 5, 7)));
        check(
            |x| mix(&x[0], &x[1], &x[2]),
            |x| mix_slow(&x[0], &x[1], &x[2]),
            &[u.clone(), v, a.clone()],
            1e-12,
        )
        .unwrap();
        check(
            |x| weight(&x[0], &x[1]),
            |x| weight_slow(&x[0], &x[1]),
            &[u.clone(), a],
            1e-12,
        )
        .unwrap();
        check(softmax_channels_first, softmax_channels_slow_first, &[u], 1e-12).unwrap();
        let (l, a, v) = (t(43, (1, 3, 4, 5)), t(44, (1, 1, 7, 9)), t(45, (1, 3, 7, 9)));
        check(
            |x| add_rest_up(&x[0], &x[1], &x[2], (13, 17)),
            |x| add_rest_up_slow(&x[0], &x[1], &x[2], (13, 17)),
            &[l, v, a],
            1e-12,
        )
        .unwrap();
    }

    fn softmax_channels_first(x: &[Tensor]) -> Result<Tensor> {
        softmax_channels(&x[0])
    }

    fn softmax_channels_slow_first(x: &[Tensor]) -> Result<Tensor> {
        softmax_channels_slow(&x[0])
    }
}

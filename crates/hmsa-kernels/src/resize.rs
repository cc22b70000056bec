//! Differentiable bilinear resize with PyTorch's `F.interpolate(...,
//! mode="bilinear", align_corners=False)` semantics.
//!
//! candle 0.11's `upsample_bilinear2d` has no backward, so the network, the
//! fusion and the losses all go through [`resize`] instead:
//! - on the CPU a custom op, separable (each input row resized horizontally
//!   once, then output rows blended from N of those rows: two for one
//!   resize, three for two resizes composed by [`resize_via`]), with the
//!   adjoint as backward (rayon over the N·C planes);
//! - on other devices `A_h · x · A_wᵀ` with dense interpolation matrices, which
//!   candle differentiates by itself.
//!
//! The sampling rule is PyTorch's `area_pixel_compute_source_index` with the
//! ratio in/out (what `recompute_scale_factor=True` gives for a scale factor,
//! and what a target size gives): `src = max((i + 0.5)·in/out − 0.5, 0)`,
//! `i0 = floor(src)`, `i1 = min(i0 + 1, in − 1)`, weights `1 − λ` and `λ`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Output size of `F.interpolate(x, scale_factor=s, recompute_scale_factor=True)`.
pub fn scaled_size(h: usize, w: usize, s: f64) -> (usize, usize) {
    ((h as f64 * s).floor() as usize, (w as f64 * s).floor() as usize)
}

/// Resize `(N, C, H, W)` to `(N, C, out_h, out_w)`, bilinear, align_corners=false.
pub fn resize(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 {
        candle_core::bail!("resize of a {h}x{w} map to an empty {out_h}x{out_w} map");
    }
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?.apply_op1(Bilinear {
            ty: axis(h, out_h),
            tx: axis(w, out_w),
            in_h: h,
            in_w: w,
        })
    } else {
        resize_slow(x, out_h, out_w)
    }
}

/// `resize(&resize(x, mid_h, mid_w)?, out_h, out_w)` as one op on the CPU:
/// the two bilinear resizes composed along each axis (at most three source
/// taps per output when the first resize enlarges, as the network's
/// upsampling of its 1/4-resolution logits to its input does), so the
/// intermediate map is never made. Equal to the two resizes up to rounding
/// (the composed weights are products formed in f64). Elsewhere, or when
/// an axis needs more taps, the two resizes.
pub fn resize_via(x: &Tensor, mid: (usize, usize), out: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if mid == (h, w) || mid == out {
        return resize(x, out.0, out.1);
    }
    if out.0 == 0 || out.1 == 0 || mid.0 == 0 || mid.1 == 0 {
        candle_core::bail!("resize of a {h}x{w} map via {mid:?} to {out:?}: empty");
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        if let (Some(ty), Some(tx)) = (composed(h, mid.0, out.0), composed(w, mid.1, out.1)) {
            return x.contiguous()?.apply_op1(Bilinear {
                ty,
                tx,
                in_h: h,
                in_w: w,
            });
        }
    }
    resize(&resize(x, mid.0, mid.1)?, out.0, out.1)
}

/// Resize `x` to the spatial size of `like`.
pub fn resize_as(x: &Tensor, like: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = like.dims4()?;
    resize(x, h, w)
}

/// Resize by a scale factor, as the official `ResizeX`.
pub fn resize_by(x: &Tensor, s: f64) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (oh, ow) = scaled_size(h, w, s);
    resize(x, oh, ow)
}

/// One output index's two source taps and their weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tap {
    pub i0: usize,
    pub i1: usize,
    pub w0: f64,
    pub w1: f64,
}

/// The taps of every output index for a resize from `n_in` to `n_out`.
pub fn taps(n_in: usize, n_out: usize) -> Vec<Tap> {
    let ratio = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|i| {
            let src = ((i as f64 + 0.5) * ratio - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            let l = src - i0 as f64;
            Tap {
                i0,
                i1,
                w0: 1.0 - l,
                w1: l,
            }
        })
        .collect()
}

/// Per output index along one axis: `N` source indices and their weights.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Taps<const N: usize> {
    i: [usize; N],
    w: [f64; N],
}

/// One bilinear resize along an axis.
fn axis(n_in: usize, n_out: usize) -> Vec<Taps<2>> {
    taps(n_in, n_out)
        .iter()
        .map(|t| Taps {
            i: [t.i0, t.i1],
            w: [t.w0, t.w1],
        })
        .collect()
}

/// Two bilinear resizes along an axis, `n_in -> n_mid -> n_out`, as one:
/// each output's two taps on the middle grid, each of those two taps on
/// the input. `None` when an output's taps span more than three
/// consecutive inputs (only when the first resize shrinks).
fn composed(n_in: usize, n_mid: usize, n_out: usize) -> Option<Vec<Taps<3>>> {
    let first = taps(n_in, n_mid);
    taps(n_mid, n_out)
        .iter()
        .map(|t| {
            let parts = [(t.i0, t.w0), (t.i1, t.w1)]
                .into_iter()
                .flat_map(|(j, wj)| {
                    let f = first[j];
                    [(f.i0, wj * f.w0), (f.i1, wj * f.w1)]
                })
                .filter(|&(_, w)| w != 0.0);
            let lo = parts.clone().map(|(i, _)| i).min().unwrap_or(0);
            let mut tap = Taps {
                i: std::array::from_fn(|k| (lo + k).min(n_in - 1)),
                w: [0.0; 3],
            };
            for (i, w) in parts {
                *tap.w.get_mut(i - lo)? += w;
            }
            Some(tap)
        })
        .collect()
}

/// Dense interpolation matrix, transposed: `(n_in, n_out)`, so that
/// `rows · m` resizes each row.
fn matrix_t(n_in: usize, n_out: usize) -> Vec<f32> {
    let mut m = vec![0f32; n_in * n_out];
    for (o, t) in taps(n_in, n_out).iter().enumerate() {
        m[t.i0 * n_out + o] += t.w0 as f32;
        m[t.i1 * n_out + o] += t.w1 as f32;
    }
    m
}

/// Other devices and dtypes: `x · A_wᵀ` then the same along H, each as
/// one plain 2-D product of contiguous operands (candle's CUDA matmul
/// rejects, or on some layouts mis-addresses, the broadcast and permuted
/// batch layouts a 4-D `broadcast_matmul` and its backward produce).
pub fn resize_slow(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let dev = x.device();
    let a = |i, o| -> Result<Tensor> { Tensor::from_vec(matrix_t(i, o), (i, o), dev)?.to_dtype(x.dtype()) };
    // rows: (N·C·H, W) · (W, W') -> (N·C, H, W')
    let y = x.contiguous()?.reshape((n * c * h, w))?.matmul(&a(w, out_w)?)?;
    // columns: (N·C, W', H) as rows · (H, H') -> (N·C, W', H') -> back to NCHW
    let y = y.reshape((n * c, h, out_w))?.transpose(1, 2)?.contiguous()?;
    let y = y.reshape((n * c * out_w, h))?.matmul(&a(h, out_h)?)?;
    y.reshape((n * c, out_w, out_h))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, c, out_h, out_w))
}

/// Forward resize on the CPU, separable, `N` taps per output index
/// (2: one bilinear resize; 3: two composed).
struct Bilinear<const N: usize> {
    ty: Vec<Taps<N>>,
    tx: Vec<Taps<N>>,
    in_h: usize,
    in_w: usize,
}

/// A bilinear resize of single planes, for ops that resize inside their
/// own loops (the blends of hierarchical fusion): [`PlaneResize::apply`]
/// is the resize, [`PlaneResize::adjoint`] its transpose; `tmp` is scratch
/// kept between calls.
pub(crate) struct PlaneResize(Bilinear<2>);

impl PlaneResize {
    pub(crate) fn new(from: (usize, usize), to: (usize, usize)) -> Self {
        PlaneResize(Bilinear {
            ty: axis(from.0, to.0),
            tx: axis(from.1, to.1),
            in_h: from.0,
            in_w: from.1,
        })
    }

    /// Elements of an input plane.
    pub(crate) fn in_len(&self) -> usize {
        self.0.in_h * self.0.in_w
    }

    /// Elements of an output plane.
    pub(crate) fn out_len(&self) -> usize {
        self.0.ty.len() * self.0.tx.len()
    }

    /// Resizes `src` (one input plane) into `dst` (one output plane, every
    /// element written).
    pub(crate) fn apply<T: WithDType>(&self, src: &[T], tmp: &mut Vec<T>, dst: &mut [T]) {
        assert!(src.len() == self.in_len() && dst.len() == self.out_len());
        plane_forward_simd(src, self.0.in_w, &self.0.ty, &self.0.tx, tmp, dst)
    }

    /// The transpose: `g` (one output plane) scattered into `dst` (one input
    /// plane, overwritten).
    pub(crate) fn adjoint<T: WithDType>(&self, g: &[T], tmp: &mut Vec<T>, dst: &mut [T]) {
        assert!(g.len() == self.out_len() && dst.len() == self.in_len());
        plane_backward_simd(g, &self.0.ty, &self.0.tx, self.0.in_w, tmp, dst)
    }
}

/// Backward of [`Bilinear`]: scatters the output gradient onto the input grid.
struct BilinearGrad<const N: usize> {
    ty: Vec<Taps<N>>,
    tx: Vec<Taps<N>>,
    in_h: usize,
    in_w: usize,
}

/// One plane, separably: every input row resized horizontally once into
/// `tmp` (H × W'), then each output row a blend of `N` `tmp` rows
/// (contiguous, vectorised). Arithmetic in the data's precision.
#[inline(always)]
fn plane_forward<T: WithDType, const N: usize>(
    src: &[T],
    w: usize,
    ty: &[Taps<N>],
    tx: &[Taps<N>],
    tmp: &mut Vec<T>,
    dst: &mut [T],
) {
    let ow = tx.len();
    let h = src.len() / w;
    tmp.clear();
    tmp.resize(h * ow, T::zero());
    let wx: Vec<[T; N]> = tx.iter().map(|t| t.w.map(T::from_f64)).collect();
    for (row, out) in src.chunks_exact(w).zip(tmp.chunks_exact_mut(ow)) {
        for ((o, t), wt) in out.iter_mut().zip(tx).zip(&wx) {
            *o = (2..N).fold(row[t.i[0]] * wt[0] + row[t.i[1]] * wt[1], |acc, k| {
                acc + row[t.i[k]] * wt[k]
            });
        }
    }
    // two taps in one pass, any third in another (N is 2 or 3)
    for (t, out) in ty.iter().zip(dst.chunks_exact_mut(ow)) {
        let wt = t.w.map(T::from_f64);
        let row = |k: usize| &tmp[t.i[k] * ow..][..ow];
        for ((o, a), b) in out.iter_mut().zip(row(0)).zip(row(1)) {
            *o = *a * wt[0] + *b * wt[1];
        }
        for (k, wk) in wt.iter().enumerate().skip(2) {
            for (o, c) in out.iter_mut().zip(row(k)) {
                *o += *c * *wk;
            }
        }
    }
}

crate::cpu::simd!(plane_forward_simd, plane_forward, [const N: usize], (src: &[T], w: usize, ty: &[Taps<N>], tx: &[Taps<N>], tmp: &mut Vec<T>, dst: &mut [T]), WithDType);

/// The adjoint of [`plane_forward`]: output rows scattered onto `tmp` rows
/// (contiguous), then each `tmp` row scattered onto its input row.
#[inline(always)]
fn plane_backward<T: WithDType, const N: usize>(
    grad: &[T],
    ty: &[Taps<N>],
    tx: &[Taps<N>],
    w: usize,
    tmp: &mut Vec<T>,
    dst: &mut [T],
) {
    let ow = tx.len();
    let h = dst.len() / w;
    tmp.clear();
    tmp.resize(h * ow, T::zero());
    for (t, g) in ty.iter().zip(grad.chunks_exact(ow)) {
        for k in 0..N {
            let wk = T::from_f64(t.w[k]);
            for (a, v) in tmp[t.i[k] * ow..][..ow].iter_mut().zip(g) {
                *a += *v * wk;
            }
        }
    }
    dst.fill(T::zero());
    let wx: Vec<[T; N]> = tx.iter().map(|t| t.w.map(T::from_f64)).collect();
    for (row, g) in dst.chunks_exact_mut(w).zip(tmp.chunks_exact(ow)) {
        for ((v, t), wt) in g.iter().zip(tx).zip(&wx) {
            for k in 0..N {
                row[t.i[k]] += *v * wt[k];
            }
        }
    }
}
crate::cpu::simd!(plane_backward_simd, plane_backward, [const N: usize], (grad: &[T], ty: &[Taps<N>], tx: &[Taps<N>], w: usize, tmp: &mut Vec<T>, dst: &mut [T]), WithDType);

impl<const N: usize> Bilinear<N> {
    fn run<T: WithDType>(&self, src: &[T], l: &Layout) -> Result<(Vec<T>, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let src = crate::cpu::contiguous(src, l)?;
        let (oh, ow) = (self.ty.len(), self.tx.len());
        let mut dst = vec![T::zero(); n * c * oh * ow];
        dst.par_chunks_mut(oh * ow)
            .zip(src.par_chunks(h * w))
            .for_each_init(Vec::new, |tmp, (d, s)| {
                plane_forward_simd(s, w, &self.ty, &self.tx, tmp, d)
            });
        Ok((dst, Shape::from((n, c, oh, ow))))
    }
}

impl<const N: usize> CustomOp1 for Bilinear<N> {
    fn name(&self) -> &'static str {
        "bilinear-resize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span("bilinear-resize");
        let (_, _, h, w) = l.shape().dims4()?;
        if (h, w) != (self.in_h, self.in_w) {
            candle_core::bail!(
                "bilinear resize built for {}x{}, got {h}x{w}",
                self.in_h,
                self.in_w
            );
        }
        crate::cpu::with_real!("bilinear resize", s, T => {
            let (d, sh) = self.run::<T>(T::cpu_storage_as_slice(s)?, l)?;
            Ok((T::to_cpu_storage_owned(d), sh))
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _span = crate::profile::span("bilinear-resize backward");
        let g = grad.contiguous()?.apply_op1_no_bwd(&BilinearGrad {
            ty: self.ty.clone(),
            tx: self.tx.clone(),
            in_h: self.in_h,
            in_w: self.in_w,
        })?;
        Ok(Some(g))
    }
}

impl<const N: usize> BilinearGrad<N> {
    fn run<T: WithDType>(&self, g: &[T], l: &Layout) -> Result<(Vec<T>, Shape)> {
        let (n, c, oh, ow) = l.shape().dims4()?;
        if (oh, ow) != (self.ty.len(), self.tx.len()) {
            candle_core::bail!(
                "bilinear resize grad built for {}x{}, got {oh}x{ow}",
                self.ty.len(),
                self.tx.len()
            );
        }
        let g = crate::cpu::contiguous(g, l)?;
        let plane = self.in_h * self.in_w;
        let mut dst = vec![T::zero(); n * c * plane];
        dst.par_chunks_mut(plane)
            .zip(g.par_chunks(oh * ow))
            .for_each_init(Vec::new, |tmp, (d, s)| {
                plane_backward_simd(s, &self.ty, &self.tx, self.in_w, tmp, d)
            });
        Ok((dst, Shape::from((n, c, self.in_h, self.in_w))))
    }
}

impl<const N: usize> CustomOp1 for BilinearGrad<N> {
    fn name(&self) -> &'static str {
        "bilinear-resize-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span("bilinear-resize-grad");
        crate::cpu::with_real!("bilinear resize grad", s, T => {
            let (d, sh) = self.run::<T>(T::cpu_storage_as_slice(s)?, l)?;
            Ok((T::to_cpu_storage_owned(d), sh))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f64], h: usize, w: usize) -> Tensor {
        Tensor::from_slice(v, (1, 1, h, w), &Device::Cpu).unwrap()
    }

    fn vals(x: &Tensor) -> Vec<f64> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "index {i}: {x} vs {y}");
        }
    }

    #[test]
    fn upsample_2x2_to_4x4_matches_hand_values() {
        // PyTorch: F.interpolate([[1,2],[3,4]], size=4, bilinear, align_corners=False)
        let y = resize(&t(&[1., 2., 3., 4.], 2, 2), 4, 4).unwrap();
        #[rustfmt::skip]
        let want = [1.0, 1.25, 1.75, 2.0,
                    1.5, 1.75, 2.25, 2.5,
                    2.5, 2.75, 3.25, 3.5,
                    3.0, 3.25, 3.75, 4.0];
        close(&vals(&y), &want, 1e-12);
    }

    #[test]
    fn non_integer_factors_match_hand_values() {
        // 5 -> 2 (factor 0.4, ratio 2.5): src = 0.75 and 3.25.
        let x = t(&[0., 1., 2., 3., 4.], 1, 5);
        close(&vals(&resize(&x, 1, 2).unwrap()), &[0.75, 3.25], 1e-12);
        // 3 -> 5 (ratio 0.6): src = -0.2 -> 0, 0.4, 1.0, 1.6, 2.2 -> clamped.
        let x = t(&[10., 20., 40.], 1, 3);
        close(
            &vals(&resize(&x, 1, 5).unwrap()),
            &[10., 14., 20., 32., 40.],
            1e-12,
        );
        // 8 -> 2 (0.25x): src = 1.5 and 5.5, i.e. not an area average.
        let x = t(&[0., 1., 2., 3., 4., 5., 6., 7.], 1, 8);
        close(&vals(&resize(&x, 1, 2).unwrap()), &[1.5, 5.5], 1e-12);
        assert_eq!(scaled_size(5, 7, 0.5), (2, 3));
        assert_eq!(scaled_size(6, 10, 0.25), (1, 2));
    }

    #[test]
    fn agrees_with_candle_forward_and_matrix_form() {
        let dev = Device::Cpu;
        let x = crate::testing::randn(3, 0f32, 1., (2, 3, 7, 10), &dev).unwrap();
        for (oh, ow) in [(14, 20), (3, 5), (1, 2), (17, 4), (7, 25)] {
            let ours = vals(&resize(&x, oh, ow).unwrap().to_dtype(DType::F64).unwrap());
            let candle = vals(
                &x.upsample_bilinear2d(oh, ow, false)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap(),
            );
            let mats = vals(&resize_slow(&x, oh, ow).unwrap().to_dtype(DType::F64).unwrap());
            close(&ours, &candle, 1e-5);
            close(&ours, &mats, 1e-5);
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        // candle has no backward for upsample_bilinear2d: this is our own.
        for (h, w, oh, ow) in [(3, 4, 7, 5), (6, 6, 3, 2), (4, 8, 2, 2)] {
            check_gradient(h, w, oh, ow, |x| resize(x, oh, ow));
        }
    }

    #[test]
    fn composed_gradient_matches_finite_differences() {
        for (h, w, mid, (oh, ow)) in [
            (3, 4, (12, 16), (7, 5)),
            (2, 3, (8, 12), (16, 24)),
            (4, 5, (7, 9), (3, 3)),
        ] {
            check_gradient(h, w, oh, ow, |x| resize_via(x, mid, (oh, ow)));
        }
    }

    #[test]
    fn composed_resize_equals_two_resizes() {
        let dev = Device::Cpu;
        let x = crate::testing::randn(4, 0f64, 1., (2, 3, 5, 7), &dev).unwrap();
        // the network's 4x upsampling then the fusion's resize; odd sizes;
        // a first resize that shrinks and still composes (5 -> 3 -> 6), and
        // one that needs more than three taps (7 -> 4 -> 8: two ops)
        for (mid, out, one_op) in [
            ((20, 28), (10, 14), true),
            ((20, 28), (40, 56), true),
            ((20, 28), (13, 9), true),
            ((9, 11), (4, 30), true),
            ((3, 9), (6, 10), true),
            ((3, 4), (6, 8), false),
        ] {
            let fits = composed(5, mid.0, out.0).is_some() && composed(7, mid.1, out.1).is_some();
            assert_eq!(fits, one_op, "{mid:?} -> {out:?}");
            let one = vals(&resize_via(&x, mid, out).unwrap());
            let two = vals(&resize(&resize(&x, mid.0, mid.1).unwrap(), out.0, out.1).unwrap());
            close(&one, &two, 1e-12);
            let f32s = vals(
                &resize_via(&x.to_dtype(DType::F32).unwrap(), mid, out)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap(),
            );
            close(&f32s, &two, 1e-5);
        }
    }

    #[test]
    fn composed_taps_stay_within_three_inputs_when_the_first_resize_enlarges() {
        for n in 1..12 {
            for m in n..4 * n + 3 {
                for o in 1..2 * m {
                    let taps = composed(n, m, o).unwrap_or_else(|| panic!("{n} -> {m} -> {o}"));
                    for t in taps {
                        assert!((t.w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
                        assert!(t.i.iter().all(|&i| i < n));
                    }
                }
            }
        }
        // shrinking first can need more: 8 -> 2 -> 3 reads inputs 1, 2, 5, 6
        assert!(composed(8, 2, 3).is_none());
    }

    /// `op`'s gradient against central differences of `Σ w·op(x)`, in f64.
    fn check_gradient(h: usize, w: usize, oh: usize, ow: usize, op: impl Fn(&Tensor) -> Result<Tensor>) {
        let dev = Device::Cpu;
        {
            let x0 = crate::testing::randn(5, 0f64, 1., (1, 2, h, w), &dev).unwrap();
            let wgt = crate::testing::randn(6, 0f64, 1., (1, 2, oh, ow), &dev).unwrap();
            let x = Var::from_tensor(&x0).unwrap();
            let loss = (op(x.as_tensor()).unwrap() * &wgt).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let analytic = vals(g.get(x.as_tensor()).unwrap());
            let base = vals(&x0);
            let eps = 1e-6;
            let f = |v: &[f64]| -> f64 {
                let xt = Tensor::from_slice(v, (1, 2, h, w), &dev).unwrap();
                (op(&xt).unwrap() * &wgt)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric: Vec<f64> = (0..base.len())
                .map(|i| {
                    let mut p = base.clone();
                    p[i] += eps;
                    let mut m = base.clone();
                    m[i] -= eps;
                    (f(&p) - f(&m)) / (2. * eps)
                })
                .collect();
            close(&analytic, &numeric, 1e-6);
        }
    }

    /// [`resize`] against [`resize_slow`] (the dense-matrix route):
    /// outputs and gradients, enlarging and shrinking (f64; the matrices
    /// hold their weights in f32, hence 1e-6).
    #[test]
    fn matches_the_slow_route() {
        let x = crate::testing::randn(46, 0f64, 1., (2, 3, 5, 7), &Device::Cpu).unwrap();
        for (oh, ow) in [(11, 13), (3, 4), (5, 14)] {
            crate::testing::check_against_slow(
                |t| resize(&t[0], oh, ow),
                |t| resize_slow(&t[0], oh, ow),
                std::slice::from_ref(&x),
                1e-6,
            )
            .unwrap();
        }
    }
}

//! Differentiable bilinear resize with PyTorch's `F.interpolate(...,
//! mode="bilinear", align_corners=False)` semantics.
//!
//! candle 0.11's `upsample_bilinear2d` has no backward, so the network, the
//! fusion and the losses all go through [`resize`] instead:
//! - on the CPU a custom op, separable (each input row resized horizontally
//!   once, then output rows blended from two of those rows), with the
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
        x.contiguous()?.apply_op1(Bilinear { out_h, out_w })
    } else {
        resize_by_matrices(x, out_h, out_w)
    }
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
fn resize_by_matrices(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
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

/// Forward resize on the CPU.
struct Bilinear {
    out_h: usize,
    out_w: usize,
}

/// Backward of [`Bilinear`]: scatters the output gradient onto the input grid.
struct BilinearGrad {
    in_h: usize,
    in_w: usize,
}

/// One plane, separably: every input row resized horizontally once into
/// `tmp` (H × W'), then each output row a blend of two `tmp` rows
/// (contiguous, vectorised). Arithmetic in the data's precision.
#[inline(always)]
fn plane_forward<T: WithDType>(src: &[T], w: usize, ty: &[Tap], tx: &[Tap], tmp: &mut Vec<T>, dst: &mut [T]) {
    let ow = tx.len();
    let h = src.len() / w;
    tmp.clear();
    tmp.resize(h * ow, T::zero());
    let wx: Vec<(T, T)> = tx
        .iter()
        .map(|s| (T::from_f64(s.w0), T::from_f64(s.w1)))
        .collect();
    for (row, out) in src.chunks_exact(w).zip(tmp.chunks_exact_mut(ow)) {
        for ((o, s), (w0, w1)) in out.iter_mut().zip(tx).zip(&wx) {
            *o = row[s.i0] * *w0 + row[s.i1] * *w1;
        }
    }
    for (t, out) in ty.iter().zip(dst.chunks_exact_mut(ow)) {
        let (w0, w1) = (T::from_f64(t.w0), T::from_f64(t.w1));
        let (r0, r1) = (&tmp[t.i0 * ow..(t.i0 + 1) * ow], &tmp[t.i1 * ow..(t.i1 + 1) * ow]);
        for ((o, a), b) in out.iter_mut().zip(r0).zip(r1) {
            *o = *a * w0 + *b * w1;
        }
    }
}

super::cpu::simd!(plane_forward_simd, plane_forward, (src: &[T], w: usize, ty: &[Tap], tx: &[Tap], tmp: &mut Vec<T>, dst: &mut [T]));

/// The adjoint of [`plane_forward`]: output rows scattered onto `tmp` rows
/// (contiguous), then each `tmp` row scattered onto its input row.
#[inline(always)]
fn plane_backward<T: WithDType>(
    grad: &[T],
    ty: &[Tap],
    tx: &[Tap],
    w: usize,
    tmp: &mut Vec<T>,
    dst: &mut [T],
) {
    let ow = tx.len();
    let h = dst.len() / w;
    tmp.clear();
    tmp.resize(h * ow, T::zero());
    for (t, g) in ty.iter().zip(grad.chunks_exact(ow)) {
        let (w0, w1) = (T::from_f64(t.w0), T::from_f64(t.w1));
        for (a, v) in tmp[t.i0 * ow..(t.i0 + 1) * ow].iter_mut().zip(g) {
            *a += *v * w0;
        }
        for (b, v) in tmp[t.i1 * ow..(t.i1 + 1) * ow].iter_mut().zip(g) {
            *b += *v * w1;
        }
    }
    dst.fill(T::zero());
    let wx: Vec<(T, T)> = tx
        .iter()
        .map(|s| (T::from_f64(s.w0), T::from_f64(s.w1)))
        .collect();
    for (row, g) in dst.chunks_exact_mut(w).zip(tmp.chunks_exact(ow)) {
        for ((v, s), (w0, w1)) in g.iter().zip(tx).zip(&wx) {
            row[s.i0] += *v * *w0;
            row[s.i1] += *v * *w1;
        }
    }
}
super::cpu::simd!(plane_backward_simd, plane_backward, (grad: &[T], ty: &[Tap], tx: &[Tap], w: usize, tmp: &mut Vec<T>, dst: &mut [T]));

impl Bilinear {
    fn run<T: WithDType>(&self, src: &[T], l: &Layout) -> Result<(Vec<T>, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let src = super::cpu::contiguous(src, l)?;
        let (ty, tx) = (taps(h, self.out_h), taps(w, self.out_w));
        let plane = self.out_h * self.out_w;
        let mut dst = vec![T::zero(); n * c * plane];
        dst.par_chunks_mut(plane)
            .zip(src.par_chunks(h * w))
            .for_each_init(Vec::new, |tmp, (d, s)| plane_forward_simd(s, w, &ty, &tx, tmp, d));
        Ok((dst, Shape::from((n, c, self.out_h, self.out_w))))
    }
}

impl CustomOp1 for Bilinear {
    fn name(&self) -> &'static str {
        "bilinear-resize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(v) => self.run(v, l).map(|(d, sh)| (CpuStorage::F32(d), sh)),
            CpuStorage::F64(v) => self.run(v, l).map(|(d, sh)| (CpuStorage::F64(d), sh)),
            _ => candle_core::bail!("bilinear resize: only f32 and f64 on the CPU"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, in_h, in_w) = arg.dims4()?;
        let g = grad
            .contiguous()?
            .apply_op1_no_bwd(&BilinearGrad { in_h, in_w })?;
        Ok(Some(g))
    }
}

impl BilinearGrad {
    fn run<T: WithDType>(&self, g: &[T], l: &Layout) -> Result<(Vec<T>, Shape)> {
        let (n, c, oh, ow) = l.shape().dims4()?;
        let g = super::cpu::contiguous(g, l)?;
        let (ty, tx) = (taps(self.in_h, oh), taps(self.in_w, ow));
        let plane = self.in_h * self.in_w;
        let mut dst = vec![T::zero(); n * c * plane];
        dst.par_chunks_mut(plane)
            .zip(g.par_chunks(oh * ow))
            .for_each_init(Vec::new, |tmp, (d, s)| {
                plane_backward_simd(s, &ty, &tx, self.in_w, tmp, d)
            });
        Ok((dst, Shape::from((n, c, self.in_h, self.in_w))))
    }
}

impl CustomOp1 for BilinearGrad {
    fn name(&self) -> &'static str {
        "bilinear-resize-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(v) => self.run(v, l).map(|(d, sh)| (CpuStorage::F32(d), sh)),
            CpuStorage::F64(v) => self.run(v, l).map(|(d, sh)| (CpuStorage::F64(d), sh)),
            _ => candle_core::bail!("bilinear resize grad: only f32 and f64 on the CPU"),
        }
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
        let x = Tensor::randn(0f32, 1., (2, 3, 7, 10), &dev).unwrap();
        for (oh, ow) in [(14, 20), (3, 5), (1, 2), (17, 4), (7, 25)] {
            let ours = vals(&resize(&x, oh, ow).unwrap().to_dtype(DType::F64).unwrap());
            let candle = vals(
                &x.upsample_bilinear2d(oh, ow, false)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap(),
            );
            let mats = vals(
                &resize_by_matrices(&x, oh, ow)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap(),
            );
            close(&ours, &candle, 1e-5);
            close(&ours, &mats, 1e-5);
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        // candle has no backward for upsample_bilinear2d: this is our own.
        let dev = Device::Cpu;
        for (h, w, oh, ow) in [(3, 4, 7, 5), (6, 6, 3, 2), (4, 8, 2, 2)] {
            let x0 = Tensor::randn(0f64, 1., (1, 2, h, w), &dev).unwrap();
            let wgt = Tensor::randn(0f64, 1., (1, 2, oh, ow), &dev).unwrap();
            let x = Var::from_tensor(&x0).unwrap();
            let loss = (resize(x.as_tensor(), oh, ow).unwrap() * &wgt)
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let analytic = vals(g.get(x.as_tensor()).unwrap());
            let base = vals(&x0);
            let eps = 1e-6;
            let f = |v: &[f64]| -> f64 {
                let xt = Tensor::from_slice(v, (1, 2, h, w), &dev).unwrap();
                (resize(&xt, oh, ow).unwrap() * &wgt)
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
}

//! The CPU kernels of hmsa-lab: candle custom ops with their own backward
//! for what a training step of the network spends its time in, measured
//! with `perf` (the reasons are in each module's docs and in the project's
//! `docs/performance.md`).
//!
//! - [`conv`]: 2-D convolution (im2col + gemm, Winograd F(4x4, 3x3)), a
//!   per-channel bias, and an inference convolution with a fused epilogue;
//! - [`resize`]: bilinear resize with PyTorch's `align_corners=False`
//!   sampling, and its adjoint;
//! - [`batchnorm`]: training-mode BatchNorm (+ residual, + ReLU);
//! - [`blend`]: the per-pixel blends of scale fusion and the channel
//!   softmax;
//! - [`cross_entropy`]: weighted cross-entropy with an ignore label;
//! - [`profile`]: per-op wall time of a step, when enabled;
//! - [`cpu`]: what the ops share (storage access, the SIMD wrapper, `exp`
//!   in f32, the f32/f64 dispatch).
//!
//! The public surface is plain functions on [`Tensor`]s in the style of
//! `candle_nn::ops`: on the CPU in f32 or f64 they run our op, on other
//! devices and dtypes they fall back to candle's ops (the `*_slow`
//! functions or candle's own), so callers never branch on the device.
//! Each op is checked beside it against a different route to the same
//! numbers (candle's ops, a direct loop) and its backward against finite
//! differences in f64.

pub mod batchnorm;
pub mod blend;
pub mod conv;
pub mod cpu;
pub mod cross_entropy;
pub mod profile;
pub mod resize;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use candle_core::{Result, Tensor};

/// `t` in `like`'s dtype (a clone when it already is): parameters kept in
/// f32 meet activations in a half type this way.
pub fn cast_like(t: &Tensor, like: &Tensor) -> Result<Tensor> {
    if t.dtype() == like.dtype() {
        Ok(t.clone())
    } else {
        t.to_dtype(like.dtype())
    }
}

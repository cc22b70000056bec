//! Weighted mean cross-entropy over the channels of (N, C, H, W) logits
//! against (N, H, W) labels, with an ignore label, as one CPU op with its
//! own backward.
//!
//! Why: candle's log-softmax across the channel axis of an NCHW map, the
//! one-hot product and their backward were a tenth of a training step.
//! Other devices and dtypes use candle's ops ([`one_hot`], `log_softmax`).

use crate::blend::softmax_planes;
use crate::cpu::{self, Real};
use candle_core::{DType, Result, Tensor, WithDType};

/// (N, H, W) u32 labels -> (N, C, H, W) one-hot in `dtype` (labels ≥ C,
/// such as the ignore label 255, give zeros) and the (N, 1, H, W) valid
/// mask.
pub fn one_hot(labels: &Tensor, c: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
    let dev = labels.device();
    let classes = Tensor::arange(0u32, c as u32, dev)?.reshape((1, c, 1, 1))?;
    let l = labels.unsqueeze(1)?;
    let oh = l.broadcast_eq(&classes)?.to_dtype(dtype)?;
    let valid = l.lt(c as u32)?.to_dtype(dtype)?;
    Ok((oh, valid))
}

/// Mean cross-entropy over pixels whose label is below C, with optional
/// per-class weights (PyTorch's weighted mean: Σ w_t·nll / Σ w_t; 0 when
/// no pixel is labelled). `weights`, when given, has C entries.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, weights: Option<&[f32]>) -> Result<Tensor> {
    let c = logits.dim(1)?;
    if logits.device().is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64) {
        let op = CrossEntropy {
            weights: weights.map(|w| w.iter().map(|&v| v as f64).collect()),
            probs: Default::default(),
        };
        return logits
            .contiguous()?
            .apply_op2(&labels.to_dtype(DType::U32)?.contiguous()?, op);
    }
    cross_entropy_slow(logits, labels, weights, c)
}

/// The same with candle's ops: `−Σ w·onehot·log_softmax / Σ w·onehot`.
fn cross_entropy_slow(logits: &Tensor, labels: &Tensor, weights: Option<&[f32]>, c: usize) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let (oh, _) = one_hot(labels, c, logits.dtype())?;
    let per_class = match weights {
        Some(w) => {
            let w = Tensor::from_slice(w, (1, c, 1, 1), logits.device())?.to_dtype(logits.dtype())?;
            oh.broadcast_mul(&w)?
        }
        None => oh,
    };
    let nll = (logp * &per_class)?.sum_all()?.neg()?;
    // With no valid pixel the loss is 0, not NaN.
    let d = per_class
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(f64::MIN_POSITIVE);
    nll / d
}

/// Weighted mean cross-entropy of (N, C, H, W) logits against (N, H, W) u32
/// labels as one op: per pixel `nll = m + log Σ_c exp(x_c − m) − x_t` (`m`
/// the pixel's largest logit); the loss is `Σ w_t·nll / Σ w_t` over
/// labelled pixels (0 when none). Backward: `∂/∂x_c = g·w_t·(softmax_c −
/// [c = t]) / Σ w_t`, 0 on ignored pixels, from the softmax the forward
/// kept (one `exp` per element in all, in the data's precision).
struct CrossEntropy {
    weights: Option<Vec<f64>>,
    /// The forward's softmax, for the backward.
    probs: std::sync::Mutex<Option<candle_core::CpuStorage>>,
}

impl CrossEntropy {
    fn weight(&self, t: u32, c: usize) -> Option<f64> {
        let t = t as usize;
        (t < c).then(|| self.weights.as_ref().map_or(1.0, |w| w[t]))
    }

    /// The softmax and (Σ w_t·nll, Σ w_t), summed in f64 in a fixed order.
    fn sums<T: Real>(&self, x: &[T], t: &[u32], (n, c, hw): (usize, usize, usize)) -> (Vec<T>, f64, f64) {
        let (probs, parts) = softmax_planes(x, n, c, hw, |b, p0, m, s| {
            let (mut nll, mut den) = (0.0, 0.0);
            for (j, (m, s)) in m.iter().zip(s).enumerate() {
                let p = p0 + j;
                let lab = t[b * hw + p];
                if let Some(w) = self.weight(lab, c) {
                    let xt = x[(b * c + lab as usize) * hw + p];
                    nll += w * (*m + s.ln() - xt).to_f64();
                    den += w;
                }
            }
            (nll, den)
        });
        let (nll, den) = parts.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
        (probs, nll, den)
    }

    /// `g·w_t/Σw·(p − onehot)`, in place of the softmax `p`.
    fn grad<T: Real>(&self, mut p: Vec<T>, t: &[u32], (n, c, hw): (usize, usize, usize), g: f64) -> Vec<T> {
        use rayon::prelude::*;
        let den = t
            .iter()
            .filter_map(|&lab| self.weight(lab, c))
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
        // g·w_t/Σw per pixel, 0 where ignored
        let k0: Vec<T> = t
            .iter()
            .map(|&l| T::from_f64(self.weight(l, c).map_or(0.0, |w| g * w / den)))
            .collect();
        debug_assert_eq!(p.len(), n * c * hw);
        p.par_chunks_mut(hw).enumerate().for_each(|(plane, v)| {
            let (b, k) = (plane / c, plane % c);
            let (labs, k0) = (&t[b * hw..][..hw], &k0[b * hw..][..hw]);
            for ((v, &lab), &k0) in v.iter_mut().zip(labs).zip(k0) {
                let hot = if lab as usize == k { T::one() } else { T::zero() };
                *v = k0 * (*v - hot);
            }
        });
        p
    }
}

impl candle_core::CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let _span = crate::profile::span("cross-entropy");
        let d = cpu::nc_hw(l1)?;
        let t: &[u32] = cpu::slice(s2, l2)?;
        let out = cpu::with_real!("cross-entropy", s1, T => {
            let (p, nll, den) = self.sums::<T>(cpu::slice(s1, l1)?, t, d);
            *self.probs.lock().expect("probs lock") = Some(T::to_cpu_storage_owned(p));
            T::to_cpu_storage_owned(vec![T::from_f64(nll / den.max(f64::MIN_POSITIVE))])
        });
        Ok((out, candle_core::Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _span = crate::profile::span("cross-entropy backward");
        use candle_core::CpuStorage as S;
        let g = g.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let (ts, tl) = labels.storage_and_layout();
        let candle_core::Storage::Cpu(ts) = &*ts else {
            candle_core::bail!("cross-entropy: CPU tensors only");
        };
        let t = cpu::slice::<u32>(ts, tl)?;
        let d = (logits.dim(0)?, logits.dim(1)?, logits.dim(2)? * logits.dim(3)?);
        let probs = self.probs.lock().expect("probs lock").take();
        let (shape, dev) = (logits.shape(), logits.device());
        let grad = match probs {
            Some(S::F32(p)) if p.len() == logits.elem_count() => {
                Tensor::from_vec(self.grad(p, t, d, g), shape, dev)?
            }
            Some(S::F64(p)) if p.len() == logits.elem_count() => {
                Tensor::from_vec(self.grad(p, t, d, g), shape, dev)?
            }
            _ => candle_core::bail!("cross-entropy: backward without its forward"),
        };
        Ok((Some(grad), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn cross_entropy_by_hand_with_ignore_and_weights() {
        // 1 image, 2 classes, 3 pixels: logits (0, ln 3) everywhere ->
        // p = (1/4, 3/4). Labels 0, 1, 255.
        let l3 = 3f64.ln();
        let logits = Tensor::from_slice(&[0.0, 0.0, 0.0, l3, l3, l3], (1, 2, 1, 3), &Device::Cpu).unwrap();
        let labels = Tensor::from_slice(&[0u32, 1, 255], (1, 1, 3), &Device::Cpu).unwrap();
        let ce: f64 = cross_entropy(&logits, &labels, None)
            .unwrap()
            .to_scalar()
            .unwrap();
        let want = (-(0.25f64.ln()) - 0.75f64.ln()) / 2.0;
        assert!((ce - want).abs() < 1e-12);
        let ce: f64 = cross_entropy(&logits, &labels, Some(&[3.0, 1.0]))
            .unwrap()
            .to_scalar()
            .unwrap();
        let want = (-3.0 * 0.25f64.ln() - 0.75f64.ln()) / 4.0;
        assert!((ce - want).abs() < 1e-6);
        let none = Tensor::from_slice(&[255u32, 255, 255], (1, 1, 3), &Device::Cpu).unwrap();
        let ce: f64 = cross_entropy(&logits, &none, None).unwrap().to_scalar().unwrap();
        assert_eq!(ce, 0.0);
    }

    /// Gradient of the fused cross-entropy against central finite
    /// differences (f64; weights, an ignored pixel, several blocks).
    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let (n, c, h, w) = (2, 3, 1, crate::blend::BLOCK + 5);
        let x0 = crate::testing::randn(36, 0f64, 2., (n, c, h, w), &dev).unwrap();
        let mut lab: Vec<u32> = (0..n * h * w).map(|i| (i * 7 % 4) as u32).collect();
        lab.iter_mut().filter(|v| **v == 3).for_each(|v| *v = 255);
        let labels = Tensor::from_vec(lab, (n, h, w), &dev).unwrap();
        let wts = [0.5f32, 2.0, 1.0];
        let x = Var::from_tensor(&x0).unwrap();
        let loss = cross_entropy(x.as_tensor(), &labels, Some(&wts)).unwrap();
        let g: Vec<f64> = loss
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let f = |t: &Tensor| -> f64 {
            cross_entropy(t, &labels, Some(&wts))
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        // every pixel of the first block's start, the block edge and the tail
        for i in (0..base.len()).step_by(97) {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                Tensor::from_vec(v, (n, c, h, w), &dev).unwrap()
            };
            let fd = (f(&at(eps)) - f(&at(-eps))) / (2.0 * eps);
            assert!((g[i] - fd).abs() < 1e-7, "d/dx[{i}]: {} vs {fd}", g[i]);
        }
    }

    /// The CPU op against [`cross_entropy_slow`] (candle's ops), f32 and f64.
    #[test]
    fn cpu_op_matches_the_slow_route() {
        let dev = Device::Cpu;
        let (n, c, h, w) = (2, 4, 3, 7);
        let lab: Vec<u32> = (0..n * h * w).map(|i| [0, 3, 255, 1, 2][i % 5]).collect();
        let labels = Tensor::from_vec(lab, (n, h, w), &dev).unwrap();
        for dt in [DType::F32, DType::F64] {
            let x = crate::testing::randn(37, 0f64, 2., (n, c, h, w), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            for wts in [None, Some(&[0.5f32, 2.0, 1.0, 3.0][..])] {
                let fast = cross_entropy(&x, &labels, wts)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let slow = cross_entropy_slow(&x, &labels, wts, c)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    (fast - slow).abs() < 1e-5 * slow.abs().max(1.0),
                    "{dt:?}: {fast} vs {slow}"
                );
            }
        }
    }
}

//! SGD with momentum and weight decay (PyTorch semantics; candle's SGD has
//! neither), and the polynomial learning-rate schedule with optional warm-up.
//!
//! PyTorch: `d = g + wd·θ`; `buf = μ·buf + d` (the first step `buf = d`);
//! `θ −= lr·buf`. Variables without a gradient (BN running statistics) are
//! left alone. The momentum buffers are saved by name for exact resume.

use crate::config::OptimConfig;
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// Learning rate at `step` (0-based) of `total`.
pub fn lr_at(cfg: &OptimConfig, step: usize, total: usize) -> f64 {
    let poly = (1.0 - step as f64 / total.max(1) as f64)
        .max(0.0)
        .powf(cfg.poly_power);
    let warm = if cfg.warmup_steps > 0 && step < cfg.warmup_steps {
        (step + 1) as f64 / cfg.warmup_steps as f64
    } else {
        1.0
    };
    cfg.lr * poly * warm
}

/// One variable's update in place, over contiguous f32 CPU tensors (the
/// candle ops below take six passes and as many new tensors per variable):
/// `buf = μ·buf + d` (`d` on the first step), `d = g + wd·θ`, then `θ −=
/// lr·buf`, each product and sum rounded to f32 in the order the candle
/// ops round them; without momentum `θ −= lr·d` in one pass. Returns the
/// buffer to keep (`None` without momentum), or `None` for the whole update
/// on other devices, dtypes and layouts.
#[allow(clippy::type_complexity)]
fn in_place(
    theta: &Tensor,
    g: &Tensor,
    prev: Option<&Tensor>,
    lr: f64,
    momentum: f64,
    wd: f64,
) -> Result<Option<Option<Tensor>>> {
    use candle_core::DType;
    let fits = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
    if !fits(theta) || !fits(g) || !prev.is_none_or(fits) {
        return Ok(None);
    }
    let (lr, mu, wd) = (lr as f32, momentum as f32, wd as f32);
    if momentum == 0.0 {
        theta.inplace_op2(g, &Descend { lr, wd })?;
        return Ok(Some(None));
    }
    let buf = match prev {
        Some(b) => {
            b.inplace_op3(g, theta, &Momentum { mu, wd })?;
            b.clone()
        }
        // the first step: buf = d
        None => (g + (theta * wd as f64)?)?,
    };
    theta.inplace_op2(&buf, &Descend { lr, wd: 0.0 })?;
    Ok(Some(Some(buf)))
}

/// `θ = θ − lr·(v + wd·θ)` in place (operands θ, v).
struct Descend {
    lr: f32,
    wd: f32,
}

impl candle_core::InplaceOp2 for Descend {
    fn name(&self) -> &'static str {
        "sgd-descend"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let v = hmsa_kernels::cpu::slice::<f32>(s2, l2)?;
        let th = slice_mut(s1, l1)?;
        if th.len() != v.len() {
            candle_core::bail!("sgd-descend: {} values, {} updates", th.len(), v.len());
        }
        for (t, &v) in th.iter_mut().zip(v) {
            let d = if self.wd != 0.0 { v + *t * self.wd } else { v };
            *t -= d * self.lr;
        }
        Ok(())
    }
}

/// `buf = μ·buf + (g + wd·θ)` in place (operands buf, g, θ).
struct Momentum {
    mu: f32,
    wd: f32,
}

impl candle_core::InplaceOp3 for Momentum {
    fn name(&self) -> &'static str {
        "sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let g = hmsa_kernels::cpu::slice::<f32>(s2, l2)?;
        let th = hmsa_kernels::cpu::slice::<f32>(s3, l3)?;
        let b = slice_mut(s1, l1)?;
        if b.len() != g.len() || b.len() != th.len() {
            candle_core::bail!(
                "sgd-momentum: {} buffer values for {} gradients of {} values",
                b.len(),
                g.len(),
                th.len()
            );
        }
        for ((b, &g), &t) in b.iter_mut().zip(g).zip(th) {
            *b = *b * self.mu + (g + t * self.wd);
        }
        Ok(())
    }
}

/// The f32 elements of a contiguous CPU storage, mutably.
fn slice_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("sgd: contiguous f32 CPU tensors only"),
    }
}

/// SGD with momentum over named variables.
pub struct Sgd {
    vars: Vec<(String, Var)>,
    bufs: HashMap<String, Tensor>,
    momentum: f64,
    weight_decay: f64,
}

impl Sgd {
    /// `vars` sorted by name so that every run updates in the same order.
    pub fn new(mut vars: Vec<(String, Var)>, cfg: &OptimConfig) -> Self {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self {
            vars,
            bufs: HashMap::new(),
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
        }
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let theta = var.as_tensor();
            let prev = self.bufs.get(name).filter(|_| self.momentum != 0.0);
            let buf = match in_place(theta, g, prev, lr, self.momentum, self.weight_decay)? {
                Some(buf) => buf,
                None => {
                    let d = if self.weight_decay != 0.0 {
                        (g + (theta * self.weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    let buf = match prev {
                        Some(b) => ((b * self.momentum)? + d)?,
                        None => d,
                    };
                    var.set(&(theta - (&buf * lr)?)?)?;
                    (self.momentum != 0.0).then_some(buf)
                }
            };
            if let Some(buf) = buf {
                self.bufs.insert(name.clone(), buf.detach());
            }
        }
        Ok(())
    }

    /// Writes the momentum buffers (safetensors, by variable name).
    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.bufs, path).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Reads buffers written by [`Sgd::save`]; unknown names are an error.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let m = candle_core::safetensors::load(path, &candle_core::Device::Cpu).map_err(|e| {
            Error::Checkpoint {
                path: path.to_path_buf(),
                msg: e.to_string(),
            }
        })?;
        for (k, t) in m {
            let Some((_, v)) = self.vars.iter().find(|(n, _)| *n == k) else {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    msg: format!("momentum buffer for unknown variable {k}"),
                });
            };
            self.bufs.insert(k, t.to_device(v.device())?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sgd_matches_pytorch_by_hand() {
        // θ0 = 1, gradient of θ² is 2θ; lr 0.1, μ 0.9, wd 0.5.
        // step 1: d = 2 + 0.5 = 2.5, buf = 2.5, θ = 1 − 0.25 = 0.75
        // step 2: d = 1.5 + 0.375 = 1.875, buf = 0.9·2.5 + 1.875 = 4.125, θ = 0.75 − 0.4125 = 0.3375
        let v = Var::new(&[1.0f64], &Device::Cpu).unwrap();
        let cfg = OptimConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = Sgd::new(vec![("w".into(), v.clone())], &cfg);
        for want in [0.75, 0.3375] {
            let loss = v.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap(), 0.1).unwrap();
            let got: Vec<f64> = v.as_tensor().to_vec1().unwrap();
            assert!((got[0] - want).abs() < 1e-12, "{} vs {want}", got[0]);
        }
    }

    /// The fused f32 update against candle's ops in f64 (the route f64
    /// variables take), over three steps of random values: with momentum
    /// and weight decay, and with neither (plain SGD, no buffer kept).
    #[test]
    fn fused_f32_update_matches_the_f64_ops() {
        let dev = Device::Cpu;
        for (momentum, weight_decay) in [(0.9, 5e-4), (0.0, 0.0)] {
            let cfg = OptimConfig {
                momentum,
                weight_decay,
                ..Default::default()
            };
            let theta0 = Tensor::randn(0f64, 1., (3, 5), &dev).unwrap();
            let v32 = Var::from_tensor(&theta0.to_dtype(candle_core::DType::F32).unwrap()).unwrap();
            let v64 = Var::from_tensor(&theta0).unwrap();
            let mut o32 = Sgd::new(vec![("w".into(), v32.clone())], &cfg);
            let mut o64 = Sgd::new(vec![("w".into(), v64.clone())], &cfg);
            for step in 0..3 {
                // the same loss Σ c·θ² in both precisions
                let c = Tensor::randn(0f64, 1., (3, 5), &dev).unwrap();
                let c32 = c.to_dtype(candle_core::DType::F32).unwrap();
                let l64 = (v64.as_tensor().sqr().unwrap() * &c).unwrap().sum_all().unwrap();
                let l32 = (v32.as_tensor().sqr().unwrap() * &c32)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                o64.step(&l64.backward().unwrap(), 0.05).unwrap();
                o32.step(&l32.backward().unwrap(), 0.05).unwrap();
                let a: Vec<f32> = v32.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f64> = v64.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                for (a, b) in a.iter().zip(&b) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-5 * b.abs().max(1.0),
                        "step {step}: {a} vs {b}"
                    );
                }
                assert_eq!(o32.bufs.len(), usize::from(momentum != 0.0));
            }
        }
    }

    #[test]
    fn poly_schedule_and_warmup() {
        let cfg = OptimConfig {
            lr: 0.01,
            poly_power: 2.0,
            warmup_steps: 4,
            ..Default::default()
        };
        assert!((lr_at(&cfg, 0, 100) - 0.01 * 0.25).abs() < 1e-15);
        assert!((lr_at(&cfg, 50, 100) - 0.01 * 0.25).abs() < 1e-15); // (1 − 0.5)²
        assert!((lr_at(&cfg, 90, 100) - 0.01 * 0.01).abs() < 1e-15);
        assert_eq!(lr_at(&cfg, 100, 100), 0.0);
    }
}

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
            let d = if self.weight_decay != 0.0 {
                (g + (theta * self.weight_decay)?)?
            } else {
                g.clone()
            };
            let buf = match self.bufs.get(name) {
                Some(b) if self.momentum != 0.0 => ((b * self.momentum)? + d)?,
                _ => d,
            };
            var.set(&(theta - (&buf * lr)?)?)?;
            if self.momentum != 0.0 {
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

//! Seeded parameter initialisation. candle's CPU random generator cannot be
//! seeded (`Device::set_seed` fails on the CPU), so a run that must be
//! reproducible builds its network on [`seeded_varbuilder`]: every tensor is
//! drawn, in creation order, from one `StdRng` stream following the
//! layer's `Init` hint, and registered in a `VarMap` for training.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use std::sync::Mutex;

struct Seeded {
    varmap: VarMap,
    rng: Mutex<StdRng>,
}

fn draw(h: Init, shape: &Shape, rng: &mut StdRng) -> Vec<f32> {
    let n = shape.elem_count();
    let uniform = |rng: &mut StdRng, lo: f64, up: f64| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..up) as f32).collect()
    };
    let normal = |rng: &mut StdRng, mean: f64, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(rng);
                (mean + std * z) as f32
            })
            .collect()
    };
    match h {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } => uniform(rng, lo, up),
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    uniform(rng, -b, b)
                }
                NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for Seeded {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut vars = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = vars.get(name) {
            let t = v.as_tensor();
            if t.shape() != &s {
                candle_core::bail!("{name}: requested {s:?}, already created as {:?}", t.shape());
            }
            return Ok(t.clone());
        }
        let values = draw(h, &s, &mut self.rng.lock().expect("rng lock"));
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        match self.varmap.data().lock().expect("varmap lock").get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no variable {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("varmap lock").contains_key(name)
    }
}

/// A VarBuilder whose new variables are drawn from `seed` and land in `varmap`.
pub fn seeded_varbuilder(varmap: &VarMap, seed: u64, dev: &Device) -> VarBuilder<'static> {
    let backend = Seeded {
        varmap: varmap.clone(),
        rng: Mutex::new(StdRng::seed_from_u64(seed)),
    };
    VarBuilder::from_backend(Box::new(backend), DType::F32, dev.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HmsaNet, ModelConfig};

    fn build(seed: u64) -> VarMap {
        let vm = VarMap::new();
        HmsaNet::new(&ModelConfig::small(), seeded_varbuilder(&vm, seed, &Device::Cpu)).unwrap();
        vm
    }

    fn get(vm: &VarMap, name: &str) -> Vec<f32> {
        let d = vm.data().lock().unwrap();
        d[name].as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let (a, b, c) = (build(1), build(1), build(2));
        let n = "backbone.stage3.0.branches.1.0.conv1.weight";
        assert_eq!(get(&a, n), get(&b, n));
        assert_ne!(get(&a, n), get(&c, n));
        // BN statistics follow their Init hints.
        assert!(get(&a, "backbone.bn1.running_var").iter().all(|&v| v == 1.0));
        // Kaiming normal for a 3x3 conv from 32 channels: std = sqrt(2 / 288).
        let w = get(&a, "backbone.conv2.weight");
        let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let want = 2.0 / 288.0;
        assert!((var / want - 1.0).abs() < 0.1, "variance {var} vs {want}");
    }
}

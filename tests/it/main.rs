//! Integration tests: one binary, helpers here, topics in modules.

mod cli;
mod conventions;
mod data;
mod export;
mod lab;
mod many;
mod model;
mod recipes;
mod report;
mod safety;
mod servers;
mod train;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use hmsa_lab::model::init::seeded_varbuilder;
use hmsa_lab::model::{HmsaNet, ModelConfig};
use std::path::PathBuf;

pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

pub fn tiny() -> ModelConfig {
    ModelConfig::from_toml_file(&data("tiny.toml")).unwrap()
}

/// A freshly initialised network with its variables.
pub fn fresh(cfg: &ModelConfig, seed: u64) -> (VarMap, HmsaNet) {
    let vm = VarMap::new();
    let net = HmsaNet::new(cfg, seeded_varbuilder(&vm, seed, &Device::Cpu)).unwrap();
    (vm, net)
}

/// Deterministic pseudo-random values in [-1.7, 1.7] (a hash of the index).
pub fn noise(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let mut z =
                (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z ^= z >> 31;
            z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 29;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 3.4 - 1.7) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn image(h: usize, w: usize, seed: u64) -> Tensor {
    noise((1, 3, h, w), seed)
}

/// The class (argmax over dimension 1) of every pixel, flattened.
pub fn argmax_ids(t: &Tensor) -> Vec<u32> {
    t.argmax(1).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

pub fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    vals(a)
        .iter()
        .zip(vals(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

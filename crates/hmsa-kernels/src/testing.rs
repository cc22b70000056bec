//! Helpers for the unit tests: seeded random tensors, so that a failing
//! test replays (candle's CPU `Tensor::randn` cannot be seeded).

use candle_core::{Device, FloatDType, Result, Shape, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

/// Normal draws (mean, std) of `shape` in `T`'s dtype, from `seed`.
pub fn randn<T: FloatDType>(
    seed: u64,
    mean: T,
    std: T,
    shape: impl Into<Shape>,
    dev: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(mean.to_f64(), std.to_f64()).expect("a valid std");
    let v: Vec<f64> = (0..shape.elem_count()).map(|_| normal.sample(&mut rng)).collect();
    Tensor::from_vec(v, shape, dev)?.to_dtype(T::DTYPE)
}

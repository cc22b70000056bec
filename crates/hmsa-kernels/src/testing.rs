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

/// Checks an op against its `*_slow` route in f64: the outputs, and the
/// gradients of `Σ r·op(inputs)` (`r` seeded) with respect to every input,
/// ours against candle's autograd of the slow route; within `tol` of the
/// largest magnitude.
pub fn check_against_slow(
    fast: impl Fn(&[Tensor]) -> Result<Tensor>,
    slow: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    tol: f64,
) -> Result<()> {
    use candle_core::{DType, Var};
    let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(DType::F64)?))
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let r = randn(99, 0f64, 1., y.shape(), y.device())?;
        let g = (&y * &r)?.sum_all()?.backward()?;
        let grads = ts
            .iter()
            .map(|t| {
                g.get(t)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
            })
            .collect::<Result<_>>()?;
        Ok((y, grads))
    };
    let (yf, gf) = run(&fast)?;
    let (ys, gs) = run(&slow)?;
    let close = |a: &Tensor, b: &Tensor, what: &str| -> Result<()> {
        let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0);
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        if d > tol * scale {
            candle_core::bail!("{what}: differs by {d} (scale {scale})");
        }
        Ok(())
    };
    close(&yf, &ys, "output")?;
    for (i, (a, b)) in gf.iter().zip(&gs).enumerate() {
        close(a, b, &format!("gradient of input {i}"))?;
    }
    Ok(())
}

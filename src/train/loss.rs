//! Losses: per-pixel cross-entropy with the ignore label, RMI (Region Mutual
//! Information, Zhao et al. 2019, arXiv 1910.12037) as the official
//! `loss/rmi.py` computes it, and the paper's combination over the fused,
//! auxiliary and per-scale predictions.
//!
//! candle 0.11 has no Cholesky, inverse or solve, so [`cholesky`] and
//! [`forward_substitute`] are written with tensor ops, column by column, and
//! candle differentiates them like any other graph (9x9 matrices, batched).

use crate::config::{LossConfig, MainLoss};
use crate::model::{Fused, ScaleOutput};
use crate::{Error, Result};
use candle_core::{DType, Tensor, D};
use hmsa_kernels::cross_entropy::one_hot;
use hmsa_kernels::resize::resize_via;
use hmsa_kernels::{self as kernels};

/// Ignore label of train-id maps.
pub const IGNORE: u32 = 255;

fn check_shapes(logits: &Tensor, labels: &Tensor) -> Result<()> {
    let (n, _, h, w) = logits.dims4()?;
    if labels.dims() != [n, h, w] {
        return Err(Error::invalid(
            "labels",
            format!(
                "labels {:?} do not match logits {:?}",
                labels.dims(),
                logits.dims()
            ),
        ));
    }
    Ok(())
}

/// Mean cross-entropy over pixels whose label is not 255, with optional
/// per-class weights (PyTorch's weighted mean: Σ w_t·nll / Σ w_t).
///
/// This checks the shapes and weights and names what is wrong, then runs
/// [`hmsa_kernels::cross_entropy::cross_entropy`] (on the CPU one op with its
/// own backward).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, weights: Option<&[f32]>) -> Result<Tensor> {
    check_shapes(logits, labels)?;
    let c = logits.dim(1)?;
    if let Some(w) = weights {
        if w.len() != c {
            return Err(Error::invalid(
                "train.class_weights",
                format!("{} weights for {c} classes", w.len()),
            ));
        }
    }
    Ok(kernels::cross_entropy::cross_entropy(logits, labels, weights)?)
}

/// Cholesky factor `L` (lower, `A = L·Lᵀ`) of a batch of symmetric positive
/// definite (B, n, n) matrices, with candle ops so it differentiates.
pub fn cholesky(a: &Tensor) -> Result<Tensor> {
    let (_, n, _) = a.dims3()?;
    let mut cols: Vec<Tensor> = Vec::with_capacity(n);
    for j in 0..n {
        // rows j.. of column j: A[:, j.., j] − L[:, j.., :j] · L[:, j, :j]ᵀ
        let a_col = a.narrow(1, j, n - j)?.narrow(2, j, 1)?; // (B, n−j, 1)
        let s = if j == 0 {
            a_col
        } else {
            let l_prev = Tensor::cat(&cols, 2)?; // (B, n, j)
            let rows = l_prev.narrow(1, j, n - j)?; // (B, n−j, j)
            let lj = l_prev.narrow(1, j, 1)?; // (B, 1, j)
            (a_col - rows.matmul(&lj.transpose(1, 2)?)?)?
        };
        let d = s.narrow(1, 0, 1)?.sqrt()?; // (B, 1, 1)
        let mut parts = Vec::with_capacity(3);
        if j > 0 {
            parts.push(Tensor::zeros((a.dim(0)?, j, 1), a.dtype(), a.device())?);
        }
        parts.push(d.clone());
        if j + 1 < n {
            parts.push(s.narrow(1, 1, n - j - 1)?.broadcast_div(&d)?);
        }
        cols.push(Tensor::cat(&parts, 1)?); // (B, n, 1)
    }
    Ok(Tensor::cat(&cols, 2)?)
}

/// `L⁻¹·B` for lower-triangular (B, n, n) `l` and (B, n, m) `b`, row by row.
pub fn forward_substitute(l: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, n, _) = l.dims3()?;
    let mut rows: Vec<Tensor> = Vec::with_capacity(n);
    for i in 0..n {
        let bi = b.narrow(1, i, 1)?; // (B, 1, m)
        let num = if i == 0 {
            bi
        } else {
            let y = Tensor::cat(&rows, 1)?; // (B, i, m)
            let li = l.narrow(1, i, 1)?.narrow(2, 0, i)?; // (B, 1, i)
            (bi - li.matmul(&y)?)?
        };
        let lii = l.narrow(1, i, 1)?.narrow(2, i, 1)?; // (B, 1, 1)
        rows.push(num.broadcast_div(&lii)?);
    }
    Ok(Tensor::cat(&rows, 1)?)
}

/// `log det A` of SPD matrices by Cholesky, as the official
/// `log_det_by_cholesky`: `2 Σ log(diag(L) + 1e-8)`. (B, n, n) -> (B,)
pub fn log_det(a: &Tensor) -> Result<Tensor> {
    let l = cholesky(a)?;
    let (_, n, _) = l.dims3()?;
    let eye = Tensor::eye(n, l.dtype(), l.device())?.unsqueeze(0)?;
    let diag = l.broadcast_mul(&eye)?.sum(D::Minus1)?; // (B, n)
    Ok(((diag + 1e-8)?.log()?.sum(D::Minus1)? * 2.0)?)
}

/// Official RMI constants.
const RMI_RADIUS: usize = 3;
const POS_ALPHA: f64 = 5e-4;
const CLIP_MIN: f64 = 1e-6;
const POOL: usize = 4;

/// RMI loss as the official `RMILoss.forward_sigmoid` (weight_lambda 0.5,
/// lambda_way 1): `0.5·BCE + 0.5·RMI`.
pub fn rmi(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    check_shapes(logits, labels)?;
    let (n, c, h, w) = logits.dims4()?;
    let (oh, valid) = one_hot(labels, c, logits.dtype())?;
    // BCE with logits, summed over classes and valid pixels, / (valid + 1):
    // max(x, 0) − x·y + log(1 + e^(−|x|))
    let x = logits;
    let bce = ((x.relu()? - (x * &oh)?)? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
    let bce = bce.broadcast_mul(&valid)?.sum_all()?;
    let n_valid = valid.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let bce = (bce / (n_valid + 1.0))?;

    let probs = (candle_nn::ops::sigmoid(logits)?.broadcast_mul(&valid)? + CLIP_MIN)?;
    // avg_pool2d(kernel 4, stride 4, padding 2), zero padding counted as
    // PyTorch's default. candle's pool has no padding argument: pad first.
    let pool = |t: &Tensor| -> Result<Tensor> {
        let p = t
            .pad_with_zeros(2, POOL / 2, POOL / 2)?
            .pad_with_zeros(3, POOL / 2, POOL / 2)?;
        Ok(p.avg_pool2d(POOL)?)
    };
    let (la, pr) = (pool(&oh)?, pool(&probs)?);
    let (_, _, ph, pw) = la.dims4()?;
    if ph < RMI_RADIUS || pw < RMI_RADIUS {
        return Err(Error::invalid(
            "train.crop",
            format!("RMI needs inputs of at least 8x8 pixels, got {h}x{w}"),
        ));
    }
    let (oh_, ow_) = (ph - (RMI_RADIUS - 1), pw - (RMI_RADIUS - 1));
    // The 9 shifted windows, row-major offsets: (N, C, 9, oh·ow) in f64.
    let windows = |t: &Tensor| -> Result<Tensor> {
        let mut v = Vec::with_capacity(RMI_RADIUS * RMI_RADIUS);
        for y in 0..RMI_RADIUS {
            for x in 0..RMI_RADIUS {
                v.push(
                    t.narrow(2, y, oh_)?
                        .narrow(3, x, ow_)?
                        .reshape((n, c, oh_ * ow_))?,
                );
            }
        }
        Ok(Tensor::stack(&v, 2)?.to_dtype(DType::F64)?)
    };
    let d = RMI_RADIUS * RMI_RADIUS;
    let la = windows(&la.detach())?;
    let pr = windows(&pr)?;
    let la = la
        .broadcast_sub(&la.mean_keepdim(3)?)?
        .reshape((n * c, d, oh_ * ow_))?;
    let pr = pr
        .broadcast_sub(&pr.mean_keepdim(3)?)?
        .reshape((n * c, d, oh_ * ow_))?;
    let eye = Tensor::eye(d, DType::F64, logits.device())?.unsqueeze(0)?;
    let la_cov = la.matmul(&la.t()?)?;
    let pr_cov = pr.matmul(&pr.t()?)?;
    let la_pr = la.matmul(&pr.t()?)?; // (B, 9, 9)
                                      // Σ_lp (Σ_p + αI)⁻¹ Σ_lpᵀ = Yᵀ Y with Y = L⁻¹ Σ_lpᵀ, L = chol(Σ_p + αI)
    let l = cholesky(&pr_cov.broadcast_add(&(&eye * POS_ALPHA)?)?)?;
    let y = forward_substitute(&l, &la_pr.t()?.contiguous()?)?;
    let appro = (la_cov - y.t()?.matmul(&y)?)?;
    let rmi_now = (log_det(&appro.broadcast_add(&(&eye * POS_ALPHA)?)?)? * 0.5)?; // (N·C,)
                                                                                  // mean over the batch, / 9, summed over classes
    let per_class = (rmi_now.reshape((n, c))?.mean(0)? / d as f64)?;
    let rmi = per_class.sum_all()?.to_dtype(logits.dtype())?;
    Ok(((bce * 0.5)? + (rmi * 0.5)?)?)
}

/// The parts of one step's loss.
#[derive(Debug, Clone)]
pub struct LossParts {
    pub total: Tensor,
    pub main: f32,
    pub aux: f32,
}

fn main_loss(cfg: &LossConfig, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    match cfg.main {
        MainLoss::Rmi => rmi(logits, labels),
        MainLoss::Ce => cross_entropy(logits, labels, cfg.class_weights.as_deref()),
    }
}

/// main(fused) + aux_weight·CE(fused aux) + scale_weight·Σ_s CE(resize(L_s)).
pub fn combined(
    cfg: &LossConfig,
    fused: &Fused,
    per_scale: &[ScaleOutput],
    labels: &Tensor,
) -> Result<LossParts> {
    // losses in f32 whatever the network's precision
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let main = main_loss(cfg, &f32(&fused.pred)?, labels)?;
    let fused_aux = fused.aux.as_ref().ok_or_else(|| {
        Error::invalid(
            "fusion",
            "the loss needs the aux logits of a training-mode forward",
        )
    })?;
    let aux = cross_entropy(&f32(fused_aux)?, labels, cfg.class_weights.as_deref())?;
    let mut total = (&main + (&aux * cfg.aux_weight)?)?;
    if cfg.scale_weight > 0.0 && per_scale.len() > 1 {
        // The official `two_scale_forward`: `criterion(..., do_rmi=False)`,
        // cross-entropy on each scale's own prediction at the input size.
        let (_, _, h, w) = fused.pred.dims4()?;
        for o in per_scale {
            let logits = resize_via(&f32(&o.cls)?, o.size, (h, w))?;
            let l = cross_entropy(&logits, labels, cfg.class_weights.as_deref())?;
            total = (total + (l * cfg.scale_weight)?)?;
        }
    }
    Ok(LossParts {
        main: main.to_dtype(DType::F32)?.to_scalar()?,
        aux: aux.to_dtype(DType::F32)?.to_scalar()?,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// log|det A| by Gaussian elimination with partial pivoting, in plain f64:
    /// an independent route to the same number.
    fn logdet_gauss(a: &[f64], n: usize) -> f64 {
        let mut m = a.to_vec();
        let mut ld = 0.0;
        for c in 0..n {
            let p = (c..n)
                .max_by(|&i, &j| m[i * n + c].abs().total_cmp(&m[j * n + c].abs()))
                .unwrap();
            if p != c {
                for k in 0..n {
                    m.swap(c * n + k, p * n + k);
                }
            }
            let piv = m[c * n + c];
            ld += piv.abs().ln();
            for r in c + 1..n {
                let f = m[r * n + c] / piv;
                for k in c..n {
                    m[r * n + k] -= f * m[c * n + k];
                }
            }
        }
        ld
    }

    /// Inverse by Gauss-Jordan, plain f64.
    fn inverse(a: &[f64], n: usize) -> Vec<f64> {
        let mut m = a.to_vec();
        let mut inv: Vec<f64> = (0..n * n)
            .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
            .collect();
        for c in 0..n {
            let p = (c..n)
                .max_by(|&i, &j| m[i * n + c].abs().total_cmp(&m[j * n + c].abs()))
                .unwrap();
            for k in 0..n {
                m.swap(c * n + k, p * n + k);
                inv.swap(c * n + k, p * n + k);
            }
            let piv = m[c * n + c];
            for k in 0..n {
                m[c * n + k] /= piv;
                inv[c * n + k] /= piv;
            }
            for r in 0..n {
                if r != c {
                    let f = m[r * n + c];
                    for k in 0..n {
                        m[r * n + k] -= f * m[c * n + k];
                        inv[r * n + k] -= f * inv[c * n + k];
                    }
                }
            }
        }
        inv
    }

    fn spd(n: usize, seed: u64) -> Vec<f64> {
        // B·Bᵀ + n·I from a deterministic B
        let b: Vec<f64> = (0..n * n)
            .map(|i| ((i as f64 + 1.0) * 0.37 + seed as f64).sin())
            .collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] =
                    (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum::<f64>() + if i == j { 0.5 } else { 0.0 };
            }
        }
        a
    }

    #[test]
    fn cholesky_log_det_matches_gaussian_elimination() {
        for (n, seed) in [(2, 1), (3, 2), (9, 3), (9, 4)] {
            let a = spd(n, seed);
            let t = Tensor::from_slice(&a, (1, n, n), &Device::Cpu).unwrap();
            let l = cholesky(&t).unwrap();
            // L·Lᵀ reproduces A
            let back: Vec<f64> = l
                .matmul(&l.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (x, y) in back.iter().zip(&a) {
                assert!((x - y).abs() < 1e-10);
            }
            let ld: f64 = log_det(&t).unwrap().to_vec1::<f64>().unwrap()[0];
            let want = logdet_gauss(&a, n);
            assert!((ld - want).abs() < 1e-6, "n={n}: {ld} vs {want}");
        }
    }

    #[test]
    fn log_det_gradient_is_the_inverse() {
        // d log det A / dA = A⁻ᵀ; the Cholesky graph must give it.
        let n = 4;
        let a = spd(n, 7);
        let v = Var::from_tensor(&Tensor::from_slice(&a, (1, n, n), &Device::Cpu).unwrap()).unwrap();
        // symmetrise so the gradient is symmetric as well
        let sym = ((v.as_tensor() + v.as_tensor().t().unwrap()).unwrap() * 0.5).unwrap();
        let g = log_det(&sym).unwrap().sum_all().unwrap().backward().unwrap();
        let got: Vec<f64> = g
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = inverse(&a, n);
        for (x, y) in got.iter().zip(&want) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }

    #[test]
    fn forward_substitution_solves() {
        let n = 5;
        let a = spd(n, 9);
        let t = Tensor::from_slice(&a, (1, n, n), &Device::Cpu).unwrap();
        let l = cholesky(&t).unwrap();
        let b = Tensor::from_slice(&[1.0f64, -2., 0.5, 3., 1.5], (1, n, 1), &Device::Cpu).unwrap();
        let y = forward_substitute(&l, &b).unwrap();
        let back: Vec<f64> = l.matmul(&y).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (x, w) in back.iter().zip([1.0, -2., 0.5, 3., 1.5]) {
            assert!((x - w).abs() < 1e-10);
        }
    }

    /// RMI computed independently in plain f64 loops (pooling, windows,
    /// covariances, Gauss-Jordan inverse, Gaussian-elimination log-det).
    fn rmi_reference(logits: &[f64], labels: &[u32], n: usize, c: usize, h: usize, w: usize) -> f64 {
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let mut bce = 0.0;
        let mut valid = 0.0;
        let mut prob = vec![0.0; n * c * h * w];
        let mut lab = vec![0.0; n * c * h * w];
        for b in 0..n {
            for y in 0..h {
                for x in 0..w {
                    let t = labels[(b * h + y) * w + x] as usize;
                    let ok = t < c;
                    if ok {
                        valid += 1.0;
                    }
                    for k in 0..c {
                        let i = ((b * c + k) * h + y) * w + x;
                        let z = logits[i];
                        let yk = if ok && t == k { 1.0 } else { 0.0 };
                        if ok {
                            bce += z.max(0.0) - z * yk + (1.0 + (-z.abs()).exp()).ln();
                        }
                        prob[i] = if ok { sig(z) } else { 0.0 } + 1e-6;
                        lab[i] = yk;
                    }
                }
            }
        }
        let bce = bce / (valid + 1.0);
        let (ph, pw) = (h / 4 + 1, w / 4 + 1);
        let pool = |v: &[f64], b: usize, k: usize, py: usize, px: usize| -> f64 {
            let mut s = 0.0;
            for dy in 0..4 {
                for dx in 0..4 {
                    let (y, x) = ((py * 4 + dy) as isize - 2, (px * 4 + dx) as isize - 2);
                    if y >= 0 && x >= 0 && (y as usize) < h && (x as usize) < w {
                        s += v[((b * c + k) * h + y as usize) * w + x as usize];
                    }
                }
            }
            s / 16.0
        };
        let (oh, ow) = (ph - 2, pw - 2);
        let mut total = 0.0;
        for k in 0..c {
            let mut per = 0.0;
            for b in 0..n {
                let vecs = |v: &[f64]| -> Vec<Vec<f64>> {
                    let mut out = vec![];
                    for dy in 0..3 {
                        for dx in 0..3 {
                            let mut r = vec![];
                            for y in 0..oh {
                                for x in 0..ow {
                                    r.push(pool(v, b, k, y + dy, x + dx));
                                }
                            }
                            let m = r.iter().sum::<f64>() / r.len() as f64;
                            out.push(r.iter().map(|x| x - m).collect());
                        }
                    }
                    out
                };
                let (la, pr) = (vecs(&lab), vecs(&prob));
                let cov = |a: &[Vec<f64>], bb: &[Vec<f64>]| -> Vec<f64> {
                    let mut m = vec![0.0; 81];
                    for i in 0..9 {
                        for j in 0..9 {
                            m[i * 9 + j] = a[i].iter().zip(&bb[j]).map(|(x, y)| x * y).sum();
                        }
                    }
                    m
                };
                let (sl, mut sp, slp) = (cov(&la, &la), cov(&pr, &pr), cov(&la, &pr));
                for i in 0..9 {
                    sp[i * 9 + i] += 5e-4;
                }
                let inv = inverse(&sp, 9);
                let mut m = sl.clone();
                for i in 0..9 {
                    for j in 0..9 {
                        let mut s = 0.0;
                        for a in 0..9 {
                            for bq in 0..9 {
                                s += slp[i * 9 + a] * inv[a * 9 + bq] * slp[j * 9 + bq];
                            }
                        }
                        m[i * 9 + j] -= s;
                    }
                    m[i * 9 + i] += 5e-4;
                }
                per += 0.5 * logdet_gauss(&m, 9);
            }
            total += per / n as f64 / 9.0;
        }
        0.5 * bce + 0.5 * total
    }

    #[test]
    fn rmi_matches_an_independent_computation() {
        let (n, c, h, w) = (2, 3, 16, 20);
        let logits: Vec<f64> = (0..n * c * h * w)
            .map(|i| ((i as f64) * 0.731).sin() * 2.0)
            .collect();
        let labels: Vec<u32> = (0..n * h * w)
            .map(|i| {
                if i % 17 == 0 {
                    255
                } else {
                    ((i / 7 + i / 45) % 3) as u32
                }
            })
            .collect();
        let lt = Tensor::from_slice(&logits, (n, c, h, w), &Device::Cpu).unwrap();
        let yt = Tensor::from_slice(&labels, (n, h, w), &Device::Cpu).unwrap();
        let got: f64 = rmi(&lt, &yt).unwrap().to_scalar().unwrap();
        let want = rmi_reference(&logits, &labels, n, c, h, w);
        assert!((got - want).abs() < 1e-6 * want.abs().max(1.0), "{got} vs {want}");
        // and it differentiates
        let v = Var::from_tensor(&lt).unwrap();
        let g = rmi(v.as_tensor(), &yt).unwrap().backward().unwrap();
        let gn: f64 = g
            .get(v.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(gn.is_finite() && gn > 0.0);
    }
}

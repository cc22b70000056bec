//! Strided 2-D convolution with our own backward.
//!
//! candle 0.11's `conv2d` backward is wrong for stride 2 when a feature map's
//! height and width differ in parity (a 0.5x training scale meets this at the
//! low-resolution branches of HRNet), and its input gradient goes through a
//! naive CPU `conv_transpose2d`. For strided layers the forward here is
//! candle's `conv2d` and the backward is
//! - input gradient: the output gradient dilated by the stride (zeros in
//!   between), padded by `k − 1 − p` (plus, at the end, the
//!   `(H + 2p − k) mod s` rows the forward's last window left over), then a
//!   stride-1 convolution with the kernel flipped and its in/out channels
//!   swapped;
//! - weight gradient: candle's own formula, the input (channels as batch)
//!   convolved with the output gradient as kernel, dilated by the stride.
//!
//! Stride-1 layers use candle's `conv2d` as it is (measured: no faster here).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor, WithDType,
};
use candle_nn::{Init, VarBuilder};

/// A convolution layer: `weight` (Cout, Cin, k, k), optional `bias`.
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl Conv {
    /// `nn.Conv2d(cin, cout, k, stride, padding=k/2, bias)`, initialised as
    /// candle-nn does (Kaiming normal weights, uniform bias).
    pub fn new(cin: usize, cout: usize, k: usize, stride: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(
            (cout, cin, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if bias {
            let b = 1.0 / ((cin * k * k) as f64).sqrt();
            Some(vb.get_with_hints(cout, "bias", Init::Uniform { lo: -b, up: b })?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            padding: k / 2,
            stride,
        })
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d(x, &self.weight, self.padding, self.stride)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// `conv2d(x, w, padding, stride)`; strided CPU convolutions take the
/// backward described above.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if stride > 1 && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, StridedConv { padding, stride })
    } else {
        x.conv2d(w, padding, stride, 1, 1)
    }
}

struct StridedConv {
    padding: usize,
    stride: usize,
}

fn tensor_of<T: WithDType>(s: &[T], l: &Layout) -> Result<Tensor> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("conv2d: non-contiguous input".into()))?;
    Tensor::from_slice(&s[a..b], l.shape(), &candle_core::Device::Cpu)
}

fn storage_of(t: &Tensor) -> Result<CpuStorage> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => CpuStorage::F32(t.to_vec1()?),
        DType::F64 => CpuStorage::F64(t.to_vec1()?),
        d => candle_core::bail!("conv2d: unsupported dtype {d:?}"),
    })
}

impl CustomOp2 for StridedConv {
    fn name(&self) -> &'static str {
        "strided-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => (tensor_of(a, l1)?, tensor_of(b, l2)?),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => (tensor_of(a, l1)?, tensor_of(b, l2)?),
            _ => candle_core::bail!("conv2d: input and weight must both be f32 or f64"),
        };
        let y = x.conv2d(&w, self.padding, self.stride, 1, 1)?;
        Ok((storage_of(&y)?, y.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (p, s) = (self.padding, self.stride);
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, k, _) = w.dims4()?;
        if p + 1 > k {
            candle_core::bail!("strided conv2d: padding {p} >= kernel {k} is not supported");
        }
        let gd = g.contiguous()?.apply_op1_no_bwd(&Dilate(s))?;
        let (rh, rw) = ((h + 2 * p - k) % s, (wd + 2 * p - k) % s);
        let q = k - 1 - p;
        let gd = gd.pad_with_zeros(2, q, q + rh)?.pad_with_zeros(3, q, q + rw)?;
        let wf = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?; // (Cin, Cout, k, k)
        let gx = gd.conv2d(&wf, 0, 1, 1, 1)?;
        // weight gradient, as candle computes it
        let xt = x.transpose(0, 1)?.contiguous()?; // (Cin, N, H, W)
        let gt = g.transpose(0, 1)?.contiguous()?; // (Cout, N, Ho, Wo)
        let gw = xt.conv2d(&gt, p, 1, s, 1)?; // (Cin, Cout, k', k')
        let gw = gw
            .narrow(2, 0, k)?
            .narrow(3, 0, k)?
            .transpose(0, 1)?
            .contiguous()?;
        Ok((Some(gx), Some(gw)))
    }
}

/// Inserts `s − 1` zeros between neighbours along H and W.
struct Dilate(usize);

impl Dilate {
    fn run<T: WithDType>(&self, v: &[T], l: &Layout) -> Result<(Vec<T>, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let v = match l.contiguous_offsets() {
            Some((a, b)) => &v[a..b],
            None => candle_core::bail!("dilate: non-contiguous input"),
        };
        let s = self.0;
        let (oh, ow) = ((h - 1) * s + 1, (w - 1) * s + 1);
        let mut out = vec![T::zero(); n * c * oh * ow];
        for (src, dst) in v.chunks(h * w).zip(out.chunks_mut(oh * ow)) {
            for y in 0..h {
                for x in 0..w {
                    dst[y * s * ow + x * s] = src[y * w + x];
                }
            }
        }
        Ok((out, Shape::from((n, c, oh, ow))))
    }
}

impl CustomOp1 for Dilate {
    fn name(&self) -> &'static str {
        "dilate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(v) => self.run(v, l).map(|(o, sh)| (CpuStorage::F32(o), sh)),
            CpuStorage::F64(v) => self.run(v, l).map(|(o, sh)| (CpuStorage::F64(o), sh)),
            _ => candle_core::bail!("dilate: f32 or f64 only"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Gradients of Σ conv(x, w)·r against central finite differences (f64).
    fn check(shape: (usize, usize, usize, usize), cout: usize, k: usize, p: usize, s: usize) {
        let dev = Device::Cpu;
        let x0 = Tensor::randn(0f64, 1., shape, &dev).unwrap();
        let w0 = Tensor::randn(0f64, 1., (cout, shape.1, k, k), &dev).unwrap();
        let y = x0.conv2d(&w0, p, s, 1, 1).unwrap();
        let r = Tensor::randn(0f64, 1., y.shape(), &dev).unwrap();
        let (x, w) = (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&w0).unwrap());
        let loss = (conv2d(x.as_tensor(), w.as_tensor(), p, s).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let gr = loss.backward().unwrap();
        let f = |xv: &Tensor, wv: &Tensor| -> f64 {
            (xv.conv2d(wv, p, s, 1, 1).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let eps = 1e-6;
        for (var, base, is_x) in [(&x, &x0, true), (&w, &w0, false)] {
            let g: Vec<f64> = gr
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..b.len() {
                let mut pl = b.clone();
                pl[i] += eps;
                let mut mi = b.clone();
                mi[i] -= eps;
                let tp = Tensor::from_slice(&pl, base.shape(), &dev).unwrap();
                let tm = Tensor::from_slice(&mi, base.shape(), &dev).unwrap();
                let num = if is_x {
                    (f(&tp, &w0) - f(&tm, &w0)) / (2. * eps)
                } else {
                    (f(&x0, &tp) - f(&x0, &tm)) / (2. * eps)
                };
                assert!(
                    (num - g[i]).abs() < 1e-5,
                    "grad {i}: {num} vs {} ({shape:?} k{k} p{p} s{s})",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn strided_gradients_match_finite_differences_at_any_parity() {
        check((1, 2, 6, 8), 3, 3, 1, 2);
        // mixed parity: candle 0.11's own backward fails here
        check((1, 2, 6, 7), 3, 3, 1, 2);
        check((2, 2, 7, 5), 2, 3, 1, 2);
        check((1, 3, 3, 6), 2, 3, 1, 2);
        check((1, 2, 9, 9), 2, 1, 0, 2);
        // stride 1 goes through candle
        check((2, 3, 5, 6), 4, 3, 1, 1);
    }

    #[test]
    fn forward_is_candles() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 9, 10), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (5, 3, 3, 3), &dev).unwrap();
        let a: Vec<f32> = conv2d(&x, &w, 1, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = x
            .conv2d(&w, 1, 2, 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
    }
}

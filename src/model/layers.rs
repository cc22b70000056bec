//! Small building blocks shared by the backbone, OCR and attention heads:
//! convolutions, BatchNorm with PyTorch's parameter order, conv+BN(+ReLU)
//! pairs and channel dropout.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, Init, VarBuilder};
use hmsa_kernels::{self as kernels, cast_like};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};

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
        Self::with_init(
            cin,
            cout,
            k,
            stride,
            bias,
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
            vb,
        )
    }

    /// [`Conv::new`] with the weights drawn from `init`.
    pub fn with_init(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        bias: bool,
        init: Init,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", init)?;
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

impl Conv {
    /// `act(conv(x)·scale + shift [+ residual])` per output channel,
    /// computed as one convolution with the scale folded into the weights
    /// and the rest in its epilogue (inference-time BatchNorm folding, see
    /// `layers::ConvBn`); no gradient flows.
    pub fn forward_folded(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let cout = self.weight.dim(0)?;
        let w = self
            .weight
            .detach()
            .broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
        let b = match &self.bias {
            Some(b) => (shift + (b.detach() * scale)?)?,
            None => shift.clone(),
        };
        let (w, b) = (cast_like(&w, x)?, cast_like(&b, x)?);
        kernels::conv::conv2d_act(x, &w, &b, self.padding, self.stride, residual, relu)
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = kernels::conv::conv2d(x, &cast_like(&self.weight, x)?, self.padding, self.stride)?;
        match &self.bias {
            Some(b) => kernels::conv::add_channel_bias(&y, &cast_like(b, x)?),
            None => Ok(y),
        }
    }
}

/// `nn.Conv2d(cin, cout, k, stride, padding=k/2)`; strided layers take our
/// backward (see `conv.rs`).
pub fn conv(cin: usize, cout: usize, k: usize, stride: usize, bias: bool, vb: VarBuilder) -> Result<Conv> {
    Conv::new(cin, cout, k, stride, bias, vb)
}

/// `nn.BatchNorm2d(c)` (eps 1e-5, momentum 0.1). The tensors are requested in
/// PyTorch's state_dict order (weight, bias, running_mean, running_var) so that
/// a recorded parameter list reads like the official one.
pub fn batch_norm(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    let weight = vb.get_with_hints(c, "weight", Init::Const(1.))?;
    let bias = vb.get_with_hints(c, "bias", Init::Const(0.))?;
    let mean = vb.get_with_hints(c, "running_mean", Init::Const(0.))?;
    let var = vb.get_with_hints(c, "running_var", Init::Const(1.))?;
    BatchNorm::new(c, mean, var, weight, bias, 1e-5)
}

/// How a [`ConvBn`] is built (after candle's `Conv2dConfig`): name only
/// what differs from the defaults, a 3x3 stride-1 convolution without bias,
/// then BatchNorm and ReLU, at the state_dict segments `0` and `1` of a
/// `Sequential`.
///
/// ```text
/// ConvBn::new(cin, cout, ConvBnConfig { k: 1, relu: false, ..Default::default() }, vb)
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ConvBnConfig<'a> {
    /// Kernel size (square, padding `k / 2`).
    pub k: usize,
    pub stride: usize,
    /// Whether the convolution has a bias.
    pub bias: bool,
    /// Whether a ReLU follows the BatchNorm.
    pub relu: bool,
    /// State_dict segment of the convolution.
    pub conv_at: &'a str,
    /// State_dict segment of the BatchNorm (`"1.0"` for the official
    /// `BNReLU` wrapper).
    pub bn_at: &'a str,
}

impl Default for ConvBnConfig<'_> {
    fn default() -> Self {
        Self {
            k: 3,
            stride: 1,
            bias: false,
            relu: true,
            conv_at: "0",
            bn_at: "1",
        }
    }
}

/// Conv then BatchNorm, optionally ReLU (see [`ConvBnConfig`]).
#[derive(Debug, Clone)]
pub struct ConvBn {
    conv: Conv,
    bn: BatchNorm,
    relu: bool,
}

impl ConvBn {
    pub fn new(cin: usize, cout: usize, cfg: ConvBnConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv(cin, cout, cfg.k, cfg.stride, cfg.bias, vb.pp(cfg.conv_at))?,
            bn: batch_norm(cout, vb.pp(cfg.bn_at))?,
            relu: cfg.relu,
        })
    }

    /// A convolution built elsewhere (another initialisation), then the
    /// BatchNorm at `bn_at`.
    pub fn with_conv(conv: Conv, cout: usize, relu: bool, bn_at: &str, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv,
            bn: batch_norm(cout, vb.pp(bn_at))?,
            relu,
        })
    }
}

impl ConvBn {
    /// `relu(self(x) + residual)`, the end of a residual block; at inference
    /// the add and the ReLU run in the convolution's epilogue.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            kernels::batchnorm::forward_train(&self.bn, &self.conv.forward(x)?, Some(residual), true)
        } else {
            self.folded(x, Some(residual), true)
        }
    }

    /// Inference: one convolution with BatchNorm folded in (`w·γ/σ`,
    /// `β − μ·γ/σ`, with `σ = sqrt(running_var + eps)`), the shift, residual
    /// and ReLU in its epilogue: no separate passes over the activation.
    fn folded(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        // Detached: candle_nn's BatchNorm keeps its running statistics as
        // `Var`s, so without this every inference activation would record
        // its inputs for backprop and stay alive until the forward returns
        // (massif: most of the peak memory).
        let (gamma, beta) = self
            .bn
            .weight_and_bias()
            .ok_or_else(|| candle_core::Error::Msg("BatchNorm without affine parameters".into()))?;
        let var = self.bn.running_var().detach();
        let scale = (gamma.detach() / (var + self.bn.eps())?.sqrt()?)?;
        let shift = (beta.detach() - (self.bn.running_mean().detach() * &scale)?)?;
        self.conv.forward_folded(x, &scale, &shift, residual, relu)
    }
}

impl ModuleT for ConvBn {
    /// Training: conv, then BatchNorm on batch statistics (then ReLU if
    /// asked). Inference: [`ConvBn::folded`].
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            return self.folded(x, None, self.relu);
        }
        kernels::batchnorm::forward_train(&self.bn, &self.conv.forward(x)?, None, self.relu)
    }
}

/// `nn.Dropout2d(p)`: zeroes whole channels in training, identity
/// otherwise. It owns its generator (candle's CPU generator cannot be
/// seeded), which the trainer reseeds every step for exact resume; owned by
/// the layer rather than by a thread, the masks do not depend on which
/// thread runs the forward.
#[derive(Debug, Clone)]
pub struct Dropout2d {
    p: f64,
    rng: Arc<Mutex<StdRng>>,
}

impl Dropout2d {
    pub fn new(p: f64) -> Self {
        Self {
            p,
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(0))),
        }
    }

    /// Sets the drop probability, `0 <= p < 1` (0 turns the layer off).
    /// For parity checks against another implementation, which cannot
    /// draw our masks: with dropout off both compute the same function.
    pub fn set_p(&mut self, p: f64) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability {p} is not in [0, 1)");
        }
        self.p = p;
        Ok(())
    }

    /// Reseeds the generator.
    pub fn seed(&self, seed: u64) {
        *self.rng.lock().expect("dropout generator") = StdRng::seed_from_u64(seed);
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let (n, c, _, _) = x.dims4()?;
        let scale = 1.0 / (1.0 - self.p);
        let keep: Vec<f32> = {
            let mut r = self.rng.lock().expect("dropout generator");
            (0..n * c)
                .map(|_| if r.random_bool(self.p) { 0.0 } else { scale as f32 })
                .collect()
        };
        let keep = Tensor::from_vec(keep, (n, c, 1, 1), x.device())?.to_dtype(x.dtype())?;
        x.broadcast_mul(&keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Folded inference against the plain formula, per element in f64:
    /// `γ·(conv(x) + b − μ)/sqrt(var + eps) + β`, then ReLU.
    #[test]
    fn folded_batch_norm_matches_conv_then_batch_norm() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let (cin, cout) = (3, 4);
        let cb = ConvBn::new(
            cin,
            cout,
            ConvBnConfig {
                stride: 2,
                bias: true,
                conv_at: "c",
                bn_at: "b",
                ..Default::default()
            },
            vb,
        )
        .unwrap();
        // Non-trivial statistics and affine parameters.
        let set = |name: &str, v: &[f32]| {
            let data = vm.data().lock().unwrap();
            data[name].set(&Tensor::new(v, &dev).unwrap()).unwrap();
        };
        set("b.running_mean", &[0.5, -1.0, 0.0, 2.0]);
        set("b.running_var", &[4.0, 0.25, 1.0, 9.0]);
        set("b.weight", &[1.5, -0.5, 1.0, 2.0]);
        set("b.bias", &[0.1, 0.2, -0.3, 0.0]);
        let x = hmsa_kernels::testing::randn(2, 0f32, 1., (2, cin, 7, 6), &dev).unwrap();
        let got = vals(&cb.forward_t(&x, false).unwrap());
        let y = cb.conv.forward(&x).unwrap();
        let (n, _, h, w) = y.dims4().unwrap();
        let yv = vals(&y);
        let (mean, var, g, b) = (
            [0.5, -1.0, 0.0, 2.0],
            [4.0, 0.25, 1.0, 9.0],
            [1.5, -0.5, 1.0, 2.0],
            [0.1, 0.2, -0.3, 0.0],
        );
        assert_eq!(got.len(), n * cout * h * w);
        for (i, (&a, &c)) in got.iter().zip(&yv).enumerate() {
            let ch = (i / (h * w)) % cout;
            let want = (g[ch] * (c as f64 - mean[ch]) / (var[ch] + 1e-5f64).sqrt() + b[ch]).max(0.0);
            assert!((a as f64 - want).abs() < 1e-4, "{i}: {a} vs {want}");
        }
    }

    /// Whole channels zeroed or scaled by 1/(1 − p); identity at inference;
    /// the same seed gives the same mask on another thread.
    #[test]
    fn dropout_masks_whole_channels_and_follows_its_seed() {
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 50, 3, 4), DType::F32, &dev).unwrap();
        let d = Dropout2d::new(0.5);
        let eval = vals(&d.forward_t(&x, false).unwrap());
        assert!(eval.iter().all(|&v| v == 1.0));
        d.seed(7);
        let a = vals(&d.forward_t(&x, true).unwrap());
        for plane in a.chunks(12) {
            assert!(plane.iter().all(|&v| v == plane[0]), "one value per channel");
            assert!(plane[0] == 0.0 || plane[0] == 2.0, "{}", plane[0]);
        }
        let zeroed = a.chunks(12).filter(|p| p[0] == 0.0).count();
        assert!(
            (20..=80).contains(&zeroed),
            "{zeroed} of 100 channels dropped at p = 0.5"
        );
        let d2 = d.clone();
        let b: Vec<f32> = std::thread::spawn(move || {
            d2.seed(7);
            let x = Tensor::ones((2, 50, 3, 4), DType::F32, &Device::Cpu).unwrap();
            vals(&d2.forward_t(&x, true).unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(a, b);
    }
}

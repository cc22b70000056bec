//! OCR (Object-Contextual Representations, Yuan et al. 2020, arXiv
//! 1909.11065) as the official `OCR_block`, and the attention heads.
//!
//! - `aux_head` reads the backbone directly and gives soft object regions;
//!   `ocr_gather_head` pools the 512-channel features into one vector per class
//!   (softmax over pixels); `ocr_distri_head` relates each pixel to each region
//!   (key 256, scaled dot product) and concatenates the context with the
//!   features; `cls_head` gives the semantic logits.
//! - `scale_attn` is the paper's attention head (3x3 conv-BN-ReLU twice, 1x1
//!   conv to one channel, sigmoid), initialised as PyTorch's default, as the
//!   official head is; the explicit variant reads all scales' features at
//!   once and gives one channel per scale (softmax outside).

use super::layers::{conv, Conv, ConvBn, ConvBnConfig, Dropout2d};
use candle_core::{Module, ModuleT, Result, Tensor, D};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, VarBuilder};

/// The official `_ObjectAttentionBlock` (scale 1).
#[derive(Debug, Clone)]
struct ObjectAttention {
    f_pixel: [ConvBn; 2],
    f_object: [ConvBn; 2],
    f_down: ConvBn,
    f_up: ConvBn,
    key: usize,
}

/// `Sequential(conv1x1 no bias, BNReLU)`, state_dict segments `a` and `b.0`.
fn conv_bn_relu_1x1(cin: usize, cout: usize, a: &str, b: &str, vb: &VarBuilder) -> Result<ConvBn> {
    ConvBn::new(
        cin,
        cout,
        ConvBnConfig {
            k: 1,
            conv_at: a,
            bn_at: &format!("{b}.0"),
            ..Default::default()
        },
        vb.clone(),
    )
}

impl ObjectAttention {
    fn new(c: usize, key: usize, vb: VarBuilder) -> Result<Self> {
        let two = |name: &str| -> Result<[ConvBn; 2]> {
            let v = vb.pp(name);
            Ok([
                conv_bn_relu_1x1(c, key, "0", "1", &v)?,
                conv_bn_relu_1x1(key, key, "2", "3", &v)?,
            ])
        };
        Ok(Self {
            f_pixel: two("f_pixel")?,
            f_object: two("f_object")?,
            f_down: conv_bn_relu_1x1(c, key, "0", "1", &vb.pp("f_down"))?,
            f_up: conv_bn_relu_1x1(key, c, "0", "1", &vb.pp("f_up"))?,
            key,
        })
    }

    /// x: (N, C, H, W) pixel features; proxy: (N, C, K, 1) region features.
    fn forward_t(&self, x: &Tensor, proxy: &Tensor, train: bool) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let q = self.f_pixel[1].forward_t(&self.f_pixel[0].forward_t(x, train)?, train)?;
        // (N, key, H, W) -> (N, HW, key)
        let q = q.reshape((n, self.key, h * w))?.transpose(1, 2)?;
        let k = self.f_object[1].forward_t(&self.f_object[0].forward_t(proxy, train)?, train)?;
        let k = k.reshape((n, self.key, ()))?; // (N, key, K)
        let v = self.f_down.forward_t(proxy, train)?;
        let v = v.reshape((n, self.key, ()))?.transpose(1, 2)?; // (N, K, key)
        let sim = (q.matmul(&k)? * (self.key as f64).powf(-0.5))?; // (N, HW, K)
        let sim = candle_nn::ops::softmax(&sim, D::Minus1)?;
        let ctx = sim.matmul(&v.contiguous()?)?; // (N, HW, key)
        let ctx = ctx.transpose(1, 2)?.reshape((n, self.key, h, w))?;
        self.f_up.forward_t(&ctx, train)
    }
}

/// Outputs of the OCR block for one forward pass, all at 1/4 resolution.
pub struct OcrOut {
    pub cls: Tensor,
    pub aux: Tensor,
    /// The 512-channel OCR features the attention head reads.
    pub feats: Tensor,
}

/// The official `OCR_block`.
#[derive(Debug, Clone)]
pub struct Ocr {
    conv3x3_ocr: ConvBn,
    distri: ObjectAttention,
    conv_bn_dropout: ConvBn,
    dropout: Dropout2d,
    cls_head: Conv,
    aux_head: (ConvBn, Conv),
}

impl Ocr {
    pub fn new(high: usize, mid: usize, key: usize, classes: usize, vb: VarBuilder) -> Result<Self> {
        let vd = vb.pp("ocr_distri_head");
        let va = vb.pp("aux_head");
        Ok(Self {
            conv3x3_ocr: ConvBn::new(
                high,
                mid,
                ConvBnConfig {
                    bias: true,
                    bn_at: "1.0",
                    ..Default::default()
                },
                vb.pp("conv3x3_ocr"),
            )?,
            distri: ObjectAttention::new(mid, key, vd.pp("object_context_block"))?,
            conv_bn_dropout: conv_bn_relu_1x1(2 * mid, mid, "0", "1", &vd.pp("conv_bn_dropout"))?,
            dropout: Dropout2d::new(0.05),
            cls_head: conv(mid, classes, 1, 1, true, vb.pp("cls_head"))?,
            aux_head: (
                ConvBn::new(
                    high,
                    high,
                    ConvBnConfig {
                        k: 1,
                        bias: true,
                        bn_at: "1.0",
                        ..Default::default()
                    },
                    va.clone(),
                )?,
                conv(high, classes, 1, 1, true, va.pp("2"))?,
            ),
        })
    }

    /// Reseeds the dropout of `conv_bn_dropout`.
    pub fn seed_dropout(&self, seed: u64) {
        self.dropout.seed(seed);
    }

    /// Sets the drop probability of `conv_bn_dropout`'s Dropout2d (0.05 as
    /// built; 0 turns it off, for parity checks).
    pub fn set_dropout(&mut self, p: f64) -> Result<()> {
        self.dropout.set_p(p)
    }

    /// Takes the backbone's map by value: at inference it is freed as soon
    /// as the two heads have read it (for W48 in the 2.0x pass of a
    /// 1024x2048 image it is 1.4 GiB).
    pub fn forward_t(&self, high: Tensor, train: bool) -> Result<OcrOut> {
        let feats = self.conv3x3_ocr.forward_t(&high, train)?;
        let (c0, c2) = &self.aux_head;
        let aux = c2.forward(&c0.forward_t(&high, train)?)?;
        drop(high);
        // SpatialGather: softmax over pixels of each class map, then pool.
        let (n, k, h, w) = aux.dims4()?;
        let c = feats.dim(1)?;
        let probs = candle_nn::ops::softmax(&aux.reshape((n, k, h * w))?, D::Minus1)?;
        // feats as (N, HW, C): a transposed view, read by the matmul in place.
        let proxy = probs.matmul(&feats.reshape((n, c, h * w))?.transpose(1, 2)?)?; // (N, K, C)
        let proxy = proxy.transpose(1, 2)?.contiguous()?.unsqueeze(3)?; // (N, C, K, 1)
        let ctx = self.distri.forward_t(&feats, &proxy, train)?;
        let y = self
            .conv_bn_dropout
            .forward_t(&Tensor::cat(&[&ctx, &feats], 1)?, train)?;
        let y = self.dropout.forward_t(&y, train)?;
        let cls = self.cls_head.forward(&y)?;
        Ok(OcrOut { cls, aux, feats: y })
    }
}

/// The attention head of `make_attn_head`: conv0/bn0/ReLU, conv1/bn1/ReLU,
/// conv2 (1x1, no bias). `out` is 1 for hierarchical attention (sigmoid
/// applied by the caller) and the number of scales for explicit attention.
#[derive(Debug, Clone)]
pub struct AttnHead {
    conv0: ConvBn,
    conv1: ConvBn,
    conv2: Conv,
}

/// PyTorch's default initialisation of `nn.Conv2d` weights:
/// `kaiming_uniform_(a = √5)`, i.e. U(±1/√fan_in). The official
/// `make_attn_head` (network/utils.py) leaves its head at this default
/// (its `init_attn` call is commented out).
pub const TORCH_DEFAULT_CONV: Init = Init::Kaiming {
    dist: NormalOrUniform::Uniform,
    fan: FanInOut::FanIn,
    non_linearity: NonLinearity::ExplicitGain(0.577_350_269_189_625_8), // √(2 / (1 + 5))
};

impl AttnHead {
    pub fn new(cin: usize, bot: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        let c =
            |cin, cout, k, at: &str| Conv::with_init(cin, cout, k, 1, false, TORCH_DEFAULT_CONV, vb.pp(at));
        Ok(Self {
            conv0: ConvBn::with_conv(c(cin, bot, 3, "conv0")?, bot, true, "bn0", vb.clone())?,
            conv1: ConvBn::with_conv(c(bot, bot, 3, "conv1")?, bot, true, "bn1", vb.clone())?,
            conv2: c(bot, out, 1, "conv2")?,
        })
    }
}

impl ModuleT for AttnHead {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.conv0.forward_t(x, train)?;
        let y = self.conv1.forward_t(&y, train)?;
        self.conv2.forward(&y)
    }
}

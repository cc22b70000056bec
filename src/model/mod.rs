//! The network of the paper: HRNetV2 + OCR with a scale-attention head
//! (the official `MscaleOCR`), its configuration and presets, the scale
//! fusions and checkpoint loading.
//!
//! - [`HmsaNet::forward_scale`] is the official `_fwd` on `ResizeX(x, s)`:
//!   logits, aux logits and attention, each upsampled to that scale's input.
//! - [`HmsaNet::forward`] runs the configured scales and fusion (training);
//!   [`HmsaNet::infer`] any scale set, fusion and flip (evaluation).
//! - Parameter names are the official state_dict's (`backbone.…`, `ocr.…`,
//!   `scale_attn.…`), so official checkpoints load without renaming.
//!
//! Seams: the arithmetic is `hmsa_kernels`' functions (convolution,
//! resize, BatchNorm, blends); the network imports nothing else of the
//! crate, and `train`, `eval` and `autolabel` drive it through `forward`,
//! `forward_scales`, `fuse` and `infer`.

pub mod checkpoint;
pub mod flops;
pub mod fusion;
pub mod hrnet;
pub mod init;
pub mod layers;
pub mod ocr;
pub mod pth;
pub mod scales;

pub use fusion::{Fused, Fusion, ScaleOutput};
pub use hrnet::BackboneConfig;
pub use scales::Scales;

use crate::{Error, Result};
use candle_core::{DType, ModuleT, Tensor};
use candle_nn::VarBuilder;
use hmsa_kernels::resize::{resize, scaled_size};
use ocr::{AttnHead, Ocr};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The arithmetic of a forward (and its backward).
///
/// `Bf16`/`F16` are mixed precision as the paper trains (NVIDIA apex AMP):
/// the parameters, the optimiser and the loss stay f32; convolutions and
/// the rest of the network run in the half type, each parameter cast at
/// its use (so gradients reach the f32 parameters through the cast), and
/// batch normalisation runs in f32 on an upcast of its input. Meant for
/// the GPU: on the CPU the half types take candle's generic kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// Whether `dev` can run this precision (`train`: for training):
    /// candle's CPU matmul has no bf16 (f16 runs there, slowly), and f16
    /// training would need dynamic loss scaling, which we do not have (the
    /// paper's apex AMP has it; bf16 keeps f32's range and needs none).
    pub fn check(self, dev: &candle_core::Device, train: bool, field: &str) -> Result<()> {
        if self == Precision::Bf16 && dev.is_cpu() {
            return Err(Error::invalid(
                field,
                "bf16 needs a GPU (a build with the `cuda` feature): candle's CPU matmul has no bf16",
            ));
        }
        if self == Precision::F16 && train {
            return Err(Error::invalid(
                field,
                "f16 training needs loss scaling, which hmsa-lab does not implement: train in bf16 (GPU) or f32",
            ));
        }
        Ok(())
    }

    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            _ => Err(format!("unknown precision `{s}` (f32, bf16, f16)")),
        }
    }
}

/// Everything that fixes the network's parameters and its default fusion.
/// Fields left out of a TOML file take the paper's values (HRNetV2-W48 + OCR).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub num_classes: usize,
    pub backbone: BackboneConfig,
    /// OCR MID_CHANNELS (512); the attention head reads this many channels.
    pub ocr_mid_channels: usize,
    /// OCR KEY_CHANNELS (256).
    pub ocr_key_channels: usize,
    /// SEGATTN_BOT_CH (256): bottleneck width of the attention head.
    pub attn_bottleneck: usize,
    /// The fusion the network is trained with.
    pub fusion: Fusion,
    /// The scales it is trained with ({0.5, 1.0} for hierarchical).
    pub scales: Scales,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::w48()
    }
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: [&str; 4] = ["w48", "w18", "small", "small-short"];

impl ModelConfig {
    /// The paper's network: HRNetV2-W48, OCR 512/256, attention bottleneck 256.
    pub fn w48() -> Self {
        Self {
            num_classes: 19,
            backbone: BackboneConfig {
                stem_width: 64,
                layer1_planes: 64,
                layer1_blocks: 4,
                widths: [48, 96, 192, 384],
                modules: [1, 4, 3],
                blocks: [4, 4, 4],
            },
            ocr_mid_channels: 512,
            ocr_key_channels: 256,
            attn_bottleneck: 256,
            fusion: Fusion::Hierarchical,
            scales: Scales::from([0.5, 1.0]),
        }
    }

    /// HRNetV2-W18 with the same heads.
    pub fn w18() -> Self {
        let mut c = Self::w48();
        c.backbone.widths = [18, 36, 72, 144];
        c
    }

    /// A narrow, shallow network for experiments on a 2-core CPU.
    pub fn small() -> Self {
        Self {
            num_classes: 19,
            backbone: BackboneConfig {
                stem_width: 32,
                layer1_planes: 16,
                layer1_blocks: 1,
                widths: [16, 32, 64, 128],
                modules: [1, 1, 1],
                blocks: [1, 1, 1],
            },
            ocr_mid_channels: 64,
            ocr_key_channels: 32,
            attn_bottleneck: 32,
            fusion: Fusion::Hierarchical,
            scales: Scales::from([0.5, 1.0]),
        }
    }

    /// The small network with a short reach, for the synthetic ablation
    /// (benchmark v3): stages 3 and 4 keep the branches their transition
    /// convolutions create but run no HRNet module (`modules = [1, 0, 0]`),
    /// so little of the low-resolution branches' context reaches the
    /// output. Measured by accuracy against distance from the cue at 1.0x,
    /// its reach is about 70–80 px against 110–128 px for `small`: short
    /// against a 128x256 image, as HRNetV2-W48's is against a 1024x2048
    /// Cityscapes frame (docs/ablation-tuning.md).
    pub fn small_short() -> Self {
        let mut c = Self::small();
        c.backbone.modules = [1, 0, 0];
        c
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "w48" => Ok(Self::w48()),
            "w18" => Ok(Self::w18()),
            "small" => Ok(Self::small()),
            "small-short" => Ok(Self::small_short()),
            _ => Err(Error::invalid(
                "preset",
                format!("unknown preset `{name}` (known: {})", PRESETS.join(", ")),
            )),
        }
    }

    /// Reads a TOML model config; unknown keys and wrong types name the line.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        crate::error::parse_toml(&text, path, Self::validate)
    }

    pub fn validate(&self) -> Result<()> {
        let pos = |v: usize, f: &str| -> Result<()> {
            if v == 0 {
                Err(Error::invalid(f, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        pos(self.num_classes, "num_classes")?;
        pos(self.ocr_mid_channels, "ocr_mid_channels")?;
        pos(self.ocr_key_channels, "ocr_key_channels")?;
        pos(self.attn_bottleneck, "attn_bottleneck")?;
        let b = &self.backbone;
        pos(b.stem_width, "backbone.stem_width")?;
        pos(b.layer1_planes, "backbone.layer1_planes")?;
        pos(b.layer1_blocks, "backbone.layer1_blocks")?;
        for (i, &w) in b.widths.iter().enumerate() {
            pos(w, &format!("backbone.widths[{i}]"))?;
        }
        // A stage may run no HRNet module (0): its transition still
        // creates its new branch (the small-short preset).
        for (i, &n) in b.blocks.iter().enumerate() {
            if b.modules[i] > 0 {
                pos(n, &format!("backbone.blocks[{i}]"))?;
            }
        }
        self.fusion.check_scales(&self.scales, "scales")
    }
}

/// The attention head, by the fusion it serves.
#[derive(Debug, Clone)]
enum ScaleAttn {
    /// One channel, sigmoid: relative attention between adjacent scales.
    Relative(AttnHead),
    /// One channel per trained scale, softmax across scales.
    Explicit(AttnHead),
}

/// HRNetV2-OCR with scale attention: the official `MscaleOCR`.
#[derive(Debug, Clone)]
pub struct HmsaNet {
    cfg: ModelConfig,
    backbone: hrnet::HrnetV2,
    ocr: Ocr,
    scale_attn: ScaleAttn,
}

impl HmsaNet {
    /// Reseeds the network's dropout (the trainer does every step).
    pub fn seed_dropout(&self, seed: u64) {
        self.ocr.seed_dropout(seed);
    }

    /// Sets the drop probability of the OCR's Dropout2d, the network's only
    /// dropout (the official 0.05 as built). For parity checks against
    /// another implementation (tests/it/train.rs against PyTorch): it cannot
    /// draw our masks, so both sides turn dropout off (`p = 0`) and compute
    /// the same function. `p` must be in [0, 1).
    pub fn set_dropout(&mut self, p: f64) -> Result<()> {
        Ok(self.ocr.set_dropout(p)?)
    }

    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let high = cfg.backbone.out_channels();
        let mid = cfg.ocr_mid_channels;
        let backbone = hrnet::HrnetV2::new(&cfg.backbone, vb.pp("backbone"))?;
        let ocr = Ocr::new(high, mid, cfg.ocr_key_channels, cfg.num_classes, vb.pp("ocr"))?;
        let va = vb.pp("scale_attn");
        let scale_attn = if cfg.fusion == Fusion::Explicit {
            let n = cfg.scales.len();
            ScaleAttn::Explicit(AttnHead::new(mid * n, cfg.attn_bottleneck, n, va)?)
        } else {
            ScaleAttn::Relative(AttnHead::new(mid, cfg.attn_bottleneck, 1, va)?)
        };
        Ok(Self {
            cfg: cfg.clone(),
            backbone,
            ocr,
            scale_attn,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The official `_fwd(ResizeX(x_1x, s))`, its logits left at 1/4 of the
    /// resized input's size until a fusion reads them (`ScaleOutput::pred`).
    /// `with_attn` computes the relative attention.
    pub fn forward_scale(&self, x_1x: &Tensor, s: f64, with_attn: bool, train: bool) -> Result<ScaleOutput> {
        let (_, c, h, w) = x_1x.dims4()?;
        if c != 3 {
            return Err(Error::invalid("input", format!("expected 3 channels, got {c}")));
        }
        let (hs, ws) = scaled_size(h, w, s);
        if hs < 4 || ws < 4 {
            return Err(Error::invalid(
                "scales",
                format!("scale {s} turns a {h}x{w} input into {hs}x{ws}, too small for the network"),
            ));
        }
        let x = resize(x_1x, hs, ws)?;
        let o = self.ocr.forward_t(self.backbone.forward_t(&x, train)?, train)?;
        let attn = match (&self.scale_attn, with_attn) {
            (ScaleAttn::Relative(head), true) => {
                let a = candle_nn::ops::sigmoid(&head.forward_t(&o.feats, train)?)?;
                Some(resize(&a, hs, ws)?)
            }
            _ => None,
        };
        Ok(ScaleOutput {
            scale: s,
            size: (hs, ws),
            cls: o.cls,
            aux: o.aux,
            attn,
            feats: o.feats,
        })
    }

    /// Every scale's output, for fusing several ways (returned high to low).
    ///
    /// Training runs as the official `two_scale_forward` does: the passes
    /// low to high (the last BatchNorm update of a step is the 1.0x pass),
    /// and `_fwd` runs the attention head on every pass, so its BatchNorm
    /// statistics see every training scale although the fusion never reads
    /// the highest scale's attention. In inference (BatchNorm frozen) the
    /// order is immaterial and the highest scale's attention is skipped.
    pub fn forward_scales(
        &self,
        x: &Tensor,
        scales: &[f64],
        with_attn: bool,
        train: bool,
    ) -> Result<Vec<ScaleOutput>> {
        let mut sorted = scales.to_vec();
        sorted.sort_by(f64::total_cmp);
        let top = sorted.len().saturating_sub(1);
        crate::on_pool(x.device(), || {
            let mut outs = sorted
                .iter()
                .enumerate()
                .map(|(i, &s)| self.forward_scale(x, s, with_attn && (train || i < top), train))
                .collect::<Result<Vec<_>>>()?;
            outs.reverse();
            Ok(outs)
        })
    }

    /// Fuses outputs computed by [`Self::forward_scales`].
    pub fn fuse(
        &self,
        fusion: Fusion,
        outs: &[ScaleOutput],
        out_hw: (usize, usize),
        train: bool,
    ) -> Result<Fused> {
        let explicit = match &self.scale_attn {
            ScaleAttn::Explicit(h) => Some(h),
            ScaleAttn::Relative(_) => None,
        };
        if fusion == Fusion::Explicit {
            let got = Scales::new(outs.iter().map(|o| o.scale).collect());
            let want = &self.cfg.scales;
            if explicit.is_none() || got != *want {
                return Err(Error::invalid(
                    "scales",
                    format!(
                        "explicit attention is fixed at training: this model was trained with {} fusion on {}, asked for explicit on {}",
                        self.cfg.fusion,
                        want,
                        got
                    ),
                ));
            }
        }
        fusion.fuse(outs, out_hw, explicit, train)
    }

    /// The training forward: the configured scales and fusion.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Fused> {
        Ok(self.infer(x, self.cfg.fusion, &self.cfg.scales, false, train)?.0)
    }

    /// Multi-scale forward with any fusion and optional flip averaging; also
    /// returns the per-scale outputs of the unflipped input.
    pub fn infer(
        &self,
        x: &Tensor,
        fusion: Fusion,
        scales: &[f64],
        flip: bool,
        train: bool,
    ) -> Result<(Fused, Vec<ScaleOutput>)> {
        crate::on_pool(x.device(), || {
            fusion.check_scales(scales, "scales")?;
            let (_, _, h, w) = x.dims4()?;
            let with_attn = fusion.needs_relative_attention();
            let outs = self.forward_scales(x, scales, with_attn, train)?;
            let fused = self.fuse(fusion, &outs, (h, w), train)?;
            if !flip {
                return Ok((fused, outs));
            }
            let xf = x.flip(&[3])?;
            let outs_f = self.forward_scales(&xf, scales, with_attn, train)?;
            let ff = self.fuse(fusion, &outs_f, (h, w), train)?;
            let fused = Fused {
                pred: fusion::average_flip(&fused.pred, &ff.pred.flip(&[3])?)?,
                aux: match (&fused.aux, &ff.aux) {
                    (Some(a), Some(b)) => Some(fusion::average_flip(a, &b.flip(&[3])?)?),
                    _ => None,
                },
                attn: fused.attn,
            };
            Ok((fused, outs))
        })
    }
}

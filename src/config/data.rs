//! The data settings of a run: augmentation, sampling and the synthetic
//! benchmark's generator. Plain data with their checks; `data` reads them.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Augmentation settings (the official defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Crop height and width.
    pub crop: [u32; 2],
    pub scale_min: f64,
    pub scale_max: f64,
    pub flip: bool,
    /// Probability of a gaussian blur with sigma in [0.15, 1.3].
    pub blur: f64,
    /// Brightness, contrast, saturation factors in [1 − j, 1 + j]; hue shift
    /// in [−j/2, j/2] turns (the official ColorJitter(0.25, ...) clamps hue
    /// to 0.5).
    pub color_jitter: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop: [256, 512],
            scale_min: 0.5,
            scale_max: 2.0,
            flip: true,
            blur: 0.5,
            color_jitter: 0.25,
        }
    }
}

impl AugmentConfig {
    pub fn validate(&self, field: &str) -> Result<()> {
        let bad = |k: &str, m: &str| Err(Error::invalid(format!("{field}.{k}"), m));
        if self.crop.iter().any(|&c| c == 0 || c % 32 != 0 || c > 8192) {
            return bad(
                "crop",
                "must be positive multiples of 32 (HRNet's lowest branch has stride 32), at most 8192",
            );
        }
        if !(self.scale_min > 0.0 && self.scale_min <= self.scale_max) {
            return bad("scale_min", "needs 0 < scale_min <= scale_max");
        }
        if !(0.0..=1.0).contains(&self.blur) {
            return bad("blur", "is a probability in [0, 1]");
        }
        if !(0.0..1.0).contains(&self.color_jitter) {
            return bad("color_jitter", "must be in [0, 1)");
        }
        Ok(())
    }
}

/// Sampling settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    /// Share of crops centred on a class centroid (official CLASS_UNIFORM_PCT 0.5).
    pub class_uniform: f64,
    /// Centroid tile size in pixels.
    pub tile: u32,
    /// Share of each batch drawn from the second source.
    pub second_share: f64,
    /// Train ids whose centroids in the second source join the primary's
    /// class-uniform lists, as the official `coarse_boost_classes`
    /// (datasets/cityscapes.py: the coarse centroids of those classes are
    /// appended to the fine ones). With any, the second source enters
    /// batches only that way and `second_share` is not used.
    pub second_boost: Vec<usize>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            class_uniform: 0.5,
            tile: 256,
            second_share: 0.5,
            second_boost: vec![],
        }
    }
}

/// Generator options (sizes in pixels, counts per split).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    pub seed: u64,
    pub height: u32,
    pub width: u32,
    pub train: usize,
    pub val: usize,
    /// Images with coarse labels (gtCoarse) for auto-labelling.
    pub train_extra: usize,
    /// Images with no labels at all.
    pub unlabeled: usize,
    /// Largest width (and, in layout v2, height) of a context field.
    pub blob_radius: u32,
    /// Erosion (pixels) of coarse labels.
    pub coarse_erosion: u32,
    /// How the context fields are laid out (`data::synth` says what each
    /// layout draws). Left out of the serialised config while v2, so the
    /// config hashes and dataset stamps made before v3 are unchanged.
    #[serde(skip_serializing_if = "Layout::is_v2")]
    pub layout: Layout,
}

/// The synthetic benchmark's layout of the context fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One field per half, its top at 45–55% of the height, at most
    /// `blob_radius` tall, a 4 px cue band on top.
    #[default]
    V2,
    /// One field per half as tall as the image (top at 5–12%, bottom at
    /// 93–98% of the height), an 8 px cue band on top: most of a field's
    /// pixels lie beyond a short-reach network's view of the cue at 1.0x
    /// and within it at 0.5x (docs/ablation-tuning.md).
    V3,
}

impl Layout {
    pub fn is_v2(&self) -> bool {
        *self == Layout::V2
    }
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            height: 256,
            width: 512,
            train: 120,
            val: 30,
            train_extra: 240,
            unlabeled: 0,
            blob_radius: 100,
            coarse_erosion: 6,
            layout: Layout::V2,
        }
    }
}

impl SynthConfig {
    /// The smallest scene the layout fits in (sky, buildings, road, a
    /// field of each context class, objects), in pixels.
    pub const MIN_SIZE: u32 = 64;

    /// Checks sizes and counts; `field` prefixes the key in messages.
    pub fn validate(&self, field: &str) -> Result<()> {
        for (k, v) in [("height", self.height), ("width", self.width)] {
            if v < Self::MIN_SIZE {
                return Err(Error::invalid(
                    format!("{field}.{k}"),
                    format!("{v} is below the smallest scene, {} pixels", Self::MIN_SIZE),
                ));
            }
            if v > 8192 {
                return Err(Error::invalid(
                    format!("{field}.{k}"),
                    format!("{v} is above 8192 pixels"),
                ));
            }
        }
        for (k, v) in [("train", self.train), ("val", self.val)] {
            if !(1..=1_000_000).contains(&v) {
                return Err(Error::invalid(
                    format!("{field}.{k}"),
                    format!("{v} scenes is not in 1..=1000000"),
                ));
            }
        }
        if self.blob_radius == 0 {
            return Err(Error::invalid(
                format!("{field}.blob_radius"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

//! The configuration of one run: model, data, training and evaluation, as
//! the serde structs the library uses. A TOML file (or a suite's resolved
//! variant) deserialises into [`RunConfig`]; unknown keys and wrong types are
//! errors that name the file, line and key.

pub mod data;
pub mod recipe;
pub mod runx;
pub mod suite;

use crate::model::{Fusion, ModelConfig, Precision, Scales};
use crate::{Error, Result};
pub use data::{AugmentConfig, Layout, SamplerConfig, SynthConfig};
pub use recipe::{LossConfig, MainLoss, OptimConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything one training + evaluation run needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
}

/// Where the images come from and how crops are made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A Cityscapes-layout (or Mapillary) dataset; absent = the synthetic
    /// benchmark, generated on first use under `synth_dir`.
    pub root: Option<PathBuf>,
    pub synth_dir: PathBuf,
    pub synth: SynthConfig,
    pub train_split: String,
    pub val_split: String,
    /// Evaluate on the first N validation images only.
    pub val_limit: Option<usize>,
    pub augment: AugmentConfig,
    pub sampler: SamplerConfig,
    /// A second source for a share of every batch (auto-labels or coarse).
    pub second: Option<SecondSource>,
    /// Resize images (and labels) so their long edge is this many pixels
    /// before anything else (the official `pre_size`; Mapillary: 2177).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub long_edge: Option<u32>,
    pub workers: usize,
    pub prefetch: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            root: None,
            synth_dir: PathBuf::from("data/synth"),
            synth: SynthConfig::default(),
            train_split: "train".into(),
            val_split: "val".into(),
            val_limit: None,
            augment: AugmentConfig::default(),
            sampler: SamplerConfig::default(),
            second: None,
            long_edge: None,
            workers: 1,
            prefetch: 4,
        }
    }
}

/// A second dataset in the Cityscapes layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondSource {
    pub root: PathBuf,
    pub split: String,
    /// `fine` (gtFine, e.g. auto-labels) or `coarse` (gtCoarse).
    #[serde(default = "fine")]
    pub labels: String,
}

fn fine() -> String {
    "fine".into()
}

/// How long and how to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub seed: u64,
    /// Optimiser steps; `epochs`, when set, replaces it by epochs x batches per epoch.
    pub steps: usize,
    pub epochs: Option<usize>,
    pub batch: usize,
    pub optim: OptimConfig,
    pub loss: LossConfig,
    /// Save a resumable checkpoint every N steps (and at the end).
    pub checkpoint_every: usize,
    /// `f32`, or mixed precision `bf16`/`f16` (see `model::Precision`).
    /// Left out of the config hash while f32, so older runs keep theirs.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// Weights loaded before the first step (fine-tuning, as the official
    /// recipes start Cityscapes from the Mapillary model and HRNet from
    /// ImageNet): a checkpoint in any accepted format. Never re-applied when
    /// a run resumes; the file's digest is part of the config hash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Parameter names (or prefixes) left at their initialisation when
    /// `init` loads, e.g. ["ocr.cls_head", "ocr.aux_head.2"] for a new
    /// class count.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub init_skip: Vec<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            steps: 1000,
            epochs: None,
            batch: 4,
            optim: OptimConfig::default(),
            loss: LossConfig::default(),
            checkpoint_every: 100,
            precision: Precision::F32,
            init: None,
            init_skip: vec![],
        }
    }
}

/// One evaluation: a scale set, a fusion, with or without flip. The key
/// of an evaluation everywhere: a suite's `[[eval.sets]]`, the lab's check
/// for what a run still lacks, the store's evaluation rows and the
/// report's table (with the variant).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalKey {
    pub scales: Scales,
    pub fusion: Fusion,
    #[serde(default)]
    pub flip: bool,
}

/// The evaluations of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub sets: Vec<EvalKey>,
    /// Also evaluate the sets on the validation split every N steps during
    /// training (recorded as `val_miou/<fusion> <scales>` step metrics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub every: Option<usize>,
    /// After training, also evaluate the first set on the training split
    /// (its fine labels, no augmentation), recorded as the metric
    /// `train_miou/<fusion> <scales>`: beside the validation score, it
    /// says whether a run is limited by its data (a gap) or by its steps.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fit: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            sets: vec![EvalKey {
                scales: Scales::from([1.0]),
                fusion: Fusion::Single,
                flip: false,
            }],
            every: None,
            fit: false,
        }
    }
}

impl RunConfig {
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        crate::error::parse_toml(text, path, Self::validate)
    }

    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Checks what serde cannot: value ranges and cross-field rules.
    pub fn validate(&self) -> Result<()> {
        self.model.validate().map_err(|e| prefix("model", e))?;
        self.data.augment.validate("data.augment")?;
        // Ranges wide enough for any real run, narrow enough that a typo
        // is refused here rather than failing an allocation mid-run.
        let within = |k: &str, v: usize, lo: usize, hi: usize| -> Result<()> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Error::invalid(k, format!("{v} is not in {lo}..={hi}")))
            }
        };
        within("train.batch", self.train.batch, 1, 1024)?;
        within("train.steps", self.train.steps, 1, 100_000_000)?;
        if let Some(e) = self.train.epochs {
            within("train.epochs", e, 1, 1_000_000)?;
        }
        within("data.workers", self.data.workers, 0, 64)?;
        within("data.prefetch", self.data.prefetch, 0, 1024)?;
        within("data.sampler.tile", self.data.sampler.tile as usize, 1, 8192)?;
        for (k, v) in [
            ("train.loss.aux_weight", self.train.loss.aux_weight),
            ("train.loss.scale_weight", self.train.loss.scale_weight),
        ] {
            if !(v.is_finite() && (0.0..=100.0).contains(&v)) {
                return Err(Error::invalid(k, format!("{v} is not a weight in 0..=100")));
            }
        }
        let lr = self.train.optim.lr;
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::invalid(
                "train.optim.lr",
                format!("{lr} is not a positive learning rate"),
            ));
        }
        for (k, v) in [
            ("train.optim.momentum", self.train.optim.momentum),
            ("train.optim.weight_decay", self.train.optim.weight_decay),
            ("train.optim.poly_power", self.train.optim.poly_power),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(k, format!("{v} must be a non-negative number")));
            }
        }
        if self.data.val_limit == Some(0) {
            return Err(Error::invalid(
                "data.val_limit",
                "must be at least 1 (0 would evaluate no image); leave it out to use every validation image",
            ));
        }
        self.data.synth.validate("data.synth")?;
        if self.eval.every == Some(0) {
            return Err(Error::invalid("eval.every", "must be at least 1 step"));
        }
        if self.train.checkpoint_every == 0 {
            return Err(Error::invalid("train.checkpoint_every", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.data.sampler.class_uniform) {
            return Err(Error::invalid(
                "data.sampler.class_uniform",
                "is a share in [0, 1]",
            ));
        }
        if !(0.0..=1.0).contains(&self.data.sampler.second_share) {
            return Err(Error::invalid(
                "data.sampler.second_share",
                "is a share in [0, 1]",
            ));
        }
        if let Some(s) = &self.data.second {
            if s.labels != "fine" && s.labels != "coarse" {
                return Err(Error::invalid("data.second.labels", "is `fine` or `coarse`"));
            }
        }
        for (i, set) in self.eval.sets.iter().enumerate() {
            let field = format!("eval.sets[{i}].scales");
            set.fusion.check_scales(&set.scales, &field)?;
            if set.fusion == Fusion::Explicit
                && (self.model.fusion != Fusion::Explicit || set.scales != self.model.scales)
            {
                return Err(Error::invalid(
                    field,
                    "explicit attention is evaluated on exactly the scales it was trained with",
                ));
            }
        }
        Ok(())
    }
}

fn prefix(p: &str, e: Error) -> Error {
    match e {
        Error::Invalid { field, msg } => Error::Invalid {
            field: format!("{p}.{field}"),
            msg,
        },
        e => e,
    }
}

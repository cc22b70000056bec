//! The training recipe's settings: the loss and the optimiser with its
//! schedule (the paper's values by default). Plain data; `train` reads it.

use serde::{Deserialize, Serialize};

/// Which loss supervises the fused prediction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MainLoss {
    Rmi,
    Ce,
}

/// The paper's loss recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub main: MainLoss,
    /// OCR_ALPHA: weight of the cross-entropy on the fused aux logits.
    pub aux_weight: f64,
    /// SUPERVISED_MSCALE_WT: weight of the cross-entropy on each scale's own
    /// prediction (the official code turns RMI off for these terms).
    pub scale_weight: f64,
    pub class_weights: Option<Vec<f32>>,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            main: MainLoss::Rmi,
            aux_weight: 0.4,
            scale_weight: 0.0,
            class_weights: None,
        }
    }
}

/// Optimiser and schedule settings (the paper's recipe by default).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Exponent of the polynomial decay (2.0 for Cityscapes in the paper).
    pub poly_power: f64,
    /// Linear warm-up steps from 0 to `lr`.
    pub warmup_steps: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 5e-4,
            poly_power: 2.0,
            warmup_steps: 0,
        }
    }
}

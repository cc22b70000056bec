//! The network's reach on the synthetic benchmark: how far from its cue a
//! context pixel can be and still get the right one of the two context
//! classes. The generator records, for every vegetation and terrain pixel,
//! its distance (pixels at 1.0x) from its field's cue band; beyond the
//! network's reach at a scale, the two classes (one texture law) are told
//! apart at chance. This is the measurement that chose the `small-short`
//! preset for benchmark v3 (docs/ablation-tuning.md).

use crate::config::SynthConfig;
use crate::data::cityscapes::label_to_train;
use crate::data::image::normalize;
use crate::data::synth::{self, ids};
use crate::model::{Fusion, HmsaNet};
use crate::Result;
use candle_core::{DType, Device};
use serde::Serialize;

/// Width (pixels at 1.0x) of a distance bin.
pub const BIN: f32 = 16.0;

/// Context accuracy by distance from the cue at one scale.
#[derive(Debug, Clone, Serialize)]
pub struct ReachRow {
    pub scale: f64,
    /// Per bin `[k·BIN, (k+1)·BIN)`: (context pixels, share of them whose
    /// true class's logit is above the other context class's).
    pub bins: Vec<(usize, f64)>,
}

/// Measures the reach of `net` evaluated single-scale at each of `scales`
/// on the first `scenes` validation scenes of the generator `cfg`
/// (rendered, not read, so that every pixel's cue distance is known).
pub fn reach(
    net: &HmsaNet,
    cfg: &SynthConfig,
    scales: &[f64],
    scenes: usize,
    device: &Device,
) -> Result<Vec<ReachRow>> {
    let (veg, ter) = (
        label_to_train(ids::VEGETATION) as usize,
        label_to_train(ids::TERRAIN) as usize,
    );
    let nbins = (cfg.height.max(cfg.width) as f32 / BIN).ceil() as usize;
    let mut rows: Vec<(f64, Vec<(usize, usize)>)> =
        scales.iter().map(|&s| (s, vec![(0, 0); nbins])).collect();
    for i in 0..scenes {
        let scene = synth::render(cfg, "val", i);
        let x = normalize(&scene.image, device)?;
        for (s, bins) in rows.iter_mut() {
            let (fused, _) = net.infer(&x, Fusion::Single, &[*s], false, false)?;
            // (K, H, W) logits of the two context classes
            let logits = fused.pred.squeeze(0)?.to_dtype(DType::F32)?;
            let lv = logits.get(veg)?.flatten_all()?.to_vec1::<f32>()?;
            let lt = logits.get(ter)?.flatten_all()?.to_vec1::<f32>()?;
            for (p, label) in scene.label_ids.pixels().enumerate() {
                let d = scene.cue_distance[p];
                let truth_is_veg = match label[0] {
                    ids::VEGETATION => true,
                    ids::TERRAIN => false,
                    _ => continue,
                };
                if d.is_nan() {
                    continue;
                }
                let k = ((d / BIN) as usize).min(nbins - 1);
                bins[k].0 += 1;
                bins[k].1 += usize::from((lv[p] > lt[p]) == truth_is_veg);
            }
        }
    }
    Ok(rows
        .into_iter()
        .map(|(scale, bins)| ReachRow {
            scale,
            bins: bins
                .into_iter()
                .map(|(n, right)| (n, if n > 0 { right as f64 / n as f64 } else { f64::NAN }))
                .collect(),
        })
        .collect())
}

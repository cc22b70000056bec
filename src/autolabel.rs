//! Auto-labelling (the paper's Section 4.2): a teacher labels images with
//! multi-scale inference; pixels whose top softmax probability is below a
//! hard threshold (0.9) become ignore (255). The output is a Cityscapes
//! layout (`leftImg8bit` copies and `gtFine` labelIds) that the mixed
//! sampler reads as a second source.

use crate::data::cityscapes::{train_to_label, CLASSES};
use crate::data::image::normalize;
use crate::data::{Dataset, IGNORE};
use crate::model::{Fusion, HmsaNet};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// How many pixels were kept per train id, and how many were dropped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub images: usize,
    pub kept: Vec<u64>,
    pub dropped: u64,
}

/// Train ids where the top probability reaches `threshold`, 255 elsewhere.
/// `probs` is (N, K, H, W); returns (N·H·W) ids.
pub fn threshold_labels(probs: &Tensor, threshold: f64) -> Result<Vec<u8>> {
    let top = probs
        .max(1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let arg = probs
        .argmax(1)?
        .flatten_all()?
        .to_dtype(DType::U8)?
        .to_vec1::<u8>()?;
    Ok(top
        .iter()
        .zip(arg)
        .map(|(&p, a)| if p >= threshold as f32 { a } else { IGNORE })
        .collect())
}

/// Labels every image of `ds` into `out` (split name kept).
pub fn autolabel(
    net: &HmsaNet,
    ds: &Dataset,
    scales: &[f64],
    fusion: Fusion,
    threshold: f64,
    out: &Path,
    device: &Device,
) -> Result<Summary> {
    if !(0.0..=1.0).contains(&threshold) {
        return Err(Error::invalid("threshold", "is a probability in [0, 1]"));
    }
    let mut s = Summary {
        kept: vec![0; CLASSES.len()],
        ..Default::default()
    };
    for (i, sample) in ds.samples.iter().enumerate() {
        let (img, _) = ds.load(i)?;
        let x = normalize(&img, device)?;
        let (fused, _) = net.infer(&x, fusion, scales, false, false)?;
        let probs = candle_nn::ops::softmax(&fused.pred, 1)?;
        let ids = threshold_labels(&probs, threshold)?;
        for &t in &ids {
            match s.kept.get_mut(t as usize) {
                Some(k) => *k += 1,
                None => s.dropped += 1,
            }
        }
        let city = if sample.group.is_empty() {
            "auto"
        } else {
            &sample.group
        };
        let img_dst = out
            .join("leftImg8bit")
            .join(&ds.split)
            .join(city)
            .join(format!("{}_leftImg8bit.png", sample.name));
        let lab_dst = out
            .join("gtFine")
            .join(&ds.split)
            .join(city)
            .join(format!("{}_gtFine_labelIds.png", sample.name));
        for d in [&img_dst, &lab_dst] {
            let p = d.parent().expect("has a parent");
            std::fs::create_dir_all(p).map_err(|e| Error::io("creating", p, e))?;
        }
        let (h, w) = (img.height(), img.width());
        let label_ids: Vec<u8> = ids.iter().map(|&t| train_to_label(t)).collect();
        image::GrayImage::from_raw(w, h, label_ids)
            .expect("sized")
            .save(&lab_dst)
            .map_err(|e| Error::Image {
                path: lab_dst.clone(),
                msg: e.to_string(),
            })?;
        // The image last: its presence marks the pair complete.
        img.save(&img_dst).map_err(|e| Error::Image {
            path: img_dst.clone(),
            msg: e.to_string(),
        })?;
        s.images += 1;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_keeps_confident_pixels_only() {
        // 3 classes, 4 pixels: top probabilities 0.95 (class 2), 0.89 (class 0),
        // 0.90 (class 1, exactly at the threshold), 0.5 (class 0).
        #[rustfmt::skip]
        let p = [
            0.02f32, 0.89, 0.05, 0.5,
            0.03,    0.10, 0.90, 0.3,
            0.95,    0.01, 0.05, 0.2,
        ];
        let t = Tensor::from_slice(&p, (1, 3, 2, 2), &Device::Cpu).unwrap();
        assert_eq!(threshold_labels(&t, 0.9).unwrap(), vec![2, IGNORE, 1, IGNORE]);
        assert_eq!(threshold_labels(&t, 0.0).unwrap(), vec![2, 0, 1, 0]);
    }
}

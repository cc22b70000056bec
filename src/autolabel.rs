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

/// How many pixels were kept per train id, and how many were dropped;
/// with the truth (`truth` of [`autolabel`]), how many kept pixels were
/// right and how many truth pixels each class has.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub images: usize,
    pub kept: Vec<u64>,
    pub dropped: u64,
    /// Per train id: kept pixels labelled that class whose truth is that
    /// class (empty without the truth).
    pub correct: Vec<u64>,
    /// Per train id: pixels of that class in the truth.
    pub truth: Vec<u64>,
}

impl Summary {
    /// Per class, the precision of the kept labels (correct / kept) and
    /// the share of the class's truth pixels kept with the right label
    /// (correct / truth); None where the denominator is 0 or the truth
    /// was not given.
    pub fn quality(&self) -> Vec<(Option<f64>, Option<f64>)> {
        let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
        (0..self.kept.len())
            .map(|c| match (self.correct.get(c), self.truth.get(c)) {
                (Some(&ok), Some(&t)) => (ratio(ok, self.kept[c]), ratio(ok, t)),
                _ => (None, None),
            })
            .collect()
    }
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

/// The fine truth of a split where the dataset has it (the synthetic
/// benchmark writes `gtFine/train_extra`; Cityscapes has no fine labels
/// for its extra images), to score a teacher's labels against.
pub fn truth_of(root: &Path, split: &str) -> Result<Option<Dataset>> {
    if root.join("gtFine").join(split).is_dir() {
        Ok(Some(Dataset::open(root, split, crate::data::Labels::Fine)?))
    } else {
        Ok(None)
    }
}

/// Labels every image of `ds` into `out` (split name kept). With `truth`
/// (the same images with their true labels, e.g. the synthetic
/// benchmark's `gtFine` of `train_extra`), the summary also counts how
/// many kept labels are right.
#[allow(clippy::too_many_arguments)]
pub fn autolabel(
    net: &HmsaNet,
    ds: &Dataset,
    truth: Option<&Dataset>,
    scales: &[f64],
    fusion: Fusion,
    threshold: f64,
    out: &Path,
    device: &Device,
) -> Result<Summary> {
    if !(0.0..=1.0).contains(&threshold) {
        return Err(Error::invalid("threshold", "is a probability in [0, 1]"));
    }
    if let Some(t) = truth {
        if t.samples
            .iter()
            .map(|s| &s.name)
            .ne(ds.samples.iter().map(|s| &s.name))
        {
            return Err(Error::Input {
                path: t.root.clone(),
                msg: format!(
                    "the truth of split `{}` does not list the same images as the images to label",
                    t.split
                ),
            });
        }
    }
    let n = CLASSES.len();
    let mut s = Summary {
        kept: vec![0; n],
        correct: if truth.is_some() { vec![0; n] } else { vec![] },
        truth: if truth.is_some() { vec![0; n] } else { vec![] },
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
        if let Some(t) = truth {
            let lab = t.load(i)?.1.ok_or_else(|| Error::Input {
                path: t.samples[i].image.clone(),
                msg: "no truth labels for this image".into(),
            })?;
            if lab.dimensions() != (img.width(), img.height()) {
                return Err(Error::Input {
                    path: t.samples[i].image.clone(),
                    msg: format!(
                        "truth labels are {:?}, the image {}x{}",
                        lab.dimensions(),
                        img.width(),
                        img.height()
                    ),
                });
            }
            for (&got, want) in ids.iter().zip(lab.pixels()) {
                let want = want[0] as usize;
                if want < n {
                    s.truth[want] += 1;
                    if got as usize == want {
                        s.correct[want] += 1;
                    }
                }
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

    #[test]
    fn quality_is_precision_and_the_share_of_the_truth_kept_right() {
        // class 0: 10 kept, 8 of them right, 16 in the truth -> 0.8, 0.5;
        // class 1: nothing kept, 4 in the truth -> no precision, 0;
        // class 2: absent from both
        let s = Summary {
            images: 1,
            kept: vec![10, 0, 0],
            dropped: 3,
            correct: vec![8, 0, 0],
            truth: vec![16, 4, 0],
        };
        assert_eq!(
            s.quality(),
            vec![(Some(0.8), Some(0.5)), (None, Some(0.0)), (None, None)]
        );
        // without the truth, nothing is claimed
        let blind = Summary {
            correct: vec![],
            truth: vec![],
            ..s
        };
        assert_eq!(blind.quality(), vec![(None, None); 3]);
    }
}

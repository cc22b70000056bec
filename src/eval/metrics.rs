//! Confusion matrix and the metrics derived from it, with the official
//! Cityscapes rules: rows are ground truth, columns predictions; ground-truth
//! ignore pixels are never counted (so never a false positive); a prediction
//! outside the evaluated classes (column `K`, "other") is a miss for its
//! ground-truth class and a false positive for none; mIoU averages the
//! classes present in ground truth or prediction (NaN IoUs are skipped).

use serde::{Deserialize, Serialize};

/// K x (K+1) counts: `m[gt][pred]`, column K = predicted outside the classes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Confusion {
    pub k: usize,
    pub m: Vec<u64>,
}

/// Scores of one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Per class; None where the class is in neither ground truth nor prediction.
    pub iou: Vec<Option<f64>>,
    pub miou: f64,
    pub pixel_acc: f64,
    pub mean_class_acc: f64,
    pub fw_iou: f64,
}

impl Confusion {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            m: vec![0; k * (k + 1)],
        }
    }

    /// Adds a pair of train-id maps; gt >= K is ignored, pred >= K is "other".
    pub fn add(&mut self, gt: &[u8], pred: &[u8]) {
        let k = self.k;
        for (&g, &p) in gt.iter().zip(pred) {
            let g = g as usize;
            if g >= k {
                continue;
            }
            let p = (p as usize).min(k);
            self.m[g * (k + 1) + p] += 1;
        }
    }

    pub fn merge(&mut self, other: &Confusion) {
        for (a, b) in self.m.iter_mut().zip(&other.m) {
            *a += b;
        }
    }

    pub fn at(&self, gt: usize, pred: usize) -> u64 {
        self.m[gt * (self.k + 1) + pred]
    }

    pub fn metrics(&self) -> Metrics {
        let k = self.k;
        let total: u64 = self.m.iter().sum();
        let mut iou = Vec::with_capacity(k);
        let mut acc = vec![];
        let (mut tp_all, mut fw) = (0u64, 0f64);
        for c in 0..k {
            let tp = self.at(c, c);
            let row: u64 = (0..=k).map(|p| self.at(c, p)).sum();
            let col: u64 = (0..k).map(|g| self.at(g, c)).sum();
            let (fn_, fp) = (row - tp, col - tp);
            let denom = tp + fn_ + fp;
            let v = (denom > 0).then(|| tp as f64 / denom as f64);
            if row > 0 {
                acc.push(tp as f64 / row as f64);
                if let Some(v) = v {
                    fw += row as f64 * v;
                }
            }
            tp_all += tp;
            iou.push(v);
        }
        let present: Vec<f64> = iou.iter().flatten().copied().collect();
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        Metrics {
            miou: mean(&present),
            pixel_acc: if total > 0 {
                tp_all as f64 / total as f64
            } else {
                0.0
            },
            mean_class_acc: mean(&acc),
            fw_iou: if total > 0 { fw / total as f64 } else { 0.0 },
            iou,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_classes_by_hand_pin_the_axes() {
        // gt:   0 0 0 1 1 2 255 2
        // pred: 0 1 0 1 2 2 1   9(other)
        let mut c = Confusion::new(3);
        c.add(&[0, 0, 0, 1, 1, 2, 255, 2], &[0, 1, 0, 1, 2, 2, 1, 9]);
        // rows = ground truth
        assert_eq!(c.at(0, 0), 2);
        assert_eq!(c.at(0, 1), 1); // gt 0 predicted 1
        assert_eq!(c.at(1, 2), 1);
        assert_eq!(c.at(2, 3), 1); // "other"
        let m = c.metrics();
        // class 0: tp 2, fn 1, fp 0 -> 2/3
        // class 1: tp 1, fn 1, fp 1 (gt 0) -> 1/3; the pixel with gt 255 is no FP
        // class 2: tp 1, fn 1 (other), fp 1 (gt 1) -> 1/3
        let want = [2.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0];
        for (g, w) in m.iou.iter().zip(want) {
            assert!((g.unwrap() - w).abs() < 1e-12);
        }
        assert!((m.miou - 4.0 / 9.0).abs() < 1e-12);
        assert!((m.pixel_acc - 4.0 / 7.0).abs() < 1e-12);
        // class accuracies 2/3, 1/2, 1/2
        assert!((m.mean_class_acc - (2.0 / 3.0 + 0.5 + 0.5) / 3.0).abs() < 1e-12);
        // frequency weighted: (3·2/3 + 2·1/3 + 2·1/3) / 7
        assert!((m.fw_iou - (2.0 + 4.0 / 3.0) / 7.0).abs() < 1e-12);
    }

    #[test]
    fn absent_classes_do_not_count_but_false_positives_do() {
        let mut c = Confusion::new(4);
        // class 3 never appears; class 2 only predicted (IoU 0)
        c.add(&[0, 0, 1, 1], &[0, 2, 1, 1]);
        let m = c.metrics();
        assert_eq!(m.iou[3], None);
        assert_eq!(m.iou[2], Some(0.0));
        assert!((m.miou - (0.5 + 1.0 + 0.0) / 3.0).abs() < 1e-12);
    }
}

//! `hmsa-lab data check`: reads every image and label of a split and reports
//! what is wrong by file name (missing pairs, size mismatches, unknown label
//! ids, corrupt files), with per-class pixel shares and image counts.

use super::{read_label, Dataset};
use std::path::PathBuf;

/// One thing wrong with one file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub path: PathBuf,
    pub msg: String,
}

/// What a check found in one split.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub split: String,
    pub images: usize,
    pub labelled: usize,
    pub problems: Vec<Problem>,
    /// Per train id: labelled pixels.
    pub class_pixels: Vec<u64>,
    /// Per train id: images that contain the class.
    pub class_images: Vec<usize>,
    pub ignore_pixels: u64,
}

impl CheckReport {
    pub fn total_pixels(&self) -> u64 {
        self.class_pixels.iter().sum::<u64>() + self.ignore_pixels
    }
}

/// Checks every sample of `ds`.
pub fn check(ds: &Dataset) -> CheckReport {
    let k = ds.classes.num_classes();
    let mut r = CheckReport {
        split: ds.split.clone(),
        images: ds.samples.len() + ds.unpaired_images.len(),
        class_pixels: vec![0; k],
        class_images: vec![0; k],
        ..Default::default()
    };
    for p in &ds.unpaired_images {
        r.problems.push(Problem {
            path: p.clone(),
            msg: "image has no label file".into(),
        });
    }
    for p in &ds.unpaired_labels {
        r.problems.push(Problem {
            path: p.clone(),
            msg: "label file has no image".into(),
        });
    }
    for s in &ds.samples {
        let img = match super::image::read_rgb(&s.image) {
            Ok(i) => i,
            Err(e) => {
                r.problems.push(Problem {
                    path: s.image.clone(),
                    msg: strip_path(&e.to_string(), &s.image),
                });
                continue;
            }
        };
        let Some(lp) = &s.label else { continue };
        let raw = match read_label(lp) {
            Ok(l) => l,
            Err(e) => {
                r.problems.push(Problem {
                    path: lp.clone(),
                    msg: strip_path(&e.to_string(), lp),
                });
                continue;
            }
        };
        if raw.dimensions() != img.dimensions() {
            r.problems.push(Problem {
                path: lp.clone(),
                msg: format!(
                    "label is {}x{} but its image is {}x{}",
                    raw.width(),
                    raw.height(),
                    img.width(),
                    img.height()
                ),
            });
            continue;
        }
        r.labelled += 1;
        let mut hist = [0u64; 256];
        for p in raw.pixels() {
            hist[p[0] as usize] += 1;
        }
        let unknown: Vec<String> = (0..256)
            .filter(|&v| hist[v] > 0 && !ds.classes.known[v] && v != 255)
            .map(|v| v.to_string())
            .collect();
        if !unknown.is_empty() {
            r.problems.push(Problem {
                path: lp.clone(),
                msg: format!("unknown label ids {}", unknown.join(", ")),
            });
        }
        let mut present = vec![false; k];
        for (v, &n) in hist.iter().enumerate() {
            let t = ds.classes.lut[v] as usize;
            if n == 0 {
                continue;
            }
            if t < k {
                r.class_pixels[t] += n;
                present[t] = true;
            } else {
                r.ignore_pixels += n;
            }
        }
        for (c, p) in present.iter().enumerate() {
            r.class_images[c] += usize::from(*p);
        }
    }
    r
}

/// Error texts start with the path; the report prints it in its own column.
fn strip_path(msg: &str, path: &std::path::Path) -> String {
    let p = format!("{}: ", path.display());
    msg.strip_prefix(&p).unwrap_or(msg).to_string()
}

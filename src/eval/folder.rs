//! `hmsa-lab eval --pred-dir P --gt-dir G`: scores a folder of labelIds PNG
//! predictions against Cityscapes ground truth as the official
//! `evalPixelLevelSemanticLabeling.py` does. Each `*_gtFine_labelIds.png`
//! under G is paired with the one file under P whose name contains its
//! `<city>_<seq>_<frame>` stem (of several, the one ending in
//! `labelIds.png`: the folder `hmsa-lab infer --out` writes holds colour
//! images and attention maps too); both are mapped from labelIds to train ids;
//! void ground truth is skipped, and a predicted id outside the 19 classes
//! is a miss for the true class, never a false positive.

use super::metrics::{Confusion, Metrics};
use crate::data::{read_label, ClassTable};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))? {
        let p = e.map_err(|e| Error::io("listing", dir, e))?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// The `<city>_<seq>_<frame>` stem of a Cityscapes file name.
pub fn cityscapes_stem(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('_').collect();
    (parts.len() >= 3).then(|| parts[..3].join("_"))
}

/// Scores every ground-truth file; a missing or ambiguous prediction is an
/// error naming the ground-truth file.
pub fn score_folders(pred_dir: &Path, gt_dir: &Path) -> Result<(Metrics, usize)> {
    let classes = ClassTable::cityscapes();
    let mut gts = vec![];
    walk(gt_dir, &mut gts)?;
    gts.retain(|p| p.to_string_lossy().ends_with("_gtFine_labelIds.png"));
    gts.sort();
    if gts.is_empty() {
        return Err(Error::Input {
            path: gt_dir.to_path_buf(),
            msg: "no *_gtFine_labelIds.png files".into(),
        });
    }
    let mut preds = vec![];
    walk(pred_dir, &mut preds)?;
    let mut by_stem: HashMap<String, Vec<PathBuf>> = HashMap::new();
    for p in preds {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        if !name.ends_with(".png") {
            continue;
        }
        // the stem may sit anywhere in the name
        let parts: Vec<&str> = name.trim_end_matches(".png").split('_').collect();
        for i in 0..parts.len().saturating_sub(2) {
            by_stem
                .entry(parts[i..i + 3].join("_"))
                .or_default()
                .push(p.clone());
        }
    }
    let mut conf = Confusion::new(classes.num_classes());
    for g in &gts {
        let name = g.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let stem = cityscapes_stem(name).ok_or_else(|| Error::Input {
            path: g.clone(),
            msg: "not a <city>_<seq>_<frame> file name".into(),
        })?;
        let mut cands = by_stem.get(&stem).cloned().unwrap_or_default();
        // `hmsa-lab infer --out` writes a colour image and attention maps
        // beside each `_labelIds.png`: that one is the prediction.
        if cands.len() > 1 {
            let ids: Vec<PathBuf> = cands
                .iter()
                .filter(|p| p.to_string_lossy().ends_with("labelIds.png"))
                .cloned()
                .collect();
            if ids.len() == 1 {
                cands = ids;
            }
        }
        let pred = match cands.as_slice() {
            [one] => one,
            [] => {
                return Err(Error::Input {
                    path: g.clone(),
                    msg: format!("no prediction under {} contains `{stem}`", pred_dir.display()),
                })
            }
            many => {
                return Err(Error::Input {
                    path: g.clone(),
                    msg: format!("{} predictions contain `{stem}`", many.len()),
                })
            }
        };
        let gt = read_label(g)?;
        let pr = read_label(pred)?;
        if gt.dimensions() != pr.dimensions() {
            return Err(Error::Input {
                path: pred.clone(),
                msg: format!(
                    "prediction is {}x{}, ground truth {} is {}x{}",
                    pr.width(),
                    pr.height(),
                    g.display(),
                    gt.width(),
                    gt.height()
                ),
            });
        }
        let gt: Vec<u8> = gt.as_raw().iter().map(|&v| classes.lut[v as usize]).collect();
        let pr: Vec<u8> = pr.as_raw().iter().map(|&v| classes.lut[v as usize]).collect();
        conf.add(&gt, &pr);
    }
    Ok((conf.metrics(), gts.len()))
}

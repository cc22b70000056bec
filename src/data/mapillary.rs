//! Mapillary Vistas layout: `<split>/images/*.jpg` with `<split>/labels/*.png`
//! (or `<split>/v1.2/labels/`), palette PNGs whose indices point into the
//! `labels` list of the config JSON at the root. Classes with
//! `"evaluate": true` get train ids in their config order; the rest are
//! ignored. The paper resizes Mapillary images so the long edge is fixed.

use super::{ClassTable, Dataset, DatasetKind, Sample, IGNORE};
use crate::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Config {
    labels: Vec<Label>,
}

#[derive(Deserialize)]
struct Label {
    #[serde(default)]
    readable: Option<String>,
    name: String,
    color: [u8; 3],
    #[serde(default = "yes")]
    evaluate: bool,
}

fn yes() -> bool {
    true
}

/// The Vistas config file under `root`, if any.
pub fn config_path(root: &Path) -> Option<PathBuf> {
    ["config.json", "config_v1.2.json", "config_v2.0.json"]
        .iter()
        .map(|n| root.join(n))
        .find(|p| p.exists())
}

/// The class table of a Vistas config JSON.
pub fn class_table(path: &Path) -> Result<ClassTable> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    let cfg: Config = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    if cfg.labels.len() > 255 {
        return Err(Error::Config {
            path: path.to_path_buf(),
            msg: format!("{} labels do not fit 8-bit label maps", cfg.labels.len()),
        });
    }
    let mut t = ClassTable {
        names: vec![],
        colors: vec![],
        lut: [IGNORE; 256],
        known: [false; 256],
    };
    for (raw, l) in cfg.labels.iter().enumerate() {
        t.known[raw] = true;
        if l.evaluate {
            t.lut[raw] = t.names.len() as u8;
            t.names.push(l.readable.clone().unwrap_or_else(|| l.name.clone()));
            t.colors.push(l.color);
        }
    }
    Ok(t)
}

/// Opens a Vistas split (`training`/`validation`; `train`/`val` accepted).
pub fn open(root: &Path, split: &str, long_edge: Option<u32>) -> Result<Dataset> {
    let cfg = config_path(root).ok_or_else(|| Error::Input {
        path: root.to_path_buf(),
        msg: "no Mapillary config (config.json, config_v1.2.json or config_v2.0.json)".into(),
    })?;
    let classes = class_table(&cfg)?;
    let dir = match split {
        "train" => "training",
        "val" => "validation",
        s => s,
    };
    let images = root.join(dir).join("images");
    if !images.is_dir() {
        return Err(Error::Input {
            path: images,
            msg: "no such folder".into(),
        });
    }
    let labels_dir = [root.join(dir).join("v1.2/labels"), root.join(dir).join("labels")]
        .into_iter()
        .find(|p| p.is_dir());
    let mut samples = vec![];
    let mut unpaired_images = vec![];
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&images)
        .map_err(|e| Error::io("listing", &images, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("jpg" | "jpeg" | "png")
            )
        })
        .collect();
    entries.sort();
    for img in entries {
        let stem = img.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
        let label = labels_dir.as_ref().map(|d| d.join(format!("{stem}.png")));
        match &label {
            Some(l) if !l.exists() => unpaired_images.push(img),
            _ => samples.push(Sample {
                image: img,
                label,
                name: stem,
                group: String::new(),
            }),
        }
    }
    let mut unpaired_labels = vec![];
    if let Some(d) = &labels_dir {
        let stems: std::collections::HashSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        for e in std::fs::read_dir(d)
            .map_err(|e| Error::io("listing", d, e))?
            .flatten()
        {
            let p = e.path();
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            if !stems.contains(stem) {
                unpaired_labels.push(p);
            }
        }
        unpaired_labels.sort();
    }
    Ok(Dataset {
        kind: DatasetKind::Mapillary,
        root: root.to_path_buf(),
        split: dir.to_string(),
        classes,
        samples,
        long_edge,
        unpaired_images,
        unpaired_labels,
    })
}

//! Data: datasets on disk (Cityscapes layout, Mapillary Vistas), the
//! synthetic benchmark, augmentation, class-uniform and mixed sampling, and
//! the threaded loader that turns them into batches.
//!
//! A [`Dataset`] is a list of [`Sample`]s (image path, optional label path)
//! plus a [`ClassTable`] that maps the raw values of its label files to train
//! ids (255 = ignore). Everything after loading speaks train ids.

pub mod augment;
pub mod check;
pub mod cityscapes;
pub mod image;
pub mod loader;
pub mod mapillary;
pub mod sampler;
pub mod synth;

use crate::config::DataConfig;
use crate::{Error, Result};
use ::image::{GrayImage, RgbImage};
use std::path::{Path, PathBuf};

pub use cityscapes::IGNORE;

/// Class names, colours and the raw-label -> train-id table of a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassTable {
    pub names: Vec<String>,
    pub colors: Vec<[u8; 3]>,
    /// raw label value -> train id (255 = ignore)
    pub lut: [u8; 256],
    /// raw label values that are known to the dataset (evaluated or not)
    pub known: [bool; 256],
}

impl ClassTable {
    /// The 19 Cityscapes classes; labelIds 0..=33 are known.
    pub fn cityscapes() -> Self {
        let mut lut = [IGNORE; 256];
        let mut known = [false; 256];
        for (id, k) in known.iter_mut().enumerate().take(34) {
            lut[id] = cityscapes::label_to_train(id as u8);
            *k = true;
        }
        Self {
            names: cityscapes::CLASSES.iter().map(|c| c.name.to_string()).collect(),
            colors: cityscapes::CLASSES.iter().map(|c| c.color).collect(),
            lut,
            known,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.names.len()
    }
}

/// Which dataset layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    Cityscapes,
    Mapillary,
}

/// Which labels of a Cityscapes split to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labels {
    Fine,
    Coarse,
    None,
}

/// One image and its label file.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub image: PathBuf,
    pub label: Option<PathBuf>,
    /// `<city>_<seq>_<frame>` for Cityscapes, the file stem for Mapillary.
    pub name: String,
    /// Folder under the split (the city), empty for Mapillary.
    pub group: String,
}

/// A split of a dataset on disk.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub kind: DatasetKind,
    pub root: PathBuf,
    pub split: String,
    pub classes: ClassTable,
    pub samples: Vec<Sample>,
    /// Long-edge resize on load (Mapillary, as in the paper).
    pub long_edge: Option<u32>,
    /// Image files whose label file is missing (kept out of `samples`).
    pub unpaired_images: Vec<PathBuf>,
    /// Label files whose image is missing.
    pub unpaired_labels: Vec<PathBuf>,
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("listing", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

impl Dataset {
    /// A Cityscapes-layout split: `leftImg8bit/<split>/<city>/*_leftImg8bit.png`
    /// with `gtFine` or `gtCoarse` `*_labelIds.png` beside it.
    pub fn cityscapes(root: &Path, split: &str, labels: Labels) -> Result<Self> {
        let img_root = root.join("leftImg8bit").join(split);
        if !img_root.is_dir() {
            return Err(Error::Input {
                path: img_root,
                msg: "no such folder: expected the Cityscapes layout leftImg8bit/<split>/<city>/".into(),
            });
        }
        let gt = match labels {
            Labels::Fine => Some("gtFine"),
            Labels::Coarse => Some("gtCoarse"),
            Labels::None => None,
        };
        let mut samples = vec![];
        let mut unpaired_images = vec![];
        let mut unpaired_labels = vec![];
        for city_dir in read_dir_sorted(&img_root)? {
            if !city_dir.is_dir() {
                continue;
            }
            let city = city_dir
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("")
                .to_string();
            for f in read_dir_sorted(&city_dir)? {
                let fname = f.file_name().and_then(|s| s.to_str()).unwrap_or("");
                let Some(stem) = fname.strip_suffix("_leftImg8bit.png") else {
                    continue;
                };
                let label = gt.map(|g| {
                    root.join(g)
                        .join(split)
                        .join(&city)
                        .join(format!("{stem}_{g}_labelIds.png"))
                });
                match &label {
                    Some(l) if !l.exists() => unpaired_images.push(f.clone()),
                    _ => samples.push(Sample {
                        image: f.clone(),
                        label,
                        name: stem.to_string(),
                        group: city.clone(),
                    }),
                }
            }
        }
        if let Some(g) = gt {
            let gt_root = root.join(g).join(split);
            if gt_root.is_dir() {
                let suffix = format!("_{g}_labelIds.png");
                for city_dir in read_dir_sorted(&gt_root)? {
                    if !city_dir.is_dir() {
                        continue;
                    }
                    for f in read_dir_sorted(&city_dir)? {
                        let fname = f.file_name().and_then(|s| s.to_str()).unwrap_or("").to_string();
                        if let Some(stem) = fname.strip_suffix(&suffix) {
                            let city = city_dir.file_name().and_then(|s| s.to_str()).unwrap_or("");
                            let img = root
                                .join("leftImg8bit")
                                .join(split)
                                .join(city)
                                .join(format!("{stem}_leftImg8bit.png"));
                            if !img.exists() {
                                unpaired_labels.push(f);
                            }
                        }
                    }
                }
            }
        }
        Ok(Self {
            kind: DatasetKind::Cityscapes,
            root: root.to_path_buf(),
            split: split.to_string(),
            classes: ClassTable::cityscapes(),
            samples,
            long_edge: None,
            unpaired_images,
            unpaired_labels,
        })
    }

    /// Opens `root` by its layout: Mapillary if it has a Vistas config JSON,
    /// Cityscapes otherwise.
    pub fn open(root: &Path, split: &str, labels: Labels) -> Result<Self> {
        if mapillary::config_path(root).is_some() {
            mapillary::open(root, split, None)
        } else {
            Self::cityscapes(root, split, labels)
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Reads sample `i`: the RGB image and its train-id map (if labelled),
    /// resized to the long edge where the dataset asks for it.
    pub fn load(&self, i: usize) -> Result<(RgbImage, Option<GrayImage>)> {
        let s = &self.samples[i];
        let img = image::read_rgb(&s.image)?;
        let label = match &s.label {
            None => None,
            Some(p) => {
                let raw = read_label(p)?;
                if raw.dimensions() != img.dimensions() {
                    return Err(Error::Image {
                        path: p.clone(),
                        msg: format!(
                            "label is {}x{}, its image {} is {}x{}",
                            raw.width(),
                            raw.height(),
                            s.image.display(),
                            img.width(),
                            img.height()
                        ),
                    });
                }
                Some(GrayImage::from_fn(raw.width(), raw.height(), |x, y| {
                    ::image::Luma([self.classes.lut[raw.get_pixel(x, y)[0] as usize]])
                }))
            }
        };
        Ok(match self.long_edge {
            Some(e) => resize_long_edge(img, label, e),
            None => (img, label),
        })
    }
}

/// Reads an 8-bit single-channel label PNG: grey values, or the indices of
/// a palette PNG (Mapillary), never the palette's colours.
pub fn read_label(path: &Path) -> Result<GrayImage> {
    let err = |m: String| Error::Image {
        path: path.to_path_buf(),
        msg: m,
    };
    if !path.exists() {
        return Err(err("no such file".into()));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec
        .read_info()
        .map_err(|e| err(format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    let (w, h, ct, bd) = (info.width, info.height, info.color_type, info.bit_depth);
    if !matches!(ct, png::ColorType::Grayscale | png::ColorType::Indexed) || bd != png::BitDepth::Eight {
        return Err(err(format!(
            "a label must be an 8-bit grey or palette PNG, found {ct:?} with {bd:?}-bit samples"
        )));
    }
    let mut buf = vec![0u8; reader.output_buffer_size().unwrap_or(0)];
    reader
        .next_frame(&mut buf)
        .map_err(|e| err(format!("corrupt PNG: {e}")))?;
    buf.truncate((w as usize) * (h as usize));
    GrayImage::from_raw(w, h, buf).ok_or_else(|| err("truncated label".into()))
}

/// Resizes so that the longer side is `edge` (bilinear image, nearest label).
pub fn resize_long_edge(img: RgbImage, label: Option<GrayImage>, edge: u32) -> (RgbImage, Option<GrayImage>) {
    let (w, h) = img.dimensions();
    let long = w.max(h);
    if long == edge {
        return (img, label);
    }
    let (nw, nh) = if w >= h {
        (edge, ((h as u64 * edge as u64) / w as u64).max(1) as u32)
    } else {
        (((w as u64 * edge as u64) / h as u64).max(1) as u32, edge)
    };
    let img = ::image::imageops::resize(&img, nw, nh, ::image::imageops::FilterType::Triangle);
    let label = label.map(|l| ::image::imageops::resize(&l, nw, nh, ::image::imageops::FilterType::Nearest));
    (img, label)
}

/// The dataset root of `cfg`: `root`, else the synthetic benchmark in
/// `synth_dir`, completed there first (files already written are kept; a
/// `synth.toml` already there must match the settings).
pub fn root(cfg: &DataConfig) -> Result<PathBuf> {
    match &cfg.root {
        Some(r) => Ok(r.clone()),
        None => {
            synth::generate(&cfg.synth, &cfg.synth_dir)?;
            Ok(cfg.synth_dir.clone())
        }
    }
}

/// The training split with its fine labels.
pub fn train_dataset(cfg: &DataConfig) -> Result<Dataset> {
    let mut ds = Dataset::open(&root(cfg)?, &cfg.train_split, Labels::Fine)?;
    if cfg.long_edge.is_some() {
        ds.long_edge = cfg.long_edge;
    }
    Ok(ds)
}

/// The training split and the second source, if any.
pub fn train_sources(cfg: &DataConfig) -> Result<Vec<Dataset>> {
    let mut v = vec![train_dataset(cfg)?];
    if let Some(s) = &cfg.second {
        let labels = if s.labels == "coarse" {
            Labels::Coarse
        } else {
            Labels::Fine
        };
        v.push(Dataset::open(&s.root, &s.split, labels)?);
    }
    Ok(v)
}

/// The validation split (its first `val_limit` images).
pub fn val_dataset(cfg: &DataConfig) -> Result<Dataset> {
    let mut ds = Dataset::open(&root(cfg)?, &cfg.val_split, Labels::Fine)?;
    if cfg.long_edge.is_some() {
        ds.long_edge = cfg.long_edge;
    }
    if let Some(n) = cfg.val_limit {
        ds.samples.truncate(n);
    }
    Ok(ds)
}

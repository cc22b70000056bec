//! Which crops an epoch is made of.
//!
//! - [`Centroids`]: as the official `uniform.py`, each labelled image is cut
//!   into tiles and, per class present in a tile, the centroid of that
//!   class's pixels there is recorded. Computed once and cached as JSON with
//!   the dataset (invalidated when the sample list changes).
//! - [`epoch_plan`]: a share `class_uniform` of the crops picks a class
//!   uniformly among those with centroids, then one of its centroids, and is
//!   centred there; the rest are random crops of random images. A second
//!   source (auto-labelled or coarse images) fills a set share of every
//!   batch, or, as the official recipe feeds auto-labelled coarse images
//!   (`coarse_boost_classes`), joins the class-uniform lists of chosen
//!   classes (`second_boost`).

use super::Dataset;
use crate::config::SamplerConfig;
use crate::{Error, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Per class, the (sample, x, y) centroids of its pixels in each tile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Centroids {
    pub tile: u32,
    /// Fingerprint of the sample list the centroids belong to.
    pub fingerprint: String,
    pub by_class: Vec<Vec<(u32, u32, u32)>>,
}

fn fingerprint(ds: &Dataset) -> String {
    let mut h = blake3::Hasher::new();
    for s in &ds.samples {
        h.update(s.name.as_bytes());
        h.update(
            s.label
                .as_ref()
                .map_or(&b""[..], |p| p.as_os_str().as_encoded_bytes()),
        );
    }
    h.finalize().to_hex().to_string()
}

impl Centroids {
    /// Scans every label of `ds` (tiles of `tile` pixels).
    pub fn compute(ds: &Dataset, tile: u32) -> Result<Self> {
        let k = ds.classes.num_classes();
        let mut by_class = vec![vec![]; k];
        for i in 0..ds.len() {
            let (_, label) = ds.load(i)?;
            let Some(label) = label else { continue };
            let (w, h) = label.dimensions();
            for ty in (0..h).step_by(tile as usize) {
                for tx in (0..w).step_by(tile as usize) {
                    let mut sx = vec![0u64; k];
                    let mut sy = vec![0u64; k];
                    let mut n = vec![0u64; k];
                    for y in ty..(ty + tile).min(h) {
                        for x in tx..(tx + tile).min(w) {
                            let c = label.get_pixel(x, y)[0] as usize;
                            if c < k {
                                sx[c] += x as u64;
                                sy[c] += y as u64;
                                n[c] += 1;
                            }
                        }
                    }
                    for c in 0..k {
                        if let (Some(x), Some(y)) = (sx[c].checked_div(n[c]), sy[c].checked_div(n[c])) {
                            by_class[c].push((i as u32, x as u32, y as u32));
                        }
                    }
                }
            }
        }
        Ok(Self {
            tile,
            fingerprint: fingerprint(ds),
            by_class,
        })
    }

    /// Reads the cache at `path` when it belongs to `ds`, else computes and
    /// writes it (atomically: a temporary file renamed into place).
    pub fn load_or_compute(ds: &Dataset, tile: u32, path: &Path) -> Result<Self> {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(c) = serde_json::from_str::<Centroids>(&text) {
                if c.tile == tile && c.fingerprint == fingerprint(ds) {
                    return Ok(c);
                }
            }
        }
        let c = Self::compute(ds, tile)?;
        // two runs may compute it at once: each writes its own temporary
        crate::atomic::write(path, serde_json::to_string(&c).expect("serialisable"))?;
        Ok(c)
    }

    /// Classes that have at least one centroid.
    pub fn classes_present(&self) -> Vec<usize> {
        (0..self.by_class.len())
            .filter(|&c| !self.by_class[c].is_empty())
            .collect()
    }
}

/// One crop of a batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Item {
    /// 0 = the primary dataset, 1 = the second source.
    pub source: usize,
    pub index: usize,
    /// Centre the crop on this (x, y), chosen for `class`.
    pub centre: Option<(u32, u32)>,
    pub class: Option<usize>,
}

/// A source of crops: a dataset and, for class-uniform sampling, its centroids.
pub struct Source<'a> {
    pub dataset: &'a Dataset,
    pub centroids: Option<&'a Centroids>,
}

/// One crop from `src` (source index `source`): a class-uniform crop with
/// probability `class_uniform`, else a random image. `boost` adds a second
/// source's centroids of some classes to `src`'s lists.
fn draw(
    src: &Source,
    source: usize,
    boost: Option<(&Source, &[usize])>,
    class_uniform: f64,
    rng: &mut StdRng,
) -> Item {
    if let Some(c) = src.centroids {
        let extra = |class: usize| -> &[(u32, u32, u32)] {
            match boost {
                Some((b, classes)) if classes.contains(&class) => b
                    .centroids
                    .and_then(|bc| bc.by_class.get(class))
                    .map_or(&[], |l| l.as_slice()),
                _ => &[],
            }
        };
        let present: Vec<usize> = (0..c.by_class.len())
            .filter(|&k| !c.by_class[k].is_empty() || !extra(k).is_empty())
            .collect();
        if !present.is_empty() && rng.random_bool(class_uniform) {
            let class = present[rng.random_range(0..present.len())];
            let (list, more) = (&c.by_class[class], extra(class));
            let j = rng.random_range(0..list.len() + more.len());
            let (from, (i, x, y)) = if j < list.len() {
                (source, list[j])
            } else {
                (1, more[j - list.len()])
            };
            return Item {
                source: from,
                index: i as usize,
                centre: Some((x, y)),
                class: Some(class),
            };
        }
    }
    Item {
        source,
        index: rng.random_range(0..src.dataset.len()),
        centre: None,
        class: None,
    }
}

/// The batches of one epoch: `batches` batches of `batch` crops, drawn with
/// a generator seeded from (seed, epoch). With a second source, each batch
/// takes `round(second_share · batch)` crops from it.
pub fn epoch_plan(
    primary: &Source,
    second: Option<&Source>,
    cfg: &SamplerConfig,
    batch: usize,
    batches: usize,
    seed: u64,
    epoch: u64,
) -> Result<Vec<Vec<Item>>> {
    if primary.dataset.is_empty() {
        return Err(Error::Input {
            path: primary.dataset.root.clone(),
            msg: format!("split `{}` has no labelled images", primary.dataset.split),
        });
    }
    let boost = second
        .filter(|s| !s.dataset.is_empty() && !cfg.second_boost.is_empty())
        .map(|s| (s, cfg.second_boost.as_slice()));
    let n_second = match second {
        Some(s) if !s.dataset.is_empty() && boost.is_none() => {
            (cfg.second_share * batch as f64).round() as usize
        }
        _ => 0,
    };
    let mut rng = StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut plan = Vec::with_capacity(batches);
    for _ in 0..batches {
        let mut items: Vec<Item> = (0..batch - n_second)
            .map(|_| draw(primary, 0, boost, cfg.class_uniform, &mut rng))
            .collect();
        if let Some(s) = second.filter(|_| n_second > 0) {
            items.extend((0..n_second).map(|_| draw(s, 1, None, cfg.class_uniform, &mut rng)));
        }
        items.shuffle(&mut rng);
        plan.push(items);
    }
    Ok(plan)
}

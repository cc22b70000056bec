//! Evaluation: multi-scale inference over a split with many scale sets,
//! fusions and flips in one pass (each scale's outputs computed once per
//! image and fused every requested way), metrics, and scoring a folder of
//! labelIds predictions as the official Cityscapes script does.
//!
//! Attention-fused sets also keep the weight maps of the first
//! [`ATTENTION_IMAGES`] images ([`AttentionSample`]); the lab writes them
//! into the run folder ([`write_attention`]) and the report draws them
//! from there ([`read_attention`]), so the report never runs the network.

pub mod folder;
pub mod infer;
pub mod metrics;
pub mod reach;

use crate::config::EvalKey;
use crate::data::image::normalize;
use crate::data::Dataset;
use crate::meter::{MemoryMeter, Stopwatch};
use crate::model::{Fusion, HmsaNet, ScaleOutput};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use metrics::{Confusion, Metrics};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The outcome of one evaluation set over a split.
#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    pub set: EvalKey,
    pub metrics: Metrics,
    pub confusion: Confusion,
    /// Per scale (high to low), the mean weight the fusion gave it.
    pub attn_means: Vec<(f64, f64)>,
    /// Per scale (high to low), per class, the mean weight over the
    /// ground-truth pixels of that class (None where it has none): which
    /// scale the attention trusts for which class.
    pub attn_class_means: Vec<(f64, Vec<Option<f64>>)>,
    /// Forward time of the scales this set uses plus its fusion, per image.
    pub ms_per_image: f64,
    /// Peak resident memory of the whole pass (MiB), where measurable.
    pub peak_mib: Option<f64>,
    pub images: usize,
    /// Hierarchical and explicit sets: the first [`ATTENTION_IMAGES`]
    /// images with each scale's weight map.
    #[serde(skip)]
    pub attention: Vec<AttentionSample>,
}

/// How many validation images keep their attention maps.
pub const ATTENTION_IMAGES: usize = 2;

/// The longest side an image or map is kept at (a preview for the report:
/// at Cityscapes' 1024x2048 the full maps of three scale sets would take
/// about 100 MB per run).
pub const ATTENTION_PREVIEW: usize = 512;

/// `(h, w)` shrunk so that its longer side is at most [`ATTENTION_PREVIEW`].
fn preview_size(h: usize, w: usize) -> (usize, usize) {
    let long = h.max(w);
    if long <= ATTENTION_PREVIEW {
        return (h, w);
    }
    (
        (h * ATTENTION_PREVIEW / long).max(1),
        (w * ATTENTION_PREVIEW / long).max(1),
    )
}

/// Nearest-neighbour indices from `n` to `m` samples (`i·n/m`, no
/// interpolation: every kept value is one the network produced).
fn nearest(n: usize, m: usize) -> Vec<u32> {
    (0..m).map(|i| (i * n / m) as u32).collect()
}

/// An (N, C, H, W) map at [`preview_size`], by [`nearest`].
fn preview_map(t: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = t.dims4()?;
    let (ph, pw) = preview_size(h, w);
    if (ph, pw) == (h, w) {
        return Ok(t.clone());
    }
    let dev = t.device();
    let rows = Tensor::new(nearest(h, ph), dev)?;
    let cols = Tensor::new(nearest(w, pw), dev)?;
    Ok(t.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

/// An image at [`preview_size`], by [`nearest`].
fn preview_image(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ph, pw) = preview_size(h, w);
    if (ph, pw) == (h, w) {
        return img.clone();
    }
    let (ys, xs) = (nearest(h, ph), nearest(w, pw));
    RgbImage::from_fn(pw as u32, ph as u32, |x, y| {
        *img.get_pixel(xs[x as usize], ys[y as usize])
    })
}

/// A validation image and the weight the fusion gave each scale's
/// prediction there (scale, (1, 1, h, w) f32 map on the CPU), both kept at
/// most [`ATTENTION_PREVIEW`] pixels on the longer side.
#[derive(Debug, Clone)]
pub struct AttentionSample {
    pub name: String,
    pub image: RgbImage,
    pub maps: Vec<(f64, Tensor)>,
}

/// The folder (under a run folder's `attention/`) of one set's maps:
/// `hierarchical_0.5,1.0`, `explicit_0.5,1.0,2.0_flip`.
pub fn attention_tag(set: &EvalKey) -> String {
    format!(
        "{}_{}{}",
        set.fusion.name(),
        set.scales,
        if set.flip { "_flip" } else { "" }
    )
}

/// Writes `r.attention` as `dir/attention/<tag>/<i>_<image>.safetensors`
/// (tensors `image`, u8 (H, W, 3), and `attn_<scale>`); returns the files.
pub fn write_attention(dir: &Path, r: &EvalResult) -> Result<Vec<PathBuf>> {
    let folder = dir.join("attention").join(attention_tag(&r.set));
    if r.attention.is_empty() {
        return Ok(vec![]);
    }
    std::fs::create_dir_all(&folder).map_err(|e| Error::io("creating", &folder, e))?;
    let mut files = vec![];
    for (i, a) in r.attention.iter().enumerate() {
        let (w, h) = a.image.dimensions();
        let mut m: HashMap<String, Tensor> = HashMap::new();
        let img = Tensor::from_vec(
            a.image.as_raw().clone(),
            (h as usize, w as usize, 3),
            &Device::Cpu,
        )?;
        m.insert("image".into(), img);
        for (s, t) in &a.maps {
            m.insert(
                format!("attn_{}", crate::model::scales::format_scale(*s)),
                t.clone(),
            );
        }
        let p = folder.join(format!("{i}_{}.safetensors", a.name));
        crate::atomic::write_with(&p, |tmp| {
            candle_core::safetensors::save(&m, tmp)
                .map_err(|e| Error::io("writing", tmp, std::io::Error::other(e.to_string())))
        })?;
        files.push(p);
    }
    Ok(files)
}

/// Reads a file of [`write_attention`]: the image's name is the file's
/// stem after `<i>_`; maps ordered from the highest scale down.
pub fn read_attention(path: &Path) -> Result<AttentionSample> {
    let bad = |m: String| Error::invalid(path.display().to_string(), m);
    let m = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    let name = stem.split_once('_').map_or(stem, |(_, n)| n).to_string();
    let img = m.get("image").ok_or_else(|| bad("no `image` tensor".into()))?;
    let (h, w, _) = img.dims3()?;
    let image = RgbImage::from_raw(w as u32, h as u32, img.flatten_all()?.to_vec1::<u8>()?)
        .ok_or_else(|| bad("`image` is not (H, W, 3)".into()))?;
    let mut maps: Vec<(f64, Tensor)> = m
        .iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("attn_")?.parse::<f64>().ok()?, t.clone())))
        .collect();
    maps.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(AttentionSample { name, image, maps })
}

fn union_scales(sets: &[EvalKey]) -> Vec<f64> {
    let mut v: Vec<f64> = sets.iter().flat_map(|s| s.scales.iter().copied()).collect();
    v.sort_by(|a, b| b.total_cmp(a));
    v.dedup();
    v
}

/// Scores `sets` on every labelled image of `ds`.
pub fn evaluate(net: &HmsaNet, ds: &Dataset, sets: &[EvalKey], device: &Device) -> Result<Vec<EvalResult>> {
    for (i, s) in sets.iter().enumerate() {
        s.fusion
            .check_scales(&s.scales, &format!("eval.sets[{i}].scales"))?;
    }
    let k = ds.classes.num_classes();
    let scales = union_scales(sets);
    let with_attn = sets.iter().any(|s| s.fusion.needs_relative_attention());
    let any_flip = sets.iter().any(|s| s.flip);
    let mut conf: Vec<Confusion> = sets.iter().map(|_| Confusion::new(k)).collect();
    let mut attn_sum: Vec<Vec<(f64, f64)>> = sets.iter().map(|_| vec![]).collect();
    // per set, per scale: (scale, per class (sum of weights, pixels))
    type ClassSums = Vec<(f64, Vec<(f64, u64)>)>;
    let mut attn_class: Vec<ClassSums> = sets.iter().map(|_| vec![]).collect();
    let mut ms: Vec<f64> = vec![0.0; sets.len()];
    let mut attention: Vec<Vec<AttentionSample>> = sets.iter().map(|_| vec![]).collect();
    let mem = MemoryMeter::start(device);
    let mut images = 0;
    for i in 0..ds.len() {
        let (img, label) = ds.load(i)?;
        let Some(label) = label else { continue };
        images += 1;
        let x = normalize(&img, device)?;
        let (_, _, h, w) = x.dims4()?;
        let forward = |x: &Tensor| -> Result<(Vec<ScaleOutput>, Vec<f64>)> {
            let mut outs = vec![];
            let mut times = vec![];
            for (j, &s) in scales.iter().enumerate() {
                let t = Stopwatch::start(device)?;
                outs.push(net.forward_scale(x, s, with_attn && j > 0, false)?);
                times.push(t.ms()?);
            }
            Ok((outs, times))
        };
        let (outs, times) = forward(&x)?;
        let flipped = if any_flip {
            Some(forward(&x.flip(&[3])?)?)
        } else {
            None
        };
        for (si, set) in sets.iter().enumerate() {
            let t = Stopwatch::start(device)?;
            let pick = |o: &[ScaleOutput]| -> Vec<ScaleOutput> {
                o.iter()
                    .filter(|o| set.scales.contains(&o.scale))
                    .cloned()
                    .collect()
            };
            let own: f64 = scales
                .iter()
                .zip(&times)
                .filter(|(s, _)| set.scales.contains(s))
                .map(|(_, t)| t * if set.flip { 2.0 } else { 1.0 })
                .sum();
            let fused = net.fuse(set.fusion, &pick(&outs), (h, w), false)?;
            let pred = match (&flipped, set.flip) {
                (Some((fo, _)), true) => {
                    let ff = net.fuse(set.fusion, &pick(fo), (h, w), false)?;
                    crate::model::fusion::average_flip(&fused.pred, &ff.pred.flip(&[3])?)?
                }
                _ => fused.pred.clone(),
            };
            let classes: Vec<u8> = pred.argmax(1)?.flatten_all()?.to_dtype(DType::U8)?.to_vec1()?;
            conf[si].add(label.as_raw(), &classes);
            if set.fusion == Fusion::Hierarchical || set.fusion == Fusion::Explicit {
                if images <= ATTENTION_IMAGES {
                    let maps = fused
                        .attn
                        .iter()
                        .map(|(s, a)| {
                            Ok((
                                *s,
                                preview_map(&a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?,
                            ))
                        })
                        .collect::<Result<_>>()?;
                    attention[si].push(AttentionSample {
                        name: ds.samples[i].name.clone(),
                        image: preview_image(&img),
                        maps,
                    });
                }
                for (j, (s, a)) in fused.attn.iter().enumerate() {
                    let m = a.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                    if attn_sum[si].len() <= j {
                        attn_sum[si].push((*s, 0.0));
                        attn_class[si].push((*s, vec![(0.0, 0); k]));
                    }
                    attn_sum[si][j].1 += m;
                    // the weight map at the label's size, summed per class
                    let full = hmsa_kernels::resize::resize(a, h, w)?;
                    let wv: Vec<f32> = full.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                    let sums = &mut attn_class[si][j].1;
                    for (&c, &v) in label.as_raw().iter().zip(&wv) {
                        if let Some(e) = sums.get_mut(c as usize) {
                            e.0 += v as f64;
                            e.1 += 1;
                        }
                    }
                }
            }
            ms[si] += own + t.ms()?;
        }
    }
    let peak = mem.peak_mib();
    let n = images.max(1) as f64;
    Ok(sets
        .iter()
        .enumerate()
        .map(|(si, set)| EvalResult {
            set: set.clone(),
            metrics: conf[si].metrics(),
            confusion: conf[si].clone(),
            attn_means: attn_sum[si].iter().map(|(s, v)| (*s, v / n)).collect(),
            attn_class_means: attn_class[si]
                .iter()
                .map(|(s, c)| {
                    (
                        *s,
                        c.iter().map(|&(v, n)| (n > 0).then(|| v / n as f64)).collect(),
                    )
                })
                .collect(),
            ms_per_image: ms[si] / n,
            peak_mib: peak,
            images,
            attention: std::mem::take(&mut attention[si]),
        })
        .collect())
}

/// The step metric of `[eval] every` for one evaluation set.
pub fn val_metric(set: &crate::config::EvalKey) -> String {
    split_metric("val_miou", set)
}

/// The metric of `[eval] fit`: the set's mIoU on the training split.
pub fn fit_metric(set: &crate::config::EvalKey) -> String {
    split_metric("train_miou", set)
}

fn split_metric(prefix: &str, set: &crate::config::EvalKey) -> String {
    format!(
        "{prefix}/{} {}{}",
        set.fusion.name(),
        set.scales,
        if set.flip { " flip" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_keep_the_long_side_at_most_512_and_pick_values() {
        assert_eq!(preview_size(1024, 2048), (256, 512));
        assert_eq!(preview_size(64, 128), (64, 128));
        assert_eq!(preview_size(2048, 1000), (512, 250));
        // each value names its source: row·10000 + column
        let (h, w) = (1030usize, 600usize);
        let v: Vec<f32> = (0..h * w).map(|i| ((i / w) * 10000 + i % w) as f32).collect();
        let t = Tensor::from_vec(v, (1, 1, h, w), &Device::Cpu).unwrap();
        let p = preview_map(&t).unwrap();
        let (_, _, ph, pw) = p.dims4().unwrap();
        assert_eq!((ph, pw), (512, 298));
        let got: Vec<Vec<f32>> = p.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let rows: Vec<usize> = got.iter().map(|r| r[0] as usize / 10000).collect();
        let cols: Vec<usize> = got[0].iter().map(|&c| c as usize % 10000).collect();
        // picked, not interpolated: whole source rows and columns, in order,
        // spread over the whole map
        assert!(got.iter().all(|r| r.iter().all(|&x| x.fract() == 0.0)));
        assert!(rows.windows(2).all(|p| p[1] > p[0]) && cols.windows(2).all(|p| p[1] > p[0]));
        assert_eq!((rows[0], cols[0]), (0, 0));
        assert!(
            rows[ph - 1] >= h - 3 && cols[pw - 1] >= w - 3,
            "{} {}",
            rows[ph - 1],
            cols[pw - 1]
        );
        let img = RgbImage::from_fn(w as u32, h as u32, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 0])
        });
        let pi = preview_image(&img);
        assert_eq!((pi.width(), pi.height()), (298, 512));
        for (y, &r) in rows.iter().enumerate().step_by(37) {
            for (x, &c) in cols.iter().enumerate().step_by(23) {
                assert_eq!(
                    pi.get_pixel(x as u32, y as u32),
                    img.get_pixel(c as u32, r as u32)
                );
            }
        }
    }
}

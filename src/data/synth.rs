//! The synthetic street-scene benchmark: deterministic from a seed,
//! written in the Cityscapes layout with real labelIds, and built so that
//! the paper's question (which scale is best for which pixel) has an
//! answer whose premise can be measured (`synth --stats`, [`stats`]).
//!
//! - **Band-limited.** Every scene is drawn at twice its size and
//!   box-filtered down (2x2 means), so no cue lives at the highest spatial
//!   frequency: the random rescaling of training (0.5–2.0) no longer
//!   changes the image statistics, and an unresampled 1.0x image is in the
//!   training distribution. (v1 drew poles and signs as a ±A modulation
//!   alternating every pixel, which training's resampling attenuated.)
//! - **Detail classes** are visible but unresolved at the low scale: solid
//!   `pole`s 4–6 px wide in their own colour (2–3 px at 0.5x, under one
//!   output pixel of the stride-4 network; 2–3 output pixels at 2.0x) and
//!   solid `traffic sign`s 8–12 px square in their own hue. Distant
//!   `person`s (13–23 px) and `car`s are small objects too.
//! - **Context classes**: exactly one `vegetation` and one `terrain` field
//!   per image, one in each half, filled with the *same* texture law; only
//!   a band along the field's top edge (dark blue-green for vegetation,
//!   ochre for terrain) tells them apart, so a field's lower pixels are
//!   far from their cue. With one field of each class, the image-level
//!   pooling of OCR cannot settle the class from which classes are
//!   present. The [`Layout`] sets the geometry:
//!   - **v3** (the ablation's): fields as tall as the image, top at 5–12%
//!     and bottom at 93–98% of the height, 0.8–1.0 x `blob_radius` wide
//!     (at most 45% of the width), an 8 px band. Most of a field's pixels
//!     are 50–110 px from their cue at 1.0x: beyond the reach of a
//!     short-reach backbone (the `small-short` preset) at 1.0x, within it
//!     at 0.5x, so the context classes need the low scale.
//!   - **v2**: fields from 45–55% of the height down, at most
//!     `blob_radius` tall, a 4 px band; a network that sees the whole
//!     image at 1.0x needs no low scale for them (kept so that
//!     docs/ablation-tuning.md's history can be rerun).
//! - The rest (sky, buildings, sidewalk, road) is easy scenery.

use super::cityscapes::{label_to_train, CLASSES};
use crate::config::{Layout, SynthConfig};
use crate::{Error, Result};
use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// labelIds of the classes the generator draws.
pub mod ids {
    pub const ROAD: u8 = 7;
    pub const SIDEWALK: u8 = 8;
    pub const BUILDING: u8 = 11;
    pub const POLE: u8 = 17;
    pub const SIGN: u8 = 20;
    pub const VEGETATION: u8 = 21;
    pub const TERRAIN: u8 = 22;
    pub const SKY: u8 = 23;
    pub const PERSON: u8 = 24;
    pub const CAR: u8 = 26;
    pub const UNLABELED: u8 = 0;
}

/// The classes the benchmark builds to need the high scale (detail) and
/// the low scale (context), as labelIds.
pub const DETAIL: [u8; 2] = [ids::POLE, ids::SIGN];
pub const CONTEXT: [u8; 2] = [ids::VEGETATION, ids::TERRAIN];

/// Classes whose coarse labels are kept (large regions only, like gtCoarse).
const COARSE_CLASSES: [u8; 6] = [
    ids::ROAD,
    ids::SIDEWALK,
    ids::BUILDING,
    ids::VEGETATION,
    ids::TERRAIN,
    ids::SKY,
];

/// Scenes are drawn at this many times their size, then box-filtered down.
const SUPERSAMPLE: u32 = 2;

/// Where a v3 context field's top and bottom edges lie, as shares of the
/// image height (ranges drawn uniformly).
pub const V3_TOP: (f32, f32) = (0.05, 0.12);
pub const V3_BOTTOM: (f32, f32) = (0.93, 0.98);

impl Layout {
    /// Height (pixels, at 1.0x) of the band along a context field's top
    /// edge that is its class's only cue.
    pub fn band(self) -> f32 {
        match self {
            Layout::V2 => 4.0,
            Layout::V3 => 8.0,
        }
    }
}

/// One rendered scene: the image, the same scene without the detail
/// classes (poles, signs), the labelIds map, and per pixel the distance
/// (pixels) from a context-class pixel to its region's cue (NaN elsewhere).
pub struct Scene {
    pub image: RgbImage,
    pub without_detail: RgbImage,
    pub label_ids: GrayImage,
    pub cue_distance: Vec<f32>,
}

fn clamp8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// A value-noise texture: a coarse random grid bilinearly interpolated, plus
/// per-pixel noise. Same parameters give the same statistics.
struct Texture {
    base: [f32; 3],
    grid: Vec<f32>,
    cell: f32,
    gw: usize,
    amp: f32,
    fine: f32,
}

impl Texture {
    fn new(rng: &mut StdRng, base: [f32; 3], cell: f32, amp: f32, fine: f32, w: u32, h: u32) -> Self {
        let gw = (w as f32 / cell) as usize + 2;
        let gh = (h as f32 / cell) as usize + 2;
        let grid = (0..gw * gh).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Self {
            base,
            grid,
            cell,
            gw,
            amp,
            fine,
        }
    }

    fn at(&self, rng: &mut StdRng, x: u32, y: u32) -> [u8; 3] {
        let (fx, fy) = (x as f32 / self.cell, y as f32 / self.cell);
        let (ix, iy) = (fx as usize, fy as usize);
        let (tx, ty) = (fx - ix as f32, fy - iy as f32);
        let g = |i: usize, j: usize| self.grid[j * self.gw + i];
        let v = (g(ix, iy) * (1.0 - tx) + g(ix + 1, iy) * tx) * (1.0 - ty)
            + (g(ix, iy + 1) * (1.0 - tx) + g(ix + 1, iy + 1) * tx) * ty;
        let n = rng.random_range(-1.0f32..1.0) * self.fine;
        let s = v * self.amp + n;
        [
            clamp8(self.base[0] + s),
            clamp8(self.base[1] + s * 1.2),
            clamp8(self.base[2] + s * 0.6),
        ]
    }
}

/// The supersampled canvas a scene is drawn on.
struct Canvas {
    img: RgbImage,
    lab: GrayImage,
    dist: Vec<f32>,
}

impl Canvas {
    /// Paints one pixel; shapes are clipped at the canvas edge.
    fn put(&mut self, x: u32, y: u32, p: [u8; 3], id: u8) {
        if x >= self.img.width() || y >= self.img.height() {
            return;
        }
        self.img.put_pixel(x, y, Rgb(p));
        self.lab.put_pixel(x, y, Luma([id]));
        self.dist[(y * self.img.width() + x) as usize] = f32::NAN;
    }
}

/// 2x2 (k x k) means of the image; each label block's most frequent label
/// (ties to the first in row order); mean cue distance over a block's
/// context pixels.
fn downsample(img: &RgbImage, lab: &GrayImage, dist: &[f32], k: u32) -> (RgbImage, GrayImage, Vec<f32>) {
    let (w, h) = (img.width() / k, img.height() / k);
    let mut oi = RgbImage::new(w, h);
    let mut ol = GrayImage::new(w, h);
    let mut od = vec![f32::NAN; (w * h) as usize];
    let n = (k * k) as f32;
    for y in 0..h {
        for x in 0..w {
            let mut sum = [0f32; 3];
            let mut labels = Vec::with_capacity((k * k) as usize);
            let (mut dsum, mut dn) = (0f32, 0u32);
            for yy in y * k..(y + 1) * k {
                for xx in x * k..(x + 1) * k {
                    let p = img.get_pixel(xx, yy).0;
                    for c in 0..3 {
                        sum[c] += p[c] as f32;
                    }
                    labels.push(lab.get_pixel(xx, yy)[0]);
                    let d = dist[(yy * img.width() + xx) as usize];
                    if !d.is_nan() {
                        dsum += d;
                        dn += 1;
                    }
                }
            }
            oi.put_pixel(x, y, Rgb(sum.map(|v| clamp8(v / n))));
            let mode = labels
                .iter()
                .copied()
                .max_by_key(|l| {
                    (
                        labels.iter().filter(|m| *m == l).count(),
                        std::cmp::Reverse(labels.iter().position(|m| m == l)),
                    )
                })
                .expect("a block has pixels");
            ol.put_pixel(x, y, Luma([mode]));
            if dn > 0 && CONTEXT.contains(&mode) {
                od[(y * w + x) as usize] = dsum / dn as f32;
            }
        }
    }
    (oi, ol, od)
}

/// Renders scene `index` of a split; deterministic in (seed, split, index).
pub fn render(cfg: &SynthConfig, split: &str, index: usize) -> Scene {
    let split_salt = split
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64));
    let mut rng = StdRng::seed_from_u64(
        cfg.seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(split_salt.wrapping_mul(0xBF58_476D_1CE4_E5B9))
            .wrapping_add(index as u64),
    );
    let k = SUPERSAMPLE;
    let kf = k as f32;
    let (w, h) = (cfg.width * k, cfg.height * k);
    let hf = h as f32;
    let mut cv = Canvas {
        img: RgbImage::new(w, h),
        lab: GrayImage::from_pixel(w, h, Luma([ids::UNLABELED])),
        dist: vec![f32::NAN; (w * h) as usize],
    };
    let horizon = (rng.random_range(0.30..0.42) * hf) as u32;
    let ground = (rng.random_range(0.55..0.65) * hf) as u32;
    let curb = ground + (rng.random_range(0.08..0.14) * hf) as u32;

    // Sky: a vertical gradient with faint noise.
    for y in 0..h {
        for x in 0..w {
            let t = y as f32 / hf;
            let n = rng.random_range(-3.0f32..3.0);
            let p = [
                clamp8(100.0 + 60.0 * t + n),
                clamp8(140.0 + 40.0 * t + n),
                clamp8(200.0 + n),
            ];
            cv.put(x, y, p, ids::SKY);
        }
    }
    // Buildings: blocks with a skyline, a wall colour and a window grid.
    let mut x0 = 0u32;
    while x0 < w {
        let bw = (rng.random_range(40..130) * k).min(w - x0);
        let top = (rng.random_range(0.12..(horizon as f32 / hf).max(0.13)) * hf) as u32;
        let wall = [
            rng.random_range(90.0..150.0f32),
            rng.random_range(80.0..130.0),
            rng.random_range(70.0..120.0),
        ];
        let tex = Texture::new(&mut rng, wall, 8.0 * kf, 8.0, 4.0, w, h);
        let (wx, wy) = (rng.random_range(8..14u32), rng.random_range(10..16u32));
        for y in top..ground {
            for x in x0..x0 + bw {
                let (cx, cy) = ((x - x0) / k, (y - top) / k);
                let win = cx % wx >= 2 && cx % wx < wx - 2 && cy % wy >= 3 && cy % wy < wy - 3;
                let mut p = tex.at(&mut rng, x, y);
                if win {
                    p = [
                        clamp8(p[0] as f32 * 0.6),
                        clamp8(p[1] as f32 * 0.65),
                        clamp8(p[2] as f32 * 0.8),
                    ];
                }
                cv.put(x, y, p, ids::BUILDING);
            }
        }
        x0 += bw;
    }
    // Ground: sidewalk band (tiles) then road (fine asphalt).
    let side = Texture::new(&mut rng, [150.0, 145.0, 140.0], 6.0 * kf, 6.0, 5.0, w, h);
    let road = Texture::new(&mut rng, [85.0, 85.0, 90.0], 12.0 * kf, 5.0, 7.0, w, h);
    for y in ground..h {
        for x in 0..w {
            let (p, id) = if y < curb {
                let mut p = side.at(&mut rng, x, y);
                if (x / k).is_multiple_of(16) || ((y - ground) / k).is_multiple_of(12) {
                    p = p.map(|c| clamp8(c as f32 - 25.0));
                }
                (p, ids::SIDEWALK)
            } else {
                (road.at(&mut rng, x, y), ids::ROAD)
            };
            cv.put(x, y, p, id);
        }
    }
    // Context: one vegetation and one terrain field, one in each half,
    // one texture law for both; only a band along the field's top edge
    // differs. The layout sets how tall the fields are and how wide the
    // band (v2's draws keep their order, so its scenes are unchanged).
    let veg_left = rng.random_bool(0.5);
    let band = cfg.layout.band() * kf;
    for half in 0..2u32 {
        let veg = (half == 0) == veg_left;
        let (id, cue) = if veg {
            (ids::VEGETATION, [30u8, 70, 95])
        } else {
            (ids::TERRAIN, [205u8, 170, 60])
        };
        let rmax = cfg.blob_radius as f32 * kf;
        let fw = rng.random_range(0.8 * rmax..rmax).min(0.45 * w as f32);
        let x0 = (half as f32 * 0.5 + 0.25) * w as f32 - fw / 2.0 + rng.random_range(-0.02..0.02) * w as f32;
        let (top, bottom) = match cfg.layout {
            Layout::V2 => {
                let top = rng.random_range(0.45 * hf..0.55 * hf);
                (top, (top + rng.random_range(0.7 * rmax..rmax)).min(0.97 * hf))
            }
            Layout::V3 => {
                let top = rng.random_range(V3_TOP.0 * hf..V3_TOP.1 * hf);
                (top, rng.random_range(V3_BOTTOM.0 * hf..V3_BOTTOM.1 * hf))
            }
        };
        let corner = 6.0 * kf;
        let tex = Texture::new(&mut rng, [95.0, 130.0, 70.0], 7.0 * kf, 22.0, 10.0, w, h);
        for y in top as u32..bottom as u32 {
            for x in x0.max(0.0) as u32..((x0 + fw) as u32).min(w) {
                let (fx, fy) = (x as f32 - x0, y as f32 - top);
                // rounded top corners
                let (cx, cy) = (
                    (corner - fx).max(fx - (fw - corner)).max(0.0),
                    (corner - fy).max(0.0),
                );
                if cx.hypot(cy) > corner {
                    continue;
                }
                // distance to the cue in (1.0x) pixels
                let d = (fy - band).max(0.0) / kf;
                let p = if fy < band { cue } else { tex.at(&mut rng, x, y) };
                cv.put(x, y, p, id);
                cv.dist[(y * w + x) as usize] = d;
            }
        }
    }
    // Cars on the road.
    for _ in 0..rng.random_range(1..=4) {
        let cw = rng.random_range(0.12 * hf..0.32 * hf) as u32;
        let ch = cw * 2 / 5;
        let bottom = rng.random_range(curb + ch..=h.max(curb + ch + 1) - 1).min(h - 1);
        let cx0 = rng.random_range(0..w.saturating_sub(cw).max(1));
        let col = [
            rng.random_range(20..230u8),
            rng.random_range(20..230u8),
            rng.random_range(20..230u8),
        ];
        for y in bottom.saturating_sub(ch)..bottom {
            for x in cx0..(cx0 + cw).min(w) {
                let glass = y < bottom - ch * 2 / 3 && x > cx0 + cw / 5 && x < cx0 + cw * 4 / 5;
                cv.put(x, y, if glass { [60, 70, 80] } else { col }, ids::CAR);
            }
        }
    }
    // Distant people on the sidewalk: a few pixels, plain colours.
    for _ in 0..rng.random_range(3..=8) {
        let ph = rng.random_range(0.10 * hf..0.18 * hf).max(8.0 * kf) as u32;
        let pw = (ph * 2 / 5).max(4 * k);
        let feet = rng.random_range(ground + 2 * k..curb.max(ground + 3 * k));
        let px0 = rng.random_range(0..w - pw);
        let shirt = [
            rng.random_range(150..255u8),
            rng.random_range(0..120u8),
            rng.random_range(0..120u8),
        ];
        for y in feet.saturating_sub(ph)..feet.min(h) {
            for x in px0..px0 + pw {
                let head = y < feet - ph * 4 / 5;
                cv.put(x, y, if head { [225, 180, 150] } else { shirt }, ids::PERSON);
            }
        }
    }
    let without_detail = cv.img.clone();
    // Detail: solid poles 4–6 px wide in their own colour (violet: a grey
    // pole was lost among the building windows), some with a sign on top:
    // a solid 8–12 px square of its own hue. Aligned to whole pixels of the
    // downsampled image.
    for _ in 0..rng.random_range(3..=7) {
        let pw = rng.random_range(4..=6u32) * k;
        let x = rng.random_range(1..cfg.width - 8) * k;
        let foot = rng.random_range(ground + 2 * k..curb.max(ground + 3 * k)) / k * k;
        let ph = (rng.random_range(0.15 * hf..0.35 * hf) as u32) / k * k;
        let top = foot.saturating_sub(ph);
        let violet = [
            rng.random_range(110.0..130.0f32),
            rng.random_range(50.0..70.0),
            rng.random_range(130.0..150.0),
        ];
        for y in top..foot {
            for dx in 0..pw {
                let n = rng.random_range(-4.0f32..4.0);
                cv.put(x + dx, y, violet.map(|c| clamp8(c + n)), ids::POLE);
            }
        }
        if rng.random_bool(0.6) {
            let side = rng.random_range(8..=12u32) * k;
            let sx = (x + pw / 2).saturating_sub(side / 2) / k * k;
            let sy = top.saturating_sub(side);
            let hue = [
                rng.random_range(235.0..255.0f32),
                rng.random_range(205.0..235.0),
                rng.random_range(10.0..50.0),
            ];
            for y in sy..sy + side {
                for xx in sx..(sx + side).min(w) {
                    let n = rng.random_range(-4.0f32..4.0);
                    cv.put(xx, y, hue.map(|c| clamp8(c + n)), ids::SIGN);
                }
            }
        }
    }
    let (image, label_ids, cue_distance) = downsample(&cv.img, &cv.lab, &cv.dist, k);
    let nan = vec![f32::NAN; cv.dist.len()];
    let (without_detail, _, _) = downsample(&without_detail, &cv.lab, &nan, k);
    Scene {
        image,
        without_detail,
        label_ids,
        cue_distance,
    }
}

/// Coarse labels as gtCoarse: large classes only, eroded by `r` pixels
/// (a pixel keeps its label only if its whole (2r+1)² box has that label).
pub fn coarse(label_ids: &GrayImage, r: u32) -> GrayImage {
    let (w, h) = label_ids.dimensions();
    let mut out = GrayImage::from_pixel(w, h, Luma([ids::UNLABELED]));
    for y in r..h.saturating_sub(r) {
        for x in r..w.saturating_sub(r) {
            let c = label_ids.get_pixel(x, y)[0];
            if !COARSE_CLASSES.contains(&c) {
                continue;
            }
            let uniform =
                (y - r..=y + r).all(|yy| (x - r..=x + r).all(|xx| label_ids.get_pixel(xx, yy)[0] == c));
            if uniform {
                out.put_pixel(x, y, Luma([c]));
            }
        }
    }
    out
}

/// The file name stem of scene `i`: `synth_<seq>_<frame>`.
pub fn stem(i: usize) -> String {
    format!("synth_{:06}_{:06}", i / 100, i % 100)
}

/// Writes a PNG atomically (a temporary name of this process, then a
/// rename), so a reader, or a second process generating the same folder,
/// never sees half a file.
fn save(path: &Path, f: impl FnOnce(&Path) -> image::ImageResult<()>) -> Result<()> {
    crate::atomic::write_with(path, |tmp| {
        f(tmp).map_err(|e| Error::Image {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    })
}

/// What [`generate`] wrote.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Written {
    pub images: usize,
    pub labels: usize,
}

/// Writes the dataset under `root` in the Cityscapes layout (city `synth`),
/// skipping files that already exist (a re-run completes an interrupted one).
/// A `synth.toml` beside it records the config; an existing one must match.
pub fn generate(cfg: &SynthConfig, root: &Path) -> Result<Written> {
    let stamp = root.join("synth.toml");
    let text = toml::to_string(cfg).expect("serialisable");
    if stamp.exists() {
        let old = std::fs::read_to_string(&stamp).map_err(|e| Error::io("reading", &stamp, e))?;
        if old != text {
            return Err(Error::Config {
                path: stamp,
                msg: "this folder holds a synthetic dataset made with other options; choose another folder"
                    .into(),
            });
        }
    } else {
        std::fs::create_dir_all(root).map_err(|e| Error::io("creating", root, e))?;
    }
    let mut n = Written::default();
    // train_extra carries gtCoarse (what a student may use) and its full
    // truth in gtFine, which only the measurement of the teacher's labels
    // reads (the synthetic benchmark knows the truth; Cityscapes does not).
    let splits: [(&str, usize, &[&str]); 4] = [
        ("train", cfg.train, &["gtFine"]),
        ("val", cfg.val, &["gtFine"]),
        ("train_extra", cfg.train_extra, &["gtCoarse", "gtFine"]),
        ("unlabeled", cfg.unlabeled, &[]),
    ];
    for (split, count, gts) in splits {
        for i in 0..count {
            let s = stem(i);
            let img_path = root.join(format!("leftImg8bit/{split}/synth/{s}_leftImg8bit.png"));
            let lab_paths: Vec<(&str, PathBuf)> = gts
                .iter()
                .map(|g| (*g, root.join(format!("{g}/{split}/synth/{s}_{g}_labelIds.png"))))
                .collect();
            if img_path.exists() && lab_paths.iter().all(|(_, p)| p.exists()) {
                continue;
            }
            let scene = render(cfg, split, i);
            for (g, lp) in &lab_paths {
                let lab = if *g == "gtCoarse" {
                    coarse(&scene.label_ids, cfg.coarse_erosion)
                } else {
                    scene.label_ids.clone()
                };
                save(lp, |p| lab.save_with_format(p, image::ImageFormat::Png))?;
                n.labels += 1;
            }
            // The image goes last: its presence marks the set complete.
            save(&img_path, |p| {
                scene.image.save_with_format(p, image::ImageFormat::Png)
            })?;
            n.images += 1;
        }
    }
    crate::atomic::write(&stamp, text)?;
    Ok(n)
}

/// Where a cue is measured: a validation image resized by the network's
/// rule (bilinear, PyTorch's; labels nearest) to one scale, or training
/// crops resampled as the augmentation does (random scale in
/// [`AugmentConfig::scale_min`, `scale_max`], the image crate's filter).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Where {
    Val(f64),
    TrainCrops,
}

impl std::fmt::Display for Where {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Where::Val(s) => write!(f, "validation at {s}x"),
            Where::TrainCrops => write!(f, "training crops"),
        }
    }
}

/// The cues measured at one [`Where`].
#[derive(Debug, Clone, Serialize)]
pub struct CueStats {
    pub at: Where,
    /// Median distance from a context-class pixel to its region's cue, in
    /// output pixels of the stride-4 network.
    pub context_cue_px: f64,
    /// The 10th, 25th, 75th and 90th percentiles of that distance: how
    /// much of a field lies beyond a network's reach (measured in output
    /// pixels, which a network's reach is fixed in).
    pub context_cue_spread: [f64; 4],
    /// Per detail class (labelId): the share of its pixels whose colour
    /// differs by more than 8 levels from the same scene without the
    /// detail classes (visible), and its median width in output pixels
    /// (resolved when at least 1).
    pub detail: Vec<DetailStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DetailStats {
    pub class: String,
    pub visible: f64,
    /// Mean over its pixels of the largest channel difference (levels)
    /// from the scene without the detail classes.
    pub contrast: f64,
    pub width_px: f64,
    pub pixels: usize,
}

/// The measured properties of the benchmark (see the module docs).
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Accuracy of a nearest-class-mean classifier on 7x7 patch features
    /// (mean and std of each channel) for vegetation vs terrain pixels more
    /// than 5 px from their cue, fitted on training scenes and scored on
    /// validation scenes; chance is 0.5.
    pub local_accuracy: f64,
    /// The cues on validation images at 0.25, 0.5, 1.0 and 2.0, and on
    /// augmented training crops.
    pub cues: Vec<CueStats>,
    pub scenes: usize,
}

fn patch_features(img: &RgbImage, x: u32, y: u32) -> Option<[f64; 6]> {
    let (w, h) = img.dimensions();
    if x < 3 || y < 3 || x + 3 >= w || y + 3 >= h {
        return None;
    }
    let mut s = [0f64; 3];
    let mut q = [0f64; 3];
    for yy in y - 3..=y + 3 {
        for xx in x - 3..=x + 3 {
            let p = img.get_pixel(xx, yy).0;
            for c in 0..3 {
                s[c] += p[c] as f64;
                q[c] += (p[c] as f64).powi(2);
            }
        }
    }
    let n = 49.0;
    let mut f = [0f64; 6];
    for c in 0..3 {
        f[c] = s[c] / n;
        f[3 + c] = (q[c] / n - (s[c] / n).powi(2)).max(0.0).sqrt();
    }
    Some(f)
}

/// Bilinear resize with PyTorch's rule (align_corners=false, no
/// antialiasing), as the network's `ResizeX` of a validation image.
fn resize_torch(img: &RgbImage, dw: u32, dh: u32) -> RgbImage {
    use hmsa_kernels::resize::taps;
    let (tx, ty) = (
        taps(img.width() as usize, dw as usize),
        taps(img.height() as usize, dh as usize),
    );
    RgbImage::from_fn(dw, dh, |ox, oy| {
        let (s, t) = (tx[ox as usize], ty[oy as usize]);
        let mut v = [0f64; 3];
        for (yy, wy) in [(t.i0, t.w0), (t.i1, t.w1)] {
            for (xx, wx) in [(s.i0, s.w0), (s.i1, s.w1)] {
                let p = img.get_pixel(xx as u32, yy as u32).0;
                for c in 0..3 {
                    v[c] += p[c] as f64 * wy * wx;
                }
            }
        }
        Rgb(v.map(|c| clamp8(c as f32)))
    })
}

/// Labels (and the cue distance) at the nearest source pixel.
fn resize_nearest<T: Copy>(src: &[T], w: u32, h: u32, dw: u32, dh: u32) -> Vec<T> {
    let mut out = Vec::with_capacity((dw * dh) as usize);
    for y in 0..dh {
        let sy = ((y as f64 + 0.5) * h as f64 / dh as f64) as u32;
        for x in 0..dw {
            let sx = ((x as f64 + 0.5) * w as f64 / dw as f64) as u32;
            out.push(src[(sy.min(h - 1) * w + sx.min(w - 1)) as usize]);
        }
    }
    out
}

/// Accumulates one [`CueStats`].
#[derive(Default)]
struct CueAcc {
    dists: Vec<f32>,
    seen: [usize; 2],
    visible: [usize; 2],
    contrast: [f64; 2],
    widths: [Vec<f32>; 2],
}

impl CueAcc {
    /// One scene resampled by `s` to `image`/`without` (`dw` x `dh`), with
    /// the labels and cue distances of the unresampled scene.
    fn add(&mut self, scene: &Scene, image: &RgbImage, without: &RgbImage, s: f64) {
        let (w, h) = scene.label_ids.dimensions();
        let (dw, dh) = image.dimensions();
        let labels = resize_nearest(scene.label_ids.as_raw(), w, h, dw, dh);
        let dist = resize_nearest(&scene.cue_distance, w, h, dw, dh);
        for (i, (&l, &d)) in labels.iter().zip(&dist).enumerate() {
            if CONTEXT.contains(&l) && !d.is_nan() {
                self.dists.push(d * s as f32 / 4.0);
            }
            let Some(k) = DETAIL.iter().position(|&c| c == l) else {
                continue;
            };
            self.seen[k] += 1;
            let (x, y) = (i as u32 % dw, i as u32 / dw);
            let (a, b) = (image.get_pixel(x, y).0, without.get_pixel(x, y).0);
            let diff = (0..3)
                .map(|c| (a[c] as i32 - b[c] as i32).abs())
                .max()
                .unwrap_or(0);
            self.visible[k] += usize::from(diff > 8);
            self.contrast[k] += diff as f64;
        }
        // widths: horizontal runs of each detail class in the unresampled
        // labels (poles are vertical, signs square), times s / 4
        for (k, &id) in DETAIL.iter().enumerate() {
            for row in scene.label_ids.rows() {
                let mut run = 0u32;
                for p in row.chain(std::iter::once(&Luma([ids::UNLABELED]))) {
                    if p[0] == id {
                        run += 1;
                    } else if run > 0 {
                        self.widths[k].push(run as f32 * s as f32 / 4.0);
                        run = 0;
                    }
                }
            }
        }
    }

    fn finish(mut self, at: Where) -> CueStats {
        let median = |v: &mut Vec<f32>| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            v.sort_by(f32::total_cmp);
            v[v.len() / 2] as f64
        };
        let context_cue_px = median(&mut self.dists);
        // sorted by `median`
        let q = |p: f64| -> f64 {
            if self.dists.is_empty() {
                return f64::NAN;
            }
            self.dists[((self.dists.len() - 1) as f64 * p).round() as usize] as f64
        };
        let context_cue_spread = [q(0.10), q(0.25), q(0.75), q(0.90)];
        let detail = DETAIL
            .iter()
            .enumerate()
            .map(|(k, &id)| DetailStats {
                class: CLASSES[label_to_train(id) as usize].name.to_string(),
                visible: self.visible[k] as f64 / self.seen[k].max(1) as f64,
                contrast: self.contrast[k] / self.seen[k].max(1) as f64,
                width_px: median(&mut self.widths[k]),
                pixels: self.seen[k],
            })
            .collect();
        CueStats {
            at,
            context_cue_px,
            context_cue_spread,
            detail,
        }
    }
}

/// Measures the benchmark's cues on `n` scenes per split: the context
/// classifier is fitted on training scenes and scored on validation
/// scenes; the cues are measured on validation scenes at each scale and
/// on training scenes resampled as `augment` resamples them (one random
/// scale per scene, drawn from `seed`).
pub fn stats(cfg: &SynthConfig, augment: &crate::config::AugmentConfig, n: usize) -> Stats {
    // (class 0 = vegetation / 1 = terrain, 7x7 patch features) on a grid.
    let samples = |s: &Scene| -> Vec<(usize, [f64; 6])> {
        let mut v = vec![];
        for y in (0..cfg.height).step_by(3) {
            for x in (0..cfg.width).step_by(3) {
                let k = match s.label_ids.get_pixel(x, y)[0] {
                    ids::VEGETATION => 0,
                    ids::TERRAIN => 1,
                    _ => continue,
                };
                // the patch must not touch the cue itself
                let d = s.cue_distance[(y * cfg.width + x) as usize];
                if d.is_nan() || d <= 5.0 {
                    continue;
                }
                if let Some(f) = patch_features(&s.image, x, y) {
                    v.push((k, f));
                }
            }
        }
        v
    };
    let mut sums = [[0f64; 6]; 2];
    let mut counts = [0usize; 2];
    let mut crops = CueAcc::default();
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5747);
    for i in 0..n {
        let scene = render(cfg, "train", i);
        for (k, f) in samples(&scene) {
            for (a, b) in sums[k].iter_mut().zip(f) {
                *a += b;
            }
            counts[k] += 1;
        }
        let s = rng.random_range(augment.scale_min..=augment.scale_max);
        let (img, _) = super::augment::scale(&scene.image, &scene.label_ids, s);
        let (without, _) = super::augment::scale(&scene.without_detail, &scene.label_ids, s);
        crops.add(&scene, &img, &without, s);
    }
    let means: Vec<[f64; 6]> = (0..2)
        .map(|k| sums[k].map(|v| v / counts[k].max(1) as f64))
        .collect();
    let (mut right, mut total) = (0usize, 0usize);
    let scales = [0.25, 0.5, 1.0, 2.0];
    let mut at_scale: Vec<CueAcc> = scales.iter().map(|_| CueAcc::default()).collect();
    for i in 0..n {
        let scene = render(cfg, "val", i);
        for (k, f) in samples(&scene) {
            let d = |m: &[f64; 6]| m.iter().zip(&f).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
            let guess = if d(&means[0]) <= d(&means[1]) { 0 } else { 1 };
            right += usize::from(guess == k);
            total += 1;
        }
        for (acc, &s) in at_scale.iter_mut().zip(&scales) {
            let (hs, ws) = hmsa_kernels::resize::scaled_size(cfg.height as usize, cfg.width as usize, s);
            let img = resize_torch(&scene.image, ws as u32, hs as u32);
            let without = resize_torch(&scene.without_detail, ws as u32, hs as u32);
            acc.add(&scene, &img, &without, s);
        }
    }
    let mut cues: Vec<CueStats> = at_scale
        .into_iter()
        .zip(scales)
        .map(|(acc, s)| acc.finish(Where::Val(s)))
        .collect();
    cues.push(crops.finish(Where::TrainCrops));
    Stats {
        local_accuracy: right as f64 / total.max(1) as f64,
        cues,
        scenes: n,
    }
}

/// The train ids the generator uses (for reports and sanity checks).
pub fn train_ids() -> Vec<u8> {
    [
        ids::ROAD,
        ids::SIDEWALK,
        ids::BUILDING,
        ids::POLE,
        ids::SIGN,
        ids::VEGETATION,
        ids::TERRAIN,
        ids::SKY,
        ids::PERSON,
        ids::CAR,
    ]
    .iter()
    .map(|&l| label_to_train(l))
    .collect()
}

/// Names of the generated classes, for messages.
pub fn class_names() -> Vec<&'static str> {
    train_ids().iter().map(|&t| CLASSES[t as usize].name).collect()
}

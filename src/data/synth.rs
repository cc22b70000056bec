//! The synthetic street-scene benchmark: deterministic from a seed, written
//! in the Cityscapes layout with real labelIds, and built so that the paper's
//! question (which scale is best for which pixel) has a real answer.
//!
//! - **Context-only classes.** `vegetation` and `terrain` are large ellipses
//!   filled with the *same* texture generator; only a 3-pixel ring at the
//!   ellipse's border (dark blue-green for vegetation, ochre for terrain)
//!   tells them apart. Interior pixels up to `blob_radius` away from the ring
//!   need a receptive field the small network only has at a lower scale.
//! - **Vanishing structures.** `pole` (5–8 px wide, one or two output
//!   pixels of the stride-4 network at 1.0x) and `traffic sign` (12–18 px
//!   squares) are drawn as ±A modulation of the background whose sign
//!   alternates every row (and every column for signs): the 2x2 averages a
//!   0.5x bilinear downscale takes cancel it exactly. Signs exist only at
//!   1.0x and above; poles keep a faint dark tint at 0.5x (where they are
//!   half an output pixel wide) and are resolved best at 2.0x. Distant
//!   `person`s are plain, 8–23 px tall.
//! - The rest (sky, buildings, sidewalk, road, cars) is easy scenery.
//!
//! `synth --stats` measures both properties (see [`stats`]).

use super::cityscapes::{label_to_train, CLASSES};
use crate::{Error, Result};
use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Generator options (sizes in pixels, counts per split).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    pub seed: u64,
    pub height: u32,
    pub width: u32,
    pub train: usize,
    pub val: usize,
    /// Images with coarse labels (gtCoarse) for auto-labelling.
    pub train_extra: usize,
    /// Images with no labels at all.
    pub unlabeled: usize,
    /// Largest semi-axis of the context-only ellipses.
    pub blob_radius: u32,
    /// Modulation amplitude of poles and signs.
    pub thin_amplitude: u8,
    /// Erosion (pixels) of coarse labels.
    pub coarse_erosion: u32,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            height: 256,
            width: 512,
            train: 120,
            val: 30,
            train_extra: 120,
            unlabeled: 0,
            blob_radius: 100,
            thin_amplitude: 70,
            coarse_erosion: 6,
        }
    }
}

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

/// Classes whose coarse labels are kept (large regions only, like gtCoarse).
const COARSE_CLASSES: [u8; 6] = [
    ids::ROAD,
    ids::SIDEWALK,
    ids::BUILDING,
    ids::VEGETATION,
    ids::TERRAIN,
    ids::SKY,
];

/// One rendered scene: the image, the same scene without the vanishing
/// structures, and the labelIds map.
pub struct Scene {
    pub image: RgbImage,
    pub without_thin: RgbImage,
    pub label_ids: GrayImage,
}

/// The dark grey poles are blended toward (40% of their colour).
const POLE_TINT: [f32; 3] = [45.0, 45.0, 55.0];

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
    let (w, h) = (cfg.width, cfg.height);
    let hf = h as f32;
    let mut img = RgbImage::new(w, h);
    let mut lab = GrayImage::from_pixel(w, h, Luma([ids::UNLABELED]));
    let horizon = (rng.random_range(0.30..0.42) * hf) as u32;
    let ground = (rng.random_range(0.55..0.65) * hf) as u32;
    let curb = ground + (rng.random_range(0.08..0.14) * hf) as u32;

    // Sky: a vertical gradient with faint noise (kept within [60, 200] so the
    // ± modulation of poles never clips).
    for y in 0..h {
        for x in 0..w {
            let t = y as f32 / hf;
            let n = rng.random_range(-3.0f32..3.0);
            img.put_pixel(
                x,
                y,
                Rgb([
                    clamp8(100.0 + 60.0 * t + n),
                    clamp8(140.0 + 40.0 * t + n),
                    clamp8(200.0 + n),
                ]),
            );
            lab.put_pixel(x, y, Luma([ids::SKY]));
        }
    }
    // Buildings: blocks with a skyline, a wall colour and a window grid.
    let mut x0 = 0u32;
    while x0 < w {
        let bw = rng.random_range(40..130).min(w - x0);
        let top = (rng.random_range(0.12..(horizon as f32 / hf).max(0.13)) * hf) as u32;
        let wall = [
            rng.random_range(90.0..150.0f32),
            rng.random_range(80.0..130.0),
            rng.random_range(70.0..120.0),
        ];
        let tex = Texture::new(&mut rng, wall, 8.0, 8.0, 4.0, w, h);
        let (wx, wy) = (rng.random_range(8..14u32), rng.random_range(10..16u32));
        for y in top..ground {
            for x in x0..x0 + bw {
                let win = (x - x0) % wx >= 2
                    && (x - x0) % wx < wx - 2
                    && (y - top) % wy >= 3
                    && (y - top) % wy < wy - 3;
                let mut p = tex.at(&mut rng, x, y);
                if win {
                    p = [
                        clamp8(p[0] as f32 * 0.6),
                        clamp8(p[1] as f32 * 0.65),
                        clamp8(p[2] as f32 * 0.8),
                    ];
                }
                img.put_pixel(x, y, Rgb(p));
                lab.put_pixel(x, y, Luma([ids::BUILDING]));
            }
        }
        x0 += bw;
    }
    // Ground: sidewalk band (tiles) then road (fine asphalt).
    let side = Texture::new(&mut rng, [150.0, 145.0, 140.0], 6.0, 6.0, 5.0, w, h);
    let road = Texture::new(&mut rng, [85.0, 85.0, 90.0], 12.0, 5.0, 7.0, w, h);
    for y in ground..h {
        for x in 0..w {
            let (p, id) = if y < curb {
                let mut p = side.at(&mut rng, x, y);
                if x.is_multiple_of(16) || (y - ground).is_multiple_of(12) {
                    p = [
                        clamp8(p[0] as f32 - 25.0),
                        clamp8(p[1] as f32 - 25.0),
                        clamp8(p[2] as f32 - 25.0),
                    ];
                }
                (p, ids::SIDEWALK)
            } else {
                (road.at(&mut rng, x, y), ids::ROAD)
            };
            img.put_pixel(x, y, Rgb(p));
            lab.put_pixel(x, y, Luma([id]));
        }
    }
    // Context-only ellipses: one texture law for both classes; only the ring differs.
    let blobs = rng.random_range(1..=3);
    for _ in 0..blobs {
        let rmax = cfg.blob_radius as f32;
        let rx = rng.random_range(0.5 * rmax..rmax);
        let ry = rng.random_range(0.35 * rmax..0.7 * rmax);
        let cx = rng.random_range(0.0..w as f32);
        let cy = rng.random_range(0.25 * hf..0.9 * hf);
        let veg = rng.random_bool(0.5);
        let (id, ring) = if veg {
            (ids::VEGETATION, [30u8, 70, 95])
        } else {
            (ids::TERRAIN, [205u8, 170, 60])
        };
        let tex = Texture::new(&mut rng, [95.0, 130.0, 70.0], 7.0, 22.0, 10.0, w, h);
        let (ya, yb) = ((cy - ry).max(0.0) as u32, ((cy + ry) as u32 + 1).min(h));
        let (xa, xb) = ((cx - rx).max(0.0) as u32, ((cx + rx) as u32 + 1).min(w));
        for y in ya..yb {
            for x in xa..xb {
                let (dx, dy) = ((x as f32 - cx) / rx, (y as f32 - cy) / ry);
                let r = (dx * dx + dy * dy).sqrt();
                if r > 1.0 {
                    continue;
                }
                // distance to the border in pixels, approximately
                let edge = (1.0 - r) * rx.min(ry);
                let p = if edge < 3.0 { ring } else { tex.at(&mut rng, x, y) };
                img.put_pixel(x, y, Rgb(p));
                lab.put_pixel(x, y, Luma([id]));
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
                let p = if glass { [60, 70, 80] } else { col };
                img.put_pixel(x, y, Rgb(p));
                lab.put_pixel(x, y, Luma([ids::CAR]));
            }
        }
    }
    // Distant people on the sidewalk: a few pixels, plain colours.
    for _ in 0..rng.random_range(3..=8) {
        let ph = rng.random_range(0.10 * hf..0.18 * hf).max(8.0) as u32;
        let pw = (ph * 2 / 5).max(4);
        let feet = rng.random_range(ground + 2..curb.max(ground + 3));
        let px0 = rng.random_range(0..w - pw);
        let shirt = [
            rng.random_range(150..255u8),
            rng.random_range(0..120u8),
            rng.random_range(0..120u8),
        ];
        for y in feet.saturating_sub(ph)..feet.min(h) {
            for x in px0..px0 + pw {
                let head = y < feet - ph * 4 / 5;
                img.put_pixel(x, y, Rgb(if head { [225, 180, 150] } else { shirt }));
                lab.put_pixel(x, y, Luma([ids::PERSON]));
            }
        }
    }
    let without_thin = img.clone();
    // Poles and signs: zero-mean ± modulation, sign flipping every row (and
    // column for signs), aligned to even coordinates so that the 2x2 averages
    // of a 0.5x downscale cancel it.
    let a = cfg.thin_amplitude as f32;
    // Each pixel is set from the scene without thin structures (overlaps
    // overwrite), poles first tinted toward dark grey (a faint cue that
    // survives downscaling, as a real pole's colour does; signs have none).
    // The amplitude is A, or less where a colour of the aligned 2x2 block is
    // within A of 0 or 255: one amplitude per block keeps the block's sum
    // exact (no clipping, no residue after the 2x2 averages).
    let base = |x: u32, y: u32, tint: bool| -> [f32; 3] {
        let p = without_thin.get_pixel(x, y).0.map(|c| c as f32);
        if tint {
            [0, 1, 2].map(|c| (0.6 * p[c] + 0.4 * POLE_TINT[c]).round())
        } else {
            p
        }
    };
    let modulate = |img: &mut RgbImage, lab: &mut GrayImage, x: u32, y: u32, sign: f32, id: u8| {
        let tint = id == ids::POLE;
        let (bx, by) = (x & !1, y & !1);
        let mut room = a;
        for yy in by..(by + 2).min(h) {
            for xx in bx..(bx + 2).min(w) {
                for c in base(xx, yy, tint) {
                    room = room.min(c).min(255.0 - c);
                }
            }
        }
        let p = base(x, y, tint);
        img.put_pixel(x, y, Rgb(p.map(|c| clamp8(c + sign * room))));
        lab.put_pixel(x, y, Luma([id]));
    };
    for _ in 0..rng.random_range(3..=7) {
        let pw = rng.random_range(5..=8u32);
        let x = rng.random_range(1..w - 8);
        let foot = rng.random_range(ground + 2..curb.max(ground + 3)) & !1;
        let ph = (rng.random_range(0.15 * hf..0.35 * hf) as u32) & !1;
        let top = foot.saturating_sub(ph) & !1;
        for y in top..foot {
            let s = if y % 2 == 0 { 1.0 } else { -1.0 };
            for dx in 0..pw {
                modulate(&mut img, &mut lab, x + dx, y, s, ids::POLE);
            }
        }
        if rng.random_bool(0.6) {
            let side = (rng.random_range(12..=18u32)) & !1;
            let sx = (x.saturating_sub(side / 2)) & !1;
            let sy = top.saturating_sub(side) & !1;
            for y in sy..sy + side {
                for xx in sx..(sx + side).min(w) {
                    let s = if (xx + y) % 2 == 0 { 1.0 } else { -1.0 };
                    modulate(&mut img, &mut lab, xx, y, s, ids::SIGN);
                }
            }
        }
    }
    Scene {
        image: img,
        without_thin,
        label_ids: lab,
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
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    f(&tmp).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
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
        let old = std::fs::read_to_string(&stamp).map_err(|e| Error::io(&stamp, e))?;
        if old != text {
            return Err(Error::Config {
                path: stamp,
                msg: "this folder holds a synthetic dataset made with other options; choose another folder"
                    .into(),
            });
        }
    } else {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    }
    let mut n = Written::default();
    let splits: [(&str, usize, Option<&str>); 4] = [
        ("train", cfg.train, Some("gtFine")),
        ("val", cfg.val, Some("gtFine")),
        ("train_extra", cfg.train_extra, Some("gtCoarse")),
        ("unlabeled", cfg.unlabeled, None),
    ];
    for (split, count, gt) in splits {
        for i in 0..count {
            let s = stem(i);
            let img_path = root.join(format!("leftImg8bit/{split}/synth/{s}_leftImg8bit.png"));
            let lab_path: Option<PathBuf> =
                gt.map(|g| root.join(format!("{g}/{split}/synth/{s}_{g}_labelIds.png")));
            let have_img = img_path.exists();
            let have_lab = lab_path.as_ref().is_none_or(|p| p.exists());
            if have_img && have_lab {
                continue;
            }
            let scene = render(cfg, split, i);
            if let Some(lp) = &lab_path {
                let lab = if gt == Some("gtCoarse") {
                    coarse(&scene.label_ids, cfg.coarse_erosion)
                } else {
                    scene.label_ids.clone()
                };
                save(lp, |p| lab.save_with_format(p, image::ImageFormat::Png))?;
                n.labels += 1;
            }
            // The image goes last: its presence marks the pair complete.
            save(&img_path, |p| {
                scene.image.save_with_format(p, image::ImageFormat::Png)
            })?;
            n.images += 1;
        }
    }
    let tmp = stamp.with_extension(format!("toml.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &stamp).map_err(|e| Error::io(&stamp, e))?;
    Ok(n)
}

/// The measured properties of the benchmark (see the module docs).
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Accuracy of a nearest-class-mean classifier on 7x7 patch features
    /// (mean and std of each channel) for vegetation vs terrain on held-out
    /// scenes; chance is 0.5.
    pub local_accuracy: f64,
    /// Per thin class (name, share of its pixels still visible after a 0.5x
    /// down and up round trip of the image, pixel count).
    pub survival: Vec<(String, f64, usize)>,
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

/// 0.5x then back up, bilinear with PyTorch's rule, per channel.
fn round_trip(img: &RgbImage) -> Vec<[f32; 3]> {
    use crate::model::resize::taps;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (hw, hh) = (w / 2, h / 2);
    let resample = |src: &dyn Fn(usize, usize) -> [f32; 3], sw: usize, sh: usize, dw: usize, dh: usize| {
        let (tx, ty) = (taps(sw, dw), taps(sh, dh));
        let mut out = vec![[0f32; 3]; dw * dh];
        for (oy, t) in ty.iter().enumerate() {
            for (ox, s) in tx.iter().enumerate() {
                let mut v = [0f32; 3];
                for (yy, wy) in [(t.i0, t.w0), (t.i1, t.w1)] {
                    for (xx, wx) in [(s.i0, s.w0), (s.i1, s.w1)] {
                        let p = src(xx, yy);
                        for c in 0..3 {
                            v[c] += p[c] * (wy * wx) as f32;
                        }
                    }
                }
                out[oy * dw + ox] = v;
            }
        }
        out
    };
    let at = |x: usize, y: usize| img.get_pixel(x as u32, y as u32).0.map(|c| c as f32);
    let small = resample(&at, w, h, hw, hh);
    let at_small = |x: usize, y: usize| small[y * hw + x];
    resample(&at_small, hw, hh, w, h)
}

/// Measures the benchmark's two properties on `n` scenes per split (train
/// scenes fit the classifier, val scenes score it).
pub fn stats(cfg: &SynthConfig, n: usize) -> Stats {
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
                if let Some(f) = patch_features(&s.image, x, y) {
                    v.push((k, f));
                }
            }
        }
        v
    };
    let mut sums = [[0f64; 6]; 2];
    let mut counts = [0usize; 2];
    for i in 0..n {
        for (k, f) in samples(&render(cfg, "train", i)) {
            for (a, b) in sums[k].iter_mut().zip(f) {
                *a += b;
            }
            counts[k] += 1;
        }
    }
    let means: Vec<[f64; 6]> = (0..2)
        .map(|k| sums[k].map(|v| v / counts[k].max(1) as f64))
        .collect();
    let (mut right, mut total) = (0usize, 0usize);
    let thin = [
        (ids::POLE, "pole"),
        (ids::SIGN, "traffic sign"),
        (ids::PERSON, "person"),
    ];
    let mut seen = [0usize; 3];
    let mut kept = [0usize; 3];
    for i in 0..n {
        let s = render(cfg, "val", i);
        for (k, f) in samples(&s) {
            let d = |m: &[f64; 6]| m.iter().zip(&f).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
            let guess = if d(&means[0]) <= d(&means[1]) { 0 } else { 1 };
            right += usize::from(guess == k);
            total += 1;
        }
        // Survival: the thin structure is visible after the round trip if the
        // image differs from the same round trip of the scene without it.
        let with = round_trip(&s.image);
        let without = round_trip(&s.without_thin);
        let w = cfg.width as usize;
        for (y, row) in s.label_ids.rows().enumerate() {
            for (x, p) in row.enumerate() {
                let Some(t) = thin.iter().position(|(id, _)| *id == p[0]) else {
                    continue;
                };
                seen[t] += 1;
                let i = y * w + x;
                let visible = if thin[t].0 == ids::PERSON {
                    // Persons are plain: one survives where the round trip
                    // stays closer to its own colour than to the background.
                    let orig = s.image.get_pixel(x as u32, y as u32).0.map(|c| c as f32);
                    let bg = background_of(&s, x, y);
                    let rt = with[i];
                    let to_orig: f32 = (0..3).map(|c| (rt[c] - orig[c]).powi(2)).sum();
                    let to_bg: f32 = (0..3).map(|c| (rt[c] - bg[c]).powi(2)).sum();
                    to_orig < to_bg
                } else {
                    (0..3).any(|c| (with[i][c] - without[i][c]).abs() > 8.0)
                };
                kept[t] += usize::from(visible);
            }
        }
    }
    Stats {
        local_accuracy: right as f64 / total.max(1) as f64,
        survival: thin
            .iter()
            .enumerate()
            .map(|(t, (_, name))| (name.to_string(), kept[t] as f64 / seen[t].max(1) as f64, seen[t]))
            .collect(),
        scenes: n,
    }
}

/// Mean colour of the nearest pixels left and right of (x, y) that are not
/// the same class: the local background of a small object.
fn background_of(s: &Scene, x: usize, y: usize) -> [f32; 3] {
    let id = s.label_ids.get_pixel(x as u32, y as u32)[0];
    let w = s.label_ids.width() as usize;
    let find = |dir: isize| -> Option<[f32; 3]> {
        let mut xx = x as isize;
        loop {
            xx += dir;
            if xx < 0 || xx as usize >= w {
                return None;
            }
            if s.label_ids.get_pixel(xx as u32, y as u32)[0] != id {
                return Some(s.image.get_pixel(xx as u32, y as u32).0.map(|c| c as f32));
            }
        }
    };
    match (find(-1), find(1)) {
        (Some(a), Some(b)) => [0, 1, 2].map(|c| (a[c] + b[c]) / 2.0),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => [0.0; 3],
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

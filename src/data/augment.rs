//! Training augmentation, as the official recipe: random scale (0.5–2.0),
//! crop (centred on a class centroid when the sampler says so; padded with
//! the mean colour and the ignore label), horizontal flip, colour jitter
//! (brightness, contrast, saturation, hue), gaussian blur, ImageNet
//! normalisation. Every draw comes from the `StdRng` it is handed, so a batch
//! is a function of its seed.

use super::image::{MEAN, STD};
use super::IGNORE;
use crate::config::AugmentConfig;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::Rng;

/// Mean colour used for padding: normalises to zero.
fn pad_color() -> Rgb<u8> {
    Rgb(MEAN.map(|m| (m * 255.0).round() as u8))
}

/// Scales image (bilinear) and label (nearest) by `s`.
pub fn scale(img: &RgbImage, label: &GrayImage, s: f64) -> (RgbImage, GrayImage) {
    let (w, h) = img.dimensions();
    let nw = ((w as f64 * s).round() as u32).max(1);
    let nh = ((h as f64 * s).round() as u32).max(1);
    if (nw, nh) == (w, h) {
        return (img.clone(), label.clone());
    }
    (
        imageops::resize(img, nw, nh, FilterType::Triangle),
        imageops::resize(label, nw, nh, FilterType::Nearest),
    )
}

/// Crops a (ch, cw) window whose top-left corner is (x0, y0) (may be
/// negative or run past the edge: padding fills the rest).
pub fn crop_at(
    img: &RgbImage,
    label: &GrayImage,
    x0: i64,
    y0: i64,
    ch: u32,
    cw: u32,
) -> (RgbImage, GrayImage) {
    let mut oi = RgbImage::from_pixel(cw, ch, pad_color());
    let mut ol = GrayImage::from_pixel(cw, ch, Luma([IGNORE]));
    let (w, h) = img.dimensions();
    for y in 0..ch {
        let sy = y0 + y as i64;
        if sy < 0 || sy >= h as i64 {
            continue;
        }
        for x in 0..cw {
            let sx = x0 + x as i64;
            if sx < 0 || sx >= w as i64 {
                continue;
            }
            oi.put_pixel(x, y, *img.get_pixel(sx as u32, sy as u32));
            ol.put_pixel(x, y, *label.get_pixel(sx as u32, sy as u32));
        }
    }
    (oi, ol)
}

/// A window origin for a crop of size `c` in a side of size `n`: uniform
/// when it fits, centred padding when it does not.
fn random_origin(rng: &mut StdRng, n: u32, c: u32) -> i64 {
    if n >= c {
        rng.random_range(0..=(n - c)) as i64
    } else {
        -(((c - n) / 2) as i64)
    }
}

/// An origin that puts `p` inside the window, as close to its centre as the
/// image allows (the official class-uniform crop).
fn centred_origin(n: u32, c: u32, p: u32) -> i64 {
    if n <= c {
        return -(((c - n) / 2) as i64);
    }
    (p as i64 - c as i64 / 2).clamp(0, (n - c) as i64)
}

/// Brightness, contrast, saturation and hue jitter, in that order.
///
/// Each step is affine in RGB (brightness scales; contrast and saturation
/// blend with a grey level; hue rotates the chroma plane of YIQ) and only
/// the result is clamped, so the four compose into one 3x3 matrix and an
/// offset, applied once per pixel.
pub fn color_jitter(img: &mut RgbImage, j: f64, rng: &mut StdRng) {
    if j <= 0.0 {
        return;
    }
    let (a, t) = jitter_map(img, j, rng);
    for p in img.pixels_mut() {
        let v = p.0.map(f32::from);
        p.0 = std::array::from_fn(|r| {
            let x = a[r][0] * v[0] + a[r][1] * v[1] + a[r][2] * v[2] + t[r];
            x.round().clamp(0.0, 255.0) as u8
        });
    }
}

/// ITU-R 601 luma weights.
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

/// The jitter's draws on `img` as one affine map `v -> a·v + t`.
fn jitter_map(img: &RgbImage, j: f64, rng: &mut StdRng) -> ([[f32; 3]; 3], [f32; 3]) {
    let b = rng.random_range(1.0 - j..=1.0 + j) as f32;
    let c = rng.random_range(1.0 - j..=1.0 + j) as f32;
    let s = rng.random_range(1.0 - j..=1.0 + j) as f32;
    let hue = rng.random_range(-j / 2.0..=j / 2.0) as f32 * std::f32::consts::TAU;
    let n = (img.width() * img.height()) as f32;
    let luma = |p: &Rgb<u8>| (0..3).map(|k| LUMA[k] * p[k] as f32).sum::<f32>();
    // contrast blends with the mean grey of the brightened image
    let mean_grey = img.pixels().map(luma).sum::<f32>() / n * b;
    let (ch, sh) = (hue.cos(), hue.sin());
    // saturation: s·v + (1 − s)·luma(v) on every channel
    let sat: [[f32; 3]; 3] =
        std::array::from_fn(|r| std::array::from_fn(|k| (1.0 - s) * LUMA[k] + if r == k { s } else { 0.0 }));
    // hue: RGB -> YIQ, rotate (I, Q), back
    let yiq = [LUMA, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]];
    let rot = [[1.0, 0.0, 0.0], [0.0, ch, -sh], [0.0, sh, ch]];
    let rgb = [[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.106, 1.703]];
    let mul = |x: &[[f32; 3]; 3], y: &[[f32; 3]; 3]| -> [[f32; 3]; 3] {
        std::array::from_fn(|r| std::array::from_fn(|k| (0..3).map(|i| x[r][i] * y[i][k]).sum()))
    };
    let hs = mul(&mul(&mul(&rgb, &rot), &yiq), &sat);
    // brightness then contrast: c·b·v + (1 − c)·mean_grey
    let a = hs.map(|row| row.map(|x| x * c * b));
    let t = hs.map(|row| row.iter().sum::<f32>() * (1.0 - c) * mean_grey);
    (a, t)
}

/// One training crop. `centre` is a class centroid in the unscaled image.
pub fn augment(
    img: &RgbImage,
    label: &GrayImage,
    cfg: &AugmentConfig,
    centre: Option<(u32, u32)>,
    rng: &mut StdRng,
) -> (RgbImage, GrayImage) {
    let s = rng.random_range(cfg.scale_min..=cfg.scale_max);
    let (si, sl) = scale(img, label, s);
    let [ch, cw] = cfg.crop;
    let (w, h) = si.dimensions();
    let (x0, y0) = match centre {
        Some((cx, cy)) => {
            let (px, py) = ((cx as f64 * s) as u32, (cy as f64 * s) as u32);
            (
                centred_origin(w, cw, px.min(w - 1)),
                centred_origin(h, ch, py.min(h - 1)),
            )
        }
        None => (random_origin(rng, w, cw), random_origin(rng, h, ch)),
    };
    let (mut ci, mut cl) = crop_at(&si, &sl, x0, y0, ch, cw);
    if cfg.flip && rng.random_bool(0.5) {
        imageops::flip_horizontal_in_place(&mut ci);
        imageops::flip_horizontal_in_place(&mut cl);
    }
    color_jitter(&mut ci, cfg.color_jitter, rng);
    if rng.random_bool(cfg.blur) {
        let sigma = rng.random_range(0.15..=1.3f32);
        ci = imageops::blur(&ci, sigma);
    }
    (ci, cl)
}

/// Stacks images and train-id maps of one size into (B, 3, H, W) f32
/// (normalised) and (B, H, W) u32 tensors.
pub fn to_tensors(items: &[(RgbImage, GrayImage)], device: &Device) -> Result<(Tensor, Tensor)> {
    let (w, h) = items[0].0.dimensions();
    let (w, h) = (w as usize, h as usize);
    let plane = h * w;
    let mut x = vec![0f32; items.len() * 3 * plane];
    let mut y = vec![0u32; items.len() * plane];
    for (b, (img, lab)) in items.iter().enumerate() {
        if img.dimensions() != (w as u32, h as u32) || lab.dimensions() != (w as u32, h as u32) {
            return Err(Error::invalid("batch", "images of one batch must share a size"));
        }
        let xo = &mut x[b * 3 * plane..(b + 1) * 3 * plane];
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                xo[c * plane + i] = (p[c] as f32 / 255.0 - MEAN[c]) / STD[c];
            }
        }
        for (o, p) in y[b * plane..(b + 1) * plane].iter_mut().zip(lab.pixels()) {
            *o = p[0] as u32;
        }
    }
    Ok((
        Tensor::from_vec(x, (items.len(), 3, h, w), device)?,
        Tensor::from_vec(y, (items.len(), h, w), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// An image whose colour encodes its label: label k -> grey value 20·k.
    fn pattern(w: u32, h: u32) -> (RgbImage, GrayImage) {
        let lab = GrayImage::from_fn(w, h, |x, y| Luma([((x / 23 + 3 * (y / 17)) % 10) as u8]));
        let img = RgbImage::from_fn(w, h, |x, y| {
            let v = lab.get_pixel(x, y)[0] * 20;
            Rgb([v, v, v])
        });
        (img, lab)
    }

    #[test]
    fn geometry_keeps_image_and_label_aligned() {
        // No photometric change: every non-padded pixel's colour must still
        // encode its label (nearest-neighbour label vs bilinear image agree
        // away from edges between label regions).
        let (img, lab) = pattern(96, 64);
        let cfg = AugmentConfig {
            crop: [64, 96],
            blur: 0.0,
            color_jitter: 0.0,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(3);
        for trial in 0..20 {
            let centre = if trial % 2 == 0 { Some((40, 30)) } else { None };
            let (ci, cl) = augment(&img, &lab, &cfg, centre, &mut rng);
            assert_eq!(ci.dimensions(), (96, 64));
            let (mut agree, mut total) = (0, 0);
            for (p, l) in ci.pixels().zip(cl.pixels()) {
                if l[0] == IGNORE {
                    assert_eq!(p.0, pad_color().0, "padding must carry the pad colour");
                    continue;
                }
                total += 1;
                agree += usize::from((p[0] as i32 - 20 * l[0] as i32).abs() <= 2);
            }
            assert!(total > 0);
            assert!(
                agree as f64 / total as f64 > 0.75,
                "trial {trial}: {agree}/{total}"
            );
        }
    }

    #[test]
    fn flip_mirrors_both_and_centred_crops_contain_the_centre() {
        // Flip: at scale 1 with a crop of the whole image and no photometric
        // change, every crop is the image or its mirror, image and label
        // alike, and both happen (a fair coin: 20 draws).
        let (img, lab) = pattern(64, 32);
        let cfg = AugmentConfig {
            crop: [32, 64],
            scale_min: 1.0,
            scale_max: 1.0,
            flip: true,
            blur: 0.0,
            color_jitter: 0.0,
        };
        let (mut plain, mut mirrored) = (0, 0);
        for seed in 0..20 {
            let (ci, cl) = augment(&img, &lab, &cfg, None, &mut StdRng::seed_from_u64(seed));
            if cl.as_raw() == lab.as_raw() {
                assert_eq!(
                    ci.as_raw(),
                    img.as_raw(),
                    "seed {seed}: label kept, image changed"
                );
                plain += 1;
            } else {
                for (x, y, l) in cl.enumerate_pixels() {
                    assert_eq!(l, lab.get_pixel(63 - x, y), "seed {seed}: label at ({x}, {y})");
                    assert_eq!(
                        ci.get_pixel(x, y),
                        img.get_pixel(63 - x, y),
                        "seed {seed}: image at ({x}, {y})"
                    );
                }
                mirrored += 1;
            }
        }
        assert!(plain > 0 && mirrored > 0, "{plain} plain, {mirrored} mirrored");
        // Crops: padding is ignore, the content is shifted by the origin.
        let (ci, cl) = crop_at(&img, &lab, -8, 4, 32, 32);
        assert_eq!(cl.get_pixel(0, 0)[0], IGNORE);
        assert_eq!(cl.get_pixel(8, 0)[0], lab.get_pixel(0, 4)[0]);
        assert_eq!(ci.get_pixel(8, 0), img.get_pixel(0, 4));
        assert_eq!(centred_origin(100, 40, 90), 60);
        assert_eq!(centred_origin(100, 40, 5), 0);
        assert_eq!(centred_origin(100, 40, 50), 30);
        assert_eq!(centred_origin(30, 40, 5), -5);
    }

    #[test]
    fn same_seed_same_crop() {
        let (img, lab) = pattern(80, 64);
        let cfg = AugmentConfig {
            crop: [32, 64],
            ..Default::default()
        };
        let a = augment(&img, &lab, &cfg, None, &mut StdRng::seed_from_u64(9));
        let b = augment(&img, &lab, &cfg, None, &mut StdRng::seed_from_u64(9));
        let c = augment(&img, &lab, &cfg, None, &mut StdRng::seed_from_u64(10));
        assert_eq!(a.0.as_raw(), b.0.as_raw());
        assert_eq!(a.1.as_raw(), b.1.as_raw());
        assert_ne!(a.0.as_raw(), c.0.as_raw());
    }

    /// The composed map against the four steps applied one after another
    /// (in f64, from the same draws): brightness, contrast around the mean
    /// grey, saturation around each pixel's grey, hue as a rotation in YIQ.
    #[test]
    fn jitter_equals_its_four_steps_in_turn() {
        let mut img = RgbImage::from_fn(13, 7, |x, y| {
            Rgb([
                (x * 19 + y * 7) as u8,
                (x * 3 + y * 31) as u8,
                (200 - x * 9) as u8,
            ])
        });
        img.put_pixel(0, 0, Rgb([255, 255, 255]));
        img.put_pixel(1, 0, Rgb([0, 0, 0]));
        for seed in 0..20 {
            let j = 0.45;
            let mut rng = StdRng::seed_from_u64(seed);
            let b = rng.random_range(1.0 - j..=1.0 + j) as f32 as f64;
            let c = rng.random_range(1.0 - j..=1.0 + j) as f32 as f64;
            let s = rng.random_range(1.0 - j..=1.0 + j) as f32 as f64;
            let hue = (rng.random_range(-j / 2.0..=j / 2.0) as f32 * std::f32::consts::TAU) as f64;
            let grey = |v: [f64; 3]| 0.299 * v[0] + 0.587 * v[1] + 0.114 * v[2];
            let pixels: Vec<[f64; 3]> = img.pixels().map(|p| p.0.map(f64::from)).collect();
            let mean = pixels.iter().map(|v| grey(v.map(|x| x * b))).sum::<f64>() / pixels.len() as f64;
            let want: Vec<[f64; 3]> = pixels
                .iter()
                .map(|v| {
                    let v = v.map(|x| x * b);
                    let v = v.map(|x| (x - mean) * c + mean);
                    let g = grey(v);
                    let v = v.map(|x| (x - g) * s + g);
                    let (y, i, q) = (
                        grey(v),
                        0.596 * v[0] - 0.274 * v[1] - 0.322 * v[2],
                        0.211 * v[0] - 0.523 * v[1] + 0.312 * v[2],
                    );
                    let (i, q) = (i * hue.cos() - q * hue.sin(), i * hue.sin() + q * hue.cos());
                    [
                        y + 0.956 * i + 0.621 * q,
                        y - 0.272 * i - 0.647 * q,
                        y - 1.106 * i + 1.703 * q,
                    ]
                    .map(|x| x.clamp(0.0, 255.0))
                })
                .collect();
            let mut got = img.clone();
            color_jitter(&mut got, j, &mut StdRng::seed_from_u64(seed));
            for (p, w) in got.pixels().zip(&want) {
                for k in 0..3 {
                    // rounding to u8: within half a level, plus f32 slack
                    assert!(
                        (p[k] as f64 - w[k]).abs() <= 0.5 + 1e-3,
                        "seed {seed}: {:?} vs {w:?}",
                        p.0
                    );
                }
            }
        }
    }

    #[test]
    fn jitter_with_zero_strength_is_identity_and_tensors_are_normalised() {
        let (mut img, lab) = pattern(8, 4);
        let before = img.clone();
        color_jitter(&mut img, 0.0, &mut StdRng::seed_from_u64(1));
        assert_eq!(img, before);
        let (x, y) = to_tensors(&[(img.clone(), lab.clone())], &Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[1, 3, 4, 8]);
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let want = (img.get_pixel(0, 0)[0] as f32 / 255.0 - MEAN[0]) / STD[0];
        assert!((v[0] - want).abs() < 1e-6);
        let l: Vec<u32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(l[9], lab.get_pixel(1, 1)[0] as u32);
        assert!(AugmentConfig {
            crop: [0, 64],
            ..Default::default()
        }
        .validate("data.augment")
        .is_err());
    }
}

//! Images in and out: RGB files to ImageNet-normalised (1, 3, H, W) tensors,
//! class maps to labelIds and colour PNGs, [0, 1] maps to grey PNGs.

use super::cityscapes::{train_color, train_to_label};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// ImageNet statistics used by the official code.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

fn image_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Reads a PNG or JPEG as RGB.
pub fn read_rgb(path: &Path) -> Result<::image::RgbImage> {
    if !path.exists() {
        return Err(image_err(path, "no such file"));
    }
    let img = ::image::ImageReader::open(path)
        .map_err(|e| Error::io("opening", path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io("reading", path, e))?
        .decode()
        .map_err(|e| image_err(path, e))?;
    Ok(img.to_rgb8())
}

/// RGB bytes -> (1, 3, H, W) f32, `(v/255 − mean) / std`.
pub fn normalize(img: &::image::RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = (p[c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), device)?)
}

/// Saves an image whole (`crate::atomic`: a temporary name, then a
/// rename), its format from `path`'s extension.
fn save_whole(path: &Path, save: impl FnOnce(&Path) -> ::image::ImageResult<()>) -> Result<()> {
    crate::atomic::write_with(path, |tmp| save(tmp).map_err(|e| image_err(path, e)))
}

/// Writes an (H, W) train-id map as an official labelIds PNG (8-bit grey).
pub fn write_label_ids(path: &Path, classes: &[u8], h: usize, w: usize) -> Result<()> {
    let ids: Vec<u8> = classes.iter().map(|&t| train_to_label(t)).collect();
    let img = ::image::GrayImage::from_raw(w as u32, h as u32, ids)
        .ok_or_else(|| image_err(path, "label buffer does not match its size"))?;
    save_whole(path, |p| img.save(p))
}

/// Writes an (H, W) train-id map with the Cityscapes colours.
pub fn write_color(path: &Path, classes: &[u8], h: usize, w: usize) -> Result<()> {
    let rgb: Vec<u8> = classes.iter().flat_map(|&t| train_color(t)).collect();
    let img = ::image::RgbImage::from_raw(w as u32, h as u32, rgb)
        .ok_or_else(|| image_err(path, "colour buffer does not match its size"))?;
    save_whole(path, |p| img.save(p))
}

/// Writes an (H, W) map of values in [0, 1] as grey (1 -> white).
pub fn write_unit_map(path: &Path, values: &[f32], h: usize, w: usize) -> Result<()> {
    let g: Vec<u8> = values
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    let img = ::image::GrayImage::from_raw(w as u32, h as u32, g)
        .ok_or_else(|| image_err(path, "map buffer does not match its size"))?;
    save_whole(path, |p| img.save(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_ids_png_round_trip_uses_official_ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x_labelIds.png");
        // train ids: road, car, ignore, sky
        write_label_ids(&p, &[0, 13, 255, 10], 2, 2).unwrap();
        let back = ::image::open(&p).unwrap().to_luma8();
        assert_eq!(back.into_raw(), vec![7, 26, 0, 23]);
    }

    #[test]
    fn normalisation_uses_imagenet_statistics() {
        let img = ::image::RgbImage::from_raw(1, 1, vec![255, 0, 128]).unwrap();
        let t = normalize(&img, &Device::Cpu).unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let want = [
            (1.0 - 0.485) / 0.229,
            (0.0 - 0.456) / 0.224,
            (128.0 / 255.0 - 0.406) / 0.225,
        ];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn corrupt_and_missing_images_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.png");
        std::fs::write(&p, b"not a png").unwrap();
        let e = read_rgb(&p).unwrap_err().to_string();
        assert!(e.contains("bad.png"), "{e}");
        let e = read_rgb(&dir.path().join("gone.png")).unwrap_err().to_string();
        assert!(e.contains("gone.png") && e.contains("no such file"), "{e}");
    }
}

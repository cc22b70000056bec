//! `hmsa-lab infer`: run a network over images or tensors with a scale set, a
//! fusion and optional flip; write colour and labelIds PNGs, one attention map
//! per scale, and optionally the raw tensors as safetensors.

use crate::data::image::{normalize, read_rgb, write_color, write_label_ids, write_unit_map};
use crate::model::scales::format_scale;
use crate::model::{Fusion, HmsaNet, Scales};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What to run and where to write it.
#[derive(Debug, Clone)]
pub struct InferOptions {
    pub scales: Scales,
    pub fusion: Fusion,
    pub flip: bool,
    pub out_dir: PathBuf,
    /// Raw tensors go here (one file per image when there are several).
    pub dump: Option<PathBuf>,
}

/// One image to segment, already normalised: (1, 3, H, W).
pub struct InputImage {
    pub name: String,
    pub tensor: Tensor,
}

/// Reads an input: an image file, or a `.safetensors` whose `image` tensor is
/// (N, 3, H, W) and already normalised (one entry per batch item).
pub fn read_inputs(path: &Path, device: &Device) -> Result<Vec<InputImage>> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("input")
        .to_string();
    if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        let bad = |msg: String| Error::Input {
            path: path.to_path_buf(),
            msg,
        };
        if !path.exists() {
            return Err(bad("no such file".into()));
        }
        let mut map = candle_core::safetensors::load(path, device).map_err(|e| bad(e.to_string()))?;
        let t = map
            .remove("image")
            .ok_or_else(|| bad("no tensor named `image` in the file".into()))?;
        let dims = t.dims().to_vec();
        if dims.len() != 4 || dims[1] != 3 {
            return Err(bad(format!("`image` must be N x 3 x H x W, got shape {dims:?}")));
        }
        if !matches!(t.dtype(), DType::F32 | DType::F64 | DType::F16 | DType::BF16) {
            return Err(bad(format!(
                "`image` holds {:?} values; the network reads normalised floating-point images (f32, f64, f16 or bf16)",
                t.dtype()
            )));
        }
        let t = t.to_dtype(DType::F32)?;
        let bad_values = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .filter(|v| !v.is_finite())
            .count();
        if bad_values > 0 {
            return Err(bad(format!(
                "`image` holds {bad_values} NaN or infinite value(s)"
            )));
        }
        let n = dims[0];
        return (0..n)
            .map(|i| {
                Ok(InputImage {
                    name: if n == 1 {
                        stem.clone()
                    } else {
                        format!("{stem}_{i}")
                    },
                    tensor: t.narrow(0, i, 1)?,
                })
            })
            .collect();
    }
    let img = read_rgb(path)?;
    Ok(vec![InputImage {
        name: stem,
        tensor: normalize(&img, device)?,
    }])
}

/// Segments one image and writes its outputs; returns the files written.
pub fn infer_one(
    net: &HmsaNet,
    input: &InputImage,
    opts: &InferOptions,
    dump: Option<&Path>,
) -> Result<Vec<PathBuf>> {
    let (fused, outs) = net.infer(&input.tensor, opts.fusion, &opts.scales, opts.flip, false)?;
    let (_, _, h, w) = fused.pred.dims4()?;
    let classes: Vec<u8> = fused
        .pred
        .argmax(1)?
        .flatten_all()?
        .to_dtype(DType::U8)?
        .to_vec1()?;
    let mut written = vec![];
    let out = |suffix: &str| opts.out_dir.join(format!("{}_{suffix}.png", input.name));
    let p = out("color");
    write_color(&p, &classes, h, w)?;
    written.push(p);
    let p = out("labelIds");
    write_label_ids(&p, &classes, h, w)?;
    written.push(p);
    for (s, a) in &fused.attn {
        let (_, _, ah, aw) = a.dims4()?;
        let v: Vec<f32> = a.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let p = out(&format!("attn_{}", format_scale(*s)));
        write_unit_map(&p, &v, ah, aw)?;
        written.push(p);
    }
    if let Some(d) = dump {
        let mut m: HashMap<String, Tensor> = HashMap::new();
        m.insert("pred".into(), fused.pred.clone());
        for o in &outs {
            m.insert(format!("pred_{}", format_scale(o.scale)), o.pred()?);
            m.insert(format!("aux_{}", format_scale(o.scale)), o.aux_pred()?);
        }
        for (s, a) in &fused.attn {
            m.insert(format!("attn_{}", format_scale(*s)), a.clone());
        }
        candle_core::safetensors::save(&m, d).map_err(|e| Error::Input {
            path: d.to_path_buf(),
            msg: e.to_string(),
        })?;
        written.push(d.to_path_buf());
    }
    Ok(written)
}

/// Runs every input; per-image dump files are named after the inputs when
/// there are several.
pub fn infer_all(net: &HmsaNet, inputs: &[InputImage], opts: &InferOptions) -> Result<Vec<PathBuf>> {
    opts.fusion.check_scales(&opts.scales, "--scales")?;
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io("creating", &opts.out_dir, e))?;
    let mut all = vec![];
    for input in inputs {
        let dump = opts.dump.as_ref().map(|d| {
            if inputs.len() == 1 {
                d.clone()
            } else {
                let stem = d.file_stem().and_then(|s| s.to_str()).unwrap_or("dump");
                d.with_file_name(format!("{stem}_{}.safetensors", input.name))
            }
        });
        tracing::info!(image = %input.name, "segmenting");
        all.extend(infer_one(net, input, opts, dump.as_deref())?);
    }
    Ok(all)
}

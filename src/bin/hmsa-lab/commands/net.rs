//! The network outside the lab: `infer`, `model`, `eval` (scoring a
//! folder of predictions) and `autolabel`.

use crate::cli::{AutolabelArgs, EvalArgs, InferArgs, ModelArgs, TextOrJson};
use crate::output::{out, outln};
use crate::process::device;
use anyhow::{Context, Result};
use hmsa_lab::data::{Dataset, Labels};
use hmsa_lab::eval::infer::{infer_all, read_inputs, InferOptions};
use hmsa_lab::model::{checkpoint, flops};

pub fn infer(a: InferArgs) -> Result<()> {
    let cfg = a.net.resolve()?;
    let dev = device()?;
    let net = checkpoint::load(&cfg, &a.checkpoint, &dev)?;
    let opts = InferOptions {
        scales: a.scales.unwrap_or_else(|| cfg.scales.clone()),
        fusion: a.fusion.unwrap_or(cfg.fusion),
        flip: a.flip,
        out_dir: a.out,
        dump: a.dump,
    };
    let mut inputs = vec![];
    for p in &a.inputs {
        inputs.extend(read_inputs(p, &dev)?);
    }
    for p in infer_all(&net, &inputs, &opts)? {
        outln!("{}", p.display())?;
    }
    Ok(())
}

pub fn model(a: ModelArgs) -> Result<()> {
    let cfg = a.net.resolve()?;
    let (h, w) = parse_size(&a.size)?;
    let listing = checkpoint::state_dict_listing(&cfg)?;
    for (name, shape) in &listing {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        if dims.is_empty() {
            outln!("{name}")?;
        } else {
            outln!("{name} {}", dims.join(","))?;
        }
    }
    let params = checkpoint::parameter_count(&listing);
    let f = flops::count(&cfg, h, w)?;
    outln!("parameters: {params}")?;
    outln!(
        "GFLOPs at {h}x{w}: {:.1} per forward at 1.0x; {:.1} for {} fusion on {}",
        f.single as f64 / 1e9,
        f.fused as f64 / 1e9,
        cfg.fusion,
        cfg.scales
    )?;
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let (m, n) = hmsa_lab::eval::folder::score_folders(&a.pred_dir, &a.gt_dir)?;
    let names: Vec<&str> = hmsa_lab::data::cityscapes::CLASSES
        .iter()
        .map(|c| c.name)
        .collect();
    match a.format {
        TextOrJson::Json => {
            let per: serde_json::Map<String, serde_json::Value> = names
                .iter()
                .zip(&m.iou)
                .map(|(n, v)| (n.to_string(), v.map_or(serde_json::Value::Null, |v| v.into())))
                .collect();
            let out = serde_json::json!({"miou": m.miou, "images": n, "pixel_acc": m.pixel_acc, "iou": per});
            outln!("{}", serde_json::to_string_pretty(&out)?)?;
        }
        TextOrJson::Table => {
            let mut t = comfy_table::Table::new();
            t.set_header(vec!["class", "IoU"]);
            for (name, v) in names.iter().zip(&m.iou) {
                t.add_row(vec![
                    name.to_string(),
                    v.map_or("-".into(), |v| format!("{:.4}", v)),
                ]);
            }
            outln!(
                "{t}\nmIoU {:.4} over {n} images (pixel accuracy {:.4})",
                m.miou,
                m.pixel_acc
            )?;
        }
    }
    Ok(())
}

pub fn autolabel(a: AutolabelArgs) -> Result<()> {
    let cfg = a.net.resolve()?;
    let dev = device()?;
    let net = checkpoint::load(&cfg, &a.checkpoint, &dev)?;
    let ds = Dataset::open(&a.data, &a.split, Labels::None)?;
    let scales = a.scales.unwrap_or_else(|| cfg.scales.clone());
    let fusion = a.fusion.unwrap_or(cfg.fusion);
    let truth = hmsa_lab::autolabel::truth_of(&a.data, &a.split)?;
    let s = hmsa_lab::autolabel::autolabel(
        &net,
        &ds,
        truth.as_ref(),
        &scales,
        fusion,
        a.threshold,
        &a.out,
        &dev,
    )?;
    let total = (s.kept.iter().sum::<u64>() + s.dropped).max(1) as f64;
    outln!("{} images labelled into {}", s.images, a.out.display())?;
    if truth.is_some() {
        outln!(
            "  (scored against gtFine/{}: precision of the kept labels, share of the truth kept right)",
            a.split
        )?;
    }
    let pct = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{:.1}%", 100.0 * v));
    for ((c, k), (precision, right)) in hmsa_lab::data::cityscapes::CLASSES
        .iter()
        .zip(&s.kept)
        .zip(s.quality())
    {
        if *k > 0 || right.is_some() {
            out!("  {:<14} {:>6.2}% of pixels", c.name, 100.0 * *k as f64 / total)?;
            if truth.is_some() {
                out!(", precision {}, truth kept right {}", pct(precision), pct(right))?;
            }
            outln!()?;
        }
    }
    outln!(
        "  {:<14} {:>6.2}% of pixels (below {})",
        "ignored",
        100.0 * s.dropped as f64 / total,
        a.threshold
    )?;
    Ok(())
}

/// `HxW`, each side 1 to 65536 pixels.
pub fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (h, w) = s
        .split_once('x')
        .with_context(|| format!("--size `{s}`: expected HxW, e.g. 1024x2048"))?;
    let side = |v: &str, what: &str| -> Result<usize> {
        v.trim()
            .parse()
            .ok()
            .filter(|n| (1..=65_536).contains(n))
            .with_context(|| format!("--size `{s}`: the {what} must be 1 to 65536 pixels"))
    };
    Ok((side(h, "height")?, side(w, "width")?))
}

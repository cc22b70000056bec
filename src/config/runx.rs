//! `hmsa-lab import-runx`: an official runx recipe (NVIDIA/semantic-
//! segmentation `scripts/*.yml`: a `CMD` and an `HPARAMS` list of flag
//! maps) as an hmsa-lab suite. Each known flag maps to our config (the
//! table below says where); a flag whose value is a list is a runx sweep
//! and becomes a suite sweep axis; a flag we do not know, or know but do
//! not implement, is refused by name.

use crate::model::ModelConfig;
use crate::{Error, Result};
use std::path::Path;
use toml::{Table, Value};

/// Flags that change nothing for us: distributed and mixed-precision
/// plumbing on one device, logging, the cross-validation fold 0 (the
/// standard split).
const IGNORED: [&str; 7] = [
    "syncbn",
    "apex",
    "result_dir",
    "RUNX.TAG",
    "cv",
    "lr_schedule",
    "optimizer",
];

/// Flags of the official trainer we know but do not implement.
const UNSUPPORTED: [(&str, &str); 5] = [
    ("max_cu_epoch", "class-uniform sampling for only the first epochs"),
    (
        "custom_coarse_dropout_classes",
        "dropping coarse labels of some classes",
    ),
    (
        "mask_out_cityscapes",
        "masking Cityscapes pixels out of coarse labels",
    ),
    ("custom_coarse_prob", "a probability of drawing a coarse image"),
    ("jointwtborder", "the joint edge-weighted loss"),
];

fn err(path: &Path, msg: String) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg,
    }
}

/// Sets `key.path` in `t`, creating the tables on the way.
fn set(t: &mut Table, key: &str, v: Value) {
    let mut cur = t;
    let parts: Vec<&str> = key.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .expect("a table");
    }
    cur.insert(parts[parts.len() - 1].to_string(), v);
}

fn yaml_to_toml(v: &serde_yaml_ng::Value) -> Option<Value> {
    use serde_yaml_ng::Value as Y;
    Some(match v {
        Y::Bool(b) => Value::Boolean(*b),
        Y::Number(n) => n
            .as_i64()
            .map(Value::Integer)
            .or_else(|| n.as_f64().map(Value::Float))?,
        Y::String(s) => Value::String(s.clone()),
        Y::Sequence(xs) => Value::Array(xs.iter().map(yaml_to_toml).collect::<Option<_>>()?),
        _ => return None,
    })
}

fn floats(s: &str) -> Option<Vec<f64>> {
    s.split(',').map(|x| x.trim().parse().ok()).collect()
}

/// Our (key, value) settings for one official flag, or why it is refused.
fn map_flag(flag: &str, v: &Value) -> std::result::Result<Vec<(String, Value)>, String> {
    let s = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let float = || -> std::result::Result<f64, String> {
        v.as_float()
            .or_else(|| v.as_integer().map(|i| i as f64))
            .or_else(|| s.parse().ok())
            .ok_or(format!("`{flag}: {s}` is not a number"))
    };
    let int = || -> std::result::Result<i64, String> {
        v.as_integer()
            .or_else(|| s.parse().ok())
            .ok_or(format!("`{flag}: {s}` is not an integer"))
    };
    let yes = v.as_bool().unwrap_or(s == "true");
    Ok(match flag {
        f if IGNORED.contains(&f) => {
            if f == "cv" && int()? != 0 {
                return Err("`cv` other than 0: cross-validation folds are not implemented".into());
            }
            vec![]
        }
        "dataset" => {
            let mut v = vec![("data.root".into(), Value::String(format!("path/to/{s}")))];
            match s.as_str() {
                "cityscapes" => {}
                // Vistas v1.2: 66 labels, 65 evaluated
                "mapillary" => v.push(("model.num_classes".into(), Value::Integer(65))),
                other => return Err(format!("`dataset: {other}`: cityscapes and mapillary are implemented")),
            }
            v
        }
        "fp16" => {
            if yes {
                vec![("train.precision".into(), Value::String("f16".into()))]
            } else {
                vec![]
            }
        }
        "crop_size" => {
            let c: Vec<i64> = s
                .split(',')
                .map(|x| x.trim().parse().map_err(|_| format!("`crop_size: {s}`")))
                .collect::<std::result::Result<_, _>>()?;
            let (h, w) = match c.as_slice() {
                [h, w] => (*h, *w),
                [e] => (*e, *e),
                _ => return Err(format!("`crop_size: {s}`: one or two sizes")),
            };
            vec![("data.augment.crop".into(), Value::Array(vec![Value::Integer(h), Value::Integer(w)]))]
        }
        "bs_trn" => vec![("train.batch".into(), Value::Integer(int()?))],
        "lr" => vec![("train.optim.lr".into(), Value::Float(float()?))],
        "poly_exp" => vec![("train.optim.poly_power".into(), Value::Float(float()?))],
        "max_epoch" => vec![("train.epochs".into(), Value::Integer(int()?))],
        "rmi_loss" => {
            if yes {
                vec![("train.loss.main".into(), Value::String("rmi".into()))]
            } else {
                vec![("train.loss.main".into(), Value::String("ce".into()))]
            }
        }
        "supervised_mscale_loss_wt" => vec![("train.loss.scale_weight".into(), Value::Float(float()?))],
        // The official trainer restores a snapshot forgivingly (keys whose
        // shapes differ are skipped); the class heads are the ones that do
        // when the snapshot was trained on another dataset.
        "snapshot" => vec![
            ("train.init".into(), Value::String(s)),
            (
                "train.init_skip".into(),
                Value::Array(vec![Value::String("ocr.cls_head".into()), Value::String("ocr.aux_head.2".into())]),
            ),
        ],
        "gblur" => vec![("data.augment.blur".into(), Value::Float(if yes { 1.0 } else { 0.0 }))],
        "pre_size" => vec![("data.long_edge".into(), Value::Integer(int()?))],
        "n_scales" => {
            let sc = floats(&s).ok_or(format!("`n_scales: {s}`"))?;
            vec![(
                "eval".into(),
                Value::Array(vec![Value::Table(Table::from_iter([
                    ("scales".to_string(), Value::Array(sc.into_iter().map(Value::Float).collect())),
                    ("fusion".to_string(), Value::String("hierarchical".into())),
                ]))]),
            )]
        }
        "arch" => match s.as_str() {
            "ocrnet.HRNet_Mscale" => vec![
                ("model.fusion".into(), Value::String("hierarchical".into())),
                ("model.scales".into(), Value::Array(vec![Value::Float(0.5), Value::Float(1.0)])),
            ],
            "ocrnet.HRNet" => vec![
                ("model.fusion".into(), Value::String("single".into())),
                ("model.scales".into(), Value::Array(vec![Value::Float(1.0)])),
            ],
            other => return Err(format!("`arch: {other}`: only ocrnet.HRNet_Mscale and ocrnet.HRNet (HRNetV2-W48 + OCR) are implemented")),
        },
        "coarse_boost_classes" => {
            let ids: Vec<Value> = s
                .split(',')
                .map(|x| x.trim().parse::<i64>().map(Value::Integer).map_err(|_| format!("`coarse_boost_classes: {s}`")))
                .collect::<std::result::Result<_, _>>()?;
            vec![
                ("data.second.root".into(), Value::String("path/to/cityscapes".into())),
                ("data.second.split".into(), Value::String("train_extra".into())),
                ("data.second.labels".into(), Value::String("coarse".into())),
                ("data.sampler.second_boost".into(), Value::Array(ids)),
            ]
        }
        f => {
            if let Some((_, what)) = UNSUPPORTED.iter().find(|(n, _)| *n == f) {
                return Err(format!("`{f}` ({what}) is not implemented"));
            }
            return Err(format!("`{f}` is not a flag hmsa-lab knows"));
        }
    })
}

/// The suite TOML for the runx recipe at `path`.
pub fn import(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(|e| err(path, e.to_string()))?;
    let hp = doc
        .get("HPARAMS")
        .or_else(|| doc.get("hparams"))
        .and_then(|v| v.as_sequence())
        .ok_or_else(|| err(path, "no HPARAMS list".into()))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("recipe");
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // the w48 network, as the official arch
    let mut defaults = Table::new();
    let model = Value::try_from(ModelConfig::w48()).map_err(|e| err(path, e.to_string()))?;
    defaults.insert("model".into(), model);
    let mut variants = vec![];
    for (i, entry) in hp.iter().enumerate() {
        let map = entry
            .as_mapping()
            .ok_or_else(|| err(path, format!("HPARAMS[{i}] is not a map of flags")))?;
        let mut own = Table::new();
        let mut sweep = Table::new();
        let mut eval: Option<Value> = None;
        for (k, v) in map {
            let flag = k.as_str().unwrap_or("").to_string();
            let v = yaml_to_toml(v)
                .ok_or_else(|| err(path, format!("HPARAMS[{i}].{flag}: an unsupported value")))?;
            // a list is a runx sweep, unless the flag takes one value of text
            let values = match &v {
                Value::Array(xs) if xs.len() > 1 => xs.clone(),
                Value::Array(xs) if xs.len() == 1 => vec![xs[0].clone()],
                other => vec![other.clone()],
            };
            let mut mapped = vec![];
            for x in &values {
                mapped.push(map_flag(&flag, x).map_err(|m| err(path, format!("HPARAMS[{i}]: {m}")))?);
            }
            if values.len() > 1 {
                for (pos, (key, _)) in mapped[0].iter().enumerate() {
                    if key == "eval" {
                        return Err(err(
                            path,
                            format!("HPARAMS[{i}]: a sweep over `{flag}` (evaluation sets) is not supported"),
                        ));
                    }
                    let axis: Vec<Value> = mapped.iter().map(|m| m[pos].1.clone()).collect();
                    sweep.insert(key.clone(), Value::Array(axis));
                }
            } else {
                for (key, val) in mapped.remove(0) {
                    if key == "eval" {
                        eval = Some(val);
                    } else {
                        set(&mut own, &key, val);
                    }
                }
            }
        }
        variants.push((own, sweep, eval));
    }
    // a single variant: its settings are the defaults
    let mut out = format!(
        "# `hmsa-lab import-runx {}`: the official runx recipe as a suite.\n\
         # Fill in data.root (the dataset) and, where set, train.init (the\n\
         # official snapshot, e.g. from the repository's model zoo).\n\n\
         [suite]\nname = \"{name}\"\nseeds = [0]\nruns_dir = \"runs\"\n\n",
        path.display()
    );
    if variants.len() == 1 {
        let (own, _, _) = &variants[0];
        for (k, v) in own {
            match (defaults.get_mut(k), v) {
                (Some(Value::Table(d)), Value::Table(t)) => {
                    for (kk, vv) in t {
                        d.insert(kk.clone(), vv.clone());
                    }
                }
                _ => {
                    defaults.insert(k.clone(), v.clone());
                }
            }
        }
    }
    let mut top = Table::new();
    top.insert("defaults".into(), Value::Table(defaults));
    out.push_str(&toml::to_string(&top).map_err(|e| err(path, e.to_string()))?);
    for (i, (own, sweep, eval)) in variants.iter().enumerate() {
        let mut v = Table::new();
        v.insert(
            "name".into(),
            Value::String(if variants.len() == 1 {
                name.clone()
            } else {
                format!("{name}-{i}")
            }),
        );
        if variants.len() > 1 {
            for (k, val) in own {
                v.insert(k.clone(), val.clone());
            }
        }
        if let Some(e) = eval {
            v.insert("eval".into(), e.clone());
        }
        if !sweep.is_empty() {
            v.insert("sweep".into(), Value::Table(sweep.clone()));
        }
        let mut wrap = Table::new();
        wrap.insert("variant".into(), Value::Array(vec![Value::Table(v)]));
        out.push('\n');
        out.push_str(&toml::to_string(&wrap).map_err(|e| err(path, e.to_string()))?);
    }
    Ok(out)
}

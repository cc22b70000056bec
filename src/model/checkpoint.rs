//! Checkpoints: the network's parameter list, reading official PyTorch
//! `.pth` files and safetensors, and a report of what does not fit.
//!
//! - [`param_spec`] builds the network on a recording `VarBuilder` backend
//!   and returns every tensor it asks for, in creation order (which follows
//!   PyTorch's module order), without allocating the weights.
//! - [`read_state_dict`] accepts the official files as they are: a dict with a
//!   `state_dict` entry, keys prefixed `module.` (DataParallel), and
//!   `num_batches_tracked` counters, which we drop.
//! - [`load`] refuses a file whose keys or shapes differ, listing missing,
//!   unexpected and mis-shaped keys by name.

use super::{HmsaNet, ModelConfig};
use crate::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// A parameter or buffer name with its shape.
pub type Spec = Vec<(String, Vec<usize>)>;

/// A VarBuilder backend that records every request and hands out broadcast
/// zeros (no memory per parameter).
#[derive(Default)]
struct Recorder {
    seen: Mutex<Spec>,
}

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .expect("recorder lock")
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("recorder: no shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

struct SharedRecorder<'a>(&'a Recorder);

impl SimpleBackend for SharedRecorder<'_> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Every tensor the network holds (parameters and BN running statistics), in
/// the order PyTorch lists them.
pub fn param_spec(cfg: &ModelConfig) -> Result<Spec> {
    let rec = Recorder::default();
    {
        let vb = VarBuilder::from_backend(Box::new(SharedRecorder(&rec)), DType::F32, Device::Cpu);
        HmsaNet::new(cfg, vb)?;
    }
    Ok(rec.seen.into_inner().expect("recorder lock"))
}

/// The full PyTorch state_dict listing: [`param_spec`] plus the scalar
/// `num_batches_tracked` PyTorch keeps after each BatchNorm's running_var.
pub fn state_dict_listing(cfg: &ModelConfig) -> Result<Spec> {
    let mut out = Spec::new();
    for (name, shape) in param_spec(cfg)? {
        let bn = name
            .strip_suffix(".running_var")
            .map(|p| format!("{p}.num_batches_tracked"));
        out.push((name, shape));
        if let Some(n) = bn {
            out.push((n, vec![]));
        }
    }
    Ok(out)
}

/// Learnable parameter count (BN running statistics excluded).
pub fn parameter_count(spec: &Spec) -> usize {
    spec.iter()
        .filter(|(n, _)| {
            !n.ends_with(".running_mean")
                && !n.ends_with(".running_var")
                && !n.ends_with(".num_batches_tracked")
        })
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// Reads a `.safetensors`, `.pth` or `.pt` file into name -> tensor (on the
/// CPU), with the `module.` prefix stripped and `num_batches_tracked` dropped.
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: "no such file".into(),
        });
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let ck_err = |e: candle_core::Error| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let entries: Vec<(String, Tensor)> = match ext {
        "safetensors" => candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(ck_err)?
            .into_iter()
            .collect(),
        // Official files wrap the weights: {"state_dict": ..., "epoch": ...},
        // in the zip or the legacy layout (`pth.rs`).
        "pth" | "pt" | "bin" => super::pth::read(path)?,
        _ => {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                msg: format!("unknown checkpoint format `.{ext}` (expected .safetensors or .pth)"),
            })
        }
    };
    let mut map = HashMap::with_capacity(entries.len());
    for (name, t) in entries {
        let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        map.insert(name, t);
    }
    Ok(map)
}

/// What differs between a checkpoint and the network.
#[derive(Debug, Default, PartialEq)]
pub struct LoadReport {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// (name, expected shape, shape in the file)
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims = |s: &[usize]| s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        let list = |f: &mut std::fmt::Formatter<'_>, what: &str, v: &[String]| -> std::fmt::Result {
            if !v.is_empty() {
                writeln!(f, "  {what} ({}):", v.len())?;
                for n in v.iter().take(20) {
                    writeln!(f, "    {n}")?;
                }
                if v.len() > 20 {
                    writeln!(f, "    ... and {} more", v.len() - 20)?;
                }
            }
            Ok(())
        };
        list(f, "missing", &self.missing)?;
        list(f, "unexpected", &self.unexpected)?;
        if !self.mismatched.is_empty() {
            writeln!(f, "  wrong shape ({}):", self.mismatched.len())?;
            for (n, want, got) in self.mismatched.iter().take(20) {
                writeln!(f, "    {n}: model {} vs file {}", dims(want), dims(got))?;
            }
        }
        Ok(())
    }
}

/// Compares a state dict with the network's parameter list.
pub fn compare(spec: &Spec, map: &HashMap<String, Tensor>) -> LoadReport {
    let mut r = LoadReport::default();
    for (name, shape) in spec {
        match map.get(name) {
            None => r.missing.push(name.clone()),
            Some(t) if t.dims() != shape.as_slice() => {
                r.mismatched
                    .push((name.clone(), shape.clone(), t.dims().to_vec()))
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = spec.iter().map(|(n, _)| n.as_str()).collect();
    let mut unexpected: Vec<String> = map
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    unexpected.sort();
    r.unexpected = unexpected;
    r
}

/// Reads a checkpoint, checks it against `cfg`, and builds the network on
/// `device` for inference.
pub fn load(cfg: &ModelConfig, path: &Path, device: &Device) -> Result<HmsaNet> {
    let map = read_state_dict(path)?;
    let report = compare(&param_spec(cfg)?, &map);
    if !report.is_clean() {
        let mut text = report.to_string();
        if let Some(t) = map.get("ocr.cls_head.weight") {
            let k = t.dims()[0];
            if k != cfg.num_classes {
                text.push_str(&format!(
                    "  (the checkpoint predicts {k} classes, the model config {})\n",
                    cfg.num_classes
                ));
            }
        }
        return Err(Error::CheckpointMismatch {
            path: path.to_path_buf(),
            report: text,
        });
    }
    let vb = VarBuilder::from_tensors(map, DType::F32, device);
    HmsaNet::new(cfg, vb)
}

/// Writes every tensor of a VarMap as safetensors (our checkpoint format).
pub fn save_varmap(varmap: &candle_nn::VarMap, path: &Path) -> Result<()> {
    varmap.save(path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// What `[train] init` loaded, by name.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct InitReport {
    /// Our names set from the file.
    pub loaded: Vec<String>,
    /// Our names the file lacks: left at their initialisation.
    pub missing: Vec<String>,
    /// The file's names we have no use for.
    pub unused: Vec<String>,
    /// Our names the suite asked to leave at their initialisation.
    pub skipped: Vec<String>,
}

/// The network name a checkpoint's `key` goes to, as the official
/// `init_weights` maps them (`module.`/`model.` prefixes dropped,
/// `last_layer` → `aux_head`; an HRNet trunk's bare names under
/// `backbone.`), if the network has it.
fn our_name(key: &str, ours: &HashMap<String, Vec<usize>>) -> Option<String> {
    let k = key.strip_prefix("module.").unwrap_or(key);
    let k = k
        .strip_prefix("model.")
        .unwrap_or(k)
        .replace("last_layer", "aux_head");
    [k.clone(), format!("backbone.{k}")]
        .into_iter()
        .find(|c| ours.contains_key(c))
}

/// Sets the variables of `vm` (a freshly built network's) from the
/// checkpoint at `path` before training (fine-tuning). Names under a
/// `skip` prefix keep their initialisation; any other name whose shape
/// differs is an error naming it (e.g. a head built for another class
/// count: skip it to train it anew).
pub fn apply_init(vm: &candle_nn::VarMap, path: &Path, skip: &[String]) -> Result<InitReport> {
    let file = read_state_dict(path)?;
    let data = vm.data().lock().expect("varmap lock");
    let ours: HashMap<String, Vec<usize>> =
        data.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    let skipped = |n: &str| skip.iter().any(|p| n == p || n.starts_with(&format!("{p}.")));
    let mut r = InitReport::default();
    let mut mismatched = vec![];
    let mut matched: HashMap<String, &Tensor> = HashMap::new();
    for (key, t) in &file {
        match our_name(key, &ours) {
            None => r.unused.push(key.clone()),
            Some(n) if skipped(&n) => {}
            Some(n) => {
                if ours[&n] != t.dims() {
                    mismatched.push(format!(
                        "  {n}: the network has {:?}, {key} is {:?}",
                        ours[&n],
                        t.dims()
                    ));
                } else {
                    matched.insert(n, t);
                }
            }
        }
    }
    if !mismatched.is_empty() {
        mismatched.sort();
        return Err(Error::CheckpointMismatch {
            path: path.to_path_buf(),
            report: format!(
                "[train] init: shapes differ (list the heads to train anew in [train] init_skip):\n{}",
                mismatched.join("\n")
            ),
        });
    }
    for (name, var) in data.iter() {
        if skipped(name) {
            r.skipped.push(name.clone());
        } else if let Some(t) = matched.get(name) {
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
            r.loaded.push(name.clone());
        } else {
            r.missing.push(name.clone());
        }
    }
    for v in [&mut r.loaded, &mut r.missing, &mut r.unused, &mut r.skipped] {
        v.sort();
    }
    Ok(r)
}

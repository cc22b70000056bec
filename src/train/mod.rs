//! Training: the paper's recipe (SGD momentum 0.9, weight decay 5e-4,
//! polynomial decay; main loss on the fused prediction, 0.4 x CE on the fused
//! aux logits) over the network's own forward, with resumable checkpoints.
//!
//! - Modes follow the model config: `single` (one scale), `hierarchical`
//!   ({0.5, 1.0}), `explicit` (every scale it will be evaluated on).
//! - Step `s` uses batch `s mod B` of epoch `s div B` of the sampler's plan,
//!   with its own seeds for augmentation and dropout; a checkpoint holds the
//!   weights (with BN statistics), the momentum buffers and the step, which is
//!   all the state there is, so a resumed run repeats the uninterrupted one.
//! - Checkpoints are written to a fresh folder and then named in `latest`
//!   (atomic rename), so a kill at any moment leaves the last good one.
//! - A step's forward and backward go through [`step`], which runs the
//!   scales' networks' backwards concurrently.

pub mod loss;
pub mod optim;
pub mod step;

use crate::config::RunConfig;
use crate::data::loader::{batch_seed, Loader};
use crate::data::sampler::{epoch_plan, Centroids, Source};
use crate::model::init::seeded_varbuilder;
use crate::model::HmsaNet;
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::VarMap;
use optim::{lr_at, Sgd};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    /// The run's total steps.
    pub total: usize,
    pub loss: f32,
    pub main: f32,
    pub aux: f32,
    pub lr: f64,
    pub secs: f64,
}

/// Hooks for whoever runs the training: the lab records steps in its
/// database and stops on Ctrl-C; the binary draws the progress (a bar on
/// a terminal, plain lines elsewhere). Every hook does nothing by default.
pub trait Observer {
    /// Training starts (or resumes) at `start` of `total` steps.
    fn on_start(&mut self, _start: usize, _total: usize) {}
    /// Training ended at `step`: `finished`, or stopped by
    /// [`Observer::should_stop`] with a checkpoint saved.
    fn on_end(&mut self, _step: usize, _finished: bool) {}
    /// Sees each batch's train-id labels, (B, H, W) u32, before its step
    /// (`step` is the step it will be): what the sampler and the second
    /// source put into the batches.
    fn on_batch(&mut self, _step: usize, _labels: &Tensor) -> Result<()> {
        Ok(())
    }
    fn on_step(&mut self, _m: &StepMetrics) -> Result<()> {
        Ok(())
    }
    fn on_checkpoint(&mut self, _step: usize, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// The final evaluation of `sets` evaluations on `images` validation
    /// images is about to start (after training).
    fn on_evaluating(&mut self, _sets: usize, _images: usize) {}
    /// The validation evaluations of `[eval] every` at `step`.
    fn on_eval(&mut self, _step: usize, _results: &[crate::eval::EvalResult]) -> Result<()> {
        Ok(())
    }
    /// The final weights (after `step`s) evaluated on the training split
    /// (`[eval] fit`): how well the run fits the images it learned from.
    fn on_fit(&mut self, _step: usize, _results: &[crate::eval::EvalResult]) -> Result<()> {
        Ok(())
    }
    /// Checked after every step; true saves a checkpoint and returns.
    fn should_stop(&self) -> bool {
        false
    }
}

/// Two observers as one: every hook goes to both (`self.0` first); training
/// stops when either asks.
pub struct Tee<A, B>(pub A, pub B);

impl<A: Observer, B: Observer> Observer for Tee<A, B> {
    fn on_start(&mut self, start: usize, total: usize) {
        self.0.on_start(start, total);
        self.1.on_start(start, total);
    }
    fn on_end(&mut self, step: usize, finished: bool) {
        self.0.on_end(step, finished);
        self.1.on_end(step, finished);
    }
    fn on_batch(&mut self, step: usize, labels: &Tensor) -> Result<()> {
        self.0.on_batch(step, labels)?;
        self.1.on_batch(step, labels)
    }
    fn on_step(&mut self, m: &StepMetrics) -> Result<()> {
        self.0.on_step(m)?;
        self.1.on_step(m)
    }
    fn on_checkpoint(&mut self, step: usize, dir: &Path) -> Result<()> {
        self.0.on_checkpoint(step, dir)?;
        self.1.on_checkpoint(step, dir)
    }
    fn on_evaluating(&mut self, sets: usize, images: usize) {
        self.0.on_evaluating(sets, images);
        self.1.on_evaluating(sets, images);
    }
    fn on_eval(&mut self, step: usize, results: &[crate::eval::EvalResult]) -> Result<()> {
        self.0.on_eval(step, results)?;
        self.1.on_eval(step, results)
    }
    fn on_fit(&mut self, step: usize, results: &[crate::eval::EvalResult]) -> Result<()> {
        self.0.on_fit(step, results)?;
        self.1.on_fit(step, results)
    }
    fn should_stop(&self) -> bool {
        self.0.should_stop() || self.1.should_stop()
    }
}

/// An observer that does nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// How a training call ended.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Steps done in total (== config steps when finished).
    pub step: usize,
    pub finished: bool,
    /// Steps run by this call, with their metrics.
    pub steps: Vec<StepMetrics>,
    /// The final weights (`model.safetensors` in the run folder) when finished.
    pub weights: Option<PathBuf>,
    pub resumed_from: Option<usize>,
}

#[derive(Serialize, Deserialize)]
struct CkptState {
    step: usize,
}

/// The latest complete checkpoint folder of a run: `None` when the run has
/// none (`ckpt/latest` is absent). A checkpoint that `ckpt/latest` names
/// but that cannot be read is an error naming the file, never a silent
/// restart from step 0 (checkpoints are written before `latest` is renamed
/// onto them, so this means the files were damaged afterwards).
pub fn latest_checkpoint(run_dir: &Path) -> Result<Option<(usize, PathBuf)>> {
    let latest = run_dir.join("ckpt/latest");
    let name = match std::fs::read_to_string(&latest) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", &latest, e)),
    };
    let dir = run_dir.join("ckpt").join(name.trim());
    let state = dir.join("state.json");
    let damaged = |msg: String| Error::Checkpoint {
        path: state.clone(),
        msg: format!(
            "{msg}; the run cannot resume from it (remove {} to restart the run from step 0)",
            run_dir.join("ckpt").display()
        ),
    };
    let text = std::fs::read_to_string(&state).map_err(|e| damaged(e.to_string()))?;
    let st: CkptState = serde_json::from_str(&text).map_err(|e| damaged(e.to_string()))?;
    Ok(Some((st.step, dir)))
}

fn write_checkpoint(run_dir: &Path, step: usize, vm: &VarMap, opt: &Sgd) -> Result<PathBuf> {
    let ck = run_dir.join("ckpt");
    let dir = ck.join(format!("step-{step:07}"));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
    crate::model::checkpoint::save_varmap(vm, &dir.join("model.safetensors"))?;
    opt.save(&dir.join("optim.safetensors"))?;
    let st = serde_json::to_string(&CkptState { step }).expect("serialisable");
    let state = dir.join("state.json");
    std::fs::write(&state, st).map_err(|e| Error::io("writing", &state, e))?;
    let tmp = ck.join("latest.tmp");
    std::fs::write(&tmp, format!("step-{step:07}")).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, ck.join("latest")).map_err(|e| Error::io("renaming into", &ck, e))?;
    // Older checkpoints are no longer needed.
    if let Ok(rd) = std::fs::read_dir(&ck) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && p != dir {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    Ok(dir)
}

/// Trains (or resumes) the run whose folder is `run_dir`.
pub fn train(cfg: &RunConfig, run_dir: &Path, obs: &mut dyn Observer) -> Result<TrainReport> {
    cfg.validate()?;
    let t = &cfg.train;
    let dev = crate::device()?;
    let precision = cfg.train.precision;
    precision.check(&dev, true, "train.precision")?;
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io("creating", run_dir, e))?;
    let mut vm = VarMap::new();
    let net = HmsaNet::new(&cfg.model, seeded_varbuilder(&vm, t.seed, &dev))?;
    let vars: Vec<_> = vm
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut opt = Sgd::new(vars, &t.optim);
    let mut start = 0;
    let resumed_from = latest_checkpoint(run_dir)?;
    // Fine-tuning: the init weights, once, before the first step.
    if let (None, Some(init)) = (&resumed_from, &t.init) {
        let r = crate::model::checkpoint::apply_init(&vm, init, &t.init_skip)?;
        tracing::info!(
            loaded = r.loaded.len(),
            missing = r.missing.len(),
            unused = r.unused.len(),
            skipped = r.skipped.len(),
            "init from {}",
            init.display()
        );
        let path = run_dir.join("init.json");
        let text = serde_json::to_string_pretty(&serde_json::json!({"init": init, "report": r}))
            .expect("serialisable");
        std::fs::write(&path, text).map_err(|e| Error::io("writing", &path, e))?;
    }
    if let Some((step, dir)) = &resumed_from {
        vm.load(dir.join("model.safetensors"))
            .map_err(|e| Error::Checkpoint {
                path: dir.join("model.safetensors"),
                msg: e.to_string(),
            })?;
        opt.load(&dir.join("optim.safetensors"))?;
        start = *step;
        tracing::info!(step, "resuming");
    }

    let sources = crate::data::train_sources(&cfg.data)?;
    let cache = |ds: &crate::data::Dataset, tag: &str| {
        ds.root.join(".hmsa-cache").join(format!(
            "centroids-{}-{tag}-{}.json",
            ds.split, cfg.data.sampler.tile
        ))
    };
    let mut cents = Vec::with_capacity(sources.len());
    for (i, ds) in sources.iter().enumerate() {
        cents.push(if cfg.data.sampler.class_uniform > 0.0 {
            Some(Centroids::load_or_compute(
                ds,
                cfg.data.sampler.tile,
                &cache(ds, &i.to_string()),
            )?)
        } else {
            None
        });
    }
    let per_epoch = sources[0].len().div_ceil(t.batch).max(1);
    let total = t.epochs.map_or(t.steps, |e| e * per_epoch);
    let sources = Arc::new(sources);

    obs.on_start(start, total);

    let mut report = TrainReport {
        step: start,
        finished: false,
        steps: vec![],
        weights: None,
        resumed_from: resumed_from.map(|(s, _)| s),
    };
    let mut step = start;
    let mut val: Option<crate::data::Dataset> = None;
    'epochs: while step < total {
        let epoch = (step / per_epoch) as u64;
        let first = step % per_epoch;
        let primary = Source {
            dataset: &sources[0],
            centroids: cents[0].as_ref(),
        };
        let second = sources.get(1).map(|d| Source {
            dataset: d,
            centroids: cents[1].as_ref(),
        });
        let plan = epoch_plan(
            &primary,
            second.as_ref(),
            &cfg.data.sampler,
            t.batch,
            per_epoch,
            t.seed,
            epoch,
        )?;
        let loader = Loader::spawn(
            sources.clone(),
            Arc::new(plan),
            first,
            cfg.data.augment.clone(),
            t.seed,
            epoch,
            cfg.data.workers,
            cfg.data.prefetch,
        );
        for batch in loader {
            let batch = batch?;
            let t0 = Instant::now();
            let lr = lr_at(&t.optim, step, total);
            net.seed_dropout(batch_seed(t.seed ^ 0xD50F, epoch, batch.index));
            // the whole step on a pool worker (see `on_pool`)
            let images = batch.images.to_device(&dev)?.to_dtype(precision.dtype())?;
            obs.on_batch(step + 1, &batch.labels)?;
            let labels = batch.labels.to_device(&dev)?;
            let parts = crate::on_pool(&dev, || -> Result<_> {
                let fwd = step::forward(&net, &images, cfg.model.fusion, &cfg.model.scales)?;
                let parts = loss::combined(&t.loss, &fwd.fused, &fwd.outs, &labels)?;
                let value = parts
                    .total
                    .to_dtype(candle_core::DType::F32)?
                    .to_scalar::<f32>()?;
                if !value.is_finite() {
                    return Err(Error::NonFinite { step, value });
                }
                let grads = fwd.backward(&parts.total)?;
                opt.step(&grads, lr)?;
                Ok((parts, value))
            })?;
            let (parts, value) = parts;
            step += 1;
            let m = StepMetrics {
                step,
                total,
                loss: value,
                main: parts.main,
                aux: parts.aux,
                lr,
                secs: t0.elapsed().as_secs_f64(),
            };
            obs.on_step(&m)?;
            report.steps.push(m);
            tracing::debug!(step, loss = value, lr, "step");
            let stop = obs.should_stop();
            if step % t.checkpoint_every == 0 || step == total || stop {
                let dir = write_checkpoint(run_dir, step, &vm, &opt)?;
                obs.on_checkpoint(step, &dir)?;
            }
            if let Some(every) = cfg.eval.every {
                if step % every == 0 || step == total {
                    if val.is_none() {
                        val = Some(crate::data::val_dataset(&cfg.data)?);
                    }
                    let ds = val.as_ref().expect("opened above");
                    let results = crate::eval::evaluate(&net, ds, &cfg.eval.sets, &dev)?;
                    obs.on_eval(step, &results)?;
                }
            }
            if stop {
                report.step = step;
                obs.on_end(step, false);
                return Ok(report);
            }
            if step >= total {
                break 'epochs;
            }
        }
    }
    obs.on_end(step, true);
    let weights = run_dir.join("model.safetensors");
    let tmp = run_dir.join("model.safetensors.tmp");
    crate::model::checkpoint::save_varmap(&vm, &tmp)?;
    std::fs::rename(&tmp, &weights).map_err(|e| Error::io("renaming into", &weights, e))?;
    report.step = step;
    report.finished = true;
    report.weights = Some(weights);
    Ok(report)
}

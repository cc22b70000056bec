//! Benchmarks (never timed tests): the cases of `hmsa-lab bench` (forward
//! latency, peak memory and GFLOP/s per preset, fusion and scale set; a
//! training step; the loader; matmul and convolution kernels), each run in
//! its own process by the binary, which stores the rows.
//! A training-step case with `profile` set also returns where its time
//! went ([`StepProfile`]: each phase's wall time, and in it the exclusive
//! time of each of our ops from `hmsa_kernels::profile`).
//!
//! Peak memory is the process's peak resident set (`VmHWM`), reset before
//! each case through `/proc/self/clear_refs` on Linux, so each row is the
//! peak of that case alone (weights included). On a GPU (the `cuda`
//! feature) it is the peak of the device memory that candle allocated
//! (the default memory pool's high-water mark; the CUDA context and
//! cuBLAS workspaces not counted). GPU times end at a device synchronise.

use crate::meter::{MemoryMeter, Stopwatch};
use crate::model::init::seeded_varbuilder;
use crate::model::{Fusion, HmsaNet, ModelConfig, Precision, Scales};
use crate::Result;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// One measured case.
#[derive(Debug, Clone)]
pub struct ForwardRow {
    pub preset: String,
    pub fusion: Fusion,
    pub scales: Scales,
    pub flip: bool,
    pub size: (usize, usize),
    pub min_ms: f64,
    pub median_ms: f64,
    pub reps: usize,
    pub peak_mib: Option<f64>,
}

/// Times `reps` inference forwards after one warm-up.
#[allow(clippy::too_many_arguments)]
pub fn time_forward(
    preset: &str,
    fusion: Fusion,
    scales: &[f64],
    flip: bool,
    size: (usize, usize),
    precision: Precision,
    reps: usize,
) -> Result<ForwardRow> {
    let mut cfg = ModelConfig::preset(preset)?;
    if fusion == Fusion::Explicit {
        cfg.fusion = Fusion::Explicit;
        cfg.scales = Scales::new(scales.to_vec());
    }
    let dev = crate::device()?;
    precision.check(&dev, false, "--precision")?;
    let mem = MemoryMeter::start(&dev);
    let vm = candle_nn::VarMap::new();
    HmsaNet::new(&cfg, seeded_varbuilder(&vm, 0, &dev))?;
    // Inference runs on plain tensors, as after loading a checkpoint: on the
    // VarMap's variables every op would record its inputs for backprop and
    // keep them alive until the forward returns.
    let frozen: std::collections::HashMap<String, Tensor> = vm
        .data()
        .lock()
        .expect("varmap")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let net = HmsaNet::new(
        &cfg,
        candle_nn::VarBuilder::from_tensors(frozen, precision.dtype(), &dev),
    )?;
    let x = Tensor::zeros((1, 3, size.0, size.1), precision.dtype(), &dev)?;
    net.infer(&x, fusion, scales, flip, false)?; // warm-up
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Stopwatch::start(&dev)?;
        net.infer(&x, fusion, scales, flip, false)?;
        times.push(t.ms()?);
    }
    times.sort_by(f64::total_cmp);
    Ok(ForwardRow {
        preset: preset.to_string(),
        fusion,
        scales: Scales::new(scales.to_vec()),
        flip,
        size,
        min_ms: times[0],
        median_ms: times[times.len() / 2],
        reps: times.len(),
        peak_mib: mem.peak_mib(),
    })
}

/// One benchmark case, run in its own process so its peak memory is its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Case {
    /// Inference forward of a preset at (h, w).
    Forward {
        preset: String,
        fusion: Fusion,
        scales: Scales,
        size: (usize, usize),
        #[serde(default)]
        precision: Precision,
        reps: usize,
    },
    /// One training step (forward, CE + 0.4 aux CE as the ablation trains,
    /// backward, SGD) of a preset on a (batch, crop) batch; with `profile`,
    /// where its time went (the scales' backwards then run one after the
    /// other, so the ops' times add up).
    TrainStep {
        preset: String,
        fusion: Fusion,
        scales: Scales,
        crop: (usize, usize),
        batch: usize,
        #[serde(default)]
        precision: Precision,
        reps: usize,
        #[serde(default)]
        profile: bool,
    },
    /// f32 matmul (n x n x n).
    Matmul { n: usize, reps: usize },
    /// The training loader (decode, class-uniform crop, augment, batch) on
    /// the default synthetic dataset: `batches` batches per repetition.
    Loader {
        workers: usize,
        batch: usize,
        batches: usize,
        reps: usize,
    },
    /// Claims on the results store: `runs` SCHEDULED runs, `workers`
    /// threads (each with its own connection pool, as separate workers
    /// have) claiming and finishing them; on a temporary SQLite file, or on
    /// the PostgreSQL database `postgres` (its rows are purged after).
    Claims {
        postgres: Option<String>,
        workers: usize,
        runs: usize,
    },
    /// conv2d forward (cin -> cout, k x k) on (1, cin, h, w): ours
    /// (`hmsa_kernels::conv`, what the network runs) or candle's own.
    Conv {
        cin: usize,
        cout: usize,
        k: usize,
        size: (usize, usize),
        candle: bool,
        reps: usize,
    },
}

/// What a case measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measured {
    pub name: String,
    pub params: String,
    pub min_ms: f64,
    pub median_ms: f64,
    pub peak_mib: Option<f64>,
    /// A derived figure (GFLOP/s for kernels), with its unit.
    pub value: Option<f64>,
    pub unit: String,
    /// Where a profiled training step's time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<StepProfile>,
}

/// Where a training step's time went, per step (means over the measured
/// repetitions, the warm-up left out).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepProfile {
    pub steps: usize,
    pub phases: Vec<PhaseProfile>,
}

/// One phase of a step (forward, loss, backward, optimiser): its wall
/// time, and the exclusive time of each of our ops in it; the rest is
/// candle's own ops, its gradient store and glue.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PhaseProfile {
    pub phase: String,
    pub wall_ms: f64,
    pub ops: Vec<OpTime>,
}

/// An op kind's calls, exclusive milliseconds and GFLOP per step (the
/// GFLOP where the op counts them: the convolutions).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpTime {
    pub op: String,
    pub calls: f64,
    pub ms: f64,
    #[serde(default)]
    pub gflop: f64,
}

impl PhaseProfile {
    /// The phase's time outside our ops (never below zero).
    pub fn rest_ms(&self) -> f64 {
        (self.wall_ms - self.ops.iter().map(|o| o.ms).sum::<f64>()).max(0.0)
    }
}

impl StepProfile {
    /// One step's wall time.
    pub fn step_ms(&self) -> f64 {
        self.phases.iter().map(|p| p.wall_ms).sum()
    }

    /// Rows for a table: phase, op (or "outside our ops"), calls, ms per
    /// step, share of the step and GFLOP/s where the op counts its FLOPs,
    /// the largest first within each phase; ops under 0.1 ms per step are
    /// left out (the JSON keeps them).
    pub fn rows(&self) -> Vec<[String; 6]> {
        let total = self.step_ms().max(f64::MIN_POSITIVE);
        let mut rows = vec![];
        for p in &self.phases {
            let mut ops = p.ops.clone();
            ops.push(OpTime {
                op: "outside our ops".into(),
                calls: f64::NAN,
                ms: p.rest_ms(),
                gflop: 0.0,
            });
            ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
            // wrappers whose work is in the ops they call (the convolution's
            // backward, its gradient ops' dispatch) are noise in a table
            for o in ops.into_iter().filter(|o| o.ms >= 0.1 || o.calls.is_nan()) {
                rows.push([
                    p.phase.clone(),
                    o.op,
                    if o.calls.is_nan() {
                        String::new()
                    } else {
                        format!("{:.0}", o.calls)
                    },
                    format!("{:.2}", o.ms),
                    format!("{:.1}%", 100.0 * o.ms / total),
                    if o.gflop > 0.0 && o.ms > 0.0 {
                        format!("{:.0}", o.gflop / (o.ms * 1e-3))
                    } else {
                        String::new()
                    },
                ]);
            }
            rows.push([
                p.phase.clone(),
                "(phase)".into(),
                String::new(),
                format!("{:.2}", p.wall_ms),
                format!("{:.1}%", 100.0 * p.wall_ms / total),
                String::new(),
            ]);
        }
        rows
    }
}

/// Accumulates a profile over repetitions.
#[derive(Default)]
struct ProfileSum {
    steps: usize,
    phases: Vec<(
        &'static str,
        std::time::Duration,
        std::collections::BTreeMap<&'static str, hmsa_kernels::profile::Entry>,
    )>,
}

impl ProfileSum {
    /// Adds one phase's wall time and the ops recorded in it.
    fn phase(
        &mut self,
        phase: &'static str,
        wall: std::time::Duration,
        ops: std::collections::BTreeMap<&'static str, hmsa_kernels::profile::Entry>,
    ) {
        let i = match self.phases.iter().position(|p| p.0 == phase) {
            Some(i) => i,
            None => {
                self.phases.push((phase, Default::default(), Default::default()));
                self.phases.len() - 1
            }
        };
        let p = &mut self.phases[i];
        p.1 += wall;
        for (k, e) in ops {
            let t = p.2.entry(k).or_default();
            t.calls += e.calls;
            t.time += e.time;
            t.flops += e.flops;
        }
    }

    fn finish(self) -> StepProfile {
        let n = self.steps.max(1) as f64;
        StepProfile {
            steps: self.steps,
            phases: self
                .phases
                .into_iter()
                .map(|(phase, wall, ops)| PhaseProfile {
                    phase: phase.into(),
                    wall_ms: wall.as_secs_f64() * 1e3 / n,
                    ops: ops
                        .into_iter()
                        .map(|(op, e)| OpTime {
                            op: op.into(),
                            calls: e.calls as f64 / n,
                            ms: e.time.as_secs_f64() * 1e3 / n,
                            gflop: e.flops as f64 / 1e9 / n,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// The paper's cost ratios from `train` measurements, one line per preset
/// with all three training cases: explicit / hierarchical and hierarchical
/// / single, in time (min ms) and peak memory (the paper's theory: 4.2x
/// and 1.25x in time).
pub fn training_ratios(ms: &[Measured]) -> Vec<String> {
    let preset = |m: &Measured| m.params.split_whitespace().next().unwrap_or("").to_string();
    let mut presets: Vec<String> = vec![];
    for p in ms.iter().map(preset) {
        if !presets.contains(&p) {
            presets.push(p);
        }
    }
    presets
        .into_iter()
        .filter_map(|p| {
            let find = |f: Fusion| ms.iter().find(|m| m.name == f.name() && preset(m) == p);
            let (s, h, e) = (
                find(Fusion::Single)?,
                find(Fusion::Hierarchical)?,
                find(Fusion::Explicit)?,
            );
            let ratio = |a: &Measured, b: &Measured| {
                let mem = a
                    .peak_mib
                    .zip(b.peak_mib)
                    .map(|(x, y)| format!(", {:.2}x memory", x / y));
                format!("{:.2}x time{}", a.min_ms / b.min_ms, mem.unwrap_or_default())
            };
            Some(format!(
                "{p}: explicit / hierarchical {}; hierarchical / single {} (theory 4.2x and 1.25x in time)",
                ratio(e, h),
                ratio(h, s)
            ))
        })
        .collect()
}

fn timed(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()> + Send) -> Result<(f64, f64)> {
    crate::on_pool(dev, &mut f)?; // warm-up
    let mut t = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let s = Stopwatch::start(dev)?;
        crate::on_pool(dev, &mut f)?;
        t.push(s.ms()?);
    }
    t.sort_by(f64::total_cmp);
    Ok((t[0], t[t.len() / 2]))
}

impl Case {
    /// Runs the case in this process.
    pub fn run(&self) -> Result<Measured> {
        let dev = match self {
            Case::Loader { .. } => Device::Cpu,
            _ => crate::device()?,
        };
        let mem = MemoryMeter::start(&dev);
        let mut prof = None;
        let (name, params, (min, med), value, unit) = match self {
            Case::Claims {
                postgres,
                workers,
                runs,
            } => {
                let (engine, (lat_min, lat_median, per_sec)) = (
                    if postgres.is_some() { "postgres" } else { "sqlite" },
                    claims(postgres.as_deref(), *workers, *runs)?,
                );
                (
                    format!("claims {engine} {workers}"),
                    format!("{engine}, {workers} worker(s), {runs} runs"),
                    (lat_min, lat_median),
                    Some(per_sec),
                    "runs/s".to_string(),
                )
            }
            Case::Forward {
                preset,
                fusion,
                scales,
                size,
                precision,
                reps,
            } => {
                let r = time_forward(preset, *fusion, scales, false, *size, *precision, *reps)?;
                let mut cfg = ModelConfig::preset(preset)?;
                cfg.fusion = *fusion;
                cfg.scales = scales.clone();
                let flops = crate::model::flops::count(&cfg, size.0, size.1)?.fused;
                let p = format!(
                    "{preset} {fusion} {} {}x{}{}",
                    scales,
                    size.0,
                    size.1,
                    precision_tag(*precision)
                );
                (
                    format!("{preset}/{fusion}"),
                    p,
                    (r.min_ms, r.median_ms),
                    Some(flops as f64 / (r.min_ms * 1e-3) / 1e9),
                    "GFLOP/s".to_string(),
                )
            }
            Case::TrainStep {
                preset,
                fusion,
                scales,
                crop,
                batch,
                precision,
                reps,
                profile,
            } => {
                precision.check(&dev, true, "--precision")?;
                let mut cfg = ModelConfig::preset(preset)?;
                cfg.fusion = *fusion;
                cfg.scales = scales.clone();
                let vm = candle_nn::VarMap::new();
                let net = HmsaNet::new(&cfg, seeded_varbuilder(&vm, 0, &dev))?;
                let vars: Vec<_> = vm
                    .data()
                    .lock()
                    .expect("varmap")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let mut opt = crate::train::optim::Sgd::new(vars, &Default::default());
                let x = Tensor::randn(0f32, 1., (*batch, 3, crop.0, crop.1), &dev)?
                    .to_dtype(precision.dtype())?;
                let y = Tensor::zeros((*batch, crop.0, crop.1), candle_core::DType::U32, &dev)?;
                let loss_cfg = crate::config::LossConfig {
                    main: crate::config::MainLoss::Ce,
                    ..Default::default()
                };
                // the phases' clocks need the device idle on a GPU
                let now = || -> Result<Instant> {
                    if *profile {
                        crate::sync(&dev)?;
                    }
                    Ok(Instant::now())
                };
                let mut sum = ProfileSum::default();
                let mut warm = true;
                hmsa_kernels::profile::enable(*profile);
                let ops = hmsa_kernels::profile::take;
                let t = timed(&dev, *reps, || {
                    let t0 = now()?;
                    ops();
                    let f = crate::train::step::forward(&net, &x, *fusion, scales)?;
                    let (t1, fwd) = (now()?, ops());
                    let l = crate::train::loss::combined(&loss_cfg, &f.fused, &f.outs, &y)?;
                    let (t2, loss) = (now()?, ops());
                    let g = f.backward(&l.total)?;
                    let (t3, bwd) = (now()?, ops());
                    opt.step(&g, 1e-3)?;
                    if *profile {
                        let (t4, upd) = (now()?, ops());
                        // the warm-up is not counted
                        if !std::mem::take(&mut warm) {
                            sum.steps += 1;
                            sum.phase("forward", t1 - t0, fwd);
                            sum.phase("loss", t2 - t1, loss);
                            sum.phase("backward", t3 - t2, bwd);
                            sum.phase("optimiser", t4 - t3, upd);
                        }
                    }
                    Ok(())
                })?;
                hmsa_kernels::profile::enable(false);
                prof = profile.then(|| sum.finish());
                let p = format!(
                    "{preset} {fusion} {} batch {batch} crop {}x{}{}",
                    scales,
                    crop.0,
                    crop.1,
                    precision_tag(*precision)
                );
                (fusion.name().to_string(), p, t, None, String::new())
            }
            Case::Matmul { n, reps } => {
                let a = Tensor::randn(0f32, 1., (*n, *n), &dev)?;
                let b = Tensor::randn(0f32, 1., (*n, *n), &dev)?;
                let t = timed(&dev, *reps, || {
                    a.matmul(&b)?;
                    Ok(())
                })?;
                let gflops = 2.0 * (*n as f64).powi(3) / (t.0 * 1e-3) / 1e9;
                (
                    format!("matmul {n}"),
                    format!("{n}x{n}x{n} f32"),
                    t,
                    Some(gflops),
                    "GFLOP/s".to_string(),
                )
            }
            Case::Loader {
                workers,
                batch,
                batches,
                reps,
            } => {
                let t = time_loader(*workers, *batch, *batches, *reps)?;
                let aug = crate::config::AugmentConfig::default();
                (
                    format!("loader {workers} worker(s)"),
                    format!(
                        "{workers} worker(s), batch {batch}, crop {}x{}, synthetic",
                        aug.crop[0], aug.crop[1]
                    ),
                    t,
                    Some((batch * batches) as f64 / (t.0 * 1e-3)),
                    "images/s".to_string(),
                )
            }
            Case::Conv {
                cin,
                cout,
                k,
                size,
                candle,
                reps,
            } => {
                let x = Tensor::randn(0f32, 1., (1, *cin, size.0, size.1), &dev)?;
                let w = Tensor::randn(0f32, 1., (*cout, *cin, *k, *k), &dev)?;
                let t = timed(&dev, *reps, || {
                    if *candle {
                        x.conv2d(&w, k / 2, 1, 1, 1)?;
                    } else {
                        hmsa_kernels::conv::conv2d(&x, &w, k / 2, 1)?;
                    }
                    Ok(())
                })?;
                let flops = 2.0 * (*cin * *cout * k * k * size.0 * size.1) as f64;
                let who = if *candle { "candle" } else { "ours" };
                (
                    format!("conv {k}x{k} {cin}->{cout} {who}"),
                    format!("{k}x{k} {cin}->{cout} at {}x{} ({who})", size.0, size.1),
                    t,
                    Some(flops / (t.0 * 1e-3) / 1e9),
                    "GFLOP/s".to_string(),
                )
            }
        };
        Ok(Measured {
            name,
            params,
            min_ms: min,
            median_ms: med,
            peak_mib: mem.peak_mib(),
            value,
            unit,
            profile: prof,
        })
    }
}

/// ` bf16` after a case's parameters unless f32.
fn precision_tag(p: Precision) -> String {
    if p.is_f32() {
        String::new()
    } else {
        format!(" {}", p.name())
    }
}

/// Milliseconds (min, median) to load `batches` batches with the training
/// loader (default augmentation) from a freshly generated synthetic dataset
/// in a temporary folder, removed afterwards.
fn time_loader(workers: usize, batch: usize, batches: usize, reps: usize) -> Result<(f64, f64)> {
    use crate::config::SamplerConfig;
    use crate::data::loader::Loader;
    use crate::data::sampler::{epoch_plan, Centroids, Source};
    use crate::data::{synth, Dataset, Labels};
    use std::sync::Arc;

    /// Removes the folder when the case ends, however it ends.
    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = TempDir(std::env::temp_dir().join(format!("hmsa-bench-data-{}", std::process::id())));
    let cfg = crate::config::SynthConfig {
        train: 24,
        val: 0,
        train_extra: 0,
        ..Default::default()
    };
    synth::generate(&cfg, &dir.0)?;
    let ds = Dataset::cityscapes(&dir.0, "train", Labels::Fine)?;
    let cents = Centroids::compute(&ds, 256)?;
    let source = Source {
        dataset: &ds,
        centroids: Some(&cents),
    };
    let plan = Arc::new(epoch_plan(
        &source,
        None,
        &SamplerConfig::default(),
        batch,
        batches,
        0,
        0,
    )?);
    let sources = Arc::new(vec![ds.clone()]);
    let aug = crate::config::AugmentConfig::default();
    timed(&Device::Cpu, reps, || {
        let loader = Loader::spawn(sources.clone(), plan.clone(), 0, aug.clone(), 0, 0, workers, 4);
        for b in loader {
            b?;
        }
        Ok(())
    })
}

/// The cases of a suite: `model`, `train`, `data`, `kernels` (`full` adds the w48
/// sizes of the issue, minutes each on 2 cores: forwards at 512x1024 and
/// 1024x2048, training steps of batch 1 on 512x1024 crops), their forwards
/// and training steps in `precision`.
/// The store suite: claims by 1, 4 and 16 workers on SQLite, and on
/// PostgreSQL when a database is given.
pub fn store_cases(postgres: Option<&str>) -> Vec<Case> {
    let mut v = vec![];
    for pg in [None, postgres.map(String::from)] {
        if pg.is_none() && !v.is_empty() {
            continue;
        }
        for workers in [1, 4, 16] {
            v.push(Case::Claims {
                postgres: pg.clone(),
                workers,
                runs: 400,
            });
        }
    }
    v
}

/// Claim latency (min and median ms of a successful claim, the
/// conditional UPDATE) and throughput (runs claimed and finished per
/// second) of `workers` threads sharing `runs` runs.
fn claims(postgres: Option<&str>, workers: usize, runs: usize) -> Result<(f64, f64, f64)> {
    use crate::store::{Claim, Provenance, Store};
    let tmp = std::env::temp_dir().join(format!(
        "hmsa-claims-{}-{}",
        std::process::id(),
        crate::store::now_ms()
    ));
    let url = match postgres {
        Some(u) => u.to_string(),
        None => {
            std::fs::create_dir_all(&tmp).map_err(|e| crate::Error::io("creating", &tmp, e))?;
            tmp.join("claims.db").display().to_string()
        }
    };
    let store = Store::open(&url)?;
    let suite = format!("bench-claims-{}", crate::store::now_ms());
    store.upsert_suite(&suite, "claim benchmark (purged after)", "", "v")?;
    let mut ids = Vec::with_capacity(runs);
    for i in 0..runs {
        ids.push(store.ensure_run(&suite, "v", "{}", &format!("h{i}"), 0, "")?.id);
    }
    let ids = std::sync::Arc::new(ids);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (url, ids) = (url.clone(), ids.clone());
            std::thread::spawn(move || -> Result<Vec<f64>> {
                let s = Store::open(&url)?;
                let who = format!("bench:{w}");
                let prov = Provenance::default();
                let mut lat = vec![];
                // each worker starts at its own offset, as workers of an
                // array meet the plan at different places
                let n = ids.len();
                for k in 0..n {
                    let id = ids[(k + w * n / workers.max(1)) % n];
                    let t = Instant::now();
                    let claim = Claim {
                        who: &who,
                        stale_ms: 3_600_000,
                        dead_holder: None,
                        refinish_before_ms: None,
                    };
                    if s.claim(id, &claim, &prov)? {
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                        s.finish_run(id, &who, 1, &[], &[])?;
                    }
                }
                Ok(lat)
            })
        })
        .collect();
    let mut lat = vec![];
    for h in handles {
        lat.extend(
            h.join()
                .map_err(|_| crate::Error::Store("a claim worker panicked".into()))??,
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    if lat.len() != runs {
        return Err(crate::Error::Store(format!(
            "{} of {runs} runs claimed: a run was claimed twice or never",
            lat.len()
        )));
    }
    store.remove_runs(&ids, None)?;
    store.purge_removed(&ids)?;
    if postgres.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    lat.sort_by(f64::total_cmp);
    Ok((lat[0], lat[lat.len() / 2], runs as f64 / secs))
}

pub fn suite_cases(suite: &str, full: bool, precision: Precision) -> Option<Vec<Case>> {
    let f = |preset: &str, fusion, scales: &[f64], size, reps| Case::Forward {
        preset: preset.into(),
        fusion,
        scales: Scales::new(scales.to_vec()),
        size,
        precision,
        reps,
    };
    let train = |preset: &'static str, crop, batch| {
        [
            (Fusion::Single, vec![1.0]),
            (Fusion::Hierarchical, vec![0.5, 1.0]),
            (Fusion::Explicit, vec![0.5, 1.0, 2.0]),
        ]
        .into_iter()
        .map(move |(fusion, scales)| Case::TrainStep {
            preset: preset.into(),
            fusion,
            scales: Scales::new(scales),
            crop,
            batch,
            precision,
            reps: 3,
            profile: false,
        })
    };
    Some(match suite {
        "model" => {
            let mut v = vec![
                f("small", Fusion::Single, &[1.0], (256, 512), 3),
                f("small", Fusion::Average, &[0.5, 1.0, 2.0], (256, 512), 3),
                f("small", Fusion::Explicit, &[0.5, 1.0, 2.0], (256, 512), 3),
                f("small", Fusion::Hierarchical, &[0.5, 1.0], (256, 512), 3),
                f("small", Fusion::Hierarchical, &[0.5, 1.0, 2.0], (256, 512), 3),
                f(
                    "small",
                    Fusion::Hierarchical,
                    &[0.25, 0.5, 1.0, 2.0],
                    (256, 512),
                    3,
                ),
            ];
            if full {
                v.push(f("w48", Fusion::Single, &[1.0], (512, 1024), 1));
                v.push(f("w48", Fusion::Hierarchical, &[0.5, 1.0, 2.0], (512, 1024), 1));
                v.push(f("w48", Fusion::Hierarchical, &[0.5, 1.0, 2.0], (1024, 2048), 1));
            }
            v
        }
        "train" => {
            let mut v: Vec<Case> = train("small", (128, 256), 4).collect();
            if full {
                v.extend(train("w48", (512, 1024), 1));
            }
            v
        }
        "data" => [1, 2]
            .into_iter()
            .map(|workers| Case::Loader {
                workers,
                batch: 4,
                batches: 12,
                reps: 3,
            })
            .collect(),
        "kernels" => {
            let mut v = vec![Case::Matmul { n: 1024, reps: 5 }];
            for (cin, cout, k, size, reps) in [
                (64, 64, 3, (128, 256), 3),
                (32, 32, 3, (64, 128), 5),
                (128, 128, 3, (16, 32), 5),
                (240, 64, 3, (64, 128), 3),
            ] {
                for candle in [false, true] {
                    v.push(Case::Conv {
                        cin,
                        cout,
                        k,
                        size,
                        candle,
                        reps,
                    });
                }
            }
            v
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, params: &str, min_ms: f64, peak: Option<f64>) -> Measured {
        Measured {
            name: name.into(),
            params: params.into(),
            min_ms,
            median_ms: min_ms,
            peak_mib: peak,
            value: None,
            unit: String::new(),
            profile: None,
        }
    }

    /// A profile's rows by hand: ops largest first, the time outside our
    /// ops as the phase's wall time minus theirs, shares of the whole step.
    #[test]
    fn profile_rows_by_hand() {
        let op = |op: &str, calls: f64, ms: f64| OpTime {
            op: op.into(),
            calls,
            ms,
            gflop: if op == "b" { 3.0 } else { 0.0 },
        };
        let p = StepProfile {
            steps: 2,
            phases: vec![
                PhaseProfile {
                    phase: "forward".into(),
                    wall_ms: 30.0,
                    ops: vec![op("a", 2.0, 5.0), op("b", 1.0, 20.0)],
                },
                PhaseProfile {
                    phase: "backward".into(),
                    wall_ms: 70.0,
                    ops: vec![op("c", 3.0, 75.0), op("tiny", 64.0, 0.05)],
                },
            ],
        };
        assert_eq!(p.step_ms(), 100.0);
        assert_eq!(p.phases[0].rest_ms(), 5.0);
        // concurrent ops can sum past the wall time: never below zero
        assert_eq!(p.phases[1].rest_ms(), 0.0);
        let rows = p.rows();
        let names: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
        assert_eq!(
            names,
            [
                "b",
                "a",
                "outside our ops",
                "(phase)",
                "c",
                "outside our ops",
                "(phase)"
            ]
        );
        // 3 GFLOP in 20 ms
        assert_eq!(
            rows[0],
            ["forward", "b", "1", "20.00", "20.0%", "150"].map(String::from)
        );
        assert_eq!(rows[1][5], "");
        assert_eq!(rows[2][2], "");
        assert_eq!(rows[3][3..5], ["30.00".to_string(), "30.0%".to_string()]);
    }

    #[test]
    fn training_ratios_per_preset_by_hand() {
        let ms = [
            m("single", "small single 1.0 batch 4", 100.0, Some(200.0)),
            m(
                "hierarchical",
                "small hierarchical 0.5,1.0 batch 4",
                125.0,
                Some(250.0),
            ),
            m(
                "explicit",
                "small explicit 0.5,1.0,2.0 batch 4",
                500.0,
                Some(1000.0),
            ),
            // a preset without its explicit case gives no line
            m("single", "w48 single 1.0 batch 1", 10.0, None),
            m("hierarchical", "w48 hierarchical 0.5,1.0 batch 1", 15.0, None),
        ];
        let lines = training_ratios(&ms);
        assert_eq!(
            lines,
            ["small: explicit / hierarchical 4.00x time, 4.00x memory; hierarchical / single 1.25x time, 1.25x memory (theory 4.2x and 1.25x in time)"]
        );
    }
}

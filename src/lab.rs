//! Running a suite: every planned run in dependency order, recorded in the
//! results store.
//!
//! - A FINISHED run with the same config hash and seed is not trained again
//!   (`force` retrains); evaluations it lacks are added, and attention
//!   maps the report needs but the run folder lacks.
//! - A run is claimed in the database before it starts, so two `hmsa-lab
//!   run` processes never execute it twice; a RUNNING run whose heartbeat is
//!   stale is taken over and resumes from its last checkpoint.
//! - A failing run is recorded FAILED with its error and the suite goes on
//!   (`fail_fast` stops). Ctrl-C saves a checkpoint and marks the run KILLED.
//! - A student (a variant with a teacher) first auto-labels the teacher's
//!   images into its run folder, then trains with them as a second source.

use crate::config::suite::{PlannedRun, Suite};
use crate::config::{EvalKey, RunConfig, SecondSource};
use crate::data::{Dataset, Labels};
use crate::model::{checkpoint, Fusion};
use crate::store::{Artifact, ArtifactKind, Provenance, Status, Store};
use crate::train::{Observer, StepMetrics};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How to run a suite.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub force: bool,
    pub fail_fast: bool,
    /// A RUNNING run whose heartbeat is older than this is taken over.
    pub stale_ms: i64,
    pub heartbeat_ms: u64,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            force: false,
            fail_fast: false,
            stale_ms: 60_000,
            heartbeat_ms: 5_000,
        }
    }
}

/// What happened to each planned run.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Already finished with every evaluation.
    Done,
    /// Finished earlier; missing evaluations were added.
    Evaluated,
    Trained,
    /// Another process holds it.
    Busy,
    Failed(String),
    Killed,
    /// Removed with `rm` (restorable until `gc` purges it): not run.
    Removed(i64),
    /// Not runnable yet: its teacher has not finished (why, in words).
    Blocked(String),
}

impl Outcome {
    /// Did the run end this invocation with every evaluation recorded?
    pub fn is_complete(&self) -> bool {
        matches!(self, Outcome::Done | Outcome::Evaluated | Outcome::Trained)
    }
}

/// Where this process can prove another is gone: the host name, this
/// boot of the machine (`/proc/sys/kernel/random/boot_id`) and the PID
/// namespace (`/proc/self/ns/pid`), as `host/boot/pidns`. Two machines that
/// share a host name, or two containers on one machine with their own PID
/// namespaces, differ in it; a PID is only meaningful within it.
pub fn here(host: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let pidns = std::fs::metadata("/proc/self/ns/pid").map_or_else(|_| "?".into(), |m| m.ino().to_string());
    format!("{host}/{boot}/{pidns}")
}

/// Is the process that wrote `holder` (`here:pid:start_ms`, see [`here`])
/// known to be gone? Only a holder with this process's `here` can be
/// checked (its PID means the same process here); any other holder,
/// including one whose place could not be read (`?`), is left to its
/// heartbeat.
pub fn holder_is_gone(holder: &str, here: &str) -> bool {
    let mut parts = holder.rsplitn(3, ':');
    let (_, pid, h) = (parts.next(), parts.next(), parts.next());
    let Some(pid) = pid.and_then(|p| p.parse::<i32>().ok()) else {
        return false;
    };
    if h != Some(here) || here.contains('?') || pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Where this process runs: git commit, host, versions.
pub fn provenance() -> Provenance {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    Provenance {
        git_commit: git(&["rev-parse", "HEAD"]),
        git_dirty: git(&["status", "--porcelain"]).map(|s| !s.is_empty()),
        host: std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
        versions: format!("hmsa-lab {}, candle 0.11", env!("CARGO_PKG_VERSION")),
    }
}

/// The flattened config as (key, value) params.
pub fn flatten(cfg: &RunConfig) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, x, out);
                }
            }
            // text as it is (so that `WHERE value = 'single'` finds it),
            // numbers, booleans and lists as JSON
            serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = vec![];
    walk("", &serde_json::to_value(cfg).expect("serialisable"), &mut out);
    out
}

fn digest(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| blake3::hash(&b).to_hex().to_string())
        .unwrap_or_default()
}

/// Records steps and heartbeats, and relays Ctrl-C.
struct LabObserver<'a> {
    store: &'a Store,
    id: i64,
    who: &'a str,
    stop: &'a AtomicBool,
    /// The display the caller installed for this run.
    progress: Box<dyn Observer + 'a>,
}

impl LabObserver<'_> {
    /// Records each result's mIoU at `step` under the metric `name` gives.
    fn log_mious(
        &mut self,
        step: usize,
        results: &[crate::eval::EvalResult],
        name: fn(&EvalKey) -> String,
    ) -> Result<()> {
        let rows: Vec<(String, i64, f64)> = results
            .iter()
            .map(|e| (name(&e.set), step as i64, e.metrics.miou))
            .collect();
        let rows: Vec<(&str, i64, f64)> = rows.iter().map(|(k, s, v)| (k.as_str(), *s, *v)).collect();
        self.store.log_metrics(self.id, &rows)
    }
}

impl LabObserver<'_> {
    /// A heartbeat that fails with [`Error::LostClaim`] when the run is no
    /// longer this process's.
    fn still_held(&self, step: Option<i64>) -> Result<()> {
        if self.store.heartbeat(self.id, self.who, step)? {
            Ok(())
        } else {
            Err(Error::LostClaim { run: self.id })
        }
    }
}

impl Observer for LabObserver<'_> {
    fn on_start(&mut self, start: usize, total: usize) {
        self.progress.on_start(start, total);
    }

    fn on_end(&mut self, step: usize, finished: bool) {
        self.progress.on_end(step, finished);
    }

    fn on_step(&mut self, m: &StepMetrics) -> Result<()> {
        self.progress.on_step(m)?;
        let s = m.step as i64;
        self.store.log_metrics(
            self.id,
            &[
                ("loss", s, m.loss as f64),
                ("loss_main", s, m.main as f64),
                ("loss_aux", s, m.aux as f64),
                ("lr", s, m.lr),
                ("step_secs", s, m.secs),
            ],
        )?;
        // the claim is checked every step: a process that lost it (frozen
        // past --stale-after, then resumed) stops before its next write
        self.still_held(Some(s))
    }

    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn on_evaluating(&mut self, sets: usize, images: usize) {
        self.progress.on_evaluating(sets, images);
    }

    fn on_eval(&mut self, step: usize, results: &[crate::eval::EvalResult]) -> Result<()> {
        self.log_mious(step, results, crate::eval::val_metric)
    }

    fn on_fit(&mut self, step: usize, results: &[crate::eval::EvalResult]) -> Result<()> {
        self.log_mious(step, results, crate::eval::fit_metric)
    }
}

/// How [`train_and_evaluate`] ended.
#[derive(Debug)]
pub enum Trained {
    /// The observer stopped training at `step`; the checkpoint is saved
    /// and the same call resumes.
    Interrupted { step: usize },
    /// Trained to the end; `weights` evaluated on the validation split.
    Finished {
        step: usize,
        weights: PathBuf,
        evals: Vec<crate::eval::EvalResult>,
    },
}

/// Trains `cfg` in `dir` (resuming from its checkpoint), then evaluates
/// its `[eval] sets` on the validation split: `hmsa-lab train`, and each
/// run of a suite.
pub fn train_and_evaluate(cfg: &RunConfig, dir: &Path, obs: &mut dyn Observer) -> Result<Trained> {
    let rep = crate::train::train(cfg, dir, obs)?;
    if !rep.finished {
        return Ok(Trained::Interrupted { step: rep.step });
    }
    let weights = rep
        .weights
        .ok_or_else(|| Error::invalid("train", "finished without weights"))?;
    let evals = evaluate_weights(cfg, &weights, &cfg.eval.sets, obs)?;
    if let (true, Some(set)) = (cfg.eval.fit, cfg.eval.sets.first()) {
        let dev = crate::device()?;
        let net = checkpoint::load(&cfg.model, &weights, &dev)?;
        let train = crate::data::train_dataset(&cfg.data)?;
        let fit = crate::eval::evaluate(&net, &train, std::slice::from_ref(set), &dev)?;
        obs.on_fit(rep.step, &fit)?;
    }
    Ok(Trained::Finished {
        step: rep.step,
        weights,
        evals,
    })
}

/// Evaluates `sets` of the network `cfg.model` with `weights` on `cfg`'s
/// validation split.
pub fn evaluate_weights(
    cfg: &RunConfig,
    weights: &Path,
    sets: &[EvalKey],
    obs: &mut dyn Observer,
) -> Result<Vec<crate::eval::EvalResult>> {
    let dev = crate::device()?;
    let net = checkpoint::load(&cfg.model, weights, &dev)?;
    let val = crate::data::val_dataset(&cfg.data)?;
    obs.on_evaluating(sets.len(), val.len());
    crate::eval::evaluate(&net, &val, sets, &dev)
}

/// Makes the progress display of one run from its label (`[run i/N]
/// variant seed s`); the binary installs a bar or plain lines.
pub type MakeProgress = dyn Fn(&str) -> Box<dyn Observer> + Sync;

/// Each planned run's (variant, seed, outcome), in plan order.
pub type Outcomes = Vec<(String, u64, Outcome)>;

/// What the lab tells its caller as it goes (the library does not print;
/// the binary renders these).
#[derive(Debug)]
pub enum LabEvent<'a> {
    /// A worker starts on a database.
    Worker { who: &'a str, url: &'a str },
    /// `who` claimed run `id` and works in `dir`; `takeover` names the
    /// holder it took the run from, and why (empty for a fresh claim).
    Claimed {
        who: &'a str,
        id: i64,
        variant: &'a str,
        seed: u64,
        dir: &'a Path,
        takeover: String,
    },
    /// A worker stops after `executed` runs, for the reason given.
    Stopped {
        who: &'a str,
        executed: usize,
        why: &'a str,
    },
    /// A run's attempt ended; `worker` is set for `work`'s runs.
    Outcome {
        worker: Option<&'a str>,
        variant: &'a str,
        seed: u64,
        outcome: &'a Outcome,
    },
}

/// Receives [`LabEvent`]s.
pub type Tell = dyn Fn(LabEvent) + Sync;

/// How a worker goes on when nothing is runnable.
#[derive(Clone, Debug, Default)]
pub struct WorkerOptions {
    /// Wait (polling) while another process holds a run this one needs
    /// (a teacher, or a run it would take over once stale); without it
    /// the worker moves on and stops when nothing is runnable now.
    pub wait: bool,
    /// Stop after executing this many runs.
    pub max_runs: Option<usize>,
    /// Seconds between passes while waiting.
    pub poll_secs: f64,
}

/// Runs every planned run of `suite` once, in dependency order (`hmsa-lab
/// run`); returns each run's outcome.
pub fn run_suite(
    store: &Store,
    suite: &Suite,
    opts: &RunOptions,
    stop: Arc<AtomicBool>,
    progress: &MakeProgress,
    tell: &Tell,
) -> Result<Vec<(String, u64, Outcome)>> {
    let ctx = Ctx::new(store, suite, opts, &stop, progress, tell)?;
    let mut out = vec![];
    for r in &suite.runs {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let outcome = ctx.attempt(r)?;
        tell(LabEvent::Outcome {
            worker: None,
            variant: &r.variant,
            seed: r.seed,
            outcome: &outcome,
        });
        out.push((r.variant.clone(), r.seed, outcome));
    }
    // A run another process held (or whose teacher it was training) when
    // this one passed it may have finished since: the summary says what
    // the database says now, not what it said then.
    for (r, o) in suite.runs.iter().zip(out.iter_mut()) {
        if matches!(o.2, Outcome::Busy | Outcome::Blocked(_)) && done_now(store, suite, r)? {
            o.2 = Outcome::Done;
        }
    }
    Ok(out)
}

/// Whether `r` is FINISHED with every evaluation it asks for recorded.
fn done_now(store: &Store, suite: &Suite, r: &PlannedRun) -> Result<bool> {
    Ok(
        match store.find_run(&suite.header.name, &r.variant, &r.hash, r.seed)? {
            Some(row) if row.status == Status::Finished => {
                lacking(store, row.id, &r.config.eval.sets)?.is_empty()
            }
            _ => false,
        },
    )
}

/// A worker (`hmsa-lab worker`, and each task of a Slurm array): claims
/// and executes runs of `suite` until none is runnable, passing over the
/// plan again after each run it executes (a run another worker finished
/// may have made a student runnable). Returns the outcome of every run
/// at the end, and why it stopped.
pub fn work(
    store: &Store,
    suite: &Suite,
    opts: &RunOptions,
    w: &WorkerOptions,
    stop: Arc<AtomicBool>,
    progress: &MakeProgress,
    tell: &Tell,
) -> Result<(Outcomes, String)> {
    let ctx = Ctx::new(store, suite, opts, &stop, progress, tell)?;
    tell(LabEvent::Worker {
        who: &ctx.who,
        url: store.url(),
    });
    let said = |r: &PlannedRun, o: &Outcome| {
        tell(LabEvent::Outcome {
            worker: Some(&ctx.who),
            variant: &r.variant,
            seed: r.seed,
            outcome: o,
        })
    };
    let mut executed = 0usize;
    // Runs this worker saw fail: not retried by it (another worker, or a
    // later invocation, may).
    let mut failed: std::collections::HashSet<usize> = Default::default();
    let mut last: Vec<Option<Outcome>> = vec![None; suite.runs.len()];
    let why = 'passes: loop {
        let mut progressed = false;
        let mut waiting = false;
        for (i, r) in suite.runs.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                break 'passes "interrupted".to_string();
            }
            if w.max_runs.is_some_and(|m| executed >= m) {
                break 'passes format!("executed --max-runs {executed} run(s)");
            }
            if failed.contains(&i) {
                continue;
            }
            let o = ctx.attempt(r)?;
            match &o {
                Outcome::Trained | Outcome::Evaluated => {
                    executed += 1;
                    progressed = true;
                    said(r, &o);
                }
                Outcome::Failed(_) => {
                    failed.insert(i);
                    said(r, &o);
                }
                Outcome::Busy => waiting = true,
                Outcome::Killed => break 'passes "interrupted".to_string(),
                _ => {}
            }
            last[i] = Some(o);
            if progressed {
                // go back to the start: earlier runs may have become runnable
                continue 'passes;
            }
        }
        if progressed {
            continue;
        }
        if w.wait && waiting {
            std::thread::sleep(std::time::Duration::from_secs_f64(w.poll_secs.max(0.05)));
            continue;
        }
        let held = last.iter().filter(|o| **o == Some(Outcome::Busy)).count();
        let blocked = last
            .iter()
            .filter(|o| matches!(o, Some(Outcome::Blocked(_))))
            .count();
        break if held + blocked == 0 {
            "every run is done".to_string()
        } else {
            format!(
                "nothing runnable: {held} held by other processes{}, {blocked} waiting for a teacher",
                if w.wait { "" } else { " (--wait waits for them)" }
            )
        };
    };
    tell(LabEvent::Stopped {
        who: &ctx.who,
        executed,
        why: &why,
    });
    let out = suite
        .runs
        .iter()
        .zip(last)
        .map(|(r, o)| (r.variant.clone(), r.seed, o.unwrap_or(Outcome::Busy)))
        .collect();
    Ok((out, why))
}

impl<'a> Ctx<'a> {
    fn new(
        store: &'a Store,
        suite: &'a Suite,
        opts: &'a RunOptions,
        stop: &'a Arc<AtomicBool>,
        progress: &'a MakeProgress,
        tell: &'a Tell,
    ) -> Result<Self> {
        let h = &suite.header;
        store.upsert_suite(
            &h.name,
            &h.description,
            &suite.file.display().to_string(),
            &suite.baseline,
        )?;
        let prov = provenance();
        let started = crate::store::now_ms();
        let who = format!("{}:{}:{}", here(&prov.host), std::process::id(), started);
        Ok(Ctx {
            store,
            suite,
            opts,
            who,
            prov,
            stop,
            progress,
            tell,
            store_id: store.id()?,
            store_location: store.location(),
            started,
        })
    }

    /// `[run i/N] variant seed s`, for progress lines.
    fn label(&self, r: &PlannedRun) -> String {
        let i = self
            .suite
            .runs
            .iter()
            .position(|x| std::ptr::eq(x, r))
            .map_or(0, |i| i + 1);
        format!(
            "[run {i}/{}] {} seed {}",
            self.suite.runs.len(),
            r.variant,
            r.seed
        )
    }

    /// One attempt at a planned run: its outcome, a failure recorded
    /// FAILED with its message (a panic included).
    fn attempt(&self, r: &PlannedRun) -> Result<Outcome> {
        let h = &self.suite.header;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_one(self, r)))
            .unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(Error::Store(format!("internal error (panic): {msg}")))
            });
        Ok(match result {
            Ok(o) => o,
            // its new holder carries on; nothing of this process's is recorded
            Err(Error::LostClaim { run }) => {
                tracing::warn!(variant = %r.variant, seed = r.seed, run, "lost the run to another process");
                Outcome::Busy
            }
            Err(e) => {
                if let Some(row) = self.store.find_run(&h.name, &r.variant, &r.hash, r.seed)? {
                    self.store
                        .end_run(row.id, &self.who, Status::Failed, Some(&format!("{e:#}")))?;
                }
                tracing::error!(variant = %r.variant, seed = r.seed, "run failed: {e}");
                if self.opts.fail_fast {
                    return Err(e);
                }
                Outcome::Failed(e.to_string())
            }
        })
    }
}

/// What every run of one `run_suite` or `work` call shares.
struct Ctx<'a> {
    store: &'a Store,
    suite: &'a Suite,
    opts: &'a RunOptions,
    /// `host:pid:start_ms`, the claimant's name.
    who: String,
    prov: Provenance,
    stop: &'a Arc<AtomicBool>,
    progress: &'a MakeProgress,
    tell: &'a Tell,
    /// The database's id, written into each run folder's owner file.
    store_id: String,
    store_location: Option<String>,
    /// When this process started (ms): `--force` retrains only runs that
    /// finished before it.
    started: i64,
}

fn run_one(ctx: &Ctx, r: &PlannedRun) -> Result<Outcome> {
    let Ctx {
        store,
        suite,
        opts,
        stop,
        ..
    } = *ctx;
    let (who, prov) = (ctx.who.as_str(), &ctx.prov);
    let h = &suite.header;
    let run_dir = suite.run_dir(r);
    let json = serde_json::to_string(&r.config).expect("serialisable");
    let row = store.ensure_run(
        &h.name,
        &r.variant,
        &json,
        &r.hash,
        r.seed,
        &run_dir.display().to_string(),
    )?;
    if row.removed_ms.is_some() {
        return Ok(Outcome::Removed(row.id));
    }
    let done = row.status == Status::Finished;
    let missing = lacking(store, row.id, &r.config.eval.sets)?;
    if done && !opts.force && missing.is_empty() {
        return Ok(Outcome::Done);
    }
    // A student waits for its teacher: busy while the teacher runs elsewhere.
    if let Some(t) = r.teacher {
        let tr = &suite.runs[t];
        let trow = store.find_run(&h.name, &tr.variant, &tr.hash, tr.seed)?;
        match trow.map(|x| x.status) {
            Some(Status::Finished) => {}
            Some(Status::Running) => return Ok(Outcome::Busy),
            other => {
                return Ok(Outcome::Blocked(format!(
                    "its teacher `{}` (seed {}) has not finished ({})",
                    tr.variant,
                    tr.seed,
                    other.map_or("never run".to_string(), |s| s.to_string())
                )))
            }
        }
    }
    let dead = (row.status == Status::Running)
        .then_some(row.claimed_by.as_deref())
        .flatten()
        .filter(|holder| holder_is_gone(holder, &here(&prov.host)));
    let claim = crate::store::Claim {
        who,
        stale_ms: opts.stale_ms,
        dead_holder: dead,
        refinish_before_ms: (opts.force || done).then_some(ctx.started),
    };
    if !store.claim(row.id, &claim, prov)? {
        // Held by another process, or finished by one meanwhile (with the
        // evaluations this suite asks for).
        let now = store.run(row.id)?;
        return Ok(match now {
            Some(x) if x.removed_ms.is_some() => Outcome::Removed(x.id),
            Some(x) if x.status == Status::Finished => {
                if lacking(store, x.id, &r.config.eval.sets)?.is_empty() {
                    Outcome::Done
                } else {
                    Outcome::Busy
                }
            }
            _ => Outcome::Busy,
        });
    }
    (ctx.tell)(LabEvent::Claimed {
        who,
        id: row.id,
        variant: &r.variant,
        seed: r.seed,
        dir: &run_dir,
        takeover: match (dead, row.status) {
            (Some(d), _) => format!("{d} (gone)"),
            (None, Status::Running) => {
                format!("{} (heartbeat stale)", row.claimed_by.as_deref().unwrap_or("?"))
            }
            _ => String::new(),
        },
    });
    // Heartbeat while this run is held (a thread; stopped below).
    let beating = Arc::new(AtomicBool::new(true));
    let hb = {
        let (store, who, id, every) = (store.clone(), who.to_string(), row.id, opts.heartbeat_ms);
        let beating = beating.clone();
        std::thread::spawn(move || {
            let tick = std::time::Duration::from_millis(50);
            let mut waited = 0;
            while beating.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                waited += 50;
                if waited >= every {
                    waited = 0;
                    let _ = store.heartbeat(id, &who, None);
                }
            }
        })
    };
    let result = (|| -> Result<Outcome> {
        let (outcome, step, weights, evals) = if done && !opts.force {
            let weights = run_dir.join("model.safetensors");
            let evals = evaluate_weights(&r.config, &weights, &missing, &mut *(ctx.progress)(&ctx.label(r)))?;
            (Outcome::Evaluated, row.step, weights, evals)
        } else {
            let owner = crate::gc::Owner {
                store: ctx.store_id.clone(),
                run: row.id,
                suite: h.name.clone(),
                variant: r.variant.clone(),
                seed: r.seed,
                db: ctx.store_location.clone(),
            };
            // The folder must be this run's before anything in it changes.
            crate::gc::take_folder(&run_dir, &owner)?;
            if opts.force && done {
                std::fs::remove_dir_all(&run_dir).map_err(|e| Error::io("removing", &run_dir, e))?;
                crate::gc::take_folder(&run_dir, &owner)?;
            }
            let mut cfg = r.config.clone();
            if r.teacher.is_some() {
                cfg = with_autolabels(store, suite, r, row.id, cfg, &run_dir)?;
            }
            store.write_params(row.id, &flatten(&cfg))?;
            let mut obs = LabObserver {
                store,
                id: row.id,
                who,
                stop,
                progress: (ctx.progress)(&ctx.label(r)),
            };
            match train_and_evaluate(&cfg, &run_dir, &mut obs)? {
                Trained::Interrupted { .. } => {
                    store.end_run(row.id, who, Status::Killed, Some("interrupted"))?;
                    return Ok(Outcome::Killed);
                }
                Trained::Finished { step, weights, evals } => (Outcome::Trained, step as i64, weights, evals),
            }
        };
        let artifact = |kind, p: &Path| Artifact {
            kind,
            path: p.display().to_string(),
            digest: digest(p),
        };
        // still this process's run? (the last write into its folder follows)
        if !store.heartbeat(row.id, who, None)? {
            return Err(Error::LostClaim { run: row.id });
        }
        let mut arts = vec![artifact(ArtifactKind::Weights, &weights)];
        // the attention maps the report draws
        for e in &evals {
            for p in crate::eval::write_attention(&run_dir, e)? {
                arts.push(artifact(ArtifactKind::Attention, &p));
            }
        }
        store.finish_run(row.id, who, step, &evals, &arts)?;
        Ok(outcome)
    })();
    beating.store(false, Ordering::Relaxed);
    let _ = hb.join();
    result
}

/// The evaluations of `sets` run `id` still lacks: those not recorded,
/// and attention-fused ones recorded without their attention maps (runs
/// evaluated before the maps were kept, or whose files are gone), so that
/// the report can draw every run's maps.
pub fn lacking(store: &Store, id: i64, sets: &[EvalKey]) -> Result<Vec<EvalKey>> {
    let have = store.evaluated(id)?;
    let arts = store.artifacts(id)?;
    Ok(sets
        .iter()
        .filter(|s| match have.iter().find(|(k, _)| k == *s) {
            None => true,
            Some((_, images)) => {
                matches!(s.fusion, Fusion::Hierarchical | Fusion::Explicit)
                    && *images > 0
                    && !arts.iter().any(|a| a.is_attention_of(s))
            }
        })
        .cloned()
        .collect())
}

/// Labels the teacher's images into `run_dir/autolabel` (skipped when a
/// previous attempt completed it), records the pixels kept per class as
/// the student's metrics, and adds the images as the second source.
fn with_autolabels(
    store: &Store,
    suite: &Suite,
    r: &PlannedRun,
    student: i64,
    mut cfg: RunConfig,
    run_dir: &Path,
) -> Result<RunConfig> {
    let t = &suite.runs[r.teacher.expect("a student has a teacher")];
    let row = store
        .find_run(&suite.header.name, &t.variant, &t.hash, t.seed)?
        .filter(|row| row.status == Status::Finished)
        .ok_or_else(|| {
            Error::invalid(
                "teacher",
                format!("teacher `{}` (seed {}) has not finished", t.variant, t.seed),
            )
        })?;
    let spec = r
        .autolabel
        .clone()
        .unwrap_or(crate::config::suite::AutolabelSpec {
            split: "train_extra".into(),
            threshold: 0.9,
            scales: None,
            fusion: None,
            share: None,
            boost_classes: vec![],
        });
    let out: PathBuf = run_dir.join("autolabel");
    let marker = out.join("complete");
    if !marker.exists() {
        let dev = crate::device()?;
        let net = checkpoint::load(&t.config.model, &row.run_dir.join("model.safetensors"), &dev)?;
        let root = crate::data::root(&cfg.data)?;
        let ds = Dataset::open(&root, &spec.split, Labels::None)?;
        let truth = crate::autolabel::truth_of(&root, &spec.split)?;
        let scales = spec
            .scales
            .clone()
            .unwrap_or_else(|| t.config.model.scales.clone());
        let fusion = spec.fusion.unwrap_or(t.config.model.fusion);
        let s = crate::autolabel::autolabel(
            &net,
            &ds,
            truth.as_ref(),
            &scales,
            fusion,
            spec.threshold,
            &out,
            &dev,
        )?;
        tracing::info!(images = s.images, "auto-labelled");
        // What the threshold kept, per class, as the student's metrics
        // (step 0); the marker is written last.
        let mut rows: Vec<(String, i64, f64)> = crate::data::cityscapes::CLASSES
            .iter()
            .zip(&s.kept)
            .map(|(c, &k)| (format!("autolabel_kept/{}", c.name), 0, k as f64))
            .collect();
        rows.push(("autolabel_dropped".into(), 0, s.dropped as f64));
        for (c, (&ok, &t)) in crate::data::cityscapes::CLASSES
            .iter()
            .zip(s.correct.iter().zip(&s.truth))
        {
            if t > 0 || ok > 0 {
                rows.push((format!("autolabel_correct/{}", c.name), 0, ok as f64));
                rows.push((format!("autolabel_truth/{}", c.name), 0, t as f64));
            }
        }
        // The teacher's validation mIoU at the labelling scales and fusion.
        if let Some(e) = store
            .evaluations(row.id)?
            .iter()
            .find(|e| e.scales == scales && e.fusion == fusion && !e.flip)
        {
            rows.push(("autolabel_teacher_miou".into(), 0, e.miou));
        }
        rows.push(("autolabel_images".into(), 0, s.images as f64));
        let rows: Vec<(&str, i64, f64)> = rows.iter().map(|(k, st, v)| (k.as_str(), *st, *v)).collect();
        store.log_metrics(student, &rows)?;
        std::fs::write(&marker, format!("{}\n", s.images)).map_err(|e| Error::io("writing", &marker, e))?;
    }
    cfg.data.second = Some(SecondSource {
        root: out,
        split: spec.split.clone(),
        labels: "fine".into(),
    });
    cfg.data.sampler.second_boost = spec
        .boost_ids()
        .map_err(|m| Error::invalid("autolabel.boost_classes", m))?;
    cfg.data.sampler.second_share = spec.share.unwrap_or(0.5);
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dead PID proves its holder gone only where the holder's place
    /// (host name, boot, PID namespace) is this process's: the same host
    /// name from another PID namespace (a container) or another boot
    /// (another machine) is left to the heartbeat, and so are a holder
    /// written before places were recorded, an unreadable place, this
    /// process and a live one.
    #[test]
    fn a_holder_is_gone_only_where_its_pid_means_the_same_process() {
        let me = here("box");
        // above Linux's largest pid_max (2^22): no such process anywhere
        let dead = (1 << 22) + 1;
        assert!(holder_is_gone(&format!("{me}:{dead}:1"), &me), "{me}");
        let (host_boot, _) = me.rsplit_once('/').unwrap();
        assert!(!holder_is_gone(&format!("{host_boot}/1:{dead}:1"), &me));
        let pidns = me.rsplit('/').next().unwrap();
        assert!(!holder_is_gone(
            &format!("box/another-boot/{pidns}:{dead}:1"),
            &me
        ));
        assert!(!holder_is_gone(&format!("box:{dead}:1"), &me));
        assert!(!holder_is_gone(&format!("{me}:{}:1", std::process::id()), &me));
        assert!(!holder_is_gone(&format!("{me}:1:1"), &me));
        assert!(!holder_is_gone(&format!("box/?/?:{dead}:1"), "box/?/?"));
    }

    /// A training process whose run was taken over (its heartbeat went
    /// stale while it was stopped) learns it at its next step and stops
    /// with `LostClaim`, which the lab reports as held elsewhere, not as a
    /// failure; the holder itself carries on.
    #[test]
    fn a_holder_that_lost_its_run_stops_at_the_next_step() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("l.db").display().to_string()).unwrap();
        store.upsert_suite("t", "", "t.toml", "v").unwrap();
        let row = store.ensure_run("t", "v", "{}", "h", 0, "runs/t/v").unwrap();
        let claim = |who: &str, stale_ms: i64| {
            let c = crate::store::Claim {
                who,
                stale_ms,
                dead_holder: None,
                refinish_before_ms: None,
            };
            store.claim(row.id, &c, &Provenance::default()).unwrap()
        };
        assert!(claim("first", 60_000));
        let stop = AtomicBool::new(false);
        let observer = |who: &'static str| LabObserver {
            store: &store,
            id: row.id,
            who,
            stop: &stop,
            progress: Box::new(crate::train::Quiet),
        };
        let m = StepMetrics {
            step: 1,
            total: 2,
            loss: 1.0,
            main: 1.0,
            aux: 1.0,
            lr: 0.1,
            secs: 0.1,
        };
        assert!(observer("first").on_step(&m).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(claim("second", 0));
        let e = observer("first").on_step(&m).unwrap_err();
        assert!(matches!(e, Error::LostClaim { run } if run == row.id), "{e}");
        assert!(observer("second").on_step(&m).is_ok());
    }
}

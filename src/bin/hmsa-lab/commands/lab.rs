//! `run`, `worker` (with `run --slurm`) and `train`: training, into the
//! results database or a folder.

use crate::cli::{RunArgs, TrainArgs, WorkerArgs};
use crate::output::{out, outln};
use crate::process::{runtime, stop_on_signals, Exit, UntilSignal};
use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use hmsa_lab::config::suite::Suite;
use hmsa_lab::config::RunConfig;
use hmsa_lab::lab::{run_suite, train_and_evaluate, LabEvent, Outcome, RunOptions, Trained};
use hmsa_lab::report;
use hmsa_lab::store::Store;
use hmsa_lab::train::Tee;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A suite with its `--set` overrides, and its database: `--db`, else
/// `$HMSA_DB`, else the suite file with `.db`.
pub fn load_suite(path: &std::path::Path, sets: &[String], db: Option<&str>) -> Result<(Suite, String)> {
    let sets = sets
        .iter()
        .map(|s| hmsa_lab::config::suite::parse_set(s))
        .collect::<hmsa_lab::Result<Vec<_>>>()?;
    let suite = Suite::load(path, &sets)?;
    let url = db
        .map(String::from)
        .or_else(|| std::env::var("HMSA_DB").ok())
        .unwrap_or_else(|| suite.default_db().display().to_string());
    Ok((suite, url))
}

pub fn run(a: RunArgs) -> Result<()> {
    let (suite, url) = load_suite(&a.suite, &a.sets, a.db.as_deref())?;
    if a.slurm {
        return submit_slurm(&a, &suite, &url);
    }
    let rt = runtime()?;
    let store = Store::open(&url)?;
    if a.dry_run {
        let mut rows = vec![];
        for r in &suite.runs {
            let row = store.find_run(&suite.header.name, &r.variant, &r.hash, r.seed)?;
            // what `run` would still do for it
            let lacking = match &row {
                Some(x) => hmsa_lab::lab::lacking(&store, x.id, &r.config.eval.sets)?,
                None => r.config.eval.sets.clone(),
            };
            // each evaluation, ✓ where it is already recorded
            let evals: Vec<String> = r
                .config
                .eval
                .sets
                .iter()
                .map(|e| {
                    let done = !lacking.contains(e);
                    format!(
                        "{} {}{} {}",
                        e.fusion.name(),
                        e.scales,
                        if e.flip { " flip" } else { "" },
                        if done { "✓" } else { "–" }
                    )
                })
                .collect();
            rows.push(vec![
                r.variant.clone(),
                r.seed.to_string(),
                r.hash[..12].to_string(),
                r.teacher.map_or("".into(), |t| suite.runs[t].variant.clone()),
                row.map_or("new".into(), |x| x.status.to_string()),
                evals.join("\n"),
                suite.run_dir(r).display().to_string(),
            ]);
        }
        let head = [
            "variant",
            "seed",
            "config hash",
            "teacher",
            "status",
            "evaluations (✓ recorded)",
            "run folder",
        ]
        .map(String::from);
        outln!("{}", report::terminal_table(&head, &rows))?;
        outln!("database: {url}")?;
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(&rt, stop.clone());
    let opts = RunOptions {
        force: a.force,
        fail_fast: a.fail_fast,
        stale_ms: a.stale_after as i64 * 1000,
        ..Default::default()
    };
    let out = run_suite(&store, &suite, &opts, stop.clone(), &Progress::boxed, &tell)?;
    // the .db file alone holds every result from here on
    store.checkpoint()?;
    let failed = out.iter().filter(|o| matches!(o.2, Outcome::Failed(_))).count();
    let busy = out.iter().filter(|o| o.2 == Outcome::Busy).count();
    let removed = out.iter().filter(|o| matches!(o.2, Outcome::Removed(_))).count();
    outln!(
        "{}: {} runs, {} trained, {} evaluated, {} already done, {} held elsewhere, {} failed{}{}",
        suite.header.name,
        out.len(),
        out.iter().filter(|o| o.2 == Outcome::Trained).count(),
        out.iter().filter(|o| o.2 == Outcome::Evaluated).count(),
        out.iter().filter(|o| o.2 == Outcome::Done).count(),
        busy,
        failed,
        if removed > 0 {
            format!(", {removed} removed")
        } else {
            String::new()
        },
        if stop.load(Ordering::Relaxed) {
            " (interrupted)"
        } else {
            ""
        }
    )?;
    if stop.load(Ordering::Relaxed) {
        return Err(Exit::Interrupted("interrupted; run the same command again to resume".into()).into());
    }
    // Every run the plan holds must end complete; say which did not, and why.
    let mut why = vec![];
    for (variant, seed, o) in &out {
        let reason = match o {
            Outcome::Failed(e) => format!("failed: {e}"),
            Outcome::Busy => "held by another process (rerun when it is done)".into(),
            Outcome::Killed => "interrupted".into(),
            Outcome::Blocked(why) => why.clone(),
            Outcome::Removed(id) => format!(
                "run {id} was removed with `rm`: `hmsa-lab restore {id}` brings it back, `hmsa-lab gc` purges it so that `run` trains it anew"
            ),
            _ => continue,
        };
        why.push(format!("  {variant} seed {seed}: {reason}"));
    }
    if !why.is_empty() {
        return Err(Exit::Unfinished(format!(
            "{} of {} run(s) unfinished (`hmsa-lab runs --db {url}` lists them):\n{}",
            why.len(),
            out.len(),
            why.join("\n")
        ))
        .into());
    }
    Ok(())
}

/// `run --slurm`: the job array's script, printed (--dry-run) or submitted.
pub fn submit_slurm(a: &RunArgs, suite: &Suite, url: &str) -> Result<()> {
    let o = &a.slurm_opts;
    let spec = suite.slurm.overridden(&hmsa_lab::config::suite::SlurmSpec {
        partition: o.partition.clone(),
        time: o.time.clone(),
        cpus_per_task: o.cpus_per_task,
        gres: o.gres.clone(),
        tasks: o.tasks,
        ..Default::default()
    });
    if spec.task_count() > 1 && !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        bail!(
            "--slurm with {} tasks on the SQLite database {url}: SQLite on a shared filesystem is not safe for concurrent writers; \
             give a PostgreSQL database (--db postgres://… or $HMSA_DB), or --tasks 1",
            spec.task_count()
        );
    }
    let abs = |p: &std::path::Path| std::fs::canonicalize(p).with_context(|| format!("{}", p.display()));
    let workdir = std::env::current_dir()?;
    let log_dir = workdir.join(&suite.header.runs_dir).join("slurm");
    let job = hmsa_lab::slurm::Job {
        name: suite.header.name.clone(),
        binary: std::env::current_exe()?,
        suite: abs(&a.suite)?,
        db: if url.contains("://") {
            url.to_string()
        } else {
            workdir.join(url).display().to_string()
        },
        sets: a.sets.clone(),
        workdir,
        log_dir: log_dir.clone(),
        stale_after: a.stale_after,
    };
    let script = hmsa_lab::slurm::script(&job, &spec);
    if a.dry_run {
        out!("{script}")?;
        return Ok(());
    }
    // The database and the data exist before any task starts.
    Store::open(url)?;
    for r in &suite.runs {
        hmsa_lab::data::root(&r.config.data)?;
    }
    let (id, path) = hmsa_lab::slurm::submit(&script, &log_dir, &suite.header.name)?;
    outln!(
        "submitted job {id}: {} worker task(s) on {url} (script {}, logs {}/{id}_*.out)",
        spec.task_count(),
        path.display(),
        log_dir.display()
    )?;
    outln!("watch: hmsa-lab runs --db {url}    squeue -j {id}")?;
    Ok(())
}

/// `hmsa-lab worker`.
pub fn worker(a: WorkerArgs) -> Result<()> {
    let (suite, url) = load_suite(&a.suite, &a.sets, a.db.as_deref())?;
    let rt = runtime()?;
    let store = Store::open(&url)?;
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(&rt, stop.clone());
    let opts = RunOptions {
        stale_ms: a.stale_after as i64 * 1000,
        ..Default::default()
    };
    let w = hmsa_lab::lab::WorkerOptions {
        wait: a.wait,
        max_runs: a.max_runs,
        poll_secs: a.poll,
    };
    let (out, why) = hmsa_lab::lab::work(&store, &suite, &opts, &w, stop.clone(), &Progress::boxed, &tell)?;
    store.checkpoint()?;
    if stop.load(Ordering::Relaxed) {
        return Err(Exit::Interrupted(format!("worker interrupted ({why}); its run is resumable")).into());
    }
    let failed: Vec<String> = out
        .iter()
        .filter_map(|(v, s, o)| match o {
            Outcome::Failed(e) => Some(format!("  {v} seed {s}: {e}")),
            _ => None,
        })
        .collect();
    if !failed.is_empty() {
        return Err(Exit::Unfinished(format!("run(s) failed on this worker:\n{}", failed.join("\n"))).into());
    }
    Ok(())
}

pub fn train(a: TrainArgs) -> Result<()> {
    let cfg = RunConfig::from_toml_file(&a.config)?;
    // a suite's run folder belongs to its database: training into it would
    // resume from its checkpoint and replace its recorded weights
    if let Some(o) = hmsa_lab::gc::read_owner(&a.out) {
        bail!(
            "--out {}: the folder of run {} ({} {} seed {}) of another results database ({}); `train` writes only into folders without one",
            a.out.display(),
            o.run,
            o.suite,
            o.variant,
            o.seed,
            hmsa_lab::gc::OWNER_FILE
        );
    }
    let rt = runtime()?;
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(&rt, stop.clone());
    let label = format!("[{}]", a.config.display());
    let mut obs = Tee(UntilSignal(stop), Progress::new(&label));
    let results = match train_and_evaluate(&cfg, &a.out, &mut obs)? {
        Trained::Interrupted { step } => {
            return Err(Exit::Interrupted(format!(
                "interrupted at step {step}, checkpoint saved; the same command resumes"
            ))
            .into())
        }
        Trained::Finished { evals, .. } => evals,
    };
    let path = a.out.join("eval.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", path.display()))?;
    // the attention maps, as a suite's runs keep them
    for r in &results {
        hmsa_lab::eval::write_attention(&a.out, r)?;
    }
    for r in &results {
        outln!(
            "{:<13} {:<20} flip={:<5} mIoU {:.4}  pixel acc {:.4}  {:.0} ms/image",
            r.set.fusion.name(),
            r.set.scales,
            r.set.flip,
            r.metrics.miou,
            r.metrics.pixel_acc,
            r.ms_per_image
        )?;
    }
    Ok(())
}

/// Renders the lab's events on stderr, a line each (what scripts and the
/// tests read: `variant seed s: Outcome`).
fn tell(e: LabEvent) {
    match e {
        LabEvent::Worker { who, url } => eprintln!("worker {who} on {url}"),
        LabEvent::Claimed {
            who,
            id,
            variant,
            seed,
            dir,
            takeover,
        } => {
            let from = if takeover.is_empty() {
                String::new()
            } else {
                format!(", taken over from {takeover}")
            };
            eprintln!(
                "{who} claimed run {id} ({variant} seed {seed}) in {}{from}",
                dir.display()
            )
        }
        LabEvent::Stopped { who, executed, why } => {
            eprintln!("worker {who} stops after {executed} run(s): {why}")
        }
        LabEvent::Outcome {
            worker,
            variant,
            seed,
            outcome,
        } => match worker {
            Some(w) => eprintln!("worker {w}: {variant} seed {seed}: {outcome:?}"),
            None => eprintln!("{variant} seed {seed}: {outcome:?}"),
        },
    }
}

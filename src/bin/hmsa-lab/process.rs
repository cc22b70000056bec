//! What every command shares with the process around it: the device,
//! exit codes ([`Exit`]), signals, confirmation before destructive steps,
//! and naming runs on the command line.

use anyhow::{bail, Context, Result};
use hmsa_lab::store::{RunFilter, Store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub fn device() -> Result<candle_core::Device> {
    Ok(hmsa_lab::device()?)
}

/// Ends the process with a specific exit code (see the module docs).
#[derive(Debug)]
pub enum Exit {
    /// The command ran and left work unfinished: 3.
    Unfinished(String),
    /// Ctrl-C or SIGTERM: 130.
    Interrupted(String),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Unfinished(m) | Exit::Interrupted(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Exit {}

/// Training observer of `hmsa-lab train`: stops (after a checkpoint) on
/// Ctrl-C or SIGTERM.
pub struct UntilSignal(pub Arc<AtomicBool>);

impl hmsa_lab::train::Observer for UntilSignal {
    fn should_stop(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Asks before a destructive step: `--yes` goes ahead; on a terminal the
/// user is asked; otherwise the command stops, changing nothing.
pub fn confirm(yes: bool, what: &str) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("{what}: not a terminal, so nothing was changed; pass --yes to go ahead");
    }
    eprint!("{what}? [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if !matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        bail!("{what}: not confirmed, nothing was changed");
    }
    Ok(())
}

/// Sets `stop` on Ctrl-C or SIGTERM (what Slurm, systemd and `timeout`
/// send): the running run saves a checkpoint and is marked KILLED. A
/// second signal exits at once.
pub fn stop_on_signals(rt: &tokio::runtime::Runtime, stop: Arc<AtomicBool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let _in_runtime = rt.enter();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (kind, name) in [
        (SignalKind::interrupt(), "interrupt"),
        (SignalKind::terminate(), "SIGTERM"),
    ] {
        let (stop, seen) = (stop.clone(), seen.clone());
        let Ok(mut sig) = signal(kind) else {
            continue;
        };
        rt.spawn(async move {
            while sig.recv().await.is_some() {
                if seen.fetch_add(1, Ordering::SeqCst) > 0 {
                    eprintln!("{name} again: exiting now");
                    std::process::exit(130);
                }
                eprintln!("{name}: saving a checkpoint, then stopping");
                stop.store(true, Ordering::Relaxed);
            }
        });
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// A run named on the command line: its id, or `variant/seed` (or
/// `suite/variant/seed` where a variant name is in several suites).
pub fn resolve_run(store: &Store, spec: &str) -> Result<i64> {
    if let Ok(id) = spec.parse::<i64>() {
        return Ok(id);
    }
    let parts: Vec<&str> = spec.rsplitn(3, '/').collect();
    let (seed, variant, suite) = match parts.as_slice() {
        [seed, variant] => (*seed, *variant, None),
        [seed, variant, suite] => (*seed, *variant, Some(*suite)),
        _ => bail!("run `{spec}`: give its id, or variant/seed (e.g. baseline/0), or suite/variant/seed"),
    };
    let seed: i64 = seed
        .parse()
        .with_context(|| format!("run `{spec}`: `{seed}` is not a seed"))?;
    let runs: Vec<_> = store
        .runs(&RunFilter {
            suite: suite.map(String::from),
            variant: Some(variant.to_string()),
            ..Default::default()
        })?
        .into_iter()
        .filter(|r| r.seed == seed)
        .collect();
    match runs.as_slice() {
        [one] => Ok(one.id),
        [] => bail!("no run `{spec}` in {}", store.url()),
        many => bail!(
            "run `{spec}` is ambiguous: {}",
            many.iter()
                .map(|r| format!("{} ({}/{}/{})", r.id, r.suite, r.variant, r.seed))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let gpu = hmsa_lab::device()
        .ok()
        .and_then(|d| hmsa_lab::device_name(&d))
        .map_or(String::new(), |g| {
            format!("; GPU {g} (forward and training cases)")
        });
    format!("{cpu}, {cores} cores{gpu}")
}

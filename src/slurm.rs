//! Submitting a suite to Slurm: an sbatch script for a job array whose
//! tasks are `hmsa-lab worker`s on one database, submitted with `sbatch`.
//!
//! Slurm does the scheduling; the database does the coordination (each
//! task claims runs with the store's conditional UPDATE). A task killed by
//! Slurm (time limit, preemption, node failure) leaves its run RUNNING with
//! a stale heartbeat, and the next worker takes it over from its last
//! checkpoint; a task warned with SIGTERM (`--signal=B:TERM@120`: two
//! minutes before its time limit) checkpoints and marks its run KILLED,
//! which any worker resumes at once.

use crate::config::suite::SlurmSpec;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// What the job's tasks run.
#[derive(Clone, Debug)]
pub struct Job {
    pub name: String,
    /// The `hmsa-lab` binary the tasks execute (absolute).
    pub binary: PathBuf,
    /// The suite file (absolute).
    pub suite: PathBuf,
    /// The database URL the workers share.
    pub db: String,
    /// `--set` overrides, passed on to the workers.
    pub sets: Vec<String>,
    /// The working directory of every task (run folders are relative to it).
    pub workdir: PathBuf,
    /// Where Slurm writes each task's log.
    pub log_dir: PathBuf,
    pub stale_after: u64,
}

fn quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The sbatch script of `job` with the options of `spec`.
pub fn script(job: &Job, spec: &SlurmSpec) -> String {
    let mut s = String::from("#!/bin/bash\n");
    let mut opt = |k: &str, v: &str| s.push_str(&format!("#SBATCH --{k}={v}\n"));
    opt("job-name", &format!("hmsa-{}", job.name));
    opt("array", &format!("0-{}", spec.task_count() - 1));
    opt("chdir", &job.workdir.display().to_string());
    opt("output", &job.log_dir.join("%A_%a.out").display().to_string());
    // SIGTERM to the worker two minutes before the time limit: it
    // checkpoints and marks its run KILLED for the next worker.
    opt("signal", "B:TERM@120");
    if let Some(p) = &spec.partition {
        opt("partition", p);
    }
    if let Some(t) = &spec.time {
        opt("time", t);
    }
    if let Some(c) = spec.cpus_per_task {
        opt("cpus-per-task", &c.to_string());
    }
    if let Some(g) = &spec.gres {
        opt("gres", g);
    }
    for e in &spec.extra {
        s.push_str(&format!("#SBATCH {e}\n"));
    }
    s.push_str("set -euo pipefail\n");
    for l in &spec.setup {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("export HMSA_NO_PROGRESS=1\n");
    let mut cmd = vec![
        "exec".to_string(),
        quote(&job.binary.display().to_string()),
        "worker".into(),
        quote(&job.suite.display().to_string()),
        "--db".into(),
        quote(&job.db),
        "--wait".into(),
        "--stale-after".into(),
        job.stale_after.to_string(),
    ];
    for set in &job.sets {
        cmd.push("--set".into());
        cmd.push(quote(set));
    }
    s.push_str(&cmd.join(" "));
    s.push('\n');
    s
}

/// Writes `script` into `dir` and submits it with `sbatch --parsable`;
/// returns the job id and the script's path.
pub fn submit(script: &str, dir: &Path, name: &str) -> Result<(String, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let path = dir.join(format!("{name}-{}.sbatch", crate::store::now_ms()));
    std::fs::write(&path, script).map_err(|e| Error::io("writing", &path, e))?;
    let out = std::process::Command::new("sbatch")
        .arg("--parsable")
        .arg(&path)
        .output()
        .map_err(|e| Error::io("running", "sbatch", e))?;
    if !out.status.success() {
        return Err(Error::Input {
            path: path.clone(),
            msg: format!(
                "sbatch refused it: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let id = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or("")
        .to_string();
    Ok((id, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_runs_one_worker_per_task_with_the_options() {
        let job = Job {
            name: "quick".into(),
            binary: "/opt/hmsa-lab".into(),
            suite: "/home/lab/hmsa/experiments/quick.toml".into(),
            db: "postgres://lab@db/results".into(),
            sets: vec!["train.steps=10".into()],
            workdir: "/home/lab/hmsa".into(),
            log_dir: "/home/lab/hmsa/runs/slurm".into(),
            stale_after: 60,
        };
        let file = SlurmSpec {
            partition: Some("cpu".into()),
            tasks: Some(2),
            setup: vec!["module load x".into()],
            ..Default::default()
        };
        let spec = file.overridden(&SlurmSpec {
            tasks: Some(4),
            gres: Some("gpu:1".into()),
            ..Default::default()
        });
        let s = script(&job, &spec);
        for line in [
            "#SBATCH --array=0-3",
            "#SBATCH --partition=cpu",
            "#SBATCH --gres=gpu:1",
            "#SBATCH --chdir=/home/lab/hmsa",
            "#SBATCH --signal=B:TERM@120",
            "module load x",
            "exec /opt/hmsa-lab worker /home/lab/hmsa/experiments/quick.toml --db postgres://lab@db/results --wait --stale-after 60 --set train.steps=10",
        ] {
            assert!(s.lines().any(|l| l == line), "{line} not in\n{s}");
        }
    }
}

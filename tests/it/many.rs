//! Many machines: the store's semantics on both engines, workers sharing a
//! PostgreSQL database, a worker killed mid-run and taken over, and the
//! suite as a real Slurm job array (servers from `servers.rs`).

use super::lab::{bin, ok, quick_in};
use super::servers::{Postgres, Slurm};
use hmsa_lab::store::{Claim, Provenance, RunFilter, Status, Store};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The claim, heartbeat, takeover, finish, remove and query semantics, the
/// same on a SQLite file and on a PostgreSQL database.
#[test]
fn store_semantics_hold_on_both_engines() {
    let pg = Postgres::start();
    let d = tempfile::tempdir().unwrap();
    let urls = [
        d.path().join("s.db").display().to_string(),
        pg.database("semantics"),
    ];
    for url in urls {
        let s = Store::open(&url).unwrap();
        s.upsert_suite("t", "", "t.toml", "v").unwrap();
        let row = s.ensure_run("t", "v", "{}", "h1", 0, "runs/t/v").unwrap();
        assert_eq!(row.status, Status::Scheduled, "{url}");
        // ensure_run is idempotent
        assert_eq!(
            s.ensure_run("t", "v", "{}", "h1", 0, "runs/t/v").unwrap().id,
            row.id
        );
        let prov = Provenance {
            host: "h".into(),
            ..Default::default()
        };
        let claim = |who: &str, stale_ms: i64, dead: Option<&str>| {
            s.claim(
                row.id,
                &Claim {
                    who,
                    stale_ms,
                    dead_holder: dead,
                    refinish_before_ms: None,
                },
                &prov,
            )
            .unwrap()
        };
        assert!(claim("a", 60_000, None), "{url}");
        assert!(!claim("b", 60_000, None), "{url}: a fresh claim is exclusive");
        assert!(
            !claim("b", 60_000, Some("c")),
            "{url}: only the named dead holder"
        );
        assert!(
            claim("b", 60_000, Some("a")),
            "{url}: a dead holder is taken over"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(claim("c", 0, None), "{url}: a stale heartbeat is taken over");
        // the old holder learns it at its next heartbeat, the new one holds
        assert!(!s.heartbeat(row.id, "b", Some(2)).unwrap(), "{url}");
        assert!(s.heartbeat(row.id, "c", Some(2)).unwrap(), "{url}");
        // the old holder can no longer finish it
        assert!(s.finish_run(row.id, "b", 3, &[], &[]).is_err(), "{url}");
        s.log_metrics(row.id, &[("loss", 1, 2.0), ("loss", 2, f64::NAN)])
            .unwrap();
        s.log_metrics(row.id, &[("loss", 1, 1.5)]).unwrap();
        let m = s.metric(row.id, "loss").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0], (1, 1.5), "{url}: a recomputed step replaces its row");
        assert!(m[1].1.is_nan());
        s.write_params(row.id, &[("k".into(), "1".into())]).unwrap();
        s.write_params(row.id, &[("k".into(), "2".into())]).unwrap();
        assert_eq!(
            s.params(row.id).unwrap(),
            vec![("k".to_string(), "1".to_string())]
        );
        let art = hmsa_lab::store::Artifact {
            kind: hmsa_lab::store::ArtifactKind::Attention,
            path: "runs/x/attention/a.safetensors".into(),
            digest: "d".into(),
        };
        s.finish_run(row.id, "c", 3, &[], std::slice::from_ref(&art))
            .unwrap();
        assert_eq!(s.artifacts(row.id).unwrap(), vec![art], "{url}");
        let r = s.run(row.id).unwrap().unwrap();
        assert_eq!((r.status, r.step), (Status::Finished, 3), "{url}");
        assert!(!claim("d", 0, None), "{url}: a finished run is not claimed");
        // rm, restore, gc's purge
        assert_eq!(s.remove_runs(&[row.id], None).unwrap(), vec![row.id]);
        assert!(s.runs(&RunFilter::default()).unwrap().is_empty());
        assert_eq!(s.restore_runs(&[row.id]).unwrap(), vec![row.id]);
        assert_eq!(s.runs(&RunFilter::default()).unwrap().len(), 1);
        s.remove_runs(&[row.id], None).unwrap();
        assert_eq!(s.purge_removed(&[row.id]).unwrap(), 1);
        assert!(s.run(row.id).unwrap().is_none());
        // query: read-only and time-limited, through a read-only opener
        let ro = Store::open_read_only(&url).unwrap();
        let (cols, rows) = ro
            .query(
                "SELECT name, baseline, created_ms / created_ms AS c, NULL AS n FROM suites",
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(cols, vec!["name", "baseline", "c", "n"]);
        assert_eq!(
            rows,
            vec![vec![
                serde_json::json!("t"),
                serde_json::json!("v"),
                serde_json::json!(1),
                serde_json::Value::Null
            ]],
            "{url}: typed values"
        );
        let e = ro
            .query("DELETE FROM suites", Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("would write"), "{url}: {e}");
        let e = ro
            .query(
                "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT max(i) FROM r",
                Duration::from_millis(300),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("--timeout"), "{url}: {e}");
        assert_eq!(
            Store::open(&url).unwrap().id().unwrap(),
            s.id().unwrap(),
            "the id is kept"
        );
    }
    // Another program's PostgreSQL database is refused and left as it was.
    let other = pg.database("other_app");
    pg.psql(
        "other_app",
        "CREATE TABLE notes (x INT); INSERT INTO notes VALUES (1)",
    );
    for e in [
        Store::open(&other).unwrap_err().to_string(),
        Store::open_read_only(&other).unwrap_err().to_string(),
    ] {
        assert!(e.contains("not an hmsa-lab results database"), "{e}");
    }
    assert_eq!(
        pg.psql(
            "other_app",
            "SELECT string_agg(table_name, ',') FROM information_schema.tables WHERE table_schema = 'public'"
        ),
        "notes"
    );
}

fn worker(dir: &Path, suite: &Path, db: &str, extra: &[&str]) -> Command {
    let mut c = bin();
    c.current_dir(dir)
        .args(["worker", suite.to_str().unwrap(), "--db", db, "--poll", "0.2"])
        .args(extra);
    c
}

fn trained(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.ends_with(": Trained"))
        .map(|l| l.split_once(": ").map_or(l, |x| x.1).to_string())
        .collect()
}

fn pg_rows(pg: &Postgres, db: &str, sql: &str) -> Vec<String> {
    pg.psql(db, sql).lines().map(String::from).collect()
}

/// Three workers on one PostgreSQL database execute quick.toml with every
/// run trained exactly once; then a worker that stops after the teachers
/// leaves the students to another.
#[test]
fn workers_on_postgres_run_each_run_once() {
    let pg = Postgres::start();
    let d = tempfile::tempdir().unwrap();
    let suite = quick_in(d.path());
    // the data first, so the workers race on the database only
    ok(bin()
        .current_dir(d.path())
        .args([
            "synth",
            "--suite",
            suite.to_str().unwrap(),
            "--out",
            "data/quick-synth",
        ])
        .output()
        .unwrap());
    let db = pg.database("three");
    let kids: Vec<_> = (0..3)
        .map(|_| {
            worker(d.path(), &suite, &db, &["--wait"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = kids.into_iter().map(|k| k.wait_with_output().unwrap()).collect();
    let mut all = vec![];
    for o in &outs {
        assert!(o.status.success(), "{}", text(o));
        assert!(text(o).contains("stops after"), "{}", text(o));
        all.extend(trained(o));
    }
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!((n, all.len()), (10, 10), "every run trained once: {all:?}");
    assert_eq!(
        pg_rows(
            &pg,
            "three",
            "SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'"
        ),
        ["10"]
    );
    assert_eq!(pg_rows(&pg, "three", "SELECT COUNT(*) FROM evaluations"), ["26"]);
    let workers = pg_rows(&pg, "three", "SELECT COUNT(DISTINCT claimed_by) FROM runs");
    assert!(
        workers[0].parse::<usize>().unwrap() >= 2,
        "the work was shared: {workers:?}"
    );

    // Teachers and students apart: the first worker stops after the six
    // runs before the students (quick.toml's order), the second does them
    // (in a folder of their own: run folders belong to one database).
    let d2 = tempfile::tempdir().unwrap();
    let suite2 = quick_in(d2.path());
    let db2 = pg.database("apart");
    let a = worker(d2.path(), &suite2, &db2, &["--max-runs", "6"])
        .output()
        .unwrap();
    assert!(
        a.status.success() && text(&a).contains("executed --max-runs 6 run(s)"),
        "{}",
        text(&a)
    );
    let b = worker(d2.path(), &suite2, &db2, &[]).output().unwrap();
    assert!(b.status.success(), "{}", text(&b));
    let holders = pg_rows(
        &pg,
        "apart",
        "SELECT r.claimed_by <> t.claimed_by FROM runs r JOIN runs t ON t.variant = 'hierarchical' AND t.seed = r.seed \
         WHERE r.variant LIKE '%+auto' ORDER BY r.id",
    );
    assert_eq!(
        holders,
        ["t", "t", "t", "t"],
        "every student ran on another worker than its teacher"
    );
    assert_eq!(
        pg_rows(
            &pg,
            "apart",
            "SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'"
        ),
        ["10"]
    );
}

/// A worker killed with SIGKILL mid-run is taken over by another worker,
/// which resumes the run from its checkpoint: the steps logged before the
/// kill keep their rows.
#[test]
fn a_killed_worker_is_taken_over_from_its_checkpoint() {
    let pg = Postgres::start();
    let d = tempfile::tempdir().unwrap();
    let suite = quick_in(d.path());
    let db = pg.database("killed");
    let sets = ["--set", "train.steps=60", "--set", "train.checkpoint_every=5"];
    let mut a = worker(d.path(), &suite, &db, &sets)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        let r = pg.try_psql(
            "killed",
            "SELECT COUNT(*) FROM runs WHERE status = 'RUNNING' AND step > 12",
        );
        if r.as_deref() == Ok("1") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the worker never got mid-run"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-STOP", &a.id().to_string()])
        .status()
        .unwrap();
    let held = pg_rows(
        &pg,
        "killed",
        "SELECT id, step, claimed_by FROM runs WHERE status = 'RUNNING'",
    );
    assert_eq!(held.len(), 1);
    let parts: Vec<&str> = held[0].split('|').collect();
    let (id, step, holder) = (parts[0], parts[1].parse::<i64>().unwrap(), parts[2]);
    let before = pg_rows(
        &pg,
        "killed",
        &format!("SELECT step, time_ms FROM metrics WHERE run_id = {id} AND key = 'loss' AND step <= {} ORDER BY step", step / 5 * 5),
    );
    a.kill().unwrap();
    a.wait().unwrap();
    let b = worker(d.path(), &suite, &db, &sets).output().unwrap();
    assert!(b.status.success(), "{}", text(&b));
    let row = pg_rows(
        &pg,
        "killed",
        &format!("SELECT status, claimed_by <> '{holder}' FROM runs WHERE id = {id}"),
    );
    assert_eq!(row, ["FINISHED|t"], "taken over by the second worker");
    let after = pg_rows(
        &pg,
        "killed",
        &format!("SELECT step, time_ms FROM metrics WHERE run_id = {id} AND key = 'loss' AND step <= {} ORDER BY step", step / 5 * 5),
    );
    assert_eq!(before, after, "the steps up to the checkpoint were not retrained");
    assert_eq!(
        pg_rows(
            &pg,
            "killed",
            "SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'"
        ),
        ["10"]
    );
}

/// The suite through `run --slurm` on a real single-node cluster: a
/// two-task array of workers on one PostgreSQL database finishes every
/// run. A SQLite database with several tasks is refused.
#[test]
fn slurm_runs_the_suite_as_a_job_array() {
    let d = tempfile::tempdir().unwrap();
    let suite = quick_in(d.path());
    let o = bin()
        .current_dir(d.path())
        .args([
            "run",
            suite.to_str().unwrap(),
            "--slurm",
            "--tasks",
            "2",
            "--db",
            "quick.db",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("not safe for concurrent writers"),
        "{}",
        text(&o)
    );
    assert!(!d.path().join("quick.db").exists());

    let pg = Postgres::start();
    let slurm = Slurm::start();
    let db = pg.database("slurm");
    let script = ok(bin()
        .current_dir(d.path())
        .env("SLURM_CONF", &slurm.conf)
        .args([
            "run",
            suite.to_str().unwrap(),
            "--slurm",
            "--tasks",
            "2",
            "--db",
            &db,
            "--dry-run",
        ])
        .output()
        .unwrap());
    assert!(
        script.contains("#SBATCH --array=0-1") && script.contains(" worker "),
        "{script}"
    );
    let out = ok(bin()
        .current_dir(d.path())
        .env("SLURM_CONF", &slurm.conf)
        .args([
            "run",
            suite.to_str().unwrap(),
            "--slurm",
            "--tasks",
            "2",
            "--db",
            &db,
        ])
        .output()
        .unwrap());
    let job = out
        .split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    let t = Instant::now();
    loop {
        let q = slurm.cmd("squeue").args(["-h", "-j", &job]).output().unwrap();
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "job {job} did not end");
        std::thread::sleep(Duration::from_millis(500));
    }
    let logs: Vec<String> = std::fs::read_dir(d.path().join("runs/slurm"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "out"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert_eq!(logs.len(), 2, "one log per task");
    assert_eq!(
        pg_rows(
            &pg,
            "slurm",
            "SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'"
        ),
        ["10"],
        "{}",
        logs.join("\n---\n")
    );
    assert!(
        logs.iter().all(|l| l.contains("stops after")),
        "{}",
        logs.join("\n---\n")
    );
}

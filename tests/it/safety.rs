//! The lab's edges: what `rm` and `gc` may delete, read commands that
//! create nothing, `query` that cannot write or hang, names that cannot
//! escape `runs_dir`, claims after a crash or under `--force`, SIGTERM,
//! concurrent starts on a new database, and values refused before
//! anything trains.

use super::lab::{bin, ok, sqlite, wait_for, write};
use hmsa_lab::config::suite::Suite;
use proptest::strategy::Strategy;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// A small suite on quick.toml's toy network and data: `variants` are
/// `[[variant]]` tables appended as written.
fn mini(name: &str, runs_dir: &str, seeds: &str, steps: usize, variants: &str) -> String {
    format!(
        r#"
[suite]
name = "{name}"
seeds = {seeds}
runs_dir = "{runs_dir}"

[defaults.model]
ocr_mid_channels = 16
ocr_key_channels = 8
attn_bottleneck = 8
fusion = "single"
scales = [1.0]
[defaults.model.backbone]
stem_width = 8
layer1_planes = 4
layer1_blocks = 1
widths = [8, 8, 16, 16]
modules = [1, 1, 1]
blocks = [1, 1, 1]

[defaults.data]
synth_dir = "data/mini-synth"
workers = 1
val_limit = 2
[defaults.data.synth]
height = 64
width = 128
train = 4
val = 2
train_extra = 0
blob_radius = 30
[defaults.data.augment]
crop = [64, 128]

[defaults.train]
steps = {steps}
batch = 1
checkpoint_every = 5

{variants}
"#
    )
}

const ONE: &str = "[[variant]]\nname = \"v\"\n";
const TWO: &str =
    "[[variant]]\nname = \"v\"\n\n[[variant]]\nname = \"w\"\ntrain = { optim = { lr = 0.02 } }\n";

fn run_in(dir: &Path, args: &[&str]) -> Output {
    bin()
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every file under `root` with its content hash.
fn fingerprint(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let h = blake3::hash(&std::fs::read(&p).unwrap()).to_hex().to_string();
                out.insert(p, h);
            }
        }
    }
    out
}

fn one_value(db: &Path, sql: &str) -> String {
    sqlite(db, sql).lines().nth(1).unwrap_or("").to_string()
}

#[test]
fn gc_removes_only_what_its_database_proves_unreferenced() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // Two suites share `runs/`, spelled two ways.
    let alpha = write(p, "alpha.toml", &mini("alpha", "runs", "[0, 1]", 2, ONE));
    let beta = write(p, "beta.toml", &mini("beta", "./runs", "[0]", 2, ONE));
    ok(run_in(p, &["run", alpha.to_str().unwrap()]));
    ok(run_in(p, &["run", beta.to_str().unwrap()]));
    let before = fingerprint(&p.join("runs"));
    assert_eq!(before.keys().filter(|k| k.ends_with("owner.json")).count(), 3);

    // The other suite's database: nothing of alpha's goes.
    let g = ok(run_in(p, &["gc", "--db", "beta.db", "--yes"]));
    assert!(g.contains("nothing to remove"), "{g}");
    assert_eq!(fingerprint(&p.join("runs")), before);

    // No database given, or a mistyped one: an error, nothing created.
    for args in [vec!["gc", "--yes"], vec!["gc", "--db", "typo.db", "--yes"]] {
        let o = bin()
            .current_dir(p)
            .env_remove("HMSA_DB")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            text(&o).contains("no such database") || text(&o).contains("no results database: give --db"),
            "{}",
            text(&o)
        );
    }
    assert!(!p.join("experiments").exists() && !p.join("typo.db").exists());
    let o = bin()
        .current_dir(p)
        .env("HMSA_DB", "typo2.db")
        .args(["gc", "--yes"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(!p.join("typo2.db").exists());

    // The same suite recorded in a second database may not train into
    // alpha's folders, and that database's gc leaves them alone.
    let o = run_in(p, &["run", alpha.to_str().unwrap(), "--db", "second.db"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("belongs to run"), "{}", text(&o));
    ok(run_in(p, &["rm", "1", "--db", "second.db", "--yes"]));
    let g = ok(run_in(p, &["gc", "--db", "second.db", "--yes"]));
    assert!(g.contains("another database owns"), "{g}");
    assert_eq!(fingerprint(&p.join("runs")), before);

    // A copy of alpha's database file has alpha's id: removing and
    // collecting a run there leaves the original's folder alone (the owner
    // files record the original's place).
    std::fs::copy(p.join("alpha.db"), p.join("copy.db")).unwrap();
    ok(run_in(p, &["rm", "1", "--db", "copy.db", "--yes"]));
    let g = ok(run_in(p, &["gc", "--db", "copy.db", "--yes"]));
    assert!(g.contains("another database owns") && g.contains("a copy"), "{g}");
    assert_eq!(fingerprint(&p.join("runs")), before);
    std::fs::remove_file(p.join("copy.db")).unwrap();

    // A folder without an owner file is never touched.
    std::fs::create_dir_all(p.join("runs/alpha/by-hand")).unwrap();
    std::fs::write(p.join("runs/alpha/by-hand/notes.txt"), "mine").unwrap();

    // A link in the runs folder to a copy of a run folder elsewhere (its
    // owner file names this database and run 2, which is removed below):
    // never followed, its target survives gc.
    let dir2 = one_value(&p.join("alpha.db"), "SELECT run_dir FROM runs WHERE id = 2");
    std::fs::create_dir_all(p.join("elsewhere/victim")).unwrap();
    std::fs::copy(
        p.join(&dir2).join("owner.json"),
        p.join("elsewhere/victim/owner.json"),
    )
    .unwrap();
    std::fs::write(p.join("elsewhere/victim/precious.txt"), "keep").unwrap();
    std::os::unix::fs::symlink(p.join("elsewhere/victim"), p.join("runs/alpha/link")).unwrap();

    // rm + gc: a dry run lists, off a terminal gc asks for --yes, then
    // exactly the removed run's folder goes.
    let dir1 = one_value(&p.join("alpha.db"), "SELECT run_dir FROM runs WHERE id = 1");
    ok(run_in(p, &["rm", "1", "--db", "alpha.db", "--yes"]));
    let snapshot = fingerprint(&p.join("runs"));
    let dry = ok(run_in(p, &["gc", "--db", "alpha.db", "--dry-run"]));
    assert!(
        dry.contains("purge run 1") && dry.contains("delete folder"),
        "{dry}"
    );
    assert!(dry.contains("1 folder(s) without owner.json"), "{dry}");
    let o = run_in(p, &["gc", "--db", "alpha.db"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("--yes"), "{}", text(&o));
    assert_eq!(fingerprint(&p.join("runs")), snapshot);
    let g = ok(run_in(p, &["gc", "--db", "alpha.db", "--yes"]));
    assert!(g.contains("purged 1 run(s) and deleted 1 folder(s)"), "{g}");
    let after = fingerprint(&p.join("runs"));
    let gone: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    assert!(!gone.is_empty());
    assert!(
        gone.iter().all(|k| k.starts_with(p.join(&dir1))),
        "{gone:?} outside {dir1}"
    );
    assert!(p.join("runs/alpha/by-hand/notes.txt").exists());
    assert_eq!(one_value(&p.join("alpha.db"), "SELECT COUNT(*) FROM runs"), "1");
    // run 2 removed too: its real folder goes, the link and its target stay
    ok(run_in(p, &["rm", "2", "--db", "alpha.db", "--yes"]));
    let g = ok(run_in(p, &["gc", "--db", "alpha.db", "--yes"]));
    assert!(g.contains("1 symbolic link(s)"), "{g}");
    assert!(!p.join(&dir2).exists(), "{g}");
    assert_eq!(
        std::fs::read_to_string(p.join("elsewhere/victim/precious.txt")).unwrap(),
        "keep"
    );
    assert!(std::fs::symlink_metadata(p.join("runs/alpha/link"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn names_that_escape_or_share_a_folder_are_refused() {
    let d = tempfile::tempdir().unwrap();
    for (name, why) in [
        ("../../escape", "contains `/`"),
        ("", "is empty"),
        ("x/y", "contains `/`"),
        (".hidden", "starts with a dot"),
    ] {
        let p = write(d.path(), "s.toml", &mini(name, "runs", "[0]", 2, ONE));
        let e = Suite::load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains("suite.name") && e.contains(why), "{name}: {e}");
        assert!(e.contains("s.toml:"), "{e}");
    }
    let p = write(
        d.path(),
        "v.toml",
        &mini("s", "runs", "[0]", 2, "[[variant]]\nname = \"a/b\"\n"),
    );
    let e = Suite::load(&p, &[]).unwrap_err().to_string();
    assert!(e.contains("variant name") && e.contains("`a/b`"), "{e}");
    // `a.b` and `a_b` sanitise to one folder name; with the same config
    // they would share a folder.
    let p = write(
        d.path(),
        "w.toml",
        &mini(
            "s",
            "runs",
            "[0]",
            2,
            "[[variant]]\nname = \"a.b\"\n\n[[variant]]\nname = \"a_b\"\n",
        ),
    );
    let e = Suite::load(&p, &[]).unwrap_err().to_string();
    assert!(e.contains("would share the run folder"), "{e}");
}

#[test]
fn rm_refuses_a_running_run_and_restore_brings_a_removed_one_back() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = write(p, "m.toml", &mini("m", "runs", "[0]", 2000, ONE));
    let db = p.join("m.db");
    let child = bin()
        .current_dir(p)
        .args(["run", s.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for(
        &db,
        "SELECT COUNT(*) FROM runs WHERE status = 'RUNNING' AND step > 2",
        Duration::from_secs(60)
    ));
    for args in [vec!["rm", "1", "--yes"], vec!["rm", "1", "--yes", "--force"]] {
        let mut a = args.clone();
        a.extend(["--db", "m.db"]);
        let o = run_in(p, &a);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("is RUNNING"), "{}", text(&o));
    }
    assert_eq!(
        one_value(
            &db,
            "SELECT status || ' ' || (removed_ms IS NULL) FROM runs WHERE id = 1"
        ),
        "RUNNING 1"
    );
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130));
    let step = one_value(&db, "SELECT step FROM runs WHERE id = 1");

    // Off a terminal rm asks for --yes and changes nothing.
    let o = run_in(p, &["rm", "1", "--db", "m.db"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        one_value(&db, "SELECT removed_ms IS NULL FROM runs WHERE id = 1"),
        "1"
    );
    ok(run_in(p, &["rm", "1", "--db", "m.db", "--yes"]));
    let listed = ok(run_in(p, &["runs", "--db", "m.db", "--format", "csv"]));
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(ok(run_in(p, &["show", "1", "--db", "m.db"])).contains("restore 1"));
    // The suite does not silently retrain it: it says why, exit 3.
    let o = run_in(p, &["run", s.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("removed with `rm`"), "{}", text(&o));
    // Restored, it is listed again with everything it had.
    ok(run_in(p, &["restore", "1", "--db", "m.db"]));
    let listed = ok(run_in(p, &["runs", "--db", "m.db", "--format", "csv"]));
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert_eq!(one_value(&db, "SELECT step FROM runs WHERE id = 1"), step);
    let metrics: usize = one_value(
        &db,
        "SELECT COUNT(*) FROM metrics WHERE run_id = 1 AND key = 'loss'",
    )
    .parse()
    .unwrap();
    assert!(metrics >= 3);
}

/// A SQLite file of another program: one table, one row.
fn foreign_db(path: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO notes (text) VALUES ('keep me')")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    });
}

#[test]
fn read_commands_create_nothing_and_foreign_files_stay_as_they_were() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = write(p, "m.toml", &mini("m", "runs", "[0]", 2, ONE));
    let commands: Vec<Vec<&str>> = vec![
        vec!["runs"],
        vec!["show", "1"],
        vec!["compare", "1", "2"],
        vec!["report", "--suite", "m", "--out", "rep"],
        vec!["query", "SELECT 1"],
        vec!["rm", "1", "--yes"],
        vec!["restore", "1"],
        vec!["gc", "--yes"],
    ];
    // A missing path: nothing is created, not even its folder.
    for c in &commands {
        let mut a = c.clone();
        a.extend(["--db", "sub/none.db"]);
        let o = run_in(p, &a);
        assert_eq!(o.status.code(), Some(1), "{c:?}: {}", text(&o));
        assert!(text(&o).contains("sub/none.db: no such database"), "{}", text(&o));
    }
    assert!(!p.join("sub").exists());
    // Another program's database, and an empty file: every command,
    // writers included, refuses them and changes no byte.
    let foreign = p.join("foreign.db");
    foreign_db(&foreign);
    std::fs::write(p.join("empty.db"), b"").unwrap();
    let before = fingerprint(p);
    for file in ["foreign.db", "empty.db"] {
        let mut all = commands.clone();
        if file == "foreign.db" {
            all.push(vec!["run", s.to_str().unwrap()]);
            all.push(vec!["bench", "kernels"]);
        }
        for c in &all {
            let mut a = c.clone();
            a.extend(["--db", file]);
            let o = run_in(p, &a);
            assert_eq!(o.status.code(), Some(1), "{c:?} on {file}: {}", text(&o));
            assert!(
                text(&o).contains(&format!("{file}: "))
                    && text(&o).contains("not an hmsa-lab results database"),
                "{c:?} on {file}: {}",
                text(&o)
            );
        }
    }
    let after = fingerprint(p);
    for (k, v) in &before {
        assert_eq!(after.get(k), Some(v), "{} changed", k.display());
    }
    let new: Vec<_> = after
        .keys()
        .filter(|k| !before.contains_key(*k) && !k.starts_with(p.join("data")))
        .collect();
    assert!(new.is_empty(), "created: {new:?}");
    // Our own WAL database, its writer gone (`run` checkpointed and left no
    // log): the read commands create nothing beside it, no -wal, no -shm.
    ok(run_in(p, &["run", s.to_str().unwrap()]));
    let wal = p.join("m.db-wal");
    if wal.exists() {
        // (an empty log: everything is in m.db, so closing is safe)
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
        std::fs::remove_file(wal).unwrap();
    }
    let _ = std::fs::remove_file(p.join("m.db-shm"));
    let names = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let listed = names();
    for c in [
        vec!["runs"],
        vec!["show", "1"],
        vec!["compare", "1", "1"],
        vec!["query", "SELECT COUNT(*) FROM runs"],
    ] {
        let mut a = c.clone();
        a.extend(["--db", "m.db"]);
        ok(run_in(p, &a));
        assert_eq!(names(), listed, "{c:?} created files beside the database");
    }
}

#[test]
fn query_refuses_vacuum_into_and_second_statements_and_interrupts_a_runaway_query() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = write(p, "m.toml", &mini("m", "runs", "[0]", 2, ONE));
    ok(run_in(p, &["run", s.to_str().unwrap()]));
    // `run` checkpointed its write-ahead log: the .db file alone, copied
    // without its -wal, has every result
    let wal = p.join("m.db-wal");
    assert!(
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
        "{} bytes left in the WAL",
        std::fs::metadata(&wal).unwrap().len()
    );
    std::fs::create_dir(p.join("alone")).unwrap();
    std::fs::copy(p.join("m.db"), p.join("alone/m.db")).unwrap();
    let q = "SELECT COUNT(*) FROM evaluations";
    assert_eq!(one_value(&p.join("alone/m.db"), q), one_value(&p.join("m.db"), q));
    assert_ne!(one_value(&p.join("alone/m.db"), q), "0");
    for sql in [
        "VACUUM INTO 'copy.db'",
        "SELECT 1; VACUUM INTO 'copy.db'",
        "/* c */ vacuum main into 'copy.db'",
        "UPDATE runs SET step = 0",
        "CREATE TABLE t (x)",
    ] {
        let o = run_in(p, &["query", sql, "--db", "m.db"]);
        assert_eq!(o.status.code(), Some(1), "{sql}");
        assert!(text(&o).contains("would write"), "{sql}: {}", text(&o));
    }
    assert!(!p.join("copy.db").exists());
    assert_eq!(one_value(&p.join("m.db"), "SELECT step FROM runs"), "2");
    // two result sets would share the first one's header: refused
    let o = run_in(
        p,
        &[
            "query",
            "SELECT id FROM runs; SELECT suite, seed FROM runs",
            "--db",
            "m.db",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("one statement at a time"), "{}", text(&o));
    // one statement with a trailing semicolon and comment is one statement
    let o = run_in(
        p,
        &["query", "SELECT COUNT(*) AS n FROM runs; -- done", "--db", "m.db"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = std::time::Instant::now();
    let o = run_in(
        p,
        &[
            "query",
            "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT max(i) FROM r",
            "--db",
            "m.db",
            "--timeout",
            "0.5",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("stopped after 0.5 s (--timeout)"),
        "{}",
        text(&o)
    );
    // The query was interrupted, not left to run (a generous bound: the
    // process starts, opens the database and stops in well under this).
    assert!(t.elapsed() < Duration::from_secs(20));
}

fn trained_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.ends_with(": Trained"))
        .map(String::from)
        .collect()
}

#[test]
fn two_forced_reruns_train_each_run_once() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = write(p, "m.toml", &mini("m", "runs", "[0, 1]", 20, TWO));
    ok(run_in(p, &["run", s.to_str().unwrap()]));
    let spawn = || {
        bin()
            .current_dir(p)
            .args(["run", s.to_str().unwrap(), "--force"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (ta, tb) = (trained_lines(&a), trained_lines(&b));
    assert_eq!(ta.len() + tb.len(), 4, "a: {}\nb: {}", text(&a), text(&b));
    for l in &ta {
        assert!(!tb.contains(l), "{l} trained twice");
    }
    for o in [&a, &b] {
        assert!(matches!(o.status.code(), Some(0) | Some(3)), "{}", text(o));
    }
    assert_eq!(
        one_value(
            &p.join("m.db"),
            "SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'"
        ),
        "4"
    );
}

#[test]
fn a_rerun_right_after_kill_9_finishes_everything() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = write(p, "m.toml", &mini("m", "runs", "[0]", 60, TWO));
    let db = p.join("m.db");
    let mut child = bin()
        .current_dir(p)
        .args(["run", s.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = wait_for(
        &db,
        "SELECT COUNT(*) FROM runs WHERE status = 'RUNNING' AND step > 5",
        Duration::from_secs(60),
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(ready);
    // At once, with the default --stale-after (60 s): the holder is gone.
    let o = run_in(p, &["run", s.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("0 held elsewhere, 0 failed"), "{}", text(&o));
    assert_eq!(
        one_value(&db, "SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'"),
        "2"
    );
}

#[test]
fn sigint_and_sigterm_mark_the_run_killed_and_the_rerun_resumes_it() {
    for sig in ["-INT", "-TERM"] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let s = write(p, "m.toml", &mini("m", "runs", "[0]", 400, ONE));
        let db = p.join("m.db");
        let child = bin()
            .current_dir(p)
            .args(["run", s.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(wait_for(
            &db,
            "SELECT COUNT(*) FROM runs WHERE status = 'RUNNING' AND step > 7",
            Duration::from_secs(60)
        ));
        Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(130), "{sig}: {}", text(&o));
        assert!(text(&o).contains("interrupted"), "{}", text(&o));
        let line = one_value(&db, "SELECT status || ' ' || step FROM runs WHERE id = 1");
        assert!(line.starts_with("KILLED "), "{sig}: {line}");
        let step: usize = line.split(' ').nth(1).unwrap().parse().unwrap();
        let dir = one_value(&db, "SELECT run_dir FROM runs WHERE id = 1");
        let latest = std::fs::read_to_string(p.join(&dir).join("ckpt/latest")).unwrap();
        assert_eq!(
            latest.trim(),
            format!("step-{step:07}"),
            "checkpointed where it stopped"
        );
        // The rerun resumes: the steps before the signal keep their rows
        // (written before it), the rest are added, each once.
        let early = sqlite(
            &db,
            &format!("SELECT step, time_ms FROM metrics WHERE run_id = 1 AND key = 'loss' AND step <= {step} ORDER BY step"),
        );
        ok(run_in(p, &["run", s.to_str().unwrap()]));
        let again = sqlite(
            &db,
            &format!("SELECT step, time_ms FROM metrics WHERE run_id = 1 AND key = 'loss' AND step <= {step} ORDER BY step"),
        );
        assert_eq!(early, again, "{sig}: steps before the signal were retrained");
        assert_eq!(
            one_value(&db, "SELECT status || ' ' || step FROM runs WHERE id = 1"),
            "FINISHED 400"
        );
        assert_eq!(
            one_value(&db, "SELECT COUNT(DISTINCT step) || ' ' || COUNT(*) FROM metrics WHERE run_id = 1 AND key = 'loss'"),
            "400 400"
        );
    }
}

#[test]
fn processes_started_at_once_on_a_new_database_all_succeed() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = write(p, "m.toml", &mini("m", "runs", "[0]", 2, ONE));
    // The data first, so that the trials race on the database only.
    ok(run_in(
        p,
        &[
            "synth",
            "--suite",
            s.to_str().unwrap(),
            "--out",
            "data/mini-synth",
        ],
    ));
    for trial in 0..12 {
        let db = format!("t{trial}.db");
        let children: Vec<_> = (0..4)
            .map(|_| {
                bin()
                    .current_dir(p)
                    .args(["run", s.to_str().unwrap(), "--dry-run", "--db", &db])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "trial {trial}: {}", text(&o));
        }
        assert_eq!(
            one_value(&p.join(&db), "SELECT COUNT(*) FROM _sqlx_migrations"),
            "3"
        );
    }
}

#[test]
fn bad_values_are_refused_before_anything_trains() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        ("[0, 0]", "", "suite.seeds: seed 0 is listed twice"),
        ("[0]", "data = { val_limit = 0 }", "data.val_limit"),
        ("[0]", "train = { optim = { lr = -0.1 } }", "train.optim.lr"),
        (
            "[0]",
            "data = { augment = { crop = [48, 64] } }",
            "multiples of 32",
        ),
        ("[0]", "data = { synth = { height = 16 } }", "data.synth.height"),
        ("[0]", "data = { synth = { width = 0 } }", "data.synth.width"),
        // ranges: refused by key and range before anything is allocated
        (
            "[0]",
            "train = { batch = 1000000000 }",
            "`train.batch`: 1000000000 is not in 1..=1024",
        ),
        ("[0]", "train = { steps = 9223372036854775807 }", "train.steps"),
        (
            "[0]",
            "train = { loss = { aux_weight = -1.0 } }",
            "train.loss.aux_weight",
        ),
        (
            "[0]",
            "data = { augment = { crop = [65536, 131072] } }",
            "at most 8192",
        ),
        (
            "[0]",
            "data = { sampler = { tile = 0 } }",
            "`data.sampler.tile`: 0 is not in 1..=8192",
        ),
        ("[0]", "data = { workers = 100000 }", "data.workers"),
        ("[0]", "data = { synth = { train = 0 } }", "data.synth.train"),
        (
            "[0]",
            "eval = [{ scales = [1e9], fusion = \"single\" }]",
            "not in 1/64..=8",
        ),
    ];
    for (seeds, extra, want) in cases {
        let v = format!("[[variant]]\nname = \"v\"\n{extra}\n");
        let p = write(d.path(), "b.toml", &mini("b", "runs", seeds, 2, &v));
        let e = Suite::load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("b.toml"), "{extra}: {e}");
    }
    let teacher = "[[variant]]\nname = \"t\"\n\n[[variant]]\nname = \"s\"\nteacher = \"t\"\n";
    for (al, want) in [
        ("threshold = 1.5", "autolabel.threshold: 1.5"),
        ("threshold = 0.0", "autolabel.threshold: 0"),
        ("share = 1.5", "autolabel.share: 1.5"),
    ] {
        let v = format!("{teacher}autolabel = {{ {al} }}\n");
        let p = write(d.path(), "a.toml", &mini("a", "runs", "[0]", 2, &v));
        let e = Suite::load(&p, &[]).unwrap_err().to_string();
        assert!(e.contains(want), "{al}: {e}");
    }
    // `synth --config` with a tiny scene: an error naming the file, no panic.
    for (h, w) in [(16, 16), (8, 64), (0, 0)] {
        let c = write(
            d.path(),
            "s.toml",
            &format!("height = {h}\nwidth = {w}\ntrain = 1\nval = 1\n"),
        );
        let o = run_in(
            d.path(),
            &["synth", "--config", c.to_str().unwrap(), "--out", "x"],
        );
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            text(&o).contains("s.toml") && text(&o).contains("smallest scene"),
            "{}",
            text(&o)
        );
    }
}

#[test]
fn a_run_that_cannot_write_its_folder_is_recorded_failed_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = write(p, "m.toml", &mini("m", "runs", "[0]", 2, ONE));
    // A file where the suite's folder goes: every write into it fails.
    std::fs::create_dir_all(p.join("runs")).unwrap();
    std::fs::write(p.join("runs/m"), "in the way").unwrap();
    let o = run_in(p, &["run", s.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("runs/m/"),
        "the error names the path: {}",
        text(&o)
    );
    let row = one_value(
        &p.join("m.db"),
        "SELECT status || ' ' || error FROM runs WHERE id = 1",
    );
    assert!(row.starts_with("FAILED ") && row.contains("runs/m/"), "{row}");
    std::fs::remove_file(p.join("runs/m")).unwrap();
    ok(run_in(p, &["run", s.to_str().unwrap()]));
    assert_eq!(
        one_value(&p.join("m.db"), "SELECT status FROM runs WHERE id = 1"),
        "FINISHED"
    );
}

/// A float as TOML writes it (`nan`, `inf`, `-inf`, else Rust's shortest
/// round-trip form, which TOML reads back).
fn toml_f64(f: f64) -> String {
    if f.is_nan() {
        "nan".into()
    } else if f.is_infinite() {
        if f > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{f:?}")
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 96, ..Default::default() })]

    /// The suite loader given any value of a numeric key's own type (any
    /// integer TOML holds for a count, any u32 for a crop or tile, any
    /// float): the suite loads, or it is refused with the file and the
    /// key; never a panic. (Values outside the type, such as a negative
    /// count, are refused naming the section: the reliability issue's
    /// item 6.)
    #[test]
    fn suite_numbers_load_or_are_refused_by_key(
        (key, table) in proptest::prop_oneof![
            (0u64..=i64::MAX as u64).prop_map(|v| ("train.batch", format!("train = {{ batch = {v} }}"))),
            (0u64..=i64::MAX as u64).prop_map(|v| ("train.steps", format!("train = {{ steps = {v} }}"))),
            (0u64..=i64::MAX as u64).prop_map(|v| ("train.checkpoint_every", format!("train = {{ checkpoint_every = {v} }}"))),
            (0u64..=i64::MAX as u64).prop_map(|v| ("data.workers", format!("data = {{ workers = {v} }}"))),
            (0u64..=i64::MAX as u64).prop_map(|v| ("data.prefetch", format!("data = {{ prefetch = {v} }}"))),
            proptest::num::u32::ANY.prop_map(|v| ("data.sampler.tile", format!("data = {{ sampler = {{ tile = {v} }} }}"))),
            proptest::num::u32::ANY.prop_map(|v| ("data.augment.crop", format!("data = {{ augment = {{ crop = [{v}, 64] }} }}"))),
            (0u64..=i64::MAX as u64).prop_map(|v| ("data.synth.train", format!("data = {{ synth = {{ train = {v} }} }}"))),
            proptest::num::f64::ANY.prop_map(|f| ("train.loss.aux_weight", format!("train = {{ loss = {{ aux_weight = {} }} }}", toml_f64(f)))),
            proptest::num::f64::ANY.prop_map(|f| ("train.optim.lr", format!("train = {{ optim = {{ lr = {} }} }}", toml_f64(f)))),
            proptest::num::f64::ANY.prop_map(|f| ("train.optim.momentum", format!("train = {{ optim = {{ momentum = {} }} }}", toml_f64(f)))),
            proptest::num::f64::ANY.prop_map(|f| ("data.sampler.class_uniform", format!("data = {{ sampler = {{ class_uniform = {} }} }}", toml_f64(f)))),
            proptest::num::f64::ANY.prop_map(|f| ("eval.sets[0].scales", format!("eval = [{{ scales = [{}], fusion = \"single\" }}]", toml_f64(f)))),
        ]
    ) {
        let d = tempfile::tempdir().unwrap();
        let v = format!("[[variant]]\nname = \"v\"\n{table}\n");
        let p = write(d.path(), "p.toml", &mini("p", "runs", "[0]", 2, &v));
        if let Err(e) = Suite::load(&p, &[]) {
            let e = e.to_string();
            proptest::prop_assert!(e.contains(key) && e.contains("p.toml"), "{table}: {e}");
        }
    }
}

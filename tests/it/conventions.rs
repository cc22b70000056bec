//! The command line's conventions: typed machine output, exit codes,
//! errors that name the flag, runs addressed by name, progress lines off a
//! terminal, the dry run's evaluations and the default-database rule.

use super::lab::{bin, ok, write};
use std::path::Path;
use std::process::{Output, Stdio};

const SUITE: &str = r#"
[suite]
name = "c"
seeds = [0, 1]

[defaults.model]
ocr_mid_channels = 8
ocr_key_channels = 4
attn_bottleneck = 4
fusion = "single"
scales = [1.0]
[defaults.model.backbone]
stem_width = 8
layer1_planes = 4
layer1_blocks = 1
widths = [4, 8, 8, 8]
modules = [1, 1, 1]
blocks = [1, 1, 1]
[defaults.data]
synth_dir = "data/c-synth"
val_limit = 2
[defaults.data.synth]
height = 64
width = 128
train = 3
val = 2
train_extra = 0
[defaults.data.augment]
crop = [64, 128]
[defaults.train]
steps = 3
batch = 1
checkpoint_every = 3

[[variant]]
name = "base"
eval = [{ scales = [1.0], fusion = "single" }, { scales = [0.5, 1.0], fusion = "average" }]
"#;

fn run_in(dir: &Path, args: &[&str]) -> Output {
    bin()
        .current_dir(dir)
        .env_remove("HMSA_DB")
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

#[test]
fn machine_output_is_typed_and_runs_have_names() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = write(p, "c.toml", SUITE);
    // the dry run lists each run's evaluations, none recorded yet
    let plan = ok(run_in(
        p,
        &["run", s.to_str().unwrap(), "--dry-run", "--db", "c.db"],
    ));
    assert!(
        plan.contains("single 1.0 –") && plan.contains("average 0.5,1.0 –"),
        "{plan}"
    );
    ok(run_in(p, &["run", s.to_str().unwrap(), "--db", "c.db"]));
    let plan = ok(run_in(
        p,
        &["run", s.to_str().unwrap(), "--dry-run", "--db", "c.db"],
    ));
    assert!(
        plan.contains("single 1.0 ✓") && plan.contains("average 0.5,1.0 ✓"),
        "{plan}"
    );

    // runs: numbers as numbers, snake_case keys
    let v: serde_json::Value =
        serde_json::from_str(&ok(run_in(p, &["runs", "--db", "c.db", "--format", "json"]))).unwrap();
    let r0 = &v[0];
    assert_eq!(r0["seed"], 0);
    assert_eq!(r0["status"], "FINISHED");
    assert_eq!(r0["eval_scales"], "1.0");
    assert!(r0["miou"].is_f64() && r0["seconds"].is_f64(), "{r0}");
    let csv = ok(run_in(p, &["runs", "--db", "c.db", "--format", "csv"]));
    assert!(
        csv.starts_with("id,suite,variant,seed,status,step,miou,"),
        "{csv}"
    );
    // query: typed values, null for NULL; params are plain text
    let q: serde_json::Value = serde_json::from_str(&ok(run_in(
        p,
        &[
            "query",
            "SELECT id, step, NULL AS missing, (SELECT value FROM params WHERE run_id = 1 AND key = 'model.fusion') AS fusion FROM runs WHERE id = 1",
            "--db",
            "c.db",
            "--format",
            "json",
        ],
    )))
    .unwrap();
    assert_eq!(
        q,
        serde_json::json!([{"id": 1, "step": 3, "missing": null, "fusion": "single"}])
    );
    // show and compare, by name
    let sh: serde_json::Value = serde_json::from_str(&ok(run_in(
        p,
        &["show", "base/1", "--db", "c.db", "--format", "json"],
    )))
    .unwrap();
    assert_eq!(sh["run"]["id"], 2);
    assert_eq!(sh["run"]["seed"], 1);
    assert_eq!(sh["evaluations"].as_array().unwrap().len(), 2);
    assert!(sh["evaluations"][0]["class_iou"].is_array());
    let cmp: serde_json::Value = serde_json::from_str(&ok(run_in(
        p,
        &["compare", "base/0", "2", "--db", "c.db", "--format", "json"],
    )))
    .unwrap();
    assert_eq!(cmp["runs"], serde_json::json!([1, 2]));
    assert!(cmp["params"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["key"] == "train.seed"));
    assert_eq!(cmp["evaluations"][0]["delta"][0], 0.0);
    let o = run_in(p, &["show", "nothing/0", "--db", "c.db"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no run `nothing/0`"), "{}", text(&o));
}

#[test]
fn exit_codes_and_errors_that_name_the_flag() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = write(p, "c.toml", SUITE);
    // 2: a usage error (clap)
    assert_eq!(run_in(p, &["runs", "--format", "yaml"]).status.code(), Some(2));
    assert_eq!(run_in(p, &["nonsense"]).status.code(), Some(2));
    // a file error names the operation and the path, and the OS's reason once
    let o = run_in(p, &["train", "--config", "missing.toml", "--out", "o"]);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o);
    assert!(e.contains("reading missing.toml: "), "{e}");
    assert_eq!(e.matches("os error 2").count(), 1, "{e}");
    // closed sets of values are checked by the parser and listed
    for args in [
        &["infer", "--fusion", "mean", "x.png"][..],
        &["model", "--preset", "w99"][..],
        &["bench", "--precision", "f64"][..],
    ] {
        let o = run_in(p, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(text(&o).contains("[possible values:"), "{args:?}: {}", text(&o));
    }
    // 1: a runtime error; --set names the flag, not a line of the file
    let o = run_in(
        p,
        &[
            "run",
            s.to_str().unwrap(),
            "--set",
            "train.stepz=10",
            "--db",
            "c.db",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o);
    assert!(
        e.contains("--set train.stepz=10") && e.contains("unknown field `stepz`") && !e.contains("c.toml:"),
        "{e}"
    );
    // 3: ran and found problems (a removed run is left unfinished)
    ok(run_in(p, &["run", s.to_str().unwrap(), "--db", "c.db"]));
    ok(run_in(p, &["rm", "1", "--yes", "--db", "c.db"]));
    assert_eq!(
        run_in(p, &["run", s.to_str().unwrap(), "--db", "c.db"])
            .status
            .code(),
        Some(3)
    );
}

#[test]
fn progress_lines_appear_off_a_terminal() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = write(p, "c.toml", SUITE);
    let o = bin()
        .current_dir(p)
        .env_remove("HMSA_NO_PROGRESS")
        .env("HMSA_PROGRESS_SECS", "0")
        .args(["run", s.to_str().unwrap(), "--db", "c.db"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    for line in [
        "[run 1/2] base seed 0 step 1/3 loss",
        "[run 1/2] base seed 0 step 3/3 loss",
        "[run 2/2] base seed 1 step 2/3 loss",
        "[run 2/2] base seed 1 evaluating 2 set(s) on 2 validation image(s)",
    ] {
        assert!(e.contains(line), "{line} not in\n{e}");
    }
    assert!(e.contains(" ETA "), "{e}");
}

#[test]
fn one_rule_picks_the_default_database() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::create_dir_all(p.join("experiments")).unwrap();
    // none: an error that says what to give
    let o = run_in(p, &["runs"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("give --db (or $HMSA_DB)"), "{}", text(&o));
    // one: it is used, whichever command
    let s = write(&p.join("experiments"), "c.toml", SUITE);
    ok(run_in(p, &["run", s.to_str().unwrap()]));
    assert!(p.join("experiments/c.db").exists());
    assert!(ok(run_in(p, &["show", "base/0"])).contains("variant base, seed 0"));
    // two: an error listing them; $HMSA_DB or a named suite decides
    ok(run_in(
        p,
        &[
            "run",
            s.to_str().unwrap(),
            "--dry-run",
            "--db",
            "experiments/d.db",
        ],
    ));
    let o = run_in(p, &["show", "1"]);
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o);
    assert!(
        e.contains("experiments/c.db") && e.contains("experiments/d.db"),
        "{e}"
    );
    assert!(ok(run_in(p, &["runs", "--suite", "c"])).contains("base"));
    let o = bin()
        .current_dir(p)
        .env("HMSA_DB", "experiments/d.db")
        .args(["runs", "--format", "json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "[]",
        "d.db holds no run yet"
    );
}

//! The lab: suite files, the plan, running suites into a database, kill -9
//! and Ctrl-C mid-run, two processes at once, queries and reports.

use hmsa_lab::config::suite::{parse_set, Suite};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hmsa-lab"));
    c.env("HMSA_NO_PROGRESS", "1");
    c
}

pub(crate) fn quick() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments/quick.toml")
}

pub(crate) fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const HEAD: &str = r#"
[suite]
name = "t"
seeds = [0, 1]

[defaults.model]
fusion = "single"
scales = [1.0]
"#;

#[test]
fn suite_errors_name_file_line_and_key() {
    let d = tempfile::tempdir().unwrap();
    let err = |body: &str| {
        Suite::load(&write(d.path(), "s.toml", &format!("{HEAD}{body}")), &[])
            .unwrap_err()
            .to_string()
    };
    let e = err("[[variant]]\nname = \"a\"\nmodel = { widht = 3 }\n");
    assert!(
        e.contains("s.toml:9") && e.contains("widht") && e.contains("variant `a`"),
        "{e}"
    );
    let e = err("[[variant]]\nname = \"a\"\ntrain = { steps = \"ten\" }\n");
    assert!(e.contains("s.toml:9") && e.contains("invalid type"), "{e}");
    let e = err("[[variant]]\nname = \"a\"\nmodel = { fusion = \"hierarchical\", scales = [0.5, 2.0] }\n");
    assert!(e.contains("needs 1.0"), "{e}");
    let e = err("[[variant]]\nname = \"a\"\nteacher = \"nobody\"\n");
    assert!(e.contains("teacher `nobody`, which does not exist"), "{e}");
    let e = err("[[variant]]\nname = \"a\"\nteacher = \"b\"\n[[variant]]\nname = \"b\"\nteacher = \"a\"\n");
    assert!(e.contains("dependency cycle: a -> b -> a"), "{e}");
    let student = |al: &str| {
        format!(
            "[[variant]]\nname = \"a\"\n[[variant]]\nname = \"b\"\nteacher = \"a\"\nautolabel = {{ {al} }}\n"
        )
    };
    let e = err(&student("boost_classes = [\"pole\", \"tree\"]"));
    assert!(
        e.contains("s.toml:11") && e.contains("unknown class `tree`") && e.contains("traffic sign"),
        "{e}"
    );
    let e = err(&student("share = 0.5, boost_classes = [\"pole\"]"));
    assert!(e.contains("exclude each other"), "{e}");
    let e = err(&student("share = 1.5"));
    assert!(e.contains("autolabel.share"), "{e}");
    let e = err("[[variant]]\nname = \"a\"\nbogus = 1\n");
    assert!(e.contains("s.toml:1") && e.contains("bogus"), "{e}");
    let e = Suite::load(
        &write(
            d.path(),
            "t.toml",
            "[suite]\nname = \"x\"\n[defaults.train]\nstepz = 3\n[[variant]]\nname = \"a\"\n",
        ),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("t.toml:3") && e.contains("stepz"), "{e}");
}

#[test]
fn plan_expands_sweeps_and_seeds_in_dependency_order() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "s.toml",
        &format!(
            "{HEAD}[[variant]]\nname = \"student\"\nteacher = \"teach\"\n\n[[variant]]\nname = \"teach\"\nsweep = {{ \"train.optim.lr\" = [0.01], \"train.batch\" = [2] }}\n\n[[variant]]\nname = \"lr\"\nsweep = {{ \"train.optim.lr\" = [0.01, 0.02] }}\n"
        ),
    );
    let s = Suite::load(&p, &[parse_set("train.steps=7").unwrap()]).unwrap();
    let names: Vec<(String, u64)> = s.runs.iter().map(|r| (r.variant.clone(), r.seed)).collect();
    assert_eq!(
        names,
        vec![
            ("teach[batch=2,lr=0.01]".into(), 0),
            ("teach[batch=2,lr=0.01]".into(), 1),
            ("student".into(), 0),
            ("student".into(), 1),
            ("lr[lr=0.01]".into(), 0),
            ("lr[lr=0.01]".into(), 1),
            ("lr[lr=0.02]".into(), 0),
            ("lr[lr=0.02]".into(), 1),
        ]
    );
    assert!(
        s.runs.iter().all(|r| r.config.train.steps == 7),
        "--set applies to every run"
    );
    // The teacher of the seed-1 student is the seed-1 teacher.
    assert_eq!(s.runs[3].teacher, Some(1));
    // The hash leaves out the seed and depends on everything else.
    assert_eq!(s.runs[4].hash, s.runs[5].hash);
    assert_ne!(s.runs[4].hash, s.runs[6].hash);
    assert_eq!(s.runs[4].config.train.optim.lr, 0.01);
    assert_eq!(s.runs[5].config.train.seed, 1);
    assert_eq!(s.baseline, "student");
}

/// The resolved config and trained network of run `variant`/`seed` in the
/// database `db` of a suite run from `dir`.
fn run_network(
    dir: &Path,
    db: &Path,
    variant: &str,
    seed: u64,
) -> (hmsa_lab::config::RunConfig, hmsa_lab::model::HmsaNet) {
    let one = |col: &str| {
        sqlite(
            db,
            &format!("SELECT {col} FROM runs WHERE variant = '{variant}' AND seed = {seed}"),
        )
        .lines()
        .nth(1)
        .unwrap()
        .to_string()
    };
    let cfg: hmsa_lab::config::RunConfig =
        serde_json::from_str(&one("config_json").trim_matches('"').replace("\"\"", "\"")).unwrap();
    let weights = dir.join(one("run_dir")).join("model.safetensors");
    let net = hmsa_lab::model::checkpoint::load(&cfg.model, &weights, &candle_core::Device::Cpu).unwrap();
    (cfg, net)
}

/// Copies quick.toml into `dir` and runs commands from there, so data,
/// runs and the database land in the temporary folder.
pub(crate) fn quick_in(dir: &Path) -> PathBuf {
    let p = dir.join("quick.toml");
    std::fs::copy(quick(), &p).unwrap();
    p
}

pub(crate) fn sqlite(db: &Path, sql: &str) -> String {
    let o = bin()
        .args(["query", sql, "--db", db.to_str().unwrap(), "--format", "csv"])
        .output()
        .unwrap();
    ok(o)
}

/// The attention maps a run's evaluation wrote (which the report draws
/// without running the network) against the network run again on the
/// stored image with the run's weights, by `HmsaNet::infer`.
fn attention_artifacts_are_the_networks_maps(dir: &Path, db: &Path, rep: &Path) {
    let rows = sqlite(
        db,
        "SELECT r.config_json, r.run_dir, a.path FROM artifacts a JOIN runs r ON r.id = a.run_id \
         WHERE a.kind = 'attention' AND r.variant = 'hierarchical' ORDER BY a.path",
    );
    let mut rdr = csv::Reader::from_reader(rows.as_bytes());
    let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.unwrap()).collect();
    // two images for each of the variant's three hierarchical sets, two seeds
    assert_eq!(rows.len(), 12, "{rows:?}");
    let cfg: hmsa_lab::config::RunConfig = serde_json::from_str(&rows[0][0]).unwrap();
    let dev = candle_core::Device::Cpu;
    let weights = dir.join(&rows[0][1]).join("model.safetensors");
    let net = hmsa_lab::model::checkpoint::load(&cfg.model, &weights, &dev).unwrap();
    let file = dir.join(&rows[0][2]);
    let a = hmsa_lab::eval::read_attention(&file).unwrap();
    let tag = file.parent().unwrap().file_name().unwrap().to_str().unwrap();
    let scales: hmsa_lab::model::Scales = tag.strip_prefix("hierarchical_").unwrap().parse().unwrap();
    let x = hmsa_lab::data::image::normalize(&a.image, &dev).unwrap();
    let (fused, _) = net
        .infer(&x, hmsa_lab::model::Fusion::Hierarchical, &scales, false, false)
        .unwrap();
    assert_eq!(a.maps.len(), fused.attn.len());
    assert!(!a.maps.is_empty());
    for ((s0, m0), (s1, m1)) in a.maps.iter().zip(&fused.attn) {
        assert_eq!(s0, s1);
        let d = (m0 - m1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "scale {s0}: maps differ by {d}");
    }
    for i in 0..2 {
        let found = std::fs::read_dir(rep.join("figures")).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("attention_{i}_"))
        });
        assert!(found, "attention panel {i} missing");
    }
}

#[test]
fn quick_suite_end_to_end_rerun_does_nothing_and_reports() {
    let d = tempfile::tempdir().unwrap();
    let suite = quick_in(d.path());
    let out = ok(bin()
        .current_dir(d.path())
        .args(["run", suite.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(out.contains("10 runs, 10 trained"), "{out}");
    let db = d.path().join("quick.db");
    assert!(db.exists(), "the database sits beside the suite");
    let again = ok(bin()
        .current_dir(d.path())
        .args(["run", suite.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(
        again.contains("0 trained, 0 evaluated, 10 already done"),
        "{again}"
    );
    // every finished run has every evaluation its variant lists: 6+1+3+2+1 per seed
    let n = sqlite(&db, "SELECT COUNT(*) AS n FROM evaluations");
    assert_eq!(n.lines().nth(1).unwrap(), "26");
    let runs = ok(bin()
        .args([
            "runs",
            "--db",
            db.to_str().unwrap(),
            "--status",
            "finished",
            "--format",
            "json",
        ])
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(&runs).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 10);
    // show: provenance, and each evaluation's mIoU as the database holds it
    let shown = ok(bin()
        .args(["show", "1", "--db", db.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(shown.contains("status FINISHED at step 12"), "{shown}");
    let host = sqlite(&db, "SELECT host FROM runs WHERE id = 1");
    assert!(
        shown.contains(&format!("host {}", host.lines().nth(1).unwrap())),
        "{shown}"
    );
    let mious = sqlite(&db, "SELECT miou FROM evaluations WHERE run_id = 1");
    assert_eq!(mious.lines().count(), 7);
    for m in mious.lines().skip(1) {
        let cell = format!("{:.2}", 100.0 * m.parse::<f64>().unwrap());
        assert!(shown.contains(&cell), "{cell} not in {shown}");
    }
    // [eval] every = 6: validation mIoU at steps 6 and 12; at step 12 the
    // weights are the final ones, so it equals the final evaluation
    let val = sqlite(
        &db,
        "SELECT step, value FROM metrics WHERE run_id = 1 AND key = 'val_miou/single 1.0' ORDER BY step",
    );
    let val: Vec<(i64, f64)> = val
        .lines()
        .skip(1)
        .map(|l| {
            let (a, b) = l.split_once(',').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(val.iter().map(|v| v.0).collect::<Vec<_>>(), vec![6, 12]);
    let fin: f64 = sqlite(
        &db,
        "SELECT miou FROM evaluations WHERE run_id = 1 AND scales = '1.0' AND fusion = 'single'",
    )
    .lines()
    .nth(1)
    .unwrap()
    .parse()
    .unwrap();
    assert!((val[1].1 - fin).abs() < 1e-12, "{val:?} vs {fin}");
    // compare shows only what differs
    let cmp = ok(bin()
        .args(["compare", "1", "5", "--db", db.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(
        cmp.contains("model.fusion") && !cmp.contains("train.batch"),
        "{cmp}"
    );
    // the report
    let rep = d.path().join("rep");
    let o = ok(bin()
        .current_dir(d.path())
        .args([
            "report",
            "--suite",
            "quick",
            "--db",
            db.to_str().unwrap(),
            "--out",
            rep.to_str().unwrap(),
        ])
        .output()
        .unwrap());
    assert!(o.contains("hierarchical+auto"));
    for f in [
        "index.md",
        "index.html",
        "figures/miou.png",
        "figures/miou.svg",
        "figures/training_curves.png",
        "figures/validation_miou.png",
        "figures/class_iou.svg",
        "figures/confusion.png",
    ] {
        assert!(rep.join(f).exists(), "{f} missing");
    }
    let md = std::fs::read_to_string(rep.join("index.md")).unwrap();
    assert!(md.contains("| baseline | 1.0 | single | no |"), "{md}");
    assert!(md.contains("![miou](figures/miou.png)"));
    attention_artifacts_are_the_networks_maps(d.path(), &db, &rep);
    // a run whose attention maps are gone (or that was evaluated before
    // they were kept) is evaluated again for them, once
    let folder = sqlite(
        &db,
        "SELECT path FROM artifacts WHERE kind = 'attention' ORDER BY path LIMIT 1",
    );
    let folder = csv::Reader::from_reader(folder.as_bytes())
        .records()
        .next()
        .unwrap()
        .unwrap()[0]
        .to_string();
    let folder = d.path().join(folder).parent().unwrap().to_path_buf();
    std::fs::remove_dir_all(&folder).unwrap();
    let third = ok(bin()
        .current_dir(d.path())
        .args(["run", suite.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(
        third.contains("0 trained, 1 evaluated, 9 already done"),
        "{third}"
    );
    assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 2);
    let fourth = ok(bin()
        .current_dir(d.path())
        .args(["run", suite.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(
        fourth.contains("0 trained, 0 evaluated, 10 already done"),
        "{fourth}"
    );
    // Every number the report and the README section show, recomputed
    // from the database by another route.
    let readme = d.path().join("README.md");
    std::fs::write(
        &readme,
        format!(
            "# x\n\n{}\nold\n{}\n",
            hmsa_lab::report::README_BEGIN,
            hmsa_lab::report::README_END
        ),
    )
    .unwrap();
    ok(bin()
        .current_dir(d.path())
        .args([
            "report",
            "--suite",
            "quick",
            "--db",
            db.to_str().unwrap(),
            "--out",
            rep.to_str().unwrap(),
            "--readme",
            readme.to_str().unwrap(),
        ])
        .output()
        .unwrap());
    let section = std::fs::read_to_string(&readme).unwrap();
    assert!(
        !section.contains("\nold\n") && section.starts_with("# x\n"),
        "{section}"
    );
    super::report::check_report_numbers(&db, &rep, &section, "baseline");
    // [eval] fit: every run scored its first evaluation on its own
    // training images; the baseline's (seed 0) equals its network
    // evaluated here on the train split's 8 images.
    assert_eq!(
        sqlite(&db, "SELECT COUNT(*) FROM metrics WHERE key LIKE 'train_miou/%'")
            .lines()
            .nth(1)
            .unwrap(),
        "10"
    );
    {
        let (cfg, net) = run_network(d.path(), &db, "baseline", 0);
        let dev = candle_core::Device::Cpu;
        let train = hmsa_lab::data::Dataset::cityscapes(
            &d.path().join("data/quick-synth"),
            "train",
            hmsa_lab::data::Labels::Fine,
        )
        .unwrap();
        assert_eq!(train.len(), 8);
        let want = hmsa_lab::eval::evaluate(&net, &train, &cfg.eval.sets[..1], &dev).unwrap()[0]
            .metrics
            .miou;
        let got: f64 = sqlite(
            &db,
            "SELECT m.value FROM metrics m JOIN runs r ON r.id = m.run_id \
             WHERE r.variant = 'baseline' AND r.seed = 0 AND m.key = 'train_miou/single 1.0'",
        )
        .lines()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
        assert!(
            (got - want).abs() < 1e-9,
            "train mIoU {got} recorded, {want} recomputed"
        );
        assert!(md.contains("## Fit: training images against validation"), "{md}");
    }
    // The premise table: the baseline's single-scale IoU per class, its
    // cells recomputed here from the evaluations table (seed mean, %).
    assert!(md.contains("## Premise"), "{md}");
    let road_at = |scale: &str| -> f64 {
        let out = sqlite(
            &db,
            &format!(
                "SELECT json_extract(e.class_iou, '$[0]') AS v FROM evaluations e JOIN runs r ON r.id = e.run_id \
                 WHERE r.variant = 'baseline' AND e.fusion = 'single' AND e.scales = '{scale}'"
            ),
        );
        let v: Vec<f64> = out.lines().skip(1).map(|l| l.trim().parse().unwrap()).collect();
        assert_eq!(v.len(), 2, "{out}");
        100.0 * (v[0] + v[1]) / 2.0
    };
    let line = md
        .lines()
        .find(|l| l.starts_with("| road |"))
        .expect("a road row");
    let cells: Vec<&str> = line.split('|').map(str::trim).collect();
    for (i, scale) in ["0.5", "1.0", "2.0"].iter().enumerate() {
        let shown: f64 = cells[2 + i].split(' ').next().unwrap().parse().unwrap();
        assert!((shown - road_at(scale)).abs() < 0.006, "road at {scale}: {line}");
    }
    // Auto-labelling: the teacher's score and what the threshold kept.
    assert!(md.contains("## Auto-labelling"), "{md}");
    let kept = sqlite(
        &db,
        "SELECT COUNT(*) AS n FROM metrics WHERE key = 'autolabel_images' AND value = 8",
    );
    assert_eq!(
        kept.lines().nth(1).unwrap(),
        "4",
        "every student labelled train_extra's 8 images"
    );
    // The student's second source holds the teacher's labels: its labelIds
    // equal the teacher's hierarchical {0.5, 1, 2} prediction where the top
    // probability reaches the threshold (0.5 in quick.toml) and 0
    // (unlabelled) elsewhere, recomputed here
    // from the teacher's weights; the student trains on them at share 0.5.
    let one = |sql: &str| sqlite(&db, sql).lines().nth(1).unwrap().to_string();
    let student = one("SELECT id FROM runs WHERE variant = 'hierarchical+auto' AND seed = 0");
    let student_dir = one(&format!("SELECT run_dir FROM runs WHERE id = {student}"));
    let second = one(&format!(
        "SELECT value FROM params WHERE run_id = {student} AND key = 'data.second.root'"
    ));
    assert!(second.contains(&format!("{student_dir}/autolabel")), "{second}");
    assert_eq!(
        one(&format!(
            "SELECT value FROM params WHERE run_id = {student} AND key = 'data.sampler.second_share'"
        )),
        "0.5"
    );
    let (_, teacher) = run_network(d.path(), &db, "hierarchical", 0);
    let dev = candle_core::Device::Cpu;
    let extra = d.path().join("data/quick-synth/leftImg8bit/train_extra/synth");
    let (mut compared, mut kept, mut dropped) = (0, 0, 0);
    // kept pixels whose label equals the generator's truth (gtFine of
    // train_extra), and truth pixels, per labelId
    let (mut right, mut truth) = (
        std::collections::BTreeMap::<u8, u64>::new(),
        std::collections::BTreeMap::<u8, u64>::new(),
    );
    for e in std::fs::read_dir(&extra).unwrap() {
        let img_path = e.unwrap().path();
        let name = img_path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .replace("_leftImg8bit.png", "");
        let img = image::open(&img_path).unwrap().to_rgb8();
        let x = hmsa_lab::data::image::normalize(&img, &dev).unwrap();
        let (f, _) = teacher
            .infer(
                &x,
                hmsa_lab::model::Fusion::Hierarchical,
                &[0.5, 1.0, 2.0],
                false,
                false,
            )
            .unwrap();
        let p = candle_nn::ops::softmax(&f.pred, 1).unwrap();
        let top: Vec<f32> = p.max(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let arg: Vec<u32> = p.argmax(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got = image::open(d.path().join(&student_dir).join(format!(
            "autolabel/gtFine/train_extra/synth/{name}_gtFine_labelIds.png"
        )))
        .unwrap()
        .to_luma8()
        .into_raw();
        let true_ids = image::open(d.path().join(format!(
            "data/quick-synth/gtFine/train_extra/synth/{name}_gtFine_labelIds.png"
        )))
        .unwrap()
        .to_luma8()
        .into_raw();
        for (((t, a), g), tr) in top.iter().zip(&arg).zip(&got).zip(&true_ids) {
            let want = if *t >= 0.5 {
                hmsa_lab::data::cityscapes::CLASSES[*a as usize].label_id
            } else {
                0
            };
            assert_eq!(*g, want, "{name}");
            *truth.entry(*tr).or_default() += 1;
            if want != 0 && want == *tr {
                *right.entry(*tr).or_default() += 1;
            }
            kept += usize::from(want != 0);
            dropped += usize::from(want == 0);
        }
        compared += 1;
    }
    assert_eq!(compared, 8);
    assert!(
        kept > 0 && dropped > 0,
        "kept {kept}, dropped {dropped}: the threshold must matter"
    );
    // The student recorded the teacher's labels against that truth.
    for c in hmsa_lab::data::cityscapes::CLASSES.iter() {
        let rec = |k: &str| {
            let v = sqlite(
                &db,
                &format!(
                    "SELECT value FROM metrics WHERE run_id = {student} AND key = 'autolabel_{k}/{}'",
                    c.name
                ),
            );
            v.lines().nth(1).map(|x| x.parse::<f64>().unwrap() as u64)
        };
        let t = truth.get(&c.label_id).copied().unwrap_or(0);
        let r = right.get(&c.label_id).copied().unwrap_or(0);
        if t == 0 {
            assert_eq!(rec("truth"), None, "{}", c.name);
        } else {
            assert_eq!(rec("truth"), Some(t), "{}", c.name);
            assert_eq!(rec("correct"), Some(r), "{}", c.name);
        }
    }
    // (the 12-step teacher keeps almost nothing at 0.5, so the counts above
    // may all be 0.) With every pixel kept (threshold 0) and its own labels
    // as the truth, every kept pixel is right: correct = kept = truth.
    {
        let ds = hmsa_lab::data::Dataset::cityscapes(
            &d.path().join("data/quick-synth"),
            "train_extra",
            hmsa_lab::data::Labels::None,
        )
        .unwrap();
        let fusion = hmsa_lab::model::Fusion::Hierarchical;
        let (a, b) = (d.path().join("self-a"), d.path().join("self-b"));
        let first =
            hmsa_lab::autolabel::autolabel(&teacher, &ds, None, &[0.5, 1.0], fusion, 0.0, &a, &dev).unwrap();
        assert!(
            first.correct.is_empty() && first.truth.is_empty(),
            "no truth, no counts"
        );
        let own = hmsa_lab::autolabel::truth_of(&a, "train_extra")
            .unwrap()
            .expect("gtFine written");
        let second =
            hmsa_lab::autolabel::autolabel(&teacher, &ds, Some(&own), &[0.5, 1.0], fusion, 0.0, &b, &dev)
                .unwrap();
        assert_eq!(second.kept, first.kept);
        assert_eq!(second.correct, second.kept);
        assert_eq!(second.truth, second.kept);
        assert_eq!(second.kept.iter().sum::<u64>(), 8 * 64 * 128);
    }
    assert!(
        md.contains("## Auto-labelling: the teacher's labels against the truth"),
        "{md}"
    );
    // a write through `query` is refused
    let o = bin()
        .args(["query", "DELETE FROM runs", "--db", db.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("would write"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        sqlite(&db, "SELECT COUNT(*) FROM runs").lines().nth(1).unwrap(),
        "10"
    );
    // rm + gc remove a run's files
    let dir = sqlite(&db, "SELECT run_dir FROM runs WHERE id = 1")
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    assert!(d.path().join(&dir).exists());
    ok(bin()
        .current_dir(d.path())
        .args(["rm", "1", "--yes", "--db", db.to_str().unwrap()])
        .output()
        .unwrap());
    let g = ok(bin()
        .current_dir(d.path())
        .args(["gc", "--yes", "--db", db.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(g.contains("purged 1 run(s) and deleted 1 folder(s)"), "{g}");
    assert!(!d.path().join(&dir).exists());
}

pub(crate) fn wait_for(db: &Path, sql: &str, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if db.exists() {
            let o = bin()
                .args(["query", sql, "--db", db.to_str().unwrap(), "--format", "csv"])
                .output()
                .unwrap();
            if o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .nth(1)
                    .is_some_and(|l| l != "0")
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn kill_9_mid_run_loses_nothing_and_the_rerun_finishes() {
    let d = tempfile::tempdir().unwrap();
    let suite = quick_in(d.path());
    let db = d.path().join("quick.db");
    let mut child = bin()
        .current_dir(d.path())
        .args([
            "run",
            suite.to_str().unwrap(),
            "--set",
            "train.steps=24",
            "--set",
            "train.checkpoint_every=4",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until one run is finished and another is past its first checkpoint.
    let ready = wait_for(
        &db,
        "SELECT COUNT(*) FROM runs r WHERE r.status = 'RUNNING' AND r.step > 4 AND EXISTS (SELECT 1 FROM runs f WHERE f.status = 'FINISHED')",
        Duration::from_secs(120),
    );
    // Freeze it first, so the state read below is the state it dies in
    // (between the wait and the kill a run could otherwise end).
    Command::new("kill")
        .args(["-STOP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ready, "the suite never got mid-run");
    let running_at_kill = sqlite(&db, "SELECT id FROM runs WHERE status = 'RUNNING'");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        sqlite(&db, "PRAGMA integrity_check").lines().nth(1).unwrap(),
        "ok"
    );
    // Every FINISHED run has its evaluations and weights; nothing else claims to be done.
    let bad = sqlite(
        &db,
        "SELECT COUNT(*) FROM runs r WHERE r.status = 'FINISHED' AND (NOT EXISTS (SELECT 1 FROM evaluations e WHERE e.run_id = r.id) OR NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.run_id = r.id))",
    );
    assert_eq!(bad.lines().nth(1).unwrap(), "0");
    let before = sqlite(&db, "SELECT id, end_ms, (SELECT GROUP_CONCAT(miou) FROM evaluations e WHERE e.run_id = r.id) FROM runs r WHERE status = 'FINISHED' ORDER BY id");
    let killed = sqlite(&db, "SELECT id FROM runs WHERE status = 'RUNNING'");
    assert_eq!(killed, running_at_kill);
    assert_eq!(killed.lines().count(), 2, "{killed}");
    // The rerun takes over the killed runs at once (their holder is a dead
    // process on this machine), resumes them and finishes the suite.
    let out = bin()
        .current_dir(d.path())
        .args([
            "run",
            suite.to_str().unwrap(),
            "--set",
            "train.steps=24",
            "--set",
            "train.checkpoint_every=4",
        ])
        .output()
        .unwrap();
    let text = ok(out);
    assert!(text.contains("10 runs"), "{text}");
    assert_eq!(
        sqlite(&db, "SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'")
            .lines()
            .nth(1)
            .unwrap(),
        "10"
    );
    // Results recorded before the kill are untouched.
    let after = sqlite(&db, "SELECT id, end_ms, (SELECT GROUP_CONCAT(miou) FROM evaluations e WHERE e.run_id = r.id) FROM runs r WHERE status = 'FINISHED' ORDER BY id");
    for line in before.lines().skip(1) {
        assert!(after.lines().any(|l| l == line), "{line} changed");
    }
    // The resumed run logged each step once.
    let dup = sqlite(&db, "SELECT COUNT(*) FROM (SELECT run_id, step FROM metrics WHERE key = 'loss' GROUP BY run_id, step HAVING COUNT(*) > 1)");
    assert_eq!(dup.lines().nth(1).unwrap(), "0");
}

#[test]
fn two_processes_never_run_the_same_run_twice() {
    let d = tempfile::tempdir().unwrap();
    let suite = quick_in(d.path());
    // Generate the data first so both start training at once.
    ok(bin()
        .current_dir(d.path())
        .args(["run", suite.to_str().unwrap(), "--dry-run"])
        .output()
        .unwrap());
    let spawn = || {
        bin()
            .current_dir(d.path())
            .args(["run", suite.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    // The one that finishes last sees every run done, those the other
    // finished included (no stale "held by another process"): status 0.
    let codes = [a.status.code(), b.status.code()];
    assert!(codes.iter().all(|c| matches!(c, Some(0) | Some(3))), "{codes:?}");
    assert!(
        codes.contains(&Some(0)),
        "{codes:?}\na: {}\nb: {}",
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout)
    );
    for o in [&a, &b] {
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("Failed"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let trained = |o: &Output| {
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .filter(|l| l.ends_with(": Trained"))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let (ta, tb) = (trained(&a), trained(&b));
    assert_eq!(ta.len() + tb.len(), 10, "a: {ta:?}\nb: {tb:?}");
    for l in &ta {
        assert!(!tb.contains(l), "{l} trained twice");
    }
    // The two really ran at once: a run of one and a run of the other
    // were held over overlapping intervals.
    let db = d.path().join("quick.db");
    let rows = sqlite(&db, "SELECT claimed_by, start_ms, end_ms FROM runs");
    let spans: Vec<(String, i64, i64)> = rows
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (c[0].to_string(), c[1].parse().unwrap(), c[2].parse().unwrap())
        })
        .collect();
    let holders: std::collections::BTreeSet<&String> = spans.iter().map(|s| &s.0).collect();
    assert_eq!(holders.len(), 2, "both processes trained: {rows}");
    let overlap = spans
        .iter()
        .any(|a| spans.iter().any(|b| a.0 != b.0 && a.1 < b.2 && b.1 < a.2));
    assert!(overlap, "the processes never ran at the same time: {rows}");
}

#[test]
fn bench_runs_each_case_in_its_own_process_and_stores_it() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("b.db");
    let out = ok(bin()
        .args([
            "bench",
            "kernels",
            "--db",
            db.to_str().unwrap(),
            "--format",
            "json",
        ])
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cases = v.as_array().unwrap();
    // one matmul, four conv shapes in our convolution and in candle's
    assert_eq!(cases.len(), 9);
    assert!(cases[0]["machine"].as_str().unwrap().contains("cores"));
    // Each rate is the case's arithmetic over its fastest repetition,
    // worked out here from the shapes its params name.
    for c in cases {
        let m = &c["case"];
        let params = m["params"].as_str().unwrap();
        let (min, median) = (m["min_ms"].as_f64().unwrap(), m["median_ms"].as_f64().unwrap());
        assert!(0.0 < min && min <= median, "{params}");
        let dims = |s: &str| -> Vec<f64> {
            s.split(['x', '-', '>'])
                .filter(|t| !t.is_empty())
                .map(|t| t.parse().unwrap())
                .collect()
        };
        let words: Vec<&str> = params.split_whitespace().collect();
        let flops = if params.ends_with(" f32") {
            let n = dims(words[0]);
            2.0 * n[0] * n[1] * n[2]
        } else {
            // "KxK A->B at HxW (who)"
            let k = dims(words[0])[0];
            let ab = dims(words[1]);
            let hw = dims(words[3]);
            2.0 * k * k * ab[0] * ab[1] * hw[0] * hw[1]
        };
        assert_eq!(m["unit"], "GFLOP/s");
        let want = flops / (min * 1e-3) / 1e9;
        let got = m["value"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-9 * want, "{params}: {got} vs {want}");
    }
    let n = sqlite(
        &db,
        "SELECT COUNT(*) FROM benchmarks WHERE suite = 'kernels' AND median_ms > 0",
    );
    assert_eq!(n.lines().nth(1).unwrap(), "9");
    let e = bin()
        .args(["bench", "nonsense", "--db", db.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(e.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&e.stderr).contains("invalid value 'nonsense'"));
}

/// The model and train suites' cases, one small one each, as the parent
/// runs them (`bench --case`, one process): a forward's rate is the
/// analytic FLOP count (checked against the official weights elsewhere)
/// over its fastest repetition; a training step reports time and memory.
#[test]
fn bench_model_and_train_cases_measure_what_they_name() {
    let run = |case: &str| -> serde_json::Value {
        serde_json::from_str(&ok(bin().args(["bench", "--case", case]).output().unwrap())).unwrap()
    };
    let f = run(
        r#"{"Forward":{"preset":"small","fusion":"hierarchical","scales":[0.5,1.0],"size":[64,128],"reps":2}}"#,
    );
    let mut cfg = hmsa_lab::model::ModelConfig::small();
    cfg.fusion = hmsa_lab::model::Fusion::Hierarchical;
    cfg.scales = [0.5, 1.0].into();
    let flops = hmsa_lab::model::flops::count(&cfg, 64, 128).unwrap().fused as f64;
    let min = f["min_ms"].as_f64().unwrap();
    assert!(min > 0.0 && min <= f["median_ms"].as_f64().unwrap());
    let want = flops / (min * 1e-3) / 1e9;
    assert!((f["value"].as_f64().unwrap() - want).abs() <= 1e-9 * want, "{f}");
    assert!(f["peak_mib"].as_f64().unwrap() > 0.0);
    let t = run(
        r#"{"TrainStep":{"preset":"small","fusion":"single","scales":[1.0],"crop":[64,128],"batch":1,"reps":2}}"#,
    );
    assert_eq!(t["params"], "small single 1.0 batch 1 crop 64x128");
    assert!(t["min_ms"].as_f64().unwrap() <= t["median_ms"].as_f64().unwrap());
    assert!(t["peak_mib"].as_f64().unwrap() > 0.0);
}

/// The shipped synthetic suites plan what their comments say: the
/// ablation on benchmark v3 with the small-short network, explicit at
/// hierarchical's compute, every run scored on its training images; the
/// auto-labelling suite at 8 labelled and 56 unlabelled images.
#[test]
fn the_shipped_synthetic_suites_plan_what_they_say() {
    use hmsa_lab::config::Layout;
    use hmsa_lab::model::{Fusion, ModelConfig};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let ab = Suite::load(&root.join("ablation.toml"), &[]).unwrap();
    let seeds = ab.header.seeds.len();
    assert_eq!(ab.runs.len(), 6 * seeds);
    for r in &ab.runs {
        let c = &r.config;
        assert_eq!(c.data.synth.layout, Layout::V3, "{}", r.variant);
        assert_eq!(
            c.model.backbone,
            ModelConfig::small_short().backbone,
            "{}",
            r.variant
        );
        assert!(c.eval.fit, "{}", r.variant);
        let steps = if r.variant == "explicit-equal-compute" {
            122
        } else {
            380
        };
        assert_eq!(c.train.steps, steps, "{}", r.variant);
        if r.variant.starts_with("explicit") {
            assert_eq!(c.model.fusion, Fusion::Explicit);
        }
    }
    let al = Suite::load(&root.join("autolabel.toml"), &[]).unwrap();
    assert_eq!(al.runs.len(), 5 * al.header.seeds.len());
    for r in &al.runs {
        let s = &r.config.data.synth;
        assert_eq!((s.train, s.train_extra, s.layout), (8, 56, Layout::V3));
        assert_eq!(r.teacher.is_some(), r.variant.contains("+auto"), "{}", r.variant);
        if let Some(t) = r.teacher {
            assert_eq!(al.runs[t].variant, "hierarchical");
            assert_eq!(
                al.runs[t].config.train.steps, r.config.train.steps,
                "the teacher trains as long"
            );
        }
    }
}

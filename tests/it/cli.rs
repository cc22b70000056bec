//! The `hmsa-lab` binary end to end: `model` and `infer`, good and bad input.

use super::*;
use std::path::Path;
use std::process::{Command, Output};

fn hmsa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hmsa-lab"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tiny checkpoint and a 40x56 PNG in a fresh folder.
fn setup() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (vm, _) = fresh(&tiny(), 31);
    let ck = dir.path().join("tiny.safetensors");
    vm.save(&ck).unwrap();
    let img = ::image::RgbImage::from_fn(56, 40, |x, y| ::image::Rgb([(x * 4) as u8, (y * 6) as u8, 90]));
    let png = dir.path().join("street.png");
    img.save(&png).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    (dir, s(&ck), s(&png))
}

/// `model --preset w48` lists the official MscaleOCR state dict
/// (tests/data/mscale_ocr_w48_state_dict.tsv, dumped from the official
/// code) line for line, and counts its parameters as the TSV's shapes add
/// up (72,143,430 without BatchNorm's running statistics).
#[test]
fn model_lists_the_official_parameters_and_counts_them() {
    let o = hmsa(&["model", "--preset", "w48", "--size", "64x128"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let tsv = std::fs::read_to_string(data("mscale_ocr_w48_state_dict.tsv")).unwrap();
    let want: Vec<String> = tsv
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.replace('\t', " ").trim_end().to_string())
        .collect();
    let got: Vec<&str> = out.lines().take(want.len()).collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.trim_end(), w);
    }
    let count: usize = tsv
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('\t'))
        .filter(|(n, _)| {
            !n.ends_with("running_mean") && !n.ends_with("running_var") && !n.ends_with("num_batches_tracked")
        })
        .map(|(_, s)| {
            s.split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse::<usize>().unwrap())
                .product::<usize>()
        })
        .sum();
    assert_eq!(count, 72_143_430, "the TSV's own header");
    assert!(out.contains(&format!("parameters: {count}\n")), "{out}");
    assert!(out.contains("GFLOPs at 64x128"));
}

#[test]
fn infer_writes_pngs_attention_maps_and_a_consistent_dump() {
    let (dir, ck, png) = setup();
    let out = dir.path().join("out");
    let dump = dir.path().join("d.safetensors");
    let cfg = data("tiny.toml");
    let o = hmsa(&[
        "infer",
        "--config",
        cfg.to_str().unwrap(),
        "--checkpoint",
        &ck,
        "--out",
        out.to_str().unwrap(),
        "--scales",
        "0.5,1.0,2.0",
        "--fusion",
        "hierarchical",
        "--flip",
        "--dump",
        dump.to_str().unwrap(),
        &png,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "street_color.png",
        "street_labelIds.png",
        "street_attn_1.0.png",
        "street_attn_0.5.png",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let m = candle_core::safetensors::load(&dump, &Device::Cpu).unwrap();
    assert_eq!(m["pred"].dims(), &[1, 3, 40, 56]);
    assert!(!m.contains_key("aux"), "inference fuses no aux");
    assert_eq!(m["pred_2.0"].dims(), &[1, 3, 80, 112]);
    assert_eq!(m["aux_2.0"].dims(), &[1, 3, 80, 112]);
    assert_eq!(m["pred_0.5"].dims(), &[1, 3, 20, 28]);
    assert_eq!(m["attn_0.5"].dims(), &[1, 1, 20, 28]);
    assert_eq!(m["attn_1.0"].dims(), &[1, 1, 40, 56]);
    // The labelIds PNG is the argmax of the dumped prediction, in official ids.
    let cls = super::argmax_ids(&m["pred"]);
    let ids = ::image::open(out.join("street_labelIds.png"))
        .unwrap()
        .to_luma8()
        .into_raw();
    let official = [7u8, 8, 11]; // road, sidewalk, building
    for (c, id) in cls.iter().zip(&ids) {
        assert_eq!(official[*c as usize], *id);
    }
}

/// A safetensors batch is segmented as its images are: image 0 is the
/// setup's PNG normalised here with ImageNet's mean and std, image 1 the PNG
/// mirrored; each labelIds output equals the one `infer` writes for the PNG
/// (and for the mirrored PNG) itself.
#[test]
fn infer_reads_a_safetensors_batch_as_it_reads_images() {
    let (dir, ck, png) = setup();
    let img = ::image::open(&png).unwrap().to_rgb8();
    let mirrored = ::image::imageops::flip_horizontal(&img);
    let png2 = dir.path().join("mirrored.png");
    mirrored.save(&png2).unwrap();
    let (w, h) = img.dimensions();
    let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
    let mut v = vec![];
    for im in [&img, &mirrored] {
        for c in 0..3 {
            for p in im.pixels() {
                v.push((p[c] as f32 / 255.0 - mean[c]) / std[c]);
            }
        }
    }
    let input = dir.path().join("batch.safetensors");
    let mut m = std::collections::HashMap::new();
    m.insert(
        "image".to_string(),
        Tensor::from_vec(v, (2, 3, h as usize, w as usize), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&m, &input).unwrap();
    let cfg = data("tiny.toml");
    let run = |inputs: &[&str], out: &str, dump: Option<&str>| {
        let mut a = vec![
            "infer",
            "--config",
            cfg.to_str().unwrap(),
            "--checkpoint",
            &ck,
            "--out",
            out,
            "--fusion",
            "average",
            "--scales",
            "0.5,1",
        ];
        if let Some(d) = dump {
            a.extend(["--dump", d]);
        }
        a.extend_from_slice(inputs);
        let o = hmsa(&a);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let o1 = dir.path().join("o1");
    let o2 = dir.path().join("o2");
    run(&[input.to_str().unwrap()], o1.to_str().unwrap(), None);
    run(&[&png, png2.to_str().unwrap()], o2.to_str().unwrap(), None);
    let ids = |p: std::path::PathBuf| ::image::open(p).unwrap().to_luma8().into_raw();
    let a0 = ids(o1.join("batch_0_labelIds.png"));
    assert_eq!(a0, ids(o2.join("street_labelIds.png")));
    assert_eq!(
        ids(o1.join("batch_1_labelIds.png")),
        ids(o2.join("mirrored_labelIds.png"))
    );
    // The logits too, not only their argmax (a random network may predict
    // one class everywhere): a batch of the first image alone against the PNG.
    let one = dir.path().join("one.safetensors");
    let mut m1 = std::collections::HashMap::new();
    m1.insert("image".to_string(), m["image"].narrow(0, 0, 1).unwrap());
    candle_core::safetensors::save(&m1, &one).unwrap();
    let (d1, d2) = (
        dir.path().join("d1.safetensors"),
        dir.path().join("d2.safetensors"),
    );
    run(
        &[one.to_str().unwrap()],
        o1.to_str().unwrap(),
        Some(d1.to_str().unwrap()),
    );
    run(&[&png], o2.to_str().unwrap(), Some(d2.to_str().unwrap()));
    let p1 = candle_core::safetensors::load(&d1, &Device::Cpu).unwrap();
    let p2 = candle_core::safetensors::load(&d2, &Device::Cpu).unwrap();
    assert!(max_abs_diff(&p1["pred"], &p2["pred"]) < 1e-5);
    assert!(vals(&p1["pred"]).iter().any(|v| v.abs() > 1e-3));
}

#[test]
fn infer_bad_input_gets_a_clear_error() {
    let (dir, ck, png) = setup();
    let cfg = data("tiny.toml");
    let cfg = cfg.to_str().unwrap();
    let out = dir.path().join("o");
    let out = out.to_str().unwrap();
    // exit 1: a runtime error; 2: a usage error (clap's, e.g. a flag's
    // value that does not parse)
    let run = |extra: &[&str]| {
        let mut a = vec!["infer", "--config", cfg, "--out", out];
        a.extend_from_slice(extra);
        let o = hmsa(&a);
        let usage = extra.contains(&"0.5,x");
        assert_eq!(
            o.status.code(),
            Some(if usage { 2 } else { 1 }),
            "{extra:?} should fail"
        );
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
        stderr(&o)
    };
    let e = run(&["--checkpoint", &ck, "nowhere.png"]);
    assert!(e.contains("nowhere.png") && e.contains("no such file"), "{e}");
    let e = run(&[
        "--checkpoint",
        &ck,
        "--scales",
        "0.5,2.0",
        "--fusion",
        "hierarchical",
        &png,
    ]);
    assert!(e.contains("needs 1.0"), "{e}");
    let e = run(&["--checkpoint", "missing.safetensors", &png]);
    assert!(e.contains("missing.safetensors"), "{e}");
    let e = run(&["--checkpoint", &ck, "--num-classes", "19", &png]);
    assert!(e.contains("predicts 3 classes"), "{e}");
    let e = run(&["--checkpoint", &ck, "--scales", "0.5,x", &png]);
    assert!(e.contains("not a scale"), "{e}");
    // A tensor input of the wrong shape.
    let bad = dir.path().join("bad.safetensors");
    let mut m = std::collections::HashMap::new();
    m.insert("image".to_string(), noise((1, 1, 8, 8), 1));
    candle_core::safetensors::save(&m, &bad).unwrap();
    let e = run(&["--checkpoint", &ck, bad.to_str().unwrap()]);
    assert!(
        e.contains("bad.safetensors") && e.contains("N x 3 x H x W"),
        "{e}"
    );
    // Integer and non-finite tensors are refused, naming the file.
    let ints = dir.path().join("ints.safetensors");
    let mut m = std::collections::HashMap::new();
    m.insert(
        "image".to_string(),
        Tensor::zeros((1, 3, 8, 8), candle_core::DType::U8, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&m, &ints).unwrap();
    let e = run(&["--checkpoint", &ck, ints.to_str().unwrap()]);
    assert!(e.contains("ints.safetensors") && e.contains("U8"), "{e}");
    let nan = dir.path().join("nan.safetensors");
    let mut v = vec![0f32; 3 * 8 * 8];
    v[5] = f32::NAN;
    v[7] = f32::INFINITY;
    let mut m = std::collections::HashMap::new();
    m.insert(
        "image".to_string(),
        Tensor::from_vec(v, (1, 3, 8, 8), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&m, &nan).unwrap();
    let e = run(&["--checkpoint", &ck, nan.to_str().unwrap()]);
    assert!(
        e.contains("nan.safetensors") && e.contains("2 NaN or infinite"),
        "{e}"
    );
    // A model config with an unknown key names the file and the key.
    let toml = dir.path().join("m.toml");
    std::fs::write(&toml, "num_classes = 3\nwidth = 4\n").unwrap();
    let o = hmsa(&["model", "--config", toml.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("m.toml") && e.contains("width") && e.contains("line 2"),
        "{e}"
    );
}

/// The commands a researcher chains by hand, end to end: `synth` writes
/// the benchmark (twice the same bytes), `train` trains and evaluates a
/// run config, `infer` segments the validation images with its weights,
/// and `eval` scores that folder: its mIoU must be the one `train` wrote
/// for the same single-scale evaluation (two routes through the metrics:
/// the in-memory evaluator and the official-style folder scorer).
#[test]
fn synth_train_infer_and_eval_fit_together() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = |x: &Path| x.to_str().unwrap().to_string();
    std::fs::write(
        p.join("synth.toml"),
        "height = 64\nwidth = 128\ntrain = 3\nval = 2\ntrain_extra = 0\nblob_radius = 30\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_hmsa-lab"))
            .current_dir(p)
            .env("HMSA_NO_PROGRESS", "1")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    run(&["synth", "--config", "synth.toml", "--out", "a"]);
    run(&["synth", "--config", "synth.toml", "--out", "b"]);
    let files = |root: &str, sub: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p.join(root).join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(files("a", "leftImg8bit/train/synth").len(), 3);
    assert_eq!(files("a", "gtFine/val/synth").len(), 2);
    for f in files("a", "leftImg8bit/val/synth") {
        let rel = format!("leftImg8bit/val/synth/{f}");
        assert_eq!(
            std::fs::read(p.join("a").join(&rel)).unwrap(),
            std::fs::read(p.join("b").join(&rel)).unwrap(),
            "{rel}: synth is not deterministic"
        );
    }
    let model = std::fs::read_to_string(data("tiny.toml")).unwrap();
    let model_single = model
        .replace("fusion = \"hierarchical\"", "fusion = \"single\"")
        .replace("scales = [0.5, 1.0]", "scales = [1.0]")
        .replace("num_classes = 3", "num_classes = 19");
    std::fs::write(p.join("model.toml"), &model_single).unwrap();
    let model_table = model_single
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("[backbone]", "[model.backbone]");
    std::fs::write(
        p.join("run.toml"),
        format!(
            "[model]\n{model_table}\n\n[data]\nroot = \"a\"\n[data.augment]\ncrop = [64, 128]\n\n[train]\nsteps = 6\nbatch = 1\ncheckpoint_every = 3\n"
        ),
    )
    .unwrap();
    run(&["train", "--config", "run.toml", "--out", "run"]);
    // a suite's run folder (it has an owner file) is refused, untouched
    std::fs::create_dir(p.join("owned")).unwrap();
    std::fs::write(
        p.join("owned/owner.json"),
        r#"{"store": "some-db", "run": 7, "suite": "s", "variant": "v", "seed": 0}"#,
    )
    .unwrap();
    std::fs::write(p.join("owned/model.safetensors"), "recorded").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_hmsa-lab"))
        .current_dir(p)
        .env("HMSA_NO_PROGRESS", "1")
        .args(["train", "--config", "run.toml", "--out", "owned"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("run 7") && stderr(&o).contains("owner.json"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(p.join("owned/model.safetensors")).unwrap(),
        "recorded"
    );
    assert_eq!(std::fs::read_dir(p.join("owned")).unwrap().count(), 2);
    let ev: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("run/eval.json")).unwrap()).unwrap();
    let want = ev[0]["metrics"]["miou"].as_f64().unwrap();
    assert_eq!(ev[0]["set"]["scales"], serde_json::json!([1.0]));
    let vals: Vec<String> = files("a", "leftImg8bit/val/synth")
        .iter()
        .map(|f| format!("a/leftImg8bit/val/synth/{f}"))
        .collect();
    let mut args = vec![
        "infer".to_string(),
        "--config".into(),
        "model.toml".into(),
        "--checkpoint".into(),
        "run/model.safetensors".into(),
        "--out".into(),
        "preds".into(),
    ];
    args.extend(vals);
    run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = run(&[
        "eval",
        "--pred-dir",
        "preds",
        "--gt-dir",
        &s(&p.join("a/gtFine/val")),
        "--format",
        "json",
    ]);
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        (got["miou"].as_f64().unwrap() - want).abs() < 1e-12,
        "eval {} vs train's evaluation {want}",
        got["miou"]
    );
    // a hierarchical run keeps the attention maps of its first two
    // validation images, as a suite's runs do
    let hier = model
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("num_classes = 3", "num_classes = 19")
        .replace("[backbone]", "[model.backbone]");
    std::fs::write(
        p.join("hier.toml"),
        format!(
            "[model]\n{hier}\n\n[data]\nroot = \"a\"\n[data.augment]\ncrop = [64, 128]\n\n[train]\nsteps = 2\nbatch = 1\n\n[[eval.sets]]\nscales = [0.5, 1.0]\nfusion = \"hierarchical\"\n"
        ),
    )
    .unwrap();
    run(&["train", "--config", "hier.toml", "--out", "hier"]);
    let dir = p.join("hier/attention/hierarchical_0.5,1.0");
    let mut saved: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    saved.sort();
    assert_eq!(saved.len(), 2, "{saved:?}");
    let val0 = image::open(
        p.join("a/leftImg8bit/val/synth")
            .join(&files("a", "leftImg8bit/val/synth")[0]),
    )
    .unwrap()
    .to_rgb8();
    let a0 = hmsa_lab::eval::read_attention(&saved[0]).unwrap();
    assert_eq!(a0.image, val0, "the stored input is the first validation image");
    assert_eq!(a0.maps.len(), 1, "one weight map (0.5x) for {{0.5, 1.0}}");
    assert_eq!(a0.maps[0].0, 0.5);
}

/// Standard output that goes away is not a crash: a closed pipe ends the
/// command quietly (exit 0, nothing on stderr; `model --preset w48`'s
/// listing is larger than a pipe's buffer), a full disk is an error that
/// names standard output (exit 1). Numbers out of range are refused by
/// name and range before anything runs (exit 2, nothing written).
#[test]
fn closed_pipes_full_disks_and_numbers_out_of_range() {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hmsa-lab"))
        .args(["model", "--preset", "w48"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(!first.is_empty());
    // the reader is dropped here: the pipe is closed
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");

    let full = Command::new(env!("CARGO_BIN_EXE_hmsa-lab"))
        .args(["model", "--preset", "small"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(full.status.code(), Some(1), "{}", stderr(&full));
    assert!(
        stderr(&full).contains("writing to standard output"),
        "{}",
        stderr(&full)
    );
    assert!(!stderr(&full).contains("panicked"), "{}", stderr(&full));

    let dir = tempfile::tempdir().unwrap();
    for (args, flag, range) in [
        (
            &["query", "SELECT 1", "--timeout", "99999999999999999999"][..],
            "--timeout",
            "0.01..=86400",
        ),
        (&["worker", "s.toml", "--poll", "1e30"], "--poll", "0.05..=3600"),
        (&["worker", "s.toml", "--poll", "NaN"], "--poll", "0.05..=3600"),
        (
            &["worker", "s.toml", "--stale-after", "0"],
            "--stale-after",
            "15..=604800",
        ),
        (
            &["run", "s.toml", "--stale-after", "14"],
            "--stale-after",
            "15..=604800",
        ),
        (
            &["rm", "1", "--force", "--stale-after", "18446744073709551615"],
            "--stale-after",
            "15..=604800",
        ),
        (
            &["run", "s.toml", "--slurm", "--tasks", "0"],
            "--tasks",
            "1..=10000",
        ),
        (&["synth", "--stats", "0"], "--stats", "1..=100000"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_hmsa-lab"))
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(e.contains(flag) && e.contains(range), "{args:?}: {e}");
    }
    for size in ["0x0", "1x70000", "x", "12"] {
        let o = hmsa(&["model", "--preset", "small", "--size", size]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{size}: {e}");
        assert!(e.contains("--size") && !e.contains("panicked"), "{size}: {e}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "a refused command wrote"
    );
}

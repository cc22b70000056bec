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

#[test]
fn model_lists_parameters_and_counts() {
    let cfg = data("tiny.toml");
    let o = hmsa(&["model", "--config", cfg.to_str().unwrap(), "--size", "64x128"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.lines().next().unwrap() == "backbone.conv1.weight 8,3,3,3");
    assert!(out.contains("\nbackbone.bn1.num_batches_tracked\n"));
    let spec = hmsa_lab::model::checkpoint::param_spec(&tiny()).unwrap();
    let n = hmsa_lab::model::checkpoint::parameter_count(&spec);
    assert!(out.contains(&format!("parameters: {n}\n")), "{out}");
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
    let cls: Vec<u32> = m["pred"]
        .argmax(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let ids = ::image::open(out.join("street_labelIds.png"))
        .unwrap()
        .to_luma8()
        .into_raw();
    let official = [7u8, 8, 11]; // road, sidewalk, building
    for (c, id) in cls.iter().zip(&ids) {
        assert_eq!(official[*c as usize], *id);
    }
}

#[test]
fn infer_reads_a_safetensors_batch() {
    let (dir, ck, _) = setup();
    let input = dir.path().join("batch.safetensors");
    let mut m = std::collections::HashMap::new();
    m.insert("image".to_string(), noise((2, 3, 32, 32), 5));
    candle_core::safetensors::save(&m, &input).unwrap();
    let out = dir.path().join("o");
    let cfg = data("tiny.toml");
    let o = hmsa(&[
        "infer",
        "--config",
        cfg.to_str().unwrap(),
        "--checkpoint",
        &ck,
        "--out",
        out.to_str().unwrap(),
        "--fusion",
        "average",
        "--scales",
        "0.5,1",
        input.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join("batch_0_labelIds.png").exists() && out.join("batch_1_labelIds.png").exists());
}

#[test]
fn infer_bad_input_gets_a_clear_error() {
    let (dir, ck, png) = setup();
    let cfg = data("tiny.toml");
    let cfg = cfg.to_str().unwrap();
    let out = dir.path().join("o");
    let out = out.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut a = vec!["infer", "--config", cfg, "--out", out];
        a.extend_from_slice(extra);
        let o = hmsa(&a);
        assert_eq!(o.status.code(), Some(2), "{extra:?} should fail");
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
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("m.toml") && e.contains("width") && e.contains("line 2"),
        "{e}"
    );
}

//! Training end to end on tiny data: overfitting, RMI, exact resume, the
//! evaluator, folder scoring and auto-labelling.

use super::*;
use hmsa_lab::config::{EvalKey, RunConfig};
use hmsa_lab::train::{train, Observer, Quiet, StepMetrics};
use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::Path;

/// One 64x128 street-like image with four large regions (sky, building,
/// road, car) and its labelIds, written in the Cityscapes layout as both the
/// train and the val split.
fn blocks_dataset(root: &Path) {
    let (w, h) = (128u32, 64u32);
    let lab = GrayImage::from_fn(w, h, |x, y| {
        Luma([if y < 16 {
            23 // sky
        } else if y < 36 {
            11 // building
        } else if (40..60).contains(&x) && y < 52 {
            26 // car
        } else {
            7 // road
        }])
    });
    let img = RgbImage::from_fn(w, h, |x, y| {
        let n = ((x * 7 + y * 13) % 11) as u8;
        match lab.get_pixel(x, y)[0] {
            23 => Rgb([110 + n, 150 + n, 210]),
            11 => Rgb([120 + n, 100 + n, 90 + n]),
            26 => Rgb([30, 40 + n, 160]),
            _ => Rgb([80 + n, 80 + n, 85 + n]),
        }
    });
    for split in ["train", "val"] {
        let i = root.join(format!("leftImg8bit/{split}/c/c_000000_000000_leftImg8bit.png"));
        let l = root.join(format!("gtFine/{split}/c/c_000000_000000_gtFine_labelIds.png"));
        std::fs::create_dir_all(i.parent().unwrap()).unwrap();
        std::fs::create_dir_all(l.parent().unwrap()).unwrap();
        img.save(&i).unwrap();
        lab.save(&l).unwrap();
    }
}

fn overfit_config(root: &Path) -> RunConfig {
    let text = format!(
        r#"
[model]
ocr_mid_channels = 32
ocr_key_channels = 16
attn_bottleneck = 16
fusion = "single"
scales = [1.0]
[model.backbone]
stem_width = 16
layer1_planes = 8
layer1_blocks = 1
widths = [16, 16, 32, 32]
modules = [1, 1, 1]
blocks = [1, 1, 1]

[data]
root = "{}"
[data.augment]
crop = [64, 128]
scale_min = 1.0
scale_max = 1.0
flip = false
blur = 0.0
color_jitter = 0.0
[data.sampler]
class_uniform = 0.0

[train]
steps = 200
batch = 1
checkpoint_every = 1000
[train.optim]
lr = 0.02
poly_power = 1.0
[train.loss]
main = "ce"
"#,
        root.display()
    );
    RunConfig::from_toml_str(&text, Path::new("overfit.toml")).unwrap()
}

/// Train, checkpoint, load and evaluate on the training image. The bound
/// comes from what a model that has not learned the image can score: the
/// image has four classes (sky, building, road, car), so a model that
/// misses any one of them entirely has IoU 0 there and mIoU at most 0.75;
/// each seed must pass 0.8 (five seeds measured 0.94–0.98 after 200 steps;
/// which pixels a short run gets right is chaotic in the rounding of
/// training, so the bound does not sit near the measurements).
#[test]
fn a_small_model_overfits_one_image() {
    for seed in 0..3 {
        let d = tempfile::tempdir().unwrap();
        blocks_dataset(d.path());
        let mut cfg = overfit_config(d.path());
        cfg.train.seed = seed;
        let r = train(&cfg, &d.path().join("run"), &mut Quiet).unwrap();
        assert!(r.finished && r.step == 200);
        let net = hmsa_lab::model::checkpoint::load(
            &cfg.model,
            r.weights.as_ref().unwrap(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let res = hmsa_lab::eval::evaluate(
            &net,
            &hmsa_lab::data::val_dataset(&cfg.data).unwrap(),
            &cfg.eval.sets,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (first, last) = (r.steps[0].loss, r.steps.last().unwrap().loss);
        assert!(last < first / 20.0, "seed {seed}: loss {first} -> {last}");
        assert!(
            res[0].metrics.miou > 0.8,
            "seed {seed}: mIoU {}",
            res[0].metrics.miou
        );
        // every class is found
        for (c, iou) in res[0].metrics.iou.iter().enumerate() {
            if let Some(v) = iou {
                assert!(*v > 0.5, "seed {seed}: class {c} IoU {v}");
            }
        }
    }
}

#[test]
fn rmi_is_finite_and_decreases() {
    let d = tempfile::tempdir().unwrap();
    blocks_dataset(d.path());
    let mut cfg = overfit_config(d.path());
    cfg.train.loss.main = hmsa_lab::config::MainLoss::Rmi;
    cfg.train.steps = 30;
    let r = train(&cfg, &d.path().join("run"), &mut Quiet).unwrap();
    let main: Vec<f32> = r.steps.iter().map(|s| s.main).collect();
    assert!(main.iter().all(|v| v.is_finite()));
    let head: f32 = main[..5].iter().sum::<f32>() / 5.0;
    let tail: f32 = main[main.len() - 5..].iter().sum::<f32>() / 5.0;
    assert!(tail < head * 0.8, "RMI {head} -> {tail}");
}

/// Stops after `at` steps, like Ctrl-C.
struct StopAt(usize, usize);
impl Observer for StopAt {
    fn on_step(&mut self, m: &StepMetrics) -> hmsa_lab::Result<()> {
        self.1 = m.step;
        Ok(())
    }
    fn should_stop(&self) -> bool {
        self.1 >= self.0
    }
}

/// `n` street-like images (the car moves) in the Cityscapes layout, as the
/// `train` and `val` splits under `root`.
fn blocks_dataset_n(root: &Path, n: u32) {
    blocks_dataset_car(root, n, 20, 16);
}

/// As [`blocks_dataset_n`] with a `cw` x `ch` car.
fn blocks_dataset_car(root: &Path, n: u32, cw: u32, ch: u32) {
    for k in 0..n {
        let (w, h) = (128u32, 64u32);
        let lab = GrayImage::from_fn(w, h, |x, y| {
            Luma([if y < 16 {
                23
            } else if y < 36 {
                11
            } else if (20 + 15 * k..20 + cw + 15 * k).contains(&x) && (36..36 + ch).contains(&y) {
                26
            } else {
                7
            }])
        });
        let img = RgbImage::from_fn(w, h, |x, y| {
            let v = ((x * 7 + y * 13 + k * 5) % 11) as u8;
            match lab.get_pixel(x, y)[0] {
                23 => Rgb([110 + v, 150 + v, 210]),
                11 => Rgb([120 + v, 100 + v, 90 + v]),
                26 => Rgb([30, 40 + v, 160]),
                _ => Rgb([80 + v, 80 + v, 85 + v]),
            }
        });
        for split in ["train", "val"] {
            let i = root.join(format!("leftImg8bit/{split}/c/c_000000_{k:06}_leftImg8bit.png"));
            let l = root.join(format!("gtFine/{split}/c/c_000000_{k:06}_gtFine_labelIds.png"));
            std::fs::create_dir_all(i.parent().unwrap()).unwrap();
            std::fs::create_dir_all(l.parent().unwrap()).unwrap();
            img.save(&i).unwrap();
            lab.save(&l).unwrap();
        }
    }
}

/// Trains `cfg` whole, and again stopped after `stop` steps and resumed:
/// the loss curves and the final weights must be identical.
fn resume_matches(cfg: &RunConfig, dir: &Path, stop: usize, what: &str) {
    let whole = train(cfg, &dir.join("a"), &mut Quiet).unwrap();
    let b = dir.join("b");
    let part = train(cfg, &b, &mut StopAt(stop, 0)).unwrap();
    assert!(!part.finished && part.step == stop, "{what}");
    let rest = train(cfg, &b, &mut Quiet).unwrap();
    assert_eq!(rest.resumed_from, Some(stop), "{what}");
    let a: Vec<f32> = whole.steps.iter().map(|s| s.loss).collect();
    let mut bb: Vec<f32> = part.steps.iter().map(|s| s.loss).collect();
    bb.extend(rest.steps.iter().map(|s| s.loss));
    assert_eq!(a, bb, "{what}: loss curves differ");
    let wa = std::fs::read(dir.join("a/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("model.safetensors")).unwrap();
    assert!(wa == wb, "{what}: final weights differ");
}

/// Resume inside an epoch (5 images, batch 2: 3 steps an epoch, stopped
/// at step 4) for every training mode, with every source of randomness on
/// (scale, flip, blur, jitter, class-uniform crops, dropout) and, for
/// hierarchical, an auto-labelled-style second source in half the batch.
#[test]
fn resuming_mid_epoch_repeats_the_uninterrupted_run_exactly() {
    use hmsa_lab::model::Fusion;
    let cases: [(&str, Fusion, Vec<f64>, bool); 5] = [
        ("single", Fusion::Single, vec![1.0], false),
        ("average", Fusion::Average, vec![0.5, 1.0], false),
        ("explicit", Fusion::Explicit, vec![0.5, 1.0, 2.0], false),
        ("hierarchical + RMI", Fusion::Hierarchical, vec![0.5, 1.0], false),
        (
            "hierarchical + second source",
            Fusion::Hierarchical,
            vec![0.5, 1.0],
            true,
        ),
    ];
    for (what, fusion, scales, second) in cases {
        let d = tempfile::tempdir().unwrap();
        blocks_dataset_n(d.path(), 5);
        let mut cfg = overfit_config(d.path());
        cfg.data.augment = hmsa_lab::config::AugmentConfig {
            crop: [64, 64],
            ..Default::default()
        };
        cfg.data.sampler.class_uniform = 0.5;
        cfg.data.sampler.tile = 32;
        cfg.model.fusion = fusion;
        cfg.model.scales = scales.into();
        if what.contains("RMI") {
            cfg.train.loss.main = hmsa_lab::config::MainLoss::Rmi;
        }
        if second {
            let extra = d.path().join("auto");
            blocks_dataset_n(&extra, 3);
            cfg.data.second = Some(hmsa_lab::config::SecondSource {
                root: extra,
                split: "train".into(),
                labels: "fine".into(),
            });
        }
        cfg.train.batch = 2;
        cfg.train.steps = 7;
        cfg.train.checkpoint_every = 2;
        resume_matches(&cfg, d.path(), 4, what);
    }
}

/// A checkpoint that `ckpt/latest` names but that cannot be read stops the
/// run with an error naming the file: never a silent restart from step 0.
#[test]
fn a_damaged_checkpoint_is_an_error_not_a_restart() {
    let d = tempfile::tempdir().unwrap();
    blocks_dataset(d.path());
    let mut cfg = overfit_config(d.path());
    cfg.train.steps = 6;
    cfg.train.checkpoint_every = 2;
    let run = d.path().join("run");
    let part = train(&cfg, &run, &mut StopAt(3, 0)).unwrap();
    assert_eq!(part.step, 3);
    let state = run.join("ckpt/step-0000003/state.json");
    std::fs::write(&state, "{ not json").unwrap();
    let e = train(&cfg, &run, &mut Quiet).unwrap_err().to_string();
    assert!(
        e.contains("step-0000003/state.json") && e.contains("cannot resume"),
        "{e}"
    );
    std::fs::remove_file(&state).unwrap();
    let e = train(&cfg, &run, &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("state.json"), "{e}");
    // No weights were written by either attempt.
    assert!(!run.join("model.safetensors").exists());
}

#[test]
fn a_nan_loss_stops_with_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    blocks_dataset(d.path());
    let mut cfg = overfit_config(d.path());
    cfg.train.optim.lr = 1e12;
    cfg.train.steps = 20;
    let e = train(&cfg, &d.path().join("run"), &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("training diverged") && e.contains("at step"), "{e}");
}

/// Precisions the CPU cannot train in are refused before any step, naming
/// the field, and nothing is written; the TOML key parses.
#[test]
fn unsupported_training_precisions_are_refused_by_name() {
    use hmsa_lab::model::Precision;
    let d = tempfile::tempdir().unwrap();
    blocks_dataset(d.path());
    let parsed: hmsa_lab::config::TrainConfig = toml::from_str("precision = \"bf16\"").unwrap();
    assert_eq!(parsed.precision, Precision::Bf16);
    for (p, why) in [(Precision::Bf16, "needs a GPU"), (Precision::F16, "loss scaling")] {
        let mut cfg = overfit_config(d.path());
        cfg.train.precision = p;
        let run = d.path().join(format!("run-{}", p.name()));
        let e = train(&cfg, &run, &mut Quiet).unwrap_err().to_string();
        assert!(e.contains("train.precision") && e.contains(why), "{e}");
        assert!(!run.exists(), "nothing written for a refused run");
    }
}

#[test]
fn evaluation_sets_share_one_pass_and_match_single_runs() {
    let d = tempfile::tempdir().unwrap();
    blocks_dataset(d.path());
    let cfg = overfit_config(d.path());
    let (_, net) = fresh(
        &{
            let mut m = cfg.model.clone();
            m.fusion = hmsa_lab::model::Fusion::Hierarchical;
            m.scales = [0.5, 1.0].into();
            m
        },
        3,
    );
    let ds = hmsa_lab::data::val_dataset(&cfg.data).unwrap();
    let set = |s: &[f64], f, flip| EvalKey {
        scales: s.to_vec().into(),
        fusion: f,
        flip,
    };
    use hmsa_lab::model::Fusion::*;
    let sets = vec![
        set(&[1.0], Single, false),
        set(&[0.5, 1.0, 2.0], Average, true),
        set(&[0.5, 1.0], Hierarchical, false),
        set(&[0.25, 0.5, 1.0, 2.0], Hierarchical, false),
    ];
    let dev = candle_core::Device::Cpu;
    let together = hmsa_lab::eval::evaluate(&net, &ds, &sets, &dev).unwrap();
    // Each set's confusion matrix, counted here from the network's own
    // fused prediction of that set alone (argmax against the label's train
    // ids): the shared pass of `evaluate` must give the same counts.
    let k = cfg.model.num_classes;
    for (i, s) in sets.iter().enumerate() {
        let mut m = vec![0u64; k * (k + 1)];
        for j in 0..ds.len() {
            let (img, lab) = ds.load(j).unwrap();
            let x = hmsa_lab::data::image::normalize(&img, &dev).unwrap();
            let (f, _) = net.infer(&x, s.fusion, &s.scales, s.flip, false).unwrap();
            let pred = super::argmax_ids(&f.pred);
            // `load` gives train ids (255 ignored); m[gt][pred], K + 1 columns
            for (p, g) in pred.iter().zip(lab.unwrap().pixels()) {
                if (g[0] as usize) < k {
                    m[g[0] as usize * (k + 1) + *p as usize] += 1;
                }
            }
        }
        assert_eq!(together[i].confusion.m, m, "set {i}");
    }
    // hierarchical sets report one mean attention per non-top scale
    assert_eq!(
        together[3].attn_means.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![1.0, 0.5, 0.25]
    );
    let total: u64 = together[0].confusion.m.iter().sum();
    assert_eq!(total, 64 * 128);
}

fn gray(p: &Path, w: u32, h: u32, v: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    GrayImage::from_raw(w, h, v.to_vec()).unwrap().save(p).unwrap();
}

#[test]
fn folder_scoring_agrees_with_a_hand_computed_case() {
    let d = tempfile::tempdir().unwrap();
    let (gt, pr) = (d.path().join("gt"), d.path().join("pred"));
    // image a (2x2): gt road, road, car, void(0); pred road, car, car, road
    gray(
        &gt.join("x/x_000001_000002_gtFine_labelIds.png"),
        2,
        2,
        &[7, 7, 26, 0],
    );
    gray(
        &pr.join("x_000001_000002_leftImg8bit_pred.png"),
        2,
        2,
        &[7, 26, 26, 7],
    );
    // image b (2x1): gt road, sky; pred ground (labelId 6, not evaluated), sky
    gray(&gt.join("y/y_000003_000004_gtFine_labelIds.png"), 2, 1, &[7, 23]);
    gray(&pr.join("sub/y_000003_000004.png"), 2, 1, &[6, 23]);
    // road: tp 1, fn 2 (one predicted car, one "ground"), fp 0 (the void pixel
    // does not count) -> 1/3. car: tp 1, fp 1 -> 1/2. sky: 1.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hmsa-lab"))
        .args([
            "eval",
            "--pred-dir",
            pr.to_str().unwrap(),
            "--gt-dir",
            gt.to_str().unwrap(),
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let iou = |n: &str| v["iou"][n].as_f64();
    assert!((iou("road").unwrap() - 1.0 / 3.0).abs() < 1e-9, "{v}");
    assert!((iou("car").unwrap() - 0.5).abs() < 1e-9);
    assert!((iou("sky").unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(iou("bicycle"), None);
    assert!((v["miou"].as_f64().unwrap() - (1.0 / 3.0 + 0.5 + 1.0) / 3.0).abs() < 1e-9);
    // a ground-truth file without its prediction is named
    gray(&gt.join("z/z_000005_000006_gtFine_labelIds.png"), 2, 1, &[7, 7]);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hmsa-lab"))
        .args([
            "eval",
            "--pred-dir",
            pr.to_str().unwrap(),
            "--gt-dir",
            gt.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("z_000005_000006_gtFine_labelIds.png") && e.contains("no prediction"),
        "{e}"
    );
}

#[test]
fn autolabel_writes_a_cityscapes_layout_the_sampler_reads() {
    let d = tempfile::tempdir().unwrap();
    blocks_dataset(d.path());
    let cfg = overfit_config(d.path());
    let r = train(&cfg, &d.path().join("run"), &mut Quiet).unwrap();
    let toml = d.path().join("model.toml");
    std::fs::write(&toml, toml::to_string(&cfg.model).unwrap()).unwrap();
    let out = d.path().join("auto");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hmsa-lab"))
        .args([
            "autolabel",
            "--config",
            toml.to_str().unwrap(),
            "--checkpoint",
            r.weights.as_ref().unwrap().to_str().unwrap(),
            "--data",
            d.path().to_str().unwrap(),
            "--split",
            "val",
            "--scales",
            "1.0",
            "--fusion",
            "single",
            "--threshold",
            "0.9",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ds = hmsa_lab::data::Dataset::cityscapes(&out, "val", hmsa_lab::data::Labels::Fine).unwrap();
    assert_eq!(ds.len(), 1);
    let (_, lab) = ds.load(0).unwrap();
    let lab = lab.unwrap();
    let kept = lab.pixels().filter(|p| p[0] != 255).count();
    // an overfitted teacher is confident on most pixels, and right where it is
    assert!(kept > lab.len() / 2, "kept {kept} of {}", lab.len());
    let truth = hmsa_lab::data::Dataset::cityscapes(d.path(), "val", hmsa_lab::data::Labels::Fine).unwrap();
    let (_, t) = truth.load(0).unwrap();
    let right = lab
        .pixels()
        .zip(t.unwrap().pixels())
        .filter(|(a, b)| a[0] != 255 && a[0] == b[0])
        .count();
    assert!(right as f64 > 0.95 * kept as f64);
    assert!(String::from_utf8_lossy(&o.stdout).contains("ignored"));
}

/// Mixed precision runs the network in its input's dtype with the f32
/// parameters cast at their use. With f64 activations the step must agree
/// with the f32 step to f32 rounding: this checks the casts, and that every
/// gradient reaches its f32 parameter through them, to a cosine of 0.999:
/// a weight gradient is a sum over every pixel whose terms mostly cancel,
/// so the f32 sum carries a relative error of over 1% in some layers
/// (cosines down to 0.99990 measured, and `1 − cos ≈ ½(|e|/|g|)²`, so
/// 1.4%, with norms 0.2% apart; the loss is RMI, whose log-determinants
/// magnify f32 rounding); 0.999 allows 4.5% and the norms may differ by
/// 1%, while a lost, doubled or misrouted gradient gives a cosine near 0
/// or a norm ratio of 2. f16 (the CPU has no bf16 matmul) takes candle's
/// generic CPU kernels, whose f16 gemm also accumulates in f16, so its
/// precision cannot be bounded usefully here (on this input the deepest
/// reductions measured cosine 0.78 and norms up to 1.77x the f32 ones; a
/// loss scale of 1024 changes neither: not underflow). Its bounds come from
/// the faults they must catch instead: a cosine above 0.5 separates a
/// gradient in the right direction from an unrelated one (≈ 0) or a
/// flipped one (−1), and norms within a factor 1.9 catch a lost (0) or
/// doubled (2) gradient. On a GPU cuBLAS accumulates half products in f32.
#[test]
fn a_mixed_precision_step_matches_the_f32_step() {
    use candle_core::{DType, Device, Tensor};
    use hmsa_lab::config::LossConfig;
    use hmsa_lab::model::{init::seeded_varbuilder, HmsaNet, ModelConfig};
    use hmsa_lab::train::loss::combined;
    let dev = Device::Cpu;
    let cfg = ModelConfig::small();
    let vm = candle_nn::VarMap::new();
    let net = HmsaNet::new(&cfg, seeded_varbuilder(&vm, 3, &dev)).unwrap();
    // a fixed input (candle's CPU generator cannot be seeded)
    let n = 2 * 64 * 128;
    let xs: Vec<f32> = (0..3 * n)
        .map(|i| (i as f32 * 0.37).sin() + (i as f32 * 0.011).cos())
        .collect();
    let ys: Vec<u32> = (0..n)
        .map(|i| ((i / 16 + i / 2048) % cfg.num_classes) as u32)
        .collect();
    let x = Tensor::from_vec(xs, (2, 3, 64, 128), &dev).unwrap();
    let y = Tensor::from_vec(ys, (2, 64, 128), &dev).unwrap();
    let step = |dt: DType| {
        net.seed_dropout(7);
        let (f, outs) = net
            .infer(&x.to_dtype(dt).unwrap(), cfg.fusion, &cfg.scales, false, true)
            .unwrap();
        assert_eq!(f.pred.dtype(), dt, "the network runs in its input's dtype");
        let l = combined(&LossConfig::default(), &f, &outs, &y).unwrap();
        let value = l.total.to_scalar::<f32>().unwrap();
        (value, l.total.backward().unwrap())
    };
    let (l32, g32) = step(DType::F32);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (dt, loss_tol, min_cos, norm_tol) in [(DType::F64, 1e-4, 0.999, 1e-2), (DType::F16, 0.01, 0.5, 0.9)] {
        let (l, g) = step(dt);
        assert!(
            (l - l32).abs() < loss_tol * l32.abs(),
            "loss f32 {l32}, {dt:?} {l}"
        );
        let mut checked = 0;
        for v in vm.all_vars().iter().filter(|v| v.rank() == 4) {
            let b = g.get(v).expect("a gradient through the casts");
            assert_eq!(b.dtype(), DType::F32);
            let (a, b) = (flat(g32.get(v).expect("f32 gradient")), flat(b));
            let dot: f64 = a.iter().zip(&b).map(|(p, q)| (*p as f64) * (*q as f64)).sum();
            let na = a.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            let nb = b.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            if na < 1e-6 {
                continue;
            }
            let shape = v.shape();
            assert!(
                dot / (na * nb) > min_cos,
                "{dt:?}: cosine {} for {shape:?}",
                dot / (na * nb)
            );
            assert!(
                (nb / na - 1.0).abs() < norm_tol,
                "{dt:?}: norms {na} {nb} for {shape:?}"
            );
            checked += 1;
        }
        assert!(checked > 20, "only {checked} conv weights compared");
    }
}

/// The training step cuts its graph between the scales' networks and the
/// fusion and runs the networks' backwards concurrently
/// (`train::step`). Its loss and every parameter's gradient must be the
/// whole graph's (`infer` then `backward`): for hierarchical fusion on
/// {0.5, 1} (both branches of its recurrence on {0.5, 1, 2}) and for
/// explicit attention (whose head reads the OCR features across the cut),
/// with f64 activations (the f32 parameters' gradients then differ only by
/// the f32 sum of the scales' contributions) and with f32 ones, as
/// training runs (sums in another order: 1e-4 of each gradient's scale).
#[test]
fn the_cut_training_graph_gives_the_whole_graphs_gradients() {
    use candle_core::{DType, Device, Tensor};
    use hmsa_lab::config::LossConfig;
    use hmsa_lab::model::{init::seeded_varbuilder, Fusion, HmsaNet, ModelConfig};
    use hmsa_lab::train::loss::combined;
    use hmsa_lab::train::step;
    let dev = Device::Cpu;
    let n = 2 * 64 * 96;
    let xs: Vec<f64> = (0..3 * n)
        .map(|i| (i as f64 * 0.37).sin() + (i as f64 * 0.011).cos())
        .collect();
    let x64 = Tensor::from_vec(xs, (2, 3, 64, 96), &dev).unwrap();
    for (fusion, scales, dtype, tol) in [
        (Fusion::Hierarchical, vec![0.5, 1.0], DType::F64, 1e-5),
        (Fusion::Hierarchical, vec![0.5, 1.0], DType::F32, 1e-4),
        (Fusion::Hierarchical, vec![0.5, 1.0, 2.0], DType::F32, 1e-4),
        (Fusion::Explicit, vec![0.5, 1.0, 2.0], DType::F64, 1e-5),
    ] {
        let x = x64.to_dtype(dtype).unwrap();
        let case = format!("{fusion} {scales:?} {dtype:?}");
        let mut cfg = ModelConfig::small();
        cfg.fusion = fusion;
        cfg.scales = scales.clone().into();
        let ys: Vec<u32> = (0..n)
            .map(|i| ((i / 16 + i / 2048) % cfg.num_classes) as u32)
            .collect();
        let y = Tensor::from_vec(ys, (2, 64, 96), &dev).unwrap();
        let vm = candle_nn::VarMap::new();
        let net = HmsaNet::new(&cfg, seeded_varbuilder(&vm, 5, &dev)).unwrap();
        let loss_cfg = LossConfig {
            scale_weight: 0.3,
            ..Default::default()
        };
        net.seed_dropout(11);
        let (f, outs) = net.infer(&x, fusion, &scales, false, true).unwrap();
        let whole = combined(&loss_cfg, &f, &outs, &y).unwrap();
        let g_whole = whole.total.backward().unwrap();
        net.seed_dropout(11);
        let fwd = step::forward(&net, &x, fusion, &scales).unwrap();
        let cut = combined(&loss_cfg, &fwd.fused, &fwd.outs, &y).unwrap();
        let g_cut = fwd.backward(&cut.total).unwrap();
        let value = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        assert_eq!(value(&whole.total), value(&cut.total), "{case}: the same forward");
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut compared = 0;
        for v in vm.all_vars() {
            let (a, b) = (g_whole.get(&v), g_cut.get(&v));
            assert_eq!(
                a.is_some(),
                b.is_some(),
                "{case}: a gradient on one side only, {:?}",
                v.shape()
            );
            let (Some(a), Some(b)) = (a, b) else { continue };
            let (a, b) = (flat(a), flat(b));
            let scale = a.iter().fold(0f32, |m, p| m.max(p.abs()));
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    (p - q).abs() <= tol * scale + 1e-30,
                    "{case}: {p} vs {q} (largest {scale}) in {:?}",
                    v.shape()
                );
            }
            compared += 1;
        }
        assert!(compared > 50, "{case}: only {compared} gradients");
    }
}

/// One hierarchical training step against PyTorch run the official way
/// (`official_train_step` in tools/torch_reference.py: the literal
/// `MscaleOCR.two_scale_forward` in training, then `torch.optim.SGD`),
/// from the fixture `trainstep` writes (regenerate with
/// `python3 tools/torch_reference.py trainstep tests/data/trainstep.json
/// tests/data/trainstep.safetensors`): the same initial weights, batch and
/// lr through `step::forward` (0.5x pass first, attention on both passes),
/// `loss::combined` (CE + 0.4 aux CE + 0.05 CE per scale), the cut
/// backward and `Sgd`, OCR dropout off on both sides. Every parameter and
/// every BatchNorm running statistic after the step must match PyTorch's.
///
/// Tolerance (f32 on both sides, the same formulas summed in other
/// orders). Both sides start from the same f32 values θ₀ and store
/// θ₀ + Δ rounded to f32, Δ the step's change: `−lr·(g + wd·θ₀)` for a
/// parameter (in one step the momentum buffer is the first `d`), for a
/// running statistic `0.1·(batch statistic − old)` per pass. So per
/// element `|ours − PyTorch| ≤ 2⁻²⁴·(|ours| + |PyTorch|) + 1e-3·max|Δ|`:
/// the half-ulp roundings of the two stored values (θ₀ itself is shared
/// exactly), plus the difference of the two Δ, i.e. of the gradients and
/// batch statistics, relative to the tensor's largest change. Those are
/// the least accurate quantities: an f32 reduction over `M` terms errs by
/// about `√M·6e-8` of its largest term, the backward chains some thirty of
/// them, and a BatchNorm over few values (2 per channel in the lowest
/// branch of the 0.5x pass) magnifies the relative error of its input's
/// spread. Measured beyond the rounding: 7.5e-5 of the largest change at
/// worst (a BatchNorm bias in OCR's `f_pixel`), so 1e-3 leaves a margin of
/// 13. A tolerance relative to each tensor's largest value (1e-4, say)
/// would not see the gradients: lr = 0.01 moves a BatchNorm weight of 1 by
/// 7e-5, so its values after the step are the shared initial ones. A
/// skipped attention pass or a changed pass order changes a running
/// statistic's Δ by far more than 1e-3 (one update of `0.1·(s − old)` more
/// or less, or the two passes' statistics weighted 0.1 and 0.09 the other
/// way round).
#[test]
fn a_hierarchical_training_step_matches_the_official_pytorch_step() {
    use candle_core::{DType, Device, Tensor, Var};
    use hmsa_lab::config::{LossConfig, MainLoss, OptimConfig};
    use hmsa_lab::model::{Fusion, ModelConfig};
    use hmsa_lab::train::loss::combined;
    use hmsa_lab::train::optim::Sgd;
    use hmsa_lab::train::step;
    let dev = Device::Cpu;
    let fx = candle_core::safetensors::load(data("trainstep.safetensors"), &dev).unwrap();
    let text = std::fs::read_to_string(data("trainstep.json")).unwrap();
    let cfg: ModelConfig = serde_json::from_str(&text).unwrap();
    let (vm, mut net) = fresh(&cfg, 0);
    net.set_dropout(0.0).unwrap();
    let mut vars: Vec<(String, Var)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let get = |key: String| -> Tensor {
        fx.get(&key)
            .unwrap_or_else(|| panic!("{key} is not in the fixture"))
            .clone()
    };
    // the initial state: PyTorch's weights and statistics replace ours
    for (name, v) in &vars {
        let t = get(format!("before.{name}"));
        assert_eq!(t.dims(), v.dims(), "{name}");
        v.set(&t).unwrap();
    }
    let count = |prefix: &str| fx.keys().filter(|k| k.starts_with(prefix)).count();
    assert_eq!(count("before."), vars.len(), "the fixture holds tensors we lack");
    assert_eq!(count("after."), vars.len(), "the fixture holds tensors we lack");

    let x = get("image".into());
    let y = get("labels".into()).to_dtype(DType::U32).unwrap();
    let lr = get("lr".into())
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let loss_cfg = LossConfig {
        main: MainLoss::Ce,
        aux_weight: 0.4,
        scale_weight: 0.05,
        class_weights: None,
    };
    let optim = OptimConfig {
        lr,
        momentum: 0.9,
        weight_decay: 5e-4,
        ..Default::default()
    };
    let mut opt = Sgd::new(vars.clone(), &optim);
    let fwd = step::forward(&net, &x, Fusion::Hierarchical, &[0.5, 1.0]).unwrap();
    let parts = combined(&loss_cfg, &fwd.fused, &fwd.outs, &y).unwrap();
    let grads = fwd.backward(&parts.total).unwrap();
    opt.step(&grads, lr).unwrap();

    let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let mut failures = vec![];
    for (name, ours) in [
        ("loss_total", scalar(&parts.total)),
        ("loss_main", parts.main as f64),
        ("loss_aux", parts.aux as f64),
    ] {
        let want = scalar(&get(name.into()));
        let rel = (ours - want).abs() / want.abs();
        eprintln!("{name}: ours {ours:.7}, PyTorch {want:.7}, relative difference {rel:.1e}");
        if rel > 1e-5 {
            failures.push(format!("{name}: ours {ours}, PyTorch {want}"));
        }
    }
    // per element: |ours − PyTorch| ≤ ROUND·(|ours| + |PyTorch|) + TOL·max|Δ|
    const TOL: f64 = 1e-3;
    const ROUND: f64 = 1.0 / (1u64 << 24) as f64;
    let flat = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    // worst difference beyond the rounding, of the largest change; and the
    // plain max |ours − PyTorch| of the largest value, for the record
    let (mut worst, mut worst_plain) = ((0f64, String::new()), (0f64, String::new()));
    let mut compared = 0;
    for (name, v) in &vars {
        let (before, want, ours) = (
            flat(&get(format!("before.{name}"))),
            flat(&get(format!("after.{name}"))),
            flat(v.as_tensor()),
        );
        let change = want
            .iter()
            .zip(&before)
            .fold(0f64, |m, (w, b)| m.max((w - b).abs()));
        let largest = want.iter().fold(0f64, |m, w| m.max(w.abs()));
        let (mut diff, mut excess) = (0f64, 0f64);
        for (o, w) in ours.iter().zip(&want) {
            let d = (o - w).abs();
            diff = diff.max(d);
            excess = excess.max(d - ROUND * (o.abs() + w.abs()));
        }
        let rel = excess / change.max(f64::MIN_POSITIVE);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
        if diff / largest.max(f64::MIN_POSITIVE) > worst_plain.0 {
            worst_plain = (diff / largest.max(f64::MIN_POSITIVE), name.clone());
        }
        if excess > TOL * change {
            failures.push(format!(
                "{name}: max |ours − PyTorch| {diff:.3e}, beyond f32 rounding {excess:.3e} = \
                 {rel:.1e} of the step's largest change {change:.3e} (tolerance {TOL:.0e})"
            ));
        }
        compared += 1;
    }
    eprintln!(
        "{compared} tensors; worst difference beyond rounding {:.1e} of the step's change ({}); \
         worst max|ours − PyTorch| {:.1e} of the largest value ({})",
        worst.0, worst.1, worst_plain.0, worst_plain.1
    );
    assert_eq!(compared, count("after."), "every tensor of the fixture compared");
    assert!(
        failures.is_empty(),
        "differs from PyTorch:\n{}",
        failures.join("\n")
    );

    // The attention head's BatchNorm statistics moved in PyTorch's step, so
    // the comparison above saw them (two updates: both passes).
    let stats: Vec<&String> = vars
        .iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("scale_attn.") && n.contains(".running_"))
        .collect();
    assert_eq!(stats.len(), 4, "{stats:?}");
    for name in stats {
        let d = max_abs_diff(&get(format!("before.{name}")), &get(format!("after.{name}")));
        assert!(d > 1e-3, "{name} did not change in PyTorch's step ({d})");
    }
}

/// Counts, per batch, the pixels of each train id (255 left out).
struct Batches(Vec<Vec<u64>>);
impl Observer for Batches {
    fn on_batch(&mut self, _step: usize, labels: &candle_core::Tensor) -> hmsa_lab::Result<()> {
        let (b, h, w) = labels.dims3()?;
        let v: Vec<u32> = labels.flatten_all()?.to_vec1()?;
        for i in 0..b {
            let mut counts = vec![0u64; 19];
            for &t in &v[i * h * w..(i + 1) * h * w] {
                if t < 19 {
                    counts[t as usize] += 1;
                }
            }
            self.0.push(counts);
        }
        Ok(())
    }
}

/// The train id at the centre of each crop, per batch.
struct Centres(Vec<u32>);
impl Observer for Centres {
    fn on_batch(&mut self, _step: usize, labels: &candle_core::Tensor) -> hmsa_lab::Result<()> {
        let (b, h, w) = labels.dims3()?;
        let v: Vec<u32> = labels.flatten_all()?.to_vec1()?;
        for i in 0..b {
            self.0.push(v[i * h * w + (h / 2) * w + w / 2]);
        }
        Ok(())
    }
}

/// Class-uniform sampling as `train` wires it. Five 64x128 images, four
/// classes, the car a 6x6 block: with class_uniform 1.0 a quarter of the
/// crops are centred on a car centroid (the sampler draws a present class
/// uniformly), so of 120 crops about 30 have car at their centre (4.7
/// standard deviation: at least 15 is a safe bound); random 32x32 crops put
/// the car at the centre with probability 36/3201 (the car's pixels among
/// the possible crop centres): about 1.3 of 120, at most 8 by the same
/// margin.
#[test]
fn class_uniform_sampling_reaches_the_training_batches() {
    let d = tempfile::tempdir().unwrap();
    blocks_dataset_car(d.path(), 5, 6, 6);
    let mut car_centred = vec![];
    for cu in [0.0, 1.0] {
        let mut cfg = overfit_config(d.path());
        cfg.data.augment.crop = [32, 32];
        cfg.data.sampler.class_uniform = cu;
        cfg.data.sampler.tile = 16;
        cfg.train.steps = 60;
        cfg.train.batch = 2;
        cfg.train.checkpoint_every = 1000;
        let mut obs = Centres(vec![]);
        train(&cfg, &d.path().join(format!("run{cu}")), &mut obs).unwrap();
        assert_eq!(obs.0.len(), 120);
        car_centred.push(obs.0.iter().filter(|&&c| c == 13).count());
    }
    assert!(
        car_centred[0] <= 8 && car_centred[1] >= 15,
        "car-centred crops, random and class-uniform: {car_centred:?}"
    );
}

/// A second source (auto-labels, in the lab) fills its share of every
/// batch: with `second_share` 0.5 and batch 2, one crop of each batch comes
/// from the second source, told apart here by its labels (all terrain).
#[test]
fn a_second_source_fills_its_share_of_every_batch() {
    let d = tempfile::tempdir().unwrap();
    blocks_dataset_n(d.path(), 3);
    let extra = d.path().join("auto");
    for k in 0..3u32 {
        let i = extra.join(format!("leftImg8bit/train/t/t_000000_{k:06}_leftImg8bit.png"));
        let l = extra.join(format!("gtFine/train/t/t_000000_{k:06}_gtFine_labelIds.png"));
        std::fs::create_dir_all(i.parent().unwrap()).unwrap();
        std::fs::create_dir_all(l.parent().unwrap()).unwrap();
        RgbImage::from_fn(128, 64, |x, y| Rgb([60, 120 + ((x + y + k) % 9) as u8, 40]))
            .save(&i)
            .unwrap();
        GrayImage::from_pixel(128, 64, Luma([22])).save(&l).unwrap(); // terrain
    }
    let mut cfg = overfit_config(d.path());
    cfg.data.second = Some(hmsa_lab::config::SecondSource {
        root: extra,
        split: "train".into(),
        labels: "fine".into(),
    });
    cfg.data.sampler.second_share = 0.5;
    cfg.train.steps = 8;
    cfg.train.batch = 2;
    cfg.train.checkpoint_every = 1000;
    let mut obs = Batches(vec![]);
    train(&cfg, &d.path().join("run"), &mut obs).unwrap();
    assert_eq!(obs.0.len(), 16);
    for (i, pair) in obs.0.chunks(2).enumerate() {
        let terrain_only = pair
            .iter()
            .filter(|c| c[9] > 0 && c.iter().sum::<u64>() == c[9])
            .count();
        let none = pair.iter().filter(|c| c[9] == 0).count();
        assert_eq!((terrain_only, none), (1, 1), "batch {i}: {pair:?}");
    }
}

/// The trainable parameters of a weights file (BatchNorm's running
/// statistics left out: a training step updates them whatever the lr).
fn params_of(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
        .map(|(k, t)| (k, vals(&t)))
        .collect()
}

/// `[train] init`: a run starts from exactly the file's weights (one step
/// at lr 1e-30 moves no weight: each moves by 1e-30 of its gradient, far
/// below its f32 resolution); `init_skip` leaves the named heads at their
/// initialisation; a class-count mismatch names the keys unless skipped; a
/// resumed run does not load the file again; the file's content is part of
/// the config hash.
#[test]
fn fine_tuning_starts_from_the_init_weights() {
    let d = tempfile::tempdir().unwrap();
    blocks_dataset(d.path());
    let mut cfg = overfit_config(d.path());
    cfg.train.steps = 5;
    train(&cfg, &d.path().join("a"), &mut Quiet).unwrap();
    let w = d.path().join("a/model.safetensors");
    let src = params_of(&w);

    let mut still = cfg.clone();
    still.train.optim.lr = 1e-30;
    still.train.steps = 1;
    still.train.init = Some(w.clone());
    train(&still, &d.path().join("b"), &mut Quiet).unwrap();
    assert_eq!(params_of(&d.path().join("b/model.safetensors")), src);
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("b/init.json")).unwrap()).unwrap();
    assert_eq!(rep["report"]["missing"].as_array().unwrap().len(), 0);
    assert_eq!(rep["report"]["unused"].as_array().unwrap().len(), 0);

    // another seed, the classifier left at its initialisation
    let mut skip = still.clone();
    skip.train.seed = 9;
    skip.train.init_skip = vec!["ocr.cls_head".into()];
    train(&skip, &d.path().join("c"), &mut Quiet).unwrap();
    let mut fresh = still.clone();
    fresh.train.seed = 9;
    fresh.train.init = None;
    train(&fresh, &d.path().join("f"), &mut Quiet).unwrap();
    let (c, f) = (
        params_of(&d.path().join("c/model.safetensors")),
        params_of(&d.path().join("f/model.safetensors")),
    );
    for (k, v) in &c {
        let want = if k.starts_with("ocr.cls_head") {
            &f[k]
        } else {
            &src[k]
        };
        assert_eq!(v, want, "{k}");
    }
    assert_ne!(c["ocr.cls_head.weight"], src["ocr.cls_head.weight"]);

    // a model with another class count: the heads that depend on it are named
    let mut five = still.clone();
    five.model.num_classes = 5;
    let e = train(&five, &d.path().join("e"), &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ocr.cls_head.weight") && e.contains("ocr.aux_head.2.weight") && e.contains("init_skip"),
        "{e}"
    );
    five.train.init_skip = vec!["ocr.cls_head".into(), "ocr.aux_head.2".into()];
    train(&five, &d.path().join("e2"), &mut Quiet).unwrap();

    // resume: stopped after 2 of 4 steps and resumed, as the uninterrupted run
    let mut go = cfg.clone();
    go.train.steps = 4;
    go.train.checkpoint_every = 2;
    go.train.init = Some(w.clone());
    train(&go, &d.path().join("g"), &mut Quiet).unwrap();
    let part = train(&go, &d.path().join("h"), &mut StopAt(2, 0)).unwrap();
    assert_eq!(part.step, 2);
    train(&go, &d.path().join("h"), &mut Quiet).unwrap();
    assert_eq!(
        std::fs::read(d.path().join("g/model.safetensors")).unwrap(),
        std::fs::read(d.path().join("h/model.safetensors")).unwrap(),
        "the resumed run loaded the init weights again"
    );

    // the file's content, not its name, is in the config hash
    let h1 = hmsa_lab::config::suite::config_hash(&go, None, None);
    std::fs::copy(d.path().join("c/model.safetensors"), &w).unwrap();
    let h2 = hmsa_lab::config::suite::config_hash(&go, None, None);
    assert_ne!(h1, h2);
    go.train.init = None;
    assert_ne!(hmsa_lab::config::suite::config_hash(&go, None, None), h1);
}

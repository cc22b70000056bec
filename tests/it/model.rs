//! The network: parameter names against the official list, shapes, fusion on
//! a real network, gradients, checkpoints.

use super::*;
use hmsa_kernels::resize::resize;
use hmsa_lab::model::checkpoint::{self, read_state_dict};
use hmsa_lab::model::ocr::AttnHead;
use hmsa_lab::model::{Fusion, ScaleOutput};
use std::collections::HashMap;

#[test]
fn w48_state_dict_equals_the_official_list() {
    let text = std::fs::read_to_string(data("mscale_ocr_w48_state_dict.tsv")).unwrap();
    let want: Vec<(String, Vec<usize>)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (n, s) = l.split_once('\t').unwrap_or((l, ""));
            let dims = s
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().unwrap())
                .collect();
            (n.to_string(), dims)
        })
        .collect();
    assert_eq!(want.len(), 1903);
    let got = checkpoint::state_dict_listing(&ModelConfig::w48()).unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "entry {i}");
    }
    // The reference header: 72,143,430 parameters without BN statistics.
    assert_eq!(checkpoint::parameter_count(&got), 72_143_430);
}

#[test]
fn small_short_is_small_without_the_modules_of_stages_3_and_4() {
    // The preset keeps HRNet's names: the stem, layer1, every transition
    // (stages 3 and 4 still create their branch) and stage2's module; no
    // `stage3.*` or `stage4.*` key. So its listing is the small preset's
    // with exactly those keys removed, every shape unchanged.
    let small = checkpoint::state_dict_listing(&ModelConfig::small()).unwrap();
    let short = checkpoint::state_dict_listing(&ModelConfig::small_short()).unwrap();
    let want: Vec<_> = small
        .iter()
        .filter(|(n, _)| !n.starts_with("backbone.stage3.") && !n.starts_with("backbone.stage4."))
        .cloned()
        .collect();
    assert!(
        want.len() < small.len(),
        "the small preset has stage 3 and 4 modules"
    );
    assert_eq!(short, want);
    for t in ["transition1", "transition2", "transition3", "stage2.0"] {
        assert!(
            short
                .iter()
                .any(|(n, _)| n.starts_with(&format!("backbone.{t}."))),
            "{t} missing"
        );
    }
    // 0.41M parameters (docs/ablation-tuning.md), against 1.14M for small
    let (a, b) = (
        checkpoint::parameter_count(&short),
        checkpoint::parameter_count(&small),
    );
    assert!(
        (400_000..420_000).contains(&a) && (1_130_000..1_150_000).contains(&b),
        "{a} {b}"
    );
    // the presets by name
    assert_eq!(
        ModelConfig::preset("small-short").unwrap(),
        ModelConfig::small_short()
    );
    assert!(hmsa_lab::model::PRESETS.contains(&"small-short"));
    // and the network runs with empty stages
    let (_, net) = fresh(
        &ModelConfig {
            num_classes: 3,
            ..ModelConfig::small_short()
        },
        1,
    );
    let (f, _) = net
        .infer(&image(64, 96, 1), Fusion::Hierarchical, &[0.5, 1.0], false, false)
        .unwrap();
    assert_eq!(f.pred.dims(), &[1, 3, 64, 96]);
}

#[test]
fn outputs_have_the_input_size_for_every_fusion_and_odd_sizes() {
    let cfg = tiny();
    let (_, net) = fresh(&cfg, 1);
    for (h, w) in [(64, 96), (50, 70), (33, 47)] {
        let x = image(h, w, 2);
        for (fusion, scales) in [
            (Fusion::Single, vec![1.0]),
            (Fusion::Average, vec![0.5, 1.0, 2.0]),
            (Fusion::Max, vec![0.5, 1.0]),
            (Fusion::Hierarchical, vec![0.25, 0.5, 1.0, 2.0]),
        ] {
            let scales: Vec<f64> = scales.into_iter().filter(|&s| h as f64 * s >= 8.0).collect();
            let (f, outs) = net.infer(&x, fusion, &scales, false, false).unwrap();
            assert_eq!(f.pred.dims(), &[1, 3, h, w], "{fusion} {scales:?}");
            assert!(f.aux.is_none(), "inference fuses no aux");
            for o in outs {
                let (hs, ws) = hmsa_kernels::resize::scaled_size(h, w, o.scale);
                assert_eq!(o.size, (hs, ws));
                assert_eq!(o.pred().unwrap().dims(), &[1, 3, hs, ws]);
            }
        }
    }
}

#[test]
fn flip_averaging_is_mirror_symmetric() {
    // Segmenting the mirrored image with --flip must give the mirrored result.
    let (_, net) = fresh(&tiny(), 3);
    let x = image(48, 64, 4);
    let s = [0.5, 1.0];
    let (a, _) = net.infer(&x, Fusion::Hierarchical, &s, true, false).unwrap();
    let (b, _) = net
        .infer(&x.flip(&[3]).unwrap(), Fusion::Hierarchical, &s, true, false)
        .unwrap();
    assert!(max_abs_diff(&a.pred, &b.pred.flip(&[3]).unwrap()) < 1e-4);
    let (c, _) = net.infer(&x, Fusion::Hierarchical, &s, false, false).unwrap();
    assert!(
        max_abs_diff(&a.pred, &c.pred) > 1e-4,
        "flip must change something"
    );
}

/// The network in f64 with the weights of `fresh(cfg, seed)`, dropout off
/// (finite differences need a deterministic forward).
fn fresh_f64(cfg: &ModelConfig, seed: u64) -> (VarMap, HmsaNet) {
    let (v32, _) = fresh(cfg, seed);
    let vm = VarMap::new();
    let mut net = HmsaNet::new(
        cfg,
        candle_nn::VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
    )
    .unwrap();
    net.set_dropout(0.0).unwrap();
    let src = v32.data().lock().unwrap();
    for (name, v) in vm.data().lock().unwrap().iter() {
        v.set(&src[name].as_tensor().to_dtype(DType::F64).unwrap())
            .unwrap();
    }
    (vm, net)
}

/// Backpropagation against central finite differences, in f64: for each
/// named parameter, the directional derivative of a training loss (the
/// fused prediction and aux against fixed weights) along a random
/// direction, from two perturbed forwards, equals the gradient's inner
/// product with that direction. `eps` is the step along the direction: the
/// loss is smooth only between ReLU kinks, and BatchNorm over a handful of
/// values (a 2x3 map) curves it sharply, so the step must be small; in f64
/// the rounding of a difference of two losses near 0.1 stays near 1e-16 /
/// eps.
fn gradients_match_finite_differences(cfg: &ModelConfig, h: usize, w: usize, eps: f64, names: &[&str]) {
    let (vm, net) = fresh_f64(cfg, 5);
    let x = image(h, w, 6).to_dtype(DType::F64).unwrap();
    let k = cfg.num_classes;
    let wt = noise((1, k, h, w), 7).to_dtype(DType::F64).unwrap();
    let loss = |net: &HmsaNet| {
        let f = net.forward(&x, true).unwrap();
        (f.pred * &wt).unwrap().mean_all().unwrap() + (f.aux.unwrap() * &wt).unwrap().mean_all().unwrap()
    };
    let l0 = loss(&net).unwrap();
    let grads = l0.backward().unwrap();
    let data = vm.data().lock().unwrap().clone();
    for (i, name) in names.iter().enumerate() {
        let v = data
            .get(*name)
            .unwrap_or_else(|| panic!("{name} not in the VarMap"));
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let orig = v.as_tensor().copy().unwrap();
        let dims = orig.dims4().unwrap_or((orig.elem_count(), 1, 1, 1));
        let d = noise(dims, 100 + i as u64)
            .reshape(orig.shape())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let analytic = (g * &d).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let at = |e: f64| {
            v.set(&(&orig + (&d * e).unwrap()).unwrap()).unwrap();
            loss(&net).unwrap().to_scalar::<f64>().unwrap()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        v.set(&orig).unwrap();
        assert!(
            (analytic - numeric).abs() <= 1e-9 + 1e-5 * numeric.abs(),
            "{name}: backprop {analytic}, finite differences {numeric}"
        );
        assert!(numeric.abs() > 1e-9, "{name}: the loss does not depend on it");
    }
}

#[test]
fn hierarchical_training_gradients_match_finite_differences() {
    // ε = 1e-6: every parameter agrees to 1e-8 relative (measured; at
    // 1e-4 ReLU kinks already shift conv0's and conv1's estimates by 1–4%).
    gradients_match_finite_differences(
        &tiny(),
        64,
        64,
        1e-6,
        &[
            "scale_attn.conv2.weight",
            "scale_attn.conv0.weight",
            "ocr.cls_head.weight",
            "ocr.aux_head.2.weight",
            "backbone.conv1.weight",
            "backbone.stage4.0.fuse_layers.0.3.0.weight",
        ],
    );
}

#[test]
fn explicit_weights_sum_to_one_and_mix_the_predictions() {
    // Two scales with constant predictions 1 and 3: with weights w_1 and
    // w_0.5 that the fusion reports (`attn`), the fused prediction must be
    // 1·w_1 + 3·w_0.5, the weights must be positive and sum to one, and
    // they must vary over the image (the head reads the features). That the
    // head computes the official weights is checked against PyTorch by
    // `inference_matches_the_pytorch_reference_fixture`.
    let vm = VarMap::new();
    let head = AttnHead::new(2 * 4, 4, 2, seeded_varbuilder(&vm, 8, &Device::Cpu)).unwrap();
    let feats1 = noise((1, 4, 4, 4), 1);
    let feats05 = noise((1, 4, 2, 2), 2);
    let c = |v: f32, n: usize| Tensor::full(v, (1, 2, n, n), &Device::Cpu).unwrap();
    let outs = [
        ScaleOutput {
            scale: 1.0,
            size: (16, 16),
            cls: c(1.0, 16),
            aux: c(1.0, 16),
            attn: None,
            feats: feats1,
        },
        ScaleOutput {
            scale: 0.5,
            size: (8, 8),
            cls: c(3.0, 8),
            aux: c(3.0, 8),
            attn: None,
            feats: feats05,
        },
    ];
    let f = Fusion::Explicit
        .fuse(&outs, (16, 16), Some(&head), false)
        .unwrap();
    // Each map is reported at its scale's size: 1.0x at 16x16 (where the
    // fusion weighs), 0.5x resized to 8x8. Resizing is linear with weights
    // summing to one, so w_1 + w_0.5 = 1 holds at 8x8 as well.
    let w_of = |s: f64| {
        &f.attn
            .iter()
            .find(|(x, _)| *x == s)
            .expect("a weight map per scale")
            .1
    };
    let w1 = vals(w_of(1.0));
    let w05 = vals(w_of(0.5));
    let w1_small = vals(&resize(w_of(1.0), 8, 8).unwrap());
    for i in 0..64 {
        assert!(w05[i] > 0.0);
        assert!((w1_small[i] + w05[i] - 1.0).abs() < 1e-5, "pixel {i}");
    }
    let p = vals(&f.pred);
    for i in 0..256 {
        assert!(w1[i] > 0.0 && w1[i] < 1.0);
        // both classes carry the same constant
        assert!((p[i] - (w1[i] + 3.0 * (1.0 - w1[i]))).abs() < 1e-5, "pixel {i}");
        assert!((p[256 + i] - p[i]).abs() < 1e-6);
    }
    let (lo, hi) = w1.iter().fold((1f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(hi - lo > 1e-3, "weights constant over the image: {lo}..{hi}");
    assert!(Fusion::Explicit
        .fuse(&outs[..1], (16, 16), Some(&head), false)
        .is_err());
}

#[test]
fn explicit_model_refuses_other_scale_sets() {
    let mut cfg = tiny();
    cfg.fusion = Fusion::Explicit;
    cfg.scales = [0.5, 1.0, 2.0].into();
    let (_, net) = fresh(&cfg, 9);
    let x = image(32, 32, 1);
    let (f, _) = net
        .infer(&x, Fusion::Explicit, &[0.5, 1.0, 2.0], false, false)
        .unwrap();
    assert_eq!(f.attn.len(), 3);
    let e = net
        .infer(&x, Fusion::Explicit, &[0.5, 1.0], false, false)
        .unwrap_err();
    assert!(e.to_string().contains("fixed at training"), "{e}");
    let (_, hier) = fresh(&tiny(), 9);
    assert!(hier
        .infer(&x, Fusion::Explicit, &[0.5, 1.0], false, false)
        .is_err());
}

/// Saves a VarMap the way the official code does: `module.` prefixes and a
/// `num_batches_tracked` after every BatchNorm.
fn save_official_style(vm: &VarMap, path: &std::path::Path) {
    let mut m: HashMap<String, Tensor> = HashMap::new();
    for (k, v) in vm.data().lock().unwrap().iter() {
        m.insert(format!("module.{k}"), v.as_tensor().clone());
        if let Some(p) = k.strip_suffix(".running_var") {
            m.insert(
                format!("module.{p}.num_batches_tracked"),
                Tensor::new(7i64, &Device::Cpu).unwrap(),
            );
        }
    }
    candle_core::safetensors::save(&m, path).unwrap();
}

#[test]
fn checkpoint_round_trip_with_official_prefixes() {
    let cfg = tiny();
    let (vm, net) = fresh(&cfg, 10);
    // Make the BN statistics non-trivial so a loader that drops them fails.
    for (k, v) in vm.data().lock().unwrap().iter() {
        if k.ends_with("running_mean") || k.ends_with("running_var") {
            let t = noise((1, 1, 1, v.elem_count()), 3)
                .reshape(v.shape())
                .unwrap()
                .affine(0.2, 1.0)
                .unwrap();
            v.set(&t).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ck.safetensors");
    save_official_style(&vm, &p);
    let map = read_state_dict(&p).unwrap();
    assert!(map
        .keys()
        .all(|k| !k.starts_with("module.") && !k.ends_with("num_batches_tracked")));
    let loaded = checkpoint::load(&cfg, &p, &Device::Cpu).unwrap();
    let x = image(40, 56, 11);
    let s = [0.5, 1.0, 2.0];
    let (a, ao) = net.infer(&x, Fusion::Hierarchical, &s, false, false).unwrap();
    let (b, bo) = loaded.infer(&x, Fusion::Hierarchical, &s, false, false).unwrap();
    assert!(max_abs_diff(&a.pred, &b.pred) < 1e-5);
    for (p, q) in ao.iter().zip(&bo) {
        assert!(max_abs_diff(&p.aux, &q.aux) < 1e-5);
    }
}

#[test]
fn checkpoint_mismatches_are_reported_by_name() {
    let cfg = tiny();
    let (vm, _) = fresh(&cfg, 12);
    let mut m: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    m.remove("ocr.cls_head.bias");
    m.insert(
        "ocr.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    m.insert(
        "scale_attn.conv2.weight".into(),
        Tensor::zeros((2, 4, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&m, &p).unwrap();
    let e = checkpoint::load(&cfg, &p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("bad.safetensors"), "{e}");
    assert!(
        e.contains("missing (1)") && e.contains("ocr.cls_head.bias"),
        "{e}"
    );
    assert!(
        e.contains("unexpected (1)") && e.contains("ocr.extra.weight"),
        "{e}"
    );
    assert!(
        e.contains("scale_attn.conv2.weight: model 1,4,1,1 vs file 2,4,1,1"),
        "{e}"
    );
}

#[test]
fn checkpoint_for_another_class_count_says_so() {
    let (vm, _) = fresh(&tiny(), 13);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k3.safetensors");
    vm.save(&p).unwrap();
    let mut cfg = tiny();
    cfg.num_classes = 19;
    let e = checkpoint::load(&cfg, &p, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("predicts 3 classes, the model config 19"), "{e}");
}

/// A 96x192 crop at 0.5x is 48x96; HRNet's 1/32 branch is then 2x3, where
/// candle 0.11's strided-conv backward fails (ours, hmsa-kernels/src/conv.rs, does
/// not): the gradients there match finite differences.
#[test]
fn training_gradients_match_finite_differences_where_feature_maps_have_mixed_parity() {
    // ε = 1e-8: transition3's estimate is −0.056 at ε = 1e-7 (BatchNorm
    // over 6 values at batch 1) and agrees to 5e-7 relative from 1e-8 down.
    gradients_match_finite_differences(
        &tiny(),
        96,
        192,
        1e-8,
        &[
            "backbone.transition3.3.0.0.weight",
            "backbone.stage4.0.branches.3.0.conv1.weight",
        ],
    );
}

#[test]
fn official_style_pth_loads_with_wrapper_prefix_and_counters() {
    // tests/data/make_pth.py wrote it: {"state_dict": {"module.<name>": ...},
    // "epoch": 7, ...}, int64 num_batches_tracked, and tensor t of the listing
    // holding sin(0.1 t + 0.01 j).
    let cfg = tiny();
    let path = data("tiny_official.pth");
    let map = read_state_dict(&path).unwrap();
    let spec = checkpoint::param_spec(&cfg).unwrap();
    assert_eq!(map.len(), spec.len());
    for (t, (name, shape)) in spec.iter().enumerate() {
        let got = &map[name];
        assert_eq!(got.dims(), shape.as_slice(), "{name}");
        let v = vals(got);
        for j in [0, v.len() / 2, v.len() - 1] {
            let want = (0.1 * t as f64 + 0.01 * j as f64).sin() as f32;
            assert!((v[j] - want).abs() < 1e-6, "{name}[{j}]: {} vs {want}", v[j]);
        }
    }
    // The network loaded from the .pth equals one whose weights are written
    // here from the formula (not from what was parsed), through safetensors.
    let mut formula = HashMap::new();
    for (t, (name, shape)) in spec.iter().enumerate() {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|j| (0.1 * t as f64 + 0.01 * j as f64).sin() as f32)
            .collect();
        let mut tensor = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap();
        if name.ends_with("num_batches_tracked") {
            tensor = tensor.to_dtype(DType::I64).unwrap();
        }
        formula.insert(name.clone(), tensor);
    }
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("same.safetensors");
    candle_core::safetensors::save(&formula, &st).unwrap();
    let a = checkpoint::load(&cfg, &path, &Device::Cpu).unwrap();
    let b = checkpoint::load(&cfg, &st, &Device::Cpu).unwrap();
    let x = image(32, 48, 21);
    let (fa, _) = a
        .infer(&x, Fusion::Hierarchical, &[0.5, 1.0], false, false)
        .unwrap();
    let (fb, _) = b
        .infer(&x, Fusion::Hierarchical, &[0.5, 1.0], false, false)
        .unwrap();
    assert_eq!(vals(&fa.pred), vals(&fb.pred));
}

/// The configs tools/torch_reference.py benchmarks with are the presets.
#[test]
fn torch_reference_configs_are_the_presets() {
    for name in ["small", "w48"] {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tools/configs/{name}.json"));
        let text = std::fs::read_to_string(&path).unwrap();
        let cfg: hmsa_lab::model::ModelConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(
            cfg,
            hmsa_lab::model::ModelConfig::preset(name).unwrap(),
            "{}",
            path.display()
        );
    }
}

/// Our inference against PyTorch's, through a fixture that
/// `tools/torch_reference.py inference` wrote (an independent PyTorch
/// implementation of the official MscaleOCR, its `nscale_forward` for the
/// hierarchical fusion): the same weights (PyTorch's initialisation with
/// BatchNorm randomised) and input (1x3x36x60, not a multiple of 32), every
/// output within 1e-4 of its largest value. CI has no PyTorch; this keeps a
/// kernel change that breaks fidelity from passing.
#[test]
fn inference_matches_the_pytorch_reference_fixture() {
    let dev = Device::Cpu;
    let fx = candle_core::safetensors::load(data("inference.safetensors"), &dev).unwrap();
    let text = std::fs::read_to_string(data("trainstep.json")).unwrap();
    let base: ModelConfig = serde_json::from_str(&text).unwrap();
    let load = |cfg: &ModelConfig, prefix: &str| {
        let (vm, net) = fresh(cfg, 0);
        let vars = vm.data().lock().unwrap().clone();
        for (name, v) in &vars {
            let t = fx
                .get(&format!("{prefix}{name}"))
                .unwrap_or_else(|| panic!("{prefix}{name} is not in the fixture"));
            v.set(t).unwrap();
        }
        let n = fx.keys().filter(|k| k.starts_with(prefix)).count();
        assert_eq!(n, vars.len(), "{prefix}: the fixture holds tensors we lack");
        net
    };
    let close = |name: &str, ours: &Tensor| {
        let want = &fx[name];
        assert_eq!(ours.dims(), want.dims(), "{name}");
        let scale = vals(want).iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(ours, want);
        assert!(
            diff <= 1e-5 * scale.max(1e-3),
            "{name}: max diff {diff} of {scale}"
        );
    };
    let x = fx["image"].clone();
    let (_, _, h, w) = x.dims4().unwrap();
    let net = load(&base, "state.");
    let (single, outs) = net.infer(&x, Fusion::Single, &[1.0], false, false).unwrap();
    close("single.pred", &single.pred);
    close("single.aux", &resize(&outs[0].aux, h, w).unwrap());
    for (name, scales) in [
        ("h2", vec![0.5, 1.0]),
        ("h3", vec![0.5, 1.0, 2.0]),
        ("h4", vec![0.25, 0.5, 1.0, 2.0]),
    ] {
        let (fused, outs) = net
            .infer(&x, Fusion::Hierarchical, &scales, false, false)
            .unwrap();
        close(&format!("{name}.pred"), &fused.pred);
        if name == "h3" {
            for o in &outs {
                if o.scale < 2.0 {
                    close(&format!("h3.attn_{:.1}", o.scale), o.attn.as_ref().unwrap());
                }
            }
        }
    }
    let mut ecfg = base.clone();
    ecfg.fusion = Fusion::Explicit;
    ecfg.scales = [0.5, 1.0, 2.0].into();
    let ex = load(&ecfg, "explicit.state.");
    let (fused, _) = ex
        .infer(&x, Fusion::Explicit, &[0.5, 1.0, 2.0], false, false)
        .unwrap();
    close("explicit.pred", &fused.pred);
}

/// The analytic FLOP count of HRNetV2-W48 + OCR at 1024x2048 (a walk of the
/// structure `hrnet.rs` builds) against a count from the official state
/// dict's convolution weights (tests/data/mscale_ocr_w48_state_dict.tsv):
/// 2 · weight elements · output pixels, each convolution placed at its
/// resolution by its name, plus OCR's two matrix products.
#[test]
fn w48_flops_equal_a_count_from_the_official_weights() {
    let (h, w) = (1024usize, 2048usize);
    let half = |(a, b): (usize, usize)| ((a - 1) / 2 + 1, (b - 1) / 2 + 1);
    let r1 = half((h, w));
    let mut res = vec![half(r1)];
    for _ in 1..4 {
        res.push(half(*res.last().unwrap()));
    }
    let r0 = res[0];
    let k = 19usize;
    let text = std::fs::read_to_string(data("mscale_ocr_w48_state_dict.tsv")).unwrap();
    let mut total: u64 = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, shape) = line.split_once('\t').unwrap();
        let dims: Vec<usize> = shape
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| d.parse().unwrap())
            .collect();
        if dims.len() != 4 || name.starts_with("scale_attn") {
            continue;
        }
        let parts: Vec<&str> = name.split('.').collect();
        let idx = |i: usize| parts[i].parse::<usize>().unwrap();
        let at = if name == "backbone.conv1.weight" {
            r1
        } else if name.contains(".f_object.") || name.contains(".f_down.") {
            (k, 1)
        } else if parts[1].starts_with("transition") {
            res[idx(2)]
        } else if parts.get(3) == Some(&"branches") {
            res[idx(4)]
        } else if parts.get(3) == Some(&"fuse_layers") {
            let (i, j) = (idx(4), idx(5));
            if j > i {
                res[j]
            } else {
                res[j + idx(6) + 1]
            }
        } else {
            // stem conv2, layer1 and OCR's pixel-wise convolutions
            r0
        };
        total += 2 * (dims.iter().product::<usize>() * at.0 * at.1) as u64;
    }
    let cfg = ModelConfig::w48();
    let px = (r0.0 * r0.1) as u64;
    let (mid, key) = (cfg.ocr_mid_channels as u64, cfg.ocr_key_channels as u64);
    // soft object regions (K x mid from K x px times px x mid), then the
    // pixel-region similarity and the context (2 products of K x key)
    total += 2 * k as u64 * mid * px + 2 * 2 * k as u64 * key * px;
    let f = hmsa_lab::model::flops::count(&cfg, h, w).unwrap();
    assert_eq!(f.single, total);
}

/// Flip test-time augmentation against its definition: the log of the mean
/// of the softmax of the prediction and of the mirrored input's prediction
/// mirrored back, each from a plain (unflipped) call.
#[test]
fn flip_averaging_is_the_mean_of_the_two_softmaxes() {
    let (_, net) = fresh(&tiny(), 17);
    let x = image(40, 56, 18);
    let scales = [0.5, 1.0, 2.0];
    let (with_flip, _) = net.infer(&x, Fusion::Hierarchical, &scales, true, false).unwrap();
    let (a, _) = net
        .infer(&x, Fusion::Hierarchical, &scales, false, false)
        .unwrap();
    let (b, _) = net
        .infer(
            &x.flip(&[3]).unwrap(),
            Fusion::Hierarchical,
            &scales,
            false,
            false,
        )
        .unwrap();
    let b = b.pred.flip(&[3]).unwrap();
    let pa = candle_nn::ops::softmax(&a.pred, 1).unwrap();
    let pb = candle_nn::ops::softmax(&b, 1).unwrap();
    let want = ((pa + pb).unwrap() * 0.5).unwrap().log().unwrap();
    assert!(max_abs_diff(&with_flip.pred, &want) < 1e-5);
    // the mirrored prediction differs from the plain one: the test is not vacuous
    assert!(max_abs_diff(&a.pred, &b) > 1e-3);
}

#[test]
fn explicit_training_gradients_match_finite_differences() {
    let mut cfg = tiny();
    cfg.fusion = Fusion::Explicit;
    cfg.scales = [0.5, 1.0, 2.0].into();
    gradients_match_finite_differences(
        &cfg,
        64,
        64,
        1e-6,
        &[
            "scale_attn.conv2.weight",
            "scale_attn.conv0.weight",
            "ocr.cls_head.weight",
            "backbone.stage4.0.fuse_layers.0.3.0.weight",
        ],
    );
}

/// Checkpoints written by torch.save itself (torch 2.15; the writer is
/// `tools/torch_reference.py pth`) in both layouts: the zip archive and the
/// legacy stream the official checkpoints use. Both are shaped like the
/// official files and hold views as training leaves them: offsets into one
/// shared storage, channels-last convolutions, transposed matrices. Every
/// element must read back as the formula that wrote it.
#[test]
fn checkpoints_written_by_pytorch_read_back_in_both_layouts() {
    let cfg = tiny();
    for file in ["torch_zip.pth", "torch_legacy.pth"] {
        let map = read_state_dict(&data(file)).unwrap();
        // t counts the full listing, num_batches_tracked included
        let spec = checkpoint::state_dict_listing(&cfg).unwrap();
        let mut checked = 0;
        for (t, (name, shape)) in spec.iter().enumerate() {
            if name.ends_with("num_batches_tracked") {
                continue;
            }
            let got = map.get(name).unwrap_or_else(|| panic!("{file}: {name} missing"));
            assert_eq!(got.dims(), shape.as_slice(), "{file}: {name}");
            for (j, v) in vals(got).iter().enumerate() {
                let want = (0.1 * t as f64 + 0.01 * j as f64).sin() as f32;
                assert!((v - want).abs() < 1e-6, "{file}: {name}[{j}]: {v} vs {want}");
            }
            checked += 1;
        }
        assert!(checked > 200);
        let net = checkpoint::load(&cfg, &data(file), &Device::Cpu).unwrap();
        let (f, _) = net
            .infer(&image(32, 48, 3), Fusion::Hierarchical, &[0.5, 1.0], false, false)
            .unwrap();
        assert!(vals(&f.pred).iter().all(|v| v.is_finite()));
    }
    // something else with a .pth name is refused by name
    let d = tempfile::tempdir().unwrap();
    let junk = d.path().join("junk.pth");
    std::fs::write(&junk, b"not a checkpoint at all").unwrap();
    let e = read_state_dict(&junk).unwrap_err().to_string();
    assert!(e.contains("junk.pth") && e.contains("legacy"), "{e}");
}

//! The official recipes: `import-runx` on runx YAML as the official
//! repository writes it, and `experiments/mapillary.toml` then
//! `experiments/cityscapes.toml` (initialised from the Mapillary run, as
//! the paper's recipe is) run for a few steps on tiny datasets made here,
//! with the network shrunk by `--set`.

use super::lab::{bin, ok, write};
use hmsa_lab::config::suite::Suite;
use image::{GrayImage, Rgb, RgbImage};
use std::path::Path;

/// The flags of the official `scripts/train_cityscapes.yml`, as runx reads
/// them (a CMD, an HPARAMS list of flow maps).
const CITYSCAPES_YML: &str = r#"# Train cityscapes using Mapillary-pretrained weights
CMD: "python -m torch.distributed.launch --nproc_per_node=8 train.py"

HPARAMS: [
  {
   dataset: cityscapes,
   cv: 0,
   syncbn: true,
   apex: true,
   fp16: true,
   crop_size: "1024,2048",
   bs_trn: 1,
   poly_exp: 2,
   lr: 5e-3,
   rmi_loss: true,
   max_epoch: 175,
   n_scales: "0.5,1.0,2.0",
   supervised_mscale_loss_wt: 0.05,
   snapshot: "ASSETS_PATH/seg_weights/ocrnet.HRNet_industrious-chicken.pth",
   arch: ocrnet.HRNet_Mscale,
   result_dir: LOGDIR,
   RUNX.TAG: '{arch}',
  },
]
"#;

fn import(dir: &Path, name: &str, yml: &str) -> std::process::Output {
    let src = write(dir, &format!("{name}.yml"), yml);
    bin()
        .current_dir(dir)
        .args([
            "import-runx",
            src.to_str().unwrap(),
            "-o",
            &format!("{name}.toml"),
        ])
        .output()
        .unwrap()
}

#[test]
fn import_runx_maps_each_flag_and_refuses_what_it_cannot() {
    let d = tempfile::tempdir().unwrap();
    ok(import(d.path(), "c", CITYSCAPES_YML));
    let s = Suite::load(&d.path().join("c.toml"), &[]).unwrap();
    assert_eq!(s.runs.len(), 1);
    let c = &s.runs[0].config;
    assert_eq!(c.data.augment.crop, [1024, 2048]);
    assert_eq!((c.train.batch, c.train.epochs), (1, Some(175)));
    assert_eq!((c.train.optim.lr, c.train.optim.poly_power), (5e-3, 2.0));
    assert_eq!(c.train.loss.main, hmsa_lab::config::MainLoss::Rmi);
    assert_eq!(c.train.loss.scale_weight, 0.05);
    assert_eq!(c.model, {
        let mut m = hmsa_lab::model::ModelConfig::w48();
        m.fusion = hmsa_lab::model::Fusion::Hierarchical;
        m.scales = [0.5, 1.0].into();
        m
    });
    assert_eq!(c.eval.sets.len(), 1);
    assert_eq!(
        c.eval.sets[0].scales,
        hmsa_lab::model::Scales::from([0.5, 1.0, 2.0])
    );
    assert_eq!(
        c.train.init.as_deref(),
        Some(Path::new(
            "ASSETS_PATH/seg_weights/ocrnet.HRNet_industrious-chicken.pth"
        ))
    );
    // the repository's experiments/cityscapes.toml is this conversion
    let ours = Suite::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/cityscapes.toml"),
        &[],
    )
    .unwrap();
    assert_eq!(ours.runs[0].config, *c);

    // a runx sweep (a list) becomes a sweep axis
    ok(import(
        d.path(),
        "s",
        &CITYSCAPES_YML.replace("lr: 5e-3,", "lr: [1e-2, 5e-3],"),
    ));
    let s = Suite::load(&d.path().join("s.toml"), &[]).unwrap();
    let lrs: Vec<f64> = s.runs.iter().map(|r| r.config.train.optim.lr).collect();
    assert_eq!(lrs, vec![1e-2, 5e-3]);
    // unknown and unimplemented flags are named
    for (flag, why) in [
        ("bogus_flag: 3,", "not a flag hmsa-lab knows"),
        ("max_cu_epoch: 150,", "not implemented"),
    ] {
        let o = import(d.path(), "u", &CITYSCAPES_YML.replace("cv: 0,", flag));
        assert_eq!(o.status.code(), Some(1));
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("u.yml") && e.contains(flag.split(':').next().unwrap()) && e.contains(why),
            "{e}"
        );
    }
}

/// The --set overrides that shrink the w48 network and the crops for a
/// test on 2 cores.
const TINY: [&str; 11] = [
    "model.backbone.stem_width=8",
    "model.backbone.layer1_planes=4",
    "model.backbone.layer1_blocks=1",
    "model.backbone.widths=[4, 8, 8, 8]",
    "model.backbone.modules=[1, 1, 1]",
    "model.backbone.blocks=[1, 1, 1]",
    "model.ocr_mid_channels=8",
    "model.ocr_key_channels=4",
    "model.attn_bottleneck=4",
    "data.augment.crop=[64, 128]",
    "train.precision=f32",
];

fn street(k: u32) -> (RgbImage, Vec<u8>) {
    let img = RgbImage::from_fn(128, 64, |x, y| {
        let v = ((x * 7 + y * 13 + k * 5) % 11) as u8;
        if y < 20 {
            Rgb([110 + v, 150 + v, 210])
        } else if y < 40 {
            Rgb([120 + v, 100 + v, 90 + v])
        } else {
            Rgb([80 + v, 80 + v, 85 + v])
        }
    });
    // class per row band: 0, 1, 2
    let cls = (0..64 * 128)
        .map(|i| [0u8, 1, 2][((i / 128) as usize / 20).min(2)])
        .collect();
    (img, cls)
}

fn run_recipe(dir: &Path, suite: &str, extra: &[String]) -> String {
    let mut args = vec![
        "run".to_string(),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("experiments")
            .join(suite)
            .display()
            .to_string(),
        "--db".into(),
        "r.db".into(),
    ];
    for s in TINY.iter().map(|s| s.to_string()).chain(extra.iter().cloned()) {
        args.push("--set".into());
        args.push(s);
    }
    ok(bin().current_dir(dir).args(&args).output().unwrap())
}

/// Mapillary (65 classes, the v1.2 layout, long edge resized) for one
/// epoch, then Cityscapes initialised from it: the trunk comes from the
/// Mapillary run, the class heads are trained anew.
#[test]
fn the_recipe_suites_run_on_tiny_datasets() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    // Mapillary Vistas: a config of 65 evaluated labels, palette PNGs
    let labels: Vec<String> = (0..65)
        .map(|i| {
            format!(
                r#"{{"name": "l{i}", "readable": "L{i}", "color": [{i}, {}, 7], "evaluate": true}}"#,
                255 - i
            )
        })
        .collect();
    let m = p.join("mapillary");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("config_v1.2.json"),
        format!(r#"{{"labels": [{}]}}"#, labels.join(",")),
    )
    .unwrap();
    for (split, n) in [("training", 2u32), ("validation", 1)] {
        for k in 0..n {
            let (img, cls) = street(k);
            let i = m.join(format!("{split}/images/m{k}.jpg"));
            std::fs::create_dir_all(i.parent().unwrap()).unwrap();
            img.save_with_format(&i, image::ImageFormat::Jpeg).unwrap();
            let l = m.join(format!("{split}/v1.2/labels/m{k}.png"));
            std::fs::create_dir_all(l.parent().unwrap()).unwrap();
            let mut enc = png::Encoder::new(
                std::io::BufWriter::new(std::fs::File::create(&l).unwrap()),
                128,
                64,
            );
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_palette((0..65u8).flat_map(|i| [i, 255 - i, 7]).collect::<Vec<_>>());
            enc.write_header().unwrap().write_image_data(&cls).unwrap();
        }
    }
    let out = run_recipe(
        p,
        "mapillary.toml",
        &[
            format!("data.root={}", m.display()),
            "data.long_edge=128".into(),
            "train.epochs=1".into(),
        ],
    );
    assert!(out.contains("1 runs, 1 trained"), "{out}");
    let runs = std::fs::read_dir(p.join("runs/mapillary"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let mapillary_weights = runs.join("model.safetensors");
    assert!(mapillary_weights.exists());

    // Cityscapes: the official layout, 19 classes
    let c = p.join("cityscapes");
    for (split, n) in [("train", 2u32), ("val", 1)] {
        for k in 0..n {
            let (img, cls) = street(k);
            let i = c.join(format!("leftImg8bit/{split}/x/x_000000_{k:06}_leftImg8bit.png"));
            let l = c.join(format!("gtFine/{split}/x/x_000000_{k:06}_gtFine_labelIds.png"));
            std::fs::create_dir_all(i.parent().unwrap()).unwrap();
            std::fs::create_dir_all(l.parent().unwrap()).unwrap();
            img.save(&i).unwrap();
            // road, building, sky as labelIds
            let ids: Vec<u8> = cls.iter().map(|&t| [23u8, 11, 7][t as usize]).collect();
            GrayImage::from_raw(128, 64, ids).unwrap().save(&l).unwrap();
        }
    }
    let out = run_recipe(
        p,
        "cityscapes.toml",
        &[
            format!("data.root={}", c.display()),
            format!("train.init={}", mapillary_weights.display()),
            "train.epochs=1".into(),
        ],
    );
    assert!(out.contains("1 runs, 1 trained"), "{out}");
    let run = std::fs::read_dir(p.join("runs/cityscapes"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let init: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("init.json")).unwrap()).unwrap();
    let skipped: Vec<&str> = init["report"]["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        skipped.contains(&"ocr.cls_head.weight") && skipped.contains(&"ocr.aux_head.2.weight"),
        "{skipped:?}"
    );
    assert!(init["report"]["loaded"].as_array().unwrap().len() > 300);
    assert_eq!(init["report"]["unused"].as_array().unwrap().len(), 0);
}

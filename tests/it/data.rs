//! Datasets on disk, the synthetic benchmark, sampling and loading.

use hmsa_lab::config::AugmentConfig;
use hmsa_lab::config::SamplerConfig;
use hmsa_lab::config::SynthConfig;
use hmsa_lab::data::loader::Loader;
use hmsa_lab::data::sampler::{epoch_plan, Centroids, Source};
use hmsa_lab::data::synth;
use hmsa_lab::data::{check, Dataset, Labels};
use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::Path;
use std::sync::Arc;

fn small_synth(dir: &Path, train: usize) -> SynthConfig {
    let cfg = SynthConfig {
        seed: 7,
        height: 128,
        width: 256,
        train,
        val: 2,
        train_extra: 2,
        unlabeled: 1,
        blob_radius: 50,
        ..Default::default()
    };
    synth::generate(&cfg, dir).unwrap();
    cfg
}

#[test]
fn synth_is_deterministic_resumable_and_guarded() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let cfg = small_synth(a.path(), 3);
    small_synth(b.path(), 3);
    let f = "leftImg8bit/train/synth/synth_000000_000002_leftImg8bit.png";
    assert_eq!(
        std::fs::read(a.path().join(f)).unwrap(),
        std::fs::read(b.path().join(f)).unwrap()
    );
    let l = "gtFine/val/synth/synth_000000_000001_gtFine_labelIds.png";
    assert_eq!(
        std::fs::read(a.path().join(l)).unwrap(),
        std::fs::read(b.path().join(l)).unwrap()
    );
    assert!(a
        .path()
        .join("gtCoarse/train_extra/synth/synth_000000_000001_gtCoarse_labelIds.png")
        .exists());
    assert!(a
        .path()
        .join("leftImg8bit/unlabeled/synth/synth_000000_000000_leftImg8bit.png")
        .exists());
    // An interrupted run (one image lost) is completed and nothing else rewritten.
    std::fs::remove_file(a.path().join(f)).unwrap();
    let w = synth::generate(&cfg, a.path()).unwrap();
    assert_eq!((w.images, w.labels), (1, 1));
    // Other options in the same folder are refused.
    let other = SynthConfig { seed: 8, ..cfg };
    let e = synth::generate(&other, a.path()).unwrap_err().to_string();
    assert!(e.contains("synth.toml") && e.contains("other options"), "{e}");
}

#[test]
fn synth_labels_are_official_ids_and_coarse_is_eroded() {
    let d = tempfile::tempdir().unwrap();
    small_synth(d.path(), 2);
    let ds = Dataset::cityscapes(d.path(), "train", Labels::Fine).unwrap();
    // The ten classes the benchmark draws (README, data section), as
    // Cityscapes train ids: road 0, sidewalk 1, building 2, pole 5, traffic
    // sign 7, vegetation 8, terrain 9, sky 10, person 11, car 13.
    let drawn = [0u8, 1, 2, 5, 7, 8, 9, 10, 11, 13];
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..ds.len() {
        let (_, lab) = ds.load(i).unwrap();
        for p in lab.unwrap().pixels() {
            assert!(drawn.contains(&p[0]), "train id {} is not a drawn class", p[0]);
            seen.insert(p[0]);
        }
    }
    // every image has road, sidewalk, building, sky and one field of each
    // context class
    for c in [0u8, 1, 2, 8, 9, 10] {
        assert!(seen.contains(&c), "class {c} never drawn: {seen:?}");
    }
    let coarse = Dataset::cityscapes(d.path(), "train_extra", Labels::Coarse).unwrap();
    let (_, lab) = coarse.load(0).unwrap();
    let lab = lab.unwrap();
    let ignore = lab.pixels().filter(|p| p[0] == 255).count();
    assert!(ignore > lab.len() / 10, "coarse labels leave borders unlabelled");
    // only the large classes: road, sidewalk, building, vegetation, terrain, sky
    for p in lab.pixels() {
        assert!([0, 1, 2, 8, 9, 10, 255].contains(&p[0]), "{}", p[0]);
    }
}

#[test]
fn synth_poses_the_scale_question_on_validation_images_and_training_crops() {
    use hmsa_lab::data::synth::Where;
    let cfg = SynthConfig {
        height: 128,
        width: 256,
        blob_radius: 60,
        ..Default::default()
    };
    let st = synth::stats(&cfg, &AugmentConfig::default(), 8);
    let at = |w: Where| st.cues.iter().find(|c| c.at == w).unwrap();
    // Context: away from the cue, a 7x7 patch says nothing (chance 0.5).
    assert!(
        (0.4..0.6).contains(&st.local_accuracy),
        "local classifier: {}",
        st.local_accuracy
    );
    // Most context pixels are several output pixels from their cue at 1.0x,
    // half as many at 0.5x.
    let (c05, c1) = (
        at(Where::Val(0.5)).context_cue_px,
        at(Where::Val(1.0)).context_cue_px,
    );
    assert!(c1 > 4.0, "median cue distance at 1.0x: {c1} output px");
    assert!((c05 / c1 - 0.5).abs() < 0.1, "{c05} vs {c1}");
    // Detail: poles are visible at 0.5x but under one output pixel wide;
    // two or more at 2.0x.
    let pole = |w: Where| at(w).detail.iter().find(|d| d.class == "pole").unwrap().clone();
    let (p05, p1, p2) = (
        pole(Where::Val(0.5)),
        pole(Where::Val(1.0)),
        pole(Where::Val(2.0)),
    );
    assert!(p05.visible > 0.9 && p05.width_px < 1.0, "{p05:?}");
    assert!(p2.width_px >= 2.0, "{p2:?}");
    // Band-limited: training's resampling keeps the detail classes'
    // contrast (v1's ±A modulation kept about half of it).
    for d in &at(Where::TrainCrops).detail {
        let v = at(Where::Val(1.0))
            .detail
            .iter()
            .find(|e| e.class == d.class)
            .unwrap();
        assert!(
            (d.contrast / v.contrast - 1.0).abs() < 0.15,
            "{}: contrast {} on training crops, {} on validation",
            d.class,
            d.contrast,
            v.contrast
        );
        assert!(d.visible > 0.9, "{d:?}");
    }
    assert!(p1.pixels > 0 && p1.contrast > 20.0, "{p1:?}");
}

#[test]
fn synth_v3_fields_are_as_tall_as_the_image_and_deterministic() {
    use hmsa_lab::config::Layout;
    use hmsa_lab::data::synth::ids;
    let cfg = SynthConfig {
        height: 128,
        width: 256,
        blob_radius: 100,
        layout: Layout::V3,
        ..Default::default()
    };
    let (h, w) = (128f32, 256f32);
    for i in 0..12 {
        let a = synth::render(&cfg, "train", i);
        let b = synth::render(&cfg, "train", i);
        assert_eq!(
            a.image, b.image,
            "scene {i} is a function of (seed, split, index)"
        );
        assert_eq!(a.label_ids, b.label_ids);
        let other = synth::render(
            &SynthConfig {
                seed: 1,
                ..cfg.clone()
            },
            "train",
            i,
        );
        assert_ne!(a.image, other.image, "another seed, another scene");
        let mut halves = vec![];
        for (id, cue) in [(ids::VEGETATION, [30u8, 70, 95]), (ids::TERRAIN, [205, 170, 60])] {
            let px: Vec<(u32, u32)> = a
                .label_ids
                .enumerate_pixels()
                .filter(|(_, _, p)| p[0] == id)
                .map(|(x, y, _)| (x, y))
                .collect();
            let top = px.iter().map(|p| p.1).min().unwrap() as f32;
            let bottom = px.iter().map(|p| p.1).max().unwrap() as f32 + 1.0;
            let left = px.iter().map(|p| p.0).min().unwrap() as f32;
            let right = px.iter().map(|p| p.0).max().unwrap() as f32 + 1.0;
            // top at 5–12% of the height, bottom at 93–98% (one pixel of
            // slack for the 2x2 box filter), 80–100 px wide
            assert!(
                (0.05 * h - 1.0..=0.12 * h + 1.0).contains(&top),
                "scene {i} class {id}: top {top}"
            );
            assert!(
                (0.93 * h - 1.0..=0.98 * h + 1.0).contains(&bottom),
                "scene {i} class {id}: bottom {bottom}"
            );
            assert!(
                (79.0..=101.0).contains(&(right - left)),
                "scene {i} class {id}: width {}",
                right - left
            );
            halves.push(((left + right) / 2.0 >= w / 2.0) as u8);
            // the cue: the band's 8 rows hold the class's colour, the rest
            // of the field does not
            let (mut band, mut cued, mut below_cued) = (0, 0, 0);
            for &(x, y) in &px {
                let is_cue = a.image.get_pixel(x, y).0 == cue;
                // (the band's first row may blend with what lies above)
                if (y as f32) > top && (y as f32) < top + 7.0 {
                    band += 1;
                    cued += usize::from(is_cue);
                } else if (y as f32) > top + 9.0 {
                    below_cued += usize::from(is_cue);
                }
                // the distance to the cue: rows below the band
                let d = a.cue_distance[(y * 256 + x) as usize];
                let want = (y as f32 + 0.5 - (top + 8.0)).max(0.0);
                assert!(
                    (d - want).abs() <= 1.5,
                    "scene {i} ({x}, {y}): distance {d}, {want} expected"
                );
            }
            assert!(
                cued as f32 > 0.9 * band as f32,
                "scene {i} class {id}: {cued} of {band} band pixels cued"
            );
            assert_eq!(below_cued, 0, "scene {i} class {id}: the cue below the band");
        }
        assert_ne!(halves[0], halves[1], "scene {i}: one field in each half");
    }
}

fn write_gray(p: &Path, img: &GrayImage) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    img.save(p).unwrap();
}

fn write_rgb(p: &Path, img: &RgbImage) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    img.save(p).unwrap();
}

#[test]
fn data_check_names_every_bad_file() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    let img = RgbImage::from_pixel(8, 4, Rgb([10, 20, 30]));
    let lab = GrayImage::from_pixel(8, 4, Luma([7]));
    let im = |n: &str| r.join(format!("leftImg8bit/train/c/{n}_leftImg8bit.png"));
    let gt = |n: &str| r.join(format!("gtFine/train/c/{n}_gtFine_labelIds.png"));
    // good
    write_rgb(&im("c_000000_000001"), &img);
    write_gray(&gt("c_000000_000001"), &lab);
    // image without label
    write_rgb(&im("c_000000_000002"), &img);
    // label without image
    write_gray(&gt("c_000000_000003"), &lab);
    // size mismatch
    write_rgb(&im("c_000000_000004"), &img);
    write_gray(&gt("c_000000_000004"), &GrayImage::from_pixel(4, 4, Luma([7])));
    // unknown label id 77
    write_rgb(&im("c_000000_000005"), &img);
    write_gray(
        &gt("c_000000_000005"),
        &GrayImage::from_fn(8, 4, |x, _| Luma([if x == 0 { 77 } else { 26 }])),
    );
    // corrupt image
    std::fs::write(im("c_000000_000006"), b"garbage").unwrap();
    write_gray(&gt("c_000000_000006"), &lab);
    // RGB label
    write_rgb(&im("c_000000_000007"), &img);
    write_rgb(&gt("c_000000_000007"), &img);

    let ds = Dataset::cityscapes(r, "train", Labels::Fine).unwrap();
    let rep = check::check(&ds);
    let has = |name: &str, what: &str| {
        rep.problems
            .iter()
            .any(|p| p.path.to_string_lossy().contains(name) && p.msg.contains(what))
    };
    assert!(
        has("c_000000_000002_leftImg8bit", "no label"),
        "{:?}",
        rep.problems
    );
    assert!(has("c_000000_000003_gtFine", "no image"), "{:?}", rep.problems);
    assert!(
        has("c_000000_000004_gtFine", "4x4 but its image is 8x4"),
        "{:?}",
        rep.problems
    );
    assert!(
        has("c_000000_000005_gtFine", "unknown label ids 77"),
        "{:?}",
        rep.problems
    );
    assert!(has("c_000000_000006_leftImg8bit", ""), "{:?}", rep.problems);
    assert!(
        has("c_000000_000007_gtFine", "8-bit grey or palette"),
        "{:?}",
        rep.problems
    );
    assert_eq!(rep.problems.len(), 6, "{:?}", rep.problems);
    // road (labelId 7) in the good image; car (26) and ignore in #5
    assert_eq!(rep.labelled, 2);
    assert_eq!(rep.class_pixels[0], 32);
    assert_eq!(rep.class_pixels[13], 28);
    assert_eq!(rep.ignore_pixels, 4);

    // The command exits non-zero, lists the files and does not panic.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hmsa-lab"))
        .args(["data", "check", r.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(3), "findings: exit 3");
    assert!(
        out.contains("c_000000_000005_gtFine_labelIds.png: unknown label ids 77"),
        "{out}"
    );
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

#[test]
fn mapillary_palette_labels_map_through_the_config() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    std::fs::write(
        r.join("config.json"),
        r#"{"labels": [
            {"name": "construction--flat--road", "readable": "Road", "color": [128, 64, 128], "evaluate": true},
            {"name": "void--unlabeled", "readable": "Unlabeled", "color": [0, 0, 0], "evaluate": false},
            {"name": "object--vehicle--car", "readable": "Car", "color": [0, 0, 142], "evaluate": true}
        ]}"#,
    )
    .unwrap();
    write_rgb(
        &r.join("training/images/abc.png"),
        &RgbImage::from_pixel(400, 200, Rgb([1, 2, 3])),
    );
    // A palette PNG: indices 0, 1, 2 across the width.
    let lp = r.join("training/labels/abc.png");
    std::fs::create_dir_all(lp.parent().unwrap()).unwrap();
    let mut enc = png::Encoder::new(
        std::io::BufWriter::new(std::fs::File::create(&lp).unwrap()),
        400,
        200,
    );
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(vec![128, 64, 128, 0, 0, 0, 0, 0, 142]);
    let idx: Vec<u8> = (0..200).flat_map(|_| (0..400).map(|x| (x / 134) as u8)).collect();
    enc.write_header().unwrap().write_image_data(&idx).unwrap();

    let mut ds = Dataset::open(r, "train", Labels::Fine).unwrap();
    assert_eq!(ds.classes.names, vec!["Road", "Car"]);
    ds.long_edge = Some(200); // the paper resizes Vistas by the long edge
    let (img, lab) = ds.load(0).unwrap();
    assert_eq!(img.dimensions(), (200, 100));
    let lab = lab.unwrap();
    assert_eq!(lab.get_pixel(10, 50)[0], 0); // road
    assert_eq!(lab.get_pixel(100, 50)[0], 255); // unlabeled: not evaluated
    assert_eq!(lab.get_pixel(190, 50)[0], 1); // car
    assert!(check::check(&ds).problems.is_empty());
}

#[test]
fn class_uniform_sampling_hits_rare_classes_as_configured() {
    let d = tempfile::tempdir().unwrap();
    small_synth(d.path(), 6);
    let ds = Dataset::cityscapes(d.path(), "train", Labels::Fine).unwrap();
    let cache = d.path().join("cache/centroids.json");
    let c = Centroids::load_or_compute(&ds, 64, &cache).unwrap();
    assert!(cache.exists());
    assert_eq!(Centroids::load_or_compute(&ds, 64, &cache).unwrap(), c);
    let present = c.classes_present();
    assert!(present.len() >= 9, "{present:?}");
    let cfg = SamplerConfig {
        class_uniform: 0.5,
        tile: 64,
        second_share: 0.0,
        second_boost: vec![],
    };
    let src = Source {
        dataset: &ds,
        centroids: Some(&c),
    };
    let plan = epoch_plan(&src, None, &cfg, 8, 400, 1, 0).unwrap();
    let items: Vec<_> = plan.iter().flatten().collect();
    let uniform = items.iter().filter(|i| i.class.is_some()).count();
    let share = uniform as f64 / items.len() as f64;
    assert!((share - 0.5).abs() < 0.03, "class-uniform share {share}");
    // Every present class, rare poles and signs included, is chosen about
    // 1/K of the class-uniform draws, and its centroid lies on that class.
    let k = present.len() as f64;
    for &cl in &present {
        let n = items.iter().filter(|i| i.class == Some(cl)).count() as f64;
        assert!(
            (n / uniform as f64 - 1.0 / k).abs() < 0.03,
            "class {cl}: {n} of {uniform}"
        );
    }
    // A centroid is the centre of mass of its class's pixels in a 64 px
    // tile (the official `uniform.py`): inside that tile, within the
    // bounding box of those pixels.
    let pole = 5;
    for it in items.iter().filter(|i| i.class == Some(pole)).take(20) {
        let (_, lab) = ds.load(it.index).unwrap();
        let (x, y) = it.centre.unwrap();
        let lab = lab.unwrap();
        let (tx, ty) = (x / 64 * 64, y / 64 * 64);
        let mut bbox: Option<(u32, u32, u32, u32)> = None;
        for yy in ty..(ty + 64).min(lab.height()) {
            for xx in tx..(tx + 64).min(lab.width()) {
                if lab.get_pixel(xx, yy)[0] == pole as u8 {
                    let b = bbox.get_or_insert((xx, yy, xx, yy));
                    *b = (b.0.min(xx), b.1.min(yy), b.2.max(xx), b.3.max(yy));
                }
            }
        }
        let (x0, y0, x1, y1) = bbox.unwrap_or_else(|| panic!("no pole in the tile of centroid ({x}, {y})"));
        assert!(
            (x0..=x1).contains(&x) && (y0..=y1).contains(&y),
            "pole centroid ({x}, {y}) outside its tile's poles ({x0}, {y0})-({x1}, {y1})"
        );
    }
}

#[test]
fn mixed_batches_take_the_configured_share_from_the_second_source() {
    let d = tempfile::tempdir().unwrap();
    small_synth(d.path(), 2);
    let fine = Dataset::cityscapes(d.path(), "train", Labels::Fine).unwrap();
    let coarse = Dataset::cityscapes(d.path(), "train_extra", Labels::Coarse).unwrap();
    let cfg = SamplerConfig {
        class_uniform: 0.0,
        tile: 64,
        second_share: 0.5,
        second_boost: vec![],
    };
    let plan = epoch_plan(
        &Source {
            dataset: &fine,
            centroids: None,
        },
        Some(&Source {
            dataset: &coarse,
            centroids: None,
        }),
        &cfg,
        4,
        10,
        3,
        0,
    )
    .unwrap();
    for b in &plan {
        assert_eq!(b.iter().filter(|i| i.source == 1).count(), 2);
    }
}

#[test]
fn boosted_classes_bring_the_second_source_through_class_uniform_crops_only() {
    // The official coarse_boost_classes: the second source's centroids of
    // the boosted classes join the primary's lists; nothing else of it is
    // drawn.
    let d = tempfile::tempdir().unwrap();
    small_synth(d.path(), 6);
    let fine = Dataset::cityscapes(d.path(), "train", Labels::Fine).unwrap();
    let extra = Dataset::cityscapes(d.path(), "val", Labels::Fine).unwrap();
    let (cf, ce) = (
        Centroids::compute(&fine, 64).unwrap(),
        Centroids::compute(&extra, 64).unwrap(),
    );
    let person = 11;
    let cfg = SamplerConfig {
        class_uniform: 0.5,
        tile: 64,
        second_share: 0.5,
        second_boost: vec![person],
    };
    let plan = epoch_plan(
        &Source {
            dataset: &fine,
            centroids: Some(&cf),
        },
        Some(&Source {
            dataset: &extra,
            centroids: Some(&ce),
        }),
        &cfg,
        4,
        2000,
        5,
        0,
    )
    .unwrap();
    let items: Vec<_> = plan.iter().flatten().collect();
    let second: Vec<_> = items.iter().filter(|i| i.source == 1).collect();
    assert!(!second.is_empty());
    assert!(
        second
            .iter()
            .all(|i| i.class == Some(person) && i.centre.is_some()),
        "only class-uniform person crops come from the second source"
    );
    // A person draw picks uniformly from the merged list.
    let (nf, ne) = (cf.by_class[person].len() as f64, ce.by_class[person].len() as f64);
    let persons = items.iter().filter(|i| i.class == Some(person)).count() as f64;
    let got = second.len() as f64 / persons;
    let want = ne / (nf + ne);
    assert!(
        (got - want).abs() < 0.05,
        "second-source share of person crops {got}, lists give {want}"
    );
    // Each second-source item indexes the second dataset at one of its centroids.
    for i in &second {
        let (x, y) = i.centre.unwrap();
        assert!(ce.by_class[person].contains(&(i.index as u32, x, y)));
    }
}

#[test]
fn loader_delivers_the_same_batches_in_order_whatever_the_workers() {
    let d = tempfile::tempdir().unwrap();
    small_synth(d.path(), 4);
    let ds = Dataset::cityscapes(d.path(), "train", Labels::Fine).unwrap();
    let cfg = SamplerConfig {
        class_uniform: 0.5,
        tile: 64,
        second_share: 0.0,
        second_boost: vec![],
    };
    let c = Centroids::compute(&ds, 64).unwrap();
    let plan = Arc::new(
        epoch_plan(
            &Source {
                dataset: &ds,
                centroids: Some(&c),
            },
            None,
            &cfg,
            2,
            6,
            5,
            1,
        )
        .unwrap(),
    );
    let aug = AugmentConfig {
        crop: [64, 128],
        ..Default::default()
    };
    let sources = Arc::new(vec![ds]);
    let collect = |workers: usize, start: usize| -> Vec<(usize, Vec<f32>, Vec<u32>)> {
        Loader::spawn(
            sources.clone(),
            plan.clone(),
            start,
            aug.clone(),
            11,
            1,
            workers,
            2,
        )
        .map(|b| {
            let b = b.unwrap();
            assert_eq!(b.images.dims(), &[2, 3, 64, 128]);
            (
                b.index,
                b.images.flatten_all().unwrap().to_vec1().unwrap(),
                b.labels.flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
    };
    let one = collect(1, 0);
    let three = collect(3, 0);
    assert_eq!(
        one.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5]
    );
    assert_eq!(one, three);
    // A resumed epoch starting at batch 4 sees batches 4 and 5 unchanged.
    assert_eq!(collect(2, 4), one[4..].to_vec());
    // Dropping a loader mid-epoch stops its workers: the drop joins them,
    // so it returns only once they have ended (a worker blocked on a full
    // queue would hang it; 60 s is a liveness bound, not a timing).
    let mut l = Loader::spawn(sources.clone(), plan.clone(), 0, aug.clone(), 11, 1, 2, 1);
    assert!(l.next().is_some());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(l);
        tx.send(()).unwrap();
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(60)).is_ok(),
        "dropping the loader did not stop its workers"
    );
}

/// A palette label PNG of `w` x `h` whose index is `f(x)`.
fn palette_png(p: &Path, w: u32, h: u32, palette: Vec<u8>, f: impl Fn(u32) -> u8) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(std::fs::File::create(p).unwrap()), w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(palette);
    let idx: Vec<u8> = (0..h).flat_map(|_| (0..w).map(&f)).collect();
    enc.write_header().unwrap().write_image_data(&idx).unwrap();
}

/// Mapillary beyond the happy path: the v1.2 layout (`config_v1.2.json`,
/// `training/v1.2/labels/` preferred over a stale `training/labels/`), JPEG
/// images, an image without a label and a label without an image.
#[test]
fn mapillary_v1_2_layout_jpegs_and_unpaired_files() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    std::fs::write(
        r.join("config_v1.2.json"),
        r#"{"labels": [
            {"name": "construction--flat--road", "readable": "Road", "color": [128, 64, 128], "evaluate": true},
            {"name": "object--vehicle--car", "readable": "Car", "color": [0, 0, 142], "evaluate": true}
        ]}"#,
    )
    .unwrap();
    let img = RgbImage::from_fn(64, 32, |x, _| {
        if x < 32 {
            Rgb([128, 64, 128])
        } else {
            Rgb([0, 0, 142])
        }
    });
    for stem in ["a", "b"] {
        let p = r.join(format!("training/images/{stem}.jpg"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        img.save_with_format(&p, image::ImageFormat::Jpeg).unwrap();
    }
    let pal = vec![128, 64, 128, 0, 0, 142];
    palette_png(&r.join("training/v1.2/labels/a.png"), 64, 32, pal.clone(), |x| {
        u8::from(x >= 32)
    });
    palette_png(&r.join("training/v1.2/labels/c.png"), 64, 32, pal.clone(), |_| 0);
    // a stale v1.0 label folder with every image labelled: not read
    palette_png(&r.join("training/labels/a.png"), 64, 32, pal.clone(), |_| 1);
    palette_png(&r.join("training/labels/b.png"), 64, 32, pal, |_| 1);

    let ds = Dataset::open(r, "train", Labels::Fine).unwrap();
    assert_eq!(ds.samples.len(), 1);
    assert_eq!(ds.samples[0].name, "a");
    assert_eq!(ds.unpaired_images, vec![r.join("training/images/b.jpg")]);
    assert_eq!(ds.unpaired_labels, vec![r.join("training/v1.2/labels/c.png")]);
    let (im, lab) = ds.load(0).unwrap();
    assert_eq!(im.dimensions(), (64, 32));
    // JPEG keeps the colours near their values
    assert!(im.get_pixel(5, 5)[0] > 100 && im.get_pixel(60, 5)[2] > 100);
    let lab = lab.unwrap();
    assert_eq!(
        lab.get_pixel(5, 5)[0],
        0,
        "road from v1.2, not the stale folder's car"
    );
    assert_eq!(lab.get_pixel(60, 5)[0], 1);
    let rep = check::check(&ds);
    let named: Vec<String> = rep
        .problems
        .iter()
        .map(|p| format!("{}: {}", p.path.display(), p.msg))
        .collect();
    assert_eq!(named.len(), 2, "{named:?}");
    assert!(
        named
            .iter()
            .any(|n| n.ends_with("b.jpg: image has no label file")),
        "{named:?}"
    );
    assert!(
        named
            .iter()
            .any(|n| n.ends_with("c.png: label file has no image")),
        "{named:?}"
    );
}

/// `eval::reach` counts every context pixel of the validation scenes in
/// its distance bin (a histogram recounted here from the generator's
/// labels and distances) and scores it by the two context classes'
/// logits (recounted here by an argmax over that two-channel slice of the
/// network's output).
#[test]
fn reach_bins_every_context_pixel_by_its_cue_distance() {
    use hmsa_lab::config::Layout;
    use hmsa_lab::data::synth::ids;
    use hmsa_lab::model::{Fusion, ModelConfig};
    let cfg = SynthConfig {
        height: 64,
        width: 128,
        val: 2,
        blob_radius: 50,
        layout: Layout::V3,
        ..Default::default()
    };
    let net_cfg = ModelConfig {
        num_classes: 19,
        ..super::tiny()
    };
    let (_, net) = super::fresh(&net_cfg, 5);
    let dev = candle_core::Device::Cpu;
    let rows = hmsa_lab::eval::reach::reach(&net, &cfg, &[0.5, 1.0], 2, &dev).unwrap();
    assert_eq!(rows.iter().map(|r| r.scale).collect::<Vec<_>>(), vec![0.5, 1.0]);
    let bin = hmsa_lab::eval::reach::BIN;
    let mut count = vec![0usize; rows[1].bins.len()];
    let mut right = vec![0usize; rows[1].bins.len()];
    for i in 0..2 {
        let s = synth::render(&cfg, "val", i);
        let x = hmsa_lab::data::image::normalize(&s.image, &dev).unwrap();
        let (f, _) = net.infer(&x, Fusion::Single, &[1.0], false, false).unwrap();
        // train ids 8 (vegetation) and 9 (terrain): 0 = vegetation wins
        let pick = super::argmax_ids(&f.pred.narrow(1, 8, 2).unwrap());
        for (p, l) in s.label_ids.pixels().enumerate() {
            let veg = match l[0] {
                ids::VEGETATION => true,
                ids::TERRAIN => false,
                _ => continue,
            };
            let k = (s.cue_distance[p] / bin) as usize;
            count[k] += 1;
            right[k] += usize::from((pick[p] == 0) == veg);
        }
    }
    assert!(count.iter().filter(|&&n| n > 0).count() >= 3, "{count:?}");
    for r in &rows {
        for (k, &(n, acc)) in r.bins.iter().enumerate() {
            assert_eq!(n, count[k], "scale {} bin {k}", r.scale);
            if n > 0 {
                assert!((0.0..=1.0).contains(&acc));
            }
        }
    }
    for (k, &(n, acc)) in rows[1].bins.iter().enumerate() {
        if n > 0 {
            assert!((acc - right[k] as f64 / n as f64).abs() < 1e-12, "bin {k}");
        }
    }
}

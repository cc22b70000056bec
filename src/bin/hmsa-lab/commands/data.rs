//! `synth` and `data check`.

use crate::cli::{CheckArgs, SynthArgs};
use crate::output::outln;
use crate::process::Exit;
use anyhow::{Context, Result};
use hmsa_lab::config::suite::Suite;
use hmsa_lab::config::SynthConfig;
use hmsa_lab::data::synth;
use hmsa_lab::data::{check, Dataset, Labels};

pub fn synth(a: SynthArgs) -> Result<()> {
    let mut augment = hmsa_lab::config::AugmentConfig::default();
    let mut model = None;
    let mut cfg = match (&a.config, &a.suite) {
        (Some(p), _) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let cfg = toml::from_str::<SynthConfig>(&text).with_context(|| format!("{}", p.display()))?;
            cfg.validate("synth")
                .with_context(|| format!("{}", p.display()))?;
            cfg
        }
        (None, Some(p)) => {
            let suite = Suite::load(p, &[])?;
            let first = suite
                .runs
                .first()
                .with_context(|| format!("{}: the suite plans no runs", p.display()))?;
            augment = first.config.data.augment.clone();
            model = Some(first.config.model.clone());
            first.config.data.synth.clone()
        }
        (None, None) => SynthConfig::default(),
    };
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.train {
        cfg.train = v;
    }
    if let Some(v) = a.val {
        cfg.val = v;
    }
    if let Some(v) = a.train_extra {
        cfg.train_extra = v;
    }
    if let (Some(weights), Some(model)) = (&a.reach, &model) {
        let dev = hmsa_lab::device()?;
        let net = hmsa_lab::model::checkpoint::load(model, weights, &dev)?;
        let rows = hmsa_lab::eval::reach::reach(&net, &cfg, &[0.25, 0.5, 1.0, 2.0], cfg.val, &dev)?;
        outln!(
            "{}: share of vegetation and terrain pixels whose own class scores above the other, by distance (px at 1.0x) from the cue; {} validation scenes",
            weights.display(),
            cfg.val
        )?;
        let bin = hmsa_lab::eval::reach::BIN;
        let used = rows[0].bins.iter().rposition(|b| b.0 > 0).map_or(0, |k| k + 1);
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::ASCII_MARKDOWN);
        let mut header = vec!["scale".to_string()];
        header.extend((0..used).map(|k| format!("{}–{}", k as f32 * bin, (k + 1) as f32 * bin)));
        t.set_header(header);
        for r in &rows {
            let mut row = vec![format!("{}x", r.scale)];
            row.extend(r.bins[..used].iter().map(|b| format!("{:.0}", 100.0 * b.1)));
            t.add_row(row);
        }
        let mut row = vec!["pixels".to_string()];
        row.extend(rows[0].bins[..used].iter().map(|b| b.0.to_string()));
        t.add_row(row);
        outln!("{t}")?;
        return Ok(());
    }
    if let Some(n) = a.stats {
        let st = synth::stats(&cfg, &augment, n);
        outln!("{n} training scenes (classifier fit, training crops) and {n} validation scenes")?;
        outln!(
            "context classes (vegetation vs terrain): local 7x7 nearest-mean accuracy {:.3} (chance 0.5)",
            st.local_accuracy
        )?;
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::ASCII_MARKDOWN);
        let mut header = vec![
            "measured on".to_string(),
            "context: cue distance (output px), median".into(),
            "10% / 25% / 75% / 90%".into(),
        ];
        for d in &st.cues[0].detail {
            header.push(format!("{}: visible", d.class));
            header.push(format!("{}: contrast", d.class));
            header.push(format!("{}: width (output px)", d.class));
        }
        t.set_header(header);
        for c in &st.cues {
            let q = c.context_cue_spread;
            let mut row = vec![
                c.at.to_string(),
                format!("{:.1}", c.context_cue_px),
                format!("{:.1} / {:.1} / {:.1} / {:.1}", q[0], q[1], q[2], q[3]),
            ];
            for d in &c.detail {
                row.push(format!("{:.3}", d.visible));
                row.push(format!("{:.0}", d.contrast));
                row.push(format!("{:.2}", d.width_px));
            }
            t.add_row(row);
        }
        outln!("{t}")?;
        return Ok(());
    }
    let w = synth::generate(&cfg, &a.out)?;
    outln!(
        "{}: wrote {} images and {} label maps ({} train, {} val, {} train_extra, {} unlabeled requested)",
        a.out.display(),
        w.images,
        w.labels,
        cfg.train,
        cfg.val,
        cfg.train_extra,
        cfg.unlabeled
    )?;
    Ok(())
}

pub fn data_check(dir: &std::path::Path, splits: &[String]) -> Result<bool> {
    let splits: Vec<String> = if !splits.is_empty() {
        splits.to_vec()
    } else if let Some(_cfg) = hmsa_lab::data::mapillary::config_path(dir) {
        ["training", "validation"]
            .iter()
            .filter(|s| dir.join(s).is_dir())
            .map(|s| s.to_string())
            .collect()
    } else {
        let root = dir.join("leftImg8bit");
        let mut v: Vec<String> = std::fs::read_dir(&root)
            .with_context(|| {
                format!(
                    "{}: not a dataset (no leftImg8bit/ and no Mapillary config)",
                    dir.display()
                )
            })?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .collect();
        v.sort();
        v
    };
    let mut clean = true;
    for split in &splits {
        let labels = if dir.join("gtFine").join(split).is_dir() {
            Labels::Fine
        } else if dir.join("gtCoarse").join(split).is_dir() {
            Labels::Coarse
        } else {
            Labels::None
        };
        let ds = Dataset::open(dir, split, labels)?;
        let r = check::check(&ds);
        outln!(
            "== {split}: {} images, {} labelled ({labels:?} labels)",
            r.images,
            r.labelled
        )?;
        for p in &r.problems {
            outln!("  problem: {}: {}", p.path.display(), p.msg)?;
        }
        clean &= r.problems.is_empty();
        if r.labelled > 0 {
            let total = r.total_pixels().max(1) as f64;
            let mut t = comfy_table::Table::new();
            t.set_header(vec!["class", "pixel share %", "images"]);
            for (c, name) in ds.classes.names.iter().enumerate() {
                if r.class_pixels[c] > 0 {
                    t.add_row(vec![
                        name.clone(),
                        format!("{:.3}", 100.0 * r.class_pixels[c] as f64 / total),
                        r.class_images[c].to_string(),
                    ]);
                }
            }
            t.add_row(vec![
                "(ignore)".to_string(),
                format!("{:.3}", 100.0 * r.ignore_pixels as f64 / total),
                String::new(),
            ]);
            outln!("{t}")?;
        }
    }
    Ok(clean)
}

pub fn data_check_cmd(a: CheckArgs) -> Result<()> {
    let CheckArgs { dir, split } = a;
    if !data_check(&dir, &split)? {
        return Err(Exit::Unfinished(format!(
            "{}: the dataset has problems (listed above)",
            dir.display()
        ))
        .into());
    }
    Ok(())
}

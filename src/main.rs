//! The `hmsa-lab` command line: parse, call the library, print the error
//! chain once. Exit codes: 0 ok, 2 error.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hmsa_lab::config::RunConfig;
use hmsa_lab::data::synth::{self, SynthConfig};
use hmsa_lab::data::{check, Dataset, Labels};
use hmsa_lab::eval::infer::{infer_all, read_inputs, InferOptions};
use hmsa_lab::model::fusion::parse_scales;
use hmsa_lab::model::{checkpoint, flops, Fusion, ModelConfig};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hmsa-lab",
    version,
    about = "Hierarchical multi-scale attention for semantic segmentation, and its ablation lab"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Segment images (or safetensors tensors) with a checkpoint.
    Infer(InferArgs),
    /// List the network's parameters and buffers, its size and FLOPs.
    Model(ModelArgs),
    /// Generate the synthetic street-scene benchmark (Cityscapes layout).
    Synth(SynthArgs),
    /// Dataset tools.
    #[command(subcommand)]
    Data(DataCmd),
    /// Train one run config (resumes from the run folder's last checkpoint), then evaluate.
    Train(TrainArgs),
    /// Score a folder of labelIds predictions against Cityscapes ground truth.
    Eval(EvalArgs),
    /// Label images with a teacher; low-confidence pixels become ignore.
    Autolabel(AutolabelArgs),
}

#[derive(Args)]
struct TrainArgs {
    /// Run config TOML ([model], [data], [train], [eval]).
    #[arg(long)]
    config: PathBuf,
    /// Run folder: checkpoints, final weights, evaluation JSON.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    pred_dir: PathBuf,
    #[arg(long)]
    gt_dir: PathBuf,
    /// table or json
    #[arg(long, default_value = "table")]
    format: String,
}

#[derive(Args)]
struct AutolabelArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Teacher weights.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Dataset root (Cityscapes layout) holding the images to label.
    #[arg(long)]
    data: PathBuf,
    /// Split to label.
    #[arg(long, default_value = "train_extra")]
    split: String,
    #[arg(long, value_parser = parse_scale_list)]
    scales: Option<ScaleList>,
    #[arg(long)]
    fusion: Option<Fusion>,
    /// Pixels whose top probability is below this become ignore.
    #[arg(long, default_value_t = 0.9)]
    threshold: f64,
    /// Output root (Cityscapes layout: leftImg8bit + gtFine).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum DataCmd {
    /// Validate a dataset: report bad files by name, print class shares.
    Check {
        /// Dataset root (Cityscapes layout or Mapillary Vistas).
        dir: PathBuf,
        /// Splits to check (default: every split found).
        #[arg(long)]
        split: Vec<String>,
    },
}

#[derive(Args)]
struct SynthArgs {
    /// Output folder.
    #[arg(long, default_value = "data/synth")]
    out: PathBuf,
    /// TOML with generator options (seed, height, width, train, val, ...).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    train: Option<usize>,
    #[arg(long)]
    val: Option<usize>,
    #[arg(long)]
    train_extra: Option<usize>,
    /// Measure the benchmark's properties on N scenes instead of writing.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "20")]
    stats: Option<usize>,
}

/// Which network: a named preset or a TOML model config.
#[derive(Args)]
struct NetArgs {
    /// Named preset: w48 (the paper's), w18, small (CPU experiments).
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// TOML model config (fields left out take the w48 values).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the number of classes.
    #[arg(long)]
    num_classes: Option<usize>,
}

impl NetArgs {
    fn resolve(&self) -> Result<ModelConfig> {
        let mut cfg = match (&self.preset, &self.config) {
            (Some(p), None) => ModelConfig::preset(p)?,
            (None, Some(path)) => ModelConfig::from_toml_file(path)?,
            (None, None) => bail!("name the network with --preset NAME or --config FILE"),
            (Some(_), Some(_)) => unreachable!("clap rejects both"),
        };
        if let Some(k) = self.num_classes {
            cfg.num_classes = k;
        }
        Ok(cfg)
    }
}

#[derive(Args)]
struct InferArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Weights: official .pth or our .safetensors.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output folder for colour, labelIds and attention PNGs.
    #[arg(long)]
    out: PathBuf,
    /// Inference scales, e.g. 0.5,1.0,2.0 (default: the model's training scales).
    #[arg(long, value_parser = parse_scale_list)]
    scales: Option<ScaleList>,
    /// single, average, max, explicit or hierarchical (default: the model's).
    #[arg(long)]
    fusion: Option<Fusion>,
    /// Also run the mirrored image and average.
    #[arg(long)]
    flip: bool,
    /// Write raw tensors (pred, aux, pred_<s>, attn_<s>) to this safetensors file.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// PNG/JPEG images, or .safetensors with an `image` tensor (N x 3 x H x W, normalised).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Input size for the FLOP count, HxW.
    #[arg(long, default_value = "1024x2048")]
    size: String,
}

/// A comma-separated scale set as one clap value.
#[derive(Clone, Debug)]
struct ScaleList(Vec<f64>);

fn parse_scale_list(s: &str) -> std::result::Result<ScaleList, String> {
    parse_scales(s).map(ScaleList)
}

fn device() -> Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    {
        Ok(candle_core::Device::new_cuda(0)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(candle_core::Device::Cpu)
    }
}

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (h, w) = s
        .split_once('x')
        .with_context(|| format!("--size `{s}`: expected HxW, e.g. 1024x2048"))?;
    Ok((
        h.trim()
            .parse()
            .with_context(|| format!("--size `{s}`: bad height"))?,
        w.trim()
            .parse()
            .with_context(|| format!("--size `{s}`: bad width"))?,
    ))
}

fn synth(a: SynthArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str::<SynthConfig>(&text).with_context(|| format!("{}", p.display()))?
        }
        None => SynthConfig::default(),
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
    if let Some(n) = a.stats {
        let st = synth::stats(&cfg, n);
        println!("scenes: {} train (classifier fit) + {} val (scored)", n, n);
        println!(
            "context-only classes (vegetation vs terrain): local 7x7 nearest-mean accuracy {:.3} (chance 0.5)",
            st.local_accuracy
        );
        for (name, share, pixels) in &st.survival {
            println!(
                "{name}: {:.3} of {pixels} pixels survive a 0.5x down/up round trip",
                share
            );
        }
        return Ok(());
    }
    let w = synth::generate(&cfg, &a.out)?;
    println!(
        "{}: wrote {} images and {} label maps ({} train, {} val, {} train_extra, {} unlabeled requested)",
        a.out.display(),
        w.images,
        w.labels,
        cfg.train,
        cfg.val,
        cfg.train_extra,
        cfg.unlabeled
    );
    Ok(())
}

fn data_check(dir: &std::path::Path, splits: &[String]) -> Result<bool> {
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
        println!(
            "== {split}: {} images, {} labelled ({labels:?} labels)",
            r.images, r.labelled
        );
        for p in &r.problems {
            println!("  problem: {}: {}", p.path.display(), p.msg);
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
            println!("{t}");
        }
    }
    Ok(clean)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train(a) => {
            let cfg = RunConfig::from_toml_file(&a.config)?;
            let report = hmsa_lab::train::train(&cfg, &a.out, &mut hmsa_lab::train::Quiet)?;
            let weights = report.weights.context("training did not finish")?;
            let net = checkpoint::load(&cfg.model, &weights, &device()?)?;
            let results = hmsa_lab::eval::evaluate(&net, &cfg.val_dataset()?, &cfg.eval.sets, &device()?)?;
            let path = a.out.join("eval.json");
            std::fs::write(&path, serde_json::to_string_pretty(&results)?)
                .with_context(|| format!("writing {}", path.display()))?;
            for r in &results {
                println!(
                    "{:<13} {:<20} flip={:<5} mIoU {:.4}  pixel acc {:.4}  {:.0} ms/image",
                    r.set.fusion.name(),
                    hmsa_lab::model::fusion::format_scales(&r.set.scales),
                    r.set.flip,
                    r.metrics.miou,
                    r.metrics.pixel_acc,
                    r.ms_per_image
                );
            }
        }
        Cmd::Eval(a) => {
            let (m, n) = hmsa_lab::eval::folder::score_folders(&a.pred_dir, &a.gt_dir)?;
            let names: Vec<&str> = hmsa_lab::data::cityscapes::CLASSES
                .iter()
                .map(|c| c.name)
                .collect();
            match a.format.as_str() {
                "json" => {
                    let per: serde_json::Map<String, serde_json::Value> = names
                        .iter()
                        .zip(&m.iou)
                        .map(|(n, v)| (n.to_string(), v.map_or(serde_json::Value::Null, |v| v.into())))
                        .collect();
                    let out = serde_json::json!({"miou": m.miou, "images": n, "pixel_acc": m.pixel_acc, "iou": per});
                    println!("{}", serde_json::to_string_pretty(&out)?);
                }
                "table" => {
                    let mut t = comfy_table::Table::new();
                    t.set_header(vec!["class", "IoU"]);
                    for (name, v) in names.iter().zip(&m.iou) {
                        t.add_row(vec![
                            name.to_string(),
                            v.map_or("-".into(), |v| format!("{:.4}", v)),
                        ]);
                    }
                    println!(
                        "{t}\nmIoU {:.4} over {n} images (pixel accuracy {:.4})",
                        m.miou, m.pixel_acc
                    );
                }
                f => bail!("--format {f}: expected table or json"),
            }
        }
        Cmd::Autolabel(a) => {
            let cfg = a.net.resolve()?;
            let dev = device()?;
            let net = checkpoint::load(&cfg, &a.checkpoint, &dev)?;
            let ds = Dataset::open(&a.data, &a.split, Labels::None)?;
            let scales = a.scales.map_or_else(|| cfg.scales.clone(), |s| s.0);
            let fusion = a.fusion.unwrap_or(cfg.fusion);
            let s = hmsa_lab::autolabel::autolabel(&net, &ds, &scales, fusion, a.threshold, &a.out, &dev)?;
            let total = (s.kept.iter().sum::<u64>() + s.dropped).max(1) as f64;
            println!("{} images labelled into {}", s.images, a.out.display());
            for (c, k) in hmsa_lab::data::cityscapes::CLASSES.iter().zip(&s.kept) {
                if *k > 0 {
                    println!("  {:<14} {:>6.2}% of pixels", c.name, 100.0 * *k as f64 / total);
                }
            }
            println!(
                "  {:<14} {:>6.2}% of pixels (below {})",
                "ignored",
                100.0 * s.dropped as f64 / total,
                a.threshold
            );
        }
        Cmd::Synth(a) => synth(a)?,
        Cmd::Data(DataCmd::Check { dir, split }) => {
            if !data_check(&dir, &split)? {
                bail!("{}: the dataset has problems (listed above)", dir.display());
            }
        }
        Cmd::Infer(a) => {
            let cfg = a.net.resolve()?;
            let dev = device()?;
            let net = checkpoint::load(&cfg, &a.checkpoint, &dev)?;
            let opts = InferOptions {
                scales: a.scales.map_or_else(|| cfg.scales.clone(), |s| s.0),
                fusion: a.fusion.unwrap_or(cfg.fusion),
                flip: a.flip,
                out_dir: a.out,
                dump: a.dump,
            };
            let mut inputs = vec![];
            for p in &a.inputs {
                inputs.extend(read_inputs(p, &dev)?);
            }
            for p in infer_all(&net, &inputs, &opts)? {
                println!("{}", p.display());
            }
        }
        Cmd::Model(a) => {
            let cfg = a.net.resolve()?;
            let (h, w) = parse_size(&a.size)?;
            let listing = checkpoint::state_dict_listing(&cfg)?;
            for (name, shape) in &listing {
                let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
                if dims.is_empty() {
                    println!("{name}");
                } else {
                    println!("{name} {}", dims.join(","));
                }
            }
            let params = checkpoint::parameter_count(&listing);
            let f = flops::count(&cfg, h, w)?;
            println!("parameters: {params}");
            println!(
                "GFLOPs at {h}x{w}: {:.1} per forward at 1.0x; {:.1} for {} fusion on {}",
                f.single as f64 / 1e9,
                f.fused as f64 / 1e9,
                cfg.fusion,
                hmsa_lab::model::fusion::format_scales(&cfg.scales)
            );
        }
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

//! The `hmsa-lab` command line: parse, call the library, print the error
//! chain once. Exit codes: 0 ok, 2 error.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
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

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
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

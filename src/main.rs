//! The `hmsa-lab` command line: parse, call the library, print the error
//! chain once. Exit codes: 0 ok; 1 a runtime error; 2 a usage error
//! (clap's); 3 the command ran and found problems (`run`/`worker`: runs
//! failed, held elsewhere or removed; `data check`: findings); 130
//! interrupted (Ctrl-C or SIGTERM, after the running run is checkpointed
//! and marked KILLED).

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hmsa_lab::config::suite::Suite;
use hmsa_lab::config::RunConfig;
use hmsa_lab::data::synth::{self, SynthConfig};
use hmsa_lab::data::{check, Dataset, Labels};
use hmsa_lab::eval::infer::{infer_all, read_inputs, InferOptions};
use hmsa_lab::lab::{run_suite, Outcome, RunOptions};
use hmsa_lab::model::{checkpoint, flops, Fusion, ModelConfig, Scales};
use hmsa_lab::report;
use hmsa_lab::store::{RunFilter, Status, Store};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "hmsa-lab",
    version,
    about = "Hierarchical multi-scale attention for semantic segmentation, and its ablation lab",
    after_help = "Environment:\n  HMSA_DB             the results database (see --db)\n  HMSA_NO_PROGRESS    no progress bars or lines\n  HMSA_PROGRESS_SECS  seconds between progress lines off a terminal (30)\n  HMSA_DEVICE=cpu     the CPU in a cuda build\n  RUST_LOG            log filter (e.g. info, hmsa_lab=debug)\n\nExit codes: 0 ok, 1 runtime error, 2 usage error, 3 ran and found problems, 130 interrupted."
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
    /// Train and evaluate every run of an experiment suite, recorded in the results database.
    Run(RunArgs),
    /// Claim and execute runs of a suite until none is runnable (one per machine or Slurm task).
    Worker(WorkerArgs),
    /// Export runs to another tool.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Convert an official runx recipe (NVIDIA/semantic-segmentation scripts/*.yml) into a suite.
    ImportRunx {
        /// The runx YAML, e.g. scripts/train_cityscapes.yml.
        recipe: PathBuf,
        /// Write the suite here instead of printing it.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// List runs.
    Runs(RunsArgs),
    /// Show one run: config, evaluations, artifacts.
    Show {
        /// The run: its id, or variant/seed (e.g. baseline/0).
        run: String,
        #[command(flatten)]
        db: DbArg,
        /// Output: table for people, json for programs.
        #[arg(long, value_enum, default_value_t = TextOrJson::Table)]
        format: TextOrJson,
    },
    /// Compare runs: only what differs, with deltas against the first.
    Compare {
        /// The runs: ids, or variant/seed (e.g. baseline/0).
        #[arg(required = true, num_args = 2..)]
        runs: Vec<String>,
        #[command(flatten)]
        db: DbArg,
        /// Output: table for people, json for programs.
        #[arg(long, value_enum, default_value_t = TextOrJson::Table)]
        format: TextOrJson,
    },
    /// Run read-only SQL on the results database (writes and VACUUM INTO are refused).
    Query {
        /// The SQL (read-only statements only).
        sql: String,
        #[command(flatten)]
        db: DbArg,
        /// Output: table or md for people, csv or json for programs.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Seconds after which the query is interrupted.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Remove runs: hidden from every listing and report, restorable until `gc` purges them.
    Rm {
        /// Run ids.
        #[arg(required = true)]
        runs: Vec<i64>,
        #[command(flatten)]
        db: DbArg,
        /// Go ahead without asking (needed off a terminal).
        #[arg(long, short)]
        yes: bool,
        /// Also remove RUNNING runs whose heartbeat is older than --stale-after.
        #[arg(long)]
        force: bool,
        /// Seconds without a heartbeat after which a RUNNING run counts as stale.
        #[arg(long, default_value_t = 60)]
        stale_after: u64,
    },
    /// Bring back runs removed with `rm` (until `gc` has purged them).
    Restore {
        /// Ids of removed runs.
        #[arg(required = true)]
        runs: Vec<i64>,
        #[command(flatten)]
        db: DbArg,
    },
    /// Purge removed runs and delete the run folders this database owns for runs it no longer holds.
    Gc {
        #[command(flatten)]
        db: DbArg,
        /// List what would be removed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Go ahead without asking (needed off a terminal).
        #[arg(long, short)]
        yes: bool,
    },
    /// Benchmarks (not tests): model, train, data, kernels; one process per case; stored in the database.
    Bench(BenchArgs),
    /// Write reports/<suite>/ (index.md, index.html, figures) and print the tables.
    Report {
        /// The suite to report on.
        #[arg(long)]
        suite: String,
        #[command(flatten)]
        db: DbArg,
        /// Output folder (default reports/<suite>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also rewrite the results section of this README (between its markers).
        #[arg(long)]
        readme: Option<PathBuf>,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// Suites (default: model, train, data and kernels); store measures
    /// claim latency and throughput with 1, 4 and 16 workers.
    #[arg(value_enum)]
    suites: Vec<BenchSuite>,
    /// The store suite also on this PostgreSQL database (its benchmark
    /// rows are purged after).
    #[arg(long, value_name = "postgres://…")]
    pg: Option<String>,
    /// Add the w48 cases: forwards at 512x1024 and 1024x2048, training
    /// steps of batch 1 on 512x1024 crops (minutes each on 2 cores).
    #[arg(long)]
    full: bool,
    /// Arithmetic of the forward and training cases: f32, or mixed
    /// precision bf16 / f16 (for a GPU; see docs/performance.md).
    #[arg(long, default_value = "f32")]
    precision: hmsa_lab::model::Precision,
    /// Output: table for people, json for programs.
    #[arg(long, value_enum, default_value_t = TextOrJson::Table)]
    format: TextOrJson,
    #[command(flatten)]
    db: DbArg,
    /// Run one case given as JSON in this process (used by the parent).
    #[arg(long, hide = true)]
    case: Option<String>,
}

/// `--db URL`: a SQLite file path, `sqlite://path` or `postgres://…`.
#[derive(Args, Clone)]
struct DbArg {
    /// Results database. Default: $HMSA_DB; else experiments/<suite>.db when
    /// a suite is named; else the only database under experiments/.
    #[arg(long, env = "HMSA_DB")]
    db: Option<String>,
}

impl DbArg {
    /// The database by the one rule every command follows (see `--help`).
    fn url(&self, suite: Option<&str>) -> Result<String> {
        if let Some(db) = &self.db {
            return Ok(db.clone());
        }
        if let Some(s) = suite {
            return Ok(format!("experiments/{s}.db"));
        }
        let mut found: Vec<String> = std::fs::read_dir("experiments")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "db"))
                    .map(|p| p.display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => bail!("no results database: give --db (or $HMSA_DB); none was found under experiments/"),
            many => bail!(
                "which results database? give --db (or $HMSA_DB); found under experiments/: {}",
                many.join(", ")
            ),
        }
    }
}

/// A run named on the command line: its id, or `variant/seed` (or
/// `suite/variant/seed` where a variant name is in several suites).
fn resolve_run(store: &Store, spec: &str) -> Result<i64> {
    if let Ok(id) = spec.parse::<i64>() {
        return Ok(id);
    }
    let parts: Vec<&str> = spec.rsplitn(3, '/').collect();
    let (seed, variant, suite) = match parts.as_slice() {
        [seed, variant] => (*seed, *variant, None),
        [seed, variant, suite] => (*seed, *variant, Some(*suite)),
        _ => bail!("run `{spec}`: give its id, or variant/seed (e.g. baseline/0), or suite/variant/seed"),
    };
    let seed: i64 = seed
        .parse()
        .with_context(|| format!("run `{spec}`: `{seed}` is not a seed"))?;
    let runs: Vec<_> = store
        .runs(&RunFilter {
            suite: suite.map(String::from),
            variant: Some(variant.to_string()),
            ..Default::default()
        })?
        .into_iter()
        .filter(|r| r.seed == seed)
        .collect();
    match runs.as_slice() {
        [one] => Ok(one.id),
        [] => bail!("no run `{spec}` in {}", store.url()),
        many => bail!(
            "run `{spec}` is ambiguous: {}",
            many.iter()
                .map(|r| format!("{} ({}/{}/{})", r.id, r.suite, r.variant, r.seed))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[derive(Args)]
struct RunArgs {
    /// The suite file, e.g. experiments/ablation.toml.
    suite: PathBuf,
    /// Results database (default: the suite file with .db).
    #[arg(long)]
    db: Option<String>,
    /// Print the plan (every run, its config hash, whether it is done) and stop.
    #[arg(long)]
    dry_run: bool,
    /// Override a key of every run, e.g. --set train.steps=10 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Retrain runs that are already finished.
    #[arg(long)]
    force: bool,
    /// Stop at the first failing run.
    #[arg(long)]
    fail_fast: bool,
    /// Seconds without a heartbeat after which a RUNNING run is taken over.
    #[arg(long, default_value_t = 60)]
    stale_after: u64,
    /// Submit the suite to Slurm as a job array of workers (options from
    /// the suite's [slurm] table, overridden by the flags below); with
    /// --dry-run, print the script instead.
    #[arg(long)]
    slurm: bool,
    #[command(flatten)]
    slurm_opts: SlurmArgs,
}

/// Overrides of the suite's `[slurm]` table.
#[derive(Args, Clone, Default)]
struct SlurmArgs {
    /// Slurm partition.
    #[arg(long, requires = "slurm")]
    partition: Option<String>,
    /// Time limit per task, e.g. 04:00:00.
    #[arg(long, requires = "slurm")]
    time: Option<String>,
    /// CPUs per task.
    #[arg(long, requires = "slurm")]
    cpus_per_task: Option<u32>,
    /// Generic resources per task, e.g. gpu:1.
    #[arg(long, requires = "slurm")]
    gres: Option<String>,
    /// Tasks in the array: workers running at once.
    #[arg(long, requires = "slurm")]
    tasks: Option<u32>,
}

#[derive(Subcommand)]
enum ExportCmd {
    /// Every run (params, step metrics, evaluations, tags, evaluations.json)
    /// into an MLflow tracking server; a second export adds only what is new.
    Mlflow {
        /// The tracking server, e.g. http://127.0.0.1:5000.
        #[arg(long)]
        tracking_uri: String,
        /// Only this suite's runs.
        #[arg(long)]
        suite: Option<String>,
        /// The MLflow experiment (default: hmsa-<suite>).
        #[arg(long)]
        experiment: Option<String>,
        #[command(flatten)]
        db: DbArg,
    },
}

#[derive(Args)]
struct WorkerArgs {
    /// The suite file, e.g. experiments/ablation.toml.
    suite: PathBuf,
    /// Results database (default: $HMSA_DB, else the suite file with .db);
    /// workers on several machines share a postgres:// database.
    #[arg(long)]
    db: Option<String>,
    /// Override a key of every run, e.g. --set train.steps=10 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Wait while another worker holds a run this one needs (e.g. a
    /// teacher), instead of stopping.
    #[arg(long)]
    wait: bool,
    /// Stop after executing this many runs.
    #[arg(long)]
    max_runs: Option<usize>,
    /// Seconds without a heartbeat after which a RUNNING run is taken over.
    #[arg(long, default_value_t = 60)]
    stale_after: u64,
    /// Seconds between passes while waiting.
    #[arg(long, default_value_t = 5.0)]
    poll: f64,
}

#[derive(Args)]
struct RunsArgs {
    /// Only this suite's runs (also picks experiments/<suite>.db).
    #[arg(long)]
    suite: Option<String>,
    /// Only this variant's runs.
    #[arg(long)]
    variant: Option<String>,
    /// Only runs in this state.
    #[arg(long, value_enum)]
    status: Option<StatusArg>,
    /// Output: table or md for people, csv or json for programs.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    #[command(flatten)]
    db: DbArg,
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
    /// Predictions: labelIds PNGs whose names contain <city>_<seq>_<frame>
    /// (what `infer --out` writes).
    #[arg(long)]
    pred_dir: PathBuf,
    /// Cityscapes ground truth, e.g. cityscapes/gtFine/val.
    #[arg(long)]
    gt_dir: PathBuf,
    /// Output: table for people, json for programs.
    #[arg(long, value_enum, default_value_t = TextOrJson::Table)]
    format: TextOrJson,
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
    /// The teacher's scales (default: the model config's).
    #[arg(long, value_parser = clap::value_parser!(Scales))]
    scales: Option<Scales>,
    /// The teacher's fusion (default: the model config's).
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
    #[arg(long, conflicts_with = "suite")]
    config: Option<PathBuf>,
    /// Take the generator and augmentation options of this suite's first
    /// run (e.g. experiments/ablation.toml).
    #[arg(long)]
    suite: Option<PathBuf>,
    /// Override the generator's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Override the number of training images.
    #[arg(long)]
    train: Option<usize>,
    /// Override the number of validation images.
    #[arg(long)]
    val: Option<usize>,
    /// Override the number of coarse-labelled train_extra images.
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
    #[arg(long, value_parser = clap::value_parser!(Scales))]
    scales: Option<Scales>,
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

fn device() -> Result<candle_core::Device> {
    Ok(hmsa_lab::device()?)
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
    let mut augment = hmsa_lab::data::augment::AugmentConfig::default();
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
    if let Some(n) = a.stats {
        let st = synth::stats(&cfg, &augment, n);
        println!("{n} training scenes (classifier fit, training crops) and {n} validation scenes");
        println!(
            "context classes (vegetation vs terrain): local 7x7 nearest-mean accuracy {:.3} (chance 0.5)",
            st.local_accuracy
        );
        let mut t = comfy_table::Table::new();
        t.load_preset(comfy_table::presets::ASCII_MARKDOWN);
        let mut header = vec![
            "measured on".to_string(),
            "context: cue distance (output px)".into(),
        ];
        for d in &st.cues[0].detail {
            header.push(format!("{}: visible", d.class));
            header.push(format!("{}: contrast", d.class));
            header.push(format!("{}: width (output px)", d.class));
        }
        t.set_header(header);
        for c in &st.cues {
            let mut row = vec![c.at.to_string(), format!("{:.1}", c.context_cue_px)];
            for d in &c.detail {
                row.push(format!("{:.3}", d.visible));
                row.push(format!("{:.0}", d.contrast));
                row.push(format!("{:.2}", d.width_px));
            }
            t.add_row(row);
        }
        println!("{t}");
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

/// Ends the process with a specific exit code (see the module docs).
#[derive(Debug)]
enum Exit {
    /// The command ran and left work unfinished: 3.
    Unfinished(String),
    /// Ctrl-C or SIGTERM: 130.
    Interrupted(String),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Unfinished(m) | Exit::Interrupted(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Exit {}

/// Training observer of `hmsa-lab train`: stops (after a checkpoint) on
/// Ctrl-C or SIGTERM.
struct UntilSignal(Arc<AtomicBool>);

impl hmsa_lab::train::Observer for UntilSignal {
    fn should_stop(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Asks before a destructive step: `--yes` goes ahead; on a terminal the
/// user is asked; otherwise the command stops, changing nothing.
fn confirm(yes: bool, what: &str) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("{what}: not a terminal, so nothing was changed; pass --yes to go ahead");
    }
    eprint!("{what}? [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if !matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        bail!("{what}: not confirmed, nothing was changed");
    }
    Ok(())
}

/// Sets `stop` on Ctrl-C or SIGTERM (what Slurm, systemd and `timeout`
/// send): the running run saves a checkpoint and is marked KILLED. A
/// second signal exits at once.
fn stop_on_signals(rt: &tokio::runtime::Runtime, stop: Arc<AtomicBool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let _in_runtime = rt.enter();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (kind, name) in [
        (SignalKind::interrupt(), "interrupt"),
        (SignalKind::terminate(), "SIGTERM"),
    ] {
        let (stop, seen) = (stop.clone(), seen.clone());
        let Ok(mut sig) = signal(kind) else {
            continue;
        };
        rt.spawn(async move {
            while sig.recv().await.is_some() {
                if seen.fetch_add(1, Ordering::SeqCst) > 0 {
                    eprintln!("{name} again: exiting now");
                    std::process::exit(130);
                }
                eprintln!("{name}: saving a checkpoint, then stopping");
                stop.store(true, Ordering::Relaxed);
            }
        });
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// Output formats of the listing commands: text for people (`table`,
/// `md`), typed for programs (`csv`, `json`: snake_case keys, numbers as
/// numbers, missing values empty or null).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Table,
    Md,
    Csv,
    Json,
}

/// Suites of `hmsa-lab bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchSuite {
    Model,
    Train,
    Data,
    Kernels,
    Store,
}

/// `--format` of commands with one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TextOrJson {
    Table,
    Json,
}

/// `--status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StatusArg {
    Scheduled,
    Running,
    Finished,
    Failed,
    Killed,
}

impl StatusArg {
    fn status(self) -> Status {
        match self {
            StatusArg::Scheduled => Status::Scheduled,
            StatusArg::Running => Status::Running,
            StatusArg::Finished => Status::Finished,
            StatusArg::Failed => Status::Failed,
            StatusArg::Killed => Status::Killed,
        }
    }
}

/// A listing: text cells for people and typed values for programs, row by row.
struct Listing {
    head: Vec<String>,
    text: Vec<Vec<String>>,
    keys: Vec<String>,
    values: Vec<Vec<serde_json::Value>>,
}

impl Listing {
    fn new(head: &[&str], keys: &[&str]) -> Self {
        Listing {
            head: head.iter().map(|s| s.to_string()).collect(),
            text: vec![],
            keys: keys.iter().map(|s| s.to_string()).collect(),
            values: vec![],
        }
    }

    fn push(&mut self, text: Vec<String>, values: Vec<serde_json::Value>) {
        self.text.push(text);
        self.values.push(values);
    }

    fn print(&self, format: Format) -> Result<()> {
        match format {
            Format::Table => println!("{}", report::terminal_table(&self.head, &self.text)),
            Format::Md => print!("{}", report::markdown_table(&self.head, &self.text)),
            Format::Csv => {
                let mut w = csv::Writer::from_writer(std::io::stdout());
                w.write_record(&self.keys)?;
                for r in &self.values {
                    w.write_record(r.iter().map(|v| match v {
                        serde_json::Value::Null => String::new(),
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    }))?;
                }
                w.flush()?;
            }
            Format::Json => {
                let v: Vec<serde_json::Map<String, serde_json::Value>> = self
                    .values
                    .iter()
                    .map(|r| self.keys.iter().cloned().zip(r.iter().cloned()).collect())
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        Ok(())
    }
}

/// A typed value as table text.
fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "NULL".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A suite with its `--set` overrides, and its database: `--db`, else
/// `$HMSA_DB`, else the suite file with `.db`.
fn load_suite(path: &std::path::Path, sets: &[String], db: Option<&str>) -> Result<(Suite, String)> {
    let sets = sets
        .iter()
        .map(|s| hmsa_lab::config::suite::parse_set(s))
        .collect::<hmsa_lab::Result<Vec<_>>>()?;
    let suite = Suite::load(path, &sets)?;
    let url = db
        .map(String::from)
        .or_else(|| std::env::var("HMSA_DB").ok())
        .unwrap_or_else(|| suite.default_db().display().to_string());
    Ok((suite, url))
}

fn run_suite_cmd(a: RunArgs) -> Result<()> {
    let (suite, url) = load_suite(&a.suite, &a.sets, a.db.as_deref())?;
    if a.slurm {
        return submit_slurm(&a, &suite, &url);
    }
    let rt = runtime()?;
    let store = Store::open(&url)?;
    if a.dry_run {
        let mut rows = vec![];
        for r in &suite.runs {
            let row = store.find_run(&suite.header.name, &r.variant, &r.hash, r.seed)?;
            let have = match &row {
                Some(x) => store.evaluated(x.id)?,
                None => vec![],
            };
            // each evaluation, ✓ where it is already recorded
            let evals: Vec<String> = r
                .config
                .eval
                .sets
                .iter()
                .map(|e| {
                    let done = have.contains(e);
                    format!(
                        "{} {}{} {}",
                        e.fusion.name(),
                        e.scales,
                        if e.flip { " flip" } else { "" },
                        if done { "✓" } else { "–" }
                    )
                })
                .collect();
            rows.push(vec![
                r.variant.clone(),
                r.seed.to_string(),
                r.hash[..12].to_string(),
                r.teacher.map_or("".into(), |t| suite.runs[t].variant.clone()),
                row.map_or("new".into(), |x| x.status.to_string()),
                evals.join("\n"),
                suite.run_dir(r).display().to_string(),
            ]);
        }
        let head = [
            "variant",
            "seed",
            "config hash",
            "teacher",
            "status",
            "evaluations (✓ recorded)",
            "run folder",
        ]
        .map(String::from);
        println!("{}", report::terminal_table(&head, &rows));
        println!("database: {url}");
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(&rt, stop.clone());
    let opts = RunOptions {
        force: a.force,
        fail_fast: a.fail_fast,
        stale_ms: a.stale_after as i64 * 1000,
        ..Default::default()
    };
    let out = run_suite(&store, &suite, &opts, stop.clone())?;
    let failed = out.iter().filter(|o| matches!(o.2, Outcome::Failed(_))).count();
    let busy = out.iter().filter(|o| o.2 == Outcome::Busy).count();
    let removed = out.iter().filter(|o| matches!(o.2, Outcome::Removed(_))).count();
    println!(
        "{}: {} runs, {} trained, {} evaluated, {} already done, {} held elsewhere, {} failed{}{}",
        suite.header.name,
        out.len(),
        out.iter().filter(|o| o.2 == Outcome::Trained).count(),
        out.iter().filter(|o| o.2 == Outcome::Evaluated).count(),
        out.iter().filter(|o| o.2 == Outcome::Done).count(),
        busy,
        failed,
        if removed > 0 {
            format!(", {removed} removed")
        } else {
            String::new()
        },
        if stop.load(Ordering::Relaxed) {
            " (interrupted)"
        } else {
            ""
        }
    );
    if stop.load(Ordering::Relaxed) {
        return Err(Exit::Interrupted("interrupted; run the same command again to resume".into()).into());
    }
    // Every run the plan holds must end complete; say which did not, and why.
    let mut why = vec![];
    for (variant, seed, o) in &out {
        let reason = match o {
            Outcome::Failed(e) => format!("failed: {e}"),
            Outcome::Busy => "held by another process (rerun when it is done)".into(),
            Outcome::Killed => "interrupted".into(),
            Outcome::Blocked(why) => why.clone(),
            Outcome::Removed(id) => format!(
                "run {id} was removed with `rm`: `hmsa-lab restore {id}` brings it back, `hmsa-lab gc` purges it so that `run` trains it anew"
            ),
            _ => continue,
        };
        why.push(format!("  {variant} seed {seed}: {reason}"));
    }
    if !why.is_empty() {
        return Err(Exit::Unfinished(format!(
            "{} of {} run(s) unfinished (`hmsa-lab runs --db {url}` lists them):\n{}",
            why.len(),
            out.len(),
            why.join("\n")
        ))
        .into());
    }
    Ok(())
}

/// `run --slurm`: the job array's script, printed (--dry-run) or submitted.
fn submit_slurm(a: &RunArgs, suite: &Suite, url: &str) -> Result<()> {
    let o = &a.slurm_opts;
    let spec = suite.slurm.overridden(&hmsa_lab::slurm::SlurmSpec {
        partition: o.partition.clone(),
        time: o.time.clone(),
        cpus_per_task: o.cpus_per_task,
        gres: o.gres.clone(),
        tasks: o.tasks,
        ..Default::default()
    });
    if spec.task_count() > 1 && !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        bail!(
            "--slurm with {} tasks on the SQLite database {url}: SQLite on a shared filesystem is not safe for concurrent writers; \
             give a PostgreSQL database (--db postgres://… or $HMSA_DB), or --tasks 1",
            spec.task_count()
        );
    }
    let abs = |p: &std::path::Path| std::fs::canonicalize(p).with_context(|| format!("{}", p.display()));
    let workdir = std::env::current_dir()?;
    let log_dir = workdir.join(&suite.header.runs_dir).join("slurm");
    let job = hmsa_lab::slurm::Job {
        name: suite.header.name.clone(),
        binary: std::env::current_exe()?,
        suite: abs(&a.suite)?,
        db: if url.contains("://") {
            url.to_string()
        } else {
            workdir.join(url).display().to_string()
        },
        sets: a.sets.clone(),
        workdir,
        log_dir: log_dir.clone(),
        stale_after: a.stale_after,
    };
    let script = hmsa_lab::slurm::script(&job, &spec);
    if a.dry_run {
        print!("{script}");
        return Ok(());
    }
    // The database and the data exist before any task starts.
    Store::open(url)?;
    for r in &suite.runs {
        r.config.data_root()?;
    }
    let (id, path) = hmsa_lab::slurm::submit(&script, &log_dir, &suite.header.name)?;
    println!(
        "submitted job {id}: {} worker task(s) on {url} (script {}, logs {}/{id}_*.out)",
        spec.task_count(),
        path.display(),
        log_dir.display()
    );
    println!("watch: hmsa-lab runs --db {url}    squeue -j {id}");
    Ok(())
}

/// `hmsa-lab worker`.
fn worker_cmd(a: WorkerArgs) -> Result<()> {
    let (suite, url) = load_suite(&a.suite, &a.sets, a.db.as_deref())?;
    let rt = runtime()?;
    let store = Store::open(&url)?;
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signals(&rt, stop.clone());
    let opts = RunOptions {
        stale_ms: a.stale_after as i64 * 1000,
        ..Default::default()
    };
    let w = hmsa_lab::lab::WorkerOptions {
        wait: a.wait,
        max_runs: a.max_runs,
        poll_secs: a.poll,
    };
    let (out, why) = hmsa_lab::lab::work(&store, &suite, &opts, &w, stop.clone())?;
    if stop.load(Ordering::Relaxed) {
        return Err(Exit::Interrupted(format!("worker interrupted ({why}); its run is resumable")).into());
    }
    let failed: Vec<String> = out
        .iter()
        .filter_map(|(v, s, o)| match o {
            Outcome::Failed(e) => Some(format!("  {v} seed {s}: {e}")),
            _ => None,
        })
        .collect();
    if !failed.is_empty() {
        return Err(Exit::Unfinished(format!("run(s) failed on this worker:\n{}", failed.join("\n"))).into());
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let gpu = hmsa_lab::device()
        .ok()
        .and_then(|d| hmsa_lab::device_name(&d))
        .map_or(String::new(), |g| {
            format!("; GPU {g} (forward and training cases)")
        });
    format!("{cpu}, {cores} cores{gpu}")
}

fn bench(a: BenchArgs) -> Result<()> {
    if let Some(c) = a.case {
        let case: hmsa_lab::bench::Case = serde_json::from_str(&c)?;
        println!("{}", serde_json::to_string(&case.run()?)?);
        return Ok(());
    }
    let suites: Vec<String> = if a.suites.is_empty() {
        vec![
            "model".to_string(),
            "train".into(),
            "data".into(),
            "kernels".into(),
        ]
    } else {
        a.suites
            .iter()
            .map(|s| s.to_possible_value().expect("named").get_name().to_string())
            .collect()
    };
    let threads = rayon::current_num_threads();
    let mach = machine();
    let store = Store::open(&a.db.url(None)?)?;
    let exe = std::env::current_exe()?;
    let mut rows = vec![];
    let mut all = vec![];
    let mut failed = 0;
    for suite in &suites {
        let cases = if suite == "store" {
            hmsa_lab::bench::store_cases(a.pg.as_deref())
        } else {
            hmsa_lab::bench::suite_cases(suite, a.full, a.precision).with_context(|| {
                format!("unknown bench suite `{suite}` (model, train, data, kernels, store)")
            })?
        };
        for c in cases {
            let out = std::process::Command::new(&exe)
                .args(["bench", "--case", &serde_json::to_string(&c)?])
                .output()?;
            if !out.status.success() {
                // reported, and the other cases still run
                let err = String::from_utf8_lossy(&out.stderr);
                let why = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("no message");
                eprintln!("benchmark case failed: {}: {why}", serde_json::to_string(&c)?);
                failed += 1;
                continue;
            }
            let m: hmsa_lab::bench::Measured = serde_json::from_slice(&out.stdout)?;
            store.add_benchmark(&hmsa_lab::store::BenchRow {
                suite: suite.clone(),
                name: m.name.clone(),
                params: m.params.clone(),
                min_ms: Some(m.min_ms),
                median_ms: Some(m.median_ms),
                peak_mib: m.peak_mib,
                value: m.value,
                unit: m.unit.clone(),
                threads: threads as i64,
                machine: mach.clone(),
            })?;
            rows.push(vec![
                suite.clone(),
                m.params.clone(),
                format!("{:.1}", m.min_ms),
                format!("{:.1}", m.median_ms),
                m.peak_mib.map_or("–".into(), |p| format!("{p:.0}")),
                m.value.map_or("".into(), |v| format!("{v:.1} {}", m.unit)),
            ]);
            all.push((suite.clone(), m));
        }
    }
    if a.format == TextOrJson::Json {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|(s, m)| serde_json::json!({"suite": s, "case": m, "threads": threads, "machine": mach}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let head = ["suite", "case", "min ms", "median ms", "peak MiB", "rate"].map(String::from);
        println!("{}", report::terminal_table(&head, &rows));
        println!(
            "{threads} threads; {mach}; warm-up 1, min and median of the repetitions; one process per case"
        );
        let train: Vec<_> = all
            .iter()
            .filter(|(s, _)| s == "train")
            .map(|(_, m)| m.clone())
            .collect();
        for line in hmsa_lab::bench::training_ratios(&train) {
            println!("{line}");
        }
    }
    if failed > 0 {
        bail!("{failed} benchmark case(s) failed (above); the others are recorded");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Bench(a) => bench(a)?,
        Cmd::Run(a) => run_suite_cmd(a)?,
        Cmd::Worker(a) => worker_cmd(a)?,
        Cmd::Export(ExportCmd::Mlflow {
            tracking_uri,
            suite,
            experiment,
            db,
        }) => {
            let store = Store::open_read_only(&db.url(suite.as_deref())?)?;
            let e = hmsa_lab::mlflow::export(&store, &tracking_uri, suite.as_deref(), experiment.as_deref())?;
            println!(
                "{tracking_uri}: {} run(s) created, {} updated; {} metric value(s), {} param(s), {} artifact(s) sent",
                e.created, e.updated, e.metrics, e.params, e.artifacts
            );
        }
        Cmd::ImportRunx { recipe, out } => {
            let text = hmsa_lab::config::runx::import(&recipe)?;
            match out {
                Some(p) => {
                    if p.exists() {
                        bail!("{}: exists; not overwritten", p.display());
                    }
                    std::fs::write(&p, &text).with_context(|| format!("writing {}", p.display()))?;
                    // what was written must load as a suite
                    Suite::load(&p, &[]).with_context(|| format!("{} (as written)", p.display()))?;
                    println!("wrote {}", p.display());
                }
                None => print!("{text}"),
            }
        }
        Cmd::Runs(a) => {
            let store = Store::open_read_only(&a.db.url(a.suite.as_deref())?)?;
            let filter = RunFilter {
                suite: a.suite.clone(),
                variant: a.variant.clone(),
                status: a.status.map(StatusArg::status),
                removed: false,
            };
            let mut l = Listing::new(
                &[
                    "id",
                    "suite",
                    "variant",
                    "seed",
                    "status",
                    "step",
                    "mIoU % (first eval)",
                    "config hash",
                    "time",
                ],
                &[
                    "id",
                    "suite",
                    "variant",
                    "seed",
                    "status",
                    "step",
                    "miou",
                    "eval_scales",
                    "eval_fusion",
                    "eval_flip",
                    "config_hash",
                    "seconds",
                ],
            );
            for r in store.runs(&filter)? {
                let evals = store.evaluations(r.id)?;
                let first = evals.first();
                let secs = r.end_ms.zip(r.start_ms).map(|(e, s)| (e - s) as f64 / 1000.0);
                l.push(
                    vec![
                        r.id.to_string(),
                        r.suite.clone(),
                        r.variant.clone(),
                        r.seed.to_string(),
                        r.status.to_string(),
                        r.step.to_string(),
                        first.map_or("–".into(), |e| {
                            format!("{:.2} ({} {})", 100.0 * e.miou, e.fusion, e.scales)
                        }),
                        r.config_hash[..12].to_string(),
                        secs.map_or("–".into(), |s| format!("{s:.1}s")),
                    ],
                    vec![
                        r.id.into(),
                        r.suite.into(),
                        r.variant.into(),
                        r.seed.into(),
                        r.status.as_str().into(),
                        r.step.into(),
                        first.map(|e| e.miou).into(),
                        first.map(|e| e.scales.to_string()).into(),
                        first.map(|e| e.fusion.name()).into(),
                        first.map(|e| e.flip).into(),
                        r.config_hash.into(),
                        secs.into(),
                    ],
                );
            }
            l.print(a.format)?;
        }
        Cmd::Show { run, db, format } => {
            let store = Store::open_read_only(&db.url(None)?)?;
            let run = resolve_run(&store, &run)?;
            let r = store.run(run)?.with_context(|| format!("no run {run}"))?;
            if format == TextOrJson::Json {
                let parse =
                    |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap_or(serde_json::Value::Null);
                let evals: Vec<serde_json::Value> = store
                    .evaluations(run)?
                    .into_iter()
                    .map(|e| {
                        serde_json::json!({
                            "scales": e.scales.to_string(), "fusion": e.fusion, "flip": e.flip,
                            "miou": e.miou, "pixel_acc": e.pixel_acc, "mean_class_acc": e.mean_class_acc,
                            "fw_iou": e.fw_iou, "class_iou": parse(&e.class_iou),
                            "attn_means": parse(&e.attn_means), "ms_per_image": e.ms_per_image,
                            "peak_mib": e.peak_mib, "images": e.images,
                        })
                    })
                    .collect();
                let arts: Vec<serde_json::Value> = store
                    .artifacts(run)?
                    .into_iter()
                    .map(|(k, p, d)| serde_json::json!({"kind": k, "path": p, "digest": d}))
                    .collect();
                let params: serde_json::Map<String, serde_json::Value> = store
                    .params(run)?
                    .into_iter()
                    .map(|(k, v)| (k, v.into()))
                    .collect();
                let loss = store.metric(run, "loss")?;
                let out = serde_json::json!({
                    "run": r,
                    "evaluations": evals,
                    "artifacts": arts,
                    "params": params,
                    "loss": {"first": loss.first().map(|x| serde_json::json!({"step": x.0, "value": x.1})),
                             "last": loss.last().map(|x| serde_json::json!({"step": x.0, "value": x.1}))},
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            println!(
                "run {} — suite {}, variant {}, seed {}",
                r.id, r.suite, r.variant, r.seed
            );
            println!(
                "status {} at step {}; config hash {}",
                r.status, r.step, r.config_hash
            );
            println!(
                "git {} {}; host {}; {}",
                r.git_commit.as_deref().unwrap_or("?"),
                if r.git_dirty == Some(true) { "(dirty)" } else { "" },
                r.host.as_deref().unwrap_or("?"),
                r.versions.as_deref().unwrap_or("")
            );
            println!("folder {}", r.run_dir);
            if let Some(t) = r.removed_ms {
                println!(
                    "removed {:.0} s ago: `hmsa-lab restore {}` brings it back until `hmsa-lab gc` purges it",
                    (hmsa_lab::store::now_ms() - t) as f64 / 1000.0,
                    r.id
                );
            }
            if let Some(e) = &r.error {
                println!("error: {e}");
            }
            let mut rows = vec![];
            for e in store.evaluations(run)? {
                rows.push(vec![
                    e.scales.to_string(),
                    e.fusion.to_string(),
                    e.flip.to_string(),
                    format!("{:.2}", 100.0 * e.miou),
                    format!("{:.2}", 100.0 * e.pixel_acc),
                    format!("{:.2}", 100.0 * e.mean_class_acc),
                    format!("{:.0}", e.ms_per_image),
                    e.peak_mib.map_or("–".into(), |m| format!("{m:.0}")),
                    e.attn_means,
                ]);
            }
            let head = [
                "scales",
                "fusion",
                "flip",
                "mIoU %",
                "pixel acc %",
                "class acc %",
                "ms/image",
                "peak MiB",
                "mean attention",
            ]
            .map(String::from);
            println!("{}", report::terminal_table(&head, &rows));
            for (k, p, d) in store.artifacts(run)? {
                println!("artifact {k}: {p} ({})", &d[..d.len().min(12)]);
            }
            let loss = store.metric(run, "loss")?;
            if let (Some(f), Some(l)) = (loss.first(), loss.last()) {
                println!("loss {:.4} at step {} -> {:.4} at step {}", f.1, f.0, l.1, l.0);
            }
            for (k, v) in store.params(run)? {
                println!("  {k} = {v}");
            }
        }
        Cmd::Compare { runs, db, format } => {
            let store = Store::open_read_only(&db.url(None)?)?;
            let runs: Vec<i64> = runs
                .iter()
                .map(|r| resolve_run(&store, r))
                .collect::<Result<_>>()?;
            let mut params = vec![];
            let mut evals = vec![];
            for id in &runs {
                store.run(*id)?.with_context(|| format!("no run {id}"))?;
                params.push(
                    store
                        .params(*id)?
                        .into_iter()
                        .collect::<std::collections::BTreeMap<_, _>>(),
                );
                evals.push(store.evaluations(*id)?);
            }
            let keys: std::collections::BTreeSet<&String> = params.iter().flat_map(|p| p.keys()).collect();
            let mut rows = vec![];
            for k in keys {
                let vals: Vec<String> = params
                    .iter()
                    .map(|p| p.get(k).cloned().unwrap_or_else(|| "–".into()))
                    .collect();
                if vals.iter().any(|v| *v != vals[0]) {
                    let mut row = vec![k.clone()];
                    row.extend(vals);
                    rows.push(row);
                }
            }
            if format == TextOrJson::Json {
                let diff: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| {
                        let values: Vec<serde_json::Value> = r[1..]
                            .iter()
                            .map(|v| {
                                if v == "–" {
                                    serde_json::Value::Null
                                } else {
                                    v.clone().into()
                                }
                            })
                            .collect();
                        serde_json::json!({"key": r[0], "values": values})
                    })
                    .collect();
                let ev: Vec<serde_json::Value> = evals[0]
                    .iter()
                    .map(|e0| {
                        let miou: Vec<Option<f64>> = evals
                            .iter()
                            .map(|es| {
                                es.iter()
                                    .find(|e| {
                                        e.key() == e0.key()
                                    })
                                    .map(|e| e.miou)
                            })
                            .collect();
                        let delta: Vec<Option<f64>> = miou.iter().map(|m| m.map(|m| m - e0.miou)).collect();
                        serde_json::json!({"scales": e0.scales.to_string(), "fusion": e0.fusion, "flip": e0.flip,
                                           "miou": miou, "delta": delta})
                    })
                    .collect();
                let out = serde_json::json!({"runs": runs, "params": diff, "evaluations": ev});
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            let mut head = vec!["param".to_string()];
            head.extend(runs.iter().map(|r| format!("run {r}")));
            println!("{}", report::terminal_table(&head, &rows));
            let mut erows = vec![];
            for e0 in &evals[0] {
                let mut row = vec![
                    format!("{} {} flip={}", e0.fusion, e0.scales, e0.flip),
                    format!("{:.2}", 100.0 * e0.miou),
                ];
                for other in &evals[1..] {
                    row.push(
                        other
                            .iter()
                            .find(|e| e.key() == e0.key())
                            .map_or("–".into(), |e| {
                                format!("{:.2} ({:+.2})", 100.0 * e.miou, 100.0 * (e.miou - e0.miou))
                            }),
                    );
                }
                erows.push(row);
            }
            let mut head = vec!["evaluation".to_string(), format!("run {} mIoU %", runs[0])];
            head.extend(runs[1..].iter().map(|r| format!("run {r} (Δ)")));
            println!("{}", report::terminal_table(&head, &erows));
        }
        Cmd::Query {
            sql,
            db,
            format,
            timeout,
        } => {
            if !(timeout.is_finite() && timeout > 0.0) {
                bail!("--timeout {timeout}: expected a positive number of seconds");
            }
            let store = Store::open_read_only(&db.url(None)?)?;
            let (cols, rows) = store.query(&sql, std::time::Duration::from_secs_f64(timeout))?;
            let keys: Vec<&str> = cols.iter().map(String::as_str).collect();
            let mut l = Listing::new(&keys, &keys);
            for r in rows {
                l.push(r.iter().map(cell).collect(), r);
            }
            l.print(format)?;
        }
        Cmd::Rm {
            runs,
            db,
            yes,
            force,
            stale_after,
        } => {
            let store = Store::open_existing(&db.url(None)?)?;
            let stale_before = hmsa_lab::store::now_ms() - stale_after as i64 * 1000;
            let mut refused = vec![];
            let mut lines = vec![];
            for &id in &runs {
                let r = store
                    .run(id)?
                    .with_context(|| format!("no run {id} in {}", store.url()))?;
                if r.removed_ms.is_some() {
                    bail!("run {id} is already removed (`hmsa-lab restore {id}` brings it back)");
                }
                let fresh = r.heartbeat_ms.is_some_and(|h| h >= stale_before);
                if r.status == Status::Running && (!force || fresh) {
                    refused.push(format!(
                        "run {id} ({} {} seed {}) is RUNNING{}, held by {}",
                        r.suite,
                        r.variant,
                        r.seed,
                        r.heartbeat_ms.map_or(String::new(), |h| format!(
                            ", last heartbeat {:.0} s ago",
                            (hmsa_lab::store::now_ms() - h) as f64 / 1000.0
                        )),
                        r.claimed_by.as_deref().unwrap_or("?")
                    ));
                }
                lines.push(format!(
                    "  run {id}: {} {} seed {} ({}, {} evaluation(s))",
                    r.suite,
                    r.variant,
                    r.seed,
                    r.status,
                    store.evaluations(id)?.len()
                ));
            }
            if !refused.is_empty() {
                bail!(
                    "{}\nstop it first; `--force` removes a RUNNING run only once its heartbeat is older than --stale-after ({stale_after} s)",
                    refused.join("\n")
                );
            }
            println!(
                "to remove (restorable until `hmsa-lab gc`):\n{}",
                lines.join("\n")
            );
            confirm(yes, &format!("remove {} run(s)", runs.len()))?;
            let done = store.remove_runs(&runs, force.then_some(stale_before))?;
            if done.len() != runs.len() {
                let missed: Vec<String> = runs
                    .iter()
                    .filter(|i| !done.contains(i))
                    .map(i64::to_string)
                    .collect();
                bail!(
                    "removed {} run(s); not {} (claimed or removed meanwhile)",
                    done.len(),
                    missed.join(", ")
                );
            }
            let ids: Vec<String> = done.iter().map(i64::to_string).collect();
            println!(
                "removed {} run(s); `hmsa-lab restore {}` brings them back until `hmsa-lab gc` purges them",
                done.len(),
                ids.join(" ")
            );
        }
        Cmd::Restore { runs, db } => {
            let store = Store::open_existing(&db.url(None)?)?;
            let done = store.restore_runs(&runs)?;
            let missed: Vec<String> = runs
                .iter()
                .filter(|i| !done.contains(i))
                .map(i64::to_string)
                .collect();
            println!("restored {} run(s)", done.len());
            if !missed.is_empty() {
                bail!(
                    "not restored: {} (not removed, or purged by gc)",
                    missed.join(", ")
                );
            }
        }
        Cmd::Gc { db, dry_run, yes } => {
            let store = Store::open_existing(&db.url(None)?)?;
            let plan = hmsa_lab::gc::plan(&store)?;
            for r in &plan.purge {
                println!(
                    "purge run {} ({} {} seed {}, {}) and its rows",
                    r.id, r.suite, r.variant, r.seed, r.status
                );
            }
            for d in &plan.folders {
                println!("delete folder {}", d.display());
            }
            if !plan.foreign.is_empty() {
                println!(
                    "left alone: {} folder(s) another database owns",
                    plan.foreign.len()
                );
            }
            if !plan.unowned.is_empty() {
                println!(
                    "left alone: {} folder(s) without {} (made before owners were recorded, or not by hmsa-lab)",
                    plan.unowned.len(),
                    hmsa_lab::gc::OWNER_FILE
                );
            }
            if plan.is_empty() {
                println!("nothing to remove");
                return Ok(());
            }
            if dry_run {
                println!("(dry run: nothing changed)");
                return Ok(());
            }
            confirm(
                yes,
                &format!(
                    "purge {} run(s) and delete {} folder(s)",
                    plan.purge.len(),
                    plan.folders.len()
                ),
            )?;
            let done = hmsa_lab::gc::apply(&store, &plan)?;
            println!(
                "purged {} run(s) and deleted {} folder(s)",
                done.runs, done.folders
            );
        }
        Cmd::Report {
            suite,
            db,
            out,
            readme,
        } => {
            let store = Store::open_read_only(&db.url(Some(&suite))?)?;
            let out = out.unwrap_or_else(|| PathBuf::from("reports").join(&suite));
            let files = report::write_report(&store, &suite, &out)?;
            let s = report::summarise(&store, &suite)?;
            if let Some((h, r)) = report::premise_table(&s) {
                println!("{}", report::terminal_table(&h, &r));
            }
            let (h, r) = report::ablation_table(&s);
            println!("{}", report::terminal_table(&h, &r));
            let (h, r) = report::class_table(&s);
            println!("{}", report::terminal_table(&h, &r));
            let paper = report::paper::comparison(&s);
            if let Some((text, (h, r))) = &paper {
                println!("{}\n{text}", report::terminal_table(h, r));
            }
            let eff = report::efficiency(&store, &s)?;
            if let Some((text, (h, r))) = &eff {
                println!("{}\n{text}", report::terminal_table(h, r));
            }
            if let Some(readme) = readme {
                let base = readme.parent().unwrap_or(std::path::Path::new(""));
                let fig = out.join("figures/miou.png");
                let rel = fig.strip_prefix(base).unwrap_or(&fig).display().to_string();
                let section = report::readme_section(&s, paper.as_ref(), eff.as_ref(), &rel);
                report::update_readme(&readme, &section)?;
                println!("updated {}", readme.display());
            }
            println!("wrote {} files into {}", files.len(), out.display());
        }
        Cmd::Train(a) => {
            let cfg = RunConfig::from_toml_file(&a.config)?;
            let rt = runtime()?;
            let stop = Arc::new(AtomicBool::new(false));
            stop_on_signals(&rt, stop.clone());
            let report = hmsa_lab::train::train(&cfg, &a.out, &mut UntilSignal(stop))?;
            if !report.finished {
                return Err(Exit::Interrupted(format!(
                    "interrupted at step {}, checkpoint saved; the same command resumes",
                    report.step
                ))
                .into());
            }
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
                    r.set.scales,
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
            match a.format {
                TextOrJson::Json => {
                    let per: serde_json::Map<String, serde_json::Value> = names
                        .iter()
                        .zip(&m.iou)
                        .map(|(n, v)| (n.to_string(), v.map_or(serde_json::Value::Null, |v| v.into())))
                        .collect();
                    let out = serde_json::json!({"miou": m.miou, "images": n, "pixel_acc": m.pixel_acc, "iou": per});
                    println!("{}", serde_json::to_string_pretty(&out)?);
                }
                TextOrJson::Table => {
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
            }
        }
        Cmd::Autolabel(a) => {
            let cfg = a.net.resolve()?;
            let dev = device()?;
            let net = checkpoint::load(&cfg, &a.checkpoint, &dev)?;
            let ds = Dataset::open(&a.data, &a.split, Labels::None)?;
            let scales = a.scales.unwrap_or_else(|| cfg.scales.clone());
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
                return Err(Exit::Unfinished(format!(
                    "{}: the dataset has problems (listed above)",
                    dir.display()
                ))
                .into());
            }
        }
        Cmd::Infer(a) => {
            let cfg = a.net.resolve()?;
            let dev = device()?;
            let net = checkpoint::load(&cfg, &a.checkpoint, &dev)?;
            let opts = InferOptions {
                scales: a.scales.unwrap_or_else(|| cfg.scales.clone()),
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
                cfg.scales
            );
        }
    }
    Ok(())
}

fn main() {
    hmsa_lab::setup_cpu();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(match e.downcast_ref::<Exit>() {
            Some(Exit::Unfinished(_)) => 3,
            Some(Exit::Interrupted(_)) => 130,
            None => 1,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of every subcommand says what it is in `--help`.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" || a.is_hide_set() {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = vec![];
        walk(&Cli::command(), "hmsa-lab", &mut missing);
        assert!(
            missing.is_empty(),
            "arguments without help:\n{}",
            missing.join("\n")
        );
    }
}

//! The command line's grammar: every subcommand, flag and closed set of
//! values (clap derive). No behaviour here beyond parsing and the
//! default-database rule of [`DbArg::url`].

use anyhow::{bail, Result};
use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};
use hmsa_lab::model::{Fusion, ModelConfig, Scales};
use hmsa_lab::store::Status;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hmsa-lab",
    version,
    about = "Hierarchical multi-scale attention for semantic segmentation, and its ablation lab",
    after_help = "Environment:\n  HMSA_DB             the results database (see --db)\n  HMSA_NO_PROGRESS    no progress bars or lines\n  HMSA_PROGRESS_SECS  seconds between progress lines off a terminal (30)\n  HMSA_DEVICE=cpu     the CPU in a cuda build\n  RUST_LOG            log filter (e.g. info, hmsa_lab=debug)\n\nExit codes: 0 ok, 1 runtime error, 2 usage error, 3 ran and found problems, 130 interrupted."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
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
    ImportRunx(ImportRunxArgs),
    /// List runs.
    Runs(RunsArgs),
    /// Show one run: config, evaluations, artifacts.
    Show(ShowArgs),
    /// Compare runs: only what differs, with deltas against the first.
    Compare(CompareArgs),
    /// Run read-only SQL on the results database (writes and VACUUM INTO are refused).
    Query(QueryArgs),
    /// Remove runs: hidden from every listing and report, restorable until `gc` purges them.
    Rm(RmArgs),
    /// Bring back runs removed with `rm` (until `gc` has purged them).
    Restore(RestoreArgs),
    /// Purge removed runs and delete the run folders this database owns for runs it no longer holds.
    Gc(GcArgs),
    /// Benchmarks (not tests): model, train, data, kernels; one process per case; stored in the database.
    Bench(BenchArgs),
    /// Write reports/<suite>/ (index.md, index.html, figures) and print the tables.
    Report(ReportArgs),
}

#[derive(Args)]
pub struct BenchArgs {
    /// Suites (default: model, train, data and kernels); store measures
    /// claim latency and throughput with 1, 4 and 16 workers.
    #[arg(value_enum)]
    pub suites: Vec<BenchSuite>,
    /// The store suite also on this PostgreSQL database (its benchmark
    /// rows are purged after).
    #[arg(long, value_name = "postgres://…")]
    pub pg: Option<String>,
    /// Add the w48 cases: forwards at 512x1024 and 1024x2048, training
    /// steps of batch 1 on 512x1024 crops (minutes each on 2 cores).
    #[arg(long)]
    pub full: bool,
    /// With the train suite: where each step's time goes (forward, loss,
    /// backward, optimiser, and in each the time of every op); the scales'
    /// backwards run one after the other. Profiled steps are printed, not
    /// stored.
    #[arg(long)]
    pub profile: bool,
    /// Arithmetic of the forward and training cases: f32, or mixed
    /// precision bf16 / f16 (for a GPU; see docs/performance.md).
    #[arg(long, default_value = "f32")]
    pub precision: hmsa_lab::model::Precision,
    /// Output: table for people, json for programs.
    #[arg(long, value_enum, default_value_t = TextOrJson::Table)]
    pub format: TextOrJson,
    #[command(flatten)]
    pub db: DbArg,
    /// Run one case given as JSON in this process (used by the parent).
    #[arg(long, hide = true)]
    pub case: Option<String>,
}

/// `--db URL`: a SQLite file path, `sqlite://path` or `postgres://…`.
#[derive(Args, Clone)]
pub struct DbArg {
    /// Results database. Default: $HMSA_DB; else experiments/<suite>.db when
    /// a suite is named; else the only database under experiments/.
    #[arg(long, env = "HMSA_DB")]
    pub db: Option<String>,
}

impl DbArg {
    /// The database by the one rule every command follows (see `--help`).
    pub fn url(&self, suite: Option<&str>) -> Result<String> {
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

#[derive(Args)]
pub struct RunArgs {
    /// The suite file, e.g. experiments/ablation.toml.
    pub suite: PathBuf,
    /// Results database (default: the suite file with .db).
    #[arg(long)]
    pub db: Option<String>,
    /// Print the plan (every run, its config hash, whether it is done) and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Override a key of every run, e.g. --set train.steps=10 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Retrain runs that are already finished.
    #[arg(long)]
    pub force: bool,
    /// Stop at the first failing run.
    #[arg(long)]
    pub fail_fast: bool,
    /// Seconds without a heartbeat after which a RUNNING run is taken over
    /// (15 to 604800: a holder beats every 5 s).
    #[arg(long, default_value_t = 60, value_parser = whole(STALE_MIN, STALE_MAX))]
    pub stale_after: u64,
    /// Submit the suite to Slurm as a job array of workers (options from
    /// the suite's [slurm] table, overridden by the flags below); with
    /// --dry-run, print the script instead.
    #[arg(long)]
    pub slurm: bool,
    #[command(flatten)]
    pub slurm_opts: SlurmArgs,
}

/// Overrides of the suite's `[slurm]` table.
#[derive(Args, Clone, Default)]
pub struct SlurmArgs {
    /// Slurm partition.
    #[arg(long, requires = "slurm")]
    pub partition: Option<String>,
    /// Time limit per task, e.g. 04:00:00.
    #[arg(long, requires = "slurm")]
    pub time: Option<String>,
    /// CPUs per task.
    #[arg(long, requires = "slurm")]
    pub cpus_per_task: Option<u32>,
    /// Generic resources per task, e.g. gpu:1.
    #[arg(long, requires = "slurm")]
    pub gres: Option<String>,
    /// Tasks in the array: workers running at once (1 to 10000).
    #[arg(long, requires = "slurm", value_parser = whole(1, 10_000).map(|n| n as u32))]
    pub tasks: Option<u32>,
}

#[derive(Subcommand)]
pub enum ExportCmd {
    /// Every run (params, step metrics, evaluations, tags, evaluations.json)
    /// into an MLflow tracking server; a second export adds only what is new.
    Mlflow(MlflowArgs),
}

#[derive(Args)]
pub struct WorkerArgs {
    /// The suite file, e.g. experiments/ablation.toml.
    pub suite: PathBuf,
    /// Results database (default: $HMSA_DB, else the suite file with .db);
    /// workers on several machines share a postgres:// database.
    #[arg(long)]
    pub db: Option<String>,
    /// Override a key of every run, e.g. --set train.steps=10 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Wait while another worker holds a run this one needs (e.g. a
    /// teacher), instead of stopping.
    #[arg(long)]
    pub wait: bool,
    /// Stop after executing this many runs.
    #[arg(long)]
    pub max_runs: Option<usize>,
    /// Seconds without a heartbeat after which a RUNNING run is taken over
    /// (15 to 604800: a holder beats every 5 s).
    #[arg(long, default_value_t = 60, value_parser = whole(STALE_MIN, STALE_MAX))]
    pub stale_after: u64,
    /// Seconds between passes while waiting (0.05 to 3600).
    #[arg(long, default_value_t = 5.0, value_parser = seconds(0.05, 3600.0))]
    pub poll: f64,
}

#[derive(Args)]
pub struct RunsArgs {
    /// Only this suite's runs (also picks experiments/<suite>.db).
    #[arg(long)]
    pub suite: Option<String>,
    /// Only this variant's runs.
    #[arg(long)]
    pub variant: Option<String>,
    /// Only runs in this state.
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
    /// Output: table or md for people, csv or json for programs.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    #[command(flatten)]
    pub db: DbArg,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Run config TOML ([model], [data], [train], [eval]).
    #[arg(long)]
    pub config: PathBuf,
    /// Run folder: checkpoints, final weights, evaluation JSON.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Predictions: labelIds PNGs whose names contain <city>_<seq>_<frame>
    /// (what `infer --out` writes).
    #[arg(long)]
    pub pred_dir: PathBuf,
    /// Cityscapes ground truth, e.g. cityscapes/gtFine/val.
    #[arg(long)]
    pub gt_dir: PathBuf,
    /// Output: table for people, json for programs.
    #[arg(long, value_enum, default_value_t = TextOrJson::Table)]
    pub format: TextOrJson,
}

#[derive(Args)]
pub struct AutolabelArgs {
    #[command(flatten)]
    pub net: NetArgs,
    /// Teacher weights.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Dataset root (Cityscapes layout) holding the images to label.
    #[arg(long)]
    pub data: PathBuf,
    /// Split to label.
    #[arg(long, default_value = "train_extra")]
    pub split: String,
    /// The teacher's scales (default: the model config's).
    #[arg(long, value_parser = clap::value_parser!(Scales))]
    pub scales: Option<Scales>,
    /// The teacher's fusion (default: the model config's).
    #[arg(long)]
    pub fusion: Option<Fusion>,
    /// Pixels whose top probability is below this become ignore.
    #[arg(long, default_value_t = 0.9)]
    pub threshold: f64,
    /// Output root (Cityscapes layout: leftImg8bit + gtFine).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Validate a dataset: report bad files by name, print class shares.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output folder.
    #[arg(long, default_value = "data/synth")]
    pub out: PathBuf,
    /// TOML with generator options (seed, height, width, train, val, ...).
    #[arg(long, conflicts_with = "suite")]
    pub config: Option<PathBuf>,
    /// Take the generator and augmentation options of this suite's first
    /// run (e.g. experiments/ablation.toml).
    #[arg(long)]
    pub suite: Option<PathBuf>,
    /// Override the generator's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override the number of training images.
    #[arg(long)]
    pub train: Option<usize>,
    /// Override the number of validation images.
    #[arg(long)]
    pub val: Option<usize>,
    /// Override the number of coarse-labelled train_extra images.
    #[arg(long)]
    pub train_extra: Option<usize>,
    /// Measure the benchmark's properties on N scenes instead of writing
    /// (1 to 100000).
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "20",
          value_parser = whole(1, 100_000).map(|n| n as usize))]
    pub stats: Option<usize>,
    /// Measure a trained network's reach instead of writing: context
    /// accuracy by distance from the cue on the validation scenes, at
    /// 0.25x, 0.5x, 1.0x and 2.0x alone. WEIGHTS are a run's
    /// model.safetensors; the network is the suite's first run's.
    #[arg(long, value_name = "WEIGHTS", requires = "suite", conflicts_with = "stats")]
    pub reach: Option<PathBuf>,
}

/// Which network: a named preset or a TOML model config.
#[derive(Args)]
pub struct NetArgs {
    /// Named preset: w48 (the paper's), w18, small (CPU experiments).
    #[arg(long, conflicts_with = "config", value_parser = clap::builder::PossibleValuesParser::new(hmsa_lab::model::PRESETS))]
    pub preset: Option<String>,
    /// TOML model config (fields left out take the w48 values).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override the number of classes.
    #[arg(long)]
    pub num_classes: Option<usize>,
}

impl NetArgs {
    pub fn resolve(&self) -> Result<ModelConfig> {
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
pub struct InferArgs {
    #[command(flatten)]
    pub net: NetArgs,
    /// Weights: official .pth or our .safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output folder for colour, labelIds and attention PNGs.
    #[arg(long)]
    pub out: PathBuf,
    /// Inference scales, e.g. 0.5,1.0,2.0 (default: the model's training scales).
    #[arg(long, value_parser = clap::value_parser!(Scales))]
    pub scales: Option<Scales>,
    /// single, average, max, explicit or hierarchical (default: the model's).
    #[arg(long)]
    pub fusion: Option<Fusion>,
    /// Also run the mirrored image and average.
    #[arg(long)]
    pub flip: bool,
    /// Write raw tensors (pred, aux, pred_<s>, attn_<s>) to this safetensors file.
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// PNG/JPEG images, or .safetensors with an `image` tensor (N x 3 x H x W, normalised).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

#[derive(Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub net: NetArgs,
    /// Input size for the FLOP count, HxW.
    #[arg(long, default_value = "1024x2048")]
    pub size: String,
}

/// Output formats of the listing commands: text for people (`table`,
/// `md`), typed for programs (`csv`, `json`: snake_case keys, numbers as
/// numbers, missing values empty or null).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Md,
    Csv,
    Json,
}

/// Suites of `hmsa-lab bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchSuite {
    Model,
    Train,
    Data,
    Kernels,
    Store,
}

/// `--format` of commands with one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TextOrJson {
    Table,
    Json,
}

/// `--status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusArg {
    Scheduled,
    Running,
    Finished,
    Failed,
    Killed,
}

impl StatusArg {
    pub fn status(self) -> Status {
        match self {
            StatusArg::Scheduled => Status::Scheduled,
            StatusArg::Running => Status::Running,
            StatusArg::Finished => Status::Finished,
            StatusArg::Failed => Status::Failed,
            StatusArg::Killed => Status::Killed,
        }
    }
}

#[derive(Args)]
pub struct ImportRunxArgs {
    /// The runx YAML, e.g. scripts/train_cityscapes.yml.
    pub recipe: PathBuf,
    /// Write the suite here instead of printing it.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct ShowArgs {
    /// The run: its id, or variant/seed (e.g. baseline/0).
    pub run: String,
    #[command(flatten)]
    pub db: DbArg,
    /// Output: table for people, json for programs.
    #[arg(long, value_enum, default_value_t = TextOrJson::Table)]
    pub format: TextOrJson,
}

#[derive(Args)]
pub struct CompareArgs {
    /// The runs: ids, or variant/seed (e.g. baseline/0).
    #[arg(required = true, num_args = 2..)]
    pub runs: Vec<String>,
    #[command(flatten)]
    pub db: DbArg,
    /// Output: table for people, json for programs.
    #[arg(long, value_enum, default_value_t = TextOrJson::Table)]
    pub format: TextOrJson,
}

#[derive(Args)]
pub struct QueryArgs {
    /// The SQL (read-only statements only).
    pub sql: String,
    #[command(flatten)]
    pub db: DbArg,
    /// Output: table or md for people, csv or json for programs.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Seconds after which the query is interrupted (0.01 to 86400).
    #[arg(long, default_value_t = 10.0, value_parser = seconds(0.01, 86_400.0))]
    pub timeout: f64,
}

#[derive(Args)]
pub struct RmArgs {
    /// Run ids.
    #[arg(required = true)]
    pub runs: Vec<i64>,
    #[command(flatten)]
    pub db: DbArg,
    /// Go ahead without asking (needed off a terminal).
    #[arg(long, short)]
    pub yes: bool,
    /// Also remove RUNNING runs whose heartbeat is older than --stale-after.
    #[arg(long)]
    pub force: bool,
    /// Seconds without a heartbeat after which a RUNNING run counts as stale
    /// (15 to 604800: a holder beats every 5 s).
    #[arg(long, default_value_t = 60, value_parser = whole(STALE_MIN, STALE_MAX))]
    pub stale_after: u64,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Ids of removed runs.
    #[arg(required = true)]
    pub runs: Vec<i64>,
    #[command(flatten)]
    pub db: DbArg,
}

#[derive(Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub db: DbArg,
    /// List what would be removed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Go ahead without asking (needed off a terminal).
    #[arg(long, short)]
    pub yes: bool,
}

#[derive(Args)]
pub struct ReportArgs {
    /// The suite to report on.
    #[arg(long)]
    pub suite: String,
    #[command(flatten)]
    pub db: DbArg,
    /// Output folder (default reports/<suite>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also rewrite the results section of this README (between its markers).
    #[arg(long)]
    pub readme: Option<PathBuf>,
}

#[derive(Args)]
pub struct MlflowArgs {
    /// The tracking server, e.g. http://127.0.0.1:5000.
    #[arg(long)]
    pub tracking_uri: String,
    /// Only this suite's runs.
    #[arg(long)]
    pub suite: Option<String>,
    /// The MLflow experiment (default: hmsa-<suite>).
    #[arg(long)]
    pub experiment: Option<String>,
    #[command(flatten)]
    pub db: DbArg,
}

#[derive(Args)]
pub struct CheckArgs {
    /// Dataset root (Cityscapes layout or Mapillary Vistas).
    pub dir: PathBuf,
    /// Splits to check (default: every split found).
    #[arg(long)]
    pub split: Vec<String>,
}

/// `--stale-after`'s range in seconds: above a holder's 5 s heartbeat with
/// room for two missed beats, and at most a week.
pub const STALE_MIN: u64 = 15;
pub const STALE_MAX: u64 = 604_800;

/// A parser of a number of seconds within `[min, max]` (finite): clap
/// names the flag, this the range, whatever was given.
fn seconds(min: f64, max: f64) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |s: &str| match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (min..=max).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds in {min}..={max}")),
    }
}

/// A parser of a whole number within `[lo, hi]`, refusing anything else
/// with the range.
fn whole(lo: u64, hi: u64) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync + 'static {
    move |s: &str| match s.trim().parse::<u64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a whole number in {lo}..={hi}")),
    }
}

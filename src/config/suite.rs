//! Experiment suites: a TOML file with `[suite]`, `[defaults]` (a
//! [`RunConfig`]) and `[[variant]]` entries that override keys of the
//! defaults, list their evaluations, sweep axes and name a teacher. A suite
//! expands into a plan of runs (variant x sweep point x seed) in dependency
//! order, each with its resolved config and config hash.
//!
//! Errors name the file, the line of the offending section and the key:
//! unknown keys and wrong types, hierarchical scale sets without 1.0, a
//! teacher that does not exist, a dependency cycle.

use super::{EvalKey, RunConfig};
use crate::model::{Fusion, Scales};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    suite: SuiteHeader,
    #[serde(default)]
    slurm: SlurmSpec,
    #[serde(default)]
    defaults: Option<Value>,
    #[serde(default)]
    variant: Vec<VariantSpec>,
}

/// `[suite]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteHeader {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Free text naming the dataset (the data itself is `[defaults.data]`).
    #[serde(default)]
    pub dataset: String,
    #[serde(default = "one_seed")]
    pub seeds: Vec<u64>,
    /// The variant the others are compared with (default: the first).
    #[serde(default)]
    pub baseline: Option<String>,
    /// Where run folders go, relative to the working directory.
    #[serde(default = "runs_dir")]
    pub runs_dir: PathBuf,
}

fn one_seed() -> Vec<u64> {
    vec![0]
}

fn runs_dir() -> PathBuf {
    PathBuf::from("runs")
}

/// What a student variant does with its teacher.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AutolabelSpec {
    /// Split of the training dataset to label.
    #[serde(default = "extra")]
    pub split: String,
    #[serde(default = "ninety")]
    pub threshold: f64,
    /// Teacher inference scales and fusion (default: the teacher's own).
    pub scales: Option<Scales>,
    pub fusion: Option<Fusion>,
    /// Share of each batch from the auto-labelled images (default 0.5;
    /// not with `boost_classes`).
    pub share: Option<f64>,
    /// Class names whose auto-labelled centroids join the class-uniform
    /// lists, as the official `coarse_boost_classes`: the auto-labelled
    /// images then reach batches only through class-uniform crops of
    /// those classes.
    #[serde(default)]
    pub boost_classes: Vec<String>,
}

fn extra() -> String {
    "train_extra".into()
}
fn ninety() -> f64 {
    0.9
}
impl AutolabelSpec {
    /// The train ids of `boost_classes`; an unknown name is an error.
    pub fn boost_ids(&self) -> std::result::Result<Vec<usize>, String> {
        use crate::data::cityscapes::CLASSES;
        self.boost_classes
            .iter()
            .map(|n| {
                CLASSES.iter().position(|c| c.name == n).ok_or_else(|| {
                    format!(
                        "autolabel.boost_classes: unknown class `{n}` (known: {})",
                        CLASSES.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantSpec {
    name: String,
    #[serde(default)]
    description: String,
    model: Option<Table>,
    data: Option<Table>,
    train: Option<Table>,
    eval: Option<Vec<EvalKey>>,
    #[serde(default)]
    sweep: BTreeMap<String, Vec<Value>>,
    teacher: Option<String>,
    autolabel: Option<AutolabelSpec>,
}

/// One run of the plan.
#[derive(Clone, Debug)]
pub struct PlannedRun {
    /// Variant name with its sweep point, e.g. `hier[lr=0.02]`.
    pub variant: String,
    /// The `[[variant]]` it comes from.
    pub base: String,
    pub seed: u64,
    pub config: RunConfig,
    pub hash: String,
    /// The teacher's planned run (same seed), index into the plan.
    pub teacher: Option<usize>,
    pub autolabel: Option<AutolabelSpec>,
}

/// A parsed suite and its plan.
#[derive(Clone, Debug)]
pub struct Suite {
    pub file: PathBuf,
    pub header: SuiteHeader,
    /// `[slurm]`: how `run --slurm` submits the suite.
    pub slurm: SlurmSpec,
    pub baseline: String,
    pub runs: Vec<PlannedRun>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Deep merge: tables merge key by key, anything else replaces.
fn merge(base: &mut Table, over: &Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Sets `a.b.c = v` in a table, creating tables on the way.
pub fn set_path(t: &mut Table, path: &str, v: Value) -> Result<()> {
    let parts: Vec<&str> = path.split('.').collect();
    let mut cur = t;
    for p in &parts[..parts.len() - 1] {
        let e = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        cur = match e {
            Value::Table(t) => t,
            _ => return Err(Error::invalid(path, format!("`{p}` is not a table"))),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), v);
    Ok(())
}

/// Parses `key.path=value` (value as TOML, else as a string).
pub fn parse_set(s: &str) -> Result<(String, Value)> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| Error::invalid("--set", format!("`{s}`: expected key.path=value")))?;
    let v = v.trim();
    let value = toml::from_str::<Table>(&format!("x = {v}"))
        .ok()
        .and_then(|mut t| t.remove("x"))
        .unwrap_or_else(|| Value::String(v.to_string()));
    Ok((k.trim().to_string(), value))
}

fn short(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(short).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// blake3 of the canonical config without its seed and evaluations, plus
/// what a student inherits (its teacher's hash and the auto-label spec).
pub fn config_hash(cfg: &RunConfig, teacher_hash: Option<&str>, al: Option<&AutolabelSpec>) -> String {
    let mut c = cfg.clone();
    c.train.seed = 0;
    c.eval.sets.clear();
    c.eval.every = None;
    let mut canon = serde_json::json!({"config": c, "teacher": teacher_hash, "autolabel": al});
    // the init file's content, not only its name (left out without init,
    // so older runs keep their hashes)
    if let Some(p) = &cfg.train.init {
        let digest = std::fs::read(p).map_or_else(
            |_| "unreadable".to_string(),
            |b| blake3::hash(&b).to_hex().to_string(),
        );
        canon["init_digest"] = serde_json::Value::String(digest);
    }
    blake3::hash(canon.to_string().as_bytes()).to_hex().to_string()
}

impl Suite {
    /// Reads, validates and expands a suite file; `sets` are `--set` overrides.
    pub fn load(path: &Path, sets: &[(String, Value)]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        let cfg_err = |line: Option<usize>, msg: String| Error::Config {
            path: match line {
                Some(l) => PathBuf::from(format!("{}:{l}", path.display())),
                None => path.to_path_buf(),
            },
            msg,
        };
        let file: SuiteFile = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| line_of(&text, s.start));
            cfg_err(line, e.message().to_string())
        })?;
        let suite_line = line_at_pat(&text, "[suite]");
        if file.suite.seeds.is_empty() {
            return Err(cfg_err(suite_line, "suite.seeds is empty".into()));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(d) = file.suite.seeds.iter().find(|s| !seen.insert(**s)) {
            return Err(cfg_err(
                suite_line,
                format!("suite.seeds: seed {d} is listed twice"),
            ));
        }
        check_name(&file.suite.name).map_err(|m| cfg_err(suite_line, format!("suite.name: {m}")))?;
        // Lines of the sections, for messages: `[defaults` and each `[[variant]]`.
        let line_at = |pat: &str, nth: usize| -> Option<usize> {
            text.match_indices(pat).nth(nth).map(|(o, _)| line_of(&text, o))
        };
        let defaults_line = line_at("[defaults", 0);
        let variant_line = |i: usize| line_at("[[variant]]", i);
        let defaults = match &file.defaults {
            Some(Value::Table(t)) => t.clone(),
            Some(_) => return Err(cfg_err(defaults_line, "[defaults] must be a table".into())),
            None => Table::new(),
        };
        // The defaults alone must be a valid run config.
        RunConfig::deserialize(Value::Table(defaults.clone()))
            .map_err(|e| cfg_err(defaults_line, format!("[defaults]: {}", e.message())))?;
        // Each --set on the defaults: a key or value it gets wrong is the
        // flag's fault, not a line's of the file.
        for (k, val) in sets {
            let flag = |msg: String| Error::invalid(format!("--set {k}={}", short(val)), msg);
            let mut t = defaults.clone();
            set_path(&mut t, k, val.clone()).map_err(|e| flag(e.to_string()))?;
            RunConfig::deserialize(Value::Table(t)).map_err(|e| flag(e.message().to_string()))?;
        }
        if file.variant.is_empty() {
            return Err(cfg_err(None, "a suite needs at least one [[variant]]".into()));
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, v) in file.variant.iter().enumerate() {
            check_name(&v.name).map_err(|m| cfg_err(variant_line(i), format!("variant name: {m}")))?;
            if names.insert(v.name.clone(), i).is_some() {
                return Err(cfg_err(
                    variant_line(i),
                    format!("variant `{}` is defined twice", v.name),
                ));
            }
        }
        let baseline = file
            .suite
            .baseline
            .clone()
            .unwrap_or_else(|| file.variant[0].name.clone());
        if !names.contains_key(&baseline) {
            return Err(cfg_err(
                None,
                format!("suite.baseline `{baseline}` is not a variant"),
            ));
        }
        // Dependency order (teachers first), with unknown teachers and cycles reported.
        let mut order = vec![];
        let mut state = vec![0u8; file.variant.len()]; // 0 new, 1 visiting, 2 done
        fn visit(
            i: usize,
            vs: &[VariantSpec],
            names: &HashMap<String, usize>,
            state: &mut [u8],
            order: &mut Vec<usize>,
            chain: &mut Vec<String>,
        ) -> std::result::Result<(), String> {
            if state[i] == 2 {
                return Ok(());
            }
            let v = &vs[i];
            chain.push(v.name.clone());
            if state[i] == 1 {
                return Err(format!("dependency cycle: {}", chain.join(" -> ")));
            }
            state[i] = 1;
            if let Some(t) = &v.teacher {
                let j = *names.get(t).ok_or_else(|| {
                    format!("variant `{}` names teacher `{t}`, which does not exist", v.name)
                })?;
                visit(j, vs, names, state, order, chain)?;
            }
            state[i] = 2;
            chain.pop();
            order.push(i);
            Ok(())
        }
        for i in 0..file.variant.len() {
            visit(i, &file.variant, &names, &mut state, &mut order, &mut vec![])
                .map_err(|m| cfg_err(variant_line(i), m))?;
        }

        let mut runs: Vec<PlannedRun> = vec![];
        let mut first_run_of: HashMap<String, Vec<usize>> = HashMap::new();
        for &vi in &order {
            let v = &file.variant[vi];
            let line = variant_line(vi);
            let verr = |msg: String| cfg_err(line, format!("variant `{}`: {msg}", v.name));
            let mut base = defaults.clone();
            for (section, over) in [("model", &v.model), ("data", &v.data), ("train", &v.train)] {
                if let Some(o) = over {
                    let mut t = Table::new();
                    t.insert(section.into(), Value::Table(o.clone()));
                    RunConfig::deserialize(Value::Table(t))
                        .map_err(|e| verr(format!("{section}: {}", e.message())))?;
                    let mut wrap = Table::new();
                    wrap.insert(section.into(), Value::Table(o.clone()));
                    merge(&mut base, &wrap);
                }
            }
            if v.autolabel.is_some() && v.teacher.is_none() {
                return Err(verr("`autolabel` needs a `teacher`".into()));
            }
            if let Some(al) = &v.autolabel {
                al.boost_ids().map_err(verr)?;
                if al.share.is_some() && !al.boost_classes.is_empty() {
                    return Err(verr(
                        "autolabel: `share` and `boost_classes` exclude each other (boosted classes reach batches through class-uniform crops)".into(),
                    ));
                }
                if let Some(sh) = al.share.filter(|s| !(0.0..=1.0).contains(s)) {
                    return Err(verr(format!("autolabel.share: {sh} is not a share in [0, 1]")));
                }
                if !(al.threshold > 0.0 && al.threshold <= 1.0) {
                    return Err(verr(format!(
                        "autolabel.threshold: {} is not a confidence in (0, 1]",
                        al.threshold
                    )));
                }
            }
            // Sweep: the cross product of every axis.
            let mut points: Vec<Vec<(String, Value)>> = vec![vec![]];
            for (key, values) in &v.sweep {
                if values.is_empty() {
                    return Err(verr(format!("sweep axis `{key}` has no values")));
                }
                points = points
                    .into_iter()
                    .flat_map(|p| {
                        values.iter().map(move |val| {
                            let mut q = p.clone();
                            q.push((key.clone(), val.clone()));
                            q
                        })
                    })
                    .collect();
            }
            for point in points {
                let mut t = base.clone();
                for (k, val) in &point {
                    set_path(&mut t, k, val.clone()).map_err(|e| verr(e.to_string()))?;
                }
                for (k, val) in sets {
                    set_path(&mut t, k, val.clone()).map_err(|e| verr(format!("--set: {e}")))?;
                }
                let mut cfg =
                    RunConfig::deserialize(Value::Table(t)).map_err(|e| verr(e.message().to_string()))?;
                if let Some(ev) = &v.eval {
                    cfg.eval.sets = ev.clone();
                }
                let name = if point.is_empty() {
                    v.name.clone()
                } else {
                    let tags: Vec<String> = point
                        .iter()
                        .map(|(k, val)| format!("{}={}", k.rsplit('.').next().unwrap_or(k), short(val)))
                        .collect();
                    format!("{}[{}]", v.name, tags.join(","))
                };
                for &seed in &file.suite.seeds {
                    let mut c = cfg.clone();
                    c.train.seed = seed;
                    c.validate().map_err(|e| verr(e.to_string()))?;
                    let teacher = match &v.teacher {
                        None => None,
                        Some(t) => {
                            let cands: Vec<usize> = first_run_of
                                .get(t)
                                .map(|ix| ix.iter().copied().filter(|&j| runs[j].seed == seed).collect())
                                .unwrap_or_default();
                            match cands.as_slice() {
                                [one] => Some(*one),
                                _ => {
                                    return Err(verr(format!(
                                        "teacher `{t}` must give exactly one run per seed (it has {} for seed {seed})",
                                        cands.len()
                                    )))
                                }
                            }
                        }
                    };
                    let hash = config_hash(&c, teacher.map(|j| runs[j].hash.as_str()), v.autolabel.as_ref());
                    first_run_of.entry(v.name.clone()).or_default().push(runs.len());
                    runs.push(PlannedRun {
                        variant: name.clone(),
                        base: v.name.clone(),
                        seed,
                        config: c,
                        hash,
                        teacher,
                        autolabel: v.autolabel.clone(),
                    });
                }
            }
            let _ = &v.description;
        }
        let suite = Self {
            file: path.to_path_buf(),
            header: file.suite,
            slurm: file.slurm,
            baseline,
            runs,
        };
        // Two runs never share a folder (names that sanitise alike, e.g.
        // `a/b` and `a_b`, with the same config).
        let mut folders: HashMap<PathBuf, &str> = HashMap::new();
        for r in &suite.runs {
            if let Some(other) = folders.insert(suite.run_dir(r), &r.variant) {
                if other != r.variant {
                    return Err(cfg_err(
                        None,
                        format!(
                            "variants `{other}` and `{}` would share the run folder {}: rename one",
                            r.variant,
                            suite.run_dir(r).display()
                        ),
                    ));
                }
            }
        }
        Ok(suite)
    }

    /// The run folder of a planned run: `runs_dir/<suite>/<variant>-<hash>-s<seed>`.
    pub fn run_dir(&self, r: &PlannedRun) -> PathBuf {
        let safe: String = r
            .variant
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.header
            .runs_dir
            .join(&self.header.name)
            .join(format!("{safe}-{}-s{}", &r.hash[..10], r.seed))
    }

    /// The default database: `<suite file stem>.db` beside the suite.
    pub fn default_db(&self) -> PathBuf {
        self.file.with_extension("db")
    }
}

/// The line of the first occurrence of `pat` in `text`.
fn line_at_pat(text: &str, pat: &str) -> Option<usize> {
    text.find(pat).map(|o| line_of(text, o))
}

/// Suite and variant names become folder names: letters, digits and
/// `-_.+=,[]`, not empty, not starting with a dot.
fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.+=,[]".contains(*c)))
    {
        return Err(format!(
            "`{name}` contains `{c}`; names become folder names, so use letters, digits and - _ . + = , [ ]"
        ));
    }
    if name.starts_with('.') {
        return Err(format!("`{name}` starts with a dot"));
    }
    Ok(())
}
/// `[slurm]` in a suite (every key optional; flags of `run --slurm`
/// override them).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSpec {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--time`, e.g. "04:00:00".
    pub time: Option<String>,
    /// `--cpus-per-task`.
    pub cpus_per_task: Option<u32>,
    /// `--gres`, e.g. "gpu:1".
    pub gres: Option<String>,
    /// Tasks in the array (workers); default 1.
    pub tasks: Option<u32>,
    /// Further `#SBATCH` options, e.g. ["--mem=32G", "--account=lab"].
    #[serde(default)]
    pub extra: Vec<String>,
    /// Shell lines run before the worker, e.g. ["module load cuda"].
    #[serde(default)]
    pub setup: Vec<String>,
}

impl SlurmSpec {
    /// `self` with the keys `over` sets replaced.
    pub fn overridden(&self, over: &SlurmSpec) -> SlurmSpec {
        SlurmSpec {
            partition: over.partition.clone().or_else(|| self.partition.clone()),
            time: over.time.clone().or_else(|| self.time.clone()),
            cpus_per_task: over.cpus_per_task.or(self.cpus_per_task),
            gres: over.gres.clone().or_else(|| self.gres.clone()),
            tasks: over.tasks.or(self.tasks),
            extra: [self.extra.clone(), over.extra.clone()].concat(),
            setup: [self.setup.clone(), over.setup.clone()].concat(),
        }
    }

    pub fn task_count(&self) -> u32 {
        self.tasks.unwrap_or(1).max(1)
    }
}

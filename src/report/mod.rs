//! Reports: aggregate a suite's evaluations over seeds (mean, std, n; delta
//! and Welch p-value against the baseline variant), render them as
//! comfy-table tables on the terminal and Markdown/HTML in
//! `reports/<suite>/`, and draw the figures with plotters (PNG and SVG, text
//! from the embedded DejaVu Sans, so no system fonts are needed).

pub mod compare;
pub mod figures;
pub mod paper;
pub mod stats;

use crate::config::EvalKey;
use crate::data::cityscapes::CLASSES;
use crate::model::Fusion;
use crate::store::{EvalRow, RunRow, Status, Store};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The key of one row of the ablation table: a variant's evaluation across
/// its seeds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowKey {
    pub variant: String,
    pub eval: EvalKey,
}

/// Flat in `index.json`: `variant`, `scales` as text (`0.5,1.0`, as the
/// store writes it), `fusion`, `flip`.
impl Serialize for RowKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut m = s.serialize_struct("RowKey", 4)?;
        m.serialize_field("variant", &self.variant)?;
        m.serialize_field("scales", &self.eval.scales.to_string())?;
        m.serialize_field("fusion", &self.eval.fusion)?;
        m.serialize_field("flip", &self.eval.flip)?;
        m.end()
    }
}

/// One row of the ablation table.
#[derive(Clone, Debug, Serialize)]
pub struct AggRow {
    pub key: RowKey,
    pub mean: f64,
    pub std: f64,
    pub n: usize,
    /// mean − baseline mean, Welch p-value (None without two seeds a side).
    pub delta: Option<f64>,
    pub p: Option<f64>,
    /// Half width of the delta's 95% confidence interval (Welch).
    pub ci95: Option<f64>,
    pub values: Vec<f64>,
    pub class_iou: Vec<Option<f64>>,
    pub ms_per_image: f64,
    pub peak_mib: Option<f64>,
    pub attn_means: Vec<(f64, f64)>,
}

/// Everything a report shows about a suite.
#[derive(Clone, Debug, Serialize)]
pub struct SuiteSummary {
    pub suite: String,
    pub baseline: String,
    pub rows: Vec<AggRow>,
    pub runs: Vec<RunRow>,
    #[serde(skip)]
    pub evals: Vec<(RunRow, EvalRow)>,
}

/// Variant order: as first seen in the run table (the suite's order).
fn variant_order(runs: &[RunRow]) -> Vec<String> {
    let mut v: Vec<String> = vec![];
    for r in runs {
        if !v.contains(&r.variant) {
            v.push(r.variant.clone());
        }
    }
    v
}

/// Aggregates a suite's finished runs.
pub fn summarise(store: &Store, suite: &str) -> Result<SuiteSummary> {
    let runs = store.runs(&crate::store::RunFilter {
        suite: Some(suite.to_string()),
        ..Default::default()
    })?;
    if runs.is_empty() {
        return Err(Error::invalid(
            "--suite",
            format!("no runs of suite `{suite}` in this database"),
        ));
    }
    let baseline = store.suite_baseline(suite)?.unwrap_or_default();
    let mut evals = vec![];
    for r in runs.iter().filter(|r| r.status == Status::Finished) {
        for e in store.evaluations(r.id)? {
            evals.push((r.clone(), e));
        }
    }
    let mut groups: BTreeMap<RowKey, Vec<&EvalRow>> = BTreeMap::new();
    let mut order: Vec<RowKey> = vec![];
    for (r, e) in &evals {
        let k = RowKey {
            variant: r.variant.clone(),
            eval: e.key(),
        };
        if !groups.contains_key(&k) {
            order.push(k.clone());
        }
        groups.entry(k).or_default().push(e);
    }
    let vorder = variant_order(&runs);
    order.sort_by_key(|k| vorder.iter().position(|v| *v == k.variant));
    // The baseline reference: the same evaluation of the baseline variant,
    // else the baseline's first evaluation.
    let base_first = order.iter().find(|k| k.variant == baseline).cloned();
    let values = |k: &RowKey| -> Vec<f64> {
        groups
            .get(k)
            .map(|v| v.iter().map(|e| e.miou).collect())
            .unwrap_or_default()
    };
    let mut rows = vec![];
    for k in &order {
        let es = &groups[k];
        let v = values(k);
        let (mean, std, n) = stats::mean_std(&v);
        let same = RowKey {
            variant: baseline.clone(),
            ..k.clone()
        };
        let reference = if groups.contains_key(&same) {
            Some(same)
        } else {
            base_first.clone()
        };
        let (delta, p, ci95) = match reference.filter(|r| r.variant != k.variant) {
            Some(r) => {
                let b = values(&r);
                let delta = mean - stats::mean_std(&b).0;
                let w = stats::welch(&v, &b);
                (
                    Some(delta),
                    w.map(|w| w.2),
                    // the standard error is delta / t
                    w.map(|(t, df, _)| {
                        if t != 0.0 {
                            stats::t95(df) * (delta / t).abs()
                        } else {
                            0.0
                        }
                    }),
                )
            }
            None => (None, None, None),
        };
        let kcls = es.iter().map(|e| e.class_iou.clone()).collect::<Vec<_>>();
        let ncls = kcls.iter().map(|c| c.len()).max().unwrap_or(0);
        let class_iou = (0..ncls)
            .map(|c| {
                let xs: Vec<f64> = kcls.iter().filter_map(|v| v.get(c).copied().flatten()).collect();
                (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
            })
            .collect();
        let attn: Vec<Vec<(f64, f64)>> = es.iter().map(|e| e.attn_means.clone()).collect();
        let attn_means = attn
            .first()
            .map(|first| {
                first
                    .iter()
                    .enumerate()
                    .map(|(i, (s, _))| {
                        let xs: Vec<f64> = attn.iter().filter_map(|a| a.get(i).map(|x| x.1)).collect();
                        (*s, xs.iter().sum::<f64>() / xs.len().max(1) as f64)
                    })
                    .collect()
            })
            .unwrap_or_default();
        rows.push(AggRow {
            key: k.clone(),
            mean,
            std,
            n,
            delta,
            p,
            ci95,
            values: v,
            class_iou,
            ms_per_image: es.iter().map(|e| e.ms_per_image).sum::<f64>() / es.len() as f64,
            peak_mib: es.iter().filter_map(|e| e.peak_mib).reduce(f64::max),
            attn_means,
        });
    }
    Ok(SuiteSummary {
        suite: suite.to_string(),
        baseline,
        rows,
        runs,
        evals,
    })
}

fn pm(mean: f64, std: f64) -> String {
    format!("{:.2} ± {:.2}", 100.0 * mean, 100.0 * std)
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("–".into(), f)
}

/// The ablation table: header and rows of text cells.
pub fn ablation_table(s: &SuiteSummary) -> (Vec<String>, Vec<Vec<String>>) {
    let head = [
        "variant",
        "scales",
        "fusion",
        "flip",
        "mIoU % (mean ± std)",
        "n",
        "Δ vs baseline",
        "p (Welch)",
        "ms/image",
    ]
    .map(String::from)
    .to_vec();
    let rows = s
        .rows
        .iter()
        .map(|r| {
            vec![
                r.key.variant.clone(),
                r.key.eval.scales.to_string(),
                r.key.eval.fusion.to_string(),
                if r.key.eval.flip {
                    "yes".into()
                } else {
                    "no".into()
                },
                pm(r.mean, r.std),
                r.n.to_string(),
                opt(r.delta, |d| format!("{:+.2}", 100.0 * d)),
                opt(r.p, |p| format!("{p:.3}")),
                format!("{:.0}", r.ms_per_image),
            ]
        })
        .collect();
    (head, rows)
}

/// Per-class IoU (mean over seeds) of every evaluation.
pub fn class_table(s: &SuiteSummary) -> (Vec<String>, Vec<Vec<String>>) {
    let present: Vec<usize> = (0..CLASSES.len())
        .filter(|&c| {
            s.rows
                .iter()
                .any(|r| r.class_iou.get(c).copied().flatten().is_some())
        })
        .collect();
    let mut head = vec!["evaluation".to_string()];
    head.extend(present.iter().map(|&c| CLASSES[c].name.to_string()));
    let rows = s
        .rows
        .iter()
        .map(|r| {
            let flip = if r.key.eval.flip { " flip" } else { "" };
            let mut row = vec![format!(
                "{} {} {}{flip}",
                r.key.variant, r.key.eval.fusion, r.key.eval.scales
            )];
            row.extend(present.iter().map(|&c| {
                opt(r.class_iou.get(c).copied().flatten(), |v| {
                    format!("{:.1}", 100.0 * v)
                })
            }));
            row
        })
        .collect();
    (head, rows)
}

/// How a class's single-scale IoU moves with the scale (the paper's
/// Figure 1 in numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRole {
    /// IoU rises with the scale: 2.0 > 1.0 > 0.5.
    Detail,
    /// IoU rises as the scale falls: 0.5 > 1.0 > 2.0.
    Context,
    Neither,
}

impl ScaleRole {
    /// The role of mean IoUs at 0.5, 1.0 and 2.0 (None when one is missing).
    pub fn of(at_05: Option<f64>, at_1: Option<f64>, at_2: Option<f64>) -> Option<Self> {
        let (a, b, c) = (at_05?, at_1?, at_2?);
        Some(if c > b && b > a {
            ScaleRole::Detail
        } else if a > b && b > c {
            ScaleRole::Context
        } else {
            ScaleRole::Neither
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ScaleRole::Detail => "detail",
            ScaleRole::Context => "context",
            ScaleRole::Neither => "neither",
        }
    }
}

/// One class of the premise table: IoU (mean, std, n over seeds) at each
/// single scale, and its role.
#[derive(Clone, Debug, Serialize)]
pub struct PremiseRow {
    pub class: usize,
    pub at: Vec<(f64, f64, f64, usize)>,
    pub role: Option<ScaleRole>,
}

/// The premise of the paper measured on the baseline: per class, the IoU
/// of every single-scale evaluation of the baseline variant (`single`
/// fusion at one scale), scales ascending. Empty when the baseline has
/// fewer than two such evaluations.
pub fn premise(s: &SuiteSummary) -> (Vec<f64>, Vec<PremiseRow>) {
    let mut scales: Vec<f64> = s
        .evals
        .iter()
        .filter(|(r, e)| r.variant == s.baseline && e.fusion == Fusion::Single && !e.flip)
        .filter_map(|(_, e)| e.scales.single())
        .collect();
    scales.sort_by(f64::total_cmp);
    scales.dedup();
    if scales.len() < 2 {
        return (scales, vec![]);
    }
    let per_class = |scale: f64, c: usize| -> Vec<f64> {
        s.evals
            .iter()
            .filter(|(r, e)| {
                r.variant == s.baseline
                    && e.fusion == Fusion::Single
                    && !e.flip
                    && e.scales.single() == Some(scale)
            })
            .filter_map(|(_, e)| e.class_iou.get(c).copied().flatten())
            .collect()
    };
    let mut rows = vec![];
    for c in 0..CLASSES.len() {
        let at: Vec<(f64, f64, f64, usize)> = scales
            .iter()
            .map(|&sc| {
                let v = per_class(sc, c);
                let (m, sd, n) = stats::mean_std(&v);
                (sc, m, sd, n)
            })
            .collect();
        if at.iter().all(|a| a.3 == 0) {
            continue;
        }
        let mean_at = |x: f64| at.iter().find(|a| a.0 == x && a.3 > 0).map(|a| a.1);
        rows.push(PremiseRow {
            class: c,
            role: ScaleRole::of(mean_at(0.5), mean_at(1.0), mean_at(2.0)),
            at,
        });
    }
    (scales, rows)
}

/// The premise table: class, IoU % (mean ± std) at each single scale, role.
pub fn premise_table(s: &SuiteSummary) -> Option<TextTable> {
    let (scales, rows) = premise(s);
    if rows.is_empty() {
        return None;
    }
    let mut head = vec!["class".to_string()];
    head.extend(
        scales
            .iter()
            .map(|&x| format!("IoU % at {}x", crate::model::scales::format_scale(x))),
    );
    head.push("role".into());
    let rows = rows
        .iter()
        .map(|r| {
            let mut row = vec![CLASSES[r.class].name.to_string()];
            row.extend(
                r.at.iter()
                    .map(|&(_, m, sd, n)| if n == 0 { "–".into() } else { pm(m, sd) }),
            );
            row.push(r.role.map_or("–", ScaleRole::name).to_string());
            row
        })
        .collect();
    Some((head, rows))
}

/// Mean attention weight per class (mean over seeds of each evaluation's
/// per-class means): one row per attention evaluation and scale, one
/// column per class present.
pub fn attention_table(s: &SuiteSummary) -> Option<TextTable> {
    let mut rows: Vec<(String, Vec<Option<f64>>)> = vec![];
    for r in s
        .rows
        .iter()
        .filter(|r| matches!(r.key.eval.fusion, Fusion::Hierarchical | Fusion::Explicit))
    {
        let per_seed: Vec<Vec<(f64, Vec<Option<f64>>)>> = s
            .evals
            .iter()
            .filter(|(run, e)| run.variant == r.key.variant && e.key() == r.key.eval)
            .map(|(_, e)| e.attn_class_means.clone())
            .filter(|v| !v.is_empty())
            .collect();
        let Some(first) = per_seed.first() else { continue };
        for (j, (scale, _)) in first.iter().enumerate() {
            let means = (0..CLASSES.len())
                .map(|c| {
                    let xs: Vec<f64> = per_seed
                        .iter()
                        .filter_map(|v| v.get(j).and_then(|(_, cl)| cl.get(c).copied().flatten()))
                        .collect();
                    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
                })
                .collect();
            rows.push((
                format!(
                    "{} {} {}: {}x",
                    r.key.variant,
                    r.key.eval.fusion,
                    r.key.eval.scales,
                    crate::model::scales::format_scale(*scale)
                ),
                means,
            ));
        }
    }
    if rows.is_empty() {
        return None;
    }
    let present: Vec<usize> = (0..CLASSES.len())
        .filter(|&c| rows.iter().any(|(_, m)| m[c].is_some()))
        .collect();
    let mut head = vec!["evaluation: attention at scale".to_string()];
    head.extend(present.iter().map(|&c| CLASSES[c].name.to_string()));
    let rows = rows
        .into_iter()
        .map(|(name, m)| {
            let mut row = vec![name];
            row.extend(present.iter().map(|&c| opt(m[c], |v| format!("{v:.2}"))));
            row
        })
        .collect();
    Some((head, rows))
}

/// What the attention table shows.
pub const ATTENTION_TEXT: &str = "Mean attention weight per class over the validation pixels of that class (mean over seeds). Hierarchical: the relative weight `a_s` each scale below the top gets against the prediction built from the scales above it (0.5 = no preference); explicit: the softmax weight of each scale.";

/// comfy-table rendering for the terminal.
pub fn terminal_table(head: &[String], rows: &[Vec<String>]) -> String {
    let mut t = comfy_table::Table::new();
    t.set_header(head.to_vec());
    for r in rows {
        t.add_row(r.clone());
    }
    t.to_string()
}

/// Markdown rendering (pipes escaped).
pub fn markdown_table(head: &[String], rows: &[Vec<String>]) -> String {
    let esc = |s: &String| s.replace('|', "\\|");
    let mut out = format!(
        "| {} |\n|{}\n",
        head.iter().map(esc).collect::<Vec<_>>().join(" | "),
        "---|".repeat(head.len())
    );
    for r in rows {
        out.push_str(&format!(
            "| {} |\n",
            r.iter().map(esc).collect::<Vec<_>>().join(" | ")
        ));
    }
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A table as header and rows of text cells.
pub type TextTable = (Vec<String>, Vec<Vec<String>>);

/// One variant's training cost, from its runs' `step_secs` metrics.
#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    pub variant: String,
    /// Training fusion and scales, e.g. `hierarchical 0.5,1.0`.
    pub training: String,
    /// Median seconds per step over every step of every seed.
    pub median_step_s: f64,
    /// Steps measured (all seeds).
    pub steps: usize,
    /// Seconds of training per run: the sum over steps / runs.
    pub seconds_per_run: f64,
    /// median_step_s / the baseline's.
    pub vs_baseline: Option<f64>,
}

/// The training cost of every variant with step timings.
pub fn costs(store: &Store, s: &SuiteSummary) -> Result<Vec<Cost>> {
    let mut out = vec![];
    for v in variant_order(&s.runs) {
        let mut xs = vec![];
        let mut training = String::new();
        for r in s.runs.iter().filter(|r| r.variant == v) {
            xs.extend(
                store
                    .metric(r.id, "step_secs")?
                    .into_iter()
                    .map(|x| x.1)
                    .filter(|x| x.is_finite()),
            );
            if let Ok(c) = serde_json::from_str::<crate::config::RunConfig>(&r.config_json) {
                training = format!("{} {}", c.model.fusion, c.model.scales);
            }
        }
        if xs.is_empty() {
            continue;
        }
        let runs = s.runs.iter().filter(|r| r.variant == v).count().max(1);
        let seconds_per_run = xs.iter().sum::<f64>() / runs as f64;
        xs.sort_by(f64::total_cmp);
        out.push(Cost {
            variant: v,
            training,
            median_step_s: xs[xs.len() / 2],
            steps: xs.len(),
            seconds_per_run,
            vs_baseline: None,
        });
    }
    if let Some(b) = out
        .iter()
        .find(|c| c.variant == s.baseline)
        .map(|c| c.median_step_s)
    {
        for c in &mut out {
            c.vs_baseline = Some(c.median_step_s / b);
        }
    }
    Ok(out)
}

/// Median training step time per variant (from the `step_secs` metrics)
/// and the benchmark's peak memory: the paper's efficiency claim.
pub fn efficiency(store: &Store, s: &SuiteSummary) -> Result<Option<(String, TextTable)>> {
    let list = costs(store, s)?;
    let med = |v: &str| list.iter().find(|c| c.variant == v).map(|c| c.median_step_s);
    let (Some(e), Some(h)) = (med("explicit"), med("hierarchical")) else {
        return Ok(None);
    };
    let mut text = format!(
        "Training cost measured on the same model and crop (median seconds per step over every step of every seed, from the `step_secs` metrics): explicit {{0.5, 1.0, 2.0}} / hierarchical {{0.5, 1.0}} = {:.2}x (theory: 5.25 / 1.25 = 4.2x).",
        e / h
    );
    if let Some(b) = med("baseline") {
        text.push_str(&format!(
            " Hierarchical / single-scale = {:.2}x (theory 1.25x).",
            h / b
        ));
    }
    let bench = store.benchmarks("train")?;
    let mem = |name: &str| {
        bench
            .iter()
            .rev()
            .find(|b| b.name == name)
            .and_then(|b| b.peak_mib)
    };
    if let (Some(me), Some(mh)) = (mem("explicit"), mem("hierarchical")) {
        text.push_str(&format!(
            " Peak memory of a training step (`hmsa-lab bench train`, one process per mode): explicit {me:.0} MiB, hierarchical {mh:.0} MiB, {:.2}x.",
            me / mh
        ));
    }
    let mut head = [
        "variant",
        "training fusion and scales",
        "median s/step",
        "steps",
        "training s per run",
    ]
    .map(String::from)
    .to_vec();
    let with_ratio = list.iter().any(|c| c.vs_baseline.is_some());
    if with_ratio {
        head.push(format!("step cost vs {}", s.baseline));
    }
    let rows = list
        .iter()
        .map(|c| {
            let mut row = vec![
                c.variant.clone(),
                c.training.clone(),
                format!("{:.3}", c.median_step_s),
                c.steps.to_string(),
                format!("{:.0}", c.seconds_per_run),
            ];
            if let Some(r) = c.vs_baseline {
                row.push(format!("{r:.2}x"));
            }
            row
        })
        .collect();
    Ok(Some((text, (head, rows))))
}

fn first_metric(store: &Store, run: i64, key: &str) -> Result<Option<f64>> {
    Ok(store.metric(run, key)?.first().map(|x| x.1))
}

/// Auto-labelling as the students recorded it: per student variant, the
/// teacher's validation mIoU at the labelling scales, the images labelled,
/// and the share of pixels the threshold kept per class (mean over seeds).
pub fn autolabel_section(store: &Store, s: &SuiteSummary) -> Result<Option<(String, TextTable)>> {
    let mut rows = vec![];
    let mut kept_classes: Vec<usize> = vec![];
    type PerVariant = (String, Vec<f64>, Vec<f64>, Vec<Vec<f64>>, Vec<f64>);
    let mut per_variant: Vec<PerVariant> = vec![];
    for v in variant_order(&s.runs) {
        let (mut teacher, mut images, mut kept, mut dropped) = (vec![], vec![], vec![], vec![]);
        for r in s
            .runs
            .iter()
            .filter(|r| r.variant == v && r.status == Status::Finished)
        {
            let Some(n) = first_metric(store, r.id, "autolabel_images")? else {
                continue;
            };
            images.push(n);
            dropped.push(first_metric(store, r.id, "autolabel_dropped")?.unwrap_or(0.0));
            if let Some(t) = first_metric(store, r.id, "autolabel_teacher_miou")? {
                teacher.push(t);
            }
            let mut per = vec![0.0; CLASSES.len()];
            for (c, cls) in CLASSES.iter().enumerate() {
                per[c] = first_metric(store, r.id, &format!("autolabel_kept/{}", cls.name))?.unwrap_or(0.0);
                if per[c] > 0.0 && !kept_classes.contains(&c) {
                    kept_classes.push(c);
                }
            }
            kept.push(per);
        }
        if !images.is_empty() {
            per_variant.push((v, teacher, images, kept, dropped));
        }
    }
    if per_variant.is_empty() {
        return Ok(None);
    }
    kept_classes.sort();
    let mut head = vec![
        "student".to_string(),
        "teacher mIoU % (val)".into(),
        "images".into(),
        "pixels kept %".into(),
    ];
    head.extend(kept_classes.iter().map(|&c| format!("{} (Mpx)", CLASSES[c].name)));
    for (v, teacher, images, kept, dropped) in &per_variant {
        let (tm, tsd, _) = stats::mean_std(teacher);
        let n = kept.len() as f64;
        let total: f64 = kept.iter().map(|k| k.iter().sum::<f64>()).sum();
        let all = total + dropped.iter().sum::<f64>();
        let mut row = vec![
            v.clone(),
            if teacher.is_empty() {
                "–".into()
            } else {
                pm(tm, tsd)
            },
            format!("{:.0}", images.iter().sum::<f64>() / images.len() as f64),
            format!("{:.1}", 100.0 * total / all.max(1.0)),
        ];
        row.extend(
            kept_classes
                .iter()
                .map(|&c| format!("{:.3}", kept.iter().map(|k| k[c]).sum::<f64>() / n / 1e6)),
        );
        rows.push(row);
    }
    let text = "The teacher is the same seed's run of the teacher variant; its mIoU is its own validation score at the scales and fusion it labels with. Pixels kept: what the confidence threshold leaves labelled, per class, in millions of pixels (mean over seeds).".to_string();
    Ok(Some((text, (head, rows))))
}

/// The teacher's kept labels against the truth, where the students
/// recorded it (the synthetic benchmark knows the truth of `train_extra`):
/// per class, the truth's pixels, the pixels the threshold kept with that
/// label, their precision, and the share of the class's truth kept with
/// the right label. From the first student variant that has it, mean over
/// seeds (the students of one seed share their teacher's labels).
pub fn teacher_truth_section(store: &Store, s: &SuiteSummary) -> Result<Option<(String, TextTable)>> {
    for v in variant_order(&s.runs) {
        // per class: (truth, kept, correct) summed over seeds
        let mut sums = vec![[0f64; 3]; CLASSES.len()];
        let mut seeds = 0usize;
        for r in s
            .runs
            .iter()
            .filter(|r| r.variant == v && r.status == Status::Finished)
        {
            let mut any = false;
            for (c, cls) in CLASSES.iter().enumerate() {
                let Some(t) = first_metric(store, r.id, &format!("autolabel_truth/{}", cls.name))? else {
                    continue;
                };
                any = true;
                let kept = first_metric(store, r.id, &format!("autolabel_kept/{}", cls.name))?.unwrap_or(0.0);
                let ok =
                    first_metric(store, r.id, &format!("autolabel_correct/{}", cls.name))?.unwrap_or(0.0);
                for (a, b) in sums[c].iter_mut().zip([t, kept, ok]) {
                    *a += b;
                }
            }
            seeds += usize::from(any);
        }
        if seeds == 0 {
            continue;
        }
        let head = [
            "class",
            "truth (kpx)",
            "kept (kpx)",
            "precision of kept %",
            "truth kept and right %",
        ]
        .map(String::from)
        .to_vec();
        let pct = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.1}", 100.0 * a / b)
            } else {
                "–".into()
            }
        };
        let row = |name: &str, [t, k, ok]: [f64; 3]| {
            let n = seeds as f64;
            vec![
                name.to_string(),
                format!("{:.1}", t / n / 1e3),
                format!("{:.1}", k / n / 1e3),
                pct(ok, k),
                pct(ok, t),
            ]
        };
        let mut rows: Vec<Vec<String>> = CLASSES
            .iter()
            .zip(&sums)
            .filter(|(_, x)| x[0] > 0.0 || x[1] > 0.0)
            .map(|(c, x)| row(c.name, *x))
            .collect();
        let all = sums
            .iter()
            .fold([0f64; 3], |a, x| [a[0] + x[0], a[1] + x[1], a[2] + x[2]]);
        rows.push(row("all", all));
        let text = format!(
            "The teacher's labels of `{v}` scored against the generator's truth of the images it labelled (thousands of pixels per labelling, mean over {seeds} seed(s)). \
             Precision: the share of kept pixels whose label is right; truth kept and right: the share of the class's pixels that reach the student with the right label."
        );
        return Ok(Some((text, (head, rows))));
    }
    Ok(None)
}

/// How well each variant fits its own training images against the
/// validation images (`[eval] fit`): a student limited by its data shows a
/// gap (validation below training), one limited by its steps does not.
pub fn fit_section(store: &Store, s: &SuiteSummary) -> Result<Option<(String, TextTable)>> {
    let mut rows = vec![];
    for v in variant_order(&s.runs) {
        let (mut train, mut val, mut gap) = (vec![], vec![], vec![]);
        let mut label = String::new();
        for r in s
            .runs
            .iter()
            .filter(|r| r.variant == v && r.status == Status::Finished)
        {
            let Ok(c) = serde_json::from_str::<crate::config::RunConfig>(&r.config_json) else {
                continue;
            };
            let Some(set) = c.eval.sets.first() else { continue };
            let Some(t) = first_metric(store, r.id, &crate::eval::fit_metric(set))? else {
                continue;
            };
            let Some(e) = s
                .evals
                .iter()
                .find(|(run, e)| run.id == r.id && e.key() == *set)
                .map(|(_, e)| e.miou)
            else {
                continue;
            };
            label = format!("{} {}", set.fusion, set.scales);
            train.push(t);
            val.push(e);
            gap.push(t - e);
        }
        if train.is_empty() {
            continue;
        }
        let pct = |xs: &[f64]| {
            let (m, sd, _) = stats::mean_std(xs);
            pm(m, sd)
        };
        rows.push(vec![
            v,
            label,
            pct(&train),
            pct(&val),
            pct(&gap),
            train.len().to_string(),
        ]);
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let head = [
        "variant",
        "evaluation",
        "training images mIoU %",
        "validation mIoU %",
        "gap (points)",
        "seeds",
    ]
    .map(String::from)
    .to_vec();
    let text = "Each run's first evaluation on its own training images (fine labels, no augmentation) beside the same evaluation on the validation images (mean ± std over seeds). \
                A student whose validation score falls well below its training score is limited by its data, which auto-labelled images can help; one that scores alike on both is limited by its steps."
        .to_string();
    Ok(Some((text, (head, rows))))
}

/// One titled table of a report with its Markdown text (may be empty),
/// and whether the README shows it.
#[derive(Clone, Debug)]
pub struct Section {
    pub title: String,
    pub text: String,
    pub table: TextTable,
    pub in_readme: bool,
}

/// A suite's report, built once from the store: the Markdown/HTML files,
/// the terminal and the README are renderings of it.
#[derive(Clone, Debug)]
pub struct Report {
    pub summary: SuiteSummary,
    /// In reading order: the premise, the paper's effects beside ours,
    /// where the attention looks, the ablation and per-class tables, then
    /// efficiency, fit and auto-labelling.
    pub sections: Vec<Section>,
    pub costs: Vec<Cost>,
}

impl Report {
    pub fn build(store: &Store, suite: &str) -> Result<Self> {
        let s = summarise(store, suite)?;
        let mut sections = vec![];
        // the README shows all but the per-class and kept-pixels tables
        let mut push = |title: &str, text: &str, table: TextTable, in_readme: bool| {
            sections.push(Section {
                title: title.into(),
                text: text.into(),
                table,
                in_readme,
            })
        };
        if let Some(t) = premise_table(&s) {
            push("Premise", PREMISE_TEXT, t, true);
        }
        if let Some((text, t)) = paper::comparison(&s) {
            push("The paper's ablations beside ours", &text, t, true);
        }
        if let Some(t) = attention_table(&s) {
            push("Attention by class", ATTENTION_TEXT, t, true);
        }
        push("Ablation", "", ablation_table(&s), true);
        push("Per-class IoU (%)", "", class_table(&s), false);
        type Make = fn(&Store, &SuiteSummary) -> Result<Option<(String, TextTable)>>;
        let more: [(&str, Make, bool); 4] = [
            ("Efficiency", efficiency, true),
            ("Fit: training images against validation", fit_section, true),
            ("Auto-labelling", autolabel_section, false),
            (
                "Auto-labelling: the teacher's labels against the truth",
                teacher_truth_section,
                true,
            ),
        ];
        for (title, make, in_readme) in more {
            if let Some((text, t)) = make(store, &s)? {
                push(title, &text, t, in_readme);
            }
        }
        let costs = costs(store, &s)?;
        Ok(Self {
            summary: s,
            sections,
            costs,
        })
    }

    /// What a finished suite says, on a terminal: each section's table, then
    /// its text.
    pub fn terminal(&self) -> String {
        let mut out = String::new();
        for x in &self.sections {
            out.push_str(&format!("{}\n", x.title));
            out.push_str(&format!("{}\n", terminal_table(&x.table.0, &x.table.1)));
            if !x.text.is_empty() {
                out.push_str(&format!("{}\n", x.text));
            }
            out.push('\n');
        }
        out
    }

    fn markdown_sections(&self, which: impl Fn(&Section) -> bool, level: &str) -> String {
        let mut md = String::new();
        for x in self.sections.iter().filter(|x| which(x)) {
            md.push_str(&format!("{level} {}\n\n", x.title));
            if !x.text.is_empty() {
                md.push_str(&format!("{}\n\n", x.text));
            }
            md.push_str(&format!("{}\n", markdown_table(&x.table.0, &x.table.1)));
        }
        md
    }
}

/// Writes `index.md`, `index.html` and the figures into `out`; returns the
/// files written.
pub fn write_report(report: &Report, store: &Store, out: &Path) -> Result<Vec<PathBuf>> {
    let s = &report.summary;
    std::fs::create_dir_all(out.join("figures")).map_err(|e| Error::io("creating", out, e))?;
    let figs = figures::draw_all(store, s, &out.join("figures"))?;
    let finished = s.runs.iter().filter(|r| r.status == Status::Finished).count();
    let intro = format!(
        "Suite `{}`: {} runs ({} finished). Baseline variant: `{}`. mIoU in %, mean ± sample std over seeds; \
         Δ against the baseline's same evaluation (or its first); p from Welch's t-test.\n",
        s.suite,
        s.runs.len(),
        finished,
        s.baseline
    );
    let mut md = format!("# Report: {}\n\n{intro}\n", s.suite);
    md.push_str(&report.markdown_sections(|_| true, "##"));
    md.push_str("\n## Figures\n\n");
    for f in &figs {
        if f.extension().and_then(|e| e.to_str()) == Some("png") {
            let rel = format!("figures/{}", f.file_name().and_then(|n| n.to_str()).unwrap_or(""));
            let name = f.file_stem().and_then(|n| n.to_str()).unwrap_or("");
            md.push_str(&format!("![{name}]({rel})\n\n"));
        }
    }
    // index.html is index.md rendered: one source for the text
    let mut body = String::new();
    pulldown_cmark::html::push_html(
        &mut body,
        pulldown_cmark::Parser::new_ext(&md, pulldown_cmark::Options::ENABLE_TABLES),
    );
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px}}img{{max-width:100%}}code{{background:#f4f4f4}}</style></head><body>\n{body}</body></html>\n",
        html_escape(&s.suite)
    );
    let mdp = out.join("index.md");
    let htp = out.join("index.html");
    let jsp = out.join("index.json");
    // each file replaced whole: a kill leaves the last report or this one
    crate::atomic::write(&mdp, md)?;
    crate::atomic::write(&htp, html)?;
    let json = serde_json::json!({
        "suite": s.suite,
        "baseline": s.baseline,
        "evaluations": s.rows,
        "effects": paper::effects(s),
        "costs": report.costs,
    });
    crate::atomic::write(
        &jsp,
        serde_json::to_string_pretty(&json).expect("serialisable") + "\n",
    )?;
    let mut files = vec![mdp, htp, jsp];
    files.extend(figs);
    Ok(files)
}

/// What the premise table shows.
pub const PREMISE_TEXT: &str = "The paper's premise, measured on the baseline before any fusion: IoU of each class when the single-scale model is evaluated at one scale alone (mean ± std over seeds). A class is *detail* when its IoU rises with the scale (2.0 > 1.0 > 0.5), *context* when it rises as the scale falls (0.5 > 1.0 > 2.0). Where every class prefers the same scale, attention can at best pick that scale per pixel; the paper's argument for attention over averaging needs both kinds.";

/// Markers of the generated results section in a README.
pub const README_BEGIN: &str = "<!-- results:begin (generated by `hmsa-lab report --readme`) -->";
pub const README_END: &str = "<!-- results:end -->";

/// The README's results section (between the markers): the premise, the
/// paper's effects, where the attention looks, the ablation, efficiency,
/// fit and auto-labelling, and the main figure (`figure`, a path relative
/// to the README).
pub fn readme_section(report: &Report, figure: &str) -> String {
    let s = &report.summary;
    let mut out = format!(
        "{README_BEGIN}\n\nSuite `{}`, {} finished runs; mIoU in % on the synthetic validation split, mean ± std over seeds.\n\n",
        s.suite,
        s.runs.iter().filter(|r| r.status == Status::Finished).count(),
    );
    out.push_str(&report.markdown_sections(|x| x.in_readme, "####"));
    out.push_str(&format!("\n![mIoU per evaluation]({figure})\n\n{README_END}"));
    out
}

/// Writes `section` between the markers of `readme` (which must have them).
pub fn update_readme(readme: &Path, section: &str) -> Result<()> {
    let text = std::fs::read_to_string(readme).map_err(|e| Error::io("reading", readme, e))?;
    let (Some(a), Some(b)) = (text.find(README_BEGIN), text.find(README_END)) else {
        return Err(Error::Input {
            path: readme.to_path_buf(),
            msg: format!("no results markers ({README_BEGIN} ... {README_END})"),
        });
    };
    let new = format!("{}{}{}", &text[..a], section, &text[b + README_END.len()..]);
    crate::atomic::write(readme, new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_section_is_replaced_between_markers_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("README.md");
        std::fs::write(
            &p,
            format!("# T\n\nbefore\n{README_BEGIN}\nold\n{README_END}\nafter\n"),
        )
        .unwrap();
        update_readme(&p, &format!("{README_BEGIN}\nnew table\n{README_END}")).unwrap();
        let t = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            t,
            format!("# T\n\nbefore\n{README_BEGIN}\nnew table\n{README_END}\nafter\n")
        );
        std::fs::write(&p, "no markers\n").unwrap();
        let e = update_readme(&p, "x").unwrap_err().to_string();
        assert!(e.contains("README.md") && e.contains("no results markers"), "{e}");
    }

    #[test]
    fn scale_roles_need_strict_orderings_over_the_three_scales() {
        let r = |a, b, c| ScaleRole::of(Some(a), Some(b), Some(c));
        assert_eq!(r(0.1, 0.2, 0.3), Some(ScaleRole::Detail));
        assert_eq!(r(0.3, 0.2, 0.1), Some(ScaleRole::Context));
        // a tie is not an ordering; a peak in the middle is neither
        assert_eq!(r(0.2, 0.2, 0.3), Some(ScaleRole::Neither));
        assert_eq!(r(0.1, 0.3, 0.2), Some(ScaleRole::Neither));
        assert_eq!(ScaleRole::of(None, Some(0.3), Some(0.2)), None);
    }

    #[test]
    fn markdown_tables_escape_pipes() {
        let t = markdown_table(&["a".into(), "b".into()], &[vec!["x|y".into(), "1".into()]]);
        assert_eq!(t, "| a | b |\n|---|---|\n| x\\|y | 1 |\n");
    }
}

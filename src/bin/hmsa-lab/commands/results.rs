//! Read commands: `runs`, `show`, `compare`, `query`, `report`, `export
//! mlflow`, and `import-runx` (which writes a suite file, never a
//! database).

use crate::cli::{
    CompareArgs, ImportRunxArgs, MlflowArgs, QueryArgs, ReportArgs, RunsArgs, ShowArgs, StatusArg, TextOrJson,
};
use crate::output::{cell, Listing};
use crate::output::{out, outln};
use crate::process::resolve_run;
use anyhow::{bail, Context, Result};
use hmsa_lab::config::suite::Suite;
use hmsa_lab::report;
use hmsa_lab::store::{RunFilter, Store};
use std::path::PathBuf;

pub fn runs(a: RunsArgs) -> Result<()> {
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
    Ok(())
}

pub fn show(a: ShowArgs) -> Result<()> {
    let ShowArgs { run, db, format } = a;
    let store = Store::open_read_only(&db.url(None)?)?;
    let run = resolve_run(&store, &run)?;
    let r = store.run(run)?.with_context(|| format!("no run {run}"))?;
    if format == TextOrJson::Json {
        let evals: Vec<serde_json::Value> = store
            .evaluations(run)?
            .into_iter()
            .map(|e| {
                serde_json::json!({
                    "scales": e.scales.to_string(), "fusion": e.fusion, "flip": e.flip,
                    "miou": e.miou, "pixel_acc": e.pixel_acc, "mean_class_acc": e.mean_class_acc,
                    "fw_iou": e.fw_iou, "class_iou": e.class_iou,
                    "attn_means": e.attn_means, "ms_per_image": e.ms_per_image,
                    "peak_mib": e.peak_mib, "images": e.images,
                })
            })
            .collect();
        let arts = store.artifacts(run)?;
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
        outln!("{}", serde_json::to_string_pretty(&out)?)?;
        return Ok(());
    }
    outln!(
        "run {} — suite {}, variant {}, seed {}",
        r.id,
        r.suite,
        r.variant,
        r.seed
    )?;
    outln!(
        "status {} at step {}; config hash {}",
        r.status,
        r.step,
        r.config_hash
    )?;
    outln!(
        "git {} {}; host {}; {}",
        r.git_commit.as_deref().unwrap_or("?"),
        if r.git_dirty == Some(true) { "(dirty)" } else { "" },
        r.host.as_deref().unwrap_or("?"),
        r.versions.as_deref().unwrap_or("")
    )?;
    outln!("folder {}", r.run_dir.display())?;
    if let Some(t) = r.removed_ms {
        outln!(
            "removed {:.0} s ago: `hmsa-lab restore {}` brings it back until `hmsa-lab gc` purges it",
            (hmsa_lab::store::now_ms() - t) as f64 / 1000.0,
            r.id
        )?;
    }
    if let Some(e) = &r.error {
        outln!("error: {e}")?;
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
            serde_json::to_string(&e.attn_means)?,
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
    outln!("{}", report::terminal_table(&head, &rows))?;
    for a in store.artifacts(run)? {
        outln!(
            "artifact {}: {} ({})",
            a.kind,
            a.path,
            &a.digest[..a.digest.len().min(12)]
        )?;
    }
    let loss = store.metric(run, "loss")?;
    if let (Some(f), Some(l)) = (loss.first(), loss.last()) {
        outln!("loss {:.4} at step {} -> {:.4} at step {}", f.1, f.0, l.1, l.0)?;
    }
    for (k, v) in store.params(run)? {
        outln!("  {k} = {v}")?;
    }
    Ok(())
}

pub fn compare(a: CompareArgs) -> Result<()> {
    let CompareArgs { runs, db, format } = a;
    let store = Store::open_read_only(&db.url(None)?)?;
    let runs: Vec<i64> = runs
        .iter()
        .map(|r| resolve_run(&store, r))
        .collect::<Result<_>>()?;
    let c = report::compare::compare(&store, &runs)?;
    if format == TextOrJson::Json {
        outln!("{}", serde_json::to_string_pretty(&c)?)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = c
        .params
        .iter()
        .map(|d| {
            let mut row = vec![d.key.clone()];
            row.extend(d.values.iter().map(|v| v.clone().unwrap_or_else(|| "–".into())));
            row
        })
        .collect();
    let mut head = vec!["param".to_string()];
    head.extend(runs.iter().map(|r| format!("run {r}")));
    outln!("{}", report::terminal_table(&head, &rows))?;
    let mut erows = vec![];
    for e in &c.evaluations {
        let mut row = vec![format!("{} {} flip={}", e.fusion, e.scales, e.flip)];
        row.extend(
            e.miou
                .iter()
                .zip(&e.delta)
                .enumerate()
                .map(|(i, (m, d))| match (m, d) {
                    (Some(m), _) if i == 0 => format!("{:.2}", 100.0 * m),
                    (Some(m), Some(d)) => format!("{:.2} ({:+.2})", 100.0 * m, 100.0 * d),
                    _ => "–".into(),
                }),
        );
        erows.push(row);
    }
    let mut head = vec!["evaluation".to_string(), format!("run {} mIoU %", runs[0])];
    head.extend(runs[1..].iter().map(|r| format!("run {r} (Δ)")));
    outln!("{}", report::terminal_table(&head, &erows))?;
    Ok(())
}

pub fn query(a: QueryArgs) -> Result<()> {
    let QueryArgs {
        sql,
        db,
        format,
        timeout,
    } = a;
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
    Ok(())
}

pub fn report(a: ReportArgs) -> Result<()> {
    let ReportArgs {
        suite,
        db,
        out,
        readme,
    } = a;
    let store = Store::open_read_only(&db.url(Some(&suite))?)?;
    let out = out.unwrap_or_else(|| PathBuf::from("reports").join(&suite));
    let rep = report::Report::build(&store, &suite)?;
    let files = report::write_report(&rep, &store, &out)?;
    out!("{}", rep.terminal())?;
    if let Some(readme) = readme {
        let base = readme.parent().unwrap_or(std::path::Path::new(""));
        let fig = out.join("figures/miou.png");
        let rel = fig.strip_prefix(base).unwrap_or(&fig).display().to_string();
        report::update_readme(&readme, &report::readme_section(&rep, &rel))?;
        outln!("updated {}", readme.display())?;
    }
    outln!("wrote {} files into {}", files.len(), out.display())?;
    Ok(())
}

pub fn export_mlflow(a: MlflowArgs) -> Result<()> {
    let MlflowArgs {
        tracking_uri,
        suite,
        experiment,
        db,
    } = a;
    let store = Store::open_read_only(&db.url(suite.as_deref())?)?;
    let e = hmsa_lab::mlflow::export(&store, &tracking_uri, suite.as_deref(), experiment.as_deref())?;
    outln!(
        "{tracking_uri}: {} run(s) created, {} updated; {} metric value(s), {} param(s), {} artifact(s) sent",
        e.created,
        e.updated,
        e.metrics,
        e.params,
        e.artifacts
    )?;
    Ok(())
}

pub fn import_runx(a: ImportRunxArgs) -> Result<()> {
    let ImportRunxArgs { recipe, out } = a;
    let text = hmsa_lab::config::runx::import(&recipe)?;
    match out {
        Some(p) => {
            if p.exists() {
                bail!("{}: exists; not overwritten", p.display());
            }
            std::fs::write(&p, &text).with_context(|| format!("writing {}", p.display()))?;
            // what was written must load as a suite
            Suite::load(&p, &[]).with_context(|| format!("{} (as written)", p.display()))?;
            outln!("wrote {}", p.display())?;
        }
        None => out!("{text}")?,
    }
    Ok(())
}

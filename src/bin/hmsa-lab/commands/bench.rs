//! `bench`: runs the benchmark suites, one process per case, and records
//! them.

use crate::cli::{BenchArgs, TextOrJson};
use crate::output::outln;
use crate::process::machine;
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use hmsa_lab::report;
use hmsa_lab::store::Store;

pub fn bench(a: BenchArgs) -> Result<()> {
    if let Some(c) = a.case {
        let case: hmsa_lab::bench::Case = serde_json::from_str(&c)?;
        outln!("{}", serde_json::to_string(&case.run()?)?)?;
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
    if a.profile && !suites.iter().any(|s| s == "train") {
        bail!("--profile profiles training steps: name the train suite (`bench train --profile`)");
    }
    let threads = rayon::current_num_threads();
    let mach = machine();
    let store = Store::open(&a.db.url(None)?)?;
    let exe = std::env::current_exe()?;
    let mut rows = vec![];
    let mut all = vec![];
    let mut failed = 0;
    let mut profiles = vec![];
    for suite in &suites {
        let cases = if suite == "store" {
            hmsa_lab::bench::store_cases(a.pg.as_deref())
        } else {
            hmsa_lab::bench::suite_cases(suite, a.full, a.precision).with_context(|| {
                format!("unknown bench suite `{suite}` (model, train, data, kernels, store)")
            })?
        };
        for mut c in cases {
            if let hmsa_lab::bench::Case::TrainStep { profile, .. } = &mut c {
                *profile = a.profile;
            }
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
            if let Some(p) = &m.profile {
                profiles.push((m.params.clone(), p.clone()));
                continue;
            }
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
    if a.format == TextOrJson::Json && !profiles.is_empty() {
        let v: Vec<serde_json::Value> = profiles
            .iter()
            .map(|(c, p)| serde_json::json!({"case": c, "profile": p, "threads": threads, "machine": mach}))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
    } else if !profiles.is_empty() {
        for (case, p) in &profiles {
            outln!(
                "{case}: {:.1} ms per step (mean of {} profiled steps)",
                p.step_ms(),
                p.steps
            )?;
            let head = ["phase", "op", "calls", "ms/step", "share", "GFLOP/s"].map(String::from);
            let rows: Vec<Vec<String>> = p.rows().into_iter().map(Vec::from).collect();
            outln!("{}", report::terminal_table(&head, &rows))?;
        }
        outln!(
            "{threads} threads; {mach}; exclusive wall time of each of our ops; \"outside our ops\" is candle's own ops, its gradient store and glue; not stored"
        )?;
    } else if a.format == TextOrJson::Json {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|(s, m)| serde_json::json!({"suite": s, "case": m, "threads": threads, "machine": mach}))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        let head = ["suite", "case", "min ms", "median ms", "peak MiB", "rate"].map(String::from);
        outln!("{}", report::terminal_table(&head, &rows))?;
        outln!(
            "{threads} threads; {mach}; warm-up 1, min and median of the repetitions; one process per case"
        )?;
        let train: Vec<_> = all
            .iter()
            .filter(|(s, _)| s == "train")
            .map(|(_, m)| m.clone())
            .collect();
        for line in hmsa_lab::bench::training_ratios(&train) {
            outln!("{line}")?;
        }
    }
    if failed > 0 {
        bail!("{failed} benchmark case(s) failed (above); the others are recorded");
    }
    Ok(())
}

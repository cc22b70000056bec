//! `hmsa-lab export mlflow` against a real `mlflow server`: the quick
//! suite exported and read back through MLflow's REST API, then exported
//! again without creating anything.

use super::lab::{bin, ok, quick_in, sqlite};
use super::servers::Mlflow;
use serde_json::{json, Value};

fn api(uri: &str, path: &str, body: Option<Value>) -> Value {
    let url = format!("{uri}/api/2.0/mlflow/{path}");
    match body {
        Some(b) => ureq::post(&url).send_json(b),
        None => ureq::get(&url).call(),
    }
    .unwrap()
    .into_json()
    .unwrap()
}

#[test]
fn the_quick_suite_exports_to_mlflow_and_reads_back() {
    let ml = Mlflow::start();
    let d = tempfile::tempdir().unwrap();
    let suite = quick_in(d.path());
    ok(bin()
        .current_dir(d.path())
        .args(["run", suite.to_str().unwrap()])
        .output()
        .unwrap());
    let db = d.path().join("quick.db");
    let export = || {
        ok(bin()
            .args([
                "export",
                "mlflow",
                "--tracking-uri",
                &ml.uri,
                "--db",
                db.to_str().unwrap(),
            ])
            .output()
            .unwrap())
    };
    let first = export();
    assert!(first.contains("10 run(s) created, 0 updated"), "{first}");

    let exp = api(
        &ml.uri,
        "experiments/get-by-name?experiment_name=hmsa-quick",
        None,
    );
    let exp_id = exp["experiment"]["experiment_id"].as_str().unwrap().to_string();
    let runs = api(
        &ml.uri,
        "runs/search",
        Some(json!({"experiment_ids": [exp_id], "max_results": 100})),
    );
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 10);
    // run 1 (baseline seed 0) as the database holds it
    let key = runs
        .iter()
        .find(|r| {
            r["data"]["tags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["key"] == "hmsa.key" && t["value"].as_str().unwrap().ends_with("/1"))
        })
        .expect("run 1 exported");
    let run_id = key["info"]["run_id"].as_str().unwrap();
    let tag = |k: &str| {
        key["data"]["tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["key"] == k)
            .map(|t| t["value"].as_str().unwrap().to_string())
    };
    assert_eq!(tag("hmsa.variant").as_deref(), Some("baseline"));
    assert_eq!(tag("hmsa.seed").as_deref(), Some("0"));
    assert_eq!(tag("hmsa.status").as_deref(), Some("FINISHED"));
    assert_eq!(key["info"]["status"], "FINISHED");
    let n_params: usize = sqlite(&db, "SELECT COUNT(*) FROM params WHERE run_id = 1")
        .lines()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(key["data"]["params"].as_array().unwrap().len(), n_params);
    // the loss history, step by step
    let want = sqlite(
        &db,
        "SELECT step, value FROM metrics WHERE run_id = 1 AND key = 'loss' ORDER BY step",
    );
    let hist = api(
        &ml.uri,
        &format!("metrics/get-history?run_id={run_id}&metric_key=loss"),
        None,
    );
    let mut got: Vec<(i64, f64)> = hist["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["step"].as_i64().unwrap(), m["value"].as_f64().unwrap()))
        .collect();
    got.sort_by_key(|x| x.0);
    let want: Vec<(i64, f64)> = want
        .lines()
        .skip(1)
        .map(|l| {
            let (a, b) = l.split_once(',').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(got.len(), 12);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.0, w.0);
        assert!((g.1 - w.1).abs() < 1e-9 * w.1.abs().max(1.0), "{g:?} vs {w:?}");
    }
    // each evaluation's mIoU
    let miou: f64 = sqlite(
        &db,
        "SELECT miou FROM evaluations WHERE run_id = 1 AND scales = '1.0' AND fusion = 'single'",
    )
    .lines()
    .nth(1)
    .unwrap()
    .parse()
    .unwrap();
    let m = key["data"]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == "eval/single 1.0/miou")
        .expect("the evaluation's mIoU");
    assert!((m["value"].as_f64().unwrap() - miou).abs() < 1e-12);
    // the artifact
    let arts = api(&ml.uri, &format!("artifacts/list?run_id={run_id}"), None);
    assert!(
        arts["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == "evaluations.json"),
        "{arts}"
    );

    // again: nothing new
    let second = export();
    assert!(
        second.contains("0 run(s) created, 10 updated; 0 metric value(s), 0 param(s)"),
        "{second}"
    );
    let hist = api(
        &ml.uri,
        &format!("metrics/get-history?run_id={run_id}&metric_key=loss"),
        None,
    );
    assert_eq!(hist["metrics"].as_array().unwrap().len(), 12);
}

//! `hmsa-lab export mlflow`: every run of the results database into an
//! MLflow tracking server, through its REST API (`/api/2.0/mlflow/…`).
//!
//! Per run: the tags `hmsa.key` (this database's id and the run's id: how
//! a second export finds the run again), `hmsa.suite`, `hmsa.variant`,
//! `hmsa.seed`, `hmsa.config_hash`, `hmsa.status`, `mlflow.source.git.commit`;
//! the flattened config as params; the step metrics with their steps; each
//! evaluation's metrics at step 0 as `eval/<fusion> <scales>[ flip]/<metric>`;
//! and `evaluations.json` as an artifact where the server serves artifacts.
//! A second export creates nothing new: params and evaluation metrics the
//! MLflow run already has are skipped, and step metrics are sent only past
//! the last step it holds; a run that gained evaluations gains them there.

use crate::store::{RunFilter, RunRow, Store};
use crate::{Error, Result};
use serde_json::{json, Value};

/// What an export did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exported {
    pub created: usize,
    pub updated: usize,
    pub metrics: usize,
    pub params: usize,
    pub artifacts: usize,
}

struct Client {
    base: String,
    agent: ureq::Agent,
}

/// MLflow's allowed characters in metric and param names.
fn name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-. /:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Client {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}/api/2.0/mlflow/{path}", self.base);
        let req = self.agent.request(method, &url);
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => r.into_json::<Value>().map_err(|e| Error::Input {
                path: url.clone().into(),
                msg: format!("not JSON: {e}"),
            }),
            Err(ureq::Error::Status(code, r)) => Err(Error::Input {
                path: url.into(),
                msg: format!("MLflow answered {code}: {}", r.into_string().unwrap_or_default()),
            }),
            Err(e) => Err(Error::Input {
                path: url.into(),
                msg: format!("{e} (is the tracking server running at {}?)", self.base),
            }),
        }
    }

    fn experiment(&self, name: &str) -> Result<String> {
        let found = self.call(
            "GET",
            &format!("experiments/get-by-name?experiment_name={}", urlencode(name)),
            None,
        );
        if let Ok(v) = found {
            if let Some(id) = v["experiment"]["experiment_id"].as_str() {
                return Ok(id.to_string());
            }
        }
        let v = self.call("POST", "experiments/create", Some(json!({ "name": name })))?;
        Ok(v["experiment_id"].as_str().unwrap_or("").to_string())
    }

    fn log_batch(&self, run: &str, metrics: Vec<Value>, params: Vec<Value>, tags: Vec<Value>) -> Result<()> {
        // MLflow's limits per request: 1000 metrics, 100 params, 100 tags
        let mut m = metrics.chunks(1000).peekable();
        let mut p = params.chunks(100).peekable();
        let mut t = tags.chunks(100).peekable();
        while m.peek().is_some() || p.peek().is_some() || t.peek().is_some() {
            self.call(
                "POST",
                "runs/log-batch",
                Some(json!({
                    "run_id": run,
                    "metrics": m.next().unwrap_or(&[]),
                    "params": p.next().unwrap_or(&[]),
                    "tags": t.next().unwrap_or(&[]),
                })),
            )?;
        }
        Ok(())
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Exports the runs of `suite` (all suites when `None`) of `store` into the
/// MLflow experiment `experiment` (default: `hmsa-<suite>` per suite) at
/// `tracking_uri`.
pub fn export(
    store: &Store,
    tracking_uri: &str,
    suite: Option<&str>,
    experiment: Option<&str>,
) -> Result<Exported> {
    let client = Client {
        base: tracking_uri.trim_end_matches('/').to_string(),
        agent: ureq::AgentBuilder::new()
            .timeout(std::time::Duration::from_secs(60))
            .build(),
    };
    let db_id = store.id()?;
    let runs = store.runs(&RunFilter {
        suite: suite.map(String::from),
        ..Default::default()
    })?;
    let mut done = Exported::default();
    let mut experiments = std::collections::HashMap::new();
    for r in &runs {
        let exp_name = experiment
            .map(String::from)
            .unwrap_or_else(|| format!("hmsa-{}", r.suite));
        if !experiments.contains_key(&exp_name) {
            experiments.insert(exp_name.clone(), client.experiment(&exp_name)?);
        }
        let exp = &experiments[&exp_name];
        export_run(store, &client, exp, &db_id, r, &mut done)?;
    }
    Ok(done)
}

fn export_run(
    store: &Store,
    c: &Client,
    exp: &str,
    db_id: &str,
    r: &RunRow,
    done: &mut Exported,
) -> Result<()> {
    let key = format!("{db_id}/{}", r.id);
    let found = c.call(
        "POST",
        "runs/search",
        Some(json!({
            "experiment_ids": [exp],
            "filter": format!("tags.\"hmsa.key\" = '{key}'"),
            "max_results": 2,
        })),
    )?;
    let existing = found["runs"].as_array().and_then(|a| a.first()).cloned();
    let tags = vec![
        json!({"key": "hmsa.key", "value": key}),
        json!({"key": "hmsa.suite", "value": r.suite}),
        json!({"key": "hmsa.variant", "value": r.variant}),
        json!({"key": "hmsa.seed", "value": r.seed.to_string()}),
        json!({"key": "hmsa.config_hash", "value": r.config_hash}),
        json!({"key": "hmsa.status", "value": r.status.as_str()}),
        json!({"key": "mlflow.source.git.commit", "value": r.git_commit.clone().unwrap_or_default()}),
    ];
    let (run_id, have_params, have_metrics, artifact_uri) = match existing {
        Some(run) => {
            done.updated += 1;
            let id = run["info"]["run_id"].as_str().unwrap_or("").to_string();
            let params: std::collections::HashSet<String> = run["data"]["params"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p["key"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let metrics: std::collections::HashSet<String> = run["data"]["metrics"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p["key"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let uri = run["info"]["artifact_uri"].as_str().unwrap_or("").to_string();
            (id, params, metrics, uri)
        }
        None => {
            done.created += 1;
            let v = c.call(
                "POST",
                "runs/create",
                Some(json!({
                    "experiment_id": exp,
                    "run_name": format!("{} seed {}", r.variant, r.seed),
                    "start_time": r.start_ms.unwrap_or(0),
                    "tags": tags,
                })),
            )?;
            let id = v["run"]["info"]["run_id"].as_str().unwrap_or("").to_string();
            let uri = v["run"]["info"]["artifact_uri"]
                .as_str()
                .unwrap_or("")
                .to_string();
            (id, Default::default(), Default::default(), uri)
        }
    };
    // params: written once (MLflow refuses to change one)
    let params: Vec<Value> = store
        .params(r.id)?
        .into_iter()
        .map(|(k, v)| (name(&k), v))
        .filter(|(k, _)| !have_params.contains(k))
        .map(|(k, v)| json!({"key": k, "value": v.chars().take(6000).collect::<String>()}))
        .collect();
    done.params += params.len();
    // step metrics past the last step the MLflow run holds
    let mut metrics = vec![];
    let keys = store.metric_keys(r.id)?;
    for k in keys {
        let mk = name(&k);
        let last = if have_metrics.contains(&mk) {
            let h = c.call(
                "GET",
                &format!(
                    "metrics/get-history?run_id={run_id}&metric_key={}",
                    urlencode(&mk)
                ),
                None,
            )?;
            h["metrics"]
                .as_array()
                .and_then(|a| a.iter().filter_map(|m| m["step"].as_i64()).max())
        } else {
            None
        };
        for (step, v) in store.metric(r.id, &k)? {
            if last.is_some_and(|l| step <= l) || !v.is_finite() {
                continue;
            }
            metrics.push(json!({"key": mk, "value": v, "step": step, "timestamp": r.end_ms.or(r.start_ms).unwrap_or(0)}));
        }
    }
    // evaluations, at step 0
    let evals = store.evaluations(r.id)?;
    for e in &evals {
        let base = name(&format!(
            "eval/{} {}{}",
            e.fusion,
            e.scales,
            if e.flip { " flip" } else { "" }
        ));
        for (m, v) in [
            ("miou", e.miou),
            ("pixel_acc", e.pixel_acc),
            ("mean_class_acc", e.mean_class_acc),
            ("fw_iou", e.fw_iou),
            ("ms_per_image", e.ms_per_image),
        ] {
            let k = format!("{base}/{m}");
            if !have_metrics.contains(&k) {
                metrics.push(json!({"key": k, "value": v, "step": 0, "timestamp": r.end_ms.unwrap_or(0)}));
            }
        }
    }
    done.metrics += metrics.len();
    c.log_batch(&run_id, metrics, params, tags)?;
    // status
    let status = match r.status {
        crate::store::Status::Finished => "FINISHED",
        crate::store::Status::Failed => "FAILED",
        crate::store::Status::Killed => "KILLED",
        _ => "RUNNING",
    };
    let mut upd = json!({"run_id": run_id, "status": status});
    if let Some(end) = r.end_ms {
        upd["end_time"] = json!(end);
    }
    c.call("POST", "runs/update", Some(upd))?;
    // evaluations.json as an artifact, where the server serves artifacts
    if let Some(rest) = artifact_uri.strip_prefix("mlflow-artifacts:/") {
        let body = serde_json::to_vec_pretty(&evals).expect("serialisable");
        let url = format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{rest}/evaluations.json",
            c.base
        );
        c.agent
            .put(&url)
            .set("Content-Type", "application/json")
            .send_bytes(&body)
            .map_err(|e| Error::Input {
                path: url.clone().into(),
                msg: format!("uploading evaluations.json: {e}"),
            })?;
        done.artifacts += 1;
    }
    Ok(())
}

//! `hmsa-lab compare`: what differs between runs, and how their
//! evaluations move against the first run's.

use crate::model::{Fusion, Scales};
use crate::store::Store;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Runs side by side. Field order is the JSON's (keys sorted, as
/// `serde_json` writes maps).
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// Each evaluation of the first run, in its order, across the runs.
    pub evaluations: Vec<EvalAcross>,
    /// The parameters whose values are not all equal, by name.
    pub params: Vec<ParamDiff>,
    pub runs: Vec<i64>,
}

/// One parameter's value in each run (`None` where a run lacks it).
#[derive(Clone, Debug, Serialize)]
pub struct ParamDiff {
    pub key: String,
    pub values: Vec<Option<String>>,
}

/// One evaluation of the first run: each run's mIoU for the same
/// evaluation, and its difference from the first run's.
#[derive(Clone, Debug, Serialize)]
pub struct EvalAcross {
    pub delta: Vec<Option<f64>>,
    pub flip: bool,
    pub fusion: Fusion,
    pub miou: Vec<Option<f64>>,
    #[serde(serialize_with = "crate::model::scales::as_text")]
    pub scales: Scales,
}

/// Compares `runs` (at least one; the first is the reference).
pub fn compare(store: &Store, runs: &[i64]) -> Result<Comparison> {
    if runs.is_empty() {
        return Err(Error::invalid("runs", "nothing to compare"));
    }
    let mut params = vec![];
    let mut evals = vec![];
    for &id in runs {
        if store.run(id)?.is_none() {
            return Err(Error::invalid("runs", format!("no run {id}")));
        }
        params.push(store.params(id)?.into_iter().collect::<BTreeMap<_, _>>());
        evals.push(store.evaluations(id)?);
    }
    let keys: BTreeSet<&String> = params.iter().flat_map(|p| p.keys()).collect();
    let params = keys
        .into_iter()
        .map(|k| ParamDiff {
            key: k.clone(),
            values: params.iter().map(|p| p.get(k).cloned()).collect(),
        })
        .filter(|d| d.values.iter().any(|v| *v != d.values[0]))
        .collect();
    let evaluations = evals[0]
        .iter()
        .map(|e0| {
            let miou: Vec<Option<f64>> = evals
                .iter()
                .map(|es| es.iter().find(|e| e.key() == e0.key()).map(|e| e.miou))
                .collect();
            EvalAcross {
                delta: miou.iter().map(|m| m.map(|m| m - e0.miou)).collect(),
                flip: e0.flip,
                fusion: e0.fusion,
                miou,
                scales: e0.scales.clone(),
            }
        })
        .collect();
    Ok(Comparison {
        evaluations,
        params,
        runs: runs.to_vec(),
    })
}

//! `cargo bench --bench data`: is loading ever the bottleneck? Loader time
//! per batch (1 and 2 worker threads) against the time of a training
//! forward + backward of the small preset (hierarchical {0.5, 1.0}) on the
//! same batch, with the loader running alongside as in training.

use hmsa_lab::config::AugmentConfig;
use hmsa_lab::config::SamplerConfig;
use hmsa_lab::config::SynthConfig;
use hmsa_lab::data::loader::Loader;
use hmsa_lab::data::sampler::{epoch_plan, Centroids, Source};
use hmsa_lab::data::synth;
use hmsa_lab::data::{Dataset, Labels};
use hmsa_lab::model::init::seeded_varbuilder;
use hmsa_lab::model::{HmsaNet, ModelConfig};
use std::sync::Arc;
use std::time::Instant;

fn main() -> hmsa_lab::Result<()> {
    hmsa_lab::setup_cpu();
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = SynthConfig {
        train: 24,
        val: 0,
        train_extra: 0,
        ..Default::default()
    };
    synth::generate(&cfg, dir.path())?;
    let ds = Dataset::cityscapes(dir.path(), "train", Labels::Fine)?;
    let cents = Centroids::compute(&ds, 256)?;
    let batch = 4;
    let batches = 12;
    let scfg = SamplerConfig::default();
    let plan = Arc::new(epoch_plan(
        &Source {
            dataset: &ds,
            centroids: Some(&cents),
        },
        None,
        &scfg,
        batch,
        batches,
        0,
        0,
    )?);
    let sources = Arc::new(vec![ds]);
    println!(
        "# data: synthetic {}x{} images, batch {batch}, crop 256x512, {} threads",
        cfg.height,
        cfg.width,
        rayon::current_num_threads()
    );
    for workers in [1, 2] {
        let t = Instant::now();
        let n = Loader::spawn(
            sources.clone(),
            plan.clone(),
            0,
            AugmentConfig::default(),
            0,
            0,
            workers,
            4,
        )
        .map(|b| b.map(|_| ()))
        .collect::<hmsa_lab::Result<Vec<_>>>()?
        .len();
        let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        println!(
            "loader alone, {workers} worker(s): {ms:.1} ms per batch, {:.1} images/s",
            1e3 * batch as f64 / ms
        );
    }
    let vm = candle_nn::VarMap::new();
    let net = HmsaNet::new(
        &ModelConfig::small(),
        seeded_varbuilder(&vm, 0, &candle_core::Device::Cpu),
    )?;
    let mut step_ms = vec![];
    let mut wait_ms = vec![];
    let mut loader = Loader::spawn(
        sources.clone(),
        plan.clone(),
        0,
        AugmentConfig::default(),
        0,
        0,
        1,
        4,
    );
    loop {
        let t = Instant::now();
        let Some(b) = loader.next() else { break };
        let b = b?;
        wait_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let f = net.forward(&b.images, true)?;
        // a stand-in loss: the step's cost is the network's forward + backward
        let loss = f.pred.sqr()?.mean_all()?;
        loss.backward()?;
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // the first wait includes the loader's start-up
    let first_wait = wait_ms[0];
    let wait = med(&mut wait_ms[1..].to_vec());
    println!(
        "training (1 loader worker beside the step): step median {:.1} ms, wait for the next batch median {:.1} ms (first {:.1} ms)",
        med(&mut step_ms),
        wait,
        first_wait
    );
    Ok(())
}

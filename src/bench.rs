//! Benchmarks (never timed tests): forward latency and peak memory of the
//! network per preset, fusion and scale set. `benches/model.rs` prints them;
//! `hmsa-lab bench` will store them.
//!
//! Peak memory is the process's peak resident set (`VmHWM`), reset before
//! each case through `/proc/self/clear_refs` on Linux, so each row is the
//! peak of that case alone (weights included).

use crate::model::init::seeded_varbuilder;
use crate::model::{Fusion, HmsaNet, ModelConfig};
use crate::Result;
use candle_core::{Device, Tensor};
use std::time::Instant;

/// One measured case.
#[derive(Debug, Clone)]
pub struct ForwardRow {
    pub preset: String,
    pub fusion: Fusion,
    pub scales: Vec<f64>,
    pub flip: bool,
    pub size: (usize, usize),
    pub min_ms: f64,
    pub median_ms: f64,
    pub reps: usize,
    pub peak_mib: Option<f64>,
}

/// Resets the peak-RSS counter (Linux); false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size in MiB since the last reset (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Times `reps` inference forwards after one warm-up.
pub fn time_forward(
    preset: &str,
    fusion: Fusion,
    scales: &[f64],
    flip: bool,
    size: (usize, usize),
    reps: usize,
) -> Result<ForwardRow> {
    let mut cfg = ModelConfig::preset(preset)?;
    if fusion == Fusion::Explicit {
        cfg.fusion = Fusion::Explicit;
        cfg.scales = scales.to_vec();
    }
    let dev = Device::Cpu;
    let vm = candle_nn::VarMap::new();
    let net = HmsaNet::new(&cfg, seeded_varbuilder(&vm, 0, &dev))?;
    let x = Tensor::zeros((1, 3, size.0, size.1), candle_core::DType::F32, &dev)?;
    let reset = reset_peak_rss();
    net.infer(&x, fusion, scales, flip, false)?; // warm-up
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        net.infer(&x, fusion, scales, flip, false)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(ForwardRow {
        preset: preset.to_string(),
        fusion,
        scales: scales.to_vec(),
        flip,
        size,
        min_ms: times[0],
        median_ms: times[times.len() / 2],
        reps: times.len(),
        peak_mib: if reset { peak_rss_mib() } else { None },
    })
}

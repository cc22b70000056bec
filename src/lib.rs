//! hmsa-lab: *Hierarchical Multi-Scale Attention for Semantic Segmentation*
//! (Tao, Sapra, Catanzaro 2020, arXiv 2005.10821) in candle, and the harness
//! that reproduces its ablations.
//!
//! This crate is the library: `model` (the network), `config` (plain data),
//! `data`, `eval`, `train`, `store` (the only SQL), `lab` (suites and
//! workers), `report`, and the tools around them. The CPU kernels are the
//! `hmsa-kernels` crate; `src/bin/hmsa-lab/` is the command line, which
//! parses, calls these modules and prints. Imports point one way (config
//! below data, data below eval and train, the store and lab above them);
//! `docs/architecture.md` has the measured graph and a parameter's walk.

pub mod atomic;
pub mod autolabel;
pub mod bench;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod gc;
pub mod lab;
pub mod meter;
pub mod mlflow;
pub mod model;
pub mod report;
pub mod slurm;
pub mod store;
pub mod train;

pub use error::{Error, Result};

/// Process settings for CPU speed; the binary and the benches call it first
/// thing in `main`, before any thread starts:
///
/// - `RAYON_NUM_THREADS` set once (candle 0.11 otherwise re-reads
///   `/proc/cpuinfo` before every matmul);
/// - glibc's mmap and trim thresholds raised and one malloc arena, so that
///   freed activations are reused instead of returned to the system and
///   faulted in again (peak memory unchanged; memory is not handed back
///   before exit);
/// - `CANDLE_BARRIER_POOL_SPIN_LIMIT=0`, so candle's own pool sleeps
///   instead of spinning against our rayon workers.
///
/// The measurements behind each are in `docs/performance.md`.
pub fn setup_cpu() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any
    // other thread of ours exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Runs `f` on a worker of rayon's global pool (inline when already on
/// one) and waits for it.
///
/// Our CPU ops split their passes with rayon: called from a worker, the
/// pieces go on that worker's own deque instead of being injected into the
/// pool with the caller asleep on a latch, for every op however small.
/// Work on another device runs on the calling thread (driven from a pool
/// worker, candle's CUDA backend raced). Measurements: `docs/performance.md`.
pub fn on_pool<R: Send>(dev: &candle_core::Device, f: impl FnOnce() -> R + Send) -> R {
    if !dev.is_cpu() {
        return f();
    }
    rayon::scope(|_| f())
}

/// The device the binary computes on: with the `cuda` feature, GPU 0
/// unless `HMSA_DEVICE=cpu`; without it, the CPU.
pub fn device() -> Result<candle_core::Device> {
    #[cfg(feature = "cuda")]
    if std::env::var("HMSA_DEVICE").as_deref() != Ok("cpu") {
        return Ok(candle_core::Device::new_cuda(0)?);
    }
    Ok(candle_core::Device::Cpu)
}

/// The accelerator behind `dev` in words (`None` for the CPU).
pub fn device_name(dev: &candle_core::Device) -> Option<String> {
    match dev {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => Some(
            d.cuda_stream()
                .context()
                .name()
                .unwrap_or_else(|_| "CUDA device".into()),
        ),
        _ => None,
    }
}

/// Waits for the work queued on `dev` (a no-op on the CPU): timings of GPU
/// work end here.
pub fn sync(dev: &candle_core::Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

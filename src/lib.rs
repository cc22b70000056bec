//! hmsa-lab: *Hierarchical Multi-Scale Attention for Semantic Segmentation*
//! (Tao, Sapra, Catanzaro 2020, arXiv 2005.10821) in candle, and the harness
//! that reproduces its ablations.
//!
//! Data flows one way: config → data → model → train → eval → store → report.
//! This crate is the library; `src/main.rs` is the `hmsa-lab` command line.

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

/// Fixes candle's CPU thread count for the life of the process; call it
/// first thing in `main`, before any thread starts.
///
/// Process settings for CPU speed, called first by the binary and the
/// benches:
///
/// - candle 0.11 asks for its thread count before every matmul and, when
///   `RAYON_NUM_THREADS` is unset, recounts the physical cores by reading and
///   parsing `/proc/cpuinfo` each time (a visible share of a training step in
///   `perf`). Setting the variable once to the same count removes that cost
///   and changes nothing else.
/// - glibc's malloc serves large blocks (every activation) with `mmap` and
///   returns them to the system on free, so each new tensor costs page
///   faults and zeroing by the kernel (a tenth of a training step in
///   `perf`). Raising the mmap and trim thresholds keeps freed blocks in the
///   heap for the next tensor. Peak memory is unchanged (the peak is live
///   tensors); memory is not handed back to the system before exit. One
///   arena for all threads: with per-thread arenas, tensors made on one
///   pool worker and freed on another fragment the heaps (a hierarchical
///   step's peak went 317 -> 550 MiB under [`on_pool`]).
/// - candle's own CPU thread pool (for its element-wise ops) spins 25 000
///   times before sleeping between jobs: with our passes on rayon's
///   workers, that spinning thread takes CPU from them (15% of a training
///   step's samples in `perf`). `CANDLE_BARRIER_POOL_SPIN_LIMIT=0` makes
///   it sleep at once: training steps 8–12% faster, the small forward 12%.
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
/// Our CPU ops split their passes with rayon. Called from the main thread,
/// every such pass is injected into the pool and the caller sleeps on a
/// latch until a worker has run it, for every op of the network, however
/// small; called from a worker, the pass's pieces go on that worker's own
/// deque and the other worker steals what is worth stealing. A training
/// step of the small preset runs 11–17% faster this way (more for
/// multi-scale, whose low scale has the smallest maps).
///
/// Work on another device runs on the calling thread: driven from a pool
/// worker, candle's CUDA backend raced (f32 multi-scale inference on an
/// H200 failed with CUDA_ERROR_ILLEGAL_ADDRESS in 4 of 4 runs, and passed
/// 4 of 4 on the calling thread and 3 of 3 with CUDA_LAUNCH_BLOCKING=1).
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

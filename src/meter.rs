//! The meters evaluation and the benchmarks share: elapsed time with the
//! device's queue drained at both ends ([`Stopwatch`]), and peak memory
//! ([`MemoryMeter`]: host RSS on the CPU, the device's memory pool on a
//! GPU).

use crate::Result;
use candle_core::Device;
use std::time::Instant;

/// Wall time of work on a device: the queue is drained when the watch
/// starts and when it is read, so queued GPU work is counted where it
/// runs (a no-op on the CPU).
pub struct Stopwatch<'a> {
    dev: &'a Device,
    t: Instant,
}

impl<'a> Stopwatch<'a> {
    pub fn start(dev: &'a Device) -> Result<Self> {
        crate::sync(dev)?;
        Ok(Self {
            dev,
            t: Instant::now(),
        })
    }

    /// Milliseconds since `start`.
    pub fn ms(&self) -> Result<f64> {
        crate::sync(self.dev)?;
        Ok(self.t.elapsed().as_secs_f64() * 1e3)
    }
}

/// Peak memory from `start`: host peak RSS on the CPU; on a GPU, the
/// high-water mark of the device's default memory pool, where candle's
/// stream-ordered allocations live (reset at the start).
pub enum MemoryMeter {
    Host(bool),
    #[cfg(feature = "cuda")]
    Gpu(candle_core::CudaDevice),
}

impl MemoryMeter {
    pub fn start(dev: &Device) -> Self {
        match dev {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                gpu_pool::reset_peak(d);
                MemoryMeter::Gpu(d.clone())
            }
            _ => MemoryMeter::Host(reset_peak_rss()),
        }
    }

    /// The peak in MiB since `start`, where measured.
    pub fn peak_mib(self) -> Option<f64> {
        match self {
            MemoryMeter::Host(reset) => reset.then(peak_rss_mib).flatten(),
            #[cfg(feature = "cuda")]
            MemoryMeter::Gpu(d) => gpu_pool::peak(&d).map(|b| b as f64 / (1024.0 * 1024.0)),
        }
    }
}

/// The used-memory high-water mark of a GPU's default memory pool.
#[cfg(feature = "cuda")]
mod gpu_pool {
    use candle_core::cuda::cudarc::driver::sys;
    use candle_core::CudaDevice;

    fn pool(d: &CudaDevice) -> Option<sys::CUmemoryPool> {
        let stream = d.cuda_stream();
        let ctx = stream.context();
        if !ctx.has_async_alloc() || ctx.bind_to_thread().is_err() {
            return None;
        }
        let mut p = std::ptr::null_mut();
        // SAFETY: a plain query into a local; the context is bound.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut p, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(p)
    }

    pub fn reset_peak(d: &CudaDevice) {
        if let Some(p) = pool(d) {
            let mut zero = 0u64;
            // SAFETY: USED_MEM_HIGH takes a u64 and may only be set to 0.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    p,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast(),
                );
            }
        }
    }

    pub fn peak(d: &CudaDevice) -> Option<u64> {
        d.cuda_stream().synchronize().ok()?;
        let p = pool(d)?;
        let mut v = 0u64;
        // SAFETY: USED_MEM_HIGH is read into a u64.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(
                p,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut v as *mut u64).cast(),
            )
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }
}

/// Resets the peak-RSS counter (Linux); false where unsupported.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident set size in MiB since the last reset (Linux).
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

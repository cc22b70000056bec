//! The threaded loader: worker threads read, augment and stack the batches of
//! an epoch plan and hand them over through a bounded queue, in plan order.
//!
//! Batch `i` is augmented with a generator seeded from (seed, epoch, i), so
//! its content does not depend on which worker made it or when: a resumed
//! run sees the same batches as an uninterrupted one.

use super::augment::{augment, to_tensors};
use super::sampler::Item;
use super::Dataset;
use crate::config::AugmentConfig;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One training batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Position in the epoch plan.
    pub index: usize,
    /// (B, 3, H, W) f32, normalised.
    pub images: Tensor,
    /// (B, H, W) u32 train ids, 255 = ignore.
    pub labels: Tensor,
}

/// Seed of batch `i` of an epoch.
pub fn batch_seed(seed: u64, epoch: u64, i: usize) -> u64 {
    let mut z = seed
        .wrapping_add(epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add((i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z ^= z >> 31;
    z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 29)
}

/// Builds batch `i` of a plan on the calling thread.
pub fn make_batch(
    sources: &[Dataset],
    items: &[Item],
    aug: &AugmentConfig,
    seed: u64,
    epoch: u64,
    i: usize,
    device: &Device,
) -> Result<Batch> {
    let mut rng = StdRng::seed_from_u64(batch_seed(seed, epoch, i));
    let mut crops = Vec::with_capacity(items.len());
    for it in items {
        let ds = &sources[it.source];
        let (img, label) = ds.load(it.index)?;
        let label = label.ok_or_else(|| Error::Input {
            path: ds.samples[it.index].image.clone(),
            msg: "a training image needs a label".into(),
        })?;
        crops.push(augment(&img, &label, aug, it.centre, &mut rng));
    }
    let (images, labels) = to_tensors(&crops, device)?;
    Ok(Batch {
        index: i,
        images,
        labels,
    })
}

/// Iterates over the batches of a plan, made by `workers` threads with at
/// most `prefetch` finished batches waiting.
pub struct Loader {
    rx: Option<Receiver<(usize, Result<Batch>)>>,
    pending: BTreeMap<usize, Result<Batch>>,
    next: usize,
    total: usize,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Loader {
    /// Starts the workers over `plan[start..]` (a resumed epoch starts late).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        sources: Arc<Vec<Dataset>>,
        plan: Arc<Vec<Vec<Item>>>,
        start: usize,
        aug: AugmentConfig,
        seed: u64,
        epoch: u64,
        workers: usize,
        prefetch: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(prefetch.max(1));
        let cursor = Arc::new(AtomicUsize::new(start));
        let stop = Arc::new(AtomicBool::new(false));
        let total = plan.len();
        let handles = (0..workers.max(1))
            .map(|_| {
                let (tx, cursor, stop) = (tx.clone(), cursor.clone(), stop.clone());
                let (sources, plan, aug) = (sources.clone(), plan.clone(), aug.clone());
                std::thread::spawn(move || loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let i = cursor.fetch_add(1, Ordering::Relaxed);
                    if i >= plan.len() {
                        break;
                    }
                    let b = make_batch(&sources, &plan[i], &aug, seed, epoch, i, &Device::Cpu);
                    if tx.send((i, b)).is_err() {
                        break;
                    }
                })
            })
            .collect();
        Self {
            rx: Some(rx),
            pending: BTreeMap::new(),
            next: start,
            total,
            stop,
            handles,
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.total {
            return None;
        }
        loop {
            if let Some(b) = self.pending.remove(&self.next) {
                self.next += 1;
                return Some(b);
            }
            match self.rx.as_ref()?.recv() {
                Ok((i, b)) => {
                    self.pending.insert(i, b);
                }
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks workers waiting to send.
        self.rx.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

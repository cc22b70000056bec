//! Where a training step's time goes, by op: the wall time each of our
//! ops spends, off unless [`enable`]d (one relaxed atomic load per op when
//! off).
//!
//! Every op's CPU forward and backward opens a [`span`] named after the op
//! (`conv2d-weight-grad`, `batch-norm-train backward`, …). Times are
//! *exclusive*: a span opened inside another on the same thread (the
//! convolution's backward calls its input- and weight-gradient ops) is
//! subtracted from the outer one, so the kinds add up to the time spent in
//! our ops, and what a step spends elsewhere (candle's own ops, its
//! gradient store, glue) is the step's time minus their sum. Spans on
//! different threads at once (two scales' backwards run concurrently) each
//! count their own wall time; whoever reads a profile of concurrent work
//! runs it one after the other instead (`train::step` does when enabled).
//!
//! `hmsa-lab bench train --profile` prints it per phase of a step.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<&'static str, Entry>> = Mutex::new(BTreeMap::new());

thread_local! {
    /// Per open span on this thread, the time its nested spans took.
    static NESTED: RefCell<Vec<Duration>> = const { RefCell::new(Vec::new()) };
}

/// Calls, exclusive wall time and (where the op states them) the
/// arithmetic of one kind of op: multiply-adds count two FLOPs, as the
/// direct convolution would do them (an equivalent count for Winograd).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Entry {
    pub calls: u64,
    pub time: Duration,
    pub flops: u64,
}

/// Starts or stops recording (the table is kept; see [`take`]).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether spans are being recorded.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// What was recorded since the last call, by kind; the table is emptied.
pub fn take() -> BTreeMap<&'static str, Entry> {
    std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()))
}

/// An open span; records on drop. `None` while recording is off.
pub struct Span {
    kind: &'static str,
    start: Instant,
    flops: u64,
}

/// Opens a span of `kind` until the value is dropped.
pub fn span(kind: &'static str) -> Option<Span> {
    flops_span(kind, 0)
}

/// [`span`] of an op that does `flops` floating-point operations.
pub fn flops_span(kind: &'static str, flops: u64) -> Option<Span> {
    if !enabled() {
        return None;
    }
    NESTED.with(|n| n.borrow_mut().push(Duration::ZERO));
    Some(Span {
        kind,
        start: Instant::now(),
        flops,
    })
}

impl Drop for Span {
    fn drop(&mut self) {
        let total = self.start.elapsed();
        let nested = NESTED.with(|n| {
            let mut n = n.borrow_mut();
            let inner = n.pop().unwrap_or_default();
            if let Some(outer) = n.last_mut() {
                *outer += total;
            }
            inner
        });
        let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        let e = t.entry(self.kind).or_default();
        e.calls += 1;
        e.time += total.saturating_sub(nested);
        e.flops += self.flops;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nested spans are subtracted from their parent: the parent's entry
    /// is its own sleep, the child's its own (a 10 ms sleep around a 100 ms
    /// one: inclusive, the parent would count more than the child).
    #[test]
    fn nested_time_is_exclusive() {
        enable(true);
        {
            let _outer = flops_span("test-outer", 7);
            std::thread::sleep(Duration::from_millis(10));
            {
                let _inner = span("test-inner");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        enable(false);
        let t = take();
        let (o, i) = (t["test-outer"], t["test-inner"]);
        assert_eq!((o.calls, i.calls), (1, 1));
        assert_eq!((o.flops, i.flops), (7, 0));
        assert!(i.time >= Duration::from_millis(100), "{i:?}");
        assert!(
            o.time >= Duration::from_millis(10) && o.time < i.time,
            "{o:?} {i:?}"
        );
        assert!(span("off").is_none());
    }
}

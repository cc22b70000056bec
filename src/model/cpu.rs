//! What our CPU custom ops (`conv`, `batchnorm`, `blend`, `resize`, the
//! cross-entropy in `train::loss`) share for reading candle's storage:
//! contiguous slices of a layout, read-locked tensors, a pointer parallel
//! blocks write disjoint elements through, and `exp`/`ln` in the data's
//! precision.

use candle_core::{CpuStorage, Layout, Result, Storage, StorageRef, Tensor, WithDType};

/// The elements a contiguous layout addresses in `s`.
pub fn contiguous<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("custom op: non-contiguous operand {:?}", l.shape()),
    }
}

/// The same from CPU storage holding `T`.
pub fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    contiguous(T::cpu_storage_as_slice(s)?, l)
}

/// A CPU tensor's storage, read-locked, with its layout (read it with
/// [`elems`]).
pub fn read(t: &Tensor) -> Result<(StorageRef<'_>, &Layout)> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, Storage::Cpu(_)) {
        candle_core::bail!("custom op: CPU tensors only");
    }
    Ok((s, l))
}

/// The elements of storage read by [`read`].
pub fn elems<'a, T: WithDType>(s: &'a Storage, l: &Layout) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(c) => slice(c, l),
        _ => candle_core::bail!("custom op: CPU tensors only"),
    }
}

/// (N, C, H·W) of an NCHW layout.
pub fn nc_hw(l: &Layout) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = l.shape().dims4()?;
    Ok((n, c, h * w))
}

/// `simd!(name, body, (args))` defines `name(args)`, which runs the
/// `#[inline(always)]` function `body(args)` compiled for AVX2 and FMA
/// where the CPU has them, else as is. The crate is built for baseline
/// x86-64, so the plain loops the compiler vectorises are SSE2 (4-wide)
/// outside such a wrapper. (A generic `avx2(|| body)` helper does not
/// work: the compiler does not inline a large closure into the wrapper, so
/// the body stays SSE2.)
macro_rules! simd {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        fn $name<T: candle_core::WithDType>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<T: candle_core::WithDType>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use simd;

/// f32 and f64 with `exp` and `ln` in their own precision, for generic
/// kernels that would otherwise round-trip through f64 per element.
pub trait Real: WithDType {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
}

/// A raw pointer that parallel blocks share, each writing its own elements.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
// SAFETY: only used to write disjoint elements from different threads.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    pub fn get(self) -> *mut T {
        self.0
    }
}

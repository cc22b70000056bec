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
/// where the CPU has them, else as is. The crate is built for x86-64-v2
/// (`.cargo/config.toml`), so the plain loops the compiler vectorises are
/// SSE (4-wide) outside such a wrapper. `simd!(name, body, [const N: usize], (args),
/// Bound)` adds generics after `T` and bounds `T` by another trait than
/// `WithDType`. (A generic `avx2(|| body)` helper does not
/// work: the compiler does not inline a large closure into the wrapper, so
/// the body stays 4-wide.)
macro_rules! simd {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        $crate::cpu::simd!($name, $body, [], ($($arg: $ty),*), candle_core::WithDType);
    };
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*), $bound:path) => {
        $crate::cpu::simd!($name, $body, [], ($($arg: $ty),*), $bound);
    };
    ($name:ident, $body:ident, [$($gen:tt)*], ($($arg:ident: $ty:ty),*), $bound:path) => {
        fn $name<T: $bound, $($gen)*>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<T: $bound, $($gen)*>($($arg: $ty),*) {
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

/// `with_real!(op, storage, T => body)` evaluates `body` with the type `T`
/// bound to the element type of a CPU storage, f32 or f64, and fails
/// naming `op` for any other dtype: the f32/f64 dispatch of every op here
/// in one place (candle-core's `Map1`/`Map2` traits do the same for its
/// own ops). Results go back into storage with `T::to_cpu_storage_owned`.
macro_rules! with_real {
    ($op:expr, $s:expr, $T:ident => $body:expr) => {
        match $s {
            candle_core::CpuStorage::F32(_) => {
                type $T = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $T = f64;
                $body
            }
            _ => candle_core::bail!("{}: f32 or f64 only", $op),
        }
    };
}
pub(crate) use with_real;

/// f32 and f64 with `exp` and `ln` in their own precision, for generic
/// kernels that would otherwise round-trip through f64 per element. The
/// f32 `exp` is [`exp_f32`], which vectorises.
pub trait Real: WithDType {
    fn exp(self) -> Self;
    fn ln(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
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

/// `e^x` in f32 without a libm call, so that loops over it vectorise (libm's
/// `expf` is a scalar call per element): `x = n·ln 2 + r`, |r| ≤ ln 2 / 2,
/// `e^r` by Cephes' degree-7 minimax polynomial, `2^n` built in the
/// exponent bits. Within 2 ulp of the exact value on the normal range;
/// 0 below −87.3 (where `e^x` leaves the normal range), ∞ above 88.7,
/// NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const HI: f32 = 88.722_83;
    const LO: f32 = -87.336_55;
    // never NaN (`max` ignores a NaN; `clamp` would keep it), so `n` below
    // is a whole number in [−126, 128]
    #[allow(clippy::manual_clamp)]
    let xc = x.max(LO).min(HI);
    let n = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    // ln 2 in two parts, so that `n·ln2_hi` is exact
    let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n for n in [−126, 128): the biased exponent in the float's bits;
    // n = 128 (x near the top) as 2·2^127
    // SAFETY: `n` is finite and within i32 (above); the unchecked cast,
    // unlike `as` (saturating, NaN to 0), vectorises.
    let k: i32 = unsafe { n.to_int_unchecked() };
    let big = k > 127;
    let two_n = f32::from_bits(((k - big as i32 + 127) as u32) << 23);
    let y = e * two_n * if big { 2.0 } else { 1.0 };
    if x.is_nan() {
        x
    } else if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64's `exp` (correctly rounded to well below f32's ulp):
    /// relative error within 2^-23 (one ulp at the top of a binade, two at
    /// its bottom) over the whole normal range, in steps finer than the
    /// polynomial's reduction interval.
    #[test]
    fn exp_f32_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        let mut x = -87.33f32;
        while x < 88.72 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.000_37;
        }
        assert!(worst < f32::EPSILON as f64, "worst relative error {worst:e}");
    }

    #[test]
    fn exp_f32_edges() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        // the top of the range stays finite, as f32::exp
        assert!(exp_f32(88.72).is_finite() && exp_f32(88.72) > 3.3e38);
        // the bottom: the smallest normal, 2^-126 = e^-87.3365
        let tiny = exp_f32(-87.33);
        assert!((tiny as f64 / (-87.33f32 as f64).exp() - 1.0).abs() < 1e-6);
    }
}

//! 2-D convolution: im2col + gemm on the CPU, with our own backward.
//!
//! Why not candle 0.11's CPU `conv2d`: its forward builds im2col tiles
//! element by element (`perf` of a training step: about 22% of the samples in
//! that loop against 4% in the gemm), its input gradient goes through a naive
//! `conv_transpose2d`, and its backward is wrong for stride 2 when height and
//! width differ in parity (the output padding is taken from the height for
//! both axes), which a 0.5x training scale meets at HRNet's low branches.
//!
//! Here, per batch item, with `K = Cin·k·k` and `L = Ho·Wo`:
//! - forward: `col = im2col(x)` as a (K, L) matrix, built row by row (each
//!   row is a shifted, strided copy of one input plane, rayon over input
//!   channels), then `y = W·col` with `W` as (Cout, K): the product lands in
//!   NCHW order directly. 1x1 stride-1 layers use `x` itself as `col`;
//! - weight gradient: `gW = Σ_b gY_b·col_bᵀ` (gemms accumulated);
//! - input gradient: `gX_b = col2im(Wᵀ·gY_b)`, the scatter-add of im2col.
//!
//! `col` is built for a tile of output rows at a time (about 2 MB), so that
//! it stays in cache between being written and being read by the gemm.
//!
//! The gemms are the `gemm` crate's (the one candle's matmul uses), with
//! transposes expressed as strides. Stride-1 3x3 layers with enough
//! channels and output tiles take Winograd F(4x4, 3x3) instead, for the
//! forward and both gradients (`conv/winograd.rs`). Other devices use candle's
//! `conv2d`.

use crate::cpu;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

mod winograd;

/// `y + b` with `b` (C) added to every (N, C, H, W) plane. On the CPU its
/// backward sums `gy` per channel in one parallel pass; candle's broadcast
/// add reduces with a division per element on one thread (`perf`: the
/// largest single cost in a training step's backward after the gemms).
pub fn add_channel_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    if y.device().is_cpu() && matches!(y.dtype(), DType::F32 | DType::F64) && y.rank() == 4 {
        y.contiguous()?.apply_op2(&b.contiguous()?, ChannelBias)
    } else {
        add_channel_bias_slow(y, b)
    }
}

/// [`add_channel_bias`] as candle's broadcast add (other devices).
pub fn add_channel_bias_slow(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    y.broadcast_add(&b.reshape((1, (), 1, 1))?)
}

struct ChannelBias;

impl ChannelBias {
    fn fwd<T: WithDType>(y: &[T], b: &[T], c: usize, hw: usize) -> Vec<T> {
        let mut out = y.to_vec();
        out.par_chunks_mut(hw).enumerate().for_each(|(p, plane)| {
            let v = b[p % c];
            plane.iter_mut().for_each(|x| *x += v);
        });
        out
    }

    /// Σ over batch and positions of each channel's planes.
    fn sum<T: WithDType>(g: &[T], c: usize, hw: usize) -> Vec<T> {
        let n = g.len() / (c * hw).max(1);
        (0..c)
            .into_par_iter()
            .map(|ch| {
                let s: f64 = (0..n)
                    .map(|b| {
                        g[(b * c + ch) * hw..][..hw]
                            .iter()
                            .map(|v| v.to_f64())
                            .sum::<f64>()
                    })
                    .sum();
                T::from_f64(s)
            })
            .collect()
    }
}

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "channel-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span("channel-bias");
        let (_, c, h, w) = l1.shape().dims4()?;
        if l2.shape().elem_count() != c {
            candle_core::bail!("bias {:?} for {c} channels", l2.shape());
        }
        let shape = l1.shape().clone();
        cpu::with_real!("channel bias", s1, T => {
            let (a, b) = (cpu::slice::<T>(s1, l1)?, cpu::slice::<T>(s2, l2)?);
            Ok((T::to_cpu_storage_owned(Self::fwd(a, b, c, h * w)), shape))
        })
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _span = crate::profile::span("channel-bias backward");
        let (_, c, h, w) = g.dims4()?;
        let gc = g.contiguous()?;
        let (st, l) = gc.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*st else {
            candle_core::bail!("channel bias: CPU gradient only");
        };
        let gb = cpu::with_real!("channel bias", s, T => Tensor::new(Self::sum::<T>(cpu::slice(s, l)?, c, h * w), g.device())?);
        drop(st);
        Ok((Some(g.clone()), Some(gb.reshape(b.shape())?)))
    }
}

/// `conv2d(x, w, padding, stride)` (square kernel, no dilation, no groups).
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, Conv2d { padding, stride })
    } else {
        conv2d_slow(x, w, padding, stride)
    }
}

/// [`conv2d`] as candle's `conv2d` (other devices). On candle 0.11's CPU
/// its backward is wrong for stride 2 when height and width differ in
/// parity (see the module docs).
pub fn conv2d_slow(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    x.conv2d(w, padding, stride, 1, 1)
}

/// Inference: `act(conv2d(x, w) + b [+ residual])`, the bias, residual and
/// ReLU applied to each tile of the output while it is in cache (one pass
/// and no temporaries instead of three candle ops). No gradient flows.
pub fn conv2d_act(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    padding: usize,
    stride: usize,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        let op = Conv2dAct {
            padding,
            stride,
            residual: residual.map(|r| r.contiguous()).transpose()?,
            relu,
        };
        x.contiguous()?
            .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op)
    } else {
        conv2d_act_slow(x, w, b, padding, stride, residual, relu)
    }
}

/// [`conv2d_act`] as separate ops (other devices).
pub fn conv2d_act_slow(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    padding: usize,
    stride: usize,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let y = add_channel_bias_slow(&conv2d_slow(x, w, padding, stride)?, b)?;
    let y = match residual {
        Some(r) => (y + r)?,
        None => y,
    };
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// Below this many elements a pass runs on the calling thread: handing a
/// tiny layer to the rayon pool (inject, wake, wait) costs more than it
/// saves.
const PAR_MIN: usize = 1 << 15;

/// Sizes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &Shape, w: &Shape, s: usize, p: usize) -> Result<Self> {
        let (n, cin, h, wd) = x.dims4()?;
        let (cout, wcin, k, k2) = w.dims4()?;
        if wcin != cin || k != k2 {
            candle_core::bail!("conv2d: input {x:?} does not fit weight {w:?}");
        }
        if h + 2 * p < k || wd + 2 * p < k {
            candle_core::bail!("conv2d: input {x:?} smaller than kernel {k} with padding {p}");
        }
        Ok(Self {
            n,
            cin,
            h,
            w: wd,
            cout,
            k,
            s,
            p,
            ho: (h + 2 * p - k) / s + 1,
            wo: (wd + 2 * p - k) / s + 1,
        })
    }

    /// Rows of `col` (Cin·k·k) and columns (Ho·Wo).
    fn kl(&self) -> (usize, usize) {
        (self.cin * self.k * self.k, self.ho * self.wo)
    }

    /// The direct convolution's FLOPs (two per multiply-add); its input
    /// and weight gradients do as many.
    fn flops(&self) -> u64 {
        2 * (self.n * self.cout * self.cin * self.k * self.k * self.ho * self.wo) as u64
    }

    /// 1x1, stride 1, no padding: `col` is the input itself.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.s == 1 && self.p == 0
    }

    /// The output columns `ox` whose input column `ox·s + kx − p` is inside
    /// the image, as a range.
    fn valid(&self, kx: usize, size: usize, out: usize) -> std::ops::Range<usize> {
        let lo = self.p.saturating_sub(kx).div_ceil(self.s);
        let hi = (size + self.p).saturating_sub(kx).div_ceil(self.s).min(out);
        lo.min(hi)..hi
    }
}

/// `col[(c·k + ky)·k + kx][(oy − r0)·Wo + ox] = x[c][oy·s + ky − p][ox·s + kx − p]`
/// (zero outside) for one batch item and the output rows `r0..r1`.
fn im2col<T: WithDType>(g: &Geom, x: &[T], rows: std::ops::Range<usize>, col: &mut [T]) {
    let (k, l) = (g.k, rows.len() * g.wo);
    let col = &mut col[..g.cin * k * k * l];
    let fill = |(block, plane): (&mut [T], &[T])| im2col_plane_simd(g, plane, rows.clone(), block);
    if col.len() >= PAR_MIN {
        col.par_chunks_mut(k * k * l)
            .zip(x.par_chunks(g.h * g.w))
            .for_each(fill);
    } else {
        col.chunks_mut(k * k * l).zip(x.chunks(g.h * g.w)).for_each(fill);
    }
}

/// [`im2col`] of one input channel: its `k·k` rows of `block`.
#[inline(always)]
fn im2col_plane<T: WithDType>(g: &Geom, plane: &[T], rows: std::ops::Range<usize>, block: &mut [T]) {
    let (k, l) = (g.k, rows.len() * g.wo);
    let zero = T::zero();
    for ky in 0..k {
        let valid_rows = g.valid(ky, g.h, g.ho);
        for kx in 0..k {
            let cols = g.valid(kx, g.w, g.wo);
            let row = &mut block[(ky * k + kx) * l..(ky * k + kx + 1) * l];
            for oy in rows.clone() {
                let dst = &mut row[(oy - rows.start) * g.wo..(oy - rows.start + 1) * g.wo];
                if !valid_rows.contains(&oy) || cols.is_empty() {
                    dst.fill(zero);
                    continue;
                }
                let src = &plane[(oy * g.s + ky - g.p) * g.w..];
                dst[..cols.start].fill(zero);
                dst[cols.end..].fill(zero);
                let x0 = cols.start * g.s + kx - g.p;
                let dst = &mut dst[cols.clone()];
                match g.s {
                    1 => dst.copy_from_slice(&src[x0..x0 + cols.len()]),
                    // the stem's and the transitions' stride: pairs with a
                    // constant stride, which the compiler vectorises as an
                    // interleaved load; the last on its own, as its pair
                    // may pass the end of the plane
                    2 => {
                        let n = dst.len();
                        let src = &src[x0..x0 + 2 * n - 1];
                        let (body, last) = dst.split_at_mut(n - 1);
                        for (d, pair) in body.iter_mut().zip(src.chunks_exact(2)) {
                            *d = pair[0];
                        }
                        last[0] = src[2 * (n - 1)];
                    }
                    s => {
                        // iterators, not indices: no bounds check per element
                        let src = src[x0..].iter().step_by(s);
                        dst.iter_mut().zip(src).for_each(|(d, v)| *d = *v);
                    }
                }
            }
        }
    }
}
cpu::simd!(im2col_plane_simd, im2col_plane, (g: &Geom, plane: &[T], rows: std::ops::Range<usize>, block: &mut [T]));

/// The adjoint of [`im2col`] for the output rows `r0..r1`: adds every `col`
/// entry onto the input position it was read from (the caller zeroes `x`
/// once; neighbouring row tiles add onto shared input rows).
fn col2im<T: WithDType>(g: &Geom, col: &[T], rows: std::ops::Range<usize>, x: &mut [T]) {
    let (k, l) = (g.k, rows.len() * g.wo);
    let scatter = |(plane, block): (&mut [T], &[T])| col2im_plane_simd(g, block, rows.clone(), plane);
    let col = &col[..g.cin * k * k * l];
    if col.len() >= PAR_MIN {
        x.par_chunks_mut(g.h * g.w)
            .zip(col.par_chunks(k * k * l))
            .for_each(scatter);
    } else {
        x.chunks_mut(g.h * g.w)
            .zip(col.chunks(k * k * l))
            .for_each(scatter);
    }
}

/// [`col2im`] onto one input channel from its `k·k` rows of `block`.
#[inline(always)]
fn col2im_plane<T: WithDType>(g: &Geom, block: &[T], rows: std::ops::Range<usize>, plane: &mut [T]) {
    let (k, l) = (g.k, rows.len() * g.wo);
    for ky in 0..k {
        let valid_rows = g.valid(ky, g.h, g.ho);
        for kx in 0..k {
            let cols = g.valid(kx, g.w, g.wo);
            if cols.is_empty() {
                continue;
            }
            let row = &block[(ky * k + kx) * l..(ky * k + kx + 1) * l];
            for oy in rows.start.max(valid_rows.start)..rows.end.min(valid_rows.end) {
                let src = &row[(oy - rows.start) * g.wo..(oy - rows.start + 1) * g.wo][cols.clone()];
                let dst = &mut plane[(oy * g.s + ky - g.p) * g.w..];
                let x0 = cols.start * g.s + kx - g.p;
                match g.s {
                    // contiguous: vectorises
                    1 => {
                        for (d, v) in dst[x0..x0 + src.len()].iter_mut().zip(src) {
                            *d += *v;
                        }
                    }
                    // pairs, as in `im2col_plane`
                    2 => {
                        let n = src.len();
                        let dst = &mut dst[x0..x0 + 2 * n - 1];
                        for (pair, v) in dst.chunks_exact_mut(2).zip(&src[..n - 1]) {
                            pair[0] += *v;
                        }
                        dst[2 * (n - 1)] += src[n - 1];
                    }
                    s => {
                        let dst = dst[x0..].iter_mut().step_by(s);
                        dst.zip(src).for_each(|(d, v)| *d += *v);
                    }
                }
            }
        }
    }
}
cpu::simd!(col2im_plane_simd, col2im_plane, (g: &Geom, block: &[T], rows: std::ops::Range<usize>, plane: &mut [T]));

/// Output-row tiles whose `col` (K × rows·Wo) stays within about 2 MB of
/// f32, so that building it and the gemm reading it stay in cache; a full
/// `col` of a 64-channel 3x3 layer at 128x256 would be 75 MB.
fn row_tiles(g: &Geom) -> impl Iterator<Item = std::ops::Range<usize>> {
    let (kk, _) = g.kl();
    let per = ((1usize << 19) / (kk * g.wo).max(1)).clamp(1, g.ho);
    let ho = g.ho;
    (0..ho.div_ceil(per)).map(move |t| t * per..((t + 1) * per).min(ho))
}

thread_local! {
    /// This thread's tile buffer (f32), kept between convolutions.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A tile buffer for im2col/col2im and the Winograd blocks: this thread's
/// cached buffer when it is
/// free, so that a convolution neither allocates nor zeroes its tiles (the
/// tiles are written in full before they are read; a fresh buffer would be
/// zeroed by calloc every call: 2% of a forward's instructions). A nested
/// convolution on the same thread (rayon may run another job while this
/// one waits) finds the slot empty and starts a buffer of its own; the
/// larger one is kept on return.
struct Scratch<T: WithDType>(Vec<T>);

impl<T: WithDType> Scratch<T> {
    fn take() -> Self {
        if T::DTYPE != DType::F32 {
            return Self(Vec::new());
        }
        let cached: Box<dyn std::any::Any> = Box::new(SCRATCH.with(|c| c.take()));
        Self(cached.downcast::<Vec<T>>().map(|v| *v).unwrap_or_default())
    }

    /// `len` elements, growing (and zeroing the growth) only past the
    /// largest tile seen on this thread.
    fn get(&mut self, len: usize) -> &mut [T] {
        if self.0.len() < len {
            self.0.resize(len, T::zero());
        }
        &mut self.0[..len]
    }
}

impl<T: WithDType> Drop for Scratch<T> {
    fn drop(&mut self) {
        let mine: Box<dyn std::any::Any> = Box::new(std::mem::take(&mut self.0));
        if let Ok(v) = mine.downcast::<Vec<f32>>() {
            SCRATCH.with(|c| {
                let other = c.take();
                c.set(if other.len() > v.len() { other } else { *v });
            });
        }
    }
}

/// A row-major matrix view: element (i, j) at `ptr + i·rs + j·cs`.
struct Mat<T> {
    ptr: *const T,
    rs: isize,
    cs: isize,
}

fn mat<T>(s: &[T], rs: usize, cs: usize) -> Mat<T> {
    Mat {
        ptr: s.as_ptr(),
        rs: rs as isize,
        cs: cs as isize,
    }
}

/// `dst (m×n, row stride dst_rs) = [dst +] a (m×k) · b (k×n)`, on every
/// thread when `par` and the product is large enough.
#[allow(clippy::too_many_arguments)]
fn gemm<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    m: usize,
    n: usize,
    kk: usize,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    par: bool,
) {
    assert!(m == 0 || dst.len() >= (m - 1) * dst_rs + n);
    // SAFETY: `dst` holds the m×n block at row stride dst_rs (asserted) and
    // is initialised; `a` and `b` as `gemm_raw` requires (the callers').
    unsafe {
        gemm_raw(
            dst.as_mut_ptr(),
            dst_rs,
            m,
            n,
            kk,
            a,
            b,
            accumulate,
            if par {
                threads_for(m, n, kk)
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

/// Threads for an m×n×k product: all of them above 64k multiply-adds.
fn threads_for(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m * n * k >= 1 << 16 {
        gemm::Parallelism::Rayon(candle_core::utils::get_num_threads())
    } else {
        gemm::Parallelism::None
    }
}

/// [`gemm`] into memory that need not be initialised unless `accumulate`,
/// on `threads`.
///
/// # Safety
/// `dst` is valid for writes of the m×n block at row stride `dst_rs` (and
/// initialised there if `accumulate`), aliased by nothing else; `a` and
/// `b` point to m×k and k×n elements at their strides.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: WithDType>(
    dst: *mut T,
    dst_rs: usize,
    m: usize,
    n: usize,
    kk: usize,
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    threads: gemm::Parallelism,
) {
    // SAFETY: as the caller guarantees; with `accumulate` false the gemm
    // crate writes `dst` without reading it (beta ignored).
    unsafe {
        gemm::gemm(
            m,
            n,
            kk,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            threads,
        )
    }
}

/// The forward: `y = conv2d(x, w)`.
struct Conv2d {
    padding: usize,
    stride: usize,
}

/// What the inference convolution does to its output while it is still in
/// cache: `y = act(y + bias[c] [+ residual])`.
struct Epilogue<'a, T> {
    bias: &'a [T],
    residual: Option<&'a [T]>,
    relu: bool,
}

impl<T: WithDType> Epilogue<'_, T> {
    /// Applies to the output positions `cols` (a range of `Ho·Wo`) of every
    /// channel of batch item `b`, whose output starts at `yb`.
    ///
    /// # Safety
    /// `yb` points to the item's `Cout·Ho·Wo` outputs, and positions `cols`
    /// of every channel are initialised; nothing else accesses them during
    /// the call.
    unsafe fn apply(&self, g: &Geom, b: usize, yb: cpu::SyncPtr<T>, cols: std::ops::Range<usize>) {
        let l = g.ho * g.wo;
        let each = |c: usize| {
            // SAFETY: channel c's positions `cols`: initialised (caller),
            // and channels are disjoint, so no two closures share elements.
            let out = unsafe { std::slice::from_raw_parts_mut(yb.get().add(c * l + cols.start), cols.len()) };
            self.finish(g, b, c, out, cols.start);
        };
        if g.cout * cols.len() >= PAR_MIN {
            (0..g.cout).into_par_iter().for_each(each);
        } else {
            (0..g.cout).for_each(each);
        }
    }

    /// Applies to `out`, channel `c` of item `b` from output position `at`
    /// (of `Ho·Wo`) on.
    fn finish(&self, g: &Geom, b: usize, c: usize, out: &mut [T], at: usize) {
        let zero = T::zero();
        let bias = self.bias[c];
        match self.residual {
            Some(r) => {
                let at = (b * g.cout + c) * g.ho * g.wo + at;
                let r = &r[at..at + out.len()];
                for (v, r) in out.iter_mut().zip(r) {
                    *v += bias + *r;
                }
            }
            None => out.iter_mut().for_each(|v| *v += bias),
        }
        if self.relu {
            // max(v, 0) as candle's relu (NaN becomes 0 too), as a plain
            // select
            out.iter_mut()
                .for_each(|v| *v = if *v > zero { *v } else { zero });
        }
    }
}

/// The output is written in place by the gemms, never zeroed first (a
/// zeroed `Vec` costs a memset of every output: 8% of a forward's
/// instructions in callgrind).
fn forward<T: WithDType>(g: &Geom, x: &[T], w: &[T], epi: Option<&Epilogue<T>>) -> Vec<T> {
    if winograd::applies(g) {
        let _span = crate::profile::flops_span("conv2d winograd", g.flops());
        winograd::forward(g, x, w, epi)
    } else {
        let kind = if g.is_pointwise() {
            "conv2d 1x1"
        } else {
            "conv2d im2col"
        };
        let _span = crate::profile::flops_span(kind, g.flops());
        forward_direct(g, x, w, epi)
    }
}

/// [`forward`] by im2col + gemm.
fn forward_direct<T: WithDType>(g: &Geom, x: &[T], w: &[T], epi: Option<&Epilogue<T>>) -> Vec<T> {
    let (kk, l) = g.kl();
    // the loop below must visit every item: y is only initialised by it
    assert_eq!(x.len(), g.n * g.cin * g.h * g.w, "conv2d input");
    assert_eq!(w.len(), g.cout * kk, "conv2d weight");
    let len = g.n * g.cout * l;
    let mut y: Vec<T> = Vec::with_capacity(len);
    let base = cpu::SyncPtr(y.as_mut_ptr());
    let item = |b: usize, xb: &[T], col: &mut Scratch<T>, par: bool| {
        let threads = |m, n, k| {
            if par {
                threads_for(m, n, k)
            } else {
                gemm::Parallelism::None
            }
        };
        // SAFETY: item b's Cout·L outputs lie within y's capacity.
        let yb = cpu::SyncPtr(unsafe { base.get().add(b * g.cout * l) });
        if g.is_pointwise() {
            // SAFETY: one gemm writes all Cout×L outputs of the item (row
            // stride L), then the epilogue reads them.
            unsafe {
                gemm_raw(
                    yb.get(),
                    l,
                    g.cout,
                    l,
                    kk,
                    mat(w, kk, 1),
                    mat(xb, l, 1),
                    false,
                    threads(g.cout, l, kk),
                );
                if let Some(e) = epi {
                    e.apply(g, b, yb, 0..l);
                }
            }
            return;
        }
        for rows in row_tiles(g) {
            let lt = rows.len() * g.wo;
            let col = col.get(kk * lt);
            im2col(g, xb, rows.clone(), col);
            let cols = rows.start * g.wo..rows.end * g.wo;
            // SAFETY: the gemm writes positions `cols` of every channel
            // (Cout×lt at row stride L) within the item, then the epilogue
            // reads just those.
            unsafe {
                gemm_raw(
                    yb.get().add(cols.start),
                    l,
                    g.cout,
                    lt,
                    kk,
                    mat(w, kk, 1),
                    mat(col, lt, 1),
                    false,
                    threads(g.cout, lt, kk),
                );
                if let Some(e) = epi {
                    e.apply(g, b, yb, cols);
                }
            }
        }
    };
    if by_items(g) {
        // items on separate threads, each single-threaded: no threaded
        // gemm's packing and joins per small product (items write disjoint
        // outputs)
        x.par_chunks(g.cin * g.h * g.w)
            .enumerate()
            .for_each(|(b, xb)| item(b, xb, &mut Scratch::take(), false));
    } else {
        let mut col = Scratch::take();
        for (b, xb) in x.chunks(g.cin * g.h * g.w).enumerate() {
            item(b, xb, &mut col, true);
        }
    }
    // SAFETY: the row tiles cover all output rows of every item and each
    // gemm wrote every channel of its rows: all `len` elements are set.
    unsafe { y.set_len(len) };
    y
}

/// Whether a layer's items run on separate threads, each with
/// single-threaded products, rather than one after the other with
/// threaded ones: when there are at least as many items as threads, in
/// whole rounds.
fn by_items(g: &Geom) -> bool {
    let t = rayon::current_num_threads();
    g.n >= t && g.n.is_multiple_of(t)
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d-im2col"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span("conv2d");
        let g = Geom::new(l1.shape(), l2.shape(), self.stride, self.padding)?;
        let shape = Shape::from((g.n, g.cout, g.ho, g.wo));
        cpu::with_real!("conv2d", s1, T => {
            let (a, b) = (cpu::slice::<T>(s1, l1)?, cpu::slice::<T>(s2, l2)?);
            Ok((T::to_cpu_storage_owned(forward(&g, a, b, None)), shape))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _span = crate::profile::span("conv2d backward");
        let (s, p) = (self.stride, self.padding);
        let gy = gy.contiguous()?;
        let gx = gy.apply_op2_no_bwd(
            w,
            &InputGrad {
                x: x.shape().clone(),
                stride: s,
                padding: p,
            },
        )?;
        let gw = x.apply_op2_no_bwd(
            &gy,
            &WeightGrad {
                w: w.shape().clone(),
                stride: s,
                padding: p,
            },
        )?;
        Ok((Some(gx), Some(gw)))
    }
}

/// The inference convolution with its epilogue: `act(conv(x, w) + b [+ r])`
/// over (x, w, b); no backward (inference runs on detached weights).
struct Conv2dAct {
    padding: usize,
    stride: usize,
    residual: Option<Tensor>,
    relu: bool,
}

impl Conv2dAct {
    fn run<T: WithDType>(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(x.1.shape(), w.1.shape(), self.stride, self.padding)?;
        let bias = cpu::contiguous(T::cpu_storage_as_slice(b.0)?, b.1)?;
        if bias.len() != g.cout {
            candle_core::bail!("conv2d: bias of {} for {} output channels", bias.len(), g.cout);
        }
        let shape = Shape::from((g.n, g.cout, g.ho, g.wo));
        let guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match &guard {
            Some((st, l)) => match &**st {
                candle_core::Storage::Cpu(s) => {
                    if l.shape() != &shape {
                        candle_core::bail!("conv2d: residual {:?} for output {shape:?}", l.shape());
                    }
                    Some(cpu::contiguous(T::cpu_storage_as_slice(s)?, l)?)
                }
                _ => candle_core::bail!("conv2d: residual on another device"),
            },
            None => None,
        };
        let epi = Epilogue {
            bias,
            residual,
            relu: self.relu,
        };
        let xs = cpu::contiguous(T::cpu_storage_as_slice(x.0)?, x.1)?;
        let ws = cpu::contiguous(T::cpu_storage_as_slice(w.0)?, w.1)?;
        Ok((T::to_cpu_storage_owned(forward(&g, xs, ws, Some(&epi))), shape))
    }
}

impl CustomOp3 for Conv2dAct {
    fn name(&self) -> &'static str {
        "conv2d-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span("conv2d-bias-act");
        cpu::with_real!("conv2d", s1, T => self.run::<T>((s1, l1), (s2, l2), (s3, l3)))
    }
}

/// `gX = col2im(Wᵀ·gY)` per batch item: operands (gY, W).
struct InputGrad {
    x: Shape,
    stride: usize,
    padding: usize,
}

fn input_grad<T: WithDType>(g: &Geom, gy: &[T], w: &[T]) -> Vec<T> {
    if winograd::applies(&winograd::transposed(g)) {
        let _span = crate::profile::flops_span("conv2d-input-grad winograd", g.flops());
        winograd::input_grad(g, gy, w)
    } else {
        let kind = if g.is_pointwise() {
            "conv2d-input-grad 1x1"
        } else {
            "conv2d-input-grad im2col"
        };
        let _span = crate::profile::flops_span(kind, g.flops());
        input_grad_direct(g, gy, w)
    }
}

/// [`input_grad`] by gemm + col2im.
fn input_grad_direct<T: WithDType>(g: &Geom, gy: &[T], w: &[T]) -> Vec<T> {
    let (kk, l) = g.kl();
    let mut gx = vec![T::from_f64(0.0); g.n * g.cin * g.h * g.w];
    let item = |gyb: &[T], gxb: &mut [T], gcol: &mut Scratch<T>, par: bool| {
        // Wᵀ (K × Cout): element (i, j) = W[j·K + i]
        if g.is_pointwise() {
            gemm(gxb, l, kk, l, g.cout, mat(w, 1, kk), mat(gyb, l, 1), false, par);
            return;
        }
        for rows in row_tiles(g) {
            let lt = rows.len() * g.wo;
            let gcol = gcol.get(kk * lt);
            let src = &gyb[rows.start * g.wo..];
            gemm(
                gcol,
                lt,
                kk,
                lt,
                g.cout,
                mat(w, 1, kk),
                mat(src, l, 1),
                false,
                par,
            );
            col2im(g, gcol, rows, gxb);
        }
    };
    let items = gy.chunks(g.cout * l).zip(gx.chunks_mut(g.cin * g.h * g.w));
    if by_items(g) {
        let items: Vec<_> = items.collect();
        items
            .into_par_iter()
            .for_each(|(gyb, gxb)| item(gyb, gxb, &mut Scratch::take(), false));
    } else {
        let mut gcol = Scratch::take();
        items.for_each(|(gyb, gxb)| item(gyb, gxb, &mut gcol, true));
    }
    gx
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span("conv2d-input-grad");
        let g = Geom::new(&self.x, l2.shape(), self.stride, self.padding)?;
        cpu::with_real!("conv2d input gradient", s1, T => {
            let (a, b) = (cpu::slice::<T>(s1, l1)?, cpu::slice::<T>(s2, l2)?);
            Ok((T::to_cpu_storage_owned(input_grad(&g, a, b)), self.x.clone()))
        })
    }
}

/// `gW = Σ_b gY_b·col_bᵀ`: operands (x, gY).
struct WeightGrad {
    w: Shape,
    stride: usize,
    padding: usize,
}

fn weight_grad<T: WithDType>(g: &Geom, x: &[T], gy: &[T]) -> Vec<T> {
    if winograd::applies(g) {
        let _span = crate::profile::flops_span("conv2d-weight-grad winograd", g.flops());
        winograd::weight_grad(g, x, gy)
    } else {
        let kind = if g.is_pointwise() {
            "conv2d-weight-grad 1x1"
        } else {
            "conv2d-weight-grad im2col"
        };
        let _span = crate::profile::flops_span(kind, g.flops());
        weight_grad_direct(g, x, gy)
    }
}

/// [`weight_grad`] by im2col + gemm: `gW = Σ gY·colᵀ` over batch items and
/// row tiles. Both factors have the pixels (the product's inner dimension)
/// contiguous, a layout the gemm crate packs by gathering element by
/// element (its `pack_lhs` was 14% of a training step, and these gradients
/// 2.3–3.5x their forward's time); so each tile of `gY` and of `col` is
/// transposed first ([`transpose`], blocked), which makes `gY` column-major
/// and `colᵀ` row-major, the layouts the gemm packs by rows.
fn weight_grad_direct<T: WithDType>(g: &Geom, x: &[T], gy: &[T]) -> Vec<T> {
    let (kk, l) = g.kl();
    // pixels per product: the transposed tiles in about 2 MB
    let chunk = ((1usize << 19) / (kk + g.cout)).max(64);
    // item b's gradient added into (or, when `first`, written to) gw
    let item = |xb: &[T], gyb: &[T], gw: &mut [T], first: bool, scratch: &mut Scratch<T>, par: bool| {
        let mut first = first;
        if g.is_pointwise() {
            // col is x itself (Cin × L)
            for p0 in (0..l).step_by(chunk) {
                let lt = chunk.min(l - p0);
                let buf = scratch.get(lt * (kk + g.cout));
                weight_grad_tile(g, gw, (&gyb[p0..], l), (&xb[p0..], l), lt, buf, !first, par);
                first = false;
            }
            return;
        }
        for rows in row_tiles(g) {
            let lt = rows.len() * g.wo;
            let buf = scratch.get(lt * (2 * kk + g.cout));
            let (col, rest) = buf.split_at_mut(kk * lt);
            im2col(g, xb, rows.clone(), col);
            let gyt = (&gyb[rows.start * g.wo..], l);
            weight_grad_tile(g, gw, gyt, (col, lt), lt, rest, !first, par);
            first = false;
        }
    };
    let items = x.chunks(g.cin * g.h * g.w).zip(gy.chunks(g.cout * l));
    let mut gw = vec![T::from_f64(0.0); g.cout * kk];
    if by_items(g) {
        // one partial gradient per thread's share of the items, summed in
        // a fixed order (the same result on every run)
        let t = rayon::current_num_threads();
        let items: Vec<_> = items.collect();
        let parts: Vec<Vec<T>> = items
            .par_chunks(g.n / t)
            .map(|share| {
                let mut part = vec![T::from_f64(0.0); g.cout * kk];
                let mut scratch = Scratch::take();
                for (i, (xb, gyb)) in share.iter().enumerate() {
                    item(xb, gyb, &mut part, i == 0, &mut scratch, false);
                }
                part
            })
            .collect();
        for (i, p) in parts.into_iter().enumerate() {
            if i == 0 {
                gw = p;
            } else {
                gw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
        }
    } else {
        let mut scratch = Scratch::take();
        for (i, (xb, gyb)) in items.enumerate() {
            item(xb, gyb, &mut gw, i == 0, &mut scratch, true);
        }
    }
    gw
}

/// `gw (Cout × K) [+]= gY·colᵀ` over one tile of `lt` pixels, from `gy`
/// (Cout rows) and `col` (K rows), each given with its row stride; both
/// are transposed into `buf` (at least `lt·(K + Cout)` elements) first, so
/// that the gemm packs rows (see [`weight_grad_direct`]).
#[allow(clippy::too_many_arguments)]
fn weight_grad_tile<T: WithDType>(
    g: &Geom,
    gw: &mut [T],
    (gy, gy_rs): (&[T], usize),
    (col, col_rs): (&[T], usize),
    lt: usize,
    buf: &mut [T],
    accumulate: bool,
    par: bool,
) {
    let kk = gw.len() / g.cout;
    let (colt, gyt) = buf.split_at_mut(kk * lt);
    transpose(col, kk, lt, col_rs, colt);
    transpose(gy, g.cout, lt, gy_rs, gyt);
    gemm(
        gw,
        kk,
        g.cout,
        kk,
        lt,
        mat(gyt, 1, g.cout),
        mat(colt, kk, 1),
        accumulate,
        par,
    );
}

/// `dst[j·rows + i] = src[i·rs + j]` for `i < rows`, `j < cols`: the
/// `rows × cols` matrix at row stride `rs` transposed into `dst` (`cols ×
/// rows`, row-major), eight source rows at a time (eight sequential reads,
/// runs of eight contiguous writes), split over columns across threads.
fn transpose<T: WithDType>(src: &[T], rows: usize, cols: usize, rs: usize, dst: &mut [T]) {
    assert!(dst.len() >= rows * cols && (rows == 0 || src.len() >= (rows - 1) * rs + cols));
    let dst = &mut dst[..rows * cols];
    let per = (PAR_MIN / rows.max(1)).max(64);
    let each = |(t, d): (usize, &mut [T])| {
        #[cfg(target_arch = "x86_64")]
        if T::DTYPE == DType::F32 && std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: T is f32 (checked), so both slices reinterpret as
            // f32 slices of the same length; the CPU has AVX (checked).
            unsafe {
                let src = std::slice::from_raw_parts(src.as_ptr() as *const f32, src.len());
                let d = std::slice::from_raw_parts_mut(d.as_mut_ptr() as *mut f32, d.len());
                return transpose_f32_avx(src, rows, rs, t * per, d);
            }
        }
        transpose_simd(src, rows, rs, t * per, d)
    };
    if rows * cols >= 2 * PAR_MIN {
        dst.par_chunks_mut(per * rows).enumerate().for_each(each);
    } else {
        dst.chunks_mut(per * rows).enumerate().for_each(each);
    }
}

/// [`transpose`] of the columns `j0..` that `dst` holds (`dst.len() / rows`
/// of them).
#[inline(always)]
fn transpose_cols<T: WithDType>(src: &[T], rows: usize, rs: usize, j0: usize, dst: &mut [T]) {
    let nc = dst.len() / rows;
    let mut i = 0;
    while i + 8 <= rows {
        let s: [&[T]; 8] = std::array::from_fn(|k| &src[(i + k) * rs + j0..][..nc]);
        for (j, d) in dst.chunks_exact_mut(rows).enumerate() {
            let d = &mut d[i..i + 8];
            for k in 0..8 {
                d[k] = s[k][j];
            }
        }
        i += 8;
    }
    for i in i..rows {
        let s = &src[i * rs + j0..][..nc];
        for (d, v) in dst.chunks_exact_mut(rows).zip(s) {
            d[i] = *v;
        }
    }
}
/// [`transpose_cols`] in f32 with 8×8 register transposes (eight row
/// loads, 24 shuffles, eight stores), the edges as there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn transpose_f32_avx(src: &[f32], rows: usize, rs: usize, j0: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let nc = dst.len() / rows;
    let (r8, c8) = (rows / 8 * 8, nc / 8 * 8);
    if r8 > 0 && c8 > 0 {
        // every load below reads src[(i + k)·rs + j0 + j ..][..8] with
        // i + k < r8 ≤ rows and j + 8 ≤ c8 ≤ nc, every store writes
        // dst[(j + k)·rows + i ..][..8] with j + k < c8 and i + 8 ≤ r8
        assert!((r8 - 1) * rs + j0 + c8 <= src.len() && c8 * rows <= dst.len());
        let dp = dst.as_mut_ptr();
        for i in (0..r8).step_by(8) {
            for j in (0..c8).step_by(8) {
                // SAFETY: in bounds (asserted above); unaligned loads and
                // stores; AVX is enabled for this function.
                unsafe {
                    let ld = |k: usize| _mm256_loadu_ps(src.as_ptr().add((i + k) * rs + j0 + j));
                    let (r0, r1, r2, r3) = (ld(0), ld(1), ld(2), ld(3));
                    let (r4, r5, r6, r7) = (ld(4), ld(5), ld(6), ld(7));
                    let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
                    let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
                    let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
                    let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
                    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                    let st = |k: usize, v| _mm256_storeu_ps(dp.add((j + k) * rows + i), v);
                    st(0, _mm256_permute2f128_ps::<0x20>(u0, u4));
                    st(1, _mm256_permute2f128_ps::<0x20>(u1, u5));
                    st(2, _mm256_permute2f128_ps::<0x20>(u2, u6));
                    st(3, _mm256_permute2f128_ps::<0x20>(u3, u7));
                    st(4, _mm256_permute2f128_ps::<0x31>(u0, u4));
                    st(5, _mm256_permute2f128_ps::<0x31>(u1, u5));
                    st(6, _mm256_permute2f128_ps::<0x31>(u2, u6));
                    st(7, _mm256_permute2f128_ps::<0x31>(u3, u7));
                }
            }
        }
    }
    // the last columns of the first r8 rows, then the last rows
    for i in 0..r8 {
        let s = &src[i * rs + j0..][..nc];
        for j in c8..nc {
            dst[j * rows + i] = s[j];
        }
    }
    for i in r8..rows {
        let s = &src[i * rs + j0..][..nc];
        for (d, v) in dst.chunks_exact_mut(rows).zip(s) {
            d[i] = *v;
        }
    }
}

cpu::simd!(transpose_simd, transpose_cols, (src: &[T], rows: usize, rs: usize, j0: usize, dst: &mut [T]));

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span("conv2d-weight-grad");
        let g = Geom::new(l1.shape(), &self.w, self.stride, self.padding)?;
        cpu::with_real!("conv2d weight gradient", s1, T => {
            let (a, b) = (cpu::slice::<T>(s1, l1)?, cpu::slice::<T>(s2, l2)?);
            Ok((T::to_cpu_storage_owned(weight_grad(&g, a, b)), self.w.clone()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Gradients of Σ conv(x, w)·r against central finite differences (f64).
    fn check(shape: (usize, usize, usize, usize), cout: usize, k: usize, p: usize, s: usize) {
        let dev = Device::Cpu;
        let x0 = crate::testing::randn(11, 0f64, 1., shape, &dev).unwrap();
        let w0 = crate::testing::randn(12, 0f64, 1., (cout, shape.1, k, k), &dev).unwrap();
        let y = x0.conv2d(&w0, p, s, 1, 1).unwrap();
        let r = crate::testing::randn(13, 0f64, 1., y.shape(), &dev).unwrap();
        let (x, w) = (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&w0).unwrap());
        let loss = (conv2d(x.as_tensor(), w.as_tensor(), p, s).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap();
        let gr = loss.backward().unwrap();
        let f = |xv: &Tensor, wv: &Tensor| -> f64 {
            (xv.conv2d(wv, p, s, 1, 1).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let eps = 1e-6;
        for (var, base, is_x) in [(&x, &x0, true), (&w, &w0, false)] {
            let g: Vec<f64> = gr
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..b.len() {
                let mut pl = b.clone();
                pl[i] += eps;
                let mut mi = b.clone();
                mi[i] -= eps;
                let tp = Tensor::from_slice(&pl, base.shape(), &dev).unwrap();
                let tm = Tensor::from_slice(&mi, base.shape(), &dev).unwrap();
                let num = if is_x {
                    (f(&tp, &w0) - f(&tm, &w0)) / (2. * eps)
                } else {
                    (f(&x0, &tp) - f(&x0, &tm)) / (2. * eps)
                };
                assert!(
                    (num - g[i]).abs() < 1e-5,
                    "grad {i}: {num} vs {} ({shape:?} k{k} p{p} s{s})",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        check((1, 2, 6, 8), 3, 3, 1, 2);
        // mixed parity: candle 0.11's own backward fails here
        check((1, 2, 6, 7), 3, 3, 1, 2);
        check((2, 2, 7, 5), 2, 3, 1, 2);
        check((1, 3, 3, 6), 2, 3, 1, 2);
        check((1, 2, 9, 9), 2, 1, 0, 2);
        // stride 1: 3x3 and the pointwise path
        check((2, 3, 5, 6), 4, 3, 1, 1);
        check((2, 3, 4, 5), 2, 1, 0, 1);
        // maps smaller than the kernel's reach
        check((1, 2, 1, 2), 3, 3, 1, 1);
        check((1, 2, 2, 1), 3, 3, 1, 2);
    }

    /// The blocked transpose (AVX 8×8 blocks in f32, the generic loop in
    /// f64) against the definition, at every edge case of the blocks, with
    /// a row stride past the columns, and large enough to split over
    /// threads.
    #[test]
    fn transpose_matches_the_definition() {
        fn check<T: WithDType + std::fmt::Debug>(rows: usize, cols: usize, rs: usize) {
            let src: Vec<T> = (0..rows * rs).map(|v| T::from_f64(v as f64)).collect();
            let mut dst = vec![T::from_f64(-1.0); rows * cols];
            transpose(&src, rows, cols, rs, &mut dst);
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(
                        dst[j * rows + i],
                        src[i * rs + j],
                        "{rows}x{cols} rs {rs} at ({i}, {j})"
                    );
                }
            }
        }
        for rows in [1, 7, 8, 9, 16, 21] {
            for cols in [1, 5, 8, 13, 64] {
                check::<f32>(rows, cols, cols);
                check::<f32>(rows, cols, cols + 3);
                check::<f64>(rows, cols, cols + 1);
            }
        }
        check::<f32>(20, 9000, 9001);
        check::<f32>(27, 4100, 4100);
    }

    /// Large enough for the threaded gemm and im2col paths; candle's own
    /// backward is right where height and width share parity.
    #[test]
    fn gradients_match_candles_on_layer_sized_inputs() {
        let dev = Device::Cpu;
        for (xs, cout, k, p, s) in [
            ((2, 32, 16, 24), 48, 3, 1, 1),
            ((2, 32, 16, 24), 48, 3, 1, 2),
            ((2, 32, 16, 24), 48, 1, 0, 1),
            // several row tiles (see `row_tiles`)
            ((2, 64, 64, 66), 8, 3, 1, 1),
            ((2, 64, 64, 66), 8, 3, 1, 2),
            // the weight gradient's transposes: pointwise in several pixel
            // chunks with Cout not a multiple of 8; a stem-like K = 27
            ((2, 64, 96, 96), 20, 1, 0, 1),
            ((1, 3, 64, 64), 12, 3, 1, 2),
        ] {
            let x = Var::from_tensor(&crate::testing::randn(14, 0f32, 1., xs, &dev).unwrap()).unwrap();
            let w =
                Var::from_tensor(&crate::testing::randn(15, 0f32, 0.1, (cout, xs.1, k, k), &dev).unwrap())
                    .unwrap();
            let y = conv2d(x.as_tensor(), w.as_tensor(), p, s).unwrap();
            let r = crate::testing::randn(16, 0f32, 1., y.shape(), &dev).unwrap();
            let ours = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let theirs = (x.as_tensor().conv2d(w.as_tensor(), p, s, 1, 1).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &w] {
                let a: Vec<f32> = ours
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let b: Vec<f32> = theirs
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * scale,
                        "{i}: {a} vs {b} ({xs:?} k{k} s{s})"
                    );
                }
            }
        }
    }

    /// The definition, summed in f64 by plain loops.
    fn naive(
        x: &[f32],
        xs: (usize, usize, usize, usize),
        w: &[f32],
        cout: usize,
        k: usize,
        p: usize,
        s: usize,
    ) -> Vec<f32> {
        let (n, c, h, wd) = xs;
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
        let mut y = vec![0f32; n * cout * ho * wo];
        for b in 0..n {
            for o in 0..cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = 0f64;
                        for i in 0..c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) = (
                                        (oy * s + ky) as isize - p as isize,
                                        (ox * s + kx) as isize - p as isize,
                                    );
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                        continue;
                                    }
                                    let xv = x[((b * c + i) * h + iy as usize) * wd + ix as usize] as f64;
                                    acc += xv * w[((o * c + i) * k + ky) * k + kx] as f64;
                                }
                            }
                        }
                        y[((b * cout + o) * ho + oy) * wo + ox] = acc as f32;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn forward_matches_the_definition() {
        let dev = Device::Cpu;
        for (xs, cout, k, p, s) in [
            ((2, 3, 9, 10), 5, 3, 1, 2),
            ((2, 3, 9, 10), 5, 3, 1, 1),
            ((1, 4, 7, 6), 3, 1, 0, 1),
            ((1, 4, 7, 6), 3, 1, 0, 2),
            ((1, 2, 2, 3), 3, 3, 1, 2),
            ((1, 64, 40, 66), 4, 3, 1, 1),
        ] {
            let x = crate::testing::randn(17, 0f32, 1., xs, &dev).unwrap();
            let w = crate::testing::randn(18, 0f32, 1., (cout, xs.1, k, k), &dev).unwrap();
            let got: Vec<f32> = conv2d(&x, &w, p, s)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let want = naive(&xv, xs, &wv, cout, k, p, s);
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                // f32 sums of up to 576 products: rounding grows with the value
                assert!(
                    (a - b).abs() < 1e-4 + 1e-5 * b.abs(),
                    "{a} vs {b} for {xs:?} k{k} p{p} s{s}"
                );
            }
        }
    }

    #[test]
    fn fused_epilogue_matches_the_definition() {
        let dev = Device::Cpu;
        // Several row tiles (64 channels, 40 rows), pointwise, strided, batch
        // 2, and a shape that takes the Winograd path (its epilogue on the
        // output tiles, ragged at the right and bottom edges).
        for (xs, cout, k, p, s) in [
            ((2, 3, 9, 10), 5, 3, 1, 1),
            ((1, 64, 40, 66), 4, 3, 1, 1),
            ((2, 4, 7, 6), 3, 1, 0, 1),
            ((1, 3, 9, 10), 5, 3, 1, 2),
            ((2, 16, 21, 26), 12, 3, 1, 1),
        ] {
            let g = Geom::new(&xs.into(), &(cout, xs.1, k, k).into(), s, p).unwrap();
            let wino = winograd::applies(&g);
            assert_eq!(wino, xs.1 == 16, "{xs:?}: which path is tested");
            let x = crate::testing::randn(19, 0f32, 1., xs, &dev).unwrap();
            let w = crate::testing::randn(20, 0f32, 1., (cout, xs.1, k, k), &dev).unwrap();
            let b = crate::testing::randn(21, 0f32, 1., cout, &dev).unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let bv: Vec<f32> = b.to_vec1().unwrap();
            let plain = naive(&xv, xs, &wv, cout, k, p, s);
            let l = plain.len() / (xs.0 * cout);
            let (ho, wo) = ((xs.2 + 2 * p - k) / s + 1, (xs.3 + 2 * p - k) / s + 1);
            let out_shape = (xs.0, cout, ho, wo);
            let r = crate::testing::randn(22, 0f32, 1., out_shape, &dev).unwrap();
            let rv: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
            let scale = plain.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (residual, relu) in [(false, false), (false, true), (true, true)] {
                let got: Vec<f32> = conv2d_act(&x, &w, &b, p, s, residual.then_some(&r), relu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(got.len(), plain.len());
                for (i, (a, y)) in got.iter().zip(&plain).enumerate() {
                    let mut want = y + bv[(i / l) % cout];
                    if residual {
                        want += rv[i];
                    }
                    if relu {
                        want = want.max(0.0);
                    }
                    // f32 sums of up to 576 products: rounding grows with the
                    // value; F(4x4) Winograd's f32 error is bounded by 1e-5 of
                    // the output's largest magnitude (winograd::tests::close)
                    let tol = if wino {
                        1e-5 * scale + 1e-6 * want.abs()
                    } else {
                        1e-4 + 1e-5 * want.abs()
                    };
                    assert!(
                        (a - want).abs() < tol,
                        "{a} vs {want} at {i} for {xs:?} k{k} s{s}"
                    );
                }
            }
        }
    }

    /// Bias add: forward y + b per channel; the gradient of Σ (y + b)·r is
    /// r for y and Σ_{n,h,w} r for b (by hand).
    #[test]
    fn channel_bias_and_its_gradient() {
        let dev = Device::Cpu;
        let y0 = crate::testing::randn(23, 0f64, 1., (2, 3, 4, 5), &dev).unwrap();
        let r = crate::testing::randn(24, 0f64, 1., (2, 3, 4, 5), &dev).unwrap();
        let (y, b) = (
            Var::from_tensor(&y0).unwrap(),
            Var::new(&[0.5f64, -1.0, 2.0], &dev).unwrap(),
        );
        let out = add_channel_bias(y.as_tensor(), b.as_tensor()).unwrap();
        let (yv, ov): (Vec<f64>, Vec<f64>) = (
            y0.flatten_all().unwrap().to_vec1().unwrap(),
            out.flatten_all().unwrap().to_vec1().unwrap(),
        );
        for (i, (a, o)) in yv.iter().zip(&ov).enumerate() {
            assert!((a + [0.5, -1.0, 2.0][(i / 20) % 3] - o).abs() < 1e-12);
        }
        let g = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let rv: Vec<f64> = r.flatten_all().unwrap().to_vec1().unwrap();
        let gb: Vec<f64> = g.get(b.as_tensor()).unwrap().to_vec1().unwrap();
        for (ch, got) in gb.iter().enumerate() {
            let want: f64 = rv
                .iter()
                .enumerate()
                .filter(|(i, _)| (i / 20) % 3 == ch)
                .map(|(_, v)| v)
                .sum();
            assert!((got - want).abs() < 1e-12, "channel {ch}: {got} vs {want}");
        }
        let gy: Vec<f64> = g
            .get(y.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(gy, rv);
    }

    /// The ops against their `*_slow` routes (candle's conv2d and
    /// broadcasts): outputs and gradients in f64, at sizes where candle's
    /// strided backward is right (both sides even); the inference epilogue
    /// forward only (it has no backward).
    #[test]
    fn ops_match_their_slow_routes() {
        use crate::testing::{check_against_slow as check, randn};
        let dev = Device::Cpu;
        let x = randn(47, 0f64, 1., (2, 3, 8, 10), &dev).unwrap();
        for (k, stride) in [(3, 1), (3, 2), (1, 1), (1, 2)] {
            let w = randn(48, 0f64, 0.5, (4, 3, k, k), &dev).unwrap();
            check(
                |t| conv2d(&t[0], &t[1], k / 2, stride),
                |t| conv2d_slow(&t[0], &t[1], k / 2, stride),
                &[x.clone(), w.clone()],
                1e-12,
            )
            .unwrap();
            let b = randn(49, 0f64, 1., 4, &dev).unwrap();
            let fast = conv2d_act(&x, &w, &b, k / 2, stride, None, true).unwrap();
            let slow = conv2d_act_slow(&x, &w, &b, k / 2, stride, None, true).unwrap();
            let d = (fast - slow)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-12, "conv2d_act k {k} stride {stride}: {d}");
        }
        let b = randn(50, 0f64, 1., 3, &dev).unwrap();
        check(
            |t| add_channel_bias(&t[0], &t[1]),
            |t| add_channel_bias_slow(&t[0], &t[1]),
            &[x, b],
            1e-12,
        )
        .unwrap();
    }
}

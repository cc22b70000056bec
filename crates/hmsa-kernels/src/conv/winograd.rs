//! Winograd F(4x4, 3x3) for the stride-1, padding-1 3x3 convolutions (85–90%
//! of HRNet's FLOPs): each 4x4 block of outputs comes from a 6x6 block of
//! inputs with 36 products per channel pair instead of 144 (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016):
//!
//! `Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A`, summed over input channels.
//!
//! Per batch item and per block of tile rows (sized so that its transformed
//! inputs and products stay in cache, as im2col's row tiles do):
//! 1. input transform `V[c][ξ][t] = (Bᵀ d_{c,t} B)[ξ]`, rayon over channels;
//!    the column pass runs on whole input rows split into their four phases
//!    (`x mod 4`), the row pass on whole tile rows, so that every loop is
//!    contiguous and vectorises;
//! 2. 36 gemms `M[·][ξ][·] = U_ξ · V[·][ξ][·]` (Cout × Cin times Cin ×
//!    tiles), rayon over ξ, each single-threaded;
//! 3. output transform `Aᵀ M A` per output channel, interleaved into the
//!    output rows, with the inference epilogue (bias, residual, ReLU)
//!    applied to each row while it is in cache.
//!
//! `U = G g Gᵀ` is computed once per call (vectorised over input channels).
//! F(4x4) trades accuracy for speed: in f32 the result differs from the
//! direct sum by about 1e-5 of the output's scale (tests bound it). The
//! input gradient of such a layer is itself one (flipped, transposed
//! weights); the weight gradient is the adjoint in `U`: per block 36 gemms
//! `dU_ξ += Ŷ_ξ·V_ξᵀ` with `Ŷ = A ȳ Aᵀ`, then `gW = Gᵀ dU G`. The
//! transforms are compiled twice and the AVX2 copy picked at run time
//! (`cpu::simd!`).

use super::{gemm_raw, Epilogue, Geom, Mat, Scratch};
use crate::cpu::{simd, SyncPtr};
use candle_core::WithDType;
use rayon::prelude::*;

/// Fewer channels than this and the transforms outweigh the saved products.
const MIN_CHANNELS: usize = 8;
/// Fewer 4x4 output tiles (over the batch) than this and the per-call
/// weight transform outweighs them.
const MIN_TILES: usize = 48;
/// Elements of transformed inputs plus products per block (2 MB of f32,
/// as im2col's row tiles).
const BLOCK_ELEMS: usize = 1 << 19;

/// G (6x3): the weight transform.
const G: [[f64; 3]; 6] = [
    [1. / 4., 0., 0.],
    [-1. / 6., -1. / 6., -1. / 6.],
    [-1. / 6., 1. / 6., -1. / 6.],
    [1. / 24., 1. / 12., 1. / 6.],
    [1. / 24., -1. / 12., 1. / 6.],
    [0., 0., 1.],
];

/// Whether this convolution takes the Winograd path.
pub(super) fn applies(g: &Geom) -> bool {
    g.k == 3
        && g.s == 1
        && g.p == 1
        && g.cin >= MIN_CHANNELS
        && g.cout >= MIN_CHANNELS
        && g.n * g.ho.div_ceil(4) * g.wo.div_ceil(4) >= MIN_TILES
}

/// `out = Σ_k m[k]·ins[k]`, elementwise (zero coefficients skipped).
#[inline(always)]
fn lincomb<T: WithDType>(out: &mut [T], m: &[T], ins: &[&[T]]) {
    let n = out.len();
    let mut first = true;
    for (&c, x) in m.iter().zip(ins) {
        if c == T::zero() {
            continue;
        }
        let x = &x[..n];
        if first {
            if c == T::one() {
                out.copy_from_slice(x);
            } else {
                out.iter_mut().zip(x).for_each(|(o, v)| *o = c * *v);
            }
            first = false;
        } else if c == T::one() {
            out.iter_mut().zip(x).for_each(|(o, v)| *o += *v);
        } else {
            out.iter_mut().zip(x).for_each(|(o, v)| *o += c * *v);
        }
    }
    if first {
        out.fill(T::zero());
    }
}

/// `out[k] = Σ_j Bᵀ[k][j]·d[j]`, elementwise over the slices, in one pass
/// with Bᵀ's common terms shared (18 operations for 6 outputs).
#[inline(always)]
fn bt6<T: WithDType>(d: [&[T]; 6], out: [&mut [T]; 6]) {
    let n = out[0].len();
    // slices cut to `n` by hand (`array::map` is a call per use, see
    // `cut6`), so the loop runs without bounds checks
    let [d0, d1, d2, d3, d4, d5] = d;
    let (d0, d1, d2, d3, d4, d5) = (&d0[..n], &d1[..n], &d2[..n], &d3[..n], &d4[..n], &d5[..n]);
    let [o0, o1, o2, o3, o4, o5] = cut6(out, n);
    let (two, four, five) = (T::from_f64(2.), T::from_f64(4.), T::from_f64(5.));
    for t in 0..n {
        let (a, b, c, e) = (d1[t], d2[t], d3[t], d4[t]);
        o0[t] = four * d0[t] - five * b + e;
        o1[t] = (c + e) - four * (a + b);
        o2[t] = (e - c) + four * (a - b);
        o3[t] = (e - b) + two * (c - a);
        o4[t] = (e - b) - two * (c - a);
        o5[t] = four * a - five * c + d5[t];
    }
}

/// `Aᵀ·m` for six rows in one pass: the four outputs.
#[inline(always)]
fn at4<T: WithDType>(m: [&[T]; 6], n: usize, mut out: impl FnMut(usize, [T; 4])) {
    let [m0, m1, m2, m3, m4, m5] = m;
    let (m0, m1, m2, m3, m4, m5) = (&m0[..n], &m1[..n], &m2[..n], &m3[..n], &m4[..n], &m5[..n]);
    let (two, four, eight) = (T::from_f64(2.), T::from_f64(4.), T::from_f64(8.));
    for t in 0..n {
        let (p12, d12, p34, d34) = (m1[t] + m2[t], m1[t] - m2[t], m3[t] + m4[t], m3[t] - m4[t]);
        out(
            t,
            [
                m0[t] + p12 + p34,
                d12 + two * d34,
                p12 + four * p34,
                d12 + eight * d34 + m5[t],
            ],
        );
    }
}

/// `out[j] = Σ_s A[j][s]·y[s]` with `A = (Aᵀ)ᵀ`: the adjoint of [`at4`],
/// which takes an output gradient tile (4) to the transformed domain (6).
#[inline(always)]
fn a6<T: WithDType>(y: [&[T]; 4], out: [&mut [T]; 6]) {
    let n = out[0].len();
    let [y0, y1, y2, y3] = y;
    let (y0, y1, y2, y3) = (&y0[..n], &y1[..n], &y2[..n], &y3[..n]);
    let [o0, o1, o2, o3, o4, o5] = cut6(out, n);
    let (two, four, eight) = (T::from_f64(2.), T::from_f64(4.), T::from_f64(8.));
    for t in 0..n {
        let (p02, d13, p02b, d13b) = (
            y0[t] + y2[t],
            y1[t] + y3[t],
            y0[t] + four * y2[t],
            two * y1[t] + eight * y3[t],
        );
        o0[t] = y0[t];
        o1[t] = p02 + d13;
        o2[t] = p02 - d13;
        o3[t] = p02b + d13b;
        o4[t] = p02b - d13b;
        o5[t] = y3[t];
    }
}

/// Each of six slices cut to its first `n` elements, by hand:
/// `array::map` is not always inlined, and a call per use keeps the
/// caller's loop from dropping its bounds checks.
#[inline(always)]
fn cut6<T>(s: [&mut [T]; 6], n: usize) -> [&mut [T]; 6] {
    let [a, b, c, d, e, f] = s;
    [
        &mut a[..n],
        &mut b[..n],
        &mut c[..n],
        &mut d[..n],
        &mut e[..n],
        &mut f[..n],
    ]
}

/// Six disjoint runs of `len` elements of `buf`, `stride` apart.
#[inline(always)]
fn rows6<T>(buf: &mut [T], stride: usize, len: usize) -> [&mut [T]; 6] {
    // split by hand: `array::from_fn` over a closure is not always inlined
    let (r0, rest) = buf.split_at_mut(stride);
    let (r1, rest) = rest.split_at_mut(stride);
    let (r2, rest) = rest.split_at_mut(stride);
    let (r3, rest) = rest.split_at_mut(stride);
    let (r4, r5) = rest.split_at_mut(stride);
    cut6([r0, r1, r2, r3, r4, r5], len)
}

fn cast<T: WithDType, const R: usize, const C: usize>(m: &[[f64; C]; R]) -> [[T; C]; R] {
    m.map(|row| row.map(T::from_f64))
}

/// `U[o][ξ][c] = (G w[o][c] Gᵀ)[ξ]` for one output channel `o`: `w` its
/// Cin·9 weights, `u` its 36·Cin outputs, `tmp` scratch.
#[inline(always)]
fn weight_row<T: WithDType>(w: &[T], u: &mut [T], tmp: &mut Vec<T>) {
    let cin = w.len() / 9;
    let g = cast::<T, 6, 3>(&G);
    tmp.resize(12 * cin, T::zero());
    let (taps, gg) = tmp.split_at_mut(9 * cin);
    // taps[k][c] = w[c][k]
    for (c, w) in w.chunks_exact(9).enumerate() {
        for (k, v) in w.iter().enumerate() {
            taps[k * cin + c] = *v;
        }
    }
    let taps: Vec<&[T]> = taps.chunks_exact(cin).collect();
    for i in 0..6 {
        // gg[b][c] = Σ_a G[i][a]·w[a][b]
        for (b, out) in gg.chunks_exact_mut(cin).enumerate() {
            lincomb(out, &g[i], &[taps[b], taps[3 + b], taps[6 + b]]);
        }
        let gg: Vec<&[T]> = gg.chunks_exact(cin).collect();
        for (j, gj) in g.iter().enumerate() {
            lincomb(&mut u[(i * 6 + j) * cin..(i * 6 + j + 1) * cin], gj, &gg);
        }
    }
}
simd!(weight_row_simd, weight_row, (w: &[T], u: &mut [T], tmp: &mut Vec<T>));

/// `U` for all output channels, laid out [o][ξ][c].
fn weights<T: WithDType>(g: &Geom, w: &[T]) -> Vec<T> {
    let mut u = vec![T::zero(); g.cout * 36 * g.cin];
    u.par_chunks_mut(36 * g.cin)
        .zip(w.par_chunks(9 * g.cin))
        .for_each_init(Vec::new, |tmp, (u, w)| weight_row_simd(w, u, tmp));
    u
}

/// The four phases of `row` moved right by `shift` (0, or 1 for the
/// padding): `q[j][t] = row[4t + j − shift]`, zero where that is outside
/// the row; `q` holds the four runs of `qw` each.
#[inline(always)]
fn phases<T: WithDType>(row: &[T], shift: usize, q: &mut [T], qw: usize) {
    q.fill(T::zero());
    let (q0, rest) = q.split_at_mut(qw);
    let (q1, rest) = rest.split_at_mut(qw);
    let (q2, q3) = rest.split_at_mut(qw);
    // the values before the first whole quad, then whole quads, then the rest
    let head = ((4 - shift) % 4).min(row.len());
    for (x, v) in row[..head].iter().enumerate() {
        let p = x + shift;
        [&mut *q0, &mut *q1, &mut *q2, &mut *q3][p % 4][p / 4] = *v;
    }
    let t0 = (head + shift) / 4;
    let body = &row[head..];
    let quads = body.chunks_exact(4);
    let rem = quads.remainder();
    let dst = q0[t0..]
        .iter_mut()
        .zip(&mut q1[t0..])
        .zip(&mut q2[t0..])
        .zip(&mut q3[t0..]);
    for (c, (((a, b), e), f)) in quads.zip(dst) {
        (*a, *b, *e, *f) = (c[0], c[1], c[2], c[3]);
    }
    let t = t0 + body.len() / 4;
    for (j, v) in rem.iter().enumerate() {
        [&mut *q0, &mut *q1, &mut *q2][j][t] = *v;
    }
}

/// The transformed inputs of one channel `x` (H×W) for the tile rows
/// `ty0..ty0 + rows` (`tw` tiles each): `v` is [ξ][rows·tw].
#[inline(always)]
fn input_plane<T: WithDType>(g: &Geom, x: &[T], ty0: usize, rows: usize, v: &mut [T], tmp: &mut Vec<T>) {
    let tw = g.wo.div_ceil(4);
    let n_in = 4 * rows + 2;
    // tmp: the four phases of the input row padded by one on the left
    // (4 × (tw + 1)), and the column-transformed rows [r][k][tw]
    let qw = tw + 1;
    tmp.resize(4 * qw + n_in * 6 * tw, T::zero());
    let (q, colt) = tmp.split_at_mut(4 * qw);
    for r in 0..n_in {
        let out = &mut colt[r * 6 * tw..(r + 1) * 6 * tw];
        let y = (4 * ty0 + r) as isize - 1;
        if y < 0 || y >= g.h as isize {
            out.fill(T::zero());
            continue;
        }
        phases(&x[y as usize * g.w..][..g.w], 1, q, qw);
        let d = [
            &q[..tw],
            &q[qw..qw + tw],
            &q[2 * qw..2 * qw + tw],
            &q[3 * qw..3 * qw + tw],
            &q[1..1 + tw],
            &q[qw + 1..qw + 1 + tw],
        ];
        bt6(d, rows6(out, tw, tw));
    }
    let tt = rows * tw;
    for u in 0..rows {
        for k in 0..6 {
            let ins: [&[T]; 6] = std::array::from_fn(|r| &colt[((4 * u + r) * 6 + k) * tw..][..tw]);
            // the six outputs ξ = i·6 + k, i = 0..6
            bt6(ins, rows6(&mut v[k * tt + u * tw..], 6 * tt, tw));
        }
    }
}
simd!(input_plane_simd, input_plane, (g: &Geom, x: &[T], ty0: usize, rows: usize, v: &mut [T], tmp: &mut Vec<T>));

/// `Aᵀ M A` of output channel `o` for the tile rows `ty0..ty0 + rows`:
/// `m` is [ξ][rows·tw], `y` the channel's output plane (rows written in
/// full, then finished by the epilogue).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_plane<T: WithDType>(
    g: &Geom,
    m: &[T],
    ty0: usize,
    rows: usize,
    y: SyncPtr<T>,
    finish: &dyn Fn(&mut [T], usize),
    tmp: &mut Vec<T>,
) {
    let tw = g.wo.div_ceil(4);
    let tt = rows * tw;
    tmp.resize(24 * tw, T::zero());
    let qs = &mut tmp[..];
    for u in 0..rows {
        // qs[r][j] = Σ_i Aᵀ[r][i]·M[i][j]
        for j in 0..6 {
            let ins: [&[T]; 6] = std::array::from_fn(|i| &m[(i * 6 + j) * tt + u * tw..][..tw]);
            at4(ins, tw, |t, o| {
                for (r, v) in o.into_iter().enumerate() {
                    qs[(r * 6 + j) * tw + t] = v;
                }
            });
        }
        for r in 0..4 {
            let oy = 4 * (ty0 + u) + r;
            if oy >= g.ho {
                break;
            }
            // SAFETY: row oy of this channel's plane: inside it (oy < Ho),
            // and only this call writes it (channels and rows disjoint).
            let row = unsafe { std::slice::from_raw_parts_mut(y.get().add(oy * g.wo), g.wo) };
            let q: [&[T]; 6] = std::array::from_fn(|j| &qs[(r * 6 + j) * tw..][..tw]);
            let full = g.wo / 4;
            let (body, tail) = row.split_at_mut(4 * full);
            at4(q, full, |t, o| body[4 * t..4 * t + 4].copy_from_slice(&o));
            if !tail.is_empty() {
                let q: [&[T]; 6] = q.map(|s| &s[full..]);
                at4(q, 1, |_, o| tail.copy_from_slice(&o[..tail.len()]));
            }
            finish(row, oy * g.wo);
        }
    }
}
simd!(output_plane_simd, output_plane, (g: &Geom, m: &[T], ty0: usize, rows: usize, y: SyncPtr<T>, finish: &dyn Fn(&mut [T], usize), tmp: &mut Vec<T>));

/// The transformed output gradient `A ȳ_t Aᵀ` of one channel `gy` (Ho×Wo)
/// for the tile rows `ty0..ty0 + rows`: `m` is [ξ][rows·tw]. Positions
/// past the output's edge count as zero.
#[inline(always)]
fn grad_plane<T: WithDType>(g: &Geom, gy: &[T], ty0: usize, rows: usize, m: &mut [T], tmp: &mut Vec<T>) {
    let tw = g.wo.div_ceil(4);
    let tt = rows * tw;
    // tmp: the four phases of an output row (4 × tw), and the four
    // column-transformed rows of a tile row [r][j][tw]
    tmp.resize(4 * tw + 24 * tw, T::zero());
    let (q, colt) = tmp.split_at_mut(4 * tw);
    for u in 0..rows {
        for r in 0..4 {
            let out = &mut colt[r * 6 * tw..(r + 1) * 6 * tw];
            let y = 4 * (ty0 + u) + r;
            if y >= g.ho {
                out.fill(T::zero());
                continue;
            }
            phases(&gy[y * g.wo..][..g.wo], 0, q, tw);
            let ys: [&[T]; 4] = std::array::from_fn(|s| &q[s * tw..(s + 1) * tw]);
            a6(ys, rows6(out, tw, tw));
        }
        for j in 0..6 {
            let ins: [&[T]; 4] = std::array::from_fn(|r| &colt[(r * 6 + j) * tw..][..tw]);
            // the six outputs ξ = i·6 + j, i = 0..6
            a6(ins, rows6(&mut m[j * tt + u * tw..], 6 * tt, tw));
        }
    }
}
simd!(grad_plane_simd, grad_plane, (g: &Geom, gy: &[T], ty0: usize, rows: usize, m: &mut [T], tmp: &mut Vec<T>));

/// A matrix at `p` with row stride `rs`, column stride `cs`.
fn at_ptr<T>(p: *const T, rs: usize, cs: usize) -> Mat<T> {
    Mat {
        ptr: p,
        rs: rs as isize,
        cs: cs as isize,
    }
}

/// For each batch item `b` and block of `rows` tile rows from `ty0`:
/// transforms the item's input into `V` ([Cin][ξ][tiles]) and calls
/// `f(b, ty0, rows, V, M)` with `M` room for [Cout][ξ][tiles].
fn each_block<T: WithDType>(
    g: &Geom,
    x: &[T],
    rows: usize,
    mut f: impl FnMut(usize, usize, usize, &mut [T], &mut [T]),
) {
    let (th, tw) = (g.ho.div_ceil(4), g.wo.div_ceil(4));
    let rows = rows.clamp(1, th);
    let mut scratch = Scratch::take();
    let buf = scratch.get(rows * tw * 36 * (g.cin + g.cout));
    for (b, xb) in x.chunks(g.cin * g.h * g.w).enumerate() {
        for ty0 in (0..th).step_by(rows) {
            let rows = rows.min(th - ty0);
            let tt = rows * tw;
            let (v, m) = buf.split_at_mut(g.cin * 36 * tt);
            v.par_chunks_mut(36 * tt)
                .zip(xb.par_chunks(g.h * g.w))
                .for_each_init(Vec::new, |tmp, (v, x)| input_plane_simd(g, x, ty0, rows, v, tmp));
            f(b, ty0, rows, v, &mut m[..g.cout * 36 * tt]);
        }
    }
}

/// The convolution (see the module docs); the output is written in full.
pub(super) fn forward<T: WithDType>(g: &Geom, x: &[T], w: &[T], epi: Option<&Epilogue<T>>) -> Vec<T> {
    let tw = g.wo.div_ceil(4);
    let rows = BLOCK_ELEMS / (36 * (g.cin + g.cout) * tw);
    forward_blocks(g, x, w, epi, rows)
}

/// [`forward`] in blocks of `rows` tile rows (at least one).
fn forward_blocks<T: WithDType>(
    g: &Geom,
    x: &[T],
    w: &[T],
    epi: Option<&Epilogue<T>>,
    rows: usize,
) -> Vec<T> {
    assert!(
        g.k == 3 && g.s == 1 && g.p == 1,
        "winograd: 3x3, stride 1, padding 1 only"
    );
    assert_eq!(x.len(), g.n * g.cin * g.h * g.w, "conv2d input");
    assert_eq!(w.len(), g.cout * g.cin * 9, "conv2d weight");
    let u = weights(g, w);
    let l = g.ho * g.wo;
    let len = g.n * g.cout * l;
    let mut y: Vec<T> = Vec::with_capacity(len);
    let base = SyncPtr(y.as_mut_ptr());
    each_block(g, x, rows, |b, ty0, rows, v, m| {
        let tt = rows * g.wo.div_ceil(4);
        let (vp, mp) = (SyncPtr(v.as_mut_ptr()), SyncPtr(m.as_mut_ptr()));
        (0..36usize).into_par_iter().for_each(|xi| {
            // SAFETY: M[·][ξ][·] (Cout × tt at row stride 36·tt) is this
            // ξ's alone; U_ξ is Cout × Cin at row stride 36·Cin, V_ξ is
            // Cin × tt at row stride 36·tt, all inside their buffers.
            unsafe {
                gemm_raw(
                    mp.get().add(xi * tt),
                    36 * tt,
                    g.cout,
                    tt,
                    g.cin,
                    at_ptr(u.as_ptr().add(xi * g.cin), 36 * g.cin, 1),
                    at_ptr(vp.get().add(xi * tt), 36 * tt, 1),
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
        let m = &*m;
        (0..g.cout).into_par_iter().for_each_init(Vec::new, |tmp, o| {
            let finish = |row: &mut [T], at: usize| {
                if let Some(e) = epi {
                    e.finish(g, b, o, row, at);
                }
            };
            // SAFETY: channel o of item b lies within y's capacity.
            let plane = SyncPtr(unsafe { base.get().add((b * g.cout + o) * l) });
            output_plane_simd(
                g,
                &m[o * 36 * tt..(o + 1) * 36 * tt],
                ty0,
                rows,
                plane,
                &finish,
                tmp,
            );
        });
    });
    // SAFETY: every item's tile rows cover all output rows, and each output
    // channel's rows were written in full by `output_plane`.
    unsafe { y.set_len(len) };
    y
}

/// The weight gradient `gW = Σ_b Σ_t Gᵀ [(A ȳ_t Aᵀ) ⊙ (Bᵀ d_t B)] G` (the
/// adjoint of the forward in `W`): per block, 36 gemms `dU_ξ += Ŷ_ξ·V_ξᵀ`
/// (Cout × tiles times tiles × Cin) accumulated over blocks and items,
/// then `Gᵀ dU G` per channel pair.
pub(super) fn weight_grad<T: WithDType>(g: &Geom, x: &[T], gy: &[T]) -> Vec<T> {
    let tw = g.wo.div_ceil(4);
    let rows = BLOCK_ELEMS / (36 * (g.cin + g.cout) * tw);
    weight_grad_blocks(g, x, gy, rows)
}

/// [`weight_grad`] in blocks of `rows` tile rows (at least one).
fn weight_grad_blocks<T: WithDType>(g: &Geom, x: &[T], gy: &[T], rows: usize) -> Vec<T> {
    assert!(
        g.k == 3 && g.s == 1 && g.p == 1,
        "winograd: 3x3, stride 1, padding 1 only"
    );
    assert_eq!(x.len(), g.n * g.cin * g.h * g.w, "conv2d input");
    assert_eq!(gy.len(), g.n * g.cout * g.ho * g.wo, "conv2d output gradient");
    // dU[ξ][o][c]
    let mut du = vec![T::zero(); 36 * g.cout * g.cin];
    let dp = SyncPtr(du.as_mut_ptr());
    let mut first = true;
    each_block(g, x, rows, |b, ty0, rows, v, m| {
        let tt = rows * g.wo.div_ceil(4);
        let gyb = &gy[b * g.cout * g.ho * g.wo..][..g.cout * g.ho * g.wo];
        m.par_chunks_mut(36 * tt)
            .zip(gyb.par_chunks(g.ho * g.wo))
            .for_each_init(Vec::new, |tmp, (m, gy)| grad_plane_simd(g, gy, ty0, rows, m, tmp));
        let (v, m) = (&*v, &*m);
        (0..36usize).into_par_iter().for_each(|xi| {
            // SAFETY: dU_ξ (Cout × Cin, contiguous) is this ξ's alone and
            // initialised (zeros); Ŷ_ξ is Cout × tt at row stride 36·tt,
            // V_ξᵀ is tt × Cin with V_ξ's row stride as column stride.
            unsafe {
                gemm_raw(
                    dp.get().add(xi * g.cout * g.cin),
                    g.cin,
                    g.cout,
                    g.cin,
                    tt,
                    at_ptr(m.as_ptr().add(xi * tt), 36 * tt, 1),
                    at_ptr(v.as_ptr().add(xi * tt), 1, 36 * tt),
                    !first,
                    gemm::Parallelism::None,
                )
            }
        });
        first = false;
    });
    let mut gw = vec![T::zero(); g.cout * g.cin * 9];
    let du = &du;
    gw.par_chunks_mut(g.cin * 9)
        .enumerate()
        .for_each_init(Vec::new, |tmp, (o, gw)| weight_grad_row_simd(g, du, o, gw, tmp));
    gw
}

/// `gW[o][c] = Gᵀ dU[·][o][c] G` for one output channel `o`.
#[inline(always)]
fn weight_grad_row<T: WithDType>(g: &Geom, du: &[T], o: usize, gw: &mut [T], tmp: &mut Vec<T>) {
    let gm = cast::<T, 6, 3>(&G);
    let cin = g.cin;
    tmp.resize(7 * cin, T::zero());
    let (t1, out) = tmp.split_at_mut(6 * cin);
    for a in 0..3 {
        let ga: [T; 6] = std::array::from_fn(|i| gm[i][a]);
        // t1[j][c] = Σ_i G[i][a]·dU[i·6 + j][o][c]
        for (j, t) in t1.chunks_exact_mut(cin).enumerate() {
            let ins: [&[T]; 6] = std::array::from_fn(|i| &du[((i * 6 + j) * g.cout + o) * cin..][..cin]);
            lincomb(t, &ga, &ins);
        }
        let ins: Vec<&[T]> = t1.chunks_exact(cin).collect();
        for b in 0..3 {
            let gb: [T; 6] = std::array::from_fn(|j| gm[j][b]);
            lincomb(out, &gb, &ins);
            for (c, v) in out.iter().enumerate() {
                gw[c * 9 + a * 3 + b] = *v;
            }
        }
    }
}
simd!(weight_grad_row_simd, weight_grad_row, (g: &Geom, du: &[T], o: usize, gw: &mut [T], tmp: &mut Vec<T>));

/// The input gradient `gX = conv(gY, W')` with `W'[c][o] = flip(W[o][c])`,
/// for a layer where [`applies`] holds with input and output swapped.
pub(super) fn input_grad<T: WithDType>(g: &Geom, gy: &[T], w: &[T]) -> Vec<T> {
    let mut wt = vec![T::zero(); w.len()];
    for o in 0..g.cout {
        for c in 0..g.cin {
            for k in 0..9 {
                wt[(c * g.cout + o) * 9 + 8 - k] = w[(o * g.cin + c) * 9 + k];
            }
        }
    }
    let gt = transposed(g);
    forward(&gt, gy, &wt, None)
}

/// The geometry of a stride-1, padding-1 3x3 layer's input gradient.
pub(super) fn transposed(g: &Geom) -> Geom {
    Geom {
        cin: g.cout,
        cout: g.cin,
        h: g.ho,
        w: g.wo,
        ho: g.h,
        wo: g.w,
        ..*g
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Shape, Tensor};

    /// Bᵀ and Aᵀ of Lavin & Gray's F(4x4, 3x3) as matrices: `bt6`, `at4`
    /// and `a6` are hand-simplified forms of them and of A.
    const BT: [[f64; 6]; 6] = [
        [4., 0., -5., 0., 1., 0.],
        [0., -4., -4., 1., 1., 0.],
        [0., 4., -4., -1., 1., 0.],
        [0., -2., -1., 2., 1., 0.],
        [0., 2., -1., -2., 1., 0.],
        [0., 4., 0., -5., 0., 1.],
    ];
    const AT: [[f64; 6]; 4] = [
        [1., 1., 1., 1., 1., 0.],
        [0., 1., -1., 2., -2., 0.],
        [0., 1., 1., 4., 4., 0.],
        [0., 1., -1., 8., -8., 1.],
    ];

    fn randn(n: usize, seed: u64) -> Vec<f64> {
        crate::testing::randn(seed, 0f64, 1., n, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn transforms_are_the_matrices() {
        let n = 5;
        let d: Vec<Vec<f64>> = (0..6).map(|j| randn(n, j)).collect();
        let ins: [&[f64]; 6] = std::array::from_fn(|j| &d[j][..]);
        let mut out = vec![0f64; 6 * n];
        {
            let mut it = out.chunks_exact_mut(n);
            bt6(ins, std::array::from_fn(|_| it.next().unwrap()));
        }
        let mut out4 = vec![[0f64; 4]; n];
        at4(ins, n, |t, o| out4[t] = o);
        let mut out6 = vec![0f64; 6 * n];
        {
            let mut it = out6.chunks_exact_mut(n);
            a6(
                std::array::from_fn(|s| &d[s][..]),
                std::array::from_fn(|_| it.next().unwrap()),
            );
        }
        for t in 0..n {
            for (k, row) in BT.iter().enumerate() {
                let want: f64 = (0..6).map(|j| row[j] * d[j][t]).sum();
                assert!((out[k * n + t] - want).abs() < 1e-12, "Bᵀ row {k}");
            }
            for (r, row) in AT.iter().enumerate() {
                let want: f64 = (0..6).map(|j| row[j] * d[j][t]).sum();
                assert!((out4[t][r] - want).abs() < 1e-12, "Aᵀ row {r}");
            }
            for j in 0..6 {
                let want: f64 = (0..4).map(|s| AT[s][j] * d[s][t]).sum();
                assert!((out6[j * n + t] - want).abs() < 1e-12, "A row {j}");
            }
        }
    }

    fn geom(n: usize, cin: usize, h: usize, w: usize, cout: usize) -> Geom {
        Geom::new(
            &Shape::from((n, cin, h, w)),
            &Shape::from((cout, cin, 3, 3)),
            1,
            1,
        )
        .unwrap()
    }

    /// candle's own (direct) convolution in f64: the reference.
    fn reference(x: &[f64], w: &[f64], g: &Geom) -> Vec<f64> {
        let dev = Device::Cpu;
        let xt = Tensor::from_slice(x, (g.n, g.cin, g.h, g.w), &dev).unwrap();
        let wt = Tensor::from_slice(w, (g.cout, g.cin, 3, 3), &dev).unwrap();
        xt.conv2d(&wt, 1, 1, 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn f32s(v: &[f64]) -> Vec<f32> {
        v.iter().map(|v| *v as f32).collect()
    }

    /// `got` (f64) within rounding of `want`, and `got32` (the same in f32)
    /// within F(4x4)'s f32 error, both relative to `want`'s largest value.
    fn close(got: &[f64], got32: &[f32], want: &[f64], g: &Geom) {
        assert_eq!((got.len(), got32.len()), (want.len(), want.len()));
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-12 * scale, "f64 {a} vs {b} ({g:?})");
        }
        let err = got32
            .iter()
            .zip(want)
            .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        assert!(err < 1e-5 * scale, "f32 error {err} of {scale} ({g:?})");
    }

    /// Every size class of the tiling (whole tiles, partial last tiles,
    /// maps smaller than one tile, several blocks of tile rows) against
    /// the direct sum: in f64 to rounding, which also checks the transforms'
    /// coefficients; in f32 within F(4x4)'s known error.
    #[test]
    fn forward_matches_the_direct_convolution() {
        for (n, cin, h, w, cout, rows) in [
            (1, 3, 8, 8, 2, 9),
            (2, 5, 13, 10, 4, 1),
            (1, 4, 1, 2, 3, 1),
            (1, 2, 3, 5, 5, 9),
            (1, 8, 23, 17, 9, 2),
            (2, 16, 9, 30, 8, 9),
        ] {
            let g = geom(n, cin, h, w, cout);
            let (x, wt) = (randn(n * cin * h * w, 11), randn(cout * cin * 9, 12));
            let want = reference(&x, &wt, &g);
            let got = forward_blocks(&g, &x, &wt, None, rows);
            let got32 = forward_blocks(&g, &f32s(&x), &f32s(&wt), None, rows);
            close(&got, &got32, &want, &g);
        }
    }

    /// The input gradient against the im2col path's (which is checked by
    /// finite differences in `conv::tests`).
    #[test]
    fn input_gradient_matches_the_direct_one() {
        for (n, cin, h, w, cout) in [(1, 3, 7, 9, 4), (2, 9, 12, 11, 8)] {
            let g = geom(n, cin, h, w, cout);
            let (gy, wt) = (randn(n * cout * h * w, 13), randn(cout * cin * 9, 14));
            let want = crate::conv::input_grad_direct(&g, &gy, &wt);
            let got = input_grad(&g, &gy, &wt);
            let got32 = input_grad(&g, &f32s(&gy), &f32s(&wt));
            close(&got, &got32, &want, &g);
        }
    }

    /// The weight gradient against the im2col path's (checked by finite
    /// differences in `conv::tests`): f64 to rounding, several blocks and
    /// items; f32 within F(4x4)'s error.
    #[test]
    fn weight_gradient_matches_the_direct_one() {
        for (n, cin, h, w, cout, rows) in [(1, 3, 7, 9, 4, 9), (2, 9, 13, 11, 8, 1), (3, 4, 2, 5, 2, 9)] {
            let g = geom(n, cin, h, w, cout);
            let (x, gy) = (randn(n * cin * h * w, 15), randn(n * cout * h * w, 16));
            let want = crate::conv::weight_grad_direct(&g, &x, &gy);
            let got = weight_grad_blocks(&g, &x, &gy, rows);
            let got32 = weight_grad_blocks(&g, &f32s(&x), &f32s(&gy), rows);
            close(&got, &got32, &want, &g);
        }
    }

    #[test]
    fn only_stride_one_padded_3x3_layers_of_some_size_apply() {
        assert!(applies(&geom(1, 16, 32, 32, 16)));
        // 4 tiles in all
        assert!(!applies(&geom(1, 16, 8, 8, 16)));
        // 3 input channels (the stem)
        assert!(!applies(&geom(1, 3, 32, 32, 16)));
        let strided = Geom::new(&Shape::from((1, 16, 64, 64)), &Shape::from((16, 16, 3, 3)), 2, 1).unwrap();
        assert!(!applies(&strided));
        let pointwise = Geom::new(&Shape::from((1, 16, 64, 64)), &Shape::from((16, 16, 1, 1)), 1, 0).unwrap();
        assert!(!applies(&pointwise));
    }
}

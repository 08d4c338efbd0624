//! Element-wise passes: normalizing and the input gradient, for a row
//! (per-feature γ, β), a slice of one channel (scalar coefficients), or a
//! row of `[N, C·S]` with per-position coefficients (BatchNorm1d).
//!
//! Each pass loads one vector of eight values at a time, widened in
//! registers ([`convert::load_n`]), computes its lanes and stores them
//! narrowed straight from registers ([`convert::fill!`]), streamed when
//! asked; streaming stores are fenced by the kernel that issued them. At
//! the AVX-512 level most passes take sixteen values per step (`V16`), the
//! same operations per value; the `[N, C·S]` passes take their rows in
//! groups of [`ROW_GROUP`].

use std::mem::MaybeUninit;

use super::activation::{self as act_lanes, unswitch, Act};
use super::convert::{self, load, load16, load_n, store16, Store, VECTOR};
use super::sums::{centred_segment_of, centred_tail, SEGMENT, WIDE};
use super::vector::{V16, V8};
use crate::alloc::Scratch;
use crate::float::{Float, Lane};
use crate::simd::{simd_fn, Isa};

/// `n` (at most eight) lanes of `v` from `at`, the rest `pad`.
#[inline(always)]
pub(crate) fn lanes_n<C: Lane>(v: &[C], at: usize, n: usize, pad: C) -> [C; VECTOR] {
    let mut out = [pad; VECTOR];
    if n == VECTOR {
        out.copy_from_slice(&v[at..at + VECTOR]);
    } else {
        for (o, &value) in out.iter_mut().zip(&v[at..at + n]) {
            *o = value;
        }
    }
    out
}

/// Writes the first `n` (at most eight) lanes of `v` to `dst[at..]` (a
/// whole vector as one store; a copy of run-time length would be a call).
#[inline(always)]
pub(crate) fn put_n<C: Lane>(dst: &mut [C], at: usize, n: usize, v: [C; VECTOR]) {
    if n == VECTOR {
        dst[at..at + VECTOR].copy_from_slice(&v);
    } else {
        for (d, &value) in dst[at..at + n].iter_mut().zip(&v) {
            *d = value;
        }
    }
}

/// `y = φ(((x - hi) - lo)·scale + shift)`, vector by vector ([`convert::fill!`]).
#[inline(always)]
fn normalize_blocks<T: Float, L: Isa>(
    x: &[T],
    base: usize,
    y: &mut [MaybeUninit<T>],
    (hi, lo, scale, shift): (T::Lane, T::Lane, T::Lane, T::Lane),
    store: Store,
    act: Act,
) {
    // At the AVX-512 level, sixteen values per step in 512-bit registers
    // (half the instructions: BatchNorm on 7×7 maps is bound by them, not
    // by memory), the same operations per value; streaming stores, and
    // the last values, go through the eight-lane loop.
    let mut done = 0;
    if L::AVX512 && store == Store::Cached {
        let (hi16, lo16) = (V16::<T::Lane, L>::splat(hi), V16::splat(lo));
        let (scale16, shift16) = (V16::splat(scale), V16::splat(shift));
        let whole = y.len() / 16 * 16;
        while done < whole {
            let xv = load16::<T, L>(x, base + done);
            let (z0, z1) = (((xv - hi16) - lo16) * scale16 + shift16).halves();
            store16::<T, L>(
                y,
                done,
                V16::join(act_lanes::apply(act, z0), act_lanes::apply(act, z1)),
            );
            done += 16;
        }
    }
    let (hi_v, lo_v) = (V8::<T::Lane, L>::splat(hi), V8::splat(lo));
    let (scale_v, shift_v) = (V8::splat(scale), V8::splat(shift));
    convert::fill!(T, L, &mut y[done..], store, |at, n| {
        let xv = V8::new(load_n::<T, L>(x, base + done + at, n, hi));
        act_lanes::apply(act, ((xv - hi_v) - lo_v) * scale_v + shift_v).lanes
    });
}

simd_fn! {
    /// `y = φ(((x - hi) - lo)·scale + shift)` with scalar `scale`, `shift` (one
    /// channel), stored from registers block by block (BatchNorm eval on
    /// `[32, 64, 56, 56]` f32: 1.32 against 1.47 ms with a copy-out block).
    pub fn normalize_slice<T: Float>[L](x: &[T], y: &mut [MaybeUninit<T>], hi: T::Lane, lo: T::Lane, scale: T::Lane, shift: T::Lane, store: Store, act: Act) {
        unswitch!(act, {
        normalize_blocks::<T, L>(x, 0, &mut y[..x.len()], (hi, lo, scale, shift), store, act);
        convert::fence(store);
        })
    }
}

simd_fn! {
    /// Normalizes `x` into `y` as [`normalize_slice`] while summing
    /// `(Σd, Σd²)`, `d = v - next_shift`, over `next`, one segment (128
    /// values) of each in turn: the statistics of the next slice are read
    /// from memory while this one is written, so reads and writes stream at
    /// the same time instead of taking turns. The sums depend on `next`
    /// alone (with `x` empty this is a plain statistics pass, with the same
    /// bits as [`super::sums::centred_sums`]). Streaming stores are left
    /// unfenced: the caller calls [`convert::fence`] when done.
    pub fn normalize_and_sum_next<T: Float>[L](x: &[T], y: &mut [MaybeUninit<T>], hi: T::Lane, lo: T::Lane, scale: T::Lane, shift: T::Lane, store: Store, next: &[T], next_shift: T::Lane, act: Act) -> (f64, f64) {
        unswitch!(act, {
        let coefs = (hi, lo, scale, shift);
        let (mut lanes1, mut lanes2) = ([0f64; WIDE], [0f64; WIDE]);
        let whole = next.len() / SEGMENT * SEGMENT;
        let (mut at_x, mut at_next) = (0, 0);
        while at_x < x.len() || at_next < whole {
            if at_next < whole {
                centred_segment_of::<T, L>(&next[at_next..], next_shift, &mut lanes1, &mut lanes2);
                at_next += SEGMENT;
            }
            if at_x < x.len() {
                let end = (at_x + SEGMENT).min(x.len());
                normalize_blocks::<T, L>(x, at_x, &mut y[at_x..end], coefs, store, act);
                at_x = end;
            }
        }
        centred_tail::<T, L>(&next[whole..], next_shift, &mut lanes1, &mut lanes2);
        (lanes1.iter().sum::<f64>(), lanes2.iter().sum::<f64>())
        })
    }
}

simd_fn! {
    /// `y = φ(((x - hi) - lo)·rstd·w + b)` with per-element `w`, `b` (LayerNorm,
    /// RMSNorm; callers pass ones and zeros for absent parameters, which
    /// changes no bit of the result).
    pub fn normalize_row<T: Float>[L](x: &[T], y: &mut [MaybeUninit<T>], hi: T::Lane, lo: T::Lane, rstd: T::Lane, w: &[T::Lane], b: &[T::Lane], store: Store, act: Act) {
        unswitch!(act, {
        let zero = <T::Lane as Lane>::ZERO;
        let y = &mut y[..x.len()];
        // Sixteen values per step at the AVX-512 level, as in
        // [`normalize_blocks`].
        let mut done = 0;
        if L::AVX512 && store == Store::Cached {
            let (hi16, lo16, rstd16) = (V16::<T::Lane, L>::splat(hi), V16::splat(lo), V16::splat(rstd));
            let whole = y.len() / 16 * 16;
            while done < whole {
                let xv = load16::<T, L>(x, done);
                let z = ((xv - hi16) - lo16) * rstd16 * lanes16(&w[done..done + 16]) + lanes16(&b[done..done + 16]);
                let (z0, z1) = z.halves();
                store16::<T, L>(y, done, V16::join(act_lanes::apply(act, z0), act_lanes::apply(act, z1)));
                done += 16;
            }
        }
        let (hi_v, lo_v, rstd_v) = (V8::<T::Lane, L>::splat(hi), V8::splat(lo), V8::splat(rstd));
        convert::fill!(T, L, &mut y[done..], store, |at, n| {
            let at = done + at;
            let xv = V8::new(load_n::<T, L>(x, at, n, hi));
            let (wv, bv) = (V8::new(lanes_n(w, at, n, zero)), V8::new(lanes_n(b, at, n, zero)));
            act_lanes::apply(act, ((xv - hi_v) - lo_v) * rstd_v * wv + bv).lanes
        });
        convert::fence(store);
        })
    }
}

simd_fn! {
    /// One row of LayerNorm/RMSNorm backward, second pass:
    /// `dx = rstd·(g - mean_g) + b·((x - hi) - lo)`, with `g = w·dz` as the
    /// first pass ([`super::sums::row_grad_sums`]) computed and stored it
    /// (fused, `dz = φ'(z)·dy`: the activation is evaluated once). The same
    /// operations as recomputing `g` here, so the same bits; LayerNorm
    /// backward on `[8192, 1024]` f32, one thread, fastest of 80 runs in
    /// three alternating rounds: 6.5–7.1 against 7.0–7.7 ms.
    pub fn row_dx<T: Float>[L](x: &[T], g: &[T::Lane], hi: T::Lane, lo: T::Lane, rstd: T::Lane, mean_g: T::Lane, b: T::Lane, dx: &mut [MaybeUninit<T>], store: Store) {
        let zero = <T::Lane as Lane>::ZERO;
        let dx = &mut dx[..x.len()];
        // Sixteen values per step at the AVX-512 level, as in [`normalize_blocks`].
        let mut done = 0;
        if L::AVX512 && store == Store::Cached {
            let s16 = V16::<T::Lane, L>::splat;
            let (hi16, lo16, rstd16, mean_g16, b16) = (s16(hi), s16(lo), s16(rstd), s16(mean_g), s16(b));
            let whole = dx.len() / 16 * 16;
            while done < whole {
                let xc = (load16::<T, L>(x, done) - hi16) - lo16;
                let gv = lanes16::<_, L>(&g[done..done + 16]);
                store16::<T, L>(dx, done, rstd16 * (gv - mean_g16) + b16 * xc);
                done += 16;
            }
        }
        let (hi_v, lo_v, rstd_v) = (V8::<T::Lane, L>::splat(hi), V8::splat(lo), V8::splat(rstd));
        let (mean_g_v, b_v) = (V8::splat(mean_g), V8::splat(b));
        convert::fill!(T, L, &mut dx[done..], store, |at, n| {
            let at = done + at;
            let xv = V8::new(load_n::<T, L>(x, at, n, hi));
            let gv = V8::new(lanes_n(g, at, n, zero));
            let xc = (xv - hi_v) - lo_v;
            (rstd_v * (gv - mean_g_v) + b_v * xc).lanes
        });
        convert::fence(store);
    }
}

simd_fn! {
    /// `dx = rstd·(w·dz - mean_g) + b·((x - hi) - lo)` over one slice (one
    /// channel: `w` is a scalar); `dz = dy`, or fused `φ'(z)·dy` with `z`
    /// from the forward's `[scale, shift]` (see [`normalize_slice`]).
    pub fn slice_dx<T: Float>[L](x: &[T], dy: &[T], hi: T::Lane, lo: T::Lane, rstd: T::Lane, w: T::Lane, mean_g: T::Lane, b: T::Lane, dx: &mut [MaybeUninit<T>], store: Store, z_scale: T::Lane, z_shift: T::Lane, act: Act) {
        unswitch!(act, {
        slice_dx_blocks::<T, L>(x, dy, 0, [hi, lo, rstd, w, mean_g, b, z_scale, z_shift], &mut dx[..x.len()], store, act);
        convert::fence(store);
        })
    }
}

/// The body of [`slice_dx`] and [`input_grad_slices`], unfenced.
#[inline(always)]
fn slice_dx_blocks<T: Float, L: Isa>(
    x: &[T],
    dy: &[T],
    base: usize,
    [hi, lo, rstd, w, mean_g, b, scale, shift]: [T::Lane; 8],
    dx: &mut [MaybeUninit<T>],
    store: Store,
    act: Act,
) {
    let zero = <T::Lane as Lane>::ZERO;
    // Sixteen values per step at the AVX-512 level, as in [`normalize_blocks`].
    let mut done = 0;
    if L::AVX512 && store == Store::Cached {
        let s16 = V16::<T::Lane, L>::splat;
        let (hi16, lo16, rstd16, w16) = (s16(hi), s16(lo), s16(rstd), s16(w));
        let (mean_g16, b16, scale16, shift16) = (s16(mean_g), s16(b), s16(scale), s16(shift));
        let whole = dx.len() / 16 * 16;
        while done < whole {
            let xc = (load16::<T, L>(x, base + done) - hi16) - lo16;
            let ((d0, d1), (z0, z1)) = (
                load16::<T, L>(dy, base + done).halves(),
                (xc * scale16 + shift16).halves(),
            );
            let dz = V16::join(act_lanes::grad(act, d0, z0), act_lanes::grad(act, d1, z1));
            store16::<T, L>(dx, done, rstd16 * (w16 * dz - mean_g16) + b16 * xc);
            done += 16;
        }
    }
    let (hi_v, lo_v, rstd_v) = (V8::<T::Lane, L>::splat(hi), V8::splat(lo), V8::splat(rstd));
    let (w_v, mean_g_v, b_v) = (V8::splat(w), V8::splat(mean_g), V8::splat(b));
    let (scale_v, shift_v) = (V8::splat(scale), V8::splat(shift));
    let base = base + done;
    convert::fill!(T, L, &mut dx[done..], store, |at, n| {
        let xv = V8::new(load_n::<T, L>(x, base + at, n, hi));
        let dv = V8::new(load_n::<T, L>(dy, base + at, n, zero));
        let xc = (xv - hi_v) - lo_v;
        let dz = act_lanes::grad(act, dv, xc * scale_v + shift_v);
        (rstd_v * (w_v * dz - mean_g_v) + b_v * xc).lanes
    });
}

/// Per-position coefficients of a row of `[N, C·S]` (BatchNorm on a small
/// spatial size): position `j` belongs to channel `j / S`, and each array
/// holds that channel's value at every position of the row, so that a row
/// is one element-wise pass.
#[derive(Debug)]
pub struct PositionCoefs<C: Copy> {
    /// `hi` of the channel mean.
    pub hi: Scratch<C>,
    /// `lo` of the channel mean.
    pub lo: Scratch<C>,
    /// Multiplies the centred `x`: `rstd·γ` forward, `b` backward.
    pub scale: Scratch<C>,
    /// Forward: `β`. Backward: `rstd·γ`, multiplying `dy`.
    pub shift: Scratch<C>,
    /// Backward: `rstd·mean_g`, subtracted (forward: empty).
    pub offset: Scratch<C>,
    /// Fused backward: the forward's `scale` and `shift`, from which `z` is
    /// recomputed (otherwise empty).
    pub z_scale: Scratch<C>,
    /// See `z_scale`.
    pub z_shift: Scratch<C>,
}

/// Rows of `[N, C·S]` a positions pass takes together: each vector of
/// per-position coefficients is loaded once for this many rows. One row at
/// a time, a BatchNorm1d row's pass was bound by its loads (four
/// coefficient vectors for each vector of `x`).
pub const ROW_GROUP: usize = 4;

simd_fn! {
    /// Whole rows of `[N, C·S]` (`x.len()` a multiple of the row,
    /// `k.hi.len()`): `y = ((x - hi_j) - lo_j)·scale_j + shift_j`, in groups
    /// of [`ROW_GROUP`] rows, column vector by column vector. Whole vectors
    /// through zipped chunks, so that the coefficients' bounds are checked
    /// once per row group and their pointers stay in registers, then the
    /// partial one.
    pub fn normalize_positions<T: Float>[L](x: &[T], y: &mut [MaybeUninit<T>], k: &PositionCoefs<T::Lane>, act: Act) {
        unswitch!(act, {
        let row = k.hi.len();
        if x.is_empty() {
            return;
        }
        debug_assert!(row > 0 && x.len().is_multiple_of(row), "normalize_positions: whole rows of the coefficients' length (the callers pass whole rows)");
        let whole = row - row % VECTOR;
        // Sixteen columns per step at the AVX-512 level (as in
        // `normalize_blocks`), then eight.
        let wide = if L::AVX512 { row / 16 * 16 } else { 0 };
        let y = &mut y[..x.len()];
        for (xg, yg) in x.chunks(row * ROW_GROUP).zip(y.chunks_mut(row * ROW_GROUP)) {
            let rows = xg.len() / row;
            let coefs16 = k.hi[..wide].chunks_exact(16)
                .zip(k.lo[..wide].chunks_exact(16))
                .zip(k.scale[..wide].chunks_exact(16).zip(k.shift[..wide].chunks_exact(16)));
            for (j, ((hi, lo), (scale, shift))) in coefs16.enumerate() {
                let (hi, lo, scale, shift) = (lanes16::<_, L>(hi), lanes16(lo), lanes16(scale), lanes16(shift));
                for r in 0..rows {
                    let at = r * row + j * 16;
                    let (z0, z1) = (((load16::<T, L>(xg, at) - hi) - lo) * scale + shift).halves();
                    store16::<T, L>(yg, at, V16::join(act_lanes::apply(act, z0), act_lanes::apply(act, z1)));
                }
            }
            let coefs = k.hi[wide..whole].chunks_exact(VECTOR)
                .zip(k.lo[wide..whole].chunks_exact(VECTOR))
                .zip(k.scale[wide..whole].chunks_exact(VECTOR).zip(k.shift[wide..whole].chunks_exact(VECTOR)));
            for (j, ((hi, lo), (scale, shift))) in coefs.enumerate() {
                let (hi, lo, scale, shift) = (lanes8::<_, L>(hi), lanes8(lo), lanes8(scale), lanes8(shift));
                for r in 0..rows {
                    let at = r * row + wide + j * VECTOR;
                    let xv = V8::<T::Lane, L>::new(load::<T, L>(xg, at));
                    let v = act_lanes::apply(act, ((xv - hi) - lo) * scale + shift);
                    convert::store_n::<T, L>(yg, at, VECTOR, v.lanes, false);
                }
            }
            let n = row - whole;
            if n > 0 {
                let zero = <T::Lane as Lane>::ZERO;
                let part = |v: &[T::Lane]| V8::<T::Lane, L>::new(lanes_n(v, whole, n, zero));
                let (hi, lo, scale, shift) = (part(&k.hi), part(&k.lo), part(&k.scale), part(&k.shift));
                for r in 0..rows {
                    let at = r * row + whole;
                    let xv = V8::new(load_n::<T, L>(xg, at, n, zero));
                    let v = act_lanes::apply(act, ((xv - hi) - lo) * scale + shift);
                    convert::store_n::<T, L>(yg, at, n, v.lanes, false);
                }
            }
        }
        })
    }
}

simd_fn! {
    /// Whole rows of `[N, C·S]`, as [`normalize_positions`]:
    /// `dx = shift_j·dz - offset_j + scale_j·((x - hi_j) - lo_j)`, i.e.
    /// `rstd·(γ·dz - mean_g) + b·(x - μ)` per channel, `dz = dy` or, fused,
    /// `φ'(z)·dy` with `z = ((x - hi_j) - lo_j)·z_scale_j + z_shift_j`.
    pub fn input_grad_positions<T: Float>[L](x: &[T], dy: &[T], dx: &mut [MaybeUninit<T>], k: &PositionCoefs<T::Lane>, act: Act) {
        unswitch!(act, {
        let row = k.hi.len();
        if x.is_empty() {
            return;
        }
        debug_assert!(row > 0 && x.len().is_multiple_of(row), "input_grad_positions: whole rows of the coefficients' length (the callers pass whole rows)");
        if act.is_some() {
            return input_grad_positions_fused::<T, L>(x, dy, dx, k, act);
        }
        let whole = row - row % VECTOR;
        // Sixteen columns per step at the AVX-512 level, then eight.
        let wide = if L::AVX512 { row / 16 * 16 } else { 0 };
        let dx = &mut dx[..x.len()];
        let groups = x.chunks(row * ROW_GROUP).zip(dy.chunks(row * ROW_GROUP)).zip(dx.chunks_mut(row * ROW_GROUP));
        for ((xg, dg), og) in groups {
            let rows = xg.len() / row;
            let coefs16 = k.hi[..wide].chunks_exact(16)
                .zip(k.lo[..wide].chunks_exact(16))
                .zip(k.scale[..wide].chunks_exact(16))
                .zip(k.shift[..wide].chunks_exact(16).zip(k.offset[..wide].chunks_exact(16)));
            for (j, (((hi, lo), scale), (shift, offset))) in coefs16.enumerate() {
                let (hi, lo, scale) = (lanes16::<_, L>(hi), lanes16(lo), lanes16(scale));
                let (shift, offset) = (lanes16::<_, L>(shift), lanes16(offset));
                for r in 0..rows {
                    let at = r * row + j * 16;
                    let (xv, dv) = (load16::<T, L>(xg, at), load16::<T, L>(dg, at));
                    store16::<T, L>(og, at, (shift * dv - offset) + scale * ((xv - hi) - lo));
                }
            }
            let coefs = k.hi[wide..whole].chunks_exact(VECTOR)
                .zip(k.lo[wide..whole].chunks_exact(VECTOR))
                .zip(k.scale[wide..whole].chunks_exact(VECTOR))
                .zip(k.shift[wide..whole].chunks_exact(VECTOR).zip(k.offset[wide..whole].chunks_exact(VECTOR)));
            for (j, (((hi, lo), scale), (shift, offset))) in coefs.enumerate() {
                let (hi, lo, scale) = (lanes8::<_, L>(hi), lanes8(lo), lanes8(scale));
                let (shift, offset) = (lanes8::<_, L>(shift), lanes8(offset));
                for r in 0..rows {
                    let at = r * row + wide + j * VECTOR;
                    let xv = V8::new(load::<T, L>(xg, at));
                    let dv = V8::new(load::<T, L>(dg, at));
                    let v = (shift * dv - offset) + scale * ((xv - hi) - lo);
                    convert::store_n::<T, L>(og, at, VECTOR, v.lanes, false);
                }
            }
            let n = row - whole;
            if n > 0 {
                let zero = <T::Lane as Lane>::ZERO;
                let part = |v: &[T::Lane]| V8::<T::Lane, L>::new(lanes_n(v, whole, n, zero));
                let (hi, lo, scale) = (part(&k.hi), part(&k.lo), part(&k.scale));
                let (shift, offset) = (part(&k.shift), part(&k.offset));
                for r in 0..rows {
                    let at = r * row + whole;
                    let xv = V8::new(load_n::<T, L>(xg, at, n, zero));
                    let dv = V8::new(load_n::<T, L>(dg, at, n, zero));
                    let v = (shift * dv - offset) + scale * ((xv - hi) - lo);
                    convert::store_n::<T, L>(og, at, n, v.lanes, false);
                }
            }
        }
        })
    }
}

/// What recomputing `z = (x - μ)·scale + shift` per position needs in a
/// fused backward: the activation and the forward's per-position
/// coefficients (empty without an activation).
#[derive(Clone, Copy, Debug)]
pub struct ZCoefs<'a, C> {
    /// The fused activation, if any.
    pub act: Act,
    /// The forward's `rstd·γ` per position.
    pub scale: &'a [C],
    /// The forward's `β` per position.
    pub shift: &'a [C],
}

impl<C> ZCoefs<'_, C> {
    /// No activation.
    pub fn none() -> Self {
        Self {
            act: None,
            scale: &[],
            shift: &[],
        }
    }
}

/// Sixteen lanes of `v`, a whole sixteen-value chunk.
#[inline(always)]
fn lanes16<C: Lane, L: Isa>(v: &[C]) -> V16<C, L> {
    V16::new(v.try_into().expect("sixteen lanes"))
}

/// Eight lanes of `v`, a whole-vector chunk.
#[inline(always)]
fn lanes8<C: Lane, L: Isa>(v: &[C]) -> V8<C, L> {
    V8::new(v.try_into().expect("eight lanes"))
}

simd_fn! {
    /// Adds a group of rows of `[N, C·S]` (the same columns of each, at most
    /// a flush's worth) to per-position f64 sums: for each position `j`,
    /// the lane sums over the rows, in row order, of `d = x_j - shift_j` and
    /// `d²`, or with `dy` given (one row of `dy` per row of `x`) of `dy_j`
    /// and `dy_j·((x_j - hi_j) - lo_j)·rstd_j` (then `shift` holds `hi`;
    /// without `dy`, `lo` and `rstd` are not read), widened and added to
    /// `w1_j`, `w2_j`. The lane sums stay in registers: kept in lane arrays
    /// (written back at every row, then read again to flush them into f64),
    /// they made the flush a third of the statistics pass.
    pub fn add_row_group<T: Float>[L](x: &[&[T]], dy: Option<&[&[T]]>, shift: &[T::Lane], lo: &[T::Lane], rstd: &[T::Lane], w1: &mut [f64], w2: &mut [f64], z: ZCoefs<'_, T::Lane>) {
        let act = z.act;
        unswitch!(act, {
        let z = { let mut v = z; v.act = act; v };
        let len = w1.len();
        let whole = len - len % VECTOR;
        let w2 = &mut w2[..len];
        let zero = V8::<T::Lane, L>::zero();
        // Closures inlined, or their vector operations would be calls
        // compiled without the level's features.
        let add = {
            #[inline(always)]
            |w: &mut [f64], at: usize, v: V8<T::Lane, L>| {
                let out = &mut w[at..at + VECTOR];
                out.copy_from_slice(&(lanes8::<f64, L>(out) + v.wide()).lanes);
            }
        };
        let add16 = {
            #[inline(always)]
            |w: &mut [f64], at: usize, v: V16<T::Lane, L>| {
                let (a, b) = v.halves();
                add(w, at, a);
                add(w, at + VECTOR, b);
            }
        };
        // Sixteen columns per step at the AVX-512 level (half the
        // instructions; the same operations per lane), then eight.
        let wide = if L::AVX512 { len / 16 * 16 } else { 0 };
        let zero16 = V16::<T::Lane, L>::zero();
        match dy {
            None => {
                for at in (0..wide).step_by(16) {
                    let sh = lanes16(&shift[at..at + 16]);
                    let (mut a1, mut a2) = (zero16, zero16);
                    for r in x {
                        let d = load16::<T, L>(r, at) - sh;
                        a1 = a1 + d;
                        a2 = a2 + d * d;
                    }
                    add16(w1, at, a1);
                    add16(w2, at, a2);
                }
                for at in (wide..whole).step_by(VECTOR) {
                    let sh = lanes8(&shift[at..at + VECTOR]);
                    let (mut a1, mut a2) = (zero, zero);
                    for r in x {
                        let d = V8::new(load::<T, L>(r, at)) - sh;
                        a1 += d;
                        a2 += d * d;
                    }
                    add(w1, at, a1);
                    add(w2, at, a2);
                }
                for j in whole..len {
                    let (mut a1, mut a2) = (<T::Lane as Lane>::ZERO, <T::Lane as Lane>::ZERO);
                    for r in x {
                        let d = r[j].to_lane() - shift[j];
                        a1 += d;
                        a2 += d * d;
                    }
                    w1[j] += a1.wide();
                    w2[j] += a2.wide();
                }
            }
            Some(dy) => {
                for at in (0..wide).step_by(16) {
                    let (hi, lo, r) = (lanes16(&shift[at..at + 16]), lanes16(&lo[at..at + 16]), lanes16(&rstd[at..at + 16]));
                    let (zs, zb) = match z.act {
                        Some(_) => (lanes16(&z.scale[at..at + 16]), lanes16(&z.shift[at..at + 16])),
                        None => (zero16, zero16),
                    };
                    let (mut a1, mut a2) = (zero16, zero16);
                    for (xr, dr) in x.iter().zip(dy) {
                        let xc = (load16::<T, L>(xr, at) - hi) - lo;
                        let ((d0, d1), (z0, z1)) = (load16::<T, L>(dr, at).halves(), (xc * zs + zb).halves());
                        let dv = V16::join(act_lanes::grad(z.act, d0, z0), act_lanes::grad(z.act, d1, z1));
                        a1 = a1 + dv;
                        a2 = a2 + dv * (xc * r);
                    }
                    add16(w1, at, a1);
                    add16(w2, at, a2);
                }
                for at in (wide..whole).step_by(VECTOR) {
                    let (hi, lo, r) = (lanes8(&shift[at..at + VECTOR]), lanes8(&lo[at..at + VECTOR]), lanes8(&rstd[at..at + VECTOR]));
                    let (zs, zb) = match z.act {
                        Some(_) => (lanes8(&z.scale[at..at + VECTOR]), lanes8(&z.shift[at..at + VECTOR])),
                        None => (zero, zero),
                    };
                    let (mut a1, mut a2) = (zero, zero);
                    for (xr, dr) in x.iter().zip(dy) {
                        let xv = V8::new(load::<T, L>(xr, at));
                        let xc = (xv - hi) - lo;
                        let dv = act_lanes::grad(z.act, V8::new(load::<T, L>(dr, at)), xc * zs + zb);
                        let xh = xc * r;
                        a1 += dv;
                        a2 += dv * xh;
                    }
                    add(w1, at, a1);
                    add(w2, at, a2);
                }
                for j in whole..len {
                    let (mut a1, mut a2) = (<T::Lane as Lane>::ZERO, <T::Lane as Lane>::ZERO);
                    for (xr, dr) in x.iter().zip(dy) {
                        let xc = (xr[j].to_lane() - shift[j]) - lo[j];
                        let dv = match z.act {
                            Some(_) => {
                                let one = |v: <T as Float>::Lane| V8::<T::Lane, L>::splat(v);
                                act_lanes::grad(z.act, one(dr[j].to_lane()), one(xc) * one(z.scale[j]) + one(z.shift[j])).lanes[0]
                            }
                            None => dr[j].to_lane(),
                        };
                        let xh = xc * rstd[j];
                        a1 += dv;
                        a2 += dv * xh;
                    }
                    w1[j] += a1.wide();
                    w2[j] += a2.wide();
                }
            }
        }
        })
    }
}

simd_fn! {
    /// Adds one row to per-position lane sums: `acc_j += x_j`.
    pub fn sum_positions<T: Float>[L](x: &[T], acc: &mut [T::Lane]) {
        let len = x.len();
        let whole = len - len % VECTOR;
        let acc = &mut acc[..len];
        for (k, a) in acc[..whole].chunks_exact_mut(VECTOR).enumerate() {
            let sum = lanes8::<_, L>(a) + V8::new(load::<T, L>(x, k * VECTOR));
            a.copy_from_slice(&sum.lanes);
        }
        for j in whole..len {
            acc[j] += x[j].to_lane();
        }
    }
}

simd_fn! {
    /// Normalizes a run of short slices (consecutive channels of a sample,
    /// `s` values each, fewer than a cache page): slice `j` with the
    /// coefficients `[hi, lo, scale, shift]` of channel `(first + j) % C`,
    /// `C = coefs.len()`. One dispatch for the run instead of one per slice;
    /// ordinary stores (streaming pays only for long runs of one slice).
    pub fn normalize_slices<T: Float>[L](x: &[T], y: &mut [MaybeUninit<T>], s: usize, first: usize, coefs: &[[T::Lane; 4]], act: Act) {
        unswitch!(act, {
        let c = coefs.len();
        let mut ch = first % c;
        // Each slice loads from the whole run, so that its last, partial
        // vector is one load of values the run goes on with (see `load_n`).
        for (j, ys) in y[..x.len()].chunks_exact_mut(s).enumerate() {
            let [hi, lo, scale, shift] = coefs[ch];
            normalize_blocks::<T, L>(x, j * s, ys, (hi, lo, scale, shift), Store::Cached, act);
            ch = if ch + 1 == c { 0 } else { ch + 1 };
        }
        })
    }
}

simd_fn! {
    /// The input gradient of a run of short slices, as [`normalize_slices`]:
    /// `dx = rstd·(w·dz - mean_g) + b·((x - hi) - lo)` with the coefficients
    /// `[hi, lo, rstd, w, mean_g, b, scale, shift]` of channel `(first + j) % C`
    /// (`scale`, `shift`: the forward's, for `z` when fused).
    pub fn input_grad_slices<T: Float>[L](x: &[T], dy: &[T], dx: &mut [MaybeUninit<T>], s: usize, first: usize, coefs: &[[T::Lane; 8]], act: Act) {
        unswitch!(act, {
        let c = coefs.len();
        let mut ch = first % c;
        for (j, os) in dx[..x.len()].chunks_exact_mut(s).enumerate() {
            slice_dx_blocks::<T, L>(x, dy, j * s, coefs[ch], os, Store::Cached, act);
            ch = if ch + 1 == c { 0 } else { ch + 1 };
        }
        })
    }
}

/// [`input_grad_positions`] with an activation: whole vectors with the
/// coefficients of their positions, then the partial one, row by row.
#[inline(always)]
fn input_grad_positions_fused<T: Float, L: Isa>(
    x: &[T],
    dy: &[T],
    dx: &mut [MaybeUninit<T>],
    k: &PositionCoefs<T::Lane>,
    act: Act,
) {
    // Row by row (the fused form has seven coefficient vectors, more than
    // stay in registers across a row group).
    let len = k.hi.len();
    let rows = x
        .chunks_exact(len)
        .zip(dy.chunks_exact(len))
        .zip(dx.chunks_exact_mut(len));
    let whole = len - len % VECTOR;
    for ((x, dy), dx) in rows {
        for at in (0..whole).step_by(VECTOR) {
            let c8 = |v: &[T::Lane]| lanes8::<_, L>(&v[at..at + VECTOR]);
            let xv = V8::new(load::<T, L>(x, at));
            let dv = V8::new(load::<T, L>(dy, at));
            let xc = (xv - c8(&k.hi)) - c8(&k.lo);
            let dz = act_lanes::grad(act, dv, xc * c8(&k.z_scale) + c8(&k.z_shift));
            let v = (c8(&k.shift) * dz - c8(&k.offset)) + c8(&k.scale) * xc;
            convert::store_n::<T, L>(dx, at, VECTOR, v.lanes, false);
        }
        let n = len - whole;
        if n > 0 {
            let zero = <T::Lane as Lane>::ZERO;
            let part = |v: &[T::Lane]| V8::<T::Lane, L>::new(lanes_n(v, whole, n, zero));
            let xv = V8::new(load_n::<T, L>(x, whole, n, zero));
            let dv = V8::new(load_n::<T, L>(dy, whole, n, zero));
            let xc = (xv - part(&k.hi)) - part(&k.lo);
            let dz = act_lanes::grad(act, dv, xc * part(&k.z_scale) + part(&k.z_shift));
            let v = (part(&k.shift) * dz - part(&k.offset)) + part(&k.scale) * xc;
            convert::store_n::<T, L>(dx, whole, n, v.lanes, false);
        }
    }
}

simd_fn! {
    /// `y = φ(z)` over a slice: the activation alone (the unfused form).
    pub fn activate<T: Float>[L](z: &[T], y: &mut [MaybeUninit<T>], act: Act) {
        unswitch!(act, {
        let zero = <T::Lane as Lane>::ZERO;
        convert::fill!(T, L, &mut y[..z.len()], Store::Cached, |at, n| {
            act_lanes::apply(act, V8::<T::Lane, L>::new(load_n::<T, L>(z, at, n, zero))).lanes
        });
        })
    }
}

simd_fn! {
    /// `dz = φ'·dy` from the activation's output `y`, as PyTorch's unfused
    /// backward takes it (`threshold_backward`: 0 where `y ≤ 0`;
    /// `tanh_backward`: `dy·(1 - y·y)`; `sigmoid_backward`: `dy·(1 - y)·y`).
    pub fn activation_grad<T: Float>[L](y: &[T], dy: &[T], dz: &mut [MaybeUninit<T>], act: Act) {
        unswitch!(act, {
        let zero = <T::Lane as Lane>::ZERO;
        convert::fill!(T, L, &mut dz[..y.len()], Store::Cached, |at, n| {
            let yv = V8::<T::Lane, L>::new(load_n::<T, L>(y, at, n, zero));
            let dv = V8::new(load_n::<T, L>(dy, at, n, zero));
            act_lanes::grad_from_output(act, dv, yv).lanes
        });
        })
    }
}

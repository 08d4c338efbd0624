//! Element-wise passes: normalizing and the input gradient, for a row
//! (per-feature γ, β), a slice of one channel (scalar coefficients), or a
//! row of `[N, C·S]` with per-position coefficients (BatchNorm1d).
//!
//! Each pass computes a short block of lane values and stores it through
//! [`convert::write`], which narrows to the storage type and streams when
//! asked; streaming stores are fenced by the kernel that issued them.

use std::mem::MaybeUninit;

use super::convert::{self, Store};
use super::sums::{centred_segment, centred_tail, SEGMENT, WIDE};
use crate::float::{Float, Lane};
use crate::simd::{simd_fn, Isa};

/// Values per register block of [`fill_blocks`]: computed, then stored
/// straight from registers. Blocks of 8 (one vector) measured slower, in
/// bf16 most: BatchNorm eval `[1, 256, 56, 56]` forward 0.36–0.44 against
/// 0.21 ms, GroupNorm(32) `[2, 320, 64, 64]` 1.7–2.2 against 1.2–1.3 ms
/// (`normlab bench --threads 2 --suite models`, two alternating rounds).
const REGISTER_BLOCK: usize = 32;

/// Values a row or backward pass computes per block: its loops read two or
/// more inputs, and longer blocks amortize the per-block slicing (64
/// measured slower for the f32 backward).
pub const ROW_BLOCK: usize = 512;

/// Fills `y` block by block: `block(start, values, scratch)` computes the
/// lane values of `y[start..start + values.len()]`, with two blocks of
/// scratch lanes to widen its inputs into. Whole [`REGISTER_BLOCK`]s are
/// stored from registers, streamed when `store` says so and `y` is 16-byte
/// aligned there; the values before the first aligned block and after the
/// last whole one through the same writer (an ordinary store into the lines
/// between streamed ones measured far slower on 784-value slices). The
/// buffers are made once per call: zeroing them per block cost as much as
/// the arithmetic.
#[inline(always)]
fn fill_blocks<T: Float, L: Isa>(
    y: &mut [MaybeUninit<T>],
    store: Store,
    block: impl Fn(usize, &mut [T::Lane], &mut Scratch<T::Lane>),
) {
    let len = y.len();
    let head = convert::unaligned_head(y);
    let mut values = [T::Lane::ZERO; REGISTER_BLOCK];
    let mut scratch = [[T::Lane::ZERO; REGISTER_BLOCK]; 2];
    block(0, &mut values[..head], &mut scratch);
    convert::write::<T, L>(&mut y[..head], &values[..head], Store::Cached);
    let mut i = head;
    while i + REGISTER_BLOCK <= len {
        block(i, &mut values, &mut scratch);
        convert::write::<T, L>(&mut y[i..i + REGISTER_BLOCK], &values, store);
        i += REGISTER_BLOCK;
    }
    let rest = len - i;
    block(i, &mut values[..rest], &mut scratch);
    convert::write::<T, L>(&mut y[i..], &values[..rest], store);
}

/// Two register blocks of lanes to widen a block's inputs into.
type Scratch<C> = [[C; REGISTER_BLOCK]; 2];

/// `y = ((x - hi) - lo)·scale + shift` through [`fill_blocks`].
#[inline(always)]
fn normalize_blocks<T: Float, L: Isa>(
    x: &[T],
    y: &mut [MaybeUninit<T>],
    (hi, lo, scale, shift): (T::Lane, T::Lane, T::Lane, T::Lane),
    store: Store,
) {
    fill_blocks::<T, L>(&mut y[..x.len()], store, |at, values, [buf, _]| {
        let n = values.len();
        let xs = T::lanes::<L>(&x[at..at + n], buf);
        for (v, &xv) in values.iter_mut().zip(xs) {
            *v = ((xv - hi) - lo) * scale + shift;
        }
    });
}

simd_fn! {
    /// `y = ((x - hi) - lo)·scale + shift` with scalar `scale`, `shift` (one
    /// channel), stored from registers block by block (BatchNorm eval on
    /// `[32, 64, 56, 56]` f32: 1.32 against 1.47 ms with a copy-out block).
    pub fn normalize_slice<T: Float>[L](x: &[T], y: &mut [MaybeUninit<T>], hi: T::Lane, lo: T::Lane, scale: T::Lane, shift: T::Lane, store: Store) {
        normalize_blocks::<T, L>(x, y, (hi, lo, scale, shift), store);
        convert::fence(store);
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
    pub fn normalize_and_sum_next<T: Float>[L](x: &[T], y: &mut [MaybeUninit<T>], hi: T::Lane, lo: T::Lane, scale: T::Lane, shift: T::Lane, store: Store, next: &[T], next_shift: T::Lane) -> (f64, f64) {
        let coefs = (hi, lo, scale, shift);
        let (mut lanes1, mut lanes2) = ([0f64; WIDE], [0f64; WIDE]);
        let mut buf = [<T::Lane as Lane>::ZERO; SEGMENT];
        let whole = next.len() / SEGMENT * SEGMENT;
        let (mut at_x, mut at_next) = (0, 0);
        while at_x < x.len() || at_next < whole {
            if at_next < whole {
                let seg = T::lanes::<L>(&next[at_next..at_next + SEGMENT], &mut buf);
                centred_segment(seg, next_shift, &mut lanes1, &mut lanes2);
                at_next += SEGMENT;
            }
            if at_x < x.len() {
                let end = (at_x + SEGMENT).min(x.len());
                normalize_blocks::<T, L>(&x[at_x..end], &mut y[at_x..end], coefs, store);
                at_x = end;
            }
        }
        centred_tail(T::lanes::<L>(&next[whole..], &mut buf), next_shift, &mut lanes1, &mut lanes2);
        (lanes1.iter().sum::<f64>(), lanes2.iter().sum::<f64>())
    }
}

simd_fn! {
    /// `y = ((x - hi) - lo)·rstd·w + b` with per-element `w`, `b` (LayerNorm,
    /// RMSNorm; callers pass ones and zeros for absent parameters, which
    /// changes no bit of the result).
    pub fn normalize_row<T: Float>[L](x: &[T], y: &mut [MaybeUninit<T>], hi: T::Lane, lo: T::Lane, rstd: T::Lane, w: &[T::Lane], b: &[T::Lane], store: Store) {
        fill_blocks::<T, L>(&mut y[..x.len()], store, |at, values, [buf, _]| {
            let n = values.len();
            let xs = T::lanes::<L>(&x[at..at + n], buf);
            for (((o, &xv), &wv), &bv) in values.iter_mut().zip(xs).zip(&w[at..at + n]).zip(&b[at..at + n]) {
                *o = ((xv - hi) - lo) * rstd * wv + bv;
            }
        });
        convert::fence(store);
    }
}

simd_fn! {
    /// One row of LayerNorm/RMSNorm backward, second pass:
    /// `dx = rstd·(w·dy - mean_g) + b·((x - hi) - lo)`.
    pub fn row_dx<T: Float>[L](x: &[T], dy: &[T], w: &[T::Lane], hi: T::Lane, lo: T::Lane, rstd: T::Lane, mean_g: T::Lane, b: T::Lane, dx: &mut [MaybeUninit<T>], store: Store, scratch: &mut RowScratch<T::Lane>) {
        let [xb, db, values, _] = &mut scratch.0;
        for (k, out) in dx[..x.len()].chunks_mut(ROW_BLOCK).enumerate() {
            let (at, n) = (k * ROW_BLOCK, out.len());
            let xs = T::lanes::<L>(&x[at..at + n], xb);
            let ds = T::lanes::<L>(&dy[at..at + n], db);
            let values = &mut values[..n];
            for (((o, &xv), &d), &wv) in values.iter_mut().zip(xs).zip(ds).zip(&w[at..at + n]) {
                *o = rstd * (d * wv - mean_g) + b * ((xv - hi) - lo);
            }
            convert::write::<T, L>(out, values, store);
        }
        convert::fence(store);
    }
}

simd_fn! {
    /// `dx = rstd·(w·dy - mean_g) + b·((x - hi) - lo)` over one slice (one
    /// channel: `w` is a scalar).
    pub fn slice_dx<T: Float>[L](x: &[T], dy: &[T], hi: T::Lane, lo: T::Lane, rstd: T::Lane, w: T::Lane, mean_g: T::Lane, b: T::Lane, dx: &mut [MaybeUninit<T>], store: Store) {
        fill_blocks::<T, L>(&mut dx[..x.len()], store, |at, values, [xb, db]| {
            let n = values.len();
            let xs = T::lanes::<L>(&x[at..at + n], xb);
            let ds = T::lanes::<L>(&dy[at..at + n], db);
            for ((v, &xv), &d) in values.iter_mut().zip(xs).zip(ds) {
                *v = rstd * (w * d - mean_g) + b * ((xv - hi) - lo);
            }
        });
        convert::fence(store);
    }
}

/// Lane buffers of the row passes ([`row_dx`],
/// [`super::sums::row_grad_sums`]): four blocks of [`ROW_BLOCK`] lanes,
/// made once per task by the caller ([`RowScratch::new`]) rather than
/// zeroed on every call.
pub struct RowScratch<C>(pub(crate) [Vec<C>; 4]);

impl<C: Lane> RowScratch<C> {
    /// Zeroed buffers.
    pub fn new() -> Self {
        Self(std::array::from_fn(|_| vec![C::ZERO; ROW_BLOCK]))
    }
}

impl<C: Lane> Default for RowScratch<C> {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-position coefficients of a row of `[N, C·S]` (BatchNorm on a small
/// spatial size): position `j` belongs to channel `j / S`, and each array
/// holds that channel's value at every position of the row, so that a row
/// is one element-wise pass.
#[derive(Clone, Debug, Default)]
pub struct PositionCoefs<C> {
    /// `hi` of the channel mean.
    pub hi: Vec<C>,
    /// `lo` of the channel mean.
    pub lo: Vec<C>,
    /// Multiplies the centred `x`: `rstd·γ` forward, `b` backward.
    pub scale: Vec<C>,
    /// Forward: `β`. Backward: `rstd·γ`, multiplying `dy`.
    pub shift: Vec<C>,
    /// Backward: `rstd·mean_g`, subtracted.
    pub offset: Vec<C>,
}

simd_fn! {
    /// One row of `[N, C·S]`: `y = ((x - hi_j) - lo_j)·scale_j + shift_j`.
    pub fn normalize_positions<T: Float>[L](x: &[T], y: &mut [MaybeUninit<T>], k: &PositionCoefs<T::Lane>) {
        let mut xb = [<T::Lane as Lane>::ZERO; ROW_BLOCK];
        let mut values = [<T::Lane as Lane>::ZERO; ROW_BLOCK];
        for (i, out) in y[..x.len()].chunks_mut(ROW_BLOCK).enumerate() {
            let (at, n) = (i * ROW_BLOCK, out.len());
            let xs = T::lanes::<L>(&x[at..at + n], &mut xb);
            let values = &mut values[..n];
            let (hi, lo) = (&k.hi[at..at + n], &k.lo[at..at + n]);
            let (scale, shift) = (&k.scale[at..at + n], &k.shift[at..at + n]);
            for j in 0..n {
                values[j] = ((xs[j] - hi[j]) - lo[j]) * scale[j] + shift[j];
            }
            convert::write::<T, L>(out, values, Store::Cached);
        }
    }
}

simd_fn! {
    /// One row of `[N, C·S]`: `dx = shift_j·dy - offset_j + scale_j·((x - hi_j) - lo_j)`,
    /// i.e. `rstd·(γ·dy - mean_g) + b·(x - μ)` per channel.
    pub fn input_grad_positions<T: Float>[L](x: &[T], dy: &[T], dx: &mut [MaybeUninit<T>], k: &PositionCoefs<T::Lane>) {
        let mut xb = [<T::Lane as Lane>::ZERO; ROW_BLOCK];
        let mut db = [<T::Lane as Lane>::ZERO; ROW_BLOCK];
        let mut values = [<T::Lane as Lane>::ZERO; ROW_BLOCK];
        for (i, out) in dx[..x.len()].chunks_mut(ROW_BLOCK).enumerate() {
            let (at, n) = (i * ROW_BLOCK, out.len());
            let xs = T::lanes::<L>(&x[at..at + n], &mut xb);
            let ds = T::lanes::<L>(&dy[at..at + n], &mut db);
            let values = &mut values[..n];
            let (hi, lo, scale) = (&k.hi[at..at + n], &k.lo[at..at + n], &k.scale[at..at + n]);
            let (shift, offset) = (&k.shift[at..at + n], &k.offset[at..at + n]);
            for j in 0..n {
                values[j] = (shift[j] * ds[j] - offset[j]) + scale[j] * ((xs[j] - hi[j]) - lo[j]);
            }
            convert::write::<T, L>(out, values, Store::Cached);
        }
    }
}

simd_fn! {
    /// Adds one row of `[N, C·S]` to per-position lane sums: `s1_j += x_j - shift_j`,
    /// `s2_j += (x_j - shift_j)²`, or with `dy` given, `s1_j += dy_j`,
    /// `s2_j += dy_j·((x_j - hi_j) - lo_j)·rstd_j` (then `shift` holds
    /// `hi`; without `dy`, `lo` and `rstd` are not read).
    pub fn add_positions<T: Float>[L](x: &[T], dy: Option<&[T]>, shift: &[T::Lane], lo: &[T::Lane], rstd: &[T::Lane], s1: &mut [T::Lane], s2: &mut [T::Lane]) {
        let mut xb = [<T::Lane as Lane>::ZERO; ROW_BLOCK];
        let mut db = [<T::Lane as Lane>::ZERO; ROW_BLOCK];
        for (i, xc) in x.chunks(ROW_BLOCK).enumerate() {
            let (at, n) = (i * ROW_BLOCK, xc.len());
            let xs = T::lanes::<L>(xc, &mut xb);
            let (sh, a, b) = (&shift[at..at + n], &mut s1[at..at + n], &mut s2[at..at + n]);
            match dy {
                None => {
                    for j in 0..n {
                        let d = xs[j] - sh[j];
                        a[j] += d;
                        b[j] += d * d;
                    }
                }
                Some(dy) => {
                    let ds = T::lanes::<L>(&dy[at..at + n], &mut db);
                    let (lo, r) = (&lo[at..at + n], &rstd[at..at + n]);
                    for j in 0..n {
                        a[j] += ds[j];
                        b[j] += ds[j] * (((xs[j] - sh[j]) - lo[j]) * r[j]);
                    }
                }
            }
        }
    }
}

simd_fn! {
    /// Adds one row to per-position lane sums: `acc_j += x_j`.
    pub fn sum_positions<T: Float>[L](x: &[T], acc: &mut [T::Lane]) {
        let mut xb = [<T::Lane as Lane>::ZERO; ROW_BLOCK];
        for (i, xc) in x.chunks(ROW_BLOCK).enumerate() {
            let at = i * ROW_BLOCK;
            let xs = T::lanes::<L>(xc, &mut xb);
            for (a, &v) in acc[at..at + xs.len()].iter_mut().zip(xs) {
                *a += v;
            }
        }
    }
}

/// Values per vector block of the short-slice passes: one AVX2 vector.
const SHORT_BLOCK: usize = 8;

/// Runs `block(at, values, scratch)` over a slice of `len` values in
/// vector blocks of [`SHORT_BLOCK`] and writes each block's lane values to
/// `out[at..]`: whole blocks as fixed-size arrays (so that their widening
/// and narrowing are single vector instructions, not calls copying a few
/// values), then the last values.
#[inline(always)]
fn short_blocks<T: Float, L: Isa>(
    out: &mut [MaybeUninit<T>],
    block: impl Fn(usize, &mut [T::Lane]),
) {
    let zero = T::Lane::ZERO;
    let mut values = [zero; SHORT_BLOCK];
    let whole = out.len() / SHORT_BLOCK * SHORT_BLOCK;
    let (head, rest) = out.split_at_mut(whole);
    for (k, chunk) in head.chunks_exact_mut(SHORT_BLOCK).enumerate() {
        block(k * SHORT_BLOCK, &mut values);
        let chunk: &mut [MaybeUninit<T>; SHORT_BLOCK] =
            chunk.try_into().expect("chunks_exact gives whole blocks");
        convert::write::<T, L>(chunk, &values, Store::Cached);
    }
    let n = rest.len();
    block(whole, &mut values[..n]);
    convert::write::<T, L>(rest, &values[..n], Store::Cached);
}

/// The lanes of `x[at..at + n]`, `n = buf.len()`: a whole block widened as
/// a fixed-size array.
#[inline(always)]
fn block_lanes<'a, T: Float, L: Isa>(
    x: &'a [T],
    at: usize,
    buf: &'a mut [T::Lane; SHORT_BLOCK],
    n: usize,
) -> &'a [T::Lane] {
    if n == SHORT_BLOCK {
        let src: &[T; SHORT_BLOCK] = x[at..at + SHORT_BLOCK].try_into().expect("a whole block");
        T::lanes::<L>(src, buf)
    } else {
        T::lanes::<L>(&x[at..at + n], buf)
    }
}

simd_fn! {
    /// Normalizes a run of short slices (consecutive channels of a sample,
    /// `s` values each, fewer than a cache page): slice `j` with the
    /// coefficients `[hi, lo, scale, shift]` of channel `(first + j) % C`,
    /// `C = coefs.len()`. One dispatch for the run instead of one per slice;
    /// ordinary stores (streaming pays only for long runs of one slice).
    pub fn normalize_slices<T: Float>[L](x: &[T], y: &mut [MaybeUninit<T>], s: usize, first: usize, coefs: &[[T::Lane; 4]]) {
        let c = coefs.len();
        let mut ch = first % c;
        for (xs, ys) in x.chunks_exact(s).zip(y.chunks_exact_mut(s)) {
            let [hi, lo, scale, shift] = coefs[ch];
            short_blocks::<T, L>(ys, |at, values| {
                let mut xb = [<T::Lane as Lane>::ZERO; SHORT_BLOCK];
                let xv = block_lanes::<T, L>(xs, at, &mut xb, values.len());
                for (v, &xv) in values.iter_mut().zip(xv) {
                    *v = ((xv - hi) - lo) * scale + shift;
                }
            });
            ch = if ch + 1 == c { 0 } else { ch + 1 };
        }
    }
}

simd_fn! {
    /// The input gradient of a run of short slices, as [`normalize_slices`]:
    /// `dx = rstd·(w·dy - mean_g) + b·((x - hi) - lo)` with the coefficients
    /// `[hi, lo, rstd, w, mean_g, b]` of channel `(first + j) % C`.
    pub fn input_grad_slices<T: Float>[L](x: &[T], dy: &[T], dx: &mut [MaybeUninit<T>], s: usize, first: usize, coefs: &[[T::Lane; 6]]) {
        let c = coefs.len();
        let mut ch = first % c;
        let slices = x.chunks_exact(s).zip(dy.chunks_exact(s)).zip(dx.chunks_exact_mut(s));
        for ((xs, ds), os) in slices {
            let [hi, lo, rstd, w, mean_g, b] = coefs[ch];
            short_blocks::<T, L>(os, |at, values| {
                let (mut xb, mut db) = ([<T::Lane as Lane>::ZERO; SHORT_BLOCK], [<T::Lane as Lane>::ZERO; SHORT_BLOCK]);
                let n = values.len();
                let xv = block_lanes::<T, L>(xs, at, &mut xb, n);
                let dv = block_lanes::<T, L>(ds, at, &mut db, n);
                for ((v, &xv), &d) in values.iter_mut().zip(xv).zip(dv) {
                    *v = rstd * (w * d - mean_g) + b * ((xv - hi) - lo);
                }
            });
            ch = if ch + 1 == c { 0 } else { ch + 1 };
        }
    }
}

//! Reductions: the centred sums behind every mean and variance, and the
//! per-group gradient sums of the backward passes.
//!
//! Accuracy is kept as in an f64 computation by three devices:
//! - statistics: values are centred on a shift `s` close to the mean, and
//!   `Σ(x - s)`, `Σ(x - s)²` are summed in lanes over segments (four terms
//!   per lane, four lanes folded: at most 16 terms in the lane type), then
//!   in f64 across segments; `x - s` is exact in f32 (Sterbenz) whenever
//!   |μ| ≫ σ;
//! - centring: the f64 mean is split as `μ = hi + lo` ([`Lane::split`]) and
//!   `x - μ` computed as `(x - hi) - lo`;
//! - gradient sums are accumulated in f64 the same way.
//!
//! Reductions use fixed lane arrays, so every level returns the same bits.

use super::activation::{self as act_lanes, unswitch, Act};
use crate::float::{Float, Lane};
use crate::simd::convert::{load, load16, load_n, prefetch, VECTOR};
use crate::simd::transform::{lanes_n, put_n};
use crate::simd::vector::{V16, V8};
use crate::simd::{simd_fn, Isa};

/// Lanes of a segment sum (four AVX2 vectors of f32, so that four
/// independent add chains hide the add latency), and terms each lane sums
/// before the flush into f64.
pub const LANES: usize = 32;
const FLUSH: usize = 4;
/// Values per segment: each lane adds [`FLUSH`] of them.
pub const SEGMENT: usize = LANES * FLUSH;

/// f64 lanes of [`centred_segment`]'s running sums.
pub const WIDE: usize = 8;

/// Sums lanes of a reduction in a fixed order.
#[inline(always)]
fn reduce64(acc: &[f64]) -> f64 {
    acc.iter().sum()
}

/// The f64 lanes of [`GROUPS`] vectors summed in lane order.
#[inline(always)]
fn sum_groups<L: Isa>(a: [V8<f64, L>; GROUPS]) -> f64 {
    a.iter().flat_map(|v| v.lanes).sum()
}

/// Vectors of [`VECTOR`] lanes that make up the [`LANES`] of a segment sum.
const GROUPS: usize = LANES / VECTOR;

/// Adds `Σd`, `Σd²` (`d = v - shift`) of `vectors` vectors (a multiple of
/// [`GROUPS`]; `load(at)` gives the lanes of values `at..at + 8`) to the
/// f64 lanes `s1`, `s2`: lane sums of [`FLUSH`] terms, folded to [`WIDE`]
/// lanes (16 terms each), then added in f64 lane by lane. The lanes are
/// summed once, at the end: a sum of all 32 lanes per segment would be one
/// long chain of dependent f64 additions, which measured slower than the
/// memory traffic.
#[inline(always)]
pub(crate) fn centred_segment<C: Lane, L: Isa>(
    vectors: usize,
    load: impl Fn(usize) -> [C; VECTOR],
    shift: C,
    s1: &mut [f64; WIDE],
    s2: &mut [f64; WIDE],
) {
    let shift_v = V8::<C, L>::splat(shift);
    let (mut d1, mut d2) = ([V8::<C, L>::zero(); GROUPS], [V8::<C, L>::zero(); GROUPS]);
    for first in (0..vectors).step_by(GROUPS) {
        for g in 0..GROUPS {
            let d = V8::new(load((first + g) * VECTOR)) - shift_v;
            d1[g] += d;
            d2[g] += d * d;
        }
    }
    let a = (d1[0] + d1[1]) + (d1[2] + d1[3]);
    let b = (d2[0] + d2[1]) + (d2[2] + d2[3]);
    *s1 = (V8::new(*s1) + a.wide()).lanes;
    *s2 = (V8::new(*s2) + b.wide()).lanes;
}

/// [`centred_segment`] over one whole [`SEGMENT`] of `x`.
#[inline(always)]
pub(crate) fn centred_segment_of<T: Float, L: Isa>(
    x: &[T],
    shift: T::Lane,
    s1: &mut [f64; WIDE],
    s2: &mut [f64; WIDE],
) {
    let x = &x[..SEGMENT];
    centred_segment::<_, L>(SEGMENT / VECTOR, |at| load::<T, L>(x, at), shift, s1, s2);
}

/// Adds the values left over after the whole segments (fewer than
/// [`SEGMENT`]) as whole groups of [`LANES`] padded with `shift`, whose
/// `d = 0` adds nothing: short slices (a 7×7 feature map) take the vector
/// loop too, padded to a multiple of 32 values rather than a whole segment.
#[inline(always)]
pub(crate) fn centred_tail<T: Float, L: Isa>(
    tail: &[T],
    shift: T::Lane,
    s1: &mut [f64; WIDE],
    s2: &mut [f64; WIDE],
) {
    let len = tail.len();
    let used = len.div_ceil(LANES) * LANES;
    // Vectors past the values are all padding (`load_n` of no values).
    let load = {
        // Inlined, or its loads would be calls (see `grad_terms`).
        #[inline(always)]
        |at: usize| load_n::<T, L>(tail, at, len.saturating_sub(at).min(VECTOR), shift)
    };
    centred_segment::<_, L>(used / VECTOR, load, shift, s1, s2);
}

/// Values a short-slice lane vector sums before its flush into f64: four
/// terms per lane, as the segments do.
const SHORT_GROUP: usize = VECTOR * FLUSH;

/// `(Σ f(x, y), Σ g(x, y))`, `(f, g) = fg(x, y)`, of a slice shorter than a [`SEGMENT`] (a 7×7 or
/// 8×8 feature map): one vector of lanes, four terms per lane before each
/// flush into f64 lanes, the last values padded with `pad_x`, `pad_y`
/// (whose terms must be zero). Widened eight at a time in registers, so no
/// buffer the size of a segment is filled.
#[inline(always)]
fn short_sums2<T: Float, L: Isa>(
    x: &[T],
    y: &[T],
    (base, len): (usize, usize),
    (pad_x, pad_y): (T::Lane, T::Lane),
    fg: impl Fn(V8<T::Lane, L>, V8<T::Lane, L>) -> (V8<T::Lane, L>, V8<T::Lane, L>),
) -> (f64, f64) {
    let (mut wide_f, mut wide_g) = (V8::<f64, L>::zero(), V8::<f64, L>::zero());
    let mut at = 0;
    while at < len {
        let (mut sf, mut sg) = (V8::zero(), V8::zero());
        let end = (at + SHORT_GROUP).min(len);
        // Whole vectors without a length test each (a branch per vector
        // cost as much as the arithmetic of 7×7 maps), then the partial
        // one, which only a slice's last group has.
        while at + VECTOR <= end {
            let xv = V8::new(load::<T, L>(x, base + at));
            let yv = V8::new(load::<T, L>(y, base + at));
            let (f, g) = fg(xv, yv);
            sf += f;
            sg += g;
            at += VECTOR;
        }
        if at < end {
            let n = end - at;
            let xv = V8::new(load_n::<T, L>(x, base + at, n, pad_x));
            let yv = V8::new(load_n::<T, L>(y, base + at, n, pad_y));
            let (f, g) = fg(xv, yv);
            sf += f;
            sg += g;
            at = end;
        }
        wide_f += sf.wide();
        wide_g += sg.wide();
    }
    (wide_f.sum(), wide_g.sum())
}

simd_fn! {
    /// `(Σd, Σd²)` with `d = x - shift` (exact in f32 when |μ| ≫ σ), summed
    /// in lanes over short segments and in f64 across them; a slice shorter
    /// than a segment in single vectors ([`short_sums2`]).
    pub fn centred_sums<T: Float>[L](x: &[T], shift: T::Lane) -> (f64, f64) {
        if x.len() < SEGMENT {
            let s = V8::splat(shift);
            return short_sums2::<T, L>(x, x, (0, x.len()), (shift, shift), |v, _| (v - s, (v - s) * (v - s)));
        }
        let (mut s1, mut s2) = ([0f64; WIDE], [0f64; WIDE]);
        let segments = x.chunks_exact(SEGMENT);
        let tail = segments.remainder();
        for seg in segments {
            centred_segment_of::<T, L>(seg, shift, &mut s1, &mut s2);
        }
        centred_tail::<T, L>(tail, shift, &mut s1, &mut s2);
        (reduce64(&s1), reduce64(&s2))
    }
}

simd_fn! {
    /// `(Σx, max|x|)` in lanes: an approximate mean and the range check that
    /// decides whether the lane centred sums are safe.
    pub fn sum_and_max_abs<T: Float>[L](x: &[T]) -> (f64, f64) {
        let zero = <T::Lane as Lane>::ZERO;
        let mut acc = [[zero; VECTOR]; GROUPS];
        let mut top = [[zero; VECTOR]; GROUPS];
        let whole = x.len() / LANES * LANES;
        for first in (0..whole).step_by(LANES) {
            for g in 0..GROUPS {
                let v = load::<T, L>(x, first + g * VECTOR);
                for k in 0..VECTOR {
                    acc[g][k] += v[k];
                    top[g][k] = top[g][k].max(v[k].abs());
                }
            }
        }
        let tail = &x[whole..];
        let sum = acc.iter().flatten().map(|v| v.wide()).sum::<f64>() + tail.iter().map(|v| v.to_lane().wide()).sum::<f64>();
        let max = top.iter().flatten().fold(0f64, |m, v| m.max(v.wide()));
        let max = tail.iter().fold(max, |m, v| m.max(v.to_lane().abs().wide()));
        (sum, max)
    }
}

simd_fn! {
    /// `Σx²` accumulated in f64 lanes (RMSNorm's statistic: no cancellation,
    /// so one pass).
    pub fn sum_squares<T: Float>[L](x: &[T]) -> f64 {
        const L64: usize = 16;
        let mut acc = [0f64; L64];
        let whole = x.len() / L64 * L64;
        for first in (0..whole).step_by(L64) {
            for half in 0..L64 / VECTOR {
                let v = load::<T, L>(x, first + half * VECTOR);
                for k in 0..VECTOR {
                    let w = v[k].wide();
                    acc[half * VECTOR + k] += w * w;
                }
            }
        }
        reduce64(&acc) + x[whole..].iter().map(|v| v.to_lane().wide() * v.to_lane().wide()).sum::<f64>()
    }
}

/// Adds `Σdz`, `Σdz·x̂` (`x̂ = ((x - hi) - lo)·rstd`; `dz = dy`, or fused
/// `φ'(z)·dy` with `z = ((x - hi) - lo)·scale + shift`, the forward's
/// operations) of `vectors` vectors (a multiple of [`GROUPS`]; `load(at)`
/// gives the lanes of `x` and `dy` at `at..at + 8`) to the f64 lanes `a1`,
/// `a2`: [`LANES`] lane sums.
#[inline(always)]
fn grad_segment<C: Lane, L: Isa>(
    vectors: usize,
    load: impl Fn(usize) -> ([C; VECTOR], [C; VECTOR]),
    (hi, lo, rstd): (C, C, C),
    z: ZSlice<C>,
    a1: &mut [V8<f64, L>; GROUPS],
    a2: &mut [V8<f64, L>; GROUPS],
) {
    let (hi_v, lo_v, rstd_v) = (V8::<C, L>::splat(hi), V8::splat(lo), V8::splat(rstd));
    let (scale_v, shift_v) = (V8::<C, L>::splat(z.scale), V8::splat(z.shift));
    let (mut sf, mut sg) = ([V8::<C, L>::zero(); GROUPS], [V8::<C, L>::zero(); GROUPS]);
    for first in (0..vectors).step_by(GROUPS) {
        for g in 0..GROUPS {
            let (xv, dv) = load((first + g) * VECTOR);
            let (xv, dv) = (V8::new(xv), V8::new(dv));
            let xc = (xv - hi_v) - lo_v;
            let dz = act_lanes::grad(z.act, dv, xc * scale_v + shift_v);
            sf[g] += dz;
            sg[g] += dz * (xc * rstd_v);
        }
    }
    for g in 0..GROUPS {
        a1[g] += sf[g].wide();
        a2[g] += sg[g].wide();
    }
}

/// What recomputing `z = ((x - hi) - lo)·scale + shift` over a slice of one
/// channel needs in a fused backward (`act: None`: a plain one).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ZSlice<C> {
    /// The fused activation, if any.
    pub act: Act,
    /// The forward's `scale` (`rstd·γ`).
    pub scale: C,
    /// The forward's `shift` (`β`).
    pub shift: C,
}

impl<C: Lane> ZSlice<C> {
    /// No activation.
    pub fn none() -> Self {
        Self {
            act: None,
            scale: C::ZERO,
            shift: C::ZERO,
        }
    }
}

/// Two vectors of lanes.
type Pair<C, L> = (V8<C, L>, V8<C, L>);

/// The terms `(dz, dz·x̂)` of the gradient sums at one vector of `x`, `dy`.
#[inline(always)]
fn grad_terms<C: Lane, L: Isa>(
    [hi, lo, rstd]: [C; 3],
    z: ZSlice<C>,
) -> impl Fn(V8<C, L>, V8<C, L>) -> Pair<C, L> {
    let (hi_v, lo_v, rstd_v) = (V8::<C, L>::splat(hi), V8::splat(lo), V8::splat(rstd));
    let (scale_v, shift_v) = (V8::<C, L>::splat(z.scale), V8::splat(z.shift));
    // A closure is compiled without its caller's `target_feature`s: unless
    // it is inlined, its vector operations become calls.
    #[inline(always)]
    move |v, d| {
        let xc = (v - hi_v) - lo_v;
        let dz = act_lanes::grad(z.act, d, xc * scale_v + shift_v);
        (dz, dz * (xc * rstd_v))
    }
}

simd_fn! {
    /// `(Σdy, Σdy·x̂)` over one slice of a channel or group,
    /// `x̂ = ((x - hi) - lo)·rstd`; the values after the last whole segment
    /// as whole groups of [`LANES`] padded with `dy = 0`, which adds nothing.
    pub fn slice_grad_sums<T: Float>[L](x: &[T], dy: &[T], hi: T::Lane, lo: T::Lane, rstd: T::Lane, z: ZSlice<T::Lane>) -> (f64, f64) {
        let act = z.act;
        unswitch!(act, {
        let z = { let mut v = z; v.act = act; v };
        let zero = <T::Lane as Lane>::ZERO;
        if x.len() < SEGMENT {
            return short_sums2::<T, L>(x, dy, (0, x.len()), (hi, zero), grad_terms([hi, lo, rstd], z));
        }
        let coefs = (hi, lo, rstd);
        let (mut a1, mut a2) = ([V8::<f64, L>::zero(); GROUPS], [V8::<f64, L>::zero(); GROUPS]);
        let whole = x.len() / SEGMENT * SEGMENT;
        for (xs, ds) in x[..whole].chunks_exact(SEGMENT).zip(dy[..whole].chunks_exact(SEGMENT)) {
            grad_segment(SEGMENT / VECTOR, |at| (load::<T, L>(xs, at), load::<T, L>(ds, at)), coefs, z, &mut a1, &mut a2);
        }
        let rest = x.len() - whole;
        if rest > 0 {
            let (xs, ds) = (&x[whole..], &dy[whole..]);
            let used = rest.div_ceil(LANES) * LANES;
            // Vectors past the values are all padding (`load_n` of no values).
            let load = |at: usize| {
                let n = rest.saturating_sub(at).min(VECTOR);
                (load_n::<T, L>(xs, at, n, hi), load_n::<T, L>(ds, at, n, zero))
            };
            grad_segment(used / VECTOR, load, coefs, z, &mut a1, &mut a2);
        }
        (sum_groups(a1), sum_groups(a2))
        })
    }
}

simd_fn! {
    /// One row of LayerNorm/RMSNorm backward, first pass: returns
    /// `(Σg, Σg·x̂)` with `g = w·dz`, `x̂ = ((x - hi) - lo)·rstd`, `dz = dy`
    /// or, fused, `φ'(z)·dy` at `z = x̂·w + bias`; writes `g` to `g_out` (the
    /// second pass, [`super::transform::row_dx`], reads it there instead of
    /// recomputing `z`, `dz` and `g` from `x`, `dy`, `w` and `bias`), and adds
    /// `dz·x̂` to `dweight` and `dz` to `dbias` (lane partials, which the
    /// caller flushes into f64 every few rows). The row is the first
    /// `w.len()` values of `x_rest`, `dy_rest`; their rest, the next rows
    /// of the caller's block, is prefetched.
    pub fn row_grad_sums<T: Float>[L](
        x_rest: &[T],
        dy_rest: &[T],
        g_out: &mut [T::Lane],
        w: &[T::Lane],
        hi: T::Lane,
        lo: T::Lane,
        rstd: T::Lane,
        dweight: &mut [T::Lane],
        dbias: &mut [T::Lane],
        bias: &[T::Lane],
        act: Act,
    ) -> (f64, f64) {
        unswitch!(act, {
        let (x, dy) = (&x_rest[..w.len()], &dy_rest[..w.len()]);
        let zero = <T::Lane as Lane>::ZERO;
        let (hi_v, lo_v, rstd_v) = (V8::<T::Lane, L>::splat(hi), V8::splat(lo), V8::splat(rstd));
        // `Σg`, `Σg·x̂` in [`LANES`] lane sums of at most [`FLUSH`] terms,
        // flushed into f64 lanes every segment, as [`grad_segment`] does.
        let (mut a1, mut a2) = ([V8::<f64, L>::zero(); GROUPS], [V8::<f64, L>::zero(); GROUPS]);
        // One vector of `n` values at `at`: stores `g`, adds `dz·x̂` into
        // `dweight` and `dz` into `dbias`, returns `(g, g·x̂)`.
        let vector = {
            #[inline(always)]
            |at: usize, n: usize, g_out: &mut [T::Lane], dweight: &mut [T::Lane], dbias: &mut [T::Lane]| {
                let lanes = |v: &[T::Lane]| V8::<T::Lane, L>::new(lanes_n(v, at, n, zero));
                let xv = V8::new(load_n::<T, L>(x, at, n, hi));
                let xh = ((xv - hi_v) - lo_v) * rstd_v;
                let wv = lanes(w);
                // `bias` is empty without an activation.
                let bv = if act.is_some() { lanes(bias) } else { V8::zero() };
                let dv = act_lanes::grad(act, V8::new(load_n::<T, L>(dy, at, n, zero)), xh * wv + bv);
                let gv = dv * wv;
                put_n(g_out, at, n, gv.lanes);
                put_n(dweight, at, n, (lanes(dweight) + dv * xh).lanes);
                put_n(dbias, at, n, (lanes(dbias) + dv).lanes);
                (gv, gv * xh)
            }
        };
        // Sixteen values of [`vector`] at once (the AVX-512 level: one
        // instruction per operator where that takes two; the same operations
        // per lane, so the same bits).
        let s16 = V16::<T::Lane, L>::splat;
        let (hi16, lo16, rstd16) = (s16(hi), s16(lo), s16(rstd));
        let vector16 = {
            #[inline(always)]
            |at: usize, g_out: &mut [T::Lane], dweight: &mut [T::Lane], dbias: &mut [T::Lane]| {
                let lanes = {
                    #[inline(always)]
                    |v: &[T::Lane]| V16::<T::Lane, L>::new(v[at..at + 16].try_into().expect("sixteen lanes"))
                };
                let xh = ((load16::<T, L>(x, at) - hi16) - lo16) * rstd16;
                let wv = lanes(w);
                let bv = if act.is_some() { lanes(bias) } else { V16::zero() };
                let ((d0, d1), (z0, z1)) = (load16::<T, L>(dy, at).halves(), (xh * wv + bv).halves());
                let dv = V16::join(act_lanes::grad(act, d0, z0), act_lanes::grad(act, d1, z1));
                let gv = dv * wv;
                g_out[at..at + 16].copy_from_slice(&gv.lanes);
                let dw = lanes(dweight) + dv * xh;
                dweight[at..at + 16].copy_from_slice(&dw.lanes);
                let db = lanes(dbias) + dv;
                dbias[at..at + 16].copy_from_slice(&db.lanes);
                (gv, gv * xh)
            }
        };
        let len = x.len();
        let mut at = 0;
        while at < len {
            let end = (at + SEGMENT).min(len);
            let (mut sf, mut sg) = ([V8::<T::Lane, L>::zero(); GROUPS], [V8::<T::Lane, L>::zero(); GROUPS]);
            // Vector `k` of the segment adds into lane group `k % GROUPS`:
            // whole rounds of the groups with whole vectors (the loop
            // without a length test per vector, which had kept the lane
            // sums on the stack), then the last values.
            if L::AVX512 {
                // Groups 2p and 2p + 1 as the halves of one sixteen-lane sum.
                let (mut sf16, mut sg16) = ([V16::<T::Lane, L>::zero(); 2], [V16::<T::Lane, L>::zero(); 2]);
                while at + LANES <= end {
                    prefetch(x_rest, at, LANES);
                    prefetch(dy_rest, at, LANES);
                    for p in 0..2 {
                        let (f, h) = vector16(at + p * 16, g_out, dweight, dbias);
                        sf16[p] = sf16[p] + f;
                        sg16[p] = sg16[p] + h;
                    }
                    at += LANES;
                }
                for p in 0..2 {
                    (sf[2 * p], sf[2 * p + 1]) = sf16[p].halves();
                    (sg[2 * p], sg[2 * p + 1]) = sg16[p].halves();
                }
            } else {
                while at + LANES <= end {
                    prefetch(x_rest, at, LANES);
                    prefetch(dy_rest, at, LANES);
                    for g in 0..GROUPS {
                        let (f, h) = vector(at + g * VECTOR, VECTOR, g_out, dweight, dbias);
                        sf[g] += f;
                        sg[g] += h;
                    }
                    at += LANES;
                }
            }
            let mut g = 0;
            while at < end {
                let n = (end - at).min(VECTOR);
                let (f, h) = vector(at, n, g_out, dweight, dbias);
                sf[g] += f;
                sg[g] += h;
                g += 1;
                at += n;
            }
            for g in 0..GROUPS {
                a1[g] += sf[g].wide();
                a2[g] += sg[g].wide();
            }
        }
        (sum_groups(a1), sum_groups(a2))
        })
    }
}

simd_fn! {
    /// `acc += partial` (lanes into f64), then `partial = 0`.
    pub fn flush<T: Float>[L](acc: &mut [f64], partial: &mut [T::Lane]) {
        for (a, p) in acc.iter_mut().zip(partial.iter_mut()) {
            *a += p.wide();
            *p = <T::Lane as Lane>::ZERO;
        }
    }
}

simd_fn! {
    /// Adds the centred sums of a run of short slices into per-channel
    /// totals: slice `j` (`s` values) belongs to channel `(first + j) % C`,
    /// `C = shifts.len()`, and adds `(Σd, Σd²)`, `d = x - shift_c`, to
    /// `totals[2j', 2j' + 1]`, `j' = j % (totals.len() / 2)` (the run's own
    /// totals, pair `k` for channel `(first + k) % C`). One dispatch for the run instead of one
    /// per slice.
    pub fn centred_sums_slices<T: Float>[L](x: &[T], s: usize, first: usize, shifts: &[T::Lane], totals: &mut [f64]) {
        let c = shifts.len();
        let mut ch = first % c;
        // Slices load from the whole run (see `convert::load_n`).
        let (m, mut k) = (totals.len() / 2, 0);
        for j in 0..x.len() / s {
            let shift = shifts[ch];
            let sv = V8::splat(shift);
            let (a, b) = short_sums2::<T, L>(x, x, (j * s, s), (shift, shift), |v, _| (v - sv, (v - sv) * (v - sv)));
            totals[2 * k] += a;
            totals[2 * k + 1] += b;
            k = if k + 1 == m { 0 } else { k + 1 };
            ch = if ch + 1 == c { 0 } else { ch + 1 };
        }
    }
}

simd_fn! {
    /// Adds `(Σdy, Σdy·x̂)` of a run of short slices into per-channel
    /// totals, as [`centred_sums_slices`]; `coefs[c] = [hi, lo, rstd]`.
    pub fn grad_sums_slices<T: Float>[L](x: &[T], dy: &[T], s: usize, first: usize, coefs: &[[T::Lane; 5]], totals: &mut [f64], act: Act) {
        unswitch!(act, {
        let c = coefs.len();
        let mut ch = first % c;
        let (m, mut k) = (totals.len() / 2, 0);
        for j in 0..x.len() / s {
            let [hi, lo, rstd, scale, shift] = coefs[ch];
            let z = ZSlice { act, scale, shift };
            let (a, b) = short_sums2::<T, L>(x, dy, (j * s, s), (hi, <T::Lane as Lane>::ZERO), grad_terms([hi, lo, rstd], z));
            totals[2 * k] += a;
            totals[2 * k + 1] += b;
            k = if k + 1 == m { 0 } else { k + 1 };
            ch = if ch + 1 == c { 0 } else { ch + 1 };
        }
        })
    }
}

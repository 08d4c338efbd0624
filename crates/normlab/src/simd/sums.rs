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

use crate::float::{Float, Lane};
use crate::simd::simd_fn;
use crate::simd::transform::{RowScratch, ROW_BLOCK};

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

/// `(Σ f(a, b), Σ g(a, b))` over the lanes of two equally long inputs, in
/// lane sums over segments of [`SEGMENT`] values (each lane adds [`FLUSH`]
/// terms), flushed into f64 lanes. The rounding error of a segment is that
/// of a 4-term sum in the lane type.
#[inline(always)]
pub(crate) fn sum2_pairs<C: Lane>(
    a: &[C],
    b: &[C],
    f: impl Fn(C, C) -> C,
    g: impl Fn(C, C) -> C,
) -> (f64, f64) {
    let mut acc_f = [0f64; LANES];
    let mut acc_g = [0f64; LANES];
    let sa = a.chunks_exact(SEGMENT);
    let sb = b.chunks_exact(SEGMENT);
    let (ta, tb) = (sa.remainder(), sb.remainder());
    for (seg_a, seg_b) in sa.zip(sb) {
        let mut sf = [C::ZERO; LANES];
        let mut sg = [C::ZERO; LANES];
        // Two loops, one accumulator each: in one loop LLVM pairs the two
        // sums lane by lane instead of vectorizing each.
        for (va, vb) in seg_a.chunks_exact(LANES).zip(seg_b.chunks_exact(LANES)) {
            for i in 0..LANES {
                sf[i] += f(va[i], vb[i]);
            }
        }
        for (va, vb) in seg_a.chunks_exact(LANES).zip(seg_b.chunks_exact(LANES)) {
            for i in 0..LANES {
                sg[i] += g(va[i], vb[i]);
            }
        }
        for i in 0..LANES {
            acc_f[i] += sf[i].wide();
        }
        for i in 0..LANES {
            acc_g[i] += sg[i].wide();
        }
    }
    let tf: f64 = ta.iter().zip(tb).map(|(&x, &y)| f(x, y).wide()).sum();
    let tg: f64 = ta.iter().zip(tb).map(|(&x, &y)| g(x, y).wide()).sum();
    (reduce64(&acc_f) + tf, reduce64(&acc_g) + tg)
}

/// Adds `Σd`, `Σd²` (`d = v - shift`) of one [`SEGMENT`] of lanes to the
/// f64 lanes `s1`, `s2`: lane sums of [`FLUSH`] terms, folded to [`WIDE`]
/// lanes (16 terms each), then added in f64 lane by lane. The lanes are
/// summed once, at the end: a sum of all 32 lanes per segment would be one
/// long chain of dependent f64 additions, which measured slower than the
/// memory traffic.
#[inline(always)]
pub(crate) fn centred_segment<C: Lane>(
    seg: &[C],
    shift: C,
    s1: &mut [f64; WIDE],
    s2: &mut [f64; WIDE],
) {
    let (mut d1, mut d2) = ([C::ZERO; LANES], [C::ZERO; LANES]);
    for v in seg.chunks_exact(LANES) {
        for i in 0..LANES {
            let d = v[i] - shift;
            d1[i] += d;
            d2[i] += d * d;
        }
    }
    for i in 0..WIDE {
        let a = (d1[i] + d1[i + WIDE]) + (d1[i + 2 * WIDE] + d1[i + 3 * WIDE]);
        let b = (d2[i] + d2[i + WIDE]) + (d2[i + 2 * WIDE] + d2[i + 3 * WIDE]);
        s1[i] += a.wide();
        s2[i] += b.wide();
    }
}

/// Adds the values left over after the whole segments (fewer than
/// [`SEGMENT`]) as whole groups of [`LANES`] padded with `shift`, whose
/// `d = 0` adds nothing: short slices (a 7×7 feature map) take the vector
/// loop too, padded to a multiple of 32 values rather than a whole segment.
#[inline(always)]
pub(crate) fn centred_tail<C: Lane>(
    tail: &[C],
    shift: C,
    s1: &mut [f64; WIDE],
    s2: &mut [f64; WIDE],
) {
    if tail.is_empty() {
        return;
    }
    let mut padded = [shift; SEGMENT];
    padded[..tail.len()].copy_from_slice(tail);
    let used = tail.len().div_ceil(LANES) * LANES;
    centred_segment(&padded[..used], shift, s1, s2);
}

/// Lanes of the short-slice sums: one AVX2 vector.
const SHORT_LANES: usize = 8;
/// Values a short-slice lane group sums before its flush into f64: four
/// terms per lane, as the segments do.
const SHORT_GROUP: usize = SHORT_LANES * FLUSH;

/// `(Σ f(x, y), Σ g(x, y))` of a slice shorter than a [`SEGMENT`] (a 7×7 or
/// 8×8 feature map): vectors of [`SHORT_LANES`], four terms per lane before
/// each flush into f64, the last values in f64 one by one. Widened eight at
/// a time, so no buffer the size of a segment is filled.
#[inline(always)]
fn short_sums2<T: Float, L: crate::simd::Isa>(
    x: &[T],
    y: &[T],
    f: impl Fn(T::Lane, T::Lane) -> T::Lane,
    g: impl Fn(T::Lane, T::Lane) -> T::Lane,
) -> (f64, f64) {
    let zero = <T::Lane as Lane>::ZERO;
    let (mut wide_f, mut wide_g) = ([0f64; SHORT_LANES], [0f64; SHORT_LANES]);
    let (mut xb, mut yb) = ([zero; SHORT_LANES], [zero; SHORT_LANES]);
    let whole = x.len() / SHORT_LANES * SHORT_LANES;
    for (xg, yg) in x[..whole]
        .chunks(SHORT_GROUP)
        .zip(y[..whole].chunks(SHORT_GROUP))
    {
        let (mut sf, mut sg) = ([zero; SHORT_LANES], [zero; SHORT_LANES]);
        for (xc, yc) in xg
            .chunks_exact(SHORT_LANES)
            .zip(yg.chunks_exact(SHORT_LANES))
        {
            let xv = T::lanes::<L>(xc, &mut xb);
            let yv = T::lanes::<L>(yc, &mut yb);
            for i in 0..SHORT_LANES {
                sf[i] += f(xv[i], yv[i]);
                sg[i] += g(xv[i], yv[i]);
            }
        }
        for i in 0..SHORT_LANES {
            wide_f[i] += sf[i].wide();
            wide_g[i] += sg[i].wide();
        }
    }
    let (mut s1, mut s2): (f64, f64) = (wide_f.iter().sum(), wide_g.iter().sum());
    for (&xv, &yv) in x[whole..].iter().zip(&y[whole..]) {
        let (xv, yv) = (xv.to_lane(), yv.to_lane());
        s1 += f(xv, yv).wide();
        s2 += g(xv, yv).wide();
    }
    (s1, s2)
}

simd_fn! {
    /// `(Σd, Σd²)` with `d = x - shift` (exact in f32 when |μ| ≫ σ), summed
    /// in lanes over short segments and in f64 across them; a slice shorter
    /// than a segment in single vectors ([`short_sums2`]).
    pub fn centred_sums<T: Float>[L](x: &[T], shift: T::Lane) -> (f64, f64) {
        if x.len() < SEGMENT {
            return short_sums2::<T, L>(x, x, |v, _| v - shift, |v, _| (v - shift) * (v - shift));
        }
        let (mut s1, mut s2) = ([0f64; WIDE], [0f64; WIDE]);
        let mut buf = [<T::Lane as Lane>::ZERO; SEGMENT];
        let segments = x.chunks_exact(SEGMENT);
        let tail = segments.remainder();
        for seg in segments {
            centred_segment(T::lanes::<L>(seg, &mut buf), shift, &mut s1, &mut s2);
        }
        centred_tail(T::lanes::<L>(tail, &mut buf), shift, &mut s1, &mut s2);
        (reduce64(&s1), reduce64(&s2))
    }
}

simd_fn! {
    /// `(Σx, max|x|)` in lanes: an approximate mean and the range check that
    /// decides whether the lane centred sums are safe.
    pub fn sum_and_max_abs<T: Float>[L](x: &[T]) -> (f64, f64) {
        let mut acc = [<T::Lane as Lane>::ZERO; LANES];
        let mut top = [<T::Lane as Lane>::ZERO; LANES];
        let mut buf = [<T::Lane as Lane>::ZERO; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            let c = T::lanes::<L>(c, &mut buf);
            for i in 0..LANES {
                acc[i] += c[i];
            }
            for i in 0..LANES {
                top[i] = top[i].max(c[i].abs());
            }
        }
        let tail = T::lanes::<L>(tail, &mut buf);
        let sum = acc.iter().map(|v| v.wide()).sum::<f64>() + tail.iter().map(|v| v.wide()).sum::<f64>();
        let max = top.iter().chain(tail).fold(0f64, |m, v| m.max(v.abs().wide()));
        (sum, max)
    }
}

simd_fn! {
    /// `Σx²` accumulated in f64 lanes (RMSNorm's statistic: no cancellation,
    /// so one pass).
    pub fn sum_squares<T: Float>[L](x: &[T]) -> f64 {
        const L64: usize = 16;
        let mut acc = [0f64; L64];
        let mut buf = [<T::Lane as Lane>::ZERO; L64];
        let chunks = x.chunks_exact(L64);
        let tail = chunks.remainder();
        for c in chunks {
            let c = T::lanes::<L>(c, &mut buf);
            for i in 0..L64 {
                let v = c[i].wide();
                acc[i] += v * v;
            }
        }
        let tail = T::lanes::<L>(tail, &mut buf);
        reduce64(&acc) + tail.iter().map(|v| v.wide() * v.wide()).sum::<f64>()
    }
}

/// Adds `Σdy`, `Σdy·x̂` (`x̂ = ((x - hi) - lo)·rstd`) of one [`SEGMENT`]
/// of lanes to the f64 lanes `a1`, `a2`, as [`sum2_pairs`] does.
#[inline(always)]
fn grad_segment<C: Lane>(
    xv: &[C],
    dv: &[C],
    (hi, lo, rstd): (C, C, C),
    a1: &mut [f64; LANES],
    a2: &mut [f64; LANES],
) {
    let mut sf = [C::ZERO; LANES];
    let mut sg = [C::ZERO; LANES];
    // One accumulator per loop, as in `sum2_pairs`.
    for vb in dv.chunks_exact(LANES) {
        for i in 0..LANES {
            sf[i] += vb[i];
        }
    }
    for (va, vb) in xv.chunks_exact(LANES).zip(dv.chunks_exact(LANES)) {
        for i in 0..LANES {
            sg[i] += vb[i] * (((va[i] - hi) - lo) * rstd);
        }
    }
    for i in 0..LANES {
        a1[i] += sf[i].wide();
    }
    for i in 0..LANES {
        a2[i] += sg[i].wide();
    }
}

simd_fn! {
    /// `(Σdy, Σdy·x̂)` over one slice of a channel or group,
    /// `x̂ = ((x - hi) - lo)·rstd`; the values after the last whole segment
    /// as whole groups of [`LANES`] padded with `dy = 0`, which adds nothing.
    pub fn slice_grad_sums<T: Float>[L](x: &[T], dy: &[T], hi: T::Lane, lo: T::Lane, rstd: T::Lane) -> (f64, f64) {
        if x.len() < SEGMENT {
            return short_sums2::<T, L>(x, dy, |_, d| d, |v, d| d * (((v - hi) - lo) * rstd));
        }
        let coefs = (hi, lo, rstd);
        let mut xb = [<T::Lane as Lane>::ZERO; SEGMENT];
        let mut db = [<T::Lane as Lane>::ZERO; SEGMENT];
        let (mut a1, mut a2) = ([0f64; LANES], [0f64; LANES]);
        let whole = x.len() / SEGMENT * SEGMENT;
        for (xs, ds) in x[..whole].chunks_exact(SEGMENT).zip(dy[..whole].chunks_exact(SEGMENT)) {
            let xv = T::lanes::<L>(xs, &mut xb);
            let dv = T::lanes::<L>(ds, &mut db);
            grad_segment(xv, dv, coefs, &mut a1, &mut a2);
        }
        let rest = x.len() - whole;
        if rest > 0 {
            let mut xp = [hi; SEGMENT];
            let mut dp = [<T::Lane as Lane>::ZERO; SEGMENT];
            T::widen::<L>(&x[whole..], &mut xp[..rest]);
            T::widen::<L>(&dy[whole..], &mut dp[..rest]);
            let used = rest.div_ceil(LANES) * LANES;
            grad_segment(&xp[..used], &dp[..used], coefs, &mut a1, &mut a2);
        }
        (reduce64(&a1), reduce64(&a2))
    }
}

simd_fn! {
    /// One row of LayerNorm/RMSNorm backward, first pass: returns
    /// `(Σg, Σg·x̂)` with `g = w·dy`, `x̂ = ((x - hi) - lo)·rstd`, and adds
    /// `dy·x̂` to `dweight` and `dy` to `dbias` (lane partials, which the
    /// caller flushes into f64 every few rows).
    pub fn row_grad_sums<T: Float>[L](
        x: &[T],
        dy: &[T],
        w: &[T::Lane],
        hi: T::Lane,
        lo: T::Lane,
        rstd: T::Lane,
        dweight: &mut [T::Lane],
        dbias: &mut [T::Lane],
        scratch: &mut RowScratch<T::Lane>,
    ) -> (f64, f64) {
        let mut sums = (0.0, 0.0);
        // Blocks small enough to stay in L1 between the two loops.
        const BLOCK: usize = ROW_BLOCK;
        let [xbuf, dbuf, x_hat, g] = &mut scratch.0;
        let blocks = x.chunks(BLOCK).zip(dy.chunks(BLOCK)).zip(w.chunks(BLOCK));
        let partials = dweight.chunks_mut(BLOCK).zip(dbias.chunks_mut(BLOCK));
        for (((xb, dyb), wb), (dwp, dbp)) in blocks.zip(partials) {
            let len = xb.len();
            let xb = T::lanes::<L>(xb, xbuf);
            let dyb = T::lanes::<L>(dyb, dbuf);
            let (x_hat, g) = (&mut x_hat[..len], &mut g[..len]);
            for i in 0..len {
                x_hat[i] = ((xb[i] - hi) - lo) * rstd;
                g[i] = dyb[i] * wb[i];
                dwp[i] += dyb[i] * x_hat[i];
                dbp[i] += dyb[i];
            }
            let (sum_g, sum_g_xhat) = sum2_pairs(g, x_hat, |gv, _| gv, |gv, h| gv * h);
            sums.0 += sum_g;
            sums.1 += sum_g_xhat;
        }
        sums
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
    /// `totals[c]`. One dispatch for the run instead of one per slice.
    pub fn centred_sums_slices<T: Float>[L](x: &[T], s: usize, first: usize, shifts: &[T::Lane], totals: &mut [(f64, f64)]) {
        let c = shifts.len();
        let mut ch = first % c;
        for xs in x.chunks_exact(s) {
            let shift = shifts[ch];
            let (a, b) = short_sums2::<T, L>(xs, xs, |v, _| v - shift, |v, _| (v - shift) * (v - shift));
            totals[ch].0 += a;
            totals[ch].1 += b;
            ch = if ch + 1 == c { 0 } else { ch + 1 };
        }
    }
}

simd_fn! {
    /// Adds `(Σdy, Σdy·x̂)` of a run of short slices into per-channel
    /// totals, as [`centred_sums_slices`]; `coefs[c] = [hi, lo, rstd]`.
    pub fn grad_sums_slices<T: Float>[L](x: &[T], dy: &[T], s: usize, first: usize, coefs: &[[T::Lane; 3]], totals: &mut [(f64, f64)]) {
        let c = coefs.len();
        let mut ch = first % c;
        for (xs, ds) in x.chunks_exact(s).zip(dy.chunks_exact(s)) {
            let [hi, lo, rstd] = coefs[ch];
            let (a, b) = short_sums2::<T, L>(xs, ds, |_, d| d, |v, d| d * (((v - hi) - lo) * rstd));
            totals[ch].0 += a;
            totals[ch].1 += b;
            ch = if ch + 1 == c { 0 } else { ch + 1 };
        }
    }
}

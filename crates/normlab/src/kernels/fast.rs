//! f32 inner loops, compiled for every SIMD level (see [`crate::simd`]).
//!
//! Accuracy is kept as in the f64 path by three devices:
//! - statistics: a cheap f32 sum gives an approximate mean `s`; the exact
//!   centred sums `Σ(x - s)`, `Σ(x - s)²` are then accumulated in f64, where
//!   `x - s` is exact in f32 (Sterbenz) whenever |μ| ≫ σ;
//! - centring: the f64 mean is split as `μ = hi + lo` with `hi`, `lo` in f32,
//!   and `x - μ` computed as `(x - hi) - lo`;
//! - gradient sums are accumulated in f64.
//!
//! Reductions use fixed lane arrays, so every level returns the same bits.

use crate::simd::simd_fn;

/// An f32 output slot, written once by a kernel.
pub type Out = std::mem::MaybeUninit<f32>;

/// How a kernel's output values reach memory.
///
/// A normal store first reads the cache line it writes into (read for
/// ownership), so an output costs two memory transfers; a non-temporal
/// (streaming) store writes the line without reading it and without evicting
/// the input from the caches. Streaming pays off for outputs too large to be
/// read back from cache anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// Ordinary stores.
    Cached,
    /// Non-temporal stores (x86-64), ordinary ones elsewhere.
    Streaming,
}

/// Outputs at least this large (bytes) are written with streaming stores.
pub const STREAMING_MIN_BYTES: usize = 16 << 20;

impl Store {
    /// Streaming for an output of `len` f32 values of [`STREAMING_MIN_BYTES`] or more.
    pub fn for_len(len: usize) -> Self {
        if len * 4 >= STREAMING_MIN_BYTES {
            Store::Streaming
        } else {
            Store::Cached
        }
    }
}

/// Values a [`produce!`] forward (LayerNorm and RMSNorm rows) computes per
/// block before storing them: small, so that the block stays in registers.
/// With 512-value blocks, copied out from L1, the channel forwards on
/// `[32, 64, 56, 56]` took 20–25% longer when they were built this way
/// (`normlab bench --threads 2`, six alternating runs); they now use
/// [`fill_blocks`].
const FORWARD_BLOCK: usize = 64;

/// Values a backward computes per block: its loop reads two or more inputs,
/// and longer blocks amortize the per-block slicing (64 measured slower there).
const BACKWARD_BLOCK: usize = 512;

/// Fills `out` block by block: the body computes the values of
/// `out[at..at + buf.len()]` into `buf` (a plain loop that vectorizes),
/// which are then stored as `store` says. A macro rather than a function
/// taking a closure, so that the body is always compiled inside the
/// caller's SIMD variant (a closure LLVM declines to inline would be
/// compiled for the baseline target).
macro_rules! produce {
    ($out:expr, $store:expr, $block:expr, |$at:ident, $buf:ident| $body:block) => {{
        let out: &mut [Out] = $out;
        let store: Store = $store;
        let mut block = [0f32; $block];
        for (k, chunk) in out.chunks_mut($block).enumerate() {
            let $at = k * $block;
            let $buf = &mut block[..chunk.len()];
            $body
            emit(chunk, $buf, store);
        }
        #[cfg(target_arch = "x86_64")]
        if store == Store::Streaming {
            // Streaming stores are weakly ordered: fence before anyone reads them.
            // SAFETY: SSE is part of the x86-64 baseline.
            unsafe { std::arch::x86_64::_mm_sfence() };
        }
    }};
}

/// Values of `out` before its first 16-byte boundary (all of them when
/// it is shorter), which streaming stores cannot write.
#[inline(always)]
fn unaligned_head(out: &[Out]) -> usize {
    ((16 - (out.as_ptr() as usize) % 16) % 16 / 4).min(out.len())
}

/// Stores `src` into `dst`: the values before the first 16-byte boundary
/// with ordinary stores, the rest through [`write_streamed`].
#[inline(always)]
fn emit(dst: &mut [Out], src: &[f32], store: Store) {
    let head = unaligned_head(dst);
    let (dst_head, dst_rest) = dst.split_at_mut(head);
    for (d, &v) in dst_head.iter_mut().zip(src) {
        d.write(v);
    }
    write_streamed(dst_rest, &src[head..], store);
}

/// f32 accumulator lanes: four AVX2 vectors in flight.
const L32: usize = 32;
/// f64 accumulator lanes: four AVX2 vectors.
const L64: usize = 16;

/// `μ` as `(hi, lo)` with `hi + lo ≈ μ` to about 2⁻⁴⁸ relative.
#[inline]
pub fn split(mean: f64) -> (f32, f32) {
    let hi = mean as f32;
    (hi, (mean - hi as f64) as f32)
}

/// Sums lanes of a reduction in a fixed order.
#[inline(always)]
fn reduce64(acc: &[f64]) -> f64 {
    acc.iter().sum()
}

simd_fn! {
    /// `(Σx, max|x|)` with f32 lanes: an approximate mean and the range check
    /// that decides whether the f32 centred sums are safe.
    pub fn sum_and_max_abs(x: &[f32]) -> (f64, f32) {
        let mut acc = [0f32; L32];
        let mut top = [0f32; L32];
        let chunks = x.chunks_exact(L32);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..L32 {
                acc[i] += c[i];
            }
            for i in 0..L32 {
                top[i] = top[i].max(c[i].abs());
            }
        }
        let sum = acc.iter().map(|&v| v as f64).sum::<f64>() + tail.iter().map(|&v| v as f64).sum::<f64>();
        let max = top.iter().chain(tail).fold(0f32, |m, &v| m.max(v.abs()));
        (sum, max)
    }
}

/// `Σ f(x)` over f32 values into f64 lanes: one accumulator per loop, so
/// that it vectorizes as one vector add per lane group.
#[inline(always)]
fn sum64(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; L64];
    let chunks = x.chunks_exact(L64);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..L64 {
            acc[i] += f(c[i]);
        }
    }
    reduce64(&acc) + tail.iter().map(|&v| f(v)).sum::<f64>()
}

/// f32 lanes of the segment sums (four AVX2 vectors, so that four
/// independent add chains hide the add latency), and terms each lane sums in
/// f32 before the flush into f64.
const LANES: usize = 32;
const FLUSH: usize = 4;
const SEGMENT: usize = LANES * FLUSH;

/// `(Σ f(x), Σ g(x))` with per-lane f32 sums over segments of
/// [`SEGMENT`] values (each lane adds [`FLUSH`] terms), flushed into f64.
/// The rounding error of a segment is that of a 4-term f32 sum.
#[inline(always)]
fn sum2_segments(x: &[f32], f: impl Fn(f32) -> f32, g: impl Fn(f32) -> f32) -> (f64, f64) {
    let mut acc_f = [0f64; LANES];
    let mut acc_g = [0f64; LANES];
    let segments = x.chunks_exact(SEGMENT);
    let tail = segments.remainder();
    for seg in segments {
        let mut sf = [0f32; LANES];
        let mut sg = [0f32; LANES];
        // Two loops, one accumulator each: in one loop LLVM pairs the two
        // sums lane by lane instead of vectorizing each.
        for v in seg.chunks_exact(LANES) {
            for i in 0..LANES {
                sf[i] += f(v[i]);
            }
        }
        for v in seg.chunks_exact(LANES) {
            for i in 0..LANES {
                sg[i] += g(v[i]);
            }
        }
        for i in 0..LANES {
            acc_f[i] += sf[i] as f64;
        }
        for i in 0..LANES {
            acc_g[i] += sg[i] as f64;
        }
    }
    let tf: f64 = tail.iter().map(|&v| f(v) as f64).sum();
    let tg: f64 = tail.iter().map(|&v| g(v) as f64).sum();
    (reduce64(&acc_f) + tf, reduce64(&acc_g) + tg)
}

/// `(Σ f(a, b), Σ g(a, b))` over pairs, as [`sum2_segments`].
#[inline(always)]
fn sum2_segments_pairs(
    a: &[f32],
    b: &[f32],
    f: impl Fn(f32, f32) -> f32,
    g: impl Fn(f32, f32) -> f32,
) -> (f64, f64) {
    let mut acc_f = [0f64; LANES];
    let mut acc_g = [0f64; LANES];
    let sa = a.chunks_exact(SEGMENT);
    let sb = b.chunks_exact(SEGMENT);
    let (ta, tb) = (sa.remainder(), sb.remainder());
    for (seg_a, seg_b) in sa.zip(sb) {
        let mut sf = [0f32; LANES];
        let mut sg = [0f32; LANES];
        // One accumulator per loop, as in `sum2_segments`.
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
            acc_f[i] += sf[i] as f64;
        }
        for i in 0..LANES {
            acc_g[i] += sg[i] as f64;
        }
    }
    let tf: f64 = ta.iter().zip(tb).map(|(&x, &y)| f(x, y) as f64).sum();
    let tg: f64 = ta.iter().zip(tb).map(|(&x, &y)| g(x, y) as f64).sum();
    (reduce64(&acc_f) + tf, reduce64(&acc_g) + tg)
}

simd_fn! {
    /// `(Σd, Σd²)` with `d = x - shift` (exact in f32 when |μ| ≫ σ), summed
    /// in f32 over short segments and in f64 across them.
    pub fn centred_sums(x: &[f32], shift: f32) -> (f64, f64) {
        sum2_segments(x, |v| v - shift, |v| (v - shift) * (v - shift))
    }
}

/// Values per register block of [`fill_blocks`]: computed, then stored
/// straight from registers.
const REGISTER_BLOCK: usize = 32;

/// Makes streaming stores visible before anyone reads them (they are weakly
/// ordered); nothing for ordinary stores.
#[inline]
pub fn fence(store: Store) {
    #[cfg(target_arch = "x86_64")]
    if store == Store::Streaming {
        // SAFETY: SSE is part of the x86-64 baseline.
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = store;
}

/// f64 lanes of [`centred_segment`]'s running sums.
const WIDE: usize = 8;

/// Adds `Σd`, `Σd²` (`d = v - shift`) of one [`SEGMENT`] to the f64 lanes
/// `s1`, `s2`: f32 lanes of [`FLUSH`] terms, folded to [`WIDE`] lanes (16
/// terms each), then added in f64 lane by lane. The lanes are summed once,
/// at the end: a sum of all 32 lanes per segment would be one long chain of
/// dependent f64 additions, which measured slower than the memory traffic.
#[inline(always)]
fn centred_segment(seg: &[f32], shift: f32, s1: &mut [f64; WIDE], s2: &mut [f64; WIDE]) {
    let (mut d1, mut d2) = ([0f32; LANES], [0f32; LANES]);
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
        s1[i] += a as f64;
        s2[i] += b as f64;
    }
}

/// Fills `y` block by block: `block(start, values)` computes
/// `y[start..start + values.len()]`. Whole [`REGISTER_BLOCK`]s are stored
/// from registers, with streaming stores when `store` says so and `y` is
/// 16-byte aligned there; the values before the first aligned block and
/// after the last whole one are streamed four at a time too (an ordinary
/// store into the lines between streamed ones measured far slower on
/// 784-value slices), the last one to three with ordinary stores.
#[inline(always)]
fn fill_blocks(y: &mut [Out], store: Store, block: impl Fn(usize, &mut [f32])) {
    let len = y.len();
    let head = unaligned_head(y);
    let mut buf = [0f32; REGISTER_BLOCK];
    block(0, &mut buf[..head]);
    for (o, &v) in y[..head].iter_mut().zip(&buf) {
        o.write(v);
    }
    let mut i = head;
    while i + REGISTER_BLOCK <= len {
        let mut values = [0f32; REGISTER_BLOCK];
        block(i, &mut values);
        write_streamed(&mut y[i..i + REGISTER_BLOCK], &values, store);
        i += REGISTER_BLOCK;
    }
    let rest = len - i;
    block(i, &mut buf[..rest]);
    write_streamed(&mut y[i..], &buf[..rest], store);
}

/// Stores `values` into `out` (same length): four at a time with streaming
/// stores when `store` says so and `out` is 16-byte aligned, the rest with
/// ordinary ones.
#[inline(always)]
fn write_streamed(out: &mut [Out], values: &[f32], store: Store) {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if store == Store::Streaming && (out.as_ptr() as usize) % 16 == 0 {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        let p = out.as_mut_ptr() as *mut f32;
        while i + 4 <= values.len() {
            // SAFETY: `p + i` is 16-byte aligned with 4 values left in both
            // slices; SSE is part of the x86-64 baseline.
            unsafe { _mm_stream_ps(p.add(i), _mm_loadu_ps(values.as_ptr().add(i))) };
            i += 4;
        }
    }
    for (o, &v) in out[i..].iter_mut().zip(&values[i..]) {
        o.write(v);
    }
}

/// `y = ((x - hi) - lo)·scale + shift` through [`fill_blocks`].
#[inline(always)]
fn normalize_blocks(
    x: &[f32],
    y: &mut [Out],
    (hi, lo, scale, shift): (f32, f32, f32, f32),
    store: Store,
) {
    fill_blocks(&mut y[..x.len()], store, |at, values| {
        let n = values.len();
        for (v, &xv) in values.iter_mut().zip(&x[at..at + n]) {
            *v = ((xv - hi) - lo) * scale + shift;
        }
    });
}

simd_fn! {
    /// Normalizes `x` into `y` as [`normalize_slice`] while summing
    /// `(Σd, Σd²)`, `d = v - next_shift`, over `next`, one segment (128 values) of each
    /// in turn: the statistics of the next slice are read from memory while
    /// this one is written, so reads and writes stream at the same time
    /// instead of taking turns. The sums depend on `next` alone (with `x`
    /// empty this is a plain statistics pass, with the same bits). Streaming
    /// stores are left unfenced: the caller calls [`fence`] when done.
    pub fn normalize_and_sum_next(x: &[f32], y: &mut [Out], hi: f32, lo: f32, scale: f32, shift: f32, store: Store, next: &[f32], next_shift: f32) -> (f64, f64) {
        let coefs = (hi, lo, scale, shift);
        let (mut lanes1, mut lanes2) = ([0f64; WIDE], [0f64; WIDE]);
        let whole = next.len() / SEGMENT * SEGMENT;
        let (mut at_x, mut at_next) = (0, 0);
        while at_x < x.len() || at_next < whole {
            if at_next < whole {
                centred_segment(&next[at_next..at_next + SEGMENT], next_shift, &mut lanes1, &mut lanes2);
                at_next += SEGMENT;
            }
            if at_x < x.len() {
                let end = (at_x + SEGMENT).min(x.len());
                normalize_blocks(&x[at_x..end], &mut y[at_x..end], coefs, store);
                at_x = end;
            }
        }
        let (mut s1, mut s2): (f64, f64) = (lanes1.iter().sum(), lanes2.iter().sum());
        for &v in &next[whole..] {
            let d = v - next_shift;
            s1 += d as f64;
            s2 += (d * d) as f64;
        }
        (s1, s2)
    }
}

simd_fn! {
    /// `Σx²` accumulated in f64 (RMSNorm).
    pub fn sum_squares(x: &[f32]) -> f64 {
        sum64(x, |v| (v as f64) * (v as f64))
    }
}

simd_fn! {
    /// `y = ((x - hi) - lo)·rstd·w + b` with per-element `w`, `b` (LayerNorm,
    /// RMSNorm; callers pass ones and zeros for absent parameters, which
    /// changes no bit of the result).
    pub fn normalize_row(x: &[f32], y: &mut [Out], hi: f32, lo: f32, rstd: f32, w: &[f32], b: &[f32], store: Store) {
        produce!(y, store, FORWARD_BLOCK, |at, buf| {
            let n = buf.len();
            for (((o, &xv), &wv), &bv) in buf.iter_mut().zip(&x[at..at + n]).zip(&w[at..at + n]).zip(&b[at..at + n]) {
                *o = ((xv - hi) - lo) * rstd * wv + bv;
            }
        });
    }
}

simd_fn! {
    /// `y = ((x - hi) - lo)·scale + shift` with scalar `scale`, `shift` (one
    /// channel), stored from registers block by block (BatchNorm eval on
    /// `[32, 64, 56, 56]`: 1.32 against 1.47 ms with `produce!`'s copy-out).
    pub fn normalize_slice(x: &[f32], y: &mut [Out], hi: f32, lo: f32, scale: f32, shift: f32, store: Store) {
        normalize_blocks(x, y, (hi, lo, scale, shift), store);
        fence(store);
    }
}

simd_fn! {
    /// One row of LayerNorm/RMSNorm backward, first pass: returns
    /// `(Σg, Σg·x̂)` with `g = w·dy`, `x̂ = ((x - hi) - lo)·rstd`, and adds
    /// `dy·x̂` to `dweight` and `dy` to `dbias` (f32 partials, which the
    /// caller flushes into f64 every few rows).
    pub fn row_grad_sums(
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        hi: f32,
        lo: f32,
        rstd: f32,
        dweight: &mut [f32],
        dbias: &mut [f32],
    ) -> (f64, f64) {
        let mut sums = (0.0, 0.0);
        // Blocks small enough to stay in L1 between the two loops.
        const BLOCK: usize = 1024;
        let blocks = x.chunks(BLOCK).zip(dy.chunks(BLOCK)).zip(w.chunks(BLOCK));
        let partials = dweight.chunks_mut(BLOCK).zip(dbias.chunks_mut(BLOCK));
        for (((xb, dyb), wb), (dwp, dbp)) in blocks.zip(partials) {
            let len = xb.len();
            let (mut x_hat, mut g) = ([0f32; BLOCK], [0f32; BLOCK]);
            let (x_hat, g) = (&mut x_hat[..len], &mut g[..len]);
            for i in 0..len {
                x_hat[i] = ((xb[i] - hi) - lo) * rstd;
                g[i] = dyb[i] * wb[i];
                dwp[i] += dyb[i] * x_hat[i];
                dbp[i] += dyb[i];
            }
            let (sum_g, sum_g_xhat) = sum2_segments_pairs(g, x_hat, |gv, _| gv, |gv, h| gv * h);
            sums.0 += sum_g;
            sums.1 += sum_g_xhat;
        }
        sums
    }
}

simd_fn! {
    /// `acc += partial` (f32 into f64), then `partial = 0`.
    pub fn flush(acc: &mut [f64], partial: &mut [f32]) {
        for (a, p) in acc.iter_mut().zip(partial.iter_mut()) {
            *a += *p as f64;
            *p = 0.0;
        }
    }
}

simd_fn! {
    /// One row of LayerNorm/RMSNorm backward, second pass:
    /// `dx = rstd·(w·dy - mean_g) + b·((x - hi) - lo)`.
    pub fn row_dx(x: &[f32], dy: &[f32], w: &[f32], hi: f32, lo: f32, rstd: f32, mean_g: f32, b: f32, dx: &mut [Out], store: Store) {
        produce!(dx, store, BACKWARD_BLOCK, |at, buf| {
            let n = buf.len();
            for (((o, &xv), &d), &wv) in buf.iter_mut().zip(&x[at..at + n]).zip(&dy[at..at + n]).zip(&w[at..at + n]) {
                *o = rstd * (d * wv - mean_g) + b * ((xv - hi) - lo);
            }
        });
    }
}

simd_fn! {
    /// `(Σdy, Σdy·x̂)` over one slice of a channel or group, `x̂ = ((x - hi) - lo)·rstd`.
    pub fn slice_grad_sums(x: &[f32], dy: &[f32], hi: f32, lo: f32, rstd: f32) -> (f64, f64) {
        sum2_segments_pairs(x, dy, |_, d| d, |xv, d| d * (((xv - hi) - lo) * rstd))
    }
}

simd_fn! {
    /// `dx = rstd·(w·dy - mean_g) + b·((x - hi) - lo)` over one slice (one channel: `w` is a scalar).
    pub fn slice_dx(x: &[f32], dy: &[f32], hi: f32, lo: f32, rstd: f32, w: f32, mean_g: f32, b: f32, dx: &mut [Out], store: Store) {
        fill_blocks(&mut dx[..x.len()], store, |at, values| {
            let n = values.len();
            for ((v, &xv), &d) in values.iter_mut().zip(&x[at..at + n]).zip(&dy[at..at + n]) {
                *v = rstd * (w * d - mean_g) + b * ((xv - hi) - lo);
            }
        });
        fence(store);
    }
}

simd_fn! {
    /// `acc += x²` element-wise (LRN's window sums).
    pub fn add_squares(acc: &mut [f32], x: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v * v;
        }
    }
}

simd_fn! {
    /// `acc += x` element-wise.
    pub fn add_assign(acc: &mut [f32], x: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v;
        }
    }
}

/// `s^(-β)` for the β values with a closed form in square roots.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NegPow {
    /// β = 0.5: `1/√s`.
    Half,
    /// β = 0.75: `1/√s · √(1/√s)`.
    ThreeQuarters,
    /// β = 1: `1/s`.
    One,
}

impl NegPow {
    /// The closed form for `beta`, when there is one.
    pub fn of(beta: f64) -> Option<Self> {
        if beta == 0.5 {
            Some(Self::Half)
        } else if beta == 0.75 {
            Some(Self::ThreeQuarters)
        } else if beta == 1.0 {
            Some(Self::One)
        } else {
            None
        }
    }
}

/// `b^(-1/2)`.
#[inline(always)]
fn pow_half(b: f32) -> f32 {
    1.0 / b.sqrt()
}

/// `b^(-3/4) = r·√r` with `r = b^(-1/2)`.
#[inline(always)]
fn pow_three_quarters(b: f32) -> f32 {
    let r = 1.0 / b.sqrt();
    r * r.sqrt()
}

/// `b^(-1)`.
#[inline(always)]
fn pow_one(b: f32) -> f32 {
    1.0 / b
}

/// Runs `$body` with `$f` bound to the function for `$pow`: the choice is
/// made once, outside the loop, so that each loop vectorizes.
macro_rules! with_neg_pow {
    ($pow:expr, $f:ident, $body:block) => {
        match $pow {
            NegPow::Half => {
                let $f = pow_half;
                $body
            }
            NegPow::ThreeQuarters => {
                let $f = pow_three_quarters;
                $body
            }
            NegPow::One => {
                let $f = pow_one;
                $body
            }
        }
    };
}

/// Spatial positions per block of the fused LRN forward: the window's
/// partial sums stay in L1 while its rows stream through.
const LRN_BLOCK: usize = 128;

simd_fn! {
    /// LRN forward of one channel of one sample `x` (`[C, s]` row-major):
    /// `y = x_c·(k + a·Σ_{j=lo}^{hi} x_j²)^(-β)`, block by block, so each
    /// window row is read straight from `x` (in cache: its neighbours just
    /// used it) and no separate sum pass over memory is needed. The sum runs
    /// from `lo` up, the same order in every path.
    pub fn lrn_forward_channel(x: &[f32], s: usize, c: usize, lo: usize, hi: usize, y: &mut [Out], k: f32, a: f32, pow: NegPow, store: Store) {
        with_neg_pow!(pow, neg_pow, {
            let mut block = [0f32; LRN_BLOCK];
            for (b, out) in y.chunks_mut(LRN_BLOCK).enumerate() {
                let (t0, len) = (b * LRN_BLOCK, out.len());
                let sum = &mut block[..len];
                for (o, &v) in sum.iter_mut().zip(&x[lo * s + t0..][..len]) {
                    *o = v * v;
                }
                for j in lo + 1..=hi {
                    for (o, &v) in sum.iter_mut().zip(&x[j * s + t0..][..len]) {
                        *o += v * v;
                    }
                }
                let xc = &x[c * s + t0..][..len];
                if store == Store::Cached {
                    for ((o, &xv), &sv) in out.iter_mut().zip(xc).zip(sum.iter()) {
                        o.write(xv * neg_pow(k + a * sv));
                    }
                } else {
                    for (sv, &xv) in sum.iter_mut().zip(xc) {
                        *sv = xv * neg_pow(k + a * *sv);
                    }
                    emit(out, sum, store);
                }
            }
            #[cfg(target_arch = "x86_64")]
            if store == Store::Streaming {
                // SAFETY: SSE is part of the x86-64 baseline.
                unsafe { std::arch::x86_64::_mm_sfence() };
            }
        });
    }
}

simd_fn! {
    /// LRN backward, first step on one channel row: from the window sums in
    /// `sum`, writes `scale = base^(-β)` into `scale` and
    /// `t = dy·x·base^(-β-1)` into `sum`.
    pub fn lrn_grad_terms(x: &[f32], dy: &[f32], sum: &mut [f32], scale: &mut [f32], k: f32, a: f32, pow: NegPow) {
        with_neg_pow!(pow, neg_pow, {
            for (((s, r_out), &xv), &d) in sum.iter_mut().zip(scale.iter_mut()).zip(x).zip(dy) {
                let base = k + a * *s;
                let r = neg_pow(base);
                *r_out = r;
                *s = d * xv * (r / base);
            }
        });
    }
}

simd_fn! {
    /// LRN backward, last step: `dx = dy·scale - coef·x·gathered`.
    pub fn lrn_dx(x: &[f32], dy: &[f32], scale: &[f32], gathered: &[f32], coef: f32, dx: &mut [Out], store: Store) {
        produce!(dx, store, BACKWARD_BLOCK, |at, buf| {
            let n = buf.len();
            let inputs = x[at..at + n].iter().zip(&dy[at..at + n]).zip(&scale[at..at + n]).zip(&gathered[at..at + n]);
            for (o, (((&xv, &d), &r), &u)) in buf.iter_mut().zip(inputs) {
                *o = d * r - coef * xv * u;
            }
        });
    }
}

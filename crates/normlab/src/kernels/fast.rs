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
    /// `Σx` with f32 lanes (only used for an approximate mean).
    pub fn sum(x: &[f32]) -> f64 {
        let mut acc = [0f32; L32];
        let chunks = x.chunks_exact(L32);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..L32 {
                acc[i] += c[i];
            }
        }
        acc.iter().map(|&v| v as f64).sum::<f64>() + tail.iter().map(|&v| v as f64).sum::<f64>()
    }
}

simd_fn! {
    /// `(Σd, Σd²)` with `d = x - shift`, accumulated in f64.
    pub fn centred_sums(x: &[f32], shift: f32) -> (f64, f64) {
        let mut s1 = [0f64; L64];
        let mut s2 = [0f64; L64];
        let chunks = x.chunks_exact(L64);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..L64 {
                let d = (c[i] - shift) as f64;
                s1[i] += d;
                s2[i] += d * d;
            }
        }
        let (mut t1, mut t2) = (0.0, 0.0);
        for &v in tail {
            let d = (v - shift) as f64;
            t1 += d;
            t2 += d * d;
        }
        (reduce64(&s1) + t1, reduce64(&s2) + t2)
    }
}

simd_fn! {
    /// `Σx²` accumulated in f64 (RMSNorm).
    pub fn sum_squares(x: &[f32]) -> f64 {
        let mut acc = [0f64; L64];
        let chunks = x.chunks_exact(L64);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..L64 {
                let v = c[i] as f64;
                acc[i] += v * v;
            }
        }
        reduce64(&acc) + tail.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
    }
}

simd_fn! {
    /// `y = ((x - hi) - lo)·rstd·w + b` with per-element `w`, `b` (LayerNorm,
    /// RMSNorm; callers pass ones and zeros for absent parameters, which
    /// changes no bit of the result).
    pub fn normalize_row(x: &[f32], y: &mut [f32], hi: f32, lo: f32, rstd: f32, w: &[f32], b: &[f32]) {
        for (((yv, &xv), &wv), &bv) in y.iter_mut().zip(x).zip(w).zip(b) {
            *yv = ((xv - hi) - lo) * rstd * wv + bv;
        }
    }
}

simd_fn! {
    /// `y = ((x - hi) - lo)·scale + shift` with scalar `scale`, `shift` (one channel).
    pub fn normalize_slice(x: &[f32], y: &mut [f32], hi: f32, lo: f32, scale: f32, shift: f32) {
        for (yv, &xv) in y.iter_mut().zip(x) {
            *yv = ((xv - hi) - lo) * scale + shift;
        }
    }
}

simd_fn! {
    /// One row of LayerNorm/RMSNorm backward, first pass: returns
    /// `(Σg, Σg·x̂)` with `g = w·dy`, `x̂ = ((x - hi) - lo)·rstd`, and adds
    /// `dy·x̂` to `dweight` and `dy` to `dbias` (f64 partials).
    pub fn row_grad_sums(
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        hi: f32,
        lo: f32,
        rstd: f32,
        dweight: &mut [f64],
        dbias: &mut [f64],
    ) -> (f64, f64) {
        let mut sg = [0f64; L64];
        let mut sgx = [0f64; L64];
        let lanes = x
            .chunks_exact(L64)
            .zip(dy.chunks_exact(L64))
            .zip(w.chunks_exact(L64))
            .zip(dweight.chunks_exact_mut(L64).zip(dbias.chunks_exact_mut(L64)));
        for (((xc, dc), wc), (dwc, dbc)) in lanes {
            for i in 0..L64 {
                let x_hat = ((xc[i] - hi) - lo) * rstd;
                let g = dc[i] * wc[i];
                sg[i] += g as f64;
                sgx[i] += (g * x_hat) as f64;
                dwc[i] += (dc[i] * x_hat) as f64;
                dbc[i] += dc[i] as f64;
            }
        }
        let done = x.len() / L64 * L64;
        let (mut tg, mut tgx) = (0.0, 0.0);
        for j in done..x.len() {
            let x_hat = ((x[j] - hi) - lo) * rstd;
            let g = dy[j] * w[j];
            tg += g as f64;
            tgx += (g * x_hat) as f64;
            dweight[j] += (dy[j] * x_hat) as f64;
            dbias[j] += dy[j] as f64;
        }
        (reduce64(&sg) + tg, reduce64(&sgx) + tgx)
    }
}

simd_fn! {
    /// One row of LayerNorm/RMSNorm backward, second pass:
    /// `dx = rstd·g + b·((x - hi) - lo) + c`, `g = w·dy`.
    pub fn row_dx(x: &[f32], dy: &[f32], w: &[f32], hi: f32, lo: f32, rstd: f32, b: f32, c: f32, dx: &mut [f32]) {
        for (((o, &xv), &d), &wv) in dx.iter_mut().zip(x).zip(dy).zip(w) {
            *o = rstd * (d * wv) + (b * ((xv - hi) - lo) + c);
        }
    }
}

simd_fn! {
    /// `(Σdy, Σdy·x̂)` over one slice of a channel or group, `x̂ = ((x - hi) - lo)·rstd`.
    pub fn slice_grad_sums(x: &[f32], dy: &[f32], hi: f32, lo: f32, rstd: f32) -> (f64, f64) {
        let mut s1 = [0f64; L64];
        let mut s2 = [0f64; L64];
        let cx = x.chunks_exact(L64);
        let cd = dy.chunks_exact(L64);
        let (tx, td) = (cx.remainder(), cd.remainder());
        for (a, d) in cx.zip(cd) {
            for i in 0..L64 {
                let x_hat = ((a[i] - hi) - lo) * rstd;
                s1[i] += d[i] as f64;
                s2[i] += (d[i] * x_hat) as f64;
            }
        }
        let (mut t1, mut t2) = (0.0, 0.0);
        for (&a, &d) in tx.iter().zip(td) {
            t1 += d as f64;
            t2 += (d * (((a - hi) - lo) * rstd)) as f64;
        }
        (reduce64(&s1) + t1, reduce64(&s2) + t2)
    }
}

simd_fn! {
    /// `dx = a·dy + b·((x - hi) - lo) + c` over one slice.
    pub fn slice_dx(x: &[f32], dy: &[f32], hi: f32, lo: f32, a: f32, b: f32, c: f32, dx: &mut [f32]) {
        for ((o, &xv), &d) in dx.iter_mut().zip(x).zip(dy) {
            *o = a * d + (b * ((xv - hi) - lo) + c);
        }
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
        match beta {
            b if b == 0.5 => Some(Self::Half),
            b if b == 0.75 => Some(Self::ThreeQuarters),
            b if b == 1.0 => Some(Self::One),
            _ => None,
        }
    }
}

simd_fn! {
    /// LRN forward on one channel row: `scale = (k + a·sum)^(-β)` is
    /// written into `sum`, and `y = x·scale`.
    pub fn lrn_apply(x: &[f32], sum: &mut [f32], y: &mut [f32], k: f32, a: f32, pow: NegPow) {
        for ((s, &xv), yv) in sum.iter_mut().zip(x).zip(y.iter_mut()) {
            let base = k + a * *s;
            let r = match pow {
                NegPow::Half => 1.0 / base.sqrt(),
                NegPow::ThreeQuarters => {
                    let r = 1.0 / base.sqrt();
                    r * r.sqrt()
                }
                NegPow::One => 1.0 / base,
            };
            *s = r;
            *yv = xv * r;
        }
    }
}

simd_fn! {
    /// LRN backward, first step on one channel row: from the window sums in
    /// `sum`, writes `scale = base^(-β)` into `scale` and
    /// `t = dy·x·base^(-β-1)` into `sum`.
    pub fn lrn_grad_terms(x: &[f32], dy: &[f32], sum: &mut [f32], scale: &mut [f32], k: f32, a: f32, pow: NegPow) {
        for (((s, r_out), &xv), &d) in sum.iter_mut().zip(scale.iter_mut()).zip(x).zip(dy) {
            let base = k + a * *s;
            let r = match pow {
                NegPow::Half => 1.0 / base.sqrt(),
                NegPow::ThreeQuarters => {
                    let r = 1.0 / base.sqrt();
                    r * r.sqrt()
                }
                NegPow::One => 1.0 / base,
            };
            *r_out = r;
            *s = d * xv * (r / base);
        }
    }
}

simd_fn! {
    /// LRN backward, last step: `dx = dy·scale - coef·x·gathered`.
    pub fn lrn_dx(x: &[f32], dy: &[f32], scale: &[f32], gathered: &[f32], coef: f32, dx: &mut [f32]) {
        for ((((o, &xv), &d), &r), &u) in dx.iter_mut().zip(x).zip(dy).zip(scale).zip(gathered) {
            *o = d * r - coef * xv * u;
        }
    }
}

//! Loops over a block of positions (columns) of one sample of `[N, C, S]`
//! whose statistics run across the `C` channel rows: LayerNorm and RMSNorm
//! over the channels at each position ([`crate::kernels::channel_rows`]).
//!
//! Each row of the block is a contiguous run of `w` values; the per-position
//! accumulators (`w` f64 values) stay in L1 while the rows stream past, so
//! the loops are element-wise in f64 across positions: no horizontal sums,
//! the same operations in the same order at every SIMD level.

use std::mem::MaybeUninit;

use crate::float::Float;
use crate::simd::simd_fn;

simd_fn! {
    /// Per-position statistics of a block over its rows: `x` holds the
    /// sample's rows of `stride` values, the block is `mean.len()` values
    /// from `at` in each. Centred (LayerNorm): `mean = Σx/C`, then
    /// `var = Σ(x - mean)²/C` (two passes, exact to f64 rounding); not
    /// centred (RMSNorm): `mean = 0`, `var = Σx²/C`.
    pub fn column_stats<T: Float>[L](x: &[T], stride: usize, at: usize, centred: bool, mean: &mut [f64], var: &mut [f64]) {
        let w = mean.len();
        let rows = (x.len() / stride) as f64;
        mean.fill(0.0);
        var.fill(0.0);
        if centred {
            for row in x.chunks_exact(stride) {
                for (m, v) in mean.iter_mut().zip(&row[at..at + w]) {
                    *m += v.to_f64();
                }
            }
            for m in mean.iter_mut() {
                *m /= rows;
            }
        }
        for row in x.chunks_exact(stride) {
            for ((q, &m), v) in var.iter_mut().zip(mean.iter()).zip(&row[at..at + w]) {
                let d = v.to_f64() - m;
                *q += d * d;
            }
        }
        for q in var.iter_mut() {
            *q /= rows;
        }
    }
}

simd_fn! {
    /// `y = ((x - mean_j)·rstd_j)·γ_c + β_c` over a block, rounded once to
    /// the storage type.
    pub fn column_normalize<T: Float>[L](x: &[T], y: &mut [MaybeUninit<T>], stride: usize, at: usize, mean: &[f64], rstd: &[f64], gamma: &[f64], beta: &[f64]) {
        let w = mean.len();
        let rows = x.chunks_exact(stride).zip(y.chunks_exact_mut(stride));
        for ((row, out), (&g, &b)) in rows.zip(gamma.iter().zip(beta)) {
            let cols = row[at..at + w].iter().zip(&mut out[at..at + w]);
            for ((v, o), (&m, &r)) in cols.zip(mean.iter().zip(rstd)) {
                o.write(T::from_f64((v.to_f64() - m) * r * g + b));
            }
        }
    }
}

simd_fn! {
    /// The backward's sums over a block: per position `Σ_c g` and
    /// `Σ_c g·x̂` (`g = γ_c·dy`, `x̂ = (x - mean_j)·rstd_j`) into `sum_g`,
    /// `sum_gx`; per channel `Σ_j dy·x̂` and `Σ_j dy` added to `dgamma`,
    /// `dbeta`.
    pub fn column_grad_sums<T: Float>[L](x: &[T], dy: &[T], stride: usize, at: usize, mean: &[f64], rstd: &[f64], gamma: &[f64], sum_g: &mut [f64], sum_gx: &mut [f64], dgamma: &mut [f64], dbeta: &mut [f64]) {
        let w = mean.len();
        sum_g.fill(0.0);
        sum_gx.fill(0.0);
        let rows = x.chunks_exact(stride).zip(dy.chunks_exact(stride));
        for (ch, (row, drow)) in rows.enumerate() {
            let g = gamma[ch];
            let (mut dg, mut db) = (0.0, 0.0);
            let cols = row[at..at + w].iter().zip(&drow[at..at + w]);
            for (((v, d), (&m, &r)), (sg, sgx)) in cols.zip(mean.iter().zip(rstd)).zip(sum_g.iter_mut().zip(sum_gx.iter_mut())) {
                let (d, xh) = (d.to_f64(), (v.to_f64() - m) * r);
                *sg += g * d;
                *sgx += g * d * xh;
                dg += d * xh;
                db += d;
            }
            dgamma[ch] += dg;
            dbeta[ch] += db;
        }
    }
}

simd_fn! {
    /// `dx = rstd_j·(γ_c·dy - mean_g_j) + b_j·(x - mean_j)` over a block
    /// (the coefficients of [`crate::kernels::DxCoefficients`] per position).
    pub fn column_input_grad<T: Float>[L](x: &[T], dy: &[T], dx: &mut [MaybeUninit<T>], stride: usize, at: usize, mean: &[f64], rstd: &[f64], mean_g: &[f64], b: &[f64], gamma: &[f64]) {
        let w = mean.len();
        let rows = x.chunks_exact(stride).zip(dy.chunks_exact(stride)).zip(dx.chunks_exact_mut(stride));
        for (((row, drow), out), &g) in rows.zip(gamma) {
            let cols = row[at..at + w].iter().zip(&drow[at..at + w]).zip(&mut out[at..at + w]);
            let coefs = mean.iter().zip(rstd).zip(mean_g.iter().zip(b));
            for (((v, d), o), ((&m, &r), (&mg, &k))) in cols.zip(coefs) {
                let xc = v.to_f64() - m;
                o.write(T::from_f64(r * (g * d.to_f64() - mg) + k * xc));
            }
        }
    }
}

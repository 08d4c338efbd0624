//! Channel-wise kernels for a small spatial size (`[N, C]` BatchNorm1d input
//! is `S = 1`): there a channel's "slice" is one or a few values, so the
//! per-slice loops would pay a call and a task per value. These kernels walk
//! whole samples (rows of `C·S` values) instead, keeping per-channel
//! accumulators for the row.
//!
//! Rows are grouped in blocks of [`ROWS_PER_BLOCK`] whose partial results are
//! combined in block order, so results do not depend on the thread count.
//! Arithmetic is f64 throughout: rows are short and these shapes are small.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::DxCoefficients;
use crate::moments::Moments;
use crate::Float;

/// Largest spatial size handled here.
pub(crate) const MAX_SPATIAL: usize = 8;

/// Rows per reduction block: fixed, so results are identical for any
/// number of threads.
const ROWS_PER_BLOCK: usize = 64;

/// Values per parallel task in element-wise passes.
const MIN_TASK_VALUES: usize = 1 << 14;

fn rows_per_task(row: usize) -> usize {
    (MIN_TASK_VALUES / row.max(1)).max(1)
}

/// Per-channel moments of `[N, C, S]`: two passes per block of rows
/// (block sums, then centred squares about the block mean), blocks merged
/// in order with Chan's formula.
pub(crate) fn moments<T: Float>(x: &[T], c: usize, s: usize) -> Vec<Moments> {
    let row = c * s;
    x.par_chunks(row * ROWS_PER_BLOCK)
        .map(|block| {
            let rows = block.len() / row;
            let count = (rows * s) as f64;
            let mut sum = vec![0.0f64; c];
            for r in block.chunks_exact(row) {
                for (j, v) in r.iter().enumerate() {
                    sum[j / s] += v.to_f64();
                }
            }
            let mean: Vec<f64> = sum.iter().map(|t| t / count).collect();
            let mut m2 = vec![0.0f64; c];
            for r in block.chunks_exact(row) {
                for (j, v) in r.iter().enumerate() {
                    let d = v.to_f64() - mean[j / s];
                    m2[j / s] += d * d;
                }
            }
            (0..c)
                .map(|ch| Moments {
                    count,
                    mean: mean[ch],
                    m2: m2[ch],
                })
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![Moments::EMPTY; c], |acc, block| {
            acc.into_iter()
                .zip(block)
                .map(|(a, b)| a.merge(b))
                .collect()
        })
}

/// `y = (x - mean_c)·scale_c + shift_c`.
pub(crate) fn normalize<T: Float>(
    x: &[T],
    y: &mut [MaybeUninit<T>],
    c: usize,
    s: usize,
    mean: &[f64],
    scale: &[f64],
    shift: &[f64],
) {
    let row = c * s;
    x.par_chunks(row)
        .zip(y.par_chunks_mut(row))
        .with_min_len(rows_per_task(row))
        .for_each(|(xr, yr)| {
            for (j, (o, v)) in yr.iter_mut().zip(xr).enumerate() {
                let ch = j / s;
                o.write(T::from_f64((v.to_f64() - mean[ch]) * scale[ch] + shift[ch]));
            }
        });
}

/// Per-channel `(Σdy, Σdy·x̂)` with `x̂ = (x - mean_c)·rstd_c`.
pub(crate) fn grad_sums<T: Float>(
    x: &[T],
    dy: &[T],
    c: usize,
    s: usize,
    mean: &[f64],
    rstd: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let row = c * s;
    x.par_chunks(row * ROWS_PER_BLOCK)
        .zip(dy.par_chunks(row * ROWS_PER_BLOCK))
        .map(|(xb, db)| {
            let (mut s1, mut s2) = (vec![0.0f64; c], vec![0.0f64; c]);
            for (j, (v, d)) in xb.iter().zip(db).enumerate() {
                let ch = (j % row) / s;
                let d = d.to_f64();
                s1[ch] += d;
                s2[ch] += d * (v.to_f64() - mean[ch]) * rstd[ch];
            }
            (s1, s2)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold((vec![0.0; c], vec![0.0; c]), |(mut a, mut b), (pa, pb)| {
            for ch in 0..c {
                a[ch] += pa[ch];
                b[ch] += pb[ch];
            }
            (a, b)
        })
}

/// `dx = rstd_c·(w_c·dy - mean_g,c) + b_c·(x - mean_c)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn input_grad<T: Float>(
    x: &[T],
    dy: &[T],
    dx: &mut [MaybeUninit<T>],
    c: usize,
    s: usize,
    mean: &[f64],
    weight: &[f64],
    coefs: &[DxCoefficients],
) {
    let row = c * s;
    x.par_chunks(row)
        .zip(dy.par_chunks(row))
        .zip(dx.par_chunks_mut(row))
        .with_min_len(rows_per_task(row))
        .for_each(|((xr, dr), or)| {
            for (j, ((o, v), d)) in or.iter_mut().zip(xr).zip(dr).enumerate() {
                let ch = j / s;
                let k = coefs[ch];
                o.write(T::from_f64(
                    k.rstd * (weight[ch] * d.to_f64() - k.mean_g) + k.b * (v.to_f64() - mean[ch]),
                ));
            }
        });
}

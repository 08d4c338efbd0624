//! Channel-wise kernels for a small spatial size (`[N, C]` BatchNorm1d input
//! is `S = 1`): there a channel's slice is one or a few values, so per-slice
//! loops would pay a call per value. These kernels walk whole samples (rows
//! of `C·S` values) instead, with per-position lane accumulators
//! ([`transform::add_positions`]) and per-position coefficients
//! ([`PositionCoefs`]), so a row is one vector pass.
//!
//! Statistics are kept per position and computed in tiles of column
//! stripes × blocks of [`ROWS_PER_BLOCK`] rows (one task each), the blocks
//! merged in row order, so results do not depend on the thread count.
//! Statistics follow [`Moments`]: per block, a lane sum gives each position's
//! shift, the sums centred on it are taken in lanes over [`FLUSH_ROWS`] rows
//! and in f64 across them, and positions and blocks are merged with Chan's
//! formula.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::parallel::min_units;
use super::DxCoefficients;
use crate::float::Lane;
use crate::moments::Moments;
use crate::simd::sums;
use crate::simd::transform::{self, PositionCoefs};
use crate::Float;

/// Largest spatial size handled here: above it a channel's slice is long
/// enough for the per-slice loops.
pub(crate) const MAX_SPATIAL: usize = 8;

/// Rows per reduction block: fixed, so results are identical for any
/// number of threads.
const ROWS_PER_BLOCK: usize = 64;

/// Rows whose centred sums are added in lanes before joining the f64 sums:
/// the 4-term lane sums of [`sums::SEGMENT`].
const FLUSH_ROWS: usize = 4;

/// Each channel's value repeated at its `s` positions, as lanes.
fn expand<C: Lane>(per_channel: impl Iterator<Item = f64>, s: usize) -> Vec<C> {
    per_channel
        .flat_map(|v| std::iter::repeat(C::of(v)).take(s))
        .collect()
}

/// Positions per stripe of the statistics passes: rows are cut into
/// column stripes, and each stripe into blocks of [`ROWS_PER_BLOCK`] rows;
/// every tile (stripe × block) is a task (a wide `[64, 4096]` BatchNorm1d
/// input is 64 rows, too few to split by rows alone; `[1024, 1024]` is one
/// stripe, too few to split by columns alone). A position's sums over a
/// block do not depend on the tiling, and blocks are merged in row order,
/// so neither do the results.
const STRIPE: usize = 1024;

/// The tiles of `rows` rows of `row` positions, stripe by stripe, blocks in
/// row order within each: `(rows, columns)`.
fn tiles(rows: usize, row: usize) -> Vec<(Range<usize>, Range<usize>)> {
    let stripes = (0..row)
        .step_by(STRIPE)
        .map(|lo| lo..(lo + STRIPE).min(row));
    stripes
        .flat_map(|cols| {
            (0..rows)
                .step_by(ROWS_PER_BLOCK)
                .map(move |r| (r..(r + ROWS_PER_BLOCK).min(rows), cols.clone()))
        })
        .collect()
}

/// Per-channel moments of `[N, C, S]`.
pub(crate) fn moments<T: Float>(x: &[T], c: usize, s: usize) -> Vec<Moments> {
    let row = c * s;
    let rows = x.len() / row.max(1);
    if rows == 0 {
        return vec![Moments::EMPTY; c];
    }
    let per_tile: Vec<Vec<Moments>> = tiles(rows, row)
        .into_par_iter()
        .map(|(block, cols)| {
            let w = cols.len();
            let zero = T::Lane::ZERO;
            let (mut shift, mut s1, mut s2) = (vec![zero; w], vec![zero; w], vec![zero; w]);
            let (mut w1, mut w2) = (vec![0f64; w], vec![0f64; w]);
            let (low, _) = T::Lane::SAFE_RANGE;
            let count = block.len() as f64;
            let cells = |r: usize| &x[r * row + cols.start..r * row + cols.end];
            for r in block.clone() {
                transform::sum_positions(cells(r), &mut shift);
            }
            let scale = T::Lane::of(1.0 / count);
            for v in &mut shift {
                *v = *v * scale;
            }
            for (i, r) in block.clone().enumerate() {
                transform::add_positions(cells(r), None, &shift, &shift, &shift, &mut s1, &mut s2);
                if (i + 1) % FLUSH_ROWS == 0 {
                    sums::flush::<T>(&mut w1, &mut s1);
                    sums::flush::<T>(&mut w2, &mut s2);
                }
            }
            sums::flush::<T>(&mut w1, &mut s1);
            sums::flush::<T>(&mut w2, &mut s2);
            (0..w)
                .map(|j| {
                    let m = Moments::from_centred_sums(count, shift[j].wide(), w1[j], w2[j]);
                    if m.m2.is_finite() && m.m2 > count * low * low {
                        m
                    } else {
                        // Squares that overflow or underflow the lanes (or
                        // values that are not finite): this position of the
                        // block in f64, two passes.
                        let values = || block.clone().map(|r| x[r * row + cols.start + j].to_f64());
                        let mean = values().sum::<f64>() / count;
                        let m2 = values().map(|v| (v - mean) * (v - mean)).sum();
                        Moments { count, mean, m2 }
                    }
                })
                .collect()
        })
        .collect();
    // Tiles come stripe by stripe, blocks in row order: merge each stripe's
    // blocks in that order.
    let mut per_position = Vec::with_capacity(row);
    let blocks = rows.div_ceil(ROWS_PER_BLOCK).max(1);
    for stripe in per_tile.chunks(blocks) {
        let mut acc = vec![Moments::EMPTY; stripe.first().map_or(0, Vec::len)];
        for block in stripe {
            for (a, &m) in acc.iter_mut().zip(block) {
                *a = a.merge(m);
            }
        }
        per_position.extend(acc);
    }
    per_position
        .chunks_exact(s)
        .map(|p| p.iter().fold(Moments::EMPTY, |acc, &m| acc.merge(m)))
        .collect()
}

/// The channel mean of every position as `(hi, lo)` lanes.
fn split_means<C: Lane>(mean: &[f64], s: usize) -> (Vec<C>, Vec<C>) {
    let hi: Vec<C> = expand(mean.iter().map(|&m| C::split(m).0.wide()), s);
    let lo: Vec<C> = expand(mean.iter().map(|&m| C::split(m).1.wide()), s);
    (hi, lo)
}

/// `y = (x - mean_c)·scale_c + shift_c`.
pub(crate) fn normalize<T: Float>(
    x: &[T],
    y: &mut [MaybeUninit<T>],
    (c, s): (usize, usize),
    mean: &[f64],
    scale: &[f64],
    shift: &[f64],
) {
    let row = c * s;
    let (hi, lo) = split_means(mean, s);
    let k = PositionCoefs {
        hi,
        lo,
        scale: expand(scale.iter().copied(), s),
        shift: expand(shift.iter().copied(), s),
        offset: Vec::new(),
    };
    x.par_chunks(row)
        .zip(y.par_chunks_mut(row))
        .with_min_len(min_units(row))
        .for_each(|(xr, yr)| transform::normalize_positions(xr, yr, &k));
}

/// Per-channel `(Σdy, Σdy·x̂)` with `x̂ = (x - mean_c)·rstd_c`: per
/// position over every row (lane sums of [`FLUSH_ROWS`] rows, then f64),
/// tiles in parallel, blocks added in row order, then per channel in
/// position order.
pub(crate) fn grad_sums<T: Float>(
    x: &[T],
    dy: &[T],
    (c, s): (usize, usize),
    mean: &[f64],
    rstd: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let row = c * s;
    let (hi, lo) = split_means::<T::Lane>(mean, s);
    let r: Vec<T::Lane> = expand(rstd.iter().copied(), s);
    let rows = x.len() / row.max(1);
    if rows == 0 {
        return (vec![0.0; c], vec![0.0; c]);
    }
    let per_tile: Vec<(Vec<f64>, Vec<f64>)> = tiles(rows, row)
        .into_par_iter()
        .map(|(block, cols)| {
            let w = cols.len();
            let (mut s1, mut s2) = (vec![T::Lane::ZERO; w], vec![T::Lane::ZERO; w]);
            let (mut w1, mut w2) = (vec![0f64; w], vec![0f64; w]);
            let (hi, lo, r) = (&hi[cols.clone()], &lo[cols.clone()], &r[cols.clone()]);
            for (i, rr) in block.enumerate() {
                let cells = rr * row + cols.start..rr * row + cols.end;
                let (xc, dc) = (&x[cells.clone()], &dy[cells]);
                transform::add_positions(xc, Some(dc), hi, lo, r, &mut s1, &mut s2);
                if (i + 1) % FLUSH_ROWS == 0 {
                    sums::flush::<T>(&mut w1, &mut s1);
                    sums::flush::<T>(&mut w2, &mut s2);
                }
            }
            sums::flush::<T>(&mut w1, &mut s1);
            sums::flush::<T>(&mut w2, &mut s2);
            (w1, w2)
        })
        .collect();
    // Each stripe's blocks added in row order.
    let (mut w1, mut w2) = (Vec::with_capacity(row), Vec::with_capacity(row));
    let blocks = rows.div_ceil(ROWS_PER_BLOCK).max(1);
    for stripe in per_tile.chunks(blocks) {
        let w = stripe.first().map_or(0, |b| b.0.len());
        let (mut a1, mut a2) = (vec![0f64; w], vec![0f64; w]);
        for (b1, b2) in stripe {
            for (a, v) in a1.iter_mut().zip(b1) {
                *a += v;
            }
            for (a, v) in a2.iter_mut().zip(b2) {
                *a += v;
            }
        }
        w1.extend(a1);
        w2.extend(a2);
    }
    let per_channel =
        |w: &[f64]| -> Vec<f64> { w.chunks_exact(s).map(|p| p.iter().sum()).collect() };
    (per_channel(&w1), per_channel(&w2))
}

/// `dx = rstd_c·(w_c·dy - mean_g,c) + b_c·(x - mean_c)`.
pub(crate) fn input_grad<T: Float>(
    x: &[T],
    dy: &[T],
    dx: &mut [MaybeUninit<T>],
    (c, s): (usize, usize),
    mean: &[f64],
    weight: &[f64],
    coefs: &[DxCoefficients],
) {
    let row = c * s;
    let (hi, lo) = split_means(mean, s);
    let k = PositionCoefs {
        hi,
        lo,
        scale: expand(coefs.iter().map(|k| k.b), s),
        shift: expand(coefs.iter().zip(weight).map(|(k, w)| k.rstd * w), s),
        offset: expand(coefs.iter().map(|k| k.rstd * k.mean_g), s),
    };
    x.par_chunks(row)
        .zip(dy.par_chunks(row))
        .zip(dx.par_chunks_mut(row))
        .with_min_len(min_units(row))
        .for_each(|((xr, dr), or)| transform::input_grad_positions(xr, dr, or, &k));
}

//! Channel-wise kernels for a small spatial size (`[N, C]` BatchNorm1d input
//! is `S = 1`): there a channel's slice is one or a few values, so per-slice
//! loops would pay a call per value. These kernels walk whole samples (rows
//! of `C·S` values) instead, with per-position sums of row groups
//! ([`transform::add_row_group`]) and per-position coefficients
//! ([`PositionCoefs`]), so a row is one vector pass.
//!
//! Statistics are kept per position and computed in tiles of column
//! stripes × blocks of [`ROWS_PER_BLOCK`] rows (one task each), the blocks
//! merged in row order, so results do not depend on the thread count.
//! Statistics follow [`Moments`]: each position's shift is the mean of
//! its first rows, the sums centred on it are taken in lanes over
//! [`FLUSH_ROWS`] rows and in f64 across them, a block's sums are added to
//! the others' in row order, and a position whose shift proves too far
//! from its mean is redone in f64.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::parallel::{self, min_units};
use super::{ChannelAct, DxCoefficients};
use crate::alloc::Scratch;
use crate::float::Lane;
use crate::moments::{Moments, SHIFT_SAMPLE};
use crate::simd::activation::Act;
use crate::simd::transform::{self, PositionCoefs, ZCoefs};
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

/// Each of the `c` channels' values repeated at its `s` positions, as lanes.
fn expand<C: Lane>(per_channel: impl Iterator<Item = f64>, (c, s): (usize, usize)) -> Scratch<C> {
    if s == 1 {
        // BatchNorm1d: one position per channel.
        return Scratch::collect(c, per_channel.map(C::of));
    }
    Scratch::collect(
        c * s,
        per_channel.flat_map(|v| std::iter::repeat_n(C::of(v), s)),
    )
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

/// `data` cut into one piece per tile, in tile order, each `lanes`
/// values per column of the tile.
fn per_tile<'a, V>(
    data: &'a mut [V],
    tiles: &[(Range<usize>, Range<usize>)],
    lanes: usize,
) -> Vec<&'a mut [V]> {
    let mut rest = data;
    tiles
        .iter()
        .map(|(_, cols)| {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(cols.len() * lanes);
            rest = tail;
            piece
        })
        .collect()
}

/// Calls `add(x_rows, dy_rows)` on the tile's rows in groups of
/// [`FLUSH_ROWS`] (the last one shorter), each row of `x` (and of `dy`
/// when given) cut to the tile's columns.
fn for_row_groups<'a, T>(
    x: &'a [T],
    dy: Option<&'a [T]>,
    row: usize,
    block: &Range<usize>,
    cols: &Range<usize>,
    mut add: impl FnMut(&[&'a [T]], Option<&[&'a [T]]>),
) {
    let mut xs: [&[T]; FLUSH_ROWS] = [&[]; FLUSH_ROWS];
    let mut dys: [&[T]; FLUSH_ROWS] = [&[]; FLUSH_ROWS];
    for first in block.clone().step_by(FLUSH_ROWS) {
        let n = (block.end - first).min(FLUSH_ROWS);
        for i in 0..n {
            let cells = (first + i) * row + cols.start..(first + i) * row + cols.end;
            xs[i] = &x[cells.clone()];
            if let Some(dy) = dy {
                dys[i] = &dy[cells];
            }
        }
        add(&xs[..n], dy.map(|_| &dys[..n]));
    }
}

/// Per-position pair sums over every row: each tile (in parallel) adds its
/// row groups with `add(x_rows, dy_rows, cols, w1, w2)` into its own f64
/// sums, then a position's blocks are added in row order. Returns the two
/// sums of every position.
fn position_sums<T: Float>(
    x: &[T],
    dy: Option<&[T]>,
    row: usize,
    add: impl Fn(&[&[T]], Option<&[&[T]]>, &Range<usize>, &mut [f64], &mut [f64]) + Sync,
) -> (Scratch<f64>, Scratch<f64>) {
    let rows = x.len() / row;
    let tiles = tiles(rows, row);
    let blocks = rows.div_ceil(ROWS_PER_BLOCK);
    // Each tile's per-position sums, the first then the second, in the order of `tiles`.
    let mut tile_sums = Scratch::filled(blocks * row * 2, 0f64);
    let pieces = per_tile(&mut tile_sums, &tiles, 2);
    parallel::for_each(
        tiles
            .par_iter()
            .zip(pieces)
            .with_min_len(min_units(tile_values(rows, row))),
        |((block, cols), out)| {
            let (w1, w2) = out.split_at_mut(cols.len());
            for_row_groups(x, dy, row, block, cols, |xs, dys| {
                add(xs, dys, cols, w1, w2)
            });
        },
    );
    let (mut s1, mut s2) = (Scratch::filled(row, 0f64), Scratch::filled(row, 0f64));
    let mut at = 0;
    for (_, cols) in tiles.iter().step_by(blocks) {
        let w = cols.len();
        let stripe = &tile_sums[at..at + blocks * 2 * w];
        for j in 0..w {
            for b in stripe.chunks_exact(2 * w) {
                s1[cols.start + j] += b[j];
                s2[cols.start + j] += b[w + j];
            }
        }
        at += blocks * 2 * w;
    }
    (s1, s2)
}

/// Values in a whole tile of `rows` rows of `row` positions.
fn tile_values(rows: usize, row: usize) -> usize {
    rows.min(ROWS_PER_BLOCK) * row.min(STRIPE)
}

/// Per-channel moments of `[N, C, S]`: every position's sums centred on
/// one shift, the mean of its first [`SHIFT_SAMPLE`] rows, taken in one
/// pass over tiles and added across blocks in row order; a position whose
/// shift proves more than a standard deviation from its mean, or whose
/// squares leave the lanes' range, is redone in f64 with the others
/// ([`exact_columns`]). One pass over `x` where a shift per block took two.
pub(crate) fn moments<T: Float>(x: &[T], c: usize, s: usize) -> Vec<Moments> {
    let row = c * s;
    let rows = x.len() / row.max(1);
    if rows == 0 {
        return vec![Moments::EMPTY; c];
    }
    let mut shift = Scratch::filled(row, T::Lane::ZERO);
    let head = rows.min(SHIFT_SAMPLE);
    for r in x.chunks_exact(row).take(head) {
        transform::sum_positions(r, &mut shift);
    }
    let scale = T::Lane::of(1.0 / head as f64);
    for v in shift.iter_mut() {
        *v = *v * scale;
    }
    let (s1, s2) = position_sums(x, None, row, |xs, _, cols, w1, w2| {
        let shift = &shift[cols.clone()];
        transform::add_row_group(xs, None, shift, shift, shift, w1, w2, ZCoefs::none())
    });
    // Positions whose sums fail the check are redone together afterwards.
    let count = rows as f64;
    let mut per_position = Scratch::filled(row, Moments::EMPTY);
    let mut redo = Vec::new();
    for p in 0..row {
        match Moments::from_centred_sums_checked(count, shift[p], s1[p], s2[p]) {
            Some(m) => per_position[p] = m,
            None => redo.push(p),
        }
    }
    if !redo.is_empty() {
        for (p, m) in redo.iter().zip(exact_columns(x, row, &redo)) {
            per_position[*p] = m;
        }
    }
    // A channel's positions merged in position order.
    let mut per_channel = vec![Moments::EMPTY; c];
    for (p, &m) in per_position.iter().enumerate() {
        let ch = &mut per_channel[p / s];
        *ch = ch.merge(m);
    }
    per_channel
}

/// Moments of the `columns` (positions) of the rows of `row` values in
/// `x`, in f64 with two passes: the positions whose shifted lane sums could
/// not be trusted (constant columns such as a ReLU's dead units, a shift
/// far from the mean, squares outside the lanes' range). Both passes go
/// over blocks of [`ROWS_PER_BLOCK`] rows in parallel, each block reading
/// its rows in memory order, and add the blocks' sums in row order.
fn exact_columns<T: Float>(x: &[T], row: usize, columns: &[usize]) -> Vec<Moments> {
    let rows = x.len() / row;
    let count = rows as f64;
    let blocks: Vec<Range<usize>> = (0..rows)
        .step_by(ROWS_PER_BLOCK)
        .map(|r| r..(r + ROWS_PER_BLOCK).min(rows))
        .collect();
    let min_len = min_units(ROWS_PER_BLOCK * columns.len());
    // Σ term(value, column index) per column over each block, then over
    // blocks in row order.
    let sums = |term: &(dyn Fn(f64, usize) -> f64 + Sync)| -> Vec<f64> {
        let per_block: Vec<Vec<f64>> =
            parallel::collect(blocks.par_iter().with_min_len(min_len).map(|block| {
                let mut acc = vec![0.0; columns.len()];
                for r in block.clone() {
                    let values = &x[r * row..(r + 1) * row];
                    for (i, (a, &p)) in acc.iter_mut().zip(columns).enumerate() {
                        *a += term(values[p].to_f64(), i);
                    }
                }
                acc
            }));
        let mut total = vec![0.0; columns.len()];
        for block in per_block {
            for (t, v) in total.iter_mut().zip(block) {
                *t += v;
            }
        }
        total
    };
    let mean: Vec<f64> = sums(&|v, _| v).into_iter().map(|s| s / count).collect();
    let m2 = sums(&|v, i| (v - mean[i]) * (v - mean[i]));
    mean.iter()
        .zip(m2)
        .map(|(&mean, m2)| Moments { count, mean, m2 })
        .collect()
}

/// The channel mean of every position as `(hi, lo)` lanes.
fn split_means<C: Lane>(mean: &[f64], s: usize) -> (Scratch<C>, Scratch<C>) {
    let c = mean.len();
    let hi = expand(mean.iter().map(|&m| C::split(m).0.wide()), (c, s));
    let lo = expand(mean.iter().map(|&m| C::split(m).1.wide()), (c, s));
    (hi, lo)
}

/// Values per task of an element-wise pass over `rows` rows of `row`
/// values: whole rows, as many tasks as there are whole tasks' worth of
/// values ([`min_units`]; at least one), the rows shared evenly among them.
/// Every task then holds at least a task's worth, so an input below two
/// tasks' worth runs on the calling thread; the split depends on the shape
/// alone.
fn row_run(rows: usize, row: usize) -> usize {
    let tasks = (rows / min_units(row)).max(1);
    row * rows.div_ceil(tasks).max(1)
}

/// `y = φ((x - mean_c)·scale_c + shift_c)` (`φ` the identity without `act`).
pub(crate) fn normalize<T: Float>(
    x: &[T],
    y: &mut [MaybeUninit<T>],
    (c, s): (usize, usize),
    mean: &[f64],
    scale: &[f64],
    shift: &[f64],
    act: Act,
) {
    let row = c * s;
    let (hi, lo) = split_means(mean, s);
    let k = PositionCoefs {
        hi,
        lo,
        scale: expand(scale.iter().copied(), (c, s)),
        shift: expand(shift.iter().copied(), (c, s)),
        offset: Scratch::filled(0, T::Lane::ZERO),
        z_scale: Scratch::filled(0, T::Lane::ZERO),
        z_shift: Scratch::filled(0, T::Lane::ZERO),
    };
    // Runs of whole rows, so that a kernel call takes its rows in groups
    // ([`transform::ROW_GROUP`]).
    let run = row_run(x.len() / row, row);
    parallel::for_each(x.par_chunks(run).zip(y.par_chunks_mut(run)), |(xr, yr)| {
        transform::normalize_positions(xr, yr, &k, act)
    });
}

/// The fused activation's per-position `z` coefficients (empty without one).
fn z_lanes<C: Lane>(
    fused: Option<ChannelAct<'_>>,
    (c, s): (usize, usize),
) -> (Scratch<C>, Scratch<C>) {
    match fused {
        Some(f) => (
            expand(f.scale.iter().copied(), (c, s)),
            expand(f.shift.iter().copied(), (c, s)),
        ),
        None => (Scratch::filled(0, C::ZERO), Scratch::filled(0, C::ZERO)),
    }
}

/// Per-channel `(Σdz, Σdz·x̂)` with `x̂ = (x - mean_c)·rstd_c` (`dz = dy`,
/// or fused `φ'(z)·dy`): per position over every row (lane sums of
/// [`FLUSH_ROWS`] rows, then f64), tiles in parallel, blocks added in row
/// order, then per channel in position order.
pub(crate) fn grad_sums<T: Float>(
    x: &[T],
    dy: &[T],
    (c, s): (usize, usize),
    mean: &[f64],
    rstd: &[f64],
    fused: Option<ChannelAct<'_>>,
) -> (Vec<f64>, Vec<f64>) {
    let row = c * s;
    let (hi, lo) = split_means::<T::Lane>(mean, s);
    let r: Scratch<T::Lane> = expand(rstd.iter().copied(), (c, s));
    let (z_scale, z_shift) = z_lanes::<T::Lane>(fused, (c, s));
    let act = fused.map(|f| f.act);
    let rows = x.len() / row.max(1);
    if rows == 0 {
        return (vec![0.0; c], vec![0.0; c]);
    }
    let (s1, s2) = position_sums(x, Some(dy), row, |xs, dys, cols, w1, w2| {
        let (hi, lo, r) = (&hi[cols.clone()], &lo[cols.clone()], &r[cols.clone()]);
        let z = match act {
            Some(_) => ZCoefs {
                act,
                scale: &z_scale[cols.clone()],
                shift: &z_shift[cols.clone()],
            },
            None => ZCoefs::none(),
        };
        transform::add_row_group(xs, dys, hi, lo, r, w1, w2, z)
    });
    // A channel's positions added in position order.
    let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0; c], vec![0.0; c]);
    for p in 0..row {
        sum_dy[p / s] += s1[p];
        sum_dy_xhat[p / s] += s2[p];
    }
    (sum_dy, sum_dy_xhat)
}

/// `dx = rstd_c·(w_c·dz - mean_g,c) + b_c·(x - mean_c)` (`dz` as in [`grad_sums`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn input_grad<T: Float>(
    x: &[T],
    dy: &[T],
    dx: &mut [MaybeUninit<T>],
    (c, s): (usize, usize),
    mean: &[f64],
    weight: &[f64],
    coefs: &[DxCoefficients],
    fused: Option<ChannelAct<'_>>,
) {
    let (z_scale, z_shift) = z_lanes::<T::Lane>(fused, (c, s));
    let row = c * s;
    let (hi, lo) = split_means(mean, s);
    let k = PositionCoefs {
        hi,
        lo,
        scale: expand(coefs.iter().map(|k| k.b), (c, s)),
        shift: expand(coefs.iter().zip(weight).map(|(k, w)| k.rstd * w), (c, s)),
        offset: expand(coefs.iter().map(|k| k.rstd * k.mean_g), (c, s)),
        z_scale,
        z_shift,
    };
    let act = fused.map(|f| f.act);
    // Runs of whole rows, as in [`normalize`].
    let run = row_run(x.len() / row, row);
    parallel::for_each(
        x.par_chunks(run)
            .zip(dy.par_chunks(run))
            .zip(dx.par_chunks_mut(run)),
        |((xr, dr), or)| transform::input_grad_positions(xr, dr, or, &k, act),
    );
}

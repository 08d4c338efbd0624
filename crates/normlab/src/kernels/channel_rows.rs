//! LayerNorm and RMSNorm over the channels of `[N, C, *]` at each position
//! ("channels first": ConvNeXt's LayerNorm, RMSNorm over a CNN's channels),
//! as `F.layer_norm(x.movedim(1, -1), (C,), γ, β).movedim(-1, 1)` (and
//! `F.rms_norm` likewise) without the two transposes and their copies.
//!
//! ```text
//! at each (n, s):  μ = Σ_c x/C   σ² = Σ_c (x-μ)²/C      (RMSNorm: μ = 0, σ² = Σ_c x²/C)
//!                  r = 1/√(σ²+ε)   x̂ = (x-μ)·r   y = γ_c·x̂ + β_c
//!                  dx = r·(g - mean_c(g)) + k·mean_c(g·x̂)·(x-μ),  g = γ_c·dy,  k = 2·r'(σ²)/r
//!                  (RMSNorm: without the mean_c(g) term)
//! dγ_c = Σ_{n,s} dy·x̂    dβ_c = Σ_{n,s} dy
//! ```
//! The saved `mean` and `rstd` are per position, `N·S` of each in `[N, S]`
//! order (`mean` is 0 for RMSNorm).
//!
//! Scheduling: samples are the unit of work (in tasks of at least
//! [`MIN_TASK_VALUES`](super::parallel) values; one image runs on one
//! thread). Within a sample, positions go in blocks of [`COLUMNS`], whose
//! per-position sums (f64) stay in L1 while the `C` rows of the block
//! stream past, so every loop runs along contiguous positions. dγ, dβ are
//! summed over fixed blocks of samples and the blocks' sums added in block
//! order: results do not depend on the number of threads. All arithmetic is
//! in f64, rounded once to the storage type. For `[N, C]` (one position per
//! sample) the row kernels' `layer_norm`/`rms_norm` over the last axis are
//! the same normalization, vectorized along the channels.

use rayon::prelude::*;

use super::parallel::{self, block_units, min_units, sum_partials};
use super::rows::{write_sums, RowNorm};
use super::{
    check_param, check_saved, check_view, grad_buffer, param_at, DxCoefficients, Epsilon, Grads,
    NcsLayout, Saved,
};
use crate::alloc::Scratch;
use crate::error::Result;
use crate::simd::columns;
use crate::{Float, Tensor, View};

/// Positions per block: the block's four f64 accumulators (mean, variance
/// or the backward's two sums) take 16 KiB, within a 32 KiB L1 beside the
/// rows streaming through it.
const COLUMNS: usize = 512;

fn op_name(norm: RowNorm) -> &'static str {
    match norm {
        RowNorm::LayerNorm => "layer_norm_channels",
        RowNorm::RmsNorm => "rms_norm_channels",
    }
}

/// The blocks of positions of a sample of `s` positions: `(at, width)`.
fn blocks(s: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..s)
        .step_by(COLUMNS)
        .map(move |at| (at, COLUMNS.min(s - at)))
}

/// A per-channel parameter in f64, or `default` for each of the `c`
/// channels when absent.
fn per_channel<T: Float>(p: Option<&Tensor<T>>, c: usize, default: f64) -> Scratch<f64> {
    Scratch::collect(
        c,
        (0..c).map(|ch| param_at(p.map(Tensor::data), ch, default)),
    )
}

/// The forward of either norm.
fn forward<T: Float>(
    norm: RowNorm,
    x: &(impl View<T> + ?Sized),
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    eps: Epsilon,
) -> Result<(Tensor<T>, Saved)> {
    let op = op_name(norm);
    eps.validate(op)?;
    let layout = NcsLayout::of(op, x.shape(), 2)?;
    check_param(op, "weight", weight, &[layout.c], x.shape())?;
    check_param(op, "bias", bias, &[layout.c], x.shape())?;
    let numel = check_view(op, "x", x)?;
    let (c, s) = (layout.c, layout.spatial);
    let mut saved = Saved::for_input(op, layout.n * s, numel)?;
    if numel == 0 {
        return Ok((Tensor::new(x.shape().to_vec(), Vec::new())?, saved));
    }
    let gamma = per_channel(weight, c, 1.0);
    let beta = per_channel(bias, c, 0.0);
    let centred = norm == RowNorm::LayerNorm;
    let (y, ()) = Tensor::filled_by(op, x.shape(), |y| {
        parallel::for_each(
            x.data()
                .par_chunks(c * s)
                .zip(y.par_chunks_mut(c * s))
                .zip(
                    saved
                        .mean
                        .par_chunks_mut(s)
                        .zip(saved.rstd.par_chunks_mut(s)),
                )
                .with_min_len(min_units(c * s)),
            |((xs, ys), (mean, rstd))| {
                for (at, w) in blocks(s) {
                    let (mean, rstd) = (&mut mean[at..at + w], &mut rstd[at..at + w]);
                    // The variance is computed into `rstd`, then replaced by it.
                    columns::column_stats(xs, s, at, centred, mean, rstd);
                    for r in rstd.iter_mut() {
                        *r = eps.rstd(*r);
                    }
                    columns::column_normalize(xs, ys, s, at, mean, rstd, &gamma, &beta);
                }
            },
        );
        Ok(())
    })?;
    Ok((y, saved))
}

/// The backward of either norm.
fn backward<T: Float>(
    norm: RowNorm,
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    weight: Option<&Tensor<T>>,
    with_bias: bool,
    eps: Epsilon,
    saved: &Saved,
) -> Result<Grads<T>> {
    let op = op_name(norm);
    let layout = NcsLayout::of(op, x.shape(), 2)?;
    crate::error::check_shape(op, "dy", dy.shape(), x.shape(), x.shape())?;
    check_param(op, "weight", weight, &[layout.c], x.shape())?;
    let numel = check_view(op, "x", x)?;
    check_view(op, "dy", dy)?;
    let (c, s) = (layout.c, layout.spatial);
    check_saved(op, saved, layout.n * s, numel)?;
    let mut dweight = grad_buffer(weight.is_some(), &[c])?;
    let mut dbias = grad_buffer(with_bias, &[c])?;
    if numel == 0 {
        let dx = Tensor::new(x.shape().to_vec(), Vec::new())?;
        return Ok(Grads { dx, dweight, dbias });
    }
    let gamma = per_channel(weight, c, 1.0);
    let centred = norm == RowNorm::LayerNorm;
    // Samples in fixed blocks (at most 64 a call, whatever N and the thread
    // count), each block's dγ, dβ summed over its samples in order and the
    // blocks' sums added in block order.
    let per_block = block_units(layout.n);
    let sample = c * s;
    let (dx, per_block_sums) = Tensor::filled_by(op, x.shape(), |dx| {
        let sums: Vec<(Scratch<f64>, Scratch<f64>)> = parallel::collect(
            x.data()
                .par_chunks(per_block * sample)
                .zip(dy.data().par_chunks(per_block * sample))
                .zip(dx.par_chunks_mut(per_block * sample))
                .zip(
                    saved
                        .mean
                        .par_chunks(per_block * s)
                        .zip(saved.rstd.par_chunks(per_block * s)),
                )
                .with_min_len(min_units(per_block * sample))
                .map(|(((xb, dyb), dxb), (means, rstds))| {
                    let (mut dg, mut db) = (Scratch::filled(c, 0.0), Scratch::filled(c, 0.0));
                    let width = COLUMNS.min(s);
                    let (mut sum_g, mut sum_gx) =
                        (Scratch::filled(width, 0.0), Scratch::filled(width, 0.0));
                    let samples = xb
                        .chunks_exact(sample)
                        .zip(dyb.chunks_exact(sample))
                        .zip(dxb.chunks_exact_mut(sample))
                        .zip(means.chunks_exact(s).zip(rstds.chunks_exact(s)));
                    for (((xs, dys), dxs), (mean, rstd)) in samples {
                        for (at, w) in blocks(s) {
                            let (mean, rstd) = (&mean[at..at + w], &rstd[at..at + w]);
                            let (sg, sgx) = (&mut sum_g[..w], &mut sum_gx[..w]);
                            columns::column_grad_sums(
                                xs, dys, s, at, mean, rstd, &gamma, sg, sgx, &mut dg, &mut db,
                            );
                            // Σg, Σg·x̂ become the dx coefficients `mean_g`, `b` in place.
                            for ((g, gx), &r) in sg.iter_mut().zip(sgx.iter_mut()).zip(rstd) {
                                let mean_g = if centred { *g / c as f64 } else { 0.0 };
                                let k = DxCoefficients::new(&eps, r, mean_g, *gx / c as f64);
                                (*g, *gx) = (k.mean_g, k.b);
                            }
                            columns::column_input_grad(
                                xs, dys, dxs, s, at, mean, rstd, sg, sgx, &gamma,
                            );
                        }
                    }
                    (dg, db)
                }),
        );
        Ok(sums)
    })?;
    let (dg, db): (Vec<_>, Vec<_>) = per_block_sums.into_iter().unzip();
    write_sums(dweight.as_mut().map(Tensor::data_mut), &sum_partials(c, dg));
    write_sums(dbias.as_mut().map(Tensor::data_mut), &sum_partials(c, db));
    Ok(Grads { dx, dweight, dbias })
}

/// LayerNorm over the channels of `[N, C, *]` at each position, γ and β of
/// shape `[C]`: PyTorch's `F.layer_norm(x.movedim(1, -1), (C,), γ, β, eps)`
/// moved back (ConvNeXt's `LayerNorm(data_format="channels_first")`).
/// Saves `N·S` means and `rstd`s in `[N, S]` order.
///
/// # Errors
/// Rank below 2; γ or β not of shape `[C]`; invalid ε.
///
/// ```
/// use normlab::{Tensor, kernels::channel_rows::layer_norm_channels};
/// // One sample, two channels, two positions: each position over the channels.
/// let x = Tensor::new(vec![1, 2, 2], vec![1.0f64, 10.0, 3.0, 30.0]).unwrap();
/// let (y, saved) = layer_norm_channels(&x, None, None, 0.0.into()).unwrap();
/// assert_eq!(saved.mean, vec![2.0, 20.0]);
/// assert_eq!(y.data(), &[-1.0, -1.0, 1.0, 1.0]);
/// ```
pub fn layer_norm_channels<T: Float>(
    x: &(impl View<T> + ?Sized),
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    eps: Epsilon,
) -> Result<(Tensor<T>, Saved)> {
    forward(RowNorm::LayerNorm, x, weight, bias, eps)
}

/// Gradients of [`layer_norm_channels`]: `dx`, and `dweight`/`dbias` for
/// the parameters that are present (`with_bias` says whether there was a bias).
///
/// # Errors
/// Shapes that disagree with the forward call's.
pub fn layer_norm_channels_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    weight: Option<&Tensor<T>>,
    with_bias: bool,
    eps: Epsilon,
    saved: &Saved,
) -> Result<Grads<T>> {
    backward(RowNorm::LayerNorm, x, dy, weight, with_bias, eps, saved)
}

/// RMSNorm over the channels of `[N, C, *]` at each position, γ of shape
/// `[C]`: `F.rms_norm(x.movedim(1, -1), (C,), γ, eps)` moved back.
///
/// # Errors
/// As [`layer_norm_channels`].
pub fn rms_norm_channels<T: Float>(
    x: &(impl View<T> + ?Sized),
    weight: Option<&Tensor<T>>,
    eps: Epsilon,
) -> Result<(Tensor<T>, Saved)> {
    forward(RowNorm::RmsNorm, x, weight, None, eps)
}

/// Gradients of [`rms_norm_channels`]: `dx` and, with a weight, `dweight`.
///
/// # Errors
/// Shapes that disagree with the forward call's.
pub fn rms_norm_channels_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    weight: Option<&Tensor<T>>,
    eps: Epsilon,
    saved: &Saved,
) -> Result<Grads<T>> {
    backward(RowNorm::RmsNorm, x, dy, weight, false, eps, saved)
}

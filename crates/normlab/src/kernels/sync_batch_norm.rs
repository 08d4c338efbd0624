//! SyncBatchNorm: BatchNorm whose batch statistics are those of the global
//! batch, spread over the ranks of a data-parallel job.
//!
//! Forward: each rank computes its channels' moments `(count, mean, M2)`;
//! [`Communicator::combine_moments`] merges them with Chan's formula
//! ```text
//! n = n_a + n_b,  δ = mean_b - mean_a,
//! mean = mean_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n
//! ```
//! so uneven and empty shards weigh by their counts; every rank normalizes
//! its shard with the global mean and variance and folds the same global
//! statistics into its running ones, which therefore stay equal on every
//! rank.
//!
//! Backward: with `x̂ = (x - μ)·r` over the global batch of `n` values per
//! channel, `dx = γ·r·(dy - Σdy/n - x̂·Σ(dy·x̂)/n)`, where the two sums run
//! over the global batch: each rank contributes its local sums to one
//! all-reduce. `dγ` and `dβ` are returned for the local shard, as PyTorch
//! does; the data-parallel gradient sum over ranks makes them global.
//!
//! In evaluation (running statistics, no update) nothing is communicated.

use super::batch_norm::{
    backward_input, batch_norm, batch_norm_backward, channel_grad_sums, channel_moments,
    check_args, normalize, update_running_from, BatchNormOptions, Running, StatsGradient,
};
use super::{check_param, check_view, Grads, NcsLayout, Saved};
use crate::comm::Communicator;
use crate::error::Result;
use crate::moments::Moments;
use crate::{Float, NormError, Tensor, View};

const OP: &str = "sync_batch_norm";

/// SyncBatchNorm forward on this rank's shard `x` (`[N_r, C, *]`, `N_r` may
/// be 0); every rank must call it with the same options and channels.
/// Returns `y` for the shard and the global statistics used.
///
/// # Errors
/// As [`super::batch_norm::batch_norm`], judged on the global batch (one
/// value per channel over all ranks is too few; non-finite global statistics
/// leave every rank's running statistics unchanged), and communication errors.
pub fn sync_batch_norm<T: Float>(
    x: &(impl View<T> + ?Sized),
    running: Running<'_, T>,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    options: &BatchNormOptions,
    comm: &dyn Communicator,
) -> Result<(Tensor<T>, Saved)> {
    let update = options.update_running_stats && running.is_some();
    if !options.use_batch_stats && !update {
        // Evaluation: running statistics, no communication.
        return batch_norm(x, running, weight, bias, options).map_err(|e| e.with_op(OP));
    }
    let layout = check_args(OP, x.shape(), &running, weight, bias, options)?;
    check_view(OP, "x", x)?;
    // An empty shard still takes part in the collectives with C channels
    // (the other ranks have values): the allocation is needed, and fallible.
    let local = if layout.n * layout.spatial == 0 {
        crate::alloc::try_filled(OP, "batch moments", layout.c, Moments::EMPTY)?
    } else {
        channel_moments(x.data(), layout)?
    };
    let global = comm.combine_moments(&local)?;
    let count = global.first().map_or(0.0, |m| m.count);
    if count == 1.0 {
        return Err(NormError::TooFewValues {
            op: OP,
            what: "value per channel over all ranks",
            shape: x.shape().into(),
        });
    }
    super::batch_norm::check_finite_moments(OP, &global)?;
    let saved = if options.use_batch_stats {
        Saved {
            mean: global.iter().map(|m| m.mean).collect(),
            rstd: global.iter().map(|m| options.eps.rstd(m.var(0))).collect(),
        }
    } else {
        let r = running
            .as_ref()
            .ok_or(NormError::MissingRunningStats { op: OP })?;
        Saved {
            mean: r.mean.iter().map(|m| m.to_f64()).collect(),
            rstd: r.var.iter().map(|v| options.eps.rstd(v.to_f64())).collect(),
        }
    };
    let mut y = Tensor::zeros(x.shape())?;
    if count > 0.0 {
        normalize(
            x.data(),
            layout,
            &saved,
            weight.map(Tensor::data),
            bias.map(Tensor::data),
            y.data_mut(),
        )?;
    }
    if let (true, true, Some(running)) = (update, count > 0.0, running) {
        update_running_from(OP, running, &global, options)?;
    }
    Ok((y, saved))
}

/// Gradients of [`sync_batch_norm`] for this rank's shard: `dx` through the
/// global statistics (one all-reduce of `Σdy`, `Σdy·x̂` and the count), and
/// the local shard's `dweight`, `dbias`. Every rank must call it.
///
/// # Errors
/// Shapes that disagree with the forward call's; communication errors.
#[allow(clippy::too_many_arguments)]
pub fn sync_batch_norm_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    weight: Option<&Tensor<T>>,
    with_bias: bool,
    eps: crate::Epsilon,
    saved: &Saved,
    batch_stats: bool,
    comm: &dyn Communicator,
) -> Result<Grads<T>> {
    if !batch_stats {
        return batch_norm_backward(x, dy, weight, with_bias, eps, saved, false)
            .map_err(|e| e.with_op(OP));
    }
    let layout = NcsLayout::of(OP, x.shape(), 2)?;
    crate::error::check_shape(OP, "dy", dy.shape(), x.shape(), x.shape())?;
    check_param(OP, "weight", weight, &[layout.c], x.shape())?;
    check_view(OP, "x", x)?;
    check_view(OP, "dy", dy)?;
    let c = layout.c;
    let local_count = (layout.n * layout.spatial) as f64;
    let (local_dy, local_dy_xhat) = if local_count > 0.0 {
        channel_grad_sums(x.data(), dy.data(), layout, saved)?
    } else {
        (
            crate::alloc::try_filled(OP, "sum_dy", c, 0.0)?,
            crate::alloc::try_filled(OP, "sum_dy_xhat", c, 0.0)?,
        )
    };
    // One all-reduce: [Σdy (C), Σdy·x̂ (C), count].
    let mut packed: Vec<f64> = local_dy.iter().chain(&local_dy_xhat).copied().collect();
    packed.push(local_count);
    comm.all_reduce_sum(&mut packed)?;
    let count = packed[2 * c];
    let mut dx = Tensor::zeros(x.shape())?;
    if local_count > 0.0 {
        let stats = StatsGradient::Batch {
            count,
            sum_dy: &packed[..c],
            sum_dy_xhat: &packed[c..2 * c],
        };
        backward_input(
            x.data(),
            dy.data(),
            layout,
            saved,
            weight.map(Tensor::data),
            &eps,
            stats,
            dx.data_mut(),
        )?;
    }
    let to_tensor = |v: &[f64]| Tensor::from_vec(v.iter().map(|&a| T::from_f64(a)).collect());
    Ok(Grads {
        dx,
        dweight: weight.map(|_| to_tensor(&local_dy_xhat)),
        dbias: with_bias.then(|| to_tensor(&local_dy)),
    })
}

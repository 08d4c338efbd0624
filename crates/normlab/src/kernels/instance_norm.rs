//! InstanceNorm on `[N, C, *]`: statistics per (sample, channel) over the
//! spatial positions, i.e. GroupNorm with G = C; optional γ/β per channel and
//! optional running statistics (PyTorch's `track_running_stats`).
//!
//! ```text
//! μ_nc = mean of x[n, c, :]   y = γ_c·(x - μ_nc)/√(σ²_nc + ε) + β_c
//! running: r ← (1-m)·r + m·mean_n(stat_nc)      (the batch average of the instance statistics)
//! ```
//! With running statistics in evaluation, it normalizes exactly as BatchNorm
//! in evaluation does; asked to update them while normalizing with them (a
//! layer's overrides), it folds in the batch average of the instance
//! statistics, as in training.

use super::batch_norm::{
    batch_norm, batch_norm_backward, update_running, BatchNormOptions, Running, RunningStatsMut,
};
use super::group_norm::{group_norm, group_norm_backward};
use super::{Grads, NcsLayout, Saved};
use crate::error::Result;
use crate::moments::Moments;
use crate::{Float, NormError, Tensor, View};

const OP: &str = "instance_norm";

/// InstanceNorm forward, as PyTorch's `F.instance_norm`.
/// `options.use_batch_stats` means "use the input's own statistics"
/// (PyTorch's `use_input_stats`); with it off, the running statistics
/// normalize. Returns `y` and the statistics used: N·C groups with input
/// statistics, C with running ones.
///
/// # Errors
/// Rank < 2; parameters or running statistics not `[C]`; a single spatial
/// value per instance with input statistics; missing running statistics
/// when they are to be used; invalid ε or momentum; non-finite statistics
/// (running statistics are then left unchanged).
pub fn instance_norm<T: Float>(
    x: &(impl View<T> + ?Sized),
    running: Running<'_, T>,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    options: &BatchNormOptions,
) -> Result<(Tensor<T>, Saved)> {
    options.eps.validate(OP)?;
    options.momentum.validate(OP)?;
    let layout = NcsLayout::of(OP, x.shape(), 2)?;
    let mut running = running;
    if let Some(r) = &running {
        let c = [layout.c];
        crate::error::check_shape(OP, "running_mean", &[r.mean.len()], &c, x.shape())?;
        crate::error::check_shape(OP, "running_var", &[r.var.len()], &c, x.shape())?;
    }
    let update = options.update_running_stats && running.is_some();
    let needs_instance_stats = options.use_batch_stats || update;
    if needs_instance_stats && layout.spatial == 1 && layout.n * layout.c > 0 {
        return Err(NormError::TooFewValues {
            op: OP,
            what: "spatial element",
            shape: x.shape().into(),
        });
    }
    let (y, saved) = if options.use_batch_stats {
        // One group per channel (C = 0 is one empty group, so that G ≥ 1).
        group_norm(x, layout.c.max(1), weight, bias, options.eps).map_err(|e| e.with_op(OP))?
    } else {
        // The running statistics normalize, read before any update: an
        // update below folds in the instance statistics, as with input
        // statistics, never the batch statistics over N and space.
        let normalize_only = BatchNormOptions {
            update_running_stats: false,
            ..*options
        };
        let reborrowed = running.as_mut().map(|r| RunningStatsMut {
            mean: &mut *r.mean,
            var: &mut *r.var,
            num_batches_tracked: &mut *r.num_batches_tracked,
        });
        batch_norm(x, reborrowed, weight, bias, &normalize_only).map_err(|e| e.with_op(OP))?
    };
    if let (true, Some(running)) = (update && layout.n > 0 && layout.spatial > 0, running) {
        let s = layout.spatial;
        let ddof = options.running_var.ddof();
        let mut mean = vec![0.0; layout.c];
        let mut var = vec![0.0; layout.c];
        for (block, xs) in x.data().chunks_exact(s).enumerate() {
            let m = Moments::of_slice(xs);
            mean[block % layout.c] += m.mean / layout.n as f64;
            var[block % layout.c] += m.var(ddof) / layout.n as f64;
        }
        update_running(OP, running, &mean, &var, options.momentum)?;
    }
    Ok((y, saved))
}

/// Gradients of [`instance_norm`]; `input_stats` as `options.use_batch_stats` was.
///
/// # Errors
/// Shapes that disagree with the forward call's.
pub fn instance_norm_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    weight: Option<&Tensor<T>>,
    with_bias: bool,
    eps: super::Epsilon,
    saved: &Saved,
    input_stats: bool,
) -> Result<Grads<T>> {
    let layout = NcsLayout::of(OP, x.shape(), 2)?;
    if input_stats {
        group_norm_backward(x, dy, layout.c.max(1), weight, with_bias, eps, saved)
    } else {
        batch_norm_backward(x, dy, weight, with_bias, eps, saved, false)
    }
    .map_err(|e| e.with_op(OP))
}

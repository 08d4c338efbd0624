//! BatchNorm on `[N, C, *]`: statistics per channel over N and every spatial position.
//!
//! ```text
//! M = N·spatial   μ_c = Σx/M   σ²_c = Σ(x-μ_c)²/M   r_c = 1/√(σ²_c+ε)
//! x̂ = (x-μ_c)·r_c   y = γ_c·x̂ + β_c
//! training:   dx = γ_c·r_c·(dy - Σdy/M - x̂·Σ(dy·x̂)/M)     (through μ and σ²)
//! evaluation: dx = γ_c·r_c·dy                             (running stats are constants)
//! dγ_c = Σ dy·x̂   dβ_c = Σ dy
//! running:    r ← (1-m)·r + m·batch, with σ² made unbiased (·M/(M-1)) unless asked otherwise
//! ```
//! Backward is split in two steps, per-channel sums ([`channel_grad_sums`])
//! then the input gradient ([`backward_input`]), so that SyncBatchNorm can
//! all-reduce the sums between them.

use super::{backward_coefficients, check_param, param_at, Epsilon, Grads, NcsLayout, Saved};
use crate::error::{check_len, ensure, Result};
use crate::moments::{moments_of_slices, Moments};
use crate::{Float, NormError, Tensor};

const OP: &str = "batch_norm";

/// How running statistics follow the batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Momentum {
    /// `r ← (1 - m)·r + m·batch` with `m ∈ [0, 1]` (PyTorch default 0.1).
    Exponential(f64),
    /// Cumulative average: `m = 1/num_batches_tracked` (PyTorch's `momentum=None`).
    Cumulative,
}

impl Default for Momentum {
    fn default() -> Self {
        Momentum::Exponential(0.1)
    }
}

impl Momentum {
    /// Checks `m ∈ [0, 1]`.
    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        match *self {
            Momentum::Exponential(m) => {
                ensure((0.0..=1.0).contains(&m), op, "momentum", m, "in [0, 1]")
            }
            Momentum::Cumulative => Ok(()),
        }
    }

    /// The weight of the new batch, given the count of batches *including* it.
    pub fn factor(&self, num_batches_tracked: i64) -> f64 {
        match *self {
            Momentum::Exponential(m) => m,
            Momentum::Cumulative => 1.0 / num_batches_tracked.max(1) as f64,
        }
    }
}

/// Which batch variance goes into `running_var`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RunningVarEstimator {
    /// `m2/(M-1)`: PyTorch's choice (default).
    #[default]
    Unbiased,
    /// `m2/M`: ONNX, Keras, Flax.
    Biased,
}

impl RunningVarEstimator {
    /// Degrees of freedom removed.
    pub fn ddof(&self) -> u32 {
        match self {
            Self::Unbiased => 1,
            Self::Biased => 0,
        }
    }
}

/// Running statistics of a layer, borrowed for an update.
#[derive(Debug)]
pub struct RunningStatsMut<'a, T> {
    /// Per-channel running mean.
    pub mean: &'a mut [T],
    /// Per-channel running variance.
    pub var: &'a mut [T],
    /// Batches seen so far (PyTorch's `num_batches_tracked`).
    pub num_batches_tracked: &'a mut i64,
}

/// Per-channel moments of `x` laid out as `layout`: channel `c` gathers
/// `x[n, c, :]` for every `n`.
///
/// # Errors
/// When `x.len()` is not `N·C·spatial`.
pub fn channel_moments<T: Float>(x: &[T], layout: NcsLayout) -> Result<Vec<Moments>> {
    check_len(OP, "x", x.len(), &[layout.n, layout.c, layout.spatial])?;
    let s = layout.spatial;
    Ok((0..layout.c)
        .map(|c| moments_of_slices((0..layout.n).map(|n| &x[(n * layout.c + c) * s..][..s])))
        .collect())
}

/// `y = γ_c·(x - mean_c)·rstd_c + β_c` for every channel.
///
/// # Errors
/// When a slice length disagrees with the layout.
pub fn normalize<T: Float>(
    x: &[T],
    layout: NcsLayout,
    saved: &Saved,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    y: &mut [T],
) -> Result<()> {
    check_channel_args(x, layout, saved, weight, bias)?;
    check_len(OP, "y", y.len(), &[layout.n, layout.c, layout.spatial])?;
    let s = layout.spatial.max(1);
    for (block, (x_blk, y_blk)) in x.chunks_exact(s).zip(y.chunks_exact_mut(s)).enumerate() {
        let c = block % layout.c;
        let (mean, rstd) = (saved.mean[c], saved.rstd[c]);
        let scale = rstd * param_at(weight, c, 1.0);
        let shift = param_at(bias, c, 0.0);
        for (&xv, yv) in x_blk.iter().zip(y_blk) {
            *yv = T::from_f64((xv.to_f64() - mean) * scale + shift);
        }
    }
    Ok(())
}

/// Per-channel `(Σdy, Σdy·x̂)`: all the backward needs from the whole batch,
/// and also `dβ` and `dγ`.
///
/// # Errors
/// When a slice length disagrees with the layout.
pub fn channel_grad_sums<T: Float>(
    x: &[T],
    dy: &[T],
    layout: NcsLayout,
    saved: &Saved,
) -> Result<(Vec<f64>, Vec<f64>)> {
    check_channel_args(x, layout, saved, None, None)?;
    check_len(OP, "dy", dy.len(), &[layout.n, layout.c, layout.spatial])?;
    let mut sum_dy = vec![0.0; layout.c];
    let mut sum_dy_xhat = vec![0.0; layout.c];
    let s = layout.spatial.max(1);
    for (block, (x_blk, dy_blk)) in x.chunks_exact(s).zip(dy.chunks_exact(s)).enumerate() {
        let c = block % layout.c;
        let (mean, rstd) = (saved.mean[c], saved.rstd[c]);
        let (mut a, mut b) = (0.0, 0.0);
        for (&xv, &dyv) in x_blk.iter().zip(dy_blk) {
            let dy = dyv.to_f64();
            a += dy;
            b += dy * (xv.to_f64() - mean) * rstd;
        }
        sum_dy[c] += a;
        sum_dy_xhat[c] += b;
    }
    Ok((sum_dy, sum_dy_xhat))
}

/// How the statistics used in forward depend on `x`.
#[derive(Clone, Copy, Debug)]
pub enum StatsGradient<'a> {
    /// Batch statistics over `count` values per channel (possibly across
    /// ranks), with the channel sums `(Σdy, Σdy·x̂)` over those same values.
    Batch {
        /// Values per channel the statistics were taken over.
        count: f64,
        /// Σdy per channel.
        sum_dy: &'a [f64],
        /// Σdy·x̂ per channel.
        sum_dy_xhat: &'a [f64],
    },
    /// Running statistics: constants.
    Constant,
}

/// `dx` from the saved statistics and, for batch statistics, the channel sums.
///
/// # Errors
/// When a slice length disagrees with the layout.
#[allow(clippy::too_many_arguments)]
pub fn backward_input<T: Float>(
    x: &[T],
    dy: &[T],
    layout: NcsLayout,
    saved: &Saved,
    weight: Option<&[T]>,
    eps: &Epsilon,
    stats: StatsGradient<'_>,
    dx: &mut [T],
) -> Result<()> {
    check_channel_args(x, layout, saved, weight, None)?;
    check_len(OP, "dy", dy.len(), &[layout.n, layout.c, layout.spatial])?;
    check_len(OP, "dx", dx.len(), &[layout.n, layout.c, layout.spatial])?;
    // Per channel: dx = a·dy + b·(x - μ) + c.
    let coefs: Vec<(f64, f64, f64)> = (0..layout.c)
        .map(|c| {
            let w = param_at(weight, c, 1.0);
            let rstd = saved.rstd[c];
            match stats {
                StatsGradient::Batch {
                    count,
                    sum_dy,
                    sum_dy_xhat,
                } => {
                    let (b, cc) = backward_coefficients(
                        eps,
                        rstd,
                        w * sum_dy[c] / count,
                        w * sum_dy_xhat[c] / count,
                    );
                    (w * rstd, b, cc)
                }
                StatsGradient::Constant => (w * rstd, 0.0, 0.0),
            }
        })
        .collect();
    let s = layout.spatial.max(1);
    let blocks = x
        .chunks_exact(s)
        .zip(dy.chunks_exact(s))
        .zip(dx.chunks_exact_mut(s));
    for (block, ((x_blk, dy_blk), dx_blk)) in blocks.enumerate() {
        let c = block % layout.c;
        let (a, b, cc) = coefs[c];
        let mean = saved.mean[c];
        for ((&xv, &dyv), dxv) in x_blk.iter().zip(dy_blk).zip(dx_blk) {
            *dxv = T::from_f64(a * dyv.to_f64() + b * (xv.to_f64() - mean) + cc);
        }
    }
    Ok(())
}

/// Folds a batch's per-channel `(mean, var)` into running statistics.
/// Nothing is written unless every new value is finite; `num_batches_tracked`
/// is incremented with the update.
///
/// # Errors
/// [`NormError::NonFiniteStatistics`] when the batch statistics (or the
/// updated running values in `T`) are not finite.
pub fn update_running<T: Float>(
    op: &'static str,
    running: RunningStatsMut<'_, T>,
    batch_mean: &[f64],
    batch_var: &[f64],
    momentum: Momentum,
) -> Result<()> {
    let c = running.mean.len();
    check_len(op, "running_var", running.var.len(), &[c])?;
    check_len(op, "batch mean", batch_mean.len(), &[c])?;
    check_len(op, "batch var", batch_var.len(), &[c])?;
    let tracked = running.num_batches_tracked.saturating_add(1);
    let m = momentum.factor(tracked);
    let mut new_mean = Vec::with_capacity(c);
    let mut new_var = Vec::with_capacity(c);
    for ch in 0..c {
        let (bm, bv) = (batch_mean[ch], batch_var[ch]);
        let nm = T::from_f64((1.0 - m) * running.mean[ch].to_f64() + m * bm);
        let nv = T::from_f64((1.0 - m) * running.var[ch].to_f64() + m * bv);
        if !(bm.is_finite() && bv.is_finite() && nm.to_f64().is_finite() && nv.to_f64().is_finite())
        {
            return Err(NormError::NonFiniteStatistics {
                op,
                channel: ch,
                mean: bm,
                var: bv,
            });
        }
        new_mean.push(nm);
        new_var.push(nv);
    }
    running.mean.copy_from_slice(&new_mean);
    running.var.copy_from_slice(&new_var);
    *running.num_batches_tracked = tracked;
    Ok(())
}

fn check_channel_args<T: Float>(
    x: &[T],
    layout: NcsLayout,
    saved: &Saved,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
) -> Result<()> {
    check_len(OP, "x", x.len(), &[layout.n, layout.c, layout.spatial])?;
    check_len(OP, "saved.mean", saved.mean.len(), &[layout.c])?;
    check_len(OP, "saved.rstd", saved.rstd.len(), &[layout.c])?;
    if let Some(w) = weight {
        check_len(OP, "weight", w.len(), &[layout.c])?;
    }
    if let Some(b) = bias {
        check_len(OP, "bias", b.len(), &[layout.c])?;
    }
    Ok(())
}

/// Options of a functional BatchNorm call (PyTorch's `F.batch_norm`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormOptions {
    /// Normalize with batch statistics (`training=True`) or with the running ones.
    pub use_batch_stats: bool,
    /// Fold the batch statistics into the running ones. Independent of
    /// `use_batch_stats`: with running statistics used to normalize, they are
    /// read before the update.
    pub update_running_stats: bool,
    /// ε and its placement.
    pub eps: Epsilon,
    /// Momentum of the running statistics.
    pub momentum: Momentum,
    /// Batch variance used for `running_var`.
    pub running_var: RunningVarEstimator,
}

impl BatchNormOptions {
    /// Training as PyTorch: batch statistics, running statistics updated.
    pub fn training() -> Self {
        Self {
            use_batch_stats: true,
            update_running_stats: true,
            eps: Epsilon::default(),
            momentum: Momentum::default(),
            running_var: RunningVarEstimator::default(),
        }
    }

    /// Evaluation as PyTorch: running statistics, nothing updated.
    pub fn eval() -> Self {
        Self {
            use_batch_stats: false,
            update_running_stats: false,
            ..Self::training()
        }
    }
}

/// Running statistics of a functional call, owned views.
pub type Running<'a, T> = Option<RunningStatsMut<'a, T>>;

/// BatchNorm forward as PyTorch's `F.batch_norm`: `x` is `[N, C, *]`;
/// returns `y` and the statistics used (for [`batch_norm_backward`]).
/// A zero-size batch returns an empty `y` and leaves the running statistics alone.
///
/// # Errors
/// Rank < 2; a parameter or running statistic not of length C; evaluation
/// without running statistics; batch statistics over a single value per
/// channel; invalid ε or momentum; non-finite batch statistics (running
/// statistics are then left unchanged).
///
/// ```
/// use normlab::{Tensor, kernels::batch_norm::{batch_norm, BatchNormOptions}};
/// let x = Tensor::new(vec![2, 1], vec![1.0f32, 3.0]).unwrap();
/// let (mut rm, mut rv, mut seen) = (vec![0.0f32], vec![1.0f32], 0i64);
/// let running = normlab::kernels::batch_norm::RunningStatsMut {
///     mean: &mut rm, var: &mut rv, num_batches_tracked: &mut seen };
/// let (y, _) = batch_norm(&x, Some(running), None, None, &BatchNormOptions::training()).unwrap();
/// assert!((y.data()[0] + 1.0).abs() < 1e-4);
/// // running_mean = 0.9·0 + 0.1·2, running_var = 0.9·1 + 0.1·2 (unbiased variance of [1, 3])
/// assert_eq!((rm[0], rv[0], seen), (0.2, 1.1, 1));
/// ```
pub fn batch_norm<T: Float>(
    x: &Tensor<T>,
    running: Running<'_, T>,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    options: &BatchNormOptions,
) -> Result<(Tensor<T>, Saved)> {
    batch_norm_op(OP, x, running, weight, bias, options)
}

/// [`batch_norm`] under another operation's name (InstanceNorm's evaluation).
pub(crate) fn batch_norm_op<T: Float>(
    op: &'static str,
    x: &Tensor<T>,
    running: Running<'_, T>,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    options: &BatchNormOptions,
) -> Result<(Tensor<T>, Saved)> {
    options.eps.validate(op)?;
    options.momentum.validate(op)?;
    let layout = NcsLayout::of(op, x.shape(), 2)?;
    let c = [layout.c];
    check_param(op, "weight", weight, &c, x.shape())?;
    check_param(op, "bias", bias, &c, x.shape())?;
    if let Some(r) = &running {
        crate::error::check_shape(op, "running_mean", &[r.mean.len()], &c, x.shape())?;
        crate::error::check_shape(op, "running_var", &[r.var.len()], &c, x.shape())?;
    }
    let mut y = Tensor::zeros(x.shape());
    let update = options.update_running_stats && running.is_some();
    let count = layout.n * layout.spatial;
    // Batch statistics, when they are used to normalize or to update.
    let batch = if (options.use_batch_stats || update) && count > 0 {
        if count == 1 {
            return Err(NormError::TooFewValues {
                op,
                what: "value per channel",
                shape: x.shape().into(),
            });
        }
        let moments = channel_moments(x.data(), layout)?;
        if let Some(ch) = moments
            .iter()
            .position(|m| !(m.mean.is_finite() && m.m2.is_finite()))
        {
            return Err(NormError::NonFiniteStatistics {
                op,
                channel: ch,
                mean: moments[ch].mean,
                var: moments[ch].var(0),
            });
        }
        Some(moments)
    } else {
        None
    };
    let saved = if options.use_batch_stats {
        match &batch {
            Some(moments) => Saved {
                mean: moments.iter().map(|m| m.mean).collect(),
                rstd: moments.iter().map(|m| options.eps.rstd(m.var(0))).collect(),
            },
            // Zero-size batch: nothing to normalize, nothing to update.
            None => return Ok((y, Saved::zeros(layout.c))),
        }
    } else {
        let r = running
            .as_ref()
            .ok_or(NormError::MissingRunningStats { op })?;
        Saved {
            mean: r.mean.iter().map(|m| m.to_f64()).collect(),
            rstd: r.var.iter().map(|v| options.eps.rstd(v.to_f64())).collect(),
        }
    };
    if let (true, Some(running), Some(moments)) = (update, running, &batch) {
        let ddof = options.running_var.ddof();
        let batch_mean: Vec<f64> = moments.iter().map(|m| m.mean).collect();
        let batch_var: Vec<f64> = moments.iter().map(|m| m.var(ddof)).collect();
        update_running(op, running, &batch_mean, &batch_var, options.momentum)?;
    }
    normalize(
        x.data(),
        layout,
        &saved,
        weight.map(Tensor::data),
        bias.map(Tensor::data),
        y.data_mut(),
    )?;
    Ok((y, saved))
}

/// Gradients of [`batch_norm`]. `batch_stats` says whether forward used batch
/// statistics (then the gradient flows through them) or running ones.
///
/// # Errors
/// Shapes that disagree with the forward call's.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward<T: Float>(
    x: &Tensor<T>,
    dy: &Tensor<T>,
    weight: Option<&Tensor<T>>,
    with_bias: bool,
    eps: Epsilon,
    saved: &Saved,
    batch_stats: bool,
) -> Result<Grads<T>> {
    batch_norm_backward_op(OP, x, dy, weight, with_bias, eps, saved, batch_stats)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn batch_norm_backward_op<T: Float>(
    op: &'static str,
    x: &Tensor<T>,
    dy: &Tensor<T>,
    weight: Option<&Tensor<T>>,
    with_bias: bool,
    eps: Epsilon,
    saved: &Saved,
    batch_stats: bool,
) -> Result<Grads<T>> {
    let layout = NcsLayout::of(op, x.shape(), 2)?;
    crate::error::check_shape(op, "dy", dy.shape(), x.shape(), x.shape())?;
    check_param(op, "weight", weight, &[layout.c], x.shape())?;
    let (sum_dy, sum_dy_xhat) = channel_grad_sums(x.data(), dy.data(), layout, saved)?;
    let count = (layout.n * layout.spatial) as f64;
    let stats = if batch_stats {
        StatsGradient::Batch {
            count,
            sum_dy: &sum_dy,
            sum_dy_xhat: &sum_dy_xhat,
        }
    } else {
        StatsGradient::Constant
    };
    let mut dx = Tensor::zeros(x.shape());
    if count > 0.0 {
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
        dweight: weight.map(|_| to_tensor(&sum_dy_xhat)),
        dbias: with_bias.then(|| to_tensor(&sum_dy)),
    })
}

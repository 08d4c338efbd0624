//! What BatchNorm, SyncBatchNorm and InstanceNorm share: the options of
//! their running statistics and their builders on the config side; γ, β,
//! running statistics, mode and overrides, their accessors and their state
//! dict on the layer side.

use super::{Affine, EpsConfig, Mode, Output, Parameters};
use crate::kernels::batch_norm::{BatchNormOptions, Running, RunningStatsMut};
use crate::kernels::Saved;
use crate::state::{StateDict, StateTensor, StateView};
use crate::{Epsilon, Float, Momentum, Result, RunningVarEstimator, Tensor};

/// The options BatchNorm and InstanceNorm share besides their channel count
/// and ε (PyTorch's `_NormBase` arguments).
///
/// ```text
/// running ← (1 - m)·running + m·batch     m = momentum (or 1/num_batches_tracked)
/// ```
///
/// [`Default`] is BatchNorm's (PyTorch's `_NormBase` defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunningConfig {
    /// Exponential 0.1.
    pub momentum: Momentum,
    /// Unbiased batch (or instance) variance into `running_var`.
    pub running_var: RunningVarEstimator,
    /// Learnable per-channel γ, β.
    pub affine: bool,
    /// Keep running statistics, used in [`crate::Mode::Eval`].
    pub track_running_stats: bool,
}

impl Default for RunningConfig {
    fn default() -> Self {
        Self {
            momentum: Momentum::default(),
            running_var: RunningVarEstimator::Unbiased,
            affine: true,
            track_running_stats: true,
        }
    }
}

/// The builders of a config holding a [`RunningConfig`]
/// ([`crate::layers::BatchNormConfig`], [`crate::layers::InstanceNormConfig`]).
pub trait ChannelNormConfig: EpsConfig {
    /// The running-statistics options this config builds its layer with.
    fn running_config_mut(&mut self) -> &mut RunningConfig;

    /// Sets the momentum.
    fn with_momentum(mut self, momentum: Momentum) -> Self {
        self.running_config_mut().momentum = momentum;
        self
    }

    /// Sets the running-variance estimator.
    fn with_running_var(mut self, estimator: RunningVarEstimator) -> Self {
        self.running_config_mut().running_var = estimator;
        self
    }

    /// Turns running statistics on or off.
    fn with_track_running_stats(mut self, track: bool) -> Self {
        self.running_config_mut().track_running_stats = track;
        self
    }

    /// Turns γ, β on or off.
    fn with_affine(mut self, affine: bool) -> Self {
        self.running_config_mut().affine = affine;
        self
    }
}

/// Running statistics of BatchNorm and InstanceNorm.
#[derive(Clone, Debug, PartialEq)]
pub struct RunningStats<T> {
    /// Per-channel running mean, initialized to 0.
    pub mean: Tensor<T>,
    /// Per-channel running variance, initialized to 1.
    pub var: Tensor<T>,
    /// Batches folded in so far.
    pub num_batches_tracked: i64,
}

impl<T: Float> RunningStats<T> {
    /// Mean 0, variance 1, no batch seen.
    ///
    /// # Errors
    /// [`crate::NormError::OutOfMemory`] when the memory cannot be had.
    pub fn new(channels: usize) -> Result<Self> {
        Ok(Self {
            mean: Tensor::full(&[channels], 0.0)?,
            var: Tensor::full(&[channels], 1.0)?,
            num_batches_tracked: 0,
        })
    }

    /// Back to mean 0, variance 1, no batch seen (PyTorch's `reset_running_stats`).
    pub fn reset(&mut self) {
        let one = T::from_f64(1.0);
        self.mean.data_mut().fill(T::from_f64(0.0));
        self.var.data_mut().fill(one);
        self.num_batches_tracked = 0;
    }

    /// The slices the kernels update in place.
    fn as_mut(&mut self) -> RunningStatsMut<'_, T> {
        RunningStatsMut {
            mean: self.mean.data_mut(),
            var: self.var.data_mut(),
            num_batches_tracked: &mut self.num_batches_tracked,
        }
    }

    /// Reads (without storing) and validates running statistics: means
    /// finite, variances finite and non-negative, the counter non-negative.
    /// Such values could only poison every later evaluation.
    fn read(&self, view: &StateView<'_>) -> Result<Self> {
        let mean = view.float::<T>("running_mean", self.mean.shape())?;
        let var = view.float::<T>("running_var", self.var.shape())?;
        // Checkpoints from before PyTorch 0.4.1 have no counter: keep ours.
        let tracked = view.int64_opt("num_batches_tracked")?;
        crate::state::check_running_stats(
            view.prefix(),
            mean.data().iter().map(|v| v.to_f64()),
            var.data().iter().map(|v| v.to_f64()),
            tracked,
        )?;
        let num_batches_tracked = tracked.unwrap_or(self.num_batches_tracked);
        Ok(Self {
            mean,
            var,
            num_batches_tracked,
        })
    }
}

/// `running_mean`, `running_var` and `num_batches_tracked`.
impl<T: Float> StateDict<T> for RunningStats<T> {
    fn state_dict(&self) -> Vec<(String, StateTensor<T>)> {
        vec![
            ("running_mean".into(), StateTensor::Float(self.mean.clone())),
            ("running_var".into(), StateTensor::Float(self.var.clone())),
            (
                "num_batches_tracked".into(),
                StateTensor::Int64(self.num_batches_tracked),
            ),
        ]
    }

    /// All three or none, validated as [`crate::state::check_running_stats`] says.
    fn load_state_dict(&mut self, view: &StateView<'_>) -> Result<()> {
        *self = self.read(view)?;
        Ok(())
    }
}

/// What a BatchNorm, SyncBatchNorm or InstanceNorm holds besides its
/// config: γ and β, the running statistics when tracked, the mode, and the
/// two overrides of what the mode implies.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelState<T> {
    /// γ and β, of shape `[C]`, when affine.
    pub affine: Affine<T>,
    /// Running mean and variance, of shape `[C]`, when tracked.
    pub running: Option<RunningStats<T>>,
    /// Train or eval.
    pub mode: Mode,
    /// Forces batch statistics on or off (`None`: follow the mode).
    pub use_batch_stats: Option<bool>,
    /// Forces running-statistics updates on or off (`None`: follow the mode).
    pub update_running_stats: Option<bool>,
}

impl<T: Float> ChannelState<T> {
    /// The state a freshly built layer of `num_features` channels has: γ = 1
    /// and β = 0 when affine, running mean 0 and variance 1 when tracked,
    /// mode Train, no override.
    ///
    /// # Errors
    /// Invalid ε or momentum, reported as `op`'s; memory that cannot be had.
    pub(crate) fn new(
        op: &'static str,
        num_features: usize,
        eps: Epsilon,
        config: &RunningConfig,
    ) -> Result<Self> {
        eps.validate(op)?;
        config.momentum.validate(op)?;
        Ok(Self {
            affine: Affine::new(&[num_features], config.affine, config.affine)?,
            running: config
                .track_running_stats
                .then(|| RunningStats::new(num_features))
                .transpose()?,
            mode: Mode::Train,
            use_batch_stats: None,
            update_running_stats: None,
        })
    }

    /// Whether the next forward normalizes with the statistics of its input:
    /// in [`Mode::Train`], and in [`Mode::Eval`] when no running statistics
    /// are tracked (as PyTorch), unless overridden.
    pub fn uses_batch_stats(&self) -> bool {
        self.use_batch_stats
            .unwrap_or(self.mode == Mode::Train || self.running.is_none())
    }

    /// Whether the next forward updates the running statistics: when they
    /// are tracked, in [`Mode::Train`] unless overridden.
    pub fn updates_running_stats(&self) -> bool {
        self.running.is_some()
            && self
                .update_running_stats
                .unwrap_or(self.mode == Mode::Train)
    }

    /// The functional options of the next forward call (mode and overrides
    /// applied).
    pub(crate) fn options(&self, eps: Epsilon, config: &RunningConfig) -> BatchNormOptions {
        BatchNormOptions {
            use_batch_stats: self.uses_batch_stats(),
            update_running_stats: self.updates_running_stats(),
            eps,
            momentum: config.momentum,
            running_var: config.running_var,
        }
    }

    /// One forward call: `kernel` gets the running statistics to read or
    /// update, γ, β and the options of the mode and overrides.
    pub(crate) fn forward(
        &mut self,
        eps: Epsilon,
        config: &RunningConfig,
        kernel: impl FnOnce(
            Running<'_, T>,
            Option<&Tensor<T>>,
            Option<&Tensor<T>>,
            &BatchNormOptions,
        ) -> Result<(Tensor<T>, Saved)>,
    ) -> Result<Output<T>> {
        let options = self.options(eps, config);
        let running = self.running.as_mut().map(RunningStats::as_mut);
        let (y, saved) = kernel(
            running,
            self.affine.weight.as_ref(),
            self.affine.bias.as_ref(),
            &options,
        )?;
        Ok(Output {
            y,
            saved,
            input_stats: options.use_batch_stats,
        })
    }
}

/// `weight` and `bias` when affine, then `running_mean`, `running_var` and
/// `num_batches_tracked` when tracked.
impl<T: Float> StateDict<T> for ChannelState<T> {
    fn state_dict(&self) -> Vec<(String, StateTensor<T>)> {
        let mut out = self.affine.state_dict();
        if let Some(running) = &self.running {
            out.extend(running.state_dict());
        }
        out
    }

    /// All or nothing: every tensor is read and validated first, and only
    /// then is anything stored, so that a bad `bias` or running statistic
    /// leaves the layer exactly as it was.
    fn load_state_dict(&mut self, view: &StateView<'_>) -> Result<()> {
        let affine = self.affine.read(view)?;
        let running = self.running.as_ref().map(|r| r.read(view)).transpose()?;
        self.affine = affine;
        self.running = running;
        Ok(())
    }
}

/// A per-channel normalization with running statistics: [`super::BatchNorm`],
/// [`super::SyncBatchNorm`] and [`super::InstanceNorm`].
///
/// In [`Mode::Train`] it normalizes with the statistics of its input and
/// folds them into the running ones; in [`Mode::Eval`] it normalizes with
/// the running ones (or with the input's when it tracks none, as PyTorch).
/// Both choices can be overridden independently
/// ([`Self::set_use_batch_stats`], [`Self::set_update_running_stats`]), and
/// γ/β can be frozen ([`Parameters::set_affine_trainable`]).
///
/// The accessors are written once here on top of [`Self::channel_state`]
/// and [`Self::channel_state_mut`].
pub trait ChannelNorm<T: Float>: Parameters<T> {
    /// γ, β, running statistics, mode and overrides.
    fn channel_state(&self) -> &ChannelState<T>;

    /// γ, β, running statistics, mode and overrides, mutable.
    fn channel_state_mut(&mut self) -> &mut ChannelState<T>;

    /// Current mode.
    fn mode(&self) -> Mode {
        self.channel_state().mode
    }

    /// Switches train/eval.
    fn set_mode(&mut self, mode: Mode) {
        self.channel_state_mut().mode = mode;
    }

    /// Running mean, when tracked.
    fn running_mean(&self) -> Option<&[T]> {
        self.channel_state().running.as_ref().map(|r| r.mean.data())
    }

    /// Running variance, when tracked.
    fn running_var(&self) -> Option<&[T]> {
        self.channel_state().running.as_ref().map(|r| r.var.data())
    }

    /// Batches folded into the running statistics, when tracked.
    fn num_batches_tracked(&self) -> Option<i64> {
        let running = self.channel_state().running.as_ref();
        running.map(|r| r.num_batches_tracked)
    }

    /// The running statistics, mutable (to set or reset them).
    fn running_stats_mut(&mut self) -> Option<&mut RunningStats<T>> {
        self.channel_state_mut().running.as_mut()
    }

    /// Forces batch statistics on or off (`None`: follow the mode).
    fn set_use_batch_stats(&mut self, on: Option<bool>) {
        self.channel_state_mut().use_batch_stats = on;
    }

    /// Forces running-statistics updates on or off (`None`: follow the mode).
    fn set_update_running_stats(&mut self, on: Option<bool>) {
        self.channel_state_mut().update_running_stats = on;
    }

    /// Whether the next forward normalizes with the statistics of its input
    /// ([`ChannelState::uses_batch_stats`]).
    fn uses_batch_stats(&self) -> bool {
        self.channel_state().uses_batch_stats()
    }

    /// Whether the next forward updates the running statistics
    /// ([`ChannelState::updates_running_stats`]).
    fn updates_running_stats(&self) -> bool {
        self.channel_state().updates_running_stats()
    }
}

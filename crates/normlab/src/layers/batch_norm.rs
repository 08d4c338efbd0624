//! `BatchNorm`: PyTorch's `BatchNorm1d/2d/3d` in one layer (`[N, C, *]`).

use super::{
    check_channels, impl_affine_access, impl_running_access, impl_state_dict, Affine,
    ChannelNormConfig, EpsConfig, Mode, Output, RunningConfig, RunningStats,
};
use crate::kernels::batch_norm::{batch_norm, batch_norm_backward, BatchNormOptions};
use crate::kernels::Grads;
use crate::state::{StateDict, StateTensor, StateView};
use crate::{Epsilon, Float, Result, Tensor};

const OP: &str = "batch_norm";

/// Configuration of a [`BatchNorm`]; defaults as PyTorch's.
///
/// ```text
/// y = γ·(x - μ_c)/√(σ²_c + ε) + β     statistics per channel over N and spatial
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// Channels C.
    pub num_features: usize,
    /// ε = 1e-5 inside the square root.
    pub eps: Epsilon,
    /// Momentum 0.1, unbiased batch variance into `running_var`, learnable
    /// γ and β, running statistics kept.
    pub running: RunningConfig,
}

impl BatchNormConfig {
    /// PyTorch's defaults for `num_features` channels.
    pub fn new(num_features: usize) -> Self {
        Self {
            num_features,
            eps: Epsilon::default(),
            running: RunningConfig::default(),
        }
    }

    /// Builds the layer: γ = 1, β = 0, running mean 0 and variance 1, mode Train.
    ///
    /// # Errors
    /// Invalid ε or momentum.
    pub fn init<T: Float>(&self) -> Result<BatchNorm<T>> {
        self.eps.validate(OP)?;
        self.running.momentum.validate(OP)?;
        let affine = self.running.affine;
        Ok(BatchNorm {
            config: self.clone(),
            affine: Affine::new(&[self.num_features], affine, affine)?,
            running: self
                .running
                .track_running_stats
                .then(|| RunningStats::new(self.num_features))
                .transpose()?,
            mode: Mode::Train,
            use_batch_stats: None,
            update_running_stats: None,
        })
    }
}

impl EpsConfig for BatchNormConfig {
    fn eps_mut(&mut self) -> &mut Epsilon {
        &mut self.eps
    }
}

impl ChannelNormConfig for BatchNormConfig {
    fn running_config_mut(&mut self) -> &mut RunningConfig {
        &mut self.running
    }
}

/// Batch normalization with running statistics.
///
/// In [`Mode::Train`] it normalizes with batch statistics and updates the
/// running ones; in [`Mode::Eval`] it normalizes with the running ones (or
/// with batch statistics when it tracks none, as PyTorch). Both choices can
/// be overridden independently ([`Self::set_use_batch_stats`],
/// [`Self::set_update_running_stats`]), and γ/β can be frozen
/// ([`Self::set_affine_trainable`]).
///
/// # Shapes
/// `x`, `y`: `[N, C, *]`; `weight`, `bias`, `running_mean`, `running_var`: `[C]`.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm<T> {
    config: BatchNormConfig,
    pub(crate) affine: Affine<T>,
    pub(crate) running: Option<RunningStats<T>>,
    mode: Mode,
    use_batch_stats: Option<bool>,
    update_running_stats: Option<bool>,
}

impl<T: Float> BatchNorm<T> {
    /// The configuration it was built with.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// Forces batch statistics on or off (`None`: follow the mode).
    pub fn set_use_batch_stats(&mut self, on: Option<bool>) {
        self.use_batch_stats = on;
    }

    /// Forces running-statistics updates on or off (`None`: follow the mode).
    pub fn set_update_running_stats(&mut self, on: Option<bool>) {
        self.update_running_stats = on;
    }

    /// Whether this forward normalizes with batch statistics.
    pub fn uses_batch_stats(&self) -> bool {
        self.use_batch_stats
            .unwrap_or(self.mode == Mode::Train || self.running.is_none())
    }

    /// Whether this forward updates the running statistics.
    pub fn updates_running_stats(&self) -> bool {
        self.running.is_some()
            && self
                .update_running_stats
                .unwrap_or(self.mode == Mode::Train)
    }

    /// The functional options of the next forward call (mode and overrides applied).
    pub(crate) fn options(&self) -> BatchNormOptions {
        BatchNormOptions {
            use_batch_stats: self.uses_batch_stats(),
            update_running_stats: self.updates_running_stats(),
            eps: self.config.eps,
            momentum: self.config.running.momentum,
            running_var: self.config.running.running_var,
        }
    }

    /// Normalizes `x`.
    ///
    /// # Errors
    /// `x` not `[N, C, *]`; one value per channel with batch statistics;
    /// non-finite batch statistics (running statistics are left unchanged).
    pub fn forward(&mut self, x: &Tensor<T>) -> Result<Output<T>> {
        check_channels(OP, x.shape(), self.config.num_features, 2)?;
        let options = self.options();
        let running = self.running.as_mut().map(RunningStats::as_mut);
        let (y, saved) = batch_norm(
            x,
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

    /// Gradients for the `x` and `out` of a [`Self::forward`] call.
    ///
    /// # Errors
    /// Shapes that disagree with that call's.
    pub fn backward(&self, x: &Tensor<T>, out: &Output<T>, dy: &Tensor<T>) -> Result<Grads<T>> {
        let grads = batch_norm_backward(
            x,
            dy,
            self.affine.weight.as_ref(),
            self.affine.bias.is_some(),
            self.config.eps,
            &out.saved,
            out.input_stats,
        )?;
        Ok(self.affine.mask(grads))
    }
}

impl_state_dict!(BatchNorm, running: true);
impl_affine_access!(BatchNorm);
impl_running_access!(BatchNorm);

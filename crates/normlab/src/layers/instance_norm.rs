//! `InstanceNorm`: PyTorch's `InstanceNorm1d/2d/3d` in one layer (`[N, C, *]`).

use super::{
    check_channels, impl_affine_access, impl_running_access, impl_state_dict, Affine,
    ChannelNormConfig, EpsConfig, Mode, Output, RunningConfig, RunningStats,
};
use crate::kernels::batch_norm::BatchNormOptions;
use crate::kernels::instance_norm::{instance_norm, instance_norm_backward};
use crate::kernels::Grads;
use crate::state::{StateDict, StateTensor, StateView};
use crate::{Epsilon, Float, Result, Tensor};

const OP: &str = "instance_norm";

/// Configuration of an [`InstanceNorm`]; defaults as PyTorch's (no affine,
/// no running statistics).
///
/// ```text
/// y = γ_c·(x - μ_nc)/√(σ²_nc + ε) + β_c     statistics per sample and channel
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceNormConfig {
    /// Channels C.
    pub num_features: usize,
    /// ε = 1e-5 inside the square root.
    pub eps: Epsilon,
    /// Momentum 0.1, unbiased instance variance into `running_var`; no γ
    /// and β, no running statistics.
    pub running: RunningConfig,
}

impl InstanceNormConfig {
    /// PyTorch's defaults for `num_features` channels.
    pub fn new(num_features: usize) -> Self {
        Self {
            num_features,
            eps: Epsilon::default(),
            running: RunningConfig {
                affine: false,
                track_running_stats: false,
                ..RunningConfig::default()
            },
        }
    }

    /// Builds the layer in mode Train.
    ///
    /// # Errors
    /// Invalid ε or momentum.
    pub fn init<T: Float>(&self) -> Result<InstanceNorm<T>> {
        self.eps.validate(OP)?;
        self.running.momentum.validate(OP)?;
        let affine = self.running.affine;
        Ok(InstanceNorm {
            config: self.clone(),
            affine: Affine::new(&[self.num_features], affine, affine)?,
            running: self
                .running
                .track_running_stats
                .then(|| RunningStats::new(self.num_features))
                .transpose()?,
            mode: Mode::Train,
        })
    }
}

impl EpsConfig for InstanceNormConfig {
    fn eps_mut(&mut self) -> &mut Epsilon {
        &mut self.eps
    }
}

impl ChannelNormConfig for InstanceNormConfig {
    fn running_config_mut(&mut self) -> &mut RunningConfig {
        &mut self.running
    }
}

/// Instance normalization, optionally with running statistics used in
/// evaluation.
///
/// # Shapes
/// `x`, `y`: `[N, C, *]` with at least one spatial axis; parameters `[C]`.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceNorm<T> {
    config: InstanceNormConfig,
    affine: Affine<T>,
    running: Option<RunningStats<T>>,
    mode: Mode,
}

impl<T: Float> InstanceNorm<T> {
    /// The configuration it was built with.
    pub fn config(&self) -> &InstanceNormConfig {
        &self.config
    }

    /// Normalizes `x`.
    ///
    /// # Errors
    /// `x` not `[N, C, *]` of rank ≥ 3; one spatial value with instance
    /// statistics; non-finite statistics (running statistics left unchanged).
    pub fn forward(&mut self, x: &Tensor<T>) -> Result<Output<T>> {
        check_channels(OP, x.shape(), self.config.num_features, 3)?;
        let train = self.mode == Mode::Train;
        let options = BatchNormOptions {
            use_batch_stats: train || self.running.is_none(),
            update_running_stats: train,
            eps: self.config.eps,
            momentum: self.config.running.momentum,
            running_var: self.config.running.running_var,
        };
        let running = self.running.as_mut().map(RunningStats::as_mut);
        let (y, saved) = instance_norm(
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
        let grads = instance_norm_backward(
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

impl_state_dict!(InstanceNorm, running: true);
impl_affine_access!(InstanceNorm);
impl_running_access!(InstanceNorm);

//! `InstanceNorm`: PyTorch's `InstanceNorm1d/2d/3d` in one layer (`[N, C, *]`).

use super::{
    check_channels, Affine, ChannelNorm, ChannelNormConfig, ChannelState, EpsConfig, Output,
    Parameters, RunningConfig,
};
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
        Ok(InstanceNorm {
            config: self.clone(),
            state: ChannelState::new(OP, self.num_features, self.eps, &self.running)?,
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
/// Mode, running statistics, their overrides ([`ChannelNorm`]) and γ/β
/// ([`Parameters`]) are those of every per-channel layer; "batch
/// statistics" there are the statistics of each instance. Running
/// statistics forced to normalize while being updated
/// (`set_use_batch_stats(Some(false))` in [`crate::Mode::Train`]) are
/// updated as in training, with the batch average of the instance
/// statistics (the functional [`instance_norm`] reads them first).
///
/// # Shapes
/// `x`, `y`: `[N, C, *]` with at least one spatial axis; parameters `[C]`.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceNorm<T> {
    config: InstanceNormConfig,
    state: ChannelState<T>,
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
        let (eps, running) = (self.config.eps, &self.config.running);
        self.state
            .forward(eps, running, |running, weight, bias, options| {
                instance_norm(x, running, weight, bias, options)
            })
    }

    /// Gradients for the `x` and `out` of a [`Self::forward`] call.
    ///
    /// # Errors
    /// Shapes that disagree with that call's.
    pub fn backward(&self, x: &Tensor<T>, out: &Output<T>, dy: &Tensor<T>) -> Result<Grads<T>> {
        let affine = &self.state.affine;
        let grads = instance_norm_backward(
            x,
            dy,
            affine.weight.as_ref(),
            affine.bias.is_some(),
            self.config.eps,
            &out.saved,
            out.input_stats,
        )?;
        Ok(affine.mask(grads))
    }
}

impl<T: Float> Parameters<T> for InstanceNorm<T> {
    fn affine(&self) -> &Affine<T> {
        &self.state.affine
    }

    fn affine_mut(&mut self) -> &mut Affine<T> {
        &mut self.state.affine
    }
}

impl<T: Float> ChannelNorm<T> for InstanceNorm<T> {
    fn channel_state(&self) -> &ChannelState<T> {
        &self.state
    }

    fn channel_state_mut(&mut self) -> &mut ChannelState<T> {
        &mut self.state
    }
}

impl<T: Float> StateDict<T> for InstanceNorm<T> {
    fn state_dict(&self) -> Vec<(String, StateTensor<T>)> {
        self.state.state_dict()
    }

    fn load_state_dict(&mut self, view: &StateView<'_>) -> Result<()> {
        self.state.load_state_dict(view)
    }
}

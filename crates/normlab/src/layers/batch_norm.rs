//! `BatchNorm`: PyTorch's `BatchNorm1d/2d/3d` in one layer (`[N, C, *]`).

use super::{
    check_channels, Affine, ChannelNorm, ChannelNormConfig, ChannelState, EpsConfig, Output,
    Parameters, RunningConfig,
};
use crate::kernels::batch_norm::{batch_norm, batch_norm_backward};
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
        Ok(BatchNorm {
            config: self.clone(),
            state: ChannelState::new(OP, self.num_features, self.eps, &self.running)?,
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
/// In [`crate::Mode::Train`] it normalizes with batch statistics and
/// updates the running ones; in [`crate::Mode::Eval`] it normalizes with the
/// running ones (or with batch statistics when it tracks none, as PyTorch).
/// Both choices can be overridden independently, and γ/β can be frozen: the
/// mode, running statistics and overrides are those of every per-channel
/// layer ([`ChannelNorm`]), γ and β those of every layer with parameters
/// ([`Parameters`]).
///
/// # Shapes
/// `x`, `y`: `[N, C, *]`; `weight`, `bias`, `running_mean`, `running_var`: `[C]`.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm<T> {
    pub(super) config: BatchNormConfig,
    pub(super) state: ChannelState<T>,
}

impl<T: Float> BatchNorm<T> {
    /// The configuration it was built with.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// Normalizes `x`.
    ///
    /// # Errors
    /// `x` not `[N, C, *]`; one value per channel with batch statistics;
    /// non-finite batch statistics (running statistics are left unchanged).
    pub fn forward(&mut self, x: &Tensor<T>) -> Result<Output<T>> {
        check_channels(OP, x.shape(), self.config.num_features, 2)?;
        let (eps, running) = (self.config.eps, &self.config.running);
        self.state
            .forward(eps, running, |running, weight, bias, options| {
                batch_norm(x, running, weight, bias, options)
            })
    }

    /// Gradients for the `x` and `out` of a [`Self::forward`] call.
    ///
    /// # Errors
    /// Shapes that disagree with that call's.
    pub fn backward(&self, x: &Tensor<T>, out: &Output<T>, dy: &Tensor<T>) -> Result<Grads<T>> {
        let affine = &self.state.affine;
        let grads = batch_norm_backward(
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

impl<T: Float> Parameters<T> for BatchNorm<T> {
    fn affine(&self) -> &Affine<T> {
        &self.state.affine
    }

    fn affine_mut(&mut self) -> &mut Affine<T> {
        &mut self.state.affine
    }
}

impl<T: Float> ChannelNorm<T> for BatchNorm<T> {
    fn channel_state(&self) -> &ChannelState<T> {
        &self.state
    }

    fn channel_state_mut(&mut self) -> &mut ChannelState<T> {
        &mut self.state
    }
}

impl<T: Float> StateDict<T> for BatchNorm<T> {
    fn state_dict(&self) -> Vec<(String, StateTensor<T>)> {
        self.state.state_dict()
    }

    fn load_state_dict(&mut self, view: &StateView<'_>) -> Result<()> {
        self.state.load_state_dict(view)
    }
}

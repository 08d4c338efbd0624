//! What BatchNorm, SyncBatchNorm and InstanceNorm share: the options of
//! their running statistics and, on the config side, their builders.

use super::EpsConfig;
use crate::{Momentum, RunningVarEstimator};

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

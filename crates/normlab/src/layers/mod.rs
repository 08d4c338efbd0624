//! Stateful layers in the Config → init → forward style.
//!
//! A layer owns its parameters (`weight`, `bias`) and, for BatchNorm and
//! InstanceNorm, its running statistics (`running_mean`, `running_var`,
//! `num_batches_tracked`), all under PyTorch's names and shapes so that a
//! PyTorch `state_dict` saved with safetensors loads as-is
//! ([`crate::state`]). Train/eval is an explicit [`Mode`], never inferred.
//!
//! `forward` returns a [`Output`]: `y` plus what `backward` needs. `backward`
//! takes the same `x`, that output and `dy`, and returns [`Grads`](crate::Grads);
//! `dweight`/`dbias` are `None` for absent or frozen parameters.
//!
//! What the layers share is written once, as plain types and traits with
//! default methods:
//! - [`Affine`] (γ, β) behind the [`Parameters`] accessors (`weight()`,
//!   `bias_mut()`, …) of every layer with parameters;
//! - [`ChannelState`] (γ, β, [`RunningStats`], mode, overrides) behind the
//!   [`ChannelNorm`] accessors (`set_mode()`, `running_mean()`, …) of
//!   BatchNorm, SyncBatchNorm and InstanceNorm, and behind their state dict;
//! - [`EpsConfig`] and [`ChannelNormConfig`]: the builders of the configs,
//!   the latter over the [`RunningConfig`] that BatchNorm and InstanceNorm
//!   share.
//!
//! `use normlab::layers::prelude::*;` brings these traits and
//! [`StateDict`](crate::state::StateDict) into scope.

mod batch_norm;
mod channel;
mod group_norm;
mod instance_norm;
mod layer_norm;
mod lrn;
mod params;
mod rms_norm;
mod sync_batch_norm;

pub use batch_norm::{BatchNorm, BatchNormConfig};
pub use channel::{ChannelNorm, ChannelNormConfig, ChannelState, RunningConfig, RunningStats};
pub use group_norm::{GroupNorm, GroupNormConfig};
pub use instance_norm::{InstanceNorm, InstanceNormConfig};
pub use layer_norm::{LayerNorm, LayerNormConfig};
pub use lrn::{LocalResponseNorm, LocalResponseNormConfig};
pub use params::{Affine, Parameters};
pub use rms_norm::{RmsNorm, RmsNormConfig};
pub use sync_batch_norm::SyncBatchNorm;

use crate::kernels::Saved;
use crate::{EpsPlacement, Epsilon, NormError, Result, Tensor};

/// The traits whose methods the layers and their configs are used through:
/// `use normlab::layers::prelude::*;`.
pub mod prelude {
    pub use super::{ChannelNorm, ChannelNormConfig, EpsConfig, Parameters};
    pub use crate::state::StateDict;
}

/// Training or evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Batch (or instance) statistics; running statistics updated.
    #[default]
    Train,
    /// Running statistics, when the layer tracks them; nothing updated.
    Eval,
}

/// What a layer's forward returns: the output and what its backward needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Output<T> {
    /// The normalized output, shaped as the input.
    pub y: Tensor<T>,
    /// Mean and `rstd` of each normalized group.
    pub saved: Saved,
    /// Whether the statistics came from the input (then the gradient flows
    /// through them) or from running statistics (constants).
    pub input_stats: bool,
}

/// The ε builders of a config with an [`Epsilon`] (every config but
/// [`RmsNormConfig`], whose default ε depends on the element type, and
/// [`LocalResponseNormConfig`], which has none).
pub trait EpsConfig: Sized {
    /// The ε this config builds its layer with.
    fn eps_mut(&mut self) -> &mut Epsilon;

    /// Sets ε (inside the square root unless [`Self::with_eps_placement`] says otherwise).
    fn with_eps(mut self, eps: f64) -> Self {
        self.eps_mut().value = eps;
        self
    }

    /// Sets where ε goes.
    fn with_eps_placement(mut self, placement: EpsPlacement) -> Self {
        self.eps_mut().placement = placement;
        self
    }
}

/// `x` must be `[N, channels, *]`.
fn check_channels(
    op: &'static str,
    shape: &[usize],
    channels: usize,
    min_rank: usize,
) -> Result<()> {
    if shape.len() < min_rank {
        return Err(NormError::RankTooLow {
            op,
            arg: "x",
            min: min_rank,
            shape: shape.into(),
        });
    }
    if shape[1] != channels {
        let mut expected = shape.to_vec();
        expected[1] = channels;
        return Err(NormError::ShapeMismatch {
            op,
            arg: "x",
            got: shape.into(),
            expected: expected.into(),
            input: shape.into(),
        });
    }
    Ok(())
}

/// The axis where `normalized` starts in `shape`, if `shape` ends with it.
fn trailing_axis(op: &'static str, shape: &[usize], normalized: &[usize]) -> Result<isize> {
    if shape.len() >= normalized.len() && shape.ends_with(normalized) && !normalized.is_empty() {
        Ok((shape.len() - normalized.len()) as isize)
    } else {
        Err(NormError::TrailingShape {
            op,
            expected: normalized.into(),
            input: shape.into(),
        })
    }
}

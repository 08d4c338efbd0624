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

mod batch_norm;
mod channel;
mod group_norm;
mod instance_norm;
mod layer_norm;
mod lrn;
mod rms_norm;
mod sync_batch_norm;

pub use batch_norm::{BatchNorm, BatchNormConfig};
pub use channel::{ChannelNormConfig, RunningConfig};
pub use group_norm::{GroupNorm, GroupNormConfig};
pub use instance_norm::{InstanceNorm, InstanceNormConfig};
pub use layer_norm::{LayerNorm, LayerNormConfig};
pub use lrn::{LocalResponseNorm, LocalResponseNormConfig};
pub use rms_norm::{RmsNorm, RmsNormConfig};
pub use sync_batch_norm::SyncBatchNorm;

use crate::kernels::batch_norm::RunningStatsMut;
use crate::kernels::{Grads, Saved};
use crate::state::{StateTensor, StateView};
use crate::{EpsPlacement, Epsilon, Float, NormError, Result, Tensor};

/// The traits whose methods the layers and their configs are used through:
/// `use normlab::layers::prelude::*;`.
pub mod prelude {
    pub use super::{ChannelNormConfig, EpsConfig};
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

/// Optional learnable scale γ (`weight`) and shift β (`bias`).
#[derive(Clone, Debug, PartialEq)]
pub struct Affine<T> {
    /// γ, initialized to 1.
    pub weight: Option<Tensor<T>>,
    /// β, initialized to 0.
    pub bias: Option<Tensor<T>>,
    /// Whether backward returns their gradients (PyTorch's `requires_grad`).
    pub trainable: bool,
}

impl<T: Float> Affine<T> {
    /// γ = 1 and β = 0 of `shape`, each when asked for.
    ///
    /// # Errors
    /// A shape whose element count overflows, or memory that cannot be had.
    pub fn new(shape: &[usize], weight: bool, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: weight.then(|| Tensor::full(shape, 1.0)).transpose()?,
            bias: bias.then(|| Tensor::full(shape, 0.0)).transpose()?,
            trainable: true,
        })
    }

    /// Drops the parameter gradients when frozen.
    fn mask(&self, mut grads: Grads<T>) -> Grads<T> {
        if !self.trainable {
            grads.dweight = None;
            grads.dbias = None;
        }
        grads
    }

    fn state(&self, out: &mut Vec<(String, StateTensor<T>)>) {
        if let Some(w) = &self.weight {
            out.push(("weight".into(), StateTensor::Float(w.clone())));
        }
        if let Some(b) = &self.bias {
            out.push(("bias".into(), StateTensor::Float(b.clone())));
        }
    }

    /// Reads (without storing) the parameters this layer has: the staged
    /// replacement for `self`.
    fn read(&self, view: &StateView<'_>) -> Result<Self> {
        let read = |p: &Option<Tensor<T>>, name| {
            p.as_ref().map(|p| view.float(name, p.shape())).transpose()
        };
        Ok(Self {
            weight: read(&self.weight, "weight")?,
            bias: read(&self.bias, "bias")?,
            trainable: self.trainable,
        })
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
    /// [`NormError::OutOfMemory`] when the memory cannot be had.
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

    fn as_mut(&mut self) -> RunningStatsMut<'_, T> {
        RunningStatsMut {
            mean: self.mean.data_mut(),
            var: self.var.data_mut(),
            num_batches_tracked: &mut self.num_batches_tracked,
        }
    }

    fn state(&self, out: &mut Vec<(String, StateTensor<T>)>) {
        out.push(("running_mean".into(), StateTensor::Float(self.mean.clone())));
        out.push(("running_var".into(), StateTensor::Float(self.var.clone())));
        out.push((
            "num_batches_tracked".into(),
            StateTensor::Int64(self.num_batches_tracked),
        ));
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

fn state_of<T: Float>(
    affine: &Affine<T>,
    running: Option<&RunningStats<T>>,
) -> Vec<(String, StateTensor<T>)> {
    let mut out = Vec::new();
    affine.state(&mut out);
    if let Some(r) = running {
        r.state(&mut out);
    }
    out
}

/// Loads a layer's state all or nothing: every tensor is read and validated
/// first, and only then is anything stored, so that a bad `bias` or running
/// statistic leaves the layer exactly as it was.
fn load_into<T: Float>(
    affine: &mut Affine<T>,
    running: Option<&mut RunningStats<T>>,
    view: &StateView<'_>,
) -> Result<()> {
    let staged = affine.read(view)?;
    let stats = running.as_deref().map(|r| r.read(view)).transpose()?;
    *affine = staged;
    if let (Some(r), Some(stats)) = (running, stats) {
        *r = stats;
    }
    Ok(())
}

/// Shared implementation of [`StateDict`] for a layer with an `affine` and
/// optional `running` field.
macro_rules! impl_state_dict {
    ($layer:ident, running: $running:tt) => {
        impl<T: Float> StateDict<T> for $layer<T> {
            fn state_dict(&self) -> Vec<(String, StateTensor<T>)> {
                super::state_of(&self.affine, impl_state_dict!(@get self, $running))
            }
            fn load_state_dict(&mut self, view: &StateView<'_>) -> Result<()> {
                super::load_into(&mut self.affine, impl_state_dict!(@get_mut self, $running), view)
            }
        }
    };
    (@get $s:ident, true) => { $s.running.as_ref() };
    (@get $s:ident, false) => { None };
    (@get_mut $s:ident, true) => { $s.running.as_mut() };
    (@get_mut $s:ident, false) => { None };
}
pub(crate) use impl_state_dict;

/// Accessors for `weight`, `bias` and freezing, on a layer with an `affine` field.
macro_rules! impl_affine_access {
    ($layer:ident) => {
        impl<T: Float> $layer<T> {
            /// γ (`weight`), when present.
            pub fn weight(&self) -> Option<&Tensor<T>> {
                self.affine.weight.as_ref()
            }

            /// γ, mutable (for an optimizer step).
            pub fn weight_mut(&mut self) -> Option<&mut Tensor<T>> {
                self.affine.weight.as_mut()
            }

            /// β (`bias`), when present.
            pub fn bias(&self) -> Option<&Tensor<T>> {
                self.affine.bias.as_ref()
            }

            /// β, mutable.
            pub fn bias_mut(&mut self) -> Option<&mut Tensor<T>> {
                self.affine.bias.as_mut()
            }

            /// Freezes (`false`) or unfreezes γ and β: frozen, backward returns no gradient for them.
            pub fn set_affine_trainable(&mut self, trainable: bool) {
                self.affine.trainable = trainable;
            }
        }
    };
}
pub(crate) use impl_affine_access;

/// Accessors for the running statistics and the mode, on a layer with
/// `running` and `mode` fields.
macro_rules! impl_running_access {
    ($layer:ident) => {
        impl<T: Float> $layer<T> {
            /// Current mode.
            pub fn mode(&self) -> Mode {
                self.mode
            }

            /// Switches train/eval.
            pub fn set_mode(&mut self, mode: Mode) {
                self.mode = mode;
            }

            /// Running mean, when tracked.
            pub fn running_mean(&self) -> Option<&[T]> {
                self.running.as_ref().map(|r| r.mean.data())
            }

            /// Running variance, when tracked.
            pub fn running_var(&self) -> Option<&[T]> {
                self.running.as_ref().map(|r| r.var.data())
            }

            /// Batches folded into the running statistics, when tracked.
            pub fn num_batches_tracked(&self) -> Option<i64> {
                self.running.as_ref().map(|r| r.num_batches_tracked)
            }

            /// The running statistics, mutable (to set or reset them).
            pub fn running_stats_mut(&mut self) -> Option<&mut RunningStats<T>> {
                self.running.as_mut()
            }
        }
    };
}
pub(crate) use impl_running_access;

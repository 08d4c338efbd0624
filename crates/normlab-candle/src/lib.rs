//! # normlab-candle
//!
//! normlab's normalization kernels as candle operations with real backward
//! passes. candle's fused `candle_nn::ops::layer_norm` and `rms_norm` have no
//! backward, and its `LayerNorm`/`RmsNorm` modules take that path for
//! contiguous inputs, so gradients stop there without an error; the
//! functions here differentiate.
//!
//! The constructors mirror candle-nn's (`layer_norm(size, config, vb)`,
//! `rms_norm(size, eps, vb)`, `batch_norm(num_features, config, vb)`,
//! `group_norm(num_groups, num_channels, eps, vb)`), plus
//! `instance_norm(num_features, config, vb)` and `local_response_norm(size)`:
//! switching from candle-nn is a change of import.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! let x = Var::from_tensor(&Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu)?)?;
//! let y = normlab_candle::ops::layer_norm(&x, None, None, 1e-5)?;
//! let grads = (y.sqr()?.sum_all()?).backward()?;
//! assert!(grads.get(&x).is_some());
//! # Ok::<(), candle_core::Error>(())
//! ```
#![deny(missing_docs)]

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub mod channels;
mod custom;
pub mod layers;
pub mod rows;
mod values;

/// The differentiable functions, as `candle_nn::ops`.
pub mod ops {
    pub use crate::channels::{
        group_norm, group_norm_act, layer_norm_channels, local_response_norm, rms_norm_channels,
    };
    pub use crate::rows::{layer_norm, layer_norm_act, layer_norm_eps, rms_norm, rms_norm_eps};
}

pub use layers::{
    batch_norm, convert_sync_batch_norm, group_norm, instance_norm, layer_norm,
    local_response_norm, rms_norm, sync_batch_norm, BatchNorm, BatchNormConfig, GroupNorm,
    InstanceNorm, LayerNorm, LayerNormConfig, LocalResponseNorm, RmsNorm, SyncBatchNorm,
};
pub use normlab::{
    Activation, Communicator, EpsPlacement, Epsilon, LrnOptions, Momentum, RunningVarEstimator,
    SingleProcess, ThreadGroup,
};

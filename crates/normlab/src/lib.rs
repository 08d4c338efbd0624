//! # normlab
//!
//! Normalization layers for deep learning with exact forward and backward
//! passes and PyTorch's semantics: BatchNorm, LayerNorm, GroupNorm,
//! InstanceNorm, RMSNorm and Local Response Normalization.
//!
//! Three levels, from low to high:
//! - [`kernels`]: slice kernels over explicit layouts, and checked functional
//!   forms over [`Tensor`] (`layer_norm`, `batch_norm`, …) with their backward;
//! - [`layers`]: stateful layers (Config → init → forward) with parameters,
//!   running statistics, an explicit [`Mode`], and safetensors state dicts
//!   under PyTorch's names;
//! - [`moments`]: the one stable mean/variance algorithm they all use.
//!
//! ```
//! use normlab::layers::{prelude::*, BatchNormConfig};
//! use normlab::{Mode, Tensor};
//! let mut bn = BatchNormConfig::new(2).init::<f32>().unwrap();
//! let x = Tensor::new(vec![2, 2], vec![1.0, 10.0, 3.0, 30.0]).unwrap();
//! let out = bn.forward(&x).unwrap();                  // training: batch statistics
//! assert!((out.y.data()[0] + 1.0).abs() < 1e-4);
//! assert_eq!(bn.running_mean().unwrap(), &[0.2, 2.0]); // 0.9·0 + 0.1·mean
//! bn.set_mode(Mode::Eval);                            // evaluation: running statistics
//! let grads = bn.backward(&x, &out, &Tensor::full(&[2, 2], 1.0).unwrap()).unwrap();
//! assert_eq!(grads.dbias.unwrap().data(), &[2.0, 2.0]);
//! ```
#![deny(missing_docs)]

pub mod activation;
pub mod alloc;
pub mod comm;
pub mod error;
pub mod float;
pub mod kernels;
pub mod layers;
pub mod moments;
pub mod reference;
pub mod simd;
pub mod state;
pub mod tensor;

pub use activation::Activation;
pub use comm::{Communicator, SingleProcess, ThreadGroup};
pub use error::{NormError, Result};
pub use float::Float;
pub use kernels::batch_norm::{Momentum, RunningVarEstimator};
pub use kernels::lrn::{EvenWindow, LrnOptions, LrnRegion};
pub use kernels::{EpsPlacement, Epsilon, Grads, Saved};
pub use layers::Mode;
pub use moments::Moments;
pub use tensor::{Tensor, TensorView, View};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

//! # normlab-candle
//!
//! normlab's normalization kernels as candle operations with real backward
//! passes. candle's fused `candle_nn::ops::layer_norm` and `rms_norm` have no
//! backward, and its `LayerNorm`/`RmsNorm` modules take that path for
//! contiguous inputs, so gradients stop there without an error; the
//! functions here differentiate.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! let x = Var::from_tensor(&Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu)?)?;
//! let y = normlab_candle::layer_norm(&x, None, None, 1e-5)?;
//! let grads = (y.sqr()?.sum_all()?).backward()?;
//! assert!(grads.get(&x).is_some());
//! # Ok::<(), candle_core::Error>(())
//! ```
#![deny(missing_docs)]

pub mod rows;
mod values;

pub use rows::{layer_norm, rms_norm};

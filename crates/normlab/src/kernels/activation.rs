//! The activations of [`crate::Activation`] on their own, element-wise:
//! what a normalization followed by a separate activation runs (the
//! unfused pair, against which the fused ops — `batch_norm_act`,
//! `group_norm_act`, `layer_norm_act` — are measured), with the same lanes
//! and results.

use rayon::prelude::*;

use super::check_view;
use super::parallel::{self, min_units};
use crate::simd::transform;
use crate::{Activation, Float, Result, Tensor, View};

const OP: &str = "activation";

/// `y = φ(x)`, element by element (PyTorch's `relu`, `tanh`, `sigmoid`).
///
/// # Errors
/// A view whose values disagree with its shape; no memory for `y`.
///
/// ```
/// use normlab::{Activation, Tensor, kernels::activation::activation};
/// let x = Tensor::new(vec![3], vec![-1.0f32, 0.5, f32::NAN]).unwrap();
/// let y = activation(&x, Activation::Relu).unwrap();
/// assert_eq!(&y.data()[..2], &[0.0, 0.5]);
/// assert!(y.data()[2].is_nan());
/// ```
pub fn activation<T: Float>(x: &(impl View<T> + ?Sized), act: Activation) -> Result<Tensor<T>> {
    check_view(OP, "x", x)?;
    let shape = x.shape().to_vec();
    let x = x.data();
    let (y, ()) = Tensor::filled_by(OP, &shape, |y| {
        let task = min_units(1);
        parallel::for_each(
            x.par_chunks(task).zip(y.par_chunks_mut(task)),
            |(xs, ys)| transform::activate(xs, ys, Some(act)),
        );
        Ok(())
    })?;
    Ok(y)
}

/// The gradient at the activation's input from its output `y` and the
/// gradient `dy` at that output, as PyTorch's backward of `relu`, `tanh`
/// and `sigmoid` (which keep the output, not the input).
///
/// # Errors
/// `dy` not shaped as `y`; a view whose values disagree with its shape.
pub fn activation_backward<T: Float>(
    y: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    act: Activation,
) -> Result<Tensor<T>> {
    crate::error::check_shape(OP, "dy", dy.shape(), y.shape(), y.shape())?;
    check_view(OP, "y", y)?;
    check_view(OP, "dy", dy)?;
    let (yd, dyd) = (y.data(), dy.data());
    let (dz, ()) = Tensor::filled_by(OP, y.shape(), |dz| {
        let task = min_units(1);
        parallel::for_each(
            yd.par_chunks(task)
                .zip(dyd.par_chunks(task))
                .zip(dz.par_chunks_mut(task)),
            |((ys, ds), out)| transform::activation_grad(ys, ds, out, Some(act)),
        );
        Ok(())
    })?;
    Ok(dz)
}

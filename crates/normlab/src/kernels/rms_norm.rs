//! RMSNorm over the trailing `n` features of each row (no centring, no bias).
//!
//! ```text
//! ms = Σx²/n   r = 1/√(ms+ε)   x̂ = x·r   y = γ·x̂
//! dx = r·(g - x̂·mean(g·x̂)),  g = γ·dy      dγ = Σ_rows dy·x̂
//! ```
//! Shares its row kernel with LayerNorm (`saved.mean` is 0).

use super::layer_norm::{rows_backward, rows_forward, split_at_axis, Centring};
use super::{check_param, check_saved, check_view, grad_buffer, Epsilon, Grads, Saved};
use crate::error::Result;
use crate::float::uninit_mut;
use crate::{Float, Tensor, View};

const OP: &str = "rms_norm";

/// Forward over `rows × n` values: writes `y` and the per-row `rstd`.
///
/// # Errors
/// When a slice length disagrees with `rows × n` (or `n` for the weight).
pub fn forward_rows<T: Float>(
    x: &[T],
    rows: usize,
    n: usize,
    weight: Option<&[T]>,
    eps: &Epsilon,
    y: &mut [T],
    saved: &mut Saved,
) -> Result<()> {
    rows_forward(
        OP,
        Centring::None,
        x,
        rows,
        n,
        weight,
        None,
        eps,
        uninit_mut(y),
        saved,
    )
}

/// Backward over `rows × n` values: writes `dx`, and `dweight` when given.
///
/// # Errors
/// When a slice length disagrees with the layout.
#[allow(clippy::too_many_arguments)]
pub fn backward_rows<T: Float>(
    x: &[T],
    dy: &[T],
    rows: usize,
    n: usize,
    weight: Option<&[T]>,
    eps: &Epsilon,
    saved: &Saved,
    dx: &mut [T],
    dweight: Option<&mut [T]>,
) -> Result<()> {
    rows_backward(
        OP,
        Centring::None,
        x,
        dy,
        rows,
        n,
        weight,
        eps,
        saved,
        uninit_mut(dx),
        dweight,
        None,
    )
}

/// RMSNorm of `x` over `x.shape[axis..]`.
///
/// # Errors
/// Axis out of range; weight not of shape `x.shape[axis..]`; invalid ε.
///
/// ```
/// use normlab::{Tensor, kernels::rms_norm::rms_norm};
/// let x = Tensor::new(vec![1, 2], vec![3.0f64, 4.0]).unwrap();
/// let (y, _) = rms_norm(&x, -1, None, 0.0.into()).unwrap();
/// // rms = √((9 + 16)/2) = √12.5
/// assert!((y.data()[0] - 3.0 / 12.5f64.sqrt()).abs() < 1e-15);
/// ```
pub fn rms_norm<T: Float>(
    x: &(impl View<T> + ?Sized),
    axis: isize,
    weight: Option<&Tensor<T>>,
    eps: Epsilon,
) -> Result<(Tensor<T>, Saved)> {
    eps.validate(OP)?;
    let (rows, n, normalized) = split_at_axis(OP, x.shape(), axis)?;
    check_param(OP, "weight", weight, &normalized, x.shape())?;
    let numel = check_view(OP, "x", x)?;
    let mut saved = Saved::for_input(OP, rows, numel)?;
    let (y, ()) = Tensor::filled_by(OP, x.shape(), |y| {
        if numel == 0 {
            return Ok(());
        }
        let w = weight.map(Tensor::data);
        rows_forward(
            OP,
            Centring::None,
            x.data(),
            rows,
            n,
            w,
            None,
            &eps,
            y,
            &mut saved,
        )
    })?;
    Ok((y, saved))
}

/// Gradients of [`rms_norm`]: `dx` and, with a weight, `dweight`.
///
/// # Errors
/// Shapes that disagree with the forward call's.
pub fn rms_norm_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    axis: isize,
    weight: Option<&Tensor<T>>,
    eps: Epsilon,
    saved: &Saved,
) -> Result<Grads<T>> {
    let (rows, n, normalized) = split_at_axis(OP, x.shape(), axis)?;
    crate::error::check_shape(OP, "dy", dy.shape(), x.shape(), x.shape())?;
    check_param(OP, "weight", weight, &normalized, x.shape())?;
    let numel = check_view(OP, "x", x)?;
    check_view(OP, "dy", dy)?;
    check_saved(OP, saved, rows, numel)?;
    let mut dweight = grad_buffer(weight.is_some(), &normalized)?;
    let (dx, ()) = Tensor::filled_by(OP, x.shape(), |dx| {
        if numel == 0 {
            return Ok(());
        }
        rows_backward(
            OP,
            Centring::None,
            x.data(),
            dy.data(),
            rows,
            n,
            weight.map(Tensor::data),
            &eps,
            saved,
            dx,
            dweight.as_mut().map(Tensor::data_mut),
            None,
        )
    })?;
    Ok(Grads {
        dx,
        dweight,
        dbias: None,
    })
}

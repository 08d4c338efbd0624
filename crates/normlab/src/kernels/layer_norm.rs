//! LayerNorm over the trailing `n` features of each row.
//!
//! ```text
//! μ = Σx/n   σ² = Σ(x-μ)²/n   r = 1/√(σ²+ε)   x̂ = (x-μ)·r   y = γ·x̂ + β
//! dx = r·(g - mean(g) - x̂·mean(g·x̂)),  g = γ·dy
//! dγ = Σ_rows dy·x̂   dβ = Σ_rows dy
//! ```
//! `axis` picks the first normalized dimension (PyTorch's
//! `normalized_shape = x.shape[axis:]`, ONNX's `axis`); γ and β have that shape.

use super::{backward_coefficients, check_param, param_at, resolve_axis, Epsilon, Grads, Saved};
use crate::error::{check_len, Result};
use crate::moments::{sum_of_squares, Moments};
use crate::{Float, Tensor};

const OP: &str = "layer_norm";

/// Forward over `rows × n` values: writes `y` and the per-row `mean`/`rstd`.
///
/// # Errors
/// When a slice length disagrees with `rows × n` (or `n` for the parameters).
#[allow(clippy::too_many_arguments)]
pub fn forward_rows<T: Float>(
    x: &[T],
    rows: usize,
    n: usize,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: &Epsilon,
    y: &mut [T],
    saved: &mut Saved,
) -> Result<()> {
    rows_forward(OP, Centring::Mean, x, rows, n, weight, bias, eps, y, saved)
}

/// Whether rows are centred on their mean (LayerNorm) or not (RMSNorm).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Centring {
    /// `x - μ`, σ² = Σ(x-μ)²/n.
    Mean,
    /// `x`, "σ²" = Σx²/n (the mean square).
    None,
}

/// The row kernel shared by LayerNorm and RMSNorm.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_forward<T: Float>(
    op: &'static str,
    centring: Centring,
    x: &[T],
    rows: usize,
    n: usize,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: &Epsilon,
    y: &mut [T],
    saved: &mut Saved,
) -> Result<()> {
    check_rows(op, x, rows, n, weight, bias)?;
    check_len(op, "y", y.len(), &[rows, n])?;
    check_len(op, "saved.mean", saved.mean.len(), &[rows])?;
    check_len(op, "saved.rstd", saved.rstd.len(), &[rows])?;
    if n == 0 {
        return Ok(());
    }
    for (row, (x_row, y_row)) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)).enumerate() {
        let (mean, var) = match centring {
            Centring::Mean => {
                let m = Moments::of_slice(x_row);
                (m.mean, m.var(0))
            }
            Centring::None => (0.0, sum_of_squares(x_row) / n as f64),
        };
        let rstd = eps.rstd(var);
        saved.mean[row] = mean;
        saved.rstd[row] = rstd;
        for (j, (&xv, yv)) in x_row.iter().zip(y_row.iter_mut()).enumerate() {
            let x_hat = (xv.to_f64() - mean) * rstd;
            *yv = T::from_f64(x_hat * param_at(weight, j, 1.0) + param_at(bias, j, 0.0));
        }
    }
    Ok(())
}

/// Backward over `rows × n` values from the saved `mean`/`rstd`: writes `dx`,
/// and `dweight`/`dbias` (length `n`) when given.
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
    dbias: Option<&mut [T]>,
) -> Result<()> {
    rows_backward(
        OP,
        Centring::Mean,
        x,
        dy,
        rows,
        n,
        weight,
        eps,
        saved,
        dx,
        dweight,
        dbias,
    )
}

/// The row backward shared by LayerNorm and RMSNorm (`saved.mean` is 0 for RMSNorm).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_backward<T: Float>(
    op: &'static str,
    centring: Centring,
    x: &[T],
    dy: &[T],
    rows: usize,
    n: usize,
    weight: Option<&[T]>,
    eps: &Epsilon,
    saved: &Saved,
    dx: &mut [T],
    dweight: Option<&mut [T]>,
    dbias: Option<&mut [T]>,
) -> Result<()> {
    check_rows(op, x, rows, n, weight, None)?;
    check_len(op, "dy", dy.len(), &[rows, n])?;
    check_len(op, "dx", dx.len(), &[rows, n])?;
    check_len(op, "saved.mean", saved.mean.len(), &[rows])?;
    check_len(op, "saved.rstd", saved.rstd.len(), &[rows])?;
    let mut dweight_acc = vec![0.0f64; if dweight.is_some() { n } else { 0 }];
    let mut dbias_acc = vec![0.0f64; if dbias.is_some() { n } else { 0 }];
    if n > 0 {
        let rows_iter = x
            .chunks_exact(n)
            .zip(dy.chunks_exact(n))
            .zip(dx.chunks_exact_mut(n));
        for (row, ((x_row, dy_row), dx_row)) in rows_iter.enumerate() {
            let (mean, rstd) = (saved.mean[row], saved.rstd[row]);
            let (mut sum_g, mut sum_g_xhat) = (0.0, 0.0);
            for (j, (&xv, &dyv)) in x_row.iter().zip(dy_row).enumerate() {
                let dy = dyv.to_f64();
                let x_hat = (xv.to_f64() - mean) * rstd;
                let g = dy * param_at(weight, j, 1.0);
                sum_g += g;
                sum_g_xhat += g * x_hat;
                if let Some(acc) = dweight_acc.get_mut(j) {
                    *acc += dy * x_hat;
                }
                if let Some(acc) = dbias_acc.get_mut(j) {
                    *acc += dy;
                }
            }
            // Without centring there is no mean to differentiate through: no `c`.
            let mean_g = match centring {
                Centring::Mean => sum_g / n as f64,
                Centring::None => 0.0,
            };
            let (b, c) = backward_coefficients(eps, rstd, mean_g, sum_g_xhat / n as f64);
            for (j, ((&xv, &dyv), dxv)) in x_row.iter().zip(dy_row).zip(dx_row).enumerate() {
                let g = dyv.to_f64() * param_at(weight, j, 1.0);
                *dxv = T::from_f64(rstd * g + b * (xv.to_f64() - mean) + c);
            }
        }
    }
    write_acc(dweight, &dweight_acc);
    write_acc(dbias, &dbias_acc);
    Ok(())
}

pub(crate) fn write_acc<T: Float>(out: Option<&mut [T]>, acc: &[f64]) {
    if let Some(out) = out {
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = T::from_f64(a);
        }
    }
}

fn check_rows<T: Float>(
    op: &'static str,
    x: &[T],
    rows: usize,
    n: usize,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
) -> Result<()> {
    check_len(op, "x", x.len(), &[rows, n])?;
    if let Some(w) = weight {
        check_len(op, "weight", w.len(), &[n])?;
    }
    if let Some(b) = bias {
        check_len(op, "bias", b.len(), &[n])?;
    }
    Ok(())
}

/// Splits `shape` at `axis` into `(rows, n, normalized_shape)`.
///
/// # Errors
/// [`NormError::AxisOutOfRange`](crate::NormError::AxisOutOfRange).
pub fn split_at_axis(
    op: &'static str,
    shape: &[usize],
    axis: isize,
) -> Result<(usize, usize, Vec<usize>)> {
    let axis = resolve_axis(op, axis, shape)?;
    let rows = shape[..axis].iter().product();
    let normalized = shape[axis..].to_vec();
    Ok((rows, normalized.iter().product(), normalized))
}

/// LayerNorm of `x` over `x.shape[axis..]` (negative `axis` counts from the end).
/// Returns `y` and the per-row statistics for [`layer_norm_backward`].
///
/// # Errors
/// Axis out of range; weight or bias not of shape `x.shape[axis..]`; invalid ε.
///
/// ```
/// use normlab::{Tensor, kernels::layer_norm::layer_norm};
/// let x = Tensor::new(vec![1, 4], vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
/// let (y, saved) = layer_norm(&x, -1, None, None, 0.0.into()).unwrap();
/// assert_eq!(saved.mean, vec![2.5]);
/// let expect = [-1.3416407, -0.4472136, 0.4472136, 1.3416407];
/// for (a, b) in y.data().iter().zip(expect) { assert!((a - b).abs() < 1e-6); }
/// ```
pub fn layer_norm<T: Float>(
    x: &Tensor<T>,
    axis: isize,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    eps: Epsilon,
) -> Result<(Tensor<T>, Saved)> {
    eps.validate(OP)?;
    let (rows, n, normalized) = split_at_axis(OP, x.shape(), axis)?;
    check_param(OP, "weight", weight, &normalized, x.shape())?;
    check_param(OP, "bias", bias, &normalized, x.shape())?;
    let mut y = Tensor::zeros(x.shape());
    let mut saved = Saved::zeros(rows);
    forward_rows(
        x.data(),
        rows,
        n,
        weight.map(Tensor::data),
        bias.map(Tensor::data),
        &eps,
        y.data_mut(),
        &mut saved,
    )?;
    Ok((y, saved))
}

/// Gradients of [`layer_norm`]: `dx`, and `dweight`/`dbias` for the parameters
/// that are present (`with_bias` says whether there was a bias).
///
/// # Errors
/// Shapes that disagree with the forward call's.
pub fn layer_norm_backward<T: Float>(
    x: &Tensor<T>,
    dy: &Tensor<T>,
    axis: isize,
    weight: Option<&Tensor<T>>,
    with_bias: bool,
    eps: Epsilon,
    saved: &Saved,
) -> Result<Grads<T>> {
    let (rows, n, normalized) = split_at_axis(OP, x.shape(), axis)?;
    crate::error::check_shape(OP, "dy", dy.shape(), x.shape(), x.shape())?;
    check_param(OP, "weight", weight, &normalized, x.shape())?;
    let mut dx = Tensor::zeros(x.shape());
    let mut dweight = weight.map(|_| Tensor::zeros(&normalized));
    let mut dbias = with_bias.then(|| Tensor::zeros(&normalized));
    backward_rows(
        x.data(),
        dy.data(),
        rows,
        n,
        weight.map(Tensor::data),
        &eps,
        saved,
        dx.data_mut(),
        dweight.as_mut().map(Tensor::data_mut),
        dbias.as_mut().map(Tensor::data_mut),
    )?;
    Ok(Grads { dx, dweight, dbias })
}

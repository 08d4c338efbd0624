//! LayerNorm over the trailing `n` features of each row.
//!
//! ```text
//! μ = Σx/n   σ² = Σ(x-μ)²/n   r = 1/√(σ²+ε)   x̂ = (x-μ)·r   y = γ·x̂ + β
//! dx = r·(g - mean(g) - x̂·mean(g·x̂)),  g = γ·dy
//! dγ = Σ_rows dy·x̂   dβ = Σ_rows dy
//! ```
//! `axis` picks the first normalized dimension (PyTorch's
//! `normalized_shape = x.shape[axis:]`, ONNX's `axis`); γ and β have that shape.

use super::fast;
use super::parallel::{block_units, min_units, sum_partials};
use super::{
    check_param, check_saved, check_view, grad_buffer, param_at, resolve_axis, DxCoefficients,
    Epsilon, Grads, Saved,
};
use crate::error::{check_len, Result};
use crate::float::{as_f32, as_f32_out, uninit_mut};
use crate::moments::{sum_of_squares, Moments};
use crate::{Float, Tensor, View};
use rayon::prelude::*;
use std::mem::MaybeUninit;

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
    rows_forward(
        OP,
        Centring::Mean,
        x,
        rows,
        n,
        weight,
        bias,
        eps,
        uninit_mut(y),
        saved,
    )
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
    y: &mut [MaybeUninit<T>],
    saved: &mut Saved,
) -> Result<()> {
    check_rows(op, x, rows, n, weight, bias)?;
    check_len(op, "y", y.len(), &[rows, n])?;
    check_len(op, "saved.mean", saved.mean.len(), &[rows])?;
    check_len(op, "saved.rstd", saved.rstd.len(), &[rows])?;
    // No values: nothing to write, and nothing of length `n` to build (with
    // no rows, `n` can be as large as any dimension a caller writes).
    if n == 0 || rows == 0 {
        return Ok(());
    }
    if let (Some(x), Some(y)) = (as_f32(x), as_f32_out(y)) {
        let (w, b) = (weight.and_then(as_f32), bias.and_then(as_f32));
        let ones = w.is_none().then(|| vec![1.0f32; n]);
        let zeros = b.is_none().then(|| vec![0.0f32; n]);
        let (w, b) = (
            w.or(ones.as_deref()).unwrap_or(&[]),
            b.or(zeros.as_deref()).unwrap_or(&[]),
        );
        let store = fast::Store::for_len(y.len());
        for_each_row(x, y, n, saved, |x_row, y_row| {
            let (mean, var) = row_stats(centring, x_row);
            let rstd = eps.rstd(var);
            let (hi, lo) = fast::split(mean);
            fast::normalize_row(x_row, y_row, hi, lo, rstd as f32, w, b, store);
            (mean, rstd)
        });
        return Ok(());
    }
    for_each_row(x, y, n, saved, |x_row, y_row| {
        let (mean, var) = row_stats(centring, x_row);
        let rstd = eps.rstd(var);
        for (j, (&xv, yv)) in x_row.iter().zip(y_row.iter_mut()).enumerate() {
            let x_hat = (xv.to_f64() - mean) * rstd;
            yv.write(T::from_f64(
                x_hat * param_at(weight, j, 1.0) + param_at(bias, j, 0.0),
            ));
        }
        (mean, rstd)
    });
    Ok(())
}

/// Mean and (biased) variance of a row, or 0 and the mean square without centring.
fn row_stats<T: Float>(centring: Centring, row: &[T]) -> (f64, f64) {
    match centring {
        Centring::Mean => {
            let m = Moments::of_slice(row);
            (m.mean, m.var(0))
        }
        Centring::None => (0.0, sum_of_squares(row) / row.len() as f64),
    }
}

/// Runs `f(x_row, y_row) -> (mean, rstd)` on every row, in parallel.
fn for_each_row<X: Sync, Y: Send>(
    x: &[X],
    y: &mut [Y],
    n: usize,
    saved: &mut Saved,
    f: impl Fn(&[X], &mut [Y]) -> (f64, f64) + Sync,
) {
    x.par_chunks(n)
        .zip(y.par_chunks_mut(n))
        .zip(saved.mean.par_iter_mut().zip(saved.rstd.par_iter_mut()))
        .with_min_len(min_units(n))
        .for_each(|((x_row, y_row), (mean, rstd))| {
            (*mean, *rstd) = f(x_row, y_row);
        });
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
        uninit_mut(dx),
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
    dx: &mut [MaybeUninit<T>],
    dweight: Option<&mut [T]>,
    dbias: Option<&mut [T]>,
) -> Result<()> {
    check_rows(op, x, rows, n, weight, None)?;
    check_len(op, "dy", dy.len(), &[rows, n])?;
    check_len(op, "dx", dx.len(), &[rows, n])?;
    check_len(op, "saved.mean", saved.mean.len(), &[rows])?;
    check_len(op, "saved.rstd", saved.rstd.len(), &[rows])?;
    if n == 0 || rows == 0 {
        // No values, no gradient; the caller's buffers are written in place
        // (nothing of length `n` is allocated: with no rows it can be huge).
        for out in [dweight, dbias].into_iter().flatten() {
            out.fill(T::from_f64(0.0));
        }
        return Ok(());
    }
    let per_block = block_units(rows);
    let fast_inputs = (as_f32(x), as_f32(dy), weight.map_or(Some(&[][..]), as_f32));
    let partials: Vec<(Vec<f64>, Vec<f64>)> = if let (Some(x), Some(dy), Some(w)) = fast_inputs {
        let dx = as_f32_out(dx).expect("dx has the element type of x");
        let store = fast::Store::for_len(dx.len());
        let ones = weight.is_none().then(|| vec![1.0f32; n]);
        let w = ones.as_deref().unwrap_or(w);
        let block = per_block * n;
        x.par_chunks(block)
            .zip(dy.par_chunks(block))
            .zip(dx.par_chunks_mut(block))
            .zip(
                saved
                    .mean
                    .par_chunks(per_block)
                    .zip(saved.rstd.par_chunks(per_block)),
            )
            .map(|(((xb, dyb), dxb), (means, rstds))| {
                // dγ, dβ: f32 over a few rows, flushed into the block's f64 sums.
                let (mut dw, mut db) = (vec![0.0; n], vec![0.0; n]);
                let (mut dw32, mut db32) = (vec![0f32; n], vec![0f32; n]);
                let rows = xb
                    .chunks_exact(n)
                    .zip(dyb.chunks_exact(n))
                    .zip(dxb.chunks_exact_mut(n));
                for (i, (((x_row, dy_row), dx_row), (&mean, &rstd))) in
                    rows.zip(means.iter().zip(rstds)).enumerate()
                {
                    let (hi, lo) = fast::split(mean);
                    let (sum_g, sum_g_xhat) = fast::row_grad_sums(
                        x_row,
                        dy_row,
                        w,
                        hi,
                        lo,
                        rstd as f32,
                        &mut dw32,
                        &mut db32,
                    );
                    let k = row_coefficients(centring, eps, rstd, sum_g, sum_g_xhat, n);
                    fast::row_dx(
                        x_row,
                        dy_row,
                        w,
                        hi,
                        lo,
                        rstd as f32,
                        k.mean_g as f32,
                        k.b as f32,
                        dx_row,
                        store,
                    );
                    if (i + 1) % FLUSH_ROWS == 0 {
                        fast::flush(&mut dw, &mut dw32);
                        fast::flush(&mut db, &mut db32);
                    }
                }
                fast::flush(&mut dw, &mut dw32);
                fast::flush(&mut db, &mut db32);
                (dw, db)
            })
            .collect()
    } else {
        for_each_block(
            x,
            dy,
            dx,
            n,
            per_block,
            saved,
            |x_row, dy_row, dx_row, (mean, rstd), dw, db| {
                let (mut sum_g, mut sum_g_xhat) = (0.0, 0.0);
                for (j, (&xv, &dyv)) in x_row.iter().zip(dy_row).enumerate() {
                    let dy = dyv.to_f64();
                    let x_hat = (xv.to_f64() - mean) * rstd;
                    let g = dy * param_at(weight, j, 1.0);
                    sum_g += g;
                    sum_g_xhat += g * x_hat;
                    dw[j] += dy * x_hat;
                    db[j] += dy;
                }
                let k = row_coefficients(centring, eps, rstd, sum_g, sum_g_xhat, n);
                for (j, ((&xv, &dyv), dxv)) in x_row.iter().zip(dy_row).zip(dx_row).enumerate() {
                    let g = dyv.to_f64() * param_at(weight, j, 1.0);
                    dxv.write(T::from_f64(
                        rstd * (g - k.mean_g) + k.b * (xv.to_f64() - mean),
                    ));
                }
            },
        )
    };
    let (dw, db): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
    if dweight.is_some() {
        write_acc(dweight, &sum_partials(n, dw));
    }
    if dbias.is_some() {
        write_acc(dbias, &sum_partials(n, db));
    }
    Ok(())
}

/// Rows whose dγ, dβ contributions are summed in f32 before joining the f64 sums.
const FLUSH_ROWS: usize = 8;

/// The `dx` coefficients of a row, from `Σg` and `Σg·x̂`.
fn row_coefficients(
    centring: Centring,
    eps: &Epsilon,
    rstd: f64,
    sum_g: f64,
    sum_g_xhat: f64,
    n: usize,
) -> DxCoefficients {
    // Without centring there is no mean to differentiate through.
    let mean_g = match centring {
        Centring::Mean => sum_g / n as f64,
        Centring::None => 0.0,
    };
    DxCoefficients::new(eps, rstd, mean_g, sum_g_xhat / n as f64)
}

/// Runs `f(x_row, dy_row, dx_row, (mean, rstd), dweight_partial, dbias_partial)`
/// on every row, in parallel over fixed blocks of `per_block` rows; returns
/// each block's partial `(dweight, dbias)` in block order.
#[allow(clippy::type_complexity)]
fn for_each_block<X: Sync, D: Send>(
    x: &[X],
    dy: &[X],
    dx: &mut [D],
    n: usize,
    per_block: usize,
    saved: &Saved,
    f: impl Fn(&[X], &[X], &mut [D], (f64, f64), &mut [f64], &mut [f64]) + Sync,
) -> Vec<(Vec<f64>, Vec<f64>)> {
    let block = per_block * n;
    x.par_chunks(block)
        .zip(dy.par_chunks(block))
        .zip(dx.par_chunks_mut(block))
        .zip(
            saved
                .mean
                .par_chunks(per_block)
                .zip(saved.rstd.par_chunks(per_block)),
        )
        .map(|(((xb, dyb), dxb), (means, rstds))| {
            let (mut dw, mut db) = (vec![0.0; n], vec![0.0; n]);
            let rows = xb
                .chunks_exact(n)
                .zip(dyb.chunks_exact(n))
                .zip(dxb.chunks_exact_mut(n));
            for (((x_row, dy_row), dx_row), (&mean, &rstd)) in rows.zip(means.iter().zip(rstds)) {
                f(x_row, dy_row, dx_row, (mean, rstd), &mut dw, &mut db);
            }
            (dw, db)
        })
        .collect()
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
/// [`NormError::AxisOutOfRange`](crate::NormError::AxisOutOfRange);
/// [`NormError::SizeOverflow`](crate::NormError::SizeOverflow) for a shape
/// whose element count overflows.
pub fn split_at_axis(
    op: &'static str,
    shape: &[usize],
    axis: isize,
) -> Result<(usize, usize, Vec<usize>)> {
    let axis = resolve_axis(op, axis, shape)?;
    // Checked once for the whole shape: then both partial products fit.
    crate::error::numel(op, "x", shape)?;
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
    x: &(impl View<T> + ?Sized),
    axis: isize,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    eps: Epsilon,
) -> Result<(Tensor<T>, Saved)> {
    eps.validate(OP)?;
    let (rows, n, normalized) = split_at_axis(OP, x.shape(), axis)?;
    check_param(OP, "weight", weight, &normalized, x.shape())?;
    check_param(OP, "bias", bias, &normalized, x.shape())?;
    let numel = check_view(OP, "x", x)?;
    let mut saved = Saved::for_input(OP, rows, numel)?;
    let (y, ()) = Tensor::filled_by(OP, x.shape(), |y| {
        if numel == 0 {
            return Ok(());
        }
        let (w, b) = (weight.map(Tensor::data), bias.map(Tensor::data));
        rows_forward(
            OP,
            Centring::Mean,
            x.data(),
            rows,
            n,
            w,
            b,
            &eps,
            y,
            &mut saved,
        )
    })?;
    Ok((y, saved))
}

/// Gradients of [`layer_norm`]: `dx`, and `dweight`/`dbias` for the parameters
/// that are present (`with_bias` says whether there was a bias).
///
/// # Errors
/// Shapes that disagree with the forward call's.
pub fn layer_norm_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    axis: isize,
    weight: Option<&Tensor<T>>,
    with_bias: bool,
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
    let mut dbias = grad_buffer(with_bias, &normalized)?;
    let (dx, ()) = Tensor::filled_by(OP, x.shape(), |dx| {
        if numel == 0 {
            return Ok(());
        }
        rows_backward(
            OP,
            Centring::Mean,
            x.data(),
            dy.data(),
            rows,
            n,
            weight.map(Tensor::data),
            &eps,
            saved,
            dx,
            dweight.as_mut().map(Tensor::data_mut),
            dbias.as_mut().map(Tensor::data_mut),
        )
    })?;
    Ok(Grads { dx, dweight, dbias })
}

//! LayerNorm and RMSNorm: normalization over the trailing `n` features of
//! each row, one kernel for both.
//!
//! ```text
//! LayerNorm: μ = Σx/n   σ² = Σ(x-μ)²/n   r = 1/√(σ²+ε)   x̂ = (x-μ)·r   y = γ·x̂ + β
//!            dx = r·(g - mean(g) - x̂·mean(g·x̂)),  g = γ·dy
//! RMSNorm:   ms = Σx²/n   r = 1/√(ms+ε)   x̂ = x·r   y = γ·x̂
//!            dx = r·(g - x̂·mean(g·x̂))
//! both:      dγ = Σ_rows dy·x̂   dβ = Σ_rows dy
//! ```
//! `axis` picks the first normalized dimension (PyTorch's
//! `normalized_shape = x.shape[axis:]`, ONNX's `axis`); γ and β have that
//! shape. RMSNorm is LayerNorm without centring: its saved mean is 0.
//!
//! Scheduling: rows are independent, so the forward splits them into tasks
//! of at least [`MIN_TASK_VALUES`](super::parallel) values (an input smaller than
//! that runs on the calling thread: few tokens at decoding); the backward's
//! dγ, dβ partial sums are kept per fixed block of rows, so results do not
//! depend on the number of threads.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::parallel::{self, block_units, min_units, sum_partials};
use super::BiasGrad;
use super::{
    check_param, check_saved, check_view, grad_buffer, param_lanes, resolve_axis, DxCoefficients,
    Epsilon, Grads, Saved,
};
use crate::alloc::Scratch;
use crate::error::{check_len, Result};
use crate::float::{Lane, OutputBuffer};
use crate::moments::{sum_of_squares, Moments};
use crate::simd::activation::Act;
use crate::simd::convert::Store;
use crate::simd::{sums, transform};
use crate::Activation;
use crate::{Float, Tensor, View};

/// Which normalization of the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowNorm {
    /// Centred on the row mean, divided by the standard deviation.
    LayerNorm,
    /// Divided by the root mean square, not centred.
    RmsNorm,
}

impl RowNorm {
    /// The op name errors carry.
    pub fn op(self) -> &'static str {
        match self {
            RowNorm::LayerNorm => "layer_norm",
            RowNorm::RmsNorm => "rms_norm",
        }
    }
}

/// Forward over `rows × n` values: writes `y` and the per-row `mean`
/// (0 for RMSNorm) and `rstd` into `saved` (`rows` of each).
///
/// # Errors
/// When a slice length disagrees with `rows × n` (or `n` for the
/// parameters), or memory for the widened parameters cannot be had.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Float, P: Float>(
    norm: RowNorm,
    x: &[T],
    rows: usize,
    n: usize,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    eps: &Epsilon,
    y: &mut (impl OutputBuffer<T> + ?Sized),
    saved: &mut Saved,
) -> Result<()> {
    let op = norm.op();
    eps.validate(op)?;
    check_rows(op, x.len(), rows, n, weight, bias)?;
    let y = crate::float::slots(y);
    check_len(op, "y", y.len(), &[rows, n])?;
    check_len(op, "saved.mean", saved.mean.len(), &[rows])?;
    check_len(op, "saved.rstd", saved.rstd.len(), &[rows])?;
    forward_unchecked(norm, x, n, weight, bias, eps, y, saved, None)
}

/// The forward body, arguments checked.
#[allow(clippy::too_many_arguments)]
fn forward_unchecked<T: Float, P: Float>(
    norm: RowNorm,
    x: &[T],
    n: usize,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
    eps: &Epsilon,
    y: &mut [MaybeUninit<T>],
    saved: &mut Saved,
    act: Act,
) -> Result<()> {
    // No values: nothing to write, and nothing of length `n` to build (with
    // no rows, `n` can be as large as any dimension a caller writes).
    if x.is_empty() {
        return Ok(());
    }
    let op = norm.op();
    let w: Vec<T::Lane> = param_lanes(op, "weight", weight, n, 1.0)?;
    let b: Vec<T::Lane> = param_lanes(op, "bias", bias, n, 0.0)?;
    let store = Store::for_output::<T>(x.len());
    parallel::for_each(
        x.par_chunks(n)
            .zip(y.par_chunks_mut(n))
            .zip(saved.mean.par_iter_mut().zip(saved.rstd.par_iter_mut()))
            .with_min_len(min_units(n)),
        |((x_row, y_row), (mean, rstd))| {
            let (m, var) = row_stats(norm, x_row);
            let r = eps.rstd(var);
            let (hi, lo) = T::Lane::split(m);
            transform::normalize_row(x_row, y_row, hi, lo, T::Lane::of(r), &w, &b, store, act);
            (*mean, *rstd) = (m, r);
        },
    );
    Ok(())
}

/// Mean and (biased) variance of a row, or 0 and the mean square without centring.
fn row_stats<T: Float>(norm: RowNorm, row: &[T]) -> (f64, f64) {
    match norm {
        RowNorm::LayerNorm => {
            let m = Moments::of_slice(row);
            (m.mean, m.var(0))
        }
        RowNorm::RmsNorm => (0.0, sum_of_squares(row) / row.len() as f64),
    }
}

/// Backward over `rows × n` values from the saved `mean`/`rstd`: writes
/// `dx`, and `dweight`/`dbias` (length `n`) when given.
///
/// # Errors
/// When a slice length disagrees with the layout.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float, P: Float>(
    norm: RowNorm,
    x: &[T],
    dy: &[T],
    rows: usize,
    n: usize,
    weight: Option<&[P]>,
    eps: &Epsilon,
    saved: &Saved,
    dx: &mut (impl OutputBuffer<T> + ?Sized),
    dweight: Option<&mut [P]>,
    dbias: Option<&mut [P]>,
) -> Result<()> {
    let op = norm.op();
    check_rows(op, x.len(), rows, n, weight, None)?;
    let dx = crate::float::slots(dx);
    check_len(op, "dy", dy.len(), &[rows, n])?;
    check_len(op, "dx", dx.len(), &[rows, n])?;
    check_len(op, "saved.mean", saved.mean.len(), &[rows])?;
    check_len(op, "saved.rstd", saved.rstd.len(), &[rows])?;
    for (arg, g) in [("dweight", &dweight), ("dbias", &dbias)] {
        if let Some(g) = g {
            check_len(op, arg, g.len(), &[n])?;
        }
    }
    backward_unchecked(norm, x, dy, n, weight, eps, saved, dx, dweight, dbias, None)
}

/// The backward body, arguments checked.
#[allow(clippy::too_many_arguments)]
fn backward_unchecked<T: Float, P: Float>(
    norm: RowNorm,
    x: &[T],
    dy: &[T],
    n: usize,
    weight: Option<&[P]>,
    eps: &Epsilon,
    saved: &Saved,
    dx: &mut [MaybeUninit<T>],
    dweight: Option<&mut [P]>,
    dbias: Option<&mut [P]>,
    fused: Option<(Option<&[P]>, Activation)>,
) -> Result<()> {
    if x.is_empty() {
        // No values, no gradient; the caller's buffers are written in place
        // (nothing of length `n` is allocated: with no rows it can be huge).
        for out in [dweight, dbias].into_iter().flatten() {
            out.fill(P::from_f64(0.0));
        }
        return Ok(());
    }
    let op = norm.op();
    let rows = x.len() / n;
    let w: Vec<T::Lane> = param_lanes(op, "weight", weight, n, 1.0)?;
    // β enters only a fused backward (`z = x̂·γ + β`); empty otherwise.
    let act = fused.map(|(_, act)| act);
    let bias = fused.and_then(|(bias, _)| bias);
    let b: Vec<T::Lane> = param_lanes(op, "bias", bias, if act.is_some() { n } else { 0 }, 0.0)?;
    let store = Store::for_output::<T>(dx.len());
    // Rows per block of dγ, dβ partial sums (each block keeps two of length
    // n): a fixed share of the rows, and at least a task's worth of values,
    // so that a few long rows (decoding) are one block rather than one
    // allocation of partial sums per row.
    let per_block = block_units(rows).max(min_units(n));
    let block = per_block * n;
    let partials: Vec<(Scratch<f64>, Scratch<f64>)> = parallel::collect(
        x.par_chunks(block)
            .zip(dy.par_chunks(block))
            .zip(dx.par_chunks_mut(block))
            .zip(
                saved
                    .mean
                    .par_chunks(per_block)
                    .zip(saved.rstd.par_chunks(per_block)),
            )
            .with_min_len(min_units(block))
            .map(|(((xb, dyb), dxb), (means, rstds))| {
                // dγ, dβ: lanes over a few rows, flushed into the block's f64 sums.
                // From the buffer cache: zeroed `vec!`s of a long row's length
                // were fresh pages, faulted in (and copied on write) on every
                // call, most of a decoding step's backward (`[8, 8192]`).
                let (mut dw, mut db) = (Scratch::filled(n, 0.0), Scratch::filled(n, 0.0));
                let zero = T::Lane::ZERO;
                let (mut dw_lanes, mut db_lanes) =
                    (Scratch::filled(n, zero), Scratch::filled(n, zero));
                // `g = w·dz` of the current row, from the first pass to the second.
                let mut g_row = Scratch::filled(n, zero);
                let rows = xb.chunks_exact(n).zip(dxb.chunks_exact_mut(n));
                for (i, ((x_row, dx_row), (&mean, &rstd))) in
                    rows.zip(means.iter().zip(rstds)).enumerate()
                {
                    let (hi, lo) = T::Lane::split(mean);
                    let r = T::Lane::of(rstd);
                    // The row and the block's rows after it, which the pass prefetches.
                    let (x_rest, dy_rest) = (&xb[i * n..], &dyb[i * n..]);
                    let (sum_g, sum_g_xhat) = sums::row_grad_sums(
                        x_rest,
                        dy_rest,
                        &mut g_row,
                        &w,
                        hi,
                        lo,
                        r,
                        &mut dw_lanes,
                        &mut db_lanes,
                        &b,
                        act,
                    );
                    let k = row_coefficients(norm, eps, rstd, sum_g, sum_g_xhat, n);
                    let (mean_g, b_k) = (T::Lane::of(k.mean_g), T::Lane::of(k.b));
                    transform::row_dx(x_row, &g_row, hi, lo, r, mean_g, b_k, dx_row, store);
                    if (i + 1) % FLUSH_ROWS == 0 {
                        sums::flush::<T>(&mut dw, &mut dw_lanes);
                        sums::flush::<T>(&mut db, &mut db_lanes);
                    }
                }
                sums::flush::<T>(&mut dw, &mut dw_lanes);
                sums::flush::<T>(&mut db, &mut db_lanes);
                (dw, db)
            }),
    );
    let (dw, db): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
    write_sums(dweight, &sum_partials(n, dw));
    write_sums(dbias, &sum_partials(n, db));
    Ok(())
}

/// Rows whose dγ, dβ contributions are summed in lanes before joining the f64 sums.
const FLUSH_ROWS: usize = 8;

/// The `dx` coefficients of a row, from `Σg` and `Σg·x̂`.
fn row_coefficients(
    norm: RowNorm,
    eps: &Epsilon,
    rstd: f64,
    sum_g: f64,
    sum_g_xhat: f64,
    n: usize,
) -> DxCoefficients {
    // Without centring there is no mean to differentiate through.
    let mean_g = match norm {
        RowNorm::LayerNorm => sum_g / n as f64,
        RowNorm::RmsNorm => 0.0,
    };
    DxCoefficients::new(eps, rstd, mean_g, sum_g_xhat / n as f64)
}

/// Rounds f64 sums into a caller's gradient buffer, when there is one.
pub(crate) fn write_sums<P: Float>(out: Option<&mut [P]>, sums: &[f64]) {
    if let Some(out) = out {
        for (o, &a) in out.iter_mut().zip(sums) {
            *o = P::from_f64(a);
        }
    }
}

fn check_rows<P: Float>(
    op: &'static str,
    len: usize,
    rows: usize,
    n: usize,
    weight: Option<&[P]>,
    bias: Option<&[P]>,
) -> Result<()> {
    check_len(op, "x", len, &[rows, n])?;
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

/// The functional forward of either norm: checks shapes, allocates `y`.
fn functional<T: Float>(
    norm: RowNorm,
    x: &(impl View<T> + ?Sized),
    axis: isize,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    eps: Epsilon,
    act: Act,
) -> Result<(Tensor<T>, Saved)> {
    let op = norm.op();
    eps.validate(op)?;
    let (rows, n, normalized) = split_at_axis(op, x.shape(), axis)?;
    check_param(op, "weight", weight, &normalized, x.shape())?;
    check_param(op, "bias", bias, &normalized, x.shape())?;
    let numel = check_view(op, "x", x)?;
    let mut saved = Saved::for_input(op, rows, numel)?;
    let (w, b) = (weight.map(Tensor::data), bias.map(Tensor::data));
    let (y, ()) = Tensor::filled_by(op, x.shape(), |y| {
        forward_unchecked(norm, x.data(), n, w, b, &eps, y, &mut saved, act)
    })?;
    Ok((y, saved))
}

/// The functional backward of either norm: checks shapes, allocates the gradients.
#[allow(clippy::too_many_arguments)]
fn functional_backward<T: Float>(
    norm: RowNorm,
    x: &(impl View<T> + ?Sized),
    dy: &(impl View<T> + ?Sized),
    axis: isize,
    weight: Option<&Tensor<T>>,
    bias: BiasGrad<'_, T>,
    eps: Epsilon,
    saved: &Saved,
) -> Result<Grads<T>> {
    let op = norm.op();
    let with_bias = bias.with_bias();
    let (rows, n, normalized) = split_at_axis(op, x.shape(), axis)?;
    crate::error::check_shape(op, "dy", dy.shape(), x.shape(), x.shape())?;
    check_param(op, "weight", weight, &normalized, x.shape())?;
    if let BiasGrad::Fused { bias, .. } = bias {
        check_param(op, "bias", bias, &normalized, x.shape())?;
    }
    let numel = check_view(op, "x", x)?;
    check_view(op, "dy", dy)?;
    check_saved(op, saved, rows, numel)?;
    let mut dweight = grad_buffer(weight.is_some(), &normalized)?;
    let mut dbias = grad_buffer(with_bias, &normalized)?;
    let (dx, ()) = Tensor::filled_by(op, x.shape(), |dx| {
        backward_unchecked(
            norm,
            x.data(),
            dy.data(),
            n,
            weight.map(Tensor::data),
            &eps,
            saved,
            dx,
            dweight.as_mut().map(Tensor::data_mut),
            dbias.as_mut().map(Tensor::data_mut),
            bias.act().map(|act| (bias.values(), act)),
        )
    })?;
    Ok(Grads { dx, dweight, dbias })
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
    functional(RowNorm::LayerNorm, x, axis, weight, bias, eps, None)
}

/// LayerNorm followed by an activation, one pass: `y = φ(x̂·γ + β)`, as
/// `φ(F.layer_norm(…))`. Its backward is [`layer_norm_act_backward`].
///
/// # Errors
/// As [`layer_norm`].
pub fn layer_norm_act<T: Float>(
    x: &(impl View<T> + ?Sized),
    axis: isize,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    eps: Epsilon,
    act: Activation,
) -> Result<(Tensor<T>, Saved)> {
    functional(RowNorm::LayerNorm, x, axis, weight, bias, eps, Some(act))
}

/// Gradients of [`layer_norm_act`] (`dy` at its output `y`): as
/// [`super::batch_norm::batch_norm_act_backward`], ReLU's mask recomputed
/// from `x`, the saved statistics, γ and β (the forward's `bias`, also when
/// it is not trained), tanh's and sigmoid's derivative taken from `y`.
///
/// # Errors
/// Shapes that disagree with the forward call's.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_act_backward<T: Float>(
    x: &(impl View<T> + ?Sized),
    y: Option<&dyn View<T>>,
    dy: &impl View<T>,
    axis: isize,
    weight: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    act: Activation,
    eps: Epsilon,
    saved: &Saved,
) -> Result<Grads<T>> {
    let mut slot = None;
    let (dy, act) = super::act_output_grad("layer_norm", x.shape(), act, y, dy, &mut slot)?;
    let bias = BiasGrad::Fused { bias, act };
    functional_backward(RowNorm::LayerNorm, x, dy, axis, weight, bias, eps, saved)
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
    functional_backward(
        RowNorm::LayerNorm,
        x,
        dy,
        axis,
        weight,
        BiasGrad::Plain { with_bias },
        eps,
        saved,
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
    functional(RowNorm::RmsNorm, x, axis, weight, None, eps, None)
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
    let bias = BiasGrad::Plain { with_bias: false };
    functional_backward(RowNorm::RmsNorm, x, dy, axis, weight, bias, eps, saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_and_inline_schedules_agree() {
        // 3 rows of 40000 features: one task per row, against the same rows
        // one by one (each below the task size).
        let n = 40_000;
        let x: Vec<f32> = (0..3 * n)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01)
            .collect();
        let mut saved = Saved::zeros("test", 3).unwrap();
        let mut y = vec![0f32; 3 * n];
        forward::<f32, f32>(
            RowNorm::LayerNorm,
            &x,
            3,
            n,
            None,
            None,
            &1e-5.into(),
            &mut y,
            &mut saved,
        )
        .unwrap();
        for r in 0..3 {
            let mut one = Saved::zeros("test", 1).unwrap();
            let mut y1 = vec![0f32; n];
            let row = &x[r * n..][..n];
            forward::<f32, f32>(
                RowNorm::LayerNorm,
                row,
                1,
                n,
                None,
                None,
                &1e-5.into(),
                &mut y1,
                &mut one,
            )
            .unwrap();
            assert_eq!(&y[r * n..][..n], &y1[..]);
            assert_eq!(saved.mean[r], one.mean[0]);
        }
    }
}

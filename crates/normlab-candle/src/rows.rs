//! LayerNorm and RMSNorm over the last dimension as candle custom ops with
//! a backward pass (candle's own fused `layer_norm`/`rms_norm` have none).
//!
//! The op keeps the per-row `mean`/`rstd` its forward computed, so that the
//! backward is the kernel's single fused pass, not a recomputation.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor};
use normlab::kernels::layer_norm::{self as ln, layer_norm_act_backward};
use normlab::kernels::rows::{self, RowNorm};
use normlab::{Activation, Epsilon, Saved, TensorView, View};

use crate::custom::{apply, impl_custom_ops, NormOp};
use crate::values::{
    err, of_tensor, read, read_slices, to_tensor, with_slices, write, Slices, Values,
};

/// Which row normalization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowKind {
    /// `(x - μ)·rstd·γ + β`.
    LayerNorm,
    /// `x·rstd·γ` (no centring, no β).
    RmsNorm,
}

/// One forward call of a row normalization (and its backward).
pub struct RowNormOp {
    kind: RowKind,
    eps: Epsilon,
    saved: Mutex<Option<Saved>>,
    act: Option<Activation>,
}

impl RowNormOp {
    /// A fresh op for one forward call.
    pub fn new(kind: RowKind, eps: Epsilon) -> Self {
        Self {
            kind,
            eps,
            saved: Mutex::new(None),
            act: None,
        }
    }

    /// The op followed by `act` in the same pass, forward and backward
    /// (LayerNorm; RMSNorm fails at the forward).
    pub fn with_activation(mut self, act: Activation) -> Self {
        self.act = Some(act);
        self
    }

    /// `act(layer_norm(x))` on `rows × n` values: `(y, saved)`.
    fn forward_fused<T: normlab::Float>(
        &self,
        x: &[T],
        n: usize,
        w: Option<&[T]>,
        b: Option<&[T]>,
        act: Activation,
    ) -> Result<(Vec<T>, Saved)> {
        if self.kind != RowKind::LayerNorm {
            candle_core::bail!(
                "{}: no fused activation (LayerNorm has one)",
                self.name_str()
            );
        }
        let rows = x.len().checked_div(n).unwrap_or(0);
        let shape = [rows, n];
        let x = TensorView::new(&shape, x).map_err(err)?;
        let param = |p: Option<&[T]>| p.map(|p| normlab::Tensor::from_vec(p.to_vec()));
        let (w, b) = (param(w), param(b));
        let (y, saved) =
            ln::layer_norm_act(&x, -1, w.as_ref(), b.as_ref(), self.eps, act).map_err(err)?;
        Ok((y.into_data(), saved))
    }

    /// The backward of [`Self::forward_fused`]: `(dx, dweight, dbias)`.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn backward_fused<T: normlab::Float>(
        &self,
        x: &[T],
        y: Option<&[T]>,
        dy: &[T],
        n: usize,
        w: Option<&[T]>,
        b: Option<&[T]>,
        act: Activation,
        saved: &Saved,
    ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let rows = x.len().checked_div(n).unwrap_or(0);
        let shape = [rows, n];
        let x = TensorView::new(&shape, x).map_err(err)?;
        let y = y
            .map(|y| TensorView::new(&shape, y))
            .transpose()
            .map_err(err)?;
        let dy = TensorView::new(&shape, dy).map_err(err)?;
        let param = |p: Option<&[T]>| p.map(|p| normlab::Tensor::from_vec(p.to_vec()));
        let (w, b) = (param(w), param(b));
        let (w, b) = (w.as_ref(), b.as_ref());
        let g = layer_norm_act_backward(
            &x,
            y.as_ref().map(|y| y as &dyn View<T>),
            &dy,
            -1,
            w,
            b,
            act,
            self.eps,
            saved,
        )
        .map_err(err)?;
        let data = |t: Option<normlab::Tensor<T>>| t.map(|t| t.into_data()).unwrap_or_default();
        Ok((g.dx.into_data(), data(g.dweight), data(g.dbias)))
    }

    /// The core's row kernel for this kind.
    fn norm(&self) -> RowNorm {
        match self.kind {
            RowKind::LayerNorm => RowNorm::LayerNorm,
            RowKind::RmsNorm => RowNorm::RmsNorm,
        }
    }

    fn name_str(&self) -> &'static str {
        match self.kind {
            RowKind::LayerNorm => "normlab-layer-norm",
            RowKind::RmsNorm => "normlab-rms-norm",
        }
    }

    /// Forward on values: `x` is `rows × n` (n = last dimension).
    fn forward(
        &self,
        x: &Slices<'_>,
        n: usize,
        w: Option<&Values>,
        b: Option<&Values>,
    ) -> Result<Values> {
        let rows = x.len().checked_div(n).unwrap_or(0);
        if let Some(act) = self.act {
            let (y, saved) = match (x, w, b) {
                (Slices::F32(x), w, b) => {
                    let (y, saved) = self.forward_fused(x, n, f32s(w)?, f32s(b)?, act)?;
                    (Values::F32(y), saved)
                }
                (Slices::F64(x), w, b) => {
                    let (y, saved) = self.forward_fused(x, n, f64s(w)?, f64s(b)?, act)?;
                    (Values::F64(y), saved)
                }
            };
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
            return Ok(y);
        }
        let mut saved = Saved::zeros(self.name_str(), rows).map_err(err)?;
        let y = match (x, w, b) {
            (Slices::F32(x), w, b) => {
                let (w, b) = (f32s(w)?, f32s(b)?);
                let mut y = vec![0f32; x.len()];
                rows::forward(self.norm(), x, rows, n, w, b, &self.eps, &mut y, &mut saved)
                    .map_err(err)?;
                Values::F32(y)
            }
            (Slices::F64(x), w, b) => {
                let (w, b) = (f64s(w)?, f64s(b)?);
                let mut y = vec![0f64; x.len()];
                rows::forward(self.norm(), x, rows, n, w, b, &self.eps, &mut y, &mut saved)
                    .map_err(err)?;
                Values::F64(y)
            }
        };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok(y)
    }

    /// The backward's values: `(dx, dweight, dbias)` (empty when absent).
    fn backward_values(
        &self,
        xs: &Slices<'_>,
        ys: Option<&Slices<'_>>,
        dys: &Slices<'_>,
        n: usize,
        wv: Option<&Values>,
        bv: Option<&Values>,
    ) -> Result<(Values, Values, Values)> {
        let with_bias = bv.is_some();
        let rows = xs.len().checked_div(n).unwrap_or(0);
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let saved = match saved {
            Some(s) => s,
            // A second backward through the same graph: recompute.
            None => {
                self.forward(xs, n, wv, bv)?;
                self.saved
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_default()
            }
        };
        macro_rules! run {
            ($x:expr, $dy:expr, $w:expr, $t:ty) => {{
                let mut dx = vec![<$t>::default(); $x.len()];
                let mut dw = vec![<$t>::default(); if $w.is_some() { n } else { 0 }];
                let mut db = vec![<$t>::default(); if with_bias { n } else { 0 }];
                let dw_out = $w.is_some().then_some(&mut dw[..]);
                let db_out = with_bias.then_some(&mut db[..]);
                rows::backward(
                    self.norm(),
                    $x,
                    $dy,
                    rows,
                    n,
                    $w,
                    &self.eps,
                    &saved,
                    &mut dx,
                    dw_out,
                    db_out,
                )
                .map_err(err)?;
                (dx, dw, db)
            }};
        }
        if let Some(act) = self.act {
            return Ok(match (xs, ys, dys) {
                (Slices::F32(xs), ys, Slices::F32(dys)) => {
                    let ys = match ys {
                        Some(Slices::F32(ys)) => Some(&ys[..]),
                        _ => None,
                    };
                    let (w, b) = (f32s(wv)?, f32s(bv)?);
                    let (dx, dw, db) = self.backward_fused(xs, ys, dys, n, w, b, act, &saved)?;
                    (Values::F32(dx), Values::F32(dw), Values::F32(db))
                }
                (Slices::F64(xs), ys, Slices::F64(dys)) => {
                    let ys = match ys {
                        Some(Slices::F64(ys)) => Some(&ys[..]),
                        _ => None,
                    };
                    let (w, b) = (f64s(wv)?, f64s(bv)?);
                    let (dx, dw, db) = self.backward_fused(xs, ys, dys, n, w, b, act, &saved)?;
                    (Values::F64(dx), Values::F64(dw), Values::F64(db))
                }
                _ => candle_core::bail!("{}: mixed precisions in backward", self.name_str()),
            });
        }
        Ok(match (xs, dys) {
            (Slices::F32(xs), Slices::F32(dys)) => {
                let (dx, dw, db) = run!(&xs[..], &dys[..], f32s(wv)?, f32);
                (Values::F32(dx), Values::F32(dw), Values::F32(db))
            }
            (Slices::F64(xs), Slices::F64(dys)) => {
                let (dx, dw, db) = run!(&xs[..], &dys[..], f64s(wv)?, f64);
                (Values::F64(dx), Values::F64(dw), Values::F64(db))
            }
            _ => candle_core::bail!("{}: mixed precisions in backward", self.name_str()),
        })
    }

    /// Backward: `(dx, dweight, dbias)`.
    #[allow(clippy::type_complexity)]
    fn backward_rows(
        &self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        w: Option<&Tensor>,
        b: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let with_bias = b.is_some();
        let n = *x.dims().last().unwrap_or(&1);
        let probe = match x.dtype() {
            candle_core::DType::F64 => Values::F64(Vec::new()),
            _ => Values::F32(Vec::new()),
        };
        let wv = w.map(|w| of_tensor(w, &probe)).transpose()?;
        let bv = b.map(|b| of_tensor(b, &probe)).transpose()?;
        // x, y and dy are borrowed from their storage when possible: no
        // copies. y is read only by tanh's and sigmoid's fused backward in
        // f32 and f64 (see `Activation::derivative_from_output`; a bf16/f16
        // y, widened here, is too coarse): otherwise x stands in, unread.
        let reads_y = self.act.is_some_and(Activation::derivative_from_output)
            && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
        let (dx, dw, db) = with_slices(x, &probe, |xs| {
            with_slices(if reads_y { y } else { x }, &probe, |ys| {
                with_slices(dy, &probe, |dys| {
                    self.backward_values(
                        &xs,
                        reads_y.then_some(&ys),
                        &dys,
                        n,
                        wv.as_ref(),
                        bv.as_ref(),
                    )
                })
            })
        })?;
        let dx = to_tensor(dx, x.dims(), x.dtype(), x)?;
        let dw = match w {
            Some(w) => Some(to_tensor(dw, w.dims(), w.dtype(), w)?),
            None => None,
        };
        let db = match (with_bias, w) {
            (true, Some(w)) => Some(to_tensor(db, w.dims(), w.dtype(), w)?),
            (true, None) => Some(to_tensor(db, &[n], x.dtype(), x)?),
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

fn f32s(v: Option<&Values>) -> Result<Option<&[f32]>> {
    match v {
        None => Ok(None),
        Some(Values::F32(v)) => Ok(Some(v)),
        Some(Values::F64(_)) => candle_core::bail!("parameters must have the input's precision"),
    }
}

fn f64s(v: Option<&Values>) -> Result<Option<&[f64]>> {
    match v {
        None => Ok(None),
        Some(Values::F64(v)) => Ok(Some(v)),
        Some(Values::F32(_)) => candle_core::bail!("parameters must have the input's precision"),
    }
}

/// Checks a parameter is a vector of the last dimension's size.
fn check_param(op: &str, arg: &str, p: &Layout, n: usize, x: &Layout) -> Result<()> {
    if p.dims() != [n] {
        candle_core::bail!(
            "{op}: `{arg}` has shape {:?}, expected [{n}] for input of shape {:?}",
            p.dims(),
            x.dims()
        );
    }
    Ok(())
}

fn last_dim(op: &str, l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&n) => Ok(n),
        None => candle_core::bail!("{op}: input must have at least one dimension, got a scalar"),
    }
}

impl NormOp for RowNormOp {
    fn op_name(&self) -> &'static str {
        self.name_str()
    }

    fn forward_storage(
        &self,
        (s, l): (&CpuStorage, &Layout),
        weight: Option<(&CpuStorage, &Layout)>,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<CpuStorage> {
        let op = self.name_str();
        let n = last_dim(op, l)?;
        let param = |p: Option<(&CpuStorage, &Layout)>, arg: &str| -> Result<Option<Values>> {
            match p {
                Some((ps, pl)) => {
                    check_param(op, arg, pl, n, l)?;
                    Ok(Some(read(op, ps, pl)?))
                }
                None => Ok(None),
            }
        };
        let (w, b) = (param(weight, "weight")?, param(bias, "bias")?);
        let y = self.forward(&read_slices(op, s, l)?, n, w.as_ref(), b.as_ref())?;
        Ok(write(y, s.dtype()))
    }

    fn backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        self.backward_rows(x, y, dy, weight, bias)
    }

    fn fused(&self) -> bool {
        self.act.is_some()
    }
}

impl_custom_ops!(RowNormOp);

/// LayerNorm over the last dimension with a backward pass:
/// `y = (x - μ)/√(σ² + ε)·γ + β`.
///
/// # Errors
/// Unsupported device or dtype; `weight`/`bias` not of the last dimension's size.
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    layer_norm_eps(x, weight, bias, Epsilon::inside_sqrt(eps))
}

/// [`layer_norm`] with ε placed as `eps` says.
///
/// # Errors
/// As [`layer_norm`].
pub fn layer_norm_eps(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: Epsilon,
) -> Result<Tensor> {
    let n = x.dims().last().copied().unwrap_or(0);
    apply(
        RowNormOp::new(RowKind::LayerNorm, eps),
        x,
        weight,
        bias,
        &[n],
    )
}

/// LayerNorm over the last dimension followed by `act`, one op forward and
/// backward (`act(layer_norm(x, …))` without the intermediate tensor).
///
/// # Errors
/// As [`layer_norm`].
pub fn layer_norm_act(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: Epsilon,
    act: Activation,
) -> Result<Tensor> {
    let n = x.dims().last().copied().unwrap_or(0);
    let op = RowNormOp::new(RowKind::LayerNorm, eps).with_activation(act);
    apply(op, x, weight, bias, &[n])
}

/// RMSNorm over the last dimension with a backward pass: `y = x/√(mean(x²) + ε)·γ`.
///
/// # Errors
/// Unsupported device or dtype; `weight` not of the last dimension's size.
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    rms_norm_eps(x, weight, Epsilon::inside_sqrt(eps))
}

/// [`rms_norm`] with ε placed as `eps` says.
///
/// # Errors
/// As [`rms_norm`].
pub fn rms_norm_eps(x: &Tensor, weight: Option<&Tensor>, eps: Epsilon) -> Result<Tensor> {
    apply(RowNormOp::new(RowKind::RmsNorm, eps), x, weight, None, &[])
}

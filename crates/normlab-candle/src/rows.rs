//! LayerNorm and RMSNorm over the last dimension as candle custom ops with
//! a backward pass (candle's own fused `layer_norm`/`rms_norm` have none).
//!
//! The op keeps the per-row `mean`/`rstd` its forward computed, so that the
//! backward is the kernel's single fused pass, not a recomputation.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use normlab::kernels::{layer_norm, rms_norm};
use normlab::{Epsilon, Saved};

use crate::values::{err, of_tensor, read, to_tensor, write, Values};

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
}

impl RowNormOp {
    /// A fresh op for one forward call.
    pub fn new(kind: RowKind, eps: Epsilon) -> Self {
        Self {
            kind,
            eps,
            saved: Mutex::new(None),
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
        x: &Values,
        n: usize,
        w: Option<&Values>,
        b: Option<&Values>,
    ) -> Result<Values> {
        let rows = len(x).checked_div(n).unwrap_or(0);
        let mut saved = Saved::zeros(rows);
        let y = match (x, w, b) {
            (Values::F32(x), w, b) => {
                let (w, b) = (f32s(w)?, f32s(b)?);
                let mut y = vec![0f32; x.len()];
                match self.kind {
                    RowKind::LayerNorm => {
                        layer_norm::forward_rows(x, rows, n, w, b, &self.eps, &mut y, &mut saved)
                    }
                    RowKind::RmsNorm => {
                        rms_norm::forward_rows(x, rows, n, w, &self.eps, &mut y, &mut saved)
                    }
                }
                .map_err(err)?;
                Values::F32(y)
            }
            (Values::F64(x), w, b) => {
                let (w, b) = (f64s(w)?, f64s(b)?);
                let mut y = vec![0f64; x.len()];
                match self.kind {
                    RowKind::LayerNorm => {
                        layer_norm::forward_rows(x, rows, n, w, b, &self.eps, &mut y, &mut saved)
                    }
                    RowKind::RmsNorm => {
                        rms_norm::forward_rows(x, rows, n, w, &self.eps, &mut y, &mut saved)
                    }
                }
                .map_err(err)?;
                Values::F64(y)
            }
        };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok(y)
    }

    /// Backward: `(dx, dweight, dbias)` as values.
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        w: Option<&Tensor>,
        with_bias: bool,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let n = *x.dims().last().unwrap_or(&1);
        let probe = match x.dtype() {
            candle_core::DType::F64 => Values::F64(Vec::new()),
            _ => Values::F32(Vec::new()),
        };
        let xv = of_tensor(x, &probe)?;
        let dyv = of_tensor(dy, &probe)?;
        let wv = w.map(|w| of_tensor(w, &probe)).transpose()?;
        let rows = len(&xv).checked_div(n).unwrap_or(0);
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take();
        let saved = match saved {
            Some(s) => s,
            // A second backward through the same graph: recompute.
            None => {
                self.forward(&xv, n, wv.as_ref(), None)?;
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
                match self.kind {
                    RowKind::LayerNorm => {
                        let db_out = with_bias.then_some(&mut db[..]);
                        layer_norm::backward_rows(
                            $x, $dy, rows, n, $w, &self.eps, &saved, &mut dx, dw_out, db_out,
                        )
                    }
                    RowKind::RmsNorm => rms_norm::backward_rows(
                        $x, $dy, rows, n, $w, &self.eps, &saved, &mut dx, dw_out,
                    ),
                }
                .map_err(err)?;
                (dx, dw, db)
            }};
        }
        let (dx, dw, db) = match (&xv, &dyv) {
            (Values::F32(xs), Values::F32(dys)) => {
                let (dx, dw, db) = run!(&xs[..], &dys[..], f32s(wv.as_ref())?, f32);
                (Values::F32(dx), Values::F32(dw), Values::F32(db))
            }
            (Values::F64(xs), Values::F64(dys)) => {
                let (dx, dw, db) = run!(&xs[..], &dys[..], f64s(wv.as_ref())?, f64);
                (Values::F64(dx), Values::F64(dw), Values::F64(db))
            }
            _ => candle_core::bail!("{}: mixed precisions in backward", self.name_str()),
        };
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

fn len(v: &Values) -> usize {
    match v {
        Values::F32(v) => v.len(),
        Values::F64(v) => v.len(),
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

impl CustomOp1 for RowNormOp {
    fn name(&self) -> &'static str {
        self.name_str()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(self.name_str(), l)?;
        let x = read(self.name_str(), s, l)?;
        let y = self.forward(&x, n, None, None)?;
        Ok((write(y, s.dtype()), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(x, dy, None, false)?.0))
    }
}

impl CustomOp2 for RowNormOp {
    fn name(&self) -> &'static str {
        self.name_str()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(self.name_str(), l1)?;
        check_param(self.name_str(), "weight", l2, n, l1)?;
        let x = read(self.name_str(), s1, l1)?;
        let w = read(self.name_str(), s2, l2)?;
        let y = self.forward(&x, n, Some(&w), None)?;
        Ok((write(y, s1.dtype()), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, dy, Some(w), false)?;
        Ok((Some(dx), dw))
    }
}

impl CustomOp3 for RowNormOp {
    fn name(&self) -> &'static str {
        self.name_str()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = last_dim(self.name_str(), l1)?;
        check_param(self.name_str(), "weight", l2, n, l1)?;
        check_param(self.name_str(), "bias", l3, n, l1)?;
        let x = read(self.name_str(), s1, l1)?;
        let w = read(self.name_str(), s2, l2)?;
        let b = read(self.name_str(), s3, l3)?;
        let y = self.forward(&x, n, Some(&w), Some(&b))?;
        Ok((write(y, s1.dtype()), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.backward(x, dy, Some(w), true)?;
        Ok((Some(dx), dw, db))
    }
}

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
    let op = RowNormOp::new(RowKind::LayerNorm, eps);
    match (weight, bias) {
        (Some(w), Some(b)) => x.apply_op3(w, b, op),
        (Some(w), None) => x.apply_op2(w, op),
        (None, None) => x.apply_op1(op),
        (None, Some(b)) => x.apply_op1(op)?.broadcast_add(b),
    }
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
    let op = RowNormOp::new(RowKind::RmsNorm, eps);
    match weight {
        Some(w) => x.apply_op2(w, op),
        None => x.apply_op1(op),
    }
}

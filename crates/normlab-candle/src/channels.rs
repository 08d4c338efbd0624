//! Channel-wise normalizations on `[N, C, *]` as candle custom ops with a
//! backward pass: BatchNorm (batch or running statistics), GroupNorm,
//! InstanceNorm, LRN, and LayerNorm/RMSNorm over the channels at each
//! position.
//!
//! Each op is built for one forward call. It keeps the statistics its
//! forward used, so the backward is one kernel call; BatchNorm's and
//! InstanceNorm's updated running statistics are handed back to the layer
//! through a shared cell.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};
use normlab::kernels::batch_norm::{
    batch_norm, batch_norm_act, batch_norm_act_backward, batch_norm_backward, BatchNormOptions,
    RunningStatsMut,
};
use normlab::kernels::channel_rows as cr;
use normlab::kernels::group_norm::{self as gn, group_norm_act_backward, group_norm_backward};
use normlab::kernels::instance_norm::{instance_norm, instance_norm_backward};
use normlab::kernels::lrn::{lrn, lrn_backward};
use normlab::kernels::sync_batch_norm::{sync_batch_norm, sync_batch_norm_backward};
use normlab::{Activation, Communicator, Float, LrnOptions, Saved, TensorView, View};

use crate::custom::{apply, impl_custom_ops, NormOp};
use crate::values::{
    err, of_tensor, read, read_slices, to_tensor, with_slices, write, Slices, Values,
};

/// Running statistics going into (and, updated, out of) a forward call.
#[derive(Clone, Debug, Default)]
pub struct RunningCell {
    /// Running mean, running variance, batches tracked (as f64).
    pub stats: Option<(Vec<f64>, Vec<f64>, i64)>,
}

/// Which channel normalization an op computes.
#[derive(Clone, Debug)]
pub enum ChannelKind {
    /// BatchNorm; `options` say which statistics are used and updated.
    Batch(BatchNormOptions),
    /// SyncBatchNorm: BatchNorm with statistics over all ranks of `comm`.
    SyncBatch(BatchNormOptions, Arc<dyn Communicator>),
    /// GroupNorm with this many groups and ε.
    Group(usize, f64),
    /// InstanceNorm; `options` as for BatchNorm (batch stats = instance stats).
    Instance(BatchNormOptions),
    /// Local response normalization.
    Lrn(LrnOptions),
    /// LayerNorm over the channels at each position, with this ε.
    LayerNormChannels(f64),
    /// RMSNorm over the channels at each position, with this ε.
    RmsNormChannels(f64),
}

/// One forward call of a channel normalization (and its backward).
pub struct ChannelNormOp {
    kind: ChannelKind,
    running: Arc<Mutex<RunningCell>>,
    saved: Mutex<Option<Saved>>,
    act: Option<Activation>,
}

impl ChannelNormOp {
    /// A fresh op; `running` carries running statistics in and out.
    pub fn new(kind: ChannelKind, running: Arc<Mutex<RunningCell>>) -> Self {
        Self {
            kind,
            running,
            saved: Mutex::new(None),
            act: None,
        }
    }

    /// The op followed by `act` in the same pass, forward and backward
    /// (BatchNorm and GroupNorm; the other kinds fail at the forward).
    pub fn with_activation(mut self, act: Activation) -> Self {
        self.act = Some(act);
        self
    }

    /// The error for a kind without a fused form.
    fn no_fused_form(&self) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "{}: no fused activation (BatchNorm without a communicator and GroupNorm have one; \
             SyncBatchNorm, InstanceNorm, LRN and the channels-first LayerNorm/RMSNorm do not)",
            self.name_str()
        ))
    }

    fn name_str(&self) -> &'static str {
        match self.kind {
            ChannelKind::Batch(_) => "normlab-batch-norm",
            ChannelKind::SyncBatch(..) => "normlab-sync-batch-norm",
            ChannelKind::Group(..) => "normlab-group-norm",
            ChannelKind::Instance(_) => "normlab-instance-norm",
            ChannelKind::Lrn(_) => "normlab-lrn",
            ChannelKind::LayerNormChannels(_) => "normlab-layer-norm-channels",
            ChannelKind::RmsNormChannels(_) => "normlab-rms-norm-channels",
        }
    }

    /// Forward in element type `T`.
    fn forward_t<T: Float>(
        &self,
        x: &(impl View<T> + ?Sized),
        w: Option<normlab::Tensor<T>>,
        b: Option<normlab::Tensor<T>>,
    ) -> Result<normlab::Tensor<T>> {
        let (w, b) = (w.as_ref(), b.as_ref());
        let (y, saved) = match &self.kind {
            ChannelKind::Batch(options)
            | ChannelKind::SyncBatch(options, _)
            | ChannelKind::Instance(options) => {
                let mut cell = self.running.lock().unwrap_or_else(|e| e.into_inner());
                let mut running = cell.stats.as_ref().map(|(m, v, n)| {
                    (
                        m.iter().map(|&a| T::from_f64(a)).collect::<Vec<_>>(),
                        v.iter().map(|&a| T::from_f64(a)).collect::<Vec<_>>(),
                        *n,
                    )
                });
                let view = running.as_mut().map(|(m, v, n)| RunningStatsMut {
                    mean: m,
                    var: v,
                    num_batches_tracked: n,
                });
                let result = match (&self.kind, self.act) {
                    (ChannelKind::Batch(_), Some(act)) => {
                        batch_norm_act(x, view, w, b, options, act)
                    }
                    (_, Some(_)) => return Err(self.no_fused_form()),
                    (ChannelKind::Batch(_), None) => batch_norm(x, view, w, b, options),
                    (ChannelKind::SyncBatch(_, comm), None) => {
                        sync_batch_norm(x, view, w, b, options, comm.as_ref())
                    }
                    _ => instance_norm(x, view, w, b, options),
                }
                .map_err(err)?;
                if let Some((m, v, n)) = running {
                    cell.stats = Some((
                        m.iter().map(|a| a.to_f64()).collect(),
                        v.iter().map(|a| a.to_f64()).collect(),
                        n,
                    ));
                }
                result
            }
            ChannelKind::Group(groups, eps) => match self.act {
                Some(act) => gn::group_norm_act(x, *groups, w, b, (*eps).into(), act),
                None => gn::group_norm(x, *groups, w, b, (*eps).into()),
            }
            .map_err(err)?,
            ChannelKind::Lrn(_)
            | ChannelKind::LayerNormChannels(_)
            | ChannelKind::RmsNormChannels(_)
                if self.act.is_some() =>
            {
                return Err(self.no_fused_form())
            }
            ChannelKind::Lrn(options) => (lrn(x, options).map_err(err)?, Saved::default()),
            ChannelKind::LayerNormChannels(eps) => {
                cr::layer_norm_channels(x, w, b, (*eps).into()).map_err(err)?
            }
            ChannelKind::RmsNormChannels(eps) => {
                cr::rms_norm_channels(x, w, (*eps).into()).map_err(err)?
            }
        };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok(y)
    }

    /// Backward in element type `T`: `(dx, dweight, dbias)`.
    #[allow(clippy::type_complexity)]
    fn backward_t<T: Float>(
        &self,
        x: &(impl View<T> + ?Sized),
        y: Option<&TensorView<'_, T>>,
        dy: &TensorView<'_, T>,
        w: Option<normlab::Tensor<T>>,
        b: Option<normlab::Tensor<T>>,
    ) -> Result<(
        normlab::Tensor<T>,
        Option<normlab::Tensor<T>>,
        Option<normlab::Tensor<T>>,
    )> {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(saved) = saved else {
            candle_core::bail!("{}: backward before forward", self.name_str())
        };
        let with_bias = b.is_some();
        if let Some(act) = self.act {
            let g = match &self.kind {
                ChannelKind::Batch(o) => batch_norm_act_backward(
                    x,
                    y.map(|y| y as &dyn View<T>),
                    dy,
                    w.as_ref(),
                    b.as_ref(),
                    act,
                    o.eps,
                    &saved,
                    o.use_batch_stats,
                ),
                ChannelKind::Group(groups, eps) => group_norm_act_backward(
                    x,
                    y.map(|y| y as &dyn View<T>),
                    dy,
                    *groups,
                    w.as_ref(),
                    b.as_ref(),
                    act,
                    (*eps).into(),
                    &saved,
                ),
                _ => return Err(self.no_fused_form()),
            }
            .map_err(err)?;
            return Ok((g.dx, g.dweight, g.dbias));
        }
        let g = match &self.kind {
            ChannelKind::Batch(o) => batch_norm_backward(
                x,
                dy,
                w.as_ref(),
                with_bias,
                o.eps,
                &saved,
                o.use_batch_stats,
            ),
            ChannelKind::SyncBatch(o, comm) => sync_batch_norm_backward(
                x,
                dy,
                w.as_ref(),
                with_bias,
                o.eps,
                &saved,
                o.use_batch_stats,
                comm.as_ref(),
            ),
            ChannelKind::Instance(o) => instance_norm_backward(
                x,
                dy,
                w.as_ref(),
                with_bias,
                o.eps,
                &saved,
                o.use_batch_stats,
            ),
            ChannelKind::Group(groups, eps) => {
                group_norm_backward(x, dy, *groups, w.as_ref(), with_bias, (*eps).into(), &saved)
            }
            ChannelKind::LayerNormChannels(eps) => cr::layer_norm_channels_backward(
                x,
                dy,
                w.as_ref(),
                with_bias,
                (*eps).into(),
                &saved,
            ),
            ChannelKind::RmsNormChannels(eps) => {
                cr::rms_norm_channels_backward(x, dy, w.as_ref(), (*eps).into(), &saved)
            }
            ChannelKind::Lrn(options) => lrn_backward(x, dy, options).map(|dx| normlab::Grads {
                dx,
                dweight: None,
                dbias: None,
            }),
        }
        .map_err(err)?;
        Ok((g.dx, g.dweight, g.dbias))
    }

    /// Forward on a CPU storage (borrowed when it can be, see [`read_slices`]).
    fn forward_on(
        &self,
        s: &CpuStorage,
        l: &Layout,
        w: Option<Values>,
        b: Option<Values>,
    ) -> Result<CpuStorage> {
        let shape = l.dims();
        let y = match read_slices(self.name_str(), s, l)? {
            Slices::F32(x) => {
                let x = TensorView::new(shape, &x).map_err(err)?;
                let (w, b) = (w.map(f32v).transpose()?, b.map(f32v).transpose()?);
                Values::F32(self.forward_t(&x, w, b)?.into_data())
            }
            Slices::F64(x) => {
                let x = TensorView::new(shape, &x).map_err(err)?;
                let (w, b) = (w.map(f64v).transpose()?, b.map(f64v).transpose()?);
                Values::F64(self.forward_t(&x, w, b)?.into_data())
            }
        };
        Ok(write(y, s.dtype()))
    }

    #[allow(clippy::type_complexity)]
    fn backward_channels(
        &self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        w: Option<&Tensor>,
        bias: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let probe = if x.dtype() == DType::F64 {
            Values::F64(vec![])
        } else {
            Values::F32(vec![])
        };
        let shape = x.dims().to_vec();
        let wv = w.map(|w| of_tensor(w, &probe)).transpose()?;
        let bv = bias.map(|b| of_tensor(b, &probe)).transpose()?;
        let c = shape.get(1).copied().unwrap_or(0);
        // x, y and dy are borrowed from their storage when possible: no
        // copies. y is read only by tanh's and sigmoid's fused backward in
        // f32 and f64 (see `Activation::derivative_from_output`; a bf16/f16
        // y, widened here, is too coarse): otherwise x stands in, unread.
        let reads_y = self.act.is_some_and(Activation::derivative_from_output)
            && matches!(x.dtype(), DType::F32 | DType::F64);
        macro_rules! back {
            ($x:expr, $y:expr, $dy:expr, $conv:ident, $variant:ident) => {{
                let w = wv.map($conv).transpose()?;
                let b = bv.map($conv).transpose()?;
                let x = TensorView::new(&shape, &$x).map_err(err)?;
                let y = TensorView::new(&shape, &$y).map_err(err)?;
                let dy = TensorView::new(&shape, &$dy).map_err(err)?;
                let (dx, dw, db) = self.backward_t(&x, reads_y.then_some(&y), &dy, w, b)?;
                (
                    Values::$variant(dx.into_data()),
                    dw.map(|t| Values::$variant(t.into_data())),
                    db.map(|t| Values::$variant(t.into_data())),
                )
            }};
        }
        let (dx, dw, db) = with_slices(x, &probe, |xs| {
            with_slices(if reads_y { y } else { x }, &probe, |ys| {
                with_slices(dy, &probe, |dys| {
                    Ok(match (xs, ys, dys) {
                        (Slices::F32(a), Slices::F32(y), Slices::F32(b)) => {
                            back!(a, y, b, f32v, F32)
                        }
                        (Slices::F64(a), Slices::F64(y), Slices::F64(b)) => {
                            back!(a, y, b, f64v, F64)
                        }
                        _ => {
                            candle_core::bail!("{}: mixed precisions in backward", self.name_str())
                        }
                    })
                })
            })
        })?;
        let pdtype = w.map_or(x.dtype(), |w| w.dtype());
        Ok((
            to_tensor(dx, &shape, x.dtype(), x)?,
            dw.map(|v| to_tensor(v, &[c], pdtype, x)).transpose()?,
            db.map(|v| to_tensor(v, &[c], pdtype, x)).transpose()?,
        ))
    }
}

/// A parameter as a 1-d tensor (normlab checks its length against C).
fn f32v(v: Values) -> Result<normlab::Tensor<f32>> {
    match v {
        Values::F32(v) => Ok(normlab::Tensor::from_vec(v)),
        Values::F64(_) => candle_core::bail!("parameters must have the input's precision"),
    }
}

/// A parameter as a 1-d tensor (normlab checks its length against C).
fn f64v(v: Values) -> Result<normlab::Tensor<f64>> {
    match v {
        Values::F64(v) => Ok(normlab::Tensor::from_vec(v)),
        Values::F32(_) => candle_core::bail!("parameters must have the input's precision"),
    }
}

impl NormOp for ChannelNormOp {
    fn op_name(&self) -> &'static str {
        self.name_str()
    }

    fn forward_storage(
        &self,
        (s, l): (&CpuStorage, &Layout),
        weight: Option<(&CpuStorage, &Layout)>,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<CpuStorage> {
        let read_param = |p: Option<(&CpuStorage, &Layout)>| {
            p.map(|(ps, pl)| read(self.name_str(), ps, pl)).transpose()
        };
        self.forward_on(s, l, read_param(weight)?, read_param(bias)?)
    }

    fn fused(&self) -> bool {
        self.act.is_some()
    }

    fn backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        self.backward_channels(x, y, dy, weight, bias)
    }
}

impl_custom_ops!(ChannelNormOp);

/// Applies a channel op to `x` with optional `weight`, `bias` (`[C]`).
pub(crate) fn apply_channels(
    op: ChannelNormOp,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let shape: Vec<usize> = (0..x.rank())
        .map(|d| if d == 1 { x.dims()[1] } else { 1 })
        .collect();
    apply(op, x, weight, bias, &shape)
}

/// LayerNorm over the channels at each position of `x` (`[N, C, *]`) with
/// a backward pass: PyTorch's `F.layer_norm(x.movedim(1, -1), (C,), γ, β,
/// eps).movedim(-1, 1)` (ConvNeXt's channels-first LayerNorm) without the
/// transposes.
///
/// # Errors
/// Unsupported device or dtype; rank below 2; parameters not `[C]`.
pub fn layer_norm_channels(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let op = ChannelNormOp::new(ChannelKind::LayerNormChannels(eps), Default::default());
    apply_channels(op, x, weight, bias)
}

/// RMSNorm over the channels at each position of `x` (`[N, C, *]`) with a
/// backward pass: `F.rms_norm(x.movedim(1, -1), (C,), γ, eps).movedim(-1, 1)`
/// without the transposes.
///
/// # Errors
/// As [`layer_norm_channels`].
pub fn rms_norm_channels(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let op = ChannelNormOp::new(ChannelKind::RmsNormChannels(eps), Default::default());
    apply_channels(op, x, weight, None)
}

/// GroupNorm of `x` (`[N, C, *]`) with a backward pass.
///
/// # Errors
/// Unsupported device or dtype; C not divisible by `num_groups`; parameters not `[C]`.
pub fn group_norm(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let op = ChannelNormOp::new(ChannelKind::Group(num_groups, eps), Default::default());
    apply_channels(op, x, weight, bias)
}

/// GroupNorm of `x` followed by `act`, one op forward and backward
/// (`act(group_norm(x, …))` without the intermediate tensor).
///
/// # Errors
/// As [`group_norm`].
pub fn group_norm_act(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
    act: Activation,
) -> Result<Tensor> {
    let op = ChannelNormOp::new(ChannelKind::Group(num_groups, eps), Default::default())
        .with_activation(act);
    apply_channels(op, x, weight, bias)
}

/// Local response normalization of `x` (`[N, C, *]`) with a backward pass.
///
/// # Errors
/// Unsupported device or dtype; rank < 3; invalid options.
pub fn local_response_norm(x: &Tensor, options: &LrnOptions) -> Result<Tensor> {
    apply_channels(
        ChannelNormOp::new(ChannelKind::Lrn(*options), Default::default()),
        x,
        None,
        None,
    )
}

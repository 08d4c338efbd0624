//! Layers with candle-nn's constructors (`layer_norm(size, config, vb)`, …),
//! so that switching is a change of import. Parameters and buffers live in
//! the `VarMap` under PyTorch's names: `weight`, `bias`, `running_mean`,
//! `running_var`, `num_batches_tracked`.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use normlab::kernels::batch_norm::BatchNormOptions;
use normlab::{EpsPlacement, Epsilon, LrnOptions, Momentum, RunningVarEstimator};

use crate::channels::{apply_channels, ChannelKind, ChannelNormOp, RunningCell};

/// LayerNorm (or, without mean removal, RMSNorm with a bias) over the last
/// dimension. Options as candle-nn's `LayerNormConfig`; an `f64` is ε.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerNormConfig {
    /// ε (1e-5).
    pub eps: f64,
    /// Subtract the mean (true); false makes it RMSNorm.
    pub remove_mean: bool,
    /// Learnable bias (true); the weight is always there, as in candle-nn.
    pub affine: bool,
    /// Where ε goes (inside the square root).
    pub eps_placement: EpsPlacement,
}

impl Default for LayerNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            remove_mean: true,
            affine: true,
            eps_placement: EpsPlacement::InsideSqrt,
        }
    }
}

impl From<f64> for LayerNormConfig {
    fn from(eps: f64) -> Self {
        Self {
            eps,
            ..Self::default()
        }
    }
}

impl From<candle_nn::LayerNormConfig> for LayerNormConfig {
    fn from(c: candle_nn::LayerNormConfig) -> Self {
        Self {
            eps: c.eps,
            remove_mean: c.remove_mean,
            affine: c.affine,
            ..Self::default()
        }
    }
}

/// LayerNorm over the last dimension, differentiable in `x`, `weight`, `bias`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    config: LayerNormConfig,
}

impl LayerNorm {
    /// From given parameters.
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: LayerNormConfig) -> Self {
        Self {
            weight,
            bias,
            config,
        }
    }

    /// γ.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// β, when affine.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl LayerNorm {
    /// The layer followed by `act` in one op, forward and backward: the
    /// same values as `act(self.forward(x))` without the tensor between.
    ///
    /// # Errors
    /// As `forward`; an RMSNorm config (`remove_mean: false`) has no fused form.
    pub fn forward_act(&self, x: &Tensor, act: normlab::Activation) -> Result<Tensor> {
        if !self.config.remove_mean {
            candle_core::bail!("layer_norm: no fused activation without centring (RMSNorm)")
        }
        let eps = Epsilon {
            value: self.config.eps,
            placement: self.config.eps_placement,
        };
        crate::rows::layer_norm_act(x, Some(&self.weight), self.bias.as_ref(), eps, act)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let eps = Epsilon {
            value: self.config.eps,
            placement: self.config.eps_placement,
        };
        if self.config.remove_mean {
            crate::rows::layer_norm_eps(x, Some(&self.weight), self.bias.as_ref(), eps)
        } else {
            let y = crate::rows::rms_norm_eps(x, Some(&self.weight), eps)?;
            match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            }
        }
    }
}

/// candle-nn's `layer_norm(size, config, vb)`: `weight` (and `bias` when affine).
///
/// # Errors
/// A tensor missing from, or misshaped in, the `VarBuilder`.
pub fn layer_norm<C: Into<LayerNormConfig>>(
    size: usize,
    config: C,
    vb: VarBuilder,
) -> Result<LayerNorm> {
    let config = config.into();
    if !(config.eps >= 0.0 && config.eps.is_finite()) {
        candle_core::bail!(
            "layer_norm: `eps` must be finite and non-negative, got {}",
            config.eps
        )
    }
    let weight = vb.get_with_hints(size, "weight", Init::Const(1.))?;
    let bias = if config.affine {
        Some(vb.get_with_hints(size, "bias", Init::Const(0.))?)
    } else {
        None
    };
    Ok(LayerNorm {
        weight,
        bias,
        config,
    })
}

/// RMSNorm over the last dimension.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// From a given weight.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// RMSNorm over the channels at each position of `[N, C, *]` (the
    /// layer's size is C), without moving the channels last
    /// ([`crate::ops::rms_norm_channels`]).
    ///
    /// # Errors
    /// As [`crate::ops::rms_norm_channels`].
    pub fn forward_channels(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::rms_norm_channels(x, Some(&self.weight), self.eps)
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::rms_norm(x, Some(&self.weight), self.eps)
    }
}

/// candle-nn's `rms_norm(size, eps, vb)`: `weight`.
///
/// # Errors
/// A tensor missing from, or misshaped in, the `VarBuilder`.
pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    if !(eps >= 0.0 && eps.is_finite()) {
        candle_core::bail!("rms_norm: `eps` must be finite and non-negative, got {eps}")
    }
    Ok(RmsNorm {
        weight: vb.get_with_hints(size, "weight", Init::Const(1.))?,
        eps,
    })
}

/// GroupNorm over `[N, C, *]`.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// The layer followed by `act` in one op, forward and backward: the
    /// same values as `act(self.forward(x))` without the tensor between.
    ///
    /// # Errors
    /// As `forward`.
    pub fn forward_act(&self, x: &Tensor, act: normlab::Activation) -> Result<Tensor> {
        crate::ops::group_norm_act(
            x,
            self.num_groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            act,
        )
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::group_norm(
            x,
            self.num_groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
        )
    }
}

/// candle-nn's `group_norm(num_groups, num_channels, eps, vb)`: `weight`, `bias`.
///
/// # Errors
/// `num_channels` not divisible by `num_groups`; a tensor missing or misshaped.
pub fn group_norm(
    num_groups: usize,
    num_channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
        candle_core::bail!(
            "group_norm: {num_channels} channels are not divisible by {num_groups} groups"
        )
    }
    Ok(GroupNorm {
        weight: vb.get_with_hints(num_channels, "weight", Init::Const(1.))?,
        bias: vb.get_with_hints(num_channels, "bias", Init::Const(0.))?,
        num_groups,
        eps,
    })
}

/// Options of [`BatchNorm`] and [`InstanceNorm`]: candle-nn's
/// `BatchNormConfig` (or an `f64` ε) plus normlab's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// ε and where it goes (1e-5 inside the square root).
    pub eps: Epsilon,
    /// Learnable γ, β (true for BatchNorm).
    pub affine: bool,
    /// Running statistics kept (true for BatchNorm).
    pub track_running_stats: bool,
    /// Momentum (exponential 0.1, or cumulative).
    pub momentum: Momentum,
    /// Batch variance put into `running_var` (unbiased).
    pub running_var: RunningVarEstimator,
    /// candle-nn's `remove_mean`: must stay true (normalization without
    /// centring is not BatchNorm; the constructor refuses false).
    pub remove_mean: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            eps: Epsilon::default(),
            affine: true,
            track_running_stats: true,
            momentum: Momentum::default(),
            running_var: RunningVarEstimator::Unbiased,
            remove_mean: true,
        }
    }
}

impl From<f64> for BatchNormConfig {
    fn from(eps: f64) -> Self {
        Self {
            eps: Epsilon::inside_sqrt(eps),
            ..Self::default()
        }
    }
}

impl From<candle_nn::BatchNormConfig> for BatchNormConfig {
    fn from(c: candle_nn::BatchNormConfig) -> Self {
        Self {
            eps: Epsilon::inside_sqrt(c.eps),
            affine: c.affine,
            momentum: Momentum::Exponential(c.momentum),
            remove_mean: c.remove_mean,
            ..Self::default()
        }
    }
}

impl BatchNormConfig {
    /// ε added to σ instead of inside the square root.
    pub fn with_eps_placement(mut self, placement: EpsPlacement) -> Self {
        self.eps.placement = placement;
        self
    }
}

/// Running statistics as variables of the `VarMap`.
#[derive(Clone, Debug)]
struct RunningVars {
    mean: Var,
    var: Var,
    num_batches_tracked: Var,
}

impl RunningVars {
    /// Reads (or creates) the running statistics and refuses loaded values
    /// that could only poison evaluation: a non-finite mean, a non-finite or
    /// negative variance, a negative counter. Nothing is built on refusal.
    fn new(num_features: usize, vb: &VarBuilder) -> Result<Self> {
        let mean = vb.get_with_hints(num_features, "running_mean", Init::Const(0.))?;
        let var = vb.get_with_hints(num_features, "running_var", Init::Const(1.))?;
        let count =
            vb.get_with_hints_dtype((), "num_batches_tracked", Init::Const(0.), DType::I64)?;
        let values = |t: &Tensor| -> Result<Vec<f64>> { t.to_dtype(DType::F64)?.to_vec1() };
        let tracked = count.to_dtype(DType::I64)?.to_scalar::<i64>()?;
        normlab::state::check_running_stats(
            &vb.prefix(),
            values(&mean)?,
            values(&var)?,
            Some(tracked),
        )
        .map_err(crate::values::err)?;
        Ok(Self {
            mean: Var::from_tensor(&mean)?,
            var: Var::from_tensor(&var)?,
            num_batches_tracked: Var::from_tensor(&count)?,
        })
    }

    fn cell(&self) -> Result<Arc<Mutex<RunningCell>>> {
        let f64s = |v: &Var| -> Result<Vec<f64>> { v.as_tensor().to_dtype(DType::F64)?.to_vec1() };
        let n = self
            .num_batches_tracked
            .as_tensor()
            .to_dtype(DType::I64)?
            .to_scalar::<i64>()?;
        Ok(Arc::new(Mutex::new(RunningCell {
            stats: Some((f64s(&self.mean)?, f64s(&self.var)?, n)),
        })))
    }

    fn store(&self, cell: &Mutex<RunningCell>) -> Result<()> {
        let cell = cell.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((m, v, n)) = &cell.stats {
            let set = |var: &Var, values: &[f64]| -> Result<()> {
                let t = Tensor::from_slice(values, values.len(), var.device())?
                    .to_dtype(var.dtype())?;
                var.set(&t)
            };
            set(&self.mean, m)?;
            set(&self.var, v)?;
            self.num_batches_tracked.set(
                &Tensor::new(*n, self.num_batches_tracked.device())?
                    .to_dtype(self.num_batches_tracked.dtype())?,
            )?;
        }
        Ok(())
    }
}

/// Shared body of BatchNorm and InstanceNorm.
#[derive(Clone, Debug)]
struct StatNorm {
    weight_and_bias: Option<(Tensor, Tensor)>,
    running: Option<RunningVars>,
    config: BatchNormConfig,
    instance: bool,
    /// Synchronize batch statistics over these ranks (SyncBatchNorm).
    comm: Option<Arc<dyn normlab::Communicator>>,
}

impl StatNorm {
    fn new(
        num_features: usize,
        config: BatchNormConfig,
        vb: VarBuilder,
        instance: bool,
    ) -> Result<Self> {
        if !(config.eps.value >= 0.0 && config.eps.value.is_finite()) {
            candle_core::bail!(
                "batch_norm: `eps` must be finite and non-negative, got {}",
                config.eps.value
            )
        }
        if !config.remove_mean {
            candle_core::bail!(
                "batch_norm: `remove_mean: false` is not supported (statistics are always centred)"
            )
        }
        if let Momentum::Exponential(m) = config.momentum {
            if !(0.0..=1.0).contains(&m) {
                candle_core::bail!("batch_norm: `momentum` must be in [0, 1], got {m}")
            }
        }
        let weight_and_bias = if config.affine {
            Some((
                vb.get_with_hints(num_features, "weight", Init::Const(1.))?,
                vb.get_with_hints(num_features, "bias", Init::Const(0.))?,
            ))
        } else {
            None
        };
        let running = if config.track_running_stats {
            Some(RunningVars::new(num_features, &vb)?)
        } else {
            None
        };
        Ok(Self {
            weight_and_bias,
            running,
            config,
            instance,
            comm: None,
        })
    }

    fn forward_t(
        &self,
        x: &Tensor,
        train: bool,
        act: Option<normlab::Activation>,
    ) -> Result<Tensor> {
        let use_batch = train || self.running.is_none();
        let options = BatchNormOptions {
            use_batch_stats: use_batch,
            update_running_stats: train,
            eps: self.config.eps,
            momentum: self.config.momentum,
            running_var: self.config.running_var,
        };
        let cell = match &self.running {
            Some(r) => r.cell()?,
            None => Arc::new(Mutex::new(RunningCell::default())),
        };
        let kind = match (&self.comm, self.instance) {
            (_, true) => ChannelKind::Instance(options),
            (Some(comm), false) => ChannelKind::SyncBatch(options, comm.clone()),
            (None, false) => ChannelKind::Batch(options),
        };
        let mut op = ChannelNormOp::new(kind, cell.clone());
        if let Some(act) = act {
            op = op.with_activation(act);
        }
        let (w, b) = match &self.weight_and_bias {
            Some((w, b)) => (Some(w), Some(b)),
            None => (None, None),
        };
        let y = apply_channels(op, x, w, b)?;
        if let (true, Some(r)) = (train, &self.running) {
            r.store(&cell)?;
        }
        Ok(y)
    }
}

/// BatchNorm over `[N, C, *]`: `forward_t(x, true)` normalizes with batch
/// statistics and updates the running ones (in the `VarMap`);
/// `forward_t(x, false)` uses the running ones, as candle-nn's BatchNorm.
#[derive(Clone, Debug)]
pub struct BatchNorm(StatNorm);

impl BatchNorm {
    /// Running mean, when tracked.
    pub fn running_mean(&self) -> Option<&Tensor> {
        self.0.running.as_ref().map(|r| r.mean.as_tensor())
    }

    /// Running variance, when tracked.
    pub fn running_var(&self) -> Option<&Tensor> {
        self.0.running.as_ref().map(|r| r.var.as_tensor())
    }

    /// Batches folded into the running statistics, when tracked.
    pub fn num_batches_tracked(&self) -> Option<&Tensor> {
        self.0
            .running
            .as_ref()
            .map(|r| r.num_batches_tracked.as_tensor())
    }

    /// γ and β, when affine.
    pub fn weight_and_bias(&self) -> Option<(&Tensor, &Tensor)> {
        self.0.weight_and_bias.as_ref().map(|(w, b)| (w, b))
    }

    /// `forward_t` followed by `act` in one op, forward and backward: the
    /// same values and running statistics as `act(self.forward_t(x, train))`
    /// without the tensor between.
    ///
    /// # Errors
    /// As `forward_t`.
    pub fn forward_act(&self, x: &Tensor, train: bool, act: normlab::Activation) -> Result<Tensor> {
        self.0.forward_t(x, train, Some(act))
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.0.forward_t(x, train, None)
    }
}

/// candle-nn's `batch_norm(num_features, config, vb)`: `weight`, `bias`,
/// `running_mean`, `running_var`, `num_batches_tracked`.
///
/// # Errors
/// Invalid ε or momentum; a tensor missing or misshaped.
pub fn batch_norm<C: Into<BatchNormConfig>>(
    num_features: usize,
    config: C,
    vb: VarBuilder,
) -> Result<BatchNorm> {
    Ok(BatchNorm(StatNorm::new(
        num_features,
        config.into(),
        vb,
        false,
    )?))
}

/// SyncBatchNorm over `[N, C, *]`: a [`BatchNorm`] whose training-mode
/// statistics are those of the global batch over every rank of its
/// communicator (each rank passes its shard, of any size, possibly empty;
/// every rank must call it in the same order). Gradients of γ and β are the
/// shard's: summing them over ranks, as data-parallel training does, gives
/// the global batch's. Evaluation uses the running statistics, which are
/// identical on every rank, and communicates nothing.
#[derive(Clone, Debug)]
pub struct SyncBatchNorm(BatchNorm);

impl SyncBatchNorm {
    /// The layer as a BatchNorm (its parameters and running statistics).
    pub fn as_batch_norm(&self) -> &BatchNorm {
        &self.0
    }

    /// Back to per-rank statistics.
    pub fn into_batch_norm(mut self) -> BatchNorm {
        (self.0).0.comm = None;
        self.0
    }
}

impl ModuleT for SyncBatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.0.forward_t(x, train)
    }
}

/// Turns a BatchNorm into a SyncBatchNorm over `comm`, keeping its variables
/// (PyTorch's `SyncBatchNorm.convert_sync_batchnorm`, for one layer).
pub fn convert_sync_batch_norm(
    bn: BatchNorm,
    comm: Arc<dyn normlab::Communicator>,
) -> SyncBatchNorm {
    let mut inner = bn.0;
    inner.comm = Some(comm);
    SyncBatchNorm(BatchNorm(inner))
}

/// `batch_norm` with statistics synchronized over `comm`; same variables.
///
/// # Errors
/// As [`batch_norm`].
pub fn sync_batch_norm<C: Into<BatchNormConfig>>(
    num_features: usize,
    config: C,
    comm: Arc<dyn normlab::Communicator>,
    vb: VarBuilder,
) -> Result<SyncBatchNorm> {
    Ok(convert_sync_batch_norm(
        batch_norm(num_features, config, vb)?,
        comm,
    ))
}

/// InstanceNorm over `[N, C, *]` (statistics per sample and channel).
#[derive(Clone, Debug)]
pub struct InstanceNorm(StatNorm);

impl ModuleT for InstanceNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.0.forward_t(x, train, None)
    }
}

/// InstanceNorm; `config` as for [`batch_norm`] (PyTorch's defaults for
/// InstanceNorm are `affine: false, track_running_stats: false`).
///
/// # Errors
/// Invalid ε or momentum; a tensor missing or misshaped.
pub fn instance_norm<C: Into<BatchNormConfig>>(
    num_features: usize,
    config: C,
    vb: VarBuilder,
) -> Result<InstanceNorm> {
    Ok(InstanceNorm(StatNorm::new(
        num_features,
        config.into(),
        vb,
        true,
    )?))
}

/// Local response normalization (no parameters).
#[derive(Clone, Copy, Debug)]
pub struct LocalResponseNorm(LrnOptions);

impl Module for LocalResponseNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::local_response_norm(x, &self.0)
    }
}

/// LRN with PyTorch's defaults for `size` (α = 1e-4, β = 0.75, k = 1), or
/// any [`LrnOptions`].
pub fn local_response_norm(options: impl Into<LrnOptionsArg>) -> LocalResponseNorm {
    LocalResponseNorm(options.into().0)
}

/// A window size or full [`LrnOptions`].
pub struct LrnOptionsArg(LrnOptions);

impl From<usize> for LrnOptionsArg {
    fn from(size: usize) -> Self {
        Self(LrnOptions::new(size))
    }
}

impl From<LrnOptions> for LrnOptionsArg {
    fn from(o: LrnOptions) -> Self {
        Self(o)
    }
}

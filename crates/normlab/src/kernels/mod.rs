//! Kernels: one file per normalization, forward and backward side by side.
//!
//! Each file has two levels:
//! - slice kernels over an explicit layout (`rows × features`,
//!   `N × C × spatial`, …) that write into caller-provided outputs
//!   ([`OutputBuffer`](crate::float::OutputBuffer): initialized or not);
//! - checked, allocating functions over [`Tensor`](crate::Tensor) that
//!   validate shapes and options and return typed errors.
//!
//! Each public entry point checks its arguments once and calls one
//! unchecked body per op, generic over the element type; the inner loops are
//! in [`crate::simd`]. How work is split over threads is decided from the
//! shape ([`parallel`]).
//!
//! Forward saves the minimum the backward needs: the mean and `rstd` of each
//! normalized group, in f64 (see [`Saved`]).
//!
//! Every normalization with centring shares one backward. With `g = γ·dy`,
//! `x̂ = (x - μ)·r` and `r = rstd(σ²)`, differentiating through μ and σ² gives
//! the coefficient form
//! ```text
//! dx = r·(g - mean(g)) + b·(x - μ),   b = k·mean(g·x̂)
//! k  = 2·r'(σ²)/r  =  -r²       (ε inside the square root)
//!                  =  -r/σ      (ε added to σ)
//! ```
//! RMSNorm is the same with μ = 0 and mean(g) = 0; statistics held constant
//! (evaluation) leave `dx = r·g`. `g - mean(g)` is formed before scaling by
//! `r` so that it cancels exactly where it should (rows of one value).

pub mod activation;
pub mod batch_norm;
pub mod channel_rows;
pub mod group_norm;
pub mod instance_norm;
pub mod lrn;
pub(crate) mod parallel;
pub(crate) mod positions;
pub mod rows;
pub(crate) mod slices;
pub mod sync_batch_norm;

/// LayerNorm's functional form (its kernels are in [`rows`], shared with RMSNorm).
pub mod layer_norm {
    pub use super::rows::{
        layer_norm, layer_norm_act, layer_norm_act_backward, layer_norm_backward, split_at_axis,
    };
}

/// RMSNorm's functional form (its kernels are in [`rows`], shared with LayerNorm).
pub mod rms_norm {
    pub use super::rows::{rms_norm, rms_norm_backward};
}

use crate::error::{ensure, Result};

/// Where ε enters the normalization.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EpsPlacement {
    /// `(x - μ) / √(σ² + ε)`: PyTorch, ONNX, TensorFlow (default).
    #[default]
    InsideSqrt,
    /// `(x - μ) / (σ + ε)`: the lecture's formula.
    AddToStd,
}

/// ε and where it goes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Epsilon {
    /// The value (≥ 0, finite).
    pub value: f64,
    /// Its placement.
    pub placement: EpsPlacement,
}

impl Default for Epsilon {
    /// PyTorch's 1e-5 inside the square root.
    fn default() -> Self {
        Self::inside_sqrt(1e-5)
    }
}

impl From<f64> for Epsilon {
    fn from(value: f64) -> Self {
        Self::inside_sqrt(value)
    }
}

impl Epsilon {
    /// `√(σ² + ε)`.
    pub fn inside_sqrt(value: f64) -> Self {
        Self {
            value,
            placement: EpsPlacement::InsideSqrt,
        }
    }

    /// `σ + ε`.
    pub fn add_to_std(value: f64) -> Self {
        Self {
            value,
            placement: EpsPlacement::AddToStd,
        }
    }

    /// Checks ε is finite and non-negative.
    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        ensure(
            self.value.is_finite() && self.value >= 0.0,
            op,
            "eps",
            self.value,
            "finite and non-negative",
        )
    }

    /// `r = 1/√(σ² + ε)` or `1/(σ + ε)`.
    #[inline]
    pub fn rstd(&self, var: f64) -> f64 {
        match self.placement {
            EpsPlacement::InsideSqrt => 1.0 / (var + self.value).sqrt(),
            EpsPlacement::AddToStd => 1.0 / (var.sqrt() + self.value),
        }
    }

    /// `k = 2·r'(σ²)/r` from `r` alone (see the module docs).
    #[inline]
    pub fn var_grad_factor(&self, rstd: f64) -> f64 {
        match self.placement {
            EpsPlacement::InsideSqrt => -rstd * rstd,
            EpsPlacement::AddToStd => {
                let std = 1.0 / rstd - self.value;
                // σ = 0 means every x equals μ: the (x - μ) it multiplies is 0.
                if std > 0.0 {
                    -rstd / std
                } else {
                    0.0
                }
            }
        }
    }
}

/// What forward keeps for backward: per normalized group, its mean and `rstd`.
/// Kept in f64 whatever the element type, so that backward can centre
/// `x - μ` exactly even when |μ| ≫ σ.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Saved {
    /// Mean of each group (0 for RMSNorm).
    pub mean: Vec<f64>,
    /// `1/√(σ² + ε)` (or `1/(σ + ε)`) of each group.
    pub rstd: Vec<f64>,
}

impl Saved {
    /// Room for `groups` groups.
    ///
    /// # Errors
    /// [`NormError::OutOfMemory`](crate::NormError::OutOfMemory) naming `op`
    /// when the memory cannot be had.
    pub fn zeros(op: &'static str, groups: usize) -> Result<Self> {
        Ok(Self {
            mean: crate::alloc::try_filled(op, "saved.mean", groups, 0.0)?,
            rstd: crate::alloc::try_filled(op, "saved.rstd", groups, 0.0)?,
        })
    }

    /// What a forward over an input of `numel` values saves: room for
    /// `groups` groups, or nothing at all for an empty input. An empty input
    /// has no statistics, and its group count can be as large as any
    /// dimension a caller writes (`[2^40, 0]` has 2^40 rows), so nothing
    /// proportional to it is allocated.
    pub(crate) fn for_input(op: &'static str, groups: usize, numel: usize) -> Result<Self> {
        if numel == 0 {
            Ok(Self::default())
        } else {
            Self::zeros(op, groups)
        }
    }
}

/// Gradients of a normalization with respect to its inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads<T> {
    /// ∂L/∂x, shaped as x.
    pub dx: crate::Tensor<T>,
    /// ∂L/∂weight, when there is a weight.
    pub dweight: Option<crate::Tensor<T>>,
    /// ∂L/∂bias, when there is a bias.
    pub dbias: Option<crate::Tensor<T>>,
}

/// `dx = rstd·(w·dy - mean_g) + b·(x - μ)` for one normalized group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct DxCoefficients {
    /// `r`.
    pub rstd: f64,
    /// `mean(g)` over the group (0 without centring or for constant statistics).
    pub mean_g: f64,
    /// `k·mean(g·x̂)` (0 for constant statistics).
    pub b: f64,
}

impl DxCoefficients {
    /// For statistics that depend on x, from `mean(g)` and `mean(g·x̂)` over the group.
    #[inline]
    pub(crate) fn new(eps: &Epsilon, rstd: f64, mean_g: f64, mean_g_xhat: f64) -> Self {
        Self {
            rstd,
            mean_g,
            b: eps.var_grad_factor(rstd) * mean_g_xhat,
        }
    }

    /// For constant statistics: `dx = r·g`.
    #[inline]
    pub(crate) fn constant(rstd: f64) -> Self {
        Self {
            rstd,
            mean_g: 0.0,
            b: 0.0,
        }
    }
}

/// A fused activation with the per-channel forward coefficients that a
/// backward recomputes `z = (x - μ)·scale + shift` from (`scale = rstd·γ`,
/// `shift = β`, in f64: rounded to lanes exactly as the forward rounds them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChannelAct<'a> {
    /// The activation.
    pub act: crate::Activation,
    /// `rstd·γ` per channel.
    pub scale: &'a [f64],
    /// `β` per channel.
    pub shift: &'a [f64],
}

impl ChannelAct<'_> {
    /// Channel `ch`'s coefficients.
    #[inline]
    pub(crate) fn at(&self, ch: usize) -> slices::Affine {
        slices::Affine {
            scale: self.scale[ch],
            shift: self.shift[ch],
        }
    }
}

/// Channel `ch`'s coefficients of a fused call, or unused ones without an activation.
#[inline]
pub(crate) fn affine_at(fused: Option<ChannelAct<'_>>, ch: usize) -> slices::Affine {
    match fused {
        Some(f) => f.at(ch),
        None => slices::Affine {
            scale: 0.0,
            shift: 0.0,
        },
    }
}

/// What a backward knows of β: plain, only whether there is one (its value
/// does not enter); fused, its value and the activation.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BiasGrad<'a, T> {
    /// A plain normalization.
    Plain {
        /// There is a β to return a gradient for.
        with_bias: bool,
    },
    /// A normalization followed by an activation.
    Fused {
        /// β, if any.
        bias: Option<&'a crate::Tensor<T>>,
        /// The activation whose input the kernels recompute from `x`;
        /// `None` when `dy` already went through it (see [`act_output_grad`]).
        act: crate::simd::activation::Act,
    },
}

impl<'a, T: crate::Float> BiasGrad<'a, T> {
    /// There is a β to return a gradient for.
    pub(crate) fn with_bias(self) -> bool {
        match self {
            BiasGrad::Plain { with_bias } => with_bias,
            BiasGrad::Fused { bias, .. } => bias.is_some(),
        }
    }

    /// β's values (none for a plain call).
    pub(crate) fn values(self) -> Option<&'a [T]> {
        match self {
            BiasGrad::Plain { .. } => None,
            BiasGrad::Fused { bias, .. } => bias.map(crate::Tensor::data),
        }
    }

    /// The activation whose input the kernels recompute from `x`; `None`
    /// for a plain call and where `dy` already went through it.
    pub(crate) fn act(self) -> crate::simd::activation::Act {
        match self {
            BiasGrad::Plain { .. } => None,
            BiasGrad::Fused { act, .. } => act,
        }
    }
}

/// Whether a fused backward in `T` takes `act`'s derivative from the
/// forward's output: tanh and sigmoid in f32 and f64. A 16-bit `y` holds
/// the output to 2^-8 (bf16) or 2^-11 (f16) of its value, an error that
/// `1 - y²` would pass on to every gradient (several units in the last
/// place of dγ, dβ): there the kernels recompute `φ(z)` in f32 lanes.
pub(crate) fn reads_output<T: crate::Float>(act: crate::Activation) -> bool {
    let narrow = std::mem::size_of::<T>() < std::mem::size_of::<T::Lane>();
    act.derivative_from_output() && !narrow
}

/// The gradient a fused backward runs its normalization's backward on,
/// and the activation its kernels still recompute: `(dy, act)` for ReLU,
/// for a missing `y` and in 16-bit types (the kernels recompute `φ(z)` from
/// `x`), or `(dz, None)` with `dz = φ'·dy` from the forward's output `y`
/// for tanh and sigmoid in f32 and f64 (see
/// [`crate::Activation::derivative_from_output`]), kept in `slot`. `dy` and
/// `y` are checked against `x`'s shape first, under `op`'s name.
pub(crate) fn act_output_grad<'a, T: crate::Float>(
    op: &'static str,
    x_shape: &[usize],
    act: crate::Activation,
    y: Option<&dyn crate::View<T>>,
    dy: &'a impl crate::View<T>,
    slot: &'a mut Option<crate::Tensor<T>>,
) -> Result<(&'a dyn crate::View<T>, crate::simd::activation::Act)> {
    crate::error::check_shape(op, "dy", dy.shape(), x_shape, x_shape)?;
    check_view(op, "dy", dy)?;
    if let Some(y) = y {
        crate::error::check_shape(op, "y", y.shape(), x_shape, x_shape)?;
        check_view(op, "y", y)?;
    }
    match y {
        Some(y) if reads_output::<T>(act) => {
            let dz = activation::activation_backward(y, dy, act)?;
            Ok((&*slot.insert(dz), None))
        }
        _ => Ok((dy, Some(act))),
    }
}

/// Resolves a possibly negative axis against `rank` (`-1` is the last).
pub(crate) fn resolve_axis(op: &'static str, axis: isize, shape: &[usize]) -> Result<usize> {
    let rank = shape.len() as isize;
    let resolved = if axis < 0 { axis + rank } else { axis };
    if (0..rank).contains(&resolved) {
        Ok(resolved as usize)
    } else {
        Err(crate::NormError::AxisOutOfRange {
            op,
            axis,
            rank: shape.len(),
            shape: shape.into(),
        })
    }
}

/// `[N, C, spatial]` view of a channel-first shape (rank ≥ 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NcsLayout {
    /// Batch size N.
    pub n: usize,
    /// Channels C.
    pub c: usize,
    /// Product of the spatial sizes (1 for `[N, C]`).
    pub spatial: usize,
}

impl NcsLayout {
    /// Reads `[N, C, *]`; errors on rank < `min_rank` (2 for BatchNorm, …)
    /// and on shapes whose element count overflows `usize` (so that `n·c·spatial`
    /// and every partial product of it fit).
    pub fn of(op: &'static str, shape: &[usize], min_rank: usize) -> Result<Self> {
        if shape.len() < min_rank.max(2) {
            return Err(crate::NormError::RankTooLow {
                op,
                arg: "x",
                min: min_rank.max(2),
                shape: shape.into(),
            });
        }
        crate::error::numel(op, "x", shape)?;
        Ok(Self {
            n: shape[0],
            c: shape[1],
            spatial: shape[2..].iter().product(),
        })
    }

    /// Total number of values.
    pub fn len(&self) -> usize {
        self.n * self.c * self.spatial
    }

    /// No values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Checks that a view's values match its shape (a [`View`](crate::View) can be
/// implemented outside this crate, so its promise is checked, not trusted);
/// returns the number of values.
pub(crate) fn check_view<T>(
    op: &'static str,
    arg: &'static str,
    v: &(impl crate::View<T> + ?Sized),
) -> Result<usize> {
    crate::error::check_len(op, arg, v.data().len(), v.shape())?;
    Ok(v.data().len())
}

/// The gradient buffers of an optional parameter of `shape`: zeros, to be
/// accumulated into, when `present`.
pub(crate) fn grad_buffer<T: crate::Float>(
    present: bool,
    shape: &[usize],
) -> Result<Option<crate::Tensor<T>>> {
    present.then(|| crate::Tensor::zeros(shape)).transpose()
}

/// Checks the statistics a forward saved against the `groups` a backward
/// needs. An empty input saves none (see [`Saved::for_input`]) and needs none.
pub(crate) fn check_saved(
    op: &'static str,
    saved: &Saved,
    groups: usize,
    numel: usize,
) -> Result<()> {
    if numel == 0 {
        return Ok(());
    }
    crate::error::check_len(op, "saved.mean", saved.mean.len(), &[groups])?;
    crate::error::check_len(op, "saved.rstd", saved.rstd.len(), &[groups])
}

/// Checks an optional per-channel/feature parameter against `expected` shape.
pub(crate) fn check_param<T: crate::Float>(
    op: &'static str,
    arg: &'static str,
    p: Option<&crate::Tensor<T>>,
    expected: &[usize],
    input: &[usize],
) -> Result<()> {
    match p {
        Some(t) => crate::error::check_shape(op, arg, t.shape(), expected, input),
        None => Ok(()),
    }
}

/// Reads parameter `p` at index `i` as f64, or `default` when absent.
#[inline(always)]
pub(crate) fn param_at<P: crate::Float>(p: Option<&[P]>, i: usize, default: f64) -> f64 {
    match p {
        Some(p) => p[i].to_f64(),
        None => default,
    }
}

/// A per-feature parameter of any element type (γ, β; PyTorch's mixed-type
/// path passes f32 parameters with 16-bit inputs) widened to compute lanes
/// once per call, or `default` everywhere when absent: the inner loops then
/// read one array of lanes whatever the parameter's type.
pub(crate) fn param_lanes<P: crate::Float, C: crate::float::Lane>(
    op: &'static str,
    arg: &'static str,
    p: Option<&[P]>,
    len: usize,
    default: f64,
) -> Result<Vec<C>> {
    let mut out = crate::alloc::try_with_capacity(op, arg, len)?;
    match p {
        Some(p) => out.extend(p.iter().map(|v| C::of(v.to_f64()))),
        None => out.resize(len, C::of(default)),
    }
    Ok(out)
}

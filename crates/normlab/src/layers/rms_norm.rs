//! `RmsNorm`: PyTorch's `nn.RMSNorm(normalized_shape, eps, elementwise_affine)`.

use super::{trailing_axis, Affine, Output, Parameters};
use crate::kernels::rms_norm::{rms_norm, rms_norm_backward};
use crate::kernels::{EpsPlacement, Grads};
use crate::state::{StateDict, StateTensor, StateView};
use crate::{Epsilon, Float, Result, Tensor};

const OP: &str = "rms_norm";

/// Configuration of an [`RmsNorm`]; defaults as PyTorch's.
///
/// ```text
/// y = γ·x/√(mean(x²) + ε)     over the trailing normalized_shape
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNormConfig {
    /// The trailing dimensions normalized over.
    pub normalized_shape: Vec<usize>,
    /// ε; `None` is the element type's machine epsilon (PyTorch's default).
    pub eps: Option<f64>,
    /// Where ε goes.
    pub eps_placement: EpsPlacement,
    /// Learnable γ, true.
    pub elementwise_affine: bool,
}

impl RmsNormConfig {
    /// PyTorch's defaults over `normalized_shape`.
    pub fn new(normalized_shape: &[usize]) -> Self {
        Self {
            normalized_shape: normalized_shape.to_vec(),
            eps: None,
            eps_placement: EpsPlacement::InsideSqrt,
            elementwise_affine: true,
        }
    }

    /// Sets ε.
    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = Some(eps);
        self
    }

    /// Sets where ε goes.
    pub fn with_eps_placement(mut self, placement: EpsPlacement) -> Self {
        self.eps_placement = placement;
        self
    }

    /// Turns γ on or off.
    pub fn with_elementwise_affine(mut self, affine: bool) -> Self {
        self.elementwise_affine = affine;
        self
    }

    /// Builds the layer: γ = 1.
    ///
    /// # Errors
    /// Invalid ε; an empty `normalized_shape`.
    pub fn init<T: Float>(&self) -> Result<RmsNorm<T>> {
        let eps = Epsilon {
            value: self.eps.unwrap_or(T::EPSILON),
            placement: self.eps_placement,
        };
        eps.validate(OP)?;
        crate::error::ensure(
            !self.normalized_shape.is_empty(),
            OP,
            "normalized_shape",
            "[]",
            "at least one dimension",
        )?;
        Ok(RmsNorm {
            config: self.clone(),
            eps,
            affine: Affine::new(&self.normalized_shape, self.elementwise_affine, false)?,
        })
    }
}

/// Root-mean-square normalization over the trailing `normalized_shape`.
///
/// # Shapes
/// `x`, `y`: `[*, normalized_shape]`; `weight`: `normalized_shape`.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNorm<T> {
    config: RmsNormConfig,
    eps: Epsilon,
    affine: Affine<T>,
}

impl<T: Float> RmsNorm<T> {
    /// The configuration it was built with.
    pub fn config(&self) -> &RmsNormConfig {
        &self.config
    }

    /// The ε in use (the configured one, or the machine epsilon of `T`).
    pub fn eps(&self) -> Epsilon {
        self.eps
    }

    /// Normalizes `x`.
    ///
    /// # Errors
    /// `x` not ending with `normalized_shape`.
    pub fn forward(&self, x: &Tensor<T>) -> Result<Output<T>> {
        let axis = trailing_axis(OP, x.shape(), &self.config.normalized_shape)?;
        let (y, saved) = rms_norm(x, axis, self.affine.weight.as_ref(), self.eps)?;
        Ok(Output {
            y,
            saved,
            input_stats: true,
        })
    }

    /// Gradients for the `x` and `out` of a [`Self::forward`] call.
    ///
    /// # Errors
    /// Shapes that disagree with that call's.
    pub fn backward(&self, x: &Tensor<T>, out: &Output<T>, dy: &Tensor<T>) -> Result<Grads<T>> {
        let axis = trailing_axis(OP, x.shape(), &self.config.normalized_shape)?;
        let grads = rms_norm_backward(
            x,
            dy,
            axis,
            self.affine.weight.as_ref(),
            self.eps,
            &out.saved,
        )?;
        Ok(self.affine.mask(grads))
    }
}

impl<T: Float> Parameters<T> for RmsNorm<T> {
    fn affine(&self) -> &Affine<T> {
        &self.affine
    }

    fn affine_mut(&mut self) -> &mut Affine<T> {
        &mut self.affine
    }
}

impl<T: Float> StateDict<T> for RmsNorm<T> {
    fn state_dict(&self) -> Vec<(String, StateTensor<T>)> {
        self.affine.state_dict()
    }

    fn load_state_dict(&mut self, view: &StateView<'_>) -> Result<()> {
        self.affine.load_state_dict(view)
    }
}

//! `LayerNorm`: PyTorch's `nn.LayerNorm(normalized_shape, eps, elementwise_affine, bias)`.

use super::{trailing_axis, Affine, EpsConfig, Output, Parameters};
use crate::kernels::layer_norm::{layer_norm, layer_norm_backward};
use crate::kernels::Grads;
use crate::state::{StateDict, StateTensor, StateView};
use crate::{Epsilon, Float, Result, Tensor};

const OP: &str = "layer_norm";

/// Configuration of a [`LayerNorm`]; defaults as PyTorch's.
///
/// ```text
/// y = γ·(x - μ)/√(σ² + ε) + β     statistics per sample over the trailing normalized_shape
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormConfig {
    /// The trailing dimensions normalized over.
    pub normalized_shape: Vec<usize>,
    /// ε = 1e-5 inside the square root.
    pub eps: Epsilon,
    /// Learnable γ (and β unless `bias` is off), true.
    pub elementwise_affine: bool,
    /// Learnable β when affine, true.
    pub bias: bool,
}

impl LayerNormConfig {
    /// PyTorch's defaults over `normalized_shape`.
    pub fn new(normalized_shape: &[usize]) -> Self {
        Self {
            normalized_shape: normalized_shape.to_vec(),
            eps: Epsilon::default(),
            elementwise_affine: true,
            bias: true,
        }
    }

    /// Turns γ (and β) on or off.
    pub fn with_elementwise_affine(mut self, affine: bool) -> Self {
        self.elementwise_affine = affine;
        self
    }

    /// Turns β on or off (only with elementwise affine).
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Builds the layer: γ = 1, β = 0.
    ///
    /// # Errors
    /// Invalid ε; an empty `normalized_shape`.
    pub fn init<T: Float>(&self) -> Result<LayerNorm<T>> {
        self.eps.validate(OP)?;
        crate::error::ensure(
            !self.normalized_shape.is_empty(),
            OP,
            "normalized_shape",
            "[]",
            "at least one dimension",
        )?;
        let affine = self.elementwise_affine;
        Ok(LayerNorm {
            config: self.clone(),
            affine: Affine::new(&self.normalized_shape, affine, affine && self.bias)?,
        })
    }
}

impl EpsConfig for LayerNormConfig {
    fn eps_mut(&mut self) -> &mut Epsilon {
        &mut self.eps
    }
}

/// Layer normalization over the trailing `normalized_shape`.
///
/// # Shapes
/// `x`, `y`: `[*, normalized_shape]`; `weight`, `bias`: `normalized_shape`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm<T> {
    config: LayerNormConfig,
    affine: Affine<T>,
}

impl<T: Float> LayerNorm<T> {
    /// The configuration it was built with.
    pub fn config(&self) -> &LayerNormConfig {
        &self.config
    }

    /// Normalizes `x`.
    ///
    /// # Errors
    /// `x` not ending with `normalized_shape`.
    pub fn forward(&self, x: &Tensor<T>) -> Result<Output<T>> {
        let axis = trailing_axis(OP, x.shape(), &self.config.normalized_shape)?;
        let (y, saved) = layer_norm(
            x,
            axis,
            self.affine.weight.as_ref(),
            self.affine.bias.as_ref(),
            self.config.eps,
        )?;
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
        let grads = layer_norm_backward(
            x,
            dy,
            axis,
            self.affine.weight.as_ref(),
            self.affine.bias.is_some(),
            self.config.eps,
            &out.saved,
        )?;
        Ok(self.affine.mask(grads))
    }
}

impl<T: Float> Parameters<T> for LayerNorm<T> {
    fn affine(&self) -> &Affine<T> {
        &self.affine
    }

    fn affine_mut(&mut self) -> &mut Affine<T> {
        &mut self.affine
    }
}

impl<T: Float> StateDict<T> for LayerNorm<T> {
    fn state_dict(&self) -> Vec<(String, StateTensor<T>)> {
        self.affine.state_dict()
    }

    fn load_state_dict(&mut self, view: &StateView<'_>) -> Result<()> {
        self.affine.load_state_dict(view)
    }
}

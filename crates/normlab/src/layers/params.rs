//! The learnable γ and β of every layer but LocalResponseNorm, their
//! accessors and their part of the state dict.

use crate::kernels::Grads;
use crate::state::{StateDict, StateTensor, StateView};
use crate::{Float, Result, Tensor};

/// Optional learnable scale γ (`weight`) and shift β (`bias`).
#[derive(Clone, Debug, PartialEq)]
pub struct Affine<T> {
    /// γ, initialized to 1.
    pub weight: Option<Tensor<T>>,
    /// β, initialized to 0.
    pub bias: Option<Tensor<T>>,
    /// Whether backward returns their gradients (PyTorch's `requires_grad`).
    pub trainable: bool,
}

impl<T: Float> Affine<T> {
    /// γ = 1 and β = 0 of `shape`, each when asked for.
    ///
    /// # Errors
    /// A shape whose element count overflows, or memory that cannot be had.
    pub fn new(shape: &[usize], weight: bool, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: weight.then(|| Tensor::full(shape, 1.0)).transpose()?,
            bias: bias.then(|| Tensor::full(shape, 0.0)).transpose()?,
            trainable: true,
        })
    }

    /// Drops the parameter gradients when frozen.
    pub(crate) fn mask(&self, mut grads: Grads<T>) -> Grads<T> {
        if !self.trainable {
            grads.dweight = None;
            grads.dbias = None;
        }
        grads
    }

    /// Reads (without storing) the parameters this layer has: the staged
    /// replacement for `self`.
    pub(crate) fn read(&self, view: &StateView<'_>) -> Result<Self> {
        let read = |p: &Option<Tensor<T>>, name| {
            p.as_ref().map(|p| view.float(name, p.shape())).transpose()
        };
        Ok(Self {
            weight: read(&self.weight, "weight")?,
            bias: read(&self.bias, "bias")?,
            trainable: self.trainable,
        })
    }
}

/// `weight` and `bias`, each when present.
impl<T: Float> StateDict<T> for Affine<T> {
    fn state_dict(&self) -> Vec<(String, StateTensor<T>)> {
        [("weight", &self.weight), ("bias", &self.bias)]
            .into_iter()
            .filter_map(|(name, p)| Some((name.into(), StateTensor::Float(p.as_ref()?.clone()))))
            .collect()
    }

    /// Both or neither: a bad `bias` leaves `weight` as it was.
    fn load_state_dict(&mut self, view: &StateView<'_>) -> Result<()> {
        *self = self.read(view)?;
        Ok(())
    }
}

/// A layer with learnable γ (`weight`) and β (`bias`): every layer but
/// [`super::LocalResponseNorm`].
///
/// The accessors are written once here on top of [`Self::affine`] and
/// [`Self::affine_mut`].
pub trait Parameters<T: Float> {
    /// γ, β and whether they are trained.
    fn affine(&self) -> &Affine<T>;

    /// γ, β and whether they are trained, mutable.
    fn affine_mut(&mut self) -> &mut Affine<T>;

    /// γ (`weight`), when present.
    fn weight(&self) -> Option<&Tensor<T>> {
        self.affine().weight.as_ref()
    }

    /// γ, mutable (for an optimizer step).
    fn weight_mut(&mut self) -> Option<&mut Tensor<T>> {
        self.affine_mut().weight.as_mut()
    }

    /// β (`bias`), when present.
    fn bias(&self) -> Option<&Tensor<T>> {
        self.affine().bias.as_ref()
    }

    /// β, mutable.
    fn bias_mut(&mut self) -> Option<&mut Tensor<T>> {
        self.affine_mut().bias.as_mut()
    }

    /// Freezes (`false`) or unfreezes γ and β: frozen, backward returns no
    /// gradient for them.
    fn set_affine_trainable(&mut self, trainable: bool) {
        self.affine_mut().trainable = trainable;
    }
}

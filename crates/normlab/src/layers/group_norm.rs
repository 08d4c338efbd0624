//! `GroupNorm`: PyTorch's `nn.GroupNorm(num_groups, num_channels, eps, affine)`.

use super::{check_channels, Affine, EpsConfig, Output, Parameters};
use crate::kernels::group_norm::{group_norm, group_norm_backward, GroupLayout};
use crate::kernels::{Grads, NcsLayout};
use crate::state::{StateDict, StateTensor, StateView};
use crate::{Epsilon, Float, Result, Tensor};

const OP: &str = "group_norm";

/// Configuration of a [`GroupNorm`]; defaults as PyTorch's.
///
/// ```text
/// y = γ_c·(x - μ_ng)/√(σ²_ng + ε) + β_c     statistics per sample and group of C/G channels
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct GroupNormConfig {
    /// Groups G (divides C).
    pub num_groups: usize,
    /// Channels C.
    pub num_channels: usize,
    /// ε = 1e-5 inside the square root.
    pub eps: Epsilon,
    /// Learnable per-channel γ, β (true).
    pub affine: bool,
}

impl GroupNormConfig {
    /// PyTorch's defaults.
    pub fn new(num_groups: usize, num_channels: usize) -> Self {
        Self {
            num_groups,
            num_channels,
            eps: Epsilon::default(),
            affine: true,
        }
    }

    /// Turns γ, β on or off.
    pub fn with_affine(mut self, affine: bool) -> Self {
        self.affine = affine;
        self
    }

    /// Builds the layer: γ = 1, β = 0.
    ///
    /// # Errors
    /// Invalid ε; `num_groups` 0 or not dividing `num_channels`.
    pub fn init<T: Float>(&self) -> Result<GroupNorm<T>> {
        self.eps.validate(OP)?;
        let ncs = NcsLayout {
            n: 1,
            c: self.num_channels,
            spatial: 1,
        };
        GroupLayout::new(OP, ncs, self.num_groups, &[1, self.num_channels])?;
        Ok(GroupNorm {
            config: self.clone(),
            affine: Affine::new(&[self.num_channels], self.affine, self.affine)?,
        })
    }
}

impl EpsConfig for GroupNormConfig {
    fn eps_mut(&mut self) -> &mut Epsilon {
        &mut self.eps
    }
}

/// Group normalization.
///
/// # Shapes
/// `x`, `y`: `[N, C, *]`; `weight`, `bias`: `[C]`.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupNorm<T> {
    config: GroupNormConfig,
    affine: Affine<T>,
}

impl<T: Float> GroupNorm<T> {
    /// The configuration it was built with.
    pub fn config(&self) -> &GroupNormConfig {
        &self.config
    }

    /// Normalizes `x`.
    ///
    /// # Errors
    /// `x` not `[N, C, *]`.
    pub fn forward(&self, x: &Tensor<T>) -> Result<Output<T>> {
        check_channels(OP, x.shape(), self.config.num_channels, 2)?;
        let (y, saved) = group_norm(
            x,
            self.config.num_groups,
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
        let grads = group_norm_backward(
            x,
            dy,
            self.config.num_groups,
            self.affine.weight.as_ref(),
            self.affine.bias.is_some(),
            self.config.eps,
            &out.saved,
        )?;
        Ok(self.affine.mask(grads))
    }
}

impl<T: Float> Parameters<T> for GroupNorm<T> {
    fn affine(&self) -> &Affine<T> {
        &self.affine
    }

    fn affine_mut(&mut self) -> &mut Affine<T> {
        &mut self.affine
    }
}

impl<T: Float> StateDict<T> for GroupNorm<T> {
    fn state_dict(&self) -> Vec<(String, StateTensor<T>)> {
        self.affine.state_dict()
    }

    fn load_state_dict(&mut self, view: &StateView<'_>) -> Result<()> {
        self.affine.load_state_dict(view)
    }
}

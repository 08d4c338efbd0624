//! `LocalResponseNorm`: PyTorch's `nn.LocalResponseNorm(size, alpha, beta, k)`,
//! plus AlexNet's unscaled α, ONNX's even window and Caffe's within-channel mode.

use crate::kernels::lrn::{lrn, lrn_backward, EvenWindow, LrnOptions, LrnRegion};
use crate::kernels::Grads;
use crate::state::{StateDict, StateTensor, StateView};
use crate::{Float, Result, Tensor};

/// Configuration of a [`LocalResponseNorm`]; defaults as PyTorch's.
///
/// ```text
/// y_i = x_i / (k + a·Σ_{j ∈ window(i)} x_j²)^β,   a = α/size (or α)
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalResponseNormConfig {
    /// The hyper-parameters.
    pub options: LrnOptions,
}

impl LocalResponseNormConfig {
    /// PyTorch's defaults: α = 1e-4, β = 0.75, k = 1, across channels.
    pub fn new(size: usize) -> Self {
        Self {
            options: LrnOptions::new(size),
        }
    }

    /// Sets α.
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.options.alpha = alpha;
        self
    }

    /// Sets β.
    pub fn with_beta(mut self, beta: f64) -> Self {
        self.options.beta = beta;
        self
    }

    /// Sets k.
    pub fn with_k(mut self, k: f64) -> Self {
        self.options.k = k;
        self
    }

    /// `a = α/size` (true) or plain `α` (false, AlexNet's paper).
    pub fn with_alpha_over_size(mut self, on: bool) -> Self {
        self.options.alpha_over_size = on;
        self
    }

    /// Across or within channels.
    pub fn with_region(mut self, region: LrnRegion) -> Self {
        self.options.region = region;
        self
    }

    /// Even-size window convention.
    pub fn with_even_window(mut self, even: EvenWindow) -> Self {
        self.options.even_window = even;
        self
    }

    /// Builds the layer.
    ///
    /// # Errors
    /// Size 0 or non-finite α, β, k.
    pub fn init(&self) -> Result<LocalResponseNorm> {
        // Validate once now, on an empty input of the smallest valid rank.
        lrn::<f64>(&Tensor::zeros(&[0, 0, 0])?, &self.options)?;
        Ok(LocalResponseNorm { config: *self })
    }
}

/// Local response normalization (no parameters).
///
/// # Shapes
/// `x`, `y`: `[N, C, *]`, rank ≥ 3.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalResponseNorm {
    config: LocalResponseNormConfig,
}

impl LocalResponseNorm {
    /// The configuration it was built with.
    pub fn config(&self) -> &LocalResponseNormConfig {
        &self.config
    }

    /// Normalizes `x`.
    ///
    /// # Errors
    /// Rank < 3.
    pub fn forward<T: Float>(&self, x: &Tensor<T>) -> Result<Tensor<T>> {
        lrn(x, &self.config.options)
    }

    /// Gradient with respect to `x` (`dweight`, `dbias` are `None`).
    ///
    /// # Errors
    /// Rank < 3; `dy` not shaped as `x`.
    pub fn backward<T: Float>(&self, x: &Tensor<T>, dy: &Tensor<T>) -> Result<Grads<T>> {
        Ok(Grads {
            dx: lrn_backward(x, dy, &self.config.options)?,
            dweight: None,
            dbias: None,
        })
    }
}

impl<T: Float> StateDict<T> for LocalResponseNorm {
    /// LRN has no parameters or buffers.
    fn state_dict(&self) -> Vec<(String, StateTensor<T>)> {
        Vec::new()
    }

    fn load_state_dict(&mut self, _view: &StateView<'_>) -> Result<()> {
        Ok(())
    }
}

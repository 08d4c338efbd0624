//! `SyncBatchNorm`: BatchNorm with statistics over the global batch of a
//! data-parallel job (PyTorch's `SyncBatchNorm`, on any [`Communicator`]).

use std::sync::Arc;

use super::{
    check_channels, Affine, BatchNorm, BatchNormConfig, ChannelNorm, ChannelState, Output,
    Parameters,
};
use crate::comm::Communicator;
use crate::kernels::sync_batch_norm::{sync_batch_norm, sync_batch_norm_backward};
use crate::kernels::Grads;
use crate::state::{StateDict, StateTensor, StateView};
use crate::{Float, Result, Tensor};

const OP: &str = "sync_batch_norm";

/// Batch normalization whose batch statistics are those of the global batch:
/// every rank holds one shard (of any size, possibly empty), and in
/// [`crate::Mode::Train`] the per-channel moments are combined across ranks
/// before normalizing; backward all-reduces the two channel sums it needs.
/// Running statistics are updated from the global statistics, so they are
/// equal on every rank. In [`crate::Mode::Eval`] it is a BatchNorm and
/// communicates nothing.
///
/// It is a [`BatchNorm`] with another `forward` and `backward`: parameters
/// ([`Parameters`]), running statistics and mode ([`ChannelNorm`]) and state
/// dict are the BatchNorm's. Every rank must call `forward` and `backward`
/// in the same order.
///
/// ```
/// use std::sync::Arc;
/// use normlab::layers::{BatchNormConfig, SyncBatchNorm};
/// use normlab::{SingleProcess, Tensor};
/// // On one rank it is exactly BatchNorm.
/// let mut sync: SyncBatchNorm<f32> = BatchNormConfig::new(1).init_sync(Arc::new(SingleProcess)).unwrap();
/// let x = Tensor::new(vec![2, 1], vec![1.0f32, 3.0]).unwrap();
/// let y = sync.forward(&x).unwrap().y;
/// assert!((y.data()[0] + 1.0).abs() < 1e-4);
/// ```
#[derive(Clone, Debug)]
pub struct SyncBatchNorm<T> {
    bn: BatchNorm<T>,
    comm: Arc<dyn Communicator>,
}

impl BatchNormConfig {
    /// Builds a [`SyncBatchNorm`] over `comm` (γ = 1, β = 0, running mean 0
    /// and variance 1, mode Train).
    ///
    /// # Errors
    /// Invalid ε or momentum.
    pub fn init_sync<T: Float>(&self, comm: Arc<dyn Communicator>) -> Result<SyncBatchNorm<T>> {
        Ok(SyncBatchNorm::from_batch_norm(self.init()?, comm))
    }
}

impl<T: Float> SyncBatchNorm<T> {
    /// Converts a BatchNorm, keeping its parameters, running statistics,
    /// mode and overrides (PyTorch's `convert_sync_batchnorm` for one layer).
    pub fn from_batch_norm(bn: BatchNorm<T>, comm: Arc<dyn Communicator>) -> Self {
        SyncBatchNorm { bn, comm }
    }

    /// Back to a plain BatchNorm (per-rank statistics).
    pub fn into_batch_norm(self) -> BatchNorm<T> {
        self.bn
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &BatchNormConfig {
        &self.bn.config
    }

    /// The communicator of its job.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// Normalizes this rank's shard `x` (`[N_r, C, *]`).
    ///
    /// # Errors
    /// `x` not `[N, C, *]`; one value per channel over all ranks; non-finite
    /// global statistics (running statistics are left unchanged on every
    /// rank); communication errors.
    pub fn forward(&mut self, x: &Tensor<T>) -> Result<Output<T>> {
        let (config, comm) = (&self.bn.config, self.comm.as_ref());
        check_channels(OP, x.shape(), config.num_features, 2)?;
        self.bn.state.forward(
            config.eps,
            &config.running,
            |running, weight, bias, options| {
                sync_batch_norm(x, running, weight, bias, options, comm)
            },
        )
    }

    /// Gradients for this rank's `x` and `out`: `dx` through the global
    /// statistics, `dweight`/`dbias` of this shard (sum them over ranks, as
    /// data-parallel training does, for the global batch's).
    ///
    /// # Errors
    /// Shapes that disagree with the forward call's; communication errors.
    pub fn backward(&self, x: &Tensor<T>, out: &Output<T>, dy: &Tensor<T>) -> Result<Grads<T>> {
        let affine = &self.bn.state.affine;
        let grads = sync_batch_norm_backward(
            x,
            dy,
            affine.weight.as_ref(),
            affine.bias.is_some(),
            self.bn.config.eps,
            &out.saved,
            out.input_stats,
            self.comm.as_ref(),
        )?;
        Ok(affine.mask(grads))
    }
}

impl<T: Float> Parameters<T> for SyncBatchNorm<T> {
    fn affine(&self) -> &Affine<T> {
        self.bn.affine()
    }

    fn affine_mut(&mut self) -> &mut Affine<T> {
        self.bn.affine_mut()
    }
}

impl<T: Float> ChannelNorm<T> for SyncBatchNorm<T> {
    fn channel_state(&self) -> &ChannelState<T> {
        self.bn.channel_state()
    }

    fn channel_state_mut(&mut self) -> &mut ChannelState<T> {
        self.bn.channel_state_mut()
    }
}

impl<T: Float> StateDict<T> for SyncBatchNorm<T> {
    fn state_dict(&self) -> Vec<(String, StateTensor<T>)> {
        self.bn.state_dict()
    }

    fn load_state_dict(&mut self, view: &StateView<'_>) -> Result<()> {
        self.bn.load_state_dict(view)
    }
}

//! `SyncBatchNorm`: BatchNorm with statistics over the global batch of a
//! data-parallel job (PyTorch's `SyncBatchNorm`, on any [`Communicator`]).

use std::sync::Arc;

use super::{
    check_channels, impl_affine_access, impl_running_access, impl_state_dict, Affine, Mode, Output,
    RunningStats,
};
use crate::comm::Communicator;
use crate::kernels::batch_norm::BatchNormOptions;
use crate::kernels::sync_batch_norm::{sync_batch_norm, sync_batch_norm_backward};
use crate::kernels::Grads;
use crate::layers::{BatchNorm, BatchNormConfig};
use crate::state::{StateDict, StateTensor, StateView};
use crate::{Float, Result, Tensor};

const OP: &str = "sync_batch_norm";

/// Batch normalization whose batch statistics are those of the global batch:
/// every rank holds one shard (of any size, possibly empty), and in
/// [`Mode::Train`] the per-channel moments are combined across ranks before
/// normalizing; backward all-reduces the two channel sums it needs. Running
/// statistics are updated from the global statistics, so they are equal on
/// every rank. In [`Mode::Eval`] it is a BatchNorm and communicates nothing.
///
/// Every rank must call `forward` and `backward` in the same order.
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
    config: BatchNormConfig,
    affine: Affine<T>,
    running: Option<RunningStats<T>>,
    mode: Mode,
    use_batch_stats: Option<bool>,
    update_running_stats: Option<bool>,
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
        SyncBatchNorm {
            config: bn.config,
            affine: bn.affine,
            running: bn.running,
            mode: bn.mode,
            use_batch_stats: bn.use_batch_stats,
            update_running_stats: bn.update_running_stats,
            comm,
        }
    }

    /// Back to a plain BatchNorm (per-rank statistics).
    pub fn into_batch_norm(self) -> BatchNorm<T> {
        BatchNorm {
            config: self.config,
            affine: self.affine,
            running: self.running,
            mode: self.mode,
            use_batch_stats: self.use_batch_stats,
            update_running_stats: self.update_running_stats,
        }
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// The communicator of its job.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// Whether this forward normalizes with batch statistics.
    pub fn uses_batch_stats(&self) -> bool {
        self.use_batch_stats
            .unwrap_or(self.mode == Mode::Train || self.running.is_none())
    }

    /// Whether this forward updates the running statistics.
    pub fn updates_running_stats(&self) -> bool {
        self.running.is_some()
            && self
                .update_running_stats
                .unwrap_or(self.mode == Mode::Train)
    }

    /// Normalizes this rank's shard `x` (`[N_r, C, *]`).
    ///
    /// # Errors
    /// `x` not `[N, C, *]`; one value per channel over all ranks; non-finite
    /// global statistics (running statistics are left unchanged on every
    /// rank); communication errors.
    pub fn forward(&mut self, x: &Tensor<T>) -> Result<Output<T>> {
        check_channels(OP, x.shape(), self.config.num_features, 2)?;
        let options = BatchNormOptions {
            use_batch_stats: self.uses_batch_stats(),
            update_running_stats: self.updates_running_stats(),
            eps: self.config.eps,
            momentum: self.config.momentum,
            running_var: self.config.running_var,
        };
        let running = self.running.as_mut().map(RunningStats::as_mut);
        let (y, saved) = sync_batch_norm(
            x,
            running,
            self.affine.weight.as_ref(),
            self.affine.bias.as_ref(),
            &options,
            self.comm.as_ref(),
        )?;
        Ok(Output {
            y,
            saved,
            input_stats: options.use_batch_stats,
        })
    }

    /// Gradients for this rank's `x` and `out`: `dx` through the global
    /// statistics, `dweight`/`dbias` of this shard (sum them over ranks, as
    /// data-parallel training does, for the global batch's).
    ///
    /// # Errors
    /// Shapes that disagree with the forward call's; communication errors.
    pub fn backward(&self, x: &Tensor<T>, out: &Output<T>, dy: &Tensor<T>) -> Result<Grads<T>> {
        let grads = sync_batch_norm_backward(
            x,
            dy,
            self.affine.weight.as_ref(),
            self.affine.bias.is_some(),
            self.config.eps,
            &out.saved,
            out.input_stats,
            self.comm.as_ref(),
        )?;
        Ok(self.affine.mask(grads))
    }
}

impl_state_dict!(SyncBatchNorm, running: true);
impl_affine_access!(SyncBatchNorm);
impl_running_access!(SyncBatchNorm);

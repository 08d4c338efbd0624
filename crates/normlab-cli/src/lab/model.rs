//! Networks for the lab, on candle with normlab-candle's layers: MLPs and
//! small CNNs of configurable depth and width, normalization kind and
//! placement, activation and initialization.
//!
//! Placement `a`: linear → norm → activation; placement `b`: linear →
//! activation → norm. Every block records, when asked, the mean and
//! standard deviation of its output and the fraction of dead ReLUs.

use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use candle_core::{Module, ModuleT, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use normlab_candle::{Communicator, SingleProcess};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Network family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Fully connected layers on the flattened image.
    Mlp,
    /// 3×3 convolutions (2×2 max-pools after the first two blocks), a linear
    /// head on the flattened last feature map.
    Cnn,
}

/// Normalization inserted in every block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// None.
    None,
    /// BatchNorm (per channel over the batch).
    Batch,
    /// SyncBatchNorm: BatchNorm over the global batch of a data-parallel
    /// job (on one process, the same as `Batch`).
    SyncBatch,
    /// LayerNorm (per sample; in a CNN over C×H×W, i.e. GroupNorm with one group).
    Layer,
    /// GroupNorm with this many groups.
    Group(usize),
    /// InstanceNorm (CNN only).
    Instance,
    /// RMSNorm (per sample over features; in a CNN over channels at each pixel).
    Rms,
    /// Local response normalization across channels (size 5).
    Lrn,
}

impl FromStr for NormKind {
    type Err = anyhow::Error;

    /// `none`, `batch`, `sync-batch`, `layer`, `group` (8 groups), `groupG`,
    /// `instance`, `rms`, `lrn`.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => NormKind::None,
            "batch" => NormKind::Batch,
            "sync-batch" => NormKind::SyncBatch,
            "layer" => NormKind::Layer,
            "group" => NormKind::Group(8),
            "instance" => NormKind::Instance,
            "rms" => NormKind::Rms,
            "lrn" => NormKind::Lrn,
            g if g.starts_with("group") => match g[5..].parse::<usize>() {
                Ok(n) if n > 0 => NormKind::Group(n),
                _ => bail!("`{s}`: group normalization is `group` or `groupG` with G ≥ 1 groups"),
            },
            other => bail!("unknown normalization `{other}` (none, batch, sync-batch, layer, group, groupG, instance, rms, lrn)"),
        })
    }
}

/// Where the normalization sits relative to the activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// linear → norm → activation (the usual choice).
    A,
    /// linear → activation → norm.
    B,
}

/// Non-linearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// max(0, x).
    Relu,
    /// tanh.
    Tanh,
}

/// Weight initialization of linear and convolution layers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InitScheme {
    /// N(0, 2/fan_in) (He et al.).
    Kaiming,
    /// N(0, 2/(fan_in + fan_out)) (Glorot and Bengio).
    Xavier,
    /// N(0, σ²) with the given σ.
    Normal(f64),
}

impl InitScheme {
    fn stdev(&self, fan_in: usize, fan_out: usize) -> f64 {
        match *self {
            InitScheme::Kaiming => (2.0 / fan_in as f64).sqrt(),
            InitScheme::Xavier => (2.0 / (fan_in + fan_out) as f64).sqrt(),
            InitScheme::Normal(s) => s,
        }
    }
}

/// Everything that defines a network.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// MLP or CNN.
    pub arch: Arch,
    /// Hidden blocks.
    pub depth: usize,
    /// Hidden features (MLP) or channels (CNN).
    pub width: usize,
    /// Normalization in each block.
    pub norm: NormKind,
    /// Its placement.
    pub placement: Placement,
    /// Learnable γ, β in the normalization.
    pub affine: bool,
    /// Non-linearity.
    pub activation: Activation,
    /// Weight initialization.
    pub init: InitScheme,
    /// How BatchNorm/InstanceNorm update their running statistics.
    pub momentum: normlab::Momentum,
}

impl Default for ModelConfig {
    /// An 8-block MLP of width 64 with BatchNorm before ReLU (placement A),
    /// affine, Kaiming initialization, momentum 0.1.
    fn default() -> Self {
        ModelConfig {
            arch: Arch::Mlp,
            depth: 8,
            width: 64,
            norm: NormKind::Batch,
            placement: Placement::A,
            affine: true,
            activation: Activation::Relu,
            init: InitScheme::Kaiming,
            momentum: normlab::Momentum::default(),
        }
    }
}

impl ModelConfig {
    fn validate(&self) -> Result<()> {
        if self.depth == 0 || self.width == 0 {
            bail!(
                "depth and width must be at least 1 (got depth {}, width {})",
                self.depth,
                self.width
            );
        }
        if let NormKind::Group(g) = self.norm {
            if !self.width.is_multiple_of(g) {
                bail!(
                    "group normalization: width {} is not divisible by {g} groups",
                    self.width
                );
            }
        }
        if self.arch == Arch::Mlp && self.norm == NormKind::Instance {
            bail!("instance normalization needs spatial positions: use --model cnn");
        }
        Ok(())
    }
}

/// A normalization layer of either kind of module.
enum Norm {
    Plain(Box<dyn Module>),
    /// GroupNorm (also LayerNorm over a CNN's channels and maps, as one group).
    Group(normlab_candle::GroupNorm),
    /// LayerNorm over an MLP's features.
    Layer(normlab_candle::LayerNorm),
    /// BatchNorm with per-process statistics.
    Batch(normlab_candle::BatchNorm),
    /// BatchNorm with statistics over every rank.
    SyncBatch(normlab_candle::SyncBatchNorm),
    Stateful(Box<dyn ModuleT>),
    /// RMSNorm over channels at each pixel of `[N, C, H, W]` (one op, no
    /// transposes: [`normlab_candle::RmsNorm::forward_channels`]).
    RmsChannels(normlab_candle::RmsNorm),
    /// LRN, which needs a spatial axis: `[N, C]` is seen as `[N, C, 1]`.
    Lrn(normlab_candle::LocalResponseNorm),
}

impl Norm {
    fn build(
        config: &ModelConfig,
        channels: usize,
        vb: VarBuilder,
        comm: &Arc<dyn Communicator>,
    ) -> Result<Option<Norm>> {
        let bn_config = normlab_candle::BatchNormConfig {
            affine: config.affine,
            momentum: config.momentum,
            ..1e-5.into()
        };
        let spatial = config.arch == Arch::Cnn;
        Ok(Some(match config.norm {
            NormKind::None => return Ok(None),
            NormKind::Batch => Norm::Batch(normlab_candle::batch_norm(channels, bn_config, vb)?),
            NormKind::SyncBatch => Norm::SyncBatch(normlab_candle::sync_batch_norm(
                channels,
                bn_config,
                comm.clone(),
                vb,
            )?),
            NormKind::Instance => Norm::Stateful(Box::new(normlab_candle::instance_norm(
                channels, bn_config, vb,
            )?)),
            NormKind::Layer if spatial => {
                Norm::Group(normlab_candle::group_norm(1, channels, 1e-5, vb)?)
            }
            NormKind::Layer => {
                let ln = normlab_candle::LayerNormConfig {
                    affine: config.affine,
                    ..1e-5.into()
                };
                Norm::Layer(normlab_candle::layer_norm(channels, ln, vb)?)
            }
            NormKind::Group(g) => Norm::Group(normlab_candle::group_norm(g, channels, 1e-5, vb)?),
            NormKind::Rms if spatial => {
                Norm::RmsChannels(normlab_candle::rms_norm(channels, 1e-6, vb)?)
            }
            NormKind::Rms => Norm::Plain(Box::new(normlab_candle::rms_norm(channels, 1e-6, vb)?)),
            NormKind::Lrn => Norm::Lrn(normlab_candle::local_response_norm(5)),
        }))
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Norm::Plain(m) => m.forward(x),
            Norm::Group(m) => m.forward(x),
            Norm::Layer(m) => m.forward(x),
            Norm::Lrn(m) if x.rank() == 2 => m.forward(&x.unsqueeze(2)?)?.squeeze(2),
            Norm::Lrn(m) => m.forward(x),
            Norm::Stateful(m) => m.forward_t(x, train),
            Norm::Batch(m) => m.forward_t(x, train),
            Norm::SyncBatch(m) => m.forward_t(x, train),
            Norm::RmsChannels(m) => m.forward_channels(x),
        }
    }

    /// The normalization followed by `act` as one fused op (one pass
    /// forward, one backward, no tensor between them) where the layer has
    /// one (BatchNorm, GroupNorm, LayerNorm); `None` otherwise.
    fn forward_act(
        &self,
        x: &Tensor,
        train: bool,
        act: Activation,
    ) -> candle_core::Result<Option<Tensor>> {
        let act = match act {
            Activation::Relu => normlab::Activation::Relu,
            Activation::Tanh => normlab::Activation::Tanh,
        };
        Ok(Some(match self {
            Norm::Batch(m) => m.forward_act(x, train, act)?,
            Norm::Group(m) => m.forward_act(x, act)?,
            Norm::Layer(m) => m.forward_act(x, act)?,
            _ => return Ok(None),
        }))
    }
}

/// Statistics of one block's output, for instrumentation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BlockStats {
    /// Mean of the block's output.
    pub mean: f64,
    /// Standard deviation of the block's output.
    pub std: f64,
    /// Fraction of the block's ReLU outputs that are exactly 0 (0 for tanh);
    /// under placement B these are the values entering the normalization.
    pub dead_fraction: f64,
}

struct Block {
    linear: Option<crate::lab::linear::Linear>,
    conv: Option<crate::lab::conv::Conv2d>,
    norm: Option<Norm>,
    pool: bool,
}

/// A network of `depth` blocks and a linear classifier head.
pub struct Model {
    config: ModelConfig,
    blocks: Vec<Block>,
    head: crate::lab::linear::Linear,
}

/// A weight of `shape` drawn from N(0, stdev²) with the model's seeded
/// generator (candle's CPU generator cannot be seeded), set into the
/// `VarMap`'s variable so that it is trained and saved.
fn weight(vb: &VarBuilder, shape: &[usize], stdev: f64, rng: &mut StdRng) -> Result<Tensor> {
    let w = vb.get_with_hints(shape, "weight", Init::Const(0.0))?;
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| (stdev * rng.sample::<f64, _>(StandardNormal)) as f32)
        .collect();
    Var::from_tensor(&w)?.set(&Tensor::from_vec(values, shape, w.device())?)?;
    Ok(w)
}

fn linear(
    fan_in: usize,
    fan_out: usize,
    init: InitScheme,
    vb: VarBuilder,
    rng: &mut StdRng,
) -> Result<crate::lab::linear::Linear> {
    let w = weight(&vb, &[fan_out, fan_in], init.stdev(fan_in, fan_out), rng)?;
    let b = vb.get_with_hints(fan_out, "bias", Init::Const(0.0))?;
    Ok(crate::lab::linear::Linear::new(w, Some(b)))
}

impl Model {
    /// Builds the network for images of `channels × height × width` and `classes` classes.
    ///
    /// # Errors
    /// Invalid configurations (zero depth, groups not dividing the width, …).
    pub fn new(
        config: &ModelConfig,
        dims: (usize, usize, usize),
        classes: usize,
        vb: VarBuilder,
        seed: u64,
    ) -> Result<Model> {
        Model::new_on(config, dims, classes, vb, seed, Arc::new(SingleProcess))
    }

    /// [`Model::new`] for one rank of a data-parallel job: `sync-batch`
    /// layers synchronize over `comm`.
    ///
    /// # Errors
    /// As [`Model::new`].
    pub fn new_on(
        config: &ModelConfig,
        (channels, height, width): (usize, usize, usize),
        classes: usize,
        vb: VarBuilder,
        seed: u64,
        comm: Arc<dyn Communicator>,
    ) -> Result<Model> {
        config.validate()?;
        ensure!(
            channels > 0 && height > 0 && width > 0 && classes > 0,
            "cannot build a network for {channels}×{height}×{width} images and {classes} classes: \
             every size must be at least 1"
        );
        if config.arch == Arch::Cnn {
            // Each of the first two blocks halves the resolution (rounding down).
            let pools = config.depth.min(2);
            ensure!(
                height >> pools > 0 && width >> pools > 0,
                "a CNN of depth {} halves the resolution {pools} times: {height}×{width} images \
                 are too small (at least {}×{} pixels are needed)",
                config.depth,
                1 << pools,
                1 << pools
            );
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut blocks = Vec::new();
        let mut features = channels * height * width;
        let mut in_channels = channels;
        for i in 0..config.depth {
            let vb = vb.pp(format!("blocks.{i}"));
            let block = match config.arch {
                Arch::Mlp => {
                    let l = linear(
                        features,
                        config.width,
                        config.init,
                        vb.pp("linear"),
                        &mut rng,
                    )?;
                    features = config.width;
                    Block {
                        linear: Some(l),
                        conv: None,
                        norm: Norm::build(config, config.width, vb.pp("norm"), &comm)?,
                        pool: false,
                    }
                }
                Arch::Cnn => {
                    let fan_in = in_channels * 9;
                    let stdev = config.init.stdev(fan_in, config.width * 9);
                    let w = weight(
                        &vb.pp("conv"),
                        &[config.width, in_channels, 3, 3],
                        stdev,
                        &mut rng,
                    )?;
                    let b = vb
                        .pp("conv")
                        .get_with_hints(config.width, "bias", Init::Const(0.0))?;
                    let conv = crate::lab::conv::Conv2d::new(
                        w,
                        Some(b),
                        crate::lab::conv::Conv2dConfig {
                            padding: 1,
                            stride: 1,
                        },
                    );
                    in_channels = config.width;
                    // Halve the resolution after the first two blocks (28 → 14 → 7).
                    Block {
                        linear: None,
                        conv: Some(conv),
                        norm: Norm::build(config, config.width, vb.pp("norm"), &comm)?,
                        pool: i < 2,
                    }
                }
            };
            blocks.push(block);
        }
        let head_in = match config.arch {
            Arch::Mlp => features,
            // Each of the first two blocks halves the resolution.
            Arch::Cnn => {
                let pools = config.depth.min(2) as u32;
                config.width * (height >> pools) * (width >> pools)
            }
        };
        let head = linear(
            head_in,
            classes,
            InitScheme::Xavier,
            vb.pp("head"),
            &mut rng,
        )?;
        Ok(Model {
            config: config.clone(),
            blocks,
            head,
        })
    }

    /// Logits for `x` (`[N, C, H, W]`), with each block's statistics when `record`.
    ///
    /// # Errors
    /// candle errors.
    pub fn forward_recorded(
        &self,
        x: &Tensor,
        train: bool,
        record: bool,
    ) -> Result<(Tensor, Vec<BlockStats>)> {
        let mut h = self.prepare_input(x)?;
        let mut stats = Vec::new();
        for i in 0..self.blocks.len() {
            let (out, block_stats) = self.block_forward(i, &h, train, record)?;
            h = out;
            stats.extend(block_stats);
        }
        Ok((self.head_forward(&h)?, stats))
    }

    /// The classifier on the last block's output (flattened in a CNN: a
    /// global average pool would discard what per-sample normalizations
    /// leave, since they fix each channel's spatial mean).
    ///
    /// # Errors
    /// candle errors.
    pub fn head_forward(&self, h: &Tensor) -> Result<Tensor> {
        let h = match self.config.arch {
            Arch::Cnn => h.flatten_from(1)?,
            Arch::Mlp => h.clone(),
        };
        Ok(self.head.forward(&h)?)
    }

    /// Logits, the statistics of every block, and the gradient of `loss_fn`
    /// of the logits with respect to each block's output (its L2 norm over
    /// the batch): the backward signal ‖∂loss/∂h_l‖ at every depth.
    ///
    /// candle keeps gradients only for variables, so a zero variable is
    /// added to each block's output; its gradient is the output's.
    ///
    /// # Errors
    /// candle errors.
    pub fn backward_signal(
        &self,
        x: &Tensor,
        train: bool,
        loss_fn: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<(Vec<BlockStats>, Vec<f64>)> {
        let mut h = self.prepare_input(x)?;
        let mut stats = Vec::new();
        let mut probes = Vec::new();
        for i in 0..self.blocks.len() {
            let (out, s) = self.block_forward_unpooled(i, &h, train, true)?;
            stats.extend(s);
            let probe = Var::zeros(out.shape(), out.dtype(), out.device())?;
            let out = (out + probe.as_tensor())?;
            probes.push(probe);
            h = if self.blocks[i].pool {
                crate::lab::pool::max_pool2d(&out, 2)?
            } else {
                out
            };
        }
        let grads = loss_fn(&self.head_forward(&h)?)?.backward()?;
        let norms = probes
            .iter()
            .map(|p| match grads.get(p.as_tensor()) {
                Some(g) => Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64),
                None => Ok(0.0),
            })
            .collect::<Result<_>>()?;
        Ok((stats, norms))
    }

    /// Turns every BatchNorm layer into a SyncBatchNorm over `comm`, keeping
    /// its variables (PyTorch's `convert_sync_batchnorm` for a whole model).
    /// Returns how many layers were converted.
    pub fn convert_sync_batch_norm(&mut self, comm: &Arc<dyn Communicator>) -> usize {
        let mut converted = 0;
        for block in &mut self.blocks {
            if let Some(Norm::Batch(bn)) = &block.norm {
                let sync = normlab_candle::convert_sync_batch_norm(bn.clone(), comm.clone());
                block.norm = Some(Norm::SyncBatch(sync));
                converted += 1;
            }
        }
        if converted > 0 {
            self.config.norm = NormKind::SyncBatch;
        }
        converted
    }

    /// The configuration it was built with (after any conversion).
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Number of hidden blocks.
    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Block `i` alone: linear or convolution, normalization and activation in
    /// the configured order, then the block's pooling. With `record`, also the
    /// statistics of the block's output (before pooling).
    ///
    /// # Errors
    /// candle errors; `i` out of range.
    pub fn block_forward(
        &self,
        i: usize,
        h: &Tensor,
        train: bool,
        record: bool,
    ) -> Result<(Tensor, Option<BlockStats>)> {
        let (out, stats) = self.block_forward_unpooled(i, h, train, record)?;
        let out = if self.blocks[i].pool {
            crate::lab::pool::max_pool2d(&out, 2)?
        } else {
            out
        };
        Ok((out, stats))
    }

    fn block_forward_unpooled(
        &self,
        i: usize,
        h: &Tensor,
        train: bool,
        record: bool,
    ) -> Result<(Tensor, Option<BlockStats>)> {
        let Some(block) = self.blocks.get(i) else {
            bail!(
                "block {i} out of range: the model has {}",
                self.blocks.len()
            );
        };
        let z = self.block_linear(i, h)?;
        let activate = |t: &Tensor| -> candle_core::Result<Tensor> {
            match self.config.activation {
                Activation::Relu => crate::lab::activation::relu(t),
                Activation::Tanh => crate::lab::activation::tanh(t),
            }
        };
        // `activated` is the non-linearity's output, whose zeros are the dead
        // ReLUs; `out` is what the block passes on.
        let (activated, out) = match (&block.norm, self.config.placement) {
            (None, _) => {
                let a = activate(&z)?;
                (a.clone(), a)
            }
            (Some(n), Placement::A) => {
                let a = match n.forward_act(&z, train, self.config.activation)? {
                    Some(a) => a,
                    None => activate(&n.forward(&z, train)?)?,
                };
                (a.clone(), a)
            }
            (Some(n), Placement::B) => {
                let a = activate(&z)?;
                let out = n.forward(&a, train)?;
                (a, out)
            }
        };
        let stats = if record {
            Some(block_stats(&out, &activated, self.config.activation)?)
        } else {
            None
        };
        Ok((out, stats))
    }

    /// Block `i`'s linear layer or convolution alone: the values its
    /// normalization sees under placement A.
    ///
    /// # Errors
    /// candle errors; `i` out of range.
    pub fn block_linear(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        let Some(block) = self.blocks.get(i) else {
            bail!(
                "block {i} out of range: the model has {}",
                self.blocks.len()
            );
        };
        Ok(match (&block.linear, &block.conv) {
            (Some(l), _) => l.forward(h)?,
            (_, Some(c)) => c.forward(h)?,
            _ => unreachable!("every block has a linear or a convolution"),
        })
    }

    /// The input `[N, C, H, W]` in the shape the first block takes (flattened for an MLP).
    ///
    /// # Errors
    /// candle errors.
    pub fn prepare_input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.config.arch {
            Arch::Mlp => x.flatten_from(1)?,
            Arch::Cnn => x.clone(),
        })
    }

    /// The weight of each block's linear layer or convolution, in order.
    pub fn block_weights(&self) -> Vec<&Tensor> {
        self.blocks
            .iter()
            .filter_map(|b| match (&b.linear, &b.conv) {
                (Some(l), _) => Some(l.weight()),
                (_, Some(c)) => Some(c.weight()),
                _ => None,
            })
            .collect()
    }

    /// The L2 norm of the gradient of each block's weight, from a backward
    /// pass (0 where a block received none).
    ///
    /// # Errors
    /// candle errors.
    pub fn gradient_norms(&self, grads: &candle_core::backprop::GradStore) -> Result<Vec<f64>> {
        self.block_weights()
            .into_iter()
            .map(|w| match grads.get(w) {
                Some(g) => Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64),
                None => Ok(0.0),
            })
            .collect()
    }

    /// Logits for `x`.
    ///
    /// # Errors
    /// candle errors.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_recorded(x, train, false)?.0)
    }
}

fn block_stats(out: &Tensor, activated: &Tensor, activation: Activation) -> Result<BlockStats> {
    let v: Vec<f32> = out.flatten_all()?.to_vec1()?;
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&a| a as f64).sum::<f64>() / n;
    let var = v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / n;
    let dead = match activation {
        Activation::Relu => {
            let a: Vec<f32> = activated.flatten_all()?.to_vec1()?;
            a.iter().filter(|&&a| a == 0.0).count() as f64 / n
        }
        Activation::Tanh => 0.0,
    };
    Ok(BlockStats {
        mean,
        std: var.sqrt(),
        dead_fraction: dead,
    })
}

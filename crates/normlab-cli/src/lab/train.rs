//! One training run: a model, an optimizer, minibatches from a data set,
//! progress on the terminal, and the final metrics.
//!
//! Data-parallel: on each of `R` ranks of a [`Communicator`], every rank
//! draws the same global batch (same seed, same order) and takes its share
//! (contiguous, the first `B mod R` ranks one image more). Each rank's loss
//! is its images' summed cross-entropy divided by the global batch size, so
//! the gradients summed over ranks (one all-reduce per step) are exactly
//! the global batch's mean-loss gradients, whatever the number of ranks;
//! every rank then takes the same optimizer step.
//!
//! A run diverges when its loss, a parameter or a running statistic becomes
//! NaN or infinite (or BatchNorm refuses a batch whose statistics are not
//! finite): it stops there and [`TrainSummary::divergence`] says why.
//! [`save_model`] refuses to write a diverged model's non-finite values and
//! replaces only regular files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use normlab_candle::{Communicator, SingleProcess};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::model::{Arch, Model, ModelConfig};
use super::optim::{AdamW, MomentumSgd};
use crate::data::Dataset;

/// Optimizer choice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// SGD with heavy-ball momentum `v ← μ·v + g`, `p ← p - lr·v`.
    Sgd {
        /// μ.
        momentum: f64,
    },
    /// AdamW with candle-nn's defaults and this weight decay.
    AdamW {
        /// Decoupled weight decay.
        weight_decay: f64,
    },
}

/// Everything that defines a training run besides the model.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// Images per step.
    pub batch_size: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Seed of the initialization and of the batch order.
    pub seed: u64,
}

impl TrainConfig {
    /// SGD with momentum 0.9, the lab's default optimizer.
    pub fn sgd(lr: f64, batch_size: usize, steps: usize, seed: u64) -> TrainConfig {
        TrainConfig {
            optimizer: OptimizerKind::Sgd { momentum: 0.9 },
            lr,
            batch_size,
            steps,
            seed,
        }
    }

    /// AdamW without weight decay.
    pub fn adamw(lr: f64, batch_size: usize, steps: usize, seed: u64) -> TrainConfig {
        TrainConfig {
            optimizer: OptimizerKind::AdamW { weight_decay: 0.0 },
            lr,
            batch_size,
            steps,
            seed,
        }
    }
}

/// Most optimizer steps one run may take (`--steps`, or `--epochs` times
/// the steps per epoch).
pub const MAX_STEPS: usize = 10_000_000;

/// Largest learning rate accepted: beyond it every network diverges at
/// once, and f32 parameters overflow after a step or two.
pub const MAX_LR: f64 = 1e6;

impl TrainConfig {
    /// Checks the run's own numbers (the data-dependent batch-size bound
    /// is checked by [`Trainer::new`]).
    ///
    /// # Errors
    /// A learning rate that is not in (0, [`MAX_LR`]], more than
    /// [`MAX_STEPS`] steps, a momentum outside [0, 1) or a negative or
    /// non-finite weight decay, each named with its value.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.lr.is_finite() && self.lr > 0.0 && self.lr <= MAX_LR,
            "learning rate {} is not in (0, {MAX_LR:e}]",
            self.lr
        );
        ensure!(
            self.steps <= MAX_STEPS,
            "{} steps is more than the {MAX_STEPS} a run may take",
            self.steps
        );
        match self.optimizer {
            OptimizerKind::Sgd { momentum } => ensure!(
                (0.0..1.0).contains(&momentum),
                "SGD momentum {momentum} is not in [0, 1)"
            ),
            OptimizerKind::AdamW { weight_decay } => ensure!(
                weight_decay.is_finite() && weight_decay >= 0.0,
                "AdamW weight decay {weight_decay} is not a finite non-negative number"
            ),
        }
        Ok(())
    }
}

/// Steps of `epochs` passes over `images` training images in batches of
/// `batch_size` (each pass ⌈images / batch size⌉ steps).
///
/// # Errors
/// A zero batch size, or a product that overflows or exceeds
/// [`MAX_STEPS`], named as `--epochs` with the values.
pub fn steps_for_epochs(epochs: usize, images: usize, batch_size: usize) -> Result<usize> {
    ensure!(batch_size > 0, "--batch-size must be at least 1");
    let per_epoch = images.div_ceil(batch_size);
    match epochs.checked_mul(per_epoch) {
        Some(steps) if steps <= MAX_STEPS => Ok(steps),
        _ => bail!(
            "--epochs {epochs}: {epochs} passes of {per_epoch} steps ({images} images in batches \
             of {batch_size}) is more than the {MAX_STEPS} steps a run may take"
        ),
    }
}

/// Floats a run needs at least: the parameters and running statistics, a
/// gradient and up to two optimizer slots for each parameter, and about
/// eight values per activation (outputs, normalization statistics and their
/// gradients) for one batch, or one evaluation chunk of 500 images when
/// larger. `None` when the count overflows `u64`.
fn estimated_floats(
    model: &ModelConfig,
    (channels, height, width): (usize, usize, usize),
    classes: usize,
    batch_size: usize,
) -> Option<u64> {
    let u = |n: usize| u64::try_from(n).ok();
    let (depth, w) = (u(model.depth)?, u(model.width)?);
    let (c, h, wd, k) = (u(channels)?, u(height)?, u(width)?, u(classes)?);
    // Norm weight, bias, running mean and variance, and the linear bias.
    let per_block_vectors = w.checked_mul(5)?.checked_mul(depth)?;
    let (params, activations_per_image) = match model.arch {
        Arch::Mlp => {
            let input = c.checked_mul(h)?.checked_mul(wd)?;
            let first = input.checked_mul(w)?;
            let rest = w.checked_mul(w)?.checked_mul(depth.saturating_sub(1))?;
            let head = w.checked_mul(k)?.checked_add(k)?;
            let params = first.checked_add(rest)?.checked_add(head)?;
            (params, input.checked_add(w.checked_mul(depth)?)?)
        }
        Arch::Cnn => {
            let first = w.checked_mul(c)?.checked_mul(9)?;
            let rest = w
                .checked_mul(w)?
                .checked_mul(9)?
                .checked_mul(depth.saturating_sub(1))?;
            let pools = depth.min(2) as u32;
            let head = w
                .checked_mul(h >> pools)?
                .checked_mul(wd >> pools)?
                .checked_mul(k)?
                .checked_add(k)?;
            // Each block's output before its pooling: full resolution,
            // then half, then a quarter.
            let mut act = c.checked_mul(h)?.checked_mul(wd)?;
            for i in 0..depth.min(3) {
                let blocks = if i < 2 { 1 } else { depth - 2 };
                let pixels = (h >> i).checked_mul(wd >> i)?;
                act = act.checked_add(w.checked_mul(pixels)?.checked_mul(blocks)?)?;
            }
            (first.checked_add(rest)?.checked_add(head)?, act)
        }
    };
    let params = params.checked_add(per_block_vectors)?;
    let images = u(batch_size.max(500))?;
    params
        .checked_mul(4)?
        .checked_add(activations_per_image.checked_mul(images)?.checked_mul(8)?)
}

pub use crate::data::available_memory;

/// Refuses a model and batch too large for the memory available (skipped
/// when the system does not say how much is available).
///
/// # Errors
/// The estimate, the configuration (depth, width, batch size) and the
/// available memory, when the estimate exceeds it or overflows.
pub fn check_memory(
    model: &ModelConfig,
    dims: (usize, usize, usize),
    classes: usize,
    batch_size: usize,
) -> Result<()> {
    let what = format!(
        "{} of depth {} and width {} with batches of {batch_size}",
        match model.arch {
            Arch::Mlp => "an MLP",
            Arch::Cnn => "a CNN",
        },
        model.depth,
        model.width
    );
    let Some(floats) = estimated_floats(model, dims, classes, batch_size) else {
        bail!("{what} is too large to count its parameters and activations");
    };
    let gib = |bytes: f64| bytes / f64::from(1u32 << 30);
    let needed = floats as f64 * 4.0;
    if let Some(available) = available_memory() {
        ensure!(
            needed <= available as f64,
            "{what} needs about {:.1} GiB of memory (parameters, optimizer state and one \
             batch's activations), but only {:.1} GiB is available",
            gib(needed),
            gib(available as f64)
        );
    }
    Ok(())
}

/// What a run measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainSummary {
    /// Training loss of each step.
    pub losses: Vec<f64>,
    /// Mean training loss over the last tenth of the steps.
    pub final_loss: f64,
    /// Accuracy on the held-out set (evaluation mode).
    pub held_out_accuracy: f64,
    /// Whether the run diverged: a loss, a parameter or a running statistic
    /// became non-finite, or BatchNorm met non-finite batch statistics.
    pub diverged: bool,
    /// Why, when it diverged: the step and the first non-finite value seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub divergence: Option<String>,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// A mini-batch of images `[B, C, H, W]` and labels `[B]`.
pub fn batch(data: &Dataset, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
    let sub = data.select(indices);
    let x = Tensor::from_vec(
        sub.images,
        (indices.len(), data.channels, data.height, data.width),
        device,
    )?;
    let y = Tensor::from_vec(
        sub.labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
        indices.len(),
        device,
    )?;
    Ok((x, y))
}

/// Accuracy of `model` (evaluation mode) on `data`, in batches of 500.
pub fn accuracy(model: &Model, data: &Dataset) -> Result<f64> {
    let mut correct = 0usize;
    for chunk in (0..data.len()).collect::<Vec<_>>().chunks(500) {
        let (x, y) = batch(data, chunk, &Device::Cpu)?;
        let predicted = model.forward(&x, false)?.argmax(1)?;
        correct += predicted
            .eq(&y)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
    }
    Ok(correct as f64 / data.len().max(1) as f64)
}

/// The optimizer of a run.
enum Opt {
    Sgd(MomentumSgd),
    AdamW(AdamW),
}

/// A training run in progress: the model, its variables, the optimizer and
/// the seeded batch order. [`train`] drives it to the end; experiments that
/// look at the model between steps call [`Trainer::step`] themselves.
pub struct Trainer<'a> {
    /// The network being trained.
    pub model: Model,
    /// Its variables (parameters and running statistics), by PyTorch-style name.
    pub map: VarMap,
    train_set: &'a Dataset,
    config: TrainConfig,
    comm: Arc<dyn Communicator>,
    /// Trainable variables in name order (the order of the gradient all-reduce).
    trainable: Vec<Var>,
    opt: Opt,
    rng: rand::rngs::StdRng,
    order: Vec<usize>,
    losses: Vec<f64>,
    /// Why the run diverged, once it has.
    divergence: Option<String>,
    start: Instant,
}

impl<'a> Trainer<'a> {
    /// A fresh model and optimizer.
    ///
    /// # Errors
    /// Invalid configurations; candle errors.
    pub fn new(
        model_config: &ModelConfig,
        config: &TrainConfig,
        train_set: &'a Dataset,
    ) -> Result<Trainer<'a>> {
        Trainer::new_on(model_config, config, train_set, Arc::new(SingleProcess))
    }

    /// A fresh model and optimizer on one rank of a data-parallel job.
    ///
    /// # Errors
    /// As [`Trainer::new`].
    pub fn new_on(
        model_config: &ModelConfig,
        config: &TrainConfig,
        train_set: &'a Dataset,
        comm: Arc<dyn Communicator>,
    ) -> Result<Trainer<'a>> {
        ensure!(
            config.batch_size > 0 && config.batch_size <= train_set.len(),
            "batch size {} must be between 1 and the {} training images",
            config.batch_size,
            train_set.len()
        );
        config.validate()?;
        let dims = (train_set.channels, train_set.height, train_set.width);
        check_memory(model_config, dims, train_set.classes, config.batch_size)?;
        let start = Instant::now();
        let device = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &device);
        let model = Model::new_on(
            model_config,
            dims,
            train_set.classes,
            vb,
            config.seed,
            comm.clone(),
        )?;
        let trainable: Vec<Var> = {
            let data = map.data().lock().expect("var map lock");
            let mut named: Vec<(&String, &Var)> = data
                .iter()
                .filter(|(n, _)| n.ends_with("weight") || n.ends_with("bias"))
                .collect();
            named.sort_by(|a, b| a.0.cmp(b.0));
            named.into_iter().map(|(_, v)| v.clone()).collect()
        };
        let vars = trainable.clone();
        let opt = match config.optimizer {
            OptimizerKind::Sgd { momentum } => {
                Opt::Sgd(MomentumSgd::new(trainable, config.lr, momentum)?)
            }
            OptimizerKind::AdamW { weight_decay } => {
                Opt::AdamW(AdamW::new(trainable, config.lr, weight_decay)?)
            }
        };
        Ok(Trainer {
            model,
            map,
            train_set,
            config: config.clone(),
            comm,
            trainable: vars,
            opt,
            rng: rand::rngs::StdRng::seed_from_u64(config.seed),
            order: Vec::new(),
            losses: Vec::new(),
            divergence: None,
            start,
        })
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.losses.len()
    }

    /// Whether a step has diverged: a non-finite loss, a variable left
    /// non-finite by the update, or batch statistics BatchNorm refused as
    /// non-finite (the run stops there).
    pub fn diverged(&self) -> bool {
        self.divergence.is_some()
    }

    /// Why the run diverged, once a step has.
    pub fn divergence(&self) -> Option<&str> {
        self.divergence.as_deref()
    }

    /// One optimizer step on the next mini-batch (reshuffled every epoch);
    /// returns its loss. A non-finite loss is recorded and no update is
    /// made; so is a step whose BatchNorm met non-finite batch statistics
    /// (its loss recorded as NaN). Either marks the run as diverged, as
    /// does an update that leaves a variable non-finite.
    ///
    /// # Errors
    /// candle errors other than non-finite statistics.
    pub fn step(&mut self) -> Result<f64> {
        let step = self.losses.len() + 1;
        match self.step_inner() {
            Ok(value) => {
                if !value.is_finite() {
                    self.divergence = Some(format!("step {step}: the training loss is {value}"));
                } else if !all_finite(&self.map)? {
                    // A ReLU maps NaN to 0, so NaN weights can leave the
                    // loss finite: the variables themselves are checked.
                    let bad = non_finite_variables(&self.map)?.unwrap_or_default();
                    self.divergence = Some(format!(
                        "step {step}: the update left non-finite values in {bad}"
                    ));
                }
                Ok(value)
            }
            Err(e) if is_non_finite_statistics(&e) => {
                self.losses.push(f64::NAN);
                self.divergence = Some(format!("step {step}: {e:#}"));
                Ok(f64::NAN)
            }
            Err(e) => Err(e),
        }
    }

    fn step_inner(&mut self) -> Result<f64> {
        let batch_size = self.config.batch_size;
        if self.order.len() < batch_size {
            self.order = (0..self.train_set.len()).collect();
            self.order.shuffle(&mut self.rng);
        }
        let indices: Vec<usize> = self.order.drain(..batch_size).collect();
        let (rank, ranks) = (self.comm.rank(), self.comm.size());
        let share = |r: usize| batch_size / ranks + usize::from(r < batch_size % ranks);
        let start: usize = (0..rank).map(share).sum();
        let mine = &indices[start..start + share(rank)];
        let (x, y) = batch(self.train_set, mine, &Device::Cpu)?;
        let forward = || -> Result<Tensor> {
            let logits = self.model.forward(&x, true)?;
            // Σ over this rank's images of the cross-entropy, / global batch size.
            Ok(if mine.is_empty() {
                logits.sum_all()?.affine(0.0, 0.0)?
            } else {
                (candle_nn::loss::cross_entropy(&logits, &y)?
                    * (mine.len() as f64 / batch_size as f64))?
            })
        };
        let (mut grads, mut value, refused) = match forward() {
            Ok(loss) => (loss.backward()?, [loss.to_scalar::<f32>()? as f64], None),
            // With several ranks, one whose (per-rank) BatchNorm refused its
            // statistics still takes part in this step's collectives, with a
            // NaN loss that every rank then sees; returning before them would
            // leave the other ranks waiting forever.
            Err(e) if ranks > 1 && is_non_finite_statistics(&e) => {
                let anchor = self.trainable.first().context("no trainable variables")?;
                let no_grads = anchor.as_tensor().sum_all()?.affine(0.0, 0.0)?.backward()?;
                (no_grads, [f64::NAN], Some(e))
            }
            Err(e) => return Err(e),
        };
        if ranks > 1 {
            self.comm.all_reduce_sum(&mut value)?;
            self.all_reduce_gradients(&mut grads)?;
        }
        if let Some(e) = refused {
            return Err(e);
        }
        let value = value[0];
        self.losses.push(value);
        if value.is_finite() {
            match &mut self.opt {
                Opt::Sgd(o) => o.step(&grads)?,
                Opt::AdamW(o) => o.step(&grads)?,
            }
        }
        Ok(value)
    }

    /// Replaces each trainable variable's gradient by its sum over ranks
    /// (one all-reduce of all gradients, in name order).
    fn all_reduce_gradients(&self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        let mut flat: Vec<f64> = Vec::new();
        let mut sizes = Vec::with_capacity(self.trainable.len());
        for v in &self.trainable {
            let g: Vec<f32> = match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all()?.to_vec1()?,
                None => vec![0.0; v.as_tensor().elem_count()],
            };
            sizes.push(g.len());
            flat.extend(g.iter().map(|&a| a as f64));
        }
        self.comm.all_reduce_sum(&mut flat)?;
        let mut offset = 0;
        for (v, n) in self.trainable.iter().zip(sizes) {
            let values: Vec<f32> = flat[offset..offset + n].iter().map(|&a| a as f32).collect();
            offset += n;
            let g = Tensor::from_vec(values, v.as_tensor().shape(), &Device::Cpu)?;
            grads.insert(v.as_tensor(), g);
        }
        Ok(())
    }

    /// The summary, with the held-out accuracy in evaluation mode.
    ///
    /// # Errors
    /// candle errors.
    pub fn summary(&self, held_out: &Dataset) -> Result<TrainSummary> {
        let losses = self.losses.clone();
        let divergence = match &self.divergence {
            Some(why) => Some(why.clone()),
            None => non_finite_variables(&self.map)?.map(|bad| {
                format!(
                    "after step {}, variables hold non-finite values: {bad}",
                    losses.len()
                )
            }),
        };
        let diverged = divergence.is_some();
        let tail = (losses.len() / 10).max(1);
        let final_loss = match losses.len() {
            0 => f64::NAN,
            n => losses[n.saturating_sub(tail)..].iter().sum::<f64>() / tail.min(n) as f64,
        };
        let held_out_accuracy = if diverged {
            0.0
        } else {
            accuracy(&self.model, held_out)?
        };
        Ok(TrainSummary {
            losses,
            final_loss,
            held_out_accuracy,
            diverged,
            divergence,
            seconds: self.start.elapsed().as_secs_f64(),
        })
    }
}

/// Whether `e` is the core's refusal of non-finite batch statistics
/// ([`normlab::NormError::NonFiniteStatistics`]): the training has
/// diverged rather than failed. normlab-candle passes the core's errors on
/// as candle messages, so the message is recognized when the error itself
/// is not there.
fn is_non_finite_statistics(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        if let Some(norm) = cause.downcast_ref::<normlab::NormError>() {
            return matches!(norm, normlab::NormError::NonFiniteStatistics { .. });
        }
        let text = cause.to_string();
        text.contains("statistics") && (text.contains("not finite") || text.contains("non-finite"))
    })
}

/// Whether every floating-point variable of `map` (running statistics
/// included) is finite.
fn all_finite(map: &VarMap) -> Result<bool> {
    let data = map.data().lock().expect("var map lock");
    crate::lab::optim::all_finite(data.values())
}

/// The floating-point variables of `map` holding NaN or infinite values, as
/// `name (count of total)` in name order (the first three, then how many
/// more), or `None` when all are finite.
///
/// # Errors
/// candle errors.
pub fn non_finite_variables(map: &VarMap) -> Result<Option<String>> {
    let data = map.data().lock().expect("var map lock");
    let mut bad = Vec::new();
    for (name, var) in data.iter() {
        let t = var.as_tensor();
        if !t.dtype().is_float() {
            continue;
        }
        let values = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let count = values.iter().filter(|v| !v.is_finite()).count();
        if count > 0 {
            bad.push(format!("{name} ({count} of {})", values.len()));
        }
    }
    bad.sort();
    // A diverged network has every variable non-finite: the first few say enough.
    const SHOWN: usize = 3;
    if bad.len() > SHOWN {
        let more = bad.len() - SHOWN;
        bad.truncate(SHOWN);
        bad.push(format!("and {more} more"));
    }
    Ok((!bad.is_empty()).then(|| bad.join(", ")))
}

/// Writes every variable of `map` (parameters and running statistics, under
/// their PyTorch names) to `path` as safetensors, through
/// [`write_file_atomically`].
///
/// # Errors
/// Variables holding non-finite values (nothing is written); the errors of
/// [`write_file_atomically`].
pub fn save_model(map: &VarMap, path: &Path) -> Result<()> {
    if let Some(bad) = non_finite_variables(map)? {
        bail!(
            "{}: not written: variables hold non-finite values: {bad}",
            path.display()
        );
    }
    let bytes = {
        let data = map.data().lock().expect("var map lock");
        safetensors::tensor::serialize(
            data.iter()
                .map(|(name, var)| (name.as_str(), var.as_tensor())),
            None,
        )
        .with_context(|| format!("{}: serializing the model", path.display()))?
    };
    write_file_atomically(path, &bytes)
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What kind of file `meta` describes, for messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
    }
    if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// The file that writing `path` would replace or create: `path` itself
/// when it is a regular file or nothing, or the regular file a symbolic
/// link at `path` leads to (so that the link keeps pointing at the model).
/// `normlab train --save` calls it before training, so that a bad path
/// costs no training time.
///
/// # Errors
/// `path`, or what it links to, exists and is not a regular file (a
/// directory, FIFO, socket or device); a link leading nowhere; a parent
/// directory that does not exist.
pub fn check_output_path(path: &Path) -> Result<PathBuf> {
    let shown = path.display();
    let refuse = "refusing to replace it";
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            let target = std::fs::canonicalize(path).with_context(|| {
                format!("{shown}: a symbolic link to a file that does not exist")
            })?;
            let meta = std::fs::metadata(&target)
                .with_context(|| format!("{shown}: reading {}", target.display()))?;
            ensure!(
                meta.is_file(),
                "{shown} is a symbolic link to {}, {}, not a regular file; {refuse}",
                target.display(),
                file_kind(&meta)
            );
            Ok(target)
        }
        Ok(meta) => {
            ensure!(
                meta.is_file(),
                "{shown} is {}, not a regular file; {refuse}",
                file_kind(&meta)
            );
            Ok(path.to_path_buf())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = parent_dir(path);
            let meta = std::fs::metadata(&dir)
                .with_context(|| format!("{shown}: directory {}", dir.display()))?;
            ensure!(
                meta.is_dir(),
                "{shown}: {} is {}, not a directory",
                dir.display(),
                file_kind(&meta)
            );
            Ok(path.to_path_buf())
        }
        Err(e) => Err(e).with_context(|| format!("{shown}")),
    }
}

/// Writes `bytes` to `path` so that `path` is either left as it was or
/// holds all of them: a temporary file in the same directory (so on the
/// same file system), synced, then renamed over `path`. Only a regular
/// file (or a symbolic link to one, whose target is replaced) or nothing
/// is replaced: [`check_output_path`] runs first and again just before the
/// rename. The file gets mode 0666 less the process umask, as any file
/// the user creates. The temporary file is removed on failure.
///
/// # Errors
/// As [`check_output_path`]; I/O errors naming the file.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_checked(path, bytes, || {})
}

/// [`write_file_atomically`], calling `before_check` between writing the
/// temporary file and the last check (tests change the target there).
fn write_atomically_checked(path: &Path, bytes: &[u8], before_check: impl FnOnce()) -> Result<()> {
    let target = check_output_path(path)?;
    let name = target
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let dir = parent_dir(&target);
    let (temp, mut file) = create_temp(&dir, name).with_context(|| {
        format!(
            "{}: creating a temporary file in {}",
            path.display(),
            dir.display()
        )
    })?;
    let result = (|| -> Result<()> {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        before_check();
        let again = check_output_path(path)?;
        ensure!(
            again == target,
            "{}: now leads to {} instead of {}; not replaced",
            path.display(),
            again.display(),
            target.display()
        );
        std::fs::rename(&temp, &target)?;
        Ok(())
    })()
    .with_context(|| format!("writing {}", path.display()));
    if result.is_err() {
        // Best effort: the error being reported matters more than this one.
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// A new file `.NAME.PID.N.tmp` in `dir`, never an existing one.
fn create_temp(dir: &Path, name: &std::ffi::OsStr) -> std::io::Result<(PathBuf, std::fs::File)> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // The kernel applies the umask: the file gets 0666 & !umask.
        options.mode(0o666);
    }
    let mut attempt = 0u32;
    loop {
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.{attempt}.tmp", std::process::id()));
        let temp = dir.join(temp_name);
        match options.open(&temp) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Trains a fresh model; `on_step(step, loss)` is called after every step.
/// The run stops early when a step diverges.
///
/// # Errors
/// Invalid configurations; candle errors.
pub fn train(
    model_config: &ModelConfig,
    config: &TrainConfig,
    train_set: &Dataset,
    held_out: &Dataset,
    on_step: impl FnMut(usize, f64),
) -> Result<(Model, VarMap, TrainSummary)> {
    train_on(
        model_config,
        config,
        train_set,
        held_out,
        Arc::new(SingleProcess),
        on_step,
    )
}

/// [`train`] as one rank of a data-parallel job over `comm`.
///
/// # Errors
/// As [`train`]; communication errors.
pub fn train_on(
    model_config: &ModelConfig,
    config: &TrainConfig,
    train_set: &Dataset,
    held_out: &Dataset,
    comm: Arc<dyn Communicator>,
    mut on_step: impl FnMut(usize, f64),
) -> Result<(Model, VarMap, TrainSummary)> {
    let mut trainer = Trainer::new_on(model_config, config, train_set, comm)?;
    for step in 0..config.steps {
        let loss = trainer.step()?;
        on_step(step, loss);
        if trainer.diverged() {
            break;
        }
    }
    let summary = trainer.summary(held_out)?;
    Ok((trainer.model, trainer.map, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::model::{Activation, Arch, InitScheme, NormKind, Placement};
    use std::sync::Arc;

    fn tiny(arch: Arch, norm: NormKind) -> ModelConfig {
        ModelConfig {
            arch,
            depth: 3,
            width: 16,
            norm,
            placement: Placement::A,
            affine: true,
            activation: Activation::Relu,
            init: InitScheme::Kaiming,
            momentum: normlab::Momentum::default(),
        }
    }

    #[test]
    fn every_kind_of_network_trains_a_few_steps_and_is_reproducible() -> Result<()> {
        let data = crate::data::embedded_mnist()?;
        let (train_set, held) = data.split(8_000, 0)?;
        let held = held.select(&(0..200).collect::<Vec<_>>());
        let config = TrainConfig {
            optimizer: OptimizerKind::Sgd { momentum: 0.9 },
            lr: 0.05,
            batch_size: 32,
            steps: 12,
            seed: 1,
        };
        for (arch, norm) in [
            (Arch::Mlp, NormKind::None),
            (Arch::Mlp, NormKind::Batch),
            (Arch::Mlp, NormKind::Layer),
            (Arch::Mlp, NormKind::Group(4)),
            (Arch::Mlp, NormKind::Rms),
            (Arch::Mlp, NormKind::Lrn),
            (Arch::Cnn, NormKind::Batch),
            (Arch::Cnn, NormKind::Instance),
            (Arch::Cnn, NormKind::Layer),
            (Arch::Cnn, NormKind::Rms),
        ] {
            let (_, _, s) = train(&tiny(arch, norm), &config, &train_set, &held, |_, _| {})?;
            assert_eq!(s.losses.len(), 12, "{arch:?} {norm:?}");
            assert!(!s.diverged, "{arch:?} {norm:?}");
            assert!(
                s.final_loss < s.losses[0],
                "{arch:?} {norm:?}: {:?}",
                s.losses
            );
        }
        let a = train(
            &tiny(Arch::Mlp, NormKind::Batch),
            &config,
            &train_set,
            &held,
            |_, _| {},
        )?
        .2;
        let b = train(
            &tiny(Arch::Mlp, NormKind::Batch),
            &config,
            &train_set,
            &held,
            |_, _| {},
        )?
        .2;
        assert_eq!(a.losses, b.losses, "same seed, same run");
        Ok(())
    }

    #[test]
    fn block_statistics_are_recorded_and_shapes_fit() -> Result<()> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let model = Model::new(&tiny(Arch::Cnn, NormKind::Batch), (1, 28, 28), 10, vb, 0)?;
        let x = Tensor::randn(0f32, 1.0, (4, 1, 28, 28), &Device::Cpu)?;
        let (logits, stats) = model.forward_recorded(&x, true, true)?;
        assert_eq!(logits.dims(), [4, 10]);
        assert_eq!(stats.len(), 3);
        // After BatchNorm and ReLU, about half the activations are zero.
        for s in &stats {
            assert!((0.3..0.7).contains(&s.dead_fraction), "{s:?}");
        }
        Ok(())
    }

    #[test]
    fn instrumentation_sees_signals_vanish_without_normalization() -> Result<()> {
        // A deep tanh MLP initialized with a small σ: without normalization the
        // activations shrink block after block; with BatchNorm they keep unit
        // scale. Every block reports a gradient norm.
        let x = Tensor::randn(0f32, 1.0, (64, 1, 28, 28), &Device::Cpu)?;
        let y = Tensor::from_vec(
            (0..64u32).map(|i| i % 10).collect::<Vec<_>>(),
            64,
            &Device::Cpu,
        )?;
        let last_std = |norm: NormKind| -> Result<f64> {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
            let config = ModelConfig {
                depth: 12,
                activation: Activation::Tanh,
                init: InitScheme::Normal(0.05),
                ..tiny(Arch::Mlp, norm)
            };
            let model = Model::new(&config, (1, 28, 28), 10, vb, 7)?;
            let (logits, stats) = model.forward_recorded(&x, true, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let norms = model.gradient_norms(&loss.backward()?)?;
            assert_eq!(norms.len(), 12);
            assert!(norms.iter().all(|&n| n > 0.0 && n.is_finite()), "{norms:?}");
            Ok(stats[11].std)
        };
        let plain = last_std(NormKind::None)?;
        let normalized = last_std(NormKind::Batch)?;
        assert!(
            plain < 1e-6,
            "last block's std without normalization: {plain:e}"
        );
        assert!(
            normalized > 0.3,
            "last block's std with BatchNorm: {normalized:e}"
        );
        Ok(())
    }

    /// Every variable of a trainer, by name, as f32 values.
    fn snapshot(map: &VarMap) -> Vec<(String, Vec<f32>)> {
        let data = map.data().lock().unwrap();
        let mut all: Vec<(String, Vec<f32>)> = data
            .iter()
            .map(|(n, v)| {
                let t = v.as_tensor().flatten_all().unwrap();
                let values = match t.dtype() {
                    DType::F32 => t.to_vec1::<f32>().unwrap(),
                    _ => t
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                        .iter()
                        .map(|&a| a as f32)
                        .collect(),
                };
                (n.clone(), values)
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    #[test]
    fn data_parallel_sync_batch_norm_equals_one_process() -> Result<()> {
        let data = crate::data::embedded_mnist()?;
        let (train_set, _) = data.split(8_000, 0)?;
        let model = ModelConfig {
            depth: 3,
            width: 16,
            norm: NormKind::SyncBatch,
            ..ModelConfig::default()
        };
        // 10 images over 3 ranks: shares of 4, 3 and 3.
        let config = TrainConfig {
            optimizer: OptimizerKind::Sgd { momentum: 0.9 },
            lr: 0.05,
            batch_size: 10,
            steps: 8,
            seed: 3,
        };
        // Losses and every variable after training.
        type Run = (Vec<f64>, Vec<(String, Vec<f32>)>);
        let run = |comm: Arc<dyn Communicator>| -> Result<Run> {
            let mut t = Trainer::new_on(&model, &config, &train_set, comm)?;
            let losses = (0..config.steps).map(|_| t.step()).collect::<Result<_>>()?;
            Ok((losses, snapshot(&t.map)))
        };
        let (one_losses, one) = run(Arc::new(SingleProcess))?;
        let group = normlab_candle::ThreadGroup::new(3).unwrap();
        let ranks: Vec<Run> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|comm| s.spawn(|| run(Arc::new(comm))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Result<_>>()
        })?;
        for (losses, vars) in &ranks {
            assert_eq!(vars, &ranks[0].1, "every rank holds the same variables");
            for (a, b) in losses.iter().zip(&one_losses) {
                assert!((a - b).abs() <= 1e-5 * b.abs(), "loss {a} vs {b}");
            }
            assert_eq!(vars.len(), one.len());
            for ((name, a), (_, b)) in vars.iter().zip(&one) {
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "{name}: {x} vs {y}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_rank_whose_batch_norm_refuses_its_statistics_does_not_leave_the_others_waiting(
    ) -> Result<()> {
        // Eight images, one with an infinite pixel: with a global batch of 8
        // over 2 ranks, exactly one rank's (per-rank) BatchNorm sees it.
        let mut images: Vec<f32> = (0..8 * 784).map(|i| (i % 13) as f32 / 13.0).collect();
        images[5 * 784 + 300] = f32::INFINITY;
        let train_set = Dataset {
            images,
            labels: (0..8).collect(),
            channels: 1,
            height: 28,
            width: 28,
            classes: 10,
        };
        let model = ModelConfig {
            depth: 2,
            width: 8,
            norm: NormKind::Batch,
            ..ModelConfig::default()
        };
        let config = TrainConfig::sgd(0.05, 8, 3, 0);
        let group = normlab_candle::ThreadGroup::new(2).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        for comm in group {
            let (model, config, train_set, done) = (
                model.clone(),
                config.clone(),
                train_set.clone(),
                done.clone(),
            );
            std::thread::spawn(move || {
                let comm: Arc<dyn Communicator> = Arc::new(comm);
                let run = || -> Result<bool> {
                    let mut t = Trainer::new_on(&model, &config, &train_set, comm)?;
                    t.step()?;
                    Ok(t.diverged())
                };
                done.send(run().map_err(|e| format!("{e:#}"))).unwrap();
            });
        }
        for _ in 0..2 {
            // A rank returning before the step's all-reduce would leave the
            // other blocked for ever; a minute is far beyond one tiny step.
            let diverged = finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("every rank finishes its step")
                .map_err(anyhow::Error::msg)?;
            assert!(diverged, "every rank reports the divergence");
        }
        Ok(())
    }

    #[test]
    fn converting_batch_norm_layers_keeps_the_model_and_its_outputs() -> Result<()> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let mut model = Model::new(&tiny(Arch::Mlp, NormKind::Batch), (1, 28, 28), 10, vb, 0)?;
        let x = Tensor::randn(0f32, 1.0, (8, 1, 28, 28), &Device::Cpu)?;
        let before = model.forward(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
        let comm: Arc<dyn Communicator> = Arc::new(SingleProcess);
        assert_eq!(model.convert_sync_batch_norm(&comm), 3);
        assert_eq!(model.config().norm, NormKind::SyncBatch);
        let after = model.forward(&x, false)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(before, after);
        // Nothing left to convert.
        assert_eq!(model.convert_sync_batch_norm(&comm), 0);
        Ok(())
    }

    /// Makes a FIFO at `path` with the `mkfifo` command.
    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "mkfifo {}", path.display());
    }

    /// Names of the files in `dir`.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn current_umask() -> u32 {
        // /proc/self/status shows the umask without changing it.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
    }

    #[test]
    fn a_new_file_is_created_with_the_usual_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_file_atomically(&path, b"model").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"model");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !current_umask(), "mode {mode:o}");
        assert_eq!(
            listing(dir.path()),
            ["m.safetensors"],
            "no temporary file left"
        );
    }

    #[test]
    fn a_regular_file_and_a_link_to_one_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, b"old contents, longer than the new").unwrap();
        write_file_atomically(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        // Through a link, the file it leads to is replaced and the link stays.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        write_file_atomically(&link, b"newer").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&path).unwrap(), b"newer");
        assert_eq!(listing(dir.path()), ["link", "m"]);
    }

    #[test]
    fn fifos_directories_and_links_to_them_are_refused() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let fifo_link = dir.path().join("fifo_link");
        std::os::unix::fs::symlink(&fifo, &fifo_link).unwrap();
        let dir_link = dir.path().join("dir_link");
        std::os::unix::fs::symlink(&sub, &dir_link).unwrap();
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        for (path, message) in [
            (&fifo, "is a FIFO, not a regular file"),
            (&sub, "is a directory, not a regular file"),
            (&fifo_link, "is a symbolic link to"),
            (&dir_link, "a directory, not a regular file"),
            (&dangling, "a symbolic link to a file that does not exist"),
        ] {
            let err = format!("{:#}", write_file_atomically(path, b"x").unwrap_err());
            assert!(err.contains(message), "{}: {err}", path.display());
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(check_output_path(path).is_err());
        }
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(
            listing(dir.path()),
            ["dangling", "dir_link", "fifo", "fifo_link", "sub"],
            "nothing written"
        );
        assert!(listing(&sub).is_empty());
        let missing = dir.path().join("no_such_dir").join("m");
        let err = format!("{:#}", write_file_atomically(&missing, b"x").unwrap_err());
        assert!(err.contains("no_such_dir"), "{err}");
    }

    #[test]
    fn a_target_that_changes_before_the_rename_is_kept_and_the_temporary_file_removed() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let err = write_atomically_checked(&path, b"model", || mkfifo(&path)).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("is a FIFO"), "{err}");
        assert!(std::fs::metadata(&path).unwrap().file_type().is_fifo());
        assert_eq!(listing(dir.path()), ["m"], "temporary file removed");
    }

    #[test]
    fn a_model_with_non_finite_values_is_not_saved() -> Result<()> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let model = Model::new(&tiny(Arch::Mlp, NormKind::Batch), (1, 28, 28), 10, vb, 0)?;
        drop(model);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        save_model(&map, &path)?;
        assert!(std::fs::metadata(&path)?.len() > 0);
        assert_eq!(non_finite_variables(&map)?, None);
        assert!(all_finite(&map)?);
        {
            let data = map.data().lock().unwrap();
            let v = &data["blocks.1.norm.running_var"];
            let values = [f32::NAN, f32::INFINITY]
                .into_iter()
                .chain(std::iter::repeat(1.0))
                .take(16)
                .collect::<Vec<_>>();
            v.set(&Tensor::from_vec(values, 16, &Device::Cpu)?)?;
        }
        let bad = non_finite_variables(&map)?.unwrap();
        assert_eq!(bad, "blocks.1.norm.running_var (2 of 16)");
        assert!(!all_finite(&map)?);
        std::fs::remove_file(&path)?;
        let err = format!("{:#}", save_model(&map, &path).unwrap_err());
        assert!(err.contains("not written") && err.contains(&bad), "{err}");
        assert!(!path.exists());
        // Beyond three variables, the rest are counted.
        {
            let data = map.data().lock().unwrap();
            for name in ["blocks.0.linear.bias", "blocks.0.norm.bias", "head.bias"] {
                let v = &data[name];
                v.set(&(v.as_tensor() * f64::INFINITY)?)?;
            }
        }
        let bad = non_finite_variables(&map)?.unwrap();
        assert!(
            bad.starts_with("blocks.0.linear.bias (16 of 16), "),
            "{bad}"
        );
        assert!(bad.ends_with(", and 1 more"), "{bad}");
        Ok(())
    }

    #[test]
    fn run_sizes_are_checked_with_overflow_and_memory() {
        let mnist = ((1, 28, 28), 10);
        let small = tiny(Arch::Mlp, NormKind::Batch);
        assert!(check_memory(&small, mnist.0, mnist.1, 64).is_ok());
        let huge = ModelConfig {
            depth: 1024,
            width: 65536,
            ..small.clone()
        };
        if available_memory().is_some() {
            let err = check_memory(&huge, mnist.0, mnist.1, 64)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("GiB of memory") && err.contains("width 65536"),
                "{err}"
            );
        }
        let overflow = ModelConfig {
            depth: usize::MAX,
            width: usize::MAX,
            ..small
        };
        let err = check_memory(&overflow, mnist.0, mnist.1, 64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("too large"), "{err}");
        assert_eq!(steps_for_epochs(1, 8_000, 400).unwrap(), 20);
        assert_eq!(steps_for_epochs(2, 8_001, 400).unwrap(), 42);
        let err = steps_for_epochs(147573952589676413, 8_000, 64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--epochs 147573952589676413"), "{err}");
        assert!(steps_for_epochs(100_000, 8_000, 1).is_err());
    }

    #[test]
    fn out_of_range_training_numbers_are_refused() {
        let ok = TrainConfig::sgd(0.05, 32, 10, 0);
        assert!(ok.validate().is_ok());
        for (config, message) in [
            (
                TrainConfig {
                    lr: -1.0,
                    ..ok.clone()
                },
                "learning rate -1",
            ),
            (
                TrainConfig {
                    lr: f64::NAN,
                    ..ok.clone()
                },
                "learning rate NaN",
            ),
            (
                TrainConfig {
                    lr: 2e6,
                    ..ok.clone()
                },
                "learning rate 2000000",
            ),
            (
                TrainConfig {
                    steps: MAX_STEPS + 1,
                    ..ok.clone()
                },
                "10000001 steps",
            ),
            (
                TrainConfig {
                    optimizer: OptimizerKind::Sgd { momentum: -5.0 },
                    ..ok.clone()
                },
                "momentum -5",
            ),
            (
                TrainConfig {
                    optimizer: OptimizerKind::Sgd { momentum: 1.0 },
                    ..ok.clone()
                },
                "momentum 1",
            ),
        ] {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(message), "{config:?}: {err}");
        }
    }

    #[test]
    fn bad_configurations_are_refused() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let err = Model::new(
            &tiny(Arch::Mlp, NormKind::Instance),
            (1, 28, 28),
            10,
            vb.clone(),
            0,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("--model cnn"), "{err}");
        let err = Model::new(&tiny(Arch::Mlp, NormKind::Group(5)), (1, 28, 28), 10, vb, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not divisible by 5"), "{err}");
        assert!("group0".parse::<NormKind>().is_err());
        assert_eq!("group4".parse::<NormKind>().unwrap(), NormKind::Group(4));
    }
}

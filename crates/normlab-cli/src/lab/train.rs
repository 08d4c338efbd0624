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

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use normlab_candle::{Communicator, SingleProcess};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::model::{Model, ModelConfig};
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

/// What a run measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainSummary {
    /// Training loss of each step.
    pub losses: Vec<f64>,
    /// Mean training loss over the last tenth of the steps.
    pub final_loss: f64,
    /// Accuracy on the held-out set (evaluation mode).
    pub held_out_accuracy: f64,
    /// Whether every loss was finite.
    pub diverged: bool,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// SGD with momentum over candle variables.
struct MomentumSgd {
    vars: Vec<(Var, Tensor)>,
    lr: f64,
    momentum: f64,
}

impl MomentumSgd {
    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        for (var, velocity) in &mut self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                *velocity = ((&*velocity * self.momentum)? + g)?;
                var.set(&var.as_tensor().sub(&(&*velocity * self.lr)?)?)?;
            }
        }
        Ok(())
    }
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
    AdamW(candle_nn::AdamW),
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
        ensure!(
            config.lr.is_finite() && config.lr > 0.0,
            "learning rate must be positive, got {}",
            config.lr
        );
        let start = Instant::now();
        let device = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &device);
        let dims = (train_set.channels, train_set.height, train_set.width);
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
            OptimizerKind::Sgd { momentum } => Opt::Sgd(MomentumSgd {
                vars: trainable
                    .iter()
                    .map(|v| Ok((v.clone(), v.as_tensor().zeros_like()?)))
                    .collect::<Result<_>>()?,
                lr: config.lr,
                momentum,
            }),
            OptimizerKind::AdamW { weight_decay } => Opt::AdamW(candle_nn::AdamW::new(
                trainable,
                candle_nn::ParamsAdamW {
                    lr: config.lr,
                    weight_decay,
                    ..Default::default()
                },
            )?),
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
            losses: Vec::with_capacity(config.steps),
            start,
        })
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.losses.len()
    }

    /// Whether a loss has been non-finite (the run stops there).
    pub fn diverged(&self) -> bool {
        self.losses.last().is_some_and(|l| !l.is_finite())
    }

    /// One optimizer step on the next mini-batch (reshuffled every epoch);
    /// returns its loss. A non-finite loss is recorded and no update is made.
    ///
    /// # Errors
    /// candle errors.
    pub fn step(&mut self) -> Result<f64> {
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
        let logits = self.model.forward(&x, true)?;
        // Σ over this rank's images of the cross-entropy, / global batch size.
        let loss = if mine.is_empty() {
            logits.sum_all()?.affine(0.0, 0.0)?
        } else {
            (candle_nn::loss::cross_entropy(&logits, &y)?
                * (mine.len() as f64 / batch_size as f64))?
        };
        let mut grads = loss.backward()?;
        let mut value = [loss.to_scalar::<f32>()? as f64];
        if ranks > 1 {
            self.comm.all_reduce_sum(&mut value)?;
            self.all_reduce_gradients(&mut grads)?;
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
        let diverged = losses.iter().any(|l| !l.is_finite());
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
            seconds: self.start.elapsed().as_secs_f64(),
        })
    }
}

/// Trains a fresh model; `on_step(step, loss)` is called after every step.
/// The run stops early at a non-finite loss.
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

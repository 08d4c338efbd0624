//! The training suite of `normlab bench` (`--suite training`): optimizer
//! steps of the lab's own networks, timed one by one.
//!
//! Each case is a network, a normalization, a batch size and an optimizer
//! the lab trains with: the MLPs and CNNs of its experiments (the quick
//! profile's sizes) and the configurations of the side-by-side table in
//! the README. A step is what [`Trainer::step`] does: draw the batch,
//! forward, cross-entropy, backward, the divergence checks and the update.
//! `scripts/torch_train_bench.py` builds the same networks in PyTorch and
//! times the same step, so that `scripts/compare-pytorch --suite training`
//! puts the two side by side.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::data::Dataset;
use crate::lab::experiments::signal::norm_name;
use crate::lab::model::{Activation, Arch, ModelConfig, NormKind};
use crate::lab::train::{TrainConfig, Trainer};

/// One configuration of the training suite.
#[derive(Clone, Debug, PartialEq)]
pub struct StepCase {
    /// `mlp 6x64 batch b64 sgd`: network, depth × width, normalization,
    /// batch size, optimizer (the PyTorch script parses it).
    pub name: String,
    /// The network.
    pub model: ModelConfig,
    /// The optimizer and batch size (steps and seed are the bench's).
    pub train: TrainConfig,
}

/// Untimed steps before the timed ones: the first steps allocate the
/// optimizer state and warm the caches.
pub const WARMUP_STEPS: usize = 5;

/// Every case of the training suite, in order: first the README table's
/// SGD configurations (lr 0.05, momentum 0.9), then the networks of the
/// `advice` and `batch_size` experiments (AdamW, lr 2e-3) with every
/// normalization they use, at batch 64 and 4, and a tanh MLP.
pub fn cases() -> Vec<StepCase> {
    let case = |arch, depth, width, norm, batch, adamw: bool, activation| {
        let model = ModelConfig {
            arch,
            depth,
            width,
            norm,
            activation,
            ..ModelConfig::default()
        };
        let train = if adamw {
            TrainConfig::adamw(2e-3, batch, 0, 0)
        } else {
            TrainConfig::sgd(0.05, batch, 0, 0)
        };
        let name = format!(
            "{} {depth}x{width} {}{} b{batch} {}",
            if arch == Arch::Mlp { "mlp" } else { "cnn" },
            norm_name(norm),
            if activation == Activation::Tanh {
                " tanh"
            } else {
                ""
            },
            if adamw { "adamw" } else { "sgd" }
        );
        StepCase { name, model, train }
    };
    use Activation::{Relu, Tanh};
    use Arch::{Cnn, Mlp};
    let mut all = vec![
        case(Mlp, 6, 64, NormKind::Batch, 64, false, Relu),
        case(Mlp, 20, 128, NormKind::Batch, 64, false, Relu),
        case(Mlp, 20, 128, NormKind::Layer, 64, false, Relu),
        case(Cnn, 3, 16, NormKind::Batch, 64, false, Relu),
        case(Cnn, 3, 16, NormKind::Group(8), 64, false, Relu),
        case(Cnn, 4, 32, NormKind::Batch, 32, false, Relu),
        case(Mlp, 8, 64, NormKind::Batch, 64, false, Tanh),
    ];
    for norm in [
        NormKind::None,
        NormKind::Batch,
        NormKind::Layer,
        NormKind::Group(4),
        NormKind::Rms,
        NormKind::Lrn,
    ] {
        all.push(case(Mlp, 6, 64, norm, 64, true, Relu));
    }
    all.push(case(Mlp, 6, 64, NormKind::Batch, 4, true, Relu));
    for norm in [
        NormKind::None,
        NormKind::Batch,
        NormKind::Layer,
        NormKind::Group(4),
        NormKind::Instance,
        NormKind::Rms,
        NormKind::Lrn,
    ] {
        all.push(case(Cnn, 3, 8, norm, 64, true, Relu));
    }
    all.push(case(Cnn, 3, 8, NormKind::Batch, 4, true, Relu));
    all
}

/// The timing of one case, one JSON line of `normlab bench --json`.
#[derive(Clone, Debug, Serialize)]
pub struct StepMeasurement {
    /// The case's name.
    pub case: String,
    /// Median milliseconds per optimizer step.
    pub step_ms: f64,
    /// Fastest step, milliseconds.
    pub min_step_ms: f64,
    /// Timed steps (after [`WARMUP_STEPS`] untimed ones).
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
}

/// Times `steps` optimizer steps of `case` on `data`, after
/// [`WARMUP_STEPS`] untimed ones.
///
/// # Errors
/// Invalid configurations, candle errors, or a run that diverged.
pub fn measure(case: &StepCase, data: &Dataset, steps: usize) -> Result<StepMeasurement> {
    let mut train = case.train.clone();
    train.steps = WARMUP_STEPS + steps;
    let mut trainer = Trainer::new(&case.model, &train, data)?;
    for _ in 0..WARMUP_STEPS {
        trainer.step()?;
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let start = Instant::now();
        trainer.step()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    anyhow::ensure!(
        !trainer.diverged(),
        "{}: the run diverged ({})",
        case.name,
        trainer.divergence().unwrap_or("")
    );
    times.sort_by(f64::total_cmp);
    Ok(StepMeasurement {
        case: case.name.clone(),
        step_ms: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
        min_step_ms: times.first().copied().unwrap_or(f64::NAN),
        steps,
        batch_size: train.batch_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::train::OptimizerKind;

    #[test]
    fn every_case_has_a_unique_parsable_name_and_a_valid_configuration() {
        let all = cases();
        let mut names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for c in &all {
            let words: Vec<&str> = c.name.split(' ').collect();
            assert!(words.len() == 5 || words.len() == 6, "{}", c.name);
            assert!(c.train.validate().is_ok(), "{}", c.name);
            assert!(
                matches!(c.train.optimizer, OptimizerKind::Sgd { .. }) == c.name.ends_with("sgd")
            );
        }
    }

    #[test]
    fn a_case_runs_its_steps_on_a_few_images() {
        let data = Dataset {
            images: (0..64 * 784).map(|i| (i % 97) as f32 / 97.0).collect(),
            labels: (0..64).map(|i| (i % 10) as u8).collect(),
            channels: 1,
            height: 28,
            width: 28,
            classes: 10,
        };
        let case = cases()
            .into_iter()
            .find(|c| c.name == "cnn 3x8 batch b4 adamw")
            .expect("the case exists");
        let m = measure(&case, &data, 3).unwrap();
        assert_eq!((m.steps, m.batch_size), (3, 4));
        assert!(m.min_step_ms > 0.0 && m.min_step_ms <= m.step_ms);
    }
}

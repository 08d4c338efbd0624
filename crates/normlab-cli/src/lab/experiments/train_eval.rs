//! `train_eval`: at test time, running averages replace batch statistics.
//!
//! During training, BatchNorm folds each batch's mean and variance into
//! running estimates, `r ← (1 - m)·r + m·batch` (or the cumulative average).
//! We follow how far those estimates are from the statistics of the whole
//! training set as training proceeds, for several momenta, and compare
//! evaluation with running statistics to evaluation with the statistics of
//! small test batches.

use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor, D};
use normlab::Momentum;

use super::{pct, Context, Experiment, Findings, RunningSnapshot, Table};
use crate::lab::model::{Model, ModelConfig};
use crate::lab::plot::{format_number, LineChart, Scale, Series};
use crate::lab::train::{self, TrainConfig, Trainer};
use crate::lab::verdict;
use crate::row;

/// The experiment.
pub const EXPERIMENT: Experiment = Experiment {
    name: "train_eval",
    title: "Training statistics and test-time running averages",
    claim: "At test time, running averages replace batch statistics.",
    run,
};

/// Distance of statistics `(mean, std)` per channel from the population's:
/// mean over channels of (|μ̂ - μ| + |σ̂ - σ|) / σ.
fn distance(est: (&[f32], &[f32]), population: (&[f32], &[f32])) -> f64 {
    let c = population.0.len();
    (0..c)
        .map(|k| {
            let s = (population.1[k] as f64).max(1e-12);
            ((est.0[k] - population.0[k]) as f64).abs() / s
                + ((est.1[k] - population.1[k]) as f64).abs() / s
        })
        .sum::<f64>()
        / c as f64
}

/// Per-feature mean and (biased) std of block 0's pre-normalization values.
fn first_block_stats(model: &Model, x: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let z = model.block_linear(0, &model.prepare_input(x)?)?;
    let mean = z.mean(0)?;
    let std = z.broadcast_sub(&mean)?.sqr()?.mean(0)?.sqrt()?;
    Ok((mean.to_vec1()?, std.to_vec1()?))
}

fn running_stats(trainer: &Trainer) -> Result<(Vec<f32>, Vec<f32>)> {
    let data = trainer.map.data().lock().expect("var map lock");
    let get = |name: &str| -> Result<Vec<f32>> {
        Ok(data
            .get(name)
            .with_context(|| format!("no variable {name}"))?
            .as_tensor()
            .to_vec1()?)
    };
    let mean = get("blocks.0.norm.running_mean")?;
    let std = get("blocks.0.norm.running_var")?
        .iter()
        .map(|v| v.max(0.0).sqrt())
        .collect();
    Ok((mean, std))
}

/// Accuracy using the batch statistics of consecutive test batches of `b`.
fn batch_stat_accuracy(
    trainer: &Trainer,
    held_out: &crate::data::Dataset,
    b: usize,
) -> Result<f64> {
    let snapshot = RunningSnapshot::take(&trainer.map)?;
    let mut correct = 0usize;
    let mut seen = 0usize;
    let indices: Vec<usize> = (0..held_out.len()).collect();
    for chunk in indices.chunks(b).filter(|c| c.len() == b) {
        let (x, y) = train::batch(held_out, chunk, &Device::Cpu)?;
        let predicted = trainer.model.forward(&x, true)?.argmax(D::Minus1)?;
        let hits: Vec<u8> = predicted.eq(&y)?.to_vec1()?;
        correct += hits.iter().filter(|&&h| h != 0).count();
        seen += b;
    }
    snapshot.restore()?;
    Ok(correct as f64 / seen.max(1) as f64)
}

fn run(ctx: &Context) -> Result<Findings> {
    let p = ctx.profile;
    let depth = p.pick(3, 6, 6);
    let steps = p.pick(30, 400, 1500);
    let checkpoints = 20usize;
    let every = (steps / checkpoints).max(1);
    let test_batches: Vec<usize> = p.pick(
        vec![2, 8],
        vec![2, 4, 8, 32, 128],
        vec![2, 4, 8, 16, 32, 128, 512],
    );
    let momenta = [
        ("0.01", Momentum::Exponential(0.01)),
        ("0.1", Momentum::Exponential(0.1)),
        ("0.5", Momentum::Exponential(0.5)),
        ("cumulative", Momentum::Cumulative),
    ];
    ctx.progress.set_length(momenta.len() as u64 + 1);
    let population_x = ctx.sample(ctx.train.len().min(2000), 21)?.0;
    let batch_probes: Vec<Tensor> = (0..5)
        .map(|k| Ok(ctx.sample(64, 300 + k)?.0))
        .collect::<Result<_>>()?;
    let train_config = TrainConfig::sgd(0.02, 64, steps, ctx.seed);
    let mut gap_table = Table::new(
        "train_eval_gap.csv",
        &["momentum", "step", "running_gap", "batch_gap"],
    );
    let mut gaps: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut batch_gaps: Vec<(f64, f64)> = Vec::new();
    let mut eval_rows = Vec::new();
    let mut running_accuracy = f64::NAN;
    for (name, momentum) in momenta {
        let model = ModelConfig {
            depth,
            momentum,
            ..ModelConfig::default()
        };
        let mut trainer = Trainer::new(&model, &train_config, ctx.train)?;
        let mut series = Vec::new();
        for step in 1..=steps {
            trainer.step()?;
            if step % every == 0 || step == steps {
                let population = first_block_stats(&trainer.model, &population_x)?;
                let pop = (&population.0[..], &population.1[..]);
                let running = running_stats(&trainer)?;
                let gap = distance((&running.0, &running.1), pop);
                let batch_gap = batch_probes
                    .iter()
                    .map(|x| {
                        let s = first_block_stats(&trainer.model, x)?;
                        Ok(distance((&s.0, &s.1), pop))
                    })
                    .collect::<Result<Vec<f64>>>()?;
                let batch_gap = super::mean(&batch_gap);
                gap_table.push(row![name, step, gap, batch_gap]);
                series.push((step as f64, gap));
                if name == "0.1" {
                    batch_gaps.push((step as f64, batch_gap));
                }
            }
        }
        if name == "0.1" {
            running_accuracy = train::accuracy(&trainer.model, ctx.held_out)?;
            for &b in &test_batches {
                eval_rows.push((b, batch_stat_accuracy(&trainer, ctx.held_out, b)?));
            }
            ctx.progress.inc(1);
        }
        gaps.push(series);
        ctx.progress.inc(1);
    }
    let mut eval_table = Table::new(
        "train_eval_accuracy.csv",
        &["statistics", "test_batch", "held_out_accuracy"],
    );
    eval_table.push(row!["running (momentum 0.1)", "any", running_accuracy]);
    for &(b, a) in &eval_rows {
        eval_table.push(row!["batch", b, a]);
    }
    let mut series: Vec<Series> = momenta
        .iter()
        .zip(&gaps)
        .map(|((name, _), pts)| Series::new(format!("running, momentum {name}"), pts.clone()))
        .collect();
    series.push(Series::new("one training batch (64)", batch_gaps.clone()));
    let max_b = *test_batches.last().unwrap_or(&2) as f64;
    let figures =
        vec![
        LineChart {
            title: "Running statistics against the training set's".into(),
            x_label: "training step".into(),
            y_label: "distance (|Δmean| + |Δstd|) / std (log scale)".into(),
            x_scale: Scale::Linear,
            y_scale: Scale::Log,
            series,
        }
        .figure(
            "train_eval_gap.svg",
            "Distance of the first BatchNorm layer's running mean and std from the statistics of \
             2,000 training images under the current weights, averaged over features; and the \
             same for the statistics of single training batches of 64.",
        )?,
        LineChart {
            title: "Evaluation: running statistics against test-batch statistics".into(),
            x_label: "test batch size (images, log scale)".into(),
            y_label: "held-out accuracy (%)".into(),
            x_scale: Scale::Log,
            y_scale: Scale::Linear,
            series: vec![
                Series::new(
                    "batch statistics of the test batch",
                    eval_rows.iter().map(|&(b, a)| (b as f64, 100.0 * a)).collect(),
                ),
                Series::new(
                    "running statistics (momentum 0.1)",
                    vec![(2.0, 100.0 * running_accuracy), (max_b, 100.0 * running_accuracy)],
                ),
            ],
        }
        .figure(
            "train_eval_accuracy.svg",
            "Held-out accuracy of the momentum-0.1 network evaluated with its running statistics \
             (independent of the test batch) or with each test batch's own statistics.",
        )?,
    ];
    let final_gap = |k: usize| gaps[k].last().map_or(f64::NAN, |p| p.1);
    let final_batch_gap = batch_gaps.last().map_or(f64::NAN, |p| p.1);
    let verdict = verdict::train_eval(running_accuracy, &eval_rows, final_gap(1), final_batch_gap);
    Ok(Findings {
        setup: format!(
            "{depth}-block BatchNorm MLPs of width 64 trained {steps} steps (SGD, momentum 0.9, \
             lr 0.02, batch 64) with running-statistics momentum 0.01, 0.1, 0.5 and the cumulative \
             average; statistics of the first BatchNorm layer checked every {every} steps; test \
             batches {test_batches:?}."
        ),
        rule: verdict::TRAIN_EVAL_RULE,
        verdict,
        evidence: format!(
            "Accuracy with running statistics {}; with test-batch statistics {}. Final distance \
             to the training set's statistics: momentum 0.01 {}, 0.1 {}, 0.5 {}, cumulative {}; \
             one training batch {}.",
            pct(running_accuracy),
            eval_rows
                .iter()
                .map(|(b, a)| format!("{} at batch {b}", pct(*a)))
                .collect::<Vec<_>>()
                .join(", "),
            format_number(final_gap(0)),
            format_number(final_gap(1)),
            format_number(final_gap(2)),
            format_number(final_gap(3)),
            format_number(final_batch_gap)
        ),
        figures,
        tables: vec![gap_table, eval_table],
    })
}

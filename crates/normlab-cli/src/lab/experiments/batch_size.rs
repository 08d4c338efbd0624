//! `batch_size`: BatchNorm's batch statistics get noisy at small batches;
//! LayerNorm and GroupNorm do not depend on the batch.
//!
//! A CNN trained with each normalization at batch sizes from 2 up, for the
//! same number of steps (so smaller batches see fewer images, alike for
//! every normalization: what differs between them is the batch's effect on
//! the statistics), then evaluated (BatchNorm with its running
//! statistics). Also measured directly: how far a batch's per-channel mean
//! and standard deviation stray from the training set's, against the batch
//! size (the noise BatchNorm trains with, which shrinks like 1/√B).

use anyhow::Result;
use candle_core::{DType, Device, D};
use candle_nn::{VarBuilder, VarMap};

use super::signal::norm_name;
use super::{pct, Context, Experiment, Findings, Table};
use crate::lab::model::{Arch, Model, ModelConfig, NormKind};
use crate::lab::plot::{LineChart, Scale, Series};
use crate::lab::train::TrainConfig;
use crate::lab::verdict;
use crate::row;

/// The experiment.
pub const EXPERIMENT: Experiment = Experiment {
    name: "batch_size",
    title: "Small batches: BatchNorm against batch-independent normalizations",
    claim: "BatchNorm's batch statistics get noisy at small batches; LayerNorm and GroupNorm do \
            not depend on the batch.",
    run,
};

fn run(ctx: &Context) -> Result<Findings> {
    let p = ctx.profile;
    let batch_sizes: Vec<usize> = p.pick(
        vec![2, 16],
        vec![2, 4, 8, 16, 32, 64],
        vec![2, 4, 8, 16, 32, 64, 128],
    );
    let steps: usize = p.pick(20, 300, 1500);
    let width = p.pick(8, 8, 16);
    let depth = 3;
    let norms = [
        NormKind::Batch,
        NormKind::Group(4),
        NormKind::Layer,
        NormKind::Lrn,
    ];
    let mut runs = Vec::new();
    for &norm in &norms {
        for &b in &batch_sizes {
            let model = ModelConfig {
                arch: Arch::Cnn,
                depth,
                width,
                norm,
                ..ModelConfig::default()
            };
            let train = TrainConfig::adamw(2e-3, b, steps, ctx.seed);
            runs.push((model, train));
        }
    }
    ctx.progress.set_length(runs.len() as u64 + 1);
    let summaries = ctx.train_many(&runs)?;
    let mut table = Table::new(
        "batch_size.csv",
        &[
            "norm",
            "batch_size",
            "steps",
            "held_out_accuracy",
            "final_loss",
        ],
    );
    let mut accuracy: Vec<Vec<(usize, f64)>> = vec![Vec::new(); norms.len()];
    for (k, ((m, t), s)) in runs.iter().zip(&summaries).enumerate() {
        table.push(row![
            norm_name(m.norm),
            t.batch_size,
            t.steps,
            s.held_out_accuracy,
            s.final_loss
        ]);
        accuracy[k / batch_sizes.len()].push((t.batch_size, s.held_out_accuracy));
    }

    // Noise of batch statistics: per-channel mean and std of the first
    // convolution's output over random batches of B images, against the
    // same over 2,000 images.
    let noise = statistics_noise(ctx, &batch_sizes, width)?;
    ctx.progress.inc(1);
    let mut noise_table = Table::new(
        "batch_size_noise.csv",
        &["batch_size", "mean_error", "std_error"],
    );
    for &(b, m, s) in &noise {
        noise_table.push(row![b, m, s]);
    }

    let figures = vec![
        LineChart {
            title: "Held-out accuracy against batch size".into(),
            x_label: "batch size (images, log scale)".into(),
            y_label: "held-out accuracy (%)".into(),
            x_scale: Scale::Log,
            y_scale: Scale::Linear,
            series: norms
                .iter()
                .zip(&accuracy)
                .map(|(&n, runs)| {
                    Series::new(
                        norm_name(n),
                        runs.iter().map(|&(b, a)| (b as f64, 100.0 * a)).collect(),
                    )
                })
                .collect(),
        }
        .figure(
            "batch_size_accuracy.svg",
            &format!(
                "{depth}-block CNN of width {width} trained {steps} steps at each batch size \
                 (AdamW, lr 2e-3), evaluated in evaluation mode."
            ),
        )?,
        LineChart {
            title: "Noise of batch statistics against batch size".into(),
            x_label: "batch size (images, log scale)".into(),
            y_label: "mean |error| / population std (log scale)".into(),
            x_scale: Scale::Log,
            y_scale: Scale::Log,
            series: vec![
                Series::new(
                    "batch mean",
                    noise.iter().map(|&(b, m, _)| (b as f64, m)).collect(),
                ),
                Series::new(
                    "batch std",
                    noise.iter().map(|&(b, _, s)| (b as f64, s)).collect(),
                ),
            ],
        }
        .figure(
            "batch_size_noise.svg",
            "How far one batch's per-channel statistics of the first convolution's output are \
             from those of 2,000 images, relative to the population std, averaged over channels \
             and 20 batches.",
        )?,
    ];
    let drop = |k: usize| {
        let runs = &accuracy[k];
        runs.last().map_or(0.0, |r| r.1) - runs.first().map_or(0.0, |r| r.1)
    };
    let (bn, gn, ln) = (drop(0), drop(1), drop(2));
    let verdict = verdict::batch_size(bn, ln, gn);
    let (smallest, largest) = (batch_sizes[0], *batch_sizes.last().unwrap_or(&0));
    let noise_ratio =
        noise.first().map_or(f64::NAN, |n| n.1) / noise.last().map_or(f64::NAN, |n| n.1);
    Ok(Findings {
        setup: format!(
            "{depth}-block CNNs (3×3 convolutions, width {width}, two max-pools, linear head), \
             each trained {steps} steps at batch sizes {batch_sizes:?} with AdamW \
             (lr 2e-3); normalizations batch, group (4 groups), layer, LRN (size 5)."
        ),
        rule: verdict::BATCH_SIZE_RULE,
        verdict,
        evidence: format!(
            "Accuracy drop from batch {largest} to batch {smallest}: BatchNorm {:.1} points, \
             GroupNorm {:.1}, LayerNorm {:.1}, LRN {:.1}. The error of a batch's mean is {:.1}× \
             larger at batch {smallest} than at batch {largest}. Accuracy at batch {smallest}: \
             BatchNorm {}, GroupNorm {}, LayerNorm {}.",
            100.0 * bn,
            100.0 * gn,
            100.0 * ln,
            100.0 * drop(3),
            noise_ratio,
            pct(accuracy[0][0].1),
            pct(accuracy[1][0].1),
            pct(accuracy[2][0].1)
        ),
        figures,
        tables: vec![table, noise_table],
    })
}

/// `(B, mean error, std error)` for each batch size.
fn statistics_noise(
    ctx: &Context,
    batch_sizes: &[usize],
    width: usize,
) -> Result<Vec<(usize, f64, f64)>> {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let config = ModelConfig {
        arch: Arch::Cnn,
        depth: 1,
        width,
        norm: NormKind::None,
        ..ModelConfig::default()
    };
    let model = Model::new(&config, ctx.train.dims(), ctx.train.classes, vb, ctx.seed)?;
    // Per-channel mean and std of the convolution output over a set of images.
    let channel_stats = |x: &candle_core::Tensor| -> Result<(Vec<f32>, Vec<f32>)> {
        let z = model.block_linear(0, x)?.transpose(0, 1)?.flatten_from(1)?;
        let mean = z.mean(D::Minus1)?;
        let std = z
            .broadcast_sub(&mean.unsqueeze(1)?)?
            .sqr()?
            .mean(D::Minus1)?
            .sqrt()?;
        Ok((mean.to_vec1()?, std.to_vec1()?))
    };
    let population = ctx.train.len().min(2000);
    let (pop_mean, pop_std) = channel_stats(&ctx.sample(population, 11)?.0)?;
    let mut out = Vec::new();
    for &b in batch_sizes {
        let (mut em, mut es) = (0.0, 0.0);
        const DRAWS: u64 = 20;
        for draw in 0..DRAWS {
            let (m, s) = channel_stats(&ctx.sample(b, 100 + draw)?.0)?;
            for c in 0..m.len() {
                let scale = pop_std[c].max(1e-12) as f64;
                em += ((m[c] - pop_mean[c]) as f64).abs() / scale;
                es += ((s[c] - pop_std[c]) as f64).abs() / scale;
            }
        }
        let n = (DRAWS as usize * pop_mean.len()) as f64;
        out.push((b, em / n, es / n));
    }
    Ok(out)
}

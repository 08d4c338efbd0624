//! `sync`: the cost of synchronizing BatchNorm's statistics across devices,
//! and what it buys.
//!
//! A data-parallel job of R ranks splits a global batch of B images into
//! per-rank batches of B/R. Plain BatchNorm normalizes each rank's batch by
//! itself, so its statistics get noisier as R grows; SyncBatchNorm combines
//! the ranks' moments at every normalization layer (one collective in
//! forward, one in backward) and normalizes with the global batch's. We time
//! a training step for both against R and compare their accuracy.
//!
//! Ranks here are threads of one process exchanging through a
//! [`ThreadGroup`], so the suite runs anywhere; the same training across
//! processes or machines is `normlab train` under `mpirun` (built with
//! `--features mpi`).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use normlab_candle::{Communicator, ThreadGroup};

use super::signal::norm_name;
use super::{pct, Context, Experiment, Findings, Table};
use crate::lab::model::{ModelConfig, NormKind};
use crate::lab::plot::{format_number, LineChart, Scale, Series};
use crate::lab::train::{self, TrainConfig, Trainer};
use crate::lab::verdict;
use crate::row;

/// The experiment.
pub const EXPERIMENT: Experiment = Experiment {
    name: "sync",
    title: "Synchronized BatchNorm across devices",
    claim: "Synchronizing BatchNorm's statistics across devices costs time at every step, and \
            keeps BatchNorm accurate when the per-device batch shrinks.",
    run,
};

/// One data-parallel run: ranks, seconds per step, held-out accuracy.
type RankRun = (usize, f64, f64);

/// Seconds per step on rank 0 and held-out accuracy of one data-parallel run.
fn data_parallel(
    ctx: &Context,
    model: &ModelConfig,
    config: &TrainConfig,
    ranks: usize,
) -> Result<(f64, f64)> {
    let group = ThreadGroup::new(ranks)?;
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|comm| {
                s.spawn(move || -> Result<Option<(f64, f64)>> {
                    let rank = comm.rank();
                    let comm: Arc<dyn Communicator> = Arc::new(comm);
                    let mut trainer = Trainer::new_on(model, config, ctx.train, comm)?;
                    let start = Instant::now();
                    for _ in 0..config.steps {
                        trainer.step()?;
                    }
                    let per_step = start.elapsed().as_secs_f64() / config.steps as f64;
                    if rank != 0 {
                        return Ok(None);
                    }
                    // Parameters are equal on every rank; rank 0's running
                    // statistics are used, as in PyTorch's data-parallel jobs.
                    let accuracy = train::accuracy(&trainer.model, ctx.held_out)?;
                    Ok(Some((per_step, accuracy)))
                })
            })
            .collect();
        let mut result = None;
        for h in handles {
            if let Some(r) = h.join().expect("rank thread panicked")? {
                result = Some(r);
            }
        }
        Ok(result.expect("rank 0 reports"))
    })
}

fn run(ctx: &Context) -> Result<Findings> {
    let p = ctx.profile;
    let global_batch = 64;
    let ranks: Vec<usize> = p.pick(vec![1, 4], vec![1, 2, 4, 8, 16], vec![1, 2, 4, 8, 16, 32]);
    let steps = p.pick(10, 200, 1000);
    let norms = [NormKind::Batch, NormKind::SyncBatch];
    ctx.progress.set_length((ranks.len() * norms.len()) as u64);
    let config = TrainConfig::sgd(0.05, global_batch, steps, ctx.seed);
    let mut table = Table::new(
        "sync.csv",
        &[
            "norm",
            "ranks",
            "per_rank_batch",
            "ms_per_step",
            "held_out_accuracy",
        ],
    );
    // results[norm] = [(ranks, seconds per step, accuracy)]
    let mut results: Vec<Vec<RankRun>> = Vec::new();
    for &norm in &norms {
        let model = ModelConfig {
            depth: 6,
            width: 64,
            norm,
            ..ModelConfig::default()
        };
        let mut rows = Vec::new();
        for &r in &ranks {
            let (per_step, accuracy) = data_parallel(ctx, &model, &config, r)?;
            table.push(row![
                norm_name(norm),
                r,
                global_batch / r,
                1e3 * per_step,
                accuracy
            ]);
            rows.push((r, per_step, accuracy));
            ctx.progress.inc(1);
        }
        results.push(rows);
    }
    let label = |n: NormKind| match n {
        NormKind::SyncBatch => "SyncBatchNorm (global statistics)".to_string(),
        _ => "BatchNorm (per-rank statistics)".to_string(),
    };
    // One series per normalization, a point per rank count.
    let series = |point: &dyn Fn(&RankRun) -> (f64, f64)| -> Vec<Series> {
        norms
            .iter()
            .zip(&results)
            .map(|(&n, rows)| Series::new(label(n), rows.iter().map(point).collect()))
            .collect()
    };
    let figures = vec![
        LineChart {
            title: "Time per training step against ranks".into(),
            x_label: "ranks (threads; log scale)".into(),
            y_label: "ms per step (rank 0)".into(),
            x_scale: Scale::Log,
            y_scale: Scale::Linear,
            series: series(&|r| (r.0 as f64, 1e3 * r.1)),
        }
        .figure(
            "sync_time.svg",
            &format!(
                "Wall time per step of a 6-block MLP on a global batch of {global_batch}, split \
                 over the ranks (threads of one process on this machine's cores)."
            ),
        )?,
        LineChart {
            title: "Accuracy against per-rank batch".into(),
            x_label: "images per rank (log scale)".into(),
            y_label: "held-out accuracy (%)".into(),
            x_scale: Scale::Log,
            y_scale: Scale::Linear,
            series: series(&|r| ((global_batch / r.0) as f64, 100.0 * r.2)),
        }
        .figure(
            "sync_accuracy.svg",
            &format!(
                "Held-out accuracy after {steps} steps on the same global batches, with per-rank \
                 or synchronized statistics."
            ),
        )?,
    ];
    // Overhead at each R > 1, and accuracy at the smallest per-rank batch.
    let overheads: Vec<f64> = results[0]
        .iter()
        .zip(&results[1])
        .filter(|(b, _)| b.0 > 1)
        .map(|(b, s)| s.1 / b.1)
        .collect();
    let (plain_small, sync_small) = (
        results[0].last().map_or(f64::NAN, |r| r.2),
        results[1].last().map_or(f64::NAN, |r| r.2),
    );
    let verdict = verdict::sync(&overheads, plain_small, sync_small);
    let smallest = global_batch / ranks.last().copied().unwrap_or(1);
    Ok(Findings {
        setup: format!(
            "6-block ReLU MLPs of width 64 (placement A) trained {steps} steps on global batches \
             of {global_batch} (SGD, momentum 0.9, lr 0.05), data-parallel over {ranks:?} ranks \
             (threads exchanging through a ThreadGroup: the global batch is identical for every \
             R, gradients are summed over ranks each step), with per-rank BatchNorm or \
             SyncBatchNorm."
        ),
        rule: verdict::SYNC_RULE,
        verdict,
        evidence: format!(
            "SyncBatchNorm's step time relative to per-rank BatchNorm at {} ranks: {}. At {} \
             images per rank: per-rank BatchNorm {}, SyncBatchNorm {} (one rank: {}).",
            ranks[1..]
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            overheads
                .iter()
                .map(|o| format!("{}×", format_number(*o)))
                .collect::<Vec<_>>()
                .join(", "),
            smallest,
            pct(plain_small),
            pct(sync_small),
            pct(results[1][0].2)
        ),
        figures,
        tables: vec![table],
    })
}

//! `placement`: option A (normalization before the non-linearity, with γ/β)
//! against option B (after it). Without γ/β, option A feeds the ReLU values
//! of zero mean per feature, so about half of them are cut to 0, and nothing
//! can move that threshold; γ and β let the network choose.

use anyhow::Result;

use super::{mean, pct, Context, Experiment, Findings, RunningSnapshot, Table};
use crate::lab::model::{ModelConfig, Placement};
use crate::lab::plot::{LineChart, Scale, Series};
use crate::lab::train::{TrainConfig, Trainer};
use crate::lab::verdict;
use crate::row;

/// The experiment.
pub const EXPERIMENT: Experiment = Experiment {
    name: "placement",
    title: "Before or after the non-linearity, with or without γ/β",
    claim: "Option A (normalize before the non-linearity, with γ/β) against option B (after it); \
            without γ/β, option A loses half its activations to ReLU.",
    run,
};

/// One variant's measurements.
struct Variant {
    label: String,
    losses: Vec<f64>,
    dead_at_init: Vec<f64>,
    dead_after: Vec<f64>,
    accuracy: f64,
}

fn run(ctx: &Context) -> Result<Findings> {
    let p = ctx.profile;
    let depth = p.pick(3, 8, 8);
    let width = p.pick(32, 128, 128);
    let steps = p.pick(30, 400, 1500);
    let variants = [
        (Placement::A, true),
        (Placement::A, false),
        (Placement::B, true),
        (Placement::B, false),
    ];
    ctx.progress.set_length(variants.len() as u64);
    let (probe, _) = ctx.sample(512.min(ctx.train.len()), 5)?;
    let train = TrainConfig::sgd(0.02, 64, steps, ctx.seed);
    // The four variants train side by side (one 8 × 128 MLP cannot keep two
    // cores busy); each is seeded by its own configuration.
    use rayon::prelude::*;
    let results: Vec<Variant> = variants
        .par_iter()
        .with_max_len(1)
        .map(|&(placement, affine)| -> Result<Variant> {
            let model = ModelConfig {
                depth,
                width,
                placement,
                affine,
                ..ModelConfig::default()
            };
            let mut trainer = Trainer::new(&model, &train, ctx.train)?;
            // Dead fractions with batch statistics of a fixed probe batch; the
            // probe must not count in the running statistics.
            let dead = |t: &Trainer| -> Result<Vec<f64>> {
                let snapshot = RunningSnapshot::take(&t.map)?;
                let (_, stats) = t.model.forward_recorded(&probe, true, true)?;
                snapshot.restore()?;
                Ok(stats.iter().map(|s| s.dead_fraction).collect())
            };
            let dead_at_init = dead(&trainer)?;
            for _ in 0..steps {
                trainer.step()?;
                if trainer.diverged() {
                    break;
                }
            }
            let dead_after = dead(&trainer)?;
            let summary = trainer.summary(ctx.held_out)?;
            let variant = Variant {
                label: format!(
                    "{} {}",
                    if placement == Placement::A { "A" } else { "B" },
                    if affine {
                        "with γ/β"
                    } else {
                        "without γ/β"
                    }
                ),
                losses: summary.losses,
                dead_at_init,
                dead_after,
                accuracy: summary.held_out_accuracy,
            };
            ctx.progress.inc(1);
            Ok(variant)
        })
        .collect::<Result<_>>()?;
    let mut table = Table::new(
        "placement.csv",
        &[
            "variant",
            "block",
            "dead_fraction_init",
            "dead_fraction_trained",
        ],
    );
    let mut curves = Table::new("placement_loss.csv", &["variant", "step", "loss"]);
    for v in &results {
        for (b, (i, a)) in v.dead_at_init.iter().zip(&v.dead_after).enumerate() {
            table.push(row![v.label, b + 1, i, a]);
        }
        for (s, l) in v.losses.iter().enumerate() {
            curves.push(row![v.label, s + 1, l]);
        }
    }
    let window = (steps / 20).max(1);
    let figures = vec![
        LineChart {
            title: "Training loss, placements A and B".into(),
            x_label: "step".into(),
            y_label: format!("cross-entropy, mean of {window} steps (log scale)"),
            x_scale: Scale::Linear,
            y_scale: Scale::Log,
            series: results
                .iter()
                .map(|v| {
                    let pts = v
                        .losses
                        .chunks(window)
                        .enumerate()
                        .map(|(i, c)| (((i + 1) * window) as f64, mean(c)))
                        .collect();
                    Series::new(v.label.clone(), pts)
                })
                .collect(),
        }
        .figure(
            "placement_loss.svg",
            &format!(
                "Training loss of {depth}-block BatchNorm MLPs of width {width}, \
                 placement A (linear → BN → ReLU) or B (linear → ReLU → BN)."
            ),
        )?,
        LineChart {
            title: "Dead ReLUs by block after training".into(),
            x_label: "block (depth)".into(),
            y_label: "fraction of ReLU outputs equal to 0".into(),
            x_scale: Scale::Linear,
            y_scale: Scale::Linear,
            series: results
                .iter()
                .map(|v| {
                    let pts = v
                        .dead_after
                        .iter()
                        .enumerate()
                        .map(|(b, &d)| ((b + 1) as f64, d))
                        .collect();
                    Series::new(v.label.clone(), pts)
                })
                .collect(),
        }
        .figure(
            "placement_dead.svg",
            "Fraction of each block's ReLU outputs that are exactly 0 on a batch of 512 training \
             images (batch statistics), after training.",
        )?,
    ];
    let a_plain = &results[1];
    let verdict = verdict::placement(mean(&a_plain.dead_at_init), mean(&a_plain.dead_after));
    let describe: Vec<String> = results
        .iter()
        .map(|v| {
            format!(
                "{}: dead {:.2} at init, {:.2} trained, accuracy {}",
                v.label,
                mean(&v.dead_at_init),
                mean(&v.dead_after),
                pct(v.accuracy)
            )
        })
        .collect();
    Ok(Findings {
        setup: format!(
            "{depth}-block ReLU MLPs of width {width} with BatchNorm, Kaiming initialization; \
             SGD with momentum 0.9, lr 0.02, batch 64, {steps} steps; dead fractions on a fixed \
             batch of 512 training images."
        ),
        rule: verdict::PLACEMENT_RULE,
        verdict,
        evidence: format!("{}.", describe.join("; ")),
        figures,
        tables: vec![table, curves],
    })
}

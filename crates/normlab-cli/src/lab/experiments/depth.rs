//! `depth`: plain networks stop training beyond about 10–12 layers;
//! normalized ones train to 20–30; deeper still, other difficulties appear.
//!
//! MLPs of increasing depth, each trained for the same number of steps with
//! the same optimizer, initialized with Xavier's scheme (the classical
//! choice before normalization; with ReLU it halves the signal's second
//! moment per layer).

use anyhow::Result;

use super::signal::norm_name;
use super::{pct, Context, Experiment, Findings, Table};
use crate::lab::model::{InitScheme, ModelConfig, NormKind};
use crate::lab::plot::{LineChart, Scale, Series};
use crate::lab::train::TrainConfig;
use crate::lab::verdict::{self, trainable_depth, TRAINS_FRACTION};
use crate::row;

/// The experiment.
pub const EXPERIMENT: Experiment = Experiment {
    name: "depth",
    title: "How deep can a network be and still train?",
    claim: "Plain networks stop training beyond about 10–12 layers; normalized ones train to \
            20–30 layers; deeper still, other difficulties appear.",
    run,
};

fn run(ctx: &Context) -> Result<Findings> {
    let p = ctx.profile;
    let depths: Vec<usize> = p.pick(
        vec![2, 8, 24],
        vec![2, 4, 8, 12, 16, 20, 24, 32],
        vec![2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 64],
    );
    let norms: Vec<NormKind> = p.pick(
        vec![NormKind::None, NormKind::Batch, NormKind::Layer],
        vec![NormKind::None, NormKind::Batch, NormKind::Layer],
        vec![
            NormKind::None,
            NormKind::Batch,
            NormKind::Layer,
            NormKind::Group(8),
            NormKind::Rms,
        ],
    );
    let width = p.pick(32, 64, 128);
    let steps = p.pick(40, 800, 3000);
    let classes = ctx.train.classes;
    let train_config = TrainConfig::sgd(0.02, 64, steps, ctx.seed);
    ctx.progress.set_length((depths.len() * norms.len()) as u64);
    let mut table = Table::new(
        "depth.csv",
        &[
            "norm",
            "depth",
            "final_loss",
            "held_out_accuracy",
            "diverged",
            "seconds",
        ],
    );
    let runs: Vec<(ModelConfig, TrainConfig)> = norms
        .iter()
        .flat_map(|&norm| {
            let train_config = train_config.clone();
            depths.iter().map(move |&depth| {
                let model = ModelConfig {
                    depth,
                    width,
                    norm,
                    init: InitScheme::Xavier,
                    ..ModelConfig::default()
                };
                (model, train_config.clone())
            })
        })
        .collect();
    let summaries = ctx.train_many(&runs)?;
    // results[norm] = [(depth, accuracy, final loss)]
    let mut results: Vec<Vec<(usize, f64, f64)>> = vec![Vec::new(); norms.len()];
    for (k, ((model, _), s)) in runs.iter().zip(&summaries).enumerate() {
        table.push(row![
            norm_name(model.norm),
            model.depth,
            s.final_loss,
            s.held_out_accuracy,
            s.diverged,
            s.seconds
        ]);
        results[k / depths.len()].push((model.depth, s.held_out_accuracy, s.final_loss));
    }
    let series = |f: fn(&(usize, f64, f64)) -> f64| -> Vec<Series> {
        norms
            .iter()
            .zip(&results)
            .map(|(&n, runs)| {
                Series::new(
                    norm_name(n),
                    runs.iter().map(|r| (r.0 as f64, f(r))).collect(),
                )
            })
            .collect()
    };
    let figures = vec![
        LineChart {
            title: "Held-out accuracy against depth".into(),
            x_label: "hidden blocks (log scale)".into(),
            y_label: "held-out accuracy (%)".into(),
            x_scale: Scale::Log,
            y_scale: Scale::Linear,
            series: series(|r| 100.0 * r.1),
        }
        .figure(
            "depth_accuracy.svg",
            &format!("Accuracy on the held-out images after {steps} SGD steps, by depth."),
        )?,
        LineChart {
            title: "Final training loss against depth".into(),
            x_label: "hidden blocks (log scale)".into(),
            y_label: "cross-entropy, last 10% of steps (log scale)".into(),
            x_scale: Scale::Log,
            y_scale: Scale::Log,
            series: series(|r| r.2),
        }
        .figure(
            "depth_loss.svg",
            &format!(
                "Mean training loss over the last tenth of the steps (ln {classes} ≈ {:.2} is chance).",
                (classes as f64).ln()
            ),
        )?,
    ];
    let acc = |runs: &Vec<(usize, f64, f64)>| runs.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>();
    let plain = acc(&results[0]);
    let normalized: Vec<Vec<(usize, f64)>> = results[1..].iter().map(acc).collect();
    let verdict = verdict::depth(&plain, &normalized);
    let best = results.iter().flatten().map(|r| r.1).fold(0.0, f64::max);
    let threshold = TRAINS_FRACTION * best;
    let limits: Vec<String> = norms
        .iter()
        .zip(&results)
        .map(|(&n, runs)| {
            let deepest = runs.last().map_or(0.0, |r| r.1);
            format!(
                "{} trains to depth {} (at depth {}: {})",
                norm_name(n),
                trainable_depth(&acc(runs), threshold),
                depths.last().copied().unwrap_or(0),
                pct(deepest)
            )
        })
        .collect();
    Ok(Findings {
        setup: format!(
            "ReLU MLPs of width {width}, depths {depths:?}, Xavier initialization, placement A; \
             SGD with momentum 0.9, learning rate 0.02, batch 64, {steps} steps; held-out \
             accuracy in evaluation mode."
        ),
        rule: verdict::DEPTH_RULE,
        verdict,
        evidence: format!(
            "Best accuracy {}; a run trains at ≥ {}. {}.",
            pct(best),
            pct(threshold),
            limits.join("; ")
        ),
        figures,
        tables: vec![table],
    })
}

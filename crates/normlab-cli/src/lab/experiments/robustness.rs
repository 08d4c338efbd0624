//! `robustness`: BatchNorm tolerates poor initialization and supports higher
//! learning rates. A grid of initialization scale σ (weights from N(0, σ²))
//! × learning rate, trained without and with BatchNorm.

use anyhow::Result;

use super::{pct, Context, Experiment, Findings, Table};
use crate::lab::model::{InitScheme, ModelConfig, NormKind};
use crate::lab::plot::{format_number, Heatmap};
use crate::lab::train::TrainConfig;
use crate::lab::verdict::{self, TRAINS_FRACTION};
use crate::row;

/// The experiment.
pub const EXPERIMENT: Experiment = Experiment {
    name: "robustness",
    title: "Robustness to initialization and learning rate",
    claim: "BatchNorm tolerates poor initialization and supports higher learning rates.",
    run,
};

fn run(ctx: &Context) -> Result<Findings> {
    let p = ctx.profile;
    let mut sigmas: Vec<f64> = p.pick(
        vec![0.01, 0.3],
        vec![0.01, 0.03, 0.1, 0.3, 1.0],
        vec![0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
    );
    let lrs: Vec<f64> = p.pick(
        vec![0.01, 0.3],
        vec![0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
        vec![0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
    );
    let depth = p.pick(4, 8, 12);
    let width = p.pick(32, 64, 128);
    let steps = p.pick(30, 250, 1000);
    // Kaiming's σ for the hidden layers, the scale a plain network needs.
    let kaiming = (2.0 / width as f64).sqrt();
    sigmas.push(kaiming);
    sigmas.sort_by(f64::total_cmp);
    let norms = [NormKind::None, NormKind::Batch];
    let mut runs = Vec::new();
    for &norm in &norms {
        for &sigma in &sigmas {
            for &lr in &lrs {
                let model = ModelConfig {
                    depth,
                    width,
                    norm,
                    init: InitScheme::Normal(sigma),
                    ..ModelConfig::default()
                };
                let train = TrainConfig::sgd(lr, 64, steps, ctx.seed);
                runs.push((model, train));
            }
        }
    }
    ctx.progress.set_length(runs.len() as u64);
    let summaries = ctx.train_many(&runs)?;
    let mut table = Table::new(
        "robustness.csv",
        &[
            "norm",
            "init_sigma",
            "lr",
            "held_out_accuracy",
            "final_loss",
            "diverged",
        ],
    );
    for ((m, t), s) in runs.iter().zip(&summaries) {
        let sigma = match m.init {
            InitScheme::Normal(s) => s,
            _ => f64::NAN,
        };
        table.push(row![
            super::signal::norm_name(m.norm),
            sigma,
            t.lr,
            s.held_out_accuracy,
            s.final_loss,
            s.diverged
        ]);
    }
    // grids[norm][sigma][lr]
    let per_norm = sigmas.len() * lrs.len();
    let grids: Vec<Vec<Vec<f64>>> = (0..norms.len())
        .map(|k| {
            summaries[k * per_norm..(k + 1) * per_norm]
                .chunks(lrs.len())
                .map(|row| row.iter().map(|s| s.held_out_accuracy).collect())
                .collect()
        })
        .collect();
    let mut figures = Vec::new();
    for (k, label) in ["without normalization", "with BatchNorm"]
        .iter()
        .enumerate()
    {
        figures.push(
            Heatmap {
                title: format!("Held-out accuracy {label}"),
                x_label: "learning rate (SGD, momentum 0.9)".into(),
                y_label: "initialization σ (weights ~ N(0, σ²))".into(),
                columns: lrs.iter().map(|&v| format_number(v)).collect(),
                rows: sigmas.iter().map(|&v| format_number(v)).collect(),
                values: grids[k]
                    .iter()
                    .map(|r| r.iter().map(|&a| Some(100.0 * a)).collect())
                    .collect(),
                value_label: "held-out accuracy (%)".into(),
                range: (0.0, 100.0),
            }
            .figure(
                &format!("robustness_{}.svg", ["plain", "batch"][k]),
                &format!(
                    "Accuracy after {steps} steps, {depth}-block MLP {label}, for each \
                     initialization scale and learning rate."
                ),
            )?,
        );
    }
    let verdict = verdict::robustness(&grids[0], &grids[1], &lrs);
    let best = grids
        .iter()
        .flatten()
        .flatten()
        .copied()
        .fold(0.0, f64::max);
    let threshold = TRAINS_FRACTION * best;
    let count = |g: &Vec<Vec<f64>>| g.iter().flatten().filter(|&&a| a >= threshold).count();
    let max_lr = |g: &Vec<Vec<f64>>| {
        g.iter()
            .flat_map(|r| r.iter().zip(&lrs))
            .filter(|(&a, _)| a >= threshold)
            .map(|(_, &lr)| lr)
            .fold(0.0, f64::max)
    };
    Ok(Findings {
        setup: format!(
            "{depth}-block ReLU MLPs of width {width}, weights from N(0, σ²) for σ in {:?} \
             (σ = {kaiming:.3} is Kaiming's for the hidden layers), \
             learning rates {lrs:?}, SGD with momentum 0.9, batch 64, {steps} steps; without \
             normalization and with BatchNorm (placement A).",
            sigmas.iter().map(|&s| format_number(s)).collect::<Vec<_>>()
        ),
        rule: verdict::ROBUSTNESS_RULE,
        verdict,
        evidence: format!(
            "A cell trains at ≥ {} (80% of the best, {}). Plain: {} of {} cells train, largest \
             learning rate that trains {}. BatchNorm: {} of {} cells, largest learning rate {}.",
            pct(threshold),
            pct(best),
            count(&grids[0]),
            per_norm,
            format_number(max_lr(&grids[0])),
            count(&grids[1]),
            per_norm,
            format_number(max_lr(&grids[1]))
        ),
        figures,
        tables: vec![table],
    })
}

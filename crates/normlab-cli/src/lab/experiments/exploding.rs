//! `exploding`: normalization tames exploding activations but not exploding
//! gradients, which still need a lower learning rate.
//!
//! Deep MLPs initialized too large (σ = 3/√W: each ReLU layer multiplies the
//! signal's second moment by 4.5): activation magnitudes and the backward
//! signal at every block, and the largest learning rate that still trains,
//! against the same networks at Kaiming initialization.

use anyhow::Result;

use super::signal::norm_name;
use super::{pct, Context, Experiment, Findings, Table};
use crate::lab::model::{InitScheme, Model, ModelConfig, NormKind};
use crate::lab::plot::{format_number, LineChart, Scale, Series};
use crate::lab::train::TrainConfig;
use crate::lab::verdict::{self, spread, ExplodingNormalized, TRAINS_FRACTION};
use crate::row;

/// The experiment.
pub const EXPERIMENT: Experiment = Experiment {
    name: "exploding",
    title: "Exploding activations and gradients",
    claim: "Normalization tames exploding activations but not exploding gradients, which still \
            need a lower learning rate.",
    run,
};

fn run(ctx: &Context) -> Result<Findings> {
    let p = ctx.profile;
    let depth = p.pick(6, 24, 32);
    let width = p.pick(32, 64, 128);
    let steps = p.pick(20, 150, 500);
    let lrs: Vec<f64> = p.pick(
        vec![0.01, 0.3],
        vec![0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
        vec![0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
    );
    let large = 3.0 / (width as f64).sqrt();
    let norms = [NormKind::None, NormKind::Batch, NormKind::Layer];
    let inits = [
        ("large", InitScheme::Normal(large)),
        ("Kaiming", InitScheme::Kaiming),
    ];
    let mut runs = Vec::new();
    for &norm in &norms {
        for (_, init) in inits {
            for &lr in &lrs {
                let model = ModelConfig {
                    depth,
                    width,
                    norm,
                    init,
                    ..ModelConfig::default()
                };
                let train = TrainConfig::sgd(lr, 64, steps, ctx.seed);
                runs.push((model, train));
            }
        }
    }
    ctx.progress
        .set_length(runs.len() as u64 + norms.len() as u64);

    // Signals at the large initialization.
    let (x, y) = ctx.sample(256.min(ctx.train.len()), 61)?;
    let mut signal_table = Table::new(
        "exploding_signal.csv",
        &["norm", "block", "activation_std", "output_gradient_norm"],
    );
    let mut signals = Vec::new();
    for &norm in &norms {
        let config = ModelConfig {
            depth,
            width,
            norm,
            init: InitScheme::Normal(large),
            ..ModelConfig::default()
        };
        let map = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(
            &map,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        );
        let model = Model::new(&config, ctx.train.dims(), ctx.train.classes, vb, ctx.seed)?;
        let (stats, grads) =
            model.backward_signal(&x, true, |l| candle_nn::loss::cross_entropy(l, &y))?;
        let act: Vec<f64> = stats.iter().map(|s| s.std).collect();
        for (b, (a, g)) in act.iter().zip(&grads).enumerate() {
            signal_table.push(row![norm_name(norm), b + 1, a, g]);
        }
        signals.push((act, grads));
        ctx.progress.inc(1);
    }

    let summaries = ctx.train_many(&runs)?;
    let mut lr_table = Table::new(
        "exploding_lr.csv",
        &["norm", "init", "lr", "held_out_accuracy", "diverged"],
    );
    for ((m, t), s) in runs.iter().zip(&summaries) {
        let init = if m.init == InitScheme::Kaiming {
            "Kaiming"
        } else {
            "large"
        };
        lr_table.push(row![
            norm_name(m.norm),
            init,
            t.lr,
            s.held_out_accuracy,
            s.diverged
        ]);
    }
    let best = summaries
        .iter()
        .map(|s| s.held_out_accuracy)
        .fold(0.0, f64::max);
    let threshold = TRAINS_FRACTION * best;
    // accuracy[norm][init] over lrs
    let accuracy = |n: usize, i: usize| -> Vec<f64> {
        let start = (n * inits.len() + i) * lrs.len();
        summaries[start..start + lrs.len()]
            .iter()
            .map(|s| s.held_out_accuracy)
            .collect()
    };
    let max_lr = |acc: &[f64]| {
        acc.iter()
            .zip(&lrs)
            .filter(|(&a, _)| a >= threshold)
            .map(|(_, &lr)| lr)
            .fold(0.0, f64::max)
    };

    // signals[norm] = (activation std, backward signal) per block
    type Signal = (Vec<f64>, Vec<f64>);
    let per_block = |f: fn(&Signal) -> &Vec<f64>| -> Vec<Series> {
        norms
            .iter()
            .zip(&signals)
            .map(|(&n, s)| {
                Series::new(
                    norm_name(n),
                    f(s).iter()
                        .enumerate()
                        .map(|(b, &v)| ((b + 1) as f64, v))
                        .collect(),
                )
            })
            .collect()
    };
    let mut lr_series = Vec::new();
    for (n, &norm) in norms.iter().enumerate() {
        for (i, (init_name, _)) in inits.iter().enumerate() {
            lr_series.push(Series::new(
                format!("{} · {init_name}", norm_name(norm)),
                lrs.iter()
                    .zip(accuracy(n, i))
                    .map(|(&lr, a)| (lr, 100.0 * a))
                    .collect(),
            ));
        }
    }
    let figures = vec![
        LineChart {
            title: format!("Activations at a large initialization (σ = {large:.3})"),
            x_label: "block (depth)".into(),
            y_label: "std of block output (log scale)".into(),
            x_scale: Scale::Linear,
            y_scale: Scale::Log,
            series: per_block(|s| &s.0),
        }
        .figure(
            "exploding_activations.svg",
            &format!("Standard deviation of each block's output at initialization, {depth}-block MLPs of width {width}."),
        )?,
        LineChart {
            title: "Backward signal at a large initialization".into(),
            x_label: "block (depth)".into(),
            y_label: "‖∂loss/∂h‖₂ of block output (log scale)".into(),
            x_scale: Scale::Linear,
            y_scale: Scale::Log,
            series: per_block(|s| &s.1),
        }
        .figure(
            "exploding_gradients.svg",
            "Norm of the loss gradient with respect to each block's output at initialization.",
        )?,
        LineChart {
            title: "Accuracy against learning rate".into(),
            x_label: "learning rate (SGD, momentum 0.9; log scale)".into(),
            y_label: "held-out accuracy (%)".into(),
            x_scale: Scale::Log,
            y_scale: Scale::Linear,
            series: lr_series,
        }
        .figure(
            "exploding_lr.svg",
            &format!("Held-out accuracy after {steps} steps at each learning rate, at the large and at Kaiming initialization."),
        )?,
    ];
    let normalized: Vec<ExplodingNormalized> = (1..norms.len())
        .map(|n| ExplodingNormalized {
            activation_spread: spread(&signals[n].0),
            gradient_spread: spread(&signals[n].1),
            max_lr_large_init: max_lr(&accuracy(n, 0)),
            max_lr_kaiming: max_lr(&accuracy(n, 1)),
        })
        .collect();
    let plain_spread = spread(&signals[0].0);
    let verdict = verdict::exploding(plain_spread, &normalized);
    let describe: Vec<String> = normalized
        .iter()
        .zip(&norms[1..])
        .map(|(e, &n)| {
            format!(
                "{}: activation spread {}, gradient spread {}, largest training lr {} (large init) vs {} (Kaiming)",
                norm_name(n),
                format_number(e.activation_spread),
                format_number(e.gradient_spread),
                format_number(e.max_lr_large_init),
                format_number(e.max_lr_kaiming)
            )
        })
        .collect();
    Ok(Findings {
        setup: format!(
            "{depth}-block ReLU MLPs of width {width}, weights from N(0, σ²) with σ = 3/√width = \
             {large:.3}, and at Kaiming initialization; SGD with momentum 0.9, batch 64, {steps} \
             steps, learning rates {lrs:?}; a run trains at ≥ 80% of the best accuracy ({})",
            pct(best)
        ),
        rule: verdict::EXPLODING_RULE,
        verdict,
        evidence: format!(
            "Plain network: activation spread {}, largest training lr {} (large init). {}.",
            format_number(plain_spread),
            format_number(max_lr(&accuracy(0, 0))),
            describe.join("; ")
        ),
        figures,
        tables: vec![signal_table, lr_table],
    })
}

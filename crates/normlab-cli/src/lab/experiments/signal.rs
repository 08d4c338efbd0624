//! `signal`: at initialization, without normalization, activations and
//! gradients vanish or explode with depth; with normalization their
//! magnitudes stay stable.
//!
//! For a deep ReLU MLP, each linear layer multiplies the second moment of
//! its input by `fan_in · σ_w² / 2` (the ReLU keeps half). Kaiming's
//! `σ_w² = 2/fan_in` makes that factor 1; Xavier's `1/fan_in` halves it at
//! every layer (vanishing); a larger σ_w grows it (exploding). A
//! normalization resets the scale at every block.

use anyhow::Result;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

use super::{Context, Experiment, Findings, Table};
use crate::lab::model::{InitScheme, Model, ModelConfig, NormKind};
use crate::lab::plot::{LineChart, Scale, Series};
use crate::lab::verdict::{self, spread};
use crate::row;

/// The experiment.
pub const EXPERIMENT: Experiment = Experiment {
    name: "signal",
    title: "Signals vanish or explode without normalization",
    claim: "Without normalization, activations and gradients vanish or explode with depth; \
            with it their magnitudes stay stable.",
    run,
};

/// Per-block measurements of one network at initialization.
struct Profile {
    norm: NormKind,
    init_name: String,
    activation_std: Vec<f64>,
    gradient_norm: Vec<f64>,
}

fn run(ctx: &Context) -> Result<Findings> {
    let p = ctx.profile;
    let depth = p.pick(12, 50, 50);
    let width = p.pick(32, 128, 256);
    let batch = p.pick(64, 256, 512);
    // σ = 2/√width gives a per-layer second-moment factor of 2: exploding.
    let large = 2.0 / (width as f64).sqrt();
    let inits = [
        ("Kaiming".to_string(), InitScheme::Kaiming),
        ("Xavier".to_string(), InitScheme::Xavier),
        (format!("N(0, {large:.3}²)"), InitScheme::Normal(large)),
    ];
    let norms = [
        NormKind::None,
        NormKind::Batch,
        NormKind::Layer,
        NormKind::Group(8),
    ];
    ctx.progress.set_length((inits.len() * norms.len()) as u64);
    let (x, y) = ctx.sample(batch, 1)?;
    let mut profiles = Vec::new();
    for (init_name, init) in &inits {
        for &norm in &norms {
            let config = ModelConfig {
                depth,
                width,
                norm,
                init: *init,
                ..ModelConfig::default()
            };
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
            let model = Model::new(&config, ctx.train.dims(), ctx.train.classes, vb, ctx.seed)?;
            let (stats, gradient_norm) = model.backward_signal(&x, true, |logits| {
                candle_nn::loss::cross_entropy(logits, &y)
            })?;
            profiles.push(Profile {
                norm,
                init_name: init_name.clone(),
                activation_std: stats.iter().map(|s| s.std).collect(),
                gradient_norm,
            });
            ctx.progress.inc(1);
        }
    }

    let mut table = Table::new(
        "signal.csv",
        &[
            "init",
            "norm",
            "block",
            "activation_std",
            "output_gradient_norm",
        ],
    );
    for pr in &profiles {
        for (b, (a, g)) in pr.activation_std.iter().zip(&pr.gradient_norm).enumerate() {
            table.push(row![pr.init_name, norm_name(pr.norm), b + 1, a, g]);
        }
    }
    let mut figures = Vec::new();
    for (k, (init_name, _)) in inits.iter().enumerate() {
        let of_init: Vec<&Profile> = profiles
            .iter()
            .filter(|p| &p.init_name == init_name)
            .collect();
        let series = |f: fn(&Profile) -> &Vec<f64>| -> Vec<Series> {
            of_init
                .iter()
                .map(|p| {
                    let pts = f(p)
                        .iter()
                        .enumerate()
                        .map(|(b, &v)| ((b + 1) as f64, v))
                        .collect();
                    Series::new(norm_name(p.norm), pts)
                })
                .collect()
        };
        figures.push(
            LineChart {
                title: format!("Activation std by block, {init_name} init"),
                x_label: "block (depth)".into(),
                y_label: "std of block output (log scale)".into(),
                x_scale: Scale::Linear,
                y_scale: Scale::Log,
                series: series(|p| &p.activation_std),
            }
            .figure(
                &format!("signal_activations_{k}.svg"),
                &format!(
                    "Standard deviation of each block's output at initialization ({init_name}), \
                     {depth}-block ReLU MLP of width {width}, one batch of {batch} images."
                ),
            )?,
        );
        figures.push(
            LineChart {
                title: format!("Backward signal by block, {init_name} init"),
                x_label: "block (depth)".into(),
                y_label: "‖∂loss/∂h‖₂ of block output (log scale)".into(),
                x_scale: Scale::Linear,
                y_scale: Scale::Log,
                series: series(|p| &p.gradient_norm),
            }
            .figure(
                &format!("signal_gradients_{k}.svg"),
                &format!(
                    "L2 norm over the batch of the loss gradient with respect to each block's \
                     output at initialization ({init_name}): the signal backpropagation carries."
                ),
            )?,
        );
    }

    let spreads = |plain: bool| -> Vec<(f64, f64)> {
        profiles
            .iter()
            .filter(|p| (p.norm == NormKind::None) == plain)
            .map(|p| (spread(&p.activation_std), spread(&p.gradient_norm)))
            .collect()
    };
    let (plain, normalized) = (spreads(true), spreads(false));
    let verdict = verdict::signal(&plain, &normalized);
    let describe = |pr: &Profile| {
        format!(
            "{} with {} init: activation spread {}, gradient spread {}",
            norm_name(pr.norm),
            pr.init_name,
            crate::lab::plot::format_number(spread(&pr.activation_std)),
            crate::lab::plot::format_number(spread(&pr.gradient_norm))
        )
    };
    let worst_normalized = profiles
        .iter()
        .filter(|p| p.norm != NormKind::None)
        .max_by(|a, b| {
            let s = |p: &Profile| spread(&p.activation_std).max(spread(&p.gradient_norm));
            s(a).total_cmp(&s(b))
        })
        .map(describe)
        .unwrap_or_default();
    let plain_lines: Vec<String> = profiles
        .iter()
        .filter(|p| p.norm == NormKind::None)
        .map(describe)
        .collect();
    Ok(Findings {
        setup: format!(
            "{depth}-block ReLU MLPs of width {width} (placement A, affine), at initialization, \
             on one batch of {batch} training images (training-mode statistics); \
             initializations Kaiming, Xavier and N(0, σ²) with σ = 2/√width = {large:.3}; \
             normalizations none, batch, layer, group (8 groups)."
        ),
        rule: verdict::SIGNAL_RULE,
        verdict,
        evidence: format!(
            "Without normalization: {}. Worst normalized network: {}.",
            plain_lines.join("; "),
            worst_normalized
        ),
        figures,
        tables: vec![table],
    })
}

/// The CLI spelling of a normalization kind.
pub fn norm_name(norm: NormKind) -> String {
    match norm {
        NormKind::None => "none".into(),
        NormKind::Batch => "batch".into(),
        NormKind::SyncBatch => "sync-batch".into(),
        NormKind::Layer => "layer".into(),
        NormKind::Group(g) => format!("group{g}"),
        NormKind::Instance => "instance".into(),
        NormKind::Rms => "rms".into(),
        NormKind::Lrn => "lrn".into(),
    }
}

//! `gradient_mixing`: under BatchNorm, one sample's output and gradient
//! depend on the other samples of its batch (they share its statistics), an
//! outlier affects everyone, and larger batches dilute it; LayerNorm and
//! GroupNorm normalize each sample by itself.
//!
//! We replace one sample of a batch by an outlier (its image with the
//! brightness inverted) and measure how much the *other* samples' logits and input
//! gradients change, in relative L2 norm.

use anyhow::Result;
use candle_core::{Device, Tensor, Var};

use super::signal::norm_name;
use super::{Context, Experiment, Findings, Table};
use crate::lab::model::{Model, ModelConfig, NormKind};
use crate::lab::plot::{format_number, LineChart, Scale, Series};
use crate::lab::train::TrainConfig;
use crate::lab::verdict;
use crate::row;

/// The experiment.
pub const EXPERIMENT: Experiment = Experiment {
    name: "gradient_mixing",
    title: "Gradient mixing across the batch",
    claim: "Under BatchNorm one sample's output and gradient depend on the others, an outlier \
            affects everyone, and larger batches dilute it; LayerNorm and GroupNorm have no such \
            coupling.",
    run,
};

/// Logits and ∂loss/∂x of a batch, with batch statistics.
fn outputs_and_input_grads(model: &Model, x: &Tensor, y: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let x = Var::from_tensor(x)?;
    let logits = model.forward(x.as_tensor(), true)?;
    let loss = candle_nn::loss::cross_entropy(&logits, y)?;
    let grads = loss.backward()?;
    let dx = grads
        .get(x.as_tensor())
        .ok_or_else(|| anyhow::anyhow!("no gradient for the input"))?;
    Ok((
        logits.flatten_all()?.to_vec1()?,
        dx.flatten_all()?.to_vec1()?,
    ))
}

/// ‖a - b‖ / ‖a‖ over the entries from `skip` on.
fn relative_change(a: &[f32], b: &[f32], skip: usize) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a[skip..].iter().zip(&b[skip..]) {
        num += ((x - y) as f64).powi(2);
        den += (*x as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

fn run(ctx: &Context) -> Result<Findings> {
    let p = ctx.profile;
    let sizes: Vec<usize> = p.pick(
        vec![2, 8, 32],
        vec![2, 4, 8, 16, 32, 64, 128],
        vec![2, 4, 8, 16, 32, 64, 128, 256, 512],
    );
    let draws = p.pick(2u64, 5, 20);
    let steps = p.pick(10, 100, 300);
    let norms = [NormKind::Batch, NormKind::Layer, NormKind::Group(8)];
    ctx.progress.set_length(norms.len() as u64);
    // results[norm] = [(B, output change, gradient change)]
    let mut results: Vec<Vec<(usize, f64, f64)>> = Vec::new();
    let mut table = Table::new(
        "gradient_mixing.csv",
        &["norm", "batch_size", "output_change", "gradient_change"],
    );
    for &norm in &norms {
        let model_config = ModelConfig {
            depth: 4,
            width: 64,
            norm,
            ..ModelConfig::default()
        };
        let train = TrainConfig::sgd(0.02, 64, steps, ctx.seed);
        let (model, _, _) = ctx.train(&model_config, &train)?;
        let mut rows = Vec::new();
        for &b in &sizes {
            let (mut out_change, mut grad_change) = (0.0, 0.0);
            for draw in 0..draws {
                let (x, y) = ctx.sample(b, 500 + draw)?;
                let (logits, dx) = outputs_and_input_grads(&model, &x, &y)?;
                // Sample 0 becomes an outlier: its image with brightness
                // inverted (1 - x), the same scale but far from the data.
                let per = x.elem_count() / b;
                let mut pixels: Vec<f32> = x.flatten_all()?.to_vec1()?;
                for v in &mut pixels[..per] {
                    *v = 1.0 - *v;
                }
                let x2 = Tensor::from_vec(pixels, x.shape(), &Device::Cpu)?;
                let (logits2, dx2) = outputs_and_input_grads(&model, &x2, &y)?;
                out_change += relative_change(&logits, &logits2, logits.len() / b);
                grad_change += relative_change(&dx, &dx2, per);
            }
            let (o, g) = (out_change / draws as f64, grad_change / draws as f64);
            table.push(row![norm_name(norm), b, o, g]);
            rows.push((b, o, g));
        }
        results.push(rows);
        ctx.progress.inc(1);
    }
    let chart =
        |title: &str, y: &str, f: fn(&(usize, f64, f64)) -> f64, file: &str, caption: &str| {
            LineChart {
                title: title.into(),
                x_label: "batch size (images, log scale)".into(),
                y_label: y.into(),
                x_scale: Scale::Log,
                y_scale: Scale::Log,
                series: norms
                    .iter()
                    .zip(&results)
                    .map(|(&n, rows)| {
                        // A change of exactly 0 cannot be drawn on a log axis; it
                        // is listed in the CSV and the evidence.
                        Series::new(
                            norm_name(n),
                            rows.iter().map(|r| (r.0 as f64, f(r))).collect(),
                        )
                    })
                    .collect(),
            }
            .figure(file, caption)
        };
    let figures = vec![
        chart(
            "Effect of one outlier on the other samples' outputs",
            "relative change of others' logits (log scale)",
            |r| r.1,
            "gradient_mixing_outputs.svg",
            "Relative L2 change of the other samples' logits when sample 0 is replaced by an \
             outlier, in training mode (batch statistics). Per-sample normalizations change by \
             exactly 0 and have no point on the log axis.",
        )?,
        chart(
            "Effect of one outlier on the other samples' gradients",
            "relative change of others' ∂loss/∂x (log scale)",
            |r| r.2,
            "gradient_mixing_gradients.svg",
            "Relative L2 change of the other samples' input gradients when sample 0 becomes an \
             outlier.",
        )?,
    ];
    let change = |r: &(usize, f64, f64)| r.1.max(r.2);
    let bn = &results[0];
    let bn_small = bn.first().map_or(f64::NAN, change);
    let bn_large = bn.last().map_or(f64::NAN, change);
    let per_sample = results[1..]
        .iter()
        .flatten()
        .map(change)
        .fold(0.0, f64::max);
    let verdict = verdict::gradient_mixing(bn_small, bn_large, per_sample);
    Ok(Findings {
        setup: format!(
            "4-block ReLU MLPs of width 64 trained {steps} steps, with BatchNorm, LayerNorm or \
             GroupNorm (8 groups); batches of {sizes:?} training images, {draws} draws each; the \
             outlier is sample 0 with its brightness inverted (1 - x)."
        ),
        rule: verdict::GRADIENT_MIXING_RULE,
        verdict,
        evidence: format!(
            "BatchNorm: other samples change by {} at batch {} and {} at batch {}. LayerNorm and \
             GroupNorm: largest change {}.",
            format_number(bn_small),
            sizes[0],
            format_number(bn_large),
            sizes.last().copied().unwrap_or(0),
            format_number(per_sample)
        ),
        figures,
        tables: vec![table],
    })
}

//! `jacobian`: normalization keeps the singular values of the network's
//! input–output Jacobian near one, so signals and gradients pass through
//! many layers without shrinking or growing.
//!
//! For deep MLPs at initialization we take the per-sample Jacobian of the
//! hidden stack, from the first block's output to the last block's output
//! (a W×W matrix), with the normalization statistics fixed at those of a
//! batch of 512 images (evaluation mode after one pass that sets the running
//! statistics to that batch's), and compute its singular values; and each
//! block's own gain, the root-mean-square singular value ‖J_l‖_F/√W.

use anyhow::{anyhow, Result};
use candle_core::{Tensor, Var};
use nalgebra::DMatrix;
use normlab::Momentum;

use super::signal::norm_name;
use super::{Context, Experiment, Findings, Table};
use crate::lab::model::{InitScheme, Model, ModelConfig, NormKind};
use crate::lab::plot::{format_number, LineChart, Scale, Series};
use crate::lab::verdict::{self, log_distance_from_one, JacobianDistances};
use crate::row;

/// The experiment.
pub const EXPERIMENT: Experiment = Experiment {
    name: "jacobian",
    title: "Singular values of the input–output Jacobian",
    claim: "Normalization keeps the singular values of the network's input–output Jacobian near \
            one.",
    run,
};

/// Jacobians `[S][W_out × W_in]` (row-major) of `f` at `h` (`[S, W_in]`),
/// one backward pass per output feature; samples must not interact in `f`.
fn jacobians(h: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Vec<Vec<f64>>> {
    let (samples, w_in) = h.dims2()?;
    let v = Var::from_tensor(&h.detach())?;
    let out = f(v.as_tensor())?;
    let w_out = out.dim(1)?;
    let mut j = vec![vec![0.0f64; w_out * w_in]; samples];
    for k in 0..w_out {
        let grads = out.narrow(1, k, 1)?.sum_all()?.backward()?;
        let g: Vec<Vec<f32>> = grads
            .get(v.as_tensor())
            .ok_or_else(|| anyhow!("no gradient for the Jacobian's input"))?
            .to_vec2()?;
        for (s, row) in g.iter().enumerate() {
            for (i, &val) in row.iter().enumerate() {
                j[s][k * w_in + i] = val as f64;
            }
        }
    }
    Ok(j)
}

fn singular_values(j: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut s: Vec<f64> = DMatrix::from_row_slice(rows, cols, j)
        .singular_values()
        .iter()
        .copied()
        .collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

/// The singular values above 1e-6 of the largest: a ReLU that is off for
/// this sample zeroes its row of the Jacobian whatever the normalization,
/// so those exact zeros say nothing about how signals are carried.
fn nonzero(values: &[f64]) -> Vec<f64> {
    let largest = values.iter().copied().fold(0.0, f64::max);
    values
        .iter()
        .copied()
        .filter(|&v| v > 1e-6 * largest)
        .collect()
}

fn run(ctx: &Context) -> Result<Findings> {
    let p = ctx.profile;
    let depth = p.pick(6, 20, 30);
    let width = p.pick(32, 64, 128);
    let samples = p.pick(2, 8, 16);
    let norms = [NormKind::None, NormKind::Batch, NormKind::Layer];
    ctx.progress.set_length(norms.len() as u64);
    let (calibration, _) = ctx.sample(512.min(ctx.train.len()), 41)?;
    let (x, _) = ctx.sample(samples, 42)?;
    let mut sv_table = Table::new(
        "jacobian_singular_values.csv",
        &["norm", "sample", "index", "singular_value"],
    );
    let mut gain_table = Table::new("jacobian_gain.csv", &["norm", "block", "gain"]);
    // per norm: all singular values (descending per sample), per-block gains
    let mut all_sv: Vec<Vec<f64>> = Vec::new();
    let mut gains: Vec<Vec<f64>> = Vec::new();
    // per norm: the whole stack's RMS singular value ‖J‖_F/√W, mean over samples
    let mut stack_rms: Vec<f64> = Vec::new();
    for &norm in &norms {
        let config = ModelConfig {
            depth,
            width,
            norm,
            init: InitScheme::Xavier,
            momentum: Momentum::Cumulative,
            ..ModelConfig::default()
        };
        let map = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(
            &map,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        );
        let model = Model::new(&config, ctx.train.dims(), ctx.train.classes, vb, ctx.seed)?;
        // One training-mode pass: with the cumulative average, the running
        // statistics become this batch's.
        model.forward(&calibration, true)?;
        let h1 = model
            .block_forward(0, &model.prepare_input(&x)?, false, false)?
            .0;
        let stack = |h: &Tensor| -> Result<Tensor> {
            let mut h = h.clone();
            for i in 1..model.depth() {
                h = model.block_forward(i, &h, false, false)?.0;
            }
            Ok(h)
        };
        let mut values = Vec::new();
        let stack_js = jacobians(&h1, stack)?;
        stack_rms.push(
            stack_js
                .iter()
                .map(|j| (j.iter().map(|v| v * v).sum::<f64>() / width as f64).sqrt())
                .sum::<f64>()
                / stack_js.len() as f64,
        );
        for (s, j) in stack_js.iter().enumerate() {
            let sv = singular_values(j, width, width);
            for (i, v) in sv.iter().enumerate() {
                sv_table.push(row![norm_name(norm), s, i, v]);
            }
            values.extend(nonzero(&sv));
        }
        all_sv.push(values);
        // Each block's gain at its own input.
        let mut h = h1;
        let mut block_gains = Vec::new();
        for i in 1..model.depth() {
            let js = jacobians(&h, |t| model.block_forward(i, t, false, false).map(|o| o.0))?;
            let gain = js
                .iter()
                .map(|j| (j.iter().map(|v| v * v).sum::<f64>() / width as f64).sqrt())
                .sum::<f64>()
                / js.len() as f64;
            gain_table.push(row![norm_name(norm), i + 1, gain]);
            block_gains.push(gain);
            h = model.block_forward(i, &h, false, false)?.0;
        }
        gains.push(block_gains);
        ctx.progress.inc(1);
    }
    let figures = vec![
        LineChart {
            title: format!("Singular values of the {depth}-block Jacobian"),
            x_label: "quantile of the singular values (0 = largest)".into(),
            y_label: "singular value (log scale)".into(),
            x_scale: Scale::Linear,
            y_scale: Scale::Log,
            series: norms
                .iter()
                .zip(&all_sv)
                .map(|(&n, sv)| {
                    let mut sorted = sv.clone();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    let last = (sorted.len().max(2) - 1) as f64;
                    let pts = sorted
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| (i as f64 / last, v))
                        .collect();
                    Series::new(norm_name(n), pts)
                })
                .collect(),
        }
        .figure(
            "jacobian_singular_values.svg",
            &format!(
                "Non-zero singular values of the per-sample Jacobians (block 1 output → block \
                 {depth} output) of {samples} samples, sorted; Xavier initialization, width \
                 {width}. Inactive ReLUs add exact zeros, with or without normalization; they \
                 are in the CSV."
            ),
        )?,
        LineChart {
            title: "Gain of each block".into(),
            x_label: "block (depth)".into(),
            y_label: "RMS singular value ‖J‖_F/√W (log scale)".into(),
            x_scale: Scale::Linear,
            y_scale: Scale::Log,
            series: norms
                .iter()
                .zip(&gains)
                .map(|(&n, g)| {
                    Series::new(
                        norm_name(n),
                        g.iter()
                            .enumerate()
                            .map(|(i, &v)| ((i + 2) as f64, v))
                            .collect(),
                    )
                })
                .collect(),
        }
        .figure(
            "jacobian_gain.svg",
            "Root-mean-square singular value of each block's own Jacobian: below 1 the signal \
             shrinks through the block, above 1 it grows.",
        )?,
    ];
    let distances: Vec<JacobianDistances> = gains
        .iter()
        .zip(&stack_rms)
        .map(|(g, &rms)| JacobianDistances {
            block: g.iter().map(|v| v.log10().abs()).sum::<f64>() / g.len().max(1) as f64,
            stack: rms.log10().abs(),
        })
        .collect();
    let verdict = verdict::jacobian(distances[0], &distances[1..]);
    let median = |sv: &Vec<f64>| {
        let mut s = sv.clone();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Ok(Findings {
        setup: format!(
            "{depth}-block ReLU MLPs of width {width}, Xavier initialization, placement A; \
             normalization statistics fixed at those of 512 training images; Jacobians of \
             {samples} samples by reverse-mode differentiation, singular values by SVD (nalgebra); \
             the spectrum plot shows the non-zero ones (above 1e-6 of the largest)."
        ),
        rule: verdict::JACOBIAN_RULE,
        verdict,
        evidence: norms
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                format!(
                    "{}: block gains {}–{} (block distance {}), whole-stack RMS singular value {} \
                     (stack distance {}), median non-zero singular value {} (median |log10 σ| {})",
                    norm_name(n),
                    format_number(gains[k].iter().copied().fold(f64::INFINITY, f64::min)),
                    format_number(gains[k].iter().copied().fold(0.0, f64::max)),
                    format_number(distances[k].block),
                    format_number(stack_rms[k]),
                    format_number(distances[k].stack),
                    format_number(median(&all_sv[k])),
                    format_number(log_distance_from_one(&all_sv[k]))
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
            + ".",
        figures,
        tables: vec![sv_table, gain_table],
    })
}

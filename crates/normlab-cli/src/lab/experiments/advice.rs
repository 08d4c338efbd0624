//! `advice`: the lecture's practical recommendations — LayerNorm as the
//! starting point, GroupNorm next, BatchNorm for CNNs on images (with large
//! enough batches) and not for plain linear layers — checked on one grid:
//! every normalization in an MLP and a CNN, each at a large and a small
//! batch, for the same number of steps.

use anyhow::Result;

use super::signal::norm_name;
use super::{pct, Context, Experiment, Findings, Table};
use crate::lab::model::{Arch, ModelConfig, NormKind};
use crate::lab::plot::Heatmap;
use crate::lab::train::TrainConfig;
use crate::lab::verdict::{self, AdviceSummary};
use crate::row;

/// The experiment.
pub const EXPERIMENT: Experiment = Experiment {
    name: "advice",
    title: "Which normalization to use",
    claim: "LayerNorm is the starting point, GroupNorm next, BatchNorm for CNNs on images and not \
            for plain linear layers.",
    run,
};

fn run(ctx: &Context) -> Result<Findings> {
    let p = ctx.profile;
    let steps: usize = p.pick(20, 300, 1500);
    let large = p.pick(32, 64, 64);
    let small = 4;
    let norms = [
        NormKind::None,
        NormKind::Batch,
        NormKind::Layer,
        NormKind::Group(4),
        NormKind::Rms,
        NormKind::Instance,
        NormKind::Lrn,
    ];
    let settings = [
        (Arch::Mlp, large),
        (Arch::Mlp, small),
        (Arch::Cnn, large),
        (Arch::Cnn, small),
    ];
    let setting_name = |(arch, b): (Arch, usize)| {
        format!("{} B={b}", if arch == Arch::Mlp { "MLP" } else { "CNN" })
    };
    let mut runs = Vec::new();
    let mut cells = Vec::new();
    for (r, &norm) in norms.iter().enumerate() {
        for (c, &(arch, b)) in settings.iter().enumerate() {
            if arch == Arch::Mlp && norm == NormKind::Instance {
                continue; // needs spatial positions
            }
            let model = ModelConfig {
                arch,
                depth: if arch == Arch::Mlp {
                    p.pick(3, 6, 8)
                } else {
                    3
                },
                width: if arch == Arch::Mlp {
                    64
                } else {
                    p.pick(8, 8, 16)
                },
                norm,
                ..ModelConfig::default()
            };
            let train = TrainConfig::adamw(2e-3, b, steps, ctx.seed);
            runs.push((model, train));
            cells.push((r, c));
        }
    }
    ctx.progress.set_length(runs.len() as u64);
    let summaries = ctx.train_many(&runs)?;
    let mut grid = vec![vec![None; settings.len()]; norms.len()];
    let mut table = Table::new(
        "advice.csv",
        &["norm", "setting", "held_out_accuracy", "final_loss"],
    );
    for (&(r, c), s) in cells.iter().zip(&summaries) {
        grid[r][c] = Some(s.held_out_accuracy);
        table.push(row![
            norm_name(norms[r]),
            setting_name(settings[c]),
            s.held_out_accuracy,
            s.final_loss
        ]);
    }
    let figures = vec![Heatmap {
        title: "Held-out accuracy by normalization and setting".into(),
        x_label: "network and batch size (images)".into(),
        y_label: "normalization".into(),
        columns: settings.iter().map(|&s| setting_name(s)).collect(),
        rows: norms.iter().map(|&n| norm_name(n)).collect(),
        values: grid
            .iter()
            .map(|r| r.iter().map(|v| v.map(|a: f64| 100.0 * a)).collect())
            .collect(),
        value_label: "held-out accuracy (%)".into(),
        range: (0.0, 100.0),
    }
    .figure(
        "advice.svg",
        &format!(
            "Every normalization in an MLP and a CNN at batch {large} and batch {small}, each \
             trained {steps} steps with AdamW (lr 2e-3). Grey: not applicable."
        ),
    )?];
    let worst = |r: usize| {
        grid[r]
            .iter()
            .flatten()
            .copied()
            .fold(f64::INFINITY, f64::min)
    };
    let index = |n: NormKind| norms.iter().position(|&k| k == n).unwrap_or(0);
    let (bn, ln, gn) = (
        index(NormKind::Batch),
        index(NormKind::Layer),
        index(NormKind::Group(4)),
    );
    let cnn_large = 2;
    let best_cnn_large = grid.iter().filter_map(|r| r[cnn_large]).fold(0.0, f64::max);
    let summary = AdviceSummary {
        layer_worst: worst(ln),
        group_worst: worst(gn),
        batch_worst: worst(bn),
        batch_cnn_large: grid[bn][cnn_large].unwrap_or(0.0),
        best_cnn_large,
    };
    let verdict = verdict::advice(summary);
    let mut ranking: Vec<(String, f64)> = (0..norms.len())
        .map(|r| (norm_name(norms[r]), worst(r)))
        .collect();
    ranking.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(Findings {
        setup: format!(
            "MLPs (width 64) and CNNs (3 blocks) with each normalization, at batch {large} and \
             {small}, trained {steps} steps with AdamW (lr 2e-3); placement A, Kaiming \
             initialization. Together with the depth, batch_size and gradient_mixing experiments."
        ),
        rule: verdict::ADVICE_RULE,
        verdict,
        evidence: format!(
            "Worst case over the four settings: LayerNorm {}, GroupNorm {}, BatchNorm {}. \
             BatchNorm's CNN at batch {large}: {} (best {}). Ranking by worst case: {}.",
            pct(summary.layer_worst),
            pct(summary.group_worst),
            pct(summary.batch_worst),
            pct(summary.batch_cnn_large),
            pct(best_cnn_large),
            ranking
                .iter()
                .map(|(n, a)| format!("{n} {}", pct(*a)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        figures,
        tables: vec![table],
    })
}

//! Verdicts: each claim of the lecture is judged from the measurements by a
//! fixed rule. The rules are plain functions of numbers so that each can be
//! tested on data that gives each verdict; their wording, shown in the
//! report next to the verdict, sits beside the code as a constant.

use serde::Serialize;

/// The judgement of a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The measurements show what the claim says.
    Supported,
    /// The measurements contradict it.
    NotSupported,
    /// Neither: the effect is too small, or the run too short, to tell.
    Inconclusive,
}

impl Verdict {
    /// `supported`, `not supported` or `inconclusive`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Supported => "supported",
            Verdict::NotSupported => "not supported",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Ratio of the largest to the smallest positive finite value (∞ when a
/// value is 0 or not finite, since then the signal vanished or blew up).
pub fn spread(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 1.0;
    }
    if values.iter().any(|v| !v.is_finite() || *v <= 0.0) {
        return f64::INFINITY;
    }
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    max / min
}

/// Rule of `signal`.
pub const SIGNAL_RULE: &str = "spread = largest / smallest per-block value. Supported if, without \
normalization, some initialization gives an activation or gradient spread ≥ 100 while every \
normalized network keeps both spreads ≤ 10. Not supported if no plain network reaches a spread of \
10, or a normalized one exceeds 100. Otherwise inconclusive.";

/// `signal`: `(activation spread, gradient spread)` of each plain network
/// and of each normalized network.
pub fn signal(plain: &[(f64, f64)], normalized: &[(f64, f64)]) -> Verdict {
    let worst = |v: &[(f64, f64)]| v.iter().map(|p| p.0.max(p.1)).fold(0.0, f64::max);
    let (plain_worst, norm_worst) = (worst(plain), worst(normalized));
    if plain_worst < 10.0 || norm_worst > 100.0 {
        Verdict::NotSupported
    } else if plain_worst >= 100.0 && norm_worst <= 10.0 {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

/// A network "trains" when its held-out accuracy reaches this fraction of
/// the best accuracy in the same experiment.
pub const TRAINS_FRACTION: f64 = 0.8;

/// The largest depth up to which every tried depth trains (0 if the
/// shallowest does not). `runs` holds (depth, accuracy) in depth order.
pub fn trainable_depth(runs: &[(usize, f64)], threshold: f64) -> usize {
    runs.iter()
        .take_while(|r| r.1 >= threshold)
        .last()
        .map_or(0, |r| r.0)
}

/// Rule of `depth`.
pub const DEPTH_RULE: &str =
    "A network trains if its held-out accuracy is ≥ 80% of the best in the \
experiment; its trainable depth is the largest depth up to which every depth trains. Supported if \
the plain network's trainable depth is ≤ 16 and the best normalized one's is ≥ 20. Not supported \
if the plain network trains at ≥ 24 blocks, or no normalized network trains deeper than the plain \
one. Otherwise inconclusive.";

/// `depth`: (depth, accuracy) per run of the plain network and of each
/// normalized kind, each in depth order.
pub fn depth(plain: &[(usize, f64)], normalized: &[Vec<(usize, f64)>]) -> Verdict {
    let best = plain
        .iter()
        .chain(normalized.iter().flatten())
        .map(|r| r.1)
        .fold(0.0, f64::max);
    let threshold = TRAINS_FRACTION * best;
    let plain_depth = trainable_depth(plain, threshold);
    let norm_depth = normalized
        .iter()
        .map(|runs| trainable_depth(runs, threshold))
        .max()
        .unwrap_or(0);
    if plain_depth >= 24 || norm_depth <= plain_depth {
        Verdict::NotSupported
    } else if plain_depth <= 16 && norm_depth >= 20 {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

/// Rule of `robustness`.
pub const ROBUSTNESS_RULE: &str = "A cell of the grid trains if its held-out accuracy is ≥ 80% of \
the best in the experiment. Supported if BatchNorm trains in more cells than the plain network and \
its largest training learning rate is at least the plain network's. Not supported if it trains in \
fewer cells. Otherwise inconclusive.";

/// `robustness`: accuracy grids `[init][lr]` without and with BatchNorm,
/// over the same learning rates `lrs`.
pub fn robustness(plain: &[Vec<f64>], batch: &[Vec<f64>], lrs: &[f64]) -> Verdict {
    let best = plain
        .iter()
        .chain(batch)
        .flatten()
        .copied()
        .fold(0.0, f64::max);
    let threshold = TRAINS_FRACTION * best;
    let count = |g: &[Vec<f64>]| g.iter().flatten().filter(|&&a| a >= threshold).count();
    let max_lr = |g: &[Vec<f64>]| {
        g.iter()
            .flat_map(|row| row.iter().zip(lrs))
            .filter(|(&a, _)| a >= threshold)
            .map(|(_, &lr)| lr)
            .fold(0.0, f64::max)
    };
    let (np, nb) = (count(plain), count(batch));
    if nb < np {
        Verdict::NotSupported
    } else if nb > np && max_lr(batch) >= max_lr(plain) {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

/// Rule of `batch_size`.
pub const BATCH_SIZE_RULE: &str =
    "drop = held-out accuracy at the largest batch − at the smallest. \
Supported if BatchNorm's drop is ≥ 5 points and exceeds both LayerNorm's and GroupNorm's by ≥ 3 \
points. Not supported if BatchNorm drops no more than one of them. Otherwise inconclusive.";

/// `batch_size`: accuracy drop from the largest to the smallest batch for
/// BatchNorm, LayerNorm and GroupNorm.
pub fn batch_size(batch_drop: f64, layer_drop: f64, group_drop: f64) -> Verdict {
    if batch_drop.is_nan() || batch_drop <= layer_drop || batch_drop <= group_drop {
        Verdict::NotSupported
    } else if batch_drop >= 0.05 && batch_drop >= layer_drop.max(group_drop) + 0.03 {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

/// Rule of `placement`.
pub const PLACEMENT_RULE: &str =
    "Dead fraction = share of ReLU outputs that are exactly 0, averaged \
over blocks. Supported if placement A without γ/β has a dead fraction within 0.5 ± 0.1 both at \
initialization and after training. Not supported if either is outside 0.5 ± 0.2. Otherwise \
inconclusive.";

/// `placement`: dead fractions of placement A without affine, at
/// initialization and after training.
pub fn placement(dead_at_init: f64, dead_after_training: f64) -> Verdict {
    if dead_at_init.is_nan() || dead_after_training.is_nan() {
        return Verdict::NotSupported;
    }
    let off = (dead_at_init - 0.5)
        .abs()
        .max((dead_after_training - 0.5).abs());
    if off > 0.2 {
        Verdict::NotSupported
    } else if off <= 0.1 {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

/// Rule of `train_eval`.
pub const TRAIN_EVAL_RULE: &str =
    "Supported if evaluation with running statistics (momentum 0.1) is \
at least 2 points more accurate than evaluation with the batch statistics of every test batch of \
at most 4 images, and the running statistics end closer to the training set's statistics than \
one training batch's statistics are. Not supported if it is less accurate than evaluation with the \
smallest test batch. Otherwise inconclusive.";

/// `train_eval`: accuracy with running statistics; (test batch, accuracy)
/// with batch statistics; final distance of the running statistics and mean
/// distance of one batch's statistics to the population's.
pub fn train_eval(
    running_accuracy: f64,
    batch_stat_accuracy: &[(usize, f64)],
    running_gap: f64,
    batch_gap: f64,
) -> Verdict {
    let smallest = batch_stat_accuracy
        .iter()
        .min_by_key(|r| r.0)
        .map_or(f64::NAN, |r| r.1);
    if running_accuracy.is_nan() || smallest.is_nan() || running_accuracy < smallest {
        return Verdict::NotSupported;
    }
    let beats_tiny = batch_stat_accuracy
        .iter()
        .filter(|r| r.0 <= 4)
        .all(|r| running_accuracy >= r.1 + 0.02);
    if beats_tiny && running_gap < batch_gap {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

/// Rule of `gradient_mixing`.
pub const GRADIENT_MIXING_RULE: &str =
    "change = relative change of the other samples' outputs and \
input gradients when one sample becomes an outlier (the larger of the two). Supported if under \
BatchNorm the change at the smallest batch is ≥ 1e-2 and at the largest batch at most a quarter of \
that, while under LayerNorm and GroupNorm it is ≤ 1e-6. Not supported if BatchNorm's change at the \
smallest batch is < 1e-4, or a per-sample normalization's exceeds 1e-3. Otherwise inconclusive.";

/// `gradient_mixing`: BatchNorm's change at the smallest and largest batch,
/// and the largest change under the per-sample normalizations.
pub fn gradient_mixing(batch_smallest: f64, batch_largest: f64, per_sample_max: f64) -> Verdict {
    if batch_smallest.is_nan()
        || batch_smallest < 1e-4
        || per_sample_max.is_nan()
        || per_sample_max > 1e-3
    {
        Verdict::NotSupported
    } else if batch_smallest >= 1e-2
        && batch_largest <= batch_smallest / 4.0
        && per_sample_max <= 1e-6
    {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

/// Distance of a set of singular values from 1: the median of |log10 σ|
/// (0 when all are 1; 1 when the typical one is 10× or 0.1×). Non-finite
/// or zero values count as infinitely far.
pub fn log_distance_from_one(singular_values: &[f64]) -> f64 {
    let mut d: Vec<f64> = singular_values
        .iter()
        .map(|&s| {
            if s > 0.0 && s.is_finite() {
                s.log10().abs()
            } else {
                f64::INFINITY
            }
        })
        .collect();
    if d.is_empty() {
        return f64::NAN;
    }
    d.sort_by(f64::total_cmp);
    d[d.len() / 2]
}

/// Rule of `jacobian`.
pub const JACOBIAN_RULE: &str = "A block's gain is the root-mean-square singular value of its own \
Jacobian; block distance = mean over blocks of |log10 gain|; stack distance = |log10| of the \
root-mean-square singular value of the whole stack's Jacobian. Supported if every normalized \
network's block distance is ≤ 0.1 (gains within about 26% of one) and below the plain network's, \
and its stack distance is below the plain network's. Not supported if some normalized network's \
block distance is no smaller than the plain network's. Otherwise inconclusive.";

/// Distances from one of a network's Jacobians, for `jacobian`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JacobianDistances {
    /// Mean over blocks of |log10 gain|.
    pub block: f64,
    /// |log10| of the whole stack's RMS singular value.
    pub stack: f64,
}

/// `jacobian`: the plain network's distances and each normalized network's.
pub fn jacobian(plain: JacobianDistances, normalized: &[JacobianDistances]) -> Verdict {
    if normalized
        .iter()
        .any(|n| n.block.is_nan() || n.block >= plain.block)
    {
        Verdict::NotSupported
    } else if normalized
        .iter()
        .all(|n| n.block <= 0.1 && n.stack < plain.stack)
    {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

/// Rule of `exploding`.
pub const EXPLODING_RULE: &str = "At a large initialization: activations are tamed if the plain \
network's activation spread is ≥ 100 and every normalized network's is ≤ 10. Gradients remain a \
problem if a normalized network's gradient spread is ≥ 10 or its largest training learning rate is \
below the one it reaches at Kaiming initialization. Supported if both hold. Not supported if the \
activations are not tamed, or every normalized gradient spread is < 3 with no loss of learning \
rate. Otherwise inconclusive.";

/// One normalized network in `exploding`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExplodingNormalized {
    /// Activation spread across blocks at the large initialization.
    pub activation_spread: f64,
    /// Gradient-norm spread across blocks at the large initialization.
    pub gradient_spread: f64,
    /// Largest learning rate that trains at the large initialization (0: none).
    pub max_lr_large_init: f64,
    /// Largest learning rate that trains at Kaiming initialization.
    pub max_lr_kaiming: f64,
}

/// `exploding`: the plain network's activation spread and each normalized network.
pub fn exploding(plain_activation_spread: f64, normalized: &[ExplodingNormalized]) -> Verdict {
    let tamed =
        plain_activation_spread >= 100.0 && normalized.iter().all(|n| n.activation_spread <= 10.0);
    let gradients_remain = normalized
        .iter()
        .any(|n| n.gradient_spread >= 10.0 || n.max_lr_large_init < n.max_lr_kaiming);
    let gradients_fine = normalized
        .iter()
        .all(|n| n.gradient_spread < 3.0 && n.max_lr_large_init >= n.max_lr_kaiming);
    if !tamed || gradients_fine {
        Verdict::NotSupported
    } else if gradients_remain {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

/// Rule of `advice`.
pub const ADVICE_RULE: &str = "Over the four settings (MLP and CNN, large and small batch), a \
normalization's worst case is its lowest held-out accuracy. Supported if LayerNorm's worst case is \
at least BatchNorm's, GroupNorm's worst case is at least BatchNorm's, and BatchNorm is within 1 \
point of the best CNN at the large batch. Not supported if BatchNorm's worst case beats LayerNorm's \
by more than 2 points. Otherwise inconclusive.";

/// Worst-case accuracies and BatchNorm's place on CNNs, for `advice`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdviceSummary {
    /// LayerNorm's lowest accuracy over the settings.
    pub layer_worst: f64,
    /// GroupNorm's lowest accuracy over the settings.
    pub group_worst: f64,
    /// BatchNorm's lowest accuracy over the settings.
    pub batch_worst: f64,
    /// BatchNorm's CNN accuracy at the large batch.
    pub batch_cnn_large: f64,
    /// The best CNN accuracy at the large batch.
    pub best_cnn_large: f64,
}

/// `advice`.
pub fn advice(s: AdviceSummary) -> Verdict {
    if s.batch_worst > s.layer_worst + 0.02 {
        Verdict::NotSupported
    } else if s.layer_worst >= s.batch_worst
        && s.group_worst >= s.batch_worst
        && s.batch_cnn_large >= s.best_cnn_large - 0.01
    {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

/// Rule of `sync`.
pub const SYNC_RULE: &str = "overhead = SyncBatchNorm's time per step / per-rank BatchNorm's at \
the same number of ranks. Supported if the overhead exceeds 1 at every number of ranks above one, \
and at the smallest per-rank batch SyncBatchNorm is at least 2 points more accurate than per-rank \
BatchNorm. Not supported if SyncBatchNorm is less accurate there, or never slower. Otherwise \
inconclusive.";

/// `sync`: overheads at each number of ranks > 1, and the accuracies of
/// per-rank BatchNorm and SyncBatchNorm at the smallest per-rank batch.
pub fn sync(overheads: &[f64], plain_accuracy: f64, sync_accuracy: f64) -> Verdict {
    let costs = !overheads.is_empty() && overheads.iter().all(|&o| o > 1.0);
    let never_slower = overheads.iter().all(|&o| o <= 1.0);
    if sync_accuracy.is_nan() || sync_accuracy < plain_accuracy || never_slower {
        Verdict::NotSupported
    } else if costs && sync_accuracy >= plain_accuracy + 0.02 {
        Verdict::Supported
    } else {
        Verdict::Inconclusive
    }
}

#[cfg(test)]
mod tests {
    use super::Verdict::*;
    use super::*;

    #[test]
    fn spread_of_values() {
        assert_eq!(spread(&[1.0, 10.0, 2.0]), 10.0);
        assert_eq!(spread(&[1.0, 0.0]), f64::INFINITY);
        assert_eq!(spread(&[f64::NAN]), f64::INFINITY);
        assert_eq!(spread(&[]), 1.0);
    }

    #[test]
    fn signal_rule() {
        assert_eq!(signal(&[(1e4, 2.0), (1.2, 1.5)], &[(1.5, 3.0)]), Supported);
        assert_eq!(signal(&[(3.0, 2.0)], &[(1.5, 3.0)]), NotSupported);
        assert_eq!(signal(&[(1e4, 2.0)], &[(1.5, 1e3)]), NotSupported);
        assert_eq!(signal(&[(50.0, 2.0)], &[(1.5, 3.0)]), Inconclusive);
        assert_eq!(signal(&[(1e4, 2.0)], &[(1.5, 30.0)]), Inconclusive);
    }

    #[test]
    fn depth_rule() {
        let plain = [(2, 0.95), (8, 0.93), (16, 0.2), (32, 0.1)];
        let good = vec![(2, 0.95), (8, 0.95), (16, 0.94), (32, 0.9)];
        let shallow = vec![(2, 0.95), (8, 0.95), (16, 0.3), (32, 0.1)];
        assert_eq!(trainable_depth(&plain, 0.76), 8);
        assert_eq!(depth(&plain, std::slice::from_ref(&good)), Supported);
        assert_eq!(depth(&plain, &[shallow]), NotSupported);
        assert_eq!(depth(&good, std::slice::from_ref(&good)), NotSupported);
        let to_16 = vec![(2, 0.95), (8, 0.95), (16, 0.94), (32, 0.1)];
        assert_eq!(depth(&plain, &[to_16]), Inconclusive);
    }

    #[test]
    fn robustness_rule() {
        let lrs = [0.01, 0.1, 1.0];
        let plain = vec![vec![0.9, 0.1, 0.1], vec![0.1, 0.1, 0.1]];
        let batch = vec![vec![0.9, 0.95, 0.9], vec![0.9, 0.9, 0.1]];
        assert_eq!(robustness(&plain, &batch, &lrs), Supported);
        assert_eq!(robustness(&batch, &plain, &lrs), NotSupported);
        assert_eq!(robustness(&plain, &plain, &lrs), Inconclusive);
    }

    #[test]
    fn batch_size_rule() {
        assert_eq!(batch_size(0.2, 0.01, 0.02), Supported);
        assert_eq!(batch_size(0.01, 0.02, 0.0), NotSupported);
        assert_eq!(batch_size(0.04, 0.01, 0.0), Inconclusive);
    }

    #[test]
    fn placement_rule() {
        assert_eq!(placement(0.5, 0.47), Supported);
        assert_eq!(placement(0.5, 0.8), NotSupported);
        assert_eq!(placement(0.5, f64::NAN), NotSupported);
        assert_eq!(placement(0.5, 0.35), Inconclusive);
    }

    #[test]
    fn train_eval_rule() {
        let tiny = [(1, 0.1), (4, 0.6), (128, 0.93)];
        assert_eq!(train_eval(0.95, &tiny, 0.01, 0.1), Supported);
        assert_eq!(train_eval(0.05, &tiny, 0.01, 0.1), NotSupported);
        assert_eq!(train_eval(0.95, &tiny, 0.2, 0.1), Inconclusive);
    }

    #[test]
    fn gradient_mixing_rule() {
        assert_eq!(gradient_mixing(0.3, 0.01, 0.0), Supported);
        assert_eq!(gradient_mixing(1e-5, 1e-6, 0.0), NotSupported);
        assert_eq!(gradient_mixing(0.3, 0.01, 0.1), NotSupported);
        assert_eq!(gradient_mixing(0.3, 0.2, 0.0), Inconclusive);
    }

    #[test]
    fn jacobian_rule() {
        assert_eq!(log_distance_from_one(&[1.0, 10.0, 0.01]), 1.0);
        assert_eq!(log_distance_from_one(&[0.0, 0.0, 1.0]), f64::INFINITY);
        let d = |block, stack| JacobianDistances { block, stack };
        assert_eq!(
            jacobian(d(0.15, 3.0), &[d(0.05, 1.7), d(0.01, 0.1)]),
            Supported
        );
        assert_eq!(jacobian(d(0.15, 3.0), &[d(0.2, 0.1)]), NotSupported);
        assert_eq!(jacobian(d(0.15, 3.0), &[d(f64::NAN, 0.1)]), NotSupported);
        assert_eq!(jacobian(d(0.15, 3.0), &[d(0.12, 0.1)]), Inconclusive);
        assert_eq!(jacobian(d(0.15, 3.0), &[d(0.05, 3.5)]), Inconclusive);
    }

    #[test]
    fn exploding_rule() {
        let n = |g: f64, lr_large: f64| ExplodingNormalized {
            activation_spread: 2.0,
            gradient_spread: g,
            max_lr_large_init: lr_large,
            max_lr_kaiming: 0.1,
        };
        assert_eq!(exploding(1e5, &[n(50.0, 0.1)]), Supported);
        assert_eq!(exploding(1e5, &[n(1.5, 0.01)]), Supported);
        assert_eq!(exploding(5.0, &[n(50.0, 0.1)]), NotSupported);
        assert_eq!(exploding(1e5, &[n(1.5, 0.1)]), NotSupported);
        assert_eq!(exploding(1e5, &[n(5.0, 0.1)]), Inconclusive);
    }

    #[test]
    fn sync_rule() {
        assert_eq!(sync(&[1.2, 1.5], 0.6, 0.9), Supported);
        assert_eq!(sync(&[1.2, 1.5], 0.9, 0.8), NotSupported);
        assert_eq!(sync(&[0.9, 1.0], 0.6, 0.9), NotSupported);
        assert_eq!(sync(&[1.2, 0.9], 0.6, 0.9), Inconclusive);
        assert_eq!(sync(&[1.2, 1.5], 0.9, 0.91), Inconclusive);
    }

    #[test]
    fn advice_rule() {
        let s = AdviceSummary {
            layer_worst: 0.9,
            group_worst: 0.88,
            batch_worst: 0.6,
            batch_cnn_large: 0.97,
            best_cnn_large: 0.97,
        };
        assert_eq!(advice(s), Supported);
        assert_eq!(
            advice(AdviceSummary {
                batch_worst: 0.95,
                ..s
            }),
            NotSupported
        );
        assert_eq!(
            advice(AdviceSummary {
                batch_cnn_large: 0.9,
                ..s
            }),
            Inconclusive
        );
    }
}

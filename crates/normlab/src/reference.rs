//! Naive f64 references: each normalization written straight from its
//! definition, element by element, with an exact two-pass mean and variance.
//! Slow and simple on purpose; tests compare every kernel path against them.

/// Mean and biased variance of `xs` (two-pass).
pub fn mean_var(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (
        mean,
        xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n,
    )
}

fn denom(var: f64, eps: f64, add_to_std: bool) -> f64 {
    if add_to_std {
        var.sqrt() + eps
    } else {
        (var + eps).sqrt()
    }
}

/// LayerNorm of each row of length `n` (`weight`, `bias` of length `n`).
pub fn layer_norm(
    x: &[f64],
    n: usize,
    weight: &[f64],
    bias: &[f64],
    eps: f64,
    add_to_std: bool,
) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(n) {
        let (mean, var) = mean_var(row);
        let d = denom(var, eps, add_to_std);
        y.extend(
            row.iter()
                .enumerate()
                .map(|(j, v)| (v - mean) / d * weight[j] + bias[j]),
        );
    }
    y
}

/// RMSNorm of each row of length `n`.
pub fn rms_norm(x: &[f64], n: usize, weight: &[f64], eps: f64, add_to_std: bool) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(n) {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / n as f64;
        let d = denom(ms, eps, add_to_std);
        y.extend(row.iter().enumerate().map(|(j, v)| v / d * weight[j]));
    }
    y
}

/// Index of `x[n, c, s]` in a `[N, C, S]` buffer.
fn at(c_total: usize, s_total: usize, n: usize, c: usize, s: usize) -> usize {
    (n * c_total + c) * s_total + s
}

/// GroupNorm of `[N, C, S]` with `groups` groups.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f64],
    (n, c, s): (usize, usize, usize),
    groups: usize,
    weight: &[f64],
    bias: &[f64],
    eps: f64,
    add_to_std: bool,
) -> Vec<f64> {
    let cpg = c / groups;
    let mut y = vec![0.0; x.len()];
    for b in 0..n {
        for g in 0..groups {
            let chans = g * cpg..(g + 1) * cpg;
            let vals: Vec<f64> = chans
                .clone()
                .flat_map(|ch| (0..s).map(move |p| (ch, p)))
                .map(|(ch, p)| x[at(c, s, b, ch, p)])
                .collect();
            let (mean, var) = mean_var(&vals);
            let d = denom(var, eps, add_to_std);
            for ch in chans {
                for p in 0..s {
                    let i = at(c, s, b, ch, p);
                    y[i] = (x[i] - mean) / d * weight[ch] + bias[ch];
                }
            }
        }
    }
    y
}

/// BatchNorm of `[N, C, S]` with per-channel `(mean, var)` given, or taken
/// from the batch when `stats` is `None`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    x: &[f64],
    (n, c, s): (usize, usize, usize),
    stats: Option<(&[f64], &[f64])>,
    weight: &[f64],
    bias: &[f64],
    eps: f64,
    add_to_std: bool,
) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for ch in 0..c {
        let (mean, var) = match stats {
            Some((m, v)) => (m[ch], v[ch]),
            None => {
                let vals: Vec<f64> = (0..n)
                    .flat_map(|b| (0..s).map(move |p| (b, p)))
                    .map(|(b, p)| x[at(c, s, b, ch, p)])
                    .collect();
                mean_var(&vals)
            }
        };
        let d = denom(var, eps, add_to_std);
        for b in 0..n {
            for p in 0..s {
                let i = at(c, s, b, ch, p);
                y[i] = (x[i] - mean) / d * weight[ch] + bias[ch];
            }
        }
    }
    y
}

/// LRN across channels of `[N, C, S]`: window `[c - before, c + after]`, coefficient `a`.
#[allow(clippy::too_many_arguments)]
pub fn lrn_across(
    x: &[f64],
    (n, c, s): (usize, usize, usize),
    before: usize,
    after: usize,
    a: f64,
    beta: f64,
    k: f64,
) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..s {
                let lo = ch.saturating_sub(before);
                let hi = (ch + after).min(c - 1);
                let sum: f64 = (lo..=hi).map(|j| x[at(c, s, b, j, p)].powi(2)).sum();
                let i = at(c, s, b, ch, p);
                y[i] = x[i] / (k + a * sum).powf(beta);
            }
        }
    }
    y
}

/// LRN within channel of `[N, C, H, W]`: a square window of rows
/// `[h - before, h + after]` and the same for columns.
#[allow(clippy::too_many_arguments)]
pub fn lrn_within(
    x: &[f64],
    (n, c, h, w): (usize, usize, usize, usize),
    before: usize,
    after: usize,
    a: f64,
    beta: f64,
    k: f64,
) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    let idx = |b: usize, ch: usize, i: usize, j: usize| ((b * c + ch) * h + i) * w + j;
    for b in 0..n {
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    let mut sum = 0.0;
                    for ii in i.saturating_sub(before)..=(i + after).min(h - 1) {
                        for jj in j.saturating_sub(before)..=(j + after).min(w - 1) {
                            sum += x[idx(b, ch, ii, jj)].powi(2);
                        }
                    }
                    let e = idx(b, ch, i, j);
                    y[e] = x[e] / (k + a * sum).powf(beta);
                }
            }
        }
    }
    y
}

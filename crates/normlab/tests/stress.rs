//! Numerics under stress: large offsets (|μ| ≫ σ), tiny and huge magnitudes,
//! rows of length 1, empty batches.
//!
//! The offset table compares f32 outputs with an f64 reference computed on the
//! same f32-rounded input. The bounds are one fifth of the maximum absolute
//! errors PyTorch 2.x float32 CPU shows on these inputs (LayerNorm rows of
//! 1024, BatchNorm and GroupNorm(8) on [16, 32, 8, 8]).

mod common;

use common::*;
use normlab::kernels::batch_norm::{batch_norm, BatchNormOptions};
use normlab::kernels::group_norm::group_norm;
use normlab::kernels::layer_norm::layer_norm;
use normlab::kernels::rms_norm::rms_norm;
use normlab::{reference, Tensor};

/// (offset, sd, PyTorch's LayerNorm, BatchNorm, GroupNorm max abs errors).
const PYTORCH_ERRORS: [(f64, f64, [f64; 3]); 4] = [
    (1e3, 1.0, [9.6e-5, 5.8e-5, 1.3e-4]),
    (1e4, 1.0, [1.4e-3, 9.0e-4, 1.5e-3]),
    (1e4, 0.01, [0.115, 0.062, 0.173]),
    (3e5, 1.0, [0.044, 0.027, 0.054]),
];

fn rounded(seed: u64, shape: &[usize], offset: f64, sd: f64) -> (Tensor<f32>, Vec<f64>) {
    let x32 = normal(&mut rng(seed), shape, offset, sd).cast::<f32>();
    let x64 = widen(&x32);
    (x32, x64)
}

/// Prints the error next to PyTorch's (`--nocapture` shows the table) and
/// asserts it is at most a fifth of it.
fn within_a_fifth(op: &str, offset: f64, sd: f64, err: f64, pytorch: f64) {
    eprintln!(
        "{op:<10} offset {offset:.0e} sd {sd:<4}: max abs err {err:.1e}, PyTorch {pytorch:.1e}"
    );
    assert!(
        err <= pytorch / 5.0,
        "{op} offset {offset} sd {sd}: {err:e}"
    );
}

#[test]
fn large_offsets_are_five_times_more_accurate_than_pytorch() {
    for (i, &(offset, sd, bounds)) in PYTORCH_ERRORS.iter().enumerate() {
        let seed = 100 + i as u64;
        // LayerNorm, rows of 1024.
        let (x, x64) = rounded(seed, &[64, 1024], offset, sd);
        let want = reference::layer_norm(&x64, 1024, &[1.0; 1024], &[0.0; 1024], 1e-5, false);
        let (y, _) = layer_norm(&x, -1, None, None, 1e-5.into()).unwrap();
        within_a_fifth(
            "layer_norm",
            offset,
            sd,
            max_abs_diff(&widen(&y), &want),
            bounds[0],
        );

        // BatchNorm (training) and GroupNorm(8) on [16, 32, 8, 8].
        let (x, x64) = rounded(seed, &[16, 32, 8, 8], offset, sd);
        let ones = [1.0; 32];
        let zeros = [0.0; 32];
        let want = reference::batch_norm(&x64, (16, 32, 64), None, &ones, &zeros, 1e-5, false);
        let (y, _) = batch_norm(&x, None, None, None, &BatchNormOptions::training()).unwrap();
        within_a_fifth(
            "batch_norm",
            offset,
            sd,
            max_abs_diff(&widen(&y), &want),
            bounds[1],
        );

        // BatchNorm1d on [256, 32]: the per-position statistics (one shift
        // per column for every row block), held to the same bound.
        let (x1d, x1d64) = rounded(seed, &[256, 32], offset, sd);
        let want = reference::batch_norm(&x1d64, (256, 32, 1), None, &ones, &zeros, 1e-5, false);
        let (y, _) = batch_norm(&x1d, None, None, None, &BatchNormOptions::training()).unwrap();
        within_a_fifth(
            "batch_norm1d",
            offset,
            sd,
            max_abs_diff(&widen(&y), &want),
            bounds[1],
        );

        let want = reference::group_norm(&x64, (16, 32, 64), 8, &ones, &zeros, 1e-5, false);
        let (y, _) = group_norm(&x, 8, None, None, 1e-5.into()).unwrap();
        within_a_fifth(
            "group_norm",
            offset,
            sd,
            max_abs_diff(&widen(&y), &want),
            bounds[2],
        );

        // GroupNorm(2) on [4, 4, 2048]: the pipelined forward (spatial ≥
        // 2048), held to the same bound.
        let (x, x64) = rounded(seed, &[4, 4, 2048], offset, sd);
        let want = reference::group_norm(&x64, (4, 4, 2048), 2, &[1.0; 4], &[0.0; 4], 1e-5, false);
        let (y, _) = group_norm(&x, 2, None, None, 1e-5.into()).unwrap();
        within_a_fifth(
            "group_norm (pipelined)",
            offset,
            sd,
            max_abs_diff(&widen(&y), &want),
            bounds[2],
        );
    }
}

#[test]
fn batch_norm1d_statistics_survive_first_rows_far_from_the_mean() {
    // The leading rows give each column's shift: here they sit 10⁴ standard
    // deviations away from the rest, and the columns whose shift proves too
    // far are redone in f64, so the statistics stay exact.
    let (rows, c) = (300, 24);
    let x64: Vec<f64> = normal(&mut rng(11), &[rows, c], 0.0, 1.0)
        .data()
        .iter()
        .enumerate()
        .map(|(i, &v)| if i < 16 * c { v + 1e4 } else { v })
        .collect();
    let x32 = Tensor::new(vec![rows, c], x64.iter().map(|&v| v as f32).collect()).unwrap();
    let x64 = widen(&x32);
    let (y, saved) = batch_norm(&x32, None, None, None, &BatchNormOptions::training()).unwrap();
    let ones = vec![1.0; c];
    let zeros = vec![0.0; c];
    let want = reference::batch_norm(&x64, (rows, c, 1), None, &ones, &zeros, 1e-5, false);
    let err = max_abs_diff(&widen(&y), &want);
    assert!(err < 1e-5, "max abs error {err:e}");
    for ch in 0..c {
        let column: Vec<f64> = x64.iter().skip(ch).step_by(c).copied().collect();
        let (mean, _) = reference::mean_var(&column);
        assert!(
            (saved.mean[ch] - mean).abs() <= 1e-12 * mean.abs().max(1.0),
            "channel {ch}"
        );
    }
}

#[test]
fn batch_norm1d_constant_columns_have_zero_variance() {
    // ReLU-dead features (all 0) and constant ones: their lane sums are 0,
    // so they take the exact f64 path; the others stay on the fast one.
    let (rows, c) = (200, 19);
    let noise = normal(&mut rng(12), &[rows, c], 0.0, 1.0);
    let data: Vec<f32> = noise
        .data()
        .iter()
        .enumerate()
        .map(|(i, &v)| match i % c {
            0 | 7 => 0.0,
            3 => 2.5,
            _ => v as f32,
        })
        .collect();
    let x = Tensor::new(vec![rows, c], data).unwrap();
    let x64 = widen(&x);
    let (y, saved) = batch_norm(&x, None, None, None, &BatchNormOptions::training()).unwrap();
    let (ones, zeros) = (vec![1.0; c], vec![0.0; c]);
    let want = reference::batch_norm(&x64, (rows, c, 1), None, &ones, &zeros, 1e-5, false);
    let err = max_abs_diff(&widen(&y), &want);
    assert!(err < 1e-5, "max abs error {err:e}");
    for (ch, mean) in [(0, 0.0), (7, 0.0), (3, 2.5)] {
        assert_eq!(saved.mean[ch], mean, "channel {ch}");
        assert_eq!(saved.rstd[ch], 1.0 / 1e-5f64.sqrt(), "channel {ch}");
    }
}

#[test]
fn saved_statistics_stay_exact_for_backward_with_large_offsets() {
    // The mean is kept in f64: centring in backward must not lose the spread.
    let (x, x64) = rounded(7, &[4, 1024], 1e4, 0.01);
    let (_, saved) = layer_norm(&x, -1, None, None, 1e-5.into()).unwrap();
    for (row, chunk) in x64.chunks(1024).enumerate() {
        let (mean, var) = reference::mean_var(chunk);
        assert!((saved.mean[row] - mean).abs() <= 1e-12 * mean.abs());
        let rstd = 1.0 / (var + 1e-5).sqrt();
        assert!((saved.rstd[row] - rstd).abs() <= 1e-9 * rstd);
    }
}

#[test]
fn tiny_and_huge_magnitudes_normalize_to_unit_variance() {
    for scale in [1e-30f64, 1e-10, 1e10, 1e30] {
        let x = normal(&mut rng(3), &[8, 256], 0.0, 1.0);
        let scaled = Tensor::new(
            vec![8, 256],
            x.data().iter().map(|v| (v * scale) as f32).collect(),
        )
        .unwrap();
        // ε = 0 so that tiny values are not swamped by it.
        let (y, _) = layer_norm(&scaled, -1, None, None, 0.0.into()).unwrap();
        for row in y.data().chunks(256) {
            let (mean, var) =
                reference::mean_var(&row.iter().map(|&v| v as f64).collect::<Vec<_>>());
            assert!(
                mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5,
                "scale {scale}: mean {mean}, var {var}"
            );
        }
        // GroupNorm's pipelined forward: [2, 2, 2048], one group per sample.
        let x = normal(&mut rng(4), &[2, 2, 2048], 0.0, 1.0);
        let grouped = Tensor::new(
            vec![2, 2, 2048],
            x.data().iter().map(|v| (v * scale) as f32).collect(),
        )
        .unwrap();
        let (y, _) = group_norm(&grouped, 1, None, None, 0.0.into()).unwrap();
        for group in y.data().chunks(4096) {
            let (mean, var) =
                reference::mean_var(&group.iter().map(|&v| v as f64).collect::<Vec<_>>());
            assert!(
                mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5,
                "group_norm scale {scale}: mean {mean}, var {var}"
            );
        }
        let (y, _) = rms_norm(&scaled, -1, None, 0.0.into()).unwrap();
        assert!(
            y.data().iter().all(|v| v.is_finite()),
            "rms_norm scale {scale}"
        );
    }
}

#[test]
fn rows_of_length_one_give_the_bias() {
    let x = Tensor::new(vec![3, 1], vec![5.0f32, -2.0, 1e6]).unwrap();
    let b = Tensor::new(vec![1], vec![0.25f32]).unwrap();
    let (y, _) = layer_norm(&x, -1, None, Some(&b), 1e-5.into()).unwrap();
    assert_eq!(y.data(), &[0.25, 0.25, 0.25]);
}

#[test]
fn empty_batches_give_empty_outputs() {
    let x = Tensor::<f32>::zeros(&[0, 3, 4]).unwrap();
    let (y, _) = batch_norm(&x, None, None, None, &BatchNormOptions::training()).unwrap();
    assert_eq!(y.shape(), &[0, 3, 4]);
    let (y, _) = group_norm(&x, 3, None, None, 1e-5.into()).unwrap();
    assert_eq!(y.numel(), 0);
    let (y, _) = layer_norm(&x, 1, None, None, 1e-5.into()).unwrap();
    assert_eq!(y.numel(), 0);
    let x = Tensor::<f32>::zeros(&[2, 0]).unwrap();
    let (y, _) = layer_norm(&x, -1, None, None, 1e-5.into()).unwrap();
    assert_eq!(y.shape(), &[2, 0]);
}

//! Properties: shift and scale invariance, zero mean and unit variance of
//! outputs, Σdx = 0 where it holds, merge associativity of moments, and
//! affine-off equal to γ = 1, β = 0.

mod common;

use common::*;
use normlab::kernels::batch_norm::{batch_norm, batch_norm_backward, BatchNormOptions};
use normlab::kernels::group_norm::{group_norm, group_norm_backward};
use normlab::kernels::layer_norm::{layer_norm, layer_norm_backward};
use normlab::kernels::rms_norm::rms_norm;
use normlab::{reference, Moments, Tensor};
use proptest::prelude::*;

fn tensor(shape: Vec<usize>, data: Vec<f64>) -> Tensor<f64> {
    Tensor::new(shape, data).unwrap()
}

/// `[rows, n]` values with some spread in every row.
fn rows_strategy() -> impl Strategy<Value = Tensor<f64>> {
    (1usize..6, 2usize..40).prop_flat_map(|(rows, n)| {
        prop::collection::vec(-100.0f64..100.0, rows * n)
            .prop_map(move |d| tensor(vec![rows, n], d))
    })
}

/// `[N, C, S]` values with N·S ≥ 2.
fn ncs_strategy() -> impl Strategy<Value = Tensor<f64>> {
    (1usize..4, 1usize..5, 2usize..9).prop_flat_map(|(n, c, s)| {
        prop::collection::vec(-50.0f64..50.0, n * c * s).prop_map(move |d| tensor(vec![n, c, s], d))
    })
}

fn has_spread(row: &[f64]) -> bool {
    reference::mean_var(row).1 > 1e-3
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(7), ..ProptestConfig::default() })]

    #[test]
    fn layer_norm_is_shift_and_scale_invariant(x in rows_strategy(), shift in -1e3f64..1e3, scale in 0.01f64..100.0) {
        prop_assume!(x.data().chunks(x.shape()[1]).all(has_spread));
        let moved = tensor(x.shape().to_vec(), x.data().iter().map(|v| v * scale + shift).collect());
        let (a, _) = layer_norm(&x, -1, None, None, 0.0.into()).unwrap();
        let (b, _) = layer_norm(&moved, -1, None, None, 0.0.into()).unwrap();
        assert_close("shifted", b.data(), a.data(), 1e-8, 1e-8);
    }

    #[test]
    fn normalized_outputs_have_zero_mean_and_unit_variance(x in ncs_strategy()) {
        let (n, c, s) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let (y, _) = batch_norm(&x, None, None, None, &BatchNormOptions { eps: 0.0.into(), ..BatchNormOptions::training() }).unwrap();
        for ch in 0..c {
            let vals: Vec<f64> = (0..n).flat_map(|b| (0..s).map(move |p| (b * c + ch) * s + p)).map(|i| y.data()[i]).collect();
            let xs: Vec<f64> = (0..n).flat_map(|b| (0..s).map(move |p| (b * c + ch) * s + p)).map(|i| x.data()[i]).collect();
            prop_assume!(has_spread(&xs));
            let (mean, var) = reference::mean_var(&vals);
            prop_assert!(mean.abs() < 1e-10 && (var - 1.0).abs() < 1e-9, "mean {} var {}", mean, var);
        }
    }

    #[test]
    fn rms_norm_is_scale_invariant_and_has_unit_mean_square(x in rows_strategy(), scale in 0.01f64..100.0) {
        let n = x.shape()[1];
        prop_assume!(x.data().chunks(n).all(|r| r.iter().any(|v| v.abs() > 1e-3)));
        let scaled = tensor(x.shape().to_vec(), x.data().iter().map(|v| v * scale).collect());
        let (a, _) = rms_norm(&x, -1, None, 0.0.into()).unwrap();
        let (b, _) = rms_norm(&scaled, -1, None, 0.0.into()).unwrap();
        assert_close("scaled", b.data(), a.data(), 1e-10, 1e-10);
        for row in a.data().chunks(n) {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / n as f64;
            prop_assert!((ms - 1.0).abs() < 1e-10);
        }
    }

    #[test]
    fn input_gradients_sum_to_zero_over_each_normalized_group(x in ncs_strategy(), seed in 0u64..1000) {
        let dy = normal(&mut rng(seed), x.shape(), 0.0, 1.0);
        let c = x.shape()[1];
        let w = normal(&mut rng(seed + 1), &[c], 1.0, 0.3);
        // BatchNorm: Σ over each channel.
        let (_, saved) = batch_norm(&x, None, Some(&w), None, &BatchNormOptions::training()).unwrap();
        let g = batch_norm_backward(&x, &dy, Some(&w), false, 1e-5.into(), &saved, true).unwrap();
        let (n, s) = (x.shape()[0], x.shape()[2]);
        for ch in 0..c {
            let total: f64 = (0..n).flat_map(|b| (0..s).map(move |p| (b * c + ch) * s + p)).map(|i| g.dx.data()[i]).sum();
            prop_assert!(total.abs() < 1e-8, "batch_norm channel {}: {}", ch, total);
        }
        // GroupNorm with G = 1 and LayerNorm over [C, S]: Σ over each sample.
        let (_, saved) = group_norm(&x, 1, Some(&w), None, 1e-5.into()).unwrap();
        let g = group_norm_backward(&x, &dy, 1, Some(&w), false, 1e-5.into(), &saved).unwrap();
        for sample in g.dx.data().chunks(c * s) {
            prop_assert!(sample.iter().sum::<f64>().abs() < 1e-8);
        }
        let (_, saved) = layer_norm(&x, 1, None, None, 1e-5.into()).unwrap();
        let g = layer_norm_backward(&x, &dy, 1, None, false, 1e-5.into(), &saved).unwrap();
        for sample in g.dx.data().chunks(c * s) {
            prop_assert!(sample.iter().sum::<f64>().abs() < 1e-8);
        }
    }

    #[test]
    fn moments_merge_is_associative_and_matches_one_pass(
        data in prop::collection::vec(-1e6f64..1e6, 3..300),
        cut1 in 0.0f64..1.0, cut2 in 0.0f64..1.0,
    ) {
        let (i, j) = {
            let a = (cut1 * data.len() as f64) as usize;
            let b = (cut2 * data.len() as f64) as usize;
            (a.min(b), a.max(b))
        };
        let (a, b, c) = (Moments::of_slice(&data[..i]), Moments::of_slice(&data[i..j]), Moments::of_slice(&data[j..]));
        let left = a.merge(b).merge(c);
        let right = a.merge(b.merge(c));
        let all = Moments::of_slice(&data);
        for m in [left, right] {
            prop_assert!((m.count - all.count).abs() == 0.0);
            prop_assert!((m.mean - all.mean).abs() <= 1e-9 * (1.0 + all.mean.abs()));
            prop_assert!((m.m2 - all.m2).abs() <= 1e-9 * (1.0 + all.m2));
        }
        let (mean, var) = reference::mean_var(&data);
        prop_assert!((all.mean - mean).abs() <= 1e-9 * (1.0 + mean.abs()));
        prop_assert!((all.var(0) - var).abs() <= 1e-9 * (1.0 + var));
    }
}

#[test]
fn affine_off_equals_unit_weight_and_zero_bias() {
    let x = normal(&mut rng(9), &[3, 4, 5], 1.0, 2.0);
    let ones = Tensor::full(&[4], 1.0).unwrap();
    let zeros = Tensor::full(&[4], 0.0).unwrap();
    let (a, _) = group_norm(&x, 2, None, None, 1e-5.into()).unwrap();
    let (b, _) = group_norm(&x, 2, Some(&ones), Some(&zeros), 1e-5.into()).unwrap();
    assert_eq!(a, b);
    let (a, _) = batch_norm(&x, None, None, None, &BatchNormOptions::training()).unwrap();
    let (b, _) = batch_norm(
        &x,
        None,
        Some(&ones),
        Some(&zeros),
        &BatchNormOptions::training(),
    )
    .unwrap();
    assert_eq!(a, b);
    let ones = Tensor::full(&[5], 1.0).unwrap();
    let zeros = Tensor::full(&[5], 0.0).unwrap();
    let (a, _) = layer_norm(&x, -1, None, None, 1e-5.into()).unwrap();
    let (b, _) = layer_norm(&x, -1, Some(&ones), Some(&zeros), 1e-5.into()).unwrap();
    assert_eq!(a, b);
    // LayerNorm without bias equals bias 0.
    let w = normal(&mut rng(10), &[5], 1.0, 0.5);
    let (a, _) = layer_norm(&x, -1, Some(&w), None, 1e-5.into()).unwrap();
    let (b, _) = layer_norm(&x, -1, Some(&w), Some(&zeros), 1e-5.into()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn single_sample_with_spatial_positions_trains_batch_norm() {
    // N = 1 is fine when there are several spatial positions (PyTorch allows it).
    let x = normal(&mut rng(11), &[1, 3, 4, 4], 0.0, 1.0);
    let (y, saved) = batch_norm(&x, None, None, None, &BatchNormOptions::training()).unwrap();
    assert_eq!(saved.mean.len(), 3);
    assert!(y.data().iter().all(|v| v.is_finite()));
}

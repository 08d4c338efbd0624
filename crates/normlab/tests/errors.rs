//! Bad input gets a typed error naming the operation, the argument and the
//! shapes; running statistics are never left with NaN.

mod common;

use common::*;
use normlab::kernels::batch_norm::{batch_norm, BatchNormOptions, RunningStatsMut};
use normlab::kernels::group_norm::group_norm;
use normlab::kernels::instance_norm::instance_norm;
use normlab::kernels::layer_norm::{layer_norm, layer_norm_backward};
use normlab::kernels::lrn::{lrn, LrnOptions};
use normlab::kernels::rms_norm::rms_norm;
use normlab::layers::prelude::*;
use normlab::layers::{
    BatchNormConfig, GroupNormConfig, InstanceNormConfig, LayerNormConfig, RmsNormConfig,
};
use normlab::{Epsilon, Momentum, NormError, Tensor};

fn x(shape: &[usize]) -> Tensor<f32> {
    normal(&mut rng(1), shape, 0.0, 1.0).cast()
}

/// Asserts the error's message names every fragment.
#[track_caller]
fn says(err: NormError, fragments: &[&str]) {
    let msg = err.to_string();
    for f in fragments {
        assert!(msg.contains(f), "`{msg}` does not mention `{f}`");
    }
}

#[test]
fn batch_norm_training_with_one_value_per_channel() {
    let err = batch_norm(&x(&[1, 3]), None, None, None, &BatchNormOptions::training()).unwrap_err();
    assert!(matches!(
        err,
        NormError::TooFewValues {
            op: "batch_norm",
            ..
        }
    ));
    says(
        err,
        &["batch_norm", "more than 1 value per channel", "[1, 3]"],
    );
    // Same for [1, C, 1, 1].
    let err = batch_norm(
        &x(&[1, 3, 1, 1]),
        None,
        None,
        None,
        &BatchNormOptions::training(),
    )
    .unwrap_err();
    assert!(matches!(err, NormError::TooFewValues { .. }));
}

#[test]
fn parameter_and_running_stat_lengths_must_match_channels() {
    let xs = x(&[2, 3, 4]);
    let w = Tensor::<f32>::full(&[4], 1.0).unwrap();
    let err = batch_norm(&xs, None, Some(&w), None, &BatchNormOptions::training()).unwrap_err();
    says(err, &["batch_norm", "`weight`", "[4]", "[3]", "[2, 3, 4]"]);
    let err = batch_norm(&xs, None, None, Some(&w), &BatchNormOptions::training()).unwrap_err();
    says(err, &["`bias`", "[4]"]);
    let (mut m, mut v, mut n) = (vec![0.0f32; 2], vec![1.0f32; 3], 0);
    let running = RunningStatsMut {
        mean: &mut m,
        var: &mut v,
        num_batches_tracked: &mut n,
    };
    let err = batch_norm(
        &xs,
        Some(running),
        None,
        None,
        &BatchNormOptions::training(),
    )
    .unwrap_err();
    says(err, &["`running_mean`", "[2]", "[3]"]);
    let (mut m, mut v, mut n) = (vec![0.0f32; 3], vec![1.0f32; 5], 0);
    let running = RunningStatsMut {
        mean: &mut m,
        var: &mut v,
        num_batches_tracked: &mut n,
    };
    let err = batch_norm(&xs, Some(running), None, None, &BatchNormOptions::eval()).unwrap_err();
    says(err, &["`running_var`", "[5]"]);
    let err = group_norm(&xs, 3, Some(&w), None, 1e-5.into()).unwrap_err();
    says(err, &["group_norm", "`weight`"]);
}

#[test]
fn eval_without_running_statistics() {
    let err = batch_norm(&x(&[2, 3]), None, None, None, &BatchNormOptions::eval()).unwrap_err();
    assert!(matches!(
        err,
        NormError::MissingRunningStats { op: "batch_norm" }
    ));
    let options = BatchNormOptions {
        use_batch_stats: false,
        ..BatchNormOptions::eval()
    };
    let err = instance_norm(&x(&[2, 3, 4]), None, None, None, &options).unwrap_err();
    assert!(matches!(
        err,
        NormError::MissingRunningStats {
            op: "instance_norm"
        }
    ));
}

#[test]
fn channels_not_divisible_by_groups() {
    let err = group_norm(&x(&[2, 6, 3]), 4, None, None, 1e-5.into()).unwrap_err();
    assert!(matches!(
        err,
        NormError::GroupsNotDivisible {
            channels: 6,
            groups: 4,
            ..
        }
    ));
    says(
        err,
        &["group_norm: 6 channels are not divisible by 4 groups"],
    );
    let err = group_norm(&x(&[2, 6, 3]), 0, None, None, 1e-5.into()).unwrap_err();
    says(err, &["group_norm", "num_groups", "0"]);
    assert!(GroupNormConfig::new(4, 6).init::<f32>().is_err());
}

#[test]
fn weight_shape_differs_from_normalized_shape() {
    let xs = x(&[2, 3, 4]);
    let w = Tensor::<f32>::full(&[3, 4], 1.0).unwrap();
    let err = layer_norm(&xs, -1, Some(&w), None, 1e-5.into()).unwrap_err();
    says(err, &["layer_norm", "`weight`", "[3, 4]", "[4]"]);
    let err = rms_norm(&xs, 1, Some(&Tensor::full(&[4], 1.0).unwrap()), 1e-5.into()).unwrap_err();
    says(err, &["rms_norm", "`weight`"]);
    let layer = LayerNormConfig::new(&[5]).init::<f32>().unwrap();
    let err = layer.forward(&xs).unwrap_err();
    says(err, &["layer_norm", "[2, 3, 4]", "[5]"]);
}

#[test]
fn axis_out_of_range() {
    for axis in [3isize, -4, 100] {
        let err = layer_norm(&x(&[2, 3, 4]), axis, None, None, 1e-5.into()).unwrap_err();
        assert!(matches!(err, NormError::AxisOutOfRange { .. }));
        says(err, &["layer_norm", &format!("axis {axis}"), "rank 3"]);
        assert!(rms_norm(&x(&[2, 3, 4]), axis, None, 1e-5.into()).is_err());
    }
}

#[test]
fn lrn_rank_and_size() {
    let err = lrn(&x(&[2, 3]), &LrnOptions::new(3)).unwrap_err();
    says(err, &["local_response_norm", "rank at least 3", "[2, 3]"]);
    let err = lrn(&x(&[2, 3, 4]), &LrnOptions::new(0)).unwrap_err();
    says(err, &["local_response_norm", "`size`", "0"]);
    let err = lrn(
        &x(&[2, 3, 4]),
        &LrnOptions {
            beta: f64::NAN,
            ..LrnOptions::new(3)
        },
    )
    .unwrap_err();
    says(err, &["`beta`", "finite"]);
}

#[test]
fn eps_must_be_finite_and_non_negative() {
    for eps in [-1e-5, f64::NAN, f64::INFINITY] {
        let e = Epsilon::inside_sqrt(eps);
        says(
            layer_norm(&x(&[2, 3]), -1, None, None, e).unwrap_err(),
            &["layer_norm", "`eps`"],
        );
        says(
            rms_norm(&x(&[2, 3]), -1, None, e).unwrap_err(),
            &["rms_norm", "`eps`"],
        );
        says(
            group_norm(&x(&[2, 3]), 1, None, None, e).unwrap_err(),
            &["group_norm", "`eps`"],
        );
        let options = BatchNormOptions {
            eps: e,
            ..BatchNormOptions::training()
        };
        says(
            batch_norm(&x(&[2, 3]), None, None, None, &options).unwrap_err(),
            &["batch_norm", "`eps`"],
        );
        assert!(BatchNormConfig::new(3).with_eps(eps).init::<f32>().is_err());
        assert!(LayerNormConfig::new(&[3])
            .with_eps(eps)
            .init::<f32>()
            .is_err());
        assert!(RmsNormConfig::new(&[3])
            .with_eps(eps)
            .init::<f32>()
            .is_err());
        assert!(InstanceNormConfig::new(3)
            .with_eps(eps)
            .init::<f32>()
            .is_err());
    }
}

#[test]
fn momentum_outside_unit_interval() {
    for m in [-0.1, 1.5, f64::NAN] {
        let options = BatchNormOptions {
            momentum: Momentum::Exponential(m),
            ..BatchNormOptions::training()
        };
        let err = batch_norm(&x(&[2, 3]), None, None, None, &options).unwrap_err();
        says(err, &["batch_norm", "`momentum`", "[0, 1]"]);
        assert!(BatchNormConfig::new(3)
            .with_momentum(Momentum::Exponential(m))
            .init::<f32>()
            .is_err());
    }
}

#[test]
fn instance_norm_needs_more_than_one_spatial_value_in_training() {
    let err = instance_norm(
        &x(&[2, 3, 1]),
        None,
        None,
        None,
        &BatchNormOptions::training(),
    )
    .unwrap_err();
    says(
        err,
        &[
            "instance_norm",
            "expected more than 1 spatial element when training",
        ],
    );
    let err = InstanceNormConfig::new(3)
        .init::<f32>()
        .unwrap()
        .forward(&x(&[2, 3]))
        .unwrap_err();
    says(err, &["instance_norm", "rank at least 3"]);
}

#[test]
fn backward_with_mismatched_dy() {
    let xs = x(&[2, 3]);
    let (_, saved) = layer_norm(&xs, -1, None, None, 1e-5.into()).unwrap();
    let err =
        layer_norm_backward(&xs, &x(&[3, 2]), -1, None, false, 1e-5.into(), &saved).unwrap_err();
    says(err, &["layer_norm", "`dy`", "[3, 2]", "[2, 3]"]);
}

#[test]
fn non_finite_batches_leave_running_statistics_unchanged() {
    let mut bn = BatchNormConfig::new(2).init::<f32>().unwrap();
    bn.forward(&x(&[4, 2])).unwrap();
    let before = (
        bn.running_mean().unwrap().to_vec(),
        bn.running_var().unwrap().to_vec(),
        bn.num_batches_tracked(),
    );
    for bad in [f32::NAN, f32::INFINITY] {
        let mut data = x(&[4, 2]).into_data();
        data[3] = bad;
        let err = bn
            .forward(&Tensor::new(vec![4, 2], data).unwrap())
            .unwrap_err();
        assert!(
            matches!(err, NormError::NonFiniteStatistics { channel: 1, .. }),
            "{err}"
        );
        says(err, &["batch_norm", "channel 1", "left unchanged"]);
        let after = (
            bn.running_mean().unwrap().to_vec(),
            bn.running_var().unwrap().to_vec(),
            bn.num_batches_tracked(),
        );
        assert_eq!(before, after);
    }
    // Finite values whose variance overflows f32 are refused too.
    let err = bn
        .forward(&Tensor::new(vec![2, 2], vec![-3e38f32, 0.0, 3e38, 0.0]).unwrap())
        .unwrap_err();
    assert!(matches!(
        err,
        NormError::NonFiniteStatistics { channel: 0, .. }
    ));
    assert_eq!(before.0, bn.running_mean().unwrap());
    // The same holds for InstanceNorm's running statistics.
    let mut inorm = InstanceNormConfig::new(2)
        .with_track_running_stats(true)
        .init::<f32>()
        .unwrap();
    let mut data = x(&[2, 2, 3]).into_data();
    data[0] = f32::NAN;
    assert!(inorm
        .forward(&Tensor::new(vec![2, 2, 3], data).unwrap())
        .is_err());
    assert_eq!(inorm.running_mean().unwrap(), &[0.0, 0.0]);
    assert_eq!(inorm.num_batches_tracked(), Some(0));
}

#[test]
fn wrong_channel_count_for_layers() {
    let mut bn = BatchNormConfig::new(4)
        .with_affine(false)
        .init::<f32>()
        .unwrap();
    let err = bn.forward(&x(&[2, 3, 5])).unwrap_err();
    says(err, &["batch_norm", "`x`", "[2, 3, 5]", "[2, 4, 5]"]);
    let gn = GroupNormConfig::new(2, 4)
        .with_affine(false)
        .init::<f32>()
        .unwrap();
    says(gn.forward(&x(&[2, 6])).unwrap_err(), &["group_norm", "`x`"]);
    says(
        bn.forward(&x(&[5])).unwrap_err(),
        &["batch_norm", "rank at least 2"],
    );
}

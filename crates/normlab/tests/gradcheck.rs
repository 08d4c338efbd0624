//! Backward of every op and option against central finite differences in f64.
//!
//! The loss is `L = Σ y ⊙ r` for a fixed random `r`, so `dy = r`, and each
//! analytic gradient (dx, dweight, dbias) must match `(L(p+h) - L(p-h))/2h`.

mod common;

use common::*;
use normlab::kernels::batch_norm::{
    batch_norm, batch_norm_backward, BatchNormOptions, RunningStatsMut,
};
use normlab::kernels::group_norm::{group_norm, group_norm_backward};
use normlab::kernels::instance_norm::{instance_norm, instance_norm_backward};
use normlab::kernels::layer_norm::{layer_norm, layer_norm_backward};
use normlab::kernels::lrn::{lrn, lrn_backward, EvenWindow, LrnOptions, LrnRegion};
use normlab::kernels::rms_norm::{rms_norm, rms_norm_backward};
use normlab::{Epsilon, Grads, Tensor};

const H: f64 = 1e-5;
const ATOL: f64 = 1e-7;
const RTOL: f64 = 1e-6;

fn epsilons() -> [Epsilon; 3] {
    [
        Epsilon::inside_sqrt(1e-5),
        Epsilon::inside_sqrt(0.3),
        Epsilon::add_to_std(0.1),
    ]
}

/// Checks `grads` of a function `f(x, weight, bias) -> y` by finite differences.
fn check(
    what: &str,
    x: &Tensor<f64>,
    weight: Option<&Tensor<f64>>,
    bias: Option<&Tensor<f64>>,
    grads: &Grads<f64>,
    r: &Tensor<f64>,
    f: impl Fn(&Tensor<f64>, Option<&Tensor<f64>>, Option<&Tensor<f64>>) -> Tensor<f64>,
) {
    let dx = numeric_grad(x, H, |xp| dot(&f(xp, weight, bias), r));
    assert_close(&format!("{what} dx"), &widen(&grads.dx), &dx, ATOL, RTOL);
    if let Some(w) = weight {
        let dw = numeric_grad(w, H, |wp| dot(&f(x, Some(wp), bias), r));
        assert_close(
            &format!("{what} dweight"),
            &widen(grads.dweight.as_ref().unwrap()),
            &dw,
            ATOL,
            RTOL,
        );
    } else {
        assert!(grads.dweight.is_none(), "{what}: dweight without weight");
    }
    if let Some(b) = bias {
        let db = numeric_grad(b, H, |bp| dot(&f(x, weight, Some(bp)), r));
        assert_close(
            &format!("{what} dbias"),
            &widen(grads.dbias.as_ref().unwrap()),
            &db,
            ATOL,
            RTOL,
        );
    } else {
        assert!(grads.dbias.is_none(), "{what}: dbias without bias");
    }
}

#[test]
fn layer_norm_gradients() {
    let mut g = rng(1);
    for (shape, axis) in [
        (vec![3, 7], -1isize),
        (vec![2, 3, 4], 1),
        (vec![2, 3, 4], 0),
        (vec![4, 1], -1),
    ] {
        let x = normal(&mut g, &shape, 0.5, 2.0);
        let norm_shape = shape[(if axis < 0 {
            shape.len() as isize + axis
        } else {
            axis
        }) as usize..]
            .to_vec();
        let w = normal(&mut g, &norm_shape, 1.0, 0.5);
        let b = normal(&mut g, &norm_shape, 0.0, 0.5);
        let r = normal(&mut g, &shape, 0.0, 1.0);
        for eps in epsilons() {
            for (weight, bias) in [(Some(&w), Some(&b)), (Some(&w), None), (None, None)] {
                let (_, saved) = layer_norm(&x, axis, weight, bias, eps).unwrap();
                let grads =
                    layer_norm_backward(&x, &r, axis, weight, bias.is_some(), eps, &saved).unwrap();
                check(
                    &format!("layer_norm {shape:?} axis {axis} {eps:?}"),
                    &x,
                    weight,
                    bias,
                    &grads,
                    &r,
                    |x, w, b| layer_norm(x, axis, w, b, eps).unwrap().0,
                );
            }
        }
    }
}

#[test]
fn rms_norm_gradients() {
    let mut g = rng(2);
    for (shape, axis) in [(vec![3, 7], -1isize), (vec![2, 3, 4], -2), (vec![5, 1], 1)] {
        let x = normal(&mut g, &shape, 0.3, 1.5);
        let norm_shape = shape[(if axis < 0 {
            shape.len() as isize + axis
        } else {
            axis
        }) as usize..]
            .to_vec();
        let w = normal(&mut g, &norm_shape, 1.0, 0.5);
        let r = normal(&mut g, &shape, 0.0, 1.0);
        for eps in epsilons() {
            for weight in [Some(&w), None] {
                let (_, saved) = rms_norm(&x, axis, weight, eps).unwrap();
                let grads = rms_norm_backward(&x, &r, axis, weight, eps, &saved).unwrap();
                check(
                    &format!("rms_norm {shape:?} {eps:?}"),
                    &x,
                    weight,
                    None,
                    &grads,
                    &r,
                    |x, w, _| rms_norm(x, axis, w, eps).unwrap().0,
                );
            }
        }
    }
}

#[test]
fn batch_norm_gradients_train_and_eval() {
    let mut g = rng(3);
    for shape in [
        vec![4, 3],
        vec![3, 2, 5],
        vec![2, 3, 2, 3],
        vec![1, 2, 2, 2, 2],
    ] {
        let c = shape[1];
        let x = normal(&mut g, &shape, -0.7, 1.3);
        let w = normal(&mut g, &[c], 1.0, 0.5);
        let b = normal(&mut g, &[c], 0.0, 0.5);
        let rm = normal(&mut g, &[c], 0.0, 0.5);
        let rv = uniform(&mut g, &[c], 0.5, 2.0);
        let r = normal(&mut g, &shape, 0.0, 1.0);
        for eps in epsilons() {
            for training in [true, false] {
                let options = BatchNormOptions {
                    use_batch_stats: training,
                    update_running_stats: false,
                    eps,
                    ..BatchNormOptions::training()
                };
                let forward =
                    |x: &Tensor<f64>, w: Option<&Tensor<f64>>, b: Option<&Tensor<f64>>| {
                        let (mut m, mut v, mut n) = (rm.data().to_vec(), rv.data().to_vec(), 0);
                        let running = RunningStatsMut {
                            mean: &mut m,
                            var: &mut v,
                            num_batches_tracked: &mut n,
                        };
                        batch_norm(x, Some(running), w, b, &options).unwrap()
                    };
                for (weight, bias) in [(Some(&w), Some(&b)), (None, None)] {
                    let (_, saved) = forward(&x, weight, bias);
                    let grads =
                        batch_norm_backward(&x, &r, weight, bias.is_some(), eps, &saved, training)
                            .unwrap();
                    check(
                        &format!("batch_norm {shape:?} training {training} {eps:?}"),
                        &x,
                        weight,
                        bias,
                        &grads,
                        &r,
                        |x, w, b| forward(x, w, b).0,
                    );
                }
            }
        }
    }
}

#[test]
fn group_norm_gradients_for_every_grouping() {
    let mut g = rng(4);
    for (shape, groups) in [
        (vec![2, 6, 3], 1),
        (vec![2, 6, 3], 2),
        (vec![2, 6, 3], 6),
        (vec![3, 4], 2),
        (vec![1, 4, 2, 2], 4),
    ] {
        let c = shape[1];
        let x = normal(&mut g, &shape, 2.0, 0.8);
        let w = normal(&mut g, &[c], 1.0, 0.5);
        let b = normal(&mut g, &[c], 0.0, 0.5);
        let r = normal(&mut g, &shape, 0.0, 1.0);
        for eps in epsilons() {
            for (weight, bias) in [(Some(&w), Some(&b)), (None, None)] {
                let (_, saved) = group_norm(&x, groups, weight, bias, eps).unwrap();
                let grads =
                    group_norm_backward(&x, &r, groups, weight, bias.is_some(), eps, &saved)
                        .unwrap();
                check(
                    &format!("group_norm {shape:?} G={groups} {eps:?}"),
                    &x,
                    weight,
                    bias,
                    &grads,
                    &r,
                    |x, w, b| group_norm(x, groups, w, b, eps).unwrap().0,
                );
            }
        }
    }
}

#[test]
fn instance_norm_gradients_with_input_and_running_stats() {
    let mut g = rng(5);
    let shape = [2, 3, 4];
    let x = normal(&mut g, &shape, 1.0, 2.0);
    let w = normal(&mut g, &[3], 1.0, 0.5);
    let b = normal(&mut g, &[3], 0.0, 0.5);
    let rm = normal(&mut g, &[3], 0.0, 0.5);
    let rv = uniform(&mut g, &[3], 0.5, 2.0);
    let r = normal(&mut g, &shape, 0.0, 1.0);
    for eps in epsilons() {
        for input_stats in [true, false] {
            let options = BatchNormOptions {
                use_batch_stats: input_stats,
                update_running_stats: false,
                eps,
                ..BatchNormOptions::training()
            };
            let forward = |x: &Tensor<f64>, w: Option<&Tensor<f64>>, b: Option<&Tensor<f64>>| {
                let (mut m, mut v, mut n) = (rm.data().to_vec(), rv.data().to_vec(), 0);
                let running = RunningStatsMut {
                    mean: &mut m,
                    var: &mut v,
                    num_batches_tracked: &mut n,
                };
                instance_norm(x, Some(running), w, b, &options).unwrap()
            };
            for (weight, bias) in [(Some(&w), Some(&b)), (None, None)] {
                let (_, saved) = forward(&x, weight, bias);
                let grads = instance_norm_backward(
                    &x,
                    &r,
                    weight,
                    bias.is_some(),
                    eps,
                    &saved,
                    input_stats,
                )
                .unwrap();
                check(
                    &format!("instance_norm input_stats {input_stats} {eps:?}"),
                    &x,
                    weight,
                    bias,
                    &grads,
                    &r,
                    |x, w, b| forward(x, w, b).0,
                );
            }
        }
    }
}

#[test]
fn lrn_gradients_for_every_window() {
    let mut g = rng(6);
    for region in [LrnRegion::AcrossChannels, LrnRegion::WithinChannel] {
        for size in [1, 2, 3, 4, 5] {
            for even_window in [EvenWindow::Torch, EvenWindow::Onnx] {
                for alpha_over_size in [true, false] {
                    let options = LrnOptions {
                        size,
                        alpha: 0.3,
                        beta: 0.75,
                        k: 1.5,
                        alpha_over_size,
                        region,
                        even_window,
                    };
                    // Maps of 12 values, and of 1 and 6 (the value-by-value path).
                    for shape in [&[2, 5, 3, 4][..], &[3, 6, 1], &[2, 5, 2, 3]] {
                        let x = normal(&mut g, shape, 0.0, 1.5);
                        let r = normal(&mut g, shape, 0.0, 1.0);
                        let dx = lrn_backward(&x, &r, &options).unwrap();
                        let numeric =
                            numeric_grad(&x, H, |xp| dot(&lrn(xp, &options).unwrap(), &r));
                        let what = format!("lrn {shape:?} {options:?}");
                        assert_close(&what, dx.data(), &numeric, ATOL, RTOL);
                    }
                }
            }
        }
    }
}

#[test]
fn lrn_gradient_on_rank_3_and_5() {
    let mut g = rng(7);
    for (shape, region) in [
        (vec![2, 4, 5], LrnRegion::WithinChannel),
        (vec![1, 3, 2, 3, 2], LrnRegion::WithinChannel),
        (vec![2, 6, 3], LrnRegion::AcrossChannels),
    ] {
        let options = LrnOptions {
            alpha: 0.5,
            region,
            ..LrnOptions::new(3)
        };
        let x = normal(&mut g, &shape, 0.0, 1.0);
        let r = normal(&mut g, &shape, 0.0, 1.0);
        let dx = lrn_backward(&x, &r, &options).unwrap();
        let numeric = numeric_grad(&x, H, |xp| dot(&lrn(xp, &options).unwrap(), &r));
        assert_close(
            &format!("lrn {shape:?} {region:?}"),
            dx.data(),
            &numeric,
            ATOL,
            RTOL,
        );
    }
}

//! Forward of every op and option, in f32 and f64, against the naive f64
//! references of `normlab::reference`, over edge shapes.

mod common;

use common::*;
use normlab::kernels::batch_norm::{batch_norm, BatchNormOptions, RunningStatsMut};
use normlab::kernels::group_norm::group_norm;
use normlab::kernels::instance_norm::instance_norm;
use normlab::kernels::layer_norm::layer_norm;
use normlab::kernels::lrn::{lrn, EvenWindow, LrnOptions, LrnRegion};
use normlab::kernels::rms_norm::rms_norm;
use normlab::{reference, Epsilon, Tensor};

fn f32_vs_ref(what: &str, got32: &[f64], want: &[f64]) {
    assert_close(&format!("{what} f32"), got32, want, 2e-6, 2e-6);
}

fn shapes_rows() -> Vec<(usize, usize)> {
    vec![
        (1, 1),
        (3, 1),
        (2, 7),
        (4, 63),
        (3, 64),
        (2, 65),
        (5, 257),
        (0, 5),
        (2, 2049),
    ]
}

#[test]
fn layer_norm_matches_reference() {
    let mut g = rng(11);
    for (rows, n) in shapes_rows() {
        for eps in [Epsilon::inside_sqrt(1e-5), Epsilon::add_to_std(1e-3)] {
            let add = eps.placement == normlab::EpsPlacement::AddToStd;
            let x = normal(&mut g, &[rows, n], 3.0, 2.0)
                .cast::<f32>()
                .cast::<f64>();
            let w = normal(&mut g, &[n], 1.0, 0.3).cast::<f32>().cast::<f64>();
            let b = normal(&mut g, &[n], 0.0, 0.3).cast::<f32>().cast::<f64>();
            let want = reference::layer_norm(x.data(), n, w.data(), b.data(), eps.value, add);
            let (y, _) = layer_norm(&x, -1, Some(&w), Some(&b), eps).unwrap();
            assert_close("layer_norm f64", y.data(), &want, 1e-12, 1e-10);
            let (y32, _) =
                layer_norm(&x.cast::<f32>(), -1, Some(&w.cast()), Some(&b.cast()), eps).unwrap();
            f32_vs_ref(&format!("layer_norm {rows}x{n}"), &widen(&y32), &want);
        }
    }
}

#[test]
fn rms_norm_matches_reference() {
    let mut g = rng(12);
    for (rows, n) in shapes_rows() {
        let x = normal(&mut g, &[rows, n], 0.5, 2.0)
            .cast::<f32>()
            .cast::<f64>();
        let w = normal(&mut g, &[n], 1.0, 0.3).cast::<f32>().cast::<f64>();
        let want = reference::rms_norm(x.data(), n, w.data(), 1e-6, false);
        let (y, _) = rms_norm(&x, -1, Some(&w), 1e-6.into()).unwrap();
        assert_close("rms_norm f64", y.data(), &want, 1e-12, 1e-10);
        let (y32, _) = rms_norm(&x.cast::<f32>(), -1, Some(&w.cast()), 1e-6.into()).unwrap();
        f32_vs_ref(&format!("rms_norm {rows}x{n}"), &widen(&y32), &want);
    }
}

fn ncs_shapes() -> Vec<Vec<usize>> {
    vec![
        vec![2, 3],
        vec![1, 4, 5],
        vec![3, 2, 7],
        vec![2, 4, 3, 5],
        vec![2, 2, 2, 3, 3],
        vec![1, 8, 63],
        vec![5, 1, 1],
    ]
}

#[test]
fn batch_norm_matches_reference_in_training_and_eval() {
    let mut g = rng(13);
    for shape in ncs_shapes() {
        let (n, c, s) = (shape[0], shape[1], shape[2..].iter().product::<usize>());
        if n * s < 2 {
            continue;
        }
        let x = normal(&mut g, &shape, -2.0, 3.0)
            .cast::<f32>()
            .cast::<f64>();
        let w = normal(&mut g, &[c], 1.0, 0.3).cast::<f32>().cast::<f64>();
        let b = normal(&mut g, &[c], 0.0, 0.3).cast::<f32>().cast::<f64>();
        let rm = normal(&mut g, &[c], 0.0, 1.0).cast::<f32>().cast::<f64>();
        let rv = uniform(&mut g, &[c], 0.2, 3.0).cast::<f32>().cast::<f64>();
        for training in [true, false] {
            let stats = (!training).then(|| (rm.data(), rv.data()));
            let want =
                reference::batch_norm(x.data(), (n, c, s), stats, w.data(), b.data(), 1e-5, false);
            let options = BatchNormOptions {
                use_batch_stats: training,
                ..BatchNormOptions::eval()
            };
            let run = |x: &Tensor<f64>| -> Vec<f64> {
                let (mut m, mut v, mut k) = (rm.data().to_vec(), rv.data().to_vec(), 0);
                let running = RunningStatsMut {
                    mean: &mut m,
                    var: &mut v,
                    num_batches_tracked: &mut k,
                };
                batch_norm(x, Some(running), Some(&w), Some(&b), &options)
                    .unwrap()
                    .0
                    .into_data()
            };
            assert_close("batch_norm f64", &run(&x), &want, 1e-12, 1e-10);
            let (mut m, mut v, mut k) = (
                rm.cast::<f32>().into_data(),
                rv.cast::<f32>().into_data(),
                0,
            );
            let running = RunningStatsMut {
                mean: &mut m,
                var: &mut v,
                num_batches_tracked: &mut k,
            };
            let (y32, _) = batch_norm(
                &x.cast::<f32>(),
                Some(running),
                Some(&w.cast()),
                Some(&b.cast()),
                &options,
            )
            .unwrap();
            f32_vs_ref(
                &format!("batch_norm {shape:?} training {training}"),
                &widen(&y32),
                &want,
            );
        }
    }
}

#[test]
fn group_and_instance_norm_match_reference() {
    let mut g = rng(14);
    for shape in ncs_shapes() {
        let (n, c, s) = (shape[0], shape[1], shape[2..].iter().product::<usize>());
        let x = normal(&mut g, &shape, 1.0, 0.5).cast::<f32>().cast::<f64>();
        let w = normal(&mut g, &[c], 1.0, 0.3).cast::<f32>().cast::<f64>();
        let b = normal(&mut g, &[c], 0.0, 0.3).cast::<f32>().cast::<f64>();
        for groups in (1..=c).filter(|gr| c % gr == 0) {
            let want =
                reference::group_norm(x.data(), (n, c, s), groups, w.data(), b.data(), 1e-5, false);
            let (y, _) = group_norm(&x, groups, Some(&w), Some(&b), 1e-5.into()).unwrap();
            assert_close("group_norm f64", y.data(), &want, 1e-12, 1e-10);
            let (y32, _) = group_norm(
                &x.cast::<f32>(),
                groups,
                Some(&w.cast()),
                Some(&b.cast()),
                1e-5.into(),
            )
            .unwrap();
            f32_vs_ref(
                &format!("group_norm {shape:?} G={groups}"),
                &widen(&y32),
                &want,
            );
            if groups == c && s > 1 {
                let (yi, _) =
                    instance_norm(&x, None, Some(&w), Some(&b), &BatchNormOptions::training())
                        .unwrap();
                assert_close(
                    "instance_norm = group_norm(G=C)",
                    yi.data(),
                    &want,
                    1e-12,
                    1e-10,
                );
            }
        }
    }
}

#[test]
fn lrn_matches_reference_across_and_within() {
    let mut g = rng(15);
    let shape = [2, 7, 4, 5];
    let x = normal(&mut g, &shape, 0.0, 2.0).cast::<f32>().cast::<f64>();
    for size in 1..=6 {
        for even_window in [EvenWindow::Torch, EvenWindow::Onnx] {
            for alpha_over_size in [true, false] {
                let mut options = LrnOptions {
                    alpha: 0.2,
                    beta: 0.75,
                    k: 2.0,
                    alpha_over_size,
                    even_window,
                    ..LrnOptions::new(size)
                };
                let (before, after) = options.window();
                let a = if alpha_over_size {
                    0.2 / size as f64
                } else {
                    0.2
                };
                let want = reference::lrn_across(x.data(), (2, 7, 20), before, after, a, 0.75, 2.0);
                let y = lrn(&x, &options).unwrap();
                assert_close(
                    &format!("lrn across {size} {even_window:?}"),
                    y.data(),
                    &want,
                    1e-12,
                    1e-10,
                );
                let y32 = lrn(&x.cast::<f32>(), &options).unwrap();
                f32_vs_ref("lrn across f32", &widen(&y32), &want);
                // One position and 2×2 maps: the value-by-value path.
                for spatial in [1, 4] {
                    let n = 2 * 7 * spatial;
                    let tiny = Tensor::new(vec![2, 7, spatial], x.data()[..n].to_vec()).unwrap();
                    let want = reference::lrn_across(
                        tiny.data(),
                        (2, 7, spatial),
                        before,
                        after,
                        a,
                        0.75,
                        2.0,
                    );
                    let y = lrn(&tiny, &options).unwrap();
                    let what = format!("lrn across {size} {even_window:?}, {spatial} positions");
                    assert_close(&what, y.data(), &want, 1e-12, 1e-10);
                    let y32 = lrn(&tiny.cast::<f32>(), &options).unwrap();
                    f32_vs_ref(&what, &widen(&y32), &want);
                }

                options.region = LrnRegion::WithinChannel;
                let a = if alpha_over_size {
                    0.2 / (size * size) as f64
                } else {
                    0.2
                };
                let want =
                    reference::lrn_within(x.data(), (2, 7, 4, 5), before, after, a, 0.75, 2.0);
                let y = lrn(&x, &options).unwrap();
                assert_close(
                    &format!("lrn within {size} {even_window:?}"),
                    y.data(),
                    &want,
                    1e-12,
                    1e-10,
                );
            }
        }
    }
}

#[test]
fn half_precision_inputs_keep_statistics_in_wide_precision() {
    let mut g = rng(16);
    let x = normal(&mut g, &[4, 256], 100.0, 1.0);
    let xh = x.cast::<half::f16>();
    let want = reference::layer_norm(&widen(&xh), 256, &[1.0; 256], &[0.0; 256], 1e-5, false);
    let (y, _) = layer_norm(&xh, -1, None, None, 1e-5.into()).unwrap();
    // Only the final rounding to f16 remains: half an ulp of values up to ~4.
    assert_close(
        "layer_norm f16",
        &widen(&y),
        &want,
        2.0 * half::f16::EPSILON.to_f64(),
        0.0,
    );
}

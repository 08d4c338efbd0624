//! Normalization + activation in one op (`batch_norm_act`, `group_norm_act`,
//! `layer_norm_act` and their backwards): against the unfused pair computed
//! in f64 on every code path (each SIMD level, one and several threads,
//! the shapes of `paths.rs`), bit-identical across levels and thread
//! counts, and by finite differences.
//!
//! One test function for the paths on purpose: forcing a SIMD level is
//! process-wide.

mod common;

use common::*;
use normlab::kernels::batch_norm::{
    batch_norm, batch_norm_act, batch_norm_act_backward, batch_norm_backward, BatchNormOptions,
    RunningStatsMut,
};
use normlab::kernels::group_norm::{
    group_norm, group_norm_act, group_norm_act_backward, group_norm_backward,
};
use normlab::kernels::layer_norm::{
    layer_norm, layer_norm_act, layer_norm_act_backward, layer_norm_backward,
};
use normlab::simd;
use normlab::{Activation, Epsilon, Float, Grads, Saved, Tensor};

const EPS: f64 = 1e-5;

/// Which normalization.
#[derive(Clone, Copy, Debug)]
enum Norm {
    BatchTrain,
    BatchEval,
    Group(usize),
    Layer,
}

/// The parameters of one call: γ, β over channels (or the last dimension
/// for LayerNorm).
struct Params<T> {
    w: Tensor<T>,
    b: Tensor<T>,
    /// Running mean and variance for evaluation (see [`running`]).
    stats: (Vec<T>, Vec<T>),
}

impl<T: Float> Params<T> {
    fn new(w: Tensor<f64>, b: Tensor<f64>) -> Self {
        let stats = running(w.numel());
        Self {
            w: w.cast(),
            b: b.cast(),
            stats,
        }
    }

    /// The same values in f64.
    fn wide(&self) -> Params<f64> {
        let wide = |v: &[T]| v.iter().map(|a| a.to_f64()).collect();
        Params {
            w: self.w.cast(),
            b: self.b.cast(),
            stats: (wide(&self.stats.0), wide(&self.stats.1)),
        }
    }
}

fn eval_options() -> BatchNormOptions {
    BatchNormOptions::eval()
}

/// Running statistics for evaluation, fixed (not from γ, β: finite
/// differences move those): mean `2.5 + ch/10` near the inputs' mean 3,
/// so that ReLU's kink is crossed, variance `4 + ch/5`.
fn running<T: Float>(c: usize) -> (Vec<T>, Vec<T>) {
    let mean = (0..c)
        .map(|ch| T::from_f64(2.5 + ch as f64 / 10.0))
        .collect();
    let var = (0..c)
        .map(|ch| T::from_f64(4.0 + ch as f64 / 5.0))
        .collect();
    (mean, var)
}

/// The fused op: `(y, dx, dγ, dβ)`.
fn fused<T: Float>(
    norm: Norm,
    act: Activation,
    x: &Tensor<T>,
    dy: &Tensor<T>,
    p: &Params<T>,
) -> (Tensor<T>, Grads<T>) {
    let eps = Epsilon::inside_sqrt(EPS);
    let (w, b) = (Some(&p.w), Some(&p.b));
    match norm {
        Norm::BatchTrain | Norm::BatchEval => {
            let (mut rm, mut rv) = p.stats.clone();
            let mut seen = 0;
            let train = matches!(norm, Norm::BatchTrain);
            let stats = RunningStatsMut {
                mean: &mut rm,
                var: &mut rv,
                num_batches_tracked: &mut seen,
            };
            let options = if train {
                BatchNormOptions::training()
            } else {
                eval_options()
            };
            let (y, s) = batch_norm_act(x, Some(stats), w, b, &options, act).unwrap();
            let g = batch_norm_act_backward(x, Some(&y), dy, w, b, act, eps, &s, train).unwrap();
            (y, g)
        }
        Norm::Group(groups) => {
            let (y, s) = group_norm_act(x, groups, w, b, eps, act).unwrap();
            let g = group_norm_act_backward(x, Some(&y), dy, groups, w, b, act, eps, &s).unwrap();
            (y, g)
        }
        Norm::Layer => {
            let (y, s) = layer_norm_act(x, -1, w, b, eps, act).unwrap();
            let g = layer_norm_act_backward(x, Some(&y), dy, -1, w, b, act, eps, &s).unwrap();
            (y, g)
        }
    }
}

/// The unfused pair in f64: `z` from the plain op, `y = φ(z)`,
/// `dz = φ'(z)·dy`, then the plain op's backward at `dz`. ReLU's mask is
/// `relu_mask` when given (the fused op's own decisions: where `z` lies
/// within rounding of 0, f32 lanes and f64 may fall on either side).
fn unfused_f64(
    norm: Norm,
    act: Activation,
    x: &Tensor<f64>,
    dy: &Tensor<f64>,
    p: &Params<f64>,
    relu_mask: Option<&[bool]>,
) -> (Vec<f64>, Grads<f64>) {
    let eps = Epsilon::inside_sqrt(EPS);
    let (w, b) = (Some(&p.w), Some(&p.b));
    let (z, saved): (Tensor<f64>, Saved) = match norm {
        Norm::BatchTrain | Norm::BatchEval => {
            let (mut rm, mut rv) = p.stats.clone();
            let mut seen = 0;
            let stats = RunningStatsMut {
                mean: &mut rm,
                var: &mut rv,
                num_batches_tracked: &mut seen,
            };
            let options = match norm {
                Norm::BatchTrain => BatchNormOptions::training(),
                _ => eval_options(),
            };
            batch_norm(x, Some(stats), w, b, &options).unwrap()
        }
        Norm::Group(groups) => group_norm(x, groups, w, b, eps).unwrap(),
        Norm::Layer => layer_norm(x, -1, w, b, eps).unwrap(),
    };
    let y = z.data().iter().map(|&v| act.apply(v)).collect();
    let dz = Tensor::new(
        z.shape().to_vec(),
        z.data()
            .iter()
            .zip(dy.data())
            .enumerate()
            .map(|(i, (&v, &d))| match relu_mask {
                Some(mask) => f64::from(u8::from(mask[i])) * d,
                None => act.derivative(v) * d,
            })
            .collect(),
    )
    .unwrap();
    let g = match norm {
        Norm::BatchTrain => batch_norm_backward(x, &dz, w, true, eps, &saved, true),
        Norm::BatchEval => batch_norm_backward(x, &dz, w, true, eps, &saved, false),
        Norm::Group(groups) => group_norm_backward(x, &dz, groups, w, true, eps, &saved),
        Norm::Layer => layer_norm_backward(x, &dz, -1, w, true, eps, &saved),
    }
    .unwrap();
    (y, g)
}

fn flatten<T: Float>(y: &Tensor<T>, g: &Grads<T>) -> Vec<(&'static str, Vec<f64>)> {
    vec![
        ("y", widen(y)),
        ("dx", widen(&g.dx)),
        ("dweight", widen(g.dweight.as_ref().unwrap())),
        ("dbias", widen(g.dbias.as_ref().unwrap())),
    ]
}

fn norms(shape: &[usize]) -> Vec<Norm> {
    let c = shape[1];
    let mut out = vec![Norm::BatchEval, Norm::Layer, Norm::Group(1), Norm::Group(c)];
    if shape[0] * shape[2..].iter().product::<usize>() > 1 {
        out.push(Norm::BatchTrain);
    }
    out
}

#[test]
fn every_path_matches_the_unfused_pair_in_f64_and_thread_counts_agree() {
    every_path::<f32>(2e-6, 3e-5);
    every_path::<half::bf16>(8e-3, 2e-2);
    every_path::<half::f16>(1e-3, 3e-3);
    every_path::<f64>(1e-12, 1e-10);
}

fn every_path<T: Float>(tol_y: f64, tol_grad: f64) {
    // The shapes reach each layout of the kernels: BatchNorm1d rows
    // (spatial 1, several stripes), short slices in runs (7×7, 14×14),
    // slices per call (23×23 and up), the per-channel fused backward, and
    // GroupNorm's short-channel, per-channel and pipelined (spatial ≥ 2048)
    // forms.
    let shapes: &[&[usize]] = &[
        &[2, 3, 1],
        &[3, 2, 7],
        &[2, 4, 17],
        &[2, 5, 3, 3],
        &[4, 8, 129],
        &[2, 2, 2049],
        &[16, 12, 7, 7],
        &[4, 6, 14, 14],
        &[6, 8, 23, 23],
        &[300, 33, 1],
        &[130, 1100, 1],
        &[8, 4, 2100],
    ];
    let pools: Vec<rayon::ThreadPool> = [1, 2, 3]
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect();
    for (k, &shape) in shapes.iter().enumerate() {
        let mut g = rng(700 + k as u64);
        let x = normal(&mut g, shape, 3.0, 2.0).cast::<T>();
        let dy = normal(&mut g, shape, 0.0, 1.0).cast::<T>();
        let c = shape[1];
        let last = shape[shape.len() - 1];
        for norm in norms(shape) {
            let n_params = if matches!(norm, Norm::Layer) { last } else { c };
            let p = Params::<T>::new(
                normal(&mut g, &[n_params], 1.0, 0.3),
                normal(&mut g, &[n_params], 0.0, 0.5),
            );
            let p64 = p.wide();
            for act in Activation::ALL {
                let mask = (act == Activation::Relu).then(|| {
                    let (y, _) = fused(norm, act, &x, &dy, &p);
                    // y > 0 is z > 0, unless z underflowed to 0 in T: 1 in
                    // about 10^7 values at most, none in these draws.
                    y.data()
                        .iter()
                        .map(|v| v.to_f64() > 0.0 || v.to_f64().is_nan())
                        .collect::<Vec<_>>()
                });
                let (y_ref, g_ref) =
                    unfused_f64(norm, act, &x.cast(), &dy.cast(), &p64, mask.as_deref());
                let want = [
                    y_ref,
                    g_ref.dx.data().to_vec(),
                    g_ref.dweight.unwrap().data().to_vec(),
                    g_ref.dbias.unwrap().data().to_vec(),
                ];
                let mut first: Option<Vec<(&str, Vec<f64>)>> = None;
                for level in simd::available() {
                    simd::force(Some(level));
                    for pool in &pools {
                        let (y, grads) = pool.install(|| fused(norm, act, &x, &dy, &p));
                        let got = flatten(&y, &grads);
                        for ((name, got), want) in got.iter().zip(&want) {
                            let tol = if *name == "y" { tol_y } else { tol_grad };
                            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                            assert_close(
                                &format!(
                                    "{shape:?} {} {norm:?} {} {} {} threads {name}",
                                    T::NAME,
                                    act.name(),
                                    level.name(),
                                    pool.current_num_threads()
                                ),
                                got,
                                want,
                                tol * scale,
                                tol,
                            );
                        }
                        match &first {
                            None => first = Some(got),
                            Some(first) => assert_eq!(
                                first,
                                &got,
                                "{shape:?} {} {norm:?} {}: {} with {} threads differs",
                                T::NAME,
                                act.name(),
                                level.name(),
                                pool.current_num_threads()
                            ),
                        }
                    }
                }
                simd::force(None);
            }
        }
    }
}

/// Finite differences of `Σ φ(norm(x))·r` in f64 with respect to x, γ and β,
/// for each op and activation. ReLU's inputs keep `|z|` away from its kink.
#[test]
fn gradients_match_finite_differences() {
    let shape = [3, 4, 5];
    for (k, norm) in [
        Norm::BatchTrain,
        Norm::BatchEval,
        Norm::Group(2),
        Norm::Layer,
    ]
    .into_iter()
    .enumerate()
    {
        for act in Activation::ALL {
            let mut g = rng(900 + k as u64);
            let x = normal(&mut g, &shape, 1.0, 2.0);
            let r = normal(&mut g, &shape, 0.0, 1.0);
            let n = if matches!(norm, Norm::Layer) { 5 } else { 4 };
            let p = Params::<f64>::new(
                normal(&mut g, &[n], 1.0, 0.3),
                normal(&mut g, &[n], 0.0, 0.5),
            );
            let (y, grads) = fused(norm, act, &x, &r, &p);
            if act == Activation::Relu {
                // Skip draws with a pre-activation within the steps' reach of 0.
                let near_kink = y.data().iter().any(|&v| v > 0.0 && v < 1e-3);
                if near_kink {
                    continue;
                }
            }
            let loss = |x: &Tensor<f64>, p: &Params<f64>| dot(&fused(norm, act, x, &r, p).0, &r);
            let h = 1e-6;
            let what = format!("{norm:?} {}", act.name());
            let dx = numeric_grad(&x, h, |x| loss(x, &p));
            assert_close(&format!("{what} dx"), grads.dx.data(), &dx, 1e-6, 1e-5);
            let dw = numeric_grad(&p.w, h, |w| {
                loss(
                    &x,
                    &Params {
                        w: w.clone(),
                        b: p.b.clone(),
                        stats: p.stats.clone(),
                    },
                )
            });
            let got = grads.dweight.as_ref().unwrap().data();
            assert_close(&format!("{what} dweight"), got, &dw, 1e-6, 1e-5);
            let db = numeric_grad(&p.b, h, |b| {
                loss(
                    &x,
                    &Params {
                        w: p.w.clone(),
                        b: b.clone(),
                        stats: p.stats.clone(),
                    },
                )
            });
            let got = grads.dbias.as_ref().unwrap().data();
            assert_close(&format!("{what} dbias"), got, &db, 1e-6, 1e-5);
        }
    }
}

/// Bad input is a typed error naming the op and the argument, as for the
/// plain ops: here a β of the wrong length, which only the fused backward reads.
#[test]
fn a_bias_of_the_wrong_shape_is_an_error() {
    let x = Tensor::<f32>::zeros(&[2, 3, 4]).unwrap();
    let (_, saved) = batch_norm(&x, None, None, None, &BatchNormOptions::training()).unwrap();
    let bad = Tensor::<f32>::zeros(&[2]).unwrap();
    let eps = Epsilon::default();
    let err = batch_norm_act_backward(
        &x,
        Some(&x),
        &x,
        None,
        Some(&bad),
        Activation::Relu,
        eps,
        &saved,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("batch_norm") && err.contains("bias"), "{err}");
    let (_, saved) = layer_norm(&x, -1, None, None, eps).unwrap();
    let err = layer_norm_act_backward(
        &x,
        Some(&x),
        &x,
        -1,
        None,
        Some(&bad),
        Activation::Tanh,
        eps,
        &saved,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("layer_norm") && err.contains("bias"), "{err}");
    let (_, saved) = group_norm(&x, 3, None, None, eps).unwrap();
    let err = group_norm_act_backward(
        &x,
        Some(&x),
        &x,
        3,
        None,
        Some(&bad),
        Activation::Sigmoid,
        eps,
        &saved,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("group_norm") && err.contains("bias"), "{err}");
}

/// The activation alone (the unfused pair's second half): against the f64
/// definitions, in every dtype; its backward from the output as PyTorch's.
#[test]
fn the_activation_alone_matches_f64() {
    use normlab::kernels::activation::{activation, activation_backward};
    fn check<T: Float>(tol: f64) {
        let mut g = rng(11);
        let z = normal(&mut g, &[3, 37], 0.0, 3.0).cast::<T>();
        let dy = normal(&mut g, &[3, 37], 0.0, 1.0).cast::<T>();
        for act in Activation::ALL {
            let y = activation(&z, act).unwrap();
            assert_eq!(y.shape(), z.shape());
            let want: Vec<f64> = widen(&z).iter().map(|&v| act.apply(v)).collect();
            assert_close(act.name(), &widen(&y), &want, tol, tol);
            let dz = activation_backward(&y, &dy, act).unwrap();
            let want: Vec<f64> = widen(&z)
                .iter()
                .zip(widen(&dy))
                .map(|(&v, d)| act.derivative(v) * d)
                .collect();
            assert_close(act.name(), &widen(&dz), &want, 4.0 * tol, 4.0 * tol);
        }
        let bad = Tensor::<T>::zeros(&[2]).unwrap();
        let err = activation_backward(&z, &bad, Activation::Relu).unwrap_err();
        assert!(err.to_string().contains("activation"), "{err}");
    }
    check::<f64>(1e-15);
    check::<f32>(2e-7);
    check::<half::bf16>(8e-3);
    check::<half::f16>(1e-3);
}

/// ReLU keeps -0 and NaN (PyTorch's `clamp_min`), and passes the gradient
/// at NaN; tanh and sigmoid keep NaN; without `y` the backward recomputes
/// tanh from `x` and agrees with the one that reads `y`.
#[test]
fn special_values_and_a_missing_output() {
    let eps = Epsilon::default();
    // Row 0 normalizes to exactly 0 at its middle value; row 1 holds a NaN.
    let x = Tensor::new(vec![2, 3], vec![-1.0f32, 0.0, 1.0, f32::NAN, 1.0, 2.0]).unwrap();
    // γ = -1, β = -0: z = -0 at the middle value.
    let w = Tensor::new(vec![3], vec![-1.0f32; 3]).unwrap();
    let b = Tensor::new(vec![3], vec![-0.0f32, -0.0, -0.0]).unwrap();
    let (y, s) = layer_norm_act(&x, -1, Some(&w), Some(&b), eps, Activation::Relu).unwrap();
    assert!(
        y.data()[1] == 0.0 && y.data()[1].is_sign_negative(),
        "{:?}",
        y.data()
    );
    assert!(y.data()[3..].iter().all(|v| v.is_nan()));
    let dy = Tensor::full(&[2, 3], 1.0).unwrap();
    let g = layer_norm_act_backward(
        &x,
        Some(&y),
        &dy,
        -1,
        None,
        Some(&b),
        Activation::Relu,
        eps,
        &s,
    )
    .unwrap();
    assert!(
        g.dx.data()[3..].iter().all(|v| v.is_nan()),
        "the NaN row's gradient passes"
    );
    for act in [Activation::Tanh, Activation::Sigmoid] {
        let (y, _) = layer_norm_act(&x, -1, None, None, eps, act).unwrap();
        assert!(y.data()[3..].iter().all(|v| v.is_nan()));
    }
    // An infinite dy where ReLU's mask is closed contributes nothing (PyTorch's
    // threshold_backward selects; 0·∞ would be NaN), on GroupNorm's
    // value-by-value path ([N, C]) as on its vector paths ([N, C, 9]).
    for shape in [vec![2, 4], vec![2, 4, 9]] {
        let n: usize = shape.iter().product();
        let x = Tensor::new(
            shape.clone(),
            (0..n).map(|i| (i % 7) as f32 - 3.0).collect(),
        )
        .unwrap();
        let (y, s) = group_norm_act(&x, 2, None, None, eps, Activation::Relu).unwrap();
        let closed = y.data().iter().position(|&v| v == 0.0).unwrap();
        let mut dy = vec![1.0f32; n];
        dy[closed] = f32::INFINITY;
        let dy = Tensor::new(shape.clone(), dy).unwrap();
        let b = Tensor::new(vec![4], vec![0.0f32; 4]).unwrap();
        let g = group_norm_act_backward(
            &x,
            Some(&y),
            &dy,
            2,
            None,
            Some(&b),
            Activation::Relu,
            eps,
            &s,
        )
        .unwrap();
        assert!(
            g.dx.data().iter().all(|v| v.is_finite()),
            "{shape:?}: {:?}",
            g.dx.data()
        );
        assert!(
            g.dbias.unwrap().data().iter().all(|v| v.is_finite()),
            "{shape:?}"
        );
    }
    let mut g = rng(5);
    let x = normal(&mut g, &[6, 4, 9], 0.5, 2.0).cast::<f32>();
    let dy = normal(&mut g, &[6, 4, 9], 0.0, 1.0).cast::<f32>();
    for act in [Activation::Tanh, Activation::Sigmoid] {
        let opts = BatchNormOptions::training();
        let (y, s) = batch_norm_act(&x, None, None, None, &opts, act).unwrap();
        let read =
            batch_norm_act_backward(&x, Some(&y), &dy, None, None, act, eps, &s, true).unwrap();
        let recomputed =
            batch_norm_act_backward(&x, None, &dy, None, None, act, eps, &s, true).unwrap();
        assert_close(
            act.name(),
            &widen(&read.dx),
            &widen(&recomputed.dx),
            1e-5,
            1e-4,
        );
    }
    // A y of the wrong shape is an error naming the op and `y`.
    let (y, s) = batch_norm_act(
        &x,
        None,
        None,
        None,
        &BatchNormOptions::training(),
        Activation::Relu,
    )
    .unwrap();
    let bad = Tensor::<f32>::zeros(&[6, 4]).unwrap();
    let err = batch_norm_act_backward(
        &x,
        Some(&bad),
        &dy,
        None,
        None,
        Activation::Relu,
        eps,
        &s,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("batch_norm") && err.contains("`y`"), "{err}");
    drop(y);
}

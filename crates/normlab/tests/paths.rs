//! Every code path — each SIMD level this CPU has, one and several threads —
//! against the f64 computation, over edge shapes (0, 1, lanes ± 1, 63,
//! odd spatial sizes); and bit-identical results for any thread count.
//!
//! One test function on purpose: forcing a SIMD level is process-wide.

mod common;

use common::*;
use normlab::kernels::batch_norm::{
    batch_norm, batch_norm_backward, BatchNormOptions, RunningStatsMut,
};
use normlab::kernels::group_norm::{group_norm, group_norm_backward};
use normlab::kernels::layer_norm::{layer_norm, layer_norm_backward};
use normlab::kernels::lrn::{lrn, lrn_backward, EvenWindow, LrnOptions};
use normlab::kernels::rms_norm::{rms_norm, rms_norm_backward};
use normlab::simd::{self, SimdLevel};
use normlab::{Epsilon, Tensor};

/// Everything one run computes, flattened, in f64.
fn run_all<T: normlab::Float>(
    x: &Tensor<T>,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    b: &Tensor<T>,
    wn: &Tensor<T>,
    bn: &Tensor<T>,
) -> Vec<(String, Vec<f64>)> {
    let eps = Epsilon::inside_sqrt(1e-5);
    let mut out = Vec::new();
    let mut push = |name: &str, g: normlab::Grads<T>, y: &Tensor<T>| {
        out.push((format!("{name} y"), widen(y)));
        out.push((format!("{name} dx"), widen(&g.dx)));
        if let Some(d) = g.dweight {
            out.push((format!("{name} dweight"), widen(&d)));
        }
        if let Some(d) = g.dbias {
            out.push((format!("{name} dbias"), widen(&d)));
        }
    };
    // Rows over the last dimension (length = x.shape().last()).
    let (y, s) = layer_norm(x, -1, Some(wn), Some(bn), eps).unwrap();
    push(
        "layer_norm",
        layer_norm_backward(x, dy, -1, Some(wn), true, eps, &s).unwrap(),
        &y,
    );
    let (y, s) = layer_norm(x, -1, None, None, eps).unwrap();
    push(
        "layer_norm no affine",
        layer_norm_backward(x, dy, -1, None, false, eps, &s).unwrap(),
        &y,
    );
    let (y, s) = rms_norm(x, -1, Some(wn), eps).unwrap();
    push(
        "rms_norm",
        rms_norm_backward(x, dy, -1, Some(wn), eps, &s).unwrap(),
        &y,
    );
    // Channels: x is [N, C, *].
    if x.shape()[0] * x.shape()[2..].iter().product::<usize>() > 1 {
        let (y, s) = batch_norm(x, None, Some(w), Some(b), &BatchNormOptions::training()).unwrap();
        push(
            "batch_norm",
            batch_norm_backward(x, dy, Some(w), true, eps, &s, true).unwrap(),
            &y,
        );
    }
    // Evaluation: running statistics (mean b, variance w² + 1/2), constant in backward.
    let (mut rm, mut rv, mut seen) = (
        b.data().to_vec(),
        w.data()
            .iter()
            .map(|v| T::from_f64(v.to_f64() * v.to_f64() + 0.5))
            .collect::<Vec<_>>(),
        0,
    );
    let running = RunningStatsMut {
        mean: &mut rm,
        var: &mut rv,
        num_batches_tracked: &mut seen,
    };
    let (y, s) = batch_norm(
        x,
        Some(running),
        Some(w),
        Some(b),
        &BatchNormOptions::eval(),
    )
    .unwrap();
    push(
        "batch_norm eval",
        batch_norm_backward(x, dy, Some(w), true, eps, &s, false).unwrap(),
        &y,
    );
    let c = x.shape()[1];
    for groups in [1, c] {
        let (y, s) = group_norm(x, groups, Some(w), Some(b), eps).unwrap();
        push(
            &format!("group_norm G={groups}"),
            group_norm_backward(x, dy, groups, Some(w), true, eps, &s).unwrap(),
            &y,
        );
    }
    // β = 0.75, 0.5, 1 (each closed form), odd and even windows, both
    // even-window conventions.
    let lrns = [
        (5, 0.75, EvenWindow::Torch),
        (4, 0.5, EvenWindow::Torch),
        (4, 1.0, EvenWindow::Onnx),
        (1, 0.75, EvenWindow::Torch),
    ];
    for (size, beta, even_window) in lrns {
        let options = LrnOptions {
            alpha: 0.3,
            beta,
            k: 2.0,
            even_window,
            ..LrnOptions::new(size)
        };
        let y = lrn(x, &options).unwrap();
        let dx = lrn_backward(x, dy, &options).unwrap();
        push(
            &format!("lrn size {size} beta {beta} {even_window:?}"),
            normlab::Grads {
                dx,
                dweight: None,
                dbias: None,
            },
            &y,
        );
    }
    out
}

#[test]
fn every_path_matches_f64_and_thread_counts_agree() {
    // f32: outputs carry one rounding, gradients a few.
    every_path::<f32>(2e-6, 2e-5);
    // 16-bit storage, f32 lanes: one rounding to the storage type on every
    // output (2^-8 of the value in bf16, 2^-11 in f16), below which the
    // lanes' own error disappears; the reference is rounded once too.
    every_path::<half::bf16>(8e-3, 1.6e-2);
    every_path::<half::f16>(1e-3, 2e-3);
}

fn every_path<T: normlab::Float>(tol_y: f64, tol_grad: f64) {
    let shapes: &[&[usize]] = &[
        &[1, 1, 1],
        &[2, 1, 1],
        &[2, 3, 0],
        &[0, 3, 5],
        &[3, 2, 7],
        &[2, 4, 15],
        &[2, 4, 16],
        &[2, 4, 17],
        &[2, 3, 31],
        &[2, 3, 33],
        &[3, 2, 63],
        &[2, 5, 3, 3],
        &[2, 6, 65],
        &[4, 8, 129],
        &[2, 2, 2047],
        &[1, 2, 4100],
        // GroupNorm's pipelined forward (spatial ≥ 2048): several runs of
        // groups per thread pool, channels not 16-byte aligned.
        &[40, 2, 2049],
        &[3, 96, 5, 5],
        // Short slices in runs of a task's length that straddle samples
        // (7×7, 9×9 and 14×14 maps; 96 and 33 channels), runs shorter than
        // the channel count (200 channels of 14×14: three runs, the last
        // one short), and the per-slice path above them (23×23), over
        // several tasks.
        &[16, 96, 7, 7],
        &[32, 33, 9, 9],
        &[12, 33, 14, 14],
        &[2, 200, 14, 14],
        &[6, 8, 23, 23],
        // BatchNorm1d-like rows (spatial 1) over several blocks of rows, and
        // several column stripes × row blocks.
        &[300, 130, 1],
        &[130, 1100, 1],
        // Large enough (128 Ki values) for the ops that hand all their
        // passes to the pool at once when called from outside it.
        &[8, 64, 16, 16],
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
        let mut g = rng(50 + k as u64);
        let x = normal(&mut g, shape, 3.0, 2.0).cast::<T>();
        let dy = normal(&mut g, shape, 0.0, 1.0).cast::<T>();
        let c = shape[1];
        let last = shape[shape.len() - 1];
        let w = normal(&mut g, &[c], 1.0, 0.3).cast::<T>();
        let b = normal(&mut g, &[c], 0.0, 0.3).cast::<T>();
        let wn = normal(&mut g, &[last], 1.0, 0.3).cast::<T>();
        let bn = normal(&mut g, &[last], 0.0, 0.3).cast::<T>();
        // The f64 computation on the same (rounded) values.
        let reference = run_all(
            &x.cast::<f64>(),
            &dy.cast(),
            &w.cast(),
            &b.cast(),
            &wn.cast(),
            &bn.cast(),
        );
        let mut first: Option<Vec<(String, Vec<f64>)>> = None;
        for level in simd::available() {
            simd::force(Some(level));
            for pool in &pools {
                let got = pool.install(|| run_all(&x, &dy, &w, &b, &wn, &bn));
                for ((name, got), (_, want)) in got.iter().zip(&reference) {
                    let tol = if name.ends_with(" y") {
                        tol_y
                    } else {
                        tol_grad
                    };
                    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                    assert_close(
                        &format!(
                            "{shape:?} {} {} threads {} {name}",
                            T::NAME,
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
                        "{shape:?} {}: {} with {} threads differs",
                        T::NAME,
                        level.name(),
                        pool.current_num_threads()
                    ),
                }
            }
            // From this thread, outside every pool (the caller works on
            // each pass, the global pool's workers help): the same bits.
            let outside = run_all(&x, &dy, &w, &b, &wn, &bn);
            assert_eq!(
                first.as_ref(),
                Some(&outside),
                "{shape:?} {}: {} called from outside the pools differs",
                T::NAME,
                level.name()
            );
        }
        simd::force(None);
    }
    assert!(simd::available().contains(&SimdLevel::Scalar));
}

/// Parameters of another element type than the input (bf16 activations with
/// f32 γ and β, as PyTorch's mixed-type path): the same outputs as parameters
/// of the input's type holding the same values.
#[test]
fn mixed_type_parameters_match_same_type_ones() {
    use half::bf16;
    use normlab::kernels::{batch_norm, NcsLayout};
    let mut g = rng(7);
    let (rows_n, n) = (5, 40);
    let x = normal(&mut g, &[rows_n, n], 1.0, 2.0).cast::<bf16>();
    // Values exact in bf16, so that both parameter types hold the same numbers.
    let w16 = normal(&mut g, &[n], 1.0, 0.3).cast::<bf16>();
    let b16 = normal(&mut g, &[n], 0.0, 0.3).cast::<bf16>();
    let (w32, b32) = (w16.cast::<f32>(), b16.cast::<f32>());
    let (same, mixed) = (
        layer_norm_rows(&x, Some(w16.data()), Some(b16.data())),
        layer_norm_rows(&x, Some(w32.data()), Some(b32.data())),
    );
    assert_eq!(mixed, same);
    // Channels: BatchNorm's normalize with f32 γ, β on a bf16 input.
    let xc = normal(&mut g, &[4, 3, 10], 0.0, 1.0).cast::<bf16>();
    let layout = NcsLayout::of("test", xc.shape(), 2).unwrap();
    let saved = normlab::Saved {
        mean: vec![0.1, -0.2, 0.3],
        rstd: vec![1.0, 2.0, 0.5],
    };
    let (wc16, bc16) = (
        Tensor::new(
            vec![3],
            vec![bf16::from_f32(1.5), bf16::ONE, bf16::from_f32(-0.5)],
        )
        .unwrap(),
        Tensor::new(vec![3], vec![bf16::ZERO, bf16::from_f32(0.25), bf16::ONE]).unwrap(),
    );
    let (wc32, bc32) = (wc16.cast::<f32>(), bc16.cast::<f32>());
    let mut y16 = vec![bf16::ZERO; xc.numel()];
    let mut y32 = vec![bf16::ZERO; xc.numel()];
    let (w, b) = (Some(wc16.data()), Some(bc16.data()));
    batch_norm::normalize(xc.data(), layout, &saved, w, b, &mut y16).unwrap();
    let (w, b) = (Some(wc32.data()), Some(bc32.data()));
    batch_norm::normalize(xc.data(), layout, &saved, w, b, &mut y32).unwrap();
    assert_eq!(y16, y32);
}

/// LayerNorm of the rows of a 2-D bf16 `x` through the slice kernel, with
/// parameters of any element type.
fn layer_norm_rows<P: normlab::Float>(
    x: &Tensor<half::bf16>,
    w: Option<&[P]>,
    b: Option<&[P]>,
) -> Vec<half::bf16> {
    use normlab::kernels::rows::{self, RowNorm};
    let (rows_n, n) = (x.shape()[0], x.shape()[1]);
    let mut y = vec![half::bf16::ZERO; rows_n * n];
    let mut saved = normlab::Saved::zeros("test", rows_n).unwrap();
    let eps = Epsilon::default();
    let ln = RowNorm::LayerNorm;
    rows::forward(ln, x.data(), rows_n, n, w, b, &eps, &mut y, &mut saved).unwrap();
    y
}

//! LayerNorm and RMSNorm over the channels at each position
//! (`layer_norm_channels`, `rms_norm_channels` and their backwards): against
//! the row kernels in f64 on the transposed input (`[N, C, S]` → `[N, S, C]`,
//! the way PyTorch users write it), in every storage type, at every SIMD
//! level and thread count (bit-identical), by finite differences, and with
//! typed errors.
//!
//! One test function for the levels on purpose: forcing a SIMD level is
//! process-wide.

mod common;

use common::*;
use normlab::kernels::channel_rows::{
    layer_norm_channels, layer_norm_channels_backward, rms_norm_channels,
    rms_norm_channels_backward,
};
use normlab::kernels::layer_norm::{layer_norm, layer_norm_backward};
use normlab::kernels::rms_norm::{rms_norm, rms_norm_backward};
use normlab::{simd, Epsilon, Float, Grads, NormError, Tensor};

const EPS: f64 = 1e-5;

/// `[N, C, S]` (any trailing dims flattened) ↔ `[N, S, C]`.
fn transpose(t: &Tensor<f64>, n: usize, a: usize, b: usize, shape: Vec<usize>) -> Tensor<f64> {
    let mut out = vec![0.0; t.numel()];
    for i in 0..n {
        for p in 0..a {
            for q in 0..b {
                out[i * a * b + q * a + p] = t.data()[i * a * b + p * b + q];
            }
        }
    }
    Tensor::new(shape, out).unwrap()
}

/// The reference in f64: the row kernel over the transposed input.
fn reference(
    rms: bool,
    x: &Tensor<f64>,
    dy: &Tensor<f64>,
    w: &Tensor<f64>,
    b: &Tensor<f64>,
) -> (Tensor<f64>, Grads<f64>) {
    let shape = x.shape().to_vec();
    let (n, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    let xt = transpose(x, n, c, s, vec![n, s, c]);
    let dyt = transpose(dy, n, c, s, vec![n, s, c]);
    let eps = Epsilon::from(EPS);
    let (y, g) = if rms {
        let (y, saved) = rms_norm(&xt, -1, Some(w), eps).unwrap();
        (
            y,
            rms_norm_backward(&xt, &dyt, -1, Some(w), eps, &saved).unwrap(),
        )
    } else {
        let (y, saved) = layer_norm(&xt, -1, Some(w), Some(b), eps).unwrap();
        (
            y,
            layer_norm_backward(&xt, &dyt, -1, Some(w), true, eps, &saved).unwrap(),
        )
    };
    let back = |t: &Tensor<f64>| transpose(t, n, s, c, shape.clone());
    let dx = back(&g.dx);
    (back(&y), Grads { dx, ..g })
}

/// The op under test in `T`.
fn run<T: Float>(
    rms: bool,
    x: &Tensor<T>,
    dy: &Tensor<T>,
    w: &Tensor<T>,
    b: &Tensor<T>,
) -> (Tensor<T>, Grads<T>) {
    let eps = Epsilon::from(EPS);
    if rms {
        let (y, saved) = rms_norm_channels(x, Some(w), eps).unwrap();
        (
            y,
            rms_norm_channels_backward(x, dy, Some(w), eps, &saved).unwrap(),
        )
    } else {
        let (y, saved) = layer_norm_channels(x, Some(w), Some(b), eps).unwrap();
        (
            y,
            layer_norm_channels_backward(x, dy, Some(w), true, eps, &saved).unwrap(),
        )
    }
}

/// Shapes over every block case: one position, fewer positions than a
/// block, a whole block and a partial one (512 positions a block), one
/// channel, `[N, C]`, more dimensions.
const SHAPES: &[&[usize]] = &[
    &[2, 3, 1],
    &[3, 8, 7, 7],
    &[2, 5, 600],
    &[1, 16, 32, 33],
    &[4, 1, 9],
    &[5, 6],
    &[2, 3, 2, 2, 3],
];

struct Case {
    rms: bool,
    x: Tensor<f64>,
    dy: Tensor<f64>,
    w: Tensor<f64>,
    b: Tensor<f64>,
}

fn cases(offset: f64) -> Vec<Case> {
    let mut r = rng(20261207);
    let mut out = Vec::new();
    for shape in SHAPES {
        for rms in [false, true] {
            let c = shape[1];
            out.push(Case {
                rms,
                x: normal(&mut r, shape, offset, 1.5),
                dy: normal(&mut r, shape, 0.0, 1.0),
                w: normal(&mut r, &[c], 1.0, 0.3),
                b: normal(&mut r, &[c], 0.0, 0.3),
            });
        }
    }
    out
}

/// The spacing of a binary format of `bits` significant bits (smallest
/// normal exponent `min_exp`) at `v`.
fn ulp(v: f64, (bits, min_exp): (i32, i32)) -> f64 {
    let exp = if v == 0.0 {
        min_exp
    } else {
        (v.abs().log2().floor() as i32).max(min_exp)
    };
    2f64.powi(exp - bits + 1)
}

/// `got` within `ulps` units in the last place of `want` rounded to `T`
/// (and `atol` in absolute terms, for values that cancel to near 0).
#[track_caller]
fn assert_ulps<T: Float>(
    what: &str,
    got: &Tensor<T>,
    want: &Tensor<f64>,
    format: (i32, i32),
    ulps: f64,
    atol: f64,
) {
    for (i, (g, w)) in got.data().iter().zip(want.data()).enumerate() {
        let unit = ulp(T::from_f64(*w).to_f64(), format);
        let diff = (g.to_f64() - w).abs();
        assert!(
            diff <= ulps * unit + atol,
            "{what}[{i}]: got {:e}, want {w:e} (diff {diff:e}, ulp {unit:e})",
            g.to_f64()
        );
    }
}

fn check_dtype<T: Float>(name: &str, format: (i32, i32), (ulps, atol): (f64, f64), grad_rtol: f64) {
    for offset in [0.0, 100.0] {
        for case in cases(offset) {
            let what = format!(
                "{name} rms={} {:?} offset {offset}",
                case.rms,
                case.x.shape()
            );
            let (x, dy, w, b) = (
                case.x.cast::<T>(),
                case.dy.cast::<T>(),
                case.w.cast::<T>(),
                case.b.cast::<T>(),
            );
            // The reference sees the same (rounded) values.
            let (xw, dyw, ww, bw) = (x.cast(), dy.cast(), w.cast(), b.cast());
            let (y_ref, g_ref) = reference(case.rms, &xw, &dyw, &ww, &bw);
            let (y, g) = run(case.rms, &x, &dy, &w, &b);
            assert_ulps(&format!("{what} y"), &y, &y_ref, format, ulps, atol);
            let scale = max_abs_diff(g_ref.dx.data(), &vec![0.0; g_ref.dx.numel()]).max(1e-300);
            // Plus the smallest subnormal: tiny gradients round to 0 in f16.
            let tiny = ulp(0.0, format);
            assert_close(
                &format!("{what} dx"),
                &widen(&g.dx),
                g_ref.dx.data(),
                grad_rtol * scale + tiny,
                grad_rtol,
            );
            let dw = g.dweight.as_ref().unwrap();
            let dw_ref = g_ref.dweight.as_ref().unwrap();
            let scale = max_abs_diff(dw_ref.data(), &vec![0.0; dw_ref.numel()]).max(1e-300);
            assert_close(
                &format!("{what} dweight"),
                &widen(dw),
                dw_ref.data(),
                grad_rtol * scale + tiny,
                grad_rtol,
            );
            if !case.rms {
                let db_ref = g_ref.dbias.as_ref().unwrap();
                assert_ulps(
                    &format!("{what} dbias"),
                    g.dbias.as_ref().unwrap(),
                    db_ref,
                    format,
                    ulps,
                    grad_rtol,
                );
            } else {
                assert!(g.dbias.is_none());
            }
        }
    }
}

#[test]
fn agrees_with_the_row_kernels_on_the_transposed_input_in_every_dtype() {
    // f64: the same quantities, the reference's row moments in one pass
    // (so at offset 100 its x̂ is off by up to ~1e-13), these in two.
    check_dtype::<f64>("f64", (53, -1022), (4.0, 1e-12), 1e-11);
    // f32, bf16, f16: computed in f64 and rounded once, so within one unit
    // in the last place of the reference (plus the reference's own error
    // where y is near 0) (the gradients, sums over many
    // values rounded once, at the storage type's relative precision).
    check_dtype::<f32>("f32", (24, -126), (1.0, 1e-12), 1e-6);
    check_dtype::<half::bf16>("bf16", (8, -126), (1.0, 1e-12), 1e-2);
    check_dtype::<half::f16>("f16", (11, -14), (1.0, 1e-12), 2e-3);
}

#[test]
fn finite_differences() {
    let mut r = rng(7);
    for rms in [false, true] {
        let shape = [2, 4, 3, 2];
        let x = normal(&mut r, &shape, 0.5, 1.0);
        let w = normal(&mut r, &[4], 1.0, 0.3);
        let b = normal(&mut r, &[4], 0.0, 0.3);
        let probe = normal(&mut r, &shape, 0.0, 1.0);
        let (_, g) = run(rms, &x, &probe, &w, &b);
        let loss = |x: &Tensor<f64>, w: &Tensor<f64>, b: &Tensor<f64>| {
            dot(&run(rms, x, &probe, w, b).0, &probe)
        };
        let h = 1e-6;
        assert_close(
            "dx",
            g.dx.data(),
            &numeric_grad(&x, h, |x| loss(x, &w, &b)),
            1e-7,
            1e-6,
        );
        let dw = numeric_grad(&w, h, |w| loss(&x, w, &b));
        assert_close("dweight", g.dweight.unwrap().data(), &dw, 1e-7, 1e-6);
        if !rms {
            let db = numeric_grad(&b, h, |b| loss(&x, &w, b));
            assert_close("dbias", g.dbias.unwrap().data(), &db, 1e-7, 1e-6);
        }
    }
}

#[test]
fn bit_identical_across_simd_levels_and_thread_counts() {
    let mut r = rng(11);
    // 24 samples of 5000 values: several tasks of at least 32 Ki values.
    let shape = [24, 8, 25, 25];
    let x = normal(&mut r, &shape, 3.0, 2.0).cast::<f32>();
    let dy = normal(&mut r, &shape, 0.0, 1.0).cast::<f32>();
    let w = normal(&mut r, &[8], 1.0, 0.3).cast::<f32>();
    let b = normal(&mut r, &[8], 0.0, 0.3).cast::<f32>();
    for rms in [false, true] {
        let mut first: Option<(Tensor<f32>, Grads<f32>)> = None;
        for level in simd::available() {
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                simd::force(Some(level));
                let got = pool.install(|| run(rms, &x, &dy, &w, &b));
                simd::force(None);
                match &first {
                    None => first = Some(got),
                    Some(want) => {
                        let what = format!("rms={rms} {level:?} {threads} threads");
                        assert_eq!(got.0.data(), want.0.data(), "{what}: y");
                        assert_eq!(got.1, want.1, "{what}: grads");
                    }
                }
            }
        }
    }
}

#[test]
fn without_parameters_and_without_values() {
    let mut r = rng(3);
    let x = normal(&mut r, &[2, 3, 4], 0.0, 1.0);
    let dy = normal(&mut r, &[2, 3, 4], 0.0, 1.0);
    let (y, saved) = layer_norm_channels(&x, None, None, EPS.into()).unwrap();
    let ones = Tensor::full(&[3], 1.0).unwrap();
    let zeros = Tensor::full(&[3], 0.0).unwrap();
    let (y_ref, g_ref) = reference(false, &x, &dy, &ones, &zeros);
    assert_close("y", y.data(), y_ref.data(), 1e-12, 1e-12);
    let g = layer_norm_channels_backward(&x, &dy, None, false, EPS.into(), &saved).unwrap();
    assert_close("dx", g.dx.data(), g_ref.dx.data(), 1e-12, 1e-12);
    assert!(g.dweight.is_none() && g.dbias.is_none());
    // No values: empty outputs, zero gradients for the parameters there are.
    let empty = Tensor::<f32>::new(vec![0, 3, 4], vec![]).unwrap();
    let w = Tensor::new(vec![3], vec![1f32; 3]).unwrap();
    let (y, saved) = rms_norm_channels(&empty, Some(&w), EPS.into()).unwrap();
    assert_eq!(y.shape(), &[0, 3, 4]);
    let g = rms_norm_channels_backward(&empty, &empty, Some(&w), EPS.into(), &saved).unwrap();
    assert_eq!(g.dweight.unwrap().data(), &[0.0; 3]);
    // No channels, or no positions.
    for shape in [vec![2, 0, 4], vec![2, 3, 0]] {
        let empty = Tensor::<f32>::new(shape.clone(), vec![]).unwrap();
        let (y, saved) = layer_norm_channels(&empty, None, None, EPS.into()).unwrap();
        assert_eq!(y.shape(), &shape[..]);
        let g = layer_norm_channels_backward(&empty, &empty, None, true, EPS.into(), &saved);
        assert_eq!(g.unwrap().dbias.unwrap().numel(), shape[1]);
    }
}

#[test]
fn bad_arguments_are_typed_errors_naming_the_op() {
    let x = Tensor::new(vec![2, 3, 4], vec![1f32; 24]).unwrap();
    let w = Tensor::new(vec![4], vec![1f32; 4]).unwrap();
    let err = layer_norm_channels(&x, Some(&w), None, EPS.into()).unwrap_err();
    assert!(
        matches!(
            err,
            NormError::ShapeMismatch {
                op: "layer_norm_channels",
                arg: "weight",
                ..
            }
        ),
        "{err}"
    );
    let v = Tensor::new(vec![24], vec![1f32; 24]).unwrap();
    let err = rms_norm_channels(&v, None, EPS.into()).unwrap_err();
    assert!(
        matches!(
            err,
            NormError::RankTooLow {
                op: "rms_norm_channels",
                ..
            }
        ),
        "{err}"
    );
    let err = rms_norm_channels(&x, None, (-1.0).into()).unwrap_err();
    assert!(err.to_string().contains("rms_norm_channels"), "{err}");
    let (_, saved) = rms_norm_channels(&x, None, EPS.into()).unwrap();
    let dy = Tensor::new(vec![2, 4, 3], vec![1f32; 24]).unwrap();
    let err = rms_norm_channels_backward(&x, &dy, None, EPS.into(), &saved).unwrap_err();
    assert!(
        matches!(
            err,
            NormError::ShapeMismatch {
                op: "rms_norm_channels",
                arg: "dy",
                ..
            }
        ),
        "{err}"
    );
    let other = Tensor::new(vec![3, 3, 3], vec![1f32; 27]).unwrap();
    let err = rms_norm_channels_backward(&other, &other, None, EPS.into(), &saved).unwrap_err();
    assert!(err.to_string().contains("saved"), "{err}");
}

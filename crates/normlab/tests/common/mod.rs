//! Shared test helpers: seeded inputs and central finite differences.
#![allow(dead_code)]

use normlab::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// A seeded generator.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `offset + sd·N(0,1)` values of `shape`, in f64.
pub fn normal(rng: &mut StdRng, shape: &[usize], offset: f64, sd: f64) -> Tensor<f64> {
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| offset + sd * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Tensor::new(shape.to_vec(), data).unwrap()
}

/// Uniform values in `[lo, hi)` of `shape`.
pub fn uniform(rng: &mut StdRng, shape: &[usize], lo: f64, hi: f64) -> Tensor<f64> {
    let n = shape.iter().product();
    let data = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::new(shape.to_vec(), data).unwrap()
}

/// `Σ y ⊙ r`: a scalar loss whose gradient with respect to y is `r`.
pub fn dot(y: &Tensor<f64>, r: &Tensor<f64>) -> f64 {
    y.data().iter().zip(r.data()).map(|(a, b)| a * b).sum()
}

/// Central finite differences of `loss` with respect to every value of `p`.
pub fn numeric_grad(
    p: &Tensor<f64>,
    h: f64,
    mut loss: impl FnMut(&Tensor<f64>) -> f64,
) -> Vec<f64> {
    (0..p.numel())
        .map(|i| {
            let mut plus = p.clone();
            plus.data_mut()[i] += h;
            let mut minus = p.clone();
            minus.data_mut()[i] -= h;
            (loss(&plus) - loss(&minus)) / (2.0 * h)
        })
        .collect()
}

/// Asserts `got ≈ want` elementwise: `|g - w| ≤ atol + rtol·|w|`.
#[track_caller]
pub fn assert_close(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g:e}, want {w:e} (diff {:e})",
            (g - w).abs()
        );
    }
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Widens any float tensor's data to f64.
pub fn widen<T: normlab::Float>(t: &Tensor<T>) -> Vec<f64> {
    t.data().iter().map(|v| v.to_f64()).collect()
}

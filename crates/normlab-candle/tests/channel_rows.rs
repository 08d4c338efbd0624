//! LayerNorm and RMSNorm over the channels at each position as candle ops
//! (`ops::layer_norm_channels`, `ops::rms_norm_channels`,
//! `RmsNorm::forward_channels`): the same outputs and gradients as moving
//! the channels last, normalizing the rows and moving them back, in f64,
//! f32 and bf16, with strided inputs.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rng: &mut StdRng, shape: &[usize], mean: f64, dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| mean + 1.5 * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    a.to_dtype(DType::F64)?
        .sub(&b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

/// `(y, dx, dγ, dβ)` of a loss `Σ y·r` through `f`.
fn run(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
) -> Result<[Tensor; 4]> {
    let (x, w, b) = (
        Var::from_tensor(x)?,
        Var::from_tensor(w)?,
        Var::from_tensor(b)?,
    );
    let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
    let grads = y.mul(r)?.sum_all()?.backward()?;
    let g = |v: &Var| {
        grads
            .get(v)
            .cloned()
            .unwrap_or_else(|| v.zeros_like().unwrap())
    };
    Ok([y.clone(), g(&x), g(&w), g(&b)])
}

#[test]
fn the_same_as_moving_the_channels_last() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(20261207);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5), (DType::BF16, 0.1)] {
        for rms in [false, true] {
            for shape in [[2usize, 8, 5, 6], [3, 3, 1, 7]] {
                let c = shape[1];
                let x = randn(&mut rng, &shape, 2.0, dtype)?;
                let r = randn(&mut rng, &shape, 0.0, dtype)?;
                let w = randn(&mut rng, &[c], 1.0, dtype)?;
                let b = randn(&mut rng, &[c], 0.0, dtype)?;
                let ours = |x: &Tensor, w: &Tensor, b: &Tensor| {
                    if rms {
                        normlab_candle::ops::rms_norm_channels(x, Some(w), 1e-5)
                    } else {
                        normlab_candle::ops::layer_norm_channels(x, Some(w), Some(b), 1e-5)
                    }
                };
                let moved = |x: &Tensor, w: &Tensor, b: &Tensor| {
                    let t = x.permute((0, 2, 3, 1))?;
                    let y = if rms {
                        normlab_candle::ops::rms_norm(&t, Some(w), 1e-5)?
                    } else {
                        normlab_candle::ops::layer_norm(&t, Some(w), Some(b), 1e-5)?
                    };
                    y.permute((0, 3, 1, 2))
                };
                let got = run(ours, &x, &w, &b, &r)?;
                let want = run(moved, &x, &w, &b, &r)?;
                for (name, (g, w)) in ["y", "dx", "dweight", "dbias"]
                    .iter()
                    .zip(got.iter().zip(&want))
                {
                    let scale = w
                        .to_dtype(DType::F64)?
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f64>()?;
                    let d = max_diff(g, w)?;
                    assert!(
                        d <= tol * scale.max(1.0),
                        "{dtype:?} rms={rms} {shape:?} {name}: {d:e}"
                    );
                }
                assert_eq!(got[0].dtype(), dtype);
                // A strided input: the same values, gathered first.
                let xt = x.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
                let strided = run(ours, &xt, &w, &b, &r)?;
                assert!(max_diff(&strided[0], &got[0])? == 0.0, "strided input");
            }
        }
    }
    Ok(())
}

#[test]
fn the_layer_normalizes_channels_and_bad_shapes_are_errors() -> Result<()> {
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let layer = normlab_candle::rms_norm(4, 1e-6, vb)?;
    let x = Tensor::new(&[[[3f32], [4.], [0.], [0.]]], &Device::Cpu)?; // [1, 4, 1]
    let y = layer.forward_channels(&x)?;
    // rms over the 4 channels = √(25/4) = 2.5
    let want = [1.2f32, 1.6, 0.0, 0.0];
    for (a, b) in y.flatten_all()?.to_vec1::<f32>()?.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let bad = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu)?;
    let w = Tensor::ones(4, DType::F32, &Device::Cpu)?;
    let err = normlab_candle::ops::layer_norm_channels(&bad, Some(&w), None, 1e-5).unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");
    Ok(())
}

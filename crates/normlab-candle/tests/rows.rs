//! LayerNorm and RMSNorm ops: forward and gradients against candle-nn's
//! differentiable composites (`layer_norm_slow`, `rms_norm_slow`) and central
//! finite differences in f64; strided inputs and broadcast gradients.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rng: &mut StdRng, shape: &[usize], offset: f64, sd: f64, dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| offset + sd * rng.sample::<f64, _>(StandardNormal))
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

/// Forward and gradients of `ours` and `reference` on the same variables.
fn compare(
    dtype: DType,
    shape: &[usize],
    ours: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    reference: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    tol: f64,
    with_bias: bool,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let n = *shape.last().unwrap();
    let x = Var::from_tensor(&randn(&mut rng, shape, 1.0, 2.0, dtype)?)?;
    let w = Var::from_tensor(&randn(&mut rng, &[n], 1.0, 0.3, dtype)?)?;
    let b = Var::from_tensor(&randn(&mut rng, &[n], 0.0, 0.3, dtype)?)?;
    let r = randn(&mut rng, shape, 0.0, 1.0, dtype)?;
    let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| -> Result<(Tensor, candle_core::backprop::GradStore)> {
        let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
        let loss = (&y * &r)?.sum_all()?;
        Ok((y, loss.backward()?))
    };
    let (y1, g1) = run(&ours)?;
    let (y2, g2) = run(&reference)?;
    assert!(
        max_diff(&y1, &y2)? < tol,
        "forward differs by {}",
        max_diff(&y1, &y2)?
    );
    let mut vars = vec![("x", &x), ("weight", &w)];
    if with_bias {
        vars.push(("bias", &b));
    }
    for (name, v) in vars {
        let a = g1
            .get(v)
            .unwrap_or_else(|| panic!("no gradient for {name} from normlab"));
        let e = g2
            .get(v)
            .unwrap_or_else(|| panic!("no gradient for {name} from candle-nn"));
        let d = max_diff(a, e)?;
        let scale = e
            .to_dtype(DType::F64)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?
            .max(1.0);
        assert!(
            d < tol * scale,
            "{dtype:?} {shape:?} d{name} differs by {d}"
        );
    }
    Ok(())
}

#[test]
fn layer_norm_matches_candle_nn_in_value_and_gradient() -> Result<()> {
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-10)] {
        for shape in [&[4, 7][..], &[2, 3, 64], &[3, 1]] {
            compare(
                dtype,
                shape,
                |x, w, b| normlab_candle::ops::layer_norm(x, Some(w), Some(b), 1e-5),
                |x, w, b| candle_nn::ops::layer_norm_slow(x, w, b, 1e-5),
                tol,
                true,
            )?;
        }
    }
    Ok(())
}

#[test]
fn rms_norm_matches_candle_nn_in_value_and_gradient() -> Result<()> {
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-10)] {
        for shape in [&[4, 7][..], &[2, 3, 64]] {
            compare(
                dtype,
                shape,
                |x, w, _| normlab_candle::ops::rms_norm(x, Some(w), 1e-5),
                |x, w, _| candle_nn::ops::rms_norm_slow(x, w, 1e-5),
                tol,
                false,
            )?;
        }
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences_in_f64() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let x0 = randn(&mut rng, &[3, 5], 0.5, 1.5, DType::F64)?;
    let w = randn(&mut rng, &[5], 1.0, 0.3, DType::F64)?;
    let b = randn(&mut rng, &[5], 0.0, 0.3, DType::F64)?;
    let r = randn(&mut rng, &[3, 5], 0.0, 1.0, DType::F64)?;
    let loss = |x: &Tensor| -> Result<f64> {
        (normlab_candle::ops::layer_norm(x, Some(&w), Some(&b), 1e-3)? * &r)?
            .sum_all()?
            .to_scalar::<f64>()
    };
    let x = Var::from_tensor(&x0)?;
    let grads = (normlab_candle::ops::layer_norm(x.as_tensor(), Some(&w), Some(&b), 1e-3)? * &r)?
        .sum_all()?
        .backward()?;
    let dx: Vec<f64> = grads.get(&x).unwrap().flatten_all()?.to_vec1()?;
    let base: Vec<f64> = x0.flatten_all()?.to_vec1()?;
    let h = 1e-6;
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += h;
        let mut m = base.clone();
        m[i] -= h;
        let plus = loss(&Tensor::from_vec(p, &[3, 5], &Device::Cpu)?)?;
        let minus = loss(&Tensor::from_vec(m, &[3, 5], &Device::Cpu)?)?;
        let numeric = (plus - minus) / (2.0 * h);
        assert!(
            (dx[i] - numeric).abs() < 1e-6,
            "dx[{i}] = {}, numeric {numeric}",
            dx[i]
        );
    }
    Ok(())
}

#[test]
fn strided_inputs_and_broadcast_gradients() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    // A transposed (non-contiguous) input.
    let base = randn(&mut rng, &[6, 4], 0.0, 1.0, DType::F32)?;
    let x = base.t()?;
    assert!(!x.is_contiguous());
    let ours = normlab_candle::ops::layer_norm(&x, None, None, 1e-5)?;
    let theirs = candle_nn::ops::layer_norm_slow(
        &x.contiguous()?,
        &Tensor::ones(6, DType::F32, &Device::Cpu)?,
        &Tensor::zeros(6, DType::F32, &Device::Cpu)?,
        1e-5,
    )?;
    assert!(max_diff(&ours, &theirs)? < 1e-5);
    // A broadcast upstream gradient: the loss sums y times a row vector.
    let v = Var::from_tensor(&randn(&mut rng, &[3, 8], 2.0, 1.0, DType::F32)?)?;
    let row = randn(&mut rng, &[8], 0.0, 1.0, DType::F32)?;
    let y = normlab_candle::ops::layer_norm(v.as_tensor(), None, None, 1e-5)?;
    let g = y.broadcast_mul(&row)?.sum_all()?.backward()?;
    let y2 = candle_nn::ops::layer_norm_slow(
        v.as_tensor(),
        &Tensor::ones(8, DType::F32, &Device::Cpu)?,
        &Tensor::zeros(8, DType::F32, &Device::Cpu)?,
        1e-5,
    )?;
    let g2 = y2.broadcast_mul(&row)?.sum_all()?.backward()?;
    assert!(max_diff(g.get(&v).unwrap(), g2.get(&v).unwrap())? < 1e-4);
    Ok(())
}

#[test]
fn half_precision_inputs_normalize_and_differentiate() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    for dtype in [DType::F16, DType::BF16] {
        let x = Var::from_tensor(&randn(&mut rng, &[4, 32], 100.0, 1.0, dtype)?)?;
        let y = normlab_candle::ops::layer_norm(x.as_tensor(), None, None, 1e-5)?;
        assert_eq!(y.dtype(), dtype);
        let reference = candle_nn::ops::layer_norm_slow(
            &x.as_tensor().to_dtype(DType::F64)?,
            &Tensor::ones(32, DType::F64, &Device::Cpu)?,
            &Tensor::zeros(32, DType::F64, &Device::Cpu)?,
            1e-5,
        )?;
        // Statistics in f32: only the output rounding to 16 bits remains.
        assert!(max_diff(&y, &reference)? < 0.05, "{dtype:?}");
        let g = y.sqr()?.sum_all()?.backward()?;
        assert_eq!(g.get(&x).unwrap().dtype(), dtype);
    }
    Ok(())
}

#[test]
fn bad_parameter_shapes_are_errors() -> Result<()> {
    let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
    let w = Tensor::ones(3, DType::F32, &Device::Cpu)?;
    let e = normlab_candle::ops::layer_norm(&x, Some(&w), None, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("weight") && e.contains("[3]") && e.contains("[4]"),
        "{e}"
    );
    let ints = Tensor::zeros((2, 4), DType::U32, &Device::Cpu)?;
    let e = normlab_candle::ops::rms_norm(&ints, None, 1e-5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unsupported dtype"), "{e}");
    Ok(())
}

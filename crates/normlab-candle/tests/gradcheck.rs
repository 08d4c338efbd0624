//! Every op's gradient through candle's autograd against central finite
//! differences in f64: `dL/dp ≈ (L(p + h) - L(p - h)) / 2h` with
//! `L = Σ y ⊙ r`, for x and every parameter.

use candle_core::{DType, Device, ModuleT, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rng: &mut StdRng, shape: &[usize], offset: f64, sd: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| offset + sd * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Checks the autograd gradient of `f` with respect to each of `params`.
fn check(what: &str, params: &[Var], f: &dyn Fn() -> Result<Tensor>, r: &Tensor) -> Result<()> {
    let loss = || -> Result<f64> { (f()? * r)?.sum_all()?.to_scalar::<f64>() };
    let grads = (f()? * r)?.sum_all()?.backward()?;
    for (k, p) in params.iter().enumerate() {
        let analytic: Vec<f64> = grads
            .get(p)
            .unwrap_or_else(|| panic!("{what}: no gradient for parameter {k}"))
            .flatten_all()?
            .to_vec1()?;
        let base: Vec<f64> = p.as_tensor().flatten_all()?.to_vec1()?;
        let shape = p.as_tensor().dims().to_vec();
        let h = 1e-6;
        for i in 0..base.len() {
            let mut v = base.clone();
            v[i] = base[i] + h;
            p.set(&Tensor::from_vec(
                v.clone(),
                shape.as_slice(),
                &Device::Cpu,
            )?)?;
            let plus = loss()?;
            v[i] = base[i] - h;
            p.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?)?;
            let minus = loss()?;
            p.set(&Tensor::from_vec(
                base.clone(),
                shape.as_slice(),
                &Device::Cpu,
            )?)?;
            let numeric = (plus - minus) / (2.0 * h);
            assert!(
                (analytic[i] - numeric).abs() < 1e-5 * (1.0 + numeric.abs()),
                "{what} param {k}[{i}]: {} vs {numeric}",
                analytic[i]
            );
        }
    }
    Ok(())
}

#[test]
fn channel_ops_match_finite_differences() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    let x = Var::from_tensor(&randn(&mut rng, &[2, 4, 3], 1.0, 1.5)?)?;
    let w = Var::from_tensor(&randn(&mut rng, &[4], 1.0, 0.3)?)?;
    let b = Var::from_tensor(&randn(&mut rng, &[4], 0.0, 0.3)?)?;
    let r = randn(&mut rng, &[2, 4, 3], 0.0, 1.0)?;
    check(
        "group_norm",
        &[x.clone(), w.clone(), b.clone()],
        &|| normlab_candle::ops::group_norm(x.as_tensor(), 2, Some(&w), Some(&b), 1e-3),
        &r,
    )?;
    let options = normlab_candle::LrnOptions {
        alpha: 0.5,
        k: 1.5,
        ..normlab_candle::LrnOptions::new(3)
    };
    check(
        "lrn",
        std::slice::from_ref(&x),
        &|| normlab_candle::ops::local_response_norm(x.as_tensor(), &options),
        &r,
    )?;
    Ok(())
}

#[test]
fn stateful_layers_match_finite_differences_in_training_and_evaluation() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(12);
    let x = Var::from_tensor(&randn(&mut rng, &[3, 2, 4], 0.5, 1.0)?)?;
    let r = randn(&mut rng, &[3, 2, 4], 0.0, 1.0)?;
    for instance in [false, true] {
        for train in [true, false] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F64, &Device::Cpu);
            let config = normlab_candle::BatchNormConfig {
                affine: true,
                ..1e-3.into()
            };
            let layer: Box<dyn ModuleT> = if instance {
                Box::new(normlab_candle::instance_norm(2, config, vb)?)
            } else {
                Box::new(normlab_candle::batch_norm(2, config, vb)?)
            };
            let mut params = vec![x.clone()];
            for name in ["weight", "bias"] {
                let v = map.data().lock().unwrap().get(name).unwrap().clone();
                v.set(&randn(&mut rng, &[2], 1.0, 0.3)?)?;
                params.push(v);
            }
            check(
                &format!("instance {instance} train {train}"),
                &params,
                &|| layer.forward_t(x.as_tensor(), train),
                &r,
            )?;
        }
    }
    Ok(())
}

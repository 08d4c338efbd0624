//! Normalization + activation as one candle op (`BatchNorm::forward_act`,
//! `GroupNorm::forward_act`, `LayerNorm::forward_act`, `ops::*_act`):
//! the same outputs, running statistics and gradients as the layer followed
//! by candle's own `relu`/`tanh`/sigmoid, in f64 and f32.

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use normlab_candle::Activation;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rng: &mut StdRng, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| 0.5 + 1.5 * rng.sample::<f64, _>(StandardNormal))
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

/// candle's own activation.
fn candle_act(t: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Relu => t.relu(),
        Activation::Tanh => t.tanh(),
        Activation::Sigmoid => candle_nn::ops::sigmoid(t),
    }
}

/// Sets the VarMap's parameters to random values (γ around 1, β around 0).
fn randomize(map: &VarMap, rng: &mut StdRng) -> Result<()> {
    let data = map.data().lock().unwrap();
    // In name order: the map's own order differs from map to map.
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for name in names {
        let var = &data[&name];
        if name.ends_with("weight") || name.ends_with("bias") {
            let t = randn(rng, var.dims(), var.dtype())?;
            let t = if name.ends_with("weight") {
                ((t * 0.2)? + 1.0)?
            } else {
                (t * 0.3)?
            };
            var.set(&t)?;
        }
    }
    Ok(())
}

/// Forward and gradients (x and every variable) of `Σ y·r` for a layer
/// call, fused or not.
fn run(
    map: &VarMap,
    x: &Var,
    r: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let y = f(x.as_tensor())?;
    let grads = (y.mul(r)?.sum_all()?).backward()?;
    let mut out = vec![grads.get(x).expect("x has a gradient").clone()];
    let data = map.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for name in names {
        if name.ends_with("weight") || name.ends_with("bias") {
            out.push(
                grads
                    .get(data[&name].as_tensor())
                    .expect("a gradient")
                    .clone(),
            );
        }
    }
    Ok((y, out))
}

#[test]
fn fused_layers_match_the_layer_then_candles_activation() -> Result<()> {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for act in [Activation::Relu, Activation::Tanh, Activation::Sigmoid] {
            for (k, layer) in ["batch train", "batch eval", "group", "layer"]
                .into_iter()
                .enumerate()
            {
                let mut rng = StdRng::seed_from_u64(40 + k as u64);
                let shape: &[usize] = if layer == "layer" {
                    &[6, 7, 9]
                } else {
                    &[4, 6, 5, 5]
                };
                let x = Var::from_tensor(&randn(&mut rng, shape, dtype)?)?;
                let r = randn(&mut rng, shape, dtype)?;
                let results: Vec<(Tensor, Vec<Tensor>)> = [true, false]
                    .into_iter()
                    .map(|fused| {
                        let map = VarMap::new();
                        let vb = VarBuilder::from_varmap(&map, dtype, &Device::Cpu);
                        let mut rng = StdRng::seed_from_u64(7);
                        match layer {
                            "batch train" | "batch eval" => {
                                let bn = normlab_candle::batch_norm(6, 1e-5, vb)?;
                                randomize(&map, &mut rng)?;
                                let train = layer == "batch train";
                                if !train {
                                    // Running statistics from one training batch.
                                    bn.forward_t(&randn(&mut rng, shape, dtype)?, true)?;
                                }
                                let out = run(&map, &x, &r, |x| {
                                    if fused {
                                        bn.forward_act(x, train, act)
                                    } else {
                                        candle_act(&bn.forward_t(x, train)?, act)
                                    }
                                })?;
                                // The running statistics moved the same way.
                                let stats = [bn.running_mean().unwrap(), bn.running_var().unwrap()];
                                let mut out = out;
                                out.1.extend(stats.into_iter().cloned());
                                Ok(out)
                            }
                            "group" => {
                                let gn = normlab_candle::group_norm(3, 6, 1e-5, vb)?;
                                randomize(&map, &mut rng)?;
                                run(&map, &x, &r, |x| {
                                    if fused {
                                        gn.forward_act(x, act)
                                    } else {
                                        candle_act(&gn.forward(x)?, act)
                                    }
                                })
                            }
                            _ => {
                                let ln = normlab_candle::layer_norm(9, 1e-5, vb)?;
                                randomize(&map, &mut rng)?;
                                run(&map, &x, &r, |x| {
                                    if fused {
                                        ln.forward_act(x, act)
                                    } else {
                                        candle_act(&ln.forward(x)?, act)
                                    }
                                })
                            }
                        }
                    })
                    .collect::<Result<_>>()?;
                let (fused, plain) = (&results[0], &results[1]);
                let what = format!("{dtype:?} {} {layer}", act.name());
                let scale = 1.0
                    + plain
                        .0
                        .abs()?
                        .max_keepdim(0)?
                        .flatten_all()?
                        .max(0)?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?;
                let d = max_diff(&fused.0, &plain.0)?;
                assert!(d <= tol * scale, "{what}: y differs by {d:e}");
                assert_eq!(fused.1.len(), plain.1.len(), "{what}");
                for (i, (a, b)) in fused.1.iter().zip(&plain.1).enumerate() {
                    let d = max_diff(a, b)?;
                    assert!(
                        d <= 10.0 * tol * scale,
                        "{what}: gradient {i} differs by {d:e}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// The functional forms, with a bias and no weight (β must stay inside the
/// activation: the op runs with γ = 1 instead of adding β afterwards).
#[test]
fn functional_forms_keep_a_lone_bias_inside_the_activation() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let x = Var::from_tensor(&randn(&mut rng, &[3, 4, 6], DType::F64)?)?;
    let b = Var::from_tensor(&randn(&mut rng, &[4], DType::F64)?)?;
    let y = normlab_candle::ops::group_norm_act(
        x.as_tensor(),
        2,
        None,
        Some(&b),
        1e-5,
        Activation::Relu,
    )?;
    let plain = normlab_candle::ops::group_norm(x.as_tensor(), 2, None, Some(&b), 1e-5)?.relu()?;
    assert!(max_diff(&y, &plain)? < 1e-12);
    let gb = (y.sqr()?.sum_all()?).backward()?;
    let pb = (plain.sqr()?.sum_all()?).backward()?;
    assert!(max_diff(gb.get(&b).unwrap(), pb.get(&b).unwrap())? < 1e-10);
    assert!(max_diff(gb.get(&x).unwrap(), pb.get(&x).unwrap())? < 1e-10);
    let bl = Var::from_tensor(&randn(&mut rng, &[6], DType::F64)?)?;
    let eps = normlab_candle::Epsilon::default();
    let y =
        normlab_candle::ops::layer_norm_act(x.as_tensor(), None, Some(&bl), eps, Activation::Tanh)?;
    let plain = normlab_candle::ops::layer_norm_eps(x.as_tensor(), None, Some(&bl), eps)?.tanh()?;
    assert!(max_diff(&y, &plain)? < 1e-12);
    let gb = (y.sum_all()?).backward()?;
    let pb = (plain.sum_all()?).backward()?;
    assert!(max_diff(gb.get(&bl).unwrap(), pb.get(&bl).unwrap())? < 1e-10);
    assert!(max_diff(gb.get(&x).unwrap(), pb.get(&x).unwrap())? < 1e-10);
    Ok(())
}

/// Kinds without a fused form say so instead of computing something else.
#[test]
fn kinds_without_a_fused_form_are_errors() -> Result<()> {
    let x = Tensor::ones(&[2, 4], DType::F32, &Device::Cpu)?;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let rms = normlab_candle::layer_norm(
        4,
        normlab_candle::LayerNormConfig {
            remove_mean: false,
            ..1e-5.into()
        },
        vb,
    )?;
    let err = rms
        .forward_act(&x, Activation::Relu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fused"), "{err}");
    Ok(())
}

//! Layers: candle-nn's constructors and semantics (BatchNorm's running
//! statistics, train/eval), gradient parity with candle-nn's BatchNorm and
//! GroupNorm, every parameter of an MLP and a CNN receiving a gradient,
//! training lowering the loss, and safetensors round trips.

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rng: &mut StdRng, shape: &[usize], offset: f64, sd: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (offset + sd * rng.sample::<f64, _>(StandardNormal)) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    a.to_dtype(DType::F64)?
        .sub(&b.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()
}

fn vb(map: &VarMap) -> VarBuilder<'_> {
    VarBuilder::from_varmap(map, DType::F32, &Device::Cpu)
}

/// Sets a VarMap variable to `t`.
fn set(map: &VarMap, name: &str, t: &Tensor) -> Result<()> {
    map.data().lock().unwrap().get(name).unwrap().set(t)
}

#[test]
fn batch_norm_matches_candle_nn_in_training_and_evaluation() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    let (ours_map, theirs_map) = (VarMap::new(), VarMap::new());
    let ours = normlab_candle::batch_norm(3, 1e-5, vb(&ours_map).pp("bn"))?;
    let theirs = candle_nn::batch_norm(3, 1e-5, vb(&theirs_map).pp("bn"))?;
    let (w, b) = (
        randn(&mut rng, &[3], 1.0, 0.3)?,
        randn(&mut rng, &[3], 0.0, 0.3)?,
    );
    for map in [&ours_map, &theirs_map] {
        set(map, "bn.weight", &w)?;
        set(map, "bn.bias", &b)?;
    }
    for step in 0..3 {
        let x = Var::from_tensor(&randn(&mut rng, &[4, 3, 5, 5], step as f64, 2.0)?)?;
        let r = randn(&mut rng, &[4, 3, 5, 5], 0.0, 1.0)?;
        let y1 = ours.forward_t(x.as_tensor(), true)?;
        let y2 = theirs.forward_t(x.as_tensor(), true)?;
        assert!(max_diff(&y1, &y2)? < 1e-4);
        let g1 = (&y1 * &r)?.sum_all()?.backward()?;
        let g2 = (&y2 * &r)?.sum_all()?.backward()?;
        assert!(
            max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap())? < 1e-4,
            "dx"
        );
        let (ow, ob) = ours.weight_and_bias().unwrap();
        let (tw, tb) = theirs.weight_and_bias().unwrap();
        assert!(
            max_diff(g1.get(ow).unwrap(), g2.get(tw).unwrap())? < 1e-3,
            "dweight"
        );
        assert!(
            max_diff(g1.get(ob).unwrap(), g2.get(tb).unwrap())? < 1e-3,
            "dbias"
        );
    }
    assert!(max_diff(ours.running_mean().unwrap(), theirs.running_mean())? < 1e-5);
    assert!(max_diff(ours.running_var().unwrap(), theirs.running_var())? < 1e-4);
    assert_eq!(ours.num_batches_tracked().unwrap().to_scalar::<i64>()?, 3);
    // The running statistics are the VarMap's own variables.
    let stored = ours_map
        .data()
        .lock()
        .unwrap()
        .get("bn.running_mean")
        .unwrap()
        .as_tensor()
        .clone();
    assert!(max_diff(&stored, ours.running_mean().unwrap())? == 0.0);
    // Evaluation uses them and changes nothing.
    let x = randn(&mut rng, &[2, 3, 5, 5], 1.0, 1.0)?;
    assert!(max_diff(&ours.forward_t(&x, false)?, &theirs.forward_t(&x, false)?)? < 1e-4);
    assert_eq!(ours.num_batches_tracked().unwrap().to_scalar::<i64>()?, 3);
    Ok(())
}

#[test]
fn group_norm_matches_candle_nn_in_value_and_gradient() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    let (ours_map, theirs_map) = (VarMap::new(), VarMap::new());
    let ours = normlab_candle::group_norm(4, 8, 1e-5, vb(&ours_map))?;
    let theirs = candle_nn::group_norm(4, 8, 1e-5, vb(&theirs_map))?;
    let (w, b) = (
        randn(&mut rng, &[8], 1.0, 0.3)?,
        randn(&mut rng, &[8], 0.0, 0.3)?,
    );
    for map in [&ours_map, &theirs_map] {
        set(map, "weight", &w)?;
        set(map, "bias", &b)?;
    }
    let x = Var::from_tensor(&randn(&mut rng, &[3, 8, 4, 4], 2.0, 1.5)?)?;
    let r = randn(&mut rng, &[3, 8, 4, 4], 0.0, 1.0)?;
    let y1 = ours.forward(x.as_tensor())?;
    let y2 = theirs.forward(x.as_tensor())?;
    assert!(max_diff(&y1, &y2)? < 1e-4);
    let g1 = (&y1 * &r)?.sum_all()?.backward()?;
    let g2 = (&y2 * &r)?.sum_all()?.backward()?;
    assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap())? < 1e-4);
    for name in ["weight", "bias"] {
        let a = ours_map
            .data()
            .lock()
            .unwrap()
            .get(name)
            .unwrap()
            .as_tensor()
            .clone();
        let e = theirs_map
            .data()
            .lock()
            .unwrap()
            .get(name)
            .unwrap()
            .as_tensor()
            .clone();
        assert!(
            max_diff(g1.get(&a).unwrap(), g2.get(&e).unwrap())? < 1e-3,
            "d{name}"
        );
    }
    Ok(())
}

/// Every layer in one network; returns the logits.
struct Net {
    fc1: candle_nn::Linear,
    ln: normlab_candle::LayerNorm,
    rms: normlab_candle::RmsNorm,
    conv: candle_nn::Conv2d,
    bn: normlab_candle::BatchNorm,
    gn: normlab_candle::GroupNorm,
    inorm: normlab_candle::InstanceNorm,
    lrn: normlab_candle::LocalResponseNorm,
    head: candle_nn::Linear,
}

impl Net {
    fn new(vb: VarBuilder) -> Result<Self> {
        let inorm_config = normlab_candle::BatchNormConfig {
            affine: true,
            ..1e-5.into()
        };
        Ok(Self {
            conv: candle_nn::conv2d(1, 8, 3, Default::default(), vb.pp("conv"))?,
            bn: normlab_candle::batch_norm(8, 1e-5, vb.pp("bn"))?,
            gn: normlab_candle::group_norm(2, 8, 1e-5, vb.pp("gn"))?,
            inorm: normlab_candle::instance_norm(8, inorm_config, vb.pp("in"))?,
            lrn: normlab_candle::local_response_norm(3),
            fc1: candle_nn::linear(8 * 6 * 6, 32, vb.pp("fc1"))?,
            ln: normlab_candle::layer_norm(32, 1e-5, vb.pp("ln"))?,
            rms: normlab_candle::rms_norm(32, 1e-6, vb.pp("rms"))?,
            head: candle_nn::linear(32, 3, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.conv.forward(x)?;
        let h = self.bn.forward_t(&h, train)?.relu()?;
        let h = self.gn.forward(&h)?;
        let h = self.inorm.forward_t(&h, train)?;
        let h = self.lrn.forward(&h)?.flatten_from(1)?;
        let h = self.ln.forward(&self.fc1.forward(&h)?)?.relu()?;
        let h = self.rms.forward(&h)?;
        self.head.forward(&h)
    }
}

#[test]
fn every_parameter_gets_a_gradient_and_training_lowers_the_loss() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let map = VarMap::new();
    let net = Net::new(vb(&map))?;
    let x = randn(&mut rng, &[16, 1, 8, 8], 0.0, 1.0)?;
    let labels = Tensor::from_vec(
        (0..16u32).map(|i| i % 3).collect::<Vec<_>>(),
        16,
        &Device::Cpu,
    )?;
    // Make the task learnable: shift each class's inputs.
    let x = x.broadcast_add(&labels.to_dtype(DType::F32)?.reshape((16, 1, 1, 1))?)?;
    let loss_of = |train: bool| -> Result<Tensor> {
        candle_nn::loss::cross_entropy(&net.forward(&x, train)?, &labels)
    };
    let grads = loss_of(true)?.backward()?;
    let vars = map.data().lock().unwrap().clone();
    let trainable = ["weight", "bias"];
    for (name, var) in &vars {
        if trainable.iter().any(|t| name.ends_with(t)) {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            assert!(
                g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
                "zero gradient for {name}"
            );
        }
    }
    let trainable_vars: Vec<Var> = vars
        .iter()
        .filter(|(n, _)| trainable.iter().any(|t| n.ends_with(t)))
        .map(|(_, v)| v.clone())
        .collect();
    let mut opt = candle_nn::SGD::new(trainable_vars, 0.05)?;
    let first = loss_of(true)?.to_scalar::<f32>()?;
    for _ in 0..20 {
        opt.backward_step(&loss_of(true)?)?;
    }
    let last = loss_of(true)?.to_scalar::<f32>()?;
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    Ok(())
}

#[test]
fn parameters_and_buffers_round_trip_through_safetensors_under_pytorch_names() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(4);
    let map = VarMap::new();
    let net = Net::new(vb(&map))?;
    let x = randn(&mut rng, &[4, 1, 8, 8], 0.0, 1.0)?;
    for _ in 0..3 {
        net.forward(&x, true)?;
    }
    let names: Vec<String> = map.data().lock().unwrap().keys().cloned().collect();
    for n in [
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
        "ln.weight",
        "ln.bias",
        "rms.weight",
        "gn.weight",
    ] {
        assert!(names.iter().any(|k| k == n), "{n} missing from {names:?}");
    }
    let dir = std::env::temp_dir().join(format!("normlab-candle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("net.safetensors");
    map.save(&path)?;
    let mut restored_map = VarMap::new();
    let restored = Net::new(vb(&restored_map))?;
    restored_map.load(&path)?;
    assert_eq!(
        restored
            .bn
            .num_batches_tracked()
            .unwrap()
            .to_scalar::<i64>()?,
        3,
        "num_batches_tracked restored"
    );
    let a = net.forward(&x, false)?;
    let b = restored.forward(&x, false)?;
    assert_eq!(max_diff(&a, &b)?, 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
    Ok(())
}

/// A PyTorch state dict saved with `safetensors.torch.save_file` (written by
/// tools/make_torch_state.py) loads as-is, and evaluation reproduces
/// PyTorch's outputs.
#[test]
fn a_pytorch_state_dict_loads_and_reproduces_pytorch() -> Result<()> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch_state.safetensors");
    let mut map = VarMap::new();
    let bn = normlab_candle::batch_norm(3, 1e-5, vb(&map).pp("bn"))?;
    let ln = normlab_candle::layer_norm(5, 1e-5, vb(&map).pp("ln"))?;
    let gn = normlab_candle::group_norm(2, 4, 1e-5, vb(&map).pp("gn"))?;
    let rms = normlab_candle::rms_norm(5, 1e-6, vb(&map).pp("rms"))?;
    map.load(&path)?;
    assert_eq!(bn.num_batches_tracked().unwrap().to_scalar::<i64>()?, 3);
    let file = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let t = |name: &str| file.get(name).unwrap().clone();
    assert!(max_diff(&bn.forward_t(&t("test.x_bn"), false)?, &t("test.y_bn"))? < 1e-5);
    assert!(max_diff(&ln.forward(&t("test.x_ln"))?, &t("test.y_ln"))? < 1e-5);
    assert!(max_diff(&rms.forward(&t("test.x_ln"))?, &t("test.y_rms"))? < 1e-5);
    assert!(max_diff(&gn.forward(&t("test.x_gn"))?, &t("test.y_gn"))? < 1e-5);
    Ok(())
}

#[test]
fn config_types_reach_normlab_options() -> Result<()> {
    let map = VarMap::new();
    // candle-nn's own config types are accepted.
    let ln =
        normlab_candle::layer_norm(4, candle_nn::LayerNormConfig::default(), vb(&map).pp("a"))?;
    let _ = normlab_candle::batch_norm(2, candle_nn::BatchNormConfig::default(), vb(&map).pp("b"))?;
    // candle-nn's remove_mean = false is refused by BatchNorm, not ignored.
    let no_mean = candle_nn::BatchNormConfig {
        remove_mean: false,
        ..Default::default()
    };
    assert!(normlab_candle::batch_norm(2, no_mean, vb(&map).pp("c")).is_err());
    // ε added to σ: (x - μ)/(σ + ε).
    let config = normlab_candle::LayerNormConfig {
        eps: 0.5,
        affine: false,
        eps_placement: normlab_candle::EpsPlacement::AddToStd,
        ..Default::default()
    };
    let lecture = normlab_candle::layer_norm(4, config, vb(&map).pp("d"))?;
    let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu)?;
    let y: Vec<f32> = lecture.forward(&x)?.flatten_all()?.to_vec1()?;
    let sd = 1.25f32.sqrt();
    assert!((y[0] - (-1.5 / (sd + 0.5))).abs() < 1e-6, "{y:?}");
    let _ = ln.forward(&x)?;
    // Cumulative momentum and the biased running variance.
    let config = normlab_candle::BatchNormConfig {
        momentum: normlab_candle::Momentum::Cumulative,
        running_var: normlab_candle::RunningVarEstimator::Biased,
        ..1e-5.into()
    };
    let bn = normlab_candle::batch_norm(1, config, vb(&map).pp("e"))?;
    for batch in [[1f32, 3.], [5., 9.]] {
        bn.forward_t(&Tensor::new(&[[batch[0]], [batch[1]]], &Device::Cpu)?, true)?;
    }
    // Means 2 and 7 averaged: 4.5; biased variances 1 and 4 averaged: 2.5.
    assert_eq!(bn.running_mean().unwrap().to_vec1::<f32>()?, [4.5]);
    assert_eq!(bn.running_var().unwrap().to_vec1::<f32>()?, [2.5]);
    Ok(())
}

#[test]
fn channel_ops_accept_strided_inputs() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    // [N, C, S] obtained by transposing a [N, S, C] tensor: not contiguous.
    let base = randn(&mut rng, &[2, 6, 4], 1.0, 1.0)?;
    let x = base.transpose(1, 2)?;
    assert!(!x.is_contiguous());
    let a = normlab_candle::ops::group_norm(&x, 2, None, None, 1e-5)?;
    let b = normlab_candle::ops::group_norm(&x.contiguous()?, 2, None, None, 1e-5)?;
    assert_eq!(max_diff(&a, &b)?, 0.0);
    Ok(())
}

#[test]
fn an_mlp_with_every_feature_layer_trains() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    let map = VarMap::new();
    let v = vb(&map);
    let fc1 = candle_nn::linear(10, 16, v.pp("fc1"))?;
    let bn = normlab_candle::batch_norm(16, 1e-5, v.pp("bn"))?; // BatchNorm1d on [N, C]
    let fc2 = candle_nn::linear(16, 16, v.pp("fc2"))?;
    let ln = normlab_candle::layer_norm(16, 1e-5, v.pp("ln"))?;
    let gn = normlab_candle::group_norm(4, 16, 1e-5, v.pp("gn"))?;
    let rms = normlab_candle::rms_norm(16, 1e-6, v.pp("rms"))?;
    let head = candle_nn::linear(16, 2, v.pp("head"))?;
    let x = randn(&mut rng, &[32, 10], 0.0, 1.0)?;
    let labels = Tensor::from_vec(
        (0..32u32).map(|i| i % 2).collect::<Vec<_>>(),
        32,
        &Device::Cpu,
    )?;
    let x = x.broadcast_add(&labels.to_dtype(DType::F32)?.reshape((32, 1))?)?;
    let forward = |train: bool| -> Result<Tensor> {
        let h = bn.forward_t(&fc1.forward(&x)?, train)?.relu()?;
        let h = gn.forward(&ln.forward(&fc2.forward(&h)?)?.relu()?)?;
        candle_nn::loss::cross_entropy(&head.forward(&rms.forward(&h)?)?, &labels)
    };
    let grads = forward(true)?.backward()?;
    let vars = map.data().lock().unwrap().clone();
    let mut trainable = Vec::new();
    for (name, var) in &vars {
        if name.ends_with("weight") || name.ends_with("bias") {
            assert!(
                grads.get(var.as_tensor()).is_some(),
                "no gradient for {name}"
            );
            trainable.push(var.clone());
        }
    }
    let mut opt = candle_nn::SGD::new(trainable, 0.1)?;
    let first = forward(true)?.to_scalar::<f32>()?;
    for _ in 0..30 {
        opt.backward_step(&forward(true)?)?;
    }
    let last = forward(true)?.to_scalar::<f32>()?;
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    Ok(())
}

#[test]
fn running_statistics_that_would_poison_evaluation_are_refused_on_load() -> Result<()> {
    let dev = Device::Cpu;
    let file = |var: &[f32], tracked: i64| -> Result<VarBuilder<'static>> {
        let mut tensors = std::collections::HashMap::new();
        tensors.insert("bn.weight".to_string(), Tensor::ones(2, DType::F32, &dev)?);
        tensors.insert("bn.bias".to_string(), Tensor::zeros(2, DType::F32, &dev)?);
        tensors.insert(
            "bn.running_mean".to_string(),
            Tensor::zeros(2, DType::F32, &dev)?,
        );
        tensors.insert("bn.running_var".to_string(), Tensor::new(var, &dev)?);
        tensors.insert(
            "bn.num_batches_tracked".to_string(),
            Tensor::new(tracked, &dev)?,
        );
        Ok(VarBuilder::from_tensors(tensors, DType::F32, &dev))
    };
    for (var, tracked, what) in [
        (
            vec![1.0, f32::NAN],
            3,
            "bn.running_var` is not finite at index 1",
        ),
        (vec![-1.0, 1.0], 3, "bn.running_var` is negative at index 0"),
        (vec![1.0, 1.0], -2, "bn.num_batches_tracked` is negative"),
    ] {
        let err = normlab_candle::batch_norm(2, 1e-5, file(&var, tracked)?.pp("bn")).unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
    let bn = normlab_candle::batch_norm(2, 1e-5, file(&[2.0, 0.5], 4)?.pp("bn"))?;
    assert_eq!(bn.num_batches_tracked().unwrap().to_scalar::<i64>()?, 4);
    Ok(())
}

//! Stateful layers: PyTorch's train/eval semantics, running statistics,
//! the three BatchNorm switches, and safetensors state dicts.

mod common;

use common::*;
use normlab::layers::prelude::*;
use normlab::layers::{
    BatchNormConfig, GroupNormConfig, InstanceNormConfig, LayerNormConfig, LocalResponseNormConfig,
    RmsNormConfig,
};
use normlab::state::{self, StateDict, StateFile};
use normlab::{Mode, Momentum, RunningVarEstimator, Tensor};

/// Per-channel (mean, unbiased var, biased var) of `[N, C, S]` data.
fn channel_stats(x: &Tensor<f64>) -> Vec<(f64, f64, f64)> {
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let s: usize = x.shape()[2..].iter().product();
    (0..c)
        .map(|ch| {
            let v: Vec<f64> = (0..n)
                .flat_map(|b| x.data()[(b * c + ch) * s..][..s].to_vec())
                .collect();
            let (mean, var) = normlab::reference::mean_var(&v);
            let m = v.len() as f64;
            (mean, var * m / (m - 1.0), var)
        })
        .collect()
}

#[test]
fn batch_norm_running_statistics_follow_pytorch() {
    let mut bn = BatchNormConfig::new(3).init::<f64>().unwrap();
    let mut expect_mean = vec![0.0; 3];
    let mut expect_var = vec![1.0; 3];
    for step in 0..4 {
        let x = normal(&mut rng(step), &[5, 3, 2], step as f64, 1.0 + step as f64);
        bn.forward(&x).unwrap();
        for (ch, (mean, unbiased, _)) in channel_stats(&x).into_iter().enumerate() {
            expect_mean[ch] = 0.9 * expect_mean[ch] + 0.1 * mean;
            expect_var[ch] = 0.9 * expect_var[ch] + 0.1 * unbiased;
        }
    }
    assert_close(
        "running_mean",
        bn.running_mean().unwrap(),
        &expect_mean,
        1e-12,
        1e-12,
    );
    assert_close(
        "running_var",
        bn.running_var().unwrap(),
        &expect_var,
        1e-12,
        1e-12,
    );
    assert_eq!(bn.num_batches_tracked(), Some(4));
}

#[test]
fn cumulative_momentum_averages_every_batch_and_biased_estimator_divides_by_m() {
    let mut bn = BatchNormConfig::new(2)
        .with_momentum(Momentum::Cumulative)
        .with_running_var(RunningVarEstimator::Biased)
        .init::<f64>()
        .unwrap();
    let batches: Vec<Tensor<f64>> = (0..5)
        .map(|i| normal(&mut rng(20 + i), &[4, 2, 3], i as f64, 2.0))
        .collect();
    for x in &batches {
        bn.forward(x).unwrap();
    }
    for ch in 0..2 {
        let mean = batches.iter().map(|x| channel_stats(x)[ch].0).sum::<f64>() / 5.0;
        let var = batches.iter().map(|x| channel_stats(x)[ch].2).sum::<f64>() / 5.0;
        assert!((bn.running_mean().unwrap()[ch] - mean).abs() < 1e-12);
        assert!((bn.running_var().unwrap()[ch] - var).abs() < 1e-12);
    }
}

#[test]
fn eval_uses_running_statistics_and_updates_nothing() {
    let mut bn = BatchNormConfig::new(2).init::<f64>().unwrap();
    bn.forward(&normal(&mut rng(1), &[8, 2], 3.0, 2.0)).unwrap();
    let state = bn.clone();
    bn.set_mode(Mode::Eval);
    let x = normal(&mut rng(2), &[1, 2], 0.0, 1.0);
    let out = bn.forward(&x).unwrap();
    assert!(!out.input_stats);
    for ch in 0..2 {
        let m = bn.running_mean().unwrap()[ch];
        let v = bn.running_var().unwrap()[ch];
        let want = (x.data()[ch] - m) / (v + 1e-5).sqrt();
        assert!((out.y.data()[ch] - want).abs() < 1e-12);
    }
    assert_eq!(bn.running_mean(), state.running_mean());
    assert_eq!(bn.num_batches_tracked(), Some(1));
    // Eval backward treats the statistics as constants: dx = γ·rstd·dy.
    let dy = Tensor::full(&[1, 2], 1.0).unwrap();
    let g = bn.backward(&x, &out, &dy).unwrap();
    for ch in 0..2 {
        let v = bn.running_var().unwrap()[ch];
        assert!((g.dx.data()[ch] - 1.0 / (v + 1e-5).sqrt()).abs() < 1e-12);
    }
}

#[test]
fn without_running_statistics_eval_uses_batch_statistics() {
    let mut bn = BatchNormConfig::new(2)
        .with_track_running_stats(false)
        .init::<f64>()
        .unwrap();
    bn.set_mode(Mode::Eval);
    let out = bn.forward(&normal(&mut rng(3), &[6, 2], 5.0, 1.0)).unwrap();
    assert!(out.input_stats);
    assert!(bn.running_mean().is_none());
}

#[test]
fn the_three_switches_are_independent() {
    let x = normal(&mut rng(4), &[6, 2, 3], 2.0, 1.5);
    // Batch statistics without updating the running ones.
    let mut bn = BatchNormConfig::new(2).init::<f64>().unwrap();
    bn.set_update_running_stats(Some(false));
    assert!(bn.forward(&x).unwrap().input_stats);
    assert_eq!(bn.num_batches_tracked(), Some(0));
    // Running statistics to normalize while updating them from the batch.
    bn.set_update_running_stats(None);
    bn.set_use_batch_stats(Some(false));
    let out = bn.forward(&x).unwrap();
    assert!(!out.input_stats);
    assert_eq!(out.saved.mean, vec![0.0, 0.0]);
    assert_eq!(bn.num_batches_tracked(), Some(1));
    // Frozen γ/β: no parameter gradients.
    bn.set_affine_trainable(false);
    let g = bn
        .backward(&x, &out, &Tensor::full(x.shape(), 1.0).unwrap())
        .unwrap();
    assert!(g.dweight.is_none() && g.dbias.is_none());
    bn.set_affine_trainable(true);
    let g = bn
        .backward(&x, &out, &Tensor::full(x.shape(), 1.0).unwrap())
        .unwrap();
    assert!(g.dweight.is_some() && g.dbias.is_some());
}

#[test]
fn instance_norm_has_the_switches_of_batch_norm() {
    let x = normal(&mut rng(4), &[3, 2, 4], 2.0, 1.5);
    let mut inorm = InstanceNormConfig::new(2)
        .with_track_running_stats(true)
        .with_affine(true)
        .init::<f64>()
        .unwrap();
    // Instance statistics without updating the running ones.
    inorm.set_update_running_stats(Some(false));
    assert!(inorm.forward(&x).unwrap().input_stats);
    assert_eq!(inorm.num_batches_tracked(), Some(0));
    assert_eq!(inorm.running_var().unwrap(), &[1.0, 1.0]);
    // Instance statistics in evaluation, which updates nothing.
    inorm.set_update_running_stats(None);
    inorm.set_mode(Mode::Eval);
    inorm.set_use_batch_stats(Some(true));
    let out = inorm.forward(&x).unwrap();
    assert!(out.input_stats && inorm.uses_batch_stats());
    assert_eq!(inorm.num_batches_tracked(), Some(0));
    // Frozen γ/β: no parameter gradients.
    inorm.set_affine_trainable(false);
    let g = inorm
        .backward(&x, &out, &Tensor::full(x.shape(), 1.0).unwrap())
        .unwrap();
    assert!(g.dweight.is_none() && g.dbias.is_none());
}

#[test]
fn zero_size_batches_leave_running_statistics_unchanged() {
    let mut bn = BatchNormConfig::new(3).init::<f32>().unwrap();
    let out = bn.forward(&Tensor::zeros(&[0, 3, 5]).unwrap()).unwrap();
    assert_eq!(out.y.shape(), &[0, 3, 5]);
    assert_eq!(bn.num_batches_tracked(), Some(0));
    assert_eq!(bn.running_var().unwrap(), &[1.0, 1.0, 1.0]);
    let mut inorm = InstanceNormConfig::new(3)
        .with_track_running_stats(true)
        .init::<f32>()
        .unwrap();
    assert_eq!(
        inorm
            .forward(&Tensor::zeros(&[0, 3, 5]).unwrap())
            .unwrap()
            .y
            .numel(),
        0
    );
    assert_eq!(inorm.num_batches_tracked(), Some(0));
}

#[test]
fn instance_norm_running_statistics_average_the_instances() {
    let mut inorm = InstanceNormConfig::new(2)
        .with_track_running_stats(true)
        .with_affine(true)
        .init::<f64>()
        .unwrap();
    let x = normal(&mut rng(5), &[3, 2, 4], 1.0, 2.0);
    inorm.forward(&x).unwrap();
    for ch in 0..2 {
        let (mut mean, mut var) = (0.0, 0.0);
        for b in 0..3 {
            let v = &x.data()[(b * 2 + ch) * 4..][..4];
            let (m, biased) = normlab::reference::mean_var(v);
            mean += m / 3.0;
            var += biased * 4.0 / 3.0 / 3.0;
        }
        assert!((inorm.running_mean().unwrap()[ch] - 0.1 * mean).abs() < 1e-12);
        assert!((inorm.running_var().unwrap()[ch] - (0.9 + 0.1 * var)).abs() < 1e-12);
    }
    inorm.set_mode(Mode::Eval);
    let out = inorm.forward(&x).unwrap();
    assert!(!out.input_stats);
    assert_eq!(out.saved.mean.len(), 2);
}

#[test]
fn layers_match_their_functional_forms() {
    let x = normal(&mut rng(6), &[2, 4, 3], 0.5, 1.0);
    let ln = LayerNormConfig::new(&[4, 3]).init::<f64>().unwrap();
    let (y, _) = normlab::kernels::layer_norm::layer_norm(&x, 1, None, None, 1e-5.into()).unwrap();
    assert_eq!(ln.forward(&x).unwrap().y, y);
    let ln = LayerNormConfig::new(&[3])
        .with_bias(false)
        .init::<f64>()
        .unwrap();
    assert!(ln.bias().is_none() && ln.weight().is_some());
    let out = ln.forward(&x).unwrap();
    let g = ln
        .backward(&x, &out, &Tensor::full(x.shape(), 1.0).unwrap())
        .unwrap();
    assert!(g.dbias.is_none() && g.dweight.is_some());
    let gn = GroupNormConfig::new(2, 4).init::<f64>().unwrap();
    let (y, _) = normlab::kernels::group_norm::group_norm(&x, 2, None, None, 1e-5.into()).unwrap();
    assert_eq!(gn.forward(&x).unwrap().y, y);
    let rms = RmsNormConfig::new(&[3]).init::<f32>().unwrap();
    assert_eq!(rms.eps().value, f32::EPSILON as f64);
    let lrn = LocalResponseNormConfig::new(2).init().unwrap();
    let y = lrn.forward(&x).unwrap();
    assert_eq!(
        y,
        normlab::kernels::lrn::lrn(&x, &normlab::LrnOptions::new(2)).unwrap()
    );
}

#[test]
fn state_dict_round_trip_restores_identical_outputs() {
    let mut bn = BatchNormConfig::new(3).init::<f32>().unwrap();
    for i in 0..3 {
        bn.forward(&normal(&mut rng(30 + i), &[4, 3, 2], 1.0, 2.0).cast())
            .unwrap();
    }
    bn.weight_mut().unwrap().data_mut()[1] = 2.5;
    bn.bias_mut().unwrap().data_mut()[2] = -0.5;
    let ln = LayerNormConfig::new(&[2]).init::<f32>().unwrap();
    let bytes = state::to_bytes::<f32>(&[("features.1", &bn), ("head.norm", &ln)]).unwrap();
    let file = StateFile::from_bytes(bytes).unwrap();
    assert_eq!(
        file.names(),
        [
            "features.1.bias",
            "features.1.num_batches_tracked",
            "features.1.running_mean",
            "features.1.running_var",
            "features.1.weight",
            "head.norm.bias",
            "head.norm.weight",
        ]
    );
    let mut restored = BatchNormConfig::new(3).init::<f32>().unwrap();
    file.load("features.1", &mut restored).unwrap();
    assert_eq!(restored.state_dict(), bn.state_dict());
    bn.set_mode(Mode::Eval);
    restored.set_mode(Mode::Eval);
    let x: Tensor<f32> = normal(&mut rng(40), &[2, 3, 2], 0.0, 1.0).cast();
    assert_eq!(bn.forward(&x).unwrap().y, restored.forward(&x).unwrap().y);
    // Loading into a layer of another size names the tensor and both shapes.
    let mut wrong = BatchNormConfig::new(4).init::<f32>().unwrap();
    let err = file.load("features.1", &mut wrong).unwrap_err().to_string();
    assert!(
        err.contains("features.1.weight") && err.contains("[3]") && err.contains("[4]"),
        "{err}"
    );
    let err = file.load("missing", &mut wrong).unwrap_err().to_string();
    assert!(err.contains("missing tensor `missing.weight`"), "{err}");
}

/// Writes a file as `safetensors.torch.save_file(model.state_dict())` does:
/// float16 parameters and an int64 scalar counter.
#[test]
fn pytorch_state_dicts_load_as_is() {
    use safetensors::tensor::{Dtype, TensorView};
    let f16 = |v: &[f32]| {
        v.iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let weight = f16(&[1.5, 0.5]);
    let bias = f16(&[0.25, -1.0]);
    let mean = f16(&[3.0, -2.0]);
    let var = f16(&[4.0, 0.25]);
    let count = 7i64.to_le_bytes();
    let entries = vec![
        (
            "bn.weight",
            TensorView::new(Dtype::F16, vec![2], &weight).unwrap(),
        ),
        (
            "bn.bias",
            TensorView::new(Dtype::F16, vec![2], &bias).unwrap(),
        ),
        (
            "bn.running_mean",
            TensorView::new(Dtype::F16, vec![2], &mean).unwrap(),
        ),
        (
            "bn.running_var",
            TensorView::new(Dtype::F16, vec![2], &var).unwrap(),
        ),
        (
            "bn.num_batches_tracked",
            TensorView::new(Dtype::I64, vec![], &count).unwrap(),
        ),
    ];
    let bytes = safetensors::serialize(entries, None).unwrap();
    let dir = std::env::temp_dir().join(format!("normlab-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("torch.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let mut bn = BatchNormConfig::new(2).init::<f32>().unwrap();
    StateFile::read(&path).unwrap().load("bn", &mut bn).unwrap();
    assert_eq!(bn.weight().unwrap().data(), &[1.5, 0.5]);
    assert_eq!(bn.running_mean().unwrap(), &[3.0, -2.0]);
    assert_eq!(bn.running_var().unwrap(), &[4.0, 0.25]);
    assert_eq!(bn.num_batches_tracked(), Some(7));
    // And a layer's own file round-trips through disk.
    let out = dir.join("ours.safetensors");
    state::save::<f32>(&out, &[("bn", &bn)]).unwrap();
    let mut again = BatchNormConfig::new(2).init::<f32>().unwrap();
    StateFile::read(&out)
        .unwrap()
        .load("bn", &mut again)
        .unwrap();
    assert_eq!(again.state_dict(), bn.state_dict());
    let err = StateFile::read(dir.join("absent.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

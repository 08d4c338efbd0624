//! Forward + backward time of normlab-candle's layers against candle-nn's
//! differentiable paths, side by side in one process (medians).
//!
//!     cargo run --release -p normlab-candle --example speed
//!
//! LayerNorm on [4096, 1024] (candle-nn: `ops::layer_norm_slow`, since its
//! fused `layer_norm` has no backward), BatchNorm in training and
//! GroupNorm(32) on [32, 64, 28, 28] (candle-nn: `BatchNorm::forward_t(_, true)`,
//! `GroupNorm`). Each step: forward, `sum(y·r)`, backward.

use std::time::Instant;

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

fn median_ms(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut times = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn step(y: Tensor, r: &Tensor) -> Result<()> {
    let grads = (y * r)?.sum_all()?.backward()?;
    std::hint::black_box(grads);
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    println!("| layer, shape | candle-nn fwd+bwd ms | normlab-candle fwd+bwd ms | speedup |");
    println!("|---|---|---|---|");
    let report = |name: &str, theirs: f64, ours: f64| {
        println!(
            "| {name} | {theirs:.2} | {ours:.2} | {:.1}× |",
            theirs / ours
        );
    };

    // LayerNorm [4096, 1024].
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4096, 1024), &dev)?)?;
    let r = Tensor::randn(0f32, 1.0, (4096, 1024), &dev)?;
    let w = Var::from_tensor(&Tensor::ones(1024, DType::F32, &dev)?)?;
    let b = Var::from_tensor(&Tensor::zeros(1024, DType::F32, &dev)?)?;
    let theirs = median_ms(|| {
        step(
            candle_nn::ops::layer_norm_slow(x.as_tensor(), &w, &b, 1e-5)?,
            &r,
        )
    })?;
    let ours = median_ms(|| {
        step(
            normlab_candle::ops::layer_norm(x.as_tensor(), Some(&w), Some(&b), 1e-5)?,
            &r,
        )
    })?;
    report("LayerNorm [4096, 1024]", theirs, ours);

    // BatchNorm (train) and GroupNorm(32) on [32, 64, 28, 28].
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (32, 64, 28, 28), &dev)?)?;
    let r = Tensor::randn(0f32, 1.0, (32, 64, 28, 28), &dev)?;
    let (m1, m2) = (VarMap::new(), VarMap::new());
    let vb = |m: &VarMap| VarBuilder::from_varmap(m, DType::F32, &dev);
    let bn_theirs = candle_nn::batch_norm(64, 1e-5, vb(&m1))?;
    let bn_ours = normlab_candle::batch_norm(64, 1e-5, vb(&m2))?;
    let theirs = median_ms(|| step(bn_theirs.forward_t(x.as_tensor(), true)?, &r))?;
    let ours = median_ms(|| step(bn_ours.forward_t(x.as_tensor(), true)?, &r))?;
    report("BatchNorm train [32, 64, 28, 28]", theirs, ours);

    let (m1, m2) = (VarMap::new(), VarMap::new());
    let gn_theirs = candle_nn::group_norm(32, 64, 1e-5, vb(&m1))?;
    let gn_ours = normlab_candle::group_norm(32, 64, 1e-5, vb(&m2))?;
    let theirs = median_ms(|| step(gn_theirs.forward(x.as_tensor())?, &r))?;
    let ours = median_ms(|| step(gn_ours.forward(x.as_tensor())?, &r))?;
    report("GroupNorm(32) [32, 64, 28, 28]", theirs, ours);
    Ok(())
}

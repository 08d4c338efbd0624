//! The bench suite: the cases `normlab bench` and the criterion benches time.
//!
//! f32, weight and bias present (LRN has none), ε = 1e-5; BatchNorm momentum
//! 0.1; LRN size 5, α = 1e-4, β = 0.75, k = 2. Each case times three things:
//! - `fwd`: the allocating forward (a fresh output, as PyTorch's functional call);
//! - `fwd_into`: the forward into a preallocated output;
//! - `bwd`: dx, dweight, dbias from the saved statistics, freshly allocated.
//!
//! Bandwidth counts the bytes that must move: forward reads x and writes y,
//! backward reads x and dy and writes dx.

use std::time::{Duration, Instant};

use normlab::kernels::batch_norm::{
    self, batch_norm, batch_norm_backward, BatchNormOptions, RunningStatsMut,
};
use normlab::kernels::group_norm::{self, group_norm, group_norm_backward, GroupLayout};
use normlab::kernels::layer_norm::{self, layer_norm, layer_norm_backward};
use normlab::kernels::lrn::{self, lrn, lrn_backward, LrnOptions};
use normlab::kernels::rms_norm::{self, rms_norm, rms_norm_backward};
use normlab::kernels::NcsLayout;
use normlab::{Epsilon, Saved, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde::Serialize;

/// Which operation a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// LayerNorm over the last dimension.
    LayerNorm,
    /// RMSNorm over the last dimension.
    RmsNorm,
    /// BatchNorm with batch statistics and a running-statistics update.
    BatchNormTrain,
    /// BatchNorm with running statistics.
    BatchNormEval,
    /// GroupNorm with this many groups.
    GroupNorm(usize),
    /// InstanceNorm with input statistics.
    InstanceNorm,
    /// LRN across channels, size 5.
    Lrn,
}

/// One case of the suite.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// Its name, e.g. `layer_norm 8192x1024`.
    pub name: String,
    /// The operation.
    pub op: Op,
    /// The input shape.
    pub shape: Vec<usize>,
}

/// Every case, in the suite's order.
pub fn suite() -> Vec<Case> {
    let case = |prefix: &str, op, shape: &[usize]| Case {
        name: format!(
            "{prefix} {}",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x")
        ),
        op,
        shape: shape.to_vec(),
    };
    vec![
        case("layer_norm", Op::LayerNorm, &[8192, 1024]),
        case("layer_norm", Op::LayerNorm, &[16384, 4096]),
        case("rms_norm", Op::RmsNorm, &[8192, 1024]),
        case("rms_norm", Op::RmsNorm, &[16384, 4096]),
        case("batch_norm_train", Op::BatchNormTrain, &[32, 64, 56, 56]),
        case("batch_norm_eval", Op::BatchNormEval, &[32, 64, 56, 56]),
        case("batch_norm_train", Op::BatchNormTrain, &[64, 256, 28, 28]),
        case("group_norm_g32", Op::GroupNorm(32), &[32, 64, 56, 56]),
        case("group_norm_g32", Op::GroupNorm(32), &[64, 256, 28, 28]),
        case("instance_norm", Op::InstanceNorm, &[32, 64, 56, 56]),
        case("lrn_n5", Op::Lrn, &[32, 96, 55, 55]),
    ]
}

const EPS: f64 = 1e-5;

fn lrn_options() -> LrnOptions {
    LrnOptions {
        alpha: 1e-4,
        beta: 0.75,
        k: 2.0,
        ..LrnOptions::new(5)
    }
}

/// A case with its inputs and buffers allocated.
pub struct Prepared {
    case: Case,
    x: Tensor<f32>,
    dy: Tensor<f32>,
    weight: Tensor<f32>,
    bias: Tensor<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    num_batches_tracked: i64,
    y: Vec<f32>,
    saved: Saved,
}

fn normal(rng: &mut StdRng, shape: &[usize]) -> Tensor<f32> {
    let n = shape.iter().product();
    Tensor::new(
        shape.to_vec(),
        (0..n)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect(),
    )
    .expect("length matches shape")
}

impl Prepared {
    /// Draws seeded inputs for `case` and runs its forward once (to fill the saved statistics).
    pub fn new(case: &Case) -> anyhow::Result<Self> {
        let mut rng = StdRng::seed_from_u64(0);
        let features = match case.op {
            Op::LayerNorm | Op::RmsNorm => case.shape[case.shape.len() - 1],
            _ => case.shape[1],
        };
        let mut p = Prepared {
            case: case.clone(),
            x: normal(&mut rng, &case.shape),
            dy: normal(&mut rng, &case.shape),
            weight: normal(&mut rng, &[features]),
            bias: normal(&mut rng, &[features]),
            running_mean: vec![0.0; features],
            running_var: vec![1.0; features],
            num_batches_tracked: 0,
            y: vec![0.0; case.shape.iter().product()],
            saved: Saved::default(),
        };
        p.saved = p.forward()?;
        Ok(p)
    }

    /// The case.
    pub fn case(&self) -> &Case {
        &self.case
    }

    /// Bytes a forward must move: read x, write y.
    pub fn forward_bytes(&self) -> f64 {
        2.0 * 4.0 * self.x.numel() as f64
    }

    /// Bytes a backward must move: read x and dy, write dx.
    pub fn backward_bytes(&self) -> f64 {
        3.0 * 4.0 * self.x.numel() as f64
    }

    fn ncs(&self) -> NcsLayout {
        NcsLayout::of("bench", self.x.shape(), 2).expect("bench shapes are [N, C, *]")
    }

    /// The allocating forward; returns the saved statistics.
    pub fn forward(&mut self) -> anyhow::Result<Saved> {
        let Prepared {
            case,
            x,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            ..
        } = self;
        let (w, b) = (Some(&*weight), Some(&*bias));
        let (y, saved) = match case.op {
            Op::LayerNorm => layer_norm(x, -1, w, b, EPS.into())?,
            Op::RmsNorm => rms_norm(x, -1, w, EPS.into())?,
            Op::BatchNormTrain | Op::BatchNormEval => {
                let options = if case.op == Op::BatchNormTrain {
                    BatchNormOptions::training()
                } else {
                    BatchNormOptions::eval()
                };
                let running = RunningStatsMut {
                    mean: running_mean,
                    var: running_var,
                    num_batches_tracked,
                };
                batch_norm(x, Some(running), w, b, &options)?
            }
            Op::GroupNorm(g) => group_norm(x, g, w, b, EPS.into())?,
            Op::InstanceNorm => group_norm(x, x.shape()[1], w, b, EPS.into())?,
            Op::Lrn => (lrn(x, &lrn_options())?, Saved::default()),
        };
        std::hint::black_box(y);
        Ok(saved)
    }

    /// The forward into the preallocated output.
    pub fn forward_into(&mut self) -> anyhow::Result<()> {
        let eps = Epsilon::from(EPS);
        let (x, w, b) = (
            self.x.data(),
            Some(self.weight.data()),
            Some(self.bias.data()),
        );
        let shape = self.x.shape().to_vec();
        match self.case.op {
            Op::LayerNorm | Op::RmsNorm => {
                let n = shape[shape.len() - 1];
                let rows = x.len() / n;
                if self.saved.mean.len() != rows {
                    self.saved = Saved::zeros("bench", rows)?;
                }
                if self.case.op == Op::LayerNorm {
                    layer_norm::forward_rows(x, rows, n, w, b, &eps, &mut self.y, &mut self.saved)?;
                } else {
                    rms_norm::forward_rows(x, rows, n, w, &eps, &mut self.y, &mut self.saved)?;
                }
            }
            Op::BatchNormTrain => {
                let layout = self.ncs();
                let moments = batch_norm::forward_train(x, layout, w, b, &eps, &mut self.y)?;
                let mean: Vec<f64> = moments.iter().map(|m| m.mean).collect();
                let var: Vec<f64> = moments.iter().map(|m| m.var(1)).collect();
                let momentum = BatchNormOptions::training().momentum;
                let running = RunningStatsMut {
                    mean: &mut self.running_mean,
                    var: &mut self.running_var,
                    num_batches_tracked: &mut self.num_batches_tracked,
                };
                batch_norm::update_running("batch_norm", running, &mean, &var, momentum)?;
            }
            Op::BatchNormEval => {
                let layout = self.ncs();
                let saved = Saved {
                    mean: self.running_mean.iter().map(|&m| m as f64).collect(),
                    rstd: self
                        .running_var
                        .iter()
                        .map(|&v| eps.rstd(v as f64))
                        .collect(),
                };
                batch_norm::normalize(x, layout, &saved, w, b, &mut self.y)?;
            }
            Op::GroupNorm(_) | Op::InstanceNorm => {
                let ncs = self.ncs();
                let groups = if let Op::GroupNorm(g) = self.case.op {
                    g
                } else {
                    ncs.c
                };
                let layout = GroupLayout::new("bench", ncs, groups, &shape)?;
                if self.saved.mean.len() != ncs.n * groups {
                    self.saved = Saved::zeros("bench", ncs.n * groups)?;
                }
                group_norm::forward(x, layout, w, b, &eps, &mut self.y, &mut self.saved)?;
            }
            Op::Lrn => lrn::forward(x, &shape, &lrn_options(), &mut self.y)?,
        }
        std::hint::black_box(&self.y);
        Ok(())
    }

    /// The allocating backward from the saved statistics.
    pub fn backward(&self) -> anyhow::Result<()> {
        let (x, dy, w) = (&self.x, &self.dy, Some(&self.weight));
        let eps = Epsilon::from(EPS);
        let grads = match self.case.op {
            Op::LayerNorm => layer_norm_backward(x, dy, -1, w, true, eps, &self.saved)?,
            Op::RmsNorm => rms_norm_backward(x, dy, -1, w, eps, &self.saved)?,
            Op::BatchNormTrain => batch_norm_backward(x, dy, w, true, eps, &self.saved, true)?,
            Op::BatchNormEval => batch_norm_backward(x, dy, w, true, eps, &self.saved, false)?,
            Op::GroupNorm(g) => group_norm_backward(x, dy, g, w, true, eps, &self.saved)?,
            Op::InstanceNorm => {
                group_norm_backward(x, dy, x.shape()[1], w, true, eps, &self.saved)?
            }
            Op::Lrn => normlab::Grads {
                dx: lrn_backward(x, dy, &lrn_options())?,
                dweight: None,
                dbias: None,
            },
        };
        std::hint::black_box(grads);
        Ok(())
    }
}

/// Median of `runs` timed calls of `f` after `warmup` untimed ones.
pub fn median(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// One case's measurements.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// Case name.
    pub case: String,
    /// Median allocating forward, ms.
    pub fwd_ms: f64,
    /// Median forward into a preallocated output, ms.
    pub fwd_into_ms: f64,
    /// Median allocating backward, ms.
    pub bwd_ms: f64,
    /// Forward bandwidth (of `fwd_into`), GB/s.
    pub fwd_gbps: f64,
    /// Backward bandwidth, GB/s.
    pub bwd_gbps: f64,
}

/// Times one case.
pub fn measure(case: &Case, runs: usize) -> anyhow::Result<Measurement> {
    let mut p = Prepared::new(case)?;
    let fwd = median(2, runs, || p.forward().map(drop))?;
    let fwd_into = median(2, runs, || p.forward_into())?;
    let bwd = median(2, runs, || p.backward())?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(Measurement {
        case: case.name.clone(),
        fwd_ms: ms(fwd),
        fwd_into_ms: ms(fwd_into),
        bwd_ms: ms(bwd),
        fwd_gbps: p.forward_bytes() / fwd_into.as_secs_f64() / 1e9,
        bwd_gbps: p.backward_bytes() / bwd.as_secs_f64() / 1e9,
    })
}

/// The machine's copy bandwidth in GB/s (bytes read plus written), from a
/// parallel copy of 256 MiB, median of `runs`.
pub fn copy_bandwidth(runs: usize) -> anyhow::Result<f64> {
    use rayon::prelude::*;
    let n = 256 << 20 >> 2;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    // Same chunking as the kernels' tasks: enough pieces for every thread.
    let chunk = n / 64;
    let t = median(2, runs, || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        std::hint::black_box(&dst);
        Ok(())
    })?;
    Ok(2.0 * (n * 4) as f64 / t.as_secs_f64() / 1e9)
}

//! The bench suites: the cases `normlab bench` and the criterion benches time.
//!
//! Three kernel suites (`--suite`), and a fourth of training steps
//! (`training`, in [`crate::lab::step_bench`]):
//! - `default`: eleven large cases, one per op and layout;
//! - `models`: shapes taken from real model families, each case named after
//!   its family: decoder-LLM RMSNorm (hidden sizes 2048–8192 at 1, 8 and 2048
//!   tokens), BERT and ViT LayerNorm, ResNet-50 BatchNorm at every stage in
//!   training and for single-image inference, BatchNorm1d in MLPs,
//!   Stable-Diffusion UNet GroupNorm(32), InstanceNorm in style transfer;
//! - `fused`: the cases of both whose op has a fused form with an
//!   activation (LayerNorm, BatchNorm, GroupNorm), each timed fused
//!   (`batch_norm_act`, …) and as the unfused pair (the op, then
//!   `activation`; backward `activation_backward`, then the op's backward),
//!   see [`measure_fused`].
//!
//! Each runs in f32, bf16 or f16 (`--dtype`; weight, bias and running
//! statistics in the same type, as PyTorch's functional calls). Weight and
//! bias present (LRN has none), ε = 1e-5; BatchNorm momentum 0.1; LRN size
//! 5, α = 1e-4, β = 0.75, k = 2. Each case times three things:
//! - `fwd`: the allocating forward (a fresh output, as PyTorch's functional call);
//! - `fwd_into`: the forward into a preallocated output;
//! - `bwd`: dx, dweight, dbias from the saved statistics, freshly allocated.
//!
//! Bandwidth counts the bytes that must move, in the storage type: forward
//! reads x and writes y, backward reads x and dy and writes dx.

use std::time::{Duration, Instant};

use normlab::kernels::activation::{activation, activation_backward};
use normlab::kernels::batch_norm::{
    self, batch_norm, batch_norm_backward, BatchNormOptions, RunningStatsMut,
};
use normlab::kernels::group_norm::{self, group_norm, group_norm_backward, GroupLayout};
use normlab::kernels::lrn::{self, lrn, lrn_backward, LrnOptions};
use normlab::kernels::rows::{self, layer_norm, layer_norm_backward, rms_norm, rms_norm_backward};
use normlab::kernels::NcsLayout;
use normlab::{Activation, Epsilon, Float, Saved, Tensor};
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

impl Op {
    /// The name's first word (`group_norm_g32`, …), as PyTorch timing scripts parse it.
    pub fn prefix(self) -> String {
        match self {
            Op::LayerNorm => "layer_norm".into(),
            Op::RmsNorm => "rms_norm".into(),
            Op::BatchNormTrain => "batch_norm_train".into(),
            Op::BatchNormEval => "batch_norm_eval".into(),
            Op::GroupNorm(g) => format!("group_norm_g{g}"),
            Op::InstanceNorm => "instance_norm".into(),
            Op::Lrn => "lrn_n5".into(),
        }
    }
}

/// One case of a suite.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// Its name, `<op> <shape>` and for the models suite the model family,
    /// e.g. `layer_norm 8192x1024` or `layer_norm 64x197x768 vit-b16`.
    pub name: String,
    /// The operation.
    pub op: Op,
    /// The input shape.
    pub shape: Vec<usize>,
}

impl Case {
    fn new(op: Op, shape: &[usize], family: Option<&str>) -> Self {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let mut name = format!("{} {}", op.prefix(), dims.join("x"));
        if let Some(family) = family {
            name.push(' ');
            name.push_str(family);
        }
        Case {
            name,
            op,
            shape: shape.to_vec(),
        }
    }
}

/// A bench suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// Eleven large cases, one per op and layout.
    Default,
    /// Shapes of real model families.
    Models,
    /// The cases of `default` and `models` with a fused activation, fused
    /// against the unfused pair.
    Fused,
    /// Optimizer steps of the lab's networks ([`crate::lab::step_bench`]).
    Training,
}

/// The default suite, in order.
pub fn suite() -> Vec<Case> {
    cases(Suite::Default)
}

/// Every case of `suite`, in order.
pub fn cases(suite: Suite) -> Vec<Case> {
    match suite {
        Suite::Default => default_cases(),
        Suite::Models => model_cases(),
        Suite::Fused => default_cases()
            .into_iter()
            .chain(model_cases())
            .filter(|c| {
                matches!(
                    c.op,
                    Op::LayerNorm | Op::BatchNormTrain | Op::BatchNormEval | Op::GroupNorm(_)
                )
            })
            .collect(),
        // Not kernel cases: `lab::step_bench::cases` lists them.
        Suite::Training => Vec::new(),
    }
}

fn default_cases() -> Vec<Case> {
    let case = |op, shape: &[usize]| Case::new(op, shape, None);
    vec![
        case(Op::LayerNorm, &[8192, 1024]),
        case(Op::LayerNorm, &[16384, 4096]),
        case(Op::RmsNorm, &[8192, 1024]),
        case(Op::RmsNorm, &[16384, 4096]),
        case(Op::BatchNormTrain, &[32, 64, 56, 56]),
        case(Op::BatchNormEval, &[32, 64, 56, 56]),
        case(Op::BatchNormTrain, &[64, 256, 28, 28]),
        case(Op::GroupNorm(32), &[32, 64, 56, 56]),
        case(Op::GroupNorm(32), &[64, 256, 28, 28]),
        case(Op::InstanceNorm, &[32, 64, 56, 56]),
        case(Op::Lrn, &[32, 96, 55, 55]),
    ]
}

/// Shapes of real models: activations as those models produce them (batch
/// sizes of common training and serving set-ups).
fn model_cases() -> Vec<Case> {
    let case = |op, shape: &[usize], family: &str| Case::new(op, shape, Some(family));
    use Op::*;
    vec![
        // Decoder LLMs, RMSNorm over the hidden size: decoding 1 and 8
        // tokens, and a 2048-token prefill (Llama 3.2 1B: 2048; Llama 2 7B:
        // 4096; Llama 2 70B: 8192).
        case(RmsNorm, &[1, 2048], "llama3.2-1b-decode"),
        case(RmsNorm, &[8, 2048], "llama3.2-1b-decode8"),
        case(RmsNorm, &[2048, 2048], "llama3.2-1b-prefill"),
        case(RmsNorm, &[1, 4096], "llama2-7b-decode"),
        case(RmsNorm, &[8, 4096], "llama2-7b-decode8"),
        case(RmsNorm, &[2048, 4096], "llama2-7b-prefill"),
        case(RmsNorm, &[1, 8192], "llama2-70b-decode"),
        case(RmsNorm, &[8, 8192], "llama2-70b-decode8"),
        case(RmsNorm, &[2048, 8192], "llama2-70b-prefill"),
        // Encoders, LayerNorm over the hidden size: BERT at 8 × 512 tokens,
        // ViT at 197 tokens per 224² image.
        case(LayerNorm, &[8, 512, 768], "bert-base"),
        case(LayerNorm, &[8, 512, 1024], "bert-large"),
        case(LayerNorm, &[1, 197, 768], "vit-b16-1image"),
        case(LayerNorm, &[64, 197, 768], "vit-b16"),
        case(LayerNorm, &[32, 197, 1024], "vit-l16"),
        // ResNet-50 BatchNorm2d, batch 32 in training: stem, then each
        // stage's narrow and wide channels.
        case(BatchNormTrain, &[32, 64, 112, 112], "resnet50-stem"),
        case(BatchNormTrain, &[32, 64, 56, 56], "resnet50-stage1"),
        case(BatchNormTrain, &[32, 256, 56, 56], "resnet50-stage1-out"),
        case(BatchNormTrain, &[32, 128, 28, 28], "resnet50-stage2"),
        case(BatchNormTrain, &[32, 512, 28, 28], "resnet50-stage2-out"),
        case(BatchNormTrain, &[32, 256, 14, 14], "resnet50-stage3"),
        case(BatchNormTrain, &[32, 1024, 14, 14], "resnet50-stage3-out"),
        case(BatchNormTrain, &[32, 512, 7, 7], "resnet50-stage4"),
        case(BatchNormTrain, &[32, 2048, 7, 7], "resnet50-stage4-out"),
        // ResNet-50 at inference, one image and a batch of 32.
        case(BatchNormEval, &[1, 64, 112, 112], "resnet50-stem-1image"),
        case(BatchNormEval, &[1, 256, 56, 56], "resnet50-stage1-1image"),
        case(BatchNormEval, &[1, 1024, 14, 14], "resnet50-stage3-1image"),
        case(BatchNormEval, &[1, 2048, 7, 7], "resnet50-stage4-1image"),
        case(BatchNormEval, &[32, 2048, 7, 7], "resnet50-stage4-serve"),
        // BatchNorm1d in MLPs (tabular models, recommendation towers).
        case(BatchNormTrain, &[256, 512], "mlp-bn1d"),
        case(BatchNormTrain, &[1024, 1024], "mlp-bn1d-wide"),
        case(BatchNormTrain, &[64, 4096], "mlp-bn1d-4096"),
        case(BatchNormEval, &[256, 512], "mlp-bn1d-eval"),
        // Stable Diffusion 1.5 UNet at 512² (64² latents), batch 2
        // (classifier-free guidance): GroupNorm(32) at every resolution.
        case(GroupNorm(32), &[2, 320, 64, 64], "sd-unet-64"),
        case(GroupNorm(32), &[2, 640, 32, 32], "sd-unet-32"),
        case(GroupNorm(32), &[2, 1280, 16, 16], "sd-unet-16"),
        case(GroupNorm(32), &[2, 1280, 8, 8], "sd-unet-8"),
        // Fast style transfer (Johnson et al.) at 256², batch 4.
        case(InstanceNorm, &[4, 32, 256, 256], "style-transfer-c1"),
        case(InstanceNorm, &[4, 64, 128, 128], "style-transfer-c2"),
        case(InstanceNorm, &[4, 128, 64, 64], "style-transfer-res"),
    ]
}

/// The element type a case runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    /// float32.
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

impl Dtype {
    /// PyTorch's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => f32::NAME,
            Dtype::Bf16 => half::bf16::NAME,
            Dtype::F16 => half::f16::NAME,
        }
    }
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

/// A case with its inputs and buffers allocated, in element type `T`.
pub struct Prepared<T: Float = f32> {
    case: Case,
    x: Tensor<T>,
    dy: Tensor<T>,
    weight: Tensor<T>,
    bias: Tensor<T>,
    running_mean: Vec<T>,
    running_var: Vec<T>,
    num_batches_tracked: i64,
    y: Vec<T>,
    saved: Saved,
}

fn normal<T: Float>(rng: &mut StdRng, shape: &[usize]) -> Tensor<T> {
    let n = shape.iter().product();
    Tensor::new(
        shape.to_vec(),
        (0..n)
            .map(|_| T::from_f64(rng.sample::<f32, _>(StandardNormal) as f64))
            .collect(),
    )
    .expect("length matches shape")
}

impl<T: Float> Prepared<T> {
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
            running_mean: vec![T::from_f64(0.0); features],
            running_var: vec![T::from_f64(1.0); features],
            num_batches_tracked: 0,
            y: vec![T::default(); case.shape.iter().product()],
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
        2.0 * std::mem::size_of::<T>() as f64 * self.x.numel() as f64
    }

    /// Bytes a backward must move: read x and dy, write dx.
    pub fn backward_bytes(&self) -> f64 {
        3.0 * std::mem::size_of::<T>() as f64 * self.x.numel() as f64
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
                let (norm, b) = if self.case.op == Op::LayerNorm {
                    (rows::RowNorm::LayerNorm, b)
                } else {
                    (rows::RowNorm::RmsNorm, None)
                };
                rows::forward(norm, x, rows, n, w, b, &eps, &mut self.y, &mut self.saved)?;
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
                    mean: self.running_mean.iter().map(|m| m.to_f64()).collect(),
                    rstd: self
                        .running_var
                        .iter()
                        .map(|v| eps.rstd(v.to_f64()))
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
    /// Element type (PyTorch's name).
    pub dtype: &'static str,
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

/// Times one case in `dtype`.
pub fn measure(case: &Case, dtype: Dtype, runs: usize) -> anyhow::Result<Measurement> {
    match dtype {
        Dtype::F32 => measure_in::<f32>(case, dtype, runs),
        Dtype::Bf16 => measure_in::<half::bf16>(case, dtype, runs),
        Dtype::F16 => measure_in::<half::f16>(case, dtype, runs),
    }
}

fn measure_in<T: Float>(case: &Case, dtype: Dtype, runs: usize) -> anyhow::Result<Measurement> {
    let mut p = Prepared::<T>::new(case)?;
    let fwd = median(2, runs, || p.forward().map(drop))?;
    let fwd_into = median(2, runs, || p.forward_into())?;
    let bwd = median(2, runs, || p.backward())?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(Measurement {
        case: case.name.clone(),
        dtype: dtype.name(),
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

/// One case of the fused suite: medians of the op followed by an
/// activation, fused and as the unfused pair, each allocating its outputs.
#[derive(Clone, Debug, Serialize)]
pub struct FusedMeasurement {
    /// Case name.
    pub case: String,
    /// Element type (PyTorch's name).
    pub dtype: &'static str,
    /// The activation (`relu`, `tanh`, `sigmoid`).
    pub activation: &'static str,
    /// Fused forward (`batch_norm_act`, …), ms.
    pub fused_fwd_ms: f64,
    /// The op's forward, then `activation`, ms.
    pub unfused_fwd_ms: f64,
    /// Fused backward (`batch_norm_act_backward`, …), ms.
    pub fused_bwd_ms: f64,
    /// `activation_backward`, then the op's backward, ms.
    pub unfused_bwd_ms: f64,
}

impl<T: Float> Prepared<T> {
    /// The forward followed by `act`: fused, or the op then [`activation`].
    /// Returns the activation's output.
    fn forward_act(&mut self, act: Activation, fused: bool) -> anyhow::Result<Tensor<T>> {
        use normlab::kernels::layer_norm::layer_norm_act;
        use normlab::kernels::{batch_norm::batch_norm_act, group_norm::group_norm_act};
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
        let eps = Epsilon::from(EPS);
        let running = RunningStatsMut {
            mean: running_mean,
            var: running_var,
            num_batches_tracked,
        };
        let options = match case.op {
            Op::BatchNormTrain => BatchNormOptions::training(),
            _ => BatchNormOptions::eval(),
        };
        let y = match (case.op, fused) {
            (Op::LayerNorm, true) => layer_norm_act(x, -1, w, b, eps, act)?.0,
            (Op::LayerNorm, false) => activation(&layer_norm(x, -1, w, b, eps)?.0, act)?,
            (Op::BatchNormTrain | Op::BatchNormEval, true) => {
                batch_norm_act(x, Some(running), w, b, &options, act)?.0
            }
            (Op::BatchNormTrain | Op::BatchNormEval, false) => {
                activation(&batch_norm(x, Some(running), w, b, &options)?.0, act)?
            }
            (Op::GroupNorm(g), true) => group_norm_act(x, g, w, b, eps, act)?.0,
            (Op::GroupNorm(g), false) => activation(&group_norm(x, g, w, b, eps)?.0, act)?,
            (op, _) => anyhow::bail!("{op:?} has no fused form"),
        };
        Ok(y)
    }

    /// The backward through `act` and the op from the saved statistics and
    /// the activation's output `y`: fused, or [`activation_backward`] then
    /// the op's backward.
    fn backward_act(&self, y: &Tensor<T>, act: Activation, fused: bool) -> anyhow::Result<()> {
        use normlab::kernels::batch_norm::batch_norm_act_backward;
        use normlab::kernels::group_norm::group_norm_act_backward;
        use normlab::kernels::layer_norm::layer_norm_act_backward;
        let (x, w, b) = (&self.x, Some(&self.weight), Some(&self.bias));
        let (eps, saved) = (Epsilon::from(EPS), &self.saved);
        let train = self.case.op == Op::BatchNormTrain;
        let grads = if fused {
            let dy = &self.dy;
            match self.case.op {
                Op::LayerNorm => {
                    layer_norm_act_backward(x, Some(y), dy, -1, w, b, act, eps, saved)?
                }
                Op::GroupNorm(g) => {
                    group_norm_act_backward(x, Some(y), dy, g, w, b, act, eps, saved)?
                }
                _ => batch_norm_act_backward(x, Some(y), dy, w, b, act, eps, saved, train)?,
            }
        } else {
            let dz = activation_backward(y, &self.dy, act)?;
            match self.case.op {
                Op::LayerNorm => layer_norm_backward(x, &dz, -1, w, true, eps, saved)?,
                Op::GroupNorm(g) => group_norm_backward(x, &dz, g, w, true, eps, saved)?,
                _ => batch_norm_backward(x, &dz, w, true, eps, saved, train)?,
            }
        };
        std::hint::black_box(grads);
        Ok(())
    }
}

/// Times one case of the fused suite in `dtype`: fused and unfused
/// alternate call by call, so that both see the same machine.
pub fn measure_fused(
    case: &Case,
    dtype: Dtype,
    act: Activation,
    runs: usize,
) -> anyhow::Result<FusedMeasurement> {
    match dtype {
        Dtype::F32 => measure_fused_in::<f32>(case, dtype, act, runs),
        Dtype::Bf16 => measure_fused_in::<half::bf16>(case, dtype, act, runs),
        Dtype::F16 => measure_fused_in::<half::f16>(case, dtype, act, runs),
    }
}

fn measure_fused_in<T: Float>(
    case: &Case,
    dtype: Dtype,
    act: Activation,
    runs: usize,
) -> anyhow::Result<FusedMeasurement> {
    let mut p = Prepared::<T>::new(case)?;
    let y = p.forward_act(act, false)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut times = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for round in 0..runs + 2 {
        let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<Duration> {
            let start = Instant::now();
            f()?;
            Ok(start.elapsed())
        };
        let t = [
            time(&mut || p.forward_act(act, true).map(drop))?,
            time(&mut || p.forward_act(act, false).map(drop))?,
            time(&mut || p.backward_act(&y, act, true))?,
            time(&mut || p.backward_act(&y, act, false))?,
        ];
        // The first two rounds warm the caches and the allocator.
        if round >= 2 {
            for (all, t) in times.iter_mut().zip(t) {
                all.push(t);
            }
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        ms(v[v.len() / 2])
    };
    Ok(FusedMeasurement {
        case: case.name.clone(),
        dtype: dtype.name(),
        activation: act.name(),
        fused_fwd_ms: median(&mut times[0]),
        unfused_fwd_ms: median(&mut times[1]),
        fused_bwd_ms: median(&mut times[2]),
        unfused_bwd_ms: median(&mut times[3]),
    })
}

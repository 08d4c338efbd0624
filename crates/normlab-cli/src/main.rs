//! `normlab`: the conformance runner and normalization lab.

use normlab_cli::lab::model::{Activation, Arch, InitScheme, ModelConfig, NormKind, Placement};
use normlab_cli::lab::train::{train_on, OptimizerKind, TrainConfig};
use normlab_cli::{bench, conformance, data};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Normalization in deep learning: exact layers, and the evidence for why they work.
#[derive(Parser, Debug)]
#[command(name = "normlab", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every experiment and write a self-contained HTML report
    /// (DIR/index.html) with the CSV and SVG files of each experiment.
    ///
    /// The report opens with the lecture's claims, the evidence measured for
    /// each and a verdict computed by a stated rule.
    ///
    /// An experiment that fails does not stop the others: the report is still
    /// written, with the failure and its message in that experiment's
    /// section, and normlab then exits with status 1.
    ///
    /// Example: normlab report --out report --profile quick
    Report(SuiteArgs),
    /// Run one experiment of the suite and write its files and an index.html.
    ///
    /// Experiments: signal, depth, robustness, batch_size, placement,
    /// train_eval, gradient_mixing, jacobian, exploding, sync, advice.
    ///
    /// When it fails, its index.html still says how, and normlab exits with
    /// status 1.
    ///
    /// Example: normlab experiment depth --out runs/depth
    Experiment {
        /// The experiment's name.
        name: String,
        #[command(flatten)]
        args: SuiteArgs,
    },
    /// Run normcase/1 conformance cases (files or directories of .json files).
    ///
    /// Prints one PASS/FAIL line per case and `N passed, M failed`; exits
    /// non-zero when any case fails.
    ///
    /// Example: normlab conformance tests/data
    Conformance {
        /// Case files or directories searched recursively for *.json.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Train one network on the embedded MNIST test set (or --data-dir) and
    /// report its loss and held-out accuracy.
    ///
    /// Exit status: 0 after a finite run; 2 for bad options, data or an
    /// error; 3 when the run diverged (a loss, parameter or running
    /// statistic became NaN or infinite): training stops there, the reason
    /// goes to stderr, the JSON summary says "diverged": true, and --save
    /// writes nothing.
    ///
    /// Example: normlab train --model mlp --depth 20 --width 128 --norm batch --steps 300
    Train(TrainArgs),
    /// Time the kernels on the bench suite and compare with the copy bandwidth.
    ///
    /// For each case: the median allocating forward (fwd_ms), forward into a
    /// preallocated output (fwd_into_ms) and allocating backward (bwd_ms),
    /// with the bandwidth each achieves as a fraction of a plain 256 MiB copy.
    ///
    /// Example: normlab bench --threads 2 --case "layer_norm 8192x1024";
    /// normlab bench --suite models --dtype bf16
    Bench {
        /// Which cases: `default` (eleven large cases), `models` (shapes of
        /// real model families, named after them), `fused` (the cases of
        /// both with a fused activation, --activation, fused against the
        /// op followed by a separate activation) or `training` (optimizer
        /// steps of the lab's networks on the embedded MNIST images; --runs
        /// timed steps per case, median step time).
        #[arg(long, value_enum, default_value = "default")]
        suite: bench::Suite,
        /// Element type of inputs, parameters and outputs.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: bench::Dtype,
        /// Only this case (repeatable); names as `normlab bench --list` shows them.
        #[arg(long = "case", value_name = "NAME")]
        cases: Vec<String>,
        /// Worker threads, 1 to 1024 (default: all cores).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_THREADS))]
        threads: Option<usize>,
        /// Timed runs per measurement, 10 to 1000.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u32).range(10..=1000))]
        runs: u32,
        /// Force a SIMD level: scalar, avx2 or avx512 (default: the best available).
        #[arg(long)]
        simd: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// List the case names and exit.
        #[arg(long)]
        list: bool,
        /// The activation of the fused suite: relu, tanh or sigmoid.
        #[arg(long, default_value = "relu", value_parser = parse_activation)]
        activation: normlab::Activation,
        /// Call the kernels from a thread outside the pool, as a program
        /// that never set up rayon does (default: the main thread is one of
        /// the pool's workers; the training suite always calls from outside).
        #[arg(long)]
        outside_pool: bool,
    },
}

fn parse_activation(name: &str) -> Result<normlab::Activation, String> {
    normlab::Activation::from_name(name)
        .ok_or_else(|| format!("unknown activation `{name}` (relu, tanh, sigmoid)"))
}

/// Options shared by `report` and `experiment`.
#[derive(clap::Args, Debug)]
struct SuiteArgs {
    /// Run directory for index.html, CSV and SVG files (default: report, or
    /// runs/NAME for one experiment).
    #[arg(long)]
    out: Option<PathBuf>,
    /// smoke (under 2 minutes), quick (under 15 minutes) or full.
    #[arg(long, value_enum, default_value = "quick")]
    profile: normlab_cli::lab::experiments::Profile,
    /// Seed of the split, every initialization and every batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Read MNIST / Fashion-MNIST (IDX, gzip or not) or CIFAR-10 (binary
    /// batches) from this directory instead of the embedded MNIST test set;
    /// its t10k-* files or test_batch.bin, when present, are the held-out set.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// Runs `experiments` and writes the report; also when some fail, which
/// are then named on stderr and make the exit status 1.
fn run_suite(
    experiments: &[&normlab_cli::lab::experiments::Experiment],
    args: &SuiteArgs,
    default_out: PathBuf,
) -> anyhow::Result<ExitCode> {
    use normlab_cli::lab::report;
    let (split, data) = match &args.data_dir {
        Some(dir) => (data::from_dir(dir)?, format!("{}", dir.display())),
        None => (
            data::Split::new(data::embedded_mnist()?),
            "embedded MNIST test set (10,000 images)".to_string(),
        ),
    };
    let (train_set, held, how) = split.into_sets(args.seed)?;
    let settings = report::Settings {
        profile: args.profile,
        seed: args.seed,
        data: format!("{data}, {how}"),
        progress: !args.quiet,
    };
    let dir = args.out.clone().unwrap_or(default_out);
    let written = report::run_and_write(experiments, &settings, &train_set, &held, &dir)?;
    println!("{}", written.index.display());
    let failures = written.failures();
    for (name, error) in &failures {
        eprintln!("error: experiment {name} failed: {error}");
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Fixes candle's threading before any thread starts (each variable only
/// when unset or not a positive number, so a user's setting wins, except
/// that `bench --threads` sets both pools):
/// - `RAYON_NUM_THREADS` to the number of threads the process will use.
///   candle reads its thread count on every matrix product and element-wise
///   op; without the variable it counts physical cores by parsing
///   `/proc/cpuinfo` each time (candle 0.11, `num_cpus::get_physical`). That
///   parsing made up half of a training step of a 6 × 64 MLP: 4.8 → 2.6 ms
///   median (`normlab bench --suite training --threads 2 --case "mlp 6x64
///   batch b64 sgd"`, with and without the variable).
/// - `CANDLE_NUM_THREADS=1`: no worker threads of candle's own pool for
///   element-wise ops. Its workers spin while they wait, beside rayon's,
///   and the lab's tensors are small; with two runs training side by side
///   (`train_many`) on two cores the spinning took a quarter of the
///   samples. `normlab experiment batch_size`: 46.3 and 43.4 s with
///   candle's pool, 21.9 and 18.8 s without (alternating runs). Matrix
///   products still use every thread (through rayon).
fn fix_thread_count(bench_threads: Option<usize>) {
    let unset = |name: &str| {
        std::env::var(name).map_or(true, |v| v.trim().parse().map_or(true, |n: usize| n == 0))
    };
    // Single-threaded here: nothing else reads the environment yet.
    // `--threads` sets the pool, so it also sets candle's count.
    if bench_threads.is_some() || unset("RAYON_NUM_THREADS") {
        let threads = bench_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1)
        });
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if unset("CANDLE_NUM_THREADS") {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    fix_thread_count(match &cli.command {
        Command::Bench { threads, .. } => *threads,
        _ => None,
    });
    if let Command::Bench {
        threads,
        suite,
        outside_pool,
        ..
    } = &cli.command
    {
        // Training steps are timed in the pool the lab trains in.
        bench_thread_pool(*threads, *suite != bench::Suite::Training && !outside_pool)?;
    }
    match cli.command {
        Command::Report(args) => {
            let all: Vec<_> = normlab_cli::lab::experiments::SUITE.iter().collect();
            run_suite(&all, &args, PathBuf::from("report"))
        }
        Command::Experiment { name, args } => {
            let e = normlab_cli::lab::experiments::find(&name)?;
            run_suite(&[e], &args, PathBuf::from("runs").join(&name))
        }
        Command::Train(args) => Ok(if run_train(args)? {
            ExitCode::from(EXIT_DIVERGED)
        } else {
            ExitCode::SUCCESS
        }),
        Command::Bench {
            suite,
            dtype,
            cases,
            threads: _,
            runs,
            simd,
            json,
            list,
            activation,
            outside_pool: _,
        } => {
            let choice = BenchChoice {
                suite,
                dtype,
                names: &cases,
                list,
                activation,
            };
            run_bench(choice, runs as usize, simd.as_deref(), json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Conformance { paths } => {
            let summary = conformance::run(&paths, &mut std::io::stdout().lock())?;
            Ok(if summary.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Sets up the global thread pool for `normlab bench` (`threads` workers,
/// default: one per core) with the main thread as one of its workers. The
/// kernels' parallel loops are then started from inside the pool: the
/// caller splits the work and runs its share at once, as an OpenMP caller
/// does, instead of handing the whole loop to a sleeping worker and waiting
/// to be woken. The bf16 BatchNorm1d forward on `[256, 512]` took
/// 0.20–0.37 ms from outside the pool and 0.17 ms from inside it (2
/// threads, medians of 100 runs, `normlab bench --suite models --dtype
/// bf16`; rayon's own scheduling; the kernels' passes now run with the
/// caller working on them from outside the pool too, see `--outside-pool`).
/// Only the bench does this: its main thread does nothing but call
/// kernels. The lab's SyncBatchNorm ranks are threads of their own whose
/// kernels run on the pool while the main thread waits for them; with the
/// main thread in the pool, that wait would hold one of its workers; so
/// the training suite (`caller_in_pool` false) times steps in the pool the
/// lab trains in.
fn bench_thread_pool(threads: Option<usize>, caller_in_pool: bool) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    let mut builder = rayon::ThreadPoolBuilder::new();
    if caller_in_pool {
        builder = builder.use_current_thread();
    }
    if let Some(t) = threads {
        // clap checks the range; callers other than the parser are held to it too.
        if !(1..=MAX_THREADS as usize).contains(&t) {
            bail!("--threads {t}: expected 1 to {MAX_THREADS}");
        }
        builder = builder.num_threads(t);
    }
    builder.build_global().context("setting up the thread pool")
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Timed runs of the copy that gives the reference bandwidth: fixed, so
/// that `--runs` scales the cases' timing only.
const COPY_RUNS: usize = 7;

/// Which cases `normlab bench` runs, and in which element type.
struct BenchChoice<'a> {
    suite: bench::Suite,
    dtype: bench::Dtype,
    names: &'a [String],
    list: bool,
    activation: normlab::Activation,
}

fn run_bench(
    choice: BenchChoice<'_>,
    runs: usize,
    simd: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    use normlab::simd::{self, SimdLevel};
    let BenchChoice {
        suite,
        dtype,
        names,
        list,
        activation,
    } = choice;
    let fused = suite == bench::Suite::Fused;
    if suite == bench::Suite::Training {
        return run_training_bench(names, list, runs, json);
    }
    let suite = bench::cases(suite);
    if list {
        for case in &suite {
            println!("{}", case.name);
        }
        return Ok(());
    }
    let selected: Vec<_> = if names.is_empty() {
        suite
    } else {
        names
            .iter()
            .map(|n| {
                suite
                    .iter()
                    .find(|c| &c.name == n)
                    .cloned()
                    .with_context(|| {
                        format!(
                            "unknown case `{n}` (normlab bench --list [--suite S] shows the names)"
                        )
                    })
            })
            .collect::<anyhow::Result<_>>()?
    };
    if let Some(level) = simd {
        let level = match level {
            "scalar" => SimdLevel::Scalar,
            "avx2" => SimdLevel::Avx2,
            "avx512" => SimdLevel::Avx512,
            other => bail!("unknown SIMD level `{other}` (scalar, avx2, avx512)"),
        };
        if level > simd::detected() {
            bail!(
                "this CPU cannot run {} (best: {})",
                level.name(),
                simd::detected().name()
            );
        }
        simd::force(Some(level));
    }
    let copy = bench::copy_bandwidth(COPY_RUNS)?;
    let threads = rayon::current_num_threads();
    if json {
        println!(
            "{}",
            serde_json::json!({"case": "copy_bandwidth", "gbps": copy, "threads": threads, "simd": simd::active().name()})
        );
    } else {
        println!(
            "{threads} threads, SIMD {}, {}, copy bandwidth {copy:.1} GB/s (256 MiB, read + write); medians of {runs} runs",
            simd::active().name(),
            dtype.name()
        );
    }
    if fused {
        return run_fused_bench(&selected, dtype, activation, runs, json);
    }
    if !json {
        println!(
            "{:<48} {:>8} {:>11} {:>8} {:>15} {:>15}",
            "case", "fwd_ms", "fwd_into_ms", "bwd_ms", "fwd GB/s (copy)", "bwd GB/s (copy)"
        );
    }
    for case in &selected {
        let m = bench::measure(case, dtype, runs)?;
        if json {
            println!("{}", serde_json::to_string(&m)?);
        } else {
            println!(
                "{:<48} {:>8.3} {:>11.3} {:>8.3} {:>8.1} ({:>3.0}%) {:>8.1} ({:>3.0}%)",
                m.case,
                m.fwd_ms,
                m.fwd_into_ms,
                m.bwd_ms,
                m.fwd_gbps,
                100.0 * m.fwd_gbps / copy,
                m.bwd_gbps,
                100.0 * m.bwd_gbps / copy
            );
        }
    }
    Ok(())
}

/// `normlab bench --suite fused`: each case fused and unfused, alternating.
fn run_fused_bench(
    selected: &[bench::Case],
    dtype: bench::Dtype,
    activation: normlab::Activation,
    runs: usize,
    json: bool,
) -> anyhow::Result<()> {
    if !json {
        println!(
            "{:<48} {:>9} {:>11} {:>7} {:>9} {:>11} {:>7}",
            "case", "fused fwd", "unfused fwd", "speedup", "fused bwd", "unfused bwd", "speedup"
        );
    }
    for case in selected {
        let m = bench::measure_fused(case, dtype, activation, runs)?;
        if json {
            println!("{}", serde_json::to_string(&m)?);
        } else {
            println!(
                "{:<48} {:>9.3} {:>11.3} {:>6.2}x {:>9.3} {:>11.3} {:>6.2}x",
                format!("{} + {}", m.case, m.activation),
                m.fused_fwd_ms,
                m.unfused_fwd_ms,
                m.unfused_fwd_ms / m.fused_fwd_ms,
                m.fused_bwd_ms,
                m.unfused_bwd_ms,
                m.unfused_bwd_ms / m.fused_bwd_ms
            );
        }
    }
    Ok(())
}

/// `normlab bench --suite training`: the median time of `runs` optimizer
/// steps of each selected case.
fn run_training_bench(names: &[String], list: bool, runs: usize, json: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    use normlab_cli::lab::step_bench;
    let all = step_bench::cases();
    if list {
        for case in &all {
            println!("{}", case.name);
        }
        return Ok(());
    }
    let selected: Vec<_> = if names.is_empty() {
        all
    } else {
        names
            .iter()
            .map(|n| {
                all.iter().find(|c| &c.name == n).cloned().with_context(|| {
                    format!("unknown case `{n}` (normlab bench --suite training --list shows the names)")
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let (train_set, _, _) = data::Split::new(data::embedded_mnist()?).into_sets(0)?;
    let threads = rayon::current_num_threads();
    if json {
        println!(
            "{}",
            serde_json::json!({"suite": "training", "threads": threads})
        );
    } else {
        println!(
            "{threads} threads; medians of {runs} steps after {} untimed ones",
            step_bench::WARMUP_STEPS
        );
        println!("{:<36} {:>10} {:>10}", "case", "step_ms", "min_ms");
    }
    for case in &selected {
        let m = step_bench::measure(case, &train_set, runs)?;
        if json {
            println!("{}", serde_json::to_string(&m)?);
        } else {
            println!("{:<36} {:>10.3} {:>10.3}", m.case, m.step_ms, m.min_step_ms);
        }
    }
    Ok(())
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ArchArg {
    Mlp,
    Cnn,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PlacementArg {
    /// linear → norm → activation
    A,
    /// linear → activation → norm
    B,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ActivationArg {
    Relu,
    Tanh,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum OptimizerArg {
    Sgd,
    Adamw,
}

/// Exit status of `normlab train` when the run diverged.
const EXIT_DIVERGED: u8 = 3;

/// Most `bench --threads`.
const MAX_THREADS: u64 = 1024;

/// A `usize` option in `range`, for clap.
fn ranged(range: std::ops::RangeInclusive<u64>) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(range)
}

/// `--lr`: a finite number in (0, MAX_LR].
fn parse_lr(s: &str) -> Result<f64, String> {
    let lr: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    let max = normlab_cli::lab::train::MAX_LR;
    if lr.is_finite() && lr > 0.0 && lr <= max {
        Ok(lr)
    } else {
        Err(format!("{s} is not in (0, {max:e}]"))
    }
}

/// `--momentum`: a number in [0, 1).
fn parse_momentum(s: &str) -> Result<f64, String> {
    let momentum: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..1.0).contains(&momentum) {
        Ok(momentum)
    } else {
        Err(format!("{s} is not in [0, 1)"))
    }
}

/// Options of `normlab train`.
#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Network family.
    #[arg(long, value_enum, default_value = "mlp")]
    model: ArchArg,
    /// Hidden blocks, 1 to 1024.
    #[arg(long, default_value_t = 6, value_parser = ranged(1..=1024))]
    depth: usize,
    /// Hidden features (MLP) or channels (CNN), 1 to 65536. Depth, width
    /// and batch size together must fit in the available memory.
    #[arg(long, default_value_t = 64, value_parser = ranged(1..=65536))]
    width: usize,
    /// none, batch, sync-batch (BatchNorm over all ranks under mpirun), layer,
    /// group (8 groups), groupG, instance, rms, lrn.
    #[arg(long, default_value = "batch")]
    norm: String,
    /// a: linear → norm → activation; b: linear → activation → norm.
    #[arg(long, value_enum, default_value = "a")]
    placement: PlacementArg,
    /// Normalization without learnable γ, β.
    #[arg(long)]
    no_affine: bool,
    /// Non-linearity.
    #[arg(long, value_enum, default_value = "relu")]
    activation: ActivationArg,
    /// Initialization: kaiming, xavier, or normal:SIGMA with SIGMA in (0, 1e6].
    #[arg(long, default_value = "kaiming")]
    init: String,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "sgd")]
    optimizer: OptimizerArg,
    /// SGD momentum, in [0, 1).
    #[arg(long, default_value_t = 0.9, value_parser = parse_momentum, allow_negative_numbers = true)]
    momentum: f64,
    /// Learning rate, in (0, 1e6].
    #[arg(long, default_value_t = 0.05, value_parser = parse_lr, allow_negative_numbers = true)]
    lr: f64,
    /// Images per step, 1 to 65536 (and at most the training images).
    #[arg(long, default_value_t = 64, value_parser = ranged(1..=65536))]
    batch_size: usize,
    /// Optimizer steps, 1 to 10000000.
    #[arg(long, default_value_t = 200, value_parser = ranged(1..=10_000_000))]
    steps: usize,
    /// Passes over the training images instead of --steps, 1 to 100000
    /// (each pass is ⌈images / batch size⌉ steps; all of them together at
    /// most 10000000).
    #[arg(long, conflicts_with = "steps", value_parser = ranged(1..=100_000))]
    epochs: Option<usize>,
    /// Seed of the split, the initialization and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Read MNIST/Fashion-MNIST (IDX, gzip or not; t10k-* files are the
    /// held-out set) or CIFAR-10 (binary batches; test_batch.bin is the
    /// held-out set) from here instead of the embedded MNIST test set.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Write the trained model (parameters and running statistics) as
    /// safetensors. Only a regular file (or a link to one) or nothing is
    /// replaced, checked before training; a diverged model is not written.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Print only the JSON summary.
    #[arg(long)]
    json: bool,
}

/// Trains as `args` say; returns whether the run diverged.
fn run_train(args: TrainArgs) -> anyhow::Result<bool> {
    use anyhow::{bail, Context};
    use normlab_cli::lab::train;
    if let Some(path) = &args.save {
        train::check_output_path(path).context("--save")?;
    }
    let init = match args.init.as_str() {
        "kaiming" => InitScheme::Kaiming,
        "xavier" => InitScheme::Xavier,
        s if s.starts_with("normal:") => {
            let sigma: f64 = s[7..]
                .parse()
                .with_context(|| format!("--init {s}: SIGMA is not a number"))?;
            if !(sigma > 0.0 && sigma <= 1e6) {
                bail!("--init {s}: SIGMA must be in (0, 1e6]");
            }
            InitScheme::Normal(sigma)
        }
        other => bail!("--init {other}: expected kaiming, xavier or normal:SIGMA"),
    };
    let model = ModelConfig {
        arch: match args.model {
            ArchArg::Mlp => Arch::Mlp,
            ArchArg::Cnn => Arch::Cnn,
        },
        depth: args.depth,
        width: args.width,
        norm: args.norm.parse::<NormKind>()?,
        placement: match args.placement {
            PlacementArg::A => Placement::A,
            PlacementArg::B => Placement::B,
        },
        affine: !args.no_affine,
        activation: match args.activation {
            ActivationArg::Relu => Activation::Relu,
            ActivationArg::Tanh => Activation::Tanh,
        },
        init,
        momentum: normlab::Momentum::default(),
    };
    let split = match &args.data_dir {
        Some(dir) => data::from_dir(dir)?,
        None => data::Split::new(data::embedded_mnist()?),
    };
    // The directory's own held-out images when it has them, else a seeded fifth.
    let (train_set, held, _) = split.into_sets(args.seed)?;
    let steps = match args.epochs {
        Some(epochs) => train::steps_for_epochs(epochs, train_set.len(), args.batch_size)?,
        None => args.steps,
    };
    let config = TrainConfig {
        optimizer: match args.optimizer {
            OptimizerArg::Sgd => OptimizerKind::Sgd {
                momentum: args.momentum,
            },
            OptimizerArg::Adamw => OptimizerKind::AdamW { weight_decay: 0.01 },
        },
        lr: args.lr,
        batch_size: args.batch_size,
        steps,
        seed: args.seed,
    };
    // Under mpirun (built with --features mpi) every process is a rank of a
    // data-parallel job; otherwise one process.
    #[cfg(feature = "mpi")]
    let mpi = normlab_mpi::Mpi::init()?;
    #[cfg(feature = "mpi")]
    let comm = mpi.communicator();
    #[cfg(not(feature = "mpi"))]
    let comm: std::sync::Arc<dyn normlab::Communicator> =
        std::sync::Arc::new(normlab::SingleProcess);
    let lead = comm.rank() == 0;
    let bar = if args.json || !lead {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(steps as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps, loss {msg} [{elapsed_precise}]",
        )
        .expect("valid template"),
    );
    let ranks = comm.size();
    let (_, map, summary) = train_on(&model, &config, &train_set, &held, comm, |_, loss| {
        bar.set_message(format!("{loss:.4}"));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    if !lead {
        // Every rank holds the same parameters; rank 0 reports and saves.
        return Ok(summary.diverged);
    }
    if let Some(why) = &summary.divergence {
        eprintln!("error: the run diverged: {why}");
        if let Some(path) = &args.save {
            eprintln!(
                "error: --save {}: not written, the model is not finite",
                path.display()
            );
        }
    } else if let Some(path) = &args.save {
        train::save_model(&map, path).context("--save")?;
    }
    if !args.json {
        println!(
            "final loss {:.4}, held-out accuracy {:.2}%{} ({} training / {} held-out images, {:.1} s)",
            summary.final_loss,
            100.0 * summary.held_out_accuracy,
            if summary.diverged { ", diverged" } else { "" },
            train_set.len(),
            held.len(),
            summary.seconds
        );
    }
    let json = serde_json::json!({
        "model": format!("{:?}", model),
        "train": format!("{:?}", config),
        "final_loss": summary.final_loss,
        "held_out_accuracy": summary.held_out_accuracy,
        "diverged": summary.diverged,
        "divergence": summary.divergence,
        "steps": summary.losses.len(),
        "ranks": ranks,
        "seconds": summary.seconds,
    });
    println!("{json}");
    Ok(summary.diverged)
}

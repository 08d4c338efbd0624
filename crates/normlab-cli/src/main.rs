//! `normlab`: the conformance runner and normalization lab.

use normlab_cli::{bench, conformance};

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
    /// Time the kernels on the bench suite and compare with the copy bandwidth.
    ///
    /// For each case: the median allocating forward (fwd_ms), forward into a
    /// preallocated output (fwd_into_ms) and allocating backward (bwd_ms),
    /// with the bandwidth each achieves as a fraction of a plain 256 MiB copy.
    ///
    /// Example: normlab bench --threads 2 --case "layer_norm 8192x1024"
    Bench {
        /// Only this case (repeatable); names as `normlab bench --list` shows them.
        #[arg(long = "case", value_name = "NAME")]
        cases: Vec<String>,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Timed runs per measurement (at least 10).
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u32).range(10..))]
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
    },
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench {
            cases,
            threads,
            runs,
            simd,
            json,
            list,
        } => {
            run_bench(&cases, threads, runs as usize, simd.as_deref(), json, list)?;
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

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_bench(
    names: &[String],
    threads: Option<usize>,
    runs: usize,
    simd: Option<&str>,
    json: bool,
    list: bool,
) -> anyhow::Result<()> {
    use anyhow::{bail, Context};
    use normlab::simd::{self, SimdLevel};
    let suite = bench::suite();
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
                        format!("unknown case `{n}` (normlab bench --list shows the names)")
                    })
            })
            .collect::<anyhow::Result<_>>()?
    };
    if let Some(t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("setting up the thread pool")?;
    }
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
    let copy = bench::copy_bandwidth(runs)?;
    let threads = rayon::current_num_threads();
    if json {
        println!(
            "{}",
            serde_json::json!({"case": "copy_bandwidth", "gbps": copy, "threads": threads, "simd": simd::active().name()})
        );
    } else {
        println!(
            "{threads} threads, SIMD {}, copy bandwidth {copy:.1} GB/s (256 MiB, read + write); medians of {runs} runs",
            simd::active().name()
        );
        println!(
            "{:<32} {:>8} {:>11} {:>8} {:>15} {:>15}",
            "case", "fwd_ms", "fwd_into_ms", "bwd_ms", "fwd GB/s (copy)", "bwd GB/s (copy)"
        );
    }
    for case in &selected {
        let m = bench::measure(case, runs)?;
        if json {
            println!("{}", serde_json::to_string(&m)?);
        } else {
            println!(
                "{:<32} {:>8.2} {:>11.2} {:>8.2} {:>8.1} ({:>3.0}%) {:>8.1} ({:>3.0}%)",
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

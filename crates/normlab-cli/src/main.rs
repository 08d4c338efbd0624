//! `normlab`: the conformance runner and normalization lab.

mod conformance;

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
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
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

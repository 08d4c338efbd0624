//! The experiments: each tests one claim of the lecture on real data, writes
//! its measurements as CSV and its plots as SVG, and judges the claim with a
//! rule from [`crate::lab::verdict`].
//!
//! An experiment is a function from a [`Context`] (profile, seed, data,
//! progress bar) to [`Findings`]; [`run`] times it and names it. Sizes come
//! from the profile: `smoke` (seconds, for CI), `quick` (the default report,
//! minutes) and `full` (a faithful reproduction, as long as it takes).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::model::{Model, ModelConfig};
use super::plot::Figure;
use super::train::{self, TrainConfig, TrainSummary};
use super::verdict::Verdict;
use crate::data::Dataset;

pub mod advice;
pub mod batch_size;
pub mod depth;
pub mod exploding;
pub mod gradient_mixing;
pub mod jacobian;
pub mod placement;
pub mod robustness;
pub mod signal;
pub mod sync;
pub mod train_eval;

/// How big the experiments are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Tiny configurations: the whole suite in under 2 minutes (CI).
    Smoke,
    /// The default report: under 15 minutes on 2 cores.
    Quick,
    /// Larger networks, grids and budgets, as long as it takes.
    Full,
}

impl Profile {
    /// The value for this profile.
    pub fn pick<T>(self, smoke: T, quick: T, full: T) -> T {
        match self {
            Profile::Smoke => smoke,
            Profile::Quick => quick,
            Profile::Full => full,
        }
    }

    /// `smoke`, `quick` or `full`.
    pub fn as_str(self) -> &'static str {
        self.pick("smoke", "quick", "full")
    }
}

/// What an experiment runs with.
pub struct Context<'a> {
    /// Sizes.
    pub profile: Profile,
    /// Seed of every initialization, split and batch order.
    pub seed: u64,
    /// Training images.
    pub train: &'a Dataset,
    /// Held-out images.
    pub held_out: &'a Dataset,
    /// Progress of this experiment; each experiment sets its length.
    pub progress: ProgressBar,
}

impl Context<'_> {
    /// Trains one configuration on the training set and scores it on the held-out set.
    ///
    /// # Errors
    /// Invalid configurations; candle errors.
    pub fn train(
        &self,
        model: &ModelConfig,
        config: &TrainConfig,
    ) -> Result<(Model, VarMap, TrainSummary)> {
        train::train(model, config, self.train, self.held_out, |_, _| {})
    }

    /// Trains independent runs, as many at a time as there are threads,
    /// ticking the progress bar; summaries in the order of `runs`. Each run
    /// is seeded by its own configuration, so the order of completion does
    /// not matter.
    ///
    /// # Errors
    /// The first failing run.
    pub fn train_many(&self, runs: &[(ModelConfig, TrainConfig)]) -> Result<Vec<TrainSummary>> {
        use rayon::prelude::*;
        runs.par_iter()
            .with_max_len(1)
            .map(|(model, config)| {
                let summary = self.train(model, config)?.2;
                self.progress.inc(1);
                Ok(summary)
            })
            .collect()
    }

    /// `n` training images drawn with the experiment's seed (plus `salt`),
    /// as a batch `[n, C, H, W]` with labels.
    ///
    /// # Errors
    /// `n` larger than the training set; candle errors.
    pub fn sample(&self, n: usize, salt: u64) -> Result<(Tensor, Tensor)> {
        if n > self.train.len() {
            bail!(
                "asked for {n} images from {} training images",
                self.train.len()
            );
        }
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(self.seed ^ salt));
        train::batch(self.train, &order[..n], &Device::Cpu)
    }
}

/// A table of measurements, written as CSV.
#[derive(Clone, Debug)]
pub struct Table {
    /// File name in the run directory (`NAME.csv`).
    pub file: String,
    /// Column names.
    pub header: Vec<String>,
    /// Rows, as many cells as columns.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table.
    pub fn new(file: &str, header: &[&str]) -> Table {
        Table {
            file: file.to_string(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row of displayable cells.
    pub fn push(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len(), "{}", self.file);
        self.rows.push(cells);
    }

    /// The CSV text.
    ///
    /// # Errors
    /// CSV writer errors.
    pub fn to_csv(&self) -> Result<String> {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(&self.header)?;
        for row in &self.rows {
            w.write_record(row)?;
        }
        Ok(String::from_utf8(w.into_inner()?)?)
    }
}

/// Formats a list of cells for [`Table::push`].
#[macro_export]
macro_rules! row {
    ($($cell:expr),* $(,)?) => { vec![$(format!("{}", $cell)),*] };
}

/// What an experiment found.
#[derive(Clone, Debug)]
pub struct Findings {
    /// Networks, data, budgets: enough to reproduce the run with the seed.
    pub setup: String,
    /// The rule that produced the verdict.
    pub rule: &'static str,
    /// The verdict.
    pub verdict: Verdict,
    /// The measured numbers the verdict rests on, in a sentence or two.
    pub evidence: String,
    /// Plots.
    pub figures: Vec<Figure>,
    /// Measurements.
    pub tables: Vec<Table>,
}

/// One experiment of the suite.
pub struct Experiment {
    /// Name on the command line and in file names.
    pub name: &'static str,
    /// Section title.
    pub title: &'static str,
    /// The lecture's claim it tests.
    pub claim: &'static str,
    /// The experiment.
    pub run: fn(&Context) -> Result<Findings>,
}

/// A finished experiment.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Name.
    pub name: &'static str,
    /// Section title.
    pub title: &'static str,
    /// The claim.
    pub claim: &'static str,
    /// What it found, or why it failed (the error with its causes).
    pub result: std::result::Result<Findings, String>,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl Outcome {
    /// What it found, unless it failed.
    pub fn findings(&self) -> Option<&Findings> {
        self.result.as_ref().ok()
    }

    /// Why it failed, if it did.
    pub fn error(&self) -> Option<&str> {
        self.result.as_ref().err().map(String::as_str)
    }
}

/// The suite, in report order.
pub const SUITE: [Experiment; 11] = [
    signal::EXPERIMENT,
    depth::EXPERIMENT,
    robustness::EXPERIMENT,
    batch_size::EXPERIMENT,
    placement::EXPERIMENT,
    train_eval::EXPERIMENT,
    gradient_mixing::EXPERIMENT,
    jacobian::EXPERIMENT,
    exploding::EXPERIMENT,
    sync::EXPERIMENT,
    advice::EXPERIMENT,
];

/// The experiment called `name`.
///
/// # Errors
/// Unknown names, with the list of known ones.
pub fn find(name: &str) -> Result<&'static Experiment> {
    SUITE.iter().find(|e| e.name == name).with_context(|| {
        let names: Vec<&str> = SUITE.iter().map(|e| e.name).collect();
        format!(
            "unknown experiment `{name}`; the experiments are: {}",
            names.join(", ")
        )
    })
}

/// Runs one experiment and times it. A failure (an error, or a panic in the
/// experiment or a library it calls) is recorded in the outcome rather than
/// returned, so that a suite goes on with the other experiments and its
/// report shows what failed and why.
pub fn run(experiment: &Experiment, ctx: &Context) -> Outcome {
    let start = Instant::now();
    let result =
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (experiment.run)(ctx))) {
            Ok(Ok(findings)) => Ok(findings),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(panic) => Err(format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            )),
        };
    Outcome {
        name: experiment.name,
        title: experiment.title,
        claim: experiment.claim,
        result,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Writes an outcome's CSV and SVG files into `dir` (creating it); a failed outcome has none.
///
/// # Errors
/// I/O errors, naming the file.
pub fn write_files(outcome: &Outcome, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let Some(findings) = outcome.findings() else {
        return Ok(());
    };
    for t in &findings.tables {
        let path = dir.join(&t.file);
        std::fs::write(&path, t.to_csv()?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for f in &findings.figures {
        let path = dir.join(&f.file);
        std::fs::write(&path, &f.svg).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Running statistics (and their counters) of every normalization layer,
/// to put back after a forward pass in training mode that should not count.
pub struct RunningSnapshot(Vec<(candle_core::Var, Tensor)>);

impl RunningSnapshot {
    /// Copies the running statistics in `map`.
    ///
    /// # Errors
    /// candle errors.
    pub fn take(map: &VarMap) -> Result<RunningSnapshot> {
        let data = map.data().lock().expect("var map lock");
        let mut saved = Vec::new();
        for (name, var) in data.iter() {
            if name.contains("running_") || name.ends_with("num_batches_tracked") {
                saved.push((var.clone(), var.as_tensor().copy()?));
            }
        }
        Ok(RunningSnapshot(saved))
    }

    /// Restores them.
    ///
    /// # Errors
    /// candle errors.
    pub fn restore(&self) -> Result<()> {
        for (var, value) in &self.0 {
            var.set(value)?;
        }
        Ok(())
    }
}

/// Mean of `values` (NaN when empty).
pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Percent with one decimal, for evidence sentences.
pub fn pct(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_quote_cells_that_need_it() -> Result<()> {
        let mut t = Table::new("t.csv", &["norm", "value"]);
        t.push(row!["group, 8", 0.5]);
        assert_eq!(t.to_csv()?, "norm,value\n\"group, 8\",0.5\n");
        Ok(())
    }

    #[test]
    fn every_experiment_is_found_by_name() {
        for e in &SUITE {
            assert_eq!(find(e.name).unwrap().name, e.name);
        }
        let err = find("nope").err().unwrap().to_string();
        assert!(err.contains("signal") && err.contains("advice"), "{err}");
    }

    /// Narrow networks cannot keep two cores busy alone, so `train_many`
    /// runs configurations side by side; the results must be the bits a
    /// one-at-a-time run on one thread gives.
    #[test]
    fn concurrent_runs_give_the_results_of_runs_one_by_one() -> Result<()> {
        use crate::lab::model::{Arch, NormKind};
        let images = |n: usize, salt: usize| Dataset {
            images: (0..n * 64)
                .map(|i| ((i * 31 + salt) % 101) as f32 / 101.0)
                .collect(),
            labels: (0..n).map(|i| ((i * 7 + salt) % 3) as u8).collect(),
            channels: 1,
            height: 8,
            width: 8,
            classes: 3,
        };
        let (train_set, held_out) = (images(96, 0), images(32, 5));
        let runs: Vec<(ModelConfig, TrainConfig)> = [
            (Arch::Mlp, NormKind::Batch),
            (Arch::Mlp, NormKind::Layer),
            (Arch::Cnn, NormKind::Batch),
            (Arch::Cnn, NormKind::Group(2)),
            (Arch::Mlp, NormKind::None),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (arch, norm))| {
            let model = ModelConfig {
                arch,
                depth: 3,
                width: 8,
                norm,
                ..ModelConfig::default()
            };
            let train = if i % 2 == 0 {
                TrainConfig::sgd(0.05, 16, 12, i as u64)
            } else {
                TrainConfig::adamw(2e-3, 16, 12, i as u64)
            };
            (model, train)
        })
        .collect();
        let context = Context {
            profile: Profile::Smoke,
            seed: 0,
            train: &train_set,
            held_out: &held_out,
            progress: ProgressBar::hidden(),
        };
        let in_pool = |threads: usize, f: &(dyn Fn() -> Result<Vec<TrainSummary>> + Sync)| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool")
                .install(f)
        };
        let together = in_pool(2, &|| context.train_many(&runs))?;
        let one_by_one = in_pool(1, &|| {
            runs.iter()
                .map(|(m, t)| Ok(context.train(m, t)?.2))
                .collect()
        })?;
        let bits = |s: &[TrainSummary]| -> Vec<(Vec<u64>, u64)> {
            s.iter()
                .map(|s| {
                    (
                        s.losses.iter().map(|l| l.to_bits()).collect(),
                        s.held_out_accuracy.to_bits(),
                    )
                })
                .collect()
        };
        assert_eq!(bits(&together), bits(&one_by_one));
        Ok(())
    }

    #[test]
    fn profiles_pick_their_value() {
        assert_eq!(Profile::Smoke.pick(1, 2, 3), 1);
        assert_eq!(Profile::Full.pick(1, 2, 3), 3);
    }
}

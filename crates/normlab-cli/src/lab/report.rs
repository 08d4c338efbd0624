//! Running the suite and writing the report: `DIR/index.html` (self-contained:
//! styles and SVG plots inline, no external references) next to every
//! experiment's CSV and SVG files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::experiments::{self, Context, Experiment, Outcome, Profile};
use super::verdict::Verdict;
use crate::data::Dataset;

/// What a run was made with, stated at the top of the report.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Experiment sizes.
    pub profile: Profile,
    /// Seed of the split, initializations and batch orders.
    pub seed: u64,
    /// Where the images came from.
    pub data: String,
    /// Show progress bars on the terminal.
    pub progress: bool,
}

/// Runs `experiments` in order with a bar for the suite and one for the
/// experiment in progress; each experiment's CSV and SVG files are written
/// into `dir` as soon as it finishes. An experiment that fails does not stop
/// the others: its outcome carries the error.
///
/// # Errors
/// I/O errors.
pub fn run_suite(
    experiments: &[&Experiment],
    settings: &Settings,
    train: &Dataset,
    held_out: &Dataset,
    dir: &Path,
) -> Result<Vec<Outcome>> {
    let multi = MultiProgress::with_draw_target(if settings.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let suite = multi.add(ProgressBar::new(experiments.len() as u64));
    suite.set_style(
        ProgressStyle::with_template(
            "suite      {bar:30} {pos}/{len} experiments [{elapsed}] {msg}",
        )
        .expect("valid template"),
    );
    let mut outcomes = Vec::new();
    for e in experiments {
        suite.set_message(e.name);
        let bar = multi.add(ProgressBar::new(1));
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{:<10} {{bar:30}} {{pos}}/{{len}} runs [{{elapsed}}, eta {{eta}}]",
                e.name
            ))
            .expect("valid template"),
        );
        let ctx = Context {
            profile: settings.profile,
            seed: settings.seed,
            train,
            held_out,
            progress: bar.clone(),
        };
        let outcome = experiments::run(e, &ctx);
        experiments::write_files(&outcome, dir)?;
        bar.finish_and_clear();
        multi.remove(&bar);
        multi.suspend(|| {
            if settings.progress {
                eprintln!(
                    "{:<16} {:<14} {:>7.1} s",
                    outcome.name,
                    outcome.findings().map_or("failed", |f| f.verdict.as_str()),
                    outcome.seconds
                );
            }
        });
        outcomes.push(outcome);
        suite.inc(1);
    }
    suite.finish_and_clear();
    Ok(outcomes)
}

/// A written report.
#[derive(Debug)]
pub struct Written {
    /// Path of `index.html`.
    pub index: PathBuf,
    /// Every experiment's outcome, in order.
    pub outcomes: Vec<Outcome>,
}

impl Written {
    /// The experiments that failed, with their errors.
    pub fn failures(&self) -> Vec<(&'static str, &str)> {
        self.outcomes
            .iter()
            .filter_map(|o| o.error().map(|e| (o.name, e)))
            .collect()
    }
}

/// Runs the experiments and writes the report into `dir`, also when some of
/// them fail (their sections and rows in the claims table say so and why).
///
/// # Errors
/// I/O errors.
pub fn run_and_write(
    experiments: &[&Experiment],
    settings: &Settings,
    train: &Dataset,
    held_out: &Dataset,
    dir: &Path,
) -> Result<Written> {
    let start = Instant::now();
    let outcomes = run_suite(experiments, settings, train, held_out, dir)?;
    let index = write_index(dir, settings, &outcomes, start.elapsed().as_secs_f64())?;
    Ok(Written { index, outcomes })
}

/// Writes `index.html` for `outcomes` into `dir`.
///
/// # Errors
/// I/O errors, naming the file.
pub fn write_index(
    dir: &Path,
    settings: &Settings,
    outcomes: &[Outcome],
    seconds: f64,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("index.html");
    std::fs::write(&path, html(settings, outcomes, seconds))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Escapes text for HTML.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn verdict_class(v: Verdict) -> &'static str {
    match v {
        Verdict::Supported => "supported",
        Verdict::NotSupported => "not-supported",
        Verdict::Inconclusive => "inconclusive",
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;\
padding:0 1em;color:#222;line-height:1.45}h1{margin-bottom:.2em}table{border-collapse:collapse;\
width:100%;margin:1em 0}th,td{border:1px solid #ccc;padding:.4em .6em;text-align:left;\
vertical-align:top}th{background:#f3f3f3}.verdict{font-weight:bold;white-space:nowrap}\
.supported{color:#1a7f37}.not-supported{color:#c62828}.inconclusive{color:#9a6700}\
.failed{color:#fff;background:#c62828;padding:0 .3em}pre.error{white-space:pre-wrap;\
background:#fdecea;border-left:4px solid #c62828;padding:.5em}\
figure.plot{margin:1em 0;display:inline-block;width:48%;min-width:420px;vertical-align:top}\
figure.plot svg{width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.9em;color:#555}\
section{border-top:2px solid #ddd;margin-top:2em}code{background:#f5f5f5;padding:0 .2em}\
.rule{font-size:.9em;color:#444}";

/// The report page.
pub fn html(settings: &Settings, outcomes: &[Outcome], seconds: f64) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>normlab report</title><style>{STYLE}</style></head><body>\n\
         <h1>normlab report</h1>\n<p>Normalization in deep learning, claim by claim, measured on \
         real data. Each verdict is computed from the measurements by the rule stated in its \
         section.</p>\n"
    );
    h.push_str("<h2>Claims</h2>\n<table id=\"claims\"><tr><th>claim</th><th>evidence</th><th>verdict</th><th>time</th></tr>\n");
    for o in outcomes {
        let (evidence, class, verdict) = match &o.result {
            Ok(f) => (
                escape(&f.evidence),
                verdict_class(f.verdict),
                f.verdict.as_str(),
            ),
            Err(e) => (format!("failed: {}", escape(e)), "failed", "failed"),
        };
        let _ = writeln!(
            h,
            "<tr><td><a href=\"#{name}\">{claim}</a></td><td>{evidence}</td>\
             <td class=\"verdict {class}\">{verdict}</td><td>{secs:.1} s</td></tr>",
            name = o.name,
            claim = escape(o.claim),
            secs = o.seconds
        );
    }
    h.push_str("</table>\n");
    let _ = write!(
        h,
        "<h2>Run</h2>\n<table><tr><th>profile</th><td>{}</td></tr>\
         <tr><th>seed</th><td>{}</td></tr><tr><th>data</th><td>{}</td></tr>\
         <tr><th>normlab</th><td>{}</td></tr><tr><th>threads</th><td>{}</td></tr>\
         <tr><th>total time</th><td>{:.1} s</td></tr></table>\n\
         <p>Reproduce with <code>normlab report --profile {} --seed {}</code>{}.</p>\n",
        settings.profile.as_str(),
        settings.seed,
        escape(&settings.data),
        env!("CARGO_PKG_VERSION"),
        rayon::current_num_threads(),
        seconds,
        settings.profile.as_str(),
        settings.seed,
        if settings.data.starts_with("embedded") {
            ""
        } else {
            " and the same --data-dir"
        }
    );
    for o in outcomes {
        let f = match &o.result {
            Ok(f) => f,
            Err(e) => {
                let _ = write!(
                    h,
                    "<section id=\"{name}\" class=\"experiment\">\n<h2>{title} <small>(<code>{name}</code>)</small></h2>\n\
                     <p><strong>Claim.</strong> {claim}</p>\n\
                     <p><strong>Verdict:</strong> <span class=\"verdict failed\">failed</span></p>\n\
                     <p>The experiment failed after {secs:.1} s:</p>\n<pre class=\"error\">{error}</pre>\n\
                     </section>\n",
                    name = o.name,
                    title = escape(o.title),
                    claim = escape(o.claim),
                    secs = o.seconds,
                    error = escape(e)
                );
                continue;
            }
        };
        let _ = write!(
            h,
            "<section id=\"{name}\" class=\"experiment\">\n<h2>{title} <small>(<code>{name}</code>)</small></h2>\n\
             <p><strong>Claim.</strong> {claim}</p>\n<p><strong>Setup.</strong> {setup}</p>\n\
             <p><strong>Evidence.</strong> {evidence}</p>\n\
             <p><strong>Verdict:</strong> <span class=\"verdict {class}\">{verdict}</span></p>\n\
             <p class=\"rule\"><strong>Rule.</strong> {rule}</p>\n\
             <p>Time: {secs:.1} s. Data: {files}.</p>\n",
            name = o.name,
            title = escape(o.title),
            claim = escape(o.claim),
            setup = escape(&f.setup),
            evidence = escape(&f.evidence),
            class = verdict_class(f.verdict),
            verdict = f.verdict.as_str(),
            rule = escape(f.rule),
            secs = o.seconds,
            files = f
                .tables
                .iter()
                .map(|t| format!("<code>{}</code>", escape(&t.file)))
                .chain(
                    f.figures
                        .iter()
                        .map(|p| format!("<code>{}</code>", escape(&p.file)))
                )
                .collect::<Vec<_>>()
                .join(", ")
        );
        for fig in &f.figures {
            // Inline the <svg> element without its XML declaration.
            let svg = fig.svg.find("<svg").map_or(&fig.svg[..], |i| &fig.svg[i..]);
            let _ = writeln!(
                h,
                "<figure class=\"plot\" data-file=\"{}\" data-points=\"{}\">{}<figcaption>{}</figcaption></figure>",
                escape(&fig.file),
                fig.points,
                svg,
                escape(&fig.caption)
            );
        }
        h.push_str("</section>\n");
    }
    h.push_str(
        "<footer><p>Data, unless another directory is stated above: the MNIST test set, \
         © Yann LeCun and Corinna Cortes, CC BY-SA 3.0.</p></footer>\n</body></html>\n",
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::experiments::{Findings, Table};

    fn findings(file: &str, ctx: &Context) -> Findings {
        let mut table = Table::new(file, &["images"]);
        table.push(vec![ctx.train.len().to_string()]);
        Findings {
            setup: "one table".into(),
            rule: "always supported",
            verdict: Verdict::Supported,
            evidence: "it ran".into(),
            figures: Vec::new(),
            tables: vec![table],
        }
    }

    fn first(ctx: &Context) -> Result<Findings> {
        Ok(findings("first.csv", ctx))
    }

    fn last(ctx: &Context) -> Result<Findings> {
        Ok(findings("last.csv", ctx))
    }

    fn fails(_: &Context) -> Result<Findings> {
        Err(anyhow::anyhow!("shape <3, 32, 32> & [1, 28, 28]")).context("building the model")
    }

    fn panics(_: &Context) -> Result<Findings> {
        panic!("index 9 out of bounds")
    }

    fn experiment(name: &'static str, run: fn(&Context) -> Result<Findings>) -> Experiment {
        Experiment {
            name,
            title: "A test experiment",
            claim: "It runs.",
            run,
        }
    }

    #[test]
    fn failing_experiments_are_reported_and_the_others_kept() -> Result<()> {
        let suite = [
            experiment("first", first),
            experiment("broken", fails),
            experiment("panicky", panics),
            experiment("last", last),
        ];
        let refs: Vec<&Experiment> = suite.iter().collect();
        let data = Dataset {
            images: vec![0.5; 4],
            labels: vec![0, 1, 0, 1],
            channels: 1,
            height: 1,
            width: 1,
            classes: 2,
        };
        let settings = Settings {
            profile: Profile::Smoke,
            seed: 0,
            data: "four images".into(),
            progress: false,
        };
        let dir = tempfile::tempdir()?;
        let written = run_and_write(&refs, &settings, &data, &data, dir.path())?;
        assert_eq!(
            written.failures(),
            [
                (
                    "broken",
                    "building the model: shape <3, 32, 32> & [1, 28, 28]"
                ),
                ("panicky", "panicked: index 9 out of bounds")
            ]
        );
        assert_eq!(written.index, dir.path().join("index.html"));
        let html = std::fs::read_to_string(&written.index)?;
        for name in ["first", "broken", "panicky", "last"] {
            assert!(html.contains(&format!("<section id=\"{name}\"")), "{name}");
            assert!(html.contains(&format!("<a href=\"#{name}\">")), "{name}");
        }
        // The error, escaped, in the claims table and in the section.
        let escaped = "building the model: shape &lt;3, 32, 32&gt; &amp; [1, 28, 28]";
        assert_eq!(html.matches(escaped).count(), 2, "{html}");
        assert!(!html.contains("<3, 32"));
        assert_eq!(html.matches("class=\"verdict failed\">failed<").count(), 4);
        assert_eq!(html.matches("class=\"verdict supported\">").count(), 4);
        // The experiments that ran wrote their files.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("last.csv"))?,
            "images\n4\n"
        );
        assert!(dir.path().join("first.csv").exists());
        Ok(())
    }
}

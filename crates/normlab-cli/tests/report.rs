//! `normlab report --profile smoke`: the page holds every experiment with its
//! plots, data files and verdict, references nothing outside itself, and
//! renders in a real browser (headless Chromium) with its plots visible.

use std::path::Path;
use std::process::Command;

mod common;

use common::{verdicts, EXPERIMENTS};

/// The values of `attr="..."` in `html`, in order.
fn attribute_values<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
    let key = format!("{attr}=\"");
    html.match_indices(&key)
        .map(|(i, _)| {
            let rest = &html[i + key.len()..];
            &rest[..rest.find('"').unwrap_or(0)]
        })
        .collect()
}

fn check_html(dir: &Path) -> String {
    let html = std::fs::read_to_string(dir.join("index.html")).expect("index.html written");
    assert!(html.starts_with("<!DOCTYPE html>"));
    // Every experiment has its section, its row in the claims table and a verdict.
    for name in EXPERIMENTS {
        assert!(
            html.contains(&format!("<section id=\"{name}\"")),
            "no section for {name}"
        );
        assert!(
            html.contains(&format!("<a href=\"#{name}\">")),
            "no claims-table link to {name}"
        );
    }
    let verdicts = verdicts(&html);
    // One in the claims table and one in the section, per experiment.
    assert_eq!(verdicts.len(), 2 * EXPERIMENTS.len(), "{verdicts:?}");
    for v in &verdicts {
        assert!(
            ["supported", "not supported", "inconclusive"].contains(v),
            "verdict `{v}`"
        );
    }
    // Every plot is inline, has data, and its SVG file and the CSV files exist.
    let points = attribute_values(&html, "data-points");
    let files = attribute_values(&html, "data-file");
    assert!(points.len() >= EXPERIMENTS.len(), "{} plots", points.len());
    assert_eq!(points.len(), files.len());
    assert_eq!(html.matches("<svg").count(), points.len());
    for (file, n) in files.iter().zip(&points) {
        let n: usize = n.parse().unwrap();
        assert!(n > 0, "{file} has no data");
        let svg = std::fs::read_to_string(dir.join(file)).unwrap();
        assert!(svg.contains("<polyline") || svg.contains("<rect"), "{file}");
    }
    for name in EXPERIMENTS {
        let csv = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|f| f.starts_with(name) && f.ends_with(".csv"))
            .count();
        assert!(csv > 0, "no CSV for {name}");
    }
    // Self-contained: no scripts, stylesheets, images or links elsewhere
    // (the SVG namespace URI is a name, not a reference).
    for attr in ["src", "href"] {
        for v in attribute_values(&html, attr) {
            assert!(v.starts_with('#'), "{attr}=\"{v}\" points outside the page");
        }
    }
    assert!(!html.contains("<script"));
    assert!(!html.contains("<link"));
    html
}

fn chromium() -> String {
    if let Ok(path) = std::env::var("NORMLAB_CHROMIUM") {
        return path;
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if found {
            return name.to_string();
        }
    }
    panic!(
        "no Chromium found: ./scripts/test installs Debian's `chromium`, or set NORMLAB_CHROMIUM"
    );
}

/// Screenshot of the page's first 1280×2600 pixels: the claims table and the
/// first experiment's plots.
fn screenshot(index: &Path, png: &Path) -> (u32, u32, Vec<u8>) {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,2600",
        ])
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", index.display()))
        .output()
        .expect("running chromium");
    assert!(
        png.exists(),
        "chromium wrote no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let rgb: Vec<u8> = buf[..info.buffer_size()]
        .chunks(channels)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width, info.height, rgb)
}

#[test]
fn smoke_report_is_complete_and_renders_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args(["report", "--profile", "smoke", "--quiet", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index = dir.path().join("index.html");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        index.display().to_string()
    );
    check_html(dir.path());

    let (w, h, rgb) = screenshot(&index, &dir.path().join("shot.png"));
    assert_eq!((w, h), (1280, 2600));
    let pixels = rgb.chunks(3);
    let total = (w * h) as usize;
    let non_white = pixels
        .clone()
        .filter(|p| p.iter().any(|&c| c < 235))
        .count();
    // Saturated colours: the plot lines, the verdict colours, links; text
    // and table borders are grey.
    let coloured = pixels
        .filter(|p| {
            let max = *p.iter().max().unwrap() as i32;
            let min = *p.iter().min().unwrap() as i32;
            max - min > 80
        })
        .count();
    assert!(
        non_white > total / 50,
        "the page looks blank: {non_white} of {total} pixels are not white"
    );
    assert!(
        coloured > 2_000,
        "no plots visible: only {coloured} coloured pixels"
    );
}

#[test]
fn an_unknown_experiment_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args(["experiment", "nope", "--profile", "smoke", "--quiet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown experiment `nope`") && err.contains("gradient_mixing"),
        "{err}"
    );
}

/// Runs one experiment in the smoke profile and returns its CSV text.
fn experiment_csv(name: &str, seed: &str, file: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args([
            "experiment",
            name,
            "--profile",
            "smoke",
            "--quiet",
            "--seed",
            seed,
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.path().join(file)).unwrap()
}

#[test]
fn runs_are_reproducible_from_their_seed() {
    // Measurements without wall-clock columns.
    let a = experiment_csv("gradient_mixing", "5", "gradient_mixing.csv");
    let b = experiment_csv("gradient_mixing", "5", "gradient_mixing.csv");
    let c = experiment_csv("gradient_mixing", "6", "gradient_mixing.csv");
    assert!(a.lines().count() > 3, "{a}");
    assert_eq!(a, b, "same seed, same numbers");
    assert_ne!(a, c, "another seed, other numbers");
}

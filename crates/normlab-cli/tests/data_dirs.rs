//! `normlab report --data-dir` on data sets other than the embedded MNIST
//! test set: every experiment sizes its networks from the data, and an
//! experiment the data cannot serve fails alone, in the report and in the
//! exit status.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

mod common;

use common::{verdicts, EXPERIMENTS};

/// A learnable image of `class`: a bright band whose position depends on
/// the class, over pseudo-random noise from `state`.
fn image(class: u8, channels: usize, side: usize, state: &mut u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(channels * side * side);
    for c in 0..channels {
        for y in 0..side {
            for x in 0..side {
                *state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = (*state >> 58) as u8; // 0..64
                let band =
                    (y * 10 / side == class as usize) || (x * 10 / side + c) % 10 == class as usize;
                v.push(if band { 160 + noise } else { noise });
            }
        }
    }
    v
}

fn labels(n: usize, salt: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 7 + salt) % 10) as u8).collect()
}

fn cifar_batch(n: usize, salt: usize) -> Vec<u8> {
    let mut state = salt as u64;
    let mut bytes = Vec::new();
    for l in labels(n, salt) {
        bytes.push(l);
        bytes.extend(image(l, 3, 32, &mut state));
    }
    bytes
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// `PREFIX-images-idx3-ubyte.gz` and `PREFIX-labels-idx1-ubyte.gz` with `n`
/// images of `side`×`side` pixels.
fn write_idx(dir: &Path, prefix: &str, n: usize, side: usize, salt: usize) {
    let ls = labels(n, salt);
    let mut state = salt as u64;
    let mut images = Vec::new();
    for x in [2051u32, n as u32, side as u32, side as u32] {
        images.extend(x.to_be_bytes());
    }
    for &l in &ls {
        images.extend(image(l, 1, side, &mut state));
    }
    let mut label_file = Vec::new();
    for x in [2049u32, n as u32] {
        label_file.extend(x.to_be_bytes());
    }
    label_file.extend(&ls);
    std::fs::write(
        dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
        gz(&images),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
        gz(&label_file),
    )
    .unwrap();
}

fn normlab(args: &[&str], data: &Path, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args(args)
        .args(["--profile", "smoke", "--quiet", "--data-dir"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

/// Runs the smoke report on `data` and checks it is complete, without failures.
fn complete_report(data: &Path, held_out: &str) {
    let out = tempfile::tempdir().unwrap();
    let run = normlab(&["report"], data, out.path());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let html = std::fs::read_to_string(out.path().join("index.html")).unwrap();
    for name in EXPERIMENTS {
        assert!(
            html.contains(&format!("<section id=\"{name}\"")),
            "no section for {name}"
        );
    }
    let verdicts = verdicts(&html);
    assert_eq!(verdicts.len(), 2 * EXPERIMENTS.len(), "{verdicts:?}");
    for v in &verdicts {
        assert!(
            ["supported", "not supported", "inconclusive"].contains(v),
            "verdict `{v}`: {stderr}"
        );
    }
    assert!(
        html.contains(held_out),
        "the data line should say `{held_out}`"
    );
}

#[test]
fn the_smoke_report_runs_on_a_cifar10_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data_batch_1.bin"), cifar_batch(600, 1)).unwrap();
    std::fs::write(dir.path().join("test_batch.bin"), cifar_batch(200, 2)).unwrap();
    complete_report(
        dir.path(),
        "600 training images and the directory's own 200 held-out images",
    );
}

#[test]
fn the_smoke_report_runs_on_20_by_20_idx_images() {
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "train", 600, 20, 3);
    write_idx(dir.path(), "t10k", 200, 20, 4);
    complete_report(
        dir.path(),
        "600 training images and the directory's own 200 held-out images",
    );
}

#[test]
fn an_experiment_the_data_cannot_serve_fails_alone_and_visibly() {
    // 2×2 images: the MLPs are fine, a CNN's two max-pools leave nothing.
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "train", 200, 2, 5);
    let out = tempfile::tempdir().unwrap();
    let run = normlab(&["experiment", "batch_size"], dir.path(), out.path());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: experiment batch_size failed:")
            && stderr.contains("2×2 images are too small"),
        "{stderr}"
    );
    let index = out.path().join("index.html");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        index.display().to_string()
    );
    let html = std::fs::read_to_string(index).unwrap();
    assert!(html.contains("<section id=\"batch_size\""));
    assert!(html.contains("class=\"verdict failed\">failed<"));
    assert!(html.contains("2×2 images are too small"));
}

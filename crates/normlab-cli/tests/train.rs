//! `normlab train`: a tiny run prints its JSON summary and saves the model
//! under PyTorch's names; bad options are clear errors.

use std::process::Command;

fn normlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_normlab"))
}

#[test]
fn a_tiny_run_reports_and_saves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let out = normlab()
        .args([
            "train",
            "--model",
            "mlp",
            "--depth",
            "3",
            "--width",
            "16",
            "--norm",
            "batch",
            "--steps",
            "20",
            "--batch-size",
            "32",
            "--seed",
            "3",
            "--json",
            "--save",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let summary: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(summary["steps"], 20);
    assert_eq!(summary["diverged"], false);
    let accuracy = summary["held_out_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.3, "accuracy {accuracy} after 20 steps");
    let file = std::fs::read(&path).unwrap();
    let names: Vec<String> = safetensors_names(&file);
    for n in [
        "blocks.0.norm.running_mean",
        "blocks.0.norm.num_batches_tracked",
        "blocks.2.linear.weight",
        "head.bias",
    ] {
        assert!(names.iter().any(|k| k == n), "{n} not in {names:?}");
    }
}

/// Tensor names from a safetensors header (8-byte length, then JSON).
fn safetensors_names(bytes: &[u8]) -> Vec<String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

#[test]
fn bad_options_are_clear_errors() {
    for (args, message) in [
        (
            &["train", "--norm", "instance"][..],
            "needs spatial positions",
        ),
        (
            &["train", "--norm", "group5", "--width", "16"][..],
            "not divisible by 5",
        ),
        (
            &["train", "--init", "normal:abc"][..],
            "SIGMA is not a number",
        ),
        (&["train", "--norm", "weird"][..], "unknown normalization"),
        (
            &["train", "--data-dir", "/no/such/dir"][..],
            "no data set found",
        ),
    ] {
        let out = normlab().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn epochs_count_passes_over_the_training_images() {
    let out = normlab()
        .args(["train", "--epochs", "1", "--batch-size", "400", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    // 8,000 training images in batches of 400.
    assert_eq!(summary["steps"], 20);
    let clash = normlab()
        .args(["train", "--epochs", "1", "--steps", "5"])
        .output()
        .unwrap();
    assert!(!clash.status.success());
}

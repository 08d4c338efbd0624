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

/// Runs `normlab train` on a tiny network with `extra` options.
fn tiny_run(extra: &[&str]) -> std::process::Output {
    normlab()
        .args([
            "train",
            "--depth",
            "2",
            "--width",
            "16",
            "--batch-size",
            "32",
            "--json",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_diverged_run_says_so_exits_3_and_saves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    for norm in ["layer", "none"] {
        let save = path.to_str().unwrap();
        let out = tiny_run(&[
            "--norm", norm, "--lr", "1e6", "--steps", "30", "--save", save,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "--norm {norm}: {stderr}");
        assert!(stderr.contains("the run diverged"), "{stderr}");
        assert!(
            stderr.contains("--save") && stderr.contains("not written"),
            "{stderr}"
        );
        let summary: serde_json::Value =
            serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
        assert_eq!(summary["diverged"], true, "--norm {norm}");
        assert!(summary["divergence"].is_string(), "{summary}");
        assert!(
            summary["steps"].as_u64().unwrap() < 30,
            "stopped early: {summary}"
        );
        assert!(!path.exists(), "--norm {norm}: nothing saved");
    }
}

#[test]
fn batch_norm_meeting_non_finite_statistics_is_a_divergence() {
    let out = tiny_run(&["--norm", "batch", "--lr", "1e6", "--steps", "30"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("the run diverged") && stderr.contains("statistics"),
        "{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(summary["diverged"], true);
    assert!(
        summary["divergence"]
            .as_str()
            .is_some_and(|d| d.contains("statistics")),
        "{summary}"
    );
}

#[test]
fn save_refuses_special_files_before_training() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    for (path, message) in [
        (&fifo, "is a FIFO, not a regular file"),
        (&link, "is a symbolic link to"),
        (&dir.path().to_path_buf(), "is a directory"),
    ] {
        let out = normlab()
            .args(["train", "--depth", "2", "--width", "8", "--save"])
            .arg(path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("--save") && stderr.contains(message),
            "{stderr}"
        );
        assert!(out.stdout.is_empty(), "no training: {stderr}");
    }
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn save_replaces_a_regular_file_with_the_usual_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    std::fs::write(&path, b"old").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = normlab()
        .args([
            "train", "--depth", "2", "--width", "8", "--steps", "3", "--save",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    assert!(safetensors_names(&bytes).iter().any(|n| n == "head.weight"));
    // The child inherits this process's umask.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
        .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666 & !umask, "mode {mode:o}");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary file left");
}

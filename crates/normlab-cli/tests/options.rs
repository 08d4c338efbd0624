//! Every numeric option of `normlab train` and `normlab bench` is checked
//! against its documented range before any work: out-of-range values are
//! errors (exit status 2) naming the option and the value, never a panic,
//! an abort, a wrapped count or an unbounded allocation.

use std::process::{Command, Output};

fn normlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args(args)
        .output()
        .unwrap()
}

/// Asserts exit status 2 and every one of `needles` in stderr.
fn refused(args: &[&str], needles: &[&str]) {
    let out = normlab(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{args:?}: `{needle}` not in {stderr}"
        );
    }
    assert!(out.stdout.is_empty(), "{args:?}: nothing is reported");
}

#[test]
fn out_of_range_train_options_name_the_option_and_the_value() {
    for (args, needles) in [
        (
            &["--steps", "18446744073709551615"][..],
            &["--steps", "18446744073709551615"][..],
        ),
        (&["--steps", "1000000000000"], &["--steps", "1000000000000"]),
        (&["--steps", "0"], &["--steps", "0 is not in 1..=10000000"]),
        (
            &["--epochs", "147573952589676413"],
            &["--epochs", "147573952589676413"],
        ),
        (&["--epochs", "0"], &["--epochs"]),
        (&["--width", "2000000000"], &["--width", "2000000000"]),
        (&["--width", "0"], &["--width"]),
        (&["--depth", "1000000"], &["--depth", "1000000"]),
        (&["--depth", "0"], &["--depth"]),
        (&["--batch-size", "0"], &["--batch-size"]),
        (&["--batch-size", "100000"], &["--batch-size", "100000"]),
        (&["--momentum=-5"], &["--momentum", "-5 is not in [0, 1)"]),
        (&["--momentum", "-5"], &["--momentum", "-5"]),
        (&["--momentum", "1"], &["--momentum", "1 is not in [0, 1)"]),
        (&["--momentum", "NaN"], &["--momentum", "NaN"]),
        (&["--lr", "0"], &["--lr", "0 is not in (0, 1e6]"]),
        (&["--lr", "-0.1"], &["--lr", "-0.1"]),
        (&["--lr", "inf"], &["--lr", "inf"]),
        (&["--lr", "NaN"], &["--lr", "NaN"]),
        (&["--lr", "1e7"], &["--lr", "1e7"]),
        (&["--lr", "fast"], &["--lr", "`fast` is not a number"]),
        (
            &["--init", "normal:1e300"],
            &["--init normal:1e300", "(0, 1e6]"],
        ),
        (&["--init", "normal:inf"], &["--init normal:inf"]),
    ] {
        let mut all = vec!["train"];
        all.extend_from_slice(args);
        refused(&all, needles);
    }
}

#[test]
fn epochs_times_steps_per_epoch_is_bounded_like_steps() {
    // 8,000 training images one at a time: 8·10⁸ steps.
    refused(
        &["train", "--epochs", "100000", "--batch-size", "1"],
        &["--epochs 100000", "8000 steps", "10000000"],
    );
}

#[test]
fn a_network_too_large_for_the_memory_is_refused_before_allocating() {
    if !std::path::Path::new("/proc/meminfo").exists() {
        return;
    }
    refused(
        &["train", "--depth", "1024", "--width", "65536"],
        &["depth 1024 and width 65536", "GiB of memory"],
    );
    refused(
        &[
            "train", "--model", "cnn", "--depth", "64", "--width", "65536",
        ],
        &["width 65536", "GiB of memory"],
    );
}

#[test]
fn out_of_range_bench_options_are_refused() {
    refused(
        &["bench", "--threads", "1000000", "--list"],
        &["--threads", "1000000 is not in 1..=1024"],
    );
    refused(&["bench", "--threads", "0"], &["--threads"]);
    refused(&["bench", "--runs", "5"], &["--runs", "5"]);
    refused(&["bench", "--runs", "100000"], &["--runs", "100000"]);
}

#[test]
fn help_documents_the_ranges_and_the_exit_status() {
    let out = normlab(&["train", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "1 to 1024",
        "1 to 65536",
        "1 to 10000000",
        "1 to 100000",
        "in [0, 1)",
        "in (0, 1e6]",
        "3 when the run diverged",
    ] {
        assert!(help.contains(needle), "`{needle}` not in {help}");
    }
    let out = normlab(&["bench", "--help"]);
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(
        help.contains("1 to 1024") && help.contains("10 to 1000"),
        "{help}"
    );
}

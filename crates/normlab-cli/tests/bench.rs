//! `normlab bench` times a case whether the kernels are called from one of
//! the pool's workers (the default) or from a thread outside the pool
//! (`--outside-pool`), and reports it as one JSON object per line.

use std::process::Command;

fn bench_json(extra: &[&str]) -> Vec<serde_json::Value> {
    let case = "batch_norm_eval 1x2048x7x7 resnet50-stage4-1image";
    let mut args = vec!["bench", "--suite", "models", "--case", case];
    args.extend(["--runs", "10", "--threads", "2", "--json"]);
    args.extend(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["case"] == case)
        .collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line for the case");
    lines
}

#[test]
fn a_case_is_timed_from_inside_and_from_outside_the_pool() {
    for extra in [&[][..], &["--outside-pool"][..]] {
        let line = &bench_json(extra)[0];
        for key in ["fwd_ms", "fwd_into_ms", "bwd_ms"] {
            let ms = line[key].as_f64().unwrap_or(f64::NAN);
            assert!(ms > 0.0 && ms.is_finite(), "{extra:?} {key}: {line}");
        }
    }
}

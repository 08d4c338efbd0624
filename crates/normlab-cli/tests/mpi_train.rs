//! Data-parallel `normlab train` under mpirun (built with `--features mpi`):
//! with SyncBatchNorm, 3 ranks (and 2) save the same tensors as one process.

#![cfg(feature = "mpi")]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};

const TRAIN: [&str; 14] = [
    "train",
    "--model",
    "mlp",
    "--depth",
    "6",
    "--width",
    "64",
    "--norm",
    "sync-batch",
    "--batch-size",
    "60",
    "--steps",
    "20",
    "--seed",
];

fn train(np: Option<usize>, save: &Path) {
    let bin = env!("CARGO_BIN_EXE_normlab");
    let mut cmd = match np {
        Some(np) => {
            let mut c = Command::new("mpirun");
            c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
                .args(["-np", &np.to_string(), "--oversubscribe", bin]);
            c
        }
        None => Command::new(bin),
    };
    let out = cmd
        .args(TRAIN)
        .args(["3", "--json", "--save"])
        .arg(save)
        .output()
        .expect("mpirun not found: ./scripts/test installs Open MPI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Only rank 0 reports.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["ranks"], np.unwrap_or(1));
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Largest |a − b| / (|b| + 1e-2): a relative difference, with a floor
/// for values that are mathematically zero. The bias of a linear layer
/// followed by BatchNorm gets no gradient (the normalization removes it) and
/// holds rounding noise of about 1e-8, whose relative difference means
/// nothing; the floor makes that noise count as 1e-6.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let values = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (values(a), values(b));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (y.abs() + 1e-2))
        .fold(0.0, f64::max)
}

#[test]
fn three_and_two_ranks_save_what_one_process_saves() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one.safetensors");
    train(None, &one);
    let one = load(&one);
    assert!(one.contains_key("blocks.0.norm.running_mean"));
    for np in [3, 2] {
        let path = dir.path().join(format!("ranks{np}.safetensors"));
        train(Some(np), &path);
        let many = load(&path);
        assert_eq!(many.len(), one.len());
        for (name, b) in &one {
            let d = relative(&many[name], b);
            assert!(d <= 1e-4, "{np} ranks, {name}: relative difference {d:e}");
        }
    }
}

//! SyncBatchNorm over MPI, under `mpirun` with 2 and 3 processes (uneven
//! shards, one empty), and a panicking rank that must abort the job.
//!
//! Needs Open MPI (`mpirun`); `./scripts/test` installs it.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn mpirun(np: usize, args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new("mpirun")
        // Open MPI refuses root without these, and 3 ranks on 2 cores need
        // --oversubscribe.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["-np", &np.to_string(), "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_normlab-mpi-check"))
        .args(args)
        .output()
        .expect("mpirun not found: ./scripts/test installs Open MPI (openmpi-bin)");
    (out, start.elapsed())
}

fn assert_ranks_agree(np: usize, shards: &str) {
    let (out, _) = mpirun(np, &["--shards", shards]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rank in 0..np {
        assert!(
            stdout.contains(&format!("rank {rank}/{np} ")),
            "rank {rank} did not report: {stdout}"
        );
    }
    assert_eq!(stdout.matches("matches BatchNorm").count(), np, "{stdout}");
}

#[test]
fn two_ranks_with_uneven_shards() {
    assert_ranks_agree(2, "2,5");
}

#[test]
fn three_ranks_with_an_empty_shard() {
    assert_ranks_agree(3, "3,0,4");
}

#[test]
fn a_panic_on_one_rank_aborts_the_job() {
    let (out, took) = mpirun(2, &["--panic-on-rank", "1"]);
    assert!(!out.status.success(), "the job should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rank 1 panicked; aborting the job"),
        "{stderr}"
    );
    // Rank 0 waits in a collective: only the abort ends it.
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

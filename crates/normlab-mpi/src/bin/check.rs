//! `normlab-mpi-check`: run under `mpirun` to check a set-up. Every rank
//! takes its shard of a deterministic batch (sizes from `--shards`, one per
//! rank, zeros allowed), runs SyncBatchNorm forward and backward for a few
//! steps, and compares with BatchNorm on the whole batch: its slice of the
//! output and input gradient, γ/β gradients summed over ranks, and the
//! running statistics. Exits 0 when all agree within 1e-5.
//!
//! ```text
//! mpirun -np 3 normlab-mpi-check --shards 3,0,4
//! ```
//!
//! `--panic-on-rank R` makes rank R panic mid-run, to see the job abort
//! rather than hang.

use std::process::ExitCode;

use normlab::layers::prelude::*;
use normlab::layers::{BatchNormConfig, SyncBatchNorm};
use normlab::Tensor;

const C: usize = 4;
const S: usize = 6;
const TOLERANCE: f64 = 1e-5;

/// Deterministic values with a per-channel offset, the same on every rank.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n * C * S)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            (5.0 * ((i / S) % C) as f64 + 2.0 * (u - 0.5)) as f32
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs() / (1.0 + (*y as f64).abs()))
        .fold(0.0, f64::max)
}

fn run() -> Result<f64, String> {
    let mut shards: Option<Vec<usize>> = None;
    let mut panic_rank: Option<usize> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--shards" => {
                let v = args.next().ok_or("--shards needs a value like 3,0,4")?;
                shards = Some(
                    v.split(',')
                        .map(|s| {
                            s.trim()
                                .parse()
                                .map_err(|_| format!("bad shard size `{s}`"))
                        })
                        .collect::<Result<_, _>>()?,
                );
            }
            "--panic-on-rank" => {
                let v = args.next().ok_or("--panic-on-rank needs a rank")?;
                panic_rank = Some(v.parse().map_err(|_| format!("bad rank `{v}`"))?);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    let mpi = normlab_mpi::Mpi::init().map_err(|e| e.to_string())?;
    let comm = mpi.communicator();
    let (rank, size) = (comm.rank(), comm.size());
    let shards = shards.unwrap_or_else(|| (0..size).map(|r| r + 2).collect());
    if shards.len() != size {
        return Err(format!("{} shard sizes for {size} ranks", shards.len()));
    }
    let total: usize = shards.iter().sum();
    let start: usize = shards[..rank].iter().sum();
    let len = shards[rank];
    let mut sync: SyncBatchNorm<f32> = BatchNormConfig::new(C)
        .init_sync(comm.clone())
        .map_err(|e| e.to_string())?;
    let mut whole = BatchNormConfig::new(C)
        .init::<f32>()
        .map_err(|e| e.to_string())?;
    let mut worst = 0.0f64;
    for step in 0..3u64 {
        if panic_rank == Some(rank) && step == 1 {
            panic!("rank {rank} panics on purpose (--panic-on-rank)");
        }
        let (all_x, all_dy) = (values(total, step), values(total, 100 + step));
        let cut = |v: &[f32]| v[start * C * S..(start + len) * C * S].to_vec();
        let shape = |n: usize| vec![n, C, S];
        let x = Tensor::new(shape(len), cut(&all_x)).map_err(|e| e.to_string())?;
        let dy = Tensor::new(shape(len), cut(&all_dy)).map_err(|e| e.to_string())?;
        let out = sync.forward(&x).map_err(|e| e.to_string())?;
        let g = sync.backward(&x, &out, &dy).map_err(|e| e.to_string())?;

        let wx = Tensor::new(shape(total), all_x.clone()).map_err(|e| e.to_string())?;
        let wdy = Tensor::new(shape(total), all_dy.clone()).map_err(|e| e.to_string())?;
        let wout = whole.forward(&wx).map_err(|e| e.to_string())?;
        let wg = whole
            .backward(&wx, &wout, &wdy)
            .map_err(|e| e.to_string())?;

        worst = worst.max(max_diff(out.y.data(), &cut(wout.y.data())));
        worst = worst.max(max_diff(g.dx.data(), &cut(wg.dx.data())));
        for (local, global) in [
            (g.dweight.as_ref(), wg.dweight.as_ref()),
            (g.dbias.as_ref(), wg.dbias.as_ref()),
        ] {
            let (local, global) = (
                local.ok_or("no γ/β gradient")?,
                global.ok_or("no γ/β gradient")?,
            );
            let mut summed: Vec<f64> = local.data().iter().map(|&v| v as f64).collect();
            comm.all_reduce_sum(&mut summed)
                .map_err(|e| e.to_string())?;
            let summed: Vec<f32> = summed.iter().map(|&v| v as f32).collect();
            worst = worst.max(max_diff(&summed, global.data()));
        }
        let running = |l: &[f32], w: &[f32]| max_diff(l, w);
        worst = worst.max(running(
            sync.running_mean().unwrap_or(&[]),
            whole.running_mean().unwrap_or(&[]),
        ));
        worst = worst.max(running(
            sync.running_var().unwrap_or(&[]),
            whole.running_var().unwrap_or(&[]),
        ));
    }
    // Running statistics must be bit-identical across ranks.
    let mine: Vec<f64> = sync
        .running_mean()
        .unwrap_or(&[])
        .iter()
        .chain(sync.running_var().unwrap_or(&[]))
        .map(|&v| v as f64)
        .collect();
    let all = comm.all_gather(&mine).map_err(|e| e.to_string())?;
    if all.chunks(mine.len().max(1)).any(|r| r != mine.as_slice()) {
        return Err("running statistics differ between ranks".into());
    }
    if worst > TOLERANCE {
        return Err(format!("SyncBatchNorm differs from BatchNorm by {worst:e}"));
    }
    println!(
        "rank {rank}/{size} (shard {len} of {total}): SyncBatchNorm matches BatchNorm on the whole batch, max relative difference {worst:.2e}"
    );
    Ok(worst)
}

fn main() -> ExitCode {
    match run() {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("normlab-mpi-check: {e}");
            ExitCode::FAILURE
        }
    }
}

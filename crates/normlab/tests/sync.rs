//! SyncBatchNorm over ranks (threads of a [`ThreadGroup`]) equals BatchNorm
//! on the concatenated batch: outputs, input gradients, parameter gradients
//! summed over ranks, and running statistics — with uneven shards and ranks
//! whose shard is empty. Evaluation communicates nothing.

use std::sync::Arc;

use normlab::layers::prelude::*;
use normlab::layers::{BatchNormConfig, SyncBatchNorm};
use normlab::{Communicator, Mode, NormError, Tensor, ThreadGroup};

const C: usize = 3;
const S: usize = 5;

/// Deterministic pseudo-random values with a large offset per channel.
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n * C * S)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            let channel = (i / S) % C;
            10.0 * channel as f64 + 3.0 * (u - 0.5)
        })
        .collect()
}

fn config() -> BatchNormConfig {
    BatchNormConfig::new(C)
}

/// Per rank: y, dx, dweight, dbias, running mean, running var, batches tracked.
type RankResult = (
    Vec<f64>,
    Vec<f64>,
    Vec<f64>,
    Vec<f64>,
    Vec<f64>,
    Vec<f64>,
    i64,
);

fn run_ranks(shards: &[usize], steps: usize) -> Vec<RankResult> {
    let total: usize = shards.iter().sum();
    let group = ThreadGroup::new(shards.len()).unwrap();
    let handles: Vec<_> = group
        .into_iter()
        .map(|comm| {
            let shards = shards.to_vec();
            std::thread::spawn(move || {
                let rank = comm.rank();
                let start: usize = shards[..rank].iter().sum();
                let len = shards[rank];
                let mut layer: SyncBatchNorm<f64> = config().init_sync(Arc::new(comm)).unwrap();
                let mut last = None;
                for step in 0..steps {
                    let all_x = values(total, step as u64);
                    let all_dy = values(total, 100 + step as u64);
                    let slice = |v: &[f64]| v[start * C * S..(start + len) * C * S].to_vec();
                    let x = Tensor::new(vec![len, C, S], slice(&all_x)).unwrap();
                    let dy = Tensor::new(vec![len, C, S], slice(&all_dy)).unwrap();
                    let out = layer.forward(&x).unwrap();
                    let g = layer.backward(&x, &out, &dy).unwrap();
                    last = Some((
                        out.y.data().to_vec(),
                        g.dx.data().to_vec(),
                        g.dweight.unwrap().data().to_vec(),
                        g.dbias.unwrap().data().to_vec(),
                    ));
                }
                let (y, dx, dw, db) = last.unwrap();
                (
                    y,
                    dx,
                    dw,
                    db,
                    layer.running_mean().unwrap().to_vec(),
                    layer.running_var().unwrap().to_vec(),
                    layer.num_batches_tracked().unwrap(),
                )
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-9 * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

fn check(shards: &[usize]) {
    let steps = 3;
    let total: usize = shards.iter().sum();
    let ranks = run_ranks(shards, steps);
    let mut bn = config().init::<f64>().unwrap();
    let mut expected = None;
    for step in 0..steps {
        let x = Tensor::new(vec![total, C, S], values(total, step as u64)).unwrap();
        let dy = Tensor::new(vec![total, C, S], values(total, 100 + step as u64)).unwrap();
        let out = bn.forward(&x).unwrap();
        expected = Some((out.y.clone(), bn.backward(&x, &out, &dy).unwrap()));
    }
    let (y, g) = expected.unwrap();
    let cat = |k: usize| -> Vec<f64> {
        ranks
            .iter()
            .flat_map(|r| match k {
                0 => r.0.clone(),
                _ => r.1.clone(),
            })
            .collect()
    };
    close(&cat(0), y.data(), "y");
    close(&cat(1), g.dx.data(), "dx");
    let sum = |f: fn(&RankResult) -> &Vec<f64>| -> Vec<f64> {
        (0..C)
            .map(|c| ranks.iter().map(|r| f(r)[c]).sum())
            .collect()
    };
    close(
        &sum(|r| &r.2),
        g.dweight.unwrap().data(),
        "dweight summed over ranks",
    );
    close(
        &sum(|r| &r.3),
        g.dbias.unwrap().data(),
        "dbias summed over ranks",
    );
    for r in &ranks {
        // Identical on every rank, and equal to the single-process layer's.
        assert_eq!(r.4, ranks[0].4);
        assert_eq!(r.5, ranks[0].5);
        close(&r.4, bn.running_mean().unwrap(), "running_mean");
        close(&r.5, bn.running_var().unwrap(), "running_var");
        assert_eq!(r.6, steps as i64);
    }
}

#[test]
fn two_ranks_with_uneven_shards() {
    check(&[2, 5]);
}

#[test]
fn three_ranks_with_an_empty_shard() {
    check(&[3, 0, 4]);
}

#[test]
fn one_value_over_all_ranks_is_an_error_on_every_rank() {
    let group = ThreadGroup::new(2).unwrap();
    let handles: Vec<_> = group
        .into_iter()
        .map(|comm| {
            std::thread::spawn(move || {
                let n = if comm.rank() == 0 { 1 } else { 0 };
                let mut layer: SyncBatchNorm<f32> =
                    BatchNormConfig::new(1).init_sync(Arc::new(comm)).unwrap();
                let x = Tensor::new(vec![n, 1], vec![1.0f32; n]).unwrap();
                let err = layer.forward(&x).unwrap_err();
                (err, layer.num_batches_tracked().unwrap())
            })
        })
        .collect();
    for h in handles {
        let (err, tracked) = h.join().unwrap();
        assert!(matches!(err, NormError::TooFewValues { .. }), "{err}");
        assert_eq!(tracked, 0);
    }
}

/// A communicator that refuses every collective.
#[derive(Debug)]
struct Offline;

impl Communicator for Offline {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        2
    }
    fn all_gather(&self, _: &[f64]) -> normlab::Result<Vec<f64>> {
        Err(NormError::Communication {
            op: "all_gather",
            detail: "offline".into(),
        })
    }
}

#[test]
fn evaluation_communicates_nothing_and_training_reports_transport_errors() {
    let mut layer: SyncBatchNorm<f32> = config().init_sync(Arc::new(Offline)).unwrap();
    let x = Tensor::new(vec![2, C, S], vec![1.0f32; 2 * C * S]).unwrap();
    let err = layer.forward(&x).unwrap_err().to_string();
    assert!(err.contains("communication between ranks failed"), "{err}");
    assert_eq!(layer.num_batches_tracked(), Some(0));
    layer.set_mode(Mode::Eval);
    let out = layer.forward(&x).unwrap();
    let g = layer.backward(&x, &out, &x).unwrap();
    assert_eq!(out.y.shape(), x.shape());
    assert_eq!(g.dx.shape(), x.shape());
    // Converting back and forth keeps the state.
    let bn = layer.clone().into_batch_norm();
    assert_eq!(bn.running_mean(), layer.running_mean());
}

//! Communication between the ranks of a data-parallel job, for
//! synchronized statistics ([`crate::layers::SyncBatchNorm`]).
//!
//! A [`Communicator`] needs one collective, an all-gather of `f64` values;
//! sums and the combination of per-rank moments are built on it and computed
//! in rank order on every rank, so every rank gets bit-identical results
//! (running statistics and parameters stay equal across ranks). Every rank
//! must make the same sequence of calls, including ranks with an empty shard.
//!
//! Implementations here: [`SingleProcess`] (one rank) and [`ThreadGroup`]
//! (ranks as threads of one process). The `normlab-mpi` crate provides one
//! over MPI, for processes on one or several machines.

use std::sync::{Arc, Condvar, Mutex};

use crate::error::{NormError, Result};
use crate::moments::Moments;

/// The collectives a synchronized normalization needs.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn size(&self) -> usize;

    /// Every rank's `local` (all of the same length), concatenated in rank order.
    ///
    /// # Errors
    /// [`NormError::Communication`] when ranks disagree on the length or the
    /// transport fails.
    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>>;

    /// Element-wise sum over ranks, in place, added in rank order.
    ///
    /// # Errors
    /// As [`Self::all_gather`].
    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        let all = self.all_gather(values)?;
        sum_in_rank_order(&all, values);
        Ok(())
    }

    /// Each channel's moments over all ranks: Chan's parallel formula
    /// ([`Moments::merge`]) applied in rank order. Ranks with no values
    /// contribute count 0 and change nothing.
    ///
    /// # Errors
    /// As [`Self::all_gather`].
    fn combine_moments(&self, local: &[Moments]) -> Result<Vec<Moments>> {
        let packed: Vec<f64> = local.iter().flat_map(|m| [m.count, m.mean, m.m2]).collect();
        let all = self.all_gather(&packed)?;
        let mut combined = vec![Moments::EMPTY; local.len()];
        if !packed.is_empty() {
            for rank in all.chunks_exact(packed.len()) {
                for (c, m) in rank.chunks_exact(3).enumerate() {
                    combined[c] = combined[c].merge(Moments {
                        count: m[0],
                        mean: m[1],
                        m2: m[2],
                    });
                }
            }
        }
        Ok(combined)
    }
}

/// `out[i] = Σ_r all[r·len + i]`, ranks added in order.
fn sum_in_rank_order(all: &[f64], out: &mut [f64]) {
    out.iter_mut().for_each(|v| *v = 0.0);
    if out.is_empty() {
        return;
    }
    for rank in all.chunks_exact(out.len()) {
        for (o, v) in out.iter_mut().zip(rank) {
            *o += v;
        }
    }
}

/// One rank: collectives return the local values.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>> {
        Ok(local.to_vec())
    }
}

/// State of one all-gather round shared by the threads of a group.
#[derive(Debug, Default)]
struct Round {
    /// Completed rounds.
    generation: u64,
    /// Contributions of the round being filled.
    slots: Vec<Option<Vec<f64>>>,
    arrived: usize,
    /// Result of the last completed round, while its ranks read it.
    result: Option<std::result::Result<Arc<Vec<f64>>, String>>,
    /// Ranks that have not yet read the last result.
    readers_left: usize,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    round: Mutex<Round>,
    changed: Condvar,
}

/// Ranks as threads of one process: [`ThreadGroup::new`] makes one
/// communicator per rank, to be moved into its thread. Useful to run a
/// data-parallel computation, or test one, without MPI.
#[derive(Clone, Debug)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// Communicators for ranks `0..size` (size ≥ 1).
    ///
    /// # Errors
    /// `size` = 0.
    pub fn new(size: usize) -> Result<Vec<ThreadGroup>> {
        if size == 0 {
            return Err(NormError::InvalidArgument {
                op: "thread_group",
                arg: "size",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        let shared = Arc::new(Shared {
            size,
            round: Mutex::new(Round {
                slots: vec![None; size],
                ..Round::default()
            }),
            changed: Condvar::new(),
        });
        Ok((0..size)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }
}

fn poisoned<T>(_: T) -> NormError {
    NormError::Communication {
        op: "all_gather",
        detail: "another rank panicked during a collective".into(),
    }
}

impl Communicator for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>> {
        let shared = &*self.shared;
        let mut round = shared.round.lock().map_err(poisoned)?;
        // Wait until every rank has read the previous round's result.
        while round.readers_left > 0 {
            round = shared.changed.wait(round).map_err(poisoned)?;
        }
        let generation = round.generation;
        round.slots[self.rank] = Some(local.to_vec());
        round.arrived += 1;
        if round.arrived == shared.size {
            let parts: Vec<Vec<f64>> = round
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            let len = parts[0].len();
            round.result = Some(if parts.iter().all(|p| p.len() == len) {
                Ok(Arc::new(parts.concat()))
            } else {
                let lens: Vec<usize> = parts.iter().map(Vec::len).collect();
                Err(format!("ranks gave different lengths {lens:?}"))
            });
            round.arrived = 0;
            round.readers_left = shared.size;
            round.generation += 1;
            shared.changed.notify_all();
        } else {
            while round.generation == generation {
                round = shared.changed.wait(round).map_err(poisoned)?;
            }
        }
        let result = round
            .result
            .clone()
            .expect("a completed round has a result");
        round.readers_left -= 1;
        if round.readers_left == 0 {
            round.result = None;
            shared.changed.notify_all();
        }
        drop(round);
        match result {
            Ok(all) => Ok(all.to_vec()),
            Err(detail) => Err(NormError::Communication {
                op: "all_gather",
                detail,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_group_gathers_in_rank_order_round_after_round() {
        let group = ThreadGroup::new(3).unwrap();
        let handles: Vec<_> = group
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    for round in 0..50 {
                        let r = comm.rank() as f64;
                        seen.push(comm.all_gather(&[r, round as f64]).unwrap());
                        let mut v = [r + 1.0];
                        comm.all_reduce_sum(&mut v).unwrap();
                        assert_eq!(v, [6.0]);
                    }
                    seen
                })
            })
            .collect();
        for h in handles {
            for (round, got) in h.join().unwrap().into_iter().enumerate() {
                let t = round as f64;
                assert_eq!(got, vec![0.0, t, 1.0, t, 2.0, t]);
            }
        }
    }

    #[test]
    fn moments_combine_as_if_on_one_rank_including_empty_ranks() {
        let data = [1.0, 2.0, 4.0, 8.0, 16.0];
        let shards: [&[f64]; 3] = [&data[..2], &[], &data[2..]];
        let group = ThreadGroup::new(3).unwrap();
        let handles: Vec<_> = group
            .into_iter()
            .map(|comm| {
                let shard = shards[comm.rank()].to_vec();
                std::thread::spawn(move || {
                    let mut m = Moments::EMPTY;
                    shard.iter().for_each(|&v| m.push(v));
                    comm.combine_moments(&[m]).unwrap()[0]
                })
            })
            .collect();
        let mut whole = Moments::EMPTY;
        data.iter().for_each(|&v| whole.push(v));
        for h in handles {
            let m = h.join().unwrap();
            assert_eq!(m.count, 5.0);
            assert!((m.mean - whole.mean).abs() < 1e-12);
            assert!((m.m2 - whole.m2).abs() < 1e-9);
        }
    }

    #[test]
    fn ranks_that_disagree_on_the_length_get_an_error() {
        let group = ThreadGroup::new(2).unwrap();
        let handles: Vec<_> = group
            .into_iter()
            .map(|comm| std::thread::spawn(move || comm.all_gather(&vec![0.0; comm.rank() + 1])))
            .collect();
        for h in handles {
            let err = h.join().unwrap().unwrap_err().to_string();
            assert!(err.contains("different lengths"), "{err}");
        }
        assert!(ThreadGroup::new(0).is_err());
        assert_eq!(SingleProcess.all_gather(&[1.0]).unwrap(), vec![1.0]);
    }
}

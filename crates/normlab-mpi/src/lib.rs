//! normlab's [`Communicator`] over MPI: [`SyncBatchNorm`] and data-parallel
//! training across processes, on one machine or several.
//!
//! ```no_run
//! use std::sync::Arc;
//! use normlab::layers::{BatchNormConfig, SyncBatchNorm};
//! // Under `mpirun -np 4 ...`: every rank builds the same layer.
//! let mpi = normlab_mpi::Mpi::init().expect("MPI");
//! let mut bn: SyncBatchNorm<f32> = BatchNormConfig::new(64).init_sync(mpi.communicator()).unwrap();
//! # let _ = &mut bn;
//! ```
//!
//! Collectives are all-gathers whose results every rank sums or merges in
//! rank order, so results are bit-identical on every rank. MPI is
//! initialized with `MPI_THREAD_SERIALIZED`, and every call goes through one
//! lock. [`Mpi::init`] also makes a panic on any rank abort the whole job
//! (`MPI_Abort`) instead of leaving the other ranks waiting in a collective.
//!
//! [`SyncBatchNorm`]: normlab::layers::SyncBatchNorm

use std::sync::{Arc, Mutex, Once};

use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives as _};
use mpi::Threading;
use normlab::{Communicator, NormError, Result};

/// The MPI world communicator as a normlab [`Communicator`].
pub struct MpiCommunicator {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
}

impl std::fmt::Debug for MpiCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCommunicator")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

// SAFETY: MPI is initialized with at least MPI_THREAD_SERIALIZED (checked in
// `Mpi::init`), and every MPI call on the communicator is made while holding
// its mutex, so calls from different threads never overlap.
unsafe impl Send for MpiCommunicator {}
unsafe impl Sync for MpiCommunicator {}

fn transport(detail: impl Into<String>) -> NormError {
    NormError::Communication {
        op: "all_gather",
        detail: detail.into(),
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>> {
        let world = self
            .world
            .lock()
            .map_err(|_| transport("a thread panicked during a collective"))?;
        // Agree on the length first, so that a mismatch is an error rather
        // than undefined behaviour inside MPI.
        let len = local.len() as u64;
        let mut lens = vec![0u64; self.size];
        world.all_gather_into(&len, &mut lens[..]);
        if lens.iter().any(|&l| l != len) {
            return Err(transport(format!("ranks gave different lengths {lens:?}")));
        }
        let mut all = vec![0.0f64; local.len() * self.size];
        world.all_gather_into(local, &mut all[..]);
        Ok(all)
    }
}

/// An initialized MPI environment; MPI is finalized when it is dropped,
/// so keep it alive for the whole run.
pub struct Mpi {
    // Field order: the communicator goes before the universe finalizes MPI.
    comm: Arc<MpiCommunicator>,
    _universe: Universe,
}

static ABORT_HOOK: Once = Once::new();

impl Mpi {
    /// Initializes MPI (serialized threading) and installs a panic hook that
    /// aborts the whole job after printing the panic.
    ///
    /// # Errors
    /// MPI already initialized, or the library does not offer serialized
    /// threading.
    pub fn init() -> Result<Mpi> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| transport("MPI was already initialized"))?;
        if threading < Threading::Serialized {
            return Err(transport(format!(
                "the MPI library offers only {threading:?} threading; serialized is needed"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        ABORT_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                eprintln!("normlab-mpi: rank {rank} panicked; aborting the job");
                // SAFETY: MPI_Abort on the world communicator, which exists
                // for as long as MPI is initialized; it does not return.
                unsafe {
                    mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101);
                }
            }));
        });
        Ok(Mpi {
            comm: Arc::new(MpiCommunicator {
                world: Mutex::new(world),
                rank,
                size,
            }),
            _universe: universe,
        })
    }

    /// The world communicator.
    pub fn communicator(&self) -> Arc<dyn Communicator> {
        self.comm.clone()
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.comm.size
    }
}

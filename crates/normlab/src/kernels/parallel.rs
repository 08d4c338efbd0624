//! How kernels split their work over threads.
//!
//! Work is cut into units that do not depend on the number of threads (a row,
//! a channel, a group, a sample, or a fixed number of blocks of them), and
//! reductions across units (dγ, dβ) go through per-block partial sums added in
//! block order. Results are therefore bit-identical for any thread count.
//!
//! Passes run through [`for_each`] and [`collect`] rather than rayon's own
//! terminal operations: the calling thread works on the pass from its
//! first piece, and the pool's workers help as they become free, instead of
//! the caller handing the pass over and sleeping until it is done.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rayon::iter::plumbing::{Producer, ProducerCallback};
use rayon::iter::IndexedParallelIterator;

/// Values a task should hold at least, so that scheduling stays cheap.
/// An input smaller than this is one task, run on the calling thread
/// without waking the pool: handing work to rayon's workers from outside
/// the pool and waiting for them costs tens of microseconds, as long as
/// normalizing 32 Ki values takes on one core. Measured against 16 Ki and
/// 64 Ki (f32, 2 threads, `normlab bench --suite models`, medians of three
/// alternating rounds, forward into / backward ms, with each pass handed to
/// the pool as a whole, before [`for_each`]): RMSNorm `[8, 4096]`
/// 0.027/0.235 (16 Ki), 0.013/0.053 (32 Ki), 0.018/0.062 (64 Ki);
/// BatchNorm1d `[256, 512]` 0.209/0.230, 0.165/0.189, 0.167/0.176;
/// BatchNorm eval `[1, 2048, 7, 7]` 0.058/0.225, 0.078/0.265, 0.083/0.282;
/// GroupNorm(32) `[2, 1280, 8, 8]` 0.079/0.222, 0.082/0.241, 0.098/0.300.
/// 16 Ki splits decoding-sized rows into tasks that cost more to hand out
/// than they save; 64 Ki leaves one image's feature maps on one core.
pub(crate) const MIN_TASK_VALUES: usize = 1 << 15;

/// Pieces a pass is cut into at most: enough for two to eight threads to
/// balance their load when one of them starts late, few enough that
/// claiming one (an atomic add and an uncontended lock) stays negligible.
const MAX_PIECES: usize = 64;

/// Runs `f` on every item of `iter`, on the calling thread and on helpers
/// from rayon's pool that join in when they are free (called from outside
/// the pool; inside it, rayon's own `for_each`).
///
/// rayon's own `for_each`, called from outside the pool, hands the whole
/// pass to a worker and puts the caller to sleep until it is done. On a
/// small VM that round trip is tens of microseconds when the workers are
/// awake and up to a quarter of a millisecond when they have gone to sleep
/// between two calls (an op every few hundred microseconds, as in a training
/// step): longer than normalizing a few hundred thousand values. Here the
/// caller starts on the first piece at once and keeps claiming pieces;
/// helpers (one fewer than the pool's threads) claim the rest as they wake.
/// A helper that wakes after the last piece is claimed does nothing, so a
/// pass never waits for a sleeping thread, only for pieces already running.
///
/// Pieces hold at least `with_min_len`'s number of items (a task's worth of
/// values, [`MIN_TASK_VALUES`]); there are at most [`MAX_PIECES`]. Every
/// item is processed on its own, so the results depend neither on the
/// pieces nor on the number of threads.
pub(crate) fn for_each<I, F>(iter: I, f: F)
where
    I: IndexedParallelIterator,
    F: Fn(I::Item) + Sync,
{
    struct Each<F>(usize, F);
    impl<T, F: Fn(T) + Sync> ProducerCallback<T> for Each<F> {
        type Output = ();
        fn callback<P: Producer<Item = T>>(self, producer: P) {
            let f = &self.1;
            in_pieces(producer, self.0, |piece| piece.into_iter().for_each(f));
        }
    }
    if rayon::current_thread_index().is_some() {
        // Inside the pool a split is a cheap `join`: rayon's own scheduling.
        return iter.for_each(&f);
    }
    let len = iter.len();
    iter.with_producer(Each(len, f));
}

/// The items of `iter` in order, computed as in [`for_each`].
pub(crate) fn collect<I>(iter: I) -> Vec<I::Item>
where
    I: IndexedParallelIterator,
{
    struct Collect(usize);
    impl<T: Send> ProducerCallback<T> for Collect {
        type Output = Vec<T>;
        fn callback<P: Producer<Item = T>>(self, producer: P) -> Vec<T> {
            let pieces = in_pieces(producer, self.0, |piece| {
                piece.into_iter().collect::<Vec<T>>()
            });
            if pieces.len() == 1 {
                return pieces.into_iter().next().unwrap_or_default();
            }
            let mut out = Vec::with_capacity(self.0);
            pieces.into_iter().for_each(|p| out.extend(p));
            out
        }
    }
    if rayon::current_thread_index().is_some() {
        return iter.collect();
    }
    let len = iter.len();
    iter.with_producer(Collect(len))
}

/// Cuts `producer` (of `len` items) into pieces and returns `work(piece)`
/// for each, in order; see [`for_each`].
fn in_pieces<P: Producer, R: Send>(
    producer: P,
    len: usize,
    work: impl Fn(P) -> R + Sync,
) -> Vec<R> {
    let piece_len = producer.min_len().max(len.div_ceil(MAX_PIECES)).max(1);
    let count = len.div_ceil(piece_len);
    if count <= 1 {
        return vec![work(producer)];
    }
    let callers = Caller::enter();
    let helpers = callers.helpers().min(count - 1);
    if helpers == 0 {
        return vec![work(producer)];
    }
    let mut pieces = Vec::with_capacity(count);
    let mut rest = producer;
    for _ in 1..count {
        let (piece, tail) = rest.split_at(piece_len);
        pieces.push(Mutex::new(Some(piece)));
        rest = tail;
    }
    pieces.push(Mutex::new(Some(rest)));
    let results: Vec<Mutex<Option<R>>> = (0..count).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let claim = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= count {
            break;
        }
        let piece = lock(&pieces[i]).take();
        if let Some(piece) = piece {
            // A panicking piece ends the pass: nobody claims another.
            let stop = StopOnPanic(&next, count);
            let r = work(piece);
            std::mem::forget(stop);
            *lock(&results[i]) = Some(r);
        }
    };
    with_helpers(helpers, &claim);
    drop(callers);
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every piece was claimed and run")
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // No lock is held while a piece runs, so none is poisoned by one; take
    // the value anyway rather than add a panic path.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Dropped only when a piece unwinds: marks every piece as claimed.
struct StopOnPanic<'a>(&'a AtomicUsize, usize);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        self.0.fetch_max(self.1, Ordering::Relaxed);
    }
}

/// Callers outside the pool inside a pass now (the lab's SyncBatchNorm
/// ranks are threads of their own, each calling kernels).
static CALLERS: AtomicUsize = AtomicUsize::new(0);
/// Helper jobs spawned and not yet started.
static QUEUED: AtomicUsize = AtomicUsize::new(0);
/// Helper jobs queued at most per thread of the pool.
const MAX_QUEUED_PER_THREAD: usize = 16;

/// A caller counted in [`CALLERS`] while it lives.
struct Caller;

impl Caller {
    fn enter() -> Self {
        CALLERS.fetch_add(1, Ordering::SeqCst);
        Caller
    }

    /// Helpers this caller may have: the pool's threads less one for each
    /// caller in a pass (each of which computes too), so that callers and
    /// helpers together stay at the pool's thread count.
    fn helpers(&self) -> usize {
        let callers = CALLERS.load(Ordering::SeqCst).max(1);
        rayon::current_num_threads().saturating_sub(callers)
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        CALLERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a caller and its helpers share beyond the caller's stack frame: a
/// helper that starts after the caller returned touches only this.
struct Gate {
    /// Helpers inside `claim`.
    active: AtomicUsize,
    /// Set by the caller once its own run of `claim` is over (every piece
    /// claimed); a helper that sees it leaves without touching `claim`.
    closed: AtomicBool,
    /// The first panic of a helper's piece, raised again by the caller.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// `claim` with its lifetime erased, so that a helper job (which rayon
/// requires to be `'static`) can hold it.
struct Claim(*const (dyn Fn() + Sync + 'static));

// SAFETY: the closure behind the pointer is `Sync`, and `with_helpers`
// keeps it alive while any helper may call it.
unsafe impl Send for Claim {}

/// One helper's turn on a pass (see `with_helpers` for why `claim` is
/// alive whenever it is called here).
fn help(gate: &Gate, claim: &Claim) {
    /// Leaves the pass also when dropping a panic's payload panics.
    struct Leave<'a>(&'a AtomicUsize);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    gate.active.fetch_add(1, Ordering::SeqCst);
    let _leave = Leave(&gate.active);
    if !gate.closed.load(Ordering::SeqCst) {
        // SAFETY: see `with_helpers`.
        let run = unsafe { &*claim.0 };
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            lock(&gate.panic).get_or_insert(payload);
        }
    }
}

/// Runs `claim` on the calling thread (outside the pool) and on up to
/// `helpers` rayon jobs; returns once the caller's run is over and no
/// helper is inside `claim`.
fn with_helpers(helpers: usize, claim: &(dyn Fn() + Sync)) {
    debug_assert!(rayon::current_thread_index().is_none());
    let gate = Arc::new(Gate {
        active: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        panic: Mutex::new(None),
    });
    let erased: *const (dyn Fn() + Sync + '_) = claim;
    // SAFETY (of the erasure and of every later dereference): a helper
    // calls `claim` only after announcing itself in `active` and then seeing
    // `closed` unset (`help`). The caller sets `closed` and waits for
    // `active` to fall to zero before this frame (and `claim`) goes away,
    // also when it unwinds (`Close::drop`, armed before any helper exists).
    // Both sides use sequentially consistent operations, so a helper either
    // sees `closed`, or is counted in the `active` the caller waits on.
    let erased: *const (dyn Fn() + Sync + 'static) = unsafe { std::mem::transmute(erased) };
    struct Close<'a>(&'a Gate);
    impl Drop for Close<'_> {
        fn drop(&mut self) {
            self.0.closed.store(true, Ordering::SeqCst);
            // Only pieces already running are waited for (at most one
            // piece's time): short spins, then yields in case a helper's
            // thread was preempted.
            let mut spins = 0u32;
            while self.0.active.load(Ordering::SeqCst) != 0 {
                if spins < 1 << 10 {
                    std::hint::spin_loop();
                    spins += 1;
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
    {
        let _close = Close(&gate);
        // Helpers queued from earlier passes find them closed; each spawn
        // also wakes a sleeping worker, which then finds this pass open.
        // Keeping no more queued than the pool has threads measured slower
        // (0.62–0.80× on four small cases from outside the pool); the bound
        // only stops a pile-up while the application keeps the pool busy.
        let room = (MAX_QUEUED_PER_THREAD * rayon::current_num_threads())
            .saturating_sub(QUEUED.load(Ordering::SeqCst));
        for _ in 0..helpers.min(room) {
            QUEUED.fetch_add(1, Ordering::SeqCst);
            let (gate, claim) = (Arc::clone(&gate), Claim(erased));
            rayon::spawn(move || {
                QUEUED.fetch_sub(1, Ordering::SeqCst);
                help(&gate, &claim);
            });
        }
        claim();
    }
    let payload = lock(&gate.panic).take();
    if let Some(payload) = payload {
        std::panic::resume_unwind(payload);
    }
}

/// Minimum number of units of `unit_len` values per rayon task.
pub(crate) fn min_units(unit_len: usize) -> usize {
    (MIN_TASK_VALUES / unit_len.max(1)).max(1)
}

/// Number of blocks a reduction over `units` is cut into: fixed by the
/// problem size, never by the thread count.
const REDUCTION_BLOCKS: usize = 64;

/// Units per reduction block.
pub(crate) fn block_units(units: usize) -> usize {
    units.div_ceil(REDUCTION_BLOCKS).max(1)
}

/// Adds per-block partial sums in block order.
pub(crate) fn sum_partials<P: std::ops::Deref<Target = [f64]>>(
    len: usize,
    partials: impl IntoIterator<Item = P>,
) -> Vec<f64> {
    let mut total = vec![0.0; len];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p.iter()) {
            *t += v;
        }
    }
    total
}

/// Splits a `[N, C, S]` buffer into its `C` channels, each the list of its
/// `N` contiguous slices of `S` values.
pub(crate) fn channels<T>(data: &[T], c: usize, s: usize) -> Vec<Vec<&[T]>> {
    let mut out: Vec<Vec<&[T]>> = (0..c).map(|_| Vec::new()).collect();
    if s > 0 && c > 0 {
        for (i, slice) in data.chunks_exact(s).enumerate() {
            out[i % c].push(slice);
        }
    }
    out
}

/// Mutable version of [`channels`].
pub(crate) fn channels_mut<T>(data: &mut [T], c: usize, s: usize) -> Vec<Vec<&mut [T]>> {
    let mut out: Vec<Vec<&mut [T]>> = (0..c).map(|_| Vec::new()).collect();
    if s > 0 && c > 0 {
        for (i, slice) in data.chunks_exact_mut(s).enumerate() {
            out[i % c].push(slice);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::atomic::AtomicU32;

    /// Held by the tests that occupy or count on the global pool's
    /// workers, so that they do not take them from each other.
    static GLOBAL_POOL: Mutex<()> = Mutex::new(());

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool")
    }

    /// Every item once, results in order, from inside pools of 1 to 4
    /// threads and from outside them, for lengths around the piece sizes.
    #[test]
    fn every_item_once_in_order() {
        let _global = lock(&GLOBAL_POOL);
        for threads in 1..=4 {
            let pool = pool(threads);
            for len in [0usize, 1, 2, 63, 64, 65, 1000, 4097] {
                for min_len in [1usize, 3, 100] {
                    let run = || {
                        let seen: Vec<AtomicU32> = (0..len).map(|_| AtomicU32::new(0)).collect();
                        let mut out = vec![0usize; len];
                        for_each(
                            out.par_iter_mut().enumerate().with_min_len(min_len),
                            |(i, o)| {
                                seen[i].fetch_add(1, Ordering::Relaxed);
                                *o = i * 3;
                            },
                        );
                        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
                        assert!(out.iter().enumerate().all(|(i, &o)| o == i * 3));
                        let got = collect(
                            (0..len)
                                .into_par_iter()
                                .with_min_len(min_len)
                                .map(|i| i + 1),
                        );
                        assert_eq!(got, (1..=len).collect::<Vec<_>>());
                    };
                    pool.install(run);
                    run();
                }
            }
        }
    }

    /// A pass whose helpers cannot start (every worker of the global pool
    /// busy) is finished by its caller alone, without waiting for them; the
    /// helper jobs that run later do nothing.
    #[test]
    fn busy_pool_leaves_the_work_to_the_caller() {
        let _global = lock(&GLOBAL_POOL);
        /// Frees the workers also when the pass panics.
        struct Release(Arc<AtomicBool>);
        impl Drop for Release {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let workers = rayon::current_num_threads();
        let (started, release) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let _release = Release(Arc::clone(&release));
        {
            let (started, release) = (Arc::clone(&started), Arc::clone(&release));
            rayon::spawn_broadcast(move |_| {
                started.fetch_add(1, Ordering::SeqCst);
                while !release.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
            });
        }
        while started.load(Ordering::SeqCst) < workers {
            std::thread::yield_now();
        }
        let caller = std::thread::current().id();
        let elsewhere = AtomicUsize::new(0);
        let got = collect((0..10_000usize).into_par_iter().with_min_len(10).map(|i| {
            if std::thread::current().id() != caller {
                elsewhere.fetch_add(1, Ordering::SeqCst);
            }
            i % 7
        }));
        assert_eq!(got, (0..10_000usize).map(|i| i % 7).collect::<Vec<_>>());
        drop(_release);
        // The queued helpers now start, find the pass closed and leave.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            elsewhere.load(Ordering::SeqCst),
            0,
            "a late helper ran items"
        );
    }

    /// A piece that panics on a helper makes the call panic with that
    /// piece's payload.
    #[test]
    fn a_helpers_panic_reaches_the_caller() {
        let _global = lock(&GLOBAL_POOL);
        let caller = std::thread::current().id();
        let helper_ran = AtomicBool::new(false);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for_each((0..64usize).into_par_iter(), |i| {
                if std::thread::current().id() != caller {
                    helper_ran.store(true, Ordering::SeqCst);
                    panic!("helper piece {i}");
                }
                if i == 0 {
                    // Give a helper (bounded) time to take a piece.
                    let start = std::time::Instant::now();
                    while !helper_ran.load(Ordering::SeqCst)
                        && start.elapsed() < std::time::Duration::from_secs(5)
                    {
                        std::thread::yield_now();
                    }
                }
            })
        }));
        // Without a second thread (a one-core machine, or other tests'
        // passes taking the helpers) no helper runs and nothing panics.
        if helper_ran.load(Ordering::SeqCst) {
            let payload = result.expect_err("the helper's panic reaches the caller");
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default();
            assert!(message.starts_with("helper piece"), "{message}");
        } else {
            assert!(result.is_ok());
        }
    }

    /// A piece that panics makes the call panic, after every running piece
    /// has finished; from outside the pool (a helper or the caller panics)
    /// and inside pools of 1 to 3 threads.
    #[test]
    fn a_panicking_piece_panics_the_call() {
        let _global = lock(&GLOBAL_POOL);
        let pass = || {
            for_each((0..1000usize).into_par_iter().with_min_len(10), |i| {
                assert!(i != 777, "piece 777");
            })
        };
        for _ in 0..20 {
            let result = std::panic::catch_unwind(pass);
            assert!(result.is_err(), "from outside the pool");
        }
        for threads in [1, 2, 3] {
            let pool = pool(threads);
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.install(pass)));
            assert!(result.is_err(), "{threads} threads");
            // The pool still works afterwards.
            assert_eq!(
                pool.install(|| collect((0..5usize).into_par_iter())),
                vec![0, 1, 2, 3, 4]
            );
        }
    }
}

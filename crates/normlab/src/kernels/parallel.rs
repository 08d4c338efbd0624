//! How kernels split their work over threads.
//!
//! Work is cut into units that do not depend on the number of threads (a row,
//! a channel, a group, a sample, or a fixed number of blocks of them), and
//! reductions across units (dγ, dβ) go through per-block partial sums added in
//! block order. Results are therefore bit-identical for any thread count.

/// Values a task should hold at least, so that scheduling stays cheap.
/// An input smaller than this is one task, run on the calling thread
/// without waking the pool: handing work to rayon's workers from outside
/// the pool and waiting for them costs tens of microseconds, as long as
/// normalizing 32 Ki values takes on one core. Measured against 16 Ki and
/// 64 Ki (f32, 2 threads, `normlab bench --suite models`, medians of three
/// alternating rounds, forward into / backward ms): RMSNorm `[8, 4096]`
/// 0.027/0.235 (16 Ki), 0.013/0.053 (32 Ki), 0.018/0.062 (64 Ki);
/// BatchNorm1d `[256, 512]` 0.209/0.230, 0.165/0.189, 0.167/0.176;
/// BatchNorm eval `[1, 2048, 7, 7]` 0.058/0.225, 0.078/0.265, 0.083/0.282;
/// GroupNorm(32) `[2, 1280, 8, 8]` 0.079/0.222, 0.082/0.241, 0.098/0.300.
/// 16 Ki splits decoding-sized rows into tasks that cost more to hand out
/// than they save; 64 Ki leaves one image's feature maps on one core.
pub(crate) const MIN_TASK_VALUES: usize = 1 << 15;

/// Inputs from which [`on_pool`] moves an op onto the pool: four tasks'
/// worth. At two (64 Ki values) a one-image BatchNorm eval backward
/// (`[1, 2048, 7, 7]`, 98 Ki values, f32, 2 threads) took 0.095–0.11 ms
/// against 0.047–0.057 ms with each pass handed over on its own; at
/// 256 Ki values (`[64, 4096]` BatchNorm1d) one hand-off measured faster
/// (backward 0.10–0.11 against 0.14–0.15 ms). 128 Ki lies between the two
/// and was not measured on its own.
const ON_POOL_MIN_VALUES: usize = 4 * MIN_TASK_VALUES;

/// Runs `f`, whose parallel passes cover `values` values, on a worker of
/// rayon's pool when there are at least [`ON_POOL_MIN_VALUES`] of them and
/// the caller is outside the pool. Each parallel pass that splits, started
/// from outside the pool, hands its work to a worker and puts the caller
/// to sleep until it is done, a context switch each way (tens of
/// microseconds on a small VM, as long as a BatchNorm1d pass over 256 Ki
/// values); inside the pool, a pass is a cheap `join`. An op with several
/// passes (statistics, then normalization) pays the hand-off once.
pub(crate) fn on_pool<R: Send>(values: usize, f: impl FnOnce() -> R + Send) -> R {
    if values >= ON_POOL_MIN_VALUES && rayon::current_thread_index().is_none() {
        rayon::scope(|_| f())
    } else {
        f()
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

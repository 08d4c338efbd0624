//! Output buffers.
//!
//! Large buffers are recycled: when a [`Tensor`](crate::Tensor) of at least
//! [`CACHE_MIN`] bytes is dropped, its allocation goes into a bounded
//! cache, and the next output of exactly that size takes it back — no page
//! faults, no zeroing by the kernel, and memory that is likely still cached.
//! A training loop allocates the same shapes at every step, so nearly every
//! large output comes from the cache. The cache holds at most
//! [`cache_limit`] bytes (default [`DEFAULT_CACHE_LIMIT`]);
//! [`set_cache_limit`]`(0)` turns it off and frees what it holds.
//!
//! A fresh large buffer costs a page fault for every page on its first
//! write; with 4 KiB pages that is 65,536 faults for a 256 MiB tensor, which
//! can take longer than the normalization itself. On Linux, buffers of
//! [`HUGE_PAGE_MIN`] bytes or more are therefore advised to use transparent
//! huge pages (`madvise(MADV_HUGEPAGE)`, honoured when the system's THP mode is
//! `always` or `madvise`): 2 MiB pages, 512 times fewer faults. The advice is
//! given before the first write and changes nothing else: the memory is
//! zeroed and freed as any `Vec`'s.

use std::mem::MaybeUninit;
use std::sync::Mutex;

use crate::{Float, NormError, Result};

/// Buffers at least this large (bytes) get the huge-page advice.
pub const HUGE_PAGE_MIN: usize = 4 << 20;

/// Buffers the cache keeps at most (the oldest go first), so that looking
/// one up stays a short scan.
const CACHE_ENTRIES: usize = 256;

/// Buffers at least this large (bytes) are recycled through the cache. The
/// C allocator serves sizes above 128 KiB by mapping fresh pages (or grows
/// and trims the heap for them), so without the cache an output of a few
/// hundred KiB to a few MiB (BatchNorm1d on `[64, 4096]`, one image's
/// feature map) faults in every page on every call: on `[64, 4096]`
/// BatchNorm1d that was as long as the normalization itself.
pub const CACHE_MIN: usize = 64 << 10;

/// Bytes the cache of large buffers holds at most, unless set otherwise.
pub const DEFAULT_CACHE_LIMIT: usize = 1 << 30;

/// Freed allocations kept for reuse: `(address, bytes, align)`, newest last.
struct Cache {
    buffers: Vec<(usize, usize, usize)>,
    bytes: usize,
    limit: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    buffers: Vec::new(),
    bytes: 0,
    limit: DEFAULT_CACHE_LIMIT,
});

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    // A panic while holding the lock leaves the list consistent: recover it.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets how many bytes of freed large buffers are kept for reuse (0: none).
pub fn set_cache_limit(bytes: usize) {
    let evicted = {
        let mut c = cache();
        c.limit = bytes;
        let mut evicted = Vec::new();
        while c.bytes > c.limit {
            let b = c.buffers.remove(0);
            c.bytes -= b.1;
            evicted.push(b);
        }
        evicted
    };
    evicted.into_iter().for_each(free);
}

/// The current limit of the cache, in bytes.
pub fn cache_limit() -> usize {
    cache().limit
}

/// Bytes the cache holds now.
pub fn cached_bytes() -> usize {
    cache().bytes
}

fn free((addr, bytes, align): (usize, usize, usize)) {
    // SAFETY: the buffer was allocated by the global allocator with exactly
    // this layout (it came from a Vec) and nothing else refers to it.
    unsafe {
        std::alloc::dealloc(
            addr as *mut u8,
            std::alloc::Layout::from_size_align_unchecked(bytes, align),
        )
    };
}

/// Keeps `v`'s allocation for reuse when it is large and the cache has room;
/// otherwise frees it as usual. Called when a tensor is dropped.
pub(crate) fn recycle<T>(v: Vec<T>) {
    recycle_from(v, CACHE_MIN);
}

/// [`recycle`] for buffers of at least `min` bytes.
fn recycle_from<T>(mut v: Vec<T>, min: usize) {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < min || bytes == 0 {
        return;
    }
    v.clear();
    let entry = (v.as_mut_ptr() as usize, bytes, std::mem::align_of::<T>());
    let evicted = {
        let mut c = cache();
        if bytes > c.limit {
            return;
        }
        std::mem::forget(v);
        let mut evicted = Vec::new();
        while c.bytes + bytes > c.limit || c.buffers.len() >= CACHE_ENTRIES {
            let b = c.buffers.remove(0);
            c.bytes -= b.1;
            evicted.push(b);
        }
        c.buffers.push(entry);
        c.bytes += bytes;
        evicted
    };
    evicted.into_iter().for_each(free);
}

/// A cached allocation of exactly `len` values of `T`, if there is one.
fn reuse<T>(len: usize) -> Option<Vec<MaybeUninit<T>>> {
    reuse_from(len, CACHE_MIN)
}

/// [`reuse`] for buffers of at least `min` bytes.
fn reuse_from<T>(len: usize, min: usize) -> Option<Vec<MaybeUninit<T>>> {
    // A size that overflows cannot be in the cache (the allocation will fail).
    let bytes = len.checked_mul(std::mem::size_of::<T>())?;
    if bytes < min || bytes == 0 {
        return None;
    }
    let align = std::mem::align_of::<T>();
    let mut c = cache();
    let i = c
        .buffers
        .iter()
        .rposition(|&(_, b, a)| b == bytes && a == align)?;
    let (addr, b, _) = c.buffers.remove(i);
    c.bytes -= b;
    // SAFETY: this allocation came from a Vec<T'> with the same size and
    // alignment; MaybeUninit needs no initialization.
    Some(unsafe { Vec::from_raw_parts(addr as *mut MaybeUninit<T>, len, len) })
}

/// A buffer of `len` values that a kernel is about to overwrite entirely:
/// no zeroing pass (which would cost a full write of the buffer), as
/// `torch.empty`; large ones come from the cache when it has one of this size.
///
/// # Errors
/// [`NormError::OutOfMemory`] (naming `op` and `arg`) when the system refuses
/// the memory: a failed allocation is an error, never an abort.
pub fn for_overwrite<T: Float>(
    op: &'static str,
    arg: &'static str,
    len: usize,
) -> Result<Vec<MaybeUninit<T>>> {
    if let Some(v) = reuse::<T>(len) {
        return Ok(v);
    }
    let mut v = try_with_capacity(op, arg, len)?;
    // SAFETY: the capacity is at least `len`; MaybeUninit needs no initialization.
    unsafe { v.set_len(len) };
    advise_huge_pages(&mut v);
    Ok(v)
}

/// A scratch buffer of `len` values a kernel overwrites before reading,
/// from the cache when it has one of this size (hand it back with
/// [`recycle`]): per-task partial sums of a few hundred KiB, allocated and
/// freed on every call, otherwise cost fresh, faulted-in pages each time.
/// Scratch sizes follow from sizes already allocated, so running out of
/// memory here aborts, as a `Vec` does.
pub(crate) fn scratch<T: Float>(len: usize) -> Vec<MaybeUninit<T>> {
    if let Some(v) = reuse::<T>(len) {
        return v;
    }
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; MaybeUninit needs no initialization.
    unsafe { v.set_len(len) };
    v
}

/// Scratch buffers at least this large (bytes) are recycled through the
/// cache. A call's temporaries (per-channel coefficients, per-position
/// sums, the statistics in f64) are each a few KiB to a few hundred KiB;
/// together they grow the C heap past its trim threshold (128 KiB) and
/// shrink it again when freed, so every call faulted in fresh pages:
/// BatchNorm1d on `[64, 4096]` took 43 page faults per call.
const SCRATCH_MIN: usize = 4 << 10;

/// A per-call temporary: a vector of `Copy` values that comes from the
/// cache of freed buffers when the cache holds one of its size, and goes
/// back into it when dropped (from [`SCRATCH_MIN`] bytes on), so that a
/// call repeated with the same shape allocates nothing new. Scratch sizes
/// follow from sizes already allocated (a channel count, a row), so
/// running out of memory here aborts, as a `Vec` does, like [`scratch`].
#[derive(Debug)]
pub(crate) struct Scratch<T: Copy> {
    values: Vec<T>,
}

impl<T: Copy> Scratch<T> {
    /// The values of `iter`, at most `len` of them (the room taken),
    /// written straight into the buffer's spare room (extending the vector
    /// value by value checked its capacity at every push: a tenth of
    /// BatchNorm1d's time on `[64, 4096]`).
    pub(crate) fn collect(len: usize, iter: impl IntoIterator<Item = T>) -> Self {
        let mut values: Vec<T> = match reuse_from::<T>(len, SCRATCH_MIN) {
            Some(v) => {
                let mut v = std::mem::ManuallyDrop::new(v);
                // SAFETY: same allocation and layout (`MaybeUninit<T>` has
                // `T`'s), with no values yet.
                unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, 0, v.capacity()) }
            }
            None => Vec::with_capacity(len),
        };
        let mut written = 0;
        for (slot, value) in values.spare_capacity_mut()[..len].iter_mut().zip(iter) {
            slot.write(value);
            written += 1;
        }
        // SAFETY: the first `written` values were just written.
        unsafe { values.set_len(written) };
        Scratch { values }
    }

    /// `len` copies of `value`.
    pub(crate) fn filled(len: usize, value: T) -> Self {
        Self::collect(len, std::iter::repeat(value))
    }
}

impl<T: Copy> std::ops::Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.values
    }
}

impl<T: Copy> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.values
    }
}

impl<T: Copy> Drop for Scratch<T> {
    fn drop(&mut self) {
        recycle_from(std::mem::take(&mut self.values), SCRATCH_MIN);
    }
}

/// An empty vector with room for exactly `len` values, or
/// [`NormError::OutOfMemory`]. Every allocation whose size comes from a
/// caller's shape or option goes through here (or [`zeroed`]), so that an
/// absurd size is a typed error rather than an abort of the process.
pub fn try_with_capacity<T>(op: &'static str, arg: &'static str, len: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| out_of_memory::<T>(op, arg, len))?;
    Ok(v)
}

/// The error for `len` values of `T` the system would not give.
fn out_of_memory<T>(op: &'static str, arg: &'static str, len: usize) -> NormError {
    NormError::OutOfMemory {
        op,
        arg,
        len,
        bytes: len.saturating_mul(std::mem::size_of::<T>()),
    }
}

/// `len` copies of `value`, or [`NormError::OutOfMemory`].
pub fn try_filled<T: Clone>(
    op: &'static str,
    arg: &'static str,
    len: usize,
    value: T,
) -> Result<Vec<T>> {
    let mut v = try_with_capacity(op, arg, len)?;
    v.resize(len, value);
    Ok(v)
}

/// The buffer of [`for_overwrite`] once every value has been written.
///
/// # Safety
/// Every element of `v` must have been written.
pub unsafe fn assume_init<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, layout and length; the caller guarantees
    // that every element is initialized.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// A zeroed buffer of `len` values.
///
/// # Errors
/// [`NormError::OutOfMemory`] when the system refuses the memory.
pub fn zeroed<T: Float>(op: &'static str, arg: &'static str, len: usize) -> Result<Vec<T>> {
    let out_of_memory = || out_of_memory::<T>(op, arg, len);
    if len == 0 || std::mem::size_of::<T>() == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| out_of_memory())?;
    // `alloc_zeroed` (calloc) maps fresh zero pages without touching them, as
    // `vec![0.0; n]` does, so the advice below still applies to every page.
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return Err(out_of_memory());
    }
    // SAFETY: the allocation holds `len` values of `T` with `T`'s alignment,
    // from the global allocator; all-zero bits are 0.0 for every `Float`.
    let mut v = unsafe { Vec::from_raw_parts(ptr, len, len) };
    advise_huge_pages(&mut v);
    Ok(v)
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(v: &mut [T]) {
    const HUGE: usize = 2 << 20;
    let bytes = std::mem::size_of_val(v);
    if bytes < HUGE_PAGE_MIN {
        return;
    }
    let start = (v.as_mut_ptr() as usize).next_multiple_of(HUGE);
    let end = (v.as_mut_ptr() as usize + bytes) / HUGE * HUGE;
    if end > start {
        // SAFETY: the range lies inside `v`'s allocation; MADV_HUGEPAGE only
        // changes how the kernel backs those pages, not their contents.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_v: &mut [T]) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_and_the_limit_holds() {
        let len = HUGE_PAGE_MIN / 4 + 1;
        let first = for_overwrite::<f32>("test", "x", len).unwrap();
        let addr = first.as_ptr() as usize;
        // SAFETY: test only; f32 has no invalid bit patterns and the values are not read.
        recycle(unsafe { assume_init(first) });
        assert!(cached_bytes() >= len * 4);
        let again = for_overwrite::<f32>("test", "x", len).unwrap();
        assert_eq!(
            again.as_ptr() as usize,
            addr,
            "the cached buffer comes back"
        );
        // Another size does not take it.
        recycle(unsafe { assume_init(again) });
        let other = for_overwrite::<f32>("test", "x", len + 1).unwrap();
        assert_ne!(other.as_ptr() as usize, addr);
        set_cache_limit(0);
        assert_eq!(cached_bytes(), 0);
        recycle(unsafe { assume_init(other) });
        assert_eq!(cached_bytes(), 0);
        set_cache_limit(DEFAULT_CACHE_LIMIT);
        // Small buffers never enter the cache.
        recycle(vec![0f32; 16]);
        assert_eq!(cached_bytes(), 0);
    }

    #[test]
    fn absurd_sizes_are_errors_not_aborts() {
        let err = for_overwrite::<f32>("op", "y", usize::MAX / 2).unwrap_err();
        assert!(
            matches!(
                err,
                NormError::OutOfMemory {
                    op: "op",
                    arg: "y",
                    ..
                }
            ),
            "{err}"
        );
        assert!(zeroed::<f64>("op", "y", 1 << 60).is_err());
        assert!(try_filled("op", "y", 1 << 61, 0u64).is_err());
        assert_eq!(zeroed::<f32>("op", "y", 3).unwrap(), vec![0.0; 3]);
        assert!(zeroed::<f32>("op", "y", 0).unwrap().is_empty());
    }
}

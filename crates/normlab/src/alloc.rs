//! Output buffers.
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

use crate::Float;

/// Buffers at least this large (bytes) get the huge-page advice.
pub const HUGE_PAGE_MIN: usize = 4 << 20;

/// A buffer of `len` values that a kernel is about to overwrite entirely:
/// no zeroing pass (which would cost a full write of the buffer), as
/// `torch.empty`.
pub fn for_overwrite<T: Float>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialization.
    unsafe { v.set_len(len) };
    advise_huge_pages(&mut v);
    v
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
pub fn zeroed<T: Float>(len: usize) -> Vec<T> {
    // `vec![0.0; n]` of f32/f64 maps fresh zero pages without touching them,
    // so the advice below still applies to every page.
    let mut v = vec![T::default(); len];
    advise_huge_pages(&mut v);
    v
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

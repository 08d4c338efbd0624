#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, refusing any single request over 256 MiB. The
/// shapes target builds values only for small tensors, so such a request
/// comes from a dimension of the shape: a fallible allocation then becomes
/// the library's `OutOfMemory` error, and an infallible one aborts, which
/// libFuzzer reports — the way to find allocations proportional to a
/// dimension of an empty tensor.
struct Capped;

const CAP: usize = 256 << 20;

// SAFETY: every call is forwarded to `System` unchanged, or refused with a
// null pointer, which the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > CAP {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > CAP {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

libfuzzer_sys::fuzz_target!(|data: &[u8]| normlab_fuzz::shapes(data));

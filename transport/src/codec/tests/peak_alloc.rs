//! A global allocator for the test binary that records, per thread, the largest single
//! allocation, so a test can check that decoding never asks for more than the limits allow.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct PeakProbe;

thread_local! {
    // const-initialised and without Drop: touching it never allocates, so the allocator may
    // use it without recursing.
    static PEAK_BYTES: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    let _ = PEAK_BYTES.try_with(|peak| peak.set(peak.get().max(size)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged.
unsafe impl GlobalAlloc for PeakProbe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static PROBE: PeakProbe = PeakProbe;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
pub(super) fn largest_allocation_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK_BYTES.with(|peak| peak.set(0));
    let out = f();
    (out, PEAK_BYTES.with(Cell::get))
}

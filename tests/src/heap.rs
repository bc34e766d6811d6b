//! A counting global allocator, for figures of what a data structure costs on the heap:
//! bytes live now, and the most live since the last [`reset_peak`]. Each allocation is
//! counted as glibc's malloc holds it (the request plus its 8-byte header, rounded up to
//! 16, at least 32 bytes), so many small blocks cost what they really cost. A binary
//! installs it with `#[global_allocator] static HEAP: tests::heap::Counting =
//! tests::heap::Counting;`; without that every figure reads 0.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counted.
pub struct Counting;

fn chunk(size: usize) -> usize {
    (size + 8).div_ceil(16).max(2) * 16
}

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call is forwarded to `System` with the same arguments; only counters are
// updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(chunk(layout.size()));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(chunk(layout.size()));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as `alloc`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(chunk(layout.size()), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(chunk(layout.size()), Relaxed);
            grew(chunk(new_size));
        }
        p
    }
}

/// Bytes live on the heap now.
pub fn live() -> usize {
    LIVE.load(Relaxed)
}

/// The most bytes live since the last [`reset_peak`] (or the start).
pub fn peak() -> usize {
    PEAK.load(Relaxed)
}

/// Starts a new peak from what is live now.
pub fn reset_peak() {
    PEAK.store(live(), Relaxed);
}

/// Whether a binary installed [`Counting`].
pub fn installed() -> bool {
    let before = live();
    let probe = std::hint::black_box(vec![0u8; 4096]);
    let counted = live() > before;
    drop(probe);
    counted
}

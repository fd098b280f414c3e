//! A counting global allocator with a cap: the memory invariant of the harness. A parser that
//! believes a declared size (a 2^40-element tensor, a 10^12-entry array) asks for that memory
//! at once; under the cap the allocation fails, the process aborts with a message, and the
//! supervisor records the input as a crash instead of the machine swapping or OOM-killing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !reserve(new_size - old) {
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if p.is_null() {
            if new_size > old {
                LIVE.fetch_sub(new_size - old, Relaxed);
            }
        } else if new_size < old {
            LIVE.fetch_sub(old - new_size, Relaxed);
        }
        p
    }
}

/// Counts `n` more live bytes unless that passes the cap; then says so on stderr (without
/// allocating) and refuses, which makes the standard library abort the process.
fn reserve(n: usize) -> bool {
    let live = LIVE.fetch_add(n, Relaxed) + n;
    if live > CAP.load(Relaxed) {
        LIVE.fetch_sub(n, Relaxed);
        say_over_cap();
        return false;
    }
    PEAK.fetch_max(live, Relaxed);
    true
}

fn say_over_cap() {
    const MSG: &[u8] = b"sl-fuzz: memory cap exceeded\n";
    #[cfg(unix)]
    // SAFETY: writing a static buffer to stderr; no allocation.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
    }
}

/// Live bytes now.
pub fn live() -> usize {
    LIVE.load(Relaxed)
}

/// Starts a measured section: the peak restarts at the live bytes, and at most `extra` more
/// bytes may be live at once until `end`.
pub fn begin(extra: usize) {
    let now = live();
    PEAK.store(now, Relaxed);
    CAP.store(now.saturating_add(extra), Relaxed);
}

/// Ends a measured section: lifts the cap and returns the peak above the section's start.
pub fn end(start: usize) -> usize {
    CAP.store(usize::MAX, Relaxed);
    PEAK.load(Relaxed).saturating_sub(start)
}

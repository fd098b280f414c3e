//! Large buffers and the first touch of their pages.
//!
//! A buffer allocated zeroed on fresh memory (`vec![0.0; n]` over pages the process never used)
//! is mapped to the kernel's shared zero page until written. If it is *read* first, as AdamW's
//! moments are by the first update (`m = m + (1 - b1)(g - m)`), every 4 KiB page is then written
//! over a read-only zero-page mapping: a copy-on-write fault that must also flush the other
//! threads' TLBs, an inter-processor interrupt per page, which in a virtual machine is an exit to
//! the hypervisor. Profiled on the 2-core Xeon KVM guest, that made the first training step of
//! SmolLM2-135M take 6.5-8.7 s against 1.9 s for the steps after it (1.08 GB of moments, 264
//! thousand such faults). Writing zeros first maps each page writable at its first fault, with
//! no flush, on both threads at once.
//!
//! Buffers that size also ask Linux for transparent huge pages (`MADV_HUGEPAGE`; the kernels'
//! default policy here is "madvise", which grants them only where asked): one fault and one
//! TLB entry per 2 MiB instead of per 4 KiB.

use rayon::prelude::*;
use std::alloc::GlobalAlloc;
use std::mem::MaybeUninit;

/// Buffers from this size on are advised to use huge pages (smaller ones gain little).
const HUGE_FROM: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// Asks for transparent huge pages over the whole 2 MiB pages inside `[ptr, ptr + bytes)`. A
/// hint: the memory and its contents do not change, and failure (another OS, THP turned off)
/// leaves things as they were.
pub fn advise_huge_pages(ptr: *const u8, bytes: usize) {
    if bytes < HUGE_FROM {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
        let end = (ptr as usize + bytes) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside memory this process owns (the caller's allocation)
            // and is page-aligned; MADV_HUGEPAGE only changes how later faults are served.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
}

/// `n` zeros, each page first touched by a write (on the worker pool for large buffers): for
/// buffers that are read before they are written (module docs).
pub fn zeros_written(n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    advise_huge_pages(v.as_ptr().cast(), n * 4);
    let spare = &mut v.spare_capacity_mut()[..n];
    if n >= 1 << 20 {
        spare
            .par_chunks_mut(1 << 18)
            .for_each(|c| c.fill(MaybeUninit::new(0.0)));
    } else {
        spare.fill(MaybeUninit::new(0.0));
    }
    // SAFETY: all n values were written just above.
    unsafe { v.set_len(n) };
    v
}

/// A buffer of `n` values for a writer that sets every one before anything reads it (a gemm
/// with `read_dst` off), neither zeroed nor touched here.
///
/// # Safety
/// The caller must write all `n` values before reading any.
pub unsafe fn for_overwrite(n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    advise_huge_pages(v.as_ptr().cast(), n * 4);
    // SAFETY: capacity n; the caller's contract covers the values.
    unsafe { v.set_len(n) };
    v
}

/// The system allocator, with huge pages advised for every block from 4 MiB (activations,
/// gradients, weights being converted): for programs that own their process, as the
/// `safety-layers` binary does (`#[global_allocator]`). Blocks keep the system allocator's
/// addresses and lifetimes; only how their pages are faulted in changes.
pub struct HugePageAlloc;

// SAFETY: every call is forwarded to `System` unchanged; the advice does not touch memory.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            advise_huge_pages(p, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            advise_huge_pages(p, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            advise_huge_pages(p, new_size);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_written_is_all_zero_at_every_size() {
        for n in [0, 1, 17, 1 << 18, (1 << 20) + 3, 3 << 20] {
            let v = zeros_written(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x.to_bits() == 0), "n = {n}");
        }
    }

    #[test]
    fn advising_keeps_the_contents() {
        let mut v: Vec<f32> = (0..(3 << 20)).map(|i| i as f32).collect();
        advise_huge_pages(v.as_ptr().cast(), v.len() * 4);
        v[12345] += 1.0;
        assert_eq!(v[12345], 12346.0);
        assert!(v
            .iter()
            .enumerate()
            .all(|(i, &x)| i == 12345 || x == i as f32));
        // Too small, unaligned, or empty: nothing to do, and no fault.
        advise_huge_pages(v.as_ptr().cast::<u8>().wrapping_add(3), 100);
        advise_huge_pages(std::ptr::null(), 0);
    }
}

//! A global allocator that counts live allocations and bytes by size class, for the soak
//! bench and the memory tests: growth in resident memory can then be told apart (live bytes
//! rising is a leak or an unbounded structure; live bytes flat while the resident size rises
//! is the allocator keeping freed pages). Including this module installs it.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The counting allocator.
struct Counting;

/// Live allocations by size class (bucket k holds sizes in [2^(k-1), 2^k)); bucket 0 holds
/// over-aligned ones (alignment above 16, which glibc serves with memalign).
static LIVE_BY_CLASS: [AtomicUsize; 48] = [const { AtomicUsize::new(0) }; 48];
/// Live bytes by the same classes (a buffer that grows by realloc inside its class changes
/// these, not the counts).
static BYTES_BY_CLASS: [AtomicUsize; 48] = [const { AtomicUsize::new(0) }; 48];

fn class(layout: Layout) -> usize {
    if layout.align() > 16 {
        0
    } else {
        ((usize::BITS - layout.size().leading_zeros()) as usize).clamp(1, 47)
    }
}

/// Adds `layout` to the live counts when the allocation `p` succeeded.
fn counted(p: *mut u8, layout: Layout) -> *mut u8 {
    if !p.is_null() {
        LIVE_BY_CLASS[class(layout)].fetch_add(1, Ordering::Relaxed);
        BYTES_BY_CLASS[class(layout)].fetch_add(layout.size(), Ordering::Relaxed);
    }
    p
}

fn uncounted(layout: Layout) {
    LIVE_BY_CLASS[class(layout)].fetch_sub(1, Ordering::Relaxed);
    BYTES_BY_CLASS[class(layout)].fetch_sub(layout.size(), Ordering::Relaxed);
}

fn load(classes: &[AtomicUsize; 48]) -> Vec<usize> {
    classes.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

pub fn class_counts() -> Vec<usize> {
    load(&LIVE_BY_CLASS)
}

pub fn class_bytes() -> Vec<usize> {
    load(&BYTES_BY_CLASS)
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        counted(p, layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        uncounted(layout);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        counted(p, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        // On failure the old block stays allocated: count only a realloc that happened.
        if !moved.is_null() {
            uncounted(layout);
            // SAFETY: the caller guarantees new_size, rounded to the alignment, fits isize.
            counted(moved, unsafe {
                Layout::from_size_align_unchecked(new_size, layout.align())
            });
        }
        moved
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live allocations, all classes together.
pub fn live_allocations() -> usize {
    class_counts().iter().sum()
}

//! A counting global allocator for host tests (a test binary that links
//! this crate allocates through it): counts the heap allocations the
//! current thread makes while [`count`] runs, and the net bytes they hold
//! ([`live_bytes`]), except inside [`uncounted`] (what stands for the
//! hypervisor, dom0, hardware or a remote server in a test, not for
//! stordom's heap).

use core::cell::Cell;
use std::alloc::{GlobalAlloc, Layout, System};

std::thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

struct CountingAllocator;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Notes an allocation (if `allocation`) and a change of `bytes` held.
fn note(allocation: bool, bytes: i64) {
    // `try_with`: a thread being torn down has no counters any more.
    let counting = COUNTING.try_with(Cell::get).unwrap_or(false);
    if counting {
        if allocation {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
        let _ = LIVE.try_with(|l| l.set(l.get() + bytes));
    }
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(true, layout.size() as i64);
        // SAFETY: as the caller promised.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(true, layout.size() as i64);
        // SAFETY: as the caller promised.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(true, new_size as i64 - layout.size() as i64);
        // SAFETY: as the caller promised.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(false, -(layout.size() as i64));
        // SAFETY: as the caller promised.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` and returns its result and the allocations it made.
pub fn count<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = COUNT.with(Cell::get);
    let was = COUNTING.with(|c| c.replace(true));
    let result = f();
    COUNTING.with(|c| c.set(was));
    (result, COUNT.with(Cell::get) - before)
}

/// Runs `f` with counting paused.
pub fn uncounted<R>(f: impl FnOnce() -> R) -> R {
    let was = COUNTING.with(|c| c.replace(false));
    let result = f();
    COUNTING.with(|c| c.set(was));
    result
}

/// Bytes allocated minus bytes freed, while counting, on this thread so
/// far: the test harness counts everything stordom's code does, so this
/// follows stordom's heap in use (from an arbitrary zero).
pub fn live_bytes() -> i64 {
    LIVE.with(Cell::get)
}

//! How much of the heap is in use, and the most that ever was: counted
//! by the kernel's allocator with relaxed atomics (no lock, a few cycles
//! per allocation) and published in xenstore, so an operator can see
//! whether a guest makes stordom hold memory it never gives back.

use core::sync::atomic::{AtomicUsize, Ordering};

/// Bytes the heap has handed out and not taken back (as requested by
/// each allocation: the allocator's own rounding and headers are not
/// counted), their high-water mark, and the heap's size.
pub struct HeapUsage {
    in_use: AtomicUsize,
    peak: AtomicUsize,
    size: AtomicUsize,
}

impl HeapUsage {
    pub const fn new() -> Self {
        HeapUsage {
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            size: AtomicUsize::new(0),
        }
    }

    /// The heap was given `bytes` to hand out.
    pub fn set_size(&self, bytes: usize) {
        self.size.store(bytes, Ordering::Relaxed);
    }

    /// An allocation of `bytes` succeeded.
    pub fn allocated(&self, bytes: usize) {
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// The heap was started afresh (an in-place restart): nothing is in
    /// use; the peak stays.
    pub fn emptied(&self) {
        self.in_use.store(0, Ordering::Relaxed);
    }

    /// An allocation of `bytes` was freed.
    pub fn freed(&self, bytes: usize) {
        self.in_use.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// The xenstore nodes (under the domain's `data/`) and their values:
    /// `heap-in-use`, `heap-peak` and `heap-size`, in bytes.
    pub fn nodes(&self) -> [(&'static str, u64); 3] {
        [
            ("heap-in-use", self.in_use() as u64),
            ("heap-peak", self.peak() as u64),
            ("heap-size", self.size() as u64),
        ]
    }
}

impl Default for HeapUsage {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_use_follows_allocations_and_the_peak_stays_at_the_most() {
        let usage = HeapUsage::new();
        usage.set_size(1 << 20);
        usage.allocated(100);
        usage.allocated(50);
        usage.freed(100);
        assert_eq!((usage.in_use(), usage.peak()), (50, 150));
        usage.allocated(60);
        assert_eq!((usage.in_use(), usage.peak()), (110, 150));
        usage.freed(110);
        assert_eq!(
            usage.nodes(),
            [
                ("heap-in-use", 0),
                ("heap-peak", 150),
                ("heap-size", 1 << 20)
            ]
        );
    }
}

//! Physical frame allocator: a sorted list of free page-aligned ranges.
//!
//! Ranges, not a bitmap, because the common requests are "N contiguous
//! frames, aligned" (DMA queues, heaps, page tables) and the list stays tiny:
//! one entry per hole in RAM plus a few fragments.

/// Page size the allocator works in.
pub const FRAME_SIZE: u64 = 4096;
/// Free ranges tracked at most; a free that would exceed it is refused.
pub const MAX_RANGES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    start: u64,
    end: u64,
}

/// Why a frame operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// No free range can hold the request.
    OutOfMemory,
    /// The range list is full; the memory stays unavailable.
    TooFragmented,
    /// Address or size not page aligned, zero, or wrapping.
    BadRange,
    /// Freeing memory that is (partly) free already.
    DoubleFree,
}

/// The allocator. Never hands out frame 0.
#[derive(Clone)]
pub struct FrameAllocator {
    free: [Range; MAX_RANGES],
    len: usize,
}

impl Default for FrameAllocator {
    fn default() -> Self {
        Self::new()
    }
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| x & !(a - 1))
}

impl FrameAllocator {
    /// An allocator with no memory.
    pub const fn new() -> Self {
        Self {
            free: [Range { start: 0, end: 0 }; MAX_RANGES],
            len: 0,
        }
    }

    fn ranges(&self) -> &[Range] {
        &self.free[..self.len]
    }

    fn insert_at(&mut self, index: usize, r: Range) -> Result<(), FrameError> {
        if self.len == MAX_RANGES {
            return Err(FrameError::TooFragmented);
        }
        self.free.copy_within(index..self.len, index + 1);
        self.free[index] = r;
        self.len += 1;
        Ok(())
    }

    fn remove_at(&mut self, index: usize) {
        self.free.copy_within(index + 1..self.len, index);
        self.len -= 1;
    }

    /// Adds usable RAM `[start, start+len)`, shrunk inward to whole frames.
    /// Overlap with memory already free is an error.
    pub fn add_region(&mut self, start: u64, len: u64) -> Result<(), FrameError> {
        let end = start.checked_add(len).ok_or(FrameError::BadRange)? & !(FRAME_SIZE - 1);
        let start = align_up(start.max(FRAME_SIZE), FRAME_SIZE).ok_or(FrameError::BadRange)?;
        if start >= end {
            return Ok(());
        }
        self.release(Range { start, end })
    }

    /// Removes `[start, start+len)` (widened to whole frames) from the free
    /// set, wherever it overlaps; used for the kernel, modules and firmware data.
    pub fn reserve(&mut self, start: u64, len: u64) -> Result<(), FrameError> {
        let end = align_up(
            start.checked_add(len).ok_or(FrameError::BadRange)?,
            FRAME_SIZE,
        )
        .ok_or(FrameError::BadRange)?;
        let start = start & !(FRAME_SIZE - 1);
        let mut i = 0;
        while i < self.len {
            let r = self.free[i];
            if r.end <= start || r.start >= end {
                i += 1;
                continue;
            }
            let below = Range {
                start: r.start,
                end: start,
            };
            let above = Range {
                start: end,
                end: r.end,
            };
            match (below.start < below.end, above.start < above.end) {
                (true, true) => {
                    self.free[i] = below;
                    self.insert_at(i + 1, above)?;
                    i += 2;
                }
                (true, false) => {
                    self.free[i] = below;
                    i += 1;
                }
                (false, true) => {
                    self.free[i] = above;
                    i += 1;
                }
                (false, false) => self.remove_at(i),
            }
        }
        Ok(())
    }

    /// Allocates `frames` contiguous frames whose address is a multiple of
    /// `align` bytes (a power of two, at least a frame). First fit.
    pub fn alloc(&mut self, frames: u64, align: u64) -> Result<u64, FrameError> {
        if frames == 0 || !align.is_power_of_two() || align < FRAME_SIZE {
            return Err(FrameError::BadRange);
        }
        let size = frames.checked_mul(FRAME_SIZE).ok_or(FrameError::BadRange)?;
        for i in 0..self.len {
            let r = self.free[i];
            let Some(start) = align_up(r.start, align) else {
                continue;
            };
            let Some(end) = start.checked_add(size) else {
                continue;
            };
            if end > r.end {
                continue;
            }
            // Carve [start, end) out; the head and tail stay free.
            self.reserve(start, size)?;
            return Ok(start);
        }
        Err(FrameError::OutOfMemory)
    }

    /// Returns `frames` frames at `start` to the free set.
    pub fn free(&mut self, start: u64, frames: u64) -> Result<(), FrameError> {
        let size = frames.checked_mul(FRAME_SIZE).ok_or(FrameError::BadRange)?;
        let end = start.checked_add(size).ok_or(FrameError::BadRange)?;
        if !start.is_multiple_of(FRAME_SIZE) || frames == 0 || start == 0 {
            return Err(FrameError::BadRange);
        }
        self.release(Range { start, end })
    }

    /// Inserts a range in order, merging with neighbours.
    fn release(&mut self, r: Range) -> Result<(), FrameError> {
        let index = self.ranges().partition_point(|x| x.end <= r.start);
        if self
            .ranges()
            .get(index)
            .is_some_and(|next| next.start < r.end)
        {
            return Err(FrameError::DoubleFree);
        }
        let merges_prev = index > 0 && self.free[index - 1].end == r.start;
        let merges_next = index < self.len && self.free[index].start == r.end;
        match (merges_prev, merges_next) {
            (true, true) => {
                self.free[index - 1].end = self.free[index].end;
                self.remove_at(index);
            }
            (true, false) => self.free[index - 1].end = r.end,
            (false, true) => self.free[index].start = r.start,
            (false, false) => self.insert_at(index, r)?,
        }
        Ok(())
    }

    /// Bytes currently free.
    pub fn free_bytes(&self) -> u64 {
        self.ranges().iter().map(|r| r.end - r.start).sum()
    }

    /// Whether any byte of `[start, start+len)` is free (for checks and tests).
    pub fn overlaps_free(&self, start: u64, len: u64) -> bool {
        let end = start.saturating_add(len);
        self.ranges().iter().any(|r| r.start < end && start < r.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn regions_are_trimmed_to_frames_and_frame_zero_is_never_free() {
        let mut a = FrameAllocator::new();
        a.add_region(0, 0x9fc00).unwrap();
        assert_eq!(a.free_bytes(), 0x9f000 - FRAME_SIZE);
        assert!(!a.overlaps_free(0, FRAME_SIZE));
        assert!(!a.overlaps_free(0x9f000, 0xc00));
    }

    #[test]
    fn reserved_memory_is_never_allocated() {
        let mut a = FrameAllocator::new();
        a.add_region(MIB, 63 * MIB).unwrap();
        a.reserve(MIB, 3 * MIB + 5).unwrap(); // kernel image, odd length
        a.reserve(10 * MIB + 100, 50).unwrap(); // a module inside one frame
        assert!(!a.overlaps_free(MIB, 3 * MIB + 5));
        assert!(!a.overlaps_free(10 * MIB + 100, 50));
        let mut seen = 0;
        while let Ok(f) = a.alloc(1, FRAME_SIZE) {
            assert!(f >= 4 * MIB + FRAME_SIZE, "{f:#x} is in the kernel");
            assert!(
                !(10 * MIB..10 * MIB + FRAME_SIZE).contains(&f),
                "{f:#x} is the module"
            );
            seen += 1;
        }
        assert_eq!(
            seen,
            (64 * MIB - 4 * MIB - FRAME_SIZE - FRAME_SIZE) / FRAME_SIZE
        );
        assert_eq!(a.alloc(1, FRAME_SIZE), Err(FrameError::OutOfMemory));
    }

    #[test]
    fn aligned_contiguous_alloc_and_free_merge_back() {
        let mut a = FrameAllocator::new();
        a.add_region(MIB + FRAME_SIZE, 16 * MIB).unwrap();
        let before = a.free_bytes();
        let big = a.alloc(512, 2 * MIB).unwrap();
        assert_eq!(big % (2 * MIB), 0);
        let small = a.alloc(3, FRAME_SIZE).unwrap();
        assert_eq!(small, MIB + FRAME_SIZE, "first fit uses the unaligned head");
        assert_eq!(a.free_bytes(), before - 515 * FRAME_SIZE);
        a.free(big, 512).unwrap();
        a.free(small, 3).unwrap();
        assert_eq!(a.free_bytes(), before);
        assert_eq!(a.ranges().len(), 1, "frees merge into one range again");
    }

    #[test]
    fn bad_requests_are_errors() {
        let mut a = FrameAllocator::new();
        a.add_region(MIB, MIB).unwrap();
        assert_eq!(a.alloc(0, FRAME_SIZE), Err(FrameError::BadRange));
        assert_eq!(a.alloc(1, 3000), Err(FrameError::BadRange));
        assert_eq!(a.alloc(u64::MAX, FRAME_SIZE), Err(FrameError::BadRange));
        assert_eq!(a.free(MIB + 1, 1), Err(FrameError::BadRange));
        assert_eq!(a.free(MIB, 1), Err(FrameError::DoubleFree));
        assert_eq!(a.add_region(u64::MAX - 10, 100), Err(FrameError::BadRange));
        let f = a.alloc(1, FRAME_SIZE).unwrap();
        a.free(f, 1).unwrap();
        assert_eq!(a.free(f, 1), Err(FrameError::DoubleFree));
    }

    #[test]
    fn fragmentation_is_bounded_not_fatal() {
        let mut a = FrameAllocator::new();
        a.add_region(MIB, 4 * MAX_RANGES as u64 * FRAME_SIZE)
            .unwrap();
        let mut result = Ok(());
        for i in 0..MAX_RANGES as u64 + 4 {
            result = a.reserve(MIB + (2 * i + 1) * FRAME_SIZE, FRAME_SIZE);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(FrameError::TooFragmented));
        assert!(
            a.ranges().windows(2).all(|w| w[0].end < w[1].start),
            "list stays sorted and disjoint"
        );
    }
}

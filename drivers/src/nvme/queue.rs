//! One submission/completion queue pair in DMA memory and its doorbells.

use core::sync::atomic::{Ordering, fence};

use crate::hal::{DmaRegion, Hal, PAGE_SIZE};
use crate::nvme::command::{CQE_SIZE, Command, Entry, SQE_SIZE};
use crate::region::Region;

/// Offset of the first doorbell in BAR0.
const DOORBELL_BASE: usize = 0x1000;

/// Where the doorbells of queue pair `id` are, for a controller's stride.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Doorbells {
    pub stride: usize,
}

impl Doorbells {
    pub(crate) fn submission_tail(&self, id: u16) -> usize {
        DOORBELL_BASE + 2 * usize::from(id) * self.stride
    }

    pub(crate) fn completion_head(&self, id: u16) -> usize {
        DOORBELL_BASE + (2 * usize::from(id) + 1) * self.stride
    }

    /// Bytes of BAR0 the doorbells of queues `0..=last` need.
    pub(crate) fn window_for(&self, last: u16) -> usize {
        self.completion_head(last) + 4
    }
}

pub(crate) struct QueuePair {
    pub id: u16,
    pub depth: u16,
    pub sq: DmaRegion,
    pub cq: DmaRegion,
    sq_tail: u16,
    cq_head: u16,
    /// The phase bit a new completion entry carries; flips on each wrap.
    phase: bool,
}

impl QueuePair {
    /// Allocates a pair of `depth` entries (at most a page of each).
    pub(crate) fn new(hal: &impl Hal, id: u16, depth: u16) -> Option<Self> {
        let sq_pages = (usize::from(depth) * SQE_SIZE).div_ceil(PAGE_SIZE);
        let sq = hal.dma_alloc(sq_pages)?;
        let Some(cq) = hal.dma_alloc((usize::from(depth) * CQE_SIZE).div_ceil(PAGE_SIZE)) else {
            // SAFETY: just allocated, never shown to a device.
            unsafe { hal.dma_free(sq) };
            return None;
        };
        Some(Self {
            id,
            depth,
            sq,
            cq,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        })
    }

    /// Back to the state of a freshly created queue (after a controller
    /// reset, which forgets all queue state).
    pub(crate) fn reset(&mut self) {
        Region::from(&self.sq).fill(0, self.sq.len(), 0);
        Region::from(&self.cq).fill(0, self.cq.len(), 0);
        self.sq_tail = 0;
        self.cq_head = 0;
        self.phase = true;
    }

    /// Places `command` at the tail and rings the doorbell. The caller
    /// keeps fewer than `depth` commands outstanding, so the queue has room.
    pub(crate) fn submit(&mut self, regs: &Region, doorbells: Doorbells, command: &Command) {
        let sq = Region::from(&self.sq);
        let base = usize::from(self.sq_tail) * SQE_SIZE;
        for (index, dword) in command.0.iter().enumerate() {
            sq.write32(base + index * 4, *dword);
        }
        self.sq_tail = (self.sq_tail + 1) % self.depth;
        // The entry must be in memory before the controller learns of it.
        fence(Ordering::SeqCst);
        regs.write32(doorbells.submission_tail(self.id), u32::from(self.sq_tail));
    }

    /// Takes the next completion entry if the controller has posted one.
    /// The caller rings the head doorbell with [`Self::release`] afterwards.
    pub(crate) fn next_completion(&mut self) -> Option<Entry> {
        let cq = Region::from(&self.cq);
        let base = usize::from(self.cq_head) * CQE_SIZE;
        let status_and_cid = cq.read32(base + 12);
        if (status_and_cid & (1 << 16) != 0) != self.phase {
            return None;
        }
        // Read the rest of the entry only after seeing its phase bit.
        fence(Ordering::SeqCst);
        let entry = Entry {
            result: cq.read32(base),
            cid: status_and_cid as u16,
            status: (status_and_cid >> 17) as u16,
        };
        self.cq_head += 1;
        if self.cq_head == self.depth {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some(entry)
    }

    /// Tells the controller the entries taken so far may be reused.
    pub(crate) fn release(&self, regs: &Region, doorbells: Doorbells) {
        regs.write32(doorbells.completion_head(self.id), u32::from(self.cq_head));
    }

    pub(crate) fn free(self, hal: &impl Hal) {
        // SAFETY: the controller no longer uses the queues (it was disabled
        // or never told about them) and nothing else points into them.
        unsafe {
            hal.dma_free(self.sq);
            hal.dma_free(self.cq);
        }
    }
}

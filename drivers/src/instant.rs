//! What the devices that finish each request as it is submitted (the RAM
//! disk, the null disk) share: their limits, and completions that wait per
//! queue until polled.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use blockdev::{self, Completion, Geometry, SubmitError};

/// Requests one queue holds before it must be polled.
const QUEUE_DEPTH: u16 = 256;

/// Largest read or write accepted, to bound the time one request takes.
const MAX_TRANSFER_BYTES: u32 = 4 << 20;

/// Most segments one read or write may carry.
pub(crate) const MAX_SEGMENTS: u16 = 1024;

/// `blocks` blocks of `block_size` bytes on `queues` queues, with every
/// operation supported and no volatile cache.
pub(crate) fn instant_geometry(block_size: u32, blocks: u64, queues: u16) -> Geometry {
    Geometry {
        logical_block_size: block_size,
        physical_block_size: block_size,
        blocks,
        volatile_write_cache: false,
        discard_granularity: Some(1),
        max_discard_blocks: blocks,
        max_write_zeroes_blocks: blocks,
        max_transfer_bytes: MAX_TRANSFER_BYTES,
        max_segments: MAX_SEGMENTS,
        queues,
        queue_depth: QUEUE_DEPTH,
    }
}

/// Per-queue lists of requests finished at submission, each holding at
/// most [`QUEUE_DEPTH`] until polled.
pub(crate) struct InstantCompletions {
    finished: Vec<VecDeque<Completion>>,
}

impl InstantCompletions {
    pub(crate) fn new(queues: u16) -> Self {
        Self {
            finished: (0..queues).map(|_| VecDeque::new()).collect(),
        }
    }

    /// `QueueFull` when `queue` (a valid one) cannot take another request.
    pub(crate) fn check_room(&self, queue: u16) -> Result<(), SubmitError> {
        if self.finished[usize::from(queue)].len() >= usize::from(QUEUE_DEPTH) {
            return Err(SubmitError::QueueFull);
        }
        Ok(())
    }

    /// Records that the request `tag` on `queue` succeeded.
    pub(crate) fn push_ok(&mut self, queue: u16, tag: u64) {
        self.finished[usize::from(queue)].push_back(Completion {
            tag,
            result: Ok(()),
        });
    }

    /// [`blockdev::QueuedDevice::poll`] for these devices.
    pub(crate) fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        let Some(finished) = self.finished.get_mut(usize::from(queue)) else {
            return 0;
        };
        blockdev::hand_over(finished, out)
    }
}

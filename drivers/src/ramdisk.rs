//! A RAM disk: memory supplied by the caller (a boot module, or pages from
//! the `Hal`) served through [`QueuedDevice`]. Requests complete at once and
//! wait in a per-queue list until polled.

use core::ptr::NonNull;

use crate::hal::{DmaRegion, Hal, PAGE_SIZE};
use crate::instant::{InstantCompletions, instant_geometry};
use crate::segment_copy::{self, CopyDirection};
use blockdev::{self, Completion, Geometry, QueuedDevice, Request, Segment, SubmitError};

/// A block device over a range of memory.
pub struct RamDisk<H: Hal> {
    hal: H,
    storage: NonNull<u8>,
    geometry: Geometry,
    finished: InstantCompletions,
    /// Memory the disk allocated itself, freed on drop.
    owned: Option<DmaRegion>,
}

impl<H: Hal> RamDisk<H> {
    /// A RAM disk over `blocks` blocks of `block_size` bytes at `storage`.
    ///
    /// # Safety
    ///
    /// `storage` is valid for reads and writes of `blocks * block_size` bytes
    /// and used by nothing else for the disk's lifetime.
    pub unsafe fn new(
        hal: H,
        storage: NonNull<u8>,
        block_size: u32,
        blocks: u64,
        queues: u16,
    ) -> Self {
        Self {
            hal,
            storage,
            geometry: instant_geometry(block_size, blocks, queues),
            finished: InstantCompletions::new(queues),
            owned: None,
        }
    }

    /// A zero-filled RAM disk of `blocks` 512-byte blocks in memory from the
    /// `Hal`, or `None` when it has not that much.
    pub fn allocate(hal: H, blocks: u64, queues: u16) -> Option<Self> {
        let bytes = usize::try_from(blocks.checked_mul(512)?).ok()?;
        let region = hal.dma_alloc(bytes.div_ceil(PAGE_SIZE))?;
        let storage = region.virt;
        // SAFETY: the region is ours, zeroed and at least `bytes` long.
        let mut disk = unsafe { Self::new(hal, storage, 512, blocks, queues) };
        disk.owned = Some(region);
        Some(disk)
    }

    fn byte_range(&self, lba: u64, blocks: u64) -> (usize, usize) {
        let block_size = u64::from(self.geometry.logical_block_size);
        // `blockdev::validate` bounded lba + blocks by the capacity, which fits
        // in memory, so neither conversion truncates.
        ((lba * block_size) as usize, (blocks * block_size) as usize)
    }

    /// Copies between the disk at byte `offset` and the segments; returns
    /// `Err` before copying anything if a segment is not mapped RAM.
    fn transfer(
        &mut self,
        offset: usize,
        segments: &[Segment],
        direction: CopyDirection,
    ) -> Result<(), SubmitError> {
        segment_copy::check_mapped(&self.hal, segments)?;
        // SAFETY: `validate` kept `offset` plus the segments' length within
        // the storage that `new`'s caller vouched for; guest buffers never
        // overlap the disk's own storage.
        unsafe {
            let disk = self.storage.add(offset);
            segment_copy::copy(&self.hal, disk, segments, direction)
        }
    }
}

impl<H: Hal> QueuedDevice for RamDisk<H> {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn submit(&mut self, queue: u16, tag: u64, request: Request<'_>) -> Result<(), SubmitError> {
        let blocks = blockdev::validate(&self.geometry, queue, &request)?;
        self.finished.check_room(queue)?;
        match request {
            Request::Read { lba, segments } | Request::Write { lba, segments } => {
                let (offset, _) = self.byte_range(lba, blocks);
                let direction = match request {
                    Request::Write { .. } => CopyDirection::FromSegments,
                    _ => CopyDirection::IntoSegments,
                };
                self.transfer(offset, segments, direction)?;
            }
            Request::Flush => {}
            Request::Discard { lba, blocks } | Request::WriteZeroes { lba, blocks } => {
                // Discarded blocks read back as zeroes, like write-zeroes.
                let (offset, len) = self.byte_range(lba, blocks);
                // SAFETY: `validate` kept the range within the storage.
                unsafe { self.storage.as_ptr().add(offset).write_bytes(0, len) };
            }
        }
        self.finished.push_ok(queue, tag);
        Ok(())
    }

    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        self.finished.poll(queue, out)
    }
}

impl<H: Hal> Drop for RamDisk<H> {
    fn drop(&mut self) {
        if let Some(region) = self.owned.take() {
            // SAFETY: the region came from this Hal and no pointer to it
            // outlives the disk.
            unsafe { self.hal.dma_free(region) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestHal, poll_one, read_request, segment, write_request};
    use blockdev::IoError;

    #[test]
    fn write_read_discard_round_trip() {
        let hal = TestHal::new();
        let mut disk = RamDisk::allocate(hal.clone(), 64, 2).unwrap();
        let source = hal.buffer_with_pattern(2, 7);
        let written = [segment(source.phys, 1024), segment(source.phys + 4096, 512)];
        disk.submit(1, 10, write_request(3, &written)).unwrap();
        assert_eq!(
            poll_one(&hal, &mut disk, 1),
            Completion {
                tag: 10,
                result: Ok(())
            }
        );

        let target = hal.dma_buffer(1);
        let read = [segment(target.phys, 1536)];
        disk.submit(1, 11, read_request(3, &read)).unwrap();
        assert_eq!(poll_one(&hal, &mut disk, 1).tag, 11);
        assert_eq!(hal.bytes(target.phys, 1024), hal.bytes(source.phys, 1024));
        assert_eq!(
            hal.bytes(target.phys + 1024, 512),
            hal.bytes(source.phys + 4096, 512)
        );

        disk.submit(0, 12, Request::Discard { lba: 4, blocks: 1 })
            .unwrap();
        assert_eq!(poll_one(&hal, &mut disk, 0).result, Ok::<(), IoError>(()));
        disk.submit(0, 13, read_request(3, &read)).unwrap();
        poll_one(&hal, &mut disk, 0);
        assert_eq!(hal.bytes(target.phys, 512), hal.bytes(source.phys, 512));
        assert!(hal.bytes(target.phys + 512, 512).iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_out_of_range_and_bad_queue() {
        let hal = TestHal::new();
        let mut disk = RamDisk::allocate(hal.clone(), 8, 1).unwrap();
        assert_eq!(
            disk.submit(0, 1, Request::Discard { lba: 7, blocks: 2 }),
            Err(SubmitError::OutOfRange)
        );
        assert_eq!(
            disk.submit(1, 1, Request::Flush),
            Err(SubmitError::NoSuchQueue)
        );
        let buffer = hal.dma_buffer(1);
        let odd = [segment(buffer.phys, 100)];
        assert_eq!(
            disk.submit(0, 1, read_request(0, &odd)),
            Err(SubmitError::BadLength)
        );
        let unmapped = [segment(0x10, 512)];
        assert_eq!(
            disk.submit(0, 1, read_request(0, &unmapped)),
            Err(SubmitError::BadAddress)
        );
        let mut out = [Completion::default(); 4];
        assert_eq!(disk.poll(0, &mut out), 0);
    }

    #[test]
    fn queue_fills_until_polled() {
        let hal = TestHal::new();
        let mut disk = RamDisk::allocate(hal.clone(), 8, 1).unwrap();
        for tag in 0..u64::from(disk.geometry().queue_depth) {
            disk.submit(0, tag, Request::Flush).unwrap();
        }
        assert_eq!(
            disk.submit(0, 999, Request::Flush),
            Err(SubmitError::QueueFull)
        );
        let mut out = [Completion::default(); 8];
        assert_eq!(disk.poll(0, &mut out), 8);
        assert_eq!(out[7].tag, 7);
        disk.submit(0, 999, Request::Flush).unwrap();
    }
}

//! A null disk: reads give zeroes, writes are dropped, every request
//! completes at once. A device that costs next to nothing, so a benchmark
//! of a backend over it measures the backend.

use alloc::vec::Vec;
use core::ptr::NonNull;

use crate::hal::Hal;
use crate::instant::{InstantCompletions, MAX_SEGMENTS, instant_geometry};
use blockdev::{self, Completion, Geometry, QueuedDevice, Request, SubmitError};

/// A block device of 512-byte blocks that stores nothing.
pub struct NullDisk<H: Hal> {
    hal: H,
    geometry: Geometry,
    finished: InstantCompletions,
    /// Where a read's segments are mapped, found before any is zeroed;
    /// holds `MAX_SEGMENTS` from the start so no request allocates.
    mapped: Vec<NonNull<u8>>,
}

impl<H: Hal> NullDisk<H> {
    /// A null disk of `blocks` 512-byte blocks on `queues` queues; `hal`
    /// reaches the segments reads fill with zeroes.
    pub fn new(hal: H, blocks: u64, queues: u16) -> Self {
        Self {
            hal,
            geometry: instant_geometry(512, blocks, queues),
            finished: InstantCompletions::new(queues),
            mapped: Vec::with_capacity(usize::from(MAX_SEGMENTS)),
        }
    }
}

impl<H: Hal> QueuedDevice for NullDisk<H> {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn submit(&mut self, queue: u16, tag: u64, request: Request<'_>) -> Result<(), SubmitError> {
        blockdev::validate(&self.geometry, queue, &request)?;
        self.finished.check_room(queue)?;
        if let Request::Read { segments, .. } | Request::Write { segments, .. } = request {
            // As a real device's DMA would, refuse a segment that is not
            // mapped memory, before touching any. `validate` bounded the
            // segments by `MAX_SEGMENTS`, so the pushes stay in capacity.
            self.mapped.clear();
            for segment in segments {
                let virt = self.hal.phys_to_virt(segment.phys, segment.len as usize);
                self.mapped.push(virt.ok_or(SubmitError::BadAddress)?);
            }
            if let Request::Read { .. } = request {
                for (virt, segment) in self.mapped.iter().zip(segments) {
                    // SAFETY: `phys_to_virt` vouched for the segment's
                    // bytes at `virt`, which the request hands the device.
                    unsafe { virt.as_ptr().write_bytes(0, segment.len as usize) };
                }
            }
        }
        self.finished.push_ok(queue, tag);
        Ok(())
    }

    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        self.finished.poll(queue, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestHal, poll_one, read_request, segment, write_request};

    #[test]
    fn reads_give_zeroes_and_writes_are_dropped() {
        let hal = TestHal::new();
        let mut disk = NullDisk::new(hal.clone(), 1 << 30, 2);
        let source = hal.buffer_with_pattern(1, 5);
        disk.submit(1, 10, write_request(7, &[segment(source.phys, 4096)]))
            .unwrap();
        assert_eq!(poll_one(&hal, &mut disk, 1).tag, 10);

        let target = hal.buffer_with_pattern(1, 9);
        let read = [segment(target.phys, 1024)];
        disk.submit(1, 11, read_request(7, &read)).unwrap();
        assert_eq!(
            poll_one(&hal, &mut disk, 1),
            Completion {
                tag: 11,
                result: Ok(())
            }
        );
        assert!(hal.bytes(target.phys, 1024).iter().all(|&b| b == 0));
        // Only the segment's bytes are written.
        assert_ne!(hal.bytes(target.phys + 1024, 3072), [0; 3072]);
    }

    #[test]
    fn null_disk_refuses_what_a_disk_would() {
        let hal = TestHal::new();
        let mut disk = NullDisk::new(hal.clone(), 8, 1);
        let buffer = hal.dma_buffer(1);
        assert_eq!(
            disk.submit(0, 1, read_request(8, &[segment(buffer.phys, 512)])),
            Err(SubmitError::OutOfRange)
        );
        assert_eq!(
            disk.submit(0, 1, write_request(0, &[segment(0x10, 512)])),
            Err(SubmitError::BadAddress)
        );
        assert_eq!(
            disk.submit(1, 1, Request::Flush),
            Err(SubmitError::NoSuchQueue)
        );
        let mut out = [Completion::default(); 4];
        assert_eq!(disk.poll(0, &mut out), 0);
    }
}

//! One disk served to several vbds, each seeing its own range of blocks
//! (`nvme0n1@2048+1048576`, a partition, or the whole disk): the kernel's
//! [`super::TargetOpener`] hands out [`DiskSlice`]s of a [`SharedDisk`].
//!
//! Slices share the device's queues: each request's tag carries its
//! slice, and whichever slice polls a queue sorts the completions it finds
//! into per-slice lists, so no slice ever sees another's completion.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::rc::Rc;
use core::cell::RefCell;

use drivers::{BlockDevice, Completion, Geometry, Request, SubmitError};

use super::target::OpenError;

/// Tag bits left to a slice's own tags; the slice number sits above.
const SLICE_TAG_BITS: u32 = 48;

/// Completions fetched from the device per poll.
const POLL_BATCH: usize = 32;

struct Slot {
    start: u64,
    blocks: u64,
    /// Completions found for this slice, per queue, not yet handed over.
    finished: BTreeMap<u16, VecDeque<Completion>>,
}

struct Shared {
    device: Box<dyn BlockDevice>,
    slices: BTreeMap<u16, Slot>,
}

/// A disk whose blocks are handed out in slices.
#[derive(Clone)]
pub struct SharedDisk(Rc<RefCell<Shared>>);

impl SharedDisk {
    pub fn new(device: Box<dyn BlockDevice>) -> Self {
        SharedDisk(Rc::new(RefCell::new(Shared {
            device,
            slices: BTreeMap::new(),
        })))
    }

    /// The whole device's shape.
    pub fn geometry(&self) -> Geometry {
        self.0.borrow().device.geometry()
    }

    /// `blocks` logical blocks from block `start`, for one vbd. Refused
    /// when the range leaves the disk or overlaps a slice in use (two
    /// guests writing the same blocks would corrupt each other).
    pub fn slice(&self, start: u64, blocks: u64) -> Result<DiskSlice, OpenError> {
        let mut shared = self.0.borrow_mut();
        let end = start.checked_add(blocks).ok_or(OpenError::BadSize)?;
        if blocks == 0 || end > shared.device.geometry().blocks {
            return Err(OpenError::BadSize);
        }
        let overlaps = shared
            .slices
            .values()
            .any(|s| start < s.start + s.blocks && s.start < end);
        if overlaps {
            return Err(OpenError::Busy);
        }
        let id = (0..=u16::MAX)
            .find(|id| !shared.slices.contains_key(id))
            .ok_or(OpenError::Busy)?;
        let slot = Slot {
            start,
            blocks,
            finished: BTreeMap::new(),
        };
        shared.slices.insert(id, slot);
        Ok(DiskSlice {
            disk: self.0.clone(),
            id,
            start,
            blocks,
        })
    }

    /// `sectors` 512-byte sectors from sector `start` (a [`Target::Range`]),
    /// which must fall on the disk's logical blocks.
    ///
    /// [`Target::Range`]: super::Target::Range
    pub fn sector_range(&self, start: u64, sectors: u64) -> Result<DiskSlice, OpenError> {
        let per_block = u64::from(self.geometry().logical_block_size) / 512;
        let aligned = |n: u64| per_block > 0 && n.is_multiple_of(per_block);
        if !aligned(start) || !aligned(sectors) {
            return Err(OpenError::BadSize);
        }
        self.slice(start / per_block, sectors / per_block)
    }
}

/// A range of a [`SharedDisk`], itself a [`BlockDevice`]; the range is
/// free again when it is dropped.
pub struct DiskSlice {
    disk: Rc<RefCell<Shared>>,
    id: u16,
    start: u64,
    blocks: u64,
}

impl DiskSlice {
    /// Moves `(lba, count)` into the device's numbering.
    fn place(&self, lba: u64, count: u64) -> Result<u64, SubmitError> {
        match lba.checked_add(count) {
            Some(end) if end <= self.blocks => Ok(self.start + lba),
            _ => Err(SubmitError::OutOfRange),
        }
    }
}

impl BlockDevice for DiskSlice {
    fn geometry(&self) -> Geometry {
        let device = self.disk.borrow().device.geometry();
        Geometry {
            blocks: self.blocks,
            max_discard_blocks: device.max_discard_blocks.min(self.blocks),
            max_write_zeroes_blocks: device.max_write_zeroes_blocks.min(self.blocks),
            ..device
        }
    }

    fn submit(&mut self, queue: u16, tag: u64, request: Request<'_>) -> Result<(), SubmitError> {
        if tag >> SLICE_TAG_BITS != 0 {
            return Err(SubmitError::BadLength);
        }
        let block_size = u64::from(self.disk.borrow().device.geometry().logical_block_size);
        let placed = match request {
            Request::Read { lba, segments } | Request::Write { lba, segments } => {
                let bytes: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
                let lba = self.place(lba, bytes.div_ceil(block_size.max(1)))?;
                match request {
                    Request::Read { .. } => Request::Read { lba, segments },
                    _ => Request::Write { lba, segments },
                }
            }
            Request::Flush => Request::Flush,
            Request::Discard { lba, blocks } => Request::Discard {
                lba: self.place(lba, blocks)?,
                blocks,
            },
            Request::WriteZeroes { lba, blocks } => Request::WriteZeroes {
                lba: self.place(lba, blocks)?,
                blocks,
            },
        };
        let tag = u64::from(self.id) << SLICE_TAG_BITS | tag;
        self.disk.borrow_mut().device.submit(queue, tag, placed)
    }

    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        let mut shared = self.disk.borrow_mut();
        let shared = &mut *shared;
        let mut batch = [Completion::default(); POLL_BATCH];
        // Completions are bounded by what the queue holds.
        let passes = usize::from(shared.device.geometry().queue_depth) / POLL_BATCH + 1;
        for _ in 0..passes {
            let n = shared.device.poll(queue, &mut batch).min(POLL_BATCH);
            for completion in &batch[..n] {
                let owner = (completion.tag >> SLICE_TAG_BITS) as u16;
                // A completion of a slice dropped meanwhile has nobody to go to.
                if let Some(slot) = shared.slices.get_mut(&owner) {
                    let own_tag = completion.tag & ((1 << SLICE_TAG_BITS) - 1);
                    slot.finished
                        .entry(queue)
                        .or_default()
                        .push_back(Completion {
                            tag: own_tag,
                            result: completion.result,
                        });
                }
            }
            if n < POLL_BATCH {
                break;
            }
        }
        let Some(finished) = shared
            .slices
            .get_mut(&self.id)
            .and_then(|slot| slot.finished.get_mut(&queue))
        else {
            return 0;
        };
        let count = out.len().min(finished.len());
        for (slot, completion) in out.iter_mut().zip(finished.drain(..count)) {
            *slot = completion;
        }
        count
    }
}

impl Drop for DiskSlice {
    fn drop(&mut self) {
        self.disk.borrow_mut().slices.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// A 4K-block device that completes at once and records placements.
    struct Recorder {
        placed: Rc<RefCell<Vec<(u64, u64)>>>,
        done: VecDeque<Completion>,
    }

    impl BlockDevice for Recorder {
        fn geometry(&self) -> Geometry {
            Geometry {
                logical_block_size: 4096,
                physical_block_size: 4096,
                blocks: 100,
                volatile_write_cache: false,
                discard_granularity: Some(1),
                max_discard_blocks: 64,
                max_write_zeroes_blocks: 0,
                max_transfer_bytes: 1 << 20,
                max_segments: 32,
                queues: 1,
                queue_depth: 64,
            }
        }

        fn submit(&mut self, _: u16, tag: u64, request: Request<'_>) -> Result<(), SubmitError> {
            if let Request::Discard { lba, blocks } = request {
                self.placed.borrow_mut().push((lba, blocks));
            }
            self.done.push_back(Completion {
                tag,
                result: Ok(()),
            });
            Ok(())
        }

        fn poll(&mut self, _: u16, out: &mut [Completion]) -> usize {
            let n = out.len().min(self.done.len());
            for (slot, c) in out.iter_mut().zip(self.done.drain(..n)) {
                *slot = c;
            }
            n
        }
    }

    #[test]
    fn slices_place_requests_and_route_completions() {
        let placed = Rc::new(RefCell::new(Vec::new()));
        let recorder = Recorder {
            placed: placed.clone(),
            done: VecDeque::new(),
        };
        let disk = SharedDisk::new(Box::new(recorder));
        assert_eq!(disk.sector_range(8, 7).err(), Some(OpenError::BadSize));
        assert_eq!(disk.sector_range(4, 8).err(), Some(OpenError::BadSize));
        let mut low = disk.sector_range(0, 80).unwrap();
        let mut high = disk.slice(90, 10).unwrap();
        assert_eq!(disk.slice(5, 10).err(), Some(OpenError::Busy));
        assert_eq!(disk.slice(95, 10).err(), Some(OpenError::BadSize));
        assert_eq!(high.geometry().blocks, 10);
        assert_eq!(high.geometry().max_discard_blocks, 10);

        let discard = |lba, blocks| Request::Discard { lba, blocks };
        high.submit(0, 7, discard(2, 3)).unwrap();
        low.submit(0, 7, discard(0, 10)).unwrap();
        assert_eq!(
            low.submit(0, 8, discard(5, 6)),
            Err(SubmitError::OutOfRange)
        );
        assert_eq!(
            low.submit(0, 1 << 48, discard(0, 1)),
            Err(SubmitError::BadLength)
        );
        assert_eq!(*placed.borrow(), [(92, 3), (0, 10)]);

        let mut out = [Completion::default(); 4];
        assert_eq!(low.poll(0, &mut out), 1);
        assert_eq!(out[0].tag, 7);
        assert_eq!(
            high.poll(0, &mut out),
            1,
            "kept for the slice that did not poll"
        );
        assert_eq!(high.poll(0, &mut out), 0);

        drop(low);
        assert!(disk.slice(0, 90).is_ok(), "a dropped slice frees its range");
    }
}

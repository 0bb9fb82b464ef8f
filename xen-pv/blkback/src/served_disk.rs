//! Disk and queue binding: the disk behind a vbd, what of it is offered to
//! the frontend, and the queue handle each ring opens on it.

use blockdev::{DiskView, Geometry, QueueHandle};
use xen_pv::PAGE_SIZE;

use crate::blkif;
use crate::target::OpenError;

/// Bytes in a blkif sector: every sector number on the ring and in
/// xenstore counts these, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;

/// Rings one vbd serves at most (`multi-queue-max-queues`), each with a
/// queue handle of its own.
pub const MAX_QUEUES: u16 = 4;

/// Most segments of an indirect request (`feature-max-indirect-segments`,
/// Linux blkback's default): 1 MiB per request.
pub const MAX_INDIRECT_SEGMENTS: u16 = 256;

/// How a vbd's data moves between the guest's granted pages and the
/// device (the kernel checks at start-up which one a device needs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataPath {
    /// The device reads and writes the grant-mapped pages itself.
    #[default]
    ZeroCopy,
    /// The device cannot reach grant mappings: it reads and writes bounce
    /// pages of stordom's own, and the CPU copies between them and the
    /// grants.
    Bounce,
}

/// How a device's completions reach the serving loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompletionSignal {
    /// Only by polling the device (NVMe, AHCI, virtio without interrupts;
    /// RAM disks complete at once): the loop keeps polling while
    /// requests are in flight.
    #[default]
    Polled,
    /// An event wakes the loop when completions come (an NBD export: its
    /// replies arrive as frames on the vif, whose event channel fires):
    /// the loop may sleep with requests in flight.
    Event,
}

/// A claimed view, the data path its vbd uses and how its completions
/// come: what [`crate::TargetOpener::open`] returns.
pub struct OpenedTarget {
    pub view: DiskView,
    pub data_path: DataPath,
    pub completions: CompletionSignal,
}

impl From<DiskView> for OpenedTarget {
    /// A polled view whose data the device reaches in the grants
    /// themselves (or the CPU copies, as for RAM disks).
    fn from(view: DiskView) -> Self {
        OpenedTarget {
            view,
            data_path: DataPath::ZeroCopy,
            completions: CompletionSignal::Polled,
        }
    }
}

/// The disk behind a vbd and what the frontend may do with it.
pub struct ServedDisk {
    view: DiskView,
    geometry: Geometry,
    read_only: bool,
    data_path: DataPath,
    completions: CompletionSignal,
    /// blkif sectors per logical block.
    sectors_per_block: u64,
}

impl ServedDisk {
    /// Checks that the target's view can be served over blkif: a logical
    /// block of a whole number of 512-byte sectors, and at least one block.
    pub fn new(target: OpenedTarget, read_only: bool) -> Result<ServedDisk, OpenError> {
        let OpenedTarget {
            view,
            data_path,
            completions,
        } = target;
        let geometry = view.geometry();
        let block = u64::from(geometry.logical_block_size);
        if block < SECTOR_SIZE || !block.is_multiple_of(SECTOR_SIZE) || geometry.blocks == 0 {
            return Err(OpenError::BadGeometry);
        }
        if geometry.blocks.checked_mul(block / SECTOR_SIZE).is_none() || geometry.queues == 0 {
            return Err(OpenError::BadGeometry);
        }
        Ok(ServedDisk {
            view,
            geometry,
            read_only,
            data_path,
            completions,
            sectors_per_block: block / SECTOR_SIZE,
        })
    }

    pub fn data_path(&self) -> DataPath {
        self.data_path
    }

    pub fn completions(&self) -> CompletionSignal {
        self.completions
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Capacity in 512-byte sectors (the `sectors` node).
    pub fn sectors(&self) -> u64 {
        self.geometry.blocks * self.sectors_per_block
    }

    /// Segments advertised for indirect requests; 0 when the device takes
    /// no more than a direct request carries.
    pub fn max_indirect_segments(&self) -> u16 {
        let by_transfer = self.geometry.max_transfer_bytes / PAGE_SIZE as u32;
        let limit = u32::from(MAX_INDIRECT_SEGMENTS)
            .min(u32::from(self.geometry.max_segments))
            .min(by_transfer);
        if limit > blkif::MAX_SEGMENTS_PER_REQUEST as u32 {
            limit as u16
        } else {
            0
        }
    }

    /// Rings a frontend may open (`multi-queue-max-queues`): one per
    /// hardware queue, up to [`MAX_QUEUES`].
    pub fn max_queues(&self) -> u16 {
        self.geometry.queues.clamp(1, MAX_QUEUES)
    }

    /// Whether flushes are advertised and accepted.
    pub fn flushes(&self) -> bool {
        self.geometry.volatile_write_cache
    }

    /// Discard granularity in bytes, when discard is advertised.
    pub fn discard_granularity_bytes(&self) -> Option<u64> {
        self.geometry
            .discard_granularity
            .filter(|_| self.geometry.max_discard_blocks > 0)
            .map(|g| u64::from(g.max(1)) * u64::from(self.geometry.logical_block_size))
    }

    /// The logical block of blkif `sector`, if it starts one.
    pub(crate) fn block_of(&self, sector: u64) -> Option<u64> {
        sector
            .is_multiple_of(self.sectors_per_block)
            .then(|| sector / self.sectors_per_block)
    }

    /// Segments the largest request may carry: the indirect limit, or what
    /// a direct request holds.
    pub fn max_request_segments(&self) -> usize {
        usize::from(self.max_indirect_segments()).max(blkif::MAX_SEGMENTS_PER_REQUEST)
    }

    /// A queue of the disk for one ring.
    pub fn open_queue(&self) -> Result<QueueHandle, blockdev::ClaimError> {
        self.view.open_queue()
    }
}

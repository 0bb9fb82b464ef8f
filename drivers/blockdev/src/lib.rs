//! stordom's block layer: what a storage driver implements and what a
//! backend uses, in one small crate that both depend on.
//!
//! - A driver implements [`QueuedDevice`]: tagged submission of requests on
//!   a numbered hardware queue, completions found by polling that queue.
//! - A backend never touches a [`QueuedDevice`]: it gets a [`Disk`], claims
//!   a [`DiskView`] of it (the whole disk, or a range of blocks), and opens
//!   one [`QueueHandle`] per consumer (in stordom, per blkif ring). A handle
//!   enforces its view's range, and the completions of the tags submitted
//!   on it come back on it alone, even when several handles (of several
//!   disks, e.g. the namespaces of one NVMe controller) share a hardware
//!   queue.
//! - Before serving a disk's partitions, a consumer reads its table with
//!   [`partition::read_partition_table`] (MBR and GPT) and claims the
//!   partition's blocks.
//! - [`le_field`] reads little-endian fields without panicking, for the
//!   partition tables and for the drivers' ACPI and NVMe Identify parsing.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod disk;
pub mod le_field;
pub mod partition;

pub use disk::{ClaimError, Disk, DiskView, QueueHandle};

use alloc::collections::VecDeque;
use core::ptr::NonNull;

/// A physical (bus) address.
pub type PhysAddr = u64;

/// The page size DMA memory is allocated and aligned in.
pub const PAGE_SIZE: usize = 4096;

/// Physically contiguous DMA memory, as a kernel hands it to drivers
/// (`drivers::Hal::dma_alloc`) and to the backend's bounce buffers.
#[derive(Debug)]
pub struct DmaRegion {
    /// Address the device uses.
    pub phys: PhysAddr,
    /// Address the CPU uses; `pages * PAGE_SIZE` bytes are mapped there.
    pub virt: NonNull<u8>,
    /// Size in pages.
    pub pages: usize,
}

impl DmaRegion {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }

    /// Whether the region is zero pages long.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// One piece of a scatter-gather list: `len` bytes of RAM at `phys`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Physical address of the first byte.
    pub phys: PhysAddr,
    /// Length in bytes.
    pub len: u32,
}

/// What to do. Block addresses and counts are in logical blocks of
/// [`Geometry::logical_block_size`] bytes.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    /// Read into the segments, in order, starting at block `lba`.
    Read {
        /// First block.
        lba: u64,
        /// Where the data goes; lengths add up to whole blocks.
        segments: &'a [Segment],
    },
    /// Write the segments, in order, starting at block `lba`.
    Write {
        /// First block.
        lba: u64,
        /// Where the data comes from; lengths add up to whole blocks.
        segments: &'a [Segment],
    },
    /// Make every write completed so far durable (a no-op without a
    /// volatile write cache).
    Flush,
    /// Tell the device `blocks` blocks from `lba` are unused.
    Discard {
        /// First block.
        lba: u64,
        /// How many.
        blocks: u64,
    },
    /// Make `blocks` blocks from `lba` read as zeroes.
    WriteZeroes {
        /// First block.
        lba: u64,
        /// How many.
        blocks: u64,
    },
}

impl Request<'_> {
    /// The same request with its data in `segments` instead (a read or a
    /// write; other requests carry no data and stay as they are).
    pub fn with_segments(self, segments: &[Segment]) -> Request<'_> {
        match self {
            Request::Read { lba, .. } => Request::Read { lba, segments },
            Request::Write { lba, .. } => Request::Write { lba, segments },
            Request::Flush => Request::Flush,
            Request::Discard { lba, blocks } => Request::Discard { lba, blocks },
            Request::WriteZeroes { lba, blocks } => Request::WriteZeroes { lba, blocks },
        }
    }
}

/// Shape and limits of a block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes in a logical block (the addressing unit).
    pub logical_block_size: u32,
    /// Bytes in a physical block (the unit written without read-modify-write).
    pub physical_block_size: u32,
    /// Capacity in logical blocks.
    pub blocks: u64,
    /// Whether the device caches writes volatilely, so flushes matter.
    pub volatile_write_cache: bool,
    /// Discard granularity in logical blocks; `None` when discard is unsupported.
    pub discard_granularity: Option<u32>,
    /// Most logical blocks one discard may cover.
    pub max_discard_blocks: u64,
    /// Most logical blocks one write-zeroes may cover; 0 when unsupported.
    pub max_write_zeroes_blocks: u64,
    /// Most bytes one read or write may transfer.
    pub max_transfer_bytes: u32,
    /// Most segments one read or write may carry.
    pub max_segments: u16,
    /// Number of hardware queues (valid queue indexes are `0..queues`).
    pub queues: u16,
    /// Requests one queue holds in flight.
    pub queue_depth: u16,
}

/// Why a request that was accepted failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// The medium could not be read or written (unrecovered error).
    Media,
    /// The device refused the request as malformed.
    InvalidRequest,
    /// The device does not support the operation.
    Unsupported,
    /// The blocks lie outside the device according to the device itself.
    OutOfRange,
    /// The request got no answer in time; the controller was reset.
    Timeout,
    /// The request was cancelled by a controller or port reset (retryable).
    Aborted,
    /// Some other device error; `code` is the controller's raw status.
    Device {
        /// Raw status as the controller reported it.
        code: u32,
    },
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The tag the request was submitted with.
    pub tag: u64,
    /// How it ended.
    pub result: Result<(), IoError>,
}

impl Default for Completion {
    fn default() -> Self {
        Self {
            tag: 0,
            result: Ok(()),
        }
    }
}

/// Why a request was not accepted (nothing was started).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue has no free slot; poll and retry.
    QueueFull,
    /// There is no queue with that index.
    NoSuchQueue,
    /// The blocks lie beyond the device's capacity.
    OutOfRange,
    /// The device does not support the operation.
    Unsupported,
    /// Segment lengths are not whole blocks or the request is empty.
    BadLength,
    /// The device cannot express the segments' alignment (for NVMe: an
    /// interior segment not page aligned, or an odd address).
    Misaligned,
    /// More bytes, blocks or segments than [`Geometry`] allows.
    TooLarge,
    /// A segment is not RAM the driver can reach.
    BadAddress,
    /// The device failed and could not be recovered.
    DeviceFailed,
    /// The tag does not fit the bits a [`QueueHandle`] leaves to its user
    /// ([`QueueHandle::MAX_TAG`]).
    BadTag,
}

/// What a storage driver implements: tagged submission on numbered
/// hardware queues, completions by polling.
///
/// Completions of a queue are only returned by polling it, and polling a
/// queue returns all of them, whoever submitted: share a device between
/// consumers only through a [`Disk`] and its [`QueueHandle`]s.
pub trait QueuedDevice {
    /// Shape and limits.
    fn geometry(&self) -> Geometry;

    /// Starts `request` on `queue`; its completion will carry `tag`.
    fn submit(&mut self, queue: u16, tag: u64, request: Request<'_>) -> Result<(), SubmitError>;

    /// Writes finished requests of `queue` into `out` and returns how many;
    /// also detects timeouts. Never blocks.
    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize;
}

/// Checks a request against a geometry and returns how many blocks it covers
/// (0 for a flush).
pub fn validate(
    geometry: &Geometry,
    queue: u16,
    request: &Request<'_>,
) -> Result<u64, SubmitError> {
    if queue >= geometry.queues {
        return Err(SubmitError::NoSuchQueue);
    }
    let block_size = u64::from(geometry.logical_block_size);
    let (lba, blocks) = match *request {
        Request::Read { lba, segments } | Request::Write { lba, segments } => {
            if segments.len() > usize::from(geometry.max_segments) {
                return Err(SubmitError::TooLarge);
            }
            let bytes: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
            if bytes == 0
                || !bytes.is_multiple_of(block_size)
                || segments.iter().any(|s| s.len == 0)
            {
                return Err(SubmitError::BadLength);
            }
            if bytes > u64::from(geometry.max_transfer_bytes) {
                return Err(SubmitError::TooLarge);
            }
            (lba, bytes / block_size)
        }
        Request::Flush => return Ok(0),
        Request::Discard { lba, blocks } => {
            if geometry.discard_granularity.is_none() {
                return Err(SubmitError::Unsupported);
            }
            if blocks > geometry.max_discard_blocks {
                return Err(SubmitError::TooLarge);
            }
            (lba, blocks)
        }
        Request::WriteZeroes { lba, blocks } => {
            if geometry.max_write_zeroes_blocks == 0 {
                return Err(SubmitError::Unsupported);
            }
            if blocks > geometry.max_write_zeroes_blocks {
                return Err(SubmitError::TooLarge);
            }
            (lba, blocks)
        }
    };
    if blocks == 0 {
        return Err(SubmitError::BadLength);
    }
    match lba.checked_add(blocks) {
        Some(end) if end <= geometry.blocks => Ok(blocks),
        _ => Err(SubmitError::OutOfRange),
    }
}

/// Moves as many completions from `finished` into `out` as fit, oldest
/// first, and returns how many: the tail of every driver's `poll`.
pub fn hand_over(finished: &mut VecDeque<Completion>, out: &mut [Completion]) -> usize {
    let count = out.len().min(finished.len());
    for (slot, completion) in out.iter_mut().zip(finished.drain(..count)) {
        *slot = completion;
    }
    count
}

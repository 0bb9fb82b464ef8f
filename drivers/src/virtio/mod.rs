//! virtio-blk through the virtio-drivers crate, behind [`QueuedDevice`].
//!
//! virtio-drivers' block driver has one 16-entry virtqueue, one buffer per
//! request and only a blocking flush, so: each segment of a request is a
//! virtio request of its own (segments must be whole 512-byte sectors), at
//! most [`MAX_PARTS`] of them are in flight (three descriptors each), and a
//! flush waits until nothing is in flight, then runs to completion while
//! new submissions are refused with `QueueFull`. Discard and write-zeroes
//! are not offered (virtio-drivers 0.13 does not implement them).

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;

use virtio_drivers::device::blk::{BlkReq, BlkResp, SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::transport::Transport;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::{BufferDirection, Error as VirtioError};

use crate::hal::{DmaRegion, Hal, PAGE_SIZE};
use crate::pci::{self, Bdf, ConfigAccess};
use blockdev::{self, Completion, Geometry, IoError, QueuedDevice, Request, SubmitError};

/// Virtio requests in flight at once: 16 descriptors, three per request.
pub const MAX_PARTS: usize = 5;

#[cfg(test)]
mod tests;

/// Bytes of DMA memory for one request's header and status.
const HEADER_STRIDE: usize = 32;

/// virtio-drivers' `Hal` over stordom's: its functions have no `self`, so
/// each call uses `H::default()` (a kernel's `Hal` is a zero-sized type).
pub struct VirtioHal<H>(PhantomData<H>);

// SAFETY: every function forwards to `H`, whose contract gives the same
// guarantees virtio-drivers asks for (contiguous zeroed DMA pages, MMIO
// mappings, physical addresses of our buffers); memory is coherent, so
// sharing needs no copies.
unsafe impl<H: Hal + Default> virtio_drivers::Hal for VirtioHal<H> {
    fn dma_alloc(
        pages: usize,
        _direction: BufferDirection,
    ) -> (virtio_drivers::PhysAddr, NonNull<u8>) {
        // virtio-drivers takes physical address 0 as allocation failure.
        H::default()
            .dma_alloc(pages)
            .map_or((0, NonNull::dangling()), |region| {
                (region.phys, region.virt)
            })
    }

    unsafe fn dma_dealloc(
        paddr: virtio_drivers::PhysAddr,
        vaddr: NonNull<u8>,
        pages: usize,
    ) -> i32 {
        // SAFETY: virtio-drivers hands back what `dma_alloc` gave it, once.
        unsafe {
            H::default().dma_free(DmaRegion {
                phys: paddr,
                virt: vaddr,
                pages,
            })
        };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: virtio_drivers::PhysAddr, size: usize) -> NonNull<u8> {
        // SAFETY: virtio-drivers asks only for the BAR regions its
        // capabilities name, of a device the caller of `from_pci` owns.
        let mapped = unsafe { H::default().map_mmio(paddr, size) };
        mapped.expect("virtio BAR could not be mapped")
    }

    unsafe fn share(
        buffer: NonNull<[u8]>,
        _direction: BufferDirection,
    ) -> virtio_drivers::PhysAddr {
        // Only buffers from `dma_alloc` or `phys_to_virt` reach the queue.
        H::default()
            .virt_to_phys(buffer.cast())
            .expect("virtio buffer outside Hal memory")
    }

    unsafe fn unshare(
        _paddr: virtio_drivers::PhysAddr,
        _buffer: NonNull<[u8]>,
        _direction: BufferDirection,
    ) {
    }
}

/// One virtio request: a segment of a block request.
struct Part {
    /// Index into `requests`.
    request: usize,
    write: bool,
    buffer: NonNull<[u8]>,
    /// Index of its header and status in `headers`.
    header: usize,
}

/// A block request whose parts are in flight.
struct Pending {
    tag: u64,
    parts_left: usize,
    result: Result<(), IoError>,
}

/// A virtio-blk device as a [`QueuedDevice`] with one queue.
pub struct VirtioBlock<H: Hal + Default, T: Transport> {
    hal: H,
    /// Dropped by hand, before the memory its queue points into.
    device: ManuallyDrop<VirtIOBlk<VirtioHal<H>, T>>,
    capacity: u64,
    /// Request headers and statuses, `HEADER_STRIDE` bytes apart.
    headers: DmaRegion,
    free_headers: Vec<usize>,
    /// Parts by virtqueue token.
    parts: Vec<Option<Part>>,
    requests: Vec<Option<Pending>>,
    /// A flush waiting for the queue to drain: its tag.
    flush_waiting: Option<u64>,
    finished: VecDeque<Completion>,
}

/// Our configuration-space access, lent to virtio-drivers' PCI code.
struct LentConfig<'a, C: ConfigAccess>(&'a RefCell<&'a mut C>);

impl<C: ConfigAccess> ConfigurationAccess for LentConfig<'_, C> {
    fn read_word(&self, function: DeviceFunction, offset: u8) -> u32 {
        self.0.borrow_mut().read32(bdf(function), u16::from(offset))
    }

    fn write_word(&mut self, function: DeviceFunction, offset: u8, data: u32) {
        self.0
            .borrow_mut()
            .write32(bdf(function), u16::from(offset), data);
    }

    unsafe fn unsafe_clone(&self) -> Self {
        Self(self.0)
    }
}

fn bdf(function: DeviceFunction) -> Bdf {
    Bdf {
        bus: function.bus,
        device: function.device,
        function: function.function,
    }
}

impl<H: Hal + Default> VirtioBlock<H, PciTransport> {
    /// Brings up the virtio-blk device at PCI function `at`: enables memory
    /// decoding and bus mastering, finds its virtio capabilities and BARs.
    ///
    /// # Safety
    ///
    /// `at` is a virtio-blk device this driver alone owns, with BARs assigned.
    pub unsafe fn from_pci<C: ConfigAccess>(
        hal: H,
        config: &mut C,
        at: Bdf,
    ) -> Result<Self, VirtioBlockError> {
        pci::enable_memory_and_bus_master(config, at);
        let lent = RefCell::new(config);
        let mut root = PciRoot::new(LentConfig(&lent));
        let function = DeviceFunction {
            bus: at.bus,
            device: at.device,
            function: at.function,
        };
        let transport = PciTransport::new::<VirtioHal<H>, _>(&mut root, function)
            .map_err(|_| VirtioBlockError::Transport)?;
        Self::new(hal, transport)
    }
}

/// Why a virtio-blk device could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioBlockError {
    /// The PCI transport could not be set up (not virtio, capabilities missing).
    Transport,
    /// virtio-drivers refused the device.
    Device,
    /// The `Hal` ran out of DMA memory.
    OutOfMemory,
}

impl core::fmt::Display for VirtioBlockError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Transport => "the virtio PCI transport cannot be set up (capabilities missing)",
            Self::Device => "the virtio-blk driver refused the device (its features or its queue)",
            Self::OutOfMemory => "no DMA memory for its queue",
        })
    }
}

impl<H: Hal + Default, T: Transport> VirtioBlock<H, T> {
    /// Initialises the device behind `transport`.
    pub fn new(hal: H, transport: T) -> Result<Self, VirtioBlockError> {
        let device = VirtIOBlk::new(transport).map_err(|_| VirtioBlockError::Device)?;
        let headers = hal
            .dma_alloc((MAX_PARTS * HEADER_STRIDE).div_ceil(PAGE_SIZE))
            .ok_or(VirtioBlockError::OutOfMemory)?;
        let capacity = device.capacity();
        let queue_size = usize::from(device.virt_queue_size());
        Ok(Self {
            hal,
            device: ManuallyDrop::new(device),
            capacity,
            headers,
            free_headers: (0..MAX_PARTS).rev().collect(),
            parts: (0..queue_size).map(|_| None).collect(),
            requests: Vec::new(),
            flush_waiting: None,
            finished: VecDeque::new(),
        })
    }

    fn in_flight(&self) -> usize {
        MAX_PARTS - self.free_headers.len()
    }

    /// Starts one segment; the caller checked that a header slot is free.
    fn start_part(
        &mut self,
        request: usize,
        write: bool,
        sector: u64,
        buffer: NonNull<[u8]>,
    ) -> Result<(), VirtioError> {
        let header = self.free_headers.pop().ok_or(VirtioError::QueueFull)?;
        // SAFETY: the slot is free, so nothing else refers to it; both
        // values are initialised before references to them are made.
        let (req, resp) = unsafe {
            let (req, resp) = header_slot(&self.headers, header);
            req.write(BlkReq::default());
            resp.write(BlkResp::default());
            (&mut *req, &mut *resp)
        };
        let sector = sector as usize;
        // SAFETY: `buffer`, `req` and `resp` stay untouched until the part
        // completes in `poll`, which passes the same ones back.
        let token = unsafe {
            if write {
                self.device
                    .write_blocks_nb(sector, req, buffer.as_ref(), resp)
            } else {
                self.device
                    .read_blocks_nb(sector, req, &mut *buffer.as_ptr(), resp)
            }
        };
        match token {
            Ok(token) => {
                self.parts[usize::from(token)] = Some(Part {
                    request,
                    write,
                    buffer,
                    header,
                });
                Ok(())
            }
            Err(error) => {
                self.free_headers.push(header);
                Err(error)
            }
        }
    }

    fn finish_part(&mut self, token: u16) {
        let Some(part) = self
            .parts
            .get_mut(usize::from(token))
            .and_then(Option::take)
        else {
            return;
        };
        let header = part.header;
        // SAFETY: the slot belongs to this part, initialised when it
        // started; the device has finished with it and filled in the status.
        let (req, resp) = unsafe {
            let (req, resp) = header_slot(&self.headers, header);
            (&*req, &mut *resp)
        };
        // SAFETY: the same buffer, header and status the part was started with.
        let outcome = unsafe {
            if part.write {
                self.device
                    .complete_write_blocks(token, req, part.buffer.as_ref(), resp)
            } else {
                self.device
                    .complete_read_blocks(token, req, &mut *part.buffer.as_ptr(), resp)
            }
        };
        self.free_headers.push(header);
        let Some(pending) = self.requests.get_mut(part.request).and_then(Option::as_mut) else {
            return;
        };
        if pending.result.is_ok() {
            pending.result = outcome.map_err(io_error);
        }
        pending.parts_left -= 1;
        if pending.parts_left == 0 {
            let completion = Completion {
                tag: pending.tag,
                result: pending.result,
            };
            self.requests[part.request] = None;
            self.finished.push_back(completion);
        }
    }

    fn run_waiting_flush(&mut self) {
        if self.in_flight() == 0
            && let Some(tag) = self.flush_waiting.take()
        {
            let result = self.device.flush().map_err(io_error);
            self.finished.push_back(Completion { tag, result });
        }
    }
}

/// The request header and status of header slot `index`.
///
/// # Safety
///
/// `index < MAX_PARTS` and `headers` is the driver's headers region.
unsafe fn header_slot(headers: &DmaRegion, index: usize) -> (*mut BlkReq, *mut BlkResp) {
    let base = headers.virt.as_ptr();
    debug_assert!(index < MAX_PARTS && (index + 1) * HEADER_STRIDE <= headers.len());
    // SAFETY: slot `index` lies within the region (see the contract).
    unsafe {
        (
            base.add(index * HEADER_STRIDE).cast(),
            base.add(index * HEADER_STRIDE + 16).cast(),
        )
    }
}

fn io_error(error: VirtioError) -> IoError {
    match error {
        VirtioError::IoError => IoError::Media,
        VirtioError::Unsupported => IoError::Unsupported,
        VirtioError::NotReady => IoError::Aborted,
        _ => IoError::Device { code: 0 },
    }
}

impl<H: Hal + Default, T: Transport> QueuedDevice for VirtioBlock<H, T> {
    fn geometry(&self) -> Geometry {
        Geometry {
            logical_block_size: SECTOR_SIZE as u32,
            physical_block_size: SECTOR_SIZE as u32,
            blocks: self.capacity,
            // The device may cache; flushes go to it (a no-op without VIRTIO_BLK_F_FLUSH).
            volatile_write_cache: true,
            discard_granularity: None,
            max_discard_blocks: 0,
            max_write_zeroes_blocks: 0,
            max_transfer_bytes: 1 << 20,
            max_segments: MAX_PARTS as u16,
            queues: 1,
            queue_depth: MAX_PARTS as u16,
        }
    }

    fn submit(&mut self, queue: u16, tag: u64, request: Request<'_>) -> Result<(), SubmitError> {
        blockdev::validate(&self.geometry(), queue, &request)?;
        if self.flush_waiting.is_some() {
            return Err(SubmitError::QueueFull);
        }
        let (lba, segments, write) = match request {
            Request::Read { lba, segments } => (lba, segments, false),
            Request::Write { lba, segments } => (lba, segments, true),
            Request::Flush => {
                self.flush_waiting = Some(tag);
                self.run_waiting_flush();
                return Ok(());
            }
            Request::Discard { .. } | Request::WriteZeroes { .. } => {
                return Err(SubmitError::Unsupported);
            }
        };
        if segments.len() > self.free_headers.len() {
            return Err(SubmitError::QueueFull);
        }
        let mut buffers = Vec::with_capacity(segments.len());
        for segment in segments {
            if !(segment.len as usize).is_multiple_of(SECTOR_SIZE) {
                return Err(SubmitError::Misaligned);
            }
            let virt = self
                .hal
                .phys_to_virt(segment.phys, segment.len as usize)
                .ok_or(SubmitError::BadAddress)?;
            buffers.push(NonNull::slice_from_raw_parts(virt, segment.len as usize));
        }
        let index = self
            .requests
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.requests.len());
        if index == self.requests.len() {
            self.requests.push(None);
        }
        self.requests[index] = Some(Pending {
            tag,
            parts_left: buffers.len(),
            result: Ok(()),
        });
        let mut sector = lba;
        for (number, buffer) in buffers.into_iter().enumerate() {
            if let Err(error) = self.start_part(index, write, sector, buffer) {
                // The parts already started complete through `poll`; the
                // rest never will, so count them out now.
                let pending = self.requests[index].as_mut().map(|p| {
                    p.parts_left -= segments.len() - number;
                    p.result = Err(io_error(error));
                    p.parts_left
                });
                if pending == Some(0) {
                    self.requests[index] = None;
                    return Err(SubmitError::DeviceFailed);
                }
                return Ok(());
            }
            sector += buffer.len() as u64 / SECTOR_SIZE as u64;
        }
        Ok(())
    }

    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        if queue != 0 {
            return 0;
        }
        while let Some(token) = self.device.peek_used() {
            if self
                .parts
                .get(usize::from(token))
                .is_none_or(Option::is_none)
            {
                // Nothing of ours: leave it rather than loop on it forever.
                break;
            }
            self.finish_part(token);
        }
        self.run_waiting_flush();
        blockdev::hand_over(&mut self.finished, out)
    }
}

impl<H: Hal + Default, T: Transport> Drop for VirtioBlock<H, T> {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, and not used afterwards. Dropping it
        // detaches the queue from the device before the headers go.
        unsafe { ManuallyDrop::drop(&mut self.device) };
        let headers = core::mem::replace(
            &mut self.headers,
            DmaRegion {
                phys: 0,
                virt: NonNull::dangling(),
                pages: 0,
            },
        );
        // SAFETY: the queue is detached, so the device no longer writes here.
        unsafe { self.hal.dma_free(headers) };
    }
}

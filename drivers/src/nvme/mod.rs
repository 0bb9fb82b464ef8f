//! NVMe: one controller, its admin queue, several I/O queue pairs, and the
//! NVM command set (read, write, flush, dataset management, write zeroes).
//!
//! Everything is polled. Every command carries a deadline; a command that
//! misses it makes [`NvmeController::poll`] reset the controller, fail the
//! outstanding commands (`Timeout` for the late ones, `Aborted` for the
//! rest) and rebuild the queues, so the device keeps serving.

mod command;
mod identify;
mod prp;
mod queue;
mod sgl;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;
use core::mem::ManuallyDrop;

pub use identify::{ControllerInfo, Namespace, NamespaceError};
pub use sgl::SglSupport;

use crate::hal::{DmaRegion, Hal, PAGE_SIZE, PhysAddr};
use crate::pci::{self, Bdf, ConfigAccess};
use crate::region::Region;
use crate::segment_copy::{self, CopyDirection};
use blockdev::{self, Completion, Geometry, IoError, QueuedDevice, Request, Segment, SubmitError};
use command::{Command, Entry, admin, cns, io};
use core::sync::atomic::{Ordering, fence};
use queue::{Doorbells, QueuePair};

/// Controller registers (offsets into BAR0).
mod reg {
    pub const CAP: usize = 0x00;
    pub const CC: usize = 0x14;
    pub const CSTS: usize = 0x1c;
    pub const AQA: usize = 0x24;
    pub const ASQ: usize = 0x28;
    pub const ACQ: usize = 0x30;
}

const CC_ENABLE: u32 = 1;
/// 64-byte submission and 16-byte completion entries (as log2).
const CC_ENTRY_SIZES: u32 = (6 << 16) | (4 << 20);
const CSTS_READY: u32 = 1;
const CSTS_FATAL: u32 = 1 << 1;

const ADMIN_QUEUE_DEPTH: u16 = 32;
/// Most entries a queue may have, so one page holds its submission queue.
const MAX_QUEUE_DEPTH: u16 = (PAGE_SIZE / command::SQE_SIZE) as u16;
/// Read/Write and Write Zeroes count blocks in 16 bits.
const MAX_BLOCKS_PER_COMMAND: u64 = 1 << 16;

/// How to set a controller up.
#[derive(Clone, Copy, Debug)]
pub struct NvmeConfig {
    /// I/O queue pairs wanted (fewer if the controller grants fewer).
    pub io_queues: u16,
    /// Entries per I/O queue (at most 64; one fewer can be in flight).
    pub queue_depth: u16,
    /// Largest read or write, in bytes (capped by the controller's MDTS).
    pub max_transfer_bytes: u32,
    /// How long a command may take before the controller is reset.
    pub timeout_ns: u64,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        Self {
            io_queues: 4,
            queue_depth: 64,
            max_transfer_bytes: 1 << 20,
            timeout_ns: 5_000_000_000,
        }
    }
}

/// Why a controller could not be brought up (or back up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvmeError {
    /// BAR0 could not be mapped or is too small for the registers.
    BadBar,
    /// The controller cannot use 4 KiB memory pages.
    PageSizeUnsupported,
    /// The controller does not implement the NVM command set.
    NoNvmCommandSet,
    /// The `Hal` ran out of DMA memory.
    OutOfMemory,
    /// The controller did not change its ready state in time.
    ReadyTimeout,
    /// The controller reports a fatal status.
    Fatal,
    /// An admin command got no completion in time.
    AdminTimeout {
        /// Its opcode.
        opcode: u8,
    },
    /// An admin command failed.
    AdminFailed {
        /// Its opcode.
        opcode: u8,
        /// The status field of its completion.
        status: u16,
    },
    /// The controller granted no I/O queues.
    NoIoQueues,
}

impl fmt::Display for NvmeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadBar => f.write_str("BAR0 cannot be mapped or is too small for the registers"),
            Self::PageSizeUnsupported => {
                f.write_str("the controller cannot use 4 KiB pages (CAP.MPSMIN)")
            }
            Self::NoNvmCommandSet => f.write_str("CAP.CSS does not list the NVM command set"),
            Self::OutOfMemory => f.write_str("no DMA memory for its queues"),
            Self::ReadyTimeout => {
                f.write_str("the controller did not change CSTS.RDY within CAP.TO")
            }
            Self::Fatal => f.write_str("the controller reports a fatal status (CSTS.CFS)"),
            Self::AdminTimeout { opcode } => {
                write!(f, "admin command {opcode:#04x} got no completion in time")
            }
            Self::AdminFailed { opcode, status } => {
                write!(
                    f,
                    "admin command {opcode:#04x} failed with status {status:#x}"
                )
            }
            Self::NoIoQueues => f.write_str("the controller granted no I/O queues"),
        }
    }
}

/// A command in flight on an I/O queue.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    tag: u64,
    deadline_ns: u64,
}

/// An I/O queue pair and the bookkeeping for its commands, indexed by CID.
struct IoQueue {
    pair: QueuePair,
    slots: Vec<Option<InFlight>>,
    free: Vec<u16>,
    /// PRP list (or DSM range) pages, `list_pages` for each slot.
    lists: DmaRegion,
    list_pages: usize,
    /// For a controller that cannot name every segment layout.
    bounce: Option<BounceBuffer>,
    /// Completions waiting to be polled.
    finished: VecDeque<Completion>,
}

/// The bounce buffer of an I/O queue of a controller without SGLs for any
/// address and length: a read or write whose segments neither PRPs nor
/// the controller's SGLs can name (sub-page pieces of different pages, as
/// a 1 KiB-block file system's requests) goes through it as one command,
/// the data of a write copied in at submission, that of a read copied out
/// at its completion. One such command is in flight per queue at a time;
/// the next one is refused with `QueueFull` (tried again after a poll)
/// until it completes. Allocated with the queue: nothing per request.
struct BounceBuffer {
    /// The largest transfer, physically contiguous.
    region: DmaRegion,
    /// The CID of the command using it.
    user: Option<u16>,
    /// Where the read using it goes when it completes (empty for a
    /// write); its capacity is the most segments a request may have.
    read_into: Vec<Segment>,
}

/// What a queue's [`BounceBuffer`] holds: its size and the most segments
/// a request may have.
#[derive(Clone, Copy)]
struct BounceSize {
    pages: usize,
    max_segments: usize,
}

impl BounceBuffer {
    fn new(hal: &impl Hal, size: BounceSize) -> Option<Self> {
        let mut read_into = Vec::new();
        read_into.try_reserve_exact(size.max_segments).ok()?;
        Some(Self {
            region: hal.dma_alloc(size.pages)?,
            user: None,
            read_into,
        })
    }

    /// The command in slot `cid` will move the data of `request` (a read
    /// or write) through the buffer: returns the one segment, over the
    /// buffer, that the device gets instead of the request's. A write's
    /// data is copied in now.
    fn take(
        &mut self,
        hal: &impl Hal,
        cid: u16,
        request: Request<'_>,
    ) -> Result<Segment, SubmitError> {
        let (Request::Read { segments, .. } | Request::Write { segments, .. }) = request else {
            return Err(SubmitError::Misaligned);
        };
        if self.user.is_some() {
            return Err(SubmitError::QueueFull);
        }
        let bytes: usize = segments.iter().map(|s| s.len as usize).sum();
        if bytes > self.region.len() || segments.len() > self.read_into.capacity() {
            return Err(SubmitError::TooLarge);
        }
        segment_copy::check_mapped(hal, segments)?;
        if let Request::Write { .. } = request {
            // SAFETY: the buffer is `bytes` long at least (checked above),
            // ours alone while no command uses it, and device memory apart
            // from the request's segments.
            unsafe {
                segment_copy::copy(hal, self.region.virt, segments, CopyDirection::FromSegments)?
            };
        } else {
            // Within the capacity reserved at allocation: no allocation.
            self.read_into.clear();
            self.read_into.extend_from_slice(segments);
        }
        self.user = Some(cid);
        Ok(Segment {
            phys: self.region.phys,
            len: bytes as u32,
        })
    }

    /// Frees the buffer without delivering anything.
    fn release(&mut self) {
        self.user = None;
        self.read_into.clear();
    }

    /// The command using the buffer ended with `result`: a read's data
    /// goes to its segments; the buffer is free again.
    fn give_back(&mut self, hal: &impl Hal, result: Result<(), IoError>) -> Result<(), IoError> {
        if result.is_err() || self.read_into.is_empty() {
            self.release();
            return result;
        }
        // The device wrote the buffer before it posted the completion just
        // read: no read of the buffer may move before that.
        fence(Ordering::Acquire);
        // SAFETY: the read's segments fit the buffer (checked when it was
        // taken), the device is done with it, and it is device memory
        // apart from the segments.
        let copied = unsafe {
            segment_copy::copy(
                hal,
                self.region.virt,
                &self.read_into,
                CopyDirection::IntoSegments,
            )
        };
        self.release();
        // The segments were mapped when the read was taken: only a mapping
        // gone since leaves the data undelivered.
        copied.map_err(|_| IoError::InvalidRequest)
    }

    fn free(self, hal: &impl Hal) {
        // SAFETY: the controller is disabled; no command points here any more.
        unsafe { hal.dma_free(self.region) };
    }
}

impl IoQueue {
    fn new(
        hal: &impl Hal,
        id: u16,
        depth: u16,
        list_pages: usize,
        bounce: Option<BounceSize>,
    ) -> Option<Self> {
        let pair = QueuePair::new(hal, id, depth)?;
        let slots = usize::from(depth - 1);
        let Some(lists) = hal.dma_alloc(slots * list_pages) else {
            pair.free(hal);
            return None;
        };
        let bounce = match bounce.map(|size| BounceBuffer::new(hal, size)) {
            None => None,
            Some(Some(buffer)) => Some(buffer),
            Some(None) => {
                pair.free(hal);
                // SAFETY: no command was ever submitted on this queue.
                unsafe { hal.dma_free(lists) };
                return None;
            }
        };
        Some(Self {
            pair,
            slots: vec![None; slots],
            free: (0..depth - 1).rev().collect(),
            lists,
            list_pages,
            bounce,
            finished: VecDeque::new(),
        })
    }

    /// The list pages of slot `cid`, as a region and its physical address.
    fn list_of(&self, cid: u16) -> (Region, PhysAddr) {
        let bytes = self.list_pages * PAGE_SIZE;
        let offset = usize::from(cid) * bytes;
        assert!(
            offset + bytes <= self.lists.len(),
            "slot beyond the PRP lists"
        );
        // SAFETY: `offset + bytes` lies within `lists` (checked above).
        let region = unsafe { Region::new(self.lists.virt.add(offset), bytes) };
        (region, self.lists.phys + offset as u64)
    }

    /// Moves posted completions into `finished`, ignoring entries whose CID
    /// names no command in flight (a confused controller must not make us
    /// complete a tag twice).
    fn reap(&mut self, hal: &impl Hal, regs: &Region, doorbells: Doorbells) {
        let mut took_any = false;
        while let Some(entry) = self.pair.next_completion() {
            took_any = true;
            self.complete(hal, entry.cid, entry.io_result());
        }
        if took_any {
            self.pair.release(regs, doorbells);
        }
    }

    fn complete(&mut self, hal: &impl Hal, cid: u16, result: Result<(), IoError>) {
        if let Some(in_flight) = self.slots.get_mut(usize::from(cid)).and_then(Option::take) {
            let result = match &mut self.bounce {
                Some(bounce) if bounce.user == Some(cid) => bounce.give_back(hal, result),
                _ => result,
            };
            self.finished.push_back(Completion {
                tag: in_flight.tag,
                result,
            });
            self.free.push(cid);
        }
    }

    fn has_expired(&self, now: u64) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|in_flight| in_flight.deadline_ns <= now)
    }

    /// Fails every command in flight: late ones with `Timeout`, the rest
    /// with `Aborted`.
    fn fail_all(&mut self, hal: &impl Hal, now: u64) {
        for cid in 0..self.slots.len() as u16 {
            let late = self.slots[usize::from(cid)].is_some_and(|f| f.deadline_ns <= now);
            self.complete(
                hal,
                cid,
                Err(if late {
                    IoError::Timeout
                } else {
                    IoError::Aborted
                }),
            );
        }
    }

    fn free(self, hal: &impl Hal) {
        self.pair.free(hal);
        if let Some(bounce) = self.bounce {
            bounce.free(hal);
        }
        // SAFETY: the controller is disabled; no command points here any more.
        unsafe { hal.dma_free(self.lists) };
    }
}

/// An NVMe controller with its namespaces and I/O queues.
pub struct NvmeController<H: Hal> {
    hal: H,
    regs: Region,
    doorbells: Doorbells,
    ready_timeout_ns: u64,
    config: NvmeConfig,
    admin: ManuallyDrop<QueuePair>,
    next_admin_cid: u16,
    identify_page: ManuallyDrop<DmaRegion>,
    info: ControllerInfo,
    namespaces: Vec<Namespace>,
    queues: Vec<IoQueue>,
    failed: bool,
    resets: u32,
}

impl<H: Hal> NvmeController<H> {
    /// Resets and enables the controller whose BAR0 is `bar_len` bytes at
    /// `bar_phys`, identifies it and its active namespaces, and creates the
    /// I/O queues. Bus mastering must already be enabled.
    ///
    /// # Safety
    ///
    /// BAR0 of an NVMe controller this driver alone owns is at `bar_phys`.
    pub unsafe fn new(
        hal: H,
        bar_phys: PhysAddr,
        bar_len: usize,
        config: NvmeConfig,
    ) -> Result<Self, NvmeError> {
        if bar_len < 0x1000 + 8 {
            return Err(NvmeError::BadBar);
        }
        // SAFETY: the caller vouches that this is our controller's BAR0.
        let base = unsafe { hal.map_mmio(bar_phys, bar_len) }.ok_or(NvmeError::BadBar)?;
        // SAFETY: `map_mmio` mapped `bar_len` bytes at `base`.
        let regs = unsafe { Region::new(base, bar_len) };
        let capabilities = regs.read64(reg::CAP);
        if (capabilities >> 48) & 0xf != 0 {
            return Err(NvmeError::PageSizeUnsupported);
        }
        if (capabilities >> 37) & 1 == 0 {
            return Err(NvmeError::NoNvmCommandSet);
        }
        let max_entries = ((capabilities & 0xffff) + 1).min(u64::from(MAX_QUEUE_DEPTH)) as u16;
        let doorbells = Doorbells {
            stride: 4 << ((capabilities >> 32) & 0xf),
        };
        if doorbells.window_for(0) > bar_len {
            return Err(NvmeError::BadBar);
        }
        let ready_timeout_ns = ((capabilities >> 24) & 0xff).max(1) * 500_000_000;
        let config = NvmeConfig {
            queue_depth: config.queue_depth.clamp(2, max_entries),
            ..config
        };
        let admin = QueuePair::new(&hal, 0, ADMIN_QUEUE_DEPTH.min(max_entries))
            .ok_or(NvmeError::OutOfMemory)?;
        let Some(identify_page) = hal.dma_alloc(1) else {
            admin.free(&hal);
            return Err(NvmeError::OutOfMemory);
        };
        let mut controller = Self {
            hal,
            regs,
            doorbells,
            ready_timeout_ns,
            config,
            admin: ManuallyDrop::new(admin),
            next_admin_cid: 0,
            identify_page: ManuallyDrop::new(identify_page),
            info: ControllerInfo::parse(&[0; 4096]),
            namespaces: Vec::new(),
            queues: Vec::new(),
            failed: false,
            resets: 0,
        };
        controller.bring_up()?;
        Ok(controller)
    }

    /// Brings up the controller at PCI function `bdf`: enables memory
    /// decoding and bus mastering, then [`Self::new`] over its BAR0.
    ///
    /// # Safety
    ///
    /// `bdf` is an NVMe controller this driver alone owns.
    pub unsafe fn from_pci(
        hal: H,
        pci: &mut impl ConfigAccess,
        bdf: Bdf,
        config: NvmeConfig,
    ) -> Result<Self, NvmeError> {
        let (bar_phys, bar_len) = pci::prepare_memory_bar(pci, bdf, 0).ok_or(NvmeError::BadBar)?;
        // SAFETY: the caller vouches for the function; BAR0 is its registers.
        unsafe { Self::new(hal, bar_phys, bar_len, config) }
    }

    /// What Identify Controller said.
    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }

    /// The active namespaces that can be served.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// How many times the controller was reset to recover from a timeout.
    pub fn resets(&self) -> u32 {
        self.resets
    }

    /// Whether the controller failed for good (every submit fails).
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// The geometry of namespace `nsid`, if it is served.
    pub fn geometry(&self, nsid: u32) -> Option<Geometry> {
        let namespace = self.namespaces.iter().find(|n| n.id == nsid)?;
        let block_size = u64::from(namespace.block_size);
        let max_transfer =
            u64::from(self.max_transfer_bytes()).min(MAX_BLOCKS_PER_COMMAND * block_size);
        Some(Geometry {
            logical_block_size: namespace.block_size,
            physical_block_size: namespace
                .block_size
                .saturating_mul(namespace.write_granularity),
            blocks: namespace.blocks,
            volatile_write_cache: self.info.volatile_write_cache,
            discard_granularity: self
                .info
                .dataset_management
                .then_some(namespace.discard_granularity),
            max_discard_blocks: if self.info.dataset_management {
                u64::from(u32::MAX)
            } else {
                0
            },
            max_write_zeroes_blocks: if self.info.write_zeroes {
                MAX_BLOCKS_PER_COMMAND
            } else {
                0
            },
            max_transfer_bytes: max_transfer as u32,
            max_segments: self.max_segments() as u16,
            queues: self.queues.len() as u16,
            queue_depth: self.config.queue_depth - 1,
        })
    }

    /// The most segments a read or write may have: one per page of the
    /// largest transfer, and one more for a start inside a page.
    fn max_segments(&self) -> usize {
        self.max_transfer_bytes() as usize / PAGE_SIZE + 1
    }

    fn max_transfer_bytes(&self) -> u32 {
        let limit = self.info.max_transfer_bytes.unwrap_or(u64::MAX);
        // At least one page, whatever the controller claims.
        (u64::from(self.config.max_transfer_bytes).min(limit) as u32).max(PAGE_SIZE as u32)
    }

    /// Starts `request` for namespace `nsid` on I/O queue `queue`.
    pub fn submit(
        &mut self,
        queue: u16,
        tag: u64,
        nsid: u32,
        request: Request<'_>,
    ) -> Result<(), SubmitError> {
        if self.failed {
            return Err(SubmitError::DeviceFailed);
        }
        let geometry = self.geometry(nsid).ok_or(SubmitError::OutOfRange)?;
        let blocks = blockdev::validate(&geometry, queue, &request)?;
        let deadline_ns = self.hal.now_ns().saturating_add(self.config.timeout_ns);
        let queue = &mut self.queues[usize::from(queue)];
        if matches!(request, Request::Flush) && !self.info.volatile_write_cache {
            // Without a volatile cache every completed write is durable.
            queue.finished.push_back(Completion {
                tag,
                result: Ok(()),
            });
            return Ok(());
        }
        let cid = queue.free.pop().ok_or(SubmitError::QueueFull)?;
        let (list, list_phys) = queue.list_of(cid);
        let sgl = self.info.sgl;
        let built = match (
            build_io_command(nsid, request, blocks, sgl, &list, list_phys),
            &mut queue.bounce,
        ) {
            // Neither PRPs nor the controller's SGLs can name the segments:
            // the data goes through the queue's bounce buffer.
            (Err(SubmitError::Misaligned), Some(bounce)) => {
                bounce.take(&self.hal, cid, request).and_then(|buffer| {
                    let buffer = [buffer];
                    let bounced = request.with_segments(&buffer);
                    let built = build_io_command(nsid, bounced, blocks, sgl, &list, list_phys);
                    if built.is_err() {
                        bounce.release();
                    }
                    built
                })
            }
            (built, _) => built,
        };
        let command = match built {
            Ok(command) => command,
            Err(error) => {
                queue.free.push(cid);
                return Err(error);
            }
        };
        queue.slots[usize::from(cid)] = Some(InFlight { tag, deadline_ns });
        queue
            .pair
            .submit(&self.regs, self.doorbells, &command.with_cid(cid));
        Ok(())
    }

    /// Writes finished requests of I/O queue `queue` into `out`, returning
    /// how many. Resets the controller if a command on it is overdue.
    pub fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        let Some(io_queue) = self.queues.get_mut(usize::from(queue)) else {
            return 0;
        };
        if !self.failed {
            io_queue.reap(&self.hal, &self.regs, self.doorbells);
            if io_queue.has_expired(self.hal.now_ns()) {
                self.recover();
            }
        }
        let finished = &mut self.queues[usize::from(queue)].finished;
        blockdev::hand_over(finished, out)
    }

    /// Resets the controller after a timeout: keeps what already completed,
    /// fails what was in flight, and brings the queues back.
    fn recover(&mut self) {
        self.resets += 1;
        let now = self.hal.now_ns();
        for queue in &mut self.queues {
            queue.reap(&self.hal, &self.regs, self.doorbells);
            queue.fail_all(&self.hal, now);
        }
        if self.bring_up().is_err() {
            self.failed = true;
        }
    }

    /// Disables, configures and enables the controller, then (the first
    /// time) identifies it, and (re)creates the I/O queues.
    fn bring_up(&mut self) -> Result<(), NvmeError> {
        self.disable()?;
        self.admin.reset();
        let depth = u32::from(self.admin.depth - 1);
        self.regs.write32(reg::AQA, depth | (depth << 16));
        self.regs.write64(reg::ASQ, self.admin.sq.phys);
        self.regs.write64(reg::ACQ, self.admin.cq.phys);
        self.regs.write32(reg::CC, CC_ENTRY_SIZES | CC_ENABLE);
        self.wait_ready(true)?;
        let first_time = self.queues.is_empty();
        if first_time {
            self.identify()?;
        }
        let wanted = if first_time {
            self.config.io_queues.max(1)
        } else {
            self.queues.len() as u16
        };
        let granted = self.request_queues(wanted)?;
        if first_time {
            self.allocate_queues(granted)?;
        } else if granted < wanted {
            return Err(NvmeError::NoIoQueues);
        }
        for index in 0..self.queues.len() {
            self.queues[index].pair.reset();
            let (id, depth, sq, cq) = {
                let pair = &self.queues[index].pair;
                (
                    u32::from(pair.id),
                    u32::from(pair.depth - 1),
                    pair.sq.phys,
                    pair.cq.phys,
                )
            };
            // Physically contiguous, interrupts off: completions are polled.
            let create_cq = Command::new(admin::CREATE_IO_CQ, 0)
                .with_data(cq)
                .with_cdw(10, id | (depth << 16))
                .with_cdw(11, 1);
            self.admin_command(create_cq)?;
            let create_sq = Command::new(admin::CREATE_IO_SQ, 0)
                .with_data(sq)
                .with_cdw(10, id | (depth << 16))
                .with_cdw(11, 1 | (id << 16));
            self.admin_command(create_sq)?;
        }
        Ok(())
    }

    fn disable(&mut self) -> Result<(), NvmeError> {
        let configuration = self.regs.read32(reg::CC);
        if configuration & CC_ENABLE != 0 {
            self.regs.write32(reg::CC, configuration & !CC_ENABLE);
        }
        self.wait_ready(false)
    }

    fn wait_ready(&self, ready: bool) -> Result<(), NvmeError> {
        let deadline = self.hal.now_ns().saturating_add(self.ready_timeout_ns);
        loop {
            let status = self.regs.read32(reg::CSTS);
            if ready && status & CSTS_FATAL != 0 {
                return Err(NvmeError::Fatal);
            }
            if (status & CSTS_READY != 0) == ready {
                return Ok(());
            }
            if self.hal.now_ns() > deadline {
                return Err(NvmeError::ReadyTimeout);
            }
            self.hal.relax();
        }
    }

    /// Runs an admin command to completion and returns completion dword 0.
    fn admin_command(&mut self, command: Command) -> Result<u32, NvmeError> {
        let cid = self.next_admin_cid;
        self.next_admin_cid = cid.wrapping_add(1);
        let opcode = command.opcode();
        self.admin
            .submit(&self.regs, self.doorbells, &command.with_cid(cid));
        let deadline = self.hal.now_ns().saturating_add(self.config.timeout_ns);
        loop {
            let mut answer: Option<Entry> = None;
            while let Some(entry) = self.admin.next_completion() {
                if entry.cid == cid {
                    answer = Some(entry);
                }
            }
            self.admin.release(&self.regs, self.doorbells);
            match answer {
                Some(entry) if entry.is_success() => return Ok(entry.result),
                Some(entry) => {
                    return Err(NvmeError::AdminFailed {
                        opcode,
                        status: entry.status,
                    });
                }
                None if self.hal.now_ns() > deadline => {
                    return Err(NvmeError::AdminTimeout { opcode });
                }
                None => self.hal.relax(),
            }
        }
    }

    /// Runs an Identify and returns its page.
    fn identify_data(&mut self, cns: u32, nsid: u32) -> Result<Box<[u8; 4096]>, NvmeError> {
        let command = Command::new(admin::IDENTIFY, nsid)
            .with_data(self.identify_page.phys)
            .with_cdw(10, cns);
        self.admin_command(command)?;
        let mut data: Box<[u8; 4096]> = vec![0u8; 4096]
            .into_boxed_slice()
            .try_into()
            .map_err(|_| NvmeError::OutOfMemory)?;
        Region::from(&*self.identify_page).read_bytes(0, &mut data[..]);
        Ok(data)
    }

    fn identify(&mut self) -> Result<(), NvmeError> {
        self.info = ControllerInfo::parse(&*self.identify_data(cns::CONTROLLER, 0)?);
        let list = self.identify_data(cns::ACTIVE_NAMESPACES, 0)?;
        for nsid in identify::active_namespace_ids(&list) {
            // A namespace we cannot serve is skipped, not fatal.
            if let Ok(namespace) =
                Namespace::parse(nsid, &*self.identify_data(cns::NAMESPACE, nsid)?)
            {
                self.namespaces.push(namespace);
            }
        }
        Ok(())
    }

    /// Asks for `wanted` I/O queue pairs; returns how many can be used.
    fn request_queues(&mut self, wanted: u16) -> Result<u16, NvmeError> {
        let count = u32::from(wanted - 1);
        let command = Command::new(admin::SET_FEATURES, 0)
            .with_cdw(10, command::FEATURE_NUMBER_OF_QUEUES)
            .with_cdw(11, count | (count << 16));
        let granted = self.admin_command(command)?;
        let pairs = (granted & 0xffff).min(granted >> 16) + 1;
        let mut usable = wanted.min(pairs.min(u32::from(u16::MAX - 1)) as u16);
        while usable > 0 && self.doorbells.window_for(usable) > self.regs.len() {
            usable -= 1;
        }
        if usable == 0 {
            Err(NvmeError::NoIoQueues)
        } else {
            Ok(usable)
        }
    }

    fn allocate_queues(&mut self, count: u16) -> Result<(), NvmeError> {
        let entries = self.max_segments();
        // At least one page per slot: Dataset Management puts its range there.
        let list_pages = prp::list_pages_for(entries).max(1);
        // Only SGLs of any address and length name every segment layout.
        let bounce = (self.info.sgl != SglSupport::Unaligned).then(|| BounceSize {
            pages: (self.max_transfer_bytes() as usize).div_ceil(PAGE_SIZE),
            max_segments: self.max_segments(),
        });
        for id in 1..=count {
            let queue = IoQueue::new(&self.hal, id, self.config.queue_depth, list_pages, bounce)
                .ok_or(NvmeError::OutOfMemory)?;
            self.queues.push(queue);
        }
        Ok(())
    }
}

/// The NVM command for a validated request covering `blocks` blocks.
fn build_io_command(
    nsid: u32,
    request: Request<'_>,
    blocks: u64,
    sgl: SglSupport,
    list: &Region,
    list_phys: PhysAddr,
) -> Result<Command, SubmitError> {
    // `validate` bounded `blocks` by the per-command limits, so `blocks - 1`
    // fits the 16-bit (read/write/write zeroes) or 32-bit (DSM) fields.
    let last_block = blocks.saturating_sub(1) as u32;
    Ok(match request {
        Request::Read { lba, segments } | Request::Write { lba, segments } => {
            let opcode = if matches!(request, Request::Read { .. }) {
                io::READ
            } else {
                io::WRITE
            };
            // PRPs where they can name the data (the common case, and
            // what every controller takes); an SGL where they cannot.
            let command = match prp::build(segments, list, list_phys) {
                Ok(prps) => Command::new(opcode, nsid).with_prps(prps),
                Err(SubmitError::Misaligned) => {
                    Command::new(opcode, nsid).with_sgl(sgl::build(segments, sgl, list, list_phys)?)
                }
                Err(error) => return Err(error),
            };
            command.with_lba(lba).with_cdw(12, last_block)
        }
        Request::Flush => Command::new(io::FLUSH, nsid),
        Request::Discard { lba, .. } => {
            // One range: context attributes, length in blocks, first block.
            list.write32(0, 0);
            list.write32(4, blocks as u32);
            list.write64(8, lba);
            Command::new(io::DATASET_MANAGEMENT, nsid)
                .with_data(list_phys)
                .with_cdw(10, 0)
                .with_cdw(11, command::DSM_DEALLOCATE)
        }
        Request::WriteZeroes { lba, .. } => Command::new(io::WRITE_ZEROES, nsid)
            .with_lba(lba)
            .with_cdw(12, last_block),
    })
}

impl<H: Hal> Drop for NvmeController<H> {
    fn drop(&mut self) {
        // Stop the controller before its queues go back to the allocator;
        // if it will not stop, leak them rather than let it write freed memory.
        if self.disable().is_err() {
            return;
        }
        for queue in self.queues.drain(..) {
            queue.free(&self.hal);
        }
        // SAFETY: `drop` runs once and the fields are not used after this.
        let (admin, page) = unsafe {
            (
                ManuallyDrop::take(&mut self.admin),
                ManuallyDrop::take(&mut self.identify_page),
            )
        };
        admin.free(&self.hal);
        // SAFETY: the controller is disabled and nothing points into the page.
        unsafe { self.hal.dma_free(page) };
    }
}

/// One namespace of a shared controller as a [`QueuedDevice`].
///
/// Several namespaces share the controller's queues, and polling a queue
/// returns all of its completions: serve them as [`blockdev::Disk`]s on one
/// set of queues ([`blockdev::Disk::sharing_queues`]), whose handles keep
/// each consumer's completions apart.
pub struct NvmeNamespace<H: Hal> {
    controller: Rc<RefCell<NvmeController<H>>>,
    nsid: u32,
    geometry: Geometry,
}

impl<H: Hal> NvmeNamespace<H> {
    /// Namespace `nsid` of `controller`, if it is served.
    pub fn new(controller: Rc<RefCell<NvmeController<H>>>, nsid: u32) -> Option<Self> {
        let geometry = controller.borrow().geometry(nsid)?;
        Some(Self {
            controller,
            nsid,
            geometry,
        })
    }
}

impl<H: Hal> QueuedDevice for NvmeNamespace<H> {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn submit(&mut self, queue: u16, tag: u64, request: Request<'_>) -> Result<(), SubmitError> {
        self.controller
            .borrow_mut()
            .submit(queue, tag, self.nsid, request)
    }

    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        self.controller.borrow_mut().poll(queue, out)
    }
}

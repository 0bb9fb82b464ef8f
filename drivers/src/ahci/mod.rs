//! AHCI: HBA reset, port bring-up, IDENTIFY, READ/WRITE DMA EXT, NCQ
//! (READ/WRITE FPDMA QUEUED) when the drive and HBA support it, FLUSH CACHE
//! EXT, DATA SET MANAGEMENT TRIM, write-zeroes as writes from a zero page,
//! and port reset on errors and timeouts.
//!
//! Each port with an ATA disk becomes an [`AhciPort`], a [`QueuedDevice`]
//! with one queue. Queued and non-queued commands never run together: a
//! flush or TRIM waits for the queued commands in flight to finish, and
//! commands submitted after it wait for it, in submission order.

pub mod ata;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

pub use ata::{AtaIdentity, IdentifyError};

use crate::hal::{DmaRegion, Hal, PAGE_SIZE, PhysAddr};
use crate::pci::{self, Bdf, ConfigAccess};
use crate::region::Region;
use ata::CommandFis;
use blockdev::{self, Completion, Geometry, IoError, QueuedDevice, Request, Segment, SubmitError};

/// HBA registers.
mod hba {
    pub const CAP: usize = 0x00;
    pub const GHC: usize = 0x04;
    pub const PORTS_IMPLEMENTED: usize = 0x0c;
    pub const PORT_BASE: usize = 0x100;
    pub const PORT_SIZE: usize = 0x80;

    pub const CAP_64BIT: u32 = 1 << 31;
    pub const CAP_NCQ: u32 = 1 << 30;
    pub const CAP_STAGGERED_SPIN_UP: u32 = 1 << 27;
    pub const GHC_AHCI_ENABLE: u32 = 1 << 31;
    pub const GHC_RESET: u32 = 1 << 0;
}

/// Port registers (offsets within a port's window).
mod port {
    pub const COMMAND_LIST: usize = 0x00;
    pub const FIS_BASE: usize = 0x08;
    pub const INTERRUPT_STATUS: usize = 0x10;
    pub const COMMAND: usize = 0x18;
    pub const TASK_FILE: usize = 0x20;
    pub const SIGNATURE: usize = 0x24;
    pub const SATA_STATUS: usize = 0x28;
    pub const SATA_CONTROL: usize = 0x2c;
    pub const SATA_ERROR: usize = 0x30;
    pub const ACTIVE: usize = 0x34;
    pub const ISSUE: usize = 0x38;

    pub const CMD_START: u32 = 1 << 0;
    pub const CMD_SPIN_UP: u32 = 1 << 1;
    pub const CMD_FIS_RECEIVE: u32 = 1 << 4;
    pub const CMD_FIS_RUNNING: u32 = 1 << 14;
    pub const CMD_LIST_RUNNING: u32 = 1 << 15;

    /// Task file error, host bus fatal, host bus data and interface fatal errors.
    pub const IS_ERRORS: u32 = (1 << 30) | (1 << 29) | (1 << 28) | (1 << 27);
    pub const DEVICE_PRESENT: u32 = 3;
    pub const SIGNATURE_ATA: u32 = 0x0000_0101;
    /// PxSIG before the first D2H register FIS arrived.
    pub const SIGNATURE_NONE_YET: u32 = 0xffff_ffff;
}

const COMMAND_HEADER_SIZE: usize = 32;
const RECEIVED_FIS_OFFSET: usize = 0x400;
/// Each slot's command table: the FIS at 0, the PRDT at 0x80.
const TABLE_PAGES: usize = 2;
const PRDT_OFFSET: usize = 0x80;
const PRD_SIZE: usize = 16;
const PRDS_PER_TABLE: usize = (TABLE_PAGES * PAGE_SIZE - PRDT_OFFSET) / PRD_SIZE;
/// One PRD moves at most 4 MiB.
const PRD_MAX_BYTES: u64 = 4 << 20;
/// Where in a slot's table the TRIM ranges go (after a one-entry PRDT).
const TRIM_RANGES_OFFSET: usize = 0x200;
/// READ/WRITE DMA EXT count sectors in 16 bits (0 meaning 65536).
const MAX_SECTORS_PER_COMMAND: u64 = 1 << 16;

const MS: u64 = 1_000_000;
const HBA_RESET_TIMEOUT_NS: u64 = 1_000 * MS;
const PORT_STOP_TIMEOUT_NS: u64 = 500 * MS;
const LINK_TIMEOUT_NS: u64 = 1_000 * MS;
const COMRESET_HOLD_NS: u64 = 2 * MS;

/// How to drive the ports.
#[derive(Clone, Copy, Debug)]
pub struct AhciConfig {
    /// Largest read or write in bytes.
    pub max_transfer_bytes: u32,
    /// How long a command may take before the port is reset.
    pub timeout_ns: u64,
    /// Use NCQ when both HBA and drive support it.
    pub use_ncq: bool,
}

impl Default for AhciConfig {
    fn default() -> Self {
        Self {
            max_transfer_bytes: 1 << 20,
            timeout_ns: 10_000_000_000,
            use_ncq: true,
        }
    }
}

/// Why an HBA or a port could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AhciError {
    /// The ABAR could not be mapped or is too small for its ports.
    BadBar,
    /// The HBA did not finish its reset in time.
    ResetTimeout,
    /// The HBA cannot address our DMA memory (no 64-bit support).
    AddressTooHigh,
    /// The `Hal` ran out of DMA memory.
    OutOfMemory,
    /// The HBA offers fewer than two command slots.
    TooFewSlots,
    /// The port did not stop, link up or become idle in time.
    PortTimeout,
    /// A command during bring-up failed; ATA status and error registers.
    CommandFailed {
        /// Status register.
        status: u8,
        /// Error register.
        error: u8,
    },
    /// IDENTIFY DEVICE data is unusable.
    Identify(IdentifyError),
}

impl fmt::Display for AhciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadBar => f.write_str("the ABAR cannot be mapped or is too small for its ports"),
            Self::ResetTimeout => f.write_str("the HBA did not finish its reset in time"),
            Self::AddressTooHigh => {
                f.write_str("the HBA cannot address 64-bit DMA memory (CAP.S64A)")
            }
            Self::OutOfMemory => f.write_str("no DMA memory for its command lists"),
            Self::TooFewSlots => f.write_str("the HBA offers fewer than two command slots"),
            Self::PortTimeout => {
                f.write_str("the port did not stop, link up or become idle in time")
            }
            Self::CommandFailed { status, error } => write!(
                f,
                "a bring-up command failed (ATA status {status:#04x}, error {error:#04x})"
            ),
            Self::Identify(IdentifyError::NoLba48) => {
                f.write_str("the disk does not support 48-bit addressing")
            }
            Self::Identify(IdentifyError::Empty) => f.write_str("the disk reports no sectors"),
            Self::Identify(IdentifyError::BadSectorSize) => f.write_str(
                "the disk's logical sector size is not a power of two from 512 to 64 KiB",
            ),
        }
    }
}

/// The ports a probe brought up, and the ones with a disk that failed.
pub struct AhciProbe<H: Hal> {
    /// Working disks.
    pub ports: Vec<AhciPort<H>>,
    /// Port numbers with an ATA disk that could not be brought up.
    pub failed: Vec<(u8, AhciError)>,
}

/// Resets the HBA whose ABAR is `bar_len` bytes at `bar_phys` and brings up
/// every port with an ATA disk. Bus mastering must already be enabled.
///
/// # Safety
///
/// `bar_phys` is the ABAR of an AHCI HBA this driver alone owns.
pub unsafe fn probe<H: Hal + Clone>(
    hal: H,
    bar_phys: PhysAddr,
    bar_len: usize,
    config: AhciConfig,
) -> Result<AhciProbe<H>, AhciError> {
    if bar_len < hba::PORT_BASE {
        return Err(AhciError::BadBar);
    }
    // SAFETY: the caller vouches that this is our HBA's ABAR.
    let base = unsafe { hal.map_mmio(bar_phys, bar_len) }.ok_or(AhciError::BadBar)?;
    // SAFETY: `map_mmio` mapped `bar_len` bytes at `base`.
    let regs = unsafe { Region::new(base, bar_len) };
    regs.write32(hba::GHC, hba::GHC_AHCI_ENABLE);
    regs.write32(hba::GHC, hba::GHC_AHCI_ENABLE | hba::GHC_RESET);
    if !wait(&hal, HBA_RESET_TIMEOUT_NS, || {
        regs.read32(hba::GHC) & hba::GHC_RESET == 0
    }) {
        return Err(AhciError::ResetTimeout);
    }
    // The reset may clear AHCI mode; set it again.
    regs.write32(hba::GHC, hba::GHC_AHCI_ENABLE);
    let capabilities = regs.read32(hba::CAP);
    let implemented = regs.read32(hba::PORTS_IMPLEMENTED);
    let mut found = AhciProbe {
        ports: Vec::new(),
        failed: Vec::new(),
    };
    let mut ports = Vec::new();
    for number in (0..32u8).filter(|n| implemented & (1 << n) != 0) {
        let offset = hba::PORT_BASE + usize::from(number) * hba::PORT_SIZE;
        if offset + hba::PORT_SIZE > bar_len {
            break;
        }
        // SAFETY: the window lies within the mapped ABAR.
        let port_regs = unsafe { Region::new(base.add(offset), hba::PORT_SIZE) };
        if capabilities & hba::CAP_STAGGERED_SPIN_UP != 0 {
            port_regs.write32(
                port::COMMAND,
                port_regs.read32(port::COMMAND) | port::CMD_SPIN_UP,
            );
        }
        ports.push((number, port_regs));
    }
    // Links come up in parallel after the reset; an empty port never does,
    // so all ports share one wait.
    let linked = |regs: &Region| regs.read32(port::SATA_STATUS) & 0xf == port::DEVICE_PRESENT;
    wait(&hal, LINK_TIMEOUT_NS / 10, || {
        ports.iter().all(|(_, regs)| linked(regs))
    });
    for (number, port_regs) in ports {
        // The signature arrives with the device's first D2H FIS, which an
        // HBA may only take once FIS receive is on (QEMU's does): all ones
        // means "not yet", and IDENTIFY in bring-up then decides.
        let signature = port_regs.read32(port::SIGNATURE);
        if !linked(&port_regs)
            || (signature != port::SIGNATURE_ATA && signature != port::SIGNATURE_NONE_YET)
        {
            continue;
        }
        match AhciPort::bring_up(hal.clone(), port_regs, number, capabilities, config) {
            Ok(port) => found.ports.push(port),
            Err(error) => found.failed.push((number, error)),
        }
    }
    Ok(found)
}

/// [`probe`] for the HBA at PCI function `bdf` (ABAR is BAR5).
///
/// # Safety
///
/// `bdf` is an AHCI HBA this driver alone owns.
pub unsafe fn probe_pci<H: Hal + Clone>(
    hal: H,
    pci: &mut impl ConfigAccess,
    bdf: Bdf,
    config: AhciConfig,
) -> Result<AhciProbe<H>, AhciError> {
    let (bar_phys, bar_len) = pci::prepare_memory_bar(pci, bdf, 5).ok_or(AhciError::BadBar)?;
    // SAFETY: the caller vouches for the function; BAR5 is its ABAR.
    unsafe { probe(hal, bar_phys, bar_len, config) }
}

/// Busy-waits until `done` or `timeout_ns` passes; says whether it got done.
fn wait(hal: &impl Hal, timeout_ns: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = hal.now_ns().saturating_add(timeout_ns);
    loop {
        if done() {
            return true;
        }
        if hal.now_ns() > deadline {
            return false;
        }
        hal.relax();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Built but held back until it may be issued.
    Waiting,
    /// Issued to the HBA.
    Issued,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    state: SlotState,
    tag: u64,
    queued: bool,
    deadline_ns: u64,
}

/// A command ready to be placed in a slot.
struct Prepared {
    fis: CommandFis,
    queued: bool,
}

/// One SATA disk behind an AHCI port.
pub struct AhciPort<H: Hal> {
    hal: H,
    regs: Region,
    number: u8,
    config: AhciConfig,
    /// Command list (1 KiB) and received-FIS area.
    lists: DmaRegion,
    /// A command table per slot, `TABLE_PAGES` each.
    tables: DmaRegion,
    /// A page of zeroes, written by write-zeroes.
    zeroes: DmaRegion,
    /// Buffer for IDENTIFY and the NCQ error log.
    scratch: DmaRegion,
    identity: AtaIdentity,
    ncq: bool,
    slots: Vec<Slot>,
    /// Slot numbers in submission order, waiting to be issued.
    waiting: VecDeque<u8>,
    finished: VecDeque<Completion>,
    failed: bool,
    resets: u32,
}

impl<H: Hal> AhciPort<H> {
    fn bring_up(
        hal: H,
        regs: Region,
        number: u8,
        capabilities: u32,
        config: AhciConfig,
    ) -> Result<Self, AhciError> {
        let command_slots = ((capabilities >> 8) & 0x1f) as usize + 1;
        if command_slots < 2 {
            return Err(AhciError::TooFewSlots);
        }
        let mut regions: Vec<DmaRegion> = Vec::with_capacity(4);
        for pages in [1, command_slots * TABLE_PAGES, 1, 1] {
            match hal.dma_alloc(pages) {
                Some(region) => regions.push(region),
                None => {
                    for region in regions {
                        // SAFETY: never shown to the HBA.
                        unsafe { hal.dma_free(region) };
                    }
                    return Err(AhciError::OutOfMemory);
                }
            }
        }
        let scratch = regions.pop().ok_or(AhciError::OutOfMemory)?;
        let zeroes = regions.pop().ok_or(AhciError::OutOfMemory)?;
        let tables = regions.pop().ok_or(AhciError::OutOfMemory)?;
        let lists = regions.pop().ok_or(AhciError::OutOfMemory)?;
        let mut port = Self {
            hal,
            regs,
            number,
            config,
            lists,
            tables,
            zeroes,
            scratch,
            identity: AtaIdentity {
                model: [0; 40],
                sectors: 0,
                logical_sector_size: 512,
                physical_sector_size: 512,
                ncq_depth: None,
                trim: false,
                write_cache: false,
            },
            ncq: false,
            // One slot, the last, stays free for the driver's own commands.
            slots: vec![
                Slot {
                    state: SlotState::Free,
                    tag: 0,
                    queued: false,
                    deadline_ns: 0
                };
                command_slots - 1
            ],
            waiting: VecDeque::new(),
            finished: VecDeque::new(),
            failed: false,
            resets: 0,
        };
        let highest = port.tables.phys + port.tables.len() as u64;
        if capabilities & hba::CAP_64BIT == 0
            && [
                highest,
                port.lists.phys + PAGE_SIZE as u64,
                port.scratch.phys,
                port.zeroes.phys,
            ]
            .iter()
            .any(|&a| a > u64::from(u32::MAX))
        {
            return Err(AhciError::AddressTooHigh);
        }
        port.start()?;
        let mut words = [0u16; 256];
        port.run_internal(CommandFis {
            command: ata::command::IDENTIFY_DEVICE,
            ..CommandFis::default()
        })?;
        let scratch = Region::from(&port.scratch);
        for (i, word) in words.iter_mut().enumerate() {
            *word = u16::from(scratch.read8(2 * i)) | (u16::from(scratch.read8(2 * i + 1)) << 8);
        }
        port.identity = AtaIdentity::parse(&words).map_err(AhciError::Identify)?;
        if let Some(depth) = port
            .identity
            .ncq_depth
            .filter(|_| config.use_ncq && capabilities & hba::CAP_NCQ != 0)
        {
            port.ncq = true;
            // NCQ tags are slot numbers and must stay below the drive's depth.
            port.slots
                .truncate(usize::from(depth).min(command_slots - 1));
        }
        Ok(port)
    }

    /// The port number on the HBA.
    pub fn number(&self) -> u8 {
        self.number
    }

    /// What IDENTIFY DEVICE said.
    pub fn identity(&self) -> &AtaIdentity {
        &self.identity
    }

    /// Whether reads and writes use NCQ.
    pub fn uses_ncq(&self) -> bool {
        self.ncq
    }

    /// How many times the port was reset to recover.
    pub fn resets(&self) -> u32 {
        self.resets
    }

    /// Whether the port failed for good.
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    fn internal_slot(&self) -> u8 {
        ((self.tables.pages / TABLE_PAGES) - 1) as u8
    }

    fn table(&self, slot: u8) -> (Region, PhysAddr) {
        let offset = usize::from(slot) * TABLE_PAGES * PAGE_SIZE;
        assert!(
            offset + TABLE_PAGES * PAGE_SIZE <= self.tables.len(),
            "slot beyond the tables"
        );
        // SAFETY: the slot's table lies within `tables` (checked above).
        let region = unsafe { Region::new(self.tables.virt.add(offset), TABLE_PAGES * PAGE_SIZE) };
        (region, self.tables.phys + offset as u64)
    }

    /// Points the port at our memory, clears old errors and starts it.
    fn start(&mut self) -> Result<(), AhciError> {
        self.stop()?;
        self.regs
            .write32(port::COMMAND_LIST, self.lists.phys as u32);
        self.regs
            .write32(port::COMMAND_LIST + 4, (self.lists.phys >> 32) as u32);
        let received = self.lists.phys + RECEIVED_FIS_OFFSET as u64;
        self.regs.write32(port::FIS_BASE, received as u32);
        self.regs
            .write32(port::FIS_BASE + 4, (received >> 32) as u32);
        self.regs.write32(port::SATA_ERROR, u32::MAX);
        self.regs.write32(port::INTERRUPT_STATUS, u32::MAX);
        let command = self.regs.read32(port::COMMAND);
        self.regs
            .write32(port::COMMAND, command | port::CMD_FIS_RECEIVE);
        let regs = self.regs;
        let idle =
            || regs.read32(port::TASK_FILE) as u8 & (ata::STATUS_BUSY | ata::STATUS_DRQ) == 0;
        if !wait(&self.hal, LINK_TIMEOUT_NS, idle) {
            return Err(AhciError::PortTimeout);
        }
        self.regs.write32(
            port::COMMAND,
            self.regs.read32(port::COMMAND) | port::CMD_START,
        );
        Ok(())
    }

    /// Stops command processing and FIS reception.
    fn stop(&mut self) -> Result<(), AhciError> {
        let regs = self.regs;
        regs.write32(port::COMMAND, regs.read32(port::COMMAND) & !port::CMD_START);
        let stopped = wait(&self.hal, PORT_STOP_TIMEOUT_NS, || {
            regs.read32(port::COMMAND) & port::CMD_LIST_RUNNING == 0
        });
        regs.write32(
            port::COMMAND,
            regs.read32(port::COMMAND) & !port::CMD_FIS_RECEIVE,
        );
        let fis_stopped = wait(&self.hal, PORT_STOP_TIMEOUT_NS, || {
            regs.read32(port::COMMAND) & port::CMD_FIS_RUNNING == 0
        });
        if stopped && fis_stopped {
            Ok(())
        } else {
            Err(AhciError::PortTimeout)
        }
    }

    /// COMRESET: re-initialises the link and the drive, then restarts.
    fn reset(&mut self) -> Result<(), AhciError> {
        self.resets += 1;
        // A port that will not stop is reset anyway; COMRESET stops it.
        let _ = self.stop();
        let control = self.regs.read32(port::SATA_CONTROL) & !0xf;
        self.regs.write32(port::SATA_CONTROL, control | 1);
        let hold_until = self.hal.now_ns() + COMRESET_HOLD_NS;
        wait(&self.hal, COMRESET_HOLD_NS * 2, || {
            self.hal.now_ns() >= hold_until
        });
        self.regs.write32(port::SATA_CONTROL, control);
        let regs = self.regs;
        if !wait(&self.hal, LINK_TIMEOUT_NS, || {
            regs.read32(port::SATA_STATUS) & 0xf == port::DEVICE_PRESENT
        }) {
            return Err(AhciError::PortTimeout);
        }
        self.start()
    }

    /// Writes `fis` and a PRDT into slot `slot` and fills its header.
    fn fill_slot(&self, slot: u8, fis: &CommandFis, write: bool, prds: &[(PhysAddr, u32)]) {
        let (table, table_phys) = self.table(slot);
        for (i, byte) in fis.bytes().iter().enumerate() {
            table.write8(i, *byte);
        }
        for (i, &(address, len)) in prds.iter().enumerate() {
            let at = PRDT_OFFSET + i * PRD_SIZE;
            table.write64(at, address);
            table.write32(at + 8, 0);
            table.write32(at + 12, len - 1);
        }
        let header = Region::from(&self.lists);
        let at = usize::from(slot) * COMMAND_HEADER_SIZE;
        // Command FIS length in dwords (5), write direction, PRDT length.
        let flags = 5 | (u32::from(write) << 6) | ((prds.len() as u32) << 16);
        header.write32(at, flags);
        header.write32(at + 4, 0);
        header.write64(at + 8, table_phys);
    }

    /// Runs a non-data or 512-byte-read command in the driver's own slot,
    /// to completion. Only used when nothing else is in flight.
    fn run_internal(&mut self, fis: CommandFis) -> Result<(), AhciError> {
        let slot = self.internal_slot();
        let prds = [(self.scratch.phys, 512)];
        let with_data = matches!(
            fis.command,
            ata::command::IDENTIFY_DEVICE | ata::command::READ_LOG_EXT
        );
        self.fill_slot(slot, &fis, false, if with_data { &prds } else { &[] });
        self.regs.write32(port::ISSUE, 1 << slot);
        let regs = self.regs;
        let settled = || {
            regs.read32(port::ISSUE) & (1 << slot) == 0
                || regs.read32(port::INTERRUPT_STATUS) & port::IS_ERRORS != 0
        };
        if !wait(&self.hal, self.config.timeout_ns, settled) {
            return Err(AhciError::PortTimeout);
        }
        let task_file = self.regs.read32(port::TASK_FILE);
        if self.regs.read32(port::INTERRUPT_STATUS) & port::IS_ERRORS != 0
            || task_file as u8 & ata::STATUS_ERROR != 0
        {
            return Err(AhciError::CommandFailed {
                status: task_file as u8,
                error: (task_file >> 8) as u8,
            });
        }
        Ok(())
    }

    /// The PRDT entries for `segments`: whole segments split at 4 MiB.
    fn prds(segments: &[Segment]) -> Result<Vec<(PhysAddr, u32)>, SubmitError> {
        let mut prds = Vec::new();
        for segment in segments {
            // The HBA moves words: addresses and lengths must be even.
            if segment.phys % 2 != 0 || segment.len % 2 != 0 {
                return Err(SubmitError::Misaligned);
            }
            let mut at = 0;
            while at < u64::from(segment.len) {
                let len = (u64::from(segment.len) - at).min(PRD_MAX_BYTES);
                prds.push((segment.phys + at, len as u32));
                at += len;
            }
        }
        if prds.len() > PRDS_PER_TABLE {
            return Err(SubmitError::TooLarge);
        }
        Ok(prds)
    }

    /// Builds the command for a validated request into `slot`.
    fn prepare(
        &self,
        slot: u8,
        request: Request<'_>,
        blocks: u64,
    ) -> Result<Prepared, SubmitError> {
        let data_command = |lba: u64, write: bool| {
            // `validate` capped `blocks` at 65536; 0 in the count means 65536.
            let count = blocks as u16;
            if self.ncq {
                let command = if write {
                    ata::command::WRITE_FPDMA_QUEUED
                } else {
                    ata::command::READ_FPDMA_QUEUED
                };
                Prepared {
                    fis: CommandFis {
                        command,
                        lba,
                        count: u16::from(slot) << 3,
                        features: count,
                    },
                    queued: true,
                }
            } else {
                let command = if write {
                    ata::command::WRITE_DMA_EXT
                } else {
                    ata::command::READ_DMA_EXT
                };
                Prepared {
                    fis: CommandFis {
                        command,
                        lba,
                        count,
                        features: 0,
                    },
                    queued: false,
                }
            }
        };
        match request {
            Request::Read { lba, segments } | Request::Write { lba, segments } => {
                let write = matches!(request, Request::Write { .. });
                let prds = Self::prds(segments)?;
                let prepared = data_command(lba, write);
                self.fill_slot(slot, &prepared.fis, write, &prds);
                Ok(prepared)
            }
            Request::WriteZeroes { lba, .. } => {
                let bytes = blocks * u64::from(self.identity.logical_sector_size);
                let prds: Vec<(PhysAddr, u32)> = (0..bytes.div_ceil(PAGE_SIZE as u64))
                    .map(|page| {
                        (
                            self.zeroes.phys,
                            (bytes - page * PAGE_SIZE as u64).min(PAGE_SIZE as u64) as u32,
                        )
                    })
                    .collect();
                let prepared = data_command(lba, true);
                self.fill_slot(slot, &prepared.fis, true, &prds);
                Ok(prepared)
            }
            Request::Flush => {
                let fis = CommandFis {
                    command: ata::command::FLUSH_CACHE_EXT,
                    ..CommandFis::default()
                };
                self.fill_slot(slot, &fis, false, &[]);
                Ok(Prepared { fis, queued: false })
            }
            Request::Discard { lba, .. } => {
                let (table, table_phys) = self.table(slot);
                let mut next = lba;
                let end = lba + blocks;
                for index in 0..ata::TRIM_RANGES_PER_COMMAND as usize {
                    let count = (end - next).min(ata::TRIM_RANGE_MAX_BLOCKS);
                    table.write64(TRIM_RANGES_OFFSET + index * 8, next | (count << 48));
                    next += count;
                }
                let fis = CommandFis {
                    command: ata::command::DATA_SET_MANAGEMENT,
                    lba: 0,
                    count: 1,
                    features: ata::DSM_TRIM,
                };
                self.fill_slot(
                    slot,
                    &fis,
                    true,
                    &[(table_phys + TRIM_RANGES_OFFSET as u64, 512)],
                );
                Ok(Prepared { fis, queued: false })
            }
        }
    }

    /// Issues waiting commands in order while they may run alongside what
    /// is in flight (queued with queued, non-queued with non-queued).
    fn issue_waiting(&mut self) {
        let deadline_ns = self.hal.now_ns().saturating_add(self.config.timeout_ns);
        let in_flight: Vec<bool> = self
            .slots
            .iter()
            .filter(|s| s.state == SlotState::Issued)
            .map(|s| s.queued)
            .collect();
        let mut running_queued = in_flight.first().copied();
        while let Some(&slot) = self.waiting.front() {
            let queued = self.slots[usize::from(slot)].queued;
            if running_queued.is_some_and(|running| running != queued) {
                break;
            }
            running_queued = Some(queued);
            self.waiting.pop_front();
            let entry = &mut self.slots[usize::from(slot)];
            entry.state = SlotState::Issued;
            entry.deadline_ns = deadline_ns;
            if queued {
                self.regs.write32(port::ACTIVE, 1 << slot);
            }
            self.regs.write32(port::ISSUE, 1 << slot);
        }
    }

    fn finish(&mut self, slot: u8, result: Result<(), IoError>) {
        let entry = &mut self.slots[usize::from(slot)];
        entry.state = SlotState::Free;
        self.finished.push_back(Completion {
            tag: entry.tag,
            result,
        });
    }

    /// After an error: resets the port, asks the drive which queued command
    /// failed, fails that one with the drive's error and aborts the rest.
    fn recover_from_error(&mut self) {
        let task_file = self.regs.read32(port::TASK_FILE);
        let (status, error) = (task_file as u8, (task_file >> 8) as u8);
        let current = ((self.regs.read32(port::COMMAND) >> 8) & 0x1f) as u8;
        let queued_in_flight = self
            .slots
            .iter()
            .any(|s| s.state == SlotState::Issued && s.queued);
        let reset = self.reset();
        let culprit = if queued_in_flight && reset.is_ok() {
            match self.run_internal(CommandFis {
                command: ata::command::READ_LOG_EXT,
                lba: u64::from(ata::NCQ_ERROR_LOG),
                count: 1,
                features: 0,
            }) {
                Ok(()) => {
                    let mut log = [0u8; 512];
                    Region::from(&self.scratch).read_bytes(0, &mut log);
                    let (tag, status, error) = ata::parse_ncq_error_log(&log);
                    tag.map(|tag| (tag, ata::io_error(status, error)))
                }
                Err(_) => None,
            }
        } else {
            Some((current, ata::io_error(status, error)))
        };
        for slot in 0..self.slots.len() as u8 {
            if self.slots[usize::from(slot)].state != SlotState::Issued {
                continue;
            }
            let result = match culprit {
                Some((tag, error)) if tag == slot => Err(error),
                // Without the log nobody can tell which one failed.
                None => Err(ata::io_error(status, error)),
                Some(_) => Err(IoError::Aborted),
            };
            self.finish(slot, result);
        }
        if reset.is_err() {
            self.fail_port();
        }
    }

    /// After a timeout: resets the port and fails what was in flight.
    fn recover_from_timeout(&mut self, now: u64) {
        let reset = self.reset();
        for slot in 0..self.slots.len() as u8 {
            let entry = self.slots[usize::from(slot)];
            if entry.state == SlotState::Issued {
                self.finish(
                    slot,
                    Err(if entry.deadline_ns <= now {
                        IoError::Timeout
                    } else {
                        IoError::Aborted
                    }),
                );
            }
        }
        if reset.is_err() {
            self.fail_port();
        }
    }

    /// Gives up: every command still held fails.
    fn fail_port(&mut self) {
        self.failed = true;
        self.waiting.clear();
        for slot in 0..self.slots.len() as u8 {
            if self.slots[usize::from(slot)].state != SlotState::Free {
                self.finish(slot, Err(IoError::Aborted));
            }
        }
    }

    /// Moves finished commands to `finished` and handles errors and timeouts.
    fn reap(&mut self) {
        let status = self.regs.read32(port::INTERRUPT_STATUS);
        let busy = self.regs.read32(port::ISSUE) | self.regs.read32(port::ACTIVE);
        for slot in 0..self.slots.len() as u8 {
            if self.slots[usize::from(slot)].state == SlotState::Issued && busy & (1 << slot) == 0 {
                self.finish(slot, Ok(()));
            }
        }
        if status & port::IS_ERRORS != 0 {
            self.recover_from_error();
        } else {
            self.regs.write32(port::INTERRUPT_STATUS, status);
            let now = self.hal.now_ns();
            if self
                .slots
                .iter()
                .any(|s| s.state == SlotState::Issued && s.deadline_ns <= now)
            {
                self.recover_from_timeout(now);
            }
        }
    }
}

impl<H: Hal> QueuedDevice for AhciPort<H> {
    fn geometry(&self) -> Geometry {
        let sector = self.identity.logical_sector_size;
        let max_transfer = u64::from(self.config.max_transfer_bytes)
            .min(MAX_SECTORS_PER_COMMAND * u64::from(sector));
        let zero_page_blocks = (PRDS_PER_TABLE * PAGE_SIZE) as u64 / u64::from(sector);
        Geometry {
            logical_block_size: sector,
            physical_block_size: self.identity.physical_sector_size,
            blocks: self.identity.sectors,
            volatile_write_cache: self.identity.write_cache,
            discard_granularity: self.identity.trim.then_some(1),
            max_discard_blocks: if self.identity.trim {
                ata::TRIM_RANGES_PER_COMMAND * ata::TRIM_RANGE_MAX_BLOCKS
            } else {
                0
            },
            max_write_zeroes_blocks: zero_page_blocks.min(MAX_SECTORS_PER_COMMAND),
            max_transfer_bytes: max_transfer as u32,
            max_segments: PRDS_PER_TABLE as u16,
            queues: 1,
            queue_depth: self.slots.len() as u16,
        }
    }

    fn submit(&mut self, queue: u16, tag: u64, request: Request<'_>) -> Result<(), SubmitError> {
        if self.failed {
            return Err(SubmitError::DeviceFailed);
        }
        let blocks = blockdev::validate(&self.geometry(), queue, &request)?;
        if matches!(request, Request::Flush) && !self.identity.write_cache {
            // Without a volatile cache every completed write is durable.
            self.finished.push_back(Completion {
                tag,
                result: Ok(()),
            });
            return Ok(());
        }
        let slot = self
            .slots
            .iter()
            .position(|s| s.state == SlotState::Free)
            .ok_or(SubmitError::QueueFull)? as u8;
        let prepared = self.prepare(slot, request, blocks)?;
        self.slots[usize::from(slot)] = Slot {
            state: SlotState::Waiting,
            tag,
            queued: prepared.queued,
            deadline_ns: u64::MAX,
        };
        self.waiting.push_back(slot);
        self.issue_waiting();
        Ok(())
    }

    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        if queue != 0 {
            return 0;
        }
        if !self.failed {
            self.reap();
            if !self.failed {
                self.issue_waiting();
            }
        }
        blockdev::hand_over(&mut self.finished, out)
    }
}

impl<H: Hal> Drop for AhciPort<H> {
    fn drop(&mut self) {
        // Stop the port before its memory goes back; if it will not stop,
        // leak the memory rather than let the HBA write freed pages.
        if self.stop().is_err() {
            return;
        }
        for region in [
            &mut self.lists,
            &mut self.tables,
            &mut self.zeroes,
            &mut self.scratch,
        ] {
            let region = core::mem::replace(
                region,
                DmaRegion {
                    phys: 0,
                    virt: core::ptr::NonNull::dangling(),
                    pages: 0,
                },
            );
            // SAFETY: the port is stopped and nothing points into the region.
            unsafe { self.hal.dma_free(region) };
        }
    }
}

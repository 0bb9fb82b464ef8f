//! A register-level AHCI HBA with SATA disks for tests: it follows the
//! port start/stop handshakes and COMRESET, executes commands from the
//! command list (PRDT scatter-gather against an in-memory disk), completes
//! queued commands through SActive, and can fail or swallow commands.

use std::vec;
use std::vec::Vec;

use super::ata::{CommandFis, command};
use super::{hba, port};
use crate::testing::{WriteRule, read_phys, set_write_rule, virt_of, write_phys};

fn write32(phys: u64, value: u32) {
    write_phys(phys, &value);
}

const TASK_FILE_ERROR: u32 = 1 << 30;

pub(crate) struct SimDisk {
    pub data: Vec<u8>,
    pub ncq_depth: Option<u8>,
    pub trim: bool,
    pub write_cache: bool,
    /// Swallow commands without completing them.
    pub drop_commands: bool,
    /// Fail the next read or write with this ATA error register value.
    pub fail_next: Option<u8>,
    pub flushes: usize,
    pub commands: Vec<u8>,
    /// The tag of the last failed queued command, for the NCQ error log.
    failed_tag: Option<u8>,
    /// COMRESET asserted and not yet released.
    in_reset: bool,
    /// Stopped after an error until the port is restarted.
    halted: bool,
}

impl SimDisk {
    pub(crate) fn new(sectors: usize) -> Self {
        Self {
            data: vec![0; sectors * 512],
            ncq_depth: Some(32),
            trim: true,
            write_cache: true,
            drop_commands: false,
            fail_next: None,
            flushes: 0,
            commands: Vec::new(),
            failed_tag: None,
            in_reset: false,
            halted: false,
        }
    }

    fn identify(&self) -> [u8; 512] {
        let mut words = [0u16; 256];
        for (i, pair) in b"stordom simulated sata disk             "
            .chunks(2)
            .enumerate()
        {
            words[27 + i] = u16::from_be_bytes([pair[0], pair[1]]);
        }
        if let Some(depth) = self.ncq_depth {
            words[75] = u16::from(depth - 1);
            words[76] = 1 << 8;
        }
        words[82] = 1 << 5;
        words[85] = u16::from(self.write_cache) << 5;
        words[83] = 1 << 10;
        let sectors = (self.data.len() / 512) as u64;
        for i in 0..4 {
            words[100 + i] = (sectors >> (16 * i)) as u16;
        }
        words[169] = u16::from(self.trim);
        let mut bytes = [0u8; 512];
        for (i, word) in words.iter().enumerate() {
            bytes[2 * i..2 * i + 2].copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }
}

pub(crate) struct AhciSim {
    abar: u64,
    /// Disks by port number; `None` for an empty port.
    pub disks: Vec<Option<SimDisk>>,
}

fn port_register(abar: u64, number: usize, offset: usize) -> u64 {
    abar + (hba::PORT_BASE + number * hba::PORT_SIZE + offset) as u64
}

impl AhciSim {
    /// An HBA with 32 command slots, NCQ and 64-bit addressing whose ABAR is
    /// the register window at `abar`.
    pub(crate) fn new(abar: u64, disks: Vec<Option<SimDisk>>) -> Self {
        let sim = Self { abar, disks };
        let capabilities = hba::CAP_64BIT | hba::CAP_NCQ | (31 << 8) | (sim.disks.len() as u32 - 1);
        write32(abar + hba::CAP as u64, capabilities);
        write32(
            abar + hba::PORTS_IMPLEMENTED as u64,
            (1 << sim.disks.len()) - 1,
        );
        for number in 0..sim.disks.len() {
            set_write_rule(sim.port_register(number, port::ISSUE), WriteRule::SetBits);
            set_write_rule(sim.port_register(number, port::ACTIVE), WriteRule::SetBits);
            set_write_rule(
                sim.port_register(number, port::INTERRUPT_STATUS),
                WriteRule::ClearBits,
            );
            set_write_rule(
                sim.port_register(number, port::SATA_ERROR),
                WriteRule::ClearBits,
            );
        }
        sim
    }

    pub(crate) fn abar(&self) -> u64 {
        self.abar
    }

    fn port_register(&self, number: usize, offset: usize) -> u64 {
        port_register(self.abar, number, offset)
    }

    pub(crate) fn step(&mut self) {
        let control = read_phys::<u32>(self.abar + hba::GHC as u64);
        if control & hba::GHC_RESET != 0 {
            for number in 0..self.disks.len() {
                self.reset_port(number);
            }
            write32(self.abar + hba::GHC as u64, control & !hba::GHC_RESET);
        }
        for number in 0..self.disks.len() {
            self.step_port(number);
        }
    }

    /// The state a port is in after an HBA reset or a COMRESET.
    fn reset_port(&mut self, number: usize) {
        let register = |offset| self.port_register(number, offset);
        for offset in [
            port::COMMAND,
            port::INTERRUPT_STATUS,
            port::ACTIVE,
            port::ISSUE,
            port::SATA_ERROR,
        ] {
            write32(register(offset), 0);
        }
        let present = self.disks[number].is_some();
        write32(register(port::SATA_STATUS), if present { 0x123 } else { 0 });
        write32(register(port::TASK_FILE), if present { 0x50 } else { 0x7f });
        write32(
            register(port::SIGNATURE),
            if present {
                port::SIGNATURE_ATA
            } else {
                u32::MAX
            },
        );
        if let Some(disk) = &mut self.disks[number] {
            disk.halted = false;
        }
    }

    fn step_port(&mut self, number: usize) {
        let abar = self.abar;
        let register = move |offset| port_register(abar, number, offset);
        let Some(disk) = &mut self.disks[number] else {
            return;
        };
        let control = read_phys::<u32>(register(port::SATA_CONTROL));
        if control & 0xf == 1 {
            disk.in_reset = true;
            write32(register(port::SATA_STATUS), 0);
            return;
        }
        if disk.in_reset {
            disk.in_reset = false;
            let command = read_phys::<u32>(register(port::COMMAND));
            self.reset_port(number);
            write32(
                register(port::COMMAND),
                command & !(port::CMD_START | port::CMD_LIST_RUNNING),
            );
            return;
        }
        let mut command = read_phys::<u32>(register(port::COMMAND));
        command = if command & port::CMD_FIS_RECEIVE != 0 {
            command | port::CMD_FIS_RUNNING
        } else {
            command & !port::CMD_FIS_RUNNING
        };
        if command & port::CMD_START == 0 {
            if command & port::CMD_LIST_RUNNING != 0 {
                // Clearing ST clears the issued and active bits.
                write32(register(port::ISSUE), 0);
                write32(register(port::ACTIVE), 0);
                disk.halted = false;
            }
            command &= !port::CMD_LIST_RUNNING;
        } else {
            command |= port::CMD_LIST_RUNNING;
        }
        write32(register(port::COMMAND), command);
        if command & port::CMD_LIST_RUNNING == 0 || disk.halted || disk.drop_commands {
            return;
        }
        let list = read_phys::<u64>(register(port::COMMAND_LIST));
        let issued = read_phys::<u32>(register(port::ISSUE));
        for slot in (0..32).filter(|slot| issued & (1 << slot) != 0) {
            let active = read_phys::<u32>(register(port::ACTIVE));
            let header = list + slot * 32;
            let flags = read_phys::<u32>(header);
            let table = read_phys::<u64>(header + 8);
            let mut fis = [0u8; 20];
            for (i, byte) in fis.iter_mut().enumerate() {
                *byte = (read_phys::<u32>(table + (i & !3) as u64) >> (8 * (i & 3))) as u8;
            }
            let fis = CommandFis::parse(&fis);
            let queued = matches!(
                fis.command,
                command::READ_FPDMA_QUEUED | command::WRITE_FPDMA_QUEUED
            );
            let others_active = active & !(1 << slot);
            assert!(
                queued == (active & (1 << slot) != 0),
                "queued commands are marked active, others not"
            );
            assert!(
                queued || others_active == 0,
                "a non-queued command was issued while queued ones ran"
            );
            let prds: Vec<(u64, usize)> = (0..u64::from(flags >> 16))
                .map(|i| {
                    (
                        read_phys::<u64>(table + 0x80 + i * 16),
                        (read_phys::<u32>(table + 0x80 + i * 16 + 12) & 0x3f_ffff) as usize + 1,
                    )
                })
                .collect();
            let outcome = execute(disk, &fis, queued, slot as u8, &prds);
            write32(
                register(port::ISSUE),
                read_phys::<u32>(register(port::ISSUE)) & !(1 << slot),
            );
            match outcome {
                Ok(moved) => {
                    write32(header + 4, moved as u32);
                    if queued {
                        write32(
                            register(port::ACTIVE),
                            read_phys::<u32>(register(port::ACTIVE)) & !(1 << slot),
                        );
                    }
                }
                Err(error) => {
                    if queued {
                        disk.failed_tag = Some(slot as u8);
                    } else {
                        // A failed non-queued command stays issued.
                        write32(
                            register(port::ISSUE),
                            read_phys::<u32>(register(port::ISSUE)) | (1 << slot),
                        );
                        let command = read_phys::<u32>(register(port::COMMAND)) & !(0x1f << 8);
                        write32(register(port::COMMAND), command | ((slot as u32) << 8));
                    }
                    write32(register(port::TASK_FILE), 0x51 | (u32::from(error) << 8));
                    write32(
                        register(port::INTERRUPT_STATUS),
                        read_phys::<u32>(register(port::INTERRUPT_STATUS)) | TASK_FILE_ERROR,
                    );
                    disk.halted = true;
                    return;
                }
            }
        }
    }
}

/// Copies between the disk and the PRDT's buffers.
fn transfer(disk: &mut SimDisk, start: usize, prds: &[(u64, usize)], to_disk: bool) -> usize {
    let mut at = start;
    for &(address, len) in prds {
        let bytes = &mut disk.data[at..at + len];
        // SAFETY: the driver only hands the device memory from the test Hal.
        unsafe {
            if to_disk {
                std::ptr::copy_nonoverlapping(virt_of(address), bytes.as_mut_ptr(), len);
            } else {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), virt_of(address), len);
            }
        }
        at += len;
    }
    at - start
}

/// Runs one command; the ATA error register value on failure.
fn execute(
    disk: &mut SimDisk,
    fis: &CommandFis,
    queued: bool,
    slot: u8,
    prds: &[(u64, usize)],
) -> Result<usize, u8> {
    const ABORTED: u8 = 1 << 2;
    const ID_NOT_FOUND: u8 = 1 << 4;
    disk.commands.push(fis.command);
    let sectors = |count: u16| {
        if count == 0 {
            65536
        } else {
            usize::from(count)
        }
    };
    match fis.command {
        command::IDENTIFY_DEVICE => {
            let bytes = disk.identify();
            // SAFETY: the driver only hands the device memory from the test Hal.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), virt_of(prds[0].0), 512) };
            Ok(512)
        }
        command::READ_LOG_EXT => {
            let mut log = [0u8; 512];
            match disk.failed_tag.take() {
                Some(tag) => {
                    log[0] = tag;
                    log[2] = 0x51;
                    log[3] = 0x40;
                }
                None => log[0] = 0x80,
            }
            // SAFETY: the driver only hands the device memory from the test Hal.
            unsafe { std::ptr::copy_nonoverlapping(log.as_ptr(), virt_of(prds[0].0), 512) };
            Ok(512)
        }
        command::READ_DMA_EXT
        | command::WRITE_DMA_EXT
        | command::READ_FPDMA_QUEUED
        | command::WRITE_FPDMA_QUEUED => {
            let count = if queued {
                assert_eq!(fis.count >> 3, u16::from(slot), "the NCQ tag is the slot");
                sectors(fis.features)
            } else {
                sectors(fis.count)
            };
            let start = fis.lba as usize * 512;
            let len: usize = prds.iter().map(|p| p.1).sum();
            assert_eq!(len, count * 512, "PRDT covers the sector count");
            if start + len > disk.data.len() {
                return Err(ID_NOT_FOUND);
            }
            if let Some(error) = disk.fail_next.take() {
                return Err(error);
            }
            let write = matches!(
                fis.command,
                command::WRITE_DMA_EXT | command::WRITE_FPDMA_QUEUED
            );
            Ok(transfer(disk, start, prds, write))
        }
        command::FLUSH_CACHE_EXT => {
            disk.flushes += 1;
            Ok(0)
        }
        command::DATA_SET_MANAGEMENT if disk.trim && fis.features == 1 => {
            let mut ranges = [0u8; 512];
            // SAFETY: the driver only hands the device memory from the test Hal.
            unsafe { std::ptr::copy_nonoverlapping(virt_of(prds[0].0), ranges.as_mut_ptr(), 512) };
            for range in ranges.chunks(8) {
                let entry = u64::from_le_bytes(range.try_into().unwrap());
                let (lba, count) = ((entry & 0xffff_ffff_ffff) as usize, (entry >> 48) as usize);
                let end = ((lba + count) * 512).min(disk.data.len());
                disk.data[(lba * 512).min(end)..end].fill(0);
            }
            Ok(512)
        }
        _ => Err(ABORTED),
    }
}

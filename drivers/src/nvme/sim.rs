//! A register-level NVMe controller for tests: it reads the registers and
//! doorbells the driver writes, executes commands from the queues in "DMA"
//! memory against in-memory namespaces, and posts completions with phase
//! tags. Stepped deterministically from the test `Hal`'s busy-wait hook.

use std::collections::BTreeMap;
use std::vec;
use std::vec::Vec;

use super::command::{admin, io};
use super::reg;
use super::sgl::{DATA_BLOCK, LAST_SEGMENT};
use crate::testing::{read_phys, virt_of, write_phys};

const PAGE: u64 = 4096;

/// Status codes the simulator posts (SCT << 8 | SC).
const INVALID_OPCODE: u16 = 0x001;
const INVALID_FIELD: u16 = 0x002;
const INVALID_NAMESPACE: u16 = 0x00b;
const LBA_OUT_OF_RANGE: u16 = 0x080;
const INVALID_QUEUE: u16 = 0x101;

pub(crate) struct SimNamespace {
    pub id: u32,
    pub block_shift: u8,
    pub metadata: u16,
    pub data: Vec<u8>,
}

impl SimNamespace {
    pub(crate) fn new(id: u32, block_shift: u8, blocks: usize) -> Self {
        Self {
            id,
            block_shift,
            metadata: 0,
            data: vec![0; blocks << block_shift],
        }
    }
}

struct Submission {
    base: u64,
    entries: u16,
    head: u16,
    completion_queue: u16,
}

struct CompletionQueue {
    base: u64,
    entries: u16,
    tail: u16,
    phase: bool,
}

pub(crate) struct NvmeSim {
    bar: u64,
    pub namespaces: Vec<SimNamespace>,
    pub volatile_write_cache: bool,
    pub optional_commands: u16,
    /// Maximum data transfer size as a power of two of pages (0: none).
    pub mdts: u8,
    /// Identify Controller SGLS bits 1:0 (0: PRPs only).
    pub sgl_support: u32,
    /// I/O commands that named their data with an SGL.
    pub sgl_commands: usize,
    /// I/O queue pairs the controller grants.
    pub max_queues: u16,
    /// Swallow I/O commands without completing them.
    pub drop_io: bool,
    /// Never become ready again after a disable.
    pub dead_after_reset: bool,
    /// Never become ready at all.
    pub never_ready: bool,
    /// Post the next I/O completion with this status instead.
    pub fail_next_io: Option<u16>,
    /// Post every I/O completion twice, the copy with a CID nobody used.
    pub post_stray_cids: bool,
    pub flushes: usize,
    pub resets: usize,
    pub io_commands: usize,
    enabled: bool,
    submission_queues: BTreeMap<u16, Submission>,
    completion_queues: BTreeMap<u16, CompletionQueue>,
}

impl NvmeSim {
    /// A controller whose BAR0 is the register window at `bar`.
    pub(crate) fn new(bar: u64, namespaces: Vec<SimNamespace>) -> Self {
        let sim = Self {
            bar,
            namespaces,
            volatile_write_cache: true,
            optional_commands: 0b1100,
            mdts: 0,
            sgl_support: 0b01,
            sgl_commands: 0,
            max_queues: 4,
            drop_io: false,
            dead_after_reset: false,
            never_ready: false,
            fail_next_io: None,
            post_stray_cids: false,
            flushes: 0,
            resets: 0,
            io_commands: 0,
            enabled: false,
            submission_queues: BTreeMap::new(),
            completion_queues: BTreeMap::new(),
        };
        // CAP: 64 entries, contiguous queues required, 500 ms ready
        // timeout, doorbell stride 4, NVM command set, 4 KiB pages.
        let capabilities: u64 = 63 | (1 << 16) | (1 << 24) | (1 << 37);
        sim.write_register(reg::CAP, capabilities as u32);
        sim.write_register(reg::CAP + 4, (capabilities >> 32) as u32);
        sim
    }

    pub(crate) fn bar(&self) -> u64 {
        self.bar
    }

    fn register(&self, offset: usize) -> u32 {
        read_phys::<u32>(self.bar + offset as u64)
    }

    fn write_register(&self, offset: usize, value: u32) {
        write_phys(self.bar + offset as u64, &value.to_le_bytes());
    }

    fn doorbell(&self, index: u16) -> u16 {
        self.register(0x1000 + 4 * usize::from(index)) as u16
    }

    /// Reacts to whatever the driver wrote since the last step.
    pub(crate) fn step(&mut self) {
        let enable = self.register(reg::CC) & 1 != 0;
        if enable && !self.enabled {
            self.enable();
        } else if !enable && self.enabled {
            self.enabled = false;
            self.resets += 1;
            self.submission_queues.clear();
            self.completion_queues.clear();
            self.write_register(reg::CSTS, 0);
            // A reset forgets the doorbells along with the queues.
            for index in 0..2 * (self.max_queues + 1) {
                self.write_register(0x1000 + 4 * usize::from(index), 0);
            }
        }
        if !self.enabled {
            return;
        }
        let ids: Vec<u16> = self.submission_queues.keys().copied().collect();
        for id in ids {
            self.run_queue(id);
        }
    }

    fn enable(&mut self) {
        if self.never_ready || (self.dead_after_reset && self.resets > 0) {
            return;
        }
        let sizes = self.register(reg::AQA);
        let submission = read_phys::<u64>(self.bar + reg::ASQ as u64);
        let completion = read_phys::<u64>(self.bar + reg::ACQ as u64);
        self.completion_queues.insert(
            0,
            CompletionQueue {
                base: completion,
                entries: (sizes >> 16) as u16 + 1,
                tail: 0,
                phase: true,
            },
        );
        self.submission_queues.insert(
            0,
            Submission {
                base: submission,
                entries: (sizes & 0xfff) as u16 + 1,
                head: 0,
                completion_queue: 0,
            },
        );
        self.enabled = true;
        self.write_register(reg::CSTS, 1);
    }

    fn run_queue(&mut self, id: u16) {
        let tail = self.doorbell(2 * id);
        loop {
            let Some(queue) = self.submission_queues.get_mut(&id) else {
                return;
            };
            if queue.head == tail || tail >= queue.entries {
                return;
            }
            let entry_at = queue.base + u64::from(queue.head) * 64;
            queue.head = (queue.head + 1) % queue.entries;
            let (head, completion_queue) = (queue.head, queue.completion_queue);
            let command: [u32; 16] =
                std::array::from_fn(|i| read_phys::<u32>(entry_at + 4 * i as u64));
            let cid = (command[0] >> 16) as u16;
            let outcome = if id == 0 {
                Some(self.run_admin(&command))
            } else {
                self.run_io(&command)
            };
            if let Some((status, result)) = outcome {
                self.post(completion_queue, id, head, cid, status, result);
                if id != 0 && self.post_stray_cids {
                    self.post(completion_queue, id, head, cid.wrapping_add(1000), 0, 0);
                }
            }
        }
    }

    fn post(
        &mut self,
        queue_id: u16,
        sq_id: u16,
        sq_head: u16,
        cid: u16,
        status: u16,
        result: u32,
    ) {
        let Some(queue) = self.completion_queues.get_mut(&queue_id) else {
            return;
        };
        let at = queue.base + u64::from(queue.tail) * 16;
        write_phys(at, &result.to_le_bytes());
        write_phys(at + 4, &0u32.to_le_bytes());
        write_phys(
            at + 8,
            &(u32::from(sq_head) | (u32::from(sq_id) << 16)).to_le_bytes(),
        );
        let last = u32::from(cid) | (u32::from(queue.phase) << 16) | (u32::from(status) << 17);
        write_phys(at + 12, &last.to_le_bytes());
        queue.tail += 1;
        if queue.tail == queue.entries {
            queue.tail = 0;
            queue.phase = !queue.phase;
        }
    }

    fn run_admin(&mut self, command: &[u32; 16]) -> (u16, u32) {
        let data = u64::from(command[6]) | (u64::from(command[7]) << 32);
        let queue_id = command[10] as u16;
        let entries = (command[10] >> 16) as u16 + 1;
        match command[0] as u8 {
            admin::IDENTIFY => match self.identify(command[10] & 0xff, command[1]) {
                Some(page) => {
                    write_phys(data, &page);
                    (0, 0)
                }
                None => (INVALID_NAMESPACE, 0),
            },
            admin::SET_FEATURES if command[10] == 7 => {
                let granted = u32::from(self.max_queues - 1);
                (0, granted | (granted << 16))
            }
            admin::CREATE_IO_CQ => {
                if queue_id == 0
                    || queue_id > self.max_queues
                    || self.completion_queues.contains_key(&queue_id)
                {
                    return (INVALID_QUEUE, 0);
                }
                self.completion_queues.insert(
                    queue_id,
                    CompletionQueue {
                        base: data,
                        entries,
                        tail: 0,
                        phase: true,
                    },
                );
                (0, 0)
            }
            admin::CREATE_IO_SQ => {
                let completion_queue = (command[11] >> 16) as u16;
                if queue_id == 0
                    || !self.completion_queues.contains_key(&completion_queue)
                    || self.submission_queues.contains_key(&queue_id)
                {
                    return (INVALID_QUEUE, 0);
                }
                self.submission_queues.insert(
                    queue_id,
                    Submission {
                        base: data,
                        entries,
                        head: 0,
                        completion_queue,
                    },
                );
                (0, 0)
            }
            _ => (INVALID_OPCODE, 0),
        }
    }

    fn identify(&self, cns: u32, nsid: u32) -> Option<[u8; 4096]> {
        let mut page = [0u8; 4096];
        match cns {
            0 => {
                let namespace = self.namespaces.iter().find(|n| n.id == nsid)?;
                let blocks = (namespace.data.len() >> namespace.block_shift) as u64;
                page[0..8].copy_from_slice(&blocks.to_le_bytes());
                page[8..16].copy_from_slice(&blocks.to_le_bytes());
                page[128..130].copy_from_slice(&namespace.metadata.to_le_bytes());
                page[130] = namespace.block_shift;
            }
            1 => {
                page[4..24].copy_from_slice(b"SIM0001             ");
                page[24..64].copy_from_slice(b"stordom simulated nvme                  ");
                page[77] = self.mdts;
                page[516..520].copy_from_slice(&(self.namespaces.len() as u32).to_le_bytes());
                page[520..522].copy_from_slice(&self.optional_commands.to_le_bytes());
                page[525] = u8::from(self.volatile_write_cache);
                page[536..540].copy_from_slice(&self.sgl_support.to_le_bytes());
            }
            2 => {
                for (i, namespace) in self.namespaces.iter().enumerate() {
                    page[i * 4..i * 4 + 4].copy_from_slice(&namespace.id.to_le_bytes());
                }
            }
            _ => return None,
        }
        Some(page)
    }

    /// Executes an I/O command; `None` when it is swallowed.
    fn run_io(&mut self, command: &[u32; 16]) -> Option<(u16, u32)> {
        self.io_commands += 1;
        if self.drop_io {
            return None;
        }
        if let Some(status) = self.fail_next_io.take() {
            return Some((status, 0));
        }
        let status = self.execute_io(command).err().unwrap_or(0);
        Some((status, 0))
    }

    fn execute_io(&mut self, command: &[u32; 16]) -> Result<(), u16> {
        let opcode = command[0] as u8;
        let prp1 = u64::from(command[6]) | (u64::from(command[7]) << 32);
        let prp2 = u64::from(command[8]) | (u64::from(command[9]) << 32);
        let lba = u64::from(command[10]) | (u64::from(command[11]) << 32);
        let blocks = u64::from(command[12] & 0xffff) + 1;
        let namespace = self
            .namespaces
            .iter_mut()
            .find(|n| n.id == command[1])
            .ok_or(INVALID_NAMESPACE)?;
        let shift = namespace.block_shift;
        let range = |lba: u64, blocks: u64, len: usize| -> Result<std::ops::Range<usize>, u16> {
            let start = (lba << shift) as usize;
            let end = start + ((blocks << shift) as usize);
            if end > len {
                Err(LBA_OUT_OF_RANGE)
            } else {
                Ok(start..end)
            }
        };
        match opcode {
            io::READ | io::WRITE => {
                let bytes = range(lba, blocks, namespace.data.len())?;
                let chunks = match (command[0] >> 14) & 0b11 {
                    0b00 => prp_chunks(prp1, prp2, bytes.len() as u64)?,
                    0b01 if self.sgl_support & 0b11 != 0 => {
                        self.sgl_commands += 1;
                        sgl_chunks(command, bytes.len() as u64)?
                    }
                    _ => return Err(INVALID_FIELD),
                };
                let mut at = bytes.start;
                for (phys, len) in chunks {
                    let disk = &mut namespace.data[at..at + len];
                    if opcode == io::READ {
                        write_phys(phys, disk);
                    } else {
                        // SAFETY: the driver only hands the device memory from the test Hal.
                        unsafe {
                            std::ptr::copy_nonoverlapping(virt_of(phys), disk.as_mut_ptr(), len)
                        };
                    }
                    at += len;
                }
            }
            io::FLUSH => self.flushes += 1,
            io::WRITE_ZEROES => {
                let bytes = range(lba, blocks, namespace.data.len())?;
                namespace.data[bytes].fill(0);
            }
            io::DATASET_MANAGEMENT => {
                if command[11] & (1 << 2) == 0 {
                    return Err(INVALID_FIELD);
                }
                for index in 0..=u64::from(command[10] & 0xff) {
                    let entry = prp1 + index * 16;
                    let bytes = range(
                        read_phys::<u64>(entry + 8),
                        u64::from(read_phys::<u32>(entry + 4)),
                        namespace.data.len(),
                    )?;
                    namespace.data[bytes].fill(0);
                }
            }
            _ => return Err(INVALID_OPCODE),
        }
        Ok(())
    }
}

/// The (address, length) runs the SGL of `command` describes: one Data
/// Block descriptor, or a Last Segment descriptor naming a list of them;
/// their lengths must add up to the transfer.
fn sgl_chunks(command: &[u32; 16], bytes: u64) -> Result<Vec<(u64, usize)>, u16> {
    const SGL_LENGTH_INVALID: u16 = 0x0f;
    const SGL_TYPE_INVALID: u16 = 0x11;
    let descriptor = |d: [u32; 4]| {
        (
            u64::from(d[0]) | (u64::from(d[1]) << 32),
            d[2],
            (d[3] >> 24) as u8,
        )
    };
    let (address, length, kind) = descriptor([command[6], command[7], command[8], command[9]]);
    let chunks: Vec<(u64, usize)> = match kind {
        DATA_BLOCK => vec![(address, length as usize)],
        LAST_SEGMENT if length % 16 == 0 => (0..u64::from(length / 16))
            .map(|i| {
                let at = address + 16 * i;
                let d = [0, 4, 8, 12].map(|k| read_phys::<u32>(at + k));
                match descriptor(d) {
                    (phys, len, DATA_BLOCK) => Ok((phys, len as usize)),
                    _ => Err(SGL_TYPE_INVALID),
                }
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(SGL_TYPE_INVALID),
    };
    if chunks.iter().map(|c| c.1 as u64).sum::<u64>() != bytes {
        return Err(SGL_LENGTH_INVALID);
    }
    Ok(chunks)
}

/// The (address, length) runs a PRP pair describes, walked as a controller
/// does; an entry after the first that is not page aligned is an error.
pub(crate) fn prp_chunks(prp1: u64, prp2: u64, mut bytes: u64) -> Result<Vec<(u64, usize)>, u16> {
    const PRP_OFFSET_INVALID: u16 = 0x13;
    let first = bytes.min(PAGE - prp1 % PAGE);
    let mut chunks = vec![(prp1, first as usize)];
    bytes -= first;
    let mut page = |entry: u64, bytes: &mut u64| -> Result<(), u16> {
        if !entry.is_multiple_of(PAGE) {
            return Err(PRP_OFFSET_INVALID);
        }
        let len = (*bytes).min(PAGE);
        chunks.push((entry, len as usize));
        *bytes -= len;
        Ok(())
    };
    if bytes > 0 && bytes <= PAGE {
        page(prp2, &mut bytes)?;
    } else if bytes > PAGE {
        let mut at = prp2;
        while bytes > 0 {
            let entry = read_phys::<u64>(at);
            if at % PAGE == PAGE - 8 && bytes > PAGE {
                // A chain pointer names the start of the next list page.
                if !entry.is_multiple_of(PAGE) {
                    return Err(PRP_OFFSET_INVALID);
                }
                at = entry;
                continue;
            }
            page(entry, &mut bytes)?;
            at += 8;
        }
    }
    Ok(chunks)
}

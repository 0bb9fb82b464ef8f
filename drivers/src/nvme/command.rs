//! Submission and completion queue entries, opcodes and status decoding.

use crate::hal::PhysAddr;
use crate::nvme::prp::Prps;
use crate::nvme::sgl::Descriptor;
use blockdev::IoError;

/// Bytes in a submission queue entry.
pub(crate) const SQE_SIZE: usize = 64;
/// Bytes in a completion queue entry.
pub(crate) const CQE_SIZE: usize = 16;

/// Admin command opcodes.
pub(crate) mod admin {
    pub const CREATE_IO_SQ: u8 = 0x01;
    pub const CREATE_IO_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const SET_FEATURES: u8 = 0x09;
}

/// NVM command set opcodes.
pub(crate) mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Identify CNS values.
pub(crate) mod cns {
    pub const NAMESPACE: u32 = 0x00;
    pub const CONTROLLER: u32 = 0x01;
    pub const ACTIVE_NAMESPACES: u32 = 0x02;
}

/// Set Features feature id for the number of I/O queues.
pub(crate) const FEATURE_NUMBER_OF_QUEUES: u32 = 0x07;

/// Dataset Management attribute: deallocate the ranges.
pub(crate) const DSM_DEALLOCATE: u32 = 1 << 2;

/// A submission queue entry as 16 dwords.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Command(pub [u32; 16]);

impl Command {
    pub(crate) fn new(opcode: u8, nsid: u32) -> Self {
        let mut dwords = [0; 16];
        dwords[0] = u32::from(opcode);
        dwords[1] = nsid;
        Self(dwords)
    }

    pub(crate) fn opcode(&self) -> u8 {
        self.0[0] as u8
    }

    pub(crate) fn with_cid(mut self, cid: u16) -> Self {
        self.0[0] = (self.0[0] & 0xffff) | (u32::from(cid) << 16);
        self
    }

    pub(crate) fn with_prps(mut self, prps: Prps) -> Self {
        self.0[6] = prps.prp1 as u32;
        self.0[7] = (prps.prp1 >> 32) as u32;
        self.0[8] = prps.prp2 as u32;
        self.0[9] = (prps.prp2 >> 32) as u32;
        self
    }

    /// Names the data with a scatter-gather list (PSDT 01b: SGL for the
    /// data, none for metadata) whose first descriptor is `sgl1`.
    pub(crate) fn with_sgl(mut self, sgl1: Descriptor) -> Self {
        self.0[0] = (self.0[0] & !(0b11 << 14)) | (0b01 << 14);
        self.0[6..10].copy_from_slice(&sgl1.dwords());
        self
    }

    pub(crate) fn with_data(self, phys: PhysAddr) -> Self {
        self.with_prps(Prps {
            prp1: phys,
            prp2: 0,
        })
    }

    /// Sets command dword `index` (10 to 15).
    pub(crate) fn with_cdw(mut self, index: usize, value: u32) -> Self {
        self.0[index] = value;
        self
    }

    /// Sets the starting LBA (dwords 10 and 11).
    pub(crate) fn with_lba(self, lba: u64) -> Self {
        self.with_cdw(10, lba as u32)
            .with_cdw(11, (lba >> 32) as u32)
    }
}

/// What a completion queue entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub result: u32,
    pub cid: u16,
    /// Status field without the phase bit: SC in bits 0-7, SCT in 8-10.
    pub status: u16,
}

impl Entry {
    pub(crate) fn is_success(&self) -> bool {
        self.status & 0x7ff == 0
    }

    /// The block-layer view of the status.
    pub(crate) fn io_result(&self) -> Result<(), IoError> {
        let code = self.status & 0xff;
        let code_type = (self.status >> 8) & 0x7;
        match (code_type, code) {
            (_, _) if self.is_success() => Ok(()),
            (0, 0x01) => Err(IoError::Unsupported),
            (0, 0x02) | (0, 0x0b) | (0, 0x0f) => Err(IoError::InvalidRequest),
            (0, 0x07) | (0, 0x08) => Err(IoError::Aborted),
            (0, 0x80) => Err(IoError::OutOfRange),
            (2, 0x80..=0x87) => Err(IoError::Media),
            _ => Err(IoError::Device {
                code: u32::from(self.status & 0x7ff),
            }),
        }
    }
}

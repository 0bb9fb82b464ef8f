//! Scatter-gather lists: how an NVMe command names data that PRPs cannot,
//! such as a blkif request's sub-page segments (a 1 KiB-block file system
//! writes 1 KiB pieces of different pages), where a segment after the
//! first starts inside a page or one before the last ends inside one.
//!
//! The command's first descriptor is a Last Segment descriptor pointing
//! at a list of Data Block descriptors, one per segment, in the command
//! slot's list pages.

use crate::hal::PhysAddr;
use crate::region::Region;
use blockdev::{Segment, SubmitError};

/// Bytes in a descriptor.
const DESCRIPTOR_BYTES: usize = 16;
/// Descriptor type (bits 7:4 of byte 15) and subtype (bits 3:0).
pub(crate) const DATA_BLOCK: u8 = 0x00;
pub(crate) const LAST_SEGMENT: u8 = 0x30;

/// Whether the controller takes SGLs for NVM commands (Identify
/// Controller SGLS, bits 1:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SglSupport {
    /// PRPs only.
    Unsupported,
    /// Data blocks of any address and length.
    Unaligned,
    /// Data blocks whose address and length are multiples of 4.
    DwordAligned,
}

impl SglSupport {
    pub(crate) fn from_sgls(sgls: u32) -> Self {
        match sgls & 0b11 {
            0b01 => Self::Unaligned,
            0b10 => Self::DwordAligned,
            _ => Self::Unsupported,
        }
    }
}

/// A descriptor as the command's SGL1 field (dwords 6 to 9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub address: PhysAddr,
    pub length: u32,
    pub kind: u8,
}

impl Descriptor {
    pub(crate) fn dwords(&self) -> [u32; 4] {
        [
            self.address as u32,
            (self.address >> 32) as u32,
            self.length,
            u32::from(self.kind) << 24,
        ]
    }
}

/// Writes one Data Block descriptor per segment into `list` (physically
/// at `list_phys`) and returns the Last Segment descriptor naming them.
pub(crate) fn build(
    segments: &[Segment],
    support: SglSupport,
    list: &Region,
    list_phys: PhysAddr,
) -> Result<Descriptor, SubmitError> {
    if segments.is_empty() {
        return Err(SubmitError::BadLength);
    }
    let bytes = segments.len() * DESCRIPTOR_BYTES;
    if bytes > list.len() {
        return Err(SubmitError::TooLarge);
    }
    match support {
        SglSupport::Unsupported => return Err(SubmitError::Misaligned),
        SglSupport::DwordAligned if segments.iter().any(|s| s.phys % 4 != 0 || s.len % 4 != 0) => {
            return Err(SubmitError::Misaligned);
        }
        _ => {}
    }
    for (index, segment) in segments.iter().enumerate() {
        let at = index * DESCRIPTOR_BYTES;
        let data = Descriptor {
            address: segment.phys,
            length: segment.len,
            kind: DATA_BLOCK,
        };
        for (k, dword) in data.dwords().into_iter().enumerate() {
            list.write32(at + 4 * k, dword);
        }
    }
    Ok(Descriptor {
        address: list_phys,
        length: bytes as u32,
        kind: LAST_SEGMENT,
    })
}

//! Partition tables written into disk images, for host tests (this
//! crate's, and other crates' with the `images` feature).

use super::gpt_field::*;
use super::{GPT_HEADER_MIN, MBR_RECORDS, crc32};
use crate::le_field::{le_u32_at, le_u64_at};

/// The Linux file system data type GUID, as GPT stores it.
pub const LINUX_DATA: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];
/// Entries in the GPTs [`write_gpt`] writes (of 128 bytes each).
pub const GPT_ENTRIES: usize = 128;

/// Writes an MBR-format block (the MBR or an EBR) in block `lba`: the
/// records `(type, start, blocks)` in slots from 0 (boot indicator 0),
/// the other slots untouched, and the 0x55AA signature.
pub fn write_mbr(image: &mut [u8], block_size: usize, lba: u64, records: &[(u8, u32, u32)]) {
    let block = &mut image[lba as usize * block_size..][..block_size];
    for (slot, &(kind, start, blocks)) in records.iter().enumerate() {
        let raw = &mut block[MBR_RECORDS + 16 * slot..][..16];
        raw.fill(0);
        raw[4] = kind;
        raw[8..12].copy_from_slice(&start.to_le_bytes());
        raw[12..16].copy_from_slice(&blocks.to_le_bytes());
    }
    block[510..512].copy_from_slice(&[0x55, 0xaa]);
}

/// The blocks each copy of [`write_gpt`]'s entry array takes.
pub fn gpt_array_blocks(block_size: usize) -> u64 {
    (GPT_ENTRIES * 128).div_ceil(block_size) as u64
}

/// Writes a protective MBR and a GPT, primary (header in block 1, array
/// from block 2) and backup (array, then header in the last block), whose
/// entries 0, 1, ... are `partitions` as `(first, last)` blocks, the rest
/// unused; an entry `(0, 0)` is left unused too.
pub fn write_gpt(image: &mut [u8], block_size: usize, partitions: &[(u64, u64)]) {
    let blocks = (image.len() / block_size) as u64;
    let array_blocks = gpt_array_blocks(block_size);
    let pmbr_blocks = u32::try_from(blocks - 1).unwrap_or(u32::MAX);
    let unused = (0, 0, 0);
    let protective = [(0xee, 1, pmbr_blocks), unused, unused, unused];
    write_mbr(image, block_size, 0, &protective);
    let copies = [
        (1, blocks - 1, 2),
        (blocks - 1, 1, blocks - 1 - array_blocks),
    ];
    for (header, alternate, array) in copies {
        let entries = &mut image[array as usize * block_size..][..GPT_ENTRIES * 128];
        entries.fill(0);
        for (i, &(first, last)) in partitions.iter().enumerate() {
            if (first, last) == (0, 0) {
                continue;
            }
            let entry = &mut entries[i * 128..][..128];
            entry[..16].copy_from_slice(&LINUX_DATA);
            entry[16] = i as u8 + 1;
            entry[32..40].copy_from_slice(&first.to_le_bytes());
            entry[40..48].copy_from_slice(&last.to_le_bytes());
        }
        let at = header as usize * block_size;
        image[at..at + block_size].fill(0);
        image[at..at + 8].copy_from_slice(b"EFI PART");
        let fields = [
            (REVISION, 4, 0x0001_0000),
            (HEADER_SIZE, 4, GPT_HEADER_MIN as u64),
            (MY_LBA, 8, header),
            (ALTERNATE_LBA, 8, alternate),
            (FIRST_USABLE, 8, 2 + array_blocks),
            (LAST_USABLE, 8, blocks - 2 - array_blocks),
            (ARRAY_LBA, 8, array),
            (ENTRY_COUNT, 4, GPT_ENTRIES as u64),
            (ENTRY_SIZE, 4, 128),
        ];
        for (field, len, value) in fields {
            set_field(image, block_size, header, field, len, value);
        }
        // A disk GUID that is not zero.
        image[at + 56] = 0x5d;
        seal_gpt(image, block_size, header);
    }
}

/// Sets a GPT header field of the header in block `lba` to `value`
/// (little-endian, `len` 4 or 8 bytes) without sealing.
pub fn set_field(
    image: &mut [u8],
    block_size: usize,
    lba: u64,
    field: usize,
    len: usize,
    value: u64,
) {
    let at = lba as usize * block_size + field;
    image[at..at + len].copy_from_slice(&value.to_le_bytes()[..len]);
}

/// Recomputes the CRC32s of the GPT header in block `lba` (its array's,
/// when the array lies in the image, then the header's) from its fields,
/// so that a test's changes pass the CRC checks.
pub fn seal_gpt(image: &mut [u8], block_size: usize, lba: u64) {
    let at = lba as usize * block_size;
    let header = &image[at..at + block_size];
    let array = le_u64_at(header, ARRAY_LBA)
        .checked_mul(block_size as u64)
        .and_then(|start| usize::try_from(start).ok());
    let bytes = le_u32_at(header, ENTRY_COUNT) as usize * le_u32_at(header, ENTRY_SIZE) as usize;
    let size = (le_u32_at(header, HEADER_SIZE) as usize).min(block_size);
    if let Some(entries) = array.and_then(|start| image.get(start..start.checked_add(bytes)?)) {
        let crc = crc32(entries);
        set_field(image, block_size, lba, ARRAY_CRC, 4, crc.into());
    }
    set_field(image, block_size, lba, HEADER_CRC, 4, 0);
    let crc = crc32(&image[at..at + size]);
    set_field(image, block_size, lba, HEADER_CRC, 4, crc.into());
}

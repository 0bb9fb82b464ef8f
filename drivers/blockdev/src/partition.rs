//! Partition tables, MBR and GPT as UEFI 2.10 (chapter 5) specifies them,
//! read from a disk through a caller's block reader.
//!
//! What is read is hostile (a guest may have written the disk): no input
//! panics, every loop is bounded, and an entry is usable only when it has
//! blocks, lies inside the disk, covers none of the blocks the table was
//! read from and overlaps no other usable entry. Unusable entries are
//! kept, with the reason, so that asking for one says why.
//!
//! - **MBR** (block 0 ending in 0x55AA, every boot indicator 0 or 0x80;
//!   otherwise, as for a file system's boot sector, there is no table):
//!   the four primary entries are partitions 1-4 by slot, an entry of
//!   type 0 being unused. An extended partition (type 0x05, 0x0F or 0x85)
//!   is a container, not served itself: its chain of extended boot
//!   records gives the logical partitions 5, 6, ... in chain order, as
//!   Linux numbers them. Each EBR's first entry is its logical partition
//!   (from the EBR's block), its second the link to the next EBR (from the
//!   container's first block); the other two are ignored, and at most
//!   [`MAX_EBRS`] EBRs are followed. A broken chain makes the whole table
//!   unusable.
//! - **GPT**, when an MBR entry has type 0xEE (protective or hybrid MBR):
//!   the header in block 1 must have the signature, a header size from 92
//!   to the block size, the header CRC32, its own block as MyLBA, a usable
//!   range inside the disk that leaves out blocks 0 and the header's own,
//!   an entry size of 128 x 2^n up to [`MAX_GPT_ENTRY_SIZE`], an entry
//!   array of at most [`MAX_GPT_ARRAY_BYTES`] inside the disk and outside
//!   the usable range, and the array's CRC32. When any of this fails, the
//!   backup header in the disk's last block is checked the same way and
//!   used instead. Entry i (from 0) is partition i + 1, an entry with a
//!   zero type GUID being unused; a partition must lie in the usable range.
//!
//! Block numbers are the disk's logical blocks, as both formats count;
//! logical block sizes from 512 bytes to [`MAX_READ_BYTES`] work.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::Geometry;
use crate::le_field::{le_u32_at, le_u64_at};

#[cfg(any(test, feature = "images"))]
pub mod images;
#[cfg(test)]
mod tests;

/// Most extended boot records followed on one disk (a longer chain is
/// taken for a loop).
pub const MAX_EBRS: u32 = 128;
/// Largest GPT entry accepted (UEFI allows any 128 x 2^n; Linux only 128).
pub const MAX_GPT_ENTRY_SIZE: u32 = 4096;
/// Largest GPT entry array accepted (8192 entries of 128 bytes; the usual
/// array is 16 KiB).
pub const MAX_GPT_ARRAY_BYTES: u64 = 1 << 20;
/// Most bytes asked of the reader at once, and the largest block size.
pub const MAX_READ_BYTES: usize = 16 << 10;

/// MBR partition types that are containers of logical partitions.
const EXTENDED_TYPES: [u8; 3] = [0x05, 0x0f, 0x85];
/// The MBR type of a GPT's protective (or hybrid) entry.
const GPT_PROTECTIVE_TYPE: u8 = 0xee;
/// Where the four MBR (or EBR) records start in their block.
const MBR_RECORDS: usize = 446;
/// The smallest GPT header (UEFI 2.10 table 5.5).
const GPT_HEADER_MIN: usize = 92;

/// Byte offsets of the GPT header's fields (UEFI 2.10 table 5.5).
pub mod gpt_field {
    /// Revision (u32).
    pub const REVISION: usize = 8;
    /// HeaderSize (u32).
    pub const HEADER_SIZE: usize = 12;
    /// HeaderCRC32 (u32).
    pub const HEADER_CRC: usize = 16;
    /// MyLBA (u64).
    pub const MY_LBA: usize = 24;
    /// AlternateLBA (u64).
    pub const ALTERNATE_LBA: usize = 32;
    /// FirstUsableLBA (u64).
    pub const FIRST_USABLE: usize = 40;
    /// LastUsableLBA (u64).
    pub const LAST_USABLE: usize = 48;
    /// PartitionEntryLBA (u64).
    pub const ARRAY_LBA: usize = 72;
    /// NumberOfPartitionEntries (u32).
    pub const ENTRY_COUNT: usize = 80;
    /// SizeOfPartitionEntry (u32).
    pub const ENTRY_SIZE: usize = 84;
    /// PartitionEntryArrayCRC32 (u32).
    pub const ARRAY_CRC: usize = 88;
}

/// Which table a disk carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// No partition table: the disk has no partitions.
    None,
    /// An MBR, with its extended partitions' chains.
    Mbr,
    /// A GPT, from its primary header.
    Gpt,
    /// A GPT from its backup header; why the primary was refused.
    GptBackup(GptError),
}

/// Blocks of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First block.
    pub start: u64,
    /// How many blocks (never 0).
    pub blocks: u64,
}

impl Extent {
    fn end(&self) -> u64 {
        self.start + self.blocks
    }
}

/// One numbered entry of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionEntry {
    /// The partition's number, from 1, as Linux numbers it.
    pub number: u32,
    /// Its blocks, or why it is not usable.
    pub extent: Result<Extent, EntryError>,
}

/// Why an entry of a table is not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryError {
    /// It has no blocks (size 0, or a GPT entry ending before it starts).
    Empty,
    /// It extends past the disk's last block.
    OutsideDisk,
    /// A GPT entry outside the header's usable range.
    OutsideUsable,
    /// A logical partition outside its extended partition.
    OutsideExtended,
    /// It covers a block the table was read from.
    CoversTable,
    /// It overlaps another entry, this one (one of them, if several).
    Overlaps {
        /// The other entry's number.
        other: u32,
    },
    /// An extended partition: a container, served through its logical
    /// partitions.
    Extended,
}

/// Why a GPT header (with its entry array) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GptError {
    /// Its block is not on the disk (too small a disk).
    NoBlock,
    /// Reading this block failed.
    Unreadable {
        /// The block.
        lba: u64,
    },
    /// No `EFI PART` signature.
    Signature,
    /// Header size below 92 or above the block size.
    HeaderSize,
    /// The header's CRC32 does not match.
    HeaderCrc,
    /// MyLBA is not the block the header was read from.
    Misplaced,
    /// The usable range is reversed, leaves the disk, or covers block 0
    /// or the header.
    UsableRange,
    /// The entry size is not 128 x 2^n up to [`MAX_GPT_ENTRY_SIZE`].
    EntrySize,
    /// The entry array is over [`MAX_GPT_ARRAY_BYTES`].
    ArrayTooLarge,
    /// The entry array leaves the disk or covers block 0, the header or
    /// the usable range.
    ArrayPlace,
    /// The entry array's CRC32 does not match.
    ArrayCrc,
}

/// Why a link of an MBR's chain of extended boot records was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EbrError {
    /// No 0x55AA signature.
    Signature,
    /// It links to a block outside its extended partition.
    LinkOutside,
    /// More than [`MAX_EBRS`] EBRs (a loop, most likely).
    TooMany,
}

/// Why a disk's partitions cannot be known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// The logical block size is not a power of two from 512 to
    /// [`MAX_READ_BYTES`].
    BlockSize(u32),
    /// Reading block `lba` failed.
    Read {
        /// The block.
        lba: u64,
    },
    /// A GPT whose primary and backup headers are both refused.
    Gpt {
        /// Why the primary was.
        primary: GptError,
        /// Why the backup was.
        backup: GptError,
    },
    /// The chain of extended boot records is broken at block `lba`.
    Ebr {
        /// The EBR's block.
        lba: u64,
        /// What is wrong.
        why: EbrError,
    },
}

/// A disk's partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionTable {
    /// The kind of table.
    pub scheme: Scheme,
    /// The disk's logical block size, in bytes.
    pub block_size: u32,
    /// Every entry in use, usable or not, by number.
    pub entries: Vec<PartitionEntry>,
}

impl PartitionTable {
    /// Entry `number`, if the table has it.
    pub fn entry(&self, number: u32) -> Option<&PartitionEntry> {
        self.entries.iter().find(|e| e.number == number)
    }
}

/// Reads the partition table of a disk of `geometry`. `read(lba, buf)`
/// fills `buf` from block `lba` and says whether it could; `buf` is whole
/// blocks on the disk, at most [`MAX_READ_BYTES`] and the geometry's
/// `max_transfer_bytes` (but at least one block).
pub fn read_partition_table(
    geometry: &Geometry,
    read: impl FnMut(u64, &mut [u8]) -> bool,
) -> Result<PartitionTable, TableError> {
    let block_size = geometry.logical_block_size;
    let size = block_size as usize;
    if !block_size.is_power_of_two() || !(512..=MAX_READ_BYTES).contains(&size) {
        return Err(TableError::BlockSize(block_size));
    }
    let bytes = MAX_READ_BYTES.min(geometry.max_transfer_bytes as usize);
    let mut reader = Reader {
        read,
        block_size: size,
        blocks: geometry.blocks,
        chunk_blocks: (bytes / size).max(1) as u64,
        buffer: Vec::new(),
    };
    let mut table = PartitionTable {
        scheme: Scheme::None,
        block_size,
        entries: Vec::new(),
    };
    if geometry.blocks == 0 {
        return Ok(table);
    }
    let Some(primaries) = mbr_records(reader.blocks(0, 1)?, true) else {
        return Ok(table);
    };
    if primaries.iter().any(|r| r.kind == GPT_PROTECTIVE_TYPE) {
        let last = geometry.blocks - 1;
        (table.scheme, table.entries) = match read_gpt(&mut reader, 1) {
            Ok(entries) => (Scheme::Gpt, entries),
            Err(primary) => match read_gpt(&mut reader, last) {
                Ok(entries) => (Scheme::GptBackup(primary), entries),
                Err(backup) => return Err(TableError::Gpt { primary, backup }),
            },
        };
    } else {
        table.scheme = Scheme::Mbr;
        table.entries = read_mbr(&mut reader, &primaries)?;
    }
    refuse_overlaps(&mut table.entries);
    Ok(table)
}

/// The caller's reader, with its one buffer.
struct Reader<F> {
    read: F,
    block_size: usize,
    blocks: u64,
    /// Blocks read at once at most.
    chunk_blocks: u64,
    buffer: Vec<u8>,
}

impl<F: FnMut(u64, &mut [u8]) -> bool> Reader<F> {
    /// `count` blocks (at most `chunk_blocks`) from `lba`, which the
    /// caller checked are on the disk.
    fn blocks(&mut self, lba: u64, count: u64) -> Result<&[u8], TableError> {
        let len = count.min(self.chunk_blocks) as usize * self.block_size;
        if self.buffer.len() < len {
            self.buffer = vec![0; len];
        }
        let buffer = &mut self.buffer[..len];
        if (self.read)(lba, buffer) {
            Ok(buffer)
        } else {
            Err(TableError::Read { lba })
        }
    }
}

/// One 16-byte record of an MBR or EBR.
#[derive(Clone, Copy, Debug)]
struct MbrRecord {
    kind: u8,
    /// First block, relative to the record's origin.
    start: u64,
    blocks: u64,
}

impl MbrRecord {
    /// The record's blocks, its start counted from `origin`.
    fn extent(&self, origin: u64, disk_blocks: u64) -> Result<Extent, EntryError> {
        if self.blocks == 0 {
            return Err(EntryError::Empty);
        }
        let start = origin + self.start;
        match start.checked_add(self.blocks) {
            Some(end) if end <= disk_blocks => Ok(Extent {
                start,
                blocks: self.blocks,
            }),
            _ => Err(EntryError::OutsideDisk),
        }
    }

    fn is_extended(&self) -> bool {
        EXTENDED_TYPES.contains(&self.kind)
    }
}

/// The four records of an MBR or EBR block, or `None` without the
/// signature or, when `check_boot` (block 0), with a boot indicator other
/// than 0 or 0x80 (a file system's boot sector, as Linux decides).
fn mbr_records(block: &[u8], check_boot: bool) -> Option<[MbrRecord; 4]> {
    if block[510..512] != [0x55, 0xaa] {
        return None;
    }
    let mut records = [MbrRecord {
        kind: 0,
        start: 0,
        blocks: 0,
    }; 4];
    for (slot, record) in records.iter_mut().enumerate() {
        let raw = &block[MBR_RECORDS + 16 * slot..][..16];
        if check_boot && raw[0] != 0 && raw[0] != 0x80 {
            return None;
        }
        *record = MbrRecord {
            kind: raw[4],
            start: u64::from(le_u32_at(raw, 8)),
            blocks: u64::from(le_u32_at(raw, 12)),
        };
    }
    Some(records)
}

/// The MBR's entries: primaries, then each extended partition's logical
/// partitions.
fn read_mbr<F: FnMut(u64, &mut [u8]) -> bool>(
    reader: &mut Reader<F>,
    primaries: &[MbrRecord; 4],
) -> Result<Vec<PartitionEntry>, TableError> {
    let disk = reader.blocks;
    let mut entries = Vec::new();
    let mut containers = Vec::new();
    for (number, record) in (1..).zip(primaries) {
        if record.kind == 0 {
            continue;
        }
        let mut extent = record.extent(0, disk);
        if record.is_extended() {
            match extent {
                Ok(e) if e.start == 0 => extent = Err(EntryError::CoversTable),
                Ok(e) => {
                    containers.push(e);
                    extent = Err(EntryError::Extended);
                }
                Err(_) => {}
            }
        }
        entries.push(PartitionEntry { number, extent });
    }
    // Block 0 and every EBR: no partition may cover them.
    let mut table_blocks = vec![0];
    let mut number = 5;
    for container in containers {
        let mut ebr = container.start;
        loop {
            if table_blocks.len() > MAX_EBRS as usize {
                let why = EbrError::TooMany;
                return Err(TableError::Ebr { lba: ebr, why });
            }
            let Some([data, link, ..]) = mbr_records(reader.blocks(ebr, 1)?, false) else {
                let why = EbrError::Signature;
                return Err(TableError::Ebr { lba: ebr, why });
            };
            table_blocks.push(ebr);
            if data.kind != 0 && !data.is_extended() {
                let extent = data.extent(ebr, disk).and_then(|e| {
                    if e.end() <= container.end() {
                        Ok(e)
                    } else {
                        Err(EntryError::OutsideExtended)
                    }
                });
                entries.push(PartitionEntry { number, extent });
                number += 1;
            }
            if !link.is_extended() {
                break;
            }
            let next = container.start + link.start;
            if next >= container.end() {
                let why = EbrError::LinkOutside;
                return Err(TableError::Ebr { lba: ebr, why });
            }
            ebr = next;
        }
    }
    for entry in &mut entries {
        if let Ok(e) = entry.extent
            && table_blocks.iter().any(|&b| e.start <= b && b < e.end())
        {
            entry.extent = Err(EntryError::CoversTable);
        }
    }
    Ok(entries)
}

/// A GPT header's fields.
struct GptHeader {
    my_lba: u64,
    first_usable: u64,
    last_usable: u64,
    array_lba: u64,
    entry_count: u32,
    entry_size: u32,
    array_crc: u32,
}

impl GptHeader {
    /// Parses and checks the header alone (signature, size, CRC).
    fn parse(block: &[u8]) -> Result<GptHeader, GptError> {
        if &block[..8] != b"EFI PART" {
            return Err(GptError::Signature);
        }
        let size = le_u32_at(block, gpt_field::HEADER_SIZE) as usize;
        if !(GPT_HEADER_MIN..=block.len()).contains(&size) {
            return Err(GptError::HeaderSize);
        }
        // The CRC covers the header with its own CRC field zeroed.
        let crc_at = gpt_field::HEADER_CRC;
        let crc = Crc32::new()
            .update(&block[..crc_at])
            .update(&[0; 4])
            .update(&block[crc_at + 4..size]);
        if crc.finish() != le_u32_at(block, crc_at) {
            return Err(GptError::HeaderCrc);
        }
        Ok(GptHeader {
            my_lba: le_u64_at(block, gpt_field::MY_LBA),
            first_usable: le_u64_at(block, gpt_field::FIRST_USABLE),
            last_usable: le_u64_at(block, gpt_field::LAST_USABLE),
            array_lba: le_u64_at(block, gpt_field::ARRAY_LBA),
            entry_count: le_u32_at(block, gpt_field::ENTRY_COUNT),
            entry_size: le_u32_at(block, gpt_field::ENTRY_SIZE),
            array_crc: le_u32_at(block, gpt_field::ARRAY_CRC),
        })
    }

    /// Checks the header's places against the disk and the block `at` it
    /// was read from; returns the entry array's size in bytes.
    fn check(&self, at: u64, disk_blocks: u64, block_size: u64) -> Result<u64, GptError> {
        if self.my_lba != at {
            return Err(GptError::Misplaced);
        }
        let usable = self.first_usable..=self.last_usable;
        if usable.is_empty()
            || self.first_usable == 0
            || self.last_usable >= disk_blocks
            || usable.contains(&at)
        {
            return Err(GptError::UsableRange);
        }
        let size = self.entry_size;
        if size < 128 || !size.is_power_of_two() || size > MAX_GPT_ENTRY_SIZE {
            return Err(GptError::EntrySize);
        }
        let bytes = u64::from(self.entry_count) * u64::from(size);
        if bytes > MAX_GPT_ARRAY_BYTES {
            return Err(GptError::ArrayTooLarge);
        }
        let blocks = bytes.div_ceil(block_size);
        let array = self.array_lba..self.array_lba.saturating_add(blocks);
        if blocks > 0
            && (self.array_lba == 0
                || array.end > disk_blocks
                || array.contains(&at)
                || (array.start <= self.last_usable && self.first_usable < array.end))
        {
            return Err(GptError::ArrayPlace);
        }
        Ok(bytes)
    }
}

/// The entries of the GPT whose header is in block `at`.
fn read_gpt<F: FnMut(u64, &mut [u8]) -> bool>(
    reader: &mut Reader<F>,
    at: u64,
) -> Result<Vec<PartitionEntry>, GptError> {
    let disk = reader.blocks;
    if at == 0 || at >= disk {
        return Err(GptError::NoBlock);
    }
    let unreadable = |_| GptError::Unreadable { lba: at };
    let header = GptHeader::parse(reader.blocks(at, 1).map_err(unreadable)?)?;
    let block_size = reader.block_size as u64;
    let array_bytes = header.check(at, disk, block_size)?;
    let entry_size = u64::from(header.entry_size);
    let mut crc = Crc32::new();
    let mut entries = Vec::new();
    // Entries start on 128-byte boundaries, reads end on block
    // boundaries: an entry's first 128 bytes are always in one read.
    let mut offset = 0;
    let mut index = 0u64;
    while offset < array_bytes {
        let lba = header.array_lba + offset / block_size;
        let want = (array_bytes - offset).div_ceil(block_size);
        let chunk = reader
            .blocks(lba, want)
            .map_err(|_| GptError::Unreadable { lba })?;
        let len = (array_bytes - offset).min(chunk.len() as u64);
        crc = crc.update(&chunk[..len as usize]);
        while index * entry_size < offset + len {
            let raw = &chunk[(index * entry_size - offset) as usize..][..128];
            index += 1;
            if raw[..16].iter().any(|&b| b != 0) {
                let (first, last) = (le_u64_at(raw, 32), le_u64_at(raw, 40));
                entries.push(PartitionEntry {
                    // At most 8192 entries (MAX_GPT_ARRAY_BYTES / 128).
                    number: index as u32,
                    extent: gpt_extent(&header, first, last, disk),
                });
            }
        }
        offset += len;
    }
    if crc.finish() != header.array_crc {
        return Err(GptError::ArrayCrc);
    }
    Ok(entries)
}

/// The blocks of a GPT entry from `first` to `last` (inclusive).
fn gpt_extent(header: &GptHeader, first: u64, last: u64, disk: u64) -> Result<Extent, EntryError> {
    if last < first {
        Err(EntryError::Empty)
    } else if last >= disk {
        Err(EntryError::OutsideDisk)
    } else if first < header.first_usable || last > header.last_usable {
        Err(EntryError::OutsideUsable)
    } else {
        Ok(Extent {
            start: first,
            blocks: last - first + 1,
        })
    }
}

/// Refuses every usable entry that overlaps another usable one, naming
/// one of the others.
fn refuse_overlaps(entries: &mut [PartitionEntry]) {
    let mut sorted: Vec<(usize, Extent)> = entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| Some((i, e.extent.ok()?)))
        .collect();
    sorted.sort_unstable_by_key(|&(_, e)| e.start);
    let mut refused = Vec::new();
    // The furthest end of the entries before, and whose it is.
    let mut reach: Option<(u64, usize)> = None;
    for (k, &(i, extent)) in sorted.iter().enumerate() {
        // Sorted by start: an entry overlaps one before it exactly when it
        // starts before their furthest end, and one after it exactly when
        // the next starts before its end.
        let before = reach.filter(|&(end, _)| extent.start < end).map(|r| r.1);
        let after = sorted
            .get(k + 1)
            .filter(|(_, next)| next.start < extent.end())
            .map(|n| n.0);
        if let Some(other) = before.or(after) {
            refused.push((i, entries[other].number));
        }
        if reach.is_none_or(|(end, _)| extent.end() > end) {
            reach = Some((extent.end(), i));
        }
    }
    for (i, other) in refused {
        entries[i].extent = Err(EntryError::Overlaps { other });
    }
}

/// CRC-32 as GPT uses it (IEEE 802.3, reflected, as zlib's).
#[derive(Clone, Copy)]
struct Crc32(u32);

/// The byte-at-a-time table of [`Crc32`].
const CRC32_TABLE: [u32; 256] = {
    let mut table = [0; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

impl Crc32 {
    fn new() -> Self {
        Crc32(!0)
    }

    fn update(self, bytes: &[u8]) -> Self {
        Crc32(bytes.iter().fold(self.0, |c, &b| {
            CRC32_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
        }))
    }

    fn finish(self) -> u32 {
        !self.0
    }
}

/// The CRC-32 of `bytes`.
#[cfg(any(test, feature = "images"))]
fn crc32(bytes: &[u8]) -> u32 {
    Crc32::new().update(bytes).finish()
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryError::Empty => f.write_str("has no blocks"),
            EntryError::OutsideDisk => f.write_str("extends past the end of the disk"),
            EntryError::OutsideUsable => f.write_str("lies outside the GPT's usable blocks"),
            EntryError::OutsideExtended => f.write_str("lies outside its extended partition"),
            EntryError::CoversTable => f.write_str("covers a block of the partition table"),
            EntryError::Overlaps { other } => write!(f, "overlaps partition {other}"),
            EntryError::Extended => {
                f.write_str("is an extended partition, served through its logical partitions")
            }
        }
    }
}

impl fmt::Display for GptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GptError::NoBlock => f.write_str("its block is not on the disk"),
            GptError::Unreadable { lba } => write!(f, "reading block {lba} failed"),
            GptError::Signature => f.write_str("no EFI PART signature"),
            GptError::HeaderSize => f.write_str("header size out of range"),
            GptError::HeaderCrc => f.write_str("header CRC32 mismatch"),
            GptError::Misplaced => f.write_str("MyLBA is not the header's block"),
            GptError::UsableRange => {
                f.write_str("usable blocks reversed, past the disk or over the header")
            }
            GptError::EntrySize => write!(
                f,
                "entry size not 128 x 2^n up to {MAX_GPT_ENTRY_SIZE} bytes"
            ),
            GptError::ArrayTooLarge => write!(f, "entry array over {MAX_GPT_ARRAY_BYTES} bytes"),
            GptError::ArrayPlace => {
                f.write_str("entry array past the disk or over a header or usable block")
            }
            GptError::ArrayCrc => f.write_str("entry array CRC32 mismatch"),
        }
    }
}

impl fmt::Display for EbrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EbrError::Signature => f.write_str("no 0x55AA signature"),
            EbrError::LinkOutside => f.write_str("links outside its extended partition"),
            EbrError::TooMany => write!(f, "more than {MAX_EBRS} in the chain (a loop?)"),
        }
    }
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::BlockSize(size) => write!(
                f,
                "block size {size} is not a power of two from 512 to {MAX_READ_BYTES}"
            ),
            TableError::Read { lba } => write!(f, "reading block {lba} failed"),
            TableError::Gpt { primary, backup } => {
                write!(f, "GPT header: {primary}; backup GPT header: {backup}")
            }
            TableError::Ebr { lba, why } => {
                write!(f, "MBR extended boot record at block {lba}: {why}")
            }
        }
    }
}

/// One line for the console: the scheme, then each entry as `pN
/// start+count` in 512-byte sectors (as a target's `@start+count`), or
/// `pN refused (why)`.
impl fmt::Display for PartitionTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scheme {
            Scheme::None => return f.write_str("no partition table"),
            Scheme::Mbr => f.write_str("MBR")?,
            Scheme::Gpt => f.write_str("GPT")?,
            Scheme::GptBackup(why) => write!(f, "GPT from the backup header (primary: {why})")?,
        }
        if self.entries.is_empty() {
            return f.write_str(", no partitions");
        }
        let sectors = u64::from(self.block_size / 512);
        for (i, entry) in self.entries.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { ", " })?;
            match entry.extent {
                Ok(e) => write!(
                    f,
                    "p{} {}+{}",
                    entry.number,
                    e.start.saturating_mul(sectors),
                    e.blocks.saturating_mul(sectors)
                )?,
                Err(why) => write!(f, "p{} refused ({why})", entry.number)?,
            }
        }
        Ok(())
    }
}

//! Finding partition N of a disk (`target=nvme0n1:p1`) in its GPT, or in
//! its MBR's four primary entries. The kernel reads the disk's first
//! [`TABLE_BYTES`] and hands them here; the result is a block range to
//! open as a [`super::DiskSlice`]. Disk contents are untrusted input:
//! every field is bounds-checked, nothing here can panic.

use super::target::OpenError;

/// Bytes from the start of the disk that hold any GPT with the usual
/// 128 entries of 128 bytes (LBA 0-33 of a 512-byte disk, 0-5 of a 4K
/// one): what the kernel reads before calling [`find_partition`].
pub const TABLE_BYTES: usize = 6 * 4096;

const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
const MBR_SIGNATURE: [u8; 2] = [0x55, 0xaa];
/// MBR partition type of the protective entry in front of a GPT.
const MBR_TYPE_GPT_PROTECTIVE: u8 = 0xee;

/// A partition's place, in the disk's logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub blocks: u64,
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(field.try_into().ok()?))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let field = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(field.try_into().ok()?))
}

/// Partition `number` (from 1) of a disk of `disk_blocks` blocks of
/// `block_size` bytes whose first bytes are `head`: GPT entry
/// `number - 1`, or MBR primary entry `number` when there is no GPT.
pub fn find_partition(
    head: &[u8],
    block_size: u32,
    disk_blocks: u64,
    number: u32,
) -> Result<Extent, OpenError> {
    let block = usize::try_from(block_size).map_err(|_| OpenError::BadGeometry)?;
    if block < 512 || number == 0 {
        return Err(OpenError::NotFound);
    }
    let extent = match head.get(block..block + GPT_SIGNATURE.len()) {
        Some(signature) if signature == GPT_SIGNATURE => gpt_entry(head, block, number)?,
        _ => mbr_entry(head, number)?,
    };
    let end = extent.start.checked_add(extent.blocks);
    if extent.blocks == 0 || end.is_none_or(|end| end > disk_blocks) {
        return Err(OpenError::BadSize);
    }
    Ok(extent)
}

fn gpt_entry(head: &[u8], block: usize, number: u32) -> Result<Extent, OpenError> {
    let header = head.get(block..).ok_or(OpenError::NotFound)?;
    let field = |at| le_u32(header, at).ok_or(OpenError::NotFound);
    let entries_lba = le_u64(header, 72).ok_or(OpenError::NotFound)?;
    let (entries, entry_size) = (field(80)?, field(84)?);
    if number > entries || entry_size < 128 {
        return Err(OpenError::NotFound);
    }
    let at = usize::try_from(entries_lba)
        .ok()
        .and_then(|lba| lba.checked_mul(block))
        .and_then(|base| base.checked_add((number as usize - 1).checked_mul(entry_size as usize)?))
        .ok_or(OpenError::NotFound)?;
    // The entry must lie in what the caller read.
    let entry = head.get(at..at.checked_add(128).ok_or(OpenError::NotFound)?);
    let entry = entry.ok_or(OpenError::NotFound)?;
    if entry[..16].iter().all(|b| *b == 0) {
        return Err(OpenError::NotFound);
    }
    let (first, last) = (le_u64(entry, 32), le_u64(entry, 40));
    let (Some(first), Some(last)) = (first, last) else {
        return Err(OpenError::NotFound);
    };
    let blocks = last
        .checked_sub(first)
        .and_then(|n| n.checked_add(1))
        .ok_or(OpenError::BadSize)?;
    Ok(Extent {
        start: first,
        blocks,
    })
}

fn mbr_entry(head: &[u8], number: u32) -> Result<Extent, OpenError> {
    if head.get(510..512) != Some(&MBR_SIGNATURE[..]) || number > 4 {
        return Err(OpenError::NotFound);
    }
    let at = 446 + 16 * (number as usize - 1);
    let entry = head.get(at..at + 16).ok_or(OpenError::NotFound)?;
    let kind = entry[4];
    if kind == 0 || kind == MBR_TYPE_GPT_PROTECTIVE {
        return Err(OpenError::NotFound);
    }
    let start = le_u32(entry, 8).ok_or(OpenError::NotFound)?;
    let blocks = le_u32(entry, 12).ok_or(OpenError::NotFound)?;
    Ok(Extent {
        start: u64::from(start),
        blocks: u64::from(blocks),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    fn mbr(entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut disk = vec![0u8; TABLE_BYTES];
        for (i, (kind, start, count)) in entries.iter().enumerate() {
            let at = 446 + 16 * i;
            disk[at + 4] = *kind;
            disk[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
            disk[at + 12..at + 16].copy_from_slice(&count.to_le_bytes());
        }
        disk[510..512].copy_from_slice(&MBR_SIGNATURE);
        disk
    }

    fn gpt(block: usize, partitions: &[(u64, u64)]) -> Vec<u8> {
        let mut disk = mbr(&[(MBR_TYPE_GPT_PROTECTIVE, 1, u32::MAX)]);
        disk[block..block + 8].copy_from_slice(GPT_SIGNATURE);
        disk[block + 72..block + 80].copy_from_slice(&2u64.to_le_bytes());
        disk[block + 80..block + 84].copy_from_slice(&128u32.to_le_bytes());
        disk[block + 84..block + 88].copy_from_slice(&128u32.to_le_bytes());
        for (i, (first, last)) in partitions.iter().enumerate() {
            let at = 2 * block + 128 * i;
            disk[at] = 0xaf; // any non-zero type GUID
            disk[at + 32..at + 40].copy_from_slice(&first.to_le_bytes());
            disk[at + 40..at + 48].copy_from_slice(&last.to_le_bytes());
        }
        disk
    }

    #[test]
    fn gpt_partitions_on_512_and_4k_disks() {
        for block in [512, 4096] {
            let disk = gpt(block, &[(2048, 4095), (4096, 9999)]);
            let found = |n| find_partition(&disk, block as u32, 10_000, n);
            assert_eq!(
                found(1),
                Ok(Extent {
                    start: 2048,
                    blocks: 2048
                })
            );
            assert_eq!(
                found(2),
                Ok(Extent {
                    start: 4096,
                    blocks: 5904
                })
            );
            assert_eq!(found(3), Err(OpenError::NotFound), "unused entry");
            assert_eq!(found(129), Err(OpenError::NotFound));
            assert_eq!(found(0), Err(OpenError::NotFound));
            assert_eq!(
                find_partition(&disk, block as u32, 9_000, 2),
                Err(OpenError::BadSize)
            );
        }
    }

    #[test]
    fn mbr_primary_partitions() {
        let disk = mbr(&[(0x83, 2048, 1000), (0, 0, 0), (0x07, 5000, 10)]);
        assert_eq!(
            find_partition(&disk, 512, 10_000, 1),
            Ok(Extent {
                start: 2048,
                blocks: 1000
            })
        );
        assert_eq!(
            find_partition(&disk, 512, 10_000, 2),
            Err(OpenError::NotFound)
        );
        assert_eq!(
            find_partition(&disk, 512, 5_005, 3),
            Err(OpenError::BadSize)
        );
        assert_eq!(
            find_partition(&disk, 512, 10_000, 5),
            Err(OpenError::NotFound)
        );
        assert_eq!(
            find_partition(&[0; 100], 512, 10, 1),
            Err(OpenError::NotFound)
        );
    }

    #[test]
    fn hostile_tables_are_errors_not_panics() {
        let mut disk = gpt(512, &[(10, 5)]);
        assert_eq!(find_partition(&disk, 512, 100, 1), Err(OpenError::BadSize));
        for (at, value) in [
            (512 + 72, u64::MAX),
            (512 + 72, 1 << 40),
            (512 + 80, u64::MAX),
        ] {
            let mut bad = disk.clone();
            bad[at..at + 8].copy_from_slice(&value.to_le_bytes());
            assert!(find_partition(&bad, 512, 100, 1).is_err());
        }
        disk[512 + 84..512 + 88].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(find_partition(&disk, 512, 100, 128).is_err());
        let mut seed = 0x1234_5678u32;
        for _ in 0..2000 {
            let mut garbage = gpt(512, &[(34, 99)]);
            for _ in 0..16 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let at = (seed as usize >> 4) % 1200;
                garbage[at] = (seed >> 24) as u8;
            }
            let _ = find_partition(&garbage, 512, 1000, 1 + seed % 130);
        }
        assert!(find_partition(&disk[..600], 512, 100, 1).is_err());
    }
}

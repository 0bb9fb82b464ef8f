//! Physical Region Page lists: how an NVMe command names its data buffers.
//!
//! PRP1 may start anywhere dword aligned; every further entry names a whole
//! page. So a scatter-gather list is expressible only if every segment but
//! the first starts on a page boundary and every segment but the last ends
//! on one. Three or more entries go into a list in memory whose pages hold
//! 512 entries, the last of which chains to the next list page when more
//! follow.

use crate::hal::{PAGE_SIZE, PhysAddr};
use crate::region::Region;
use blockdev::{Segment, SubmitError};

const PAGE: u64 = PAGE_SIZE as u64;
const ENTRIES_PER_PAGE: usize = PAGE_SIZE / 8;

/// The two PRP fields of a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Prps {
    pub prp1: PhysAddr,
    pub prp2: PhysAddr,
}

/// Every page-entry the segments need, in order.
fn entries(segments: &[Segment]) -> impl Iterator<Item = PhysAddr> + '_ {
    segments.iter().flat_map(|segment| {
        let end = segment.phys + u64::from(segment.len);
        let next_page = (segment.phys & !(PAGE - 1)) + PAGE;
        core::iter::once(segment.phys).chain((next_page..end).step_by(PAGE_SIZE))
    })
}

/// How many entries `segments` need, or why PRPs cannot express them.
pub(crate) fn entry_count(segments: &[Segment]) -> Result<usize, SubmitError> {
    let last = segments
        .len()
        .checked_sub(1)
        .ok_or(SubmitError::BadLength)?;
    for (index, segment) in segments.iter().enumerate() {
        let end = segment
            .phys
            .checked_add(u64::from(segment.len))
            .ok_or(SubmitError::BadAddress)?;
        let start_ok = if index == 0 {
            segment.phys % 4 == 0
        } else {
            segment.phys % PAGE == 0
        };
        if !start_ok || (index != last && end % PAGE != 0) {
            return Err(SubmitError::Misaligned);
        }
    }
    Ok(entries(segments).count())
}

/// List pages needed for a command with `entries` PRP entries.
pub(crate) fn list_pages_for(entries: usize) -> usize {
    if entries <= 2 {
        return 0;
    }
    // Each full list page but the last gives one entry up to the chain pointer.
    let listed = entries - 1;
    if listed <= ENTRIES_PER_PAGE {
        1
    } else {
        (listed - 1).div_ceil(ENTRIES_PER_PAGE - 1)
    }
}

/// Builds the PRPs for `segments`, writing any list into `list` (physically
/// at `list_phys`, a whole number of pages).
pub(crate) fn build(
    segments: &[Segment],
    list: &Region,
    list_phys: PhysAddr,
) -> Result<Prps, SubmitError> {
    let count = entry_count(segments)?;
    if list_pages_for(count) * PAGE_SIZE > list.len() {
        return Err(SubmitError::TooLarge);
    }
    let mut all = entries(segments);
    let prp1 = all.next().ok_or(SubmitError::BadLength)?;
    let prp2 = match count {
        1 => 0,
        2 => all.next().ok_or(SubmitError::BadLength)?,
        _ => {
            let mut remaining = count - 1;
            let mut slot = 0;
            for entry in all {
                let last_in_page = slot % ENTRIES_PER_PAGE == ENTRIES_PER_PAGE - 1;
                if last_in_page && remaining > 1 {
                    let next_page = list_phys + ((slot + 1) * 8) as u64;
                    list.write64(slot * 8, next_page);
                    slot += 1;
                }
                list.write64(slot * 8, entry);
                slot += 1;
                remaining -= 1;
            }
            list_phys
        }
    };
    Ok(Prps { prp1, prp2 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hal::Hal;
    use crate::testing::{TestHal, segment};
    use std::vec::Vec;

    struct List {
        region: Region,
        phys: PhysAddr,
    }

    fn list(hal: &TestHal, pages: usize) -> List {
        let dma = hal.dma_alloc(pages).unwrap();
        List {
            region: Region::from(&dma),
            phys: dma.phys,
        }
    }

    /// Walks PRPs the way a controller does and returns the data pages.
    fn walk(hal: &TestHal, prps: Prps, mut bytes: u64) -> Vec<u64> {
        let mut pages = std::vec![prps.prp1];
        bytes = bytes.saturating_sub(PAGE - prps.prp1 % PAGE);
        if bytes == 0 {
            return pages;
        }
        if bytes <= PAGE {
            pages.push(prps.prp2);
            return pages;
        }
        let mut at = prps.prp2;
        while bytes > 0 {
            let entry = u64::from_le_bytes(hal.bytes(at, 8).try_into().unwrap());
            if at % PAGE == PAGE - 8 && bytes > PAGE {
                assert_eq!(entry % PAGE, 0, "a chain pointer names a whole list page");
                at = entry;
                continue;
            }
            pages.push(entry);
            bytes = bytes.saturating_sub(PAGE);
            at += 8;
        }
        pages
    }

    #[test]
    fn one_and_two_entries_need_no_list() {
        let hal = TestHal::new();
        let list = list(&hal, 1);
        let one = build(&[segment(0x1_0200, 0x200)], &list.region, list.phys).unwrap();
        assert_eq!(
            one,
            Prps {
                prp1: 0x1_0200,
                prp2: 0
            }
        );
        let two = build(&[segment(0x1_0e00, 0x400)], &list.region, list.phys).unwrap();
        assert_eq!(
            two,
            Prps {
                prp1: 0x1_0e00,
                prp2: 0x1_1000
            }
        );
        let split = build(
            &[segment(0x1_0000, 0x1000), segment(0x5_0000, 0x200)],
            &list.region,
            list.phys,
        )
        .unwrap();
        assert_eq!(
            split,
            Prps {
                prp1: 0x1_0000,
                prp2: 0x5_0000
            }
        );
    }

    #[test]
    fn sector_aligned_transfer_spanning_three_pages_uses_a_list() {
        let hal = TestHal::new();
        let list = list(&hal, 1);
        let prps = build(&[segment(0x1_0200, 0x2000)], &list.region, list.phys).unwrap();
        assert_eq!(prps.prp1, 0x1_0200);
        assert_eq!(prps.prp2, list.phys);
        assert_eq!(walk(&hal, prps, 0x2000), [0x1_0200, 0x1_1000, 0x1_2000]);
    }

    #[test]
    fn one_mebibyte_from_scattered_pages() {
        let hal = TestHal::new();
        let list = list(&hal, 1);
        // 256 single pages at scattered addresses, the first starting mid-page.
        let mut segments = std::vec![segment(0x80_0800, 0x800)];
        segments.extend((1..256).map(|i| segment(0x100_0000 + i * 3 * PAGE, 0x1000)));
        segments.push(segment(0x900_0000, 0x800));
        let bytes: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        assert_eq!(bytes, 1 << 20);
        let prps = build(&segments, &list.region, list.phys).unwrap();
        let expected: Vec<u64> = segments.iter().map(|s| s.phys).collect();
        assert_eq!(walk(&hal, prps, bytes), expected);
    }

    #[test]
    fn long_lists_chain_to_further_pages() {
        let hal = TestHal::new();
        let list = list(&hal, 3);
        let bytes = 4u64 << 20;
        let prps = build(
            &[segment(0x4000_0000, bytes as u32)],
            &list.region,
            list.phys,
        )
        .unwrap();
        assert_eq!(list_pages_for(1024), 2);
        let pages = walk(&hal, prps, bytes);
        let expected: Vec<u64> = (0..1024).map(|i| 0x4000_0000 + i * PAGE).collect();
        assert_eq!(pages, expected);
        // 511 entries and a chain pointer, then the last 512 entries.
        assert_eq!(
            hal.bytes(list.phys + PAGE - 8, 8),
            (list.phys + PAGE).to_le_bytes()
        );
        assert_eq!(
            hal.bytes(list.phys + 2 * PAGE - 8, 8),
            (0x4000_0000 + 1023 * PAGE).to_le_bytes()
        );
    }

    #[test]
    fn list_page_sizes() {
        assert_eq!(list_pages_for(2), 0);
        assert_eq!(list_pages_for(3), 1);
        assert_eq!(list_pages_for(513), 1);
        assert_eq!(list_pages_for(514), 2);
        assert_eq!(list_pages_for(1024), 2);
        assert_eq!(list_pages_for(1025), 3);
    }

    #[test]
    fn inexpressible_lists_are_rejected() {
        let hal = TestHal::new();
        let list = list(&hal, 1);
        let unaligned_middle = [segment(0x1_0000, 0x1000), segment(0x2_0200, 0x200)];
        assert_eq!(
            build(&unaligned_middle, &list.region, list.phys),
            Err(SubmitError::Misaligned)
        );
        let short_first = [segment(0x1_0000, 0x200), segment(0x2_0000, 0x1000)];
        assert_eq!(
            build(&short_first, &list.region, list.phys),
            Err(SubmitError::Misaligned)
        );
        assert_eq!(
            build(&[segment(0x1_0001, 0x200)], &list.region, list.phys),
            Err(SubmitError::Misaligned)
        );
        let too_long = [segment(0x1_0000, 3 << 20)];
        assert_eq!(
            build(&too_long, &list.region, list.phys),
            Err(SubmitError::TooLarge)
        );
        assert_eq!(
            build(&[], &list.region, list.phys),
            Err(SubmitError::BadLength)
        );
    }
}

//! Partitions served as vbds: the table read from the simulated disk by
//! blockdev's parser, as the kernel reads it at boot, and each vbd kept
//! to its partition.

use super::*;
use blockdev::partition::images::write_gpt;
use blockdev::partition::read_partition_table;

/// `parted0`'s GPT partitions 1, 2 and 3 as (first, last) sectors.
const PARTS: [(u64, u64); 3] = [(34, 533), (534, 1033), (1100, 2013)];

/// What `parted0` holds outside its table before any guest writes.
fn filler(offset: usize) -> u8 {
    (offset / 512) as u8 ^ (offset as u8).wrapping_mul(13)
}

impl TestOpener {
    /// `parted0`, made on first use (2048 sectors: a GPT of [`PARTS`], the
    /// rest [`filler`]), with its table as blockdev reads it; with
    /// `broken`, a fresh such disk whose two GPT headers are both corrupt.
    pub(super) fn partitioned(
        &mut self,
        broken: bool,
    ) -> (Disk, Result<PartitionTable, TableError>) {
        if let (Some(parted), false) = (&self.parted, broken) {
            return parted.clone();
        }
        let disk = self.spy(512, 2048, false);
        let spy = self.disks.borrow().last().unwrap().clone();
        let image = &mut spy.borrow_mut().storage;
        let image = image.as_mut_bytes();
        for (offset, byte) in image.iter_mut().enumerate() {
            *byte = filler(offset);
        }
        write_gpt(image, 512, &PARTS);
        if broken {
            image[512 + 60] ^= 1;
            image[2047 * 512 + 60] ^= 1;
        }
        let table = read_partition_table(&disk.geometry(), |lba, buf| {
            buf.copy_from_slice(&image[lba as usize * 512..][..buf.len()]);
            true
        });
        if !broken {
            self.parted = Some((disk.clone(), table.clone()));
        }
        (disk, table)
    }

    /// `parted0:pN`, or `badgpt0:pN` of a disk whose table is corrupt.
    pub(super) fn open_partition(
        &mut self,
        disk: &str,
        number: u32,
    ) -> Result<DiskView, OpenError> {
        let (disk, table) = match disk {
            "parted0" => self.partitioned(false),
            "badgpt0" => self.partitioned(true),
            _ => return Err(self.failures.refusal(disk)),
        };
        claim_partition(&disk, &table, number)
    }
}

#[test]
fn partitions_of_one_disk_serve_guests_apart() {
    run(|h| {
        let (_, mut front) = h.serve(7, "parted0:p2", "w", Protocol::X86_64);
        let (first, mut neighbour) = h.serve(8, "parted0:p1", "w", Protocol::X86_32);
        assert_eq!(h.backend_node(first, "sectors").as_deref(), Some("500"));
        let disk = h.disk(0);
        let before = disk.borrow().bytes(0, 2048 * 512);
        let refused = [
            (9, "parted0", "in use"),
            (10, "parted0:p2", "in use"),
            (11, "parted0:p4", "no such disk, partition or module"),
            (
                12,
                "badgpt0:p1",
                "partition table is unusable: GPT header: header CRC32 mismatch; \
                 backup GPT header: header CRC32 mismatch",
            ),
        ];
        let vbds: Vec<VbdId> = refused
            .iter()
            .map(|&(frontend, params, _)| h.add_vbd(frontend, DEVID, params, "w"))
            .collect();
        h.pump();
        for (id, (_, params, why)) in vbds.into_iter().zip(refused) {
            let error = h.backend_node(id, "error").unwrap_or_default();
            assert!(error.contains(why), "{params}: {error}");
        }

        // Partition 2's first and last 8 sectors; 8 sectors from 496,
        // which end past it, and a read of its sector 500.
        let (head, tail) = (
            front.grant(true, &pattern(41)),
            front.grant(true, &pattern(42)),
        );
        let beyond = front.grant(true, &pattern(43));
        let target = front.grant(false, &[]);
        let requests = [
            front.data_request(blkif::OP_WRITE, 1, 0, 1, &[seg(head, 0, 7)]),
            front.data_request(blkif::OP_WRITE, 2, 492, 1, &[seg(tail, 0, 7)]),
            front.data_request(blkif::OP_WRITE, 3, 496, 1, &[seg(beyond, 0, 7)]),
            front.data_request(blkif::OP_READ, 4, 500, 1, &[seg(target, 0, 0)]),
        ];
        let statuses = h.statuses(&mut front, &requests);
        assert_eq!(statuses, [RSP_OKAY, RSP_OKAY, RSP_ERROR, RSP_ERROR]);
        let mut expected = before;
        expected[534 * 512..][..4096].copy_from_slice(&pattern(41));
        expected[1026 * 512..][..4096].copy_from_slice(&pattern(42));
        let after = disk.borrow().bytes(0, 2048 * 512);
        let differs = (0..after.len()).find(|&i| after[i] != expected[i]);
        assert_eq!(differs, None, "a byte outside what was written changed");

        // The neighbour's last sectors, just before partition 2, read back
        // as they were.
        let page = neighbour.grant(false, &[]);
        let read = neighbour.data_request(blkif::OP_READ, 5, 492, 1, &[seg(page, 0, 7)]);
        assert_eq!(h.io(&mut neighbour, &[read]), [ok(5, blkif::OP_READ)]);
        let sectors_526_to_533: Vec<u8> = (526 * 512..534 * 512).map(filler).collect();
        assert_eq!(neighbour.page(page), sectors_526_to_533);
    });
}

//! Bounce buffers: a device behind an IOMMU that does not see grant
//! mappings (a grant-blind spy disk) fails every request pointing into the
//! GFN window, and is served correctly only through a ring's bounce pages.

use super::*;
use blockdev::IoError;

/// What the grant-blind device answers a DMA into a grant frame with (as
/// an NVMe controller reports a data transfer error).
const DMA_FAULT: IoError = IoError::Device { code: 0x204 };

/// The completion of a request that a device behind an IOMMU mapping only
/// `hal`'s DMA memory (when `grant_blind`) fails: one with a segment
/// elsewhere (a grant frame) moves no byte.
pub(super) fn fails_dma_into_grants(
    grant_blind: Option<&GrantWindowHal>,
    tag: u64,
    request: &blockdev::Request<'_>,
) -> Option<Completion> {
    let hal = grant_blind?;
    let segments = match *request {
        blockdev::Request::Read { segments, .. } | blockdev::Request::Write { segments, .. } => {
            segments
        }
        _ => &[],
    };
    let reachable = |s: &blockdev::Segment| hal.is_dma_memory(s.phys, s.len as usize);
    (!segments.iter().all(reachable)).then_some(Completion {
        tag,
        result: Err(DMA_FAULT),
    })
}

impl TestOpener {
    /// A 1 MiB grant-blind disk, served on `data_path`.
    pub(super) fn grant_blind(&self, data_path: DataPath) -> Result<OpenedTarget, OpenError> {
        let device = self.spy_device(512, 2048, 1, false);
        device.0.borrow_mut().grant_blind = Some(self.hal.clone());
        Ok(OpenedTarget {
            view: Disk::new(device).claim_all()?,
            data_path,
            completions: CompletionSignal::Polled,
        })
    }
}

/// The sectors segment `index` of a request shaped by `shape` covers: every
/// first/last sector pair over the shapes and indexes, whole pages among
/// them.
fn sectors_of(shape: usize, index: usize) -> (u8, u8) {
    let first = ((shape + index * 3) % 8) as u8;
    let last = first + ((shape * 5 + index) % usize::from(8 - first)) as u8;
    (first, last)
}

/// Writes `count` segments of fresh patterns from `sector` (directly, or
/// through an indirect page), reads them back into fresh pages, and checks
/// the guest's pages and the disk.
fn round_trip(
    h: &mut Harness<'_>,
    front: &mut SimBlkfront<'_>,
    count: usize,
    indirect: bool,
    sector: u64,
) {
    let shapes: Vec<(u8, u8)> = (0..count).map(|i| sectors_of(count, i)).collect();
    let sources: Vec<Vec<u8>> = (0..count)
        .map(|i| pattern((count * 16 + i) as u8))
        .collect();
    let written: Vec<Seg> = shapes
        .iter()
        .zip(&sources)
        // Writable: persistent grants are mapped writable whatever the use.
        .map(|(&(first, last), data)| seg(front.grant(false, data), first, last))
        .collect();
    let read_into: Vec<Seg> = shapes
        .iter()
        .map(|&(first, last)| seg(front.grant(false, &[]), first, last))
        .collect();
    let request = |front: &SimBlkfront<'_>, operation, id, segs: &[Seg]| {
        if indirect {
            let list = front.grant(true, &segment_page(segs));
            front.indirect_request(operation, id, sector, count as u16, &[list])
        } else {
            front.data_request(operation, id, sector, count as u8, segs)
        }
    };
    let write = request(front, blkif::OP_WRITE, 1, &written);
    assert_eq!(h.io(front, &[write]), [ok(1, blkif::OP_WRITE)]);
    let read = request(front, blkif::OP_READ, 2, &read_into);
    assert_eq!(h.io(front, &[read]), [ok(2, blkif::OP_READ)]);

    let disk = h.disk(0);
    let mut at = sector as usize * 512;
    for (i, ((&(first, last), data), target)) in
        shapes.iter().zip(&sources).zip(&read_into).enumerate()
    {
        let range = usize::from(first) * 512..(usize::from(last) + 1) * 512;
        let wanted = &data[range.clone()];
        assert_eq!(
            disk.borrow().bytes(at, range.len()),
            wanted,
            "{count} segments: disk, segment {i}"
        );
        let page = front.page(target.gref);
        assert_eq!(
            &page[range.clone()],
            wanted,
            "{count} segments: read back, segment {i}"
        );
        assert!(
            page[..range.start]
                .iter()
                .chain(&page[range.end..])
                .all(|&b| b == 0),
            "{count} segments: segment {i} wrote outside its sectors"
        );
        at += range.len();
    }
}

/// Every direct size (1 to 11 segments) and a few indirect ones, with
/// partial sectors, with and without persistent grants.
fn every_size_round_trips_through_bounce_pages(persistent: bool) {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "blindbounced", "w");
        h.pump();
        if persistent {
            h.frontend_write(id, "feature-persistent", "1");
        }
        let mut front = h.connect(id, Protocol::X86_64, 0, "3");
        assert!(h.logged("serving blindbounced (2048 sectors, mode w, bounce buffers)"));
        assert!(h.platform.bounce_pages_held > 0, "the ring's pool");
        let mut sector = 0;
        for count in 1..=blkif::MAX_SEGMENTS_PER_REQUEST {
            round_trip(h, &mut front, count, false, sector);
            sector += 88;
        }
        for count in [1, 12, 100, 256] {
            round_trip(h, &mut front, count, true, 0);
        }
        let flush_and_discard = [
            front.discard_request(3, 0, 8, false),
            front.data_request(blkif::OP_WRITE_BARRIER, 4, 0, 0, &[]),
        ];
        assert_eq!(
            h.statuses(&mut front, &flush_and_discard),
            [RSP_OKAY, RSP_OKAY]
        );
        assert!(h.disk(0).borrow().bytes(0, 4096).iter().all(|&b| b == 0));
        h.close_leaving_nothing_mapped(id);
        assert_eq!(h.platform.bounce_pages_held, 0, "the pool is given back");
    });
}

#[test]
fn bounced_io_of_every_size_round_trips() {
    every_size_round_trips_through_bounce_pages(false);
}

#[test]
fn bounced_io_of_every_size_round_trips_with_persistent_grants() {
    every_size_round_trips_through_bounce_pages(true);
}

#[test]
fn without_bounce_pages_a_grant_blind_device_fails_every_transfer() {
    run(|h| {
        let (_, mut front) = h.serve(FRONTEND, "blind", "w", Protocol::X86_64);
        assert_eq!(
            h.platform.bounce_pages_held, 0,
            "no pool on a zero-copy ring"
        );
        let data = front.grant(true, &pattern(9));
        let target = front.grant(false, &[]);
        let requests = [
            front.data_request(blkif::OP_WRITE, 1, 0, 1, &[seg(data, 0, 7)]),
            front.data_request(blkif::OP_READ, 2, 0, 1, &[seg(target, 0, 7)]),
        ];
        assert_eq!(h.statuses(&mut front, &requests), [RSP_ERROR, RSP_ERROR]);
        assert!(h.logged(&format!("device error {DMA_FAULT:?}")));
        assert!(h.disk(0).borrow().bytes(0, 4096).iter().all(|&b| b == 0));
    });
}

#[test]
fn a_bounced_read_that_fails_leaves_the_guest_page_alone() {
    run(|h| {
        let (_, mut front) = h.serve(FRONTEND, "blindbounced", "w", Protocol::X86_64);
        let target = front.grant(false, &pattern(3));
        let read = front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(target, 0, 7)]);
        h.disk(0).borrow_mut().hold = true;
        assert_eq!(front.submit(&[read]), 1);
        h.pump();
        // The device fails the read as it ends: nothing to copy back.
        {
            let disk = h.disk(0);
            let mut spy = disk.borrow_mut();
            spy.hold = false;
            for (_, completion) in &mut spy.held {
                completion.result = Err(IoError::Media);
            }
        }
        h.pump();
        assert_eq!(front.responses()[0].status, RSP_ERROR);
        assert_eq!(front.page(target), pattern(3));
    });
}

//! The NVMe driver end to end against the simulated controller.

use std::cell::RefCell;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use super::sim::{NvmeSim, SimNamespace};
use super::*;
use crate::testing::{TestHal, read_request, run_one, segment, write_request};
use std::string::ToString;

const BAR_LEN: usize = 0x2000;

struct Setup {
    hal: TestHal,
    sim: Rc<RefCell<NvmeSim>>,
}

impl Setup {
    fn new(namespaces: Vec<SimNamespace>) -> Self {
        let hal = TestHal::new();
        let bar = hal.add_mmio(BAR_LEN);
        let sim = Rc::new(RefCell::new(NvmeSim::new(bar, namespaces)));
        let stepped = sim.clone();
        hal.set_device(move || stepped.borrow_mut().step());
        Self { hal, sim }
    }

    fn one_namespace() -> Self {
        Self::new(vec![SimNamespace::new(1, 9, 8192)])
    }

    fn controller(&self, config: NvmeConfig) -> Result<NvmeController<TestHal>, NvmeError> {
        // SAFETY: the window belongs to the simulated controller.
        unsafe { NvmeController::new(self.hal.clone(), self.bar(), BAR_LEN, config) }
    }

    fn bar(&self) -> PhysAddr {
        self.sim.borrow().bar()
    }

    fn disk(&self, nsid: u32) -> NvmeNamespace<TestHal> {
        let controller = Rc::new(RefCell::new(
            self.controller(NvmeConfig::default()).unwrap(),
        ));
        NvmeNamespace::new(controller, nsid).unwrap()
    }

    fn stored(&self, byte: usize, len: usize) -> Vec<u8> {
        self.sim.borrow().namespaces[0].data[byte..byte + len].to_vec()
    }
}

#[test]
fn bring_up_identifies_controller_and_namespaces() {
    let mut metadata = SimNamespace::new(3, 9, 64);
    metadata.metadata = 8;
    let setup = Setup::new(vec![
        SimNamespace::new(1, 9, 4096),
        SimNamespace::new(2, 12, 100),
        metadata,
    ]);
    setup.sim.borrow_mut().mdts = 5;
    let controller = setup
        .controller(NvmeConfig {
            io_queues: 8,
            ..NvmeConfig::default()
        })
        .unwrap();
    assert_eq!(&controller.info().model[..22], b"stordom simulated nvme");
    let ids: Vec<u32> = controller.namespaces().iter().map(|n| n.id).collect();
    assert_eq!(ids, [1, 2], "the namespace with metadata is not served");
    let geometry = controller.geometry(2).unwrap();
    assert_eq!((geometry.logical_block_size, geometry.blocks), (4096, 100));
    assert!(geometry.volatile_write_cache);
    assert_eq!(geometry.queues, 4, "the controller granted four of eight");
    assert_eq!(geometry.queue_depth, 63);
    assert_eq!(
        geometry.max_transfer_bytes,
        128 * 1024,
        "MDTS 5 caps transfers"
    );
    assert_eq!(geometry.discard_granularity, Some(1));
    assert!(controller.geometry(3).is_none());
}

#[test]
fn large_scattered_write_then_read_back() {
    let setup = Setup::one_namespace();
    let mut disk = setup.disk(1);
    assert!(disk.geometry().max_transfer_bytes >= 1 << 20);
    let source = setup.hal.buffer_with_pattern(257, 3);
    // 1 MiB: first segment starts 512 bytes into a page, the rest follow.
    let segments = [
        segment(source.phys + 512, 4096 - 512),
        segment(source.phys + 4096, (1 << 20) - 4096 + 512),
    ];
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 1, write_request(100, &segments)),
        Ok(())
    );
    let expected = setup.hal.bytes(source.phys + 512, 1 << 20);
    assert!(
        setup.stored(100 * 512, 1 << 20) == expected,
        "the device holds what was written"
    );

    let target = setup.hal.dma_buffer(257);
    let read = [segment(target.phys + 1024, 1 << 20)];
    assert_eq!(
        run_one(&setup.hal, &mut disk, 1, 2, read_request(100, &read)),
        Ok(())
    );
    assert!(setup.hal.bytes(target.phys + 1024, 1 << 20) == expected);
}

#[test]
fn chained_prp_lists_carry_four_mebibytes() {
    let setup = Setup::new(vec![SimNamespace::new(1, 12, 2048)]);
    let controller = setup
        .controller(NvmeConfig {
            max_transfer_bytes: 4 << 20,
            ..NvmeConfig::default()
        })
        .unwrap();
    let mut disk = NvmeNamespace::new(Rc::new(RefCell::new(controller)), 1).unwrap();
    let source = setup.hal.buffer_with_pattern(1024, 9);
    let write = [segment(source.phys, 4 << 20)];
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 7, write_request(8, &write)),
        Ok(())
    );
    let target = setup.hal.dma_buffer(1024);
    let read = [segment(target.phys, 4 << 20)];
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 8, read_request(8, &read)),
        Ok(())
    );
    assert!(setup.hal.bytes(target.phys, 4 << 20) == setup.hal.bytes(source.phys, 4 << 20));
}

#[test]
fn flush_reaches_the_device_only_with_a_volatile_cache() {
    let setup = Setup::one_namespace();
    let mut disk = setup.disk(1);
    assert_eq!(run_one(&setup.hal, &mut disk, 0, 5, Request::Flush), Ok(()));
    assert_eq!(setup.sim.borrow().flushes, 1);

    let setup = Setup::one_namespace();
    setup.sim.borrow_mut().volatile_write_cache = false;
    let mut disk = setup.disk(1);
    assert!(!disk.geometry().volatile_write_cache);
    assert_eq!(run_one(&setup.hal, &mut disk, 0, 6, Request::Flush), Ok(()));
    assert_eq!(setup.sim.borrow().flushes, 0);
}

#[test]
fn discard_and_write_zeroes_clear_blocks() {
    let setup = Setup::one_namespace();
    let mut disk = setup.disk(1);
    let source = setup.hal.buffer_with_pattern(4, 1);
    let write = [segment(source.phys, 16384)];
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 1, write_request(0, &write)),
        Ok(())
    );
    assert_eq!(
        run_one(
            &setup.hal,
            &mut disk,
            0,
            2,
            Request::Discard { lba: 2, blocks: 3 }
        ),
        Ok(())
    );
    assert_eq!(
        run_one(
            &setup.hal,
            &mut disk,
            0,
            3,
            Request::WriteZeroes { lba: 10, blocks: 4 }
        ),
        Ok(())
    );
    let stored = setup.stored(0, 16384);
    let original = setup.hal.bytes(source.phys, 16384);
    for block in 0..32 {
        let range = block * 512..(block + 1) * 512;
        let cleared = (2..5).contains(&block) || (10..14).contains(&block);
        if cleared {
            assert!(
                stored[range].iter().all(|&b| b == 0),
                "block {block} was cleared"
            );
        } else {
            assert_eq!(
                stored[range.clone()],
                original[range],
                "block {block} was kept"
            );
        }
    }
}

#[test]
fn unsupported_optional_commands_are_refused_up_front() {
    let setup = Setup::one_namespace();
    setup.sim.borrow_mut().optional_commands = 0;
    let mut disk = setup.disk(1);
    assert_eq!(disk.geometry().discard_granularity, None);
    assert_eq!(
        disk.submit(0, 1, Request::Discard { lba: 0, blocks: 1 }),
        Err(SubmitError::Unsupported)
    );
    assert_eq!(
        disk.submit(0, 1, Request::WriteZeroes { lba: 0, blocks: 1 }),
        Err(SubmitError::Unsupported)
    );
}

#[test]
fn completion_queue_wraps_many_times_with_phase_tags() {
    let setup = Setup::one_namespace();
    let controller = setup
        .controller(NvmeConfig {
            queue_depth: 4,
            ..NvmeConfig::default()
        })
        .unwrap();
    let mut disk = NvmeNamespace::new(Rc::new(RefCell::new(controller)), 1).unwrap();
    assert_eq!(disk.geometry().queue_depth, 3);
    let buffer = setup.hal.dma_buffer(1);
    let segments = [segment(buffer.phys, 512)];
    let mut next_tag = 0;
    let mut seen = Vec::new();
    for _ in 0..10 {
        for _ in 0..3 {
            disk.submit(0, next_tag, write_request(next_tag, &segments))
                .unwrap();
            next_tag += 1;
        }
        assert_eq!(
            disk.submit(0, 99, Request::Flush),
            Err(SubmitError::QueueFull)
        );
        setup.hal.step_device();
        let mut out = [Completion::default(); 8];
        let count = disk.poll(0, &mut out);
        assert_eq!(count, 3);
        seen.extend(out[..count].iter().map(|c| c.tag));
    }
    assert_eq!(seen, (0..30).collect::<Vec<u64>>());
    let mut out = [Completion::default(); 8];
    assert_eq!(
        disk.poll(0, &mut out),
        0,
        "stale entries of the last lap are not taken again"
    );
}

#[test]
fn small_poll_buffers_leave_the_rest_for_later() {
    let setup = Setup::one_namespace();
    let mut disk = setup.disk(1);
    for tag in 0..5 {
        disk.submit(2, tag, Request::Flush).unwrap();
    }
    setup.hal.step_device();
    let mut out = [Completion::default(); 2];
    assert_eq!(disk.poll(2, &mut out), 2);
    assert_eq!(disk.poll(2, &mut out), 2);
    assert_eq!(disk.poll(2, &mut out), 1);
    assert_eq!(out[0].tag, 4);
    assert_eq!(disk.poll(1, &mut out), 0, "other queues saw nothing");
}

#[test]
fn device_errors_are_decoded() {
    let setup = Setup::one_namespace();
    let mut disk = setup.disk(1);
    let buffer = setup.hal.dma_buffer(1);
    let segments = [segment(buffer.phys, 512)];
    setup.sim.borrow_mut().fail_next_io = Some(0x281);
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 1, read_request(0, &segments)),
        Err(IoError::Media)
    );
    setup.sim.borrow_mut().fail_next_io = Some(0x001);
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 2, Request::Flush),
        Err(IoError::Unsupported)
    );
    setup.sim.borrow_mut().fail_next_io = Some(0x306);
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 3, Request::Flush),
        Err(IoError::Device { code: 0x306 })
    );
    assert_eq!(run_one(&setup.hal, &mut disk, 0, 4, Request::Flush), Ok(()));
}

#[test]
fn stray_completion_ids_are_ignored() {
    let setup = Setup::one_namespace();
    setup.sim.borrow_mut().post_stray_cids = true;
    let mut disk = setup.disk(1);
    for tag in 0..3 {
        disk.submit(0, tag, Request::Flush).unwrap();
    }
    setup.hal.step_device();
    let mut out = [Completion::default(); 8];
    assert_eq!(disk.poll(0, &mut out), 3);
    assert_eq!(
        out[..3].iter().map(|c| c.tag).collect::<Vec<_>>(),
        [0, 1, 2]
    );
}

#[test]
fn sub_page_segments_go_by_sgl_and_round_trip() {
    let setup = Setup::one_namespace();
    let mut disk = setup.disk(1);
    let source = setup.hal.buffer_with_pattern(4, 5);
    // A 1 KiB-block file system's write: 1 KiB pieces of different pages,
    // the middle ones starting and ending inside their pages.
    let pieces = [
        segment(source.phys + 3072, 1024),
        segment(source.phys + 4096 + 1024, 1024),
        segment(source.phys + 2 * 4096 + 2048, 512),
        segment(source.phys + 3 * 4096, 1536),
    ];
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 1, write_request(40, &pieces)),
        Ok(())
    );
    let expected: Vec<u8> = pieces
        .iter()
        .flat_map(|s| setup.hal.bytes(s.phys, s.len as usize))
        .collect();
    assert!(setup.stored(40 * 512, 4096) == expected);
    assert_eq!(setup.sim.borrow().sgl_commands, 1, "PRPs could not say it");

    let target = setup.hal.dma_buffer(4);
    let back = pieces.map(|s| segment(target.phys + (s.phys - source.phys), s.len));
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 2, read_request(40, &back)),
        Ok(())
    );
    let read: Vec<u8> = back
        .iter()
        .flat_map(|s| setup.hal.bytes(s.phys, s.len as usize))
        .collect();
    assert!(read == expected);
    // Page-tiled segments still go by PRPs.
    let tiled = [
        segment(target.phys, 4096),
        segment(target.phys + 4096, 4096),
    ];
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 3, read_request(0, &tiled)),
        Ok(())
    );
    assert_eq!(setup.sim.borrow().sgl_commands, 2);
}

#[test]
fn dword_aligned_sgls_bounce_odd_pieces() {
    let setup = Setup::one_namespace();
    setup.sim.borrow_mut().sgl_support = 0b10;
    let mut disk = setup.disk(1);
    let buffer = setup.hal.buffer_with_pattern(2, 4);
    let odd = [
        segment(buffer.phys + 2, 510),
        segment(buffer.phys + 4096 + 512, 514),
    ];
    write_on_queue_0(&setup, &mut disk, 1, 0, &odd);
    assert!(setup.stored(0, 1024) == gathered(&setup.hal, &odd));
    assert_eq!(setup.sim.borrow().sgl_commands, 0, "SGLs could not say it");
    let even = [
        segment(buffer.phys + 512, 512),
        segment(buffer.phys + 4096 + 512, 512),
    ];
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 2, write_request(0, &even)),
        Ok(())
    );
    assert_eq!(setup.sim.borrow().sgl_commands, 1);
}

/// Writes `segments` at `lba` on queue 0 of `disk` and waits until the
/// device took them.
fn write_on_queue_0(
    setup: &Setup,
    disk: &mut NvmeNamespace<TestHal>,
    tag: u64,
    lba: u64,
    segments: &[Segment],
) {
    let written = run_one(&setup.hal, disk, 0, tag, write_request(lba, segments));
    assert_eq!(written, Ok(()), "write {tag}");
}

/// The bytes of `segments`, one after another.
fn gathered(hal: &TestHal, segments: &[Segment]) -> Vec<u8> {
    segments
        .iter()
        .flat_map(|s| hal.bytes(s.phys, s.len as usize))
        .collect()
}

/// The simulated controller, made to lack SGLs, brought up with a queue
/// depth of `depth`.
fn without_sgls(setup: &Setup, depth: u16) -> Rc<RefCell<NvmeController<TestHal>>> {
    setup.sim.borrow_mut().sgl_support = 0;
    let config = NvmeConfig {
        queue_depth: depth,
        ..NvmeConfig::default()
    };
    Rc::new(RefCell::new(setup.controller(config).unwrap()))
}

/// Namespace 1 of [`without_sgls`].
fn first_namespace_without_sgls(setup: &Setup, depth: u16) -> NvmeNamespace<TestHal> {
    NvmeNamespace::new(without_sgls(setup, depth), 1).unwrap()
}

#[test]
fn without_sgls_sub_page_segments_are_bounced_and_round_trip() {
    // 512-byte and 4 KiB blocks; segments as blkfront sends them for a
    // 1 KiB-block file system, and other layouts PRPs cannot name.
    let setup = Setup::new(vec![
        SimNamespace::new(1, 9, 8192),
        SimNamespace::new(2, 12, 64),
    ]);
    let controller = without_sgls(&setup, 64);
    let mut disks = [1, 2].map(|nsid| NvmeNamespace::new(controller.clone(), nsid).unwrap());
    let source = setup.hal.buffer_with_pattern(8, 9);
    let target = setup.hal.dma_buffer(8);
    let page = |n: u64| source.phys + n * 4096;
    let layouts: [Vec<Segment>; 4] = [
        // 1 KiB pieces of four pages, at different offsets.
        vec![
            segment(page(0) + 3072, 1024),
            segment(page(2) + 1024, 1024),
            segment(page(1), 1024),
            segment(page(5) + 2048, 1024),
        ],
        // 512-byte pieces, the first starting on a page, the last ending
        // inside one.
        vec![
            segment(page(3), 512),
            segment(page(4) + 512, 512),
            segment(page(6) + 3584, 512),
            segment(page(7) + 1536, 2560),
        ],
        // A whole page between two pieces that do not end on a page.
        vec![
            segment(page(0) + 512, 1536),
            segment(page(2), 4096),
            segment(page(4) + 1024, 2560),
        ],
        // One piece, then a second that starts inside its page.
        vec![segment(page(1), 2048), segment(page(3) + 2048, 2048)],
    ];
    let mut tag = 0;
    let mut allocations = None;
    for (index, disk) in disks.iter_mut().enumerate() {
        let block_shift = setup.sim.borrow().namespaces[index].block_shift;
        for (number, layout) in layouts.iter().enumerate() {
            let lba = 8 * number as u64;
            let bytes: u32 = layout.iter().map(|s| s.len).sum();
            tag += 1;
            assert_eq!(
                run_one(&setup.hal, disk, 0, tag, write_request(lba, layout)),
                Ok(()),
                "namespace {} layout {number}",
                index + 1
            );
            let expected = gathered(&setup.hal, layout);
            let stored = setup.sim.borrow().namespaces[index].data[(lba << block_shift) as usize..]
                [..bytes as usize]
                .to_vec();
            assert!(stored == expected, "layout {number} written as is");
            // Read back into the same shapes of another buffer.
            let back: Vec<Segment> = layout
                .iter()
                .map(|s| segment(target.phys + (s.phys - source.phys), s.len))
                .collect();
            tag += 1;
            assert_eq!(
                run_one(&setup.hal, disk, 0, tag, read_request(lba, &back)),
                Ok(())
            );
            assert!(
                gathered(&setup.hal, &back) == expected,
                "layout {number} read back"
            );
            // Nothing is allocated per request, after the first ones.
            let now = setup.hal.driver_allocations();
            assert_eq!(*allocations.get_or_insert(now), now);
        }
    }
    let sim = setup.sim.borrow();
    assert_eq!(sim.sgl_commands, 0);
    assert_eq!(sim.io_commands, 16, "one command per request");
}

#[test]
fn a_busy_bounce_buffer_holds_the_next_bounced_request_back_in_order() {
    let setup = Setup::one_namespace();
    let mut disk = first_namespace_without_sgls(&setup, 64);
    let source = setup.hal.buffer_with_pattern(4, 2);
    let pieces = |first: u64| {
        [
            segment(source.phys + first, 1024),
            segment(source.phys + 2 * 4096 + 1024, 1024),
        ]
    };
    let (first, second) = (pieces(0), pieces(4096 + 2048));
    disk.submit(0, 1, write_request(0, &first)).unwrap();
    assert_eq!(
        disk.submit(0, 2, write_request(4, &second)),
        Err(SubmitError::QueueFull),
        "queue 0's bounce buffer is taken"
    );
    // Requests PRPs can name, and flushes, go on meanwhile; so do bounced
    // requests of other queues.
    let whole = [segment(source.phys + 3 * 4096, 4096)];
    disk.submit(0, 3, write_request(16, &whole)).unwrap();
    disk.submit(0, 4, Request::Flush).unwrap();
    disk.submit(1, 5, write_request(8, &second)).unwrap();
    setup.hal.step_device();
    let mut out = [Completion::default(); 8];
    let count = disk.poll(0, &mut out);
    let answered: Vec<(u64, Result<(), IoError>)> =
        out[..count].iter().map(|c| (c.tag, c.result)).collect();
    assert_eq!(
        answered,
        [(1, Ok(())), (3, Ok(())), (4, Ok(()))],
        "one completion each, the bounced write before the flush"
    );
    assert_eq!(disk.poll(1, &mut out), 1);
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 2, write_request(4, &second)),
        Ok(())
    );
    assert!(setup.stored(0, 2048) == gathered(&setup.hal, &first));
    assert!(setup.stored(4 * 512, 2048) == gathered(&setup.hal, &second));
    assert!(setup.stored(8 * 512, 2048) == gathered(&setup.hal, &second));
}

#[test]
fn a_reset_frees_the_bounce_buffer_and_delivers_no_stale_read() {
    let setup = Setup::one_namespace();
    let mut disk = first_namespace_without_sgls(&setup, 64);
    let target = setup.hal.dma_buffer(2);
    let pieces = [
        segment(target.phys + 1024, 1024),
        segment(target.phys + 4096 + 512, 1024),
    ];
    setup.sim.borrow_mut().drop_io = true;
    disk.submit(0, 1, read_request(0, &pieces)).unwrap();
    setup.hal.step_device();
    setup.sim.borrow_mut().drop_io = false;
    setup.hal.advance(10_000_000_000);
    let mut out = [Completion::default(); 2];
    assert_eq!(disk.poll(0, &mut out), 1);
    assert_eq!(out[0].result, Err(IoError::Timeout));
    assert!(
        setup.hal.bytes(target.phys, 8192).iter().all(|&b| b == 0),
        "nothing was copied out of the buffer"
    );
    let source = setup.hal.buffer_with_pattern(2, 6);
    let write = [
        segment(source.phys + 1024, 1024),
        segment(source.phys + 4096 + 512, 1024),
    ];
    // The buffer is free again.
    write_on_queue_0(&setup, &mut disk, 2, 0, &write);
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 3, read_request(0, &pieces)),
        Ok(())
    );
    assert!(gathered(&setup.hal, &pieces) == gathered(&setup.hal, &write));
}

#[test]
fn a_bounced_request_of_unreachable_memory_is_refused_without_losing_a_slot() {
    let setup = Setup::one_namespace();
    // PRPs only, and one slot.
    let mut disk = first_namespace_without_sgls(&setup, 2);
    // Sub-page pieces of memory the Hal does not map.
    let bad = [segment(0x1000, 512), segment(0x3000, 512)];
    for _ in 0..3 {
        assert_eq!(
            disk.submit(0, 1, write_request(0, &bad)),
            Err(SubmitError::BadAddress)
        );
        assert_eq!(
            disk.submit(0, 1, read_request(0, &bad)),
            Err(SubmitError::BadAddress)
        );
    }
    assert_eq!(setup.sim.borrow().io_commands, 0);
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 2, Request::Flush),
        Ok(()),
        "the only slot is still free"
    );
    let buffer = setup.hal.dma_buffer(2);
    let good = [segment(buffer.phys, 512), segment(buffer.phys + 4096, 512)];
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 3, write_request(0, &good)),
        Ok(()),
        "so is the bounce buffer"
    );
    assert_eq!(
        disk.submit(
            0,
            4,
            Request::Discard {
                lba: 8191,
                blocks: 2
            }
        ),
        Err(SubmitError::OutOfRange)
    );
    assert_eq!(
        disk.submit(4, 4, Request::Flush),
        Err(SubmitError::NoSuchQueue)
    );
}

#[test]
fn timeout_resets_the_controller_and_recovers() {
    let setup = Setup::one_namespace();
    let mut disk = setup.disk(1);
    let source = setup.hal.buffer_with_pattern(1, 5);
    let segments = [segment(source.phys, 4096)];
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 1, write_request(0, &segments)),
        Ok(())
    );

    // A command on queue 1 completes but is not polled before the hang.
    disk.submit(1, 10, Request::Flush).unwrap();
    setup.hal.step_device();
    setup.sim.borrow_mut().drop_io = true;
    disk.submit(0, 2, read_request(0, &segments)).unwrap();
    setup.hal.advance(1_000_000_000);
    disk.submit(1, 11, Request::Flush).unwrap();
    setup.hal.step_device();
    let mut out = [Completion::default(); 4];
    assert_eq!(disk.poll(0, &mut out), 0, "nothing is late yet");
    setup.sim.borrow_mut().drop_io = false;

    setup.hal.advance(4_500_000_000);
    assert_eq!(disk.poll(0, &mut out), 1);
    assert_eq!(
        out[0],
        Completion {
            tag: 2,
            result: Err(IoError::Timeout)
        }
    );
    assert_eq!(setup.sim.borrow().resets, 1);
    assert_eq!(disk.poll(1, &mut out), 2);
    assert_eq!(
        out[0],
        Completion {
            tag: 10,
            result: Ok(())
        },
        "finished work is kept"
    );
    assert_eq!(
        out[1],
        Completion {
            tag: 11,
            result: Err(IoError::Aborted)
        }
    );

    let target = setup.hal.dma_buffer(1);
    let read = [segment(target.phys, 4096)];
    assert_eq!(
        run_one(&setup.hal, &mut disk, 0, 3, read_request(0, &read)),
        Ok(())
    );
    assert_eq!(
        setup.hal.bytes(target.phys, 4096),
        setup.hal.bytes(source.phys, 4096)
    );
}

#[test]
fn a_controller_that_never_comes_back_fails_for_good() {
    let setup = Setup::one_namespace();
    let controller = Rc::new(RefCell::new(
        setup.controller(NvmeConfig::default()).unwrap(),
    ));
    let mut disk = NvmeNamespace::new(controller.clone(), 1).unwrap();
    setup.sim.borrow_mut().drop_io = true;
    setup.sim.borrow_mut().dead_after_reset = true;
    disk.submit(0, 1, Request::Flush).unwrap();
    setup.hal.advance(10_000_000_000);
    let mut out = [Completion::default(); 2];
    assert_eq!(disk.poll(0, &mut out), 1);
    assert_eq!(out[0].result, Err(IoError::Timeout));
    assert!(controller.borrow().has_failed());
    assert_eq!(
        disk.submit(0, 2, Request::Flush),
        Err(SubmitError::DeviceFailed)
    );
}

#[test]
fn bring_up_errors() {
    let setup = Setup::one_namespace();
    // SAFETY: the window belongs to the simulated controller.
    let small = unsafe {
        NvmeController::new(setup.hal.clone(), setup.bar(), 0x100, NvmeConfig::default())
    };
    assert_eq!(small.err(), Some(NvmeError::BadBar));
    setup.sim.borrow_mut().max_queues = 1;
    let hal = setup.hal.clone();
    {
        let controller = setup.controller(NvmeConfig::default()).unwrap();
        assert_eq!(controller.geometry(1).unwrap().queues, 1);
    }
    assert_eq!(
        hal.driver_allocations(),
        0,
        "dropping the controller frees its memory"
    );
}

#[test]
fn a_controller_that_never_becomes_ready_is_refused_with_why() {
    let setup = Setup::one_namespace();
    setup.sim.borrow_mut().never_ready = true;
    let error = setup.controller(NvmeConfig::default()).err();
    assert_eq!(error, Some(NvmeError::ReadyTimeout));
    assert_eq!(
        error.unwrap().to_string(),
        "the controller did not change CSTS.RDY within CAP.TO"
    );
    assert_eq!(
        setup.hal.driver_allocations(),
        0,
        "nothing is left allocated"
    );
}

#[test]
fn a_controller_whose_registers_read_zero_is_refused() {
    // QEMU's NVMe SR-IOV virtual function while offline (never brought
    // online by its physical function) reads every register but CSTS as 0.
    let setup = Setup::one_namespace();
    setup.hal.write_bytes(setup.bar(), &[0; 8]);
    let error = setup.controller(NvmeConfig::default()).err();
    assert_eq!(error, Some(NvmeError::NoNvmCommandSet));
    assert_eq!(
        error.unwrap().to_string(),
        "CAP.CSS does not list the NVM command set"
    );
}

#[test]
fn from_pci_enables_the_function_and_uses_bar0() {
    use crate::pci::tests::{SimConfig, SimFunction};
    let setup = Setup::one_namespace();
    let at = Bdf {
        bus: 0,
        device: 3,
        function: 0,
    };
    let bar = setup.bar();
    let function = SimFunction::new(0x1b36, 0x0010, [1, 8, 2], 0)
        .bar(0, bar as u32 | 0x4, !(BAR_LEN as u32 - 1))
        .bar(1, (bar >> 32) as u32, u32::MAX);
    let mut config = SimConfig::default();
    config.functions.insert(at, function);
    // SAFETY: the function and its BAR belong to the simulated controller.
    let controller = unsafe {
        NvmeController::from_pci(setup.hal.clone(), &mut config, at, NvmeConfig::default())
    }
    .unwrap();
    assert_eq!(controller.namespaces().len(), 1);
    let command = config.read32(at, 4);
    assert_eq!(command & 0x406, 0x406, "memory, bus master, INTx off");
}

#[test]
fn namespaces_on_shared_queues_get_their_own_completions() {
    // The mix-up the block layer's queue handles prevent: two namespaces
    // of one controller, one I/O queue, the same tag on both.
    let setup = Setup::new(vec![
        SimNamespace::new(1, 9, 64),
        SimNamespace::new(2, 9, 64),
    ]);
    let config = NvmeConfig {
        io_queues: 1,
        ..NvmeConfig::default()
    };
    let controller = Rc::new(RefCell::new(setup.controller(config).unwrap()));
    let first = blockdev::Disk::new(NvmeNamespace::new(controller.clone(), 1).unwrap());
    let second = first.sharing_queues(NvmeNamespace::new(controller, 2).unwrap());
    let (view_a, view_b) = (first.claim_all().unwrap(), second.claim_all().unwrap());
    let (mut a, mut b) = (view_a.open_queue().unwrap(), view_b.open_queue().unwrap());
    let (data_a, data_b) = (
        setup.hal.buffer_with_pattern(1, 1),
        setup.hal.buffer_with_pattern(1, 2),
    );
    let segments_a = [segment(data_a.phys, 4096)];
    let segments_b = [segment(data_b.phys, 4096)];
    a.submit(0, write_request(0, &segments_a)).unwrap();
    b.submit(0, write_request(0, &segments_b)).unwrap();
    // Let both commands finish before either handle polls.
    for _ in 0..10 {
        setup.hal.step_device();
    }
    let mut out = [Completion::default(); 4];
    assert_eq!(b.poll(&mut out), 1, "b finds both, keeps its own");
    assert_eq!(
        out[0],
        Completion {
            tag: 0,
            result: Ok(())
        }
    );
    assert_eq!(a.poll(&mut out), 1, "a's completion was kept for it");
    assert_eq!(
        out[0],
        Completion {
            tag: 0,
            result: Ok(())
        }
    );
    assert_eq!(a.poll(&mut out) + b.poll(&mut out), 0);
    let sim = setup.sim.borrow();
    assert_eq!(
        sim.namespaces[0].data[..4096],
        setup.hal.bytes(data_a.phys, 4096)[..]
    );
    assert_eq!(
        sim.namespaces[1].data[..4096],
        setup.hal.bytes(data_b.phys, 4096)[..]
    );
}

//! The AHCI driver end to end against the simulated HBA.

use std::cell::RefCell;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use super::sim::{AhciSim, SimDisk};
use super::*;
use crate::testing::{TestHal, read_request, run_one, segment, write_request};

struct Setup {
    hal: TestHal,
    sim: Rc<RefCell<AhciSim>>,
    bar_len: usize,
}

impl Setup {
    fn new(disks: Vec<Option<SimDisk>>) -> Self {
        let hal = TestHal::new();
        let bar_len = hba::PORT_BASE + disks.len() * hba::PORT_SIZE;
        let abar = hal.add_mmio(bar_len);
        let sim = Rc::new(RefCell::new(AhciSim::new(abar, disks)));
        let stepped = sim.clone();
        hal.set_device(move || stepped.borrow_mut().step());
        Self { hal, sim, bar_len }
    }

    fn probe(&self, config: AhciConfig) -> AhciProbe<TestHal> {
        let abar = self.sim.borrow().abar();
        // SAFETY: the window belongs to the simulated HBA.
        unsafe { probe(self.hal.clone(), abar, self.bar_len, config) }.unwrap()
    }

    /// The only disk, with `configure` applied to it first.
    fn one_disk(configure: impl FnOnce(&mut SimDisk)) -> (Self, AhciPort<TestHal>) {
        let mut disk = SimDisk::new(16384);
        configure(&mut disk);
        let setup = Self::new(vec![Some(disk)]);
        let port = setup.probe(AhciConfig::default()).ports.pop().unwrap();
        (setup, port)
    }

    fn disk<R>(&self, number: usize, inspect: impl FnOnce(&mut SimDisk) -> R) -> R {
        inspect(self.sim.borrow_mut().disks[number].as_mut().unwrap())
    }
}

fn drain(setup: &Setup, port: &mut AhciPort<TestHal>) -> Vec<Completion> {
    setup.hal.step_device();
    let mut out = [Completion::default(); 64];
    let count = port.poll(0, &mut out);
    out[..count].to_vec()
}

#[test]
fn probe_brings_up_ports_with_disks() {
    let mut plain = SimDisk::new(2048);
    plain.ncq_depth = None;
    plain.trim = false;
    plain.write_cache = false;
    let setup = Setup::new(vec![Some(SimDisk::new(4096)), None, Some(plain)]);
    let found = setup.probe(AhciConfig::default());
    assert!(found.failed.is_empty());
    let numbers: Vec<u8> = found.ports.iter().map(|p| p.number()).collect();
    assert_eq!(numbers, [0, 2]);
    let (ncq, plain) = (&found.ports[0], &found.ports[1]);
    assert_eq!(&ncq.identity().model[..27], b"stordom simulated sata disk");
    assert!(ncq.uses_ncq() && !plain.uses_ncq());
    let geometry = ncq.geometry();
    assert_eq!(
        (
            geometry.blocks,
            geometry.logical_block_size,
            geometry.queue_depth
        ),
        (4096, 512, 31)
    );
    assert!(geometry.volatile_write_cache && geometry.discard_granularity.is_some());
    let geometry = plain.geometry();
    assert_eq!((geometry.blocks, geometry.queue_depth), (2048, 31));
    assert!(!geometry.volatile_write_cache && geometry.discard_granularity.is_none());
}

fn round_trip(configure: impl FnOnce(&mut SimDisk)) {
    let (setup, mut port) = Setup::one_disk(configure);
    let source = setup.hal.buffer_with_pattern(259, 11);
    let segments = [
        segment(source.phys + 1536, 2560),
        segment(source.phys + 8192, (1 << 20) - 2560),
    ];
    assert_eq!(
        run_one(&setup.hal, &mut port, 0, 1, write_request(40, &segments)),
        Ok(())
    );
    let mut expected = setup.hal.bytes(source.phys + 1536, 2560);
    expected.extend(setup.hal.bytes(source.phys + 8192, (1 << 20) - 2560));
    assert!(setup.disk(0, |d| d.data[40 * 512..40 * 512 + (1 << 20)]
        == expected[..]));

    let target = setup.hal.dma_buffer(256);
    let read = [segment(target.phys, 1 << 20)];
    assert_eq!(
        run_one(&setup.hal, &mut port, 0, 2, read_request(40, &read)),
        Ok(())
    );
    assert!(setup.hal.bytes(target.phys, 1 << 20) == expected);
}

#[test]
fn write_then_read_back_with_ncq() {
    round_trip(|_| {});
}

#[test]
fn write_then_read_back_without_ncq() {
    round_trip(|disk| disk.ncq_depth = None);
}

#[test]
fn ncq_tags_are_allocated_until_exhausted_and_reused() {
    let (setup, mut port) = Setup::one_disk(|disk| disk.ncq_depth = Some(8));
    assert_eq!(port.geometry().queue_depth, 8);
    let buffer = setup.hal.dma_buffer(1);
    let segments = [segment(buffer.phys, 512)];
    for round in 0..3u64 {
        for i in 0..8 {
            port.submit(0, round * 100 + i, read_request(i, &segments))
                .unwrap();
        }
        assert_eq!(
            port.submit(0, 999, read_request(0, &segments)),
            Err(SubmitError::QueueFull)
        );
        let tags: Vec<u64> = drain(&setup, &mut port).iter().map(|c| c.tag).collect();
        assert_eq!(tags, (0..8).map(|i| round * 100 + i).collect::<Vec<_>>());
    }
    let commands = setup.disk(0, |d| d.commands.clone());
    assert_eq!(
        commands
            .iter()
            .filter(|&&c| c == ata::command::READ_FPDMA_QUEUED)
            .count(),
        24
    );
}

#[test]
fn flush_waits_for_queued_writes_and_later_writes_wait_for_flush() {
    let (setup, mut port) = Setup::one_disk(|_| {});
    let buffer = setup.hal.dma_buffer(1);
    let segments = [segment(buffer.phys, 512)];
    port.submit(0, 1, write_request(1, &segments)).unwrap();
    port.submit(0, 2, write_request(2, &segments)).unwrap();
    port.submit(0, 3, Request::Flush).unwrap();
    port.submit(0, 4, write_request(3, &segments)).unwrap();
    let mut done = Vec::new();
    for _ in 0..4 {
        done.extend(drain(&setup, &mut port).iter().map(|c| c.tag));
    }
    assert_eq!(done, [1, 2, 3, 4]);
    let commands = setup.disk(0, |d| d.commands.clone());
    use ata::command::{FLUSH_CACHE_EXT, IDENTIFY_DEVICE, WRITE_FPDMA_QUEUED};
    assert_eq!(
        commands,
        [
            IDENTIFY_DEVICE,
            WRITE_FPDMA_QUEUED,
            WRITE_FPDMA_QUEUED,
            FLUSH_CACHE_EXT,
            WRITE_FPDMA_QUEUED
        ]
    );
    assert_eq!(setup.disk(0, |d| d.flushes), 1);
}

#[test]
fn flush_without_write_cache_needs_no_command() {
    let (setup, mut port) = Setup::one_disk(|disk| disk.write_cache = false);
    assert_eq!(run_one(&setup.hal, &mut port, 0, 1, Request::Flush), Ok(()));
    assert_eq!(setup.disk(0, |d| d.flushes), 0);
}

#[test]
fn trim_and_write_zeroes_clear_sectors() {
    const SECTORS: usize = 140_000;
    let (setup, mut port) = Setup::one_disk(|disk| disk.data = vec![0xaa; SECTORS * 512]);
    // More than one TRIM range holds.
    assert_eq!(
        run_one(
            &setup.hal,
            &mut port,
            0,
            1,
            Request::Discard {
                lba: 10,
                blocks: 131_000
            }
        ),
        Ok(())
    );
    assert_eq!(
        run_one(
            &setup.hal,
            &mut port,
            0,
            2,
            Request::WriteZeroes { lba: 3, blocks: 5 }
        ),
        Ok(())
    );
    setup.disk(0, |disk| {
        let sector_is_zero = |sector: usize| {
            disk.data[sector * 512..(sector + 1) * 512]
                .iter()
                .all(|&b| b == 0)
        };
        for sector in 0..SECTORS {
            let cleared = (3..8).contains(&sector) || (10..131_010).contains(&sector);
            assert_eq!(sector_is_zero(sector), cleared, "sector {sector}");
        }
    });
    let (_setup, mut port) = Setup::one_disk(|disk| disk.trim = false);
    assert_eq!(
        port.submit(0, 1, Request::Discard { lba: 0, blocks: 1 }),
        Err(SubmitError::Unsupported)
    );
}

#[test]
fn odd_segments_are_refused() {
    let (setup, mut port) = Setup::one_disk(|_| {});
    let buffer = setup.hal.dma_buffer(2);
    let odd = [
        segment(buffer.phys + 1, 511),
        segment(buffer.phys + 4096, 1),
    ];
    assert_eq!(
        port.submit(0, 1, write_request(0, &odd)),
        Err(SubmitError::Misaligned)
    );
    assert_eq!(
        run_one(&setup.hal, &mut port, 0, 2, Request::Flush),
        Ok(()),
        "no slot was lost"
    );
}

#[test]
fn non_queued_error_fails_that_command_and_resets_the_port() {
    let (setup, mut port) = Setup::one_disk(|disk| disk.ncq_depth = None);
    let buffer = setup.hal.buffer_with_pattern(1, 2);
    let segments = [segment(buffer.phys, 4096)];
    setup.disk(0, |d| d.fail_next = Some(1 << 6));
    assert_eq!(
        run_one(&setup.hal, &mut port, 0, 1, write_request(0, &segments)),
        Err(IoError::Media)
    );
    assert_eq!(port.resets(), 1);
    assert_eq!(
        run_one(&setup.hal, &mut port, 0, 2, write_request(0, &segments)),
        Ok(())
    );
    assert!(setup.disk(0, |d| d.data[..4096]
        == setup.hal.bytes(buffer.phys, 4096)[..]));
}

#[test]
fn queued_error_blames_the_command_in_the_error_log() {
    let (setup, mut port) = Setup::one_disk(|_| {});
    let buffer = setup.hal.dma_buffer(1);
    let segments = [segment(buffer.phys, 512)];
    setup.disk(0, |d| d.fail_next = Some(1 << 6));
    for tag in 0..3 {
        port.submit(0, tag, read_request(tag, &segments)).unwrap();
    }
    let mut results = drain(&setup, &mut port);
    results.sort_by_key(|c| c.tag);
    assert_eq!(
        results[0],
        Completion {
            tag: 0,
            result: Err(IoError::Media)
        }
    );
    assert_eq!(
        results[1],
        Completion {
            tag: 1,
            result: Err(IoError::Aborted)
        }
    );
    assert_eq!(
        results[2],
        Completion {
            tag: 2,
            result: Err(IoError::Aborted)
        }
    );
    assert!(setup.disk(0, |d| d.commands.contains(&ata::command::READ_LOG_EXT)));
    assert_eq!(
        run_one(&setup.hal, &mut port, 0, 5, read_request(0, &segments)),
        Ok(())
    );
}

#[test]
fn timeout_resets_the_port_and_recovers() {
    let (setup, mut port) = Setup::one_disk(|_| {});
    let buffer = setup.hal.dma_buffer(1);
    let segments = [segment(buffer.phys, 512)];
    setup.disk(0, |d| d.drop_commands = true);
    port.submit(0, 1, read_request(0, &segments)).unwrap();
    setup.hal.advance(5_000_000_000);
    port.submit(0, 2, read_request(1, &segments)).unwrap();
    assert!(drain(&setup, &mut port).is_empty(), "nothing is late yet");
    setup.disk(0, |d| d.drop_commands = false);
    setup.hal.advance(5_000_000_000);
    let mut out = [Completion::default(); 4];
    assert_eq!(port.poll(0, &mut out), 2);
    assert_eq!(
        out[0],
        Completion {
            tag: 1,
            result: Err(IoError::Timeout)
        }
    );
    assert_eq!(
        out[1],
        Completion {
            tag: 2,
            result: Err(IoError::Aborted)
        }
    );
    assert_eq!(port.resets(), 1);
    assert_eq!(
        run_one(&setup.hal, &mut port, 0, 3, read_request(0, &segments)),
        Ok(())
    );
}

#[test]
fn dropping_ports_frees_their_memory() {
    let setup = Setup::new(vec![Some(SimDisk::new(64)), Some(SimDisk::new(64))]);
    let found = setup.probe(AhciConfig::default());
    assert_eq!(found.ports.len(), 2);
    assert!(setup.hal.driver_allocations() > 0);
    drop(found);
    assert_eq!(setup.hal.driver_allocations(), 0);
}

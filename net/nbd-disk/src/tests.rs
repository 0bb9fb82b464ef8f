//! The adapter against nbd-client's simulated server through a simulated
//! byte pipe: random I/O checked against a model disk, flush ordering, the
//! server killed mid-stream and restarted, never coming back, sending
//! garbage, changing the export's size; no allocation per request.

use std::boxed::Box;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use alloc_count::{count, uncounted};
use blockdev::{Completion, IoError, QueuedDevice, Request, Segment, SubmitError};
use core::net::{Ipv4Addr, SocketAddrV4};
use core::ptr::NonNull;
use host_fuzz::FuzzRng;
use nbd_client::NbdConnectionError;
use nbd_client::sim_server::{SimServer, SimServerOptions};

use crate::*;

const PAGE: usize = 4096;
const DISK_BYTES: usize = 4 << 20;
const DEPTH: u16 = 16;
const MAX_SEGMENTS: u16 = 32;
/// Where the guest's memory starts in the simulated physical space.
const GUEST_BASE: u64 = 0x10_0000;
/// Each request's segments lie in a region of its own.
const REGION_BYTES: usize = MAX_SEGMENTS as usize * PAGE;
/// The clock's step per loop turn.
const TURN_NS: u64 = 1_000_000;
/// The largest piece the pipe moves at once.
const MAX_PIECE: usize = 64 * 1024;

/// The guest's pages, written through the pointers the host hands out.
struct GuestMemory {
    cells: Box<[Cell<u8>]>,
}

#[derive(Clone)]
struct TestHost {
    memory: Rc<GuestMemory>,
    clock: Rc<Cell<u64>>,
}

// SAFETY: the pointers are into `cells`, which the `Rc` keeps alive as long
// as the host; `Cell` makes writes through shared references sound.
unsafe impl NbdHost for TestHost {
    fn segment(&self, phys: u64, len: u32) -> Option<NonNull<u8>> {
        let at = usize::try_from(phys.checked_sub(GUEST_BASE)?).ok()?;
        let end = at.checked_add(len as usize)?;
        let cells = self.memory.cells.get(at..end)?;
        NonNull::new(cells.as_ptr() as *mut u8)
    }

    fn now_ns(&self) -> u64 {
        self.clock.get()
    }
}

/// The network and the server process: connections set up at the next
/// step, bytes moved in random pieces, replies released at each step.
struct Pipe {
    state: TransportState,
    server: Option<SimServer>,
    options: SimServerOptions,
    disk: Vec<u8>,
    /// The server process runs (else a connection is refused).
    up: bool,
    /// Connection attempts go unanswered.
    blackhole: bool,
    /// Replies are held back (released by the test).
    hold_replies: bool,
    /// Garbage the "server" sends instead of replies, once connected.
    garbage: Vec<u8>,
    connects: usize,
    rng: FuzzRng,
    /// The socket's buffer, allocated once.
    scratch: Vec<u8>,
}

impl Pipe {
    fn new(options: SimServerOptions, seed: u64) -> Pipe {
        let mut disk = vec![0u8; DISK_BYTES];
        FuzzRng::new(seed ^ 0xd15c).fill(&mut disk);
        Pipe {
            state: TransportState::Closed,
            server: None,
            options,
            disk,
            up: true,
            blackhole: false,
            hold_replies: false,
            garbage: Vec::new(),
            connects: 0,
            rng: FuzzRng::new(seed),
            scratch: vec![0; MAX_PIECE],
        }
    }

    fn step(&mut self) {
        if self.state == TransportState::Connecting && !self.blackhole {
            if self.up {
                let seed = self.rng.next_u64();
                self.server = Some(uncounted(|| SimServer::new(self.options.clone(), seed)));
                self.state = TransportState::Established;
            } else {
                self.state = TransportState::Closed;
            }
        }
        if let Some(server) = &mut self.server {
            if !self.hold_replies {
                uncounted(|| server.release_replies());
            }
            if server.closed() {
                self.state = TransportState::Closed;
            }
        }
    }

    /// The server process dies: its connection is reset, bytes not yet
    /// received are gone.
    fn kill(&mut self) {
        self.server = None;
        self.up = false;
        self.state = TransportState::Closed;
    }

    fn piece(&mut self) -> usize {
        1 + self.rng.below(MAX_PIECE as u64) as usize
    }
}

impl NbdTransport for Pipe {
    fn state(&self) -> TransportState {
        self.state
    }

    fn connect(&mut self) -> bool {
        self.connects += 1;
        self.state = TransportState::Connecting;
        true
    }

    fn abort(&mut self) {
        self.server = None;
        self.state = TransportState::Closed;
    }

    fn send(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> usize {
        if self.state != TransportState::Established {
            return 0;
        }
        let piece = self.piece();
        let n = fill(&mut self.scratch[..piece]);
        if let Some(server) = &mut self.server {
            uncounted(|| server.receive(&self.scratch[..n], &mut self.disk));
        }
        n
    }

    fn receive(&mut self, take: impl FnOnce(&[u8])) -> usize {
        let piece = self.piece();
        if !self.garbage.is_empty() && self.state == TransportState::Established {
            let n = piece.min(self.garbage.len());
            take(&self.garbage[..n]);
            uncounted(|| self.garbage.drain(..n));
            return n;
        }
        let Some(server) = &mut self.server else {
            return 0;
        };
        let n = piece.min(server.output.as_slices().0.len());
        if n == 0 {
            return 0;
        }
        take(&server.output.as_slices().0[..n]);
        uncounted(|| server.output.drain(..n));
        n
    }
}

#[derive(Clone, Debug)]
enum Kind {
    Read,
    /// The data written.
    Write(Vec<u8>),
    Flush,
    Zeroes,
}

struct Outstanding {
    kind: Kind,
    offset: usize,
    len: usize,
    region: usize,
    segments: Vec<Segment>,
}

/// A link, its device once open, the pipe, a model of the disk and the
/// requests in flight.
struct Rig {
    clock: Rc<Cell<u64>>,
    memory: Rc<GuestMemory>,
    link: Rc<RefCell<NbdLink<TestHost>>>,
    device: Option<NbdDevice<TestHost>>,
    pipe: Pipe,
    events: Vec<LinkEvent>,
    rng: FuzzRng,
    /// The disk as the completed writes left it.
    model: Vec<u8>,
    outstanding: HashMap<u64, Outstanding>,
    free_regions: Vec<usize>,
    results: HashMap<u64, Vec<Result<(), IoError>>>,
    next_tag: u64,
    /// Allocations the adapter made while counting.
    allocations: u64,
    completions: Vec<Completion>,
}

impl Rig {
    fn new(options: SimServerOptions, seed: u64) -> Rig {
        let clock = Rc::new(Cell::new(1_000_000_000));
        let regions = usize::from(DEPTH) * 2;
        let memory = Rc::new(GuestMemory {
            cells: (0..regions * REGION_BYTES).map(|_| Cell::new(0)).collect(),
        });
        let host = TestHost {
            memory: memory.clone(),
            clock: clock.clone(),
        };
        let config = NbdLinkConfig {
            server: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 10809),
            export_name: "disk0".into(),
            queue_depth: DEPTH,
            max_segments: MAX_SEGMENTS,
            max_transfer_bytes: 1 << 20,
        };
        let pipe = Pipe::new(options, seed);
        Rig {
            clock,
            memory,
            link: Rc::new(RefCell::new(NbdLink::new(config, host).unwrap())),
            device: None,
            model: pipe.disk.clone(),
            pipe,
            events: Vec::new(),
            rng: FuzzRng::new(seed ^ 0x5eed),
            outstanding: HashMap::new(),
            free_regions: (0..regions).collect(),
            results: HashMap::new(),
            next_tag: 1 << 40,
            allocations: 0,
            completions: vec![Completion::default(); usize::from(DEPTH)],
        }
    }

    fn opened(seed: u64) -> Rig {
        let mut rig = Rig::new(SimServerOptions::everything(b"disk0"), seed);
        rig.turns(10);
        assert!(rig.device.is_some(), "not open: {:?}", rig.events);
        rig
    }

    fn now(&self) -> u64 {
        self.clock.get()
    }

    /// One loop turn: the network steps, the link is pumped, completions
    /// are collected and checked; the clock moves on.
    fn turn(&mut self) -> LinkPump {
        self.pipe.step();
        let (pump, allocations) = count(|| self.link.borrow_mut().pump(&mut self.pipe));
        self.allocations += allocations;
        if let Some(event) = pump.event {
            self.events.push(event);
        }
        if self.device.is_none() && self.link.borrow().opening_status() == OpeningStatus::Ready {
            self.device = NbdDevice::new(self.link.clone());
        }
        self.collect();
        self.clock.set(self.now() + TURN_NS);
        pump
    }

    fn turns(&mut self, n: usize) {
        (0..n).for_each(|_| {
            self.turn();
        });
    }

    /// Turns until nothing is outstanding (or `limit` turns).
    fn drain(&mut self, limit: usize) {
        for _ in 0..limit {
            if self.outstanding.is_empty() {
                return;
            }
            self.turn();
        }
        panic!(
            "{} requests still outstanding; events {:?}",
            self.outstanding.len(),
            self.events
        );
    }

    fn collect(&mut self) {
        let Some(device) = &mut self.device else {
            return;
        };
        let (n, allocations) = count(|| device.poll(0, &mut self.completions));
        self.allocations += allocations;
        for index in 0..n {
            self.finish(self.completions[index]);
        }
    }

    fn finish(&mut self, done: Completion) {
        let request = self.outstanding.remove(&done.tag).expect("unknown tag");
        self.results.entry(done.tag).or_default().push(done.result);
        self.free_regions.push(request.region);
        if done.result.is_err() {
            return;
        }
        let range = request.offset..request.offset + request.len;
        match request.kind {
            Kind::Read => {
                let got = self.gather(&request.segments);
                assert!(
                    got == self.model[range],
                    "read {} returned other data",
                    done.tag
                );
            }
            Kind::Write(data) => self.model[range].copy_from_slice(&data),
            Kind::Zeroes => self.model[range].fill(0),
            Kind::Flush => {}
        }
    }

    fn gather(&self, segments: &[Segment]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for s in segments {
            let at = (s.phys - GUEST_BASE) as usize;
            bytes.extend(
                self.memory.cells[at..at + s.len as usize]
                    .iter()
                    .map(Cell::get),
            );
        }
        bytes
    }

    fn scatter(&self, segments: &[Segment], data: &[u8]) {
        let mut from = 0;
        for s in segments {
            let at = (s.phys - GUEST_BASE) as usize;
            for (cell, &byte) in self.memory.cells[at..at + s.len as usize]
                .iter()
                .zip(&data[from..])
            {
                cell.set(byte);
            }
            from += s.len as usize;
        }
    }

    /// Segments of `len` bytes in `region`: one per page, each 512-byte
    /// aligned within it, as blkif's are.
    fn segments(&mut self, region: usize, len: usize) -> Vec<Segment> {
        let mut segments = Vec::new();
        let mut left = len;
        let mut page = 0;
        while left > 0 {
            // Enough in each so that the rest fits the segments left.
            let (left_sectors, segments_left) =
                (left / 512, usize::from(MAX_SEGMENTS) - segments.len());
            let least = left_sectors.saturating_sub(8 * (segments_left - 1)).max(1) as u64;
            let most = left_sectors.min(8) as u64;
            let sectors = least + self.rng.below(most - least + 1);
            let first = self.rng.below(8 - sectors + 1);
            let phys = GUEST_BASE + (region * REGION_BYTES + page * PAGE) as u64 + first * 512;
            segments.push(Segment {
                phys,
                len: sectors as u32 * 512,
            });
            left -= sectors as usize * 512;
            page += 1;
        }
        segments
    }

    /// A range no request in flight conflicts with (writes overlap
    /// nothing in flight, reads no write in flight).
    fn free_range(&mut self, len: usize, changes: bool) -> Option<usize> {
        for _ in 0..20 {
            let offset = self.rng.below(((DISK_BYTES - len) / 512) as u64) as usize * 512;
            let clash = self.outstanding.values().any(|o| {
                let overlaps = offset < o.offset + o.len && o.offset < offset + len;
                overlaps && (changes || !matches!(o.kind, Kind::Read))
            });
            if !clash {
                return Some(offset);
            }
        }
        None
    }

    fn submit(&mut self, kind: Kind, offset: usize, len: usize) -> Result<u64, SubmitError> {
        let region = self.free_regions.pop().expect("no free region");
        let segments = match kind {
            Kind::Read | Kind::Write(_) => self.segments(region, len),
            _ => Vec::new(),
        };
        if let Kind::Write(data) = &kind {
            self.scatter(&segments, data);
        }
        let lba = (offset / 512) as u64;
        let request = match kind {
            Kind::Read => Request::Read {
                lba,
                segments: &segments,
            },
            Kind::Write(_) => Request::Write {
                lba,
                segments: &segments,
            },
            Kind::Flush => Request::Flush,
            Kind::Zeroes => Request::WriteZeroes {
                lba,
                blocks: (len / 512) as u64,
            },
        };
        let tag = self.next_tag;
        let device = self.device.as_mut().expect("not open");
        let (submitted, allocations) = count(|| device.submit(0, tag, request));
        self.allocations += allocations;
        if let Err(e) = submitted {
            self.free_regions.push(region);
            return Err(e);
        }
        self.next_tag += 1;
        let outstanding = Outstanding {
            kind,
            offset,
            len,
            region,
            segments,
        };
        self.outstanding.insert(tag, outstanding);
        Ok(tag)
    }

    /// Submits a random request while the queue has room.
    fn submit_random(&mut self) {
        if self.outstanding.len() >= usize::from(DEPTH) {
            return;
        }
        let len = 512 * (1 + self.rng.below(REGION_BYTES as u64 / 512 / 2)) as usize;
        let choice = self.rng.below(20);
        let changes = choice >= 9;
        let Some(offset) = self.free_range(len, changes) else {
            return;
        };
        let kind = match choice {
            0..=8 => Kind::Read,
            9..=17 => {
                let mut data = vec![0; len];
                self.rng.fill(&mut data);
                Kind::Write(data)
            }
            18 => Kind::Flush,
            _ => Kind::Zeroes,
        };
        let (offset, len) = match kind {
            Kind::Flush => (0, 0),
            _ => (offset, len),
        };
        match self.submit(kind, offset, len) {
            Ok(_) | Err(SubmitError::QueueFull) => {}
            Err(e) => panic!("submit refused: {e:?}"),
        }
    }

    /// Every request submitted completed exactly once, with `want`.
    fn assert_all_completed(&self, want: Result<(), IoError>) {
        assert!(self.outstanding.is_empty());
        for (tag, results) in &self.results {
            assert_eq!(results, &[want], "tag {tag}");
        }
    }

    /// The disk as the server holds it matches the model.
    fn assert_disk_matches_model(&self) {
        assert!(self.pipe.disk == self.model, "the server's disk differs");
    }
}

#[test]
fn random_io_matches_the_disk_and_allocates_nothing_per_request() {
    for seed in 0..4 {
        let mut rig = Rig::opened(seed);
        rig.allocations = 0;
        for _ in 0..3000 {
            rig.submit_random();
            rig.turn();
        }
        rig.drain(1000);
        assert!(rig.results.len() > 1000, "{} requests", rig.results.len());
        rig.assert_all_completed(Ok(()));
        rig.assert_disk_matches_model();
        assert_eq!(rig.allocations, 0, "seed {seed}");
        assert_eq!(rig.events.len(), 1, "{:?}", rig.events);
    }
}

#[test]
fn the_first_connection_is_logged_with_the_export() {
    let rig = Rig::opened(1);
    let LinkEvent::Connected(export) = rig.events[0] else {
        panic!("{:?}", rig.events);
    };
    assert_eq!(export.size, DISK_BYTES as u64);
    let link = rig.link.borrow();
    let line = std::format!("{}", link.describe(&rig.events[0]));
    assert_eq!(
        line,
        "connected to 10.0.0.2:10809 export \"disk0\": 4194304 bytes, flags flush fua trim \
         write-zeroes multi-conn structured-replies, block sizes 512/4096/1048576"
    );
}

#[test]
fn geometry_follows_the_export() {
    let rig = Rig::opened(2);
    let geometry = rig.device.as_ref().unwrap().geometry();
    assert_eq!(geometry.logical_block_size, 512);
    assert_eq!(geometry.physical_block_size, 4096);
    assert_eq!(geometry.blocks, DISK_BYTES as u64 / 512);
    assert!(geometry.volatile_write_cache);
    assert_eq!(geometry.discard_granularity, Some(1));
    assert!(geometry.max_write_zeroes_blocks > 0);
    assert_eq!(geometry.max_transfer_bytes, 1 << 20);
    assert_eq!(geometry.queue_depth, DEPTH);
    assert_eq!(geometry.max_segments, MAX_SEGMENTS);
    // A server with no flags beyond HAS_FLAGS and no block size info.
    let mut plain = SimServerOptions::everything(b"disk0");
    plain.transmission_flags = 1;
    plain.block_size = None;
    let mut rig = Rig::new(plain, 3);
    rig.turns(10);
    let geometry = rig.device.as_ref().unwrap().geometry();
    assert_eq!(geometry.logical_block_size, 512);
    assert!(!geometry.volatile_write_cache);
    assert_eq!(geometry.discard_granularity, None);
    assert_eq!(geometry.max_write_zeroes_blocks, 0);
    // Big blocks and a small maximum.
    let mut big = SimServerOptions::everything(b"disk0");
    big.block_size = Some((4096, 65536, 65536 + 512));
    let mut rig = Rig::new(big, 4);
    rig.turns(10);
    let geometry = rig.device.as_ref().unwrap().geometry();
    assert_eq!(geometry.logical_block_size, 4096);
    assert_eq!(geometry.physical_block_size, 65536);
    assert_eq!(geometry.max_transfer_bytes, 65536);
}

#[test]
fn a_flush_is_sent_only_after_the_writes_before_it_are_answered() {
    let mut rig = Rig::opened(5);
    rig.pipe.hold_replies = true;
    let writes: Vec<u64> = (0..4)
        .map(|i| {
            rig.submit(Kind::Write(vec![i as u8; 4096]), i * 8192, 4096)
                .unwrap()
        })
        .collect();
    let flush = rig.submit(Kind::Flush, 0, 0).unwrap();
    rig.turns(20);
    let seen = |rig: &Rig| rig.pipe.server.as_ref().unwrap().seen.clone();
    assert_eq!(seen(&rig).len(), 4, "the flush went out early");
    rig.pipe.hold_replies = false;
    rig.drain(100);
    let seen = seen(&rig);
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[4].command, 3, "NBD_CMD_FLUSH last");
    for tag in writes.iter().chain([&flush]) {
        assert_eq!(rig.results[tag], [Ok(())]);
    }
}

#[test]
fn a_server_killed_mid_stream_and_restarted_loses_no_request() {
    let mut partial_kills = 0;
    for seed in 10..16 {
        let mut rig = Rig::opened(seed);
        rig.allocations = 0;
        let mut kills = 0;
        let mut restart_at = None;
        for turn in 0..6000 {
            rig.submit_random();
            rig.turn();
            if turn % 500 == 250 && rig.pipe.state == TransportState::Established {
                let in_flight = rig.link.borrow().in_flight();
                let replies_unread = rig
                    .pipe
                    .server
                    .as_ref()
                    .is_some_and(|s| !s.output.is_empty());
                partial_kills += usize::from(replies_unread);
                assert!(in_flight > 0, "seed {seed}: nothing in flight at the kill");
                rig.pipe.kill();
                kills += 1;
                // Back within 1.5 s: well inside the requests' deadline.
                restart_at = Some(turn + 1 + rig.rng.below(1500) as usize);
            }
            if restart_at == Some(turn) {
                rig.pipe.up = true;
            }
        }
        rig.pipe.up = true;
        rig.drain(20_000);
        rig.assert_all_completed(Ok(()));
        rig.assert_disk_matches_model();
        let reconnected = rig
            .events
            .iter()
            .filter(|e| matches!(e, LinkEvent::Reconnected { .. }))
            .count();
        assert_eq!(reconnected, kills, "seed {seed}: {:?}", rig.events);
        assert_eq!(rig.link.borrow().reconnects(), kills as u64);
        assert!(
            rig.events
                .iter()
                .any(|e| matches!(e, LinkEvent::Reconnected { replayed } if *replayed > 0))
        );
        assert_eq!(rig.allocations, 0, "seed {seed}");
    }
    assert!(partial_kills > 0, "no kill caught a reply half read");
}

#[test]
fn a_server_that_never_comes_back_fails_requests_at_their_deadline() {
    let mut rig = Rig::opened(20);
    rig.pipe.hold_replies = true;
    let submitted_at = rig.now();
    for i in 0..6 {
        rig.submit(Kind::Read, i * 4096, 4096).unwrap();
    }
    rig.submit(Kind::Write(vec![7; 4096]), 1 << 20, 4096)
        .unwrap();
    rig.turns(5);
    rig.pipe.kill();
    while rig.now() < submitted_at + REQUEST_TIMEOUT_NS - TURN_NS {
        rig.turn();
        assert!(rig.results.is_empty(), "failed before the deadline");
    }
    rig.turns(2);
    assert_eq!(rig.results.len(), 7);
    rig.assert_all_completed(Err(IoError::Timeout));
    // The waits between attempts: 100 ms doubling to 2 s, then 2 s.
    let waits: Vec<u64> = rig
        .events
        .iter()
        .filter_map(|e| match e {
            LinkEvent::Lost { retry_in_ns, .. } => Some(retry_in_ns / 1_000_000),
            _ => None,
        })
        .collect();
    assert_eq!(
        waits[..7],
        [100, 200, 400, 800, 1600, 2000, 2000],
        "{waits:?}"
    );
    let first_loss = rig
        .events
        .iter()
        .find(|e| matches!(e, LinkEvent::Lost { .. }));
    let link = rig.link.borrow();
    let line = std::format!("{}", link.describe(first_loss.unwrap()));
    assert_eq!(
        line,
        "connection lost (closed or reset by the server); reconnecting in 100 ms"
    );
    let refused = std::format!("{}", link.describe(rig.events.last().unwrap()));
    assert!(
        refused.starts_with("connection lost (refused or reset while connecting)"),
        "{refused}"
    );
    drop(link);
    // New requests wait for a server too, and fail the same way.
    let late = rig.submit(Kind::Read, 0, 512).unwrap();
    let at = rig.now();
    while rig.now() <= at + REQUEST_TIMEOUT_NS + TURN_NS {
        rig.turn();
    }
    assert_eq!(rig.results[&late], [Err(IoError::Timeout)]);
}

#[test]
fn a_silent_server_is_left_and_its_requests_replayed() {
    let mut rig = Rig::opened(21);
    rig.pipe.hold_replies = true;
    let tag = rig.submit(Kind::Read, 0, 4096).unwrap();
    let at = rig.now();
    while rig.now() < at + STALL_TIMEOUT_NS + 10 * TURN_NS {
        rig.turn();
    }
    assert!(rig.events.contains(&LinkEvent::Lost {
        reason: LossReason::Stalled,
        retry_in_ns: BACKOFF_FIRST_NS
    }));
    rig.pipe.hold_replies = false;
    rig.drain(1000);
    assert_eq!(rig.results[&tag], [Ok(())]);
    assert!(rig.events.contains(&LinkEvent::Reconnected { replayed: 1 }));
}

#[test]
fn garbage_from_the_server_ends_the_connection_and_requests_survive() {
    for seed in 30..60 {
        let mut rig = Rig::opened(seed);
        for _ in 0..50 {
            rig.submit_random();
            rig.turn();
        }
        // At a reply's boundary: every released reply read, none coming.
        rig.pipe.hold_replies = true;
        while rig
            .pipe
            .server
            .as_ref()
            .is_some_and(|s| !s.output.is_empty())
        {
            rig.turn();
        }
        let mut garbage = vec![0; 1 + rig.rng.below(4096) as usize];
        rig.rng.fill(&mut garbage);
        rig.pipe.garbage = garbage;
        rig.turns(3);
        rig.pipe.garbage.clear();
        rig.pipe.hold_replies = false;
        assert!(
            rig.events.iter().any(|e| matches!(
                e,
                LinkEvent::Lost {
                    reason: LossReason::Protocol(_),
                    ..
                }
            )),
            "seed {seed}: {:?}",
            rig.events
        );
        rig.drain(20_000);
        rig.assert_all_completed(Ok(()));
        rig.assert_disk_matches_model();
    }
}

#[test]
fn garbage_instead_of_a_handshake_fails_the_open() {
    for seed in 0..50u64 {
        let mut rig = Rig::new(SimServerOptions::everything(b"disk0"), seed);
        let mut garbage = vec![0; 1 + rig.rng.below(200) as usize];
        rig.rng.fill(&mut garbage);
        rig.pipe.garbage = garbage;
        rig.turns(5);
        let status = rig.link.borrow().opening_status();
        // Random bytes that happen to be valid are not to be expected.
        assert!(
            matches!(status, OpeningStatus::Failed(LossReason::Protocol(_)))
                || status == OpeningStatus::Connecting,
            "seed {seed}: {status:?}"
        );
        assert!(rig.device.is_none());
    }
}

#[test]
fn an_unknown_export_fails_the_open_at_once() {
    let mut rig = Rig::new(SimServerOptions::everything(b"other"), 40);
    rig.turns(5);
    let status = rig.link.borrow().opening_status();
    assert!(
        matches!(
            status,
            OpeningStatus::Failed(LossReason::Protocol(NbdConnectionError::Refused { .. }))
        ),
        "{status:?}"
    );
}

#[test]
fn an_unreachable_server_fails_the_open_after_its_timeout() {
    for blackhole in [false, true] {
        let mut rig = Rig::new(SimServerOptions::everything(b"disk0"), 41);
        rig.pipe.up = false;
        rig.pipe.blackhole = blackhole;
        while rig.now() < 1_000_000_000 + OPEN_TIMEOUT_NS - TURN_NS {
            rig.turn();
            assert_eq!(
                rig.link.borrow().opening_status(),
                OpeningStatus::Connecting
            );
        }
        rig.turns(2);
        let want = match blackhole {
            true => LossReason::ConnectTimeout,
            false => LossReason::Refused,
        };
        assert_eq!(
            rig.link.borrow().opening_status(),
            OpeningStatus::Failed(want)
        );
        let first = std::format!("{}", rig.link.borrow().describe(&rig.events[0]));
        assert!(
            first.starts_with("cannot connect to 10.0.0.2:10809 ("),
            "{first}"
        );
        assert!(rig.pipe.connects > 5, "{} attempts", rig.pipe.connects);
    }
    // A server that comes up in time opens.
    let mut rig = Rig::new(SimServerOptions::everything(b"disk0"), 42);
    rig.pipe.up = false;
    rig.turns(3000);
    rig.pipe.up = true;
    rig.turns(2100);
    assert_eq!(rig.link.borrow().opening_status(), OpeningStatus::Ready);
}

#[test]
fn an_export_whose_size_changed_fails_its_requests() {
    let mut rig = Rig::opened(50);
    rig.pipe.hold_replies = true;
    let tag = rig.submit(Kind::Read, 0, 4096).unwrap();
    rig.turns(3);
    rig.pipe.kill();
    rig.pipe.disk.truncate(DISK_BYTES / 2);
    rig.pipe.up = true;
    rig.pipe.hold_replies = false;
    rig.turns(500);
    assert_eq!(rig.results[&tag], [Err(IoError::Media)]);
    let failed = LinkEvent::Failed(LossReason::Protocol(
        NbdConnectionError::ExportSizeChanged {
            was: DISK_BYTES as u64,
            now: DISK_BYTES as u64 / 2,
        },
    ));
    assert_eq!(rig.events.last(), Some(&failed));
    assert!(matches!(
        rig.link.borrow().opening_status(),
        OpeningStatus::Failed(_)
    ));
    let refused = rig.submit(Kind::Read, 0, 512);
    assert_eq!(refused, Err(SubmitError::DeviceFailed));
}

#[test]
fn unreachable_segments_are_refused() {
    let mut rig = Rig::opened(60);
    let outside = [Segment {
        phys: 0x1000,
        len: 512,
    }];
    let device = rig.device.as_mut().unwrap();
    let read = Request::Read {
        lba: 0,
        segments: &outside,
    };
    assert_eq!(device.submit(0, 1, read), Err(SubmitError::BadAddress));
    assert_eq!(
        device.submit(1, 1, Request::Flush),
        Err(SubmitError::NoSuchQueue)
    );
}

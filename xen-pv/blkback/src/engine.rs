//! The ring engine: one connected blkif ring served from one disk.
//!
//! Each request is copied out of the shared ring once, parsed and checked
//! against the disk, its grants mapped in one batch with the others of the
//! same poll, and run as a short list of device steps (a barrier is a
//! flush, the write and a flush, after every older request finished).
//! Grants are unmapped before the response is published.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::mem::size_of;
use core::ptr::NonNull;

use blockdev::{Completion, DiskView, Geometry, QueueHandle, SubmitError};

use crate::Services;
use crate::blkif::{self, Direction, Protocol, Request};
use crate::persistent::PersistentGrants;
use crate::target::OpenError;
use xen_pv::event::Port;
use xen_pv::grant::{GrantError, GrantRef, GrantSpec, Mapping};
use xen_pv::ring::{BackRing, RingError};
use xen_pv::{DomId, PAGE_SIZE};

/// Bytes in a blkif sector: every sector number on the ring and in
/// xenstore counts these, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;

/// Log lines one vbd may print per second; the rest are counted.
pub const MAX_LOG_LINES_PER_SECOND: u32 = 10;

/// Rounds of complete / start / consume in one [`Ring::poll`], so a device
/// that completes at once is answered in the same poll without a frontend
/// being able to keep the loop busy forever.
const ROUNDS_PER_POLL: usize = 4;

/// Device completions fetched per call.
const COMPLETION_BATCH: usize = 32;

/// Rings one vbd serves at most (`multi-queue-max-queues`), each with a
/// queue handle of its own.
pub const MAX_QUEUES: u16 = 4;

/// Most segments of an indirect request (`feature-max-indirect-segments`,
/// Linux blkback's default): 1 MiB per request.
pub const MAX_INDIRECT_SEGMENTS: u16 = 256;

/// Segment entries in one indirect page.
const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / size_of::<blkif::WireSegment>();

/// Data grants one ring may hold mapped (4 MiB in flight); no request is
/// taken that could go beyond it. The kernel's GFN window needs this many
/// frames per connected ring, plus one for each ring page.
pub const MAX_MAPPED_GRANTS_PER_RING: usize = 1024;

/// The disk behind a vbd and what the frontend may do with it.
pub struct ServedDisk {
    view: DiskView,
    geometry: Geometry,
    read_only: bool,
    /// blkif sectors per logical block.
    sectors_per_block: u64,
}

impl ServedDisk {
    /// Checks that `view` can be served over blkif: a logical block of a
    /// whole number of 512-byte sectors, and at least one block.
    pub fn new(view: DiskView, read_only: bool) -> Result<ServedDisk, OpenError> {
        let geometry = view.geometry();
        let block = u64::from(geometry.logical_block_size);
        if block < SECTOR_SIZE || !block.is_multiple_of(SECTOR_SIZE) || geometry.blocks == 0 {
            return Err(OpenError::BadGeometry);
        }
        if geometry.blocks.checked_mul(block / SECTOR_SIZE).is_none() || geometry.queues == 0 {
            return Err(OpenError::BadGeometry);
        }
        Ok(ServedDisk {
            view,
            geometry,
            read_only,
            sectors_per_block: block / SECTOR_SIZE,
        })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Capacity in 512-byte sectors (the `sectors` node).
    pub fn sectors(&self) -> u64 {
        self.geometry.blocks * self.sectors_per_block
    }

    /// Segments advertised for indirect requests; 0 when the device takes
    /// no more than a direct request carries.
    pub fn max_indirect_segments(&self) -> u16 {
        let by_transfer = self.geometry.max_transfer_bytes / PAGE_SIZE as u32;
        let limit = u32::from(MAX_INDIRECT_SEGMENTS)
            .min(u32::from(self.geometry.max_segments))
            .min(by_transfer);
        if limit > blkif::MAX_SEGMENTS_PER_REQUEST as u32 {
            limit as u16
        } else {
            0
        }
    }

    /// Rings a frontend may open (`multi-queue-max-queues`): one per
    /// hardware queue, up to [`MAX_QUEUES`].
    pub fn max_queues(&self) -> u16 {
        self.geometry.queues.clamp(1, MAX_QUEUES)
    }

    /// Whether flushes are advertised and accepted.
    pub fn flushes(&self) -> bool {
        self.geometry.volatile_write_cache
    }

    /// Discard granularity in bytes, when discard is advertised.
    pub fn discard_granularity_bytes(&self) -> Option<u64> {
        self.geometry
            .discard_granularity
            .filter(|_| self.geometry.max_discard_blocks > 0)
            .map(|g| u64::from(g.max(1)) * u64::from(self.geometry.logical_block_size))
    }

    /// The logical block of blkif `sector`, if it starts one.
    fn block_of(&self, sector: u64) -> Option<u64> {
        sector
            .is_multiple_of(self.sectors_per_block)
            .then(|| sector / self.sectors_per_block)
    }
}

/// Prints at most [`MAX_LOG_LINES_PER_SECOND`] lines a second for one vbd.
pub struct RateLimitedLog {
    label: String,
    window_start_ns: u64,
    lines_in_window: u32,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(label: String) -> Self {
        RateLimitedLog {
            label,
            window_start_ns: 0,
            lines_in_window: 0,
            suppressed: 0,
        }
    }

    pub fn line<S: Services>(&mut self, svc: &mut S, args: fmt::Arguments<'_>) {
        let now = svc.now_ns();
        if now.saturating_sub(self.window_start_ns) >= 1_000_000_000 {
            if self.suppressed > 0 {
                let (label, n) = (&self.label, self.suppressed);
                svc.log(format_args!("{label}: {n} more messages suppressed"));
            }
            self.window_start_ns = now;
            self.lines_in_window = 0;
            self.suppressed = 0;
        }
        if self.lines_in_window < MAX_LOG_LINES_PER_SECOND {
            self.lines_in_window += 1;
            let label = &self.label;
            svc.log(format_args!("{label}: {args}"));
        } else {
            self.suppressed += 1;
        }
    }
}

/// One device operation of a request.
#[derive(Clone, Copy, Debug)]
enum Step {
    Read { lba: u64 },
    Write { lba: u64 },
    Flush,
    Discard { lba: u64, blocks: u64 },
}

/// A request accepted from the ring, until its response is queued.
struct InFlight {
    id: u64,
    operation: u8,
    steps: VecDeque<Step>,
    /// The granted data, in request order.
    segments: Vec<blockdev::Segment>,
    /// Grants mapped for this request alone.
    mappings: Vec<Mapping>,
    /// Persistent grants it uses.
    kept: Vec<GrantRef>,
    status: i16,
    /// Whether its steps may run (a barrier waits for the older requests).
    started: bool,
    on_device: bool,
}

/// What a valid request needs: its steps and the grants to map.
struct Plan {
    id: u64,
    operation: u8,
    steps: VecDeque<Step>,
    segments: Vec<blkif::Segment>,
    map_readonly: bool,
    barrier: bool,
}

impl Plan {
    fn new(id: u64, operation: u8, steps: &[Step], segments: Vec<blkif::Segment>) -> Plan {
        Plan {
            id,
            operation,
            steps: steps.iter().copied().collect(),
            segments,
            map_readonly: true,
            barrier: false,
        }
    }
}

/// A refusal: the status to answer with and why (for the log).
type Refusal = (i16, &'static str);

/// A refused request: its id, operation and refusal.
type Refused = (u64, u8, Refusal);

/// Plans a request that carries its segments in the ring entry (an
/// indirect one goes through [`plan_data`] once its segments are read).
fn plan(request: &Request, disk: &ServedDisk) -> Result<Plan, Refused> {
    match *request {
        Request::ReadWrite {
            id,
            direction,
            sector,
            segments,
            ..
        } => plan_data(id, direction, sector, segments.as_slice().to_vec(), disk),
        Request::Barrier {
            id,
            sector,
            segments,
            ..
        } => {
            let operation = blkif::OP_WRITE_BARRIER;
            let steps: &[Step] = if segments.as_slice().is_empty() {
                &[Step::Flush]
            } else {
                let lba = check_data(disk, sector, segments.as_slice(), true)
                    .map_err(|r| (id, operation, r))?;
                if disk.flushes() {
                    &[Step::Flush, Step::Write { lba }, Step::Flush]
                } else {
                    &[Step::Write { lba }]
                }
            };
            Ok(Plan {
                barrier: true,
                ..Plan::new(id, operation, steps, segments.as_slice().to_vec())
            })
        }
        Request::Flush { id } => {
            let operation = blkif::OP_FLUSH_DISKCACHE;
            if !disk.flushes() {
                let refusal = (blkif::RSP_EOPNOTSUPP, "flush not advertised");
                return Err((id, operation, refusal));
            }
            Ok(Plan::new(id, operation, &[Step::Flush], Vec::new()))
        }
        Request::Discard {
            id,
            sector,
            nr_sectors,
            secure,
        } => plan_discard(id, sector, nr_sectors, secure, disk),
        Request::Indirect { id, .. } => {
            // `take_requests` fetches the segments of indirect requests and
            // plans them with `plan_data`; refuse rather than panic if one
            // ever gets here.
            let refusal = (blkif::RSP_ERROR, "indirect request not fetched");
            Err((id, blkif::OP_INDIRECT, refusal))
        }
    }
}

/// Plans a read or write of `segments` from `sector`.
fn plan_data(
    id: u64,
    direction: Direction,
    sector: u64,
    segments: Vec<blkif::Segment>,
    disk: &ServedDisk,
) -> Result<Plan, Refused> {
    let (operation, write) = match direction {
        Direction::Read => (blkif::OP_READ, false),
        Direction::Write => (blkif::OP_WRITE, true),
    };
    let lba = check_data(disk, sector, &segments, write).map_err(|r| (id, operation, r))?;
    let step = if write {
        Step::Write { lba }
    } else {
        Step::Read { lba }
    };
    Ok(Plan {
        map_readonly: write,
        ..Plan::new(id, operation, &[step], segments)
    })
}

fn plan_discard(
    id: u64,
    sector: u64,
    nr_sectors: u64,
    secure: bool,
    disk: &ServedDisk,
) -> Result<Plan, Refused> {
    let operation = blkif::OP_DISCARD;
    let refuse = |r: Refusal| Err((id, operation, r));
    if disk.discard_granularity_bytes().is_none() {
        return refuse((blkif::RSP_EOPNOTSUPP, "discard not advertised"));
    }
    if secure {
        return refuse((blkif::RSP_EOPNOTSUPP, "secure discard not advertised"));
    }
    if disk.read_only {
        return refuse((blkif::RSP_ERROR, "discard on a read-only disk"));
    }
    let end = sector.checked_add(nr_sectors);
    if end.is_none_or(|end| end > disk.sectors()) {
        return refuse((blkif::RSP_ERROR, "discard beyond the disk"));
    }
    let (Some(lba), Some(blocks)) = (disk.block_of(sector), disk.block_of(nr_sectors)) else {
        return refuse((blkif::RSP_ERROR, "discard not aligned to the block size"));
    };
    let steps: &[Step] = if blocks == 0 {
        &[]
    } else {
        &[Step::Discard { lba, blocks }]
    };
    Ok(Plan::new(id, operation, steps, Vec::new()))
}

/// Checks a read or write against the disk; returns its first block.
fn check_data(
    disk: &ServedDisk,
    sector: u64,
    segments: &[blkif::Segment],
    write: bool,
) -> Result<u64, Refusal> {
    if write && disk.read_only {
        return Err((blkif::RSP_ERROR, "write to a read-only disk"));
    }
    let mut total = 0u64;
    for s in segments {
        let aligned = disk.block_of(u64::from(s.first_sect)).is_some()
            && disk.block_of(u64::from(s.sectors())).is_some();
        if !aligned {
            return Err((blkif::RSP_ERROR, "segment not aligned to the block size"));
        }
        total += u64::from(s.sectors());
    }
    let end = sector.checked_add(total);
    if end.is_none_or(|end| end > disk.sectors()) {
        return Err((blkif::RSP_ERROR, "sectors beyond the disk"));
    }
    disk.block_of(sector)
        .ok_or((blkif::RSP_ERROR, "sector not aligned to the block size"))
}

/// Most pages of a ring, as an order (`max-ring-page-order`, Linux
/// blkback's default): 16 pages, 512 requests.
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// What a frontend published for its ring (its xenstore directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendRing {
    /// The frontend domain.
    pub domid: DomId,
    /// `ring-ref`, or `ring-ref0..` for a ring of `1 << ring-page-order`
    /// pages: the grants of the shared ring's pages, in order.
    pub ring_refs: Vec<GrantRef>,
    /// `event-channel`: the frontend's unbound port.
    pub event_channel: u32,
    /// `protocol`: the ABI of the ring entries.
    pub protocol: Protocol,
    /// `feature-persistent`: the frontend keeps its data grants.
    pub persistent: bool,
}

/// Why a ring could not be connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// The disk gave no queue handle.
    Queue(blockdev::ClaimError),
    /// A ring page grant could not be mapped.
    RingGrant(GrantError),
    /// A mapped ring page has no (aligned) address in this domain.
    RingAddress,
    /// No ring pages, or more than `max-ring-page-order` allows.
    RingSize,
    /// The frontend's event channel could not be bound.
    EventChannel(xen_pv::Errno),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Queue(e) => write!(f, "opening a disk queue failed: {e:?}"),
            ConnectError::RingGrant(e) => write!(f, "mapping ring-ref failed: {e:?}"),
            ConnectError::RingAddress => f.write_str("ring page has no address"),
            ConnectError::RingSize => f.write_str("ring size not offered"),
            ConnectError::EventChannel(e) => write!(f, "binding event-channel failed: {e:?}"),
        }
    }
}

/// A connected ring.
pub struct Ring {
    frontend: DomId,
    protocol: Protocol,
    port: Port,
    /// The disk queue this ring alone submits on and polls.
    queue: QueueHandle,
    /// Valid while `ring_mappings` are mapped, i.e. until `close`.
    ring: BackRing<'static>,
    ring_mappings: Vec<Mapping>,
    slots: Vec<Option<InFlight>>,
    in_flight: usize,
    /// The slot of the barrier being drained or run; no request is taken
    /// from the ring meanwhile.
    barrier: Option<usize>,
    /// No more requests are taken (disconnecting).
    stopped: bool,
    to_unmap: Vec<Mapping>,
    responses_queued: bool,
    /// What `feature-max-indirect-segments` promised (0: none).
    max_indirect: u16,
    /// Data grants mapped for requests in flight (not the kept ones).
    mapped_grants: usize,
    /// The grants kept mapped, when the frontend asked for it.
    persistent: Option<PersistentGrants>,
}

/// Where a segment's page comes from.
enum PageSource {
    /// A persistent grant mapped at this frame.
    Kept(u64),
    /// The next result of this poll's map batch.
    Mapped,
}

/// An indirect request whose segments are still in the frontend's pages.
struct IndirectFetch {
    slot: usize,
    id: u64,
    direction: Direction,
    sector: u64,
    nr_segments: usize,
    pages: Vec<GrantRef>,
}

impl Ring {
    /// Opens a disk queue for the ring, maps the frontend's ring page,
    /// attaches to it and binds its event channel. At most the disk's
    /// queue depth of requests are held at a time (and no more than the
    /// ring size).
    pub fn connect<S: Services>(
        svc: &mut S,
        frontend: &FrontendRing,
        disk: &ServedDisk,
    ) -> Result<Ring, ConnectError> {
        let FrontendRing {
            domid,
            ref ring_refs,
            event_channel,
            protocol,
            persistent,
        } = *frontend;
        if ring_refs.is_empty() || ring_refs.len() > 1 << MAX_RING_PAGE_ORDER {
            return Err(ConnectError::RingSize);
        }
        let queue = disk.view.open_queue().map_err(ConnectError::Queue)?;
        let specs: Vec<GrantSpec> = ring_refs
            .iter()
            .map(|&gref| GrantSpec {
                domid,
                gref,
                readonly: false,
            })
            .collect();
        let mut mappings = Vec::with_capacity(specs.len());
        let mut failure = None;
        for result in svc.map_grants(&specs) {
            match result {
                Ok(m) => mappings.push(m),
                Err(e) => failure = failure.or(Some(ConnectError::RingGrant(e))),
            }
        }
        let pages: Vec<NonNull<u8>> = mappings
            .iter()
            .filter_map(|m| svc.frame_address(m.gfn))
            .filter(|p| (p.as_ptr() as usize).is_multiple_of(8))
            .collect();
        if failure.is_none() && pages.len() != ring_refs.len() {
            failure = Some(ConnectError::RingAddress);
        }
        if let Some(e) = failure {
            unmap_logged(svc, mappings);
            return Err(e);
        }
        let port = match svc.bind_interdomain(domid, event_channel) {
            Ok(port) => port,
            Err(e) => {
                unmap_logged(svc, mappings);
                return Err(ConnectError::EventChannel(e));
            }
        };
        // SAFETY: `frame_address` gives where each page mapped at a
        // mapping's frame is, the first 8-byte aligned (all are checked);
        // they stay mapped until `close`, which ends this view first.
        let ring = unsafe { BackRing::attach_pages(&pages, protocol.entry_size()) };
        let slots = usize::from(disk.geometry.queue_depth).clamp(1, ring.size() as usize);
        Ok(Ring {
            frontend: domid,
            protocol,
            port,
            queue,
            ring,
            ring_mappings: mappings,
            slots: (0..slots).map(|_| None).collect(),
            in_flight: 0,
            barrier: None,
            stopped: false,
            to_unmap: Vec::new(),
            responses_queued: false,
            max_indirect: disk.max_indirect_segments(),
            mapped_grants: 0,
            persistent: persistent.then(PersistentGrants::default),
        })
    }

    /// Requests accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Stops taking requests; those on the device finish, those not yet
    /// started are answered with an error.
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// Whether the ring may be closed (stopped and nothing in flight).
    pub fn drained(&self) -> bool {
        self.stopped && self.in_flight == 0
    }

    /// Unmaps the ring page and closes the port. Call once [`Self::drained`].
    pub fn close<S: Services>(self, svc: &mut S) {
        debug_assert!(self.drained());
        // Consuming `self` ends the ring view before its page goes.
        let Ring {
            port,
            ring_mappings,
            to_unmap,
            persistent,
            ..
        } = self;
        let mut mappings = to_unmap;
        mappings.extend(
            persistent
                .map(PersistentGrants::into_mappings)
                .unwrap_or_default(),
        );
        mappings.extend(ring_mappings);
        unmap_logged(svc, mappings);
        svc.close_port(port);
    }

    /// Does the work the ring and the disk have: completions, new requests,
    /// responses, notification; re-arms the request event when idle.
    /// Returns whether anything happened. `Err` means the frontend broke
    /// the ring: stop it and disconnect.
    pub fn poll<S: Services>(
        &mut self,
        disk: &mut ServedDisk,
        svc: &mut S,
        log: &mut RateLimitedLog,
    ) -> Result<bool, RingError> {
        let mut worked = false;
        let mut broken = Ok(());
        for _ in 0..ROUNDS_PER_POLL {
            let mut round = self.reap(disk, svc, log);
            round |= self.start_ready(disk, svc, log);
            if !self.stopped && broken.is_ok() {
                match self.take_requests(disk, svc, log) {
                    Ok(took) => round |= took,
                    Err(e) => broken = Err(e),
                }
            }
            if !round {
                break;
            }
            worked = true;
        }
        let unmap = core::mem::take(&mut self.to_unmap);
        self.mapped_grants = self.mapped_grants.saturating_sub(unmap.len());
        unmap_logged(svc, unmap);
        if core::mem::take(&mut self.responses_queued) && self.ring.push_responses() {
            // A failed send leaves the frontend to find the responses on
            // its next look at the ring.
            let _ = svc.notify(self.port);
        }
        broken?;
        if !worked && self.in_flight == 0 && !self.stopped {
            worked = self.ring.final_check_for_requests()?;
        }
        Ok(worked)
    }

    fn respond(&mut self, id: u64, operation: u8, status: i16) {
        let mut out = [0u8; blkif::ENTRY_SIZE_X86_64];
        let bytes = blkif::encode_response(self.protocol, id, operation, status, &mut out);
        self.ring.put_response(bytes);
        self.responses_queued = true;
    }

    /// A free slot not already promised to a request in `taken`.
    fn free_slot(&self, taken: &[usize]) -> Option<usize> {
        (0..self.slots.len()).find(|&slot| self.slots[slot].is_none() && !taken.contains(&slot))
    }

    /// Copies requests out while there is a free slot and grant room;
    /// refuses the invalid ones at once, fetches the segments of indirect
    /// ones, and maps the grants of the valid ones in one batch.
    fn take_requests<S: Services>(
        &mut self,
        disk: &mut ServedDisk,
        svc: &mut S,
        log: &mut RateLimitedLog,
    ) -> Result<bool, RingError> {
        let mut took = false;
        let mut accepted: Vec<(usize, Plan)> = Vec::new();
        let mut fetches: Vec<IndirectFetch> = Vec::new();
        let mut taken: Vec<usize> = Vec::new();
        let mut reserved_grants = 0;
        let largest_request = usize::from(self.max_indirect).max(blkif::MAX_SEGMENTS_PER_REQUEST);
        let mut broken = Ok(());
        while self.barrier.is_none()
            && self.mapped_grants + reserved_grants + largest_request <= MAX_MAPPED_GRANTS_PER_RING
        {
            let Some(slot) = self.free_slot(&taken) else {
                break;
            };
            let mut entry = [0u8; blkif::ENTRY_SIZE_X86_64];
            match self.ring.next_request(&mut entry) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    // What was taken before the breakage is still served.
                    broken = Err(e);
                    break;
                }
            }
            took = true;
            let parsed = blkif::parse_request(self.protocol, &entry, self.max_indirect)
                .map_err(|r| (r.id, r.operation, (r.status, refusal_reason(r.error))));
            let planned = match parsed {
                Ok(Request::Indirect {
                    id,
                    direction,
                    sector,
                    nr_segments,
                    indirect_grefs,
                    ..
                }) => {
                    let nr_segments = usize::from(nr_segments);
                    let pages = nr_segments.div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
                    // `parse_request` bounded the count by what we
                    // advertised, which fits the reference array.
                    let pages = indirect_grefs.get(..pages).unwrap_or(&[]).to_vec();
                    taken.push(slot);
                    reserved_grants += nr_segments;
                    fetches.push(IndirectFetch {
                        slot,
                        id,
                        direction,
                        sector,
                        nr_segments,
                        pages,
                    });
                    continue;
                }
                parsed => parsed.and_then(|request| plan(&request, disk)),
            };
            match planned {
                Ok(p) => {
                    if p.barrier {
                        self.barrier = Some(slot);
                    }
                    taken.push(slot);
                    reserved_grants += p.segments.len();
                    accepted.push((slot, p));
                }
                Err((id, operation, (status, why))) => {
                    log.line(svc, format_args!("request {id:#x} refused: {why}"));
                    self.respond(id, operation, status);
                }
            }
        }
        let fetched = self.fetch_indirect_segments(&fetches, svc);
        for (fetch, segments) in fetches.into_iter().zip(fetched) {
            // Answered as the operation it carries, as Linux blkback does.
            let id = fetch.id;
            let operation = match fetch.direction {
                Direction::Read => blkif::OP_READ,
                Direction::Write => blkif::OP_WRITE,
            };
            let planned = segments
                .map_err(|why| (id, operation, (blkif::RSP_ERROR, why)))
                .and_then(|segments| plan_data(id, fetch.direction, fetch.sector, segments, disk));
            match planned {
                Ok(p) => accepted.push((fetch.slot, p)),
                Err((id, operation, (status, why))) => {
                    log.line(svc, format_args!("request {id:#x} refused: {why}"));
                    self.respond(id, operation, status);
                }
            }
        }
        self.map_and_start(accepted, disk, svc, log);
        broken.map(|()| took)
    }

    /// Maps the indirect pages of `fetches` in one batch, copies their
    /// segments out (once, then validated) and unmaps them.
    fn fetch_indirect_segments<S: Services>(
        &self,
        fetches: &[IndirectFetch],
        svc: &mut S,
    ) -> Vec<Result<Vec<blkif::Segment>, &'static str>> {
        if fetches.is_empty() {
            return Vec::new();
        }
        let specs: Vec<GrantSpec> = fetches
            .iter()
            .flat_map(|f| &f.pages)
            .map(|&gref| GrantSpec {
                domid: self.frontend,
                gref,
                readonly: true,
            })
            .collect();
        let mut maps = svc.map_grants(&specs).into_iter();
        let mut mapped = Vec::new();
        let mut results = Vec::with_capacity(fetches.len());
        for fetch in fetches {
            let mut segments = Vec::with_capacity(fetch.nr_segments);
            let mut outcome = if fetch.pages.is_empty() {
                Err("no indirect pages")
            } else {
                Ok(())
            };
            for (index, page) in maps.by_ref().take(fetch.pages.len()).enumerate() {
                let Ok(page) = page else {
                    outcome = Err("indirect page unmappable");
                    continue;
                };
                let first = index * SEGMENTS_PER_INDIRECT_PAGE;
                let count = fetch
                    .nr_segments
                    .saturating_sub(first)
                    .min(SEGMENTS_PER_INDIRECT_PAGE);
                if outcome.is_ok() {
                    outcome = read_indirect_page(svc, &page, count, &mut segments);
                }
                mapped.push(page);
            }
            results.push(outcome.map(|()| segments));
        }
        unmap_logged(svc, mapped);
        results
    }

    fn map_and_start<S: Services>(
        &mut self,
        accepted: Vec<(usize, Plan)>,
        disk: &mut ServedDisk,
        svc: &mut S,
        log: &mut RateLimitedLog,
    ) {
        // Persistent grants are mapped writable whatever the direction:
        // the same page serves reads and writes.
        let readonly_allowed = self.persistent.is_none();
        let mut sources = Vec::new();
        let mut specs = Vec::new();
        for (_, p) in &accepted {
            for segment in &p.segments {
                match self.persistent.as_mut().and_then(|k| k.take(segment.gref)) {
                    Some(gfn) => sources.push(PageSource::Kept(gfn)),
                    None => {
                        sources.push(PageSource::Mapped);
                        specs.push(GrantSpec {
                            domid: self.frontend,
                            gref: segment.gref,
                            readonly: p.map_readonly && readonly_allowed,
                        });
                    }
                }
            }
        }
        let mut results = svc.map_grants(&specs).into_iter();
        let mut sources = sources.into_iter();
        for (slot, p) in accepted {
            let mut request = InFlight {
                id: p.id,
                operation: p.operation,
                steps: p.steps,
                segments: Vec::new(),
                mappings: Vec::new(),
                kept: Vec::new(),
                status: blkif::RSP_OKAY,
                started: !p.barrier,
                on_device: false,
            };
            for segment in &p.segments {
                let gfn = match sources.next() {
                    Some(PageSource::Kept(gfn)) => {
                        request.kept.push(segment.gref);
                        Ok(gfn)
                    }
                    _ => match results.next() {
                        Some(Ok(m)) => Ok(self.hold(m, &mut request)),
                        failed => Err(failed.and_then(Result::err)),
                    },
                };
                match gfn {
                    Ok(gfn) => request.segments.push(blockdev::Segment {
                        phys: gfn * PAGE_SIZE as u64 + u64::from(segment.first_sect) * SECTOR_SIZE,
                        len: segment.sectors() * SECTOR_SIZE as u32,
                    }),
                    Err(why) => {
                        if request.status == blkif::RSP_OKAY {
                            let (id, gref) = (p.id, segment.gref);
                            log.line(
                                svc,
                                format_args!("request {id:#x}: grant {gref} unmappable: {why:?}"),
                            );
                        }
                        request.status = blkif::RSP_ERROR;
                    }
                }
            }
            if request.status != blkif::RSP_OKAY {
                // Refused before any step ran: no barrier to wait for.
                request.started = true;
                if self.barrier == Some(slot) {
                    self.barrier = None;
                }
            }
            self.slots[slot] = Some(request);
            self.in_flight += 1;
            self.advance(slot, disk, svc, log);
        }
    }

    /// Keeps a fresh mapping as a persistent grant if the frontend asked
    /// for them and there is room, else holds it for `request` alone.
    /// Returns its frame.
    fn hold(&mut self, mapping: Mapping, request: &mut InFlight) -> u64 {
        let gfn = mapping.gfn;
        let gref = mapping.grant.gref;
        let spare = match &mut self.persistent {
            Some(kept) => kept.keep(mapping).err(),
            None => Some(mapping),
        };
        match spare {
            Some(mapping) => {
                request.mappings.push(mapping);
                self.mapped_grants += 1;
            }
            None => request.kept.push(gref),
        }
        gfn
    }

    /// Fetches device completions and moves their requests on.
    fn reap<S: Services>(
        &mut self,
        disk: &mut ServedDisk,
        svc: &mut S,
        log: &mut RateLimitedLog,
    ) -> bool {
        let mut any = false;
        let mut done = [Completion::default(); COMPLETION_BATCH];
        // Each pass empties at most one batch; bounded by the slot count.
        for _ in 0..=self.slots.len() / COMPLETION_BATCH {
            let n = self.queue.poll(&mut done).min(COMPLETION_BATCH);
            for completion in &done[..n] {
                let slot = usize::try_from(completion.tag).unwrap_or(usize::MAX);
                let Some(Some(request)) = self.slots.get_mut(slot) else {
                    continue;
                };
                if !request.on_device {
                    continue;
                }
                request.on_device = false;
                if let Err(e) = completion.result {
                    let id = request.id;
                    request.status = blkif::RSP_ERROR;
                    log.line(svc, format_args!("request {id:#x}: device error {e:?}"));
                }
                self.advance(slot, disk, svc, log);
                any = true;
            }
            if n < COMPLETION_BATCH {
                break;
            }
        }
        any
    }

    /// Starts the drained barrier, retries steps the device queue had no
    /// room for, and fails requests not started on a stopped ring.
    fn start_ready<S: Services>(
        &mut self,
        disk: &mut ServedDisk,
        svc: &mut S,
        log: &mut RateLimitedLog,
    ) -> bool {
        let mut any = false;
        if let Some(slot) = self.barrier
            && self.in_flight == 1
            && let Some(Some(barrier)) = self.slots.get_mut(slot)
            && !barrier.started
        {
            barrier.started = true;
            self.advance(slot, disk, svc, log);
            any = true;
        }
        for slot in 0..self.slots.len() {
            let Some(request) = &mut self.slots[slot] else {
                continue;
            };
            if self.stopped && !request.started {
                request.started = true;
                request.status = blkif::RSP_ERROR;
            }
            if request.started && !request.on_device {
                any |= self.advance(slot, disk, svc, log);
            }
        }
        any
    }

    /// Submits the next step of the request in `slot`, or answers it when
    /// none is left (or it failed). Returns whether it moved.
    fn advance<S: Services>(
        &mut self,
        slot: usize,
        disk: &mut ServedDisk,
        svc: &mut S,
        log: &mut RateLimitedLog,
    ) -> bool {
        let Some(Some(request)) = self.slots.get_mut(slot) else {
            return false;
        };
        if !request.started || request.on_device {
            return false;
        }
        if request.status != blkif::RSP_OKAY {
            request.steps.clear();
        }
        let Some(step) = request.steps.pop_front() else {
            self.finish(slot);
            return true;
        };
        let tag = slot as u64;
        let (submitted, remainder) = match step {
            Step::Read { lba } => {
                let segments = &request.segments;
                let read = blockdev::Request::Read { lba, segments };
                (self.queue.submit(tag, read), None)
            }
            Step::Write { lba } => {
                let segments = &request.segments;
                let write = blockdev::Request::Write { lba, segments };
                (self.queue.submit(tag, write), None)
            }
            Step::Flush => (self.queue.submit(tag, blockdev::Request::Flush), None),
            Step::Discard { lba, blocks } => {
                // Larger discards than the device takes go in pieces.
                let now = blocks.min(disk.geometry.max_discard_blocks.max(1));
                let rest = (now < blocks).then_some(Step::Discard {
                    lba: lba + now,
                    blocks: blocks - now,
                });
                let discard = blockdev::Request::Discard { lba, blocks: now };
                (self.queue.submit(tag, discard), rest)
            }
        };
        match submitted {
            Ok(()) => {
                request.on_device = true;
                if let Some(rest) = remainder {
                    request.steps.push_front(rest);
                }
                true
            }
            Err(SubmitError::QueueFull) => {
                // Tried again on the next poll.
                request.steps.push_front(step);
                false
            }
            Err(e) => {
                let id = request.id;
                request.status = blkif::RSP_ERROR;
                log.line(svc, format_args!("request {id:#x}: device refused: {e:?}"));
                request.steps.clear();
                self.finish(slot);
                true
            }
        }
    }

    /// Queues the response of the request in `slot` and frees the slot;
    /// its grants are unmapped before the response is published.
    fn finish(&mut self, slot: usize) {
        let Some(request) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.in_flight -= 1;
        if self.barrier == Some(slot) {
            self.barrier = None;
        }
        self.to_unmap.extend(request.mappings);
        if let Some(persistent) = &mut self.persistent {
            for gref in request.kept {
                persistent.release(gref);
            }
        }
        self.respond(request.id, request.operation, request.status);
    }
}

/// Copies `count` segments out of a mapped indirect page and checks each.
fn read_indirect_page<S: Services>(
    svc: &S,
    page: &Mapping,
    count: usize,
    out: &mut Vec<blkif::Segment>,
) -> Result<(), &'static str> {
    let base = svc
        .frame_address(page.gfn)
        .ok_or("indirect page has no address")?;
    let entry_size = size_of::<blkif::WireSegment>();
    for index in 0..count.min(SEGMENTS_PER_INDIRECT_PAGE) {
        let mut raw = [0u8; 8];
        for (offset, byte) in raw.iter_mut().enumerate() {
            // SAFETY: `index < 512` and `offset < 8`, so the byte lies in
            // the page mapped at `page.gfn`, mapped until the caller unmaps
            // it; volatile because the frontend may write it meanwhile.
            *byte = unsafe {
                base.as_ptr()
                    .add(index * entry_size + offset)
                    .read_volatile()
            };
        }
        let [g0, g1, g2, g3, first_sect, last_sect, _, _] = raw;
        if first_sect > last_sect || last_sect > blkif::LAST_SECTOR_IN_PAGE {
            return Err("bad first/last sector in an indirect segment");
        }
        out.push(blkif::Segment {
            gref: u32::from_le_bytes([g0, g1, g2, g3]),
            first_sect,
            last_sect,
        });
    }
    Ok(())
}

fn refusal_reason(error: blkif::RequestError) -> &'static str {
    match error {
        blkif::RequestError::UnsupportedOperation => "unsupported operation",
        blkif::RequestError::NoSegments => "no segments",
        blkif::RequestError::TooManySegments => "too many segments",
        blkif::RequestError::BadSegment => "bad first/last sector",
        blkif::RequestError::BadIndirectOperation => "bad indirect operation",
    }
}

/// Unmaps `mappings`; a failure leaves the frame reserved, which is all
/// that can be done about it, and is logged.
pub fn unmap_logged<S: Services>(svc: &mut S, mappings: Vec<Mapping>) {
    if mappings.is_empty() {
        return;
    }
    for result in svc.unmap_grants(mappings) {
        if let Err((m, e)) = result {
            let (gfn, gref) = (m.gfn, m.grant.gref);
            svc.log(format_args!(
                "blkback: unmapping grant {gref} at gfn {gfn:#x} failed: {e:?}; frame kept"
            ));
        }
    }
}

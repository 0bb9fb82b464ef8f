//! Ring I/O: one connected blkif ring served through its own disk queue.
//!
//! Each request is copied out of the shared ring once, parsed into its
//! slot's preallocated state (its segments listed once, from the entry or
//! its indirect pages), checked against the disk, its grants mapped in
//! batches with the others of the same poll, and run as its planned device
//! steps. Grants are unmapped before the response is published. Once the
//! ring is connected, serving a request allocates nothing.

use alloc::collections::TryReserveError;
use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;

use blockdev::{Completion, QueueHandle, SubmitError};
use xen_pv::DomId;
use xen_pv::event::Port;
use xen_pv::grant::{GrantError, GrantRef, GrantSpec, MAX_BATCH, Mapping};
use xen_pv::ring::{BackRing, RingError};

use crate::BackendServices;
use crate::blkif::{self, BlkifRequest, Protocol, SEGMENTS_PER_INDIRECT_PAGE};
use crate::bounce::{BouncePool, CopyDirection, MAX_BOUNCE_PAGES_PER_RING};
use crate::negotiate::FrontendRing;
use crate::persistent::PersistentGrants;
use crate::plan::{self, Plan, Refusal, Step};
use crate::rate_limited_log::RateLimitedLog;
use crate::request_slot::{
    IndirectPages, Slot, SlotState, allocate_slots, device_segment, read_indirect_page, reserved,
};
use crate::served_disk::{DataPath, ServedDisk};
use crate::statistics::{RequestCounters, RequestLatencies, RingReport, WATCHDOG_NS};

/// Rounds of complete / start / consume in one [`BlkifRing::serve`], so a device
/// that completes at once is answered in the same poll without a frontend
/// being able to keep the loop busy forever.
const ROUNDS_PER_POLL: usize = 4;

/// Requests one ring may take in one [`BlkifRing::serve`] (a pass of the
/// loop): a frontend that publishes as fast as it is answered (or fills
/// its ring with requests refused at once) waits for the next pass, so the
/// other rings and the toolstack are served in between.
pub const REQUESTS_TAKEN_PER_RING_PER_PASS: usize = 32;

/// Largest piece of a discard sent to the device at once (4 MiB): a RAM
/// disk zeroes a whole discard in its submit, so one guest's huge discard
/// goes in pieces, a few per pass, between the other rings' work.
const DISCARD_PIECE_BYTES: u64 = 4 << 20;

/// Device completions fetched per call.
const COMPLETION_BATCH: usize = 32;

/// Data grants one ring may hold mapped (4 MiB in flight); no request is
/// taken that could go beyond it. The kernel's GFN window needs this many
/// frames per connected ring, plus one for each ring page.
pub const MAX_MAPPED_GRANTS_PER_RING: usize = 1024;

/// Segments of preallocated request state one ring holds at most: its
/// slots are limited to this many segments' worth (32 slots of 256).
pub const MAX_SEGMENT_STATE_PER_RING: usize = 8192;

/// Most pages of a ring, as an order (`max-ring-page-order`, Linux
/// blkback's default): 16 pages, 512 requests.
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// Why a ring could not be connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectError {
    /// The disk gave no queue handle.
    Queue(blockdev::ClaimError),
    /// No memory for the ring's request state.
    OutOfMemory,
    /// No DMA memory for the ring's bounce buffers.
    NoBouncePages,
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
            ConnectError::OutOfMemory => f.write_str("out of memory for the ring's requests"),
            ConnectError::NoBouncePages => f.write_str("no DMA memory for bounce buffers"),
            ConnectError::RingGrant(e) => write!(f, "mapping ring-ref failed: {e:?}"),
            ConnectError::RingAddress => f.write_str("ring page has no address"),
            ConnectError::RingSize => f.write_str("ring size not offered"),
            ConnectError::EventChannel(e) => write!(f, "binding event-channel failed: {e:?}"),
        }
    }
}

/// Which segment of which slot a grant of the current map batch is for.
#[derive(Clone, Copy)]
struct BatchTarget {
    slot: usize,
    index: usize,
}

/// The grants of one map hypercall batch being gathered, and where their
/// results go; kept by the ring so it allocates nothing.
struct MapBatch {
    specs: Vec<GrantSpec>,
    targets: Vec<BatchTarget>,
    results: Vec<Result<Mapping, GrantError>>,
}

impl MapBatch {
    /// Maps the gathered grants; afterwards `results` has exactly one
    /// entry per target, whatever the services returned.
    fn map<S: BackendServices>(&mut self, svc: &mut S) {
        self.results.clear();
        svc.map_grants(&self.specs, &mut self.results);
        self.results.truncate(self.targets.len());
        self.results
            .resize_with(self.targets.len(), || Err(GrantError::General));
    }

    fn clear(&mut self) {
        self.specs.clear();
        self.targets.clear();
        self.results.clear();
    }
}

/// The answer to a request, waiting for its turn in ring order.
#[derive(Clone, Copy)]
struct Answer {
    id: u64,
    operation: u8,
    status: i16,
    /// When its request was taken from the ring.
    taken_at_ns: u64,
}

/// A connected ring.
pub struct BlkifRing {
    frontend: DomId,
    protocol: Protocol,
    port: Port,
    /// The disk queue this ring alone submits on and polls.
    queue: QueueHandle,
    /// Valid while `ring_mappings` are mapped, i.e. until `close`.
    ring: BackRing<'static>,
    ring_mappings: Vec<Mapping>,
    slots: Vec<Slot>,
    in_flight: usize,
    /// The slot of the barrier being drained or run; no request is taken
    /// from the ring meanwhile.
    barrier: Option<usize>,
    /// No more requests are taken (disconnecting).
    stopped: bool,
    /// Slots taken in the current poll, in ring order.
    taken: Vec<usize>,
    batch: MapBatch,
    /// Indirect pages mapped in the current batch.
    indirect_pages: Vec<Mapping>,
    to_unmap: Vec<Mapping>,
    unmap_failures: Vec<(Mapping, GrantError)>,
    /// Answers of the requests taken and not yet published, by ring index
    /// (masked): published strictly in ring order (see
    /// [`Self::publish_answers`]).
    answers: Vec<Option<Answer>>,
    /// What `feature-max-indirect-segments` promised (0: none).
    max_indirect: u16,
    /// Data grants mapped for requests in flight (not the kept ones).
    mapped_grants: usize,
    /// The grants kept mapped, when the frontend asked for it.
    persistent: Option<PersistentGrants>,
    /// Bounce pages, when the device cannot DMA into grant mappings.
    bounce: Option<BouncePool>,
    /// What it answered so far, how long that took, and when it last
    /// answered.
    counters: RequestCounters,
    latencies: RequestLatencies,
    last_completion_ns: u64,
    /// The services' clock when the current `serve` began.
    now_ns: u64,
    /// When the ring last had nothing left untaken (or gave a request).
    last_taken_ns: u64,
    /// The watchdog reported requests left untaken since then.
    untaken_reported: bool,
}

impl BlkifRing {
    /// Opens a disk queue for the ring, maps the frontend's ring page,
    /// attaches to it and binds its event channel, and allocates the
    /// request state of its slots. At most the disk's queue depth of
    /// requests are held at a time (and no more than the ring size).
    pub fn connect<S: BackendServices>(
        svc: &mut S,
        frontend: &FrontendRing,
        disk: &ServedDisk,
    ) -> Result<BlkifRing, ConnectError> {
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
        let queue = disk.open_queue().map_err(ConnectError::Queue)?;
        let specs: Vec<GrantSpec> = ring_refs
            .iter()
            .map(|&gref| GrantSpec {
                domid,
                gref,
                readonly: false,
            })
            .collect();
        let mut results = Vec::with_capacity(specs.len());
        svc.map_grants(&specs, &mut results);
        let mut mappings = Vec::with_capacity(specs.len());
        let mut failure = None;
        for result in results {
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
            unmap_logged(svc, &mut mappings);
            return Err(e);
        }
        let port = match svc.bind_interdomain(domid, event_channel) {
            Ok(port) => port,
            Err(e) => {
                unmap_logged(svc, &mut mappings);
                return Err(ConnectError::EventChannel(e));
            }
        };
        // SAFETY: `frame_address` gives where each page mapped at a
        // mapping's frame is, the first 8-byte aligned (all are checked);
        // they stay mapped until `close`, which ends this view first.
        let ring = unsafe { BackRing::attach_pages(&pages, protocol.entry_size()) };
        let count = usize::from(disk.geometry().queue_depth)
            .min(ring.size() as usize)
            .min(MAX_SEGMENT_STATE_PER_RING / disk.max_request_segments())
            .max(1);
        let bouncing = disk.data_path() == DataPath::Bounce;
        let state = (|| {
            let slots = allocate_slots(count, disk.max_request_segments(), bouncing)?;
            let kept = persistent.then(PersistentGrants::new).transpose()?;
            let mut answers = reserved(ring.size() as usize)?;
            answers.resize(ring.size() as usize, None);
            Ok::<_, TryReserveError>((
                slots,
                reserved(count)?,
                reserved(MAX_MAPPED_GRANTS_PER_RING + MAX_BATCH)?,
                kept,
                answers,
            ))
        })();
        // Enough pages for every segment the ring may have in flight.
        let pool_pages = (count * disk.max_request_segments()).min(MAX_BOUNCE_PAGES_PER_RING);
        let allocated = match state {
            Ok(state) if bouncing => {
                BouncePool::allocate(svc, pool_pages).map(|pool| (state, Some(pool)))
            }
            Ok(state) => Ok((state, None)),
            Err(_) => Err(ConnectError::OutOfMemory),
        };
        let ((slots, taken, to_unmap, kept, answers), bounce) = match allocated {
            Ok(allocated) => allocated,
            Err(e) => {
                drop(ring);
                unmap_logged(svc, &mut mappings);
                svc.close_port(port);
                return Err(e);
            }
        };
        Ok(BlkifRing {
            frontend: domid,
            protocol,
            port,
            queue,
            ring,
            ring_mappings: mappings,
            slots,
            in_flight: 0,
            barrier: None,
            stopped: false,
            taken,
            batch: MapBatch {
                specs: Vec::with_capacity(MAX_BATCH),
                targets: Vec::with_capacity(MAX_BATCH),
                results: Vec::with_capacity(MAX_BATCH),
            },
            indirect_pages: Vec::with_capacity(MAX_BATCH),
            to_unmap,
            unmap_failures: Vec::new(),
            answers,
            max_indirect: disk.max_indirect_segments(),
            mapped_grants: 0,
            persistent: kept,
            bounce,
            counters: RequestCounters::default(),
            latencies: RequestLatencies::default(),
            last_completion_ns: 0,
            now_ns: svc.now_ns(),
            last_taken_ns: svc.now_ns(),
            untaken_reported: false,
        })
    }

    /// Requests accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The ring as it stands, for statistics and the heartbeat.
    pub fn report(&self) -> RingReport {
        RingReport {
            indices: self.ring.indices(),
            size: self.ring.size(),
            in_flight: self.in_flight,
            counters: self.counters,
            latencies: self.latencies,
            last_completion_ns: self.last_completion_ns,
        }
    }

    /// Reports, once each, a request in flight for longer than
    /// [`WATCHDOG_NS`] and requests left on the ring untaken that long.
    pub fn watchdog<S: BackendServices>(
        &mut self,
        svc: &mut S,
        label: &dyn fmt::Display,
        now_ns: u64,
    ) {
        for slot in &mut self.slots {
            let waited = now_ns.saturating_sub(slot.taken_at_ns);
            if slot.state == SlotState::Free || slot.overdue_reported || waited < WATCHDOG_NS {
                continue;
            }
            slot.overdue_reported = true;
            let (id, operation) = (slot.id, slot.operation);
            let place = if slot.on_device {
                "on the device"
            } else if slot.started {
                "between steps"
            } else {
                "waiting for a barrier"
            };
            svc.log(format_args!(
                "watchdog: {label}: request {id:#x} (operation {operation}) waited {}.{:03} s, {place}",
                waited / 1_000_000_000,
                waited / 1_000_000 % 1000
            ));
        }
        let untaken = self.ring.unconsumed_requests().unwrap_or(0);
        let waited = now_ns.saturating_sub(self.last_taken_ns);
        if untaken > 0 && !self.stopped && !self.untaken_reported && waited >= WATCHDOG_NS {
            self.untaken_reported = true;
            let in_flight = self.in_flight;
            svc.log(format_args!(
                "watchdog: {label}: {untaken} request(s) on the ring, none taken for {}.{:03} s ({in_flight} in flight)",
                waited / 1_000_000_000,
                waited / 1_000_000 % 1000
            ));
        }
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
    pub fn close<S: BackendServices>(self, svc: &mut S) {
        debug_assert!(self.drained());
        // Consuming `self` ends the ring view before its page goes.
        let BlkifRing {
            port,
            ring_mappings,
            to_unmap,
            persistent,
            bounce,
            ..
        } = self;
        if let Some(pool) = bounce {
            pool.release(svc);
        }
        let mut mappings = to_unmap;
        mappings.extend(
            persistent
                .map(PersistentGrants::into_mappings)
                .unwrap_or_default(),
        );
        mappings.extend(ring_mappings);
        unmap_logged(svc, &mut mappings);
        svc.close_port(port);
    }

    /// Does the work the ring and the disk have: completions, new requests,
    /// responses, notification; re-arms the request event when idle.
    /// Returns whether anything happened. `Err` means the frontend broke
    /// the ring: stop it and disconnect.
    pub fn serve<S: BackendServices>(
        &mut self,
        disk: &ServedDisk,
        svc: &mut S,
        log: &mut RateLimitedLog,
    ) -> Result<bool, RingError> {
        let mut worked = false;
        let mut broken = Ok(());
        self.now_ns = svc.now_ns();
        let mut budget = REQUESTS_TAKEN_PER_RING_PER_PASS;
        for _ in 0..ROUNDS_PER_POLL {
            let mut round = self.reap(svc, log);
            round |= self.start_ready(svc, log);
            if !self.stopped && broken.is_ok() && budget > 0 {
                match self.take_requests(disk, svc, log, &mut budget) {
                    Ok(took) => round |= took,
                    Err(e) => broken = Err(e),
                }
            }
            if !round {
                break;
            }
            worked = true;
        }
        self.unmap_finished(svc);
        if self.publish_answers(svc) && self.ring.push_responses() {
            self.notify_frontend(svc);
        }
        broken?;
        if !worked && self.in_flight == 0 && !self.stopped {
            worked = self.ring.final_check_for_requests()?;
        }
        Ok(worked)
    }

    /// Signals the frontend that the ring has answers. A failed send leaves
    /// it to find them on its next look at the ring.
    pub fn notify_frontend<S: BackendServices>(&self, svc: &mut S) {
        let _ = svc.notify(self.port);
    }

    /// Unmaps the data grants of the requests answered since the last call.
    fn unmap_finished<S: BackendServices>(&mut self, svc: &mut S) {
        if self.to_unmap.is_empty() {
            return;
        }
        svc.unmap_grants(&mut self.to_unmap, &mut self.unmap_failures);
        log_unmap_failures(svc, &mut self.unmap_failures);
    }

    /// Notes the answer to the request taken at `ring_index` at
    /// `taken_at_ns`, for [`Self::publish_answers`].
    fn respond(&mut self, ring_index: u32, id: u64, operation: u8, status: i16, taken_at_ns: u64) {
        let mask = self.answers.len() - 1;
        self.answers[ring_index as usize & mask] = Some(Answer {
            id,
            operation,
            status,
            taken_at_ns,
        });
    }

    /// Puts the noted answers on the ring in ring order, stopping at the
    /// first request still unanswered; true if any was put. In order so
    /// that the shared `rsp_prod` alone says what was answered: every
    /// request below it, none from it on, each still in its ring slot
    /// (a response only overwrites the slot of the request it answers).
    /// That is what lets a restarted instance take the ring over (see
    /// [`crate::vbd`]'s adoption): it serves `[rsp_prod, req_prod)` again.
    /// The price: a slow request holds back the answers of the later ones
    /// (not their work), as a ring full of them holds back new requests;
    /// their latencies, counted here, include that wait.
    fn publish_answers<S: BackendServices>(&mut self, svc: &S) -> bool {
        let mask = self.answers.len() - 1;
        // The clock is read once, and only when there is an answer to put.
        let mut put_at_ns = None;
        while let Some(answer) = self.answers[self.ring.rsp_prod_pvt() as usize & mask].take() {
            let mut out = [0u8; blkif::ENTRY_SIZE_X86_64];
            let Answer {
                id,
                operation,
                status,
                taken_at_ns,
            } = answer;
            let bytes = blkif::encode_response(self.protocol, id, operation, status, &mut out);
            self.ring.put_response(bytes);
            let now_ns = *put_at_ns.get_or_insert_with(|| svc.now_ns());
            self.latencies
                .record(operation, now_ns.saturating_sub(taken_at_ns));
        }
        put_at_ns.is_some()
    }

    /// Copies requests out while there is a free slot, grant room and
    /// `budget` left (each request taken spends one); refuses the invalid
    /// ones at once, fetches the segments of indirect ones, and maps the
    /// grants of the valid ones in batches.
    fn take_requests<S: BackendServices>(
        &mut self,
        disk: &ServedDisk,
        svc: &mut S,
        log: &mut RateLimitedLog,
        budget: &mut usize,
    ) -> Result<bool, RingError> {
        let mut took = false;
        let mut reserved_grants = 0;
        let largest_request = usize::from(self.max_indirect).max(blkif::MAX_SEGMENTS_PER_REQUEST);
        let mut broken = Ok(());
        self.taken.clear();
        let mut starved = false;
        while self.barrier.is_none() && *budget > 0 {
            let Some(index) = self.slots.iter().position(|s| s.state == SlotState::Free) else {
                starved = true;
                break;
            };
            if self.mapped_grants + reserved_grants + largest_request > MAX_MAPPED_GRANTS_PER_RING {
                starved = true;
                break;
            }
            if let Some(pool) = &self.bounce
                && reserved_grants + largest_request > pool.free_pages()
            {
                starved = true;
                break;
            }
            let mut entry = [0u8; blkif::ENTRY_SIZE_X86_64];
            let ring_index = self.ring.req_cons();
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
            *budget -= 1;
            let request = match blkif::parse_request(self.protocol, &entry, self.max_indirect) {
                Ok(request) => request,
                Err(r) => {
                    let why = plan::refusal_reason(r.error);
                    self.refuse(ring_index, r.id, r.operation, (r.status, why), svc, log);
                    continue;
                }
            };
            let slot = &mut self.slots[index];
            let planned = match request {
                BlkifRequest::ReadWrite {
                    id,
                    direction,
                    sector,
                    segments,
                    ..
                } => {
                    slot.take(ring_index, id, plan::data_operation(direction), self.now_ns);
                    slot.grants.extend_from_slice(segments.as_slice());
                    plan::plan_data(direction, sector, &slot.grants, disk)
                }
                BlkifRequest::Barrier {
                    id,
                    sector,
                    segments,
                    ..
                } => {
                    slot.take(ring_index, id, blkif::OP_WRITE_BARRIER, self.now_ns);
                    slot.grants.extend_from_slice(segments.as_slice());
                    plan::plan_barrier(sector, &slot.grants, disk)
                }
                BlkifRequest::Flush { id } => {
                    slot.take(ring_index, id, blkif::OP_FLUSH_DISKCACHE, self.now_ns);
                    plan::plan_flush(disk)
                }
                BlkifRequest::Discard {
                    id,
                    sector,
                    nr_sectors,
                    secure,
                } => {
                    slot.take(ring_index, id, blkif::OP_DISCARD, self.now_ns);
                    plan::plan_discard(sector, nr_sectors, secure, disk)
                }
                BlkifRequest::Indirect {
                    id,
                    direction,
                    sector,
                    nr_segments,
                    indirect_grefs,
                    ..
                } => {
                    // Answered as the operation it carries, as Linux
                    // blkback does; planned once its segments are read.
                    slot.take(ring_index, id, plan::data_operation(direction), self.now_ns);
                    let nr_segments = usize::from(nr_segments);
                    // `parse_request` bounded the count by what we
                    // advertised, which fits the reference array.
                    let count = nr_segments
                        .div_ceil(SEGMENTS_PER_INDIRECT_PAGE)
                        .min(indirect_grefs.len());
                    slot.indirect = Some(IndirectPages {
                        direction,
                        sector,
                        nr_segments,
                        pages: indirect_grefs,
                        count,
                    });
                    reserved_grants += nr_segments;
                    self.taken.push(index);
                    continue;
                }
            };
            match planned {
                Ok(plan) => {
                    self.accept(index, plan);
                    reserved_grants += self.slots[index].grants.len();
                }
                Err(refusal) => {
                    let (ring_index, id, operation) = (slot.ring_index, slot.id, slot.operation);
                    slot.state = SlotState::Free;
                    self.refuse(ring_index, id, operation, refusal, svc, log);
                }
            }
        }
        self.fetch_indirect_segments(svc);
        for at in 0..self.taken.len() {
            let index = self.taken[at];
            let slot = &mut self.slots[index];
            let Some(indirect) = slot.indirect.take() else {
                continue;
            };
            let planned = match slot.fetch_failed {
                Some(why) => Err((blkif::RSP_ERROR, why)),
                None => plan::plan_data(indirect.direction, indirect.sector, &slot.grants, disk),
            };
            match planned {
                Ok(plan) => self.accept(index, plan),
                Err(refusal) => {
                    let (ring_index, id, operation) = (slot.ring_index, slot.id, slot.operation);
                    slot.state = SlotState::Free;
                    self.refuse(ring_index, id, operation, refusal, svc, log);
                }
            }
        }
        self.map_and_start(svc, log);
        let untaken = self.ring.unconsumed_requests().unwrap_or(0);
        if starved && untaken > 0 {
            self.counters.oo_req += 1;
        }
        if took || untaken == 0 {
            self.last_taken_ns = self.now_ns;
            self.untaken_reported = false;
        }
        broken.map(|()| took)
    }

    /// Answers a request refused before it took a slot's resources (in the
    /// pass it was taken in).
    fn refuse<S: BackendServices>(
        &mut self,
        ring_index: u32,
        id: u64,
        operation: u8,
        (status, why): Refusal,
        svc: &mut S,
        log: &mut RateLimitedLog,
    ) {
        log.line(svc, format_args!("request {id:#x} refused: {why}"));
        self.counters.count(operation, 0, 0, status);
        self.respond(ring_index, id, operation, status, self.now_ns);
    }

    /// Records the plan of the request in slot `index`, to be mapped and
    /// started with the others of this poll.
    fn accept(&mut self, index: usize, plan: Plan) {
        let slot = &mut self.slots[index];
        slot.steps = plan.steps;
        slot.map_readonly = plan.map_readonly;
        slot.started = !plan.barrier;
        if plan.barrier {
            self.barrier = Some(index);
        }
        if !self.taken.contains(&index) {
            self.taken.push(index);
        }
    }

    /// Maps the indirect pages of the indirect requests taken, in
    /// batches, and copies their segments (checked once) into their slots.
    /// With persistent grants the pages are kept (read-only) as data
    /// grants are (Linux blkfront takes them from the same pool, and Linux
    /// blkback keeps them too): a kept page is read where it is mapped,
    /// with no hypercall.
    fn fetch_indirect_segments<S: BackendServices>(&mut self, svc: &mut S) {
        for at in 0..self.taken.len() {
            let index = self.taken[at];
            let Some(indirect) = self.slots[index].indirect else {
                continue;
            };
            if indirect.count == 0 {
                self.slots[index].fetch_failed = Some("no indirect pages");
            }
            for page in 0..indirect.count {
                let gref = indirect.pages[page];
                if let Some(gfn) = self.persistent.as_mut().and_then(|k| k.take(gref)) {
                    // The request's earlier pages are read first: its
                    // segments are listed in page order.
                    if self.batch.targets.last().is_some_and(|t| t.slot == index) {
                        self.read_indirect_batch(svc);
                    }
                    read_into_slot(svc, &mut self.slots[index], page, gfn);
                    self.release_kept(gref);
                    continue;
                }
                if self.batch.specs.len() == MAX_BATCH {
                    self.read_indirect_batch(svc);
                }
                self.batch.specs.push(GrantSpec {
                    domid: self.frontend,
                    gref,
                    readonly: true,
                });
                self.batch.targets.push(BatchTarget {
                    slot: index,
                    index: page,
                });
            }
        }
        self.read_indirect_batch(svc);
    }

    /// Maps the gathered indirect pages, reads them, and keeps them (with
    /// persistent grants, while there is room) or unmaps them.
    fn read_indirect_batch<S: BackendServices>(&mut self, svc: &mut S) {
        if self.batch.specs.is_empty() {
            return;
        }
        self.batch.map(svc);
        for (target, result) in self.batch.targets.iter().zip(self.batch.results.drain(..)) {
            let slot = &mut self.slots[target.slot];
            let Ok(page) = result else {
                slot.fetch_failed = slot.fetch_failed.or(Some("indirect page unmappable"));
                continue;
            };
            read_into_slot(svc, slot, target.index, page.gfn);
            let spare = match &mut self.persistent {
                Some(kept) => kept.keep_unused(page).err(),
                None => Some(page),
            };
            self.indirect_pages.extend(spare);
        }
        self.batch.clear();
        svc.unmap_grants(&mut self.indirect_pages, &mut self.unmap_failures);
        log_unmap_failures(svc, &mut self.unmap_failures);
        self.unmap_evicted(svc);
    }

    /// Maps the data grants of the requests accepted in this poll (kept
    /// ones are reused) in batches, then starts them.
    fn map_and_start<S: BackendServices>(&mut self, svc: &mut S, log: &mut RateLimitedLog) {
        // Persistent grants are mapped writable whatever the direction:
        // the same page serves reads and writes.
        let readonly_allowed = self.persistent.is_none();
        for at in 0..self.taken.len() {
            let index = self.taken[at];
            if self.slots[index].state != SlotState::Taken {
                continue;
            }
            let count = self.slots[index].grants.len();
            for segment in 0..count {
                let slot = &mut self.slots[index];
                let grant = slot.grants[segment];
                let kept = self
                    .persistent
                    .as_mut()
                    .and_then(|k| k.take_writable(grant.gref));
                slot.segments.push(blockdev::Segment { phys: 0, len: 0 });
                if let Some(gfn) = kept {
                    slot.kept.push(grant.gref);
                    slot.segments[segment] = device_segment(gfn, grant);
                    continue;
                }
                if self.batch.specs.len() == MAX_BATCH {
                    self.map_data_batch(svc, log);
                }
                let slot = &self.slots[index];
                self.batch.specs.push(GrantSpec {
                    domid: self.frontend,
                    gref: grant.gref,
                    readonly: slot.map_readonly && readonly_allowed,
                });
                self.batch.targets.push(BatchTarget {
                    slot: index,
                    index: segment,
                });
            }
        }
        self.map_data_batch(svc, log);
        for at in 0..self.taken.len() {
            let index = self.taken[at];
            let slot = &mut self.slots[index];
            if slot.state != SlotState::Taken {
                continue;
            }
            slot.state = SlotState::InFlight;
            if slot.status == blkif::RSP_OKAY
                && let Some(pool) = &mut self.bounce
                && let Err(why) = bounce_in(pool, slot, svc)
            {
                let id = slot.id;
                log.line(svc, format_args!("request {id:#x}: {why}"));
                slot.status = blkif::RSP_ERROR;
            }
            if slot.status != blkif::RSP_OKAY {
                // Refused before any step ran: no barrier to wait for.
                slot.started = true;
                if self.barrier == Some(index) {
                    self.barrier = None;
                }
            }
            self.in_flight += 1;
            self.advance(index, svc, log);
        }
        self.taken.clear();
    }

    /// Maps the gathered data grants and records each in its slot.
    fn map_data_batch<S: BackendServices>(&mut self, svc: &mut S, log: &mut RateLimitedLog) {
        if self.batch.specs.is_empty() {
            return;
        }
        self.batch.map(svc);
        for at in 0..self.batch.targets.len() {
            let target = self.batch.targets[at];
            let result = core::mem::replace(&mut self.batch.results[at], Err(GrantError::General));
            let grant = self.slots[target.slot].grants[target.index];
            match result {
                Ok(mapping) => {
                    let gfn = self.hold(mapping, target.slot);
                    self.slots[target.slot].segments[target.index] = device_segment(gfn, grant);
                }
                Err(why) => {
                    let slot = &mut self.slots[target.slot];
                    if slot.status == blkif::RSP_OKAY {
                        let (id, gref) = (slot.id, grant.gref);
                        log.line(
                            svc,
                            format_args!("request {id:#x}: grant {gref} unmappable: {why:?}"),
                        );
                    }
                    self.slots[target.slot].status = blkif::RSP_ERROR;
                }
            }
        }
        self.batch.clear();
        self.unmap_evicted(svc);
    }

    /// A kept indirect page is read: it is free for the next request.
    fn release_kept(&mut self, gref: GrantRef) {
        if let Some(kept) = &mut self.persistent {
            kept.release(gref);
        }
    }

    /// Unmaps the kept grants evicted to make room for a batch's, in one
    /// batch.
    fn unmap_evicted<S: BackendServices>(&mut self, svc: &mut S) {
        if let Some(kept) = &mut self.persistent
            && !kept.evicted_mut().is_empty()
        {
            svc.unmap_grants(kept.evicted_mut(), &mut self.unmap_failures);
            log_unmap_failures(svc, &mut self.unmap_failures);
        }
    }

    /// Keeps a fresh mapping as a persistent grant if the frontend asked
    /// for them and there is room, else holds it for the request in slot
    /// `index` alone. Returns its frame.
    fn hold(&mut self, mapping: Mapping, index: usize) -> u64 {
        let gfn = mapping.gfn;
        let gref = mapping.grant.gref;
        let spare = match &mut self.persistent {
            Some(kept) => kept.keep(mapping).err(),
            None => Some(mapping),
        };
        let slot = &mut self.slots[index];
        match spare {
            Some(mapping) => {
                slot.mappings.push(mapping);
                self.mapped_grants += 1;
            }
            None => slot.kept.push(gref),
        }
        gfn
    }

    /// Fetches device completions and moves their requests on.
    fn reap<S: BackendServices>(&mut self, svc: &mut S, log: &mut RateLimitedLog) -> bool {
        let mut any = false;
        let mut done = [Completion::default(); COMPLETION_BATCH];
        // Each pass empties at most one batch; bounded by the slot count.
        for _ in 0..=self.slots.len() / COMPLETION_BATCH {
            let n = self.queue.poll(&mut done).min(COMPLETION_BATCH);
            for completion in &done[..n] {
                let index = usize::try_from(completion.tag).unwrap_or(usize::MAX);
                let Some(slot) = self.slots.get_mut(index) else {
                    continue;
                };
                if slot.state != SlotState::InFlight || !slot.on_device {
                    continue;
                }
                slot.on_device = false;
                if let Err(e) = completion.result {
                    let id = slot.id;
                    slot.status = blkif::RSP_ERROR;
                    log.line(svc, format_args!("request {id:#x}: device error {e:?}"));
                }
                self.advance(index, svc, log);
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
    fn start_ready<S: BackendServices>(&mut self, svc: &mut S, log: &mut RateLimitedLog) -> bool {
        let mut any = false;
        if let Some(index) = self.barrier
            && self.in_flight == 1
            && let Some(barrier) = self.slots.get_mut(index)
            && barrier.state == SlotState::InFlight
            && !barrier.started
        {
            barrier.started = true;
            self.advance(index, svc, log);
            any = true;
        }
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            if slot.state != SlotState::InFlight {
                continue;
            }
            if self.stopped && !slot.started {
                slot.started = true;
                slot.status = blkif::RSP_ERROR;
            }
            if slot.started && !slot.on_device {
                any |= self.advance(index, svc, log);
            }
        }
        any
    }

    /// Submits the next step of the request in slot `index`, or answers it
    /// when none is left (or it failed). Returns whether it moved.
    fn advance<S: BackendServices>(
        &mut self,
        index: usize,
        svc: &mut S,
        log: &mut RateLimitedLog,
    ) -> bool {
        let geometry = self.queue.geometry();
        let piece = DISCARD_PIECE_BYTES / u64::from(geometry.logical_block_size.max(1));
        let max_discard = geometry.max_discard_blocks.min(piece).max(1);
        let Some(slot) = self.slots.get_mut(index) else {
            return false;
        };
        if slot.state != SlotState::InFlight || !slot.started || slot.on_device {
            return false;
        }
        if slot.status != blkif::RSP_OKAY {
            slot.steps.clear();
        }
        let Some(step) = slot.steps.current() else {
            self.finish(index, svc, log);
            return true;
        };
        let tag = index as u64;
        let segments = match self.bounce {
            Some(_) => &slot.bounced,
            None => &slot.segments,
        };
        let (submitted, rest) = match step {
            Step::Read { lba } => (
                self.queue
                    .submit(tag, blockdev::Request::Read { lba, segments }),
                None,
            ),
            Step::Write { lba } => (
                self.queue
                    .submit(tag, blockdev::Request::Write { lba, segments }),
                None,
            ),
            Step::Flush => (self.queue.submit(tag, blockdev::Request::Flush), None),
            Step::Discard { lba, blocks } => {
                // Larger discards than the device takes go in pieces.
                let now = blocks.min(max_discard);
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
                slot.on_device = true;
                match rest {
                    Some(rest) => slot.steps.replace_current(rest),
                    None => slot.steps.pop(),
                }
                true
            }
            // Tried again on the next poll.
            Err(SubmitError::QueueFull) => false,
            Err(e) => {
                let id = slot.id;
                slot.status = blkif::RSP_ERROR;
                log.line(svc, format_args!("request {id:#x}: device refused: {e:?}"));
                self.slots[index].steps.clear();
                self.finish(index, svc, log);
                true
            }
        }
    }

    /// Queues the response of the request in slot `index` and frees the
    /// slot; its grants are unmapped before the response is published (and
    /// what a bounced read read is copied into them first).
    fn finish<S: BackendServices>(&mut self, index: usize, svc: &mut S, log: &mut RateLimitedLog) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if slot.state != SlotState::InFlight {
            return;
        }
        if let Some(pool) = &mut self.bounce
            && let Err(why) = bounce_out(pool, slot, svc)
        {
            let id = slot.id;
            log.line(svc, format_args!("request {id:#x}: {why}"));
            slot.status = blkif::RSP_ERROR;
        }
        slot.state = SlotState::Free;
        self.in_flight -= 1;
        if self.barrier == Some(index) {
            self.barrier = None;
        }
        self.mapped_grants = self.mapped_grants.saturating_sub(slot.mappings.len());
        self.to_unmap.append(&mut slot.mappings);
        if let Some(persistent) = &mut self.persistent {
            for gref in slot.kept.drain(..) {
                persistent.release(gref);
            }
        }
        slot.kept.clear();
        let (ring_index, id, operation, status, taken_at_ns) = (
            slot.ring_index,
            slot.id,
            slot.operation,
            slot.status,
            slot.taken_at_ns,
        );
        let sectors = slot.grants.iter().map(|g| u64::from(g.sectors())).sum();
        self.counters
            .count(operation, sectors, slot.grants.len() as u64, status);
        self.last_completion_ns = self.now_ns;
        self.respond(ring_index, id, operation, status, taken_at_ns);
    }
}

/// Copies the segments listed in page `page` of the indirect request in
/// `slot`, mapped at `gfn`, into the slot (unless fetching already failed).
fn read_into_slot<S: BackendServices>(svc: &S, slot: &mut Slot, page: usize, gfn: u64) {
    if slot.fetch_failed.is_some() {
        return;
    }
    let Some(indirect) = slot.indirect else {
        return;
    };
    let first = page * SEGMENTS_PER_INDIRECT_PAGE;
    let count = indirect
        .nr_segments
        .saturating_sub(first)
        .min(SEGMENTS_PER_INDIRECT_PAGE);
    if let Err(why) = read_indirect_page(svc, gfn, count, &mut slot.grants) {
        slot.fetch_failed = Some(why);
    }
}

/// Gives a request starting on a bouncing ring a bounce page per segment,
/// and copies what it writes into them.
fn bounce_in<S: BackendServices>(
    pool: &mut BouncePool,
    slot: &mut Slot,
    svc: &S,
) -> Result<(), &'static str> {
    for &segment in &slot.segments {
        // `take_requests` took no more segments than pages are free.
        let page = pool.take(segment).ok_or("no bounce page free")?;
        slot.bounced.push(page);
    }
    if slot.operation == blkif::OP_READ {
        return Ok(());
    }
    pool.copy(
        svc,
        &slot.segments,
        &slot.bounced,
        CopyDirection::IntoBounce,
    )
}

/// Copies what a successful read read from its bounce pages into its
/// grants, and gives the pages back.
fn bounce_out<S: BackendServices>(
    pool: &mut BouncePool,
    slot: &mut Slot,
    svc: &S,
) -> Result<(), &'static str> {
    let copied = if slot.operation == blkif::OP_READ && slot.status == blkif::RSP_OKAY {
        pool.copy(
            svc,
            &slot.segments,
            &slot.bounced,
            CopyDirection::OutOfBounce,
        )
    } else {
        Ok(())
    };
    for page in slot.bounced.drain(..) {
        pool.give_back(page);
    }
    copied
}

/// Logs the unmaps that failed; their frames stay reserved, which is all
/// that can be done about them.
fn log_unmap_failures<S: BackendServices>(svc: &mut S, failures: &mut Vec<(Mapping, GrantError)>) {
    for (m, e) in failures.drain(..) {
        let (gfn, gref) = (m.gfn, m.grant.gref);
        svc.log(format_args!(
            "blkback: unmapping grant {gref} at gfn {gfn:#x} failed: {e:?}; frame kept"
        ));
    }
}

/// Unmaps `mappings` (leaving it empty); failures are logged.
pub fn unmap_logged<S: BackendServices>(svc: &mut S, mappings: &mut Vec<Mapping>) {
    if mappings.is_empty() {
        return;
    }
    let mut failures = Vec::new();
    svc.unmap_grants(mappings, &mut failures);
    log_unmap_failures(svc, &mut failures);
}

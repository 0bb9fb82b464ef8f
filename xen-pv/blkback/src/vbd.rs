//! Vbd discovery and the xenbus state machine of each vbd.
//!
//! The machine is level-triggered: on any event concerning a vbd it reads
//! the current `online`, the frontend's `state` and its own position, and
//! does what that combination calls for. Missed or coalesced watch events
//! (a frontend that skips states) therefore need no special paths.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use blockdev::DmaRegion;
use core::cell::RefCell;
use core::fmt;
use core::ops::Bound::{Excluded, Unbounded};
use core::ptr::NonNull;

use crate::BackendServices;
use crate::negotiate::{
    Offer, parse_number, publish_features, publish_size, read_frontend_rings, read_optional,
};
use crate::rate_limited_log::RateLimitedLog;
use crate::ring_io::BlkifRing;
use crate::statistics::{self, NodeValue, RequestCounters, RingReport, VbdTotals};

use crate::served_disk::{CompletionSignal, DataPath, ServedDisk};
use crate::target::{OpenError, Target, TargetOpener};
use crate::unserved::{UnservedGap, UnservedGaps};
use xen_pv::event::Port;
use xen_pv::grant::{GrantError, GrantSpec, Mapping};
use xen_pv::ring::{PeerChannel, RingError};
use xen_pv::xenbus::XenbusState;
use xen_pv::xenstore::{
    MAX_QUEUED_WATCH_EVENTS, Tx, WatchEvent, WorkingChannel, Xenstore, XsError,
};
use xen_pv::{DomId, Errno};

/// Where the toolstack creates this domain's vbds (relative to its home).
const BACKEND_DIR: &str = "backend/vbd";
/// Token of the watch on `backend/vbd`.
pub const WATCH_TOKEN: &str = "stordom-blkback";
/// How long a detached vbd stays Closed before its directory goes.
pub(crate) const DETACH_GRACE_NS: u64 = 1_000_000_000;
/// How often a detached vbd looks again (the grace ended, or the frontend
/// went without a watch event reaching us).
const DETACH_RECHECK_NS: u64 = 250_000_000;
/// How soon a vbd whose target is still being made ready
/// ([`OpenError::InProgress`]: a network disk connecting) asks again.
pub(crate) const OPEN_RECHECK_NS: u64 = 100_000_000;
/// Token prefix of the watches on frontends' `state` nodes.
pub(crate) const FRONTEND_TOKEN: &str = "stordom-blkback-frontend:";
/// Watch events taken from the xenstore connection per pass of the loop:
/// as many as the client can hold queued, so every event queued when a
/// pass starts is taken in it. Taking one only marks its vbd (no xenstore
/// request), so a flood of them costs little.
pub const WATCH_EVENTS_TAKEN_PER_PASS: usize = MAX_QUEUED_WATCH_EVENTS;
/// Marked vbds whose state machine [`VbdBackends::attend`] runs per pass,
/// in rotating order: a vbd marked again and again (its frontend rewrites
/// its `state` in a loop) costs one update per pass at most, and any
/// marked vbd is updated within `vbds / VBD_UPDATES_PER_PASS + 1` passes.
pub const VBD_UPDATES_PER_PASS: usize = 8;

/// A vbd: the frontend domain and its device id (the directory names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VbdId {
    pub frontend: DomId,
    pub devid: u32,
}

impl core::fmt::Display for VbdId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}/{}", self.frontend, self.devid)
    }
}

/// A ring of a vbd, as the watchdog and the heartbeat name it.
struct RingName(VbdId, usize);

impl core::fmt::Display for RingName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "vbd {} ring {}", self.0, self.1)
    }
}

/// Whether the backend has work left or may sleep until the next event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Something happened or requests are in flight: poll again.
    Busy,
    /// Every ring is re-armed and nothing is in flight.
    Idle,
}

/// What a vbd needs from xenstore after its rings were polled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attention {
    /// The frontend broke a ring; the rings are stopped: say why and close.
    BrokenRing(RingError),
    /// Its rings drained after a stop: move the state machine on.
    Drained,
    /// A timed step (a detached vbd's grace) is due.
    Due,
}

/// What [`VbdBackends::poll_rings`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct RingsPolled {
    /// Whether to poll again at once.
    pub progress: Progress,
    /// Vbds that need xenstore work, for [`VbdBackends::attend`] (empty,
    /// and unallocated, in the steady state).
    pub attention: Vec<(VbdId, Attention)>,
}

impl RingsPolled {
    /// Asks for `need` once: a vbd polled again before [`VbdBackends::attend`]
    /// ran (its rings are also served while xenstore requests wait) is not
    /// attended twice for one cause.
    fn note(&mut self, id: VbdId, need: Attention) {
        if !self.attention.contains(&(id, need)) {
            self.attention.push((id, need));
        }
    }
}

/// What [`VbdBackends::take_watch_events`] took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchIntake {
    /// Events taken (of every watch); when non-zero, poll again.
    pub taken: usize,
    /// The client dropped events since the last call (its queue was
    /// full): every vbd is looked at again, and the kernel should look at
    /// its own watches' nodes too.
    pub lost: bool,
}

/// A vbd as seen from outside (console, tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VbdStatus {
    /// The backend state last written.
    pub state: XenbusState,
    /// A ring is mapped (possibly draining).
    pub connected: bool,
    /// Requests accepted and not yet answered.
    pub in_flight: usize,
}

/// A vbd as [`VbdBackends::snapshots`] shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VbdSnapshot {
    pub id: VbdId,
    /// The backend state last written.
    pub state: XenbusState,
    /// The toolstack's `params` (what is served), once read.
    pub target: Option<String>,
    /// The served disk's size in 512-byte sectors, once opened.
    pub sectors: Option<u64>,
    /// Its rings' counters summed (zero while none is connected).
    pub totals: VbdTotals,
}

struct Vbd {
    id: VbdId,
    /// `backend/vbd/<frontend>/<devid>`.
    path: String,
    /// The frontend's directory, once read (its `state` is watched).
    frontend_path: Option<String>,
    /// The backend state last written (Initialising: none yet).
    state: XenbusState,
    disk: Option<ServedDisk>,
    /// The toolstack's `params` of the disk being served.
    target: Option<String>,
    /// The connected rings (one per queue the frontend opened).
    rings: Vec<BlkifRing>,
    /// The target could not be served; waits for the toolstack.
    failed: bool,
    /// The directory is gone; dropped once the ring has drained.
    removed: bool,
    /// The frontend closed while requests were in flight: Closed is
    /// written once they have drained, whatever the frontend does meanwhile.
    closed_when_drained: bool,
    /// Detached: when Closed was first seen, and when to look again.
    closed_at: Option<u64>,
    recheck_at: Option<u64>,
    /// Its target answered [`OpenError::InProgress`]: not served yet.
    target_opening: bool,
    log: RateLimitedLog,
    /// Its statistics as last published (node name under `statistics/`).
    published: BTreeMap<String, NodeValue>,
    /// A watch event concerned it since its last update.
    watch_pending: bool,
    /// Adopted from a previous instance, with this many requests left
    /// unanswered on its rings.
    adopted_unanswered: Option<u64>,
    /// What its closed rings answered.
    closed_rings_answered: RequestCounters,
}

impl Vbd {
    fn connected(&self) -> bool {
        !self.rings.is_empty()
    }

    fn stop_rings(&mut self) {
        self.rings.iter_mut().for_each(BlkifRing::stop);
    }

    /// Rings were stopped and nothing is in flight on any of them.
    fn drained(&self) -> bool {
        self.connected() && self.rings.iter().all(BlkifRing::drained)
    }
}

/// All vbds of this domain.
pub struct VbdBackends<O> {
    opener: O,
    devices: BTreeMap<VbdId, Vbd>,
    /// The vbd the next [`VbdBackends::poll_rings`] serves first.
    poll_start: VbdId,
    /// A watch event asked for a rescan of `backend/vbd`.
    rescan_pending: bool,
    /// The marked vbd the next [`VbdBackends::attend`] updates first.
    update_start: VbdId,
    /// The client's count of dropped watch events, as last seen.
    dropped_watch_events: u64,
    /// The rings' serving, in the loop's passes and while the toolstack's
    /// xenstore requests wait.
    serving: RingServing,
    /// What the rings of the vbds removed answered.
    removed_vbds_answered: RequestCounters,
}

/// What [`VbdBackends::adoptions`] counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adoptions {
    pub vbds: usize,
    /// Requests in `[rsp_prod, req_prod)` at adoption, served afresh.
    pub unanswered_requests: u64,
}

/// What the serving passes did.
#[derive(Default)]
struct RingServing {
    /// What the rings served in xenstore waits ask of the toolstack, for
    /// the next [`VbdBackends::poll_rings`].
    attention: Vec<(VbdId, Attention)>,
    /// Times every ring was served in a xenstore wait.
    passes_while_waiting: u64,
    /// The gaps between passes of either kind.
    gaps: UnservedGaps,
}

/// Where a watch event points.
enum EventTarget {
    /// The directory of vbds or of one frontend's vbds changed.
    Rescan,
    Device(VbdId),
}

impl<O: TargetOpener> VbdBackends<O> {
    pub fn new(opener: O) -> Self {
        let first = VbdId {
            frontend: 0,
            devid: 0,
        };
        VbdBackends {
            opener,
            devices: BTreeMap::new(),
            poll_start: first,
            rescan_pending: false,
            update_start: first,
            dropped_watch_events: 0,
            serving: RingServing::default(),
            removed_vbds_answered: RequestCounters::default(),
        }
    }

    /// What every ring answered since this instance started, closed ones
    /// included: a count that only grows (the profile's requests).
    pub fn answered(&self) -> RequestCounters {
        let mut total = self.removed_vbds_answered;
        for vbd in self.devices.values() {
            total.add(&vbd.closed_rings_answered);
            vbd.rings
                .iter()
                .for_each(|ring| total.add(&ring.report().counters));
        }
        total
    }

    /// Watches `backend/vbd`; the first event (fired at once) discovers
    /// the vbds already there.
    pub fn start<C: PeerChannel>(&mut self, xs: &mut Xenstore<'_, C>) -> Result<(), XsError> {
        xs.watch(BACKEND_DIR, WATCH_TOKEN)
    }

    /// Takes up to [`WATCH_EVENTS_TAKEN_PER_PASS`] watch events from
    /// `xs` without waiting, notes those of blkback's watches (see
    /// [`Self::on_watch_event`]) and hands the others to `other`. The
    /// work they call for is done by [`Self::attend`], a bounded share
    /// per pass. Events the client dropped (its queue bounds what a
    /// flooding guest can make stordom hold) mark every vbd and a rescan.
    pub fn take_watch_events<C: PeerChannel>(
        &mut self,
        xs: &mut Xenstore<'_, C>,
        mut other: impl FnMut(&WatchEvent),
    ) -> Result<WatchIntake, XsError> {
        let mut intake = WatchIntake::default();
        while intake.taken < WATCH_EVENTS_TAKEN_PER_PASS {
            let Some(event) = xs.poll_watch_event()? else {
                break;
            };
            intake.taken += 1;
            if !self.on_watch_event(&event) {
                other(&event);
            }
        }
        let dropped = xs.dropped_watch_events();
        if dropped != self.dropped_watch_events {
            self.dropped_watch_events = dropped;
            intake.lost = true;
            self.rescan_pending = true;
            self.devices
                .values_mut()
                .for_each(|v| v.watch_pending = true);
        }
        Ok(intake)
    }

    /// Notes one watch event for [`Self::attend`]: its vbd is marked (or
    /// a rescan, for a vbd not known yet). Marks coalesce: any number of
    /// events for one vbd cost one update, which reads the current nodes
    /// (the state machine is level-triggered). False if the event belongs
    /// to another watch.
    pub fn on_watch_event(&mut self, event: &WatchEvent) -> bool {
        if event.token == WATCH_TOKEN {
            match parse_backend_path(&event.path) {
                Some(EventTarget::Device(id)) => match self.devices.get_mut(&id) {
                    Some(vbd) => vbd.watch_pending = true,
                    None => self.rescan_pending = true,
                },
                Some(EventTarget::Rescan) => self.rescan_pending = true,
                None => {}
            }
        } else if let Some(id) = event.token.strip_prefix(FRONTEND_TOKEN) {
            // Frontends write their nodes at will: their events only ever
            // mark a known vbd, never trigger a rescan.
            if let Some(vbd) = parse_id(id).and_then(|id| self.devices.get_mut(&id)) {
                vbd.watch_pending = true;
            }
        } else {
            return false;
        }
        true
    }

    /// Serves every ring, each up to its budget of requests per pass
    /// ([`crate::ring_io::REQUESTS_TAKEN_PER_RING_PER_PASS`]), starting one
    /// vbd further on each pass so that none is always served first;
    /// touches no xenstore node. What needs the toolstack (broken rings,
    /// drained disconnects, timed steps) is returned for [`Self::attend`],
    /// with what rings served during the last `attend` found.
    pub fn poll_rings<S: BackendServices>(&mut self, svc: &mut S) -> RingsPolled {
        let mut polled = RingsPolled {
            progress: Progress::Idle,
            attention: core::mem::take(&mut self.serving.attention),
        };
        let now = svc.now_ns();
        self.serving.gaps.served(now);
        let start = self.poll_start;
        for (_, vbd) in self.devices.range_mut(start..) {
            poll_vbd(vbd, svc, now, &mut polled);
        }
        for (_, vbd) in self.devices.range_mut(..start) {
            poll_vbd(vbd, svc, now, &mut polled);
        }
        self.poll_start = self.after(start);
        polled
    }

    /// The vbd after `id` in rotating order (the first after the last).
    fn after(&self, id: VbdId) -> VbdId {
        let after = self.devices.range((Excluded(id), Unbounded)).next();
        let next = after.or_else(|| self.devices.iter().next());
        next.map_or(id, |(next, _)| *next)
    }

    /// Publishes the statistics of each connected vbd that changed since
    /// the last call (see [`crate::statistics`]), without waiting for
    /// xenstored; the loop calls this about once a second.
    pub fn publish_statistics<C: PeerChannel>(&mut self, xs: &mut Xenstore<'_, C>) {
        for vbd in self.devices.values_mut() {
            if vbd.rings.is_empty() || vbd.removed {
                continue;
            }
            let reports: Vec<RingReport> = vbd.rings.iter().map(BlkifRing::report).collect();
            if statistics::publish(xs, &vbd.path, &reports, &mut vbd.published).is_err() {
                // The connection is broken; the loop finds out on its own.
                return;
            }
        }
    }

    /// Lets every ring's watchdog look at its requests (see
    /// [`BlkifRing::watchdog`]).
    pub fn watchdog<S: BackendServices>(&mut self, svc: &mut S, now_ns: u64) {
        for vbd in self.devices.values_mut() {
            for (n, ring) in vbd.rings.iter_mut().enumerate() {
                ring.watchdog(svc, &RingName(vbd.id, n), now_ns);
            }
        }
    }

    /// Writes ` | vbd F/D ring N <indices, in flight, answered>` for each
    /// ring with requests outstanding; returns how many are outstanding.
    pub fn heartbeat(&self, out: &mut dyn core::fmt::Write) -> u64 {
        let mut outstanding = 0;
        for vbd in self.devices.values() {
            for (n, ring) in vbd.rings.iter().enumerate() {
                let report = ring.report();
                if report.outstanding() > 0 {
                    outstanding += report.outstanding();
                    let _ = write!(out, " | {} {report}", RingName(vbd.id, n));
                }
            }
        }
        outstanding
    }

    /// Does the xenstore work [`Self::poll_rings`] asked for, then what
    /// watch events asked for: a rescan, and the state machines of up to
    /// [`VBD_UPDATES_PER_PASS`] marked vbds, starting one further than
    /// the last pass ended. Busy while marked vbds remain.
    pub fn attend<C: PeerChannel, S: BackendServices>(
        &mut self,
        xs: &mut Xenstore<'_, C>,
        svc: &mut S,
        attention: &[(VbdId, Attention)],
    ) -> Progress {
        for &(id, need) in attention {
            match need {
                Attention::BrokenRing(e) => {
                    let why = format!("frontend broke a ring ({e:?}: requests beyond its size)");
                    self.with_vbd_out(xs, svc, id, |vbd, xs, svc, _| {
                        report(xs, svc, vbd, &why, XenbusState::Closing);
                    });
                }
                Attention::Drained | Attention::Due => self.update(xs, svc, id),
            }
        }
        if core::mem::take(&mut self.rescan_pending) {
            self.rescan(xs, svc);
        }
        let start = self.update_start;
        let marked = self
            .devices
            .range(start..)
            .chain(self.devices.range(..start));
        let mut due = [None; VBD_UPDATES_PER_PASS];
        for (slot, (id, _)) in due.iter_mut().zip(marked.filter(|(_, v)| v.watch_pending)) {
            *slot = Some(*id);
        }
        for id in due.iter().flatten() {
            self.update(xs, svc, *id);
        }
        if let Some(&last) = due.iter().flatten().last() {
            self.update_start = self.after(last);
        }
        match self.devices.values().any(|v| v.watch_pending) {
            true => Progress::Busy,
            false => Progress::Idle,
        }
    }

    /// The vbds this instance adopted from a previous one (see the crate
    /// documentation, "Restart"), and the requests they had unanswered.
    pub fn adoptions(&self) -> Adoptions {
        let adopted = self.devices.values().filter_map(|v| v.adopted_unanswered);
        Adoptions {
            vbds: adopted.clone().count(),
            unanswered_requests: adopted.sum(),
        }
    }

    /// Whether a vbd waits for its target to become ready (a network
    /// disk connecting): until then its frontend is not served.
    pub fn targets_opening(&self) -> bool {
        self.devices.values().any(|v| v.target_opening)
    }

    /// Times the rings were served while the toolstack's work (a vbd's
    /// state machine, a rescan) waited for xenstore, a count that only
    /// grows: that work does not hold them up.
    pub fn ring_passes_while_waiting(&self) -> u64 {
        self.serving.passes_while_waiting
    }

    /// The longest the rings went unserved since the last call, the gap
    /// still open at `now` included: the time between the starts of two
    /// consecutive serving passes, [`Self::poll_rings`]' or those in
    /// [`Self::attend`]'s xenstore waits.
    pub fn take_longest_unserved(&mut self, now: u64) -> UnservedGap {
        self.serving.gaps.take_longest(now)
    }

    /// The loop halted idle (nothing outstanding; any event ends the halt)
    /// until `now`: the rings' next gap counts from there.
    pub fn idle_until(&mut self, now: u64) {
        self.serving.gaps.idle_until(now);
    }

    /// Every vbd as it stands, for the metrics endpoint: the same ring
    /// reports as its published `statistics/`.
    pub fn snapshots(&self) -> Vec<VbdSnapshot> {
        self.devices
            .values()
            .filter(|vbd| !vbd.removed)
            .map(|vbd| {
                let reports: Vec<RingReport> = vbd.rings.iter().map(BlkifRing::report).collect();
                VbdSnapshot {
                    id: vbd.id,
                    state: vbd.state,
                    target: vbd.target.clone(),
                    sectors: vbd.disk.as_ref().map(ServedDisk::sectors),
                    totals: VbdTotals::of(&reports),
                }
            })
            .collect()
    }

    /// The vbd's current position, if it is known.
    pub fn status(&self, id: VbdId) -> Option<VbdStatus> {
        self.devices.get(&id).map(|vbd| VbdStatus {
            state: vbd.state,
            connected: vbd.connected(),
            in_flight: vbd.rings.iter().map(BlkifRing::in_flight).sum(),
        })
    }

    /// Lists `backend/vbd/*/*`: adds new vbds, drops vanished ones.
    fn rescan<C: PeerChannel, S: BackendServices>(
        &mut self,
        xs: &mut Xenstore<'_, C>,
        svc: &mut S,
    ) {
        let mut present = Vec::new();
        with_rings_served(&mut self.devices, &mut self.serving, xs, svc, |xs, _| {
            let frontends = xs.directory(Tx::NONE, BACKEND_DIR).unwrap_or_default();
            for frontend in &frontends {
                let Some(frontend_id) = parse_number::<DomId>(frontend) else {
                    continue;
                };
                let devices = xs
                    .directory(Tx::NONE, &format!("{BACKEND_DIR}/{frontend}"))
                    .unwrap_or_default();
                for devid in devices.iter().filter_map(|d| parse_number::<u32>(d)) {
                    present.push(VbdId {
                        frontend: frontend_id,
                        devid,
                    });
                }
            }
        });
        let known: Vec<VbdId> = self.devices.keys().copied().collect();
        for id in known.iter().filter(|id| !present.contains(id)) {
            self.update(xs, svc, *id);
        }
        for id in present {
            if self.devices.contains_key(&id) {
                continue;
            }
            let path = format!("{BACKEND_DIR}/{}/{}", id.frontend, id.devid);
            let vbd = Vbd {
                id,
                log: RateLimitedLog::new(format!("vbd {id}")),
                path,
                frontend_path: None,
                state: XenbusState::Initialising,
                disk: None,
                target: None,
                rings: Vec::new(),
                failed: false,
                removed: false,
                closed_when_drained: false,
                closed_at: None,
                recheck_at: None,
                target_opening: false,
                published: BTreeMap::new(),
                watch_pending: false,
                adopted_unanswered: None,
                closed_rings_answered: RequestCounters::default(),
            };
            self.devices.insert(id, vbd);
            self.update(xs, svc, id);
        }
    }

    /// Runs the state machine of one vbd; drops it once it is gone.
    fn update<C: PeerChannel, S: BackendServices>(
        &mut self,
        xs: &mut Xenstore<'_, C>,
        svc: &mut S,
        id: VbdId,
    ) {
        let gone = self.with_vbd_out(xs, svc, id, |vbd, xs, svc, opener| {
            vbd.watch_pending = false;
            if let Err(e) = step(vbd, xs, svc, opener) {
                vbd.log.line(svc, format_args!("xenstore: {e:?}"));
            }
            let gone = vbd.removed && !vbd.connected();
            if gone && let Some(frontend) = &vbd.frontend_path {
                // The frontend may be gone with its watch already.
                let _ = xs.unwatch(&format!("{frontend}/state"), &frontend_token(id));
            }
            gone
        });
        if gone == Some(true)
            && let Some(vbd) = self.devices.remove(&id)
        {
            self.removed_vbds_answered.add(&vbd.closed_rings_answered);
            svc.log(format_args!("vbd {}/{}: removed", id.frontend, id.devid));
        }
    }

    /// Does the xenstore work `body` of vbd `id` (none if it is not
    /// known) with the other vbds' rings served while it waits (see
    /// [`with_rings_served`]); the vbd is out of the map meanwhile, so the
    /// two never touch the same vbd.
    fn with_vbd_out<'a, C: PeerChannel, S: BackendServices, T>(
        &mut self,
        xs: &mut Xenstore<'a, C>,
        svc: &mut S,
        id: VbdId,
        body: impl FnOnce(
            &mut Vbd,
            &mut Xenstore<'a, WorkingChannel<'_, C>>,
            &mut SharedServices<'_, '_, S>,
            &mut O,
        ) -> T,
    ) -> Option<T> {
        let mut vbd = self.devices.remove(&id)?;
        let opener = &mut self.opener;
        let done = with_rings_served(&mut self.devices, &mut self.serving, xs, svc, |xs, svc| {
            body(&mut vbd, xs, svc, opener)
        });
        self.devices.insert(id, vbd);
        Some(done)
    }
}

/// Does the xenstore work `body` on a connection whose waits for
/// xenstored's replies serve the rings of `devices` (a connect makes tens
/// of round trips, each hundreds of milliseconds when dom0 is busy: the
/// rings must not wait for them).
fn with_rings_served<'a, C: PeerChannel, S: BackendServices, T>(
    devices: &mut BTreeMap<VbdId, Vbd>,
    serving: &mut RingServing,
    xs: &mut Xenstore<'a, C>,
    svc: &mut S,
    body: impl FnOnce(&mut Xenstore<'a, WorkingChannel<'_, C>>, &mut SharedServices<'_, '_, S>) -> T,
) -> T {
    let shared = RefCell::new(svc);
    let mut serve = || serve_rings_while_waiting(devices, &shared, serving);
    xs.with_wait_work(&mut serve, |xs| body(xs, &mut SharedServices(&shared)))
}

/// Serves every ring of `devices` once, for [`with_rings_served`] while a
/// xenstore request waits for its reply. True if anything happened or
/// requests are in flight (look again soon).
fn serve_rings_while_waiting<S: BackendServices>(
    devices: &mut BTreeMap<VbdId, Vbd>,
    svc: &RefCell<&mut S>,
    serving: &mut RingServing,
) -> bool {
    // Never borrowed here: the state machine's uses end before it calls
    // xenstore (see SharedServices). Skipping a turn beats a panic.
    let Ok(mut svc) = svc.try_borrow_mut() else {
        return false;
    };
    let mut polled = RingsPolled {
        progress: Progress::Idle,
        attention: core::mem::take(&mut serving.attention),
    };
    let now = svc.now_ns();
    serving.gaps.served(now);
    for vbd in devices.values_mut() {
        poll_vbd(vbd, &mut **svc, now, &mut polled);
    }
    serving.attention = polled.attention;
    serving.passes_while_waiting += 1;
    polled.progress == Progress::Busy
}

/// The services as a stepped vbd's state machine uses them while
/// [`serve_rings_while_waiting`] may run in its xenstore waits. Each call
/// borrows them for its own length only, and none waits for xenstore, so
/// the borrows of the two never overlap.
struct SharedServices<'c, 's, S>(&'c RefCell<&'s mut S>);

impl<S: BackendServices> BackendServices for SharedServices<'_, '_, S> {
    fn bind_interdomain(&mut self, remote: DomId, remote_port: u32) -> Result<Port, Errno> {
        self.0.borrow_mut().bind_interdomain(remote, remote_port)
    }

    fn notify(&mut self, port: Port) -> Result<(), Errno> {
        self.0.borrow_mut().notify(port)
    }

    fn close_port(&mut self, port: Port) {
        self.0.borrow_mut().close_port(port);
    }

    fn map_grants(&mut self, specs: &[GrantSpec], results: &mut Vec<Result<Mapping, GrantError>>) {
        self.0.borrow_mut().map_grants(specs, results);
    }

    fn unmap_grants(
        &mut self,
        mappings: &mut Vec<Mapping>,
        failed: &mut Vec<(Mapping, GrantError)>,
    ) {
        self.0.borrow_mut().unmap_grants(mappings, failed);
    }

    fn frame_address(&self, gfn: u64) -> Option<NonNull<u8>> {
        self.0.borrow().frame_address(gfn)
    }

    fn now_ns(&self) -> u64 {
        self.0.borrow().now_ns()
    }

    fn log(&mut self, line: fmt::Arguments<'_>) {
        self.0.borrow_mut().log(line);
    }

    fn alloc_bounce_pages(&mut self, pages: usize) -> Option<DmaRegion> {
        self.0.borrow_mut().alloc_bounce_pages(pages)
    }

    unsafe fn free_bounce_pages(&mut self, region: DmaRegion) {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.0.borrow_mut().free_bounce_pages(region) }
    }
}

/// Serves the rings of one vbd for [`VbdBackends::poll_rings`].
fn poll_vbd<S: BackendServices>(vbd: &mut Vbd, svc: &mut S, now: u64, polled: &mut RingsPolled) {
    let mut busy = false;
    if vbd.recheck_at.is_some_and(|at| now >= at) {
        polled.note(vbd.id, Attention::Due);
    }
    let Some(disk) = &vbd.disk else {
        return;
    };
    let mut broken = None;
    for ring in &mut vbd.rings {
        match ring.serve(disk, svc, &mut vbd.log) {
            Ok(worked) => busy |= worked,
            Err(e) => broken = Some(e),
        }
        // A polled device's completions are found only by polling it.
        busy |= ring.in_flight() > 0 && disk.completions() == CompletionSignal::Polled;
    }
    if let Some(e) = broken {
        vbd.stop_rings();
        busy = true;
        polled.note(vbd.id, Attention::BrokenRing(e));
    }
    if vbd.drained() {
        polled.note(vbd.id, Attention::Drained);
        busy = true;
    }
    if busy {
        polled.progress = Progress::Busy;
    }
}

/// One level-triggered step of a vbd's state machine.
fn step<C: PeerChannel, S: BackendServices, O: TargetOpener>(
    vbd: &mut Vbd,
    xs: &mut Xenstore<'_, C>,
    svc: &mut S,
    opener: &mut O,
) -> Result<(), XsError> {
    if vbd.drained() {
        for ring in vbd.rings.drain(..) {
            vbd.closed_rings_answered.add(&ring.report().counters);
            ring.close(svc);
        }
    }
    if vbd.removed {
        return Ok(());
    }
    if !vbd.connected() && core::mem::take(&mut vbd.closed_when_drained) {
        set_state(xs, vbd, XenbusState::Closed)?;
    }
    if matches!(xs.read(Tx::NONE, &vbd.path), Err(XsError::NoEntry)) {
        // The toolstack removed the vbd (e.g. the guest was destroyed).
        vbd.removed = true;
        vbd.stop_rings();
        return Ok(());
    }
    let online = read_optional(xs, &format!("{}/online", vbd.path))?.is_none_or(|v| v != "0");
    let opening = !vbd.failed && vbd.disk.is_none() && online;
    // Taken offline while its target connected: nothing waits on it now.
    vbd.target_opening &= opening;
    // Only a vbd this instance has not written to yet may be one a
    // previous instance (in this domain) left connected.
    let start = match opening && vbd.state == XenbusState::Initialising {
        true if left_connected(xs, &vbd.path)? => VbdStart::Adoption,
        _ => VbdStart::Handshake,
    };
    if opening && !open(vbd, xs, svc, opener, start)? {
        return Ok(());
    }
    if start == VbdStart::Adoption {
        return connect(vbd, xs, svc, start);
    }
    // None once the toolstack removed the frontend's directory (or before
    // the frontend's path is known). A removed frontend reads as EACCES,
    // not ENOENT: its domain's home is not ours to read.
    let frontend_node = match &vbd.frontend_path {
        Some(frontend) => match read_optional(xs, &format!("{frontend}/state")) {
            Err(XsError::Access) => None,
            other => other?,
        },
        None => None,
    };
    let frontend_state = frontend_node
        .as_ref()
        .map_or(XenbusState::Unknown, |v| XenbusState::parse(v.as_bytes()));
    if !online {
        let now = svc.now_ns();
        detach(vbd, xs, frontend_state, now)?;
        let waiting = !vbd.removed && vbd.state == XenbusState::Closed;
        vbd.recheck_at = waiting.then(|| now + DETACH_RECHECK_NS);
        return Ok(());
    }
    if vbd.failed {
        return Ok(());
    }
    match frontend_state {
        XenbusState::Initialising | XenbusState::InitWait => {
            let closed = matches!(vbd.state, XenbusState::Closing | XenbusState::Closed);
            if closed && !vbd.connected() {
                // The frontend came back (guest reboot, or a restart after
                // our complaint): offer the disk again.
                vbd.log.line(svc, format_args!("frontend reconnecting"));
                set_state(xs, vbd, XenbusState::InitWait)?;
            }
        }
        XenbusState::Initialised | XenbusState::Connected => {
            let may_connect = matches!(vbd.state, XenbusState::InitWait | XenbusState::Closed);
            if may_connect && !vbd.connected() {
                connect(vbd, xs, svc, VbdStart::Handshake)?;
            }
        }
        XenbusState::Closing | XenbusState::Closed | XenbusState::Unknown => {
            let was_connected = vbd.connected() || vbd.state == XenbusState::Connected;
            if frontend_state == XenbusState::Unknown && !was_connected {
                // No frontend yet (or never connected): nothing to undo.
                return Ok(());
            }
            close_towards(vbd, xs, frontend_state == XenbusState::Closing)?;
        }
        XenbusState::Reconfiguring | XenbusState::Reconfigured => {}
    }
    Ok(())
}

/// Takes the vbd down as far as the frontend allows. While the frontend
/// still uses the ring (`frontend_uses_ring`: it is only Closing, or has
/// not reacted to our Closing yet) the ring is served as Linux blkback
/// does, and the state is Closing. Otherwise the ring stops, Closing while
/// its requests drain, Closed once it is gone.
fn close_towards<C: PeerChannel>(
    vbd: &mut Vbd,
    xs: &mut Xenstore<'_, C>,
    frontend_uses_ring: bool,
) -> Result<(), XsError> {
    if !frontend_uses_ring && vbd.connected() {
        vbd.stop_rings();
        vbd.closed_when_drained = true;
    }
    let target = if vbd.connected() || frontend_uses_ring {
        XenbusState::Closing
    } else {
        XenbusState::Closed
    };
    if vbd.state != target && vbd.state != XenbusState::Closed {
        set_state(xs, vbd, target)?;
    }
    Ok(())
}

/// `online=0`: close, and once Closed with the frontend no longer using
/// the ring, remove the backend directory, as `xl devd` does in a driver
/// domain. Not at once: libxl in the toolstack domain waits to read
/// Closed, fails the detach if the state node vanished first, then waits
/// for the directory to go (10 s). So the directory goes
/// [`DETACH_GRACE_NS`] after Closed, even with the frontend gone: `xl
/// destroy` removes a running guest's frontend in the step that writes
/// `online=0`, and then waits for Closed all the same.
fn detach<C: PeerChannel>(
    vbd: &mut Vbd,
    xs: &mut Xenstore<'_, C>,
    frontend: XenbusState,
    now: u64,
) -> Result<(), XsError> {
    // A frontend that has (or had) our ring must close first, or it
    // would be left with a ring nobody serves.
    let had_ring =
        vbd.connected() || matches!(vbd.state, XenbusState::Connected | XenbusState::Closing);
    let frontend_busy = had_ring
        && matches!(
            frontend,
            XenbusState::Initialised | XenbusState::Connected | XenbusState::Closing
        );
    close_towards(vbd, xs, frontend_busy)?;
    if !vbd.connected() && !frontend_busy {
        if vbd.state != XenbusState::Closed {
            set_state(xs, vbd, XenbusState::Closed)?;
        }
        let closed_at = *vbd.closed_at.get_or_insert(now);
        if now >= closed_at + DETACH_GRACE_NS {
            xs.rm(Tx::NONE, &vbd.path)?;
            vbd.removed = true;
        }
    }
    Ok(())
}

/// How a vbd comes to serve its frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VbdStart {
    /// The xenbus dance: features, InitWait, the frontend's rings, size,
    /// Connected.
    Handshake,
    /// A previous instance of stordom in this domain (restarted in place)
    /// left the vbd Connected with its frontend Connected: its rings are
    /// taken over as they are, with no state written. The frontend's
    /// nodes (rings, event channels, protocol, persistent grants, page
    /// order, queues) are read as for a connect, the rings mapped and the
    /// ports bound again (the previous instance's were released first,
    /// see `xen_pv::held`), and each ring is attached from its shared
    /// `rsp_prod`: the requests in `[rsp_prod, req_prod)` are exactly the
    /// unanswered ones (answers are published in ring order) and are
    /// taken, parsed and served afresh, the older ones never again. A
    /// write the previous instance had started is redone: the same data
    /// at the same sectors, so doing it twice leaves what doing it once
    /// does; a barrier among them still waits for the older ones. Indices
    /// that are garbage (more requests than the ring holds) break the
    /// ring at its first serve: that vbd is closed with the reason.
    Adoption,
}

/// Whether a previous instance left the vbd at `path` Connected with its
/// frontend Connected.
fn left_connected<C: PeerChannel>(xs: &mut Xenstore<'_, C>, path: &str) -> Result<bool, XsError> {
    let state_of = |xs: &mut Xenstore<'_, C>, dir: &str| -> Result<XenbusState, XsError> {
        let node = match read_optional(xs, &format!("{dir}/state")) {
            Err(XsError::Access) => None,
            other => other?,
        };
        Ok(node.map_or(XenbusState::Unknown, |v| XenbusState::parse(v.as_bytes())))
    };
    if state_of(xs, path)? != XenbusState::Connected {
        return Ok(false);
    }
    let Some(frontend) = read_optional(xs, &format!("{path}/frontend"))? else {
        return Ok(false);
    };
    Ok(state_of(xs, &frontend)? == XenbusState::Connected)
}

/// Reads the toolstack's nodes and opens the target; on a handshake,
/// publishes the features, then InitWait (an adopted vbd's are still
/// there). False while the nodes are incomplete.
fn open<C: PeerChannel, S: BackendServices, O: TargetOpener>(
    vbd: &mut Vbd,
    xs: &mut Xenstore<'_, C>,
    svc: &mut S,
    opener: &mut O,
    start: VbdStart,
) -> Result<bool, XsError> {
    let path = vbd.path.clone();
    let node = |xs: &mut Xenstore<'_, C>, name: &str| read_optional(xs, &format!("{path}/{name}"));
    let (Some(params), Some(frontend)) = (node(xs, "params")?, node(xs, "frontend")?) else {
        return Ok(false);
    };
    let mode = node(xs, "mode")?.unwrap_or_else(|| "w".to_string());
    let cdrom = node(xs, "device-type")?.is_some_and(|t| t == "cdrom");
    let removable = node(xs, "removable")?.is_some_and(|v| v == "1");
    let discard_enabled = node(xs, "discard-enable")?.is_none_or(|v| v != "0");
    let read_only = !mode.contains('w');
    let disk = Target::parse(&params)
        .and_then(|target| opener.open(&path, &target, read_only))
        .and_then(|opened| ServedDisk::new(opened, read_only));
    let disk = match disk {
        Ok(disk) => disk,
        Err(OpenError::InProgress) => {
            vbd.recheck_at = Some(svc.now_ns() + OPEN_RECHECK_NS);
            vbd.target_opening = true;
            return Ok(false);
        }
        Err(e) => {
            vbd.target_opening = false;
            let why = format!("cannot serve target {params:?}: {e}");
            vbd.failed = true;
            report(xs, svc, vbd, &why, XenbusState::Closed);
            return Ok(false);
        }
    };
    let offer = Offer {
        read_only,
        cdrom,
        removable,
        discard_enabled,
    };
    if start == VbdStart::Handshake {
        publish_features(xs, &path, &disk, &offer)?;
    }
    let sectors = disk.sectors();
    let path_note = match disk.data_path() {
        DataPath::ZeroCopy => "",
        DataPath::Bounce => ", bounce buffers",
    };
    vbd.disk = Some(disk);
    vbd.recheck_at = None;
    vbd.target_opening = false;
    vbd.target = Some(params.clone());
    vbd.log.line(
        svc,
        format_args!("serving {params} ({sectors} sectors, mode {mode}{path_note})"),
    );
    xs.watch(&format!("{frontend}/state"), &frontend_token(vbd.id))?;
    vbd.frontend_path = Some(frontend);
    if start == VbdStart::Handshake {
        set_state(xs, vbd, XenbusState::InitWait)?;
    }
    Ok(true)
}

/// Maps the frontend's rings and binds their channels; on a handshake,
/// publishes the disk's size, then Connected (an adopted vbd is Connected
/// already). A frontend whose details are unusable gets an error node and
/// Closing.
fn connect<C: PeerChannel, S: BackendServices>(
    vbd: &mut Vbd,
    xs: &mut Xenstore<'_, C>,
    svc: &mut S,
    start: VbdStart,
) -> Result<(), XsError> {
    let (Some(frontend), Some(disk)) = (vbd.frontend_path.clone(), &vbd.disk) else {
        return Ok(());
    };
    let (geometry, sectors, max_queues) = (*disk.geometry(), disk.sectors(), disk.max_queues());
    let rings = match read_frontend_rings(xs, &frontend, vbd.id.frontend, max_queues)? {
        Ok(rings) => rings,
        Err(why) => {
            report(xs, svc, vbd, &why, XenbusState::Closing);
            return Ok(());
        }
    };
    let Some(disk) = &vbd.disk else {
        return Ok(());
    };
    let mut connected = Vec::with_capacity(rings.len());
    for (queue, published) in (0..).zip(&rings) {
        match BlkifRing::connect(svc, published, disk) {
            Ok(ring) => connected.push(ring),
            Err(e) => {
                for mut ring in connected {
                    ring.stop();
                    ring.close(svc);
                }
                let why = format!("connecting ring {queue}: {e}");
                report(xs, svc, vbd, &why, XenbusState::Closing);
                return Ok(());
            }
        }
    }
    let path = vbd.path.clone();
    let written = match start {
        VbdStart::Handshake => publish_size(xs, &path, sectors, &geometry),
        VbdStart::Adoption => Ok(()),
    };
    let unanswered: u64 = connected
        .iter()
        .map(|ring| {
            let indices = ring.report().indices;
            u64::from(indices.req_prod.wrapping_sub(indices.rsp_prod))
        })
        .sum();
    if start == VbdStart::Adoption {
        // The previous instance may have put answers on a ring and died
        // before its notify went out (notifies wait for the loop's sleep).
        connected.iter().for_each(|ring| ring.notify_frontend(svc));
    }
    vbd.rings = connected;
    written?;
    if let Some(first) = rings.first() {
        let (count, pages) = (rings.len(), first.ring_refs.len());
        let (protocol, persistent) = (first.protocol, first.persistent);
        let how = match start {
            VbdStart::Handshake => "connected",
            VbdStart::Adoption => "adopted",
        };
        vbd.log.line(
            svc,
            format_args!(
                "{how}: {count} ring(s) of {pages} page(s), {protocol:?}, \
                 persistent grants {persistent}, {unanswered} unanswered"
            ),
        );
    }
    if start == VbdStart::Adoption {
        vbd.adopted_unanswered = Some(unanswered);
        vbd.state = XenbusState::Connected;
        return Ok(());
    }
    // A reconnect clears the complaint about the previous connection.
    match xs.rm(Tx::NONE, &format!("{path}/error")) {
        Ok(()) | Err(XsError::NoEntry) => {}
        Err(e) => return Err(e),
    }
    set_state(xs, vbd, XenbusState::Connected)
}

/// Reports a failure in the vbd's `error` node and on the console, then
/// moves to `state`.
fn report<C: PeerChannel, S: BackendServices>(
    xs: &mut Xenstore<'_, C>,
    svc: &mut S,
    vbd: &mut Vbd,
    why: &str,
    state: XenbusState,
) {
    vbd.log.line(svc, format_args!("error: {why}"));
    let written = xs
        .write(Tx::NONE, &format!("{}/error", vbd.path), why.as_bytes())
        .and_then(|()| set_state(xs, vbd, state));
    if let Err(e) = written {
        vbd.log.line(svc, format_args!("reporting failed: {e:?}"));
    }
}

fn set_state<C: PeerChannel>(
    xs: &mut Xenstore<'_, C>,
    vbd: &mut Vbd,
    state: XenbusState,
) -> Result<(), XsError> {
    xs.write(
        Tx::NONE,
        &format!("{}/state", vbd.path),
        state.as_str().as_bytes(),
    )?;
    vbd.state = state;
    Ok(())
}

fn frontend_token(id: VbdId) -> String {
    format!("{FRONTEND_TOKEN}{}/{}", id.frontend, id.devid)
}

/// A `<frontend>/<devid>` pair, as in tokens and paths.
fn parse_id(text: &str) -> Option<VbdId> {
    let (frontend, devid) = text.split_once('/')?;
    Some(VbdId {
        frontend: parse_number(frontend)?,
        devid: parse_number(devid)?,
    })
}

/// Classifies a path reported by the `backend/vbd` watch, relative or
/// absolute (`/local/domain/<self>/backend/vbd/...`).
fn parse_backend_path(path: &str) -> Option<EventTarget> {
    let relative = match path.strip_prefix("/local/domain/") {
        Some(rest) => rest.split_once('/')?.1,
        None => path,
    };
    let below = relative.strip_prefix(BACKEND_DIR)?;
    if below.is_empty() {
        return Some(EventTarget::Rescan);
    }
    let mut parts = below.strip_prefix('/')?.splitn(3, '/');
    let frontend = parts.next()?;
    let devid = parts.next();
    let node = parts.next();
    let in_statistics = |node: &str| {
        node.strip_prefix(statistics::STATISTICS_DIR)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if node.is_some_and(in_statistics) {
        // Only stordom writes there, every second under load: each write
        // fires the watch, and a vbd update for it cost xenstore round
        // trips that changed nothing (78 a second, a sixth of the loop's
        // time per request, in runs/20261207-152212-ab).
        return None;
    }
    match devid {
        None => Some(EventTarget::Rescan),
        Some(devid) => parse_id(&format!("{frontend}/{devid}")).map(EventTarget::Device),
    }
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn watch_paths_are_classified() {
        let device = |p| match parse_backend_path(p) {
            Some(EventTarget::Device(id)) => Some((id.frontend, id.devid)),
            _ => None,
        };
        assert!(matches!(
            parse_backend_path("backend/vbd"),
            Some(EventTarget::Rescan)
        ));
        assert!(matches!(
            parse_backend_path("backend/vbd/3"),
            Some(EventTarget::Rescan)
        ));
        assert_eq!(device("backend/vbd/3/51712/state"), Some((3, 51712)));
        assert_eq!(device("/local/domain/1/backend/vbd/3/768"), Some((3, 768)));
        assert!(parse_backend_path("backend/vbdx").is_none());
        assert!(parse_backend_path("backend/vif/3/0").is_none());
        assert_eq!(device("backend/vbd/3/x"), None);
        // stordom's own statistics, not the toolstack's or the frontend's.
        assert!(parse_backend_path("backend/vbd/3/51712/statistics").is_none());
        assert!(parse_backend_path("backend/vbd/3/51712/statistics/rd_req").is_none());
        assert_eq!(device("backend/vbd/3/51712/statisticsx"), Some((3, 51712)));
        assert_eq!(device("backend/vbd/99999/1"), None);
        assert_eq!(parse_id("7/-1"), None);
        assert_eq!(parse_number::<u32>("+5"), None);
    }
}

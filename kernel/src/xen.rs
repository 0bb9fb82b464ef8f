//! stordom as a Xen guest: finding Xen, its hypercall page and view of
//! time, and the services built on them (shared_info and event channels,
//! xenstore, the PV console, grant mapping).
//!
//! Interrupts stay off outside halts, so the upcall handler does nothing
//! but wake the CPU: the job that owns the [`XenConnection`] dispatches
//! events with [`dispatch_events`], and nothing here runs in interrupt
//! context. xenstore and console waits poll their own port's pending bit,
//! so they never need the event channels.

use crate::arch::paging::PageAccess;
use crate::arch::{apic, clock, cpu, interrupts};
use crate::memory;
use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use kernel::held_notifies::HeldNotifies;
use spin::{Mutex, Once};
use xen_pv::arch::{HypercallPage, InstallError, XenCpuid};
use xen_pv::console::{PvConsole, XenconsInterface};
use xen_pv::event::{EventChannels, EvtchnSend, Port, take_pending};
use xen_pv::grant::{GfnWindow, GrantMapper};
use xen_pv::held::{HeldGrants, HeldPorts, Released, release_all};
use xen_pv::hvm::{self, UpcallMethod};
use xen_pv::hypercall::command;
use xen_pv::memory::{SharedInfo, map_shared_info};
use xen_pv::profile::{HypercallProfile, ProfileSnapshot, Profiled};
use xen_pv::ring::{PeerChannel, TimedOut};
use xen_pv::sched;
use xen_pv::vcpu::{self, CpuTimes, RunstateArea};
use xen_pv::xenstore::{StreamRecord, Xenstore, XenstoreInterface};
use xen_pv::{Errno, PAGE_SIZE};

/// Xen, once the hypercall page is installed.
pub struct Xen {
    /// Where Xen's CPUID leaves are.
    pub cpuid: XenCpuid,
    /// The hypercall entry points, every call counted in
    /// [`HYPERCALL_PROFILE`].
    pub hypercalls: Profiled<'static, HypercallPage>,
}

static XEN: Once<Xen> = Once::new();

/// Every hypercall stordom made, by kind, timed in TSC ticks.
static HYPERCALL_PROFILE: HypercallProfile = HypercallProfile::new();

/// The hypercalls made so far (see [`xen_pv::profile`]).
pub fn hypercall_profile() -> ProfileSnapshot {
    HYPERCALL_PROFILE.snapshot()
}

/// Why Xen could not be brought up.
#[derive(Debug)]
pub enum XenError {
    /// No frame for a page Xen needs.
    OutOfMemory,
    /// Xen refused or ignored the hypercall page.
    HypercallPage(InstallError),
    /// A page could not be mapped or protected.
    Map,
    /// A hypercall failed.
    Hypercall(&'static str, Errno),
    /// A xenstore request failed.
    Store(&'static str, xen_pv::xenstore::XsError),
}

impl core::fmt::Display for XenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfMemory => write!(f, "out of memory for a Xen page"),
            Self::HypercallPage(e) => write!(f, "hypercall page not installed: {e:?}"),
            Self::Map => write!(f, "a Xen page could not be mapped"),
            Self::Hypercall(what, e) => write!(f, "{what} failed: {e:?}"),
            Self::Store(what, e) => write!(f, "xenstore: {what} failed: {e:?}"),
        }
    }
}

/// Whether we run on Xen, from CPUID.
pub fn detect() -> Option<XenCpuid> {
    XenCpuid::detect()
}

/// Installs the hypercall page in a fresh frame, then maps it read+execute
/// (it is writable only while Xen fills it, never executable and writable).
pub fn init(cpuid: XenCpuid) -> Result<&'static Xen, XenError> {
    let frame = memory::alloc_frames(1).ok_or(XenError::OutOfMemory)?;
    let page = core::ptr::NonNull::new(frame as *mut u8).ok_or(XenError::OutOfMemory)?;
    // SAFETY: we run at CPL 0 on Xen (CPUID said so); the frame is ours,
    // identity-mapped writable, and is used for nothing else.
    let installed =
        unsafe { HypercallPage::install(page, frame, &cpuid) }.map_err(XenError::HypercallPage)?;
    memory::protect(frame, PAGE_SIZE as u64, PageAccess::CODE).map_err(|_| XenError::Map)?;
    let hypercalls = Profiled::new(installed, &HYPERCALL_PROFILE, cpu::rdtsc);
    Ok(XEN.call_once(|| Xen { cpuid, hypercalls }))
}

/// Xen, if `init` succeeded.
pub fn get() -> Option<&'static Xen> {
    XEN.get()
}

/// The guest TSC frequency Xen reports (leaf base+3, sub-leaf 0, ECX in
/// kHz), in Hz. PVH guests have no PIT to calibrate against.
pub fn tsc_hz(cpuid: &XenCpuid) -> Option<u64> {
    if cpuid.max_leaf < cpuid.base + 3 {
        return None;
    }
    let (_, _, khz, _) = cpu::cpuid_count(cpuid.base + 3, 0);
    (khz != 0).then(|| u64::from(khz) * 1000)
}

/// How the kernel makes hypercalls.
pub type Hypercalls = &'static Profiled<'static, HypercallPage>;

/// What a Xen job owns: its event channels, xenstore connection and
/// grant mapper (the PV console is the logger's).
pub struct XenConnection {
    /// Event channels, dispatched by [`dispatch_events`].
    pub events: EventChannels<'static, Hypercalls>,
    /// The xenstore connection.
    pub store: Xenstore<'static, PortChannel>,
    /// Grant mappings into the reserved GFN window.
    pub grants: GrantMapper<'static, Hypercalls>,
    /// How upcalls arrive.
    pub upcall: UpcallMethod,
}

static CONSOLE: Mutex<Option<PvConsole<'static, PortChannel>>> = Mutex::new(None);

/// Vector Xen raises for event-channel upcalls.
pub const UPCALL_VECTOR: u8 = 0x30;
/// How long xenstored may stay silent before a request fails.
const STORE_TIMEOUT_NS: u64 = 10_000_000_000;
/// A xenstore reply slower than this is reported (once per wait).
const WAIT_WATCHDOG_NS: u64 = 5_000_000_000;
/// Longest sleep of a xenstore wait that has other work (serving rings)
/// and found none: how long a ring's new request may wait for it.
const IDLE_WORK_SLICE_NS: u64 = 1_000_000;
/// How long a full console ring is waited on per wait.
const CONSOLE_WAIT_NS: u64 = 10_000_000;
/// Guest frames reserved for grant mappings: 64 MiB, enough for several
/// rings with every request in flight carrying 1 MiB.
pub const GRANT_WINDOW_FRAMES: u64 = 16384;
/// Ring ports stordom may hold bound at once (vbds times their queues).
const HELD_PORTS_MAX: usize = 256;

/// The grant mappings and ring ports held, outside the heap: what an
/// in-place restart gives back with `xen_pv::held::release_all` (see that
/// module for the restart sequence).
static HELD_GRANTS: HeldGrants<[AtomicU64; GRANT_WINDOW_FRAMES as usize]> = HeldGrants::new();
static HELD_PORTS: HeldPorts<[AtomicU32; HELD_PORTS_MAX]> = HeldPorts::new();
/// Where the xenstore ring's streams stand, for the connection of the
/// next instance after an in-place restart.
static STORE_STREAMS: StreamRecord = StreamRecord::new();
/// Set by the store and console ports' handlers, whichever instance's
/// event channels dispatch them (statics, not heap: they outlive it).
static STORE_FIRED: AtomicBool = AtomicBool::new(false);
static CONSOLE_FIRED: AtomicBool = AtomicBool::new(false);

/// What [`start_services`] set up once for the domain's life, from which
/// each serving instance makes its [`XenConnection`].
struct DomainRings {
    shared: &'static SharedInfo,
    store_iface: &'static XenstoreInterface,
    store_port: u32,
    console_port: u32,
    window_base_gfn: u64,
    upcall: UpcallMethod,
}

static DOMAIN_RINGS: Once<DomainRings> = Once::new();

/// An event channel used as a [`PeerChannel`]: `notify` sends on it,
/// `wait` halts until its port fires (or gives up after `timeout_ns`).
pub struct PortChannel {
    xen: Hypercalls,
    shared: &'static SharedInfo,
    port: Port,
    fired: &'static AtomicBool,
    timeout_ns: u64,
}

impl PortChannel {
    /// The channel on `port`. An event dispatched by `events` (whoever
    /// owns them later) is remembered for the next wait.
    fn new(
        xen: Hypercalls,
        shared: &'static SharedInfo,
        events: &mut EventChannels<'static, Hypercalls>,
        port: u32,
        fired: &'static AtomicBool,
        timeout_ns: u64,
    ) -> Self {
        flag_events(events, port, fired);
        Self {
            xen,
            shared,
            port: Port(port),
            fired,
            timeout_ns,
        }
    }
}

/// Has `events` set `fired` for each event on `port`.
fn flag_events(
    events: &mut EventChannels<'static, Hypercalls>,
    port: u32,
    fired: &'static AtomicBool,
) {
    events.set_handler(
        Port(port),
        Box::new(move |_| fired.store(true, Ordering::Release)),
    );
}

impl PeerChannel for PortChannel {
    fn notify(&mut self) {
        // A failed send means the port is gone; the peer's silence then
        // ends the wait with a timeout.
        let _ = command(&self.xen, &mut EvtchnSend { port: self.port.0 });
    }

    fn wait(&mut self) -> Result<(), TimedOut> {
        self.wait_for_port(None)
    }

    fn wait_working(&mut self, work: &mut dyn FnMut() -> bool) -> Result<(), TimedOut> {
        self.wait_for_port(Some(work))
    }
}

impl PortChannel {
    /// Waits for the port. While `work` finds something to do (requests
    /// in flight on other rings) it runs between looks at the port; when
    /// it finds nothing the wait sleeps on the port, at most
    /// [`IDLE_WORK_SLICE_NS`] at a time (a ring's event does not end that
    /// sleep, and its request should not wait for xenstored).
    fn wait_for_port(
        &mut self,
        mut work: Option<&mut dyn FnMut() -> bool>,
    ) -> Result<(), TimedOut> {
        let start = clock::now_ns();
        let mut reported = false;
        loop {
            if self.fired.swap(false, Ordering::AcqRel) || take_pending(self.shared, 0, self.port) {
                return Ok(());
            }
            let waited = clock::now_ns() - start;
            if waited > self.timeout_ns {
                return Err(TimedOut);
            }
            if waited >= WAIT_WATCHDOG_NS && !reported {
                reported = true;
                log::warn!(
                    "watchdog: no answer on event channel {} (xenstore) for {} ms",
                    self.port.0,
                    waited / 1_000_000
                );
            }
            match work.as_mut() {
                // The work serves the rings: the loop is not stalled.
                Some(work) => {
                    crate::restart::progress();
                    if work() {
                        continue;
                    }
                }
                None => crate::restart::check_stall("waiting for a xenstore or console reply"),
            }
            // Until the watchdog spoke, wake at its mark: a reply still
            // missing there is reported, however soon after it comes.
            let mark = if reported {
                WAIT_WATCHDOG_NS
            } else {
                WAIT_WATCHDOG_NS - waited
            };
            let left = self.timeout_ns.saturating_sub(waited).max(1);
            let slice = work.as_ref().map_or(u64::MAX, |_| IDLE_WORK_SLICE_NS);
            sleep_until_event(&[self.port.0], left.min(mark).min(slice).max(1));
        }
    }
}

/// Sleeps until one of `ports` is pending or `max_ns` passed, with
/// interrupts off, by `SCHEDOP_poll` (a port pending already returns at
/// once; more than one port: any event of the domain wakes it). Under Xen
/// stordom takes no interrupt after boot: no upcall, timer or EOI on the
/// serving path. Without Xen's clock (never seen): the APIC timer's halt.
pub fn sleep_until_event(ports: &[u32], max_ns: u64) {
    let deadline = SHARED_INFO
        .get()
        .and_then(|shared| shared.vcpu_info[0].time.read())
        .map(|clock| clock.nanos_at(cpu::rdtsc()).saturating_add(max_ns));
    let held = HELD_NOTIFIES.lock().take();
    let notifies = held.ports();
    match (XEN.get(), deadline) {
        (Some(xen), Some(deadline)) => {
            let slept = match notifies {
                [] => sched::poll(&&xen.hypercalls, ports, deadline),
                _ => sched::send_then_poll(&&xen.hypercalls, notifies, ports, deadline),
            };
            if let Err(e) = slept {
                log::warn!("xen: SCHEDOP_poll failed ({e:?}); halting instead");
                apic::halt_until_interrupt(max_ns);
            }
        }
        _ => {
            send_all(notifies);
            apic::halt_until_interrupt(max_ns);
        }
    }
}

/// Ring notifies held for the loop's next sleep or wait (see
/// [`HeldNotifies`]). Only the serve loop's flow touches them (never an
/// interrupt handler), one vCPU.
static HELD_NOTIFIES: Mutex<HeldNotifies> = Mutex::new(HeldNotifies::new());

/// Holds a frontend's ring notify on `port` until the loop's next sleep or
/// wait, or the end of the turn after this one ([`end_turn_awake`]);
/// false when there is no room.
pub fn hold_ring_notify(port: Port) -> bool {
    HELD_NOTIFIES.lock().hold(port)
}

/// Ends a serve-loop turn that did not sleep: sends the notifies held
/// through a whole turn ([`HeldNotifies::end_turn_awake`]).
pub fn end_turn_awake() {
    let due = HELD_NOTIFIES.lock().end_turn_awake();
    send_all(due.ports());
}

/// Sends the held ring notifies now.
pub fn send_held_notifies() {
    let held = HELD_NOTIFIES.lock().take();
    send_all(held.ports());
}

/// Drops the held notifies: a restarted instance's ports are its own (it
/// signals every ring it adopts).
pub fn forget_held_notifies() {
    HELD_NOTIFIES.lock().take();
}

fn send_all(ports: &[Port]) {
    if let Some(xen) = XEN.get() {
        ports.iter().for_each(|&port| send(xen, port));
    }
}

/// Sends on `port`; a failure leaves the peer to find the news on its
/// next look.
fn send(xen: &Xen, port: Port) {
    let _ = command(&&xen.hypercalls, &mut EvtchnSend { port: port.0 });
}

/// Sleeps until an event on any port bound in `events` (see
/// [`sleep_until_event`]), at most `max_ns`.
pub fn sleep_until_any_event(events: &EventChannels<'static, Hypercalls>, max_ns: u64) {
    let mut ports = [0u32; sched::MAX_POLL_PORTS];
    let count = ports
        .iter_mut()
        .zip(events.ports())
        .map(|(slot, port)| *slot = port.0)
        .count();
    sleep_until_event(&ports[..count], max_ns);
}

/// Dispatches pending event-channel events to their handlers. It scans
/// the selector every time rather than only when `evtchn_upcall_pending`
/// says so: an upcall acknowledged without a scan (as the interrupt
/// handler does) leaves ports pending with their selector bit set, for
/// which Xen flags nothing more. Seen under Xen with the interrupt-driven
/// loop: stordom asleep for minutes with its xenstore port pending and the
/// upcall flag clear.
pub fn dispatch_events(events: &mut EventChannels<'static, Hypercalls>) {
    UPCALL_TAKEN.store(false, Ordering::Release);
    events.handle_upcall(0);
}

/// Whether an upcall came (during a xenstore or console wait) or is
/// flagged pending since the last [`dispatch_events`]: then the loop must
/// look again rather than halt, since Xen raises no new upcall while one
/// is flagged pending.
pub fn events_pending(events: &EventChannels<'static, Hypercalls>) -> bool {
    UPCALL_TAKEN.load(Ordering::Acquire) || events.has_pending(0)
}

/// Where Xen keeps vCPU 0's runstate times (registered at start).
static RUNSTATE: RunstateArea = RunstateArea::new();

/// vCPU 0's times in each runstate so far, by Xen's clock: `None` until
/// Xen has written the area (or if it refused it).
pub fn cpu_times() -> Option<CpuTimes> {
    let clock = SHARED_INFO.get()?.vcpu_info[0].time.read()?;
    RUNSTATE.times_at(clock.nanos_at(cpu::rdtsc()))
}

/// shared_info, for the upcall handler.
static SHARED_INFO: Once<&'static SharedInfo> = Once::new();
/// Set by the upcall handler: the selector may hold events to scan.
static UPCALL_TAKEN: AtomicBool = AtomicBool::new(false);

/// The upcall interrupt: acknowledges it and leaves the scan to
/// `dispatch_events` outside interrupt context. The acknowledgement matters:
/// Xen raises the vector again while `evtchn_upcall_pending` is set, and
/// an interrupt taken right after every `iretq` would starve the main flow.
fn on_upcall() {
    if let Some(shared) = SHARED_INFO.get() {
        shared.vcpu_info[0]
            .evtchn_upcall_pending
            .store(0, Ordering::SeqCst);
    }
    UPCALL_TAKEN.store(true, Ordering::Release);
}

/// Maps shared_info, routes upcalls, connects xenstore and the PV console,
/// and reserves the grant window above `ram_end`: once for the domain's
/// life. Each serving instance then gets its connection from
/// [`connect`] (the first) or [`reconnect`] (after an in-place restart).
pub fn start_services(xen: &'static Xen, ram_end: u64) -> Result<XenConnection, XenError> {
    let hc: Hypercalls = &xen.hypercalls;
    let shared_frame = memory::alloc_frames(1).ok_or(XenError::OutOfMemory)?;
    map_shared_info(&hc, shared_frame / PAGE_SIZE as u64)
        .map_err(|e| XenError::Hypercall("XENMEM_add_to_physmap(shared_info)", e))?;
    // SAFETY: Xen now backs this frame with shared_info, whose layout
    // SharedInfo mirrors; it stays mapped for the domain's life.
    let shared: &'static SharedInfo = unsafe { &*(shared_frame as *const SharedInfo) };
    shared.vcpu_info[0]
        .evtchn_upcall_mask
        .store(0, Ordering::SeqCst);
    SHARED_INFO.call_once(|| shared);

    interrupts::set_handler(UPCALL_VECTOR, on_upcall);
    let upcall = hvm::setup_upcall(&hc, 0, UPCALL_VECTOR)
        .map_err(|e| XenError::Hypercall("upcall vector setup", e))?;

    // Diagnostics only: a refusal costs the heartbeat its CPU times.
    if let Err(e) = vcpu::register_runstate_area(&hc, 0, &RUNSTATE) {
        log::warn!("xen: no runstate area ({e:?}): heartbeats will lack CPU times");
    }

    let store_ring =
        hvm::store_ring(&hc).map_err(|e| XenError::Hypercall("HVM_PARAM_STORE_*", e))?;
    // SAFETY: the store page is shared with xenstored for the domain's
    // life; XenstoreInterface mirrors its layout with atomics.
    let store_iface: &'static XenstoreInterface = unsafe { map_ring_page(&store_ring)? };

    let console_ring =
        hvm::console_ring(&hc).map_err(|e| XenError::Hypercall("HVM_PARAM_CONSOLE_*", e))?;
    HYPERCALL_PROFILE.name_ports(store_ring.port, console_ring.port);
    // SAFETY: as for the store page, with xenconsoled.
    let console_iface: &'static XenconsInterface = unsafe { map_ring_page(&console_ring)? };
    // The console's channel holds no heap memory: it outlives instances.
    let console_channel = PortChannel {
        xen: hc,
        shared,
        port: Port(console_ring.port),
        fired: &CONSOLE_FIRED,
        timeout_ns: CONSOLE_WAIT_NS,
    };
    *CONSOLE.lock() = Some(PvConsole::new(console_iface, console_channel));

    let window_base = ram_end.max(4 << 30).next_multiple_of(1 << 30);
    memory::map_identity(
        window_base,
        GRANT_WINDOW_FRAMES * PAGE_SIZE as u64,
        PageAccess::DATA,
    )
    .map_err(|_| XenError::Map)?;
    let window_end = window_base + GRANT_WINDOW_FRAMES * PAGE_SIZE as u64;
    memory::add_direct_range(window_base, window_end);
    log::debug!("xen: grant window {window_base:#x}-{window_end:#x}");
    DOMAIN_RINGS.call_once(|| DomainRings {
        shared,
        store_iface,
        store_port: store_ring.port,
        console_port: console_ring.port,
        window_base_gfn: window_base / PAGE_SIZE as u64,
        upcall,
    });
    let rings = DOMAIN_RINGS.get().ok_or(XenError::Map)?;
    let (events, grants, store_channel) = instance_channels(xen, rings);
    let mut store = Xenstore::new(store_iface, store_channel);
    store.keep_record(&STORE_STREAMS);
    Ok(XenConnection {
        events,
        store,
        grants,
        upcall,
    })
}

/// A new instance's event channels (the store and console ports'
/// handlers set), grant mapper over the whole window, and store channel.
fn instance_channels(
    xen: &'static Xen,
    rings: &'static DomainRings,
) -> (
    EventChannels<'static, Hypercalls>,
    GrantMapper<'static, Hypercalls>,
    PortChannel,
) {
    let hc: Hypercalls = &xen.hypercalls;
    let mut events = EventChannels::new(hc, rings.shared, &HELD_PORTS);
    flag_events(&mut events, rings.console_port, &CONSOLE_FIRED);
    let store = PortChannel::new(
        hc,
        rings.shared,
        &mut events,
        rings.store_port,
        &STORE_FIRED,
        STORE_TIMEOUT_NS,
    );
    let grants = GrantMapper::new(
        hc,
        GfnWindow::new(rings.window_base_gfn, GRANT_WINDOW_FRAMES as usize),
        &HELD_GRANTS,
    );
    (events, grants, store)
}

/// After an in-place restart (on a fresh heap; the dead instance's
/// connection is abandoned, never dropped): gives back the grant mappings
/// and ring ports it held, then connects anew, taking the xenstore ring
/// up where it stopped and dropping its watches and transactions.
pub fn reconnect() -> Result<(XenConnection, Released), XenError> {
    let xen = XEN.get().ok_or(XenError::Map)?;
    let released = release_all(&&xen.hypercalls, &HELD_GRANTS, &HELD_PORTS);
    // SAFETY: one vCPU, and the dead instance never runs again: the only
    // holder of the console's lock is gone for good.
    unsafe { CONSOLE.force_unlock() };
    let rings = DOMAIN_RINGS.get().ok_or(XenError::Map)?;
    let (events, grants, store_channel) = instance_channels(xen, rings);
    let mut store = Xenstore::resume(rings.store_iface, store_channel, &STORE_STREAMS)
        .map_err(|e| XenError::Store("resuming the ring", e))?;
    store
        .reset_watches()
        .map_err(|e| XenError::Store("XS_RESET_WATCHES", e))?;
    Ok((
        XenConnection {
            events,
            store,
            grants,
            upcall: rings.upcall,
        },
        released,
    ))
}

/// Maps the page of a ring the toolstack set up (xenstore, console) and
/// views it as `T`.
///
/// # Safety
/// The page must hold a live `T` shared with its daemon for the domain's
/// life, and `T` must be made of atomics (the daemon writes it any time).
unsafe fn map_ring_page<T>(ring: &hvm::RingParams) -> Result<&'static T, XenError> {
    let page = ring
        .gfn
        .checked_mul(PAGE_SIZE as u64)
        .ok_or(XenError::Map)?;
    let addr = memory::map_identity(page, PAGE_SIZE as u64, PageAccess::DATA)
        .map_err(|_| XenError::Map)?;
    // SAFETY: mapped just above; the caller vouches for what lives there.
    Ok(unsafe { &*(addr as *const T) })
}

/// Writes `bytes` to the PV console, if there is one. Skipped if the
/// console is busy (a fault while it was being written).
pub fn console_write(bytes: &[u8]) -> bool {
    match CONSOLE.try_lock() {
        Some(mut guard) => guard.as_mut().map(|c| c.write_bytes(bytes)).is_some(),
        None => false,
    }
}

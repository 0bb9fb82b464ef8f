//! `job=serve` (the default under Xen): stordom as a storage driver
//! domain. Watches `backend/vbd`, runs each vbd's xenbus state machine and
//! ring engine (the blkback crate) over the disks it can open, and polls
//! until idle, then halts until the next event. `xl shutdown` powers it
//! off cleanly; `control/restart` restarts it in place (see `restart`).

use crate::arch::{self, clock};
use crate::memory;
use crate::nbd::{NbdLinks, SharedNbdLinks};
use crate::net::{NetStack, NetTurn};
use crate::platform::KernelHal;
use crate::restart::{self, RAM_DISKS};
use crate::serve_profile::{self, LoopTotals, ServingProfile, TURN_PHASES};
use crate::storage::{self, Discovery, NamedDisk};
use crate::xen::{self, PortChannel, XenConnection};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use blkback::controllers::BringUpFailures;
use blkback::{
    CompletionSignal, DataPath, OpenError, OpenedTarget, Platform, Progress, Target, TargetOpener,
    UnservedGap, VbdBackends, XenBackendServices, claim_partition, claim_sectors, statistics,
};
use blockdev::partition::{PartitionTable, TableError};
use blockdev::{Completion, Disk, DmaRegion, Geometry, QueuedDevice, Request, SubmitError};
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use drivers::Hal;
use drivers::RamDisk;
use http_metrics::Metrics;
use kernel::cmdline::Ipv4Cidr;
use kernel::cpu_split::CpuSplit;
use kernel::idle_poll::{DEFAULT_IDLE_POLL_NS, IdlePoll};
use kernel::ram_disk_registry::{RamDiskRefusal, RamFrames};
use kernel::restart_policy::ControlRequest;
use xen_pv::PAGE_SIZE;
use xen_pv::event::Port;
use xen_pv::vcpu::CpuTimes;
use xen_pv::xenstore::{Tx, Xenstore, XsError};

/// Longest halt when idle; events end it sooner. Short enough for the
/// backend's timed work (a detached vbd's grace before its removal).
const IDLE_HALT_NS: u64 = 250_000_000;
const SHUTDOWN_TOKEN: &str = "stordom-shutdown";
/// The operator's restart node: dom0 writes it (`xenstore-write
/// /local/domain/<stordom>/control/restart <reason>`). `control/` is the
/// toolstack's, read-only to stordom, so stordom cannot clear it: each
/// write is a request, seen as a watch event (the event the watch fires
/// when set up is not one).
const RESTART_NODE: &str = "control/restart";
const RESTART_TOKEN: &str = "stordom-restart";
/// How long the loop polls after its last work before it sleeps (the
/// command line's `idle_poll_us=`, set at boot).
pub static IDLE_POLL_NS: AtomicU64 = AtomicU64::new(DEFAULT_IDLE_POLL_NS);
/// How often statistics are published and the watchdog looks.
const HOUSEKEEPING_NS: u64 = 1_000_000_000;
/// How often the heartbeat is logged while requests are outstanding.
const HEARTBEAT_NS: u64 = 5_000_000_000;
/// Rings unserved longer than this (from one serving pass to the next: the
/// loop's, once a turn, or one in the toolstack's xenstore waits; an idle
/// halt aside) are reported, with where the turn's time went.
const UNSERVED_REPORT_NS: u64 = 1_000_000_000;

/// What the serve loop did, for the heartbeat: it shows, without dom0,
/// whether the loop still turns, sleeps and wakes, and where each busy
/// ring stands.
#[derive(Default)]
struct LoopCounters {
    turns: u64,
    sleeps: u64,
    /// Time in each phase of the turns (see [`TURN_PHASES`]).
    phase_ns: [u64; TURN_PHASES.len()],
    /// Where the vCPU's time went, turns against sleeps.
    cpu_split: CpuSplit,
    /// Sleeps that ended at their deadline rather than on an event.
    timeouts: u64,
    next_housekeeping_ns: u64,
    next_heartbeat_ns: u64,
    /// The last heartbeat had requests outstanding.
    beating: bool,
    /// vCPU times at the last heartbeat (`None`: no runstate area).
    cpu_at_beat: Option<CpuTimes>,
    /// No unserved-rings report before this time (one per heartbeat
    /// period).
    next_unserved_report_ns: u64,
}

/// Clock readings at the phase boundaries of one loop turn.
struct TurnMarks {
    start: u64,
    cpu_at_start: Option<CpuTimes>,
    /// Ends of: event and watch intake, ring polling, toolstack work,
    /// housekeeping.
    ends: [u64; 4],
    /// Times the rings were served during the toolstack work's xenstore
    /// waits.
    served_in_toolstack: u64,
}

/// ` cpu run=.. wait=.. blocked=..` in ms: how Xen spent the interval.
/// `wait` is time stordom was ready but given no physical CPU.
struct CpuSpent(Option<CpuTimes>);

impl fmt::Display for CpuSpent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(t) => write!(
                f,
                " cpu run={}ms wait={}ms blocked={}ms",
                t.running / 1_000_000,
                t.runnable / 1_000_000,
                t.blocked / 1_000_000
            ),
            None => Ok(()),
        }
    }
}

impl LoopCounters {
    fn totals(&self) -> LoopTotals {
        LoopTotals {
            turns: self.turns,
            sleeps: self.sleeps,
            phase_ns: self.phase_ns,
            cpu_split: self.cpu_split,
        }
    }

    /// Logs `hb up=... outstanding=N | <each busy ring>` every
    /// [`HEARTBEAT_NS`] while requests are outstanding, and once more when
    /// none are left. It goes to every console, the 0xe9 port included,
    /// which Xen prints itself (`(dN) ...`), so it is seen even when dom0
    /// is not.
    fn heartbeat<O: TargetOpener>(&mut self, now: u64, vbds: &VbdBackends<O>, pending: bool) {
        if now < self.next_heartbeat_ns {
            return;
        }
        self.next_heartbeat_ns = now + HEARTBEAT_NS;
        let cpu = xen::cpu_times();
        let spent = cpu.zip(self.cpu_at_beat).map(|(c, b)| c.since(&b));
        self.cpu_at_beat = cpu;
        let mut rings = String::new();
        let outstanding = vbds.heartbeat(&mut rings);
        if outstanding > 0 || self.beating {
            log::info!(
                "hb up={}.{:03} turns={} sleeps={} timeouts={} event_pending={}{} outstanding={outstanding}{rings}",
                now / 1_000_000_000,
                now / 1_000_000 % 1000,
                self.turns,
                self.sleeps,
                self.timeouts,
                u8::from(pending),
                CpuSpent(spent),
            );
        }
        self.beating = outstanding > 0;
    }

    /// Reports rings unserved for [`UNSERVED_REPORT_NS`] or more, at most
    /// once per heartbeat period: how long, when in the turn that ended,
    /// how long each phase of the turn took, and how much of the turn Xen
    /// ran stordom, kept it waiting for a CPU, or had it blocked (a
    /// xenstore or console wait).
    fn check_unserved(&mut self, marks: &TurnMarks, gap: UnservedGap) {
        let [intake, rings, attend, housekeeping] = marks.ends;
        if gap.len_ns < UNSERVED_REPORT_NS || housekeeping < self.next_unserved_report_ns {
            return;
        }
        self.next_unserved_report_ns = housekeeping + HEARTBEAT_NS;
        let ms = |from: u64, to: u64| to.saturating_sub(from) / 1_000_000;
        let spent = xen::cpu_times()
            .zip(marks.cpu_at_start)
            .map(|(c, s)| c.since(&s));
        log::warn!(
            "rings unserved {} ms, until {} ms into a {} ms turn (intake {} ms, rings {} ms, toolstack {} ms with the rings served {} times, housekeeping {} ms);{}",
            gap.len_ns / 1_000_000,
            ms(marks.start, gap.ended_ns),
            ms(marks.start, housekeeping),
            ms(marks.start, intake),
            ms(intake, rings),
            ms(rings, attend),
            marks.served_in_toolstack,
            ms(attend, housekeeping),
            CpuSpent(spent),
        );
    }
}

/// Opens `target=` values (see blkback::target for the syntax)
/// as views of the boot modules and the disks found on PCI, and of NBD
/// exports over the vif.
pub struct KernelOpener {
    disks: Vec<ServableDisk>,
    /// The controllers (and disks) that failed to come up: a target on
    /// one of them is refused with the reason.
    failures: BringUpFailures,
    /// The `nbd:` targets' links (the network pumps them).
    nbd: SharedNbdLinks,
}

/// A disk and its partitions, as read at boot.
struct ServableDisk {
    named: NamedDisk,
    partitions: Result<PartitionTable, TableError>,
}

impl KernelOpener {
    /// Boot modules become `module:N`, the disks `found` go by their
    /// names; the partition table of each is read and logged.
    pub fn new(modules: &[(u64, u64)], found: Discovery) -> Self {
        let Discovery {
            mut disks,
            failures,
        } = found;
        for (i, &(start, len)) in modules.iter().enumerate() {
            let blocks = len / 512;
            let Some(storage) = NonNull::new(start as *mut u8).filter(|_| blocks > 0) else {
                log::warn!("serve: module {i} ({len} bytes) is too small to serve");
                continue;
            };
            // SAFETY: the module's frames are reserved from the allocator
            // and identity-mapped writable; only this disk uses them.
            let disk = unsafe { RamDisk::new(KernelHal, storage, 512, blocks, 1) };
            if len % 512 != 0 {
                log::warn!(
                    "serve: module {i}: the last {} bytes are not served",
                    len % 512
                );
            }
            disks.push(NamedDisk {
                name: alloc::format!("module:{i}"),
                disk: Disk::new(disk),
                controller: None,
                data_path: DataPath::ZeroCopy,
            });
        }
        let disks = disks
            .into_iter()
            .map(|named| {
                let partitions = storage::read_partitions(&named);
                match &partitions {
                    Ok(table) => log::info!("partitions: {}: {table}", named.name),
                    Err(e) => log::warn!("partitions: {}: table unusable: {e}", named.name),
                }
                ServableDisk { named, partitions }
            })
            .collect();
        Self {
            disks,
            failures,
            nbd: NbdLinks::shared(),
        }
    }

    /// The links of `nbd:` targets, for the network to pump.
    pub fn nbd_links(&self) -> SharedNbdLinks {
        self.nbd.clone()
    }

    fn named(&self, name: &str) -> Result<&ServableDisk, OpenError> {
        self.disks
            .iter()
            .find(|d| d.named.name == name)
            .ok_or_else(|| self.failures.refusal(name))
    }
}

impl TargetOpener for KernelOpener {
    fn open(
        &mut self,
        vbd_path: &str,
        target: &Target<'_>,
        read_only: bool,
    ) -> Result<OpenedTarget, OpenError> {
        let (named, view) = match *target {
            Target::Nbd {
                address,
                port,
                export,
            } => {
                return self
                    .nbd
                    .borrow_mut()
                    .open(vbd_path, address, port, export, read_only);
            }
            Target::Ram { bytes } => {
                return Ok(Disk::new(KeptRamDisk::open(vbd_path, bytes)?)
                    .claim_all()?
                    .into());
            }
            Target::Module { index } => {
                let module = self.named(&alloc::format!("module:{index}"))?;
                (module, module.named.disk.claim_all()?)
            }
            Target::Disk { name } => {
                let disk = self.named(name)?;
                (disk, disk.named.disk.claim_all()?)
            }
            Target::Range {
                disk,
                start,
                sectors,
            } => {
                let disk = self.named(disk)?;
                (disk, claim_sectors(&disk.named.disk, start, sectors)?)
            }
            Target::Partition { disk, number } => {
                let disk = self.named(disk)?;
                (
                    disk,
                    claim_partition(&disk.named.disk, &disk.partitions, number)?,
                )
            }
        };
        Ok(OpenedTarget {
            view,
            data_path: named.named.data_path,
            completions: CompletionSignal::Polled,
        })
    }
}

/// A vbd's RAM disk, its memory kept in [`RAM_DISKS`] under the vbd's
/// backend path: across an in-place restart (the dead instance never drops
/// it), until the vbd lets it go.
struct KeptRamDisk {
    ram: RamDisk<KernelHal>,
    vbd_path: String,
}

impl KeptRamDisk {
    /// The RAM disk of `bytes` for the vbd at `vbd_path`: the one kept
    /// from before a restart, or a new, zeroed one.
    fn open(vbd_path: &str, bytes: u64) -> Result<Self, OpenError> {
        let frames = bytes.div_ceil(PAGE_SIZE as u64);
        let opened = RAM_DISKS
            .lock()
            .open(vbd_path, frames, memory::alloc_frames, free_ram)
            .map_err(|refusal| match refusal {
                RamDiskRefusal::Busy => OpenError::Busy,
                RamDiskRefusal::Full | RamDiskRefusal::KeyTooLong | RamDiskRefusal::OutOfMemory => {
                    OpenError::OutOfMemory
                }
            })?;
        let storage = NonNull::new(opened.memory.start as *mut u8).ok_or(OpenError::OutOfMemory)?;
        if opened.kept {
            log::info!("serve: {vbd_path}: RAM disk kept from before the restart");
        }
        // SAFETY: the registry gave these frames (identity-mapped RAM,
        // `bytes` long at least) to this vbd alone, until `drop`.
        let ram = unsafe { RamDisk::new(KernelHal, storage, 512, bytes / 512, 1) };
        Ok(Self {
            ram,
            vbd_path: vbd_path.into(),
        })
    }
}

fn free_ram(memory: RamFrames) {
    memory::free_frames(memory.start, memory.frames);
}

impl QueuedDevice for KeptRamDisk {
    fn geometry(&self) -> Geometry {
        self.ram.geometry()
    }

    fn submit(&mut self, queue: u16, tag: u64, request: Request<'_>) -> Result<(), SubmitError> {
        self.ram.submit(queue, tag, request)
    }

    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        self.ram.poll(queue, out)
    }
}

impl Drop for KeptRamDisk {
    fn drop(&mut self) {
        if let Some(memory) = RAM_DISKS.lock().close(&self.vbd_path) {
            free_ram(memory);
        }
    }
}

/// What only the kernel knows, for blkback: the grant window is
/// identity-mapped (xen::start_services), the TSC clock, the log.
struct KernelPlatform;

impl Platform for KernelPlatform {
    fn frame_address(&self, gfn: u64) -> Option<NonNull<u8>> {
        NonNull::new(gfn.checked_mul(PAGE_SIZE as u64)? as *mut u8)
    }

    fn now_ns(&self) -> u64 {
        clock::now_ns()
    }

    fn log(&mut self, line: fmt::Arguments<'_>) {
        log::info!("{line}");
    }

    fn hold_notify(&mut self, port: Port) -> bool {
        xen::hold_ring_notify(port)
    }

    fn alloc_bounce_pages(&mut self, pages: usize) -> Option<DmaRegion> {
        KernelHal.dma_alloc(pages)
    }

    unsafe fn free_bounce_pages(&mut self, region: DmaRegion) {
        // SAFETY: the caller's promise: from `dma_alloc`, and unused now.
        unsafe { KernelHal.dma_free(region) };
    }
}

/// Whether `control/shutdown` asks for a clean shutdown (`xl shutdown`).
fn shutdown_requested(xs: &mut Xenstore<'static, PortChannel>) -> bool {
    match xs.read_string(Tx::NONE, "control/shutdown") {
        Ok(what) if what == "poweroff" || what == "halt" => {
            // Acknowledge, as the toolstack expects of a PV-aware guest.
            let _ = xs.write(Tx::NONE, "control/shutdown", b"");
            true
        }
        _ => false,
    }
}

/// Acts on `control/restart` (see [`RESTART_NODE`]). Returns only when
/// there is nothing to do or the restart was refused.
fn restart_requested(xs: &mut Xenstore<'static, PortChannel>) {
    let value = match xs.read(Tx::NONE, RESTART_NODE) {
        Ok(value) => value,
        Err(XsError::NoEntry) => return,
        Err(e) => {
            log::warn!("serve: reading {RESTART_NODE}: {e:?}");
            return;
        }
    };
    match ControlRequest::parse(&value) {
        ControlRequest::Nothing => {}
        ControlRequest::Restart(words) => {
            let words = if words.is_empty() {
                "(no reason given)"
            } else {
                words
            };
            let refusal = restart::restart("operator", format_args!("{words}"));
            log::warn!("serve: restart asked in {RESTART_NODE} refused: {refusal:?}");
        }
        // Test hooks (the `restart` scenario): a panic and a hang in the
        // loop, as a bug would make them, for the panic path and the
        // stall watchdog to restart.
        ControlRequest::InjectPanic => panic!("injected through {RESTART_NODE} (test hook)"),
        ControlRequest::InjectHang => {
            log::warn!("serve: hanging as {RESTART_NODE} asks (test hook)");
            loop {
                restart::check_stall("hang injected through control/restart");
                core::hint::spin_loop();
            }
        }
    }
}

/// Writes `data/restarts` and, after a restart, `data/last-restart`.
fn publish_restarts(xs: &mut Xenstore<'static, PortChannel>) {
    let (count, reason) = restart::published();
    let count = alloc::format!("{count}");
    let mut nodes: Vec<(&str, &[u8])> = alloc::vec![("data/restarts", count.as_bytes())];
    if !reason.as_str().is_empty() {
        nodes.push(("data/last-restart", reason.as_str().as_bytes()));
    }
    if let Err(e) = xs.write_batch(&nodes) {
        log::warn!("serve: publishing the restart count: {e:?}");
    }
}

/// Frees the RAM disks kept across a restart whose vbd is gone.
fn drop_orphan_ram_disks(xs: &mut Xenstore<'static, PortChannel>) {
    let mut ram_disks = RAM_DISKS.lock();
    if ram_disks.orphans() == 0 {
        return;
    }
    ram_disks.drop_orphans(
        |vbd_path| !matches!(xs.read(Tx::NONE, vbd_path), Err(XsError::NoEntry)),
        |memory| {
            log::info!("serve: freeing a kept RAM disk whose vbd is gone");
            free_ram(memory);
        },
    );
}

/// Publishes the number of mapped grants in `data/grants-mapped` when it
/// changed, so operators and tests can see every grant given back.
fn publish_grant_count(
    xs: &mut Xenstore<'static, PortChannel>,
    mapped: usize,
    published: &mut Option<usize>,
) {
    if *published != Some(mapped) {
        let value = alloc::format!("{mapped}");
        if xs
            .write(Tx::NONE, "data/grants-mapped", value.as_bytes())
            .is_ok()
        {
            *published = Some(mapped);
        }
    }
}

/// What the metrics endpoint shows, from the sources of the nodes
/// stordom publishes in xenstore (the vif's counters are the endpoint's).
fn gather_metrics(
    vbds: &VbdBackends<KernelOpener>,
    grants_mapped: usize,
    nbd: &SharedNbdLinks,
) -> Metrics {
    Metrics {
        vbds: vbds.snapshots(),
        grants_mapped: grants_mapped as u64,
        heap: memory::heap_usage().nodes().to_vec(),
        restarts: restart::published().0,
        net: netfront::Statistics::default(),
        nbd_reconnects: nbd.borrow().reconnects(),
    }
}

/// Serves vbds until the toolstack asks stordom to shut down. The loop
/// owns the event channels, xenstore connection and grant mapper: ring
/// polling touches no xenstore node, and what it finds for the toolstack
/// is handled afterwards.
pub fn run(
    xen: XenConnection,
    opener: KernelOpener,
    vif_ip: Option<Ipv4Cidr>,
) -> Result<(), String> {
    let XenConnection {
        mut events,
        store: mut xs,
        mut grants,
        ..
    } = xen;
    let nbd = opener.nbd_links();
    let mut vbds = VbdBackends::new(opener);
    let nbd_for_metrics = nbd.clone();
    vbds.start(&mut xs)
        .map_err(|e| alloc::format!("watching backend/vbd: {e:?}"))?;
    xs.watch("control/shutdown", SHUTDOWN_TOKEN)
        .map_err(|e| alloc::format!("watching control/shutdown: {e:?}"))?;
    xs.watch(RESTART_NODE, RESTART_TOKEN)
        .map_err(|e| alloc::format!("watching {RESTART_NODE}: {e:?}"))?;
    publish_restarts(&mut xs);
    // The watch's first event is its setting up, not a request.
    let mut restart_watch_set = false;
    // The toolstack's work has run over every vbd since the start (each
    // one left Connected adopted, each network disk connected); the next
    // ring pass ends a restart's pause.
    let mut vbds_settled = false;
    let mut pause_reported = false;
    // Tell the toolstack `xl shutdown` may ask us rather than destroy us.
    let _ = xs.write(Tx::NONE, "control/feature-poweroff", b"1");
    let mut net = NetStack::bring_up(&mut xs, vif_ip, nbd);
    log::info!("serve: watching backend/vbd; ready");
    let mut published_grants = None;
    let mut published_heap = BTreeMap::new();
    let mut counters = LoopCounters::default();
    let mut profile = ServingProfile::default();
    let mut answered_at_last_housekeeping = 0;
    let mut idle_poll = IdlePoll::new(IDLE_POLL_NS.load(Ordering::Relaxed));
    let tables_digest = arch::descriptor_tables_digest();
    // Each runstate reading ends one span of the split and starts the next.
    let mut cpu_at_turn_start = xen::cpu_times();
    loop {
        counters.turns += 1;
        restart::progress();
        let mut marks = TurnMarks {
            start: clock::now_ns(),
            cpu_at_start: cpu_at_turn_start,
            ends: [0; 4],
            served_in_toolstack: 0,
        };
        xen::dispatch_events(&mut events);
        // A bounded number of events per pass, each only noted: their work
        // is done by `attend`, a bounded share per pass.
        let mut shutdown_event = false;
        let mut restart_events = 0;
        let intake = vbds
            .take_watch_events(&mut xs, |event| {
                if net.as_mut().is_some_and(|net| net.note_watch_event(event)) {
                    return;
                }
                shutdown_event |= event.token == SHUTDOWN_TOKEN;
                restart_events += usize::from(event.token == RESTART_TOKEN);
            })
            .map_err(|e| alloc::format!("xenstore: {e:?}"))?;
        if (shutdown_event || intake.lost) && shutdown_requested(&mut xs) {
            xen::send_held_notifies();
            log::info!("serve: shutdown requested");
            serve_profile::log_summary(counters.totals(), &vbds.answered());
            return Ok(());
        }
        if restart_events > usize::from(!restart_watch_set) {
            restart_requested(&mut xs);
        }
        restart_watch_set |= restart_events > 0;
        marks.ends[0] = clock::now_ns();
        let mut backend = XenBackendServices {
            events: &mut events,
            grants: &mut grants,
            platform: KernelPlatform,
        };
        let polled = vbds.poll_rings(&mut backend);
        marks.ends[1] = clock::now_ns();
        if vbds_settled && !pause_reported {
            pause_reported = true;
            let adopted = vbds.adoptions();
            restart::rings_served_again(adopted.vbds, adopted.unanswered_requests);
        }
        let served_before = vbds.ring_passes_while_waiting();
        let attended = vbds.attend(&mut xs, &mut backend, &polled.attention);
        marks.served_in_toolstack = vbds.ring_passes_while_waiting() - served_before;
        if !vbds_settled
            && attended == Progress::Idle
            && counters.turns >= 2
            && !vbds.targets_opening()
        {
            vbds_settled = true;
            drop_orphan_ram_disks(&mut xs);
        }
        let now = clock::now_ns();
        marks.ends[2] = now;
        if now >= counters.next_housekeeping_ns {
            counters.next_housekeeping_ns = now + HOUSEKEEPING_NS;
            if arch::descriptor_tables_digest() != tables_digest {
                panic!("the IDT, GDT or TSS changed since boot: memory was overwritten");
            }
            vbds.watchdog(&mut backend, now);
            vbds.publish_statistics(&mut xs);
            // The connection's failure shows on its own in the next pass.
            let heap = memory::heap_usage().nodes();
            let _ = statistics::publish_changed(&mut xs, "data", heap, &mut published_heap);
            // Only after a second without requests: under load its
            // forty-odd nodes would all change every second, each write a
            // round trip to xenstored in dom0, which shares the CPUs with
            // the guests. Readers wait for the quiet.
            let answered = vbds.answered();
            if answered.answered == answered_at_last_housekeeping {
                profile.publish(&mut xs, counters.totals(), &answered);
            }
            answered_at_last_housekeeping = answered.answered;
        }
        let grants_mapped = grants.stats().mapped;
        let net_turn = match net.as_mut() {
            Some(net) => net.turn(&mut xs, &mut events, clock::now_ns(), || {
                gather_metrics(&vbds, grants_mapped, &nbd_for_metrics)
            }),
            None => NetTurn::default(),
        };
        marks.ends[3] = clock::now_ns();
        let mut phase_start = marks.start;
        for (total, end) in counters.phase_ns.iter_mut().zip(marks.ends) {
            *total += end.saturating_sub(phase_start);
            phase_start = end;
        }
        let gap = vbds.take_longest_unserved(marks.ends[3]);
        counters.check_unserved(&marks, gap);
        counters.heartbeat(now, &vbds, xen::events_pending(&events));
        let idle =
            polled.progress == Progress::Idle && attended == Progress::Idle && !net_turn.busy;
        if !idle {
            idle_poll.busy(now);
        }
        let quiet = idle && intake.taken == 0;
        if quiet {
            publish_grant_count(&mut xs, grants.stats().mapped, &mut published_grants);
        }
        let cpu_at_turn_end = xen::cpu_times();
        counters
            .cpu_split
            .add_turn(marks.cpu_at_start, cpu_at_turn_end);
        cpu_at_turn_start = cpu_at_turn_end;
        // An event that came while xenstore was busy is looked at before
        // halting (interrupts stay off until the halt), and so is a watch
        // event the client queued while waiting for a reply (its port's
        // pending bit was consumed by that wait).
        if quiet
            && !xen::events_pending(&events)
            && xs.queued_watch_events() == 0
            && idle_poll.may_sleep(now)
        {
            counters.sleeps += 1;
            let halt_ns = net_turn
                .wake_in_ns
                .map_or(IDLE_HALT_NS, |ns| ns.min(IDLE_HALT_NS));
            xen::sleep_until_any_event(&events, halt_ns);
            let woken = clock::now_ns();
            let cpu_after_sleep = xen::cpu_times();
            counters
                .cpu_split
                .add_sleep(cpu_at_turn_end, cpu_after_sleep);
            cpu_at_turn_start = cpu_after_sleep;
            if woken >= now + halt_ns {
                counters.timeouts += 1;
            }
            vbds.idle_until(woken);
        }
        // A turn that slept sent the held notifies with its sleep.
        xen::end_turn_awake();
    }
}

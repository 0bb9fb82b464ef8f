//! In-place restart: the serving instance is abandoned where it stands and
//! a new one starts in the same domain (same domid, so the frontends'
//! rings, ports and grants are there to take up again; the engine's side
//! is `xen_pv::held` and blkback's "Restart").
//!
//! Triggers: the operator's `control/restart` node (serve.rs), a panic or
//! CPU exception once serving began (rt.rs, arch), and the stall watchdog
//! ([`check_stall`]). Everything a restart needs lives in `static`s, not on
//! the heap, which is started afresh.
//!
//! Order, on the boot stack (the dead instance's frames never used
//! again): the locks it may hold are taken over; a fresh heap; the PCI
//! storage controllers lose bus mastering (a command of the dead instance
//! must not write into a guest page after its grant is unmapped, nor into
//! a frame handed out again); only then are the dead instance's frames
//! freed (RAM disks kept) and its grants and ring ports given back
//! (`xen::reconnect`, which also takes the xenstore ring up where it
//! stopped and drops the old watches); then the serve job starts as at
//! boot, its disks found again (PCI controllers re-initialised by the
//! drivers' bring-up), and adopts the vbds left Connected.

use crate::arch::{clock, cpu, interrupts};
use crate::memory;
use crate::storage;
use crate::xen;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use kernel::ram_disk_registry::RamDiskRegistry;
use kernel::restart_policy::{ReasonText, Refusal, RestartCap};
use spin::{Mutex, Once};

/// The serving loop making no progress this long (no turn begun, no ring
/// served in a xenstore wait) is a stall: the watchdog restarts.
pub const STALL_NS: u64 = 5_000_000_000;

/// What the serve job was started with at boot, for starting it again.
pub struct ServeSetup {
    /// Boot modules `(start, bytes)`: `module:N`.
    pub modules: [(u64, u64); boot::start_info::MAX_MODULES],
    pub module_count: usize,
    /// The ACPI RSDP (for PCI through ECAM), 0 if none.
    pub rsdp: u64,
    /// Whether PCI may be probed through I/O ports.
    pub pci_ports: bool,
    /// `stordom.ip=`: the vif's address, if given.
    pub vif_ip: Option<kernel::cmdline::Ipv4Cidr>,
}

impl ServeSetup {
    pub fn modules(&self) -> &[(u64, u64)] {
        &self.modules[..self.module_count]
    }
}

/// The restarts so far and the one under way.
struct History {
    cap: RestartCap,
    count: u64,
    last_reason: ReasonText,
    /// Clock at the last restart's trigger.
    trigger_ns: u64,
    /// The last restart's pause is yet to be reported.
    pause_unreported: bool,
}

static HISTORY: Mutex<History> = Mutex::new(History {
    cap: RestartCap::new(),
    count: 0,
    last_reason: ReasonText::new(),
    trigger_ns: 0,
    pause_unreported: false,
});
static SETUP: Once<ServeSetup> = Once::new();
/// The RAM disks of the vbds, kept across restarts (serve.rs opens them).
pub static RAM_DISKS: Mutex<RamDiskRegistry> = Mutex::new(RamDiskRegistry::new());
/// When the serving loop last made progress (see [`STALL_NS`]).
static LAST_PROGRESS_NS: AtomicU64 = AtomicU64::new(0);

/// Serving begins with `setup`: from now on a panic, a fault or a stall
/// restarts rather than crashes, and the frames taken so far stay.
pub fn serving_begins(setup: ServeSetup) -> &'static ServeSetup {
    memory::mark_serving_start();
    SETUP.call_once(|| setup)
}

/// The serving loop made progress (a turn began, or the rings were served
/// in a xenstore wait).
pub fn progress() {
    LAST_PROGRESS_NS.store(clock::now_ns(), Ordering::Relaxed);
}

/// Restarts (never returning) when the loop made no progress for
/// [`STALL_NS`]; crashes when a restart is not allowed. Called where the
/// loop may wait or spin without serving.
pub fn check_stall(doing: &str) {
    let last = LAST_PROGRESS_NS.load(Ordering::Relaxed);
    let stalled = clock::now_ns().saturating_sub(last);
    if SETUP.get().is_none() || last == 0 || stalled < STALL_NS {
        return;
    }
    // A restart's own waits (before its instance serves) are not a stall
    // a restart can cure: they fail on their own timeouts.
    if HISTORY.try_lock().is_none_or(|h| h.pause_unreported) {
        return;
    }
    let refusal = restart(
        "watchdog",
        format_args!(
            "serve loop made no progress for {} ms ({doing})",
            stalled / 1_000_000
        ),
    );
    crate::fail(format_args!("watchdog: restart refused ({refusal:?})"));
}

/// After a panic or a fault, printed already: restarts in place once
/// serving began, else (or if the cap forbids it) crashes the domain.
pub fn after_fatal(kind: &str, what: fmt::Arguments<'_>) -> ! {
    if SETUP.get().is_some() {
        let refusal = restart(kind, what);
        crate::console::fatal(format_args!("restart refused ({refusal:?}): crashing\n"));
    }
    crate::power::exit(cpu::ExitStatus::Failure)
}

/// Restarts in place, never returning, with reason `<kind>: <what>`; or,
/// when the cap forbids it (see `RestartCap`), or before serving began,
/// returns why not.
pub fn restart(kind: &str, what: fmt::Arguments<'_>) -> Refusal {
    cpu::disable_interrupts();
    if SETUP.get().is_none() {
        return Refusal::DuringRestart;
    }
    let now = clock::now_ns();
    // The lock is never held across anything that can fail; a fault taken
    // while it was held (a bug) makes this refuse rather than deadlock.
    let Some(mut history) = HISTORY.try_lock() else {
        return Refusal::DuringRestart;
    };
    if let Err(refusal) = history.cap.begin(now) {
        return refusal;
    }
    history.count += 1;
    history.last_reason = ReasonText::format(kind, what);
    history.trigger_ns = now;
    history.pause_unreported = true;
    // Logged to the ports only if the console's lock is held: the log
    // skips a busy PV console.
    log::warn!(
        "restart {} ({}): restarting in place",
        history.count,
        history.last_reason.as_str()
    );
    drop(history);
    cpu::run_on_boot_stack(start_new_instance)
}

/// The new instance's bring-up, on the boot stack.
extern "C" fn start_new_instance() -> ! {
    interrupts::release_ist_stacks();
    progress();
    xen::forget_held_notifies();
    // SAFETY: the dead instance's stack was abandoned by the switch to the
    // boot stack and nothing of it runs again (one vCPU, interrupts off).
    unsafe { memory::restart_heap() };
    let Some(setup) = SETUP.get() else {
        crate::fail(format_args!("restart: no serve setup"));
    };
    storage::stop_bus_mastering(setup.rsdp, setup.pci_ports);
    // SAFETY: as for the heap: the registry's holder is gone for good.
    unsafe { RAM_DISKS.force_unlock() };
    let kept = {
        let mut ram_disks = RAM_DISKS.lock();
        ram_disks.abandon_all();
        ram_disks.held().collect::<alloc::vec::Vec<_>>()
    };
    memory::restart_frames(kept.iter().map(|m| (m.start, m.frames)));
    let (connection, released) = match xen::reconnect() {
        Ok(c) => c,
        Err(e) => crate::fail(format_args!("restart: {e}")),
    };
    log::info!(
        "restart: {} grant mapping(s) and {} ring port(s) given back ({} and {} refused), {} RAM disk(s) kept",
        released.grants_unmapped,
        released.ports_closed,
        released.grants_failed,
        released.ports_failed,
        kept.len()
    );
    // The start-up check's page cannot be given back (see grant_dma), so
    // it is not made again: PCI disks go through bounce buffers, which
    // work whatever the IOMMU does.
    let mut found = storage::find_disks(setup.rsdp, setup.pci_ports);
    for disk in found.disks.iter_mut().filter(|d| d.controller.is_some()) {
        disk.data_path = blkback::DataPath::Bounce;
    }
    crate::serve_job(connection, setup, found)
}

/// The count and reason of the last restart, if any, for `data/`.
pub fn published() -> (u64, ReasonText) {
    let history = HISTORY.lock();
    (history.count, history.last_reason)
}

/// The instance served its rings after adopting `vbds` vbds with
/// `requests` unanswered: after a restart, logs the pause the guests saw
/// (from the trigger) and lets a later failure restart again.
pub fn rings_served_again(vbds: usize, requests: u64) {
    let mut history = HISTORY.lock();
    if !core::mem::take(&mut history.pause_unreported) {
        return;
    }
    history.cap.serving();
    let pause = clock::now_ns().saturating_sub(history.trigger_ns);
    log::warn!(
        "restart {} ({}): rings served again after {} ms; {vbds} vbds adopted, {requests} requests resumed",
        history.count,
        history.last_reason.as_str(),
        pause / 1_000_000
    );
}

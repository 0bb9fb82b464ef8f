//! The blkif backend (blkif wire formats in [`blkif`]): discovery of vbds under `backend/vbd`, the xenbus
//! state machine of each, and the ring engine that serves its requests
//! from a [`blockdev::DiskView`], one [`blockdev::QueueHandle`] per ring.
//!
//! # What is served
//! Published at InitWait, in one round trip (see
//! [`xen_pv::xenstore::Xenstore::write_batch`]), then `state` = 2:
//! `feature-flush-cache` (1 when the device has a volatile write cache),
//! `feature-barrier` = 1, `feature-persistent` = 1,
//! `feature-max-indirect-segments` (256 unless the device takes less),
//! `multi-queue-max-queues` (device queues, at most 4, when above 1),
//! `max-ring-page-order` = 4 (rings of up to 16 pages, 512 requests),
//! `feature-discard` + `discard-granularity` / `discard-alignment` /
//! `discard-secure` = 0 (when the device discards and the toolstack's
//! `discard-enable` is not 0), `info` (`VDISK_READONLY`, `VDISK_CDROM`).
//! At connect, in one round trip: `sectors` (512-byte units, always),
//! `sector-size`, `physical-sector-size`; then `state` = 4.
//!
//! # What the kernel provides
//! - A [`BackendServices`] implementation: event channels (bind, send, close),
//!   batched grant map/unmap into its GFN window, the address at which a
//!   window frame is mapped, a clock, a console, and DMA pages for bounce
//!   buffers. [`XenBackendServices`] builds
//!   one from [`EventChannels`], [`GrantMapper`] and a small [`Platform`].
//! - A [`TargetOpener`] that turns a parsed [`Target`] (`params`, the xl
//!   `target=`; syntax in [`target`]) into a claimed [`blockdev::DiskView`]
//!   and the [`DataPath`] its vbd takes (zero-copy, or bounce buffers for a
//!   device that cannot DMA into grant mappings; [`grant_dma_check`]
//!   judges the kernel's start-up check).
//!   Each ring of a vbd opens a queue handle of its own on the view; the
//!   handle keeps the view's range and its completions to itself, so ranges
//!   or partitions of one disk and namespaces of one controller may be
//!   served at once.
//! - Its `drivers::Hal` must translate the GFN window: the engine hands the
//!   device segments at `gfn * 4096 + first_sect * 512` of mapped grants,
//!   so `phys_to_virt` must work there (identity-map the window) and a
//!   DMA-capable device must reach it (IOMMU permitting; otherwise the
//!   opener says [`DataPath::Bounce`] and the device gets bounce pages).
//!
//! # Call sequence
//! 1. Setup: `let mut vbds = VbdBackends::new(opener);` then
//!    [`VbdBackends::start`]`(&mut xs)`, which watches `backend/vbd`
//!    (relative to the domain's home). xenstored fires that watch at once,
//!    so the existing devices are found in the first passes.
//! 2. Watch events: each pass, [`VbdBackends::take_watch_events`]`(&mut
//!    xs, other)` takes up to [`WATCH_EVENTS_TAKEN_PER_PASS`] events and
//!    only notes them (a mark on the vbd, or a rescan; any number of events
//!    for one vbd coalesce into one mark); events of other watches (other
//!    tokens) go to `other`, for the kernel. Its [`WatchIntake`] says how
//!    many were taken (poll again when any were) and whether the client
//!    dropped some (then every vbd is marked, and the kernel should look at
//!    its own watched nodes).
//! 3. Event-channel upcalls: nothing to call. [`XenBackendServices`] gives each
//!    ring port a no-op handler; the upcall only has to wake the poll loop,
//!    which polls every ring.
//! 4. Each poll-loop iteration: [`VbdBackends::poll_rings`]`(&mut svc)`
//!    reaps device completions, takes new requests (up to the in-flight
//!    bound, and at most [`ring_io::REQUESTS_TAKEN_PER_RING_PER_PASS`] per
//!    ring, starting one vbd further each call: no frontend can keep the
//!    loop from the others or the toolstack), maps their grants in
//!    batches, submits (discards in pieces of at most 4 MiB), unmaps finished ones,
//!    pushes responses and notifies when the ring's rule says so. It
//!    touches no xenstore node: what needs the toolstack (a broken ring, a
//!    drained disconnect, a timed step) comes back in its
//!    [`RingsPolled::attention`], which
//!    [`VbdBackends::attend`]`(&mut xs, &mut svc, &attention)` handles,
//!    before the work watch events asked for: a rescan, and the state
//!    machines of up to [`VBD_UPDATES_PER_PASS`] marked vbds in rotating
//!    order (a frontend rewriting its nodes in a loop gets one update per
//!    pass, and cannot hold up the others or the toolstack). It returns
//!    [`Progress::Busy`] while marked vbds remain.
//! 5. Idle: when both progresses are [`Progress::Idle`] and no watch
//!    event was taken, every ring has re-armed its request event and
//!    nothing is in flight; the kernel may halt (interrupts off, check
//!    `EventChannels::has_pending` and the xenstore ring, then `sti; hlt`).
//!    Otherwise it polls again.
//!
//! In code (the kernel's types are placeholders):
//! ```ignore
//! let mut vbds = VbdBackends::new(KernelTargets::new(/* disks, modules */));
//! vbds.start(&mut xs)?;
//! loop {
//!     let intake = vbds.take_watch_events(&mut xs, |event| kernel_watch(event))?;
//!     let mut svc = XenBackendServices {
//!         events: &mut events,
//!         grants: &mut grants,
//!         platform: KernelPlatform, // frame_address(gfn) = gfn * 4096
//!     };
//!     let polled = vbds.poll_rings(&mut svc);
//!     let attended = vbds.attend(&mut xs, &mut svc, &polled.attention);
//!     if polled.progress == Progress::Idle && attended == Progress::Idle && intake.taken == 0 {
//!         halt_until_event(); // cli; if !events.has_pending(0) { sti; hlt }
//!     }
//! }
//! ```
//! Every call comes from the poll loop, none from the upcall handler.
//!
//! # Restart
//! After an in-place restart (sequence in `xen_pv::held`: the dead
//! instance's grants and ring ports released from their record, a fresh
//! heap, watches reset), a new `VbdBackends` is started as at boot. A vbd
//! whose backend `state` reads Connected with its frontend Connected is
//! adopted rather than offered again: its rings are mapped and bound from
//! the frontend's nodes and attached at the shared `rsp_prod`, and the
//! requests in `[rsp_prod, req_prod)` are served afresh. That range is
//! exactly the unanswered requests because answers are published in ring
//! order (a request's answer waits for the older ones'). Any other state
//! takes the ordinary path.
//!
//! # Resource bounds per frontend
//! Per ring: in-flight requests up to the ring size (32 per ring page) and
//! the device's queue depth; data grants mapped for requests in flight up to
//! [`ring_io::MAX_MAPPED_GRANTS_PER_RING`]; kept (persistent) grants up to
//! [`persistent::MAX_PERSISTENT_GRANTS_PER_RING`] (a new grant then evicts
//! the least recently used unused ones, so a frontend that grants a new
//! page for every request neither fills the window nor starves itself);
//! plus the ring pages (up
//! to 16) and, briefly, one indirect page per request being taken (up to
//! the in-flight bound; with persistent grants indirect pages are kept
//! read-only among the kept grants, within their bound). Size the GFN window for about 2100 frames per ring
//! you mean to serve at full depth (2600 with 16-page rings of indirect
//! requests); when it runs out, requests fail with `BLKIF_RSP_ERROR` and
//! nothing else breaks.
//! A ring of a vbd with [`DataPath::Bounce`] also holds a pool of DMA
//! pages allocated at connect: one per segment it may have in flight, at
//! most [`bounce::MAX_BOUNCE_PAGES_PER_RING`] (4 MiB); a request is taken
//! only when its segments' pages are free.
//! Rings per vbd: [`served_disk::MAX_QUEUES`]. Log lines:
//! [`rate_limited_log::MAX_LOG_LINES_PER_SECOND`] per vbd.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

#[cfg(test)]
use ::alloc_count;
pub mod blkif;
pub mod bounce;
pub mod controllers;
pub mod grant_dma_check;

pub mod negotiate;
pub mod persistent;
mod plan;
pub mod rate_limited_log;
mod request_slot;
pub mod ring_io;
pub mod served_disk;
#[cfg(any(test, feature = "sim"))]
pub mod sim_blkfront;
pub mod statistics;
pub mod target;
mod unserved;
mod vbd;

#[cfg(test)]
mod tests;

use alloc::vec::Vec;
use blockdev::DmaRegion;
use core::fmt;
use core::ptr::NonNull;

pub use negotiate::FrontendRing;
pub use served_disk::{
    CompletionSignal, DataPath, MAX_INDIRECT_SEGMENTS, OpenedTarget, SECTOR_SIZE, ServedDisk,
};
pub use target::{
    MAX_NBD_EXPORT, NBD_DEFAULT_PORT, NbdTargetError, OpenError, Target, TargetOpener,
    claim_partition, claim_sectors,
};
pub use unserved::UnservedGap;
pub use vbd::{
    Adoptions, Attention, Progress, RingsPolled, VBD_UPDATES_PER_PASS, VbdBackends, VbdId,
    VbdSnapshot, VbdStatus, WATCH_EVENTS_TAKEN_PER_PASS, WATCH_TOKEN, WatchIntake,
};

use xen_pv::event::{EventChannels, Port};
use xen_pv::grant::{GrantError, GrantMapper, GrantSpec, Mapping};
use xen_pv::{DomId, Errno, Hypercall};

/// What the backend needs from Xen and the kernel.
pub trait BackendServices {
    /// Binds a local port to the frontend's `remote_port`; an event on it
    /// must wake the poll loop.
    fn bind_interdomain(&mut self, remote: DomId, remote_port: u32) -> Result<Port, Errno>;
    /// Notifies the frontend on `port`.
    fn notify(&mut self, port: Port) -> Result<(), Errno>;
    /// Closes `port` (the frontend sees it unbound).
    fn close_port(&mut self, port: Port);
    /// Maps grants, appending the result for each spec to `results`, in
    /// order (without allocating when `results` has room).
    fn map_grants(&mut self, specs: &[GrantSpec], results: &mut Vec<Result<Mapping, GrantError>>);
    /// Unmaps every mapping in `mappings`, leaving it empty; one whose
    /// unmap failed goes to `failed` with its error.
    fn unmap_grants(
        &mut self,
        mappings: &mut Vec<Mapping>,
        failed: &mut Vec<(Mapping, GrantError)>,
    );
    /// The address at which window frame `gfn` is mapped in this domain.
    fn frame_address(&self, gfn: u64) -> Option<NonNull<u8>>;
    /// A monotonic clock (for log rate limits).
    fn now_ns(&self) -> u64;
    /// Prints one line on the console.
    fn log(&mut self, line: fmt::Arguments<'_>);
    /// See [`Platform::alloc_bounce_pages`].
    fn alloc_bounce_pages(&mut self, pages: usize) -> Option<DmaRegion>;
    /// See [`Platform::free_bounce_pages`].
    ///
    /// # Safety
    /// As for [`Platform::free_bounce_pages`].
    unsafe fn free_bounce_pages(&mut self, region: DmaRegion);
}

/// What only the kernel knows, for [`XenBackendServices`].
pub trait Platform {
    /// See [`BackendServices::frame_address`] (an identity-mapped window:
    /// `gfn * 4096`).
    fn frame_address(&self, gfn: u64) -> Option<NonNull<u8>>;
    /// See [`BackendServices::now_ns`].
    fn now_ns(&self) -> u64;
    /// See [`BackendServices::log`].
    fn log(&mut self, line: fmt::Arguments<'_>);
    /// Takes a frontend's notify on `port` to send later, within two loop
    /// turns (the kernel folds it into the loop's next sleep's trip into
    /// Xen); false (the default) to have it sent now.
    fn hold_notify(&mut self, _port: Port) -> bool {
        false
    }
    /// Allocates `pages` zeroed, page-aligned, physically contiguous pages
    /// that the disks' devices can DMA to and the CPU reaches at `virt`
    /// (a ring's bounce buffers), or `None` when out of memory.
    fn alloc_bounce_pages(&mut self, pages: usize) -> Option<DmaRegion>;
    /// Gives back pages from [`Self::alloc_bounce_pages`].
    ///
    /// # Safety
    /// `region` came from `alloc_bounce_pages`, and no device and no
    /// pointer uses it any more.
    unsafe fn free_bounce_pages(&mut self, region: DmaRegion);
}

/// [`BackendServices`] over this crate's event channels and grant mapper.
pub struct XenBackendServices<'r, 'a, H, P> {
    pub events: &'r mut EventChannels<'a, H>,
    pub grants: &'r mut GrantMapper<'a, H>,
    pub platform: P,
}

impl<H: Hypercall, P: Platform> BackendServices for XenBackendServices<'_, '_, H, P> {
    fn bind_interdomain(&mut self, remote: DomId, remote_port: u32) -> Result<Port, Errno> {
        // The upcall only has to wake the poll loop, which polls every ring.
        self.events.bind_interdomain_polled(remote, remote_port)
    }

    fn notify(&mut self, port: Port) -> Result<(), Errno> {
        if self.platform.hold_notify(port) {
            return Ok(());
        }
        self.events.send(port)
    }

    fn close_port(&mut self, port: Port) {
        if let Err(e) = self.events.close(port) {
            let n = port.0;
            self.platform
                .log(format_args!("blkback: closing port {n} failed: {e:?}"));
        }
    }

    fn map_grants(&mut self, specs: &[GrantSpec], results: &mut Vec<Result<Mapping, GrantError>>) {
        self.grants.map_batch(specs, results);
    }

    fn unmap_grants(
        &mut self,
        mappings: &mut Vec<Mapping>,
        failed: &mut Vec<(Mapping, GrantError)>,
    ) {
        self.grants.unmap_batch(mappings, failed);
    }

    fn frame_address(&self, gfn: u64) -> Option<NonNull<u8>> {
        self.platform.frame_address(gfn)
    }

    fn now_ns(&self) -> u64 {
        self.platform.now_ns()
    }

    fn log(&mut self, line: fmt::Arguments<'_>) {
        self.platform.log(line);
    }

    fn alloc_bounce_pages(&mut self, pages: usize) -> Option<DmaRegion> {
        self.platform.alloc_bounce_pages(pages)
    }

    unsafe fn free_bounce_pages(&mut self, region: DmaRegion) {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.platform.free_bounce_pages(region) }
    }
}

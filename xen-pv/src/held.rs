//! What this domain holds of Xen that an in-place restart must give back
//! before it starts again: the grant mappings of its GFN window and the
//! interdomain (ring) event-channel ports it bound.
//!
//! [`crate::grant::GrantMapper`] and [`crate::event::EventChannels`] write
//! every mapping and binding here as it happens, and erase it when it
//! ends. The record is made of atomics in fixed-size arrays that the
//! kernel keeps in `static`s, not on the heap: after a panic the heap may be
//! corrupt, and [`release_all`] needs nothing but the record and the
//! hypercall page (it allocates nothing).
//!
//! # The restart, as the kernel is to do it
//! The kernel's restart entry (reached from the panic handler, from the
//! watchdog that finds the poll loop stuck, or from the operator's
//! control node) does, in this order:
//! 1. Resets the stack pointer to the top of the boot stack and jumps to
//!    the restart path; nothing of the dead instance's stack is used again.
//! 2. Quiesces the storage controllers (NVMe/AHCI reset, as the drivers'
//!    timeout path does): a device still writing into a guest's page
//!    must stop before that page's grant is unmapped below.
//! 3. [`release_all`] on the two `static` records: every grant mapping
//!    the dead instance held is unmapped (the frames become unpopulated
//!    GFNs again) and every ring port is closed. Xen then shows each
//!    frontend's port unbound and reserved for this domain, so it can be
//!    bound again. The xenstore and console ports are not in the record
//!    (they come from HVM params and stay bound): the new instance keeps
//!    using them.
//! 4. A fresh heap over the same memory (the old one is abandoned
//!    whole, not freed piece by piece; stordom's kernel starts it before
//!    step 2, whose PCI walk allocates, as [`release_all`] needs none),
//!    then the usual bring-up: a new
//!    `EventChannels` and `GrantMapper` (a new window over the same GFNs,
//!    all free again, recording into the same statics).
//! 5. The xenstore connection: a reply the dead instance waited for may
//!    still arrive, so the ring is drained of whole messages first, then
//!    `XS_RESET_WATCHES` clears the old instance's watches (they would
//!    otherwise fire twice, and `XS_WATCH` of the same token fails with
//!    EEXIST), and `blkback::VbdBackends::start` watches `backend/vbd`
//!    again. Its first rescan adopts every vbd whose backend state is
//!    Connected with its frontend Connected (see `blkback`'s crate
//!    documentation, "Restart"); the others take the ordinary path.
//! 6. Writes `data/restarts` (a count kept in a `static` beside the
//!    records) and `data/last-restart` (the reason: `panic: <message>`,
//!    `watchdog: <what was stuck>`, `operator`), and logs how long the
//!    rings went unserved (from the dead instance's last serving pass,
//!    kept in a `static` too, to the new one's first).
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::event::EvtchnClose;
use crate::grant::{MAX_BATCH, UnmapGrantRef};
use crate::hypercall::{command, command_batch};
use crate::{Hypercall, PAGE_SIZE};

/// Marks an entry of [`HeldGrants`] that holds a handle (Xen's handles
/// start at 0).
const HANDLE_HELD: u64 = 1 << 32;

/// The grant mappings held: one entry per frame of the GFN window, the
/// handle of the mapping at that frame (with [`HANDLE_HELD`]), 0 when the
/// frame is free. A `static HeldGrants<[AtomicU64; N]>` coerces to
/// `&HeldGrants`.
pub struct HeldGrants<T: ?Sized = [AtomicU64]> {
    /// The window's first frame.
    base_gfn: AtomicU64,
    handles: T,
}

impl<const FRAMES: usize> HeldGrants<[AtomicU64; FRAMES]> {
    /// An empty record for a window of up to `FRAMES` frames.
    pub const fn new() -> Self {
        HeldGrants {
            base_gfn: AtomicU64::new(0),
            handles: [const { AtomicU64::new(0) }; FRAMES],
        }
    }
}

impl<const FRAMES: usize> Default for HeldGrants<[AtomicU64; FRAMES]> {
    fn default() -> Self {
        Self::new()
    }
}

impl HeldGrants {
    /// Frames of the window the record can cover.
    pub fn capacity(&self) -> usize {
        self.handles.len()
    }

    /// Mappings recorded now.
    pub fn held(&self) -> usize {
        self.handles
            .iter()
            .filter(|h| h.load(Ordering::Acquire) & HANDLE_HELD != 0)
            .count()
    }

    /// The window starts at `base_gfn` from now on.
    pub(crate) fn set_window(&self, base_gfn: u64) {
        self.base_gfn.store(base_gfn, Ordering::Release);
    }

    fn entry(&self, gfn: u64) -> Option<&AtomicU64> {
        let slot = gfn.checked_sub(self.base_gfn.load(Ordering::Acquire))?;
        self.handles.get(usize::try_from(slot).ok()?)
    }

    /// Records the mapping `handle` at frame `gfn` (a window frame: the
    /// mapper never hands out one beyond the record).
    pub(crate) fn mapped(&self, gfn: u64, handle: u32) {
        if let Some(entry) = self.entry(gfn) {
            entry.store(HANDLE_HELD | u64::from(handle), Ordering::Release);
        }
    }

    /// Frame `gfn` holds no mapping any more.
    pub(crate) fn unmapped(&self, gfn: u64) {
        if let Some(entry) = self.entry(gfn) {
            entry.store(0, Ordering::Release);
        }
    }
}

/// The interdomain ports bound (the rings' event channels), in any order;
/// 0 marks a free entry (port 0 is never bound). A `static
/// HeldPorts<[AtomicU32; N]>` coerces to `&HeldPorts`.
pub struct HeldPorts<T: ?Sized = [AtomicU32]> {
    ports: T,
}

impl<const PORTS: usize> HeldPorts<[AtomicU32; PORTS]> {
    /// An empty record of up to `PORTS` ports.
    pub const fn new() -> Self {
        HeldPorts {
            ports: [const { AtomicU32::new(0) }; PORTS],
        }
    }
}

impl<const PORTS: usize> Default for HeldPorts<[AtomicU32; PORTS]> {
    fn default() -> Self {
        Self::new()
    }
}

impl HeldPorts {
    /// Ports recorded now.
    pub fn held(&self) -> usize {
        self.ports
            .iter()
            .filter(|p| p.load(Ordering::Acquire) != 0)
            .count()
    }

    /// Records `port`; false when the record is full (the caller must not
    /// keep a port a restart could not close).
    pub(crate) fn bound(&self, port: u32) -> bool {
        self.ports.iter().any(|entry| {
            entry
                .compare_exchange(0, port, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
    }

    /// `port` is closed.
    pub(crate) fn closed(&self, port: u32) {
        for entry in &self.ports {
            let _ = entry.compare_exchange(port, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

/// What [`release_all`] gave back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    pub grants_unmapped: usize,
    /// Unmaps Xen refused (a stale handle: nothing is mapped there).
    pub grants_failed: usize,
    pub ports_closed: usize,
    /// Closes Xen refused (the port was not bound any more).
    pub ports_failed: usize,
}

/// Unmaps every grant mapping and closes every port the records hold,
/// emptying them; allocates nothing and needs no other state (a dead
/// instance's heap is never touched). Run it before the new instance's
/// `GrantMapper` and `EventChannels` exist.
pub fn release_all<H: Hypercall + ?Sized>(
    xen: &H,
    grants: &HeldGrants,
    ports: &HeldPorts,
) -> Released {
    let mut released = Released::default();
    let base = grants.base_gfn.load(Ordering::Acquire);
    let mut ops = [UnmapGrantRef::default(); MAX_BATCH];
    let mut count = 0;
    let flush = |ops: &mut [UnmapGrantRef], released: &mut Released| {
        let call = command_batch(xen, ops);
        for op in ops.iter() {
            if call.is_ok() && op.status == 0 {
                released.grants_unmapped += 1;
            } else {
                released.grants_failed += 1;
            }
        }
    };
    for (slot, entry) in (0u64..).zip(&grants.handles) {
        let held = entry.swap(0, Ordering::AcqRel);
        if held & HANDLE_HELD == 0 {
            continue;
        }
        ops[count] = UnmapGrantRef {
            host_addr: (base + slot) * PAGE_SIZE as u64,
            handle: held as u32,
            ..UnmapGrantRef::default()
        };
        count += 1;
        if count == MAX_BATCH {
            flush(&mut ops[..count], &mut released);
            count = 0;
        }
    }
    if count > 0 {
        flush(&mut ops[..count], &mut released);
    }
    for entry in &ports.ports {
        let port = entry.swap(0, Ordering::AcqRel);
        if port == 0 {
            continue;
        }
        match command(xen, &mut EvtchnClose { port }) {
            Ok(_) => released.ports_closed += 1,
            Err(_) => released.ports_failed += 1,
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventChannels;
    use crate::grant::{GfnWindow, GrantMapper, GrantSpec};
    use crate::sim::SimXen;
    use alloc::vec::Vec;

    const FRONTEND: crate::DomId = 7;
    const WINDOW: u64 = 0x10_0000;

    #[test]
    fn release_all_gives_back_what_an_abandoned_instance_held() {
        let sim = SimXen::new();
        let grants_held: &HeldGrants = &HeldGrants::<[AtomicU64; 64]>::new();
        let ports_held: &HeldPorts = &HeldPorts::<[AtomicU32; 4]>::new();
        let remote_ports: Vec<u32> = (0..3).map(|_| sim.remote_alloc_unbound(FRONTEND)).collect();
        let specs: Vec<GrantSpec> = (0..40u8)
            .map(|i| GrantSpec {
                domid: FRONTEND,
                gref: sim.offer_grant(FRONTEND, false, &[i]),
                readonly: i % 2 == 0,
            })
            .collect();
        {
            let mut events = EventChannels::new(&sim, sim.shared_info(), ports_held);
            let mut grants = GrantMapper::new(&sim, GfnWindow::new(WINDOW, 64), grants_held);
            let mut results = Vec::new();
            grants.map_batch(&specs, &mut results);
            let mut mappings: Vec<_> = results.into_iter().map(Result::unwrap).collect();
            // One mapping and one port are given back as usual: the
            // record forgets them.
            let mut one = alloc::vec![mappings.pop().unwrap()];
            grants.unmap_batch(&mut one, &mut Vec::new());
            let ports: Vec<_> = remote_ports
                .iter()
                .map(|&rp| events.bind_interdomain(FRONTEND, rp).unwrap())
                .collect();
            events.close(ports[2]).unwrap();
            assert_eq!((grants_held.held(), ports_held.held()), (39, 2));
            // The instance dies: nothing of it is dropped.
            core::mem::forget(mappings);
            core::mem::forget(grants);
            core::mem::forget(events);
        }
        assert_eq!(sim.mapped_grants(), 39);
        assert_eq!(sim.guest_interdomain_ports(), 2);
        let released = release_all(&sim, grants_held, ports_held);
        assert_eq!(
            released,
            Released {
                grants_unmapped: 39,
                ports_closed: 2,
                ..Released::default()
            }
        );
        assert_eq!(sim.mapped_grants(), 0);
        assert_eq!(sim.guest_interdomain_ports(), 0);
        assert!(
            remote_ports
                .iter()
                .all(|&rp| sim.remote_port_awaits_guest(FRONTEND, rp))
        );
        assert_eq!((grants_held.held(), ports_held.held()), (0, 0));
        assert_eq!(
            release_all(&sim, grants_held, ports_held),
            Released::default()
        );

        // The next instance binds the same frontend ports and maps again.
        let mut events = EventChannels::new(&sim, sim.shared_info(), ports_held);
        for &rp in &remote_ports {
            events.bind_interdomain(FRONTEND, rp).unwrap();
        }
        let mut grants = GrantMapper::new(&sim, GfnWindow::new(WINDOW, 64), grants_held);
        let mut results = Vec::new();
        grants.map_batch(&specs, &mut results);
        assert!(results.iter().all(Result::is_ok));
    }

    #[test]
    fn a_full_port_record_refuses_the_bind_and_the_window_stops_at_the_record() {
        let sim = SimXen::new();
        let ports_held: &HeldPorts = &HeldPorts::<[AtomicU32; 1]>::new();
        let mut events = EventChannels::new(&sim, sim.shared_info(), ports_held);
        let first = sim.remote_alloc_unbound(FRONTEND);
        let second = sim.remote_alloc_unbound(FRONTEND);
        events.bind_interdomain(FRONTEND, first).unwrap();
        assert_eq!(
            events.bind_interdomain(FRONTEND, second),
            Err(crate::Errno::ENOSPC)
        );
        assert!(sim.remote_port_awaits_guest(FRONTEND, second));
        assert_eq!(sim.guest_interdomain_ports(), 1);

        let grants_held: &HeldGrants = &HeldGrants::<[AtomicU64; 2]>::new();
        let mut grants = GrantMapper::new(&sim, GfnWindow::new(WINDOW, 8), grants_held);
        let spec = GrantSpec {
            domid: FRONTEND,
            gref: sim.offer_grant(FRONTEND, false, b"x"),
            readonly: true,
        };
        let mut results = Vec::new();
        grants.map_batch(&[spec; 3], &mut results);
        assert!(results[0].is_ok() && results[1].is_ok());
        assert_eq!(results[2], Err(crate::grant::GrantError::WindowFull));
        assert_eq!(grants_held.held(), 2);
    }
}

//! Grant tables: batched map/unmap of foreign grants into a window of
//! guest-physical frames (the batch calls take the caller's buffers, so a
//! caller that keeps them allocates nothing per batch), and the entries of
//! the domain's own table, to grant a page of its own ([`GrantEntryV1`]).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::held::HeldGrants;
use crate::hypercall::{Command, command_batch};
use crate::{DomId, Errno, Hypercall, PAGE_SIZE};

/// A grant reference in a foreign domain's grant table.
pub type GrantRef = u32;

/// `GNTMAP_host_map`: map for CPU access (in an auto-translated guest,
/// `host_addr` is the guest-physical address Xen inserts the page at).
pub const GNTMAP_HOST_MAP: u32 = 1 << 1;
/// `GNTMAP_readonly`: the mapping is read-only.
pub const GNTMAP_READONLY: u32 = 1 << 2;

/// Operations issued in one hypercall at most; larger batches are split.
pub const MAX_BATCH: usize = 32;

/// `struct gnttab_map_grant_ref`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct MapGrantRef {
    pub host_addr: u64,
    pub flags: u32,
    pub gref: GrantRef,
    pub dom: DomId,
    pub status: i16,
    pub handle: u32,
    pub dev_bus_addr: u64,
}

xen_command!(MapGrantRef, GrantTable, 0, "struct gnttab_map_grant_ref");

/// `struct gnttab_unmap_grant_ref`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct UnmapGrantRef {
    pub host_addr: u64,
    pub dev_bus_addr: u64,
    pub handle: u32,
    pub status: i16,
}

xen_command!(
    UnmapGrantRef,
    GrantTable,
    1,
    "struct gnttab_unmap_grant_ref"
);

/// Why a grant operation failed (`GNTST_*`, plus local reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantError {
    /// GNTST_general_error: unspecified failure.
    General,
    /// GNTST_bad_domain: no such domain.
    BadDomain,
    /// GNTST_bad_gntref: the reference is not a valid grant.
    BadGrantRef,
    /// GNTST_bad_handle: the mapping handle is not valid.
    BadHandle,
    /// GNTST_bad_virt_addr: the host address cannot take the mapping.
    BadVirtAddr,
    /// GNTST_bad_dev_addr: the device address is invalid.
    BadDevAddr,
    /// GNTST_no_device_space: no room in the device's address space.
    NoDeviceSpace,
    /// GNTST_permission_denied: the grant does not allow this access.
    PermissionDenied,
    /// GNTST_bad_page: the granted page is not valid.
    BadPage,
    /// GNTST_bad_copy_arg: offset/length outside the page.
    BadCopyArg,
    /// GNTST_address_too_big: the address does not fit the operation.
    AddressTooBig,
    /// GNTST_eagain: transient (page being paged in); retry later.
    Again,
    /// GNTST_no_space: Xen ran out of internal space.
    NoSpace,
    /// A status code this crate does not know.
    Unknown(i16),
    /// The whole hypercall failed; no operation of its batch was done.
    Hypercall(Errno),
    /// The GFN window has no free slot for another mapping.
    WindowFull,
}

impl GrantError {
    /// Maps a per-operation status; `Ok` for GNTST_okay.
    pub fn from_status(status: i16) -> Result<(), GrantError> {
        Err(match status {
            0 => return Ok(()),
            -1 => GrantError::General,
            -2 => GrantError::BadDomain,
            -3 => GrantError::BadGrantRef,
            -4 => GrantError::BadHandle,
            -5 => GrantError::BadVirtAddr,
            -6 => GrantError::BadDevAddr,
            -7 => GrantError::NoDeviceSpace,
            -8 => GrantError::PermissionDenied,
            -9 => GrantError::BadPage,
            -10 => GrantError::BadCopyArg,
            -11 => GrantError::AddressTooBig,
            -12 => GrantError::Again,
            -13 => GrantError::NoSpace,
            other => GrantError::Unknown(other),
        })
    }
}

/// Hands out frames of the reserved, unpopulated GFN range that grant
/// mappings are placed in.
pub struct GfnWindow {
    base: u64,
    used: Vec<bool>,
    next: usize,
}

impl GfnWindow {
    /// A window of `frames` frames starting at `base_gfn`.
    pub fn new(base_gfn: u64, frames: usize) -> Self {
        GfnWindow {
            base: base_gfn,
            used: alloc::vec![false; frames],
            next: 0,
        }
    }

    /// Takes a free frame, searching round-robin so a just-freed frame is
    /// reused last (Xen may still be flushing it).
    pub fn alloc(&mut self) -> Option<u64> {
        let n = self.used.len();
        let slot = (0..n)
            .map(|i| (self.next + i) % n)
            .find(|&s| !self.used[s])?;
        self.used[slot] = true;
        self.next = (slot + 1) % n;
        Some(self.base + slot as u64)
    }

    /// Returns `gfn` to the window; false if it was not taken from it.
    pub fn free(&mut self, gfn: u64) -> bool {
        let Some(slot) = gfn.checked_sub(self.base).map(|s| s as usize) else {
            return false;
        };
        match self.used.get_mut(slot) {
            Some(used) if *used => {
                *used = false;
                true
            }
            _ => false,
        }
    }

    /// Frames currently taken.
    pub fn in_use(&self) -> usize {
        self.used.iter().filter(|u| **u).count()
    }
}

/// A grant to map: which domain's which reference, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantSpec {
    pub domid: DomId,
    pub gref: GrantRef,
    pub readonly: bool,
}

/// A live mapping; give it back to [`GrantMapper::unmap_batch`].
#[derive(Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The guest frame the granted page now appears at.
    pub gfn: u64,
    pub handle: u32,
    pub grant: GrantSpec,
}

/// Counters of grant activity; `mapped` is the live number of mappings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantStats {
    pub mapped: usize,
    pub maps: u64,
    pub unmaps: u64,
    pub hypercalls: u64,
}

/// Maps, unmaps and copies grants in batches, keeping count, and writes
/// every mapping it holds in a [`HeldGrants`] record (for a restart).
pub struct GrantMapper<'r, H> {
    xen: H,
    window: GfnWindow,
    stats: GrantStats,
    held: &'r HeldGrants,
}

impl<'r, H: Hypercall> GrantMapper<'r, H> {
    /// Maps into `window`, recording in `held` (emptied first by
    /// [`crate::held::release_all`] after a restart); frames of the window
    /// beyond the record's capacity are not used.
    pub fn new(xen: H, mut window: GfnWindow, held: &'r HeldGrants) -> Self {
        window.used.truncate(held.capacity());
        held.set_window(window.base);
        GrantMapper {
            xen,
            window,
            stats: GrantStats::default(),
            held,
        }
    }

    /// Current counters.
    pub fn stats(&self) -> GrantStats {
        self.stats
    }

    /// Maps every grant in `specs`, one hypercall per [`MAX_BATCH`], and
    /// appends the result for each spec to `results`, in order.
    pub fn map_batch(
        &mut self,
        specs: &[GrantSpec],
        results: &mut Vec<Result<Mapping, GrantError>>,
    ) {
        for chunk in specs.chunks(MAX_BATCH) {
            let mut ops = [MapGrantRef::default(); MAX_BATCH];
            let mut gfns = [None; MAX_BATCH];
            let mut issued = 0;
            for (spec, gfn) in chunk.iter().zip(&mut gfns) {
                *gfn = self.window.alloc();
                if let Some(gfn) = *gfn {
                    ops[issued] = MapGrantRef {
                        host_addr: gfn * PAGE_SIZE as u64,
                        flags: GNTMAP_HOST_MAP | if spec.readonly { GNTMAP_READONLY } else { 0 },
                        gref: spec.gref,
                        dom: spec.domid,
                        ..MapGrantRef::default()
                    };
                    issued += 1;
                }
            }
            let call = self.issue(&mut ops[..issued]);
            let mut done = ops[..issued].iter();
            for (spec, gfn) in chunk.iter().zip(gfns) {
                let Some(gfn) = gfn else {
                    results.push(Err(GrantError::WindowFull));
                    continue;
                };
                let outcome = done.next().map_or(Err(GrantError::General), |op| {
                    call.and_then(|()| GrantError::from_status(op.status))
                        .map(|()| op.handle)
                });
                results.push(match outcome {
                    Ok(handle) => {
                        self.held.mapped(gfn, handle);
                        self.stats.mapped += 1;
                        self.stats.maps += 1;
                        Ok(Mapping {
                            gfn,
                            handle,
                            grant: *spec,
                        })
                    }
                    Err(e) => {
                        self.window.free(gfn);
                        Err(e)
                    }
                });
            }
        }
    }

    /// Unmaps every mapping in `mappings`, leaving it empty (its capacity
    /// kept). A mapping whose unmap failed goes to `failed` with its
    /// error, so it is not forgotten (its frame stays reserved).
    pub fn unmap_batch(
        &mut self,
        mappings: &mut Vec<Mapping>,
        failed: &mut Vec<(Mapping, GrantError)>,
    ) {
        while !mappings.is_empty() {
            let start = mappings.len().saturating_sub(MAX_BATCH);
            let mut ops = [UnmapGrantRef::default(); MAX_BATCH];
            let count = mappings.len() - start;
            for (op, m) in ops.iter_mut().zip(&mappings[start..]) {
                *op = UnmapGrantRef {
                    host_addr: m.gfn * PAGE_SIZE as u64,
                    handle: m.handle,
                    ..UnmapGrantRef::default()
                };
            }
            let call = self.issue(&mut ops[..count]);
            for (mapping, op) in mappings.drain(start..).zip(&ops) {
                match call.and_then(|()| GrantError::from_status(op.status)) {
                    Ok(()) => {
                        self.held.unmapped(mapping.gfn);
                        self.window.free(mapping.gfn);
                        self.stats.mapped = self.stats.mapped.saturating_sub(1);
                        self.stats.unmaps += 1;
                    }
                    Err(e) => failed.push((mapping, e)),
                }
            }
        }
    }

    /// One hypercall for `ops` (none if empty).
    fn issue<T: Command>(&mut self, ops: &mut [T]) -> Result<(), GrantError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.stats.hypercalls += 1;
        command_batch(&self.xen, ops)
            .map(drop)
            .map_err(GrantError::Hypercall)
    }
}

/// `GTF_permit_access`: the grantee may map the frame.
const GTF_PERMIT_ACCESS: u16 = 1;
/// `GTF_readonly`: the grantee may only read it.
const GTF_READONLY: u16 = 1 << 2;
/// `GTF_reading | GTF_writing`: Xen has the grant mapped (set and cleared
/// by Xen alone).
const GTF_IN_USE: u16 = (1 << 3) | (1 << 4);

/// `grant_entry_v1_t`: one entry of a domain's own grant table, in the
/// frames it maps with [`crate::memory::map_grant_table_frame`]. The
/// flags and domid form the word Xen compares-and-exchanges.
#[repr(C)]
pub struct GrantEntryV1 {
    /// `flags` (low half) and `domid` (high half).
    header: AtomicU32,
    frame: AtomicU32,
}

/// Entries of one grant-table frame (v1).
pub const GRANT_ENTRIES_PER_FRAME: usize = PAGE_SIZE / core::mem::size_of::<GrantEntryV1>();
/// Entries the toolstack reserves (console, xenstore, ...); never offered.
pub const RESERVED_GRANT_ENTRIES: usize = 8;

/// Why a grant of one's own could not be ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantStillMapped;

impl GrantEntryV1 {
    /// Whether the entry grants nothing (free to offer).
    pub fn is_free(&self) -> bool {
        self.header.load(Ordering::Acquire) as u16 == 0
    }

    /// Grants guest frame `gfn` to domain `grantee`; false (and nothing
    /// changed) when the entry is in use.
    pub fn offer(&self, grantee: DomId, gfn: u32, readonly: bool) -> bool {
        let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
        if !self.is_free() {
            return false;
        }
        // The frame is in place before Xen can see the entry permitted.
        self.frame.store(gfn, Ordering::Release);
        let header = u32::from(flags) | (u32::from(grantee) << 16);
        self.header
            .compare_exchange(0, header, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Ends the grant, unless Xen still has it mapped.
    pub fn end(&self) -> Result<(), GrantStillMapped> {
        let mut header = self.header.load(Ordering::Acquire);
        loop {
            if header as u16 & GTF_IN_USE != 0 {
                return Err(GrantStillMapped);
            }
            match self
                .header
                .compare_exchange(header, 0, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(now) => header = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    fn entry() -> GrantEntryV1 {
        GrantEntryV1 {
            header: AtomicU32::new(0),
            frame: AtomicU32::new(0),
        }
    }

    #[test]
    fn an_own_grant_is_offered_as_xen_reads_it_and_ended_once_unmapped() {
        assert_eq!(size_of::<GrantEntryV1>(), 8);
        assert_eq!(GRANT_ENTRIES_PER_FRAME, 512);
        let e = entry();
        assert!(e.offer(3, 0x1234, false));
        assert_eq!(e.header.load(Ordering::Relaxed), 1 | 3 << 16);
        assert_eq!(e.frame.load(Ordering::Relaxed), 0x1234);
        assert!(!e.is_free());
        assert!(
            !e.offer(4, 0x99, true),
            "an entry in use is not offered again"
        );
        // Xen marks it mapped for writing: it cannot be ended.
        e.header.fetch_or(1 << 4 | 1 << 3, Ordering::Relaxed);
        assert_eq!(e.end(), Err(GrantStillMapped));
        e.header.fetch_and(!(1 << 4 | 1 << 3), Ordering::Relaxed);
        assert_eq!(e.end(), Ok(()));
        assert!(e.is_free());
        assert!(e.offer(4, 0x99, true));
        assert_eq!(e.header.load(Ordering::Relaxed), 1 | 1 << 2 | 4 << 16);
    }

    #[test]
    fn layouts_match_grant_table_h() {
        assert_eq!(size_of::<MapGrantRef>(), 32);
        assert_eq!(size_of::<UnmapGrantRef>(), 24);
    }

    #[test]
    fn status_codes_map_to_errors() {
        assert_eq!(GrantError::from_status(0), Ok(()));
        assert_eq!(GrantError::from_status(-3), Err(GrantError::BadGrantRef));
        assert_eq!(
            GrantError::from_status(-8),
            Err(GrantError::PermissionDenied)
        );
        assert_eq!(GrantError::from_status(-12), Err(GrantError::Again));
        assert_eq!(GrantError::from_status(-99), Err(GrantError::Unknown(-99)));
    }

    #[test]
    fn window_allocates_round_robin_and_rejects_foreign_frames() {
        let mut w = GfnWindow::new(0x10_0000, 3);
        assert_eq!(w.alloc(), Some(0x10_0000));
        assert_eq!(w.alloc(), Some(0x10_0001));
        assert!(w.free(0x10_0000));
        assert_eq!(w.alloc(), Some(0x10_0002));
        assert_eq!(w.alloc(), Some(0x10_0000));
        assert_eq!(w.alloc(), None);
        assert!(!w.free(0x0f_ffff));
        assert!(!w.free(0x10_0003));
        assert!(w.free(0x10_0001));
        assert!(!w.free(0x10_0001), "double free is refused");
        assert_eq!(w.in_use(), 2);
    }
}

#[cfg(test)]
mod sim_tests {
    use super::*;
    use crate::hypercall::{Command, HypercallOp};
    use crate::sim::SimXen;
    use core::sync::atomic::AtomicU64;

    const FRONTEND: DomId = 7;
    const WINDOW: u64 = 0x10_0000;

    fn spec(gref: GrantRef, readonly: bool) -> GrantSpec {
        GrantSpec {
            domid: FRONTEND,
            gref,
            readonly,
        }
    }

    #[test]
    fn maps_in_batches_and_counts_live_mappings() {
        let sim = SimXen::new();
        let grefs: Vec<GrantRef> = (0..70u8)
            .map(|i| sim.offer_grant(FRONTEND, false, &[i; 8]))
            .collect();
        let held = HeldGrants::<[AtomicU64; 128]>::new();
        let mut g = GrantMapper::new(&sim, GfnWindow::new(WINDOW, 128), &held);
        let specs: Vec<GrantSpec> = grefs.iter().map(|r| spec(*r, false)).collect();
        let mut results = Vec::new();
        g.map_batch(&specs, &mut results);
        let mut maps: Vec<Mapping> = results.into_iter().map(Result::unwrap).collect();

        // 70 operations: 32 + 32 + 6.
        assert_eq!(sim.calls(HypercallOp::GrantTable, MapGrantRef::CMD), 3);
        assert_eq!(g.stats().mapped, 70);
        assert_eq!(sim.mapped_grants(), 70);
        assert_eq!(sim.frame(maps[69].gfn).unwrap()[..8], [69; 8]);

        let mut failed = Vec::new();
        g.unmap_batch(&mut maps, &mut failed);
        assert!(maps.is_empty() && failed.is_empty());
        assert_eq!(sim.calls(HypercallOp::GrantTable, UnmapGrantRef::CMD), 3);
        assert_eq!(g.stats().mapped, 0);
        assert_eq!(g.stats().unmaps, 70);
        assert_eq!(sim.mapped_grants(), 0);
    }

    #[test]
    fn per_op_failures_are_typed_and_release_their_frames() {
        let sim = SimXen::new();
        let ro = sim.offer_grant(FRONTEND, true, b"ro");
        let rw = sim.offer_grant(FRONTEND, false, b"rw");
        // Frames are taken before the hypercall: 4 frames for 5 operations.
        let held = HeldGrants::<[AtomicU64; 128]>::new();
        let mut g = GrantMapper::new(&sim, GfnWindow::new(WINDOW, 4), &held);
        let mut results = Vec::new();
        let specs = [
            spec(ro, false),
            spec(ro, true),
            spec(999, false),
            spec(rw, false),
            spec(rw, true),
        ];
        g.map_batch(&specs, &mut results);
        assert_eq!(results[0], Err(GrantError::PermissionDenied));
        let ro_map = results[1].as_ref().unwrap();
        assert!(sim.frame_is_readonly(ro_map.gfn));
        assert_eq!(results[2], Err(GrantError::BadGrantRef));
        assert!(results[3].is_ok());
        assert_eq!(results[4], Err(GrantError::WindowFull));
        assert_eq!(g.stats().mapped, 2);
        // The two failed operations gave their frames back.
        let mut again = Vec::new();
        g.map_batch(
            &[spec(rw, true), spec(ro, true), spec(rw, true)],
            &mut again,
        );
        assert!(again[0].is_ok() && again[1].is_ok());
        assert_eq!(again[2], Err(GrantError::WindowFull));
        assert_eq!(g.stats().mapped, 4);
    }

    #[test]
    fn failed_hypercall_fails_its_whole_batch_only() {
        let sim = SimXen::new();
        let specs: Vec<GrantSpec> = (0..40)
            .map(|_| spec(sim.offer_grant(FRONTEND, false, b"x"), false))
            .collect();
        let held = HeldGrants::<[AtomicU64; 128]>::new();
        let mut g = GrantMapper::new(&sim, GfnWindow::new(WINDOW, 64), &held);
        sim.fail_next_hypercall(Errno::EFAULT);
        let mut results = Vec::new();
        g.map_batch(&specs, &mut results);
        assert!(
            results[..32]
                .iter()
                .all(|r| *r == Err(GrantError::Hypercall(Errno::EFAULT)))
        );
        assert!(results[32..].iter().all(Result::is_ok));
        assert_eq!(g.stats().mapped, 8);

        // A failed unmap hands the mapping back; it can be retried.
        let mut maps: Vec<Mapping> = results.into_iter().filter_map(Result::ok).collect();
        sim.fail_next_hypercall(Errno::EFAULT);
        let mut failed = Vec::new();
        g.unmap_batch(&mut maps, &mut failed);
        assert_eq!(failed.len(), 8);
        assert_eq!(g.stats().mapped, 8);
        let mut retry: Vec<Mapping> = failed.into_iter().map(|(m, _)| m).collect();
        let mut failed = Vec::new();
        g.unmap_batch(&mut retry, &mut failed);
        assert!(failed.is_empty());
        assert_eq!(g.stats().mapped, 0);
    }

    #[test]
    fn stale_handles_are_rejected() {
        let sim = SimXen::new();
        let gref = sim.offer_grant(FRONTEND, false, b"x");
        let held = HeldGrants::<[AtomicU64; 128]>::new();
        let mut g = GrantMapper::new(&sim, GfnWindow::new(WINDOW, 4), &held);
        let mut results = Vec::new();
        g.map_batch(&[spec(gref, false)], &mut results);
        let mut m = results.pop().unwrap().unwrap();
        m.handle += 100;
        let mut failed = Vec::new();
        g.unmap_batch(&mut alloc::vec![m], &mut failed);
        let (m, err) = failed.pop().unwrap();
        assert_eq!(err, GrantError::BadHandle);
        assert_eq!(g.stats().mapped, 1);
        assert_eq!(m.grant.gref, gref);
    }
}

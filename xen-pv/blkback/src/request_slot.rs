//! A ring slot's request state: allocated once at connect, reused by every
//! request the slot takes, so serving a request allocates nothing.

use alloc::collections::TryReserveError;
use alloc::vec::Vec;
use core::mem::size_of;

use xen_pv::PAGE_SIZE;
use xen_pv::grant::{GrantRef, Mapping};
use xen_pv::ring::copy_from_shared;

use crate::BackendServices;
use crate::blkif::{self, Direction, GrantedSegment, SEGMENTS_PER_INDIRECT_PAGE};
use crate::plan::Steps;
use crate::served_disk::SECTOR_SIZE;

/// An indirect request whose segments are still in the frontend's pages.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IndirectPages {
    pub(crate) direction: Direction,
    pub(crate) sector: u64,
    pub(crate) nr_segments: usize,
    pub(crate) pages: [GrantRef; blkif::MAX_INDIRECT_PAGES_PER_REQUEST],
    pub(crate) count: usize,
}

/// Where a request in a slot stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// No request.
    Free,
    /// Taken from the ring in this poll; its grants are being mapped.
    Taken,
    /// Accepted and not yet answered.
    InFlight,
}

/// One ring slot's request state, allocated at connect and reused.
pub(crate) struct Slot {
    pub(crate) state: SlotState,
    /// The ring index its request was taken from: where its answer goes
    /// in the ring's order.
    pub(crate) ring_index: u32,
    pub(crate) id: u64,
    pub(crate) operation: u8,
    pub(crate) steps: Steps,
    /// Its segments as the frontend listed them (parsed and checked once).
    pub(crate) grants: Vec<GrantedSegment>,
    /// The same segments where the device finds them, once mapped.
    pub(crate) segments: Vec<blockdev::Segment>,
    /// Their bounce pages, while in flight on a bouncing ring (the device
    /// is given these instead).
    pub(crate) bounced: Vec<blockdev::Segment>,
    /// Grants mapped for this request alone.
    pub(crate) mappings: Vec<Mapping>,
    /// Persistent grants it uses.
    pub(crate) kept: Vec<GrantRef>,
    pub(crate) map_readonly: bool,
    /// An indirect request still to fetch, then plan.
    pub(crate) indirect: Option<IndirectPages>,
    /// Why fetching its indirect segments failed.
    pub(crate) fetch_failed: Option<&'static str>,
    pub(crate) status: i16,
    /// Whether its steps may run (a barrier waits for the older requests).
    pub(crate) started: bool,
    pub(crate) on_device: bool,
    /// When it was taken from the ring, and whether the watchdog reported
    /// it as overdue.
    pub(crate) taken_at_ns: u64,
    pub(crate) overdue_reported: bool,
}

impl Slot {
    /// Room for requests of up to `segments` segments, bounced if `bounce`.
    pub(crate) fn new(segments: usize, bounce: bool) -> Result<Slot, TryReserveError> {
        Ok(Slot {
            state: SlotState::Free,
            ring_index: 0,
            id: 0,
            operation: 0,
            steps: Steps::default(),
            grants: reserved(segments)?,
            segments: reserved(segments)?,
            bounced: reserved(if bounce { segments } else { 0 })?,
            mappings: reserved(segments)?,
            kept: reserved(segments)?,
            map_readonly: true,
            indirect: None,
            fetch_failed: None,
            status: blkif::RSP_OKAY,
            started: false,
            on_device: false,
            taken_at_ns: 0,
            overdue_reported: false,
        })
    }

    /// Takes a new request `id` of `operation`, at `now_ns`.
    pub(crate) fn take(&mut self, ring_index: u32, id: u64, operation: u8, now_ns: u64) {
        self.state = SlotState::Taken;
        self.ring_index = ring_index;
        self.taken_at_ns = now_ns;
        self.overdue_reported = false;
        self.id = id;
        self.operation = operation;
        self.steps = Steps::default();
        self.grants.clear();
        self.segments.clear();
        self.map_readonly = true;
        self.indirect = None;
        self.fetch_failed = None;
        self.status = blkif::RSP_OKAY;
        self.started = false;
        self.on_device = false;
    }
}

/// An empty vector with room for `capacity` elements, if memory allows.
pub(crate) fn reserved<T>(capacity: usize) -> Result<Vec<T>, TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(capacity)?;
    Ok(v)
}

/// The request state of `count` slots of up to `segments` segments each.
pub(crate) fn allocate_slots(
    count: usize,
    segments: usize,
    bounce: bool,
) -> Result<Vec<Slot>, TryReserveError> {
    let mut slots = reserved(count)?;
    for _ in 0..count {
        slots.push(Slot::new(segments, bounce)?);
    }
    Ok(slots)
}

/// Where `grant`'s sectors are in the page mapped at `gfn`.
pub(crate) fn device_segment(gfn: u64, grant: GrantedSegment) -> blockdev::Segment {
    blockdev::Segment {
        phys: gfn * PAGE_SIZE as u64 + u64::from(grant.first_sect) * SECTOR_SIZE,
        len: grant.sectors() * SECTOR_SIZE as u32,
    }
}

/// Copies `count` segments out of the indirect page mapped at `gfn`,
/// checking each.
pub(crate) fn read_indirect_page<S: BackendServices>(
    svc: &S,
    gfn: u64,
    count: usize,
    out: &mut Vec<GrantedSegment>,
) -> Result<(), &'static str> {
    let base = svc
        .frame_address(gfn)
        .ok_or("indirect page has no address")?;
    let entry_size = size_of::<blkif::WireSegment>();
    for index in 0..count.min(SEGMENTS_PER_INDIRECT_PAGE) {
        let mut raw = [0u8; 8];
        // SAFETY: `index < 512`, so the 8 bytes lie in the page mapped at
        // `gfn`, mapped until the caller unmaps it; copied as shared
        // memory because the frontend may write it meanwhile.
        unsafe { copy_from_shared(base.as_ptr().add(index * entry_size), &mut raw) };
        let [g0, g1, g2, g3, first_sect, last_sect, _, _] = raw;
        if first_sect > last_sect || last_sect > blkif::LAST_SECTOR_IN_PAGE {
            return Err("bad first/last sector in an indirect segment");
        }
        if out.len() == out.capacity() {
            return Err("more indirect segments than advertised");
        }
        out.push(GrantedSegment {
            gref: u32::from_le_bytes([g0, g1, g2, g3]),
            first_sect,
            last_sect,
        });
    }
    Ok(())
}

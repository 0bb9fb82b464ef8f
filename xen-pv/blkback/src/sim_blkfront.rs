//! A simulated blkfront and the glue that lets the blkback engine run
//! against [`SimXen`]: the frontend grants a ring page and data pages,
//! writes requests in either ABI and reads responses; [`GrantWindowHal`]
//! lets a `drivers` device reach mapped grants the way the kernel's
//! identity-mapped GFN window does; [`SimPlatform`] is the console and
//! clock.

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};

use blockdev::DmaRegion;
use zerocopy::{FromBytes, IntoBytes};

use crate::Platform;
use crate::blkif::{self, Protocol, ResponseX86_32, ResponseX86_64, WireSegment};
use xen_pv::grant::GrantRef;
use xen_pv::ring::FrontRing;
use xen_pv::sim::SimXen;
use xen_pv::{DomId, PAGE_SIZE};

/// A response as the frontend reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub operation: u8,
    pub status: i16,
}

/// One data segment of a request: a granted page and its sector range.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub gref: GrantRef,
    pub first_sect: u8,
    pub last_sect: u8,
}

impl Seg {
    fn wire(&self) -> WireSegment {
        WireSegment::new(self.gref, self.first_sect, self.last_sect)
    }
}

/// A frontend domain with one blkif ring.
pub struct SimBlkfront<'s> {
    sim: &'s SimXen,
    domid: DomId,
    protocol: Protocol,
    ring: FrontRing<'s>,
    /// The ring's pages, in order.
    ring_refs: Vec<GrantRef>,
    /// `ring-page-order`, when the ring has several pages.
    page_order: Option<u32>,
    port: u32,
}

impl<'s> SimBlkfront<'s> {
    /// Domain `domid` grants a ring page (indices starting at `start`)
    /// and allocates an unbound port for the backend.
    pub fn new(sim: &'s SimXen, domid: DomId, protocol: Protocol, start: u32) -> Self {
        Self::with_pages(sim, domid, protocol, start, None)
    }

    /// As [`Self::new`], with `1 << order` ring pages published as
    /// `ring-page-order` and `ring-ref<n>` when `page_order` is given.
    pub fn with_pages(
        sim: &'s SimXen,
        domid: DomId,
        protocol: Protocol,
        start: u32,
        page_order: Option<u32>,
    ) -> Self {
        let pages = 1usize << page_order.unwrap_or(0);
        let ring_refs: Vec<GrantRef> = (0..pages)
            .map(|_| sim.offer_grant(domid, false, &[]))
            .collect();
        let bases: Vec<NonNull<u8>> = ring_refs
            .iter()
            .map(|&gref| sim.grant_page_ptr(domid, gref).expect("just offered"))
            .collect();
        // SAFETY: the granted pages are page-aligned, live as long as the
        // simulation, and the frontend touches them only through this ring.
        let ring = unsafe { FrontRing::init_pages(&bases, protocol.entry_size(), start) };
        SimBlkfront {
            sim,
            domid,
            protocol,
            ring,
            ring_refs,
            page_order,
            port: sim.remote_alloc_unbound(domid),
        }
    }

    /// The grants of its ring's pages.
    pub fn ring_refs(&self) -> &[GrantRef] {
        &self.ring_refs
    }

    /// The ABI it speaks.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The frontend's unbound port, as published in `event-channel`.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The nodes blkfront writes before Initialised: the ring's grant(s),
    /// event-channel and protocol.
    pub fn ring_nodes(&self) -> Vec<(String, String)> {
        let protocol = match self.protocol {
            Protocol::X86_32 => "x86_32-abi",
            Protocol::X86_64 => "x86_64-abi",
        };
        let mut nodes = Vec::new();
        match self.page_order {
            None => nodes.push(("ring-ref".into(), alloc::format!("{}", self.ring_refs[0]))),
            Some(order) => {
                nodes.push(("ring-page-order".into(), alloc::format!("{order}")));
                for (i, gref) in self.ring_refs.iter().enumerate() {
                    nodes.push((alloc::format!("ring-ref{i}"), alloc::format!("{gref}")));
                }
            }
        }
        nodes.push(("event-channel".into(), alloc::format!("{}", self.port)));
        nodes.push(("protocol".into(), protocol.into()));
        nodes
    }

    /// Grants a data page holding `contents`.
    pub fn grant(&self, readonly: bool, contents: &[u8]) -> GrantRef {
        self.sim.offer_grant(self.domid, readonly, contents)
    }

    /// The frontend writes `contents` at the start of its granted page
    /// (as blkfront copies data into a persistent grant).
    pub fn fill(&self, gref: GrantRef, contents: &[u8]) {
        let page = self
            .sim
            .grant_page_ptr(self.domid, gref)
            .expect("the frontend's own grant");
        let len = contents.len().min(PAGE_SIZE);
        // SAFETY: the granted page is PAGE_SIZE bytes and lives as long as
        // the simulation; `len` is bounded by it.
        unsafe { core::ptr::copy_nonoverlapping(contents.as_ptr(), page.as_ptr(), len) };
    }

    /// A granted page's current contents.
    pub fn page(&self, gref: GrantRef) -> Vec<u8> {
        self.sim.granted_page(self.domid, gref).unwrap_or_default()
    }

    /// Times the backend notified this frontend.
    pub fn notifications(&self) -> u64 {
        self.sim.notifications(self.domid, self.port)
    }

    /// A read, write or barrier request in this frontend's ABI; the
    /// segment count is `nr_segments` whatever `segs` holds (so tests can
    /// lie about it).
    pub fn data_request(
        &self,
        operation: u8,
        id: u64,
        sector: u64,
        nr_segments: u8,
        segs: &[Seg],
    ) -> Vec<u8> {
        let wire: Vec<WireSegment> = segs.iter().map(Seg::wire).collect();
        blkif::encode_read_write(
            self.protocol,
            &blkif::ReadWriteFields {
                operation,
                nr_segments,
                handle: 0,
                id,
                sector,
            },
            &wire,
        )
    }

    /// An indirect read or write of `nr_segments` segments listed in the
    /// pages `indirect_grefs` (see [`segment_page`]).
    pub fn indirect_request(
        &self,
        operation: u8,
        id: u64,
        sector: u64,
        nr_segments: u16,
        indirect_grefs: &[GrantRef],
    ) -> Vec<u8> {
        blkif::encode_indirect(
            self.protocol,
            &blkif::IndirectFields {
                indirect_op: operation,
                nr_segments,
                handle: 0,
                id,
                sector,
            },
            indirect_grefs,
        )
    }

    /// A discard request in this frontend's ABI.
    pub fn discard_request(&self, id: u64, sector: u64, nr_sectors: u64, secure: bool) -> Vec<u8> {
        blkif::encode_discard(self.protocol, id, sector, nr_sectors, secure)
    }

    /// Queues requests and publishes them, notifying the backend when the
    /// ring's rule says so. Returns how many fit.
    pub fn submit(&mut self, requests: &[Vec<u8>]) -> usize {
        let queued = requests
            .iter()
            .take_while(|r| self.ring.put_request(r))
            .count();
        if self.ring.push_requests() {
            // The backend's port is bound; an unbound one only drops it.
            let _ = self.sim.remote_send(self.domid, self.port);
        }
        queued
    }

    /// Every response published so far, in ring order.
    pub fn responses(&mut self) -> Vec<Response> {
        self.raw_responses()
            .iter()
            .filter_map(|entry| match self.protocol {
                Protocol::X86_64 => ResponseX86_64::read_from_prefix(entry)
                    .ok()
                    .map(|(r, _)| (r.id.get(), r.operation, r.status.get())),
                Protocol::X86_32 => ResponseX86_32::read_from_prefix(entry)
                    .ok()
                    .map(|(r, _)| (r.id.get(), r.operation, r.status.get())),
            })
            .map(|(id, operation, status)| Response {
                id,
                operation,
                status,
            })
            .collect()
    }

    /// Every response published so far, as the bytes of its ring entry
    /// (the response, then whatever the entry held before). Asks to be
    /// notified of the next one, as blkfront's interrupt handler does.
    pub fn raw_responses(&mut self) -> Vec<[u8; blkif::ENTRY_SIZE_X86_64]> {
        let mut out = Vec::new();
        let mut entry = [0u8; blkif::ENTRY_SIZE_X86_64];
        loop {
            while self.ring.next_response(&mut entry) {
                out.push(entry);
            }
            if !self.ring.final_check_for_responses() {
                return out;
            }
        }
    }

    /// Entries in the ring.
    pub fn ring_size(&self) -> u32 {
        self.ring.size()
    }

    /// The shared request producer, which a broken frontend may scribble on.
    fn shared_req_prod(&self) -> &AtomicU32 {
        let base = self
            .sim
            .grant_page_ptr(self.domid, self.ring_refs[0])
            .expect("the ring page stays granted");
        // SAFETY: req_prod is the first (aligned) word of the ring page,
        // which lives as long as the simulation; both ends use it atomically.
        unsafe { base.cast::<AtomicU32>().as_ref() }
    }

    /// Overwrites the shared request producer, as a broken frontend would.
    pub fn corrupt_req_prod(&self, value: u32) {
        self.shared_req_prod().store(value, Ordering::Release);
    }

    /// Moves the shared request producer by `delta` (wrapping), as a broken
    /// frontend would.
    pub fn shift_req_prod(&self, delta: u32) {
        let req_prod = self.shared_req_prod();
        let moved = req_prod.load(Ordering::Acquire).wrapping_add(delta);
        req_prod.store(moved, Ordering::Release);
    }
}

/// The contents of an indirect page listing `segs`.
pub fn segment_page(segs: &[Seg]) -> Vec<u8> {
    segs.iter()
        .flat_map(|s| s.wire().as_bytes().to_vec())
        .collect()
}

/// A `drivers::Hal` whose "physical" addresses are the simulated guest's
/// frames (mapped grants included), like the kernel's identity-mapped
/// GFN window, with heap memory for what devices (and bounce buffers)
/// allocate, at addresses of its own. Clones share the heap memory.
#[derive(Clone)]
pub struct GrantWindowHal {
    sim: Rc<SimXen>,
    /// Live DMA allocations: pages by "physical" address.
    dma: Rc<RefCell<BTreeMap<u64, usize>>>,
}

impl GrantWindowHal {
    pub fn new(sim: Rc<SimXen>) -> Self {
        GrantWindowHal {
            sim,
            dma: Rc::default(),
        }
    }

    /// Whether `len` bytes at `phys` lie in one DMA allocation (not in a
    /// grant-mapped frame): what a device behind an IOMMU that does not
    /// see grant mappings can reach.
    pub fn is_dma_memory(&self, phys: u64, len: usize) -> bool {
        let dma = self.dma.borrow();
        dma.range(..=phys)
            .next_back()
            .is_some_and(|(&start, &pages)| {
                phys.checked_add(len as u64)
                    .is_some_and(|end| end <= start + (pages * PAGE_SIZE) as u64)
            })
    }
}

/// Heap "DMA" memory lives at its own address, far above any GFN window.
const HEAP_PHYS_TAG: u64 = 1 << 63;

fn pages_layout(pages: usize) -> Option<Layout> {
    Layout::from_size_align(pages.max(1).checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` hands out zeroed, page-aligned heap memory owned by
// the caller until `dma_free`; `phys_to_virt` returns only pointers into a
// frame the simulation has mapped or into a live DMA allocation, and only
// when the range stays in it.
unsafe impl drivers::Hal for GrantWindowHal {
    fn dma_alloc(&self, pages: usize) -> Option<drivers::DmaRegion> {
        let layout = pages_layout(pages)?;
        // SAFETY: the layout has a non-zero size.
        let virt = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        let phys = virt.as_ptr() as u64 | HEAP_PHYS_TAG;
        self.dma.borrow_mut().insert(phys, pages.max(1));
        Some(drivers::DmaRegion { phys, virt, pages })
    }

    unsafe fn dma_free(&self, region: drivers::DmaRegion) {
        self.dma.borrow_mut().remove(&region.phys);
        if let Some(layout) = pages_layout(region.pages) {
            // SAFETY: the caller passes back a region from `dma_alloc`,
            // allocated with this layout.
            unsafe { dealloc(region.virt.as_ptr(), layout) };
        }
    }

    fn phys_to_virt(&self, phys: drivers::PhysAddr, len: usize) -> Option<NonNull<u8>> {
        if self.is_dma_memory(phys, len) {
            return NonNull::new((phys & !HEAP_PHYS_TAG) as *mut u8);
        }
        let offset = (phys % PAGE_SIZE as u64) as usize;
        if offset.checked_add(len)? > PAGE_SIZE {
            return None;
        }
        let page = self.sim.frame_ptr(phys / PAGE_SIZE as u64)?;
        // SAFETY: `offset < PAGE_SIZE`, inside the frame's page.
        Some(unsafe { page.add(offset) })
    }

    fn virt_to_phys(&self, _virt: NonNull<u8>) -> Option<drivers::PhysAddr> {
        None
    }

    unsafe fn map_mmio(&self, _phys: drivers::PhysAddr, _len: usize) -> Option<NonNull<u8>> {
        None
    }

    fn now_ns(&self) -> u64 {
        0
    }
}

/// The console, clock and bounce-buffer memory of the simulated driver
/// domain.
pub struct SimPlatform {
    hal: GrantWindowHal,
    /// Every line logged, in order.
    pub lines: Vec<String>,
    /// The clock; tests move it.
    pub now_ns: Cell<u64>,
    /// Bounce pages allocated and not yet given back.
    pub bounce_pages_held: usize,
}

impl SimPlatform {
    /// Bounce buffers come from `hal`'s DMA memory, which devices on it
    /// reach.
    pub fn new(hal: &GrantWindowHal) -> Self {
        SimPlatform {
            hal: hal.clone(),
            lines: Vec::new(),
            now_ns: Cell::new(0),
            bounce_pages_held: 0,
        }
    }
}

impl Platform for &mut SimPlatform {
    fn frame_address(&self, gfn: u64) -> Option<NonNull<u8>> {
        self.hal.sim.frame_ptr(gfn)
    }

    fn alloc_bounce_pages(&mut self, pages: usize) -> Option<DmaRegion> {
        use drivers::Hal;
        // DMA memory, as the kernel's frames: not stordom's heap.
        let region = not_stordom_heap(|| self.hal.dma_alloc(pages))?;
        self.bounce_pages_held += region.pages;
        Some(region)
    }

    unsafe fn free_bounce_pages(&mut self, region: DmaRegion) {
        use drivers::Hal;
        self.bounce_pages_held -= region.pages;
        // SAFETY: the caller's promise: it came from `dma_alloc` and is
        // no longer used.
        not_stordom_heap(|| unsafe { self.hal.dma_free(region) });
    }

    fn now_ns(&self) -> u64 {
        self.now_ns.get()
    }

    fn log(&mut self, line: core::fmt::Arguments<'_>) {
        // The console's memory.
        not_stordom_heap(|| self.lines.push(alloc::format!("{line}")));
    }
}

/// Runs `f`, whose allocations stand for memory that is not stordom's heap
/// (the console's, DMA frames), uncounted (the counting allocator exists in
/// this crate's own tests only, not for other crates' tests through
/// feature `sim`).
fn not_stordom_heap<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(test)]
    return crate::alloc_count::uncounted(f);
    #[cfg(not(test))]
    f()
}

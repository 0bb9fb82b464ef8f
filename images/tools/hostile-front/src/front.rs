//! One hostile frontend: the xenstore nodes of a vbd (written as libxl
//! writes them), a one-page ring of the x86-64 ABI, data grants, and the
//! checks every response must pass.
//!
//! The disk it is given is filled with a known pattern at attach
//! ([`disk_byte`]), and every write it ever sends carries that same
//! pattern for the sectors it names, so the disk's contents never change:
//! any byte a read brings back must be the pattern of the sector read, or
//! the byte the page held before.

use core::sync::atomic::{Ordering, fence};
use std::collections::HashMap;

use blkback::blkif::{self, ENTRY_SIZE_X86_64, Protocol, ResponseX86_64, WireSegment};
use xen_pv::PAGE_SIZE;
use xen_pv::ring::{SRING_HEADER_LEN, SringHeader, ring_entries};
use zerocopy::{FromBytes, IntoBytes};

use crate::dom0::{Dom0, Grant, wait_up_to};

/// What stordom serves the hostile frontend: a fresh RAM disk per vbd.
pub const HOSTILE_TARGET: &str = "ram:1M";
/// Seed of the disk pattern.
const PATTERN_SEED: u32 = 0x0405_711e;
/// What a read's page holds before the read: any other byte found there
/// afterwards came from the backend.
pub const UNTOUCHED: u8 = 0x5a;
/// Writable data pages each frontend grants at attach.
pub const DATA_PAGES: usize = 40;
/// Bytes of a 512-byte sector.
const SECTOR: usize = 512;
/// Where the frontend's nodes go, under its domain's home: not `device/`,
/// which the frontend domain's own xen-blkfront probes.
pub const FRONTEND_DIR: &str = "hostile-front/vbd";

/// The byte at `offset` of disk sector `sector`.
fn disk_byte(sector: u64, offset: usize) -> u8 {
    test_pattern::pattern_byte(PATTERN_SEED, sector as usize, offset)
}

/// The disk's pattern, computed once: checking a read compares slices.
pub struct DiskPattern {
    bytes: Vec<u8>,
    /// Sectors by their first 8 bytes, to name the sector a chunk is.
    by_prefix: HashMap<[u8; 8], Vec<u64>>,
}

impl DiskPattern {
    pub fn new(sectors: u64) -> Self {
        let mut bytes = Vec::with_capacity(sectors as usize * SECTOR);
        let mut by_prefix: HashMap<[u8; 8], Vec<u64>> = HashMap::new();
        for s in 0..sectors {
            let start = bytes.len();
            bytes.extend((0..SECTOR).map(|o| disk_byte(s, o)));
            let prefix = bytes[start..start + 8].try_into().expect("8 bytes");
            by_prefix.entry(prefix).or_default().push(s);
        }
        DiskPattern { bytes, by_prefix }
    }

    /// Sector `s`'s bytes, if the disk has it.
    pub fn sector(&self, s: u64) -> Option<&[u8]> {
        let start = usize::try_from(s).ok()?.checked_mul(SECTOR)?;
        self.bytes.get(start..start + SECTOR)
    }

    /// Whether `chunk` is some sector of the disk.
    pub fn is_some_sector(&self, chunk: &[u8]) -> bool {
        let Some(prefix) = chunk.get(..8).and_then(|p| <[u8; 8]>::try_from(p).ok()) else {
            return false;
        };
        self.by_prefix
            .get(&prefix)
            .is_some_and(|found| found.iter().any(|&s| self.sector(s) == Some(chunk)))
    }
}

/// A response as read from the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub operation: u8,
    pub status: i16,
}

/// A data segment: a grant and the sectors of its page it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub gref: u32,
    pub first_sect: u8,
    pub last_sect: u8,
}

impl Segment {
    /// All eight sectors of the page `gref`.
    pub fn whole(gref: u32) -> Self {
        Segment {
            gref,
            first_sect: 0,
            last_sect: blkif::LAST_SECTOR_IN_PAGE,
        }
    }

    fn wire(&self) -> WireSegment {
        WireSegment::new(self.gref, self.first_sect, self.last_sect)
    }
}

/// How to attach.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttachOptions {
    /// Publish `feature-persistent` = 1.
    pub persistent: bool,
    /// The ring indices' start (near `u32::MAX` to wrap soon).
    pub start: u32,
}

/// A connected (or once connected) hostile frontend. One dropped without
/// [`HostileFront::detach`] (a failed case) leaves its vbd and grants in
/// place, for the diagnosis.
pub struct HostileFront {
    pub devid: u32,
    pub backend_path: String,
    pub frontend_path: String,
    ring: Grant,
    pub port: u32,
    /// Entries in the ring.
    pub size: u32,
    pub req_prod_pvt: u32,
    pub rsp_cons: u32,
    /// Writable data pages.
    pub data: Vec<Grant>,
    /// A page granted read-only.
    pub readonly: Grant,
    /// The disk's size in 512-byte sectors.
    pub sectors: u64,
    /// Its contents.
    pub pattern: DiskPattern,
    /// Check that a response leaves the rest of its slot as the request
    /// wrote it (off while another thread rewrites the slots).
    pub check_slot_rest: bool,
    /// `feature-max-indirect-segments` (0: none).
    pub max_indirect: u16,
    /// It asked for persistent grants.
    pub persistent: bool,
    next_id: u64,
    /// What was written in each ring slot, to check that a response
    /// changed only its own 16 bytes.
    written: Vec<[u8; ENTRY_SIZE_X86_64]>,
}

/// Waits up to `secs` for `node` to read `want` (one of them).
pub fn wait_node(d: &mut dyn Dom0, node: &str, want: &[&str], secs: u32) -> Result<String, String> {
    let mut last = None;
    let found = wait_up_to(d, secs, |d| {
        last = d.xs_read(node);
        Ok(last.clone().filter(|v| want.contains(&v.as_str())))
    })?;
    found.ok_or_else(|| format!("{node} is {last:?} after {secs} s, not one of {want:?}"))
}

impl HostileFront {
    /// Creates the vbd's nodes as libxl does, then connects a ring as
    /// blkfront does, and fills the disk with the pattern.
    pub fn attach(d: &mut dyn Dom0, devid: u32, options: AttachOptions) -> Result<Self, String> {
        let (me, backend) = (d.domid(), d.backend_domid());
        let backend_path = format!("/local/domain/{backend}/backend/vbd/{me}/{devid}");
        let frontend_path = format!("/local/domain/{me}/{FRONTEND_DIR}/{devid}");
        create_nodes(d, &backend_path, &frontend_path, devid)?;
        wait_node(d, &format!("{backend_path}/state"), &["2"], 20)?;
        let max_indirect = d
            .xs_read(&format!("{backend_path}/feature-max-indirect-segments"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let ring = d.grant(false)?;
        let size = ring_entries(PAGE_SIZE, ENTRY_SIZE_X86_64);
        let port = d.alloc_port()?;
        let data = (0..DATA_PAGES)
            .map(|_| d.grant(false))
            .collect::<Result<Vec<_>, _>>()?;
        let readonly = d.grant(true)?;
        let mut front = HostileFront {
            devid,
            backend_path,
            frontend_path,
            ring,
            port,
            size,
            req_prod_pvt: options.start,
            rsp_cons: options.start,
            data,
            readonly,
            sectors: 0,
            pattern: DiskPattern::new(0),
            check_slot_rest: true,
            max_indirect,
            persistent: options.persistent,
            next_id: 1,
            written: vec![[0; ENTRY_SIZE_X86_64]; size as usize],
        };
        front.reset_ring(options.start);
        let fe = front.frontend_path.clone();
        let nodes = [
            ("ring-ref", front.ring.gref.to_string()),
            ("event-channel", port.to_string()),
            ("protocol", "x86_64-abi".to_string()),
            (
                "feature-persistent",
                u8::from(options.persistent).to_string(),
            ),
            ("state", "3".to_string()),
        ];
        for (name, value) in nodes {
            frontend_write(d, &fe, name, &value)?;
        }
        let state = format!("{}/state", front.backend_path);
        wait_node(d, &state, &["4"], 20)?;
        front.sectors = d
            .xs_read(&format!("{}/sectors", front.backend_path))
            .and_then(|v| v.parse().ok())
            .ok_or("no usable sectors node at Connected")?;
        front.pattern = DiskPattern::new(front.sectors);
        frontend_write(d, &fe, "state", "4")?;
        front.fill_disk(d)?;
        Ok(front)
    }

    /// The grant of the ring page.
    pub fn ring_gref(&self) -> u32 {
        self.ring.gref
    }

    /// Initialises the shared ring (`SHARED_RING_INIT`) with its indices
    /// at `start`, as blkfront does before it connects.
    pub fn reset_ring(&mut self, start: u32) {
        let h = self.header();
        h.req_prod.store(start, Ordering::Relaxed);
        h.rsp_prod.store(start, Ordering::Relaxed);
        h.req_event.store(start.wrapping_add(1), Ordering::Relaxed);
        h.rsp_event.store(start.wrapping_add(1), Ordering::Release);
        self.req_prod_pvt = start;
        self.rsp_cons = start;
    }

    /// The shared ring's header.
    pub fn header(&self) -> &SringHeader {
        // SAFETY: the ring page is a granted, page-aligned page this
        // frontend holds until `release`; the header's fields are atomics,
        // so sharing them with the backend is sound.
        unsafe { self.ring.page.cast::<SringHeader>().as_ref() }
    }

    fn slot(&self, index: u32) -> *mut u8 {
        let offset = SRING_HEADER_LEN + (index & (self.size - 1)) as usize * ENTRY_SIZE_X86_64;
        // SAFETY: a masked slot lies inside the ring page.
        unsafe { self.ring.page.as_ptr().add(offset) }
    }

    /// Address of a request slot's bytes (for a thread that rewrites them).
    pub fn slot_address(&self, index: u32) -> usize {
        self.slot(index) as usize
    }

    /// A fresh request id.
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Puts a request in the next slot (not yet published).
    pub fn put(&mut self, entry: &[u8]) {
        let mut bytes = [0u8; ENTRY_SIZE_X86_64];
        bytes[..entry.len()].copy_from_slice(entry);
        let slot = self.slot(self.req_prod_pvt);
        // SAFETY: the slot is ENTRY_SIZE_X86_64 bytes of the ring page.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), slot, bytes.len()) };
        self.written[(self.req_prod_pvt & (self.size - 1)) as usize] = bytes;
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }

    /// Publishes the requests put so far and notifies.
    pub fn push(&mut self, d: &mut dyn Dom0) {
        fence(Ordering::Release);
        self.header()
            .req_prod
            .store(self.req_prod_pvt, Ordering::Release);
        d.notify(self.port);
    }

    /// Overwrites what a frontend may scribble on in the ring's header
    /// without losing its own requests: `req_event` (the backend's to
    /// write), `rsp_event` and the padding. The backend must go on from
    /// its own indices, and this frontend polls rather than waits for a
    /// notification.
    pub fn scribble_header(&mut self, req_event: u32, rsp_event: u32, pad: &[u8]) {
        let h = self.header();
        h.req_event.store(req_event, Ordering::Relaxed);
        h.rsp_event.store(rsp_event, Ordering::Release);
        let n = pad.len().min(SRING_HEADER_LEN - 16);
        // SAFETY: bytes 16..64 of the ring page are the header's padding,
        // inside the granted page this frontend holds until `release`.
        unsafe {
            core::ptr::copy_nonoverlapping(pad.as_ptr(), self.ring.page.as_ptr().add(16), n);
        }
    }

    /// Writes `req_prod` as a broken frontend would, and notifies.
    pub fn force_req_prod(&mut self, d: &mut dyn Dom0, value: u32) {
        self.header().req_prod.store(value, Ordering::Release);
        d.notify(self.port);
    }

    /// The responses published since the last call, each checked: its
    /// padding zero and the rest of its slot as the request left it (no
    /// byte of other memory, XSA-216).
    pub fn take_responses(&mut self) -> Result<Vec<Response>, String> {
        let rsp_prod = self.header().rsp_prod.load(Ordering::Acquire);
        let ahead = rsp_prod.wrapping_sub(self.rsp_cons);
        if ahead > self.size {
            return Err(format!(
                "rsp_prod {rsp_prod} runs {ahead} ahead of the frontend's {}",
                self.rsp_cons
            ));
        }
        let mut responses = Vec::new();
        while self.rsp_cons != rsp_prod {
            let mut bytes = [0u8; ENTRY_SIZE_X86_64];
            // SAFETY: the slot is ENTRY_SIZE_X86_64 bytes of the ring page.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    self.slot(self.rsp_cons),
                    bytes.as_mut_ptr(),
                    bytes.len(),
                )
            };
            let (rsp, rest) = ResponseX86_64::read_from_prefix(&bytes).expect("slot is larger");
            let slot = (self.rsp_cons & (self.size - 1)) as usize;
            let left = &self.written[slot][bytes.len() - rest.len()..];
            let rest_changed = self.check_slot_rest && rest != left;
            if rsp._pad1 != 0 || rsp._pad2 != [0; 4] || rest_changed {
                return Err(format!(
                    "response in slot {slot} carries foreign bytes: {:02x?}",
                    &bytes[..]
                ));
            }
            responses.push(Response {
                id: rsp.id.get(),
                operation: rsp.operation,
                status: rsp.status.get(),
            });
            self.rsp_cons = self.rsp_cons.wrapping_add(1);
        }
        self.header()
            .rsp_event
            .store(self.rsp_cons.wrapping_add(1), Ordering::Release);
        Ok(responses)
    }

    /// Collects responses until `count` arrived or `secs` passed.
    pub fn await_responses(
        &mut self,
        d: &mut dyn Dom0,
        count: usize,
        secs: u32,
    ) -> Result<Vec<Response>, String> {
        let mut got = Vec::new();
        wait_up_to(d, secs, |_| {
            got.extend(self.take_responses()?);
            Ok((got.len() >= count).then_some(()))
        })?;
        Ok(got)
    }

    /// Puts, pushes and waits for the answers of `entries` (by id order of
    /// arrival), failing when one is missing after 10 s.
    pub fn exchange(
        &mut self,
        d: &mut dyn Dom0,
        entries: &[Vec<u8>],
    ) -> Result<Vec<Response>, String> {
        for e in entries {
            self.put(e);
        }
        self.push(d);
        let got = self.await_responses(d, entries.len(), 10)?;
        if got.len() != entries.len() {
            return Err(format!(
                "{} of {} requests answered within 10 s",
                got.len(),
                entries.len()
            ));
        }
        Ok(got)
    }

    /// A direct request (any operation) of `nr_segments` (whatever
    /// `segs` holds) at `sector`, and its id.
    pub fn rw_request(
        &mut self,
        op: u8,
        sector: u64,
        nr_segments: u8,
        segs: &[Segment],
    ) -> (u64, Vec<u8>) {
        let id = self.id();
        let fields = blkif::ReadWriteFields {
            operation: op,
            nr_segments,
            handle: self.devid as u16,
            id,
            sector,
        };
        let wire: Vec<WireSegment> = segs.iter().map(Segment::wire).collect();
        (
            id,
            blkif::encode_read_write(Protocol::X86_64, &fields, &wire),
        )
    }

    /// An indirect request of `nr_segments` listed in the pages `pages`,
    /// and its id.
    pub fn indirect_request(
        &mut self,
        op: u8,
        sector: u64,
        nr_segments: u16,
        pages: &[u32],
    ) -> (u64, Vec<u8>) {
        let id = self.id();
        let fields = blkif::IndirectFields {
            indirect_op: op,
            nr_segments,
            handle: self.devid as u16,
            id,
            sector,
        };
        (id, blkif::encode_indirect(Protocol::X86_64, &fields, pages))
    }

    /// A discard of `nr_sectors` at `sector`, and its id.
    pub fn discard_request(&mut self, sector: u64, nr_sectors: u64) -> (u64, Vec<u8>) {
        let id = self.id();
        (
            id,
            blkif::encode_discard(Protocol::X86_64, id, sector, nr_sectors, false),
        )
    }

    /// Writes `segs` as an indirect page into the page of `gref`.
    pub fn write_indirect_page(&self, gref: u32, segs: &[Segment]) {
        self.with_page(gref, |page| {
            page.fill(0);
            for (slot, s) in page.chunks_mut(8).zip(segs) {
                slot.copy_from_slice(s.wire().as_bytes());
            }
        });
    }

    /// Lets `f` change the page of one of this frontend's grants (nothing
    /// happens for other grants).
    pub fn with_page(&self, gref: u32, f: impl FnOnce(&mut [u8])) {
        if let Some(grant) = self.grant_of(gref) {
            // SAFETY: a page this frontend granted and still holds; the
            // backend reads or writes it only while a request names it,
            // and nothing here runs while one does.
            f(unsafe { core::slice::from_raw_parts_mut(grant.page.as_ptr(), PAGE_SIZE) });
        }
    }

    fn grant_of(&self, gref: u32) -> Option<&Grant> {
        self.data
            .iter()
            .chain([&self.readonly])
            .find(|g| g.gref == gref)
    }

    /// Writes the pattern over the whole disk, 11 pages a request.
    fn fill_disk(&mut self, d: &mut dyn Dom0) -> Result<(), String> {
        let per_request = blkif::MAX_SEGMENTS_PER_REQUEST as u64 * 8;
        let mut sector = 0;
        while sector < self.sectors {
            let count = per_request.min(self.sectors - sector);
            let pages = count.div_ceil(8) as usize;
            let segs: Vec<Segment> = (0..pages)
                .map(|i| Segment {
                    gref: self.data[i].gref,
                    first_sect: 0,
                    last_sect: ((count - i as u64 * 8).min(8) - 1) as u8,
                })
                .collect();
            self.prepare_write(sector, &segs);
            let (_, e) = self.rw_request(blkif::OP_WRITE, sector, pages as u8, &segs);
            let got = self.exchange(d, &[e])?;
            if got[0].status != blkif::RSP_OKAY {
                return Err(format!("filling the disk at sector {sector}: {got:?}"));
            }
            sector += count;
        }
        Ok(())
    }

    /// The page of one of this frontend's grants, to read.
    fn page_of(&self, gref: u32) -> Option<&[u8]> {
        let grant = self.grant_of(gref)?;
        // SAFETY: as in `with_page`; the answer to the request that named
        // it came before any check reads it.
        Some(unsafe { core::slice::from_raw_parts(grant.page.as_ptr(), PAGE_SIZE) })
    }

    /// Fills the pages of a write of `segs` at `sector` with the disk's
    /// own pattern, so that it changes nothing (pages not of this
    /// frontend are skipped; so are sectors past the disk, which the
    /// backend refuses anyway).
    pub fn prepare_write(&self, sector: u64, segs: &[Segment]) {
        for (s, at) in segs.iter().zip(segment_sectors(sector, segs)) {
            self.with_page(s.gref, |page| {
                for (k, chunk) in page.chunks_mut(SECTOR).enumerate() {
                    let bytes = covered_sector(s, at, k).and_then(|d| self.pattern.sector(d));
                    match bytes {
                        Some(bytes) => chunk.copy_from_slice(bytes),
                        None => chunk.fill(UNTOUCHED),
                    }
                }
            });
        }
    }

    /// Marks the pages of a read as untouched.
    pub fn prepare_read(&self, segs: &[Segment]) {
        for s in segs {
            self.with_page(s.gref, |page| page.fill(UNTOUCHED));
        }
    }

    /// Checks the pages of a read of `segs` at `sector`. `Some(okay)`:
    /// the read was as sent, and succeeded or not: every 512-byte piece
    /// of a page is untouched or the pattern of the sector it stands for,
    /// and when it succeeded, every piece a segment covers is. `None`: the
    /// request may have been changed under the backend: every piece is
    /// untouched or some sector of the disk. Either way no byte of other
    /// memory reached the page.
    pub fn check_read(
        &self,
        sector: u64,
        segs: &[Segment],
        okay: Option<bool>,
    ) -> Result<(), String> {
        for (n, (s, at)) in segs.iter().zip(segment_sectors(sector, segs)).enumerate() {
            let Some(page) = self.page_of(s.gref) else {
                continue;
            };
            for (k, chunk) in page.chunks(SECTOR).enumerate() {
                let untouched = chunk.iter().all(|&b| b == UNTOUCHED);
                let expected = covered_sector(s, at, k).and_then(|d| self.pattern.sector(d));
                let fine = match okay {
                    Some(true) if expected.is_some() => Some(chunk) == expected,
                    Some(_) => untouched || (expected.is_some() && Some(chunk) == expected),
                    None => untouched || self.pattern.is_some_sector(chunk),
                };
                if !fine {
                    return Err(format!(
                        "read of sector {sector}, segment {n} ({s:?}): bytes {}..{} of the page \
                         are neither untouched nor the disk's (read okay: {okay:?}): {:02x?}...",
                        k * SECTOR,
                        (k + 1) * SECTOR,
                        &chunk[..16]
                    ));
                }
            }
        }
        Ok(())
    }

    /// A read of `pages` whole pages at `sector` that must succeed with
    /// the pattern: the frontend and its backend still work.
    pub fn good_read(&mut self, d: &mut dyn Dom0, sector: u64, pages: usize) -> Result<(), String> {
        let segs: Vec<Segment> = self.data[..pages]
            .iter()
            .map(|g| Segment::whole(g.gref))
            .collect();
        self.prepare_read(&segs);
        let (id, e) = self.rw_request(blkif::OP_READ, sector, pages as u8, &segs);
        let got = self.exchange(d, &[e])?;
        let want = Response {
            id,
            operation: blkif::OP_READ,
            status: blkif::RSP_OKAY,
        };
        if got[0] != want {
            return Err(format!("a good read got {:?}", got[0]));
        }
        self.check_read(sector, &segs, Some(true))
    }

    /// The backend's state node.
    pub fn backend_state(&self, d: &mut dyn Dom0) -> Option<String> {
        d.xs_read(&format!("{}/state", self.backend_path))
    }

    /// Closes as a frontend going away does, has the toolstack detach
    /// the vbd, and waits until the backend removed its directory; then
    /// ends every grant.
    pub fn detach(self, d: &mut dyn Dom0) -> Result<(), String> {
        let fe = self.frontend_path.clone();
        let closed = frontend_write(d, &fe, "state", "6").and_then(|()| {
            wait_node(d, &format!("{}/state", self.backend_path), &["6"], 20).map(|_| ())
        });
        let removed = remove_vbd(d, &self.backend_path, &fe);
        self.release(d);
        closed.and(removed)
    }

    /// Ends the grants and the port without any xenstore step.
    pub fn release(self, d: &mut dyn Dom0) {
        d.close_port(self.port);
        d.revoke(self.ring);
        d.revoke(self.readonly);
        for g in self.data {
            d.revoke(g);
        }
    }
}

/// `online` = 0 and the frontend's directory removed, as `xl
/// block-detach` and a destroyed guest leave them; waits up to 20 s for
/// the backend directory to go.
pub fn remove_vbd(d: &mut dyn Dom0, backend_path: &str, frontend_path: &str) -> Result<(), String> {
    d.xs_write(&format!("{backend_path}/online"), "0")?;
    d.xs_rm(frontend_path);
    let gone = wait_up_to(d, 20, |d| {
        Ok(d.xs_read(backend_path).is_none().then_some(()))
    })?;
    gone.ok_or_else(|| format!("{backend_path} still there 20 s after the detach"))
}

/// The disk sector that piece `k` of a segment's page stands for, when
/// the segment covers it (`at`: the disk sector of the segment's first).
fn covered_sector(s: &Segment, at: u64, k: usize) -> Option<u64> {
    let k = u8::try_from(k).ok()?;
    (s.first_sect..=s.last_sect)
        .contains(&k)
        .then(|| at.wrapping_add(u64::from(k - s.first_sect)))
}

/// The disk sector each segment starts at.
fn segment_sectors(sector: u64, segs: &[Segment]) -> Vec<u64> {
    let mut at = sector;
    segs.iter()
        .map(|s| {
            let start = at;
            at = at.wrapping_add(u64::from(s.last_sect.wrapping_sub(s.first_sect)) + 1);
            start
        })
        .collect()
}

/// A frontend node, readable by the backend.
pub fn frontend_write(d: &mut dyn Dom0, dir: &str, name: &str, value: &str) -> Result<(), String> {
    let path = format!("{dir}/{name}");
    d.xs_write(&path, value)?;
    let (me, backend) = (d.domid(), d.backend_domid());
    d.xs_set_perms(&path, me, backend)
}

/// The backend and frontend directories, their nodes and permissions as
/// libxl creates them for `xl block-attach` with `backend=<driver domain>`:
/// the backend's nodes owned by the backend domain, readable by the
/// frontend; the frontend's owned by the frontend, readable by the backend.
fn create_nodes(d: &mut dyn Dom0, be: &str, fe: &str, devid: u32) -> Result<(), String> {
    let (me, backend) = (d.domid(), d.backend_domid());
    let parent = be.rsplit_once('/').map_or(be, |(p, _)| p);
    if d.xs_read(parent).is_none() {
        d.xs_write(parent, "")?;
        d.xs_set_perms(parent, 0, backend)?;
    }
    frontend_write(d, fe, "backend", be)?;
    d.xs_set_perms(fe, me, backend)?;
    let front_nodes = [
        ("backend-id", backend.to_string()),
        ("virtual-device", devid.to_string()),
        ("device-type", "disk".to_string()),
        ("state", "1".to_string()),
    ];
    for (name, value) in front_nodes {
        frontend_write(d, fe, name, &value)?;
    }
    // `state` first; `frontend` and `params` last: stordom opens the vbd
    // as soon as those two exist, reading the others then.
    let back_nodes = [
        ("state", "1".to_string()),
        ("frontend-id", me.to_string()),
        ("online", "1".to_string()),
        ("removable", "0".to_string()),
        ("bootable", "1".to_string()),
        ("dev", "xvdz".to_string()),
        ("type", "phy".to_string()),
        ("mode", "w".to_string()),
        ("device-type", "disk".to_string()),
        ("discard-enable", "1".to_string()),
        ("frontend", fe.to_string()),
        ("params", d.target().to_string()),
    ];
    d.xs_write(be, "")?;
    d.xs_set_perms(be, backend, me)?;
    for (name, value) in back_nodes {
        let path = format!("{be}/{name}");
        d.xs_write(&path, &value)?;
        d.xs_set_perms(&path, backend, me)?;
    }
    Ok(())
}

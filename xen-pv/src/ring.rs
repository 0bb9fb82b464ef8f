//! Shared rings: the byte rings of xenstore and the console, and the
//! request/response rings of io/ring.h (blkif and friends).
//!
//! Indices are free-running `u32`s compared with wrapping arithmetic; the
//! peer writes some of them, so every difference is bounded before use.

use alloc::vec::Vec;
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU8, AtomicU32, Ordering, fence};

use crate::PAGE_SIZE;

/// The peer broke a ring invariant; the ring must be abandoned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The producer claims more unread entries than the ring holds.
    Overflow,
}

/// The peer gave up waiting (or the wait was bounded and ran out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimedOut;

/// The event channel of a shared ring, as the code driving the ring needs
/// it. The kernel implements it with an event channel port: `notify` sends
/// on it, `wait` halts until its handler ran (or a deadline passed).
pub trait PeerChannel {
    /// Signals the peer: there is new data, or space was freed.
    fn notify(&mut self);
    /// Waits until the peer may have made progress.
    fn wait(&mut self) -> Result<(), TimedOut>;
    /// Waits as [`Self::wait`] does, calling `work` (the caller's other
    /// duties, a bounded share per call; true if it did something) while
    /// the peer is silent rather than only sleeping. By default `work`
    /// runs once before the wait: a channel whose wait is where time
    /// passes (the simulations) needs no more.
    fn wait_working(&mut self, work: &mut dyn FnMut() -> bool) -> Result<(), TimedOut> {
        work();
        self.wait()
    }
}

/// One direction of a byte ring (`xenstore_domain_interface`,
/// `xencons_interface`): `data` of power-of-two size, producer index
/// `prod`, consumer index `cons`.
pub struct ByteRing<'a> {
    data: &'a [AtomicU8],
    cons: &'a AtomicU32,
    prod: &'a AtomicU32,
}

impl<'a> ByteRing<'a> {
    /// `data.len()` must be a power of two (all Xen byte rings are).
    pub fn new(data: &'a [AtomicU8], cons: &'a AtomicU32, prod: &'a AtomicU32) -> Self {
        debug_assert!(data.len().is_power_of_two());
        ByteRing { data, cons, prod }
    }

    fn used(&self) -> Result<(u32, u32, usize), RingError> {
        let cons = self.cons.load(Ordering::Acquire);
        let prod = self.prod.load(Ordering::Acquire);
        let used = prod.wrapping_sub(cons) as usize;
        if used > self.data.len() {
            return Err(RingError::Overflow);
        }
        Ok((cons, prod, used))
    }

    fn slot(&self, index: u32) -> &AtomicU8 {
        &self.data[index as usize & (self.data.len() - 1)]
    }

    /// Producer side: copies as much of `bytes` as fits; returns how much.
    pub fn write(&self, bytes: &[u8]) -> Result<usize, RingError> {
        let (_, prod, used) = self.used()?;
        let n = bytes.len().min(self.data.len() - used);
        for (i, b) in bytes[..n].iter().enumerate() {
            self.slot(prod.wrapping_add(i as u32))
                .store(*b, Ordering::Relaxed);
        }
        // Release: the bytes are visible before the new index.
        self.prod
            .store(prod.wrapping_add(n as u32), Ordering::Release);
        Ok(n)
    }

    /// Consumer side: copies up to `buf.len()` available bytes; returns how
    /// many.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, RingError> {
        let (cons, _, used) = self.used()?;
        let n = buf.len().min(used);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = self
                .slot(cons.wrapping_add(i as u32))
                .load(Ordering::Relaxed);
        }
        // Release: the bytes are read before the space is handed back.
        self.cons
            .store(cons.wrapping_add(n as u32), Ordering::Release);
        Ok(n)
    }

    /// Bytes that can be written now.
    pub fn writable(&self) -> Result<usize, RingError> {
        self.used().map(|(_, _, used)| self.data.len() - used)
    }

    /// Bytes waiting to be read.
    pub fn readable(&self) -> Result<usize, RingError> {
        self.used().map(|(_, _, used)| used)
    }
}

/// `struct xxx_sring` header: four indices, padded to 64 bytes.
#[repr(C)]
pub struct SringHeader {
    pub req_prod: AtomicU32,
    pub req_event: AtomicU32,
    pub rsp_prod: AtomicU32,
    pub rsp_event: AtomicU32,
    _pad: [u8; 48],
}

/// Bytes before the first ring entry.
pub const SRING_HEADER_LEN: usize = 64;

/// Entries in a shared ring of `ring_bytes` (`__RING_SIZE`): the largest
/// power of two that fits after the header.
pub const fn ring_entries(ring_bytes: usize, entry_size: usize) -> u32 {
    let fit = ring_bytes.saturating_sub(SRING_HEADER_LEN) / entry_size;
    if fit == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - fit.leading_zeros())
    }
}

/// The shared page(s) of an io/ring.h ring: header and entry slots. The
/// pages need not be contiguous in this domain: an entry that straddles
/// two pages is gathered byte by byte.
struct SharedRing<'a> {
    pages: Vec<NonNull<u8>>,
    entries: u32,
    entry_size: usize,
    _memory: PhantomData<&'a SringHeader>,
}

impl SharedRing<'_> {
    /// # Safety
    /// `base` points to `ring_bytes` bytes, 8-byte aligned, mapped for the
    /// ring's lifetime and accessed only through ring protocol operations.
    unsafe fn new(base: NonNull<u8>, ring_bytes: usize, entry_size: usize) -> Self {
        let pages = (0..ring_bytes.div_ceil(PAGE_SIZE))
            // SAFETY: every page start lies inside the caller's memory.
            .map(|page| unsafe { base.add(page * PAGE_SIZE) })
            .collect();
        SharedRing {
            pages,
            entries: ring_entries(ring_bytes, entry_size),
            entry_size,
            _memory: PhantomData,
        }
    }

    /// # Safety
    /// `pages` is not empty; each points to a page, the first 8-byte
    /// aligned, mapped for the ring's lifetime and accessed only through
    /// ring protocol operations.
    unsafe fn from_pages(pages: &[NonNull<u8>], entry_size: usize) -> Self {
        SharedRing {
            pages: pages.to_vec(),
            entries: ring_entries(pages.len() * PAGE_SIZE, entry_size),
            entry_size,
            _memory: PhantomData,
        }
    }

    fn header(&self) -> &SringHeader {
        // SAFETY: the constructors' contract: the first page starts with
        // an aligned header whose fields are atomics, so sharing it with
        // the peer is sound.
        unsafe { self.pages[0].cast::<SringHeader>().as_ref() }
    }

    /// The byte at `offset` into the ring; `offset` is below the ring's
    /// size (a slot of a masked index), so its page exists.
    fn byte(&self, offset: usize) -> *mut u8 {
        let page = self.pages[offset / PAGE_SIZE];
        // SAFETY: `offset % PAGE_SIZE` stays inside that page.
        unsafe { page.as_ptr().add(offset % PAGE_SIZE) }
    }

    fn slot_offset(&self, index: u32) -> usize {
        SRING_HEADER_LEN + (index & (self.entries - 1)) as usize * self.entry_size
    }

    /// Calls `piece` with each page's share of the `len` bytes at
    /// `offset` into the ring (the offset into those bytes, where they
    /// are, how many).
    fn in_pages(&self, offset: usize, len: usize, mut piece: impl FnMut(usize, *mut u8, usize)) {
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let n = (PAGE_SIZE - at % PAGE_SIZE).min(len - done);
            piece(done, self.byte(at), n);
            done += n;
        }
    }

    /// Copies the entry at `index` out (volatile: the peer may write it at
    /// any time; the copy is what gets validated, never the slot).
    fn read(&self, index: u32, out: &mut [u8]) {
        let len = out.len().min(self.entry_size);
        self.in_pages(self.slot_offset(index), len, |done, at, n| {
            // SAFETY: the piece is `n` bytes of the slot inside one page
            // of ring memory.
            unsafe { copy_from_shared(at, &mut out[done..done + n]) };
        });
    }

    /// Copies the entry at `*index` out and moves `*index` past it, when
    /// `waiting` (already bounded by the caller) is not zero.
    fn take(&self, index: &mut u32, waiting: u32, out: &mut [u8]) -> bool {
        if waiting == 0 {
            return false;
        }
        self.read(*index, out);
        *index = index.wrapping_add(1);
        true
    }

    fn write(&self, index: u32, bytes: &[u8]) {
        let len = bytes.len().min(self.entry_size);
        self.in_pages(self.slot_offset(index), len, |done, at, n| {
            // SAFETY: as in `read`.
            unsafe { copy_to_shared(&bytes[done..done + n], at) };
        });
    }
}

/// Copies `out.len()` bytes from `src`, memory the peer may write at any
/// time: volatile loads, aligned 8-byte words where they fit (a byte at a
/// time costs eight loads where one would do, which QEMU's TCG feels).
///
/// # Safety
/// `out.len()` bytes are readable at `src`.
pub unsafe fn copy_from_shared(src: *const u8, out: &mut [u8]) {
    let mut i = 0;
    while i < out.len() {
        let at = src.wrapping_add(i);
        if (at as usize).is_multiple_of(8) && out.len() - i >= 8 {
            // SAFETY: aligned, and 8 of the caller's bytes are left.
            let word = unsafe { at.cast::<u64>().read_volatile() };
            out[i..i + 8].copy_from_slice(&word.to_ne_bytes());
            i += 8;
        } else {
            // SAFETY: one of the caller's bytes.
            out[i] = unsafe { at.read_volatile() };
            i += 1;
        }
    }
}

/// Copies `bytes` to `dst`, memory the peer may read at any time, as
/// [`copy_from_shared`] reads.
///
/// # Safety
/// `bytes.len()` bytes are writable at `dst`.
pub unsafe fn copy_to_shared(bytes: &[u8], dst: *mut u8) {
    let mut i = 0;
    while i < bytes.len() {
        let at = dst.wrapping_add(i);
        if (at as usize).is_multiple_of(8) && bytes.len() - i >= 8 {
            let mut word = [0; 8];
            word.copy_from_slice(&bytes[i..i + 8]);
            // SAFETY: aligned, and 8 of the caller's bytes are left.
            unsafe { at.cast::<u64>().write_volatile(u64::from_ne_bytes(word)) };
            i += 8;
        } else {
            // SAFETY: one of the caller's bytes.
            unsafe { at.write_volatile(bytes[i]) };
            i += 1;
        }
    }
}

/// Whether a producer moving its index from `old` to `new` must notify a
/// consumer that asked to be woken at `event` (`RING_PUSH_*_AND_CHECK_NOTIFY`).
pub fn needs_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// Moves a shared producer index to `new` and applies the notify rule
/// against the consumer's `event` index.
fn publish(prod: &AtomicU32, new: u32, event: &AtomicU32) -> bool {
    let old = prod.load(Ordering::Relaxed);
    prod.store(new, Ordering::Release);
    // The index store must be visible before reading the event index (mb()).
    fence(Ordering::SeqCst);
    needs_notify(old, new, event.load(Ordering::Acquire))
}

/// A snapshot of a ring's indices (free-running, wrapping counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingIndices {
    /// Requests the frontend published.
    pub req_prod: u32,
    /// Where the frontend asked to be notified of the next request.
    pub req_event: u32,
    /// Responses the backend published.
    pub rsp_prod: u32,
    /// Where the frontend asked to be notified of the next response.
    pub rsp_event: u32,
    /// Requests the backend took (private to the backend).
    pub req_cons: u32,
}

/// The backend's private view of a ring: consumes requests, produces
/// responses.
pub struct BackRing<'a> {
    ring: SharedRing<'a>,
    req_cons: u32,
    rsp_prod_pvt: u32,
}

impl<'a> BackRing<'a> {
    /// Attaches to a ring the frontend initialised (`BACK_RING_ATTACH`).
    ///
    /// # Safety
    /// `base` points to `ring_bytes` bytes of ring memory (8-byte aligned)
    /// that stay mapped for `'a` and that this side touches only through the
    /// returned value.
    pub unsafe fn attach(base: NonNull<u8>, ring_bytes: usize, entry_size: usize) -> Self {
        // SAFETY: passed on from the caller.
        let ring = unsafe { SharedRing::new(base, ring_bytes, entry_size) };
        let rsp_prod = ring.header().rsp_prod.load(Ordering::Acquire);
        BackRing {
            ring,
            req_cons: rsp_prod,
            rsp_prod_pvt: rsp_prod,
        }
    }

    /// Attaches to a ring the frontend initialised over several granted
    /// pages (`ring-page-order`), mapped wherever they are.
    ///
    /// # Safety
    /// `pages` is not empty; each points to a page of ring memory, in ring
    /// order, the first 8-byte aligned, that stay mapped for `'a` and that
    /// this side touches only through the returned value.
    pub unsafe fn attach_pages(pages: &[NonNull<u8>], entry_size: usize) -> Self {
        // SAFETY: passed on from the caller.
        let ring = unsafe { SharedRing::from_pages(pages, entry_size) };
        let rsp_prod = ring.header().rsp_prod.load(Ordering::Acquire);
        BackRing {
            ring,
            req_cons: rsp_prod,
            rsp_prod_pvt: rsp_prod,
        }
    }

    /// Number of entries.
    pub fn size(&self) -> u32 {
        self.ring.entries
    }

    /// The index the next request is taken from.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// The index the next response is put at.
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// The ring's indices as they are now, for operators: the shared ones
    /// as the frontend left them (reported, never trusted) and ours.
    pub fn indices(&self) -> RingIndices {
        let header = self.ring.header();
        RingIndices {
            req_prod: header.req_prod.load(Ordering::Relaxed),
            req_event: header.req_event.load(Ordering::Relaxed),
            rsp_prod: header.rsp_prod.load(Ordering::Relaxed),
            rsp_event: header.rsp_event.load(Ordering::Relaxed),
            req_cons: self.req_cons,
        }
    }

    /// Requests ready to consume (`RING_HAS_UNCONSUMED_REQUESTS`), after
    /// checking the frontend's index against the ring size.
    pub fn unconsumed_requests(&self) -> Result<u32, RingError> {
        let req_prod = self.ring.header().req_prod.load(Ordering::Acquire);
        if req_prod.wrapping_sub(self.rsp_prod_pvt) > self.size() {
            return Err(RingError::Overflow);
        }
        let requests = req_prod.wrapping_sub(self.req_cons);
        let space = self.size() - self.req_cons.wrapping_sub(self.rsp_prod_pvt);
        Ok(requests.min(space))
    }

    /// Copies the next request into `out` (at most one entry) and consumes
    /// it; `Ok(false)` when there is none.
    pub fn next_request(&mut self, out: &mut [u8]) -> Result<bool, RingError> {
        let waiting = self.unconsumed_requests()?;
        Ok(self.ring.take(&mut self.req_cons, waiting, out))
    }

    /// Queues a response privately; [`Self::push_responses`] publishes it.
    pub fn put_response(&mut self, bytes: &[u8]) {
        self.ring.write(self.rsp_prod_pvt, bytes);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// Publishes queued responses; true if the frontend must be notified.
    pub fn push_responses(&mut self) -> bool {
        let header = self.ring.header();
        publish(&header.rsp_prod, self.rsp_prod_pvt, &header.rsp_event)
    }

    /// Before idling: asks to be notified of the next request and re-checks
    /// so a request that raced with that is not missed.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_requests()? > 0 {
            return Ok(true);
        }
        let header = self.ring.header();
        header
            .req_event
            .store(self.req_cons.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_requests()? > 0)
    }
}

/// The frontend's private view: produces requests, consumes responses.
/// stordom is a backend; this side drives its tests and simulated guests.
pub struct FrontRing<'a> {
    ring: SharedRing<'a>,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl<'a> FrontRing<'a> {
    /// Initialises the shared ring (`SHARED_RING_INIT` + `FRONT_RING_INIT`)
    /// with all indices at `start` (0 in practice; tests start near wrap).
    ///
    /// # Safety
    /// As [`BackRing::attach`].
    pub unsafe fn init(
        base: NonNull<u8>,
        ring_bytes: usize,
        entry_size: usize,
        start: u32,
    ) -> Self {
        // SAFETY: passed on from the caller.
        let ring = unsafe { SharedRing::new(base, ring_bytes, entry_size) };
        Self::start(ring, start)
    }

    /// As [`Self::init`], over pages that need not be contiguous.
    ///
    /// # Safety
    /// As [`BackRing::attach_pages`].
    pub unsafe fn init_pages(pages: &[NonNull<u8>], entry_size: usize, start: u32) -> Self {
        // SAFETY: passed on from the caller.
        let ring = unsafe { SharedRing::from_pages(pages, entry_size) };
        Self::start(ring, start)
    }

    fn start(ring: SharedRing<'a>, start: u32) -> Self {
        let h = ring.header();
        h.req_prod.store(start, Ordering::Relaxed);
        h.rsp_prod.store(start, Ordering::Relaxed);
        h.req_event.store(start.wrapping_add(1), Ordering::Relaxed);
        h.rsp_event.store(start.wrapping_add(1), Ordering::Release);
        FrontRing {
            ring,
            req_prod_pvt: start,
            rsp_cons: start,
        }
    }

    /// Number of entries.
    pub fn size(&self) -> u32 {
        self.ring.entries
    }

    /// The index the next request is put at.
    pub fn req_prod_pvt(&self) -> u32 {
        self.req_prod_pvt
    }

    /// The index the next response is taken from.
    pub fn rsp_cons(&self) -> u32 {
        self.rsp_cons
    }

    /// Free request slots.
    pub fn free_requests(&self) -> u32 {
        self.ring.entries - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Queues a request privately; false if the ring is full.
    pub fn put_request(&mut self, bytes: &[u8]) -> bool {
        if self.free_requests() == 0 {
            return false;
        }
        self.ring.write(self.req_prod_pvt, bytes);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        true
    }

    /// Publishes queued requests; true if the backend must be notified.
    pub fn push_requests(&mut self) -> bool {
        let header = self.ring.header();
        publish(&header.req_prod, self.req_prod_pvt, &header.req_event)
    }

    /// Responses ready to consume, after checking the backend's index: a
    /// backend may answer only requests that were published, so one
    /// claiming more is broken or hostile (the slots past them hold our
    /// own requests, not answers).
    pub fn unconsumed_responses(&self) -> Result<u32, RingError> {
        let rsp_prod = self.ring.header().rsp_prod.load(Ordering::Acquire);
        let responses = rsp_prod.wrapping_sub(self.rsp_cons);
        if responses > self.req_prod_pvt.wrapping_sub(self.rsp_cons) {
            return Err(RingError::Overflow);
        }
        Ok(responses)
    }

    /// As [`Self::next_response`], for a frontend facing an untrusted
    /// backend: refuses a response index beyond the requests published.
    pub fn next_checked_response(&mut self, out: &mut [u8]) -> Result<bool, RingError> {
        let waiting = self.unconsumed_responses()?;
        Ok(self.ring.take(&mut self.rsp_cons, waiting, out))
    }

    /// Copies the next response into `out`; false if there is none.
    pub fn next_response(&mut self, out: &mut [u8]) -> bool {
        let rsp_prod = self.ring.header().rsp_prod.load(Ordering::Acquire);
        let waiting = rsp_prod.wrapping_sub(self.rsp_cons);
        self.ring.take(&mut self.rsp_cons, waiting, out)
    }

    /// Asks to be notified of the next response (`RING_FINAL_CHECK_FOR_RESPONSES`).
    pub fn final_check_for_responses(&mut self) -> bool {
        let header = self.ring.header();
        if header.rsp_prod.load(Ordering::Acquire) != self.rsp_cons {
            return true;
        }
        header
            .rsp_event
            .store(self.rsp_cons.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        header.rsp_prod.load(Ordering::Acquire) != self.rsp_cons
    }

    /// Test hook: overwrites the shared response producer as a broken or
    /// malicious backend would.
    #[cfg(test)]
    fn corrupt_rsp_prod(&self, value: u32) {
        self.ring.header().rsp_prod.store(value, Ordering::Release);
    }

    /// Test hook: overwrites the shared request producer as a broken or
    /// malicious frontend would.
    #[cfg(test)]
    fn corrupt_req_prod(&self, value: u32) {
        self.ring.header().req_prod.store(value, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use core::mem::size_of;

    #[test]
    fn header_and_entry_count_match_ring_h() {
        assert_eq!(size_of::<SringHeader>(), SRING_HEADER_LEN);
        // blkif: 112-byte entries in one page give 32 slots (36 fit).
        assert_eq!(ring_entries(4096, 112), 32);
        assert_eq!(ring_entries(4096, 108), 32);
        assert_eq!(ring_entries(4096 * 16, 112), 512);
        assert_eq!(ring_entries(64 + 10, 16), 0);
    }

    #[test]
    fn shared_copies_move_every_length_at_every_alignment() {
        let source: Vec<u8> = (0..64u8).map(|b| b.wrapping_mul(37) ^ 0x5a).collect();
        for at in 0..9 {
            for len in 0..40 {
                let mut out = vec![0xee; len + 2];
                // SAFETY: `at + len` < 64: inside `source`.
                unsafe { copy_from_shared(source[at..].as_ptr(), &mut out[1..=len]) };
                assert_eq!(&out[1..=len], &source[at..at + len], "read {len} at {at}");
                assert_eq!((out[0], out[len + 1]), (0xee, 0xee));
                let mut shared = [0xee_u8; 64];
                // SAFETY: `at + len` < 64: inside `shared`.
                unsafe { copy_to_shared(&source[..len], shared[at..].as_mut_ptr()) };
                assert_eq!(&shared[at..at + len], &source[..len], "write {len} at {at}");
                assert!(
                    shared[..at]
                        .iter()
                        .chain(&shared[at + len..])
                        .all(|&b| b == 0xee)
                );
            }
        }
    }

    #[test]
    fn notify_rule_across_u32_wrap() {
        // Consumer wants a wake-up at event; producer moves old -> new.
        assert!(needs_notify(5, 8, 6));
        assert!(!needs_notify(5, 8, 9));
        assert!(needs_notify(u32::MAX - 1, 2, u32::MAX));
        assert!(needs_notify(u32::MAX - 1, 2, 1));
        assert!(!needs_notify(u32::MAX - 1, 2, 3));
        assert!(!needs_notify(7, 7, 8));
    }

    fn byte_ring_parts(size: usize, start: u32) -> (Vec<AtomicU8>, AtomicU32, AtomicU32) {
        (
            (0..size).map(|_| AtomicU8::new(0)).collect(),
            AtomicU32::new(start),
            AtomicU32::new(start),
        )
    }

    #[test]
    fn byte_ring_partial_writes_and_wrap_at_u32_max() {
        let (data, cons, prod) = byte_ring_parts(8, u32::MAX - 2);
        let ring = ByteRing::new(&data, &cons, &prod);
        assert_eq!(ring.write(b"0123456789"), Ok(8), "only what fits");
        assert_eq!(ring.write(b"x"), Ok(0));
        let mut buf = [0u8; 5];
        assert_eq!(ring.read(&mut buf), Ok(5));
        assert_eq!(&buf, b"01234");
        assert_eq!(ring.write(b"abcdef"), Ok(5));
        assert_eq!(
            prod.load(Ordering::Relaxed),
            10,
            "index wrapped past u32::MAX"
        );
        let mut rest = [0u8; 16];
        assert_eq!(ring.read(&mut rest), Ok(8));
        assert_eq!(&rest[..8], b"567abcde");
        assert_eq!(ring.readable(), Ok(0));
    }

    #[test]
    fn byte_ring_refuses_a_corrupt_producer() {
        let (data, cons, prod) = byte_ring_parts(8, 0);
        let ring = ByteRing::new(&data, &cons, &prod);
        prod.store(9, Ordering::Relaxed);
        assert_eq!(ring.read(&mut [0; 4]), Err(RingError::Overflow));
        assert_eq!(ring.write(b"x"), Err(RingError::Overflow));
        assert_eq!(cons.load(Ordering::Relaxed), 0);
    }

    const PAGE: usize = 4096;
    const ENTRY: usize = 112;

    fn page() -> Vec<u64> {
        vec![0u64; PAGE / 8]
    }

    #[test]
    fn a_ring_over_scattered_pages_gathers_straddling_entries() {
        // Two pages far apart; 112-byte entries straddle the boundary.
        let (mut first, mut second) = (page(), page());
        let pages = [
            NonNull::new(first.as_mut_ptr().cast::<u8>()).unwrap(),
            NonNull::new(second.as_mut_ptr().cast::<u8>()).unwrap(),
        ];
        // SAFETY: both pages are aligned and outlive both ring views.
        let (mut front, mut back) = unsafe {
            let front = FrontRing::init_pages(&pages, ENTRY, u32::MAX - 7);
            (front, BackRing::attach_pages(&pages, ENTRY))
        };
        assert_eq!(back.size(), 64);
        let mut entry = [0u8; ENTRY];
        for round in 0..3u8 {
            for i in 0..64u8 {
                let request: Vec<u8> = (0..ENTRY as u8).map(|b| b ^ i ^ round).collect();
                assert!(front.put_request(&request));
            }
            front.push_requests();
            for i in 0..64u8 {
                assert!(back.next_request(&mut entry).unwrap());
                assert!(
                    entry
                        .iter()
                        .enumerate()
                        .all(|(b, v)| *v == b as u8 ^ i ^ round)
                );
                back.put_response(&entry);
            }
            back.push_responses();
            for i in 0..64u8 {
                assert!(front.next_response(&mut entry));
                assert_eq!(entry[1], 1 ^ i ^ round);
            }
        }
        assert!(second.iter().any(|w| *w != 0), "the second page was used");
    }

    /// Both views of a one-page ring in `mem`, its indices at `start`.
    fn ring_pair(mem: &mut [u64], start: u32) -> (FrontRing<'_>, BackRing<'_>) {
        let base = NonNull::new(mem.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `mem` is an aligned page, borrowed as long as both views.
        unsafe {
            let front = FrontRing::init(base, PAGE, ENTRY, start);
            (front, BackRing::attach(base, PAGE, ENTRY))
        }
    }

    #[test]
    fn request_response_cycle_wraps_at_u32_max() {
        let mut mem = page();
        let (mut front, mut back) = ring_pair(&mut mem, u32::MAX - 40);
        let mut entry = [0u8; ENTRY];
        let mut served = 0u32;
        for round in 0..5u8 {
            for i in 0..20u8 {
                assert!(front.put_request(&[round, i]));
            }
            assert!(front.push_requests(), "backend asked for a notification");
            assert_eq!(back.unconsumed_requests(), Ok(20));
            while back.next_request(&mut entry).unwrap() {
                assert_eq!(entry[1], (served % 20) as u8);
                back.put_response(&[entry[0], entry[1], 0xaa]);
                served += 1;
            }
            assert!(!back.final_check_for_requests().unwrap());
            assert!(back.push_responses());
            let mut got = 0;
            while front.next_response(&mut entry) {
                assert_eq!((entry[0], entry[1], entry[2]), (round, got, 0xaa));
                got += 1;
            }
            assert_eq!(got, 20);
            assert!(!front.final_check_for_responses());
        }
        assert_eq!(served, 100);
    }

    #[test]
    fn full_ring_and_overflowing_producer_are_bounded() {
        let mut mem = page();
        let (mut front, mut back) = ring_pair(&mut mem, u32::MAX);
        for i in 0..32u8 {
            assert!(front.put_request(&[i]));
        }
        assert!(!front.put_request(&[99]), "ring full");
        front.push_requests();
        assert_eq!(back.unconsumed_requests(), Ok(32));
        // A frontend claiming 33 outstanding requests is refused.
        front.corrupt_req_prod(u32::MAX.wrapping_add(33));
        assert_eq!(back.unconsumed_requests(), Err(RingError::Overflow));
        let mut entry = [0u8; ENTRY];
        assert_eq!(back.next_request(&mut entry), Err(RingError::Overflow));
    }

    #[test]
    fn frontend_refuses_more_responses_than_requests() {
        let mut mem = page();
        let (mut front, mut back) = ring_pair(&mut mem, u32::MAX - 1);
        let mut entry = [0u8; ENTRY];
        for i in 0..3u8 {
            assert!(front.put_request(&[i]));
        }
        front.push_requests();
        while back.next_request(&mut entry).unwrap() {
            back.put_response(&entry);
        }
        back.push_responses();
        assert_eq!(front.unconsumed_responses(), Ok(3));
        assert_eq!(front.next_checked_response(&mut entry), Ok(true));
        assert_eq!(entry[0], 0);
        // The backend claims a fourth answer to a request never made.
        let start = u32::MAX - 1;
        front.corrupt_rsp_prod(start.wrapping_add(4));
        assert_eq!(front.unconsumed_responses(), Err(RingError::Overflow));
        assert_eq!(
            front.next_checked_response(&mut entry),
            Err(RingError::Overflow)
        );
        front.corrupt_rsp_prod(start.wrapping_add(3));
        assert_eq!(front.next_checked_response(&mut entry), Ok(true));
        assert_eq!(front.next_checked_response(&mut entry), Ok(true));
        assert_eq!(front.next_checked_response(&mut entry), Ok(false));
    }

    #[test]
    fn backend_does_not_consume_requests_it_cannot_answer() {
        let mut mem = page();
        let (mut front, mut back) = ring_pair(&mut mem, 0);
        let mut entry = [0u8; ENTRY];
        for _ in 0..32 {
            front.put_request(&[1]);
        }
        front.push_requests();
        for _ in 0..32 {
            assert!(back.next_request(&mut entry).unwrap());
        }
        // The frontend re-publishes old slots (bogus): with 32 unanswered
        // requests in flight the backend takes no more.
        front.corrupt_req_prod(40);
        assert_eq!(back.unconsumed_requests(), Err(RingError::Overflow));
        front.corrupt_req_prod(32);
        assert_eq!(back.unconsumed_requests(), Ok(0));
        back.put_response(&[0]);
        back.push_responses();
        front.corrupt_req_prod(33);
        assert_eq!(back.unconsumed_requests(), Ok(1));
    }
}

//! Bounce buffers for a ring whose device cannot DMA into grant mappings
//! ([`crate::DataPath::Bounce`]): one pool of DMA pages per ring, allocated
//! at connect, from which each request takes one page per segment while it
//! is in flight. The device sees a bounce page at the same offset as the
//! segment's sectors in the granted page, so requests keep the shape (and
//! the alignment) they have without bouncing.

use alloc::vec::Vec;
use blockdev::{DmaRegion, PAGE_SIZE, Segment};
use core::ptr::NonNull;

use crate::BackendServices;
use crate::request_slot::reserved;
use crate::ring_io::ConnectError;

/// Bounce pages one ring holds at most (4 MiB, as many as the data grants
/// it may hold mapped); no request is taken that could need more than are
/// free.
pub const MAX_BOUNCE_PAGES_PER_RING: usize = crate::ring_io::MAX_MAPPED_GRANTS_PER_RING;

/// A ring's bounce pages and which of them are free.
pub(crate) struct BouncePool {
    region: DmaRegion,
    /// Indexes of the free pages.
    free: Vec<usize>,
}

impl BouncePool {
    /// A pool of `pages` pages from the services' DMA memory.
    pub(crate) fn allocate<S: BackendServices>(
        svc: &mut S,
        pages: usize,
    ) -> Result<BouncePool, ConnectError> {
        let mut free = reserved(pages).map_err(|_| ConnectError::OutOfMemory)?;
        let region = svc
            .alloc_bounce_pages(pages)
            .ok_or(ConnectError::NoBouncePages)?;
        free.extend((0..pages).rev());
        Ok(BouncePool { region, free })
    }

    /// Gives the pages back; every one must be free (the ring drained).
    pub(crate) fn release<S: BackendServices>(self, svc: &mut S) {
        debug_assert_eq!(self.free.len(), self.region.pages);
        // SAFETY: the region came from `alloc_bounce_pages`; every page is
        // free, so no request (and no device) uses it any more.
        unsafe { svc.free_bounce_pages(self.region) };
    }

    /// Pages not in use.
    pub(crate) fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// A free page for `segment` (in a granted page): the same offset and
    /// length in the bounce page. `None` when none is free.
    pub(crate) fn take(&mut self, segment: Segment) -> Option<Segment> {
        let page = self.free.pop()?;
        let offset = segment.phys % PAGE_SIZE as u64;
        Some(Segment {
            phys: self.region.phys + (page * PAGE_SIZE) as u64 + offset,
            len: segment.len,
        })
    }

    /// Returns the page of `bounced` (from [`Self::take`]) to the pool.
    pub(crate) fn give_back(&mut self, bounced: Segment) {
        let page = (bounced.phys - self.region.phys) as usize / PAGE_SIZE;
        debug_assert!(page < self.region.pages && !self.free.contains(&page));
        self.free.push(page);
    }

    /// Where the CPU finds `bounced` (from [`Self::take`]).
    fn address(&self, bounced: Segment) -> NonNull<u8> {
        let offset = (bounced.phys - self.region.phys) as usize;
        assert!(offset + bounced.len as usize <= self.region.len());
        // SAFETY: the offset and length lie inside the region (checked).
        unsafe { self.region.virt.add(offset) }
    }

    /// Copies between each granted segment and its bounce page, as
    /// `direction` says.
    pub(crate) fn copy<S: BackendServices>(
        &self,
        svc: &S,
        granted: &[Segment],
        bounced: &[Segment],
        direction: CopyDirection,
    ) -> Result<(), &'static str> {
        for (&grant, &bounce) in granted.iter().zip(bounced) {
            let (grant_at, bounce_at) = (grant_address(svc, grant)?, self.address(bounce));
            let (from, to) = match direction {
                CopyDirection::IntoBounce => (grant_at, bounce_at),
                CopyDirection::OutOfBounce => (bounce_at, grant_at),
            };
            // SAFETY: the grant's `len` bytes lie in a grant page mapped
            // until the request finishes; its bounce page (as long) is the
            // request's own until then; pool and window do not overlap.
            unsafe { copy_words(from, to, grant.len as usize) };
        }
        Ok(())
    }
}

/// Which way [`BouncePool::copy`] copies.
#[derive(Clone, Copy)]
pub(crate) enum CopyDirection {
    /// What a write writes, before the device reads it.
    IntoBounce,
    /// What a read read, once the device wrote it.
    OutOfBounce,
}

/// Where the CPU finds a segment of a mapped grant (its `phys` is in the
/// GFN window).
fn grant_address<S: BackendServices>(svc: &S, grant: Segment) -> Result<NonNull<u8>, &'static str> {
    let page = svc
        .frame_address(grant.phys / PAGE_SIZE as u64)
        .ok_or("granted page has no address")?;
    let offset = (grant.phys % PAGE_SIZE as u64) as usize;
    if offset + grant.len as usize > PAGE_SIZE {
        return Err("segment crosses its page");
    }
    // SAFETY: offset + len stays in the page (checked).
    Ok(unsafe { page.add(offset) })
}

/// Copies `len` bytes (whole sectors) in 8-byte volatile words: the guest
/// may write its page meanwhile and the device has just written the bounce
/// page, so neither is treated as memory only this code touches.
///
/// # Safety
/// `from` and `to` are 8-byte aligned and valid for `len` bytes, which is
/// a multiple of 8, and do not overlap.
unsafe fn copy_words(from: NonNull<u8>, to: NonNull<u8>, len: usize) {
    let (from, to) = (from.cast::<u64>(), to.cast::<u64>());
    for word in 0..len / 8 {
        // SAFETY: `word * 8 < len`, inside both ranges (the caller's promise).
        unsafe { to.add(word).write_volatile(from.add(word).read_volatile()) };
    }
}

//! The data path: TX buffers sent and reclaimed, RX buffers kept posted
//! and their responses assembled into frames.
//!
//! Every response is copied out of the ring once, then checked: ids
//! against what is in flight, offsets and sizes against the page, the
//! response index against what was asked. RX data is copied out of the
//! granted page into our own frame buffer before anyone parses it (the
//! backend can write the page at any time), and the page goes straight
//! back to the ring. Nothing here allocates.

use alloc::vec;
use alloc::vec::Vec;

use xen_pv::PAGE_SIZE;

use crate::checksum::complete_blank_checksum;
use crate::hal::NetfrontHal;
use crate::netfront::{
    BrokenRing, ETHERNET_HEADER_LEN, Link, MAX_FRAME_LEN, Netfront, Phase, Statistics, frame_buffer,
};
use crate::pages::{PagePool, SharedPage};
use crate::wire::{
    ExtraInfo, NETIF_RSP_DROPPED, NETIF_RSP_ERROR, NETIF_RSP_OKAY, NETRXF_CSUM_BLANK,
    NETRXF_EXTRA_INFO, NETRXF_MORE_DATA, RX_ENTRY_LEN, RX_RING_SIZE, RxRequest, RxResponse,
    TX_ENTRY_LEN, TxRequest, TxResponse, XEN_NETIF_EXTRA_FLAG_MORE,
};

/// Extra-info slots one packet may carry: one of each type netif knows
/// (GSO, multicast add and delete, hash); more is a backend gone wrong.
const MAX_EXTRA_SLOTS: u32 = 4;

/// The TX buffers: which are free, which the backend has.
pub(crate) struct TxBuffers {
    free: Vec<u16>,
    in_flight: Vec<bool>,
    /// Where a frame goes when a token finds no buffer (it is dropped).
    scratch: Vec<u8>,
}

impl TxBuffers {
    pub(crate) fn new(count: u16) -> Self {
        let mut buffers = TxBuffers {
            free: Vec::with_capacity(usize::from(count)),
            in_flight: vec![false; usize::from(count)],
            scratch: frame_buffer(),
        };
        buffers.reset();
        buffers
    }

    /// All buffers free (a new connection: the old ring is gone).
    pub(crate) fn reset(&mut self) {
        self.free.clear();
        self.free.extend((0..self.in_flight.len() as u16).rev());
        self.in_flight.fill(false);
    }

    /// Buffers free now.
    pub(crate) fn free(&self) -> usize {
        self.free.len()
    }
}

/// The RX side: which buffer each ring slot holds, and the frame being
/// put together from one or more slots.
pub(crate) struct RxAssembly {
    /// The RX buffer posted in each ring slot: netif answers a request
    /// in its own slot, and extra-info slots carry no id.
    buffer_of_slot: Vec<u16>,
    frame: Vec<u8>,
    len: usize,
    in_packet: bool,
    first_flags: u16,
    more_data: bool,
    extra_expected: bool,
    extra_slots: u32,
    dropping: bool,
}

impl RxAssembly {
    pub(crate) fn new() -> Self {
        RxAssembly {
            buffer_of_slot: vec![0; RX_RING_SIZE as usize],
            frame: frame_buffer(),
            len: 0,
            in_packet: false,
            first_flags: 0,
            more_data: false,
            extra_expected: false,
            extra_slots: 0,
            dropping: false,
        }
    }

    /// Forgets a half-assembled packet (the ring it came from is gone).
    pub(crate) fn reset(&mut self) {
        self.len = 0;
        self.in_packet = false;
        self.first_flags = 0;
        self.more_data = false;
        self.extra_expected = false;
        self.extra_slots = 0;
        self.dropping = false;
    }

    /// The frame last completed.
    pub(crate) fn frame(&self, len: usize) -> &[u8] {
        &self.frame[..len]
    }

    /// Takes one response slot whose buffer is `buffer`; the length of
    /// the frame when the slot completed a good one.
    fn take_slot(
        &mut self,
        entry: &[u8; RX_ENTRY_LEN],
        buffer: &SharedPage,
        stats: &mut Statistics,
    ) -> Option<usize> {
        if self.extra_expected {
            // No extra type is negotiated: skip its contents.
            let extra = ExtraInfo::decode(entry);
            self.extra_slots += 1;
            if self.extra_slots > MAX_EXTRA_SLOTS && !self.dropping {
                self.dropping = true;
                stats.bad_responses += 1;
            }
            self.extra_expected = extra.flags & XEN_NETIF_EXTRA_FLAG_MORE != 0;
        } else {
            let response = RxResponse::decode(entry);
            if !self.in_packet {
                self.in_packet = true;
                self.first_flags = response.flags;
            }
            self.take_data(&response, buffer, stats);
            self.more_data = response.flags & NETRXF_MORE_DATA != 0;
            self.extra_expected = response.flags & NETRXF_EXTRA_INFO != 0;
        }
        if self.more_data || self.extra_expected {
            return None;
        }
        let frame = self.finish(stats);
        self.reset();
        frame
    }

    fn take_data(&mut self, response: &RxResponse, buffer: &SharedPage, stats: &mut Statistics) {
        let Ok(size) = usize::try_from(response.status) else {
            // NETIF_RSP_ERROR or DROPPED: the packet is lost.
            self.dropping = true;
            return;
        };
        let offset = usize::from(response.offset);
        if offset + size > PAGE_SIZE {
            self.dropping = true;
            stats.bad_responses += 1;
        } else if self.len + size > MAX_FRAME_LEN {
            self.dropping = true;
        } else if !self.dropping {
            let target = &mut self.frame[self.len..self.len + size];
            // SAFETY: the buffer's page is PAGE_SIZE bytes mapped for the
            // netfront's life, and `offset + size` is within it; the
            // backend may write it meanwhile, so it is read once, here,
            // into our own frame, and never through a reference.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    buffer.page.ptr.as_ptr().add(offset),
                    target.as_mut_ptr(),
                    size,
                );
            }
            self.len += size;
        }
    }

    fn finish(&mut self, stats: &mut Statistics) -> Option<usize> {
        let len = self.len;
        let mut good = !self.dropping && len >= ETHERNET_HEADER_LEN;
        if good && self.first_flags & NETRXF_CSUM_BLANK != 0 {
            good = complete_blank_checksum(&mut self.frame[..len]).is_ok();
            stats.rx_checksums_completed += u64::from(good);
        }
        if !good {
            stats.rx_dropped += 1;
            return None;
        }
        stats.rx_frames += 1;
        stats.rx_bytes += len as u64;
        Some(len)
    }
}

/// Puts RX buffer `buffer` back in the ring (published by the caller).
fn post_rx_buffer(link: &mut Link, rx: &mut RxAssembly, pages: &PagePool, buffer: u16) {
    let slot = link.rx.req_prod_pvt();
    let gref = pages.rx_buffer(buffer).gref.unwrap_or_default();
    if link
        .rx
        .put_request(&RxRequest { id: buffer, gref }.encode())
    {
        rx.buffer_of_slot[(slot % RX_RING_SIZE) as usize] = buffer;
    }
}

/// Takes RX responses until one completes a good frame (at most a
/// ring's worth per call), reposting each buffer. Returns the frame's
/// length and whether the backend must be notified of the reposts.
fn receive_frame(
    link: &mut Link,
    rx: &mut RxAssembly,
    pages: &PagePool,
    stats: &mut Statistics,
) -> Result<(Option<usize>, bool), BrokenRing> {
    let mut entry = [0; RX_ENTRY_LEN];
    let mut frame = None;
    let mut budget = RX_RING_SIZE;
    while frame.is_none() && budget > 0 {
        let slot = link.rx.rsp_cons();
        match link.rx.next_checked_response(&mut entry) {
            Err(_) => return Err(BrokenRing::RxOverflow),
            Ok(true) => {}
            // Idle: ask to be woken by the next response, and look once
            // more in case it came meanwhile.
            Ok(false) if link.rx.final_check_for_responses() => continue,
            Ok(false) => break,
        }
        budget -= 1;
        let buffer = rx.buffer_of_slot[(slot % RX_RING_SIZE) as usize];
        frame = rx.take_slot(&entry, pages.rx_buffer(buffer), stats);
        post_rx_buffer(link, rx, pages, buffer);
    }
    Ok((frame, link.rx.push_requests()))
}

/// Takes TX completions, freeing their buffers; when none is left free,
/// asks to be woken by the next completion.
fn reclaim_tx(
    link: &mut Link,
    tx: &mut TxBuffers,
    stats: &mut Statistics,
) -> Result<(), BrokenRing> {
    let mut entry = [0; TX_ENTRY_LEN];
    loop {
        while link
            .tx
            .next_checked_response(&mut entry)
            .map_err(|_| BrokenRing::TxOverflow)?
        {
            let response = TxResponse::decode(&entry);
            let id = response.id;
            match tx.in_flight.get_mut(usize::from(id)) {
                Some(in_flight) if *in_flight => *in_flight = false,
                _ => return Err(BrokenRing::TxUnknownId(id)),
            }
            tx.free.push(id);
            match response.status {
                NETIF_RSP_OKAY => {}
                NETIF_RSP_ERROR | NETIF_RSP_DROPPED => stats.tx_errors += 1,
                _ => {
                    // NULL answers extra-info slots, which we never send.
                    stats.tx_errors += 1;
                    stats.bad_responses += 1;
                }
            }
        }
        if !tx.free.is_empty() || !link.tx.final_check_for_responses() {
            return Ok(());
        }
    }
}

/// What sending one frame needs of a netfront, borrowed apart from its
/// RX frame so a smoltcp RX token and TX token can live together.
pub(crate) struct TxSender<'a, H> {
    pub(crate) hal: &'a mut H,
    pub(crate) link: Option<&'a mut Link>,
    pub(crate) pages: &'a PagePool,
    pub(crate) tx: &'a mut TxBuffers,
    pub(crate) stats: &'a mut Statistics,
}

impl<H: NetfrontHal> TxSender<'_, H> {
    /// Has `fill` write a `len`-byte frame into a free TX buffer and
    /// sends it. Without a buffer (or a link, or for a length netback
    /// would refuse) `fill` writes into scratch space and the frame is
    /// counted as dropped: a token must always take its frame.
    pub(crate) fn send<R>(self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        let sendable = (ETHERNET_HEADER_LEN..=MAX_FRAME_LEN).contains(&len);
        let (Some(link), Some(id), true) = (self.link, self.tx.free.last().copied(), sendable)
        else {
            self.stats.tx_dropped += 1;
            let scratch = &mut self.tx.scratch;
            return fill(&mut scratch[..len.min(MAX_FRAME_LEN)]);
        };
        let buffer = self.pages.tx_buffer(id);
        // SAFETY: the buffer's page is PAGE_SIZE bytes mapped for the
        // netfront's life and `len` fits in it; it is not in flight (it
        // is on the free list), so the backend has no request to read it
        // for, and nothing else of ours holds it.
        let frame = unsafe { core::slice::from_raw_parts_mut(buffer.page.ptr.as_ptr(), len) };
        let result = fill(frame);
        let request = TxRequest {
            gref: buffer.gref.unwrap_or_default(),
            offset: 0,
            flags: 0,
            id,
            size: len as u16,
        };
        // Buffers in flight never outnumber the ring's slots, so the
        // request always fits.
        if link.tx.put_request(&request.encode()) {
            self.tx.free.pop();
            self.tx.in_flight[usize::from(id)] = true;
            self.stats.tx_frames += 1;
            self.stats.tx_bytes += len as u64;
            if link.tx.push_requests() {
                self.hal.notify(link.port);
            }
        } else {
            self.stats.tx_dropped += 1;
        }
        result
    }
}

impl<H: NetfrontHal> Netfront<H> {
    /// Posts every RX buffer in a fresh ring (at connect).
    pub(crate) fn post_all_rx_buffers(&mut self) {
        let buffers = self.config().rx_buffers;
        let Some(link) = self.link.as_mut() else {
            return;
        };
        for buffer in 0..buffers {
            post_rx_buffer(link, &mut self.rx, &self.pages, buffer);
        }
        // The backend is not connected yet: it reads the ring when it is.
        link.rx.push_requests();
    }

    /// Frees the buffers of completed TX frames; false when the backend
    /// broke the ring (the data path is stopped).
    pub(crate) fn reclaim(&mut self) -> bool {
        if self.phase() != Phase::Running {
            return false;
        }
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        match reclaim_tx(link, &mut self.tx, &mut self.stats) {
            Ok(()) => true,
            Err(why) => {
                self.note_broken(why);
                false
            }
        }
    }

    /// Receives the next frame into the RX frame buffer; its length.
    pub(crate) fn next_frame(&mut self) -> Option<usize> {
        if self.phase() != Phase::Running {
            return None;
        }
        let link = self.link.as_mut()?;
        match receive_frame(link, &mut self.rx, &self.pages, &mut self.stats) {
            Ok((frame, notify)) => {
                if notify {
                    self.hal.notify(link.port);
                }
                frame
            }
            Err(why) => {
                self.note_broken(why);
                None
            }
        }
    }

    /// A sender for one frame, when a TX buffer is free.
    pub(crate) fn sender(&mut self) -> Option<TxSender<'_, H>> {
        if !self.reclaim() || self.tx.free() == 0 {
            return None;
        }
        Some(TxSender {
            hal: &mut self.hal,
            link: self.link.as_mut(),
            pages: &self.pages,
            tx: &mut self.tx,
            stats: &mut self.stats,
        })
    }

    /// Sends a `len`-byte frame that `fill` writes; `None` (and `fill`
    /// not called) when the data path is down or every TX buffer is in
    /// flight. `len` must be 14 to [`MAX_FRAME_LEN`] bytes, or the frame
    /// is dropped.
    pub fn send_with<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        self.sender().map(|sender| sender.send(len, fill))
    }

    /// Hands the next received frame to `take`; `None` when there is
    /// none (and the backend is asked to notify the next one).
    pub fn receive_with<R>(&mut self, take: impl FnOnce(&[u8]) -> R) -> Option<R> {
        self.reclaim();
        let len = self.next_frame()?;
        Some(take(self.rx.frame(len)))
    }

    /// Whether the backend has answered RX slots not yet taken.
    pub fn has_pending_rx(&self) -> bool {
        self.link
            .as_ref()
            .filter(|_| self.phase() == Phase::Running)
            .is_some_and(|link| link.rx.unconsumed_responses() != Ok(0))
    }

    /// TX buffers free now.
    pub fn free_tx_buffers(&self) -> usize {
        self.tx.free()
    }
}

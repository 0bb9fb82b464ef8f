//! The pages a netfront shares with its backend: both rings, the RX
//! buffers and the TX buffers, all allocated when the netfront is made
//! and granted to the backend for one connection at a time.
//!
//! A grant the backend still has mapped cannot be ended; such a page is
//! never handed out again while its grant stands (the backend could
//! still write into it). It is retried at each release and connect, and
//! replaced by a fresh page at connect when it is still held, up to a
//! bound: a backend that keeps pages mapped costs us at most
//! `max_leaked_pages` pages over the netfront's life.

use alloc::vec::Vec;

use xen_pv::DomId;
use xen_pv::grant::GrantRef;

use crate::hal::{NetfrontHal, OwnPage};

/// Index of the TX ring's page in the pool.
pub const TX_RING_PAGE: usize = 0;
/// Index of the RX ring's page in the pool.
pub const RX_RING_PAGE: usize = 1;
/// Index of the first RX buffer; TX buffers follow the RX buffers.
pub const FIRST_RX_BUFFER_PAGE: usize = 2;

/// One page and its grant to the backend, while there is one.
#[derive(Debug)]
pub struct SharedPage {
    pub page: OwnPage,
    pub gref: Option<GrantRef>,
    /// Whether the backend only reads it (the TX buffers).
    pub readonly: bool,
}

/// Why the pages could not be shared for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareError {
    /// The grant table has no free entry.
    OutOfGrants,
    /// No page to replace one the backend kept mapped.
    OutOfMemory,
    /// The backend kept more pages mapped than the netfront may lose.
    TooManyLeakedPages,
}

/// Every page of a netfront, in a fixed order: the TX ring, the RX ring,
/// the RX buffers, the TX buffers.
pub struct PagePool {
    pages: Vec<SharedPage>,
    tx_buffers: usize,
    leaked: usize,
    max_leaked: usize,
}

impl PagePool {
    /// Allocates the rings' pages and `rx_buffers` + `tx_buffers` buffer
    /// pages; `None` when memory runs out.
    pub fn allocate<H: NetfrontHal>(
        hal: &mut H,
        rx_buffers: usize,
        tx_buffers: usize,
        max_leaked: usize,
    ) -> Option<PagePool> {
        let count = FIRST_RX_BUFFER_PAGE + rx_buffers + tx_buffers;
        let mut pages = Vec::with_capacity(count);
        for index in 0..count {
            pages.push(SharedPage {
                page: hal.alloc_page()?,
                gref: None,
                readonly: index >= FIRST_RX_BUFFER_PAGE + rx_buffers,
            });
        }
        Some(PagePool {
            pages,
            tx_buffers,
            leaked: 0,
            max_leaked,
        })
    }

    pub fn page(&self, index: usize) -> &SharedPage {
        &self.pages[index]
    }

    /// The page of RX buffer `buffer`.
    pub fn rx_buffer(&self, buffer: u16) -> &SharedPage {
        &self.pages[FIRST_RX_BUFFER_PAGE + usize::from(buffer)]
    }

    /// The page of TX buffer `buffer`.
    pub fn tx_buffer(&self, buffer: u16) -> &SharedPage {
        let first_tx = self.pages.len() - self.tx_buffers;
        &self.pages[first_tx + usize::from(buffer)]
    }

    /// Pages lost to grants a backend would not give back.
    pub fn leaked(&self) -> usize {
        self.leaked
    }

    /// Grants whose end failed and is still to be retried.
    pub fn held_by_backend(&self) -> usize {
        self.pages.iter().filter(|p| p.gref.is_some()).count()
    }

    /// Grants every page to `backend`. Pages still granted from a former
    /// connection are ended first, or replaced; on failure nothing new
    /// stays granted.
    pub fn share<H: NetfrontHal>(&mut self, hal: &mut H, backend: DomId) -> Result<(), ShareError> {
        self.end_grants(hal);
        for shared in self.pages.iter_mut().filter(|p| p.gref.is_some()) {
            if self.leaked >= self.max_leaked {
                return Err(ShareError::TooManyLeakedPages);
            }
            // The old page stays granted to whoever holds it, forever.
            shared.page = hal.alloc_page().ok_or(ShareError::OutOfMemory)?;
            shared.gref = None;
            self.leaked += 1;
        }
        for index in 0..self.pages.len() {
            let shared = &mut self.pages[index];
            match hal.grant_access(backend, shared.page.gfn, shared.readonly) {
                Some(gref) => shared.gref = Some(gref),
                None => {
                    self.end_grants(hal);
                    return Err(ShareError::OutOfGrants);
                }
            }
        }
        Ok(())
    }

    /// Ends every grant it can; the others stay recorded for a retry.
    pub fn end_grants<H: NetfrontHal>(&mut self, hal: &mut H) {
        for shared in &mut self.pages {
            if let Some(gref) = shared.gref
                && hal.end_access(gref).is_ok()
            {
                shared.gref = None;
            }
        }
    }
}

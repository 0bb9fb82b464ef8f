//! The export as blkback sees it: a [`QueuedDevice`] of one queue over a
//! link shared with whoever pumps it.

use alloc::rc::Rc;
use core::cell::RefCell;

use blockdev::{Completion, Geometry, QueuedDevice, Request, SubmitError, validate};

use crate::{NbdHost, NbdLink};

/// A device over an [`NbdLink`] whose export is known; the link's owner
/// keeps pumping it (the device only submits and collects).
pub struct NbdDevice<H: NbdHost> {
    link: Rc<RefCell<NbdLink<H>>>,
    /// Fixed at the first handshake: later ones must find the same size.
    geometry: Geometry,
}

impl<H: NbdHost> NbdDevice<H> {
    /// The device of `link`; `None` until its first handshake finished.
    pub fn new(link: Rc<RefCell<NbdLink<H>>>) -> Option<Self> {
        let geometry = link.borrow().geometry()?;
        Some(NbdDevice { link, geometry })
    }
}

impl<H: NbdHost> QueuedDevice for NbdDevice<H> {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn submit(&mut self, queue: u16, tag: u64, request: Request<'_>) -> Result<(), SubmitError> {
        validate(&self.geometry, queue, &request)?;
        self.link.borrow_mut().submit(tag, request)
    }

    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        if queue >= self.geometry.queues {
            return 0;
        }
        self.link.borrow_mut().poll(out)
    }
}

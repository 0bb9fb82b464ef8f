//! Xenstore client over the shared ring (`xenstore_domain_interface`).
//!
//! The kernel finds the ring with [`crate::hvm::store_ring`], maps its frame,
//! views it as a [`XenstoreInterface`] and implements
//! [`crate::ring::PeerChannel`] with the store event channel.

mod client;
pub mod wire;

use core::sync::atomic::{AtomicU8, AtomicU32};

pub use client::{
    MAX_QUEUED_WATCH_EVENT_BYTES, MAX_QUEUED_WATCH_EVENTS, StreamRecord, Tx, UnacknowledgedWrites,
    WatchEvent, WorkingChannel, Xenstore,
};
pub use wire::{Access, Perm, XsError};

use crate::ring::ByteRing;

/// Size of each direction's ring (`XENSTORE_RING_SIZE`).
pub const RING_SIZE: usize = 1024;

/// `struct xenstore_domain_interface`: the shared page.
#[repr(C)]
pub struct XenstoreInterface {
    pub req: [AtomicU8; RING_SIZE],
    pub rsp: [AtomicU8; RING_SIZE],
    pub req_cons: AtomicU32,
    pub req_prod: AtomicU32,
    pub rsp_cons: AtomicU32,
    pub rsp_prod: AtomicU32,
    pub server_features: AtomicU32,
    pub connection: AtomicU32,
}

impl XenstoreInterface {
    /// Guest -> xenstored.
    pub fn requests(&self) -> ByteRing<'_> {
        ByteRing::new(&self.req, &self.req_cons, &self.req_prod)
    }

    /// Xenstored -> guest: replies and watch events.
    pub fn responses(&self) -> ByteRing<'_> {
        ByteRing::new(&self.rsp, &self.rsp_cons, &self.rsp_prod)
    }
}

#[cfg(any(test, feature = "sim"))]
impl XenstoreInterface {
    /// A fresh page with every index at `start` (tests start near wrap).
    pub fn new_boxed(start: u32) -> alloc::boxed::Box<XenstoreInterface> {
        // SAFETY: all fields are atomics, for which zero is valid.
        let iface: alloc::boxed::Box<XenstoreInterface> =
            alloc::boxed::Box::new(unsafe { core::mem::zeroed() });
        for index in [
            &iface.req_cons,
            &iface.req_prod,
            &iface.rsp_cons,
            &iface.rsp_prod,
        ] {
            index.store(start, core::sync::atomic::Ordering::Relaxed);
        }
        iface
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn interface_layout_matches_xs_wire_h() {
        assert_eq!(offset_of!(XenstoreInterface, req_cons), 2048);
        assert_eq!(offset_of!(XenstoreInterface, rsp_prod), 2060);
        assert_eq!(size_of::<XenstoreInterface>(), 2072);
    }
}

#[cfg(test)]
mod client_tests;

//! What netfront needs of the hypervisor and the kernel, as two small
//! traits: [`NetfrontHal`] (pages of our own, grants of them, one event
//! channel) and [`XenbusStore`] (the few xenstore operations of the
//! handshake). The kernel implements the first with its frame allocator,
//! its own grant table ([`xen_pv::grant::GrantEntryV1::offer`]) and
//! [`xen_pv::event::EventChannels`]; the second is implemented here for
//! [`Xenstore`]. Host tests use the simulations in [`crate::sim`].

use alloc::vec::Vec;
use core::ptr::NonNull;

use xen_pv::grant::{GrantRef, GrantStillMapped};
use xen_pv::ring::PeerChannel;
use xen_pv::xenstore::{Tx, Xenstore, XsError};
use xen_pv::{DomId, Errno};

/// A page of this domain's own memory: where the CPU reaches it, and the
/// guest frame number a grant names it by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnPage {
    pub ptr: NonNull<u8>,
    pub gfn: u64,
}

/// Pages, grants and the event channel of a netfront.
///
/// # Safety
/// [`Self::alloc_page`] must return a page-aligned page of
/// [`xen_pv::PAGE_SIZE`] bytes, writable, zeroed, used by nothing else,
/// that stays mapped at `ptr` (and at `gfn` for the hypervisor) for as
/// long as the implementation lives: netfront keeps every page it gets
/// for its own life (it has no way to give one back), and builds its
/// rings and buffers on them.
pub unsafe trait NetfrontHal {
    /// A fresh page; `None` when memory is exhausted.
    fn alloc_page(&mut self) -> Option<OwnPage>;
    /// Grants frame `gfn` to domain `grantee` (read-only or writable);
    /// `None` when the grant table has no free entry.
    fn grant_access(&mut self, grantee: DomId, gfn: u64, readonly: bool) -> Option<GrantRef>;
    /// Ends a grant made by [`Self::grant_access`]; fails, changing
    /// nothing, while the grantee still has the page mapped.
    fn end_access(&mut self, gref: GrantRef) -> Result<(), GrantStillMapped>;
    /// Allocates a port for `remote` to bind (`EVTCHNOP_alloc_unbound`).
    fn alloc_unbound_port(&mut self, remote: DomId) -> Result<u32, Errno>;
    /// Closes a port from [`Self::alloc_unbound_port`].
    fn close_port(&mut self, port: u32);
    /// Signals the peer bound to `port`.
    fn notify(&mut self, port: u32);
}

/// The xenstore operations of the xenbus handshake. Paths may be
/// relative to the domain's home, as xenstored allows.
pub trait XenbusStore {
    /// A node's value (`Err(XsError::NoEntry)` when it does not exist).
    fn read(&mut self, path: &str) -> Result<Vec<u8>, XsError>;
    /// Writes one node.
    fn write(&mut self, path: &str, value: &[u8]) -> Result<(), XsError>;
    /// Writes every node of `nodes` in one transaction, so the backend
    /// sees all of them or none.
    fn write_all(&mut self, nodes: &[(&str, &[u8])]) -> Result<(), XsError>;
    /// Watches `path`: the kernel calls [`crate::Netfront::attend`] when
    /// an event with `token` comes.
    fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError>;
}

impl<C: PeerChannel> XenbusStore for Xenstore<'_, C> {
    fn read(&mut self, path: &str) -> Result<Vec<u8>, XsError> {
        Xenstore::read(self, Tx::NONE, path)
    }

    fn write(&mut self, path: &str, value: &[u8]) -> Result<(), XsError> {
        Xenstore::write(self, Tx::NONE, path, value)
    }

    fn write_all(&mut self, nodes: &[(&str, &[u8])]) -> Result<(), XsError> {
        self.transaction(|xs, tx| {
            nodes
                .iter()
                .try_for_each(|(path, value)| Xenstore::write(xs, tx, path, value))
        })
    }

    fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        Xenstore::watch(self, path, token)
    }
}

//! netfront: stordom as the frontend of a Xen vif (`vif = [...]` in its
//! xl config), served by dom0's Linux netback, and a smoltcp
//! `phy::Device` on it.
//!
//! - [`Netfront`] speaks the xenbus handshake ([`Netfront::start`],
//!   [`Netfront::attend`] on each event of the backend's state node),
//!   keeps RX buffers posted and TX buffers reclaimed, and sends and
//!   receives Ethernet frames ([`Netfront::send_with`],
//!   [`Netfront::receive_with`], or smoltcp through
//!   [`smoltcp::phy::Device`]).
//! - What it needs of Xen and the kernel is two small traits in [`hal`]:
//!   [`NetfrontHal`] (pages, grants of them, one event channel) and
//!   [`XenbusStore`] (implemented for xen-pv's xenstore client).
//! - [`sim`] (feature `sim`) simulates both and a netback that can
//!   misbehave, for host tests.
//!
//! What is negotiated: one queue (netback's `multi-queue-max-queues` is
//! ignored), one event channel for both rings (no
//! `feature-split-event-channels`), one page per ring (netif has no
//! multi-page rings: netback maps exactly one page each, 256 slots),
//! `request-rx-copy=1` (netback copies into our posted pages; flipping is
//! not supported), `feature-rx-notify=1`, `feature-sg=0` and no GSO (MTU
//! 1500: one slot per frame both ways; multi-slot RX packets a backend
//! sends anyway are assembled up to [`MAX_FRAME_LEN`] or dropped),
//! `feature-no-csum-offload=1` (netback sends full checksums; a frame it
//! still marks `NETRXF_csum_blank` is completed in software; we never
//! send blank checksums). The `mtu` node is ignored (netif allows it).
//!
//! # Wiring it into the kernel (done in `kernel/src/net.rs`)
//! 1. A `NetfrontHal`: pages from the frame allocator (identity-mapped,
//!    kept for the domain's life), grants through the domain's own grant
//!    table frames ([`xen_pv::grant::GrantEntryV1::offer`] and `end`,
//!    entries above [`xen_pv::grant::RESERVED_GRANT_ENTRIES`] that the
//!    DMA check does not use; netfront holds 2 + RX + TX buffers' worth,
//!    194 by default, which the first frame's 504 free entries hold),
//!    and ports through [`xen_pv::event::EventChannels`]
//!    (`alloc_unbound`, `send`, `close`).
//! 2. For each `device/vif/<n>` in its own directory: `Netfront::new`,
//!    then `start(&mut xenstore, token)`; route watch events with that
//!    token to `attend`, and call `attend` too when `needs_attend`.
//! 3. A smoltcp `Interface` on the netfront, polled when the port fires
//!    or smoltcp's `poll_delay` runs out; with `has_pending_rx` false
//!    after a poll, the loop may halt until the next event.
//!
//! The backend is untrusted: every ring entry is copied once and checked
//! (response indices, ids in flight, offsets and sizes within a page,
//! statuses), RX data is copied out of the shared page before it is
//! parsed, and a backend that breaks a ring gets the connection closed
//! and a fresh one. All memory is allocated when the netfront is made;
//! the data path allocates nothing.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod checksum;
mod datapath;
mod device;
pub mod hal;
mod netfront;
pub mod nodes;
pub mod pages;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod wire;

#[cfg(test)]
mod tests;

pub use device::{NetfrontRxToken, NetfrontTxToken};
pub use hal::{NetfrontHal, OwnPage, XenbusStore};
pub use netfront::{
    BrokenRing, ETHERNET_HEADER_LEN, MAX_FRAME_LEN, MAX_UNCONNECTED_ATTEMPTS, MTU, Netfront,
    NetfrontConfig, NetfrontError, Phase, Statistics,
};

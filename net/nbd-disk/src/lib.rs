//! An NBD export served as a [`blockdev::QueuedDevice`]: the life of the
//! connection to its server as sans-IO `no_std` code over the
//! [`nbd_client`] protocol engine. The caller (stordom's kernel over
//! smoltcp, a simulated byte pipe in the tests) owns the socket and the
//! clock and drives an [`NbdLink`] with [`NbdLink::pump`]; the
//! [`NbdDevice`] it hands out, once the export is known, is what blkback
//! submits to and polls.
//!
//! # The connection
//! Waiting (for a backoff) -> connecting -> handshaking -> serving. A
//! connection that ends (refused, reset, closed by the server, a protocol
//! violation, [`ATTEMPT_TIMEOUT_NS`] without a finished handshake,
//! [`STALL_TIMEOUT_NS`] without a byte while replies are awaited) is
//! dropped; the next attempt comes after a backoff of
//! [`BACKOFF_FIRST_NS`], doubling each failed attempt up to
//! [`BACKOFF_MAX_NS`]. Requests without a complete reply are sent again on
//! the next connection, in their order (nbd-client's replay), and
//! complete once each.
//!
//! # Deadlines
//! Every request has [`REQUEST_TIMEOUT_NS`] from its submission, across
//! reconnects: a guest sees no error when the server is back within it,
//! and [`blockdev::IoError::Timeout`] past it. The export's size must be
//! the same on every connection; if it is not, every request fails and
//! the device takes no more ([`LinkEvent::Failed`]).
//!
//! # Ordering
//! Every request goes to the client with [`nbd_client::NbdOrder::Free`]:
//! the client already holds a `Flush` until every write submitted before
//! it has its reply, which is what a blkif `FLUSH_DISKCACHE` promises, and
//! blkback runs a `WRITE_BARRIER` as a flush, the write and a flush one
//! after another, each once everything before it completed, so nothing
//! reaches the adapter that the client would have to drain.
//!
//! # Memory
//! Request data moves between the byte stream and the request's segments
//! (the guest's grant-mapped pages) through [`nbd_client::NbdPayload`],
//! reached with [`NbdHost::segment`]: no buffer of the adapter's in
//! between. Everything is allocated when the link is made (the client's
//! table, one segment list per request slot); nothing per request.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod device;
mod link;

pub use device::NbdDevice;
pub use link::{
    LinkEvent, LinkPump, LossReason, NbdLink, NbdLinkConfig, OpeningStatus, TransportState,
};

use blockdev::PhysAddr;
use core::ptr::NonNull;

/// Request timeout: from submission to the reply, across reconnects.
pub const REQUEST_TIMEOUT_NS: u64 = 30_000_000_000;
/// The first wait before reconnecting after a connection is lost.
pub const BACKOFF_FIRST_NS: u64 = 100_000_000;
/// The longest wait between connection attempts.
pub const BACKOFF_MAX_NS: u64 = 2_000_000_000;
/// From starting to connect to a finished handshake.
pub const ATTEMPT_TIMEOUT_NS: u64 = 5_000_000_000;
/// Replies awaited and not a byte received for this long: the connection
/// is taken as dead (a server host gone without a reset) and replaced.
pub const STALL_TIMEOUT_NS: u64 = 10_000_000_000;
/// How long the first connection may take, retries included, before
/// opening the export fails.
pub const OPEN_TIMEOUT_NS: u64 = REQUEST_TIMEOUT_NS;

/// What the adapter needs of its environment: request memory and a clock.
///
/// # Safety
/// [`segment`](Self::segment) returns `Some` only for a pointer valid for
/// reads and writes of `len` bytes for as long as a request naming that
/// memory is in flight (the kernel: RAM it maps directly, grant mappings
/// included), which no Rust reference covers meanwhile.
pub unsafe trait NbdHost {
    /// Where the CPU reaches `len` bytes at physical address `phys`.
    fn segment(&self, phys: PhysAddr, len: u32) -> Option<NonNull<u8>>;
    /// A monotonic clock, in nanoseconds.
    fn now_ns(&self) -> u64;
}

/// The byte stream to the server, as the caller's socket offers it.
pub trait NbdTransport {
    /// Where the connection stands.
    fn state(&self) -> TransportState;
    /// Starts a new connection to the server (the former one, if any,
    /// already aborted); false if it cannot even start.
    fn connect(&mut self) -> bool;
    /// Drops the connection at once (a reset).
    fn abort(&mut self);
    /// Lends free transmit space to `fill`, which returns how many bytes
    /// it wrote there; returns that count.
    fn send(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> usize;
    /// Lends received bytes to `take`, which consumes them all; returns
    /// how many there were.
    fn receive(&mut self, take: impl FnOnce(&[u8])) -> usize;
}

#[cfg(test)]
mod tests;

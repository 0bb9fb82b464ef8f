//! The NBD client protocol as sans-IO `no_std` code: it parses what the
//! server sends and produces what the client sends, and leaves sockets,
//! clocks and backoff to its caller (std TCP in tests, smoltcp in stordom).
//!
//! - Handshake: fixed newstyle; `NBD_OPT_STRUCTURED_REPLY` asked for,
//!   `NBD_OPT_GO` with the export name and a block size request, falling
//!   back to `NBD_OPT_EXPORT_NAME` when the server does not know `GO` (or
//!   speaks plain newstyle). Every refusal is a typed error.
//! - Transmission: read, write, flush, trim, write-zeroes (FUA where the
//!   server offers it), up to `max_in_flight` requests in a table
//!   allocated once, simple and structured replies, replies in any order.
//!   Payloads move between the wire and the caller's memory through
//!   [`NbdPayload`], piece by piece, never through a buffer of the client's.
//! - The server is untrusted: every length is bounded before it is used,
//!   nothing it sends allocates, and a protocol violation ends the
//!   connection with an [`NbdConnectionError`] instead of a panic.
//! - Reconnect: when a connection ends, every request without a complete
//!   reply goes back to the queue; the next connection's handshake must
//!   find the export's size unchanged, and the requests are sent again in
//!   their original order. A request completes exactly once: a reply is
//!   matched by a cookie that names the slot and the send, so a stale
//!   reply cannot complete a reused slot. Past its deadline a request
//!   fails with [`NbdRequestError::TimedOut`].
//!
//! # Ordering, and blkif on top
//! The protocol lets the server run requests in any order; a flush covers
//! only the writes it has replied to before the flush is processed. So a
//! [`NbdCommand::Flush`] is held until every write, trim and write-zeroes
//! submitted before it has its reply, which is what blkif's
//! `FLUSH_DISKCACHE` promises the guest (the writes it completed are
//! durable). blkif's `WRITE_BARRIER` (everything before it done, itself
//! durable, nothing after it started early) is a drain: submit a `Flush`
//! and then the write with FUA (or the write and another `Flush` when the
//! server has no FUA), each with [`NbdOrder::Drain`], and answer the guest
//! when the last completes.
//!
//! A server that restarts may lose writes it acknowledged but had not yet
//! made durable; a flush on the new connection cannot cover them. This
//! client does not detect that case: with a file-backed server (qemu-nbd,
//! nbdkit) the host's page cache outlives the server process.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod client;
mod error;
mod wire;

pub use client::{
    NbdBlockSize, NbdClient, NbdCommand, NbdCompletion, NbdConfig, NbdExport, NbdLinkState,
    NbdOrder, NbdPayload,
};
pub use error::{
    NbdConnectionError, NbdOptionRefusal, NbdRequestError, NbdServerError, NbdSubmitError,
};

#[cfg(any(test, feature = "sim"))]
pub mod sim_server;
#[cfg(test)]
mod tests;

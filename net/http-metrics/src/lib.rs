//! stordom's metrics endpoint: a minimal HTTP/1.0 and 1.1 server on
//! smoltcp TCP sockets, port 80.
//!
//! - `GET /metrics`: the Prometheus text format: per vbd, requests by
//!   kind, bytes read and written, errors, ring-full waits, requests in
//!   flight, size; grants mapped, the heap, restarts, the vif's frames.
//!   The figures are the ones stordom publishes in xenstore, taken from
//!   the same sources ([`blkback::statistics::VbdTotals`], the heap's
//!   `data/` nodes).
//! - `GET /vbds`: JSON, one object per vbd (frontend domid, devid,
//!   target, state, sectors).
//! - anything else: 404 (405 for methods other than GET and HEAD, 400 for
//!   a malformed request line, 431 for a head over 1 KiB).
//!
//! One request per connection: the response says `Connection: close`
//! and the socket closes after it. Every peer is untrusted: heads are
//! bounded and parsed defensively ([`request`]), connections have
//! deadlines ([`server`]), and memory is a few fixed socket buffers plus
//! one response per open connection.

#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod render;
pub mod request;
pub mod server;

pub use render::{Metrics, answer, prometheus, vbds_json};
pub use server::{CONNECTIONS, HTTP_PORT, MetricsServer, Served};

//! What an operator sees of a vbd while it serves: Linux blkback's request
//! counters (its `statistics/` in sysfs; here nodes under the vbd's backend
//! directory, see [`publish`]), each ring's indices and requests in flight,
//! the time of the last completed request, and a watchdog that reports a
//! request or a ring that waited too long, once.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use xen_pv::ring::{PeerChannel, RingIndices};
use xen_pv::xenstore::{Xenstore, XsError};

use crate::blkif;

/// A request in flight, or requests left on the ring untaken, for longer
/// than this are reported by the watchdog (once each).
pub const WATCHDOG_NS: u64 = 5_000_000_000;

/// Requests answered by one ring, counted as Linux blkback counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounters {
    /// Reads completed.
    pub rd_req: u64,
    /// Writes completed (barriers included).
    pub wr_req: u64,
    /// Flushes and barriers completed.
    pub f_req: u64,
    /// Discards completed.
    pub ds_req: u64,
    /// 512-byte sectors read.
    pub rd_sect: u64,
    /// 512-byte sectors written.
    pub wr_sect: u64,
    /// Times requests stayed on the ring because every request slot, or
    /// the ring's grant room, was taken.
    pub oo_req: u64,
    /// Requests answered with an error (refused, or failed on the device).
    pub errors: u64,
    /// Requests answered, whatever the outcome (not a Linux counter).
    pub answered: u64,
    /// Data segments (grants) of the requests answered, whatever the
    /// outcome (not a Linux counter).
    pub segments: u64,
}

impl RequestCounters {
    /// Counts a request of `segments` answered with `status`.
    pub(crate) fn count(&mut self, operation: u8, sectors: u64, segments: u64, status: i16) {
        self.answered += 1;
        self.segments += segments;
        if status != blkif::RSP_OKAY {
            self.errors += 1;
            return;
        }
        match operation {
            blkif::OP_READ => {
                self.rd_req += 1;
                self.rd_sect += sectors;
            }
            blkif::OP_WRITE => {
                self.wr_req += 1;
                self.wr_sect += sectors;
            }
            blkif::OP_WRITE_BARRIER => {
                self.wr_req += 1;
                self.f_req += 1;
                self.wr_sect += sectors;
            }
            blkif::OP_FLUSH_DISKCACHE => self.f_req += 1,
            blkif::OP_DISCARD => self.ds_req += 1,
            _ => {}
        }
    }

    /// Adds `other`'s counts (a vbd's rings summed).
    pub fn add(&mut self, other: &RequestCounters) {
        self.rd_req += other.rd_req;
        self.wr_req += other.wr_req;
        self.f_req += other.f_req;
        self.ds_req += other.ds_req;
        self.rd_sect += other.rd_sect;
        self.wr_sect += other.wr_sect;
        self.oo_req += other.oo_req;
        self.errors += other.errors;
        self.answered += other.answered;
        self.segments += other.segments;
    }

    /// Each counter with the node name Linux blkback gives it.
    fn named(&self) -> [(&'static str, u64); 8] {
        [
            ("rd_req", self.rd_req),
            ("wr_req", self.wr_req),
            ("f_req", self.f_req),
            ("ds_req", self.ds_req),
            ("rd_sect", self.rd_sect),
            ("wr_sect", self.wr_sect),
            ("oo_req", self.oo_req),
            ("errors", self.errors),
        ]
    }
}

/// One ring as it stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingReport {
    /// The ring's indices (the shared ones as the frontend left them).
    pub indices: RingIndices,
    /// Entries in the ring.
    pub size: u32,
    /// Requests taken and not yet answered.
    pub in_flight: usize,
    /// What it answered so far.
    pub counters: RequestCounters,
    /// When it last answered a request (the services' clock; 0: never).
    pub last_completion_ns: u64,
}

impl RingReport {
    /// Requests the frontend is waiting for: in flight, plus published
    /// and not yet taken (bounded by the ring size, whatever the frontend
    /// wrote).
    pub fn outstanding(&self) -> u64 {
        let untaken = self
            .indices
            .req_prod
            .wrapping_sub(self.indices.req_cons)
            .min(self.size);
        self.in_flight as u64 + u64::from(untaken)
    }
}

impl fmt::Display for RingReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.indices;
        write!(
            f,
            "req_prod={} req_cons={} rsp_prod={} req_event={} rsp_event={} in_flight={} done={}",
            i.req_prod,
            i.req_cons,
            i.rsp_prod,
            i.req_event,
            i.rsp_event,
            self.in_flight,
            self.counters.answered,
        )
    }
}

/// A vbd's rings summed: what its `statistics/` nodes and stordom's
/// metrics endpoint both show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VbdTotals {
    pub counters: RequestCounters,
    /// Requests taken and not yet answered, on every ring.
    pub in_flight: usize,
    /// When a ring last answered a request (0: never).
    pub last_completion_ns: u64,
}

impl VbdTotals {
    pub fn of(rings: &[RingReport]) -> VbdTotals {
        let mut totals = VbdTotals::default();
        for ring in rings {
            totals.counters.add(&ring.counters);
            totals.in_flight += ring.in_flight;
            totals.last_completion_ns = totals.last_completion_ns.max(ring.last_completion_ns);
        }
        totals
    }
}

/// The nodes of a vbd's statistics (names under its `statistics/`) and
/// their values: `rd_req`, `wr_req`, `f_req`, `ds_req`, `rd_sect`,
/// `wr_sect`, `oo_req`, `errors` summed over its rings, `in_flight`,
/// `last_completion_ms` (stordom's clock, 0: none yet) and, per ring N,
/// `ring-N/{req_prod,req_cons,rsp_prod,req_event,rsp_event,in_flight}`.
pub(crate) fn nodes(rings: &[RingReport]) -> Vec<(String, u64)> {
    let VbdTotals {
        counters,
        in_flight,
        last_completion_ns,
    } = VbdTotals::of(rings);
    let mut nodes: Vec<(String, u64)> = counters
        .named()
        .iter()
        .map(|&(name, value)| (name.to_string(), value))
        .collect();
    nodes.push(("in_flight".to_string(), in_flight as u64));
    nodes.push((
        "last_completion_ms".to_string(),
        last_completion_ns / 1_000_000,
    ));
    for (n, ring) in rings.iter().enumerate() {
        let i = &ring.indices;
        for (name, value) in [
            ("req_prod", i.req_prod),
            ("req_cons", i.req_cons),
            ("rsp_prod", i.rsp_prod),
            ("req_event", i.req_event),
            ("rsp_event", i.rsp_event),
        ] {
            nodes.push((format!("ring-{n}/{name}"), u64::from(value)));
        }
        nodes.push((format!("ring-{n}/in_flight"), ring.in_flight as u64));
    }
    nodes
}

/// Writes the nodes of `rings` under `path/statistics/` (see
/// [`publish_changed`]).
pub(crate) fn publish<C: PeerChannel>(
    xs: &mut Xenstore<'_, C>,
    path: &str,
    rings: &[RingReport],
    published: &mut BTreeMap<String, u64>,
) -> Result<(), XsError> {
    publish_changed(xs, &format!("{path}/statistics"), nodes(rings), published)
}

/// Writes each of `nodes` (a name under `dir`, a value) whose value
/// differs from `published` (what was written before, updated here),
/// without waiting for xenstored: publishing never holds up the rings for
/// a round trip. Nodes that do not fit in the xenstore ring now wait for
/// the next call. Each node is written on its own (no transaction): a
/// reader may see some nodes one publication ahead of others.
pub fn publish_changed<C: PeerChannel, N: AsRef<str>>(
    xs: &mut Xenstore<'_, C>,
    dir: &str,
    nodes: impl IntoIterator<Item = (N, u64)>,
    published: &mut BTreeMap<String, u64>,
) -> Result<(), XsError> {
    for (name, value) in nodes {
        let name = name.as_ref();
        if published.get(name) == Some(&value) {
            continue;
        }
        let node = format!("{dir}/{name}");
        if !xs.write_unacknowledged(&node, value.to_string().as_bytes())? {
            return Ok(());
        }
        published.insert(name.to_string(), value);
    }
    Ok(())
}

//! What an operator sees of a vbd while it serves: Linux blkback's request
//! counters (its `statistics/` in sysfs; here nodes under the vbd's backend
//! directory, see [`publish`]), a histogram of request latencies, each
//! ring's indices and requests in flight, the time of the last completed
//! request, and a watchdog that reports a request or a ring that waited
//! too long, once.

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

/// Upper bounds of the latency histogram's buckets, in microseconds; one
/// more bucket holds the latencies above the last.
pub const LATENCY_BOUNDS_US: [u64; 13] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// Buckets of a [`LatencyHistogram`].
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// How long requests took, from being taken off the ring to their response
/// being pushed onto it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Requests per bucket, not cumulative: bucket `i` holds the latencies
    /// over bound `i - 1` and at most bound `i` of [`LATENCY_BOUNDS_US`],
    /// the last one those over every bound.
    pub buckets: [u64; LATENCY_BUCKETS],
    /// The latencies summed, in nanoseconds (wrapping: a reader sees a
    /// counter reset, after centuries of summed latency).
    pub sum_ns: u64,
}

impl LatencyHistogram {
    /// Requests counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn record(&mut self, latency_ns: u64) {
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|&bound_us| latency_ns <= bound_us * 1_000)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[bucket] += 1;
        self.sum_ns = self.sum_ns.wrapping_add(latency_ns);
    }

    fn add(&mut self, other: &LatencyHistogram) {
        for (bucket, more) in self.buckets.iter_mut().zip(other.buckets) {
            *bucket += more;
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }
}

/// Latencies of the requests answered, whatever the outcome, by operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestLatencies {
    pub read: LatencyHistogram,
    /// Writes and barriers.
    pub write: LatencyHistogram,
    /// Flushes, discards, and requests of an unknown operation (refused).
    pub other: LatencyHistogram,
}

impl RequestLatencies {
    /// Counts a request of `operation` answered `latency_ns` after it was
    /// taken.
    pub(crate) fn record(&mut self, operation: u8, latency_ns: u64) {
        let histogram = match operation {
            blkif::OP_READ => &mut self.read,
            blkif::OP_WRITE | blkif::OP_WRITE_BARRIER => &mut self.write,
            _ => &mut self.other,
        };
        histogram.record(latency_ns);
    }

    /// Adds `other`'s counts (a vbd's rings summed).
    pub fn add(&mut self, other: &RequestLatencies) {
        self.read.add(&other.read);
        self.write.add(&other.write);
        self.other.add(&other.other);
    }

    /// Each histogram with its name: its node under `statistics/latency/`,
    /// the `op` label of the metrics endpoint.
    pub fn by_operation(&self) -> [(&'static str, &LatencyHistogram); 3] {
        [
            ("read", &self.read),
            ("write", &self.write),
            ("other", &self.other),
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
    /// How long those answers took.
    pub latencies: RequestLatencies,
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
    pub latencies: RequestLatencies,
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
            totals.latencies.add(&ring.latencies);
            totals.in_flight += ring.in_flight;
            totals.last_completion_ns = totals.last_completion_ns.max(ring.last_completion_ns);
        }
        totals
    }
}

/// The value of a `statistics/` node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NodeValue {
    Count(u64),
    /// A latency histogram's requests per bucket.
    Buckets([u64; LATENCY_BUCKETS]),
    /// The buckets' upper bounds ([`LATENCY_BOUNDS_US`]).
    BucketBounds,
}

/// Written as its numbers, separated by spaces.
impl fmt::Display for NodeValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let numbers: &[u64] = match self {
            NodeValue::Count(count) => core::slice::from_ref(count),
            NodeValue::Buckets(counts) => counts,
            NodeValue::BucketBounds => &LATENCY_BOUNDS_US,
        };
        for (n, number) in numbers.iter().enumerate() {
            if n > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{number}")?;
        }
        Ok(())
    }
}

/// The nodes of a vbd's statistics (names under its `statistics/`) and
/// their values: `rd_req`, `wr_req`, `f_req`, `ds_req`, `rd_sect`,
/// `wr_sect`, `oo_req`, `errors` summed over its rings, `in_flight`,
/// `last_completion_ms` (stordom's clock, 0: none yet), the latency
/// histograms `latency/{read,write,other}` (each the requests per bucket,
/// space-separated) with their buckets' bounds `latency/bounds_us` and,
/// per ring N, `ring-N/{req_prod,req_cons,rsp_prod,req_event,rsp_event,in_flight}`.
/// One node per histogram: a busy vbd costs xenstored three writes a
/// publication for them, not one per bucket.
pub(crate) fn nodes(rings: &[RingReport]) -> Vec<(String, NodeValue)> {
    let VbdTotals {
        counters,
        latencies,
        in_flight,
        last_completion_ns,
    } = VbdTotals::of(rings);
    let mut nodes: Vec<(String, NodeValue)> = counters
        .named()
        .iter()
        .map(|&(name, value)| (name.to_string(), NodeValue::Count(value)))
        .collect();
    nodes.push(("in_flight".to_string(), NodeValue::Count(in_flight as u64)));
    nodes.push((
        "last_completion_ms".to_string(),
        NodeValue::Count(last_completion_ns / 1_000_000),
    ));
    nodes.push(("latency/bounds_us".to_string(), NodeValue::BucketBounds));
    for (operation, histogram) in latencies.by_operation() {
        nodes.push((
            format!("latency/{operation}"),
            NodeValue::Buckets(histogram.buckets),
        ));
    }
    for (n, ring) in rings.iter().enumerate() {
        let i = &ring.indices;
        for (name, value) in [
            ("req_prod", i.req_prod),
            ("req_cons", i.req_cons),
            ("rsp_prod", i.rsp_prod),
            ("req_event", i.req_event),
            ("rsp_event", i.rsp_event),
        ] {
            nodes.push((
                format!("ring-{n}/{name}"),
                NodeValue::Count(u64::from(value)),
            ));
        }
        nodes.push((
            format!("ring-{n}/in_flight"),
            NodeValue::Count(ring.in_flight as u64),
        ));
    }
    nodes
}

/// Where under a vbd's backend directory its statistics go.
pub const STATISTICS_DIR: &str = "statistics";

/// Writes the nodes of `rings` under `path/statistics/` (see
/// [`publish_changed`]).
pub(crate) fn publish<C: PeerChannel>(
    xs: &mut Xenstore<'_, C>,
    path: &str,
    rings: &[RingReport],
    published: &mut BTreeMap<String, NodeValue>,
) -> Result<(), XsError> {
    publish_changed(
        xs,
        &format!("{path}/{STATISTICS_DIR}"),
        nodes(rings),
        published,
    )
}

/// Writes each of `nodes` (a name under `dir`, a value) whose value
/// differs from `published` (what was written before, updated here),
/// without waiting for xenstored (and waking it once for all of them):
/// publishing never holds up the rings for a round trip. Nodes that do
/// not fit in the xenstore ring now wait for
/// the next call. Each node is written on its own (no transaction): a
/// reader may see some nodes one publication ahead of others.
pub fn publish_changed<C: PeerChannel, N: AsRef<str>, V: PartialEq + fmt::Display>(
    xs: &mut Xenstore<'_, C>,
    dir: &str,
    nodes: impl IntoIterator<Item = (N, V)>,
    published: &mut BTreeMap<String, V>,
) -> Result<(), XsError> {
    let mut writes = xs.unacknowledged_writes();
    for (name, value) in nodes {
        let name = name.as_ref();
        if published.get(name) == Some(&value) {
            continue;
        }
        let node = format!("{dir}/{name}");
        if !writes.write(&node, value.to_string().as_bytes())? {
            return Ok(());
        }
        published.insert(name.to_string(), value);
    }
    Ok(())
}

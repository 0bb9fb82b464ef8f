//! Every hypercall counted by kind, with its operations (grant batches)
//! and the time spent in it: [`Profiled`] wraps the way into the
//! hypervisor, so no caller can make a hypercall it does not see. Under
//! nested emulation each hypercall of an HVM or PVH domain is a costly
//! exit, so calls per request is what serving costs; these counters show
//! where they go.
//!
//! Counting is plain atomic adds into a [`HypercallProfile`] (a static in
//! the kernel): nothing allocates, and the clock is a tick counter read
//! twice per call (the TSC in the kernel), turned into nanoseconds only
//! when read.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::hypercall::{Hypercall, HypercallOp, MulticallEntry};

/// What a hypercall did, as far as its cost matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallKind {
    /// `GNTTABOP_map_grant_ref` (ops: grants in the batch).
    GrantMap,
    /// `GNTTABOP_unmap_grant_ref` (ops: grants in the batch).
    GrantUnmap,
    /// `GNTTABOP_copy` (ops: copies in the batch).
    GrantCopy,
    /// Any other `grant_table_op` (setup, query).
    GrantOther,
    /// `EVTCHNOP_send` on a ring's port (a vbd's frontend).
    RingNotify,
    /// `EVTCHNOP_send` on the xenstore port (each request written).
    XenstoreNotify,
    /// `EVTCHNOP_send` on the PV console's port (each line written).
    ConsoleNotify,
    /// `EVTCHNOP_unmask`.
    EvtchnUnmask,
    /// Any other `event_channel_op` (bind, close, ...).
    EvtchnOther,
    /// `SCHEDOP_poll`: a sleep until an event (its time is mostly asleep).
    SchedPoll,
    /// `SCHEDOP_yield`.
    SchedYield,
    /// `SCHEDOP_block`.
    SchedBlock,
    /// Any other `sched_op` (shutdown).
    SchedOther,
    /// `memory_op`.
    Memory,
    /// `console_io`: the hypervisor's own console.
    ConsoleIo,
    /// Everything else (`hvm_op`, `vcpu_op`, `xen_version`).
    Other,
}

/// Kinds of hypercall told apart.
pub const HYPERCALL_KINDS: usize = 16;

impl HypercallKind {
    /// Every kind, in the order of [`HypercallProfile`]'s counters.
    pub const ALL: [HypercallKind; HYPERCALL_KINDS] = [
        Self::GrantMap,
        Self::GrantUnmap,
        Self::GrantCopy,
        Self::GrantOther,
        Self::RingNotify,
        Self::XenstoreNotify,
        Self::ConsoleNotify,
        Self::EvtchnUnmask,
        Self::EvtchnOther,
        Self::SchedPoll,
        Self::SchedYield,
        Self::SchedBlock,
        Self::SchedOther,
        Self::Memory,
        Self::ConsoleIo,
        Self::Other,
    ];

    /// The kind's node name (under `data/profile/`).
    pub fn name(self) -> &'static str {
        match self {
            Self::GrantMap => "grant-map",
            Self::GrantUnmap => "grant-unmap",
            Self::GrantCopy => "grant-copy",
            Self::GrantOther => "grant-other",
            Self::RingNotify => "ring-notify",
            Self::XenstoreNotify => "xenstore-notify",
            Self::ConsoleNotify => "console-notify",
            Self::EvtchnUnmask => "evtchn-unmask",
            Self::EvtchnOther => "evtchn-other",
            Self::SchedPoll => "sched-poll",
            Self::SchedYield => "sched-yield",
            Self::SchedBlock => "sched-block",
            Self::SchedOther => "sched-other",
            Self::Memory => "memory",
            Self::ConsoleIo => "console-io",
            Self::Other => "other",
        }
    }

    /// Whether the call's operations are a batch worth counting.
    fn batched(self) -> bool {
        matches!(self, Self::GrantMap | Self::GrantUnmap | Self::GrantCopy)
    }

    /// Whether the call's time is mostly spent asleep, not its cost.
    pub fn sleeps(self) -> bool {
        matches!(self, Self::SchedPoll | Self::SchedBlock)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// `GNTTABOP_*` numbers (public/grant_table.h).
const GNTTABOP_MAP_GRANT_REF: u64 = 0;
const GNTTABOP_UNMAP_GRANT_REF: u64 = 1;
const GNTTABOP_COPY: u64 = 5;
/// `EVTCHNOP_*` numbers (public/event_channel.h).
const EVTCHNOP_SEND: u64 = 4;
const EVTCHNOP_UNMASK: u64 = 9;
/// `SCHEDOP_*` numbers (public/sched.h).
const SCHEDOP_YIELD: u64 = 0;
const SCHEDOP_BLOCK: u64 = 1;
const SCHEDOP_POLL: u64 = 3;

/// No port named yet.
const NO_PORT: u32 = u32::MAX;

/// One kind's running totals.
struct KindCounters {
    calls: AtomicU64,
    ops: AtomicU64,
    ticks: AtomicU64,
}

/// The counters of every hypercall made through a [`Profiled`].
pub struct HypercallProfile {
    kinds: [KindCounters; HYPERCALL_KINDS],
    /// The xenstore and console ports, to tell their notifications from
    /// the rings'.
    xenstore_port: AtomicU32,
    console_port: AtomicU32,
}

impl Default for HypercallProfile {
    fn default() -> Self {
        Self::new()
    }
}

impl HypercallProfile {
    /// All counters at zero.
    pub const fn new() -> Self {
        Self {
            kinds: [const {
                KindCounters {
                    calls: AtomicU64::new(0),
                    ops: AtomicU64::new(0),
                    ticks: AtomicU64::new(0),
                }
            }; HYPERCALL_KINDS],
            xenstore_port: AtomicU32::new(NO_PORT),
            console_port: AtomicU32::new(NO_PORT),
        }
    }

    /// Names the xenstore and console ports, whose sends are counted apart
    /// from the rings'.
    pub fn name_ports(&self, xenstore: u32, console: u32) {
        self.xenstore_port.store(xenstore, Ordering::Relaxed);
        self.console_port.store(console, Ordering::Relaxed);
    }

    /// The kind of hypercall `op` with `args`, and its operations.
    /// `send_port` reads the port of an `EVTCHNOP_send` (its argument).
    fn classify(
        &self,
        op: HypercallOp,
        args: &[u64; 5],
        send_port: impl FnOnce() -> u32,
    ) -> (HypercallKind, u64) {
        let kind = match (op, args[0]) {
            (HypercallOp::GrantTable, GNTTABOP_MAP_GRANT_REF) => HypercallKind::GrantMap,
            (HypercallOp::GrantTable, GNTTABOP_UNMAP_GRANT_REF) => HypercallKind::GrantUnmap,
            (HypercallOp::GrantTable, GNTTABOP_COPY) => HypercallKind::GrantCopy,
            (HypercallOp::GrantTable, _) => HypercallKind::GrantOther,
            (HypercallOp::EventChannel, EVTCHNOP_SEND) => {
                let port = send_port();
                if port == self.xenstore_port.load(Ordering::Relaxed) {
                    HypercallKind::XenstoreNotify
                } else if port == self.console_port.load(Ordering::Relaxed) {
                    HypercallKind::ConsoleNotify
                } else {
                    HypercallKind::RingNotify
                }
            }
            (HypercallOp::EventChannel, EVTCHNOP_UNMASK) => HypercallKind::EvtchnUnmask,
            (HypercallOp::EventChannel, _) => HypercallKind::EvtchnOther,
            (HypercallOp::Sched, SCHEDOP_POLL) => HypercallKind::SchedPoll,
            (HypercallOp::Sched, SCHEDOP_YIELD) => HypercallKind::SchedYield,
            (HypercallOp::Sched, SCHEDOP_BLOCK) => HypercallKind::SchedBlock,
            (HypercallOp::Sched, _) => HypercallKind::SchedOther,
            (HypercallOp::Memory, _) => HypercallKind::Memory,
            (HypercallOp::ConsoleIo, _) => HypercallKind::ConsoleIo,
            // A multicall's calls are counted one by one (see `Profiled`).
            (
                HypercallOp::XenVersion
                | HypercallOp::Vcpu
                | HypercallOp::Hvm
                | HypercallOp::Multicall,
                _,
            ) => HypercallKind::Other,
        };
        // grant_table_op's third argument is the batch's length.
        let ops = if kind.batched() { args[2] } else { 1 };
        (kind, ops)
    }

    fn record(&self, kind: HypercallKind, ops: u64, ticks: u64) {
        let counters = &self.kinds[kind.index()];
        counters.calls.fetch_add(1, Ordering::Relaxed);
        counters.ops.fetch_add(ops, Ordering::Relaxed);
        counters.ticks.fetch_add(ticks, Ordering::Relaxed);
    }

    /// The totals so far.
    pub fn snapshot(&self) -> ProfileSnapshot {
        ProfileSnapshot {
            kinds: self.kinds.each_ref().map(|k| KindTotals {
                calls: k.calls.load(Ordering::Relaxed),
                ops: k.ops.load(Ordering::Relaxed),
                ticks: k.ticks.load(Ordering::Relaxed),
            }),
        }
    }
}

/// The hypervisor's entry, every call counted in a [`HypercallProfile`]
/// and timed by `ticks` (a monotonic counter; the kernel's TSC).
pub struct Profiled<'p, H> {
    inner: H,
    profile: &'p HypercallProfile,
    ticks: fn() -> u64,
}

impl<'p, H: Hypercall> Profiled<'p, H> {
    /// Counts the calls made through `inner` in `profile`.
    pub fn new(inner: H, profile: &'p HypercallProfile, ticks: fn() -> u64) -> Self {
        Self {
            inner,
            profile,
            ticks,
        }
    }
}

// SAFETY: every call is passed to `inner` unchanged; the only memory
// touched besides is the profile's counters and, for `EVTCHNOP_send` and
// a multicall's entries, reads of arguments the caller vouches for.
unsafe impl<H: Hypercall> Hypercall for Profiled<'_, H> {
    unsafe fn hypercall(&self, op: HypercallOp, args: [u64; 5]) -> i64 {
        if op == HypercallOp::Multicall {
            // SAFETY: the caller's guarantees are passed on unchanged.
            return unsafe { self.multicall(args) };
        }
        let (kind, ops) = self.profile.classify(op, &args, || {
            // SAFETY: the caller's contract: `EVTCHNOP_send`'s argument
            // points to a live `struct evtchn_send`, whose first field is
            // the port.
            unsafe { (args[1] as *const u32).read() }
        });
        let start = (self.ticks)();
        // SAFETY: the caller's guarantees are passed on unchanged.
        let result = unsafe { self.inner.hypercall(op, args) };
        self.profile
            .record(kind, ops, (self.ticks)().wrapping_sub(start));
        result
    }
}

impl<H: Hypercall> Profiled<'_, H> {
    /// A multicall, counted as its calls: each as a call of its kind, the
    /// trip's time given to the last (in stordom, the sleep that the
    /// notifies before it ride with), none to the others.
    ///
    /// # Safety
    /// As for [`Hypercall::hypercall`] of a multicall: `args[0]` points to
    /// `args[1]` live entries, each a call whose arguments are valid.
    unsafe fn multicall(&self, args: [u64; 5]) -> i64 {
        let start = (self.ticks)();
        // SAFETY: the caller's guarantees are passed on unchanged.
        let result = unsafe { self.inner.hypercall(HypercallOp::Multicall, args) };
        let elapsed = (self.ticks)().wrapping_sub(start);
        // SAFETY: the caller's contract: `args[1]` entries at `args[0]`,
        // alive until the call returns (it has not yet).
        let entries = unsafe {
            core::slice::from_raw_parts(args[0] as *const MulticallEntry<'_>, args[1] as usize)
        };
        for (n, entry) in entries.iter().enumerate() {
            let ticks = if n + 1 == entries.len() { elapsed } else { 0 };
            let Some(op) = HypercallOp::from_number(entry.op) else {
                self.profile.record(HypercallKind::Other, 1, ticks);
                continue;
            };
            let [a0, a1, a2, a3, a4, _] = entry.args;
            let (kind, ops) = self.profile.classify(op, &[a0, a1, a2, a3, a4], || {
                // SAFETY: as in `hypercall`: a send's argument is a live
                // `struct evtchn_send`.
                unsafe { (a1 as *const u32).read() }
            });
            self.profile.record(kind, ops, ticks);
        }
        result
    }
}

/// One kind's totals at a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindTotals {
    pub calls: u64,
    /// Operations: the grants of a batch; 1 a call for other kinds.
    pub ops: u64,
    /// Time in the calls, in ticks of the profile's clock.
    pub ticks: u64,
}

/// Every kind's totals at one time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProfileSnapshot {
    kinds: [KindTotals; HYPERCALL_KINDS],
}

impl ProfileSnapshot {
    /// The totals of `kind`.
    pub fn of(&self, kind: HypercallKind) -> KindTotals {
        self.kinds[kind.index()]
    }

    /// Calls of every kind.
    pub fn calls(&self) -> u64 {
        self.kinds.iter().map(|k| k.calls).sum()
    }

    /// Ticks in calls that do not sleep: what the hypercalls cost.
    pub fn busy_ticks(&self) -> u64 {
        HypercallKind::ALL
            .iter()
            .filter(|k| !k.sleeps())
            .map(|&k| self.of(k).ticks)
            .sum()
    }

    /// The nodes of `data/profile/` for the kinds called at least once:
    /// `<kind>/calls`, `<kind>/ns` and, for grant batches, `<kind>/ops`;
    /// and `hypercalls/calls` and `hypercalls/busy-ns` (every kind but
    /// the sleeping ones). `tsc_hz` turns ticks into nanoseconds.
    pub fn nodes(&self, tsc_hz: u64) -> Vec<(String, u64)> {
        let mut nodes = Vec::new();
        for kind in HypercallKind::ALL {
            let totals = self.of(kind);
            if totals.calls == 0 {
                continue;
            }
            let name = kind.name();
            nodes.push((format!("{name}/calls"), totals.calls));
            nodes.push((format!("{name}/ns"), ticks_to_ns(totals.ticks, tsc_hz)));
            if kind.batched() {
                nodes.push((format!("{name}/ops"), totals.ops));
            }
        }
        nodes.push(("hypercalls/calls".into(), self.calls()));
        nodes.push((
            "hypercalls/busy-ns".into(),
            ticks_to_ns(self.busy_ticks(), tsc_hz),
        ));
        nodes
    }

    /// What the calls cost per request served (`requests`), for a
    /// one-line summary.
    pub fn per_request(&self, requests: u64, tsc_hz: u64) -> PerRequest<'_> {
        PerRequest {
            snapshot: self,
            requests,
            tsc_hz,
        }
    }
}

/// `ticks` of a `tsc_hz` clock in nanoseconds (0 for an unknown clock).
pub fn ticks_to_ns(ticks: u64, tsc_hz: u64) -> u64 {
    if tsc_hz == 0 {
        return 0;
    }
    (u128::from(ticks) * 1_000_000_000 / u128::from(tsc_hz)) as u64
}

/// A snapshot shown per request: `N hypercalls (C/request, busy U
/// us/request): kind C/request U us/request [O ops/call], ...`, the kinds
/// called at least once.
pub struct PerRequest<'s> {
    snapshot: &'s ProfileSnapshot,
    requests: u64,
    tsc_hz: u64,
}

impl fmt::Display for PerRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = |total: u64| Average {
            total,
            count: self.requests,
        };
        let us = |ticks: u64| per(ticks_to_ns(ticks, self.tsc_hz) / 1000);
        let s = self.snapshot;
        write!(
            f,
            "{} hypercalls ({}/request, busy {} us/request)",
            s.calls(),
            per(s.calls()),
            us(s.busy_ticks())
        )?;
        let mut separator = ":";
        for kind in HypercallKind::ALL {
            let totals = s.of(kind);
            if totals.calls == 0 {
                continue;
            }
            write!(
                f,
                "{separator} {} {}/request {} us/request",
                kind.name(),
                per(totals.calls),
                us(totals.ticks)
            )?;
            if kind.batched() {
                let ops = Average {
                    total: totals.ops,
                    count: totals.calls,
                };
                write!(f, " {ops} ops/call")?;
            }
            separator = ",";
        }
        Ok(())
    }
}

/// `total / count` shown with two decimals (`1.25`); a count of 0 is
/// taken as 1.
pub struct Average {
    pub total: u64,
    pub count: u64,
}

impl fmt::Display for Average {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hundredths = u128::from(self.total) * 100 / u128::from(self.count.max(1));
        write!(f, "{}.{:02}", hundredths / 100, hundredths % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventChannels, Port};
    use crate::grant::{GfnWindow, GrantMapper, GrantSpec};
    use crate::held::{HeldGrants, HeldPorts};
    use crate::sim::SimXen;
    use alloc::string::ToString;
    use core::sync::atomic::AtomicU64;
    use std::cell::Cell;

    const FRONTEND: crate::DomId = 7;

    std::thread_local! {
        static NOW: Cell<u64> = const { Cell::new(0) };
    }

    /// A clock that moves 10 ticks at each read.
    fn ticking() -> u64 {
        NOW.with(|now| {
            now.set(now.get() + 10);
            now.get()
        })
    }

    /// Runs `test` with a profiled simulated Xen, its event channels, a
    /// ring's port bound to a frontend, and the next two ports named the
    /// xenstore's and the console's.
    fn with_profiled_ring(
        test: impl FnOnce(
            &SimXen,
            &Profiled<'_, &SimXen>,
            &HypercallProfile,
            &mut EventChannels<'_, &Profiled<'_, &SimXen>>,
            Port,
        ),
    ) {
        let sim = SimXen::new();
        let profile = HypercallProfile::new();
        let xen = Profiled::new(&sim, &profile, ticking);
        let held_ports = HeldPorts::<[core::sync::atomic::AtomicU32; 8]>::new();
        let mut events = EventChannels::new(&xen, sim.shared_info(), &held_ports);
        let remote = sim.remote_alloc_unbound(FRONTEND);
        let ring = events.bind_interdomain(FRONTEND, remote).unwrap();
        profile.name_ports(ring.0 + 1, ring.0 + 2);
        test(&sim, &xen, &profile, &mut events, ring);
    }

    #[test]
    fn every_kind_is_counted_with_its_batch_and_time() {
        with_profiled_ring(|sim, xen, profile, events, ring| {
            events.send(ring).unwrap();
            events.send(ring).unwrap();
            // Sends on the named ports count apart (unbound: Xen refuses them,
            // which costs the same exit).
            let _ = events.send(Port(ring.0 + 1));
            let _ = events.send(Port(ring.0 + 2));

            let grefs: Vec<_> = (0..40u8)
                .map(|i| sim.offer_grant(FRONTEND, false, &[i]))
                .collect();
            let held = HeldGrants::<[AtomicU64; 64]>::new();
            let mut grants = GrantMapper::new(&xen, GfnWindow::new(0x10_0000, 64), &held);
            let specs: Vec<_> = grefs
                .iter()
                .map(|&gref| GrantSpec {
                    domid: FRONTEND,
                    gref,
                    readonly: false,
                })
                .collect();
            let mut results = Vec::new();
            grants.map_batch(&specs, &mut results);
            let mut mappings: Vec<_> = results.into_iter().map(Result::unwrap).collect();
            grants.unmap_batch(&mut mappings, &mut Vec::new());
            crate::sched::poll(&xen, &[ring.0], 5).unwrap();

            let s = profile.snapshot();
            let totals = |calls, ops| KindTotals {
                calls,
                ops,
                ticks: calls * 10,
            };
            assert_eq!(s.of(HypercallKind::RingNotify), totals(2, 2));
            assert_eq!(s.of(HypercallKind::XenstoreNotify), totals(1, 1));
            assert_eq!(s.of(HypercallKind::ConsoleNotify), totals(1, 1));
            assert_eq!(s.of(HypercallKind::EvtchnOther), totals(1, 1), "the bind");
            assert_eq!(s.of(HypercallKind::GrantMap), totals(2, 40), "32 + 8");
            assert_eq!(s.of(HypercallKind::GrantUnmap), totals(2, 40));
            assert_eq!(s.of(HypercallKind::SchedPoll), totals(1, 1));
            assert_eq!(s.calls(), 10);
            assert_eq!(s.busy_ticks(), 90, "the poll's time is sleep");

            // At 10 ticks a microsecond (10 MHz).
            let nodes = s.nodes(10_000_000);
            let node = |name: &str| nodes.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
            assert_eq!(node("grant-map/calls"), Some(2));
            assert_eq!(node("grant-map/ops"), Some(40));
            assert_eq!(node("grant-map/ns"), Some(2000));
            assert_eq!(node("ring-notify/ops"), None, "no batch");
            assert_eq!(node("memory/calls"), None, "never called");
            assert_eq!(node("hypercalls/calls"), Some(10));
            assert_eq!(node("hypercalls/busy-ns"), Some(9000));
            assert_eq!(
                s.per_request(4, 10_000_000).to_string(),
                "10 hypercalls (2.50/request, busy 2.25 us/request): \
             grant-map 0.50/request 0.50 us/request 20.00 ops/call, \
             grant-unmap 0.50/request 0.50 us/request 20.00 ops/call, \
             ring-notify 0.50/request 0.50 us/request, \
             xenstore-notify 0.25/request 0.25 us/request, \
             console-notify 0.25/request 0.25 us/request, \
             evtchn-other 0.25/request 0.25 us/request, \
             sched-poll 0.25/request 0.25 us/request"
            );
        });
    }

    #[test]
    fn a_multicall_counts_as_its_calls_with_the_trip_given_to_the_last() {
        with_profiled_ring(|_, xen, profile, _, ring| {
            crate::sched::send_then_poll(xen, &[ring, Port(ring.0 + 1)], &[ring.0], 5).unwrap();
            let s = profile.snapshot();
            let totals = |calls, ticks| KindTotals {
                calls,
                ops: calls,
                ticks,
            };
            assert_eq!(s.of(HypercallKind::RingNotify), totals(1, 0));
            assert_eq!(s.of(HypercallKind::XenstoreNotify), totals(1, 0));
            assert_eq!(s.of(HypercallKind::SchedPoll), totals(1, 10), "the trip's");
            assert_eq!(s.of(HypercallKind::Other), totals(0, 0));
        });
    }

    #[test]
    fn other_calls_fall_into_their_kinds() {
        let sim = SimXen::new();
        let profile = HypercallProfile::new();
        let xen = Profiled::new(&sim, &profile, ticking);
        crate::hypercall::console_io_write(&xen, b"x").unwrap();
        crate::hypercall::xen_version(&xen).unwrap();
        crate::memory::map_shared_info(&xen, 0xfeff0).unwrap();
        crate::sched::shutdown(&xen, crate::sched::ShutdownReason::Poweroff).unwrap();
        let s = profile.snapshot();
        for kind in [
            HypercallKind::ConsoleIo,
            HypercallKind::Other,
            HypercallKind::Memory,
            HypercallKind::SchedOther,
        ] {
            assert_eq!(s.of(kind).calls, 1, "{kind:?}");
        }
        assert_eq!(s.calls(), 4);
        assert_eq!(ticks_to_ns(123, 0), 0, "no clock, no time");
        let names: Vec<_> = HypercallKind::ALL.iter().map(|k| k.name()).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert!(
            HypercallKind::ALL
                .iter()
                .enumerate()
                .all(|(i, k)| k.index() == i)
        );
    }
}

//! What serving costs stordom, for dom0 to read per guest request: every
//! hypercall by kind with its time (counted where hypercalls are made,
//! see `xen_pv::profile`), the serve loop's turns and sleeps, the
//! requests and segments answered, the time the loop's turns spent in each
//! phase, and the vCPU's runstate times, split between the turns and the
//! sleeps. Published
//! under `data/profile/` by the loop's housekeeping (values that changed
//! only), and summed up in one console line at shutdown.

use crate::arch::clock;
use crate::xen::{self, PortChannel};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use blkback::statistics::{self, RequestCounters};
use kernel::cpu_split::CpuSplit;
use xen_pv::profile::Average;
use xen_pv::xenstore::Xenstore;

/// Where the nodes go, under stordom's home.
const PROFILE_DIR: &str = "data/profile";

/// The phases of a serve loop turn, in order, as the profile names them.
pub const TURN_PHASES: [&str; 4] = ["intake", "rings", "toolstack", "housekeeping"];

/// What the serve loop counted since it started.
#[derive(Clone, Copy)]
pub struct LoopTotals {
    pub turns: u64,
    pub sleeps: u64,
    /// Clock time in each of [`TURN_PHASES`], ns (time Xen ran another
    /// vCPU meanwhile included).
    pub phase_ns: [u64; TURN_PHASES.len()],
    /// The vCPU's time, turns against sleeps.
    pub cpu_split: CpuSplit,
}

/// [`CpuSplit`]'s nodes.
fn cpu_split_nodes(split: &CpuSplit) -> [(String, u64); 3] {
    [
        ("running-in-turns/ns".into(), split.running_in_turns_ns),
        ("running-in-sleeps/ns".into(), split.running_in_sleeps_ns),
        ("runnable-in-sleeps/ns".into(), split.runnable_in_sleeps_ns),
    ]
}

/// The profile's nodes as last written.
#[derive(Default)]
pub struct ServingProfile {
    published: BTreeMap<String, u64>,
}

impl ServingProfile {
    /// Writes the nodes that changed since the last call, without waiting
    /// for xenstored (see `statistics::publish_changed`): `requests`,
    /// `segments`, `turns`, `sleeps`, `turn-<phase>/ns`,
    /// `cpu/{running,runnable,blocked}` (ns), [`CpuSplit`]'s
    /// `running-in-turns/ns`, `running-in-sleeps/ns` and
    /// `runnable-in-sleeps/ns`, and each hypercall kind's
    /// `calls`, `ns` (and `ops`).
    pub fn publish(
        &mut self,
        xs: &mut Xenstore<'static, PortChannel>,
        totals: LoopTotals,
        answered: &RequestCounters,
    ) {
        let mut nodes = xen::hypercall_profile().nodes(clock::tsc_hz());
        nodes.extend([
            ("requests".into(), answered.answered),
            ("segments".into(), answered.segments),
            ("turns".into(), totals.turns),
            ("sleeps".into(), totals.sleeps),
        ]);
        nodes.extend(
            TURN_PHASES
                .iter()
                .zip(totals.phase_ns)
                .map(|(phase, ns)| (alloc::format!("turn-{phase}/ns"), ns)),
        );
        nodes.extend(cpu_split_nodes(&totals.cpu_split));
        if let Some(cpu) = xen::cpu_times() {
            nodes.extend([
                ("cpu/running".into(), cpu.running),
                ("cpu/runnable".into(), cpu.runnable),
                ("cpu/blocked".into(), cpu.blocked),
            ]);
        }
        // The connection's failure shows on its own in the loop's next pass.
        let _ = statistics::publish_changed(xs, PROFILE_DIR, nodes, &mut self.published);
    }
}

/// Logs the profile since boot in one line: `profile: N requests (S
/// segments/request), T turns and Z sleeps/request, turns' time per
/// request: intake .. us, ...; cpu ...; H hypercalls (...)`.
pub fn log_summary(totals: LoopTotals, answered: &RequestCounters) {
    let requests = answered.answered;
    let per = |total: u64| Average {
        total,
        count: requests,
    };
    let cpu: Vec<String> = xen::cpu_times()
        .map(|t| {
            [
                ("run", t.running),
                ("wait", t.runnable),
                ("blocked", t.blocked),
            ]
            .iter()
            .map(|(name, ns)| alloc::format!("{name}={}ms", ns / 1_000_000))
            .collect()
        })
        .unwrap_or_default();
    let split = totals.cpu_split;
    let phases: Vec<String> = TURN_PHASES
        .iter()
        .zip(totals.phase_ns)
        .map(|(phase, ns)| alloc::format!("{phase} {} us", per(ns / 1000)))
        .collect();
    log::info!(
        "profile: {requests} requests ({} segments/request), {} turns and {} sleeps/request, turns' time per request: {}; cpu {} (per request: running {} us in turns and {} us in sleeps, runnable {} us in sleeps); {}",
        per(answered.segments),
        per(totals.turns),
        per(totals.sleeps),
        phases.join(", "),
        cpu.join(" "),
        per(split.running_in_turns_ns / 1000),
        per(split.running_in_sleeps_ns / 1000),
        per(split.runnable_in_sleeps_ns / 1000),
        xen::hypercall_profile().per_request(requests, clock::tsc_hz()),
    );
}

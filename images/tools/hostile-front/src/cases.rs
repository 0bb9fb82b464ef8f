//! The named attack cases, each with the outcome stordom must produce,
//! and the checks every case ends with (see [`run_case`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use blkback::blkif::{self, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY};
use blkback::persistent::MAX_PERSISTENT_GRANTS_PER_RING;
use host_fuzz::FuzzRng;

use crate::dom0::{Dom0, wait_up_to};
use crate::front::{AttachOptions, HostileFront, Response, Segment, frontend_write, wait_node};

/// How hard some cases push (smaller in the host tests).
#[derive(Clone, Copy, Debug)]
pub struct CaseConfig {
    /// Requests of `grant_per_request` (above the persistent limit, so
    /// least-recently-used grants are purged).
    pub fresh_grants: usize,
    /// Notifications of `event_storm`.
    pub storm_events: usize,
    /// Requests of `request_rewritten`.
    pub rewritten_requests: usize,
    /// Grants the backend may hold above the baseline after a case: other
    /// frontends' requests in flight (0 when this frontend is alone).
    pub grant_slack: u64,
    /// Heap bytes the backend may hold above the baseline after a case;
    /// `None`: not checked (the host tests, where the engine shares the
    /// test's heap).
    pub heap_slack: Option<u64>,
}

impl CaseConfig {
    /// Under Xen.
    pub const FULL: CaseConfig = CaseConfig {
        fresh_grants: MAX_PERSISTENT_GRANTS_PER_RING + 200,
        storm_events: 20_000,
        rewritten_requests: 2_000,
        grant_slack: 0,
        heap_slack: Some(HEAP_SLACK),
    };
}

/// Heap bytes stordom may hold above a case's baseline under Xen: the
/// published figure is sampled while the statistics of the other vbds
/// are being written.
pub const HEAP_SLACK: u64 = 4096;

type CaseFn = fn(&mut dyn Dom0, u32, &CaseConfig) -> Result<String, String>;

/// A named attack.
pub struct Case {
    pub name: &'static str,
    run: CaseFn,
}

/// Every named case, in the order `all` runs them.
pub const CASES: &[Case] = &[
    Case {
        name: "ring_overrun",
        run: ring_overrun,
    },
    Case {
        name: "ring_backwards",
        run: ring_backwards,
    },
    Case {
        name: "ring_wrap",
        run: ring_wrap,
    },
    Case {
        name: "request_rewritten",
        run: request_rewritten,
    },
    Case {
        name: "bad_operation",
        run: bad_operation,
    },
    Case {
        name: "segment_count",
        run: segment_count,
    },
    Case {
        name: "indirect_count",
        run: indirect_count,
    },
    Case {
        name: "indirect_garbage",
        run: indirect_garbage,
    },
    Case {
        name: "first_after_last",
        run: first_after_last,
    },
    Case {
        name: "last_past_page",
        run: last_past_page,
    },
    Case {
        name: "past_disk_end",
        run: past_disk_end,
    },
    Case {
        name: "bad_grant",
        run: bad_grant,
    },
    Case {
        name: "revoked_grant",
        run: revoked_grant,
    },
    Case {
        name: "readonly_grant",
        run: readonly_grant,
    },
    Case {
        name: "grant_per_request",
        run: grant_per_request,
    },
    Case {
        name: "event_storm",
        run: event_storm,
    },
    Case {
        name: "responses_never_consumed",
        run: responses_never_consumed,
    },
    Case {
        name: "xenstore_churn",
        run: xenstore_churn,
    },
    Case {
        name: "detach_in_flight",
        run: detach_in_flight,
    },
];

/// The device ids the cases use: none an xl config names.
pub const FIRST_DEVID: u32 = 0x7000;

/// Runs `case` on vbd `devid`, then checks what every case must leave:
/// stordom's domain still there, a fresh vbd (`devid + 1`) answering a
/// good read, and stordom's mapped grants and heap back to the baseline
/// taken before the case (see [`after_case`]).
pub fn run_case(
    d: &mut dyn Dom0,
    case: &Case,
    devid: u32,
    config: &CaseConfig,
) -> Result<String, String> {
    let baseline = Baseline::take(d);
    let detail = (case.run)(d, devid, config)?;
    let heap = after_case(d, devid + 1, &baseline, config)?;
    Ok(format!("{detail}; {heap}"))
}

/// What stordom holds before a case, as it publishes it.
pub struct Baseline {
    grants: Option<u64>,
    heap: Option<u64>,
}

impl Baseline {
    pub fn take(d: &mut dyn Dom0) -> Self {
        Baseline {
            grants: d.grants_mapped(),
            heap: d.heap_in_use(),
        }
    }
}

/// The checks after a case (and after a campaign): stordom alive, a
/// fresh vbd served, within 10 s its mapped grants back to the baseline
/// plus `grant_slack` and (when `heap_slack` is set) its heap in use back
/// to the baseline plus `heap_slack`. Says what the heap did.
pub fn after_case(
    d: &mut dyn Dom0,
    devid: u32,
    baseline: &Baseline,
    config: &CaseConfig,
) -> Result<String, String> {
    if !d.backend_alive() {
        return Err("stordom's domain is gone".into());
    }
    let mut front = HostileFront::attach(d, devid, AttachOptions::default())
        .map_err(|e| format!("a fresh vbd afterwards: {e}"))?;
    let read = front.good_read(d, 8, 4);
    front.detach(d)?;
    read.map_err(|e| format!("a fresh vbd afterwards: {e}"))?;
    back_to(
        "mapped grants",
        d,
        baseline.grants,
        config.grant_slack,
        |d| d.grants_mapped(),
    )?;
    let Some(slack) = config.heap_slack else {
        return Ok("heap not checked".into());
    };
    let heap = back_to("heap bytes in use", d, baseline.heap, slack, |d| {
        d.heap_in_use()
    })?;
    Ok(format!(
        "heap in use {heap} bytes, {} before",
        baseline.heap.unwrap_or_default()
    ))
}

/// Waits up to 10 s for `what` (read by `now`) to fall back to
/// `baseline` + `slack`; gives the value it fell to.
fn back_to(
    what: &str,
    d: &mut dyn Dom0,
    baseline: Option<u64>,
    slack: u64,
    mut read: impl FnMut(&mut dyn Dom0) -> Option<u64>,
) -> Result<u64, String> {
    let Some(baseline) = baseline else {
        return Err(format!("stordom publishes no figure of its {what}"));
    };
    let mut now = None;
    let back = wait_up_to(d, 10, |d| {
        now = read(d);
        Ok(now.filter(|&n| n <= baseline + slack))
    })?;
    back.ok_or_else(|| {
        format!("stordom's {what}: {now:?} 10 s after the case, {baseline} before (slack {slack})")
    })
}

fn attach(d: &mut dyn Dom0, devid: u32) -> Result<HostileFront, String> {
    HostileFront::attach(d, devid, AttachOptions::default())
}

/// Whole-page segments of the first `n` data pages.
fn whole_pages(front: &HostileFront, n: usize) -> Vec<Segment> {
    front.data[..n]
        .iter()
        .map(|g| Segment::whole(g.gref))
        .collect()
}

/// Sends `requests` and checks that each is refused (BLKIF_RSP_ERROR or
/// EOPNOTSUPP), once.
fn expect_refused(
    front: &mut HostileFront,
    d: &mut dyn Dom0,
    requests: Vec<(u64, Vec<u8>)>,
) -> Result<usize, String> {
    let mut ids: BTreeSet<u64> = requests.iter().map(|(id, _)| *id).collect();
    let entries: Vec<Vec<u8>> = requests.into_iter().map(|(_, e)| e).collect();
    for r in front.exchange(d, &entries)? {
        if !ids.remove(&r.id) {
            return Err(format!("response {r:?}: no such request outstanding"));
        }
        if r.status != RSP_ERROR && r.status != RSP_EOPNOTSUPP {
            return Err(format!(
                "request {} got status {} (not refused)",
                r.id, r.status
            ));
        }
    }
    Ok(entries.len())
}

/// Waits for the backend to give up on the frontend (Closing or Closed)
/// with a reason in its `error` node, and returns the reason.
pub(crate) fn expect_disconnected(
    front: &HostileFront,
    d: &mut dyn Dom0,
) -> Result<String, String> {
    wait_node(d, &format!("{}/state", front.backend_path), &["5", "6"], 10)?;
    match d.xs_read(&format!("{}/error", front.backend_path)) {
        Some(why) if !why.is_empty() => Ok(format!("disconnected: {why}")),
        _ => Err("disconnected with no reason in the error node".into()),
    }
}

/// Checks that the backend's state is a valid XenbusState (1-6), whatever
/// the frontend wrote to its own.
pub(crate) fn expect_valid_backend_state(
    front: &HostileFront,
    d: &mut dyn Dom0,
) -> Result<(), String> {
    let state = front.backend_state(d);
    if matches!(state.as_deref(), Some("1" | "2" | "3" | "4" | "5" | "6")) {
        Ok(())
    } else {
        Err(format!("backend state {state:?}"))
    }
}

/// Ends a case that broke its ring: close and detach.
fn finish_disconnected(front: HostileFront, d: &mut dyn Dom0) -> Result<String, String> {
    let why = expect_disconnected(&front, d);
    let detached = front.detach(d);
    let why = why?;
    detached?;
    Ok(why)
}

fn ring_overrun(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let beyond = front.req_prod_pvt.wrapping_add(front.size + 7);
    front.force_req_prod(d, beyond);
    let ahead = front.size + 7;
    finish_disconnected(front, d).map(|why| format!("req_prod {ahead} ahead of the ring: {why}"))
}

fn ring_backwards(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    front.good_read(d, 0, 2)?;
    let behind = front.req_prod_pvt.wrapping_sub(5);
    front.force_req_prod(d, behind);
    finish_disconnected(front, d).map(|why| format!("req_prod moved 5 back: {why}"))
}

fn ring_wrap(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let options = AttachOptions {
        start: u32::MAX - 40,
        ..AttachOptions::default()
    };
    let mut front = HostileFront::attach(d, devid, options)?;
    for n in 0..64u64 {
        front.good_read(d, n * 8 % (front.sectors - 16), 2)?;
    }
    let at = front.req_prod_pvt;
    front.detach(d)?;
    Ok(format!(
        "indices wrapped past u32::MAX, 64 good reads answered (req_prod now {at})"
    ))
}

/// The bytes a rewriting thread alternates in one slot: from offset 16
/// (sector and segments; the first 16 are where the response goes).
const REWRITTEN_FROM: usize = 16;

fn request_rewritten(d: &mut dyn Dom0, devid: u32, config: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    front.check_slot_rest = false;
    let mut rng = FuzzRng::new(0x5eed_f11b);
    let (mut sent, mut okay) = (0, 0);
    while sent < config.rewritten_requests {
        let batch = 16.min(config.rewritten_requests - sent);
        let mut slots = Vec::new();
        let mut reads = Vec::new();
        for i in 0..batch {
            let seg = Segment::whole(front.data[i].gref);
            let sector = rng.below(front.sectors - 8);
            let (id, good) = front.rw_request(blkif::OP_READ, sector, 1, &[seg]);
            let bad_seg = Segment {
                gref: seg.gref,
                first_sect: 7,
                last_sect: 0,
            };
            let (_, bad) = front.rw_request(blkif::OP_READ, front.sectors - 1, 1, &[bad_seg]);
            front.prepare_read(&[seg]);
            slots.push((front.slot_address(front.req_prod_pvt), good.clone(), bad));
            front.put(&good);
            reads.push((id, seg));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let rewriter = spawn_rewriter(slots, stop.clone());
        front.push(d);
        let got = front.await_responses(d, batch, 10);
        stop.store(true, Ordering::Relaxed);
        rewriter
            .join()
            .map_err(|_| "the rewriting thread panicked")?;
        let got = got?;
        if got.len() != batch {
            return Err(format!(
                "{} of {batch} rewritten requests answered",
                got.len()
            ));
        }
        for r in &got {
            let Some(&(_, seg)) = reads.iter().find(|(id, _)| *id == r.id) else {
                return Err(format!("response {r:?} names no request"));
            };
            if ![RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP].contains(&r.status) {
                return Err(format!("response {r:?}: not a blkif status"));
            }
            okay += usize::from(r.status == RSP_OKAY);
            front.check_read(0, &[seg], None)?;
        }
        sent += batch;
    }
    front.check_slot_rest = true;
    front.good_read(d, 0, 4)?;
    front.detach(d)?;
    Ok(format!(
        "{sent} requests rewritten while read, {okay} okay, no foreign byte in any page"
    ))
}

/// A thread that writes the two versions of each slot's bytes from
/// [`REWRITTEN_FROM`] in turn until `stop`.
fn spawn_rewriter(
    slots: Vec<(usize, Vec<u8>, Vec<u8>)>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut turn = false;
        while !stop.load(Ordering::Relaxed) {
            for (address, good, bad) in &slots {
                let bytes = if turn { bad } else { good };
                for (k, &b) in bytes.iter().enumerate().skip(REWRITTEN_FROM) {
                    let at = (*address + k) as *mut u8;
                    // SAFETY: `address` is a slot of the ring page, which
                    // the frontend holds until after this thread is joined;
                    // the slot is ENTRY_SIZE_X86_64 bytes, `bytes` no longer.
                    unsafe { at.write_volatile(b) };
                }
            }
            turn = !turn;
        }
    })
}

fn bad_operation(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let segs = whole_pages(&front, 1);
    front.prepare_read(&segs);
    let ops = [4u8, 7, 8, 9, 100, 255];
    let requests = ops
        .iter()
        .map(|&op| front.rw_request(op, 0, 1, &segs))
        .collect();
    let n = expect_refused(&mut front, d, requests)?;
    front.check_read(0, &segs, Some(false))?;
    front.detach(d)?;
    Ok(format!("{n} requests of operations {ops:?} refused"))
}

fn segment_count(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let segs = whole_pages(&front, 11);
    front.prepare_read(&segs);
    let counts = [0u8, 12, 200, 255];
    let requests = counts
        .iter()
        .map(|&n| front.rw_request(blkif::OP_READ, 0, n, &segs))
        .collect();
    let n = expect_refused(&mut front, d, requests)?;
    front.check_read(0, &segs, Some(false))?;
    front.detach(d)?;
    Ok(format!("{n} requests of {counts:?} segments refused"))
}

fn indirect_count(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let max = front.max_indirect;
    if max == 0 {
        front.detach(d)?;
        return Err("stordom advertises no indirect segments".into());
    }
    let list = front.data[0].gref;
    let segs: Vec<Segment> = front.data[1..]
        .iter()
        .cycle()
        .take(usize::from(max) + 1)
        .map(|g| Segment::whole(g.gref))
        .collect();
    front.write_indirect_page(list, &segs);
    let counts = [0u16, max + 1, 4096, u16::MAX];
    let requests = counts
        .iter()
        .map(|&n| front.indirect_request(blkif::OP_READ, 0, n, &[list]))
        .collect();
    let n = expect_refused(&mut front, d, requests)?;
    front.detach(d)?;
    Ok(format!(
        "{n} indirect requests of {counts:?} segments (limit {max}) refused"
    ))
}

fn indirect_garbage(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let mut rng = FuzzRng::new(0x06a7_ba9e);
    let lists: Vec<u32> = front.data[..4].iter().map(|g| g.gref).collect();
    for &list in &lists {
        front.with_page(list, |page| rng.fill(page));
    }
    let mut requests: Vec<(u64, Vec<u8>)> = lists
        .iter()
        .map(|&list| front.indirect_request(blkif::OP_READ, 0, 64, &[list]))
        .collect();
    // Listing pages that are not granted at all.
    requests.push(front.indirect_request(blkif::OP_WRITE, 0, 8, &[u32::MAX]));
    requests.push(front.indirect_request(blkif::OP_READ, 0, 600, &lists));
    let n = expect_refused(&mut front, d, requests)?;
    front.good_read(d, 0, 4)?;
    front.detach(d)?;
    Ok(format!(
        "{n} indirect requests with garbage or ungranted segment pages refused"
    ))
}

/// Sends a read and a write of `bad` (one segment each) and expects both
/// refused with the page untouched.
fn refused_segment(
    d: &mut dyn Dom0,
    devid: u32,
    bad: impl Fn(u32) -> Segment,
) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let read = [bad(front.data[0].gref)];
    let write = [bad(front.data[1].gref)];
    front.prepare_read(&read);
    front.prepare_write(0, &write);
    let requests = vec![
        front.rw_request(blkif::OP_READ, 0, 1, &read),
        front.rw_request(blkif::OP_WRITE, 0, 1, &write),
    ];
    expect_refused(&mut front, d, requests)?;
    front.check_read(0, &read, Some(false))?;
    front.good_read(d, 0, 1)?;
    front.detach(d)?;
    Ok(format!("read and write of segment {:?} refused", read[0]))
}

fn first_after_last(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    refused_segment(d, devid, |gref| Segment {
        gref,
        first_sect: 5,
        last_sect: 2,
    })
}

fn last_past_page(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    refused_segment(d, devid, |gref| Segment {
        gref,
        first_sect: 3,
        last_sect: 8,
    })?;
    refused_segment(d, devid + 2, |gref| Segment {
        gref,
        first_sect: 0,
        last_sect: 255,
    })
}

fn past_disk_end(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let segs = whole_pages(&front, 1);
    front.prepare_read(&segs);
    // Writes carry the untouched filler past the end: on a slice of a
    // disk, a write that escaped would show in the neighbour (the
    // hardware scenario checks the sectors around its slice).
    let write_segs = [Segment::whole(front.data[1].gref)];
    front.prepare_write(front.sectors, &write_segs);
    let end = front.sectors;
    let starts = [end - 4, end, end + 1, u64::MAX - 3, u64::MAX];
    let mut requests: Vec<(u64, Vec<u8>)> = starts
        .iter()
        .flat_map(|&s| {
            [
                front.rw_request(blkif::OP_READ, s, 1, &segs),
                front.rw_request(blkif::OP_WRITE, s, 1, &write_segs),
            ]
        })
        .collect();
    for (s, n) in [(end - 1, 8), (u64::MAX - 1, 16), (0, u64::MAX)] {
        requests.push(front.discard_request(s, n));
    }
    let n = expect_refused(&mut front, d, requests)?;
    front.check_read(0, &segs, Some(false))?;
    front.good_read(d, end - 8, 1)?;
    front.detach(d)?;
    Ok(format!(
        "{n} reads, writes and discards past the end or wrapping 64 bits refused, \
         the last sectors intact"
    ))
}

fn bad_grant(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let grefs = [0u32, 7, 0x7fff_ffff, u32::MAX];
    let requests = grefs
        .iter()
        .flat_map(|&gref| [blkif::OP_READ, blkif::OP_WRITE].map(|op| (gref, op)))
        .map(|(gref, op)| front.rw_request(op, 0, 1, &[Segment::whole(gref)]))
        .collect();
    let n = expect_refused(&mut front, d, requests)?;
    front.good_read(d, 0, 2)?;
    front.detach(d)?;
    Ok(format!(
        "{n} reads and writes of never-granted refs {grefs:?} refused"
    ))
}

fn revoked_grant(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let grant = d.grant(false)?;
    let gref = grant.gref;
    d.revoke(grant);
    let requests = vec![
        front.rw_request(blkif::OP_READ, 0, 1, &[Segment::whole(gref)]),
        front.rw_request(blkif::OP_WRITE, 0, 1, &[Segment::whole(gref)]),
    ];
    let n = expect_refused(&mut front, d, requests)?;
    front.good_read(d, 0, 2)?;
    front.detach(d)?;
    Ok(format!("{n} requests on revoked ref {gref} refused"))
}

fn readonly_grant(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let segs = [Segment::whole(front.readonly.gref)];
    front.prepare_read(&segs);
    let read = vec![front.rw_request(blkif::OP_READ, 16, 1, &segs)];
    expect_refused(&mut front, d, read)?;
    front.check_read(16, &segs, Some(false))?;
    // Writing from a read-only grant is what read-only grants are for.
    front.prepare_write(16, &segs);
    let (id, write) = front.rw_request(blkif::OP_WRITE, 16, 1, &segs);
    let got = front.exchange(d, &[write])?;
    let want = Response {
        id,
        operation: blkif::OP_WRITE,
        status: RSP_OKAY,
    };
    if got[0] != want {
        return Err(format!("a write from the read-only grant got {:?}", got[0]));
    }
    front.good_read(d, 16, 1)?;
    front.detach(d)?;
    Ok("a read into a read-only grant refused, the page untouched; a write from it served".into())
}

fn grant_per_request(d: &mut dyn Dom0, devid: u32, config: &CaseConfig) -> Result<String, String> {
    let baseline = d.grants_mapped().unwrap_or(0);
    let options = AttachOptions {
        persistent: true,
        ..AttachOptions::default()
    };
    let mut front = HostileFront::attach(d, devid, options)?;
    // The ring, the persistent grants, and the pages of requests in flight.
    let bound = baseline + config.grant_slack + 1 + MAX_PERSISTENT_GRANTS_PER_RING as u64 + 64;
    let mut most = 0;
    for n in 0..config.fresh_grants {
        let fresh = d.grant(false)?;
        let old = std::mem::replace(&mut front.data[0], fresh);
        d.revoke(old);
        front.good_read(d, (n as u64 * 8) % (front.sectors - 8), 1)?;
        if n % 64 == 0 {
            let mapped = d.grants_mapped().unwrap_or(0);
            most = most.max(mapped);
            if mapped > bound {
                return Err(format!(
                    "after {n} fresh grants stordom maps {mapped}, bound {bound}"
                ));
            }
        }
    }
    front.detach(d)?;
    Ok(format!(
        "{} reads each on a fresh grant, persistent grants on: at most {most} mapped (bound {bound})",
        config.fresh_grants
    ))
}

fn event_storm(d: &mut dyn Dom0, devid: u32, config: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    for n in 0..config.storm_events {
        d.notify(front.port);
        if n % 2000 == 0 {
            front.good_read(d, 0, 1)?;
        }
    }
    front.good_read(d, 0, 4)?;
    front.detach(d)?;
    Ok(format!(
        "{} notifications with no request, reads served throughout",
        config.storm_events
    ))
}

fn responses_never_consumed(
    d: &mut dyn Dom0,
    devid: u32,
    _: &CaseConfig,
) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let rounds = 8;
    for round in 0..rounds {
        for i in 0..front.size as usize {
            let seg = Segment::whole(front.data[i % front.data.len()].gref);
            let (_, e) = front.rw_request(blkif::OP_READ, (i as u64 * 8) % 1024, 1, &[seg]);
            front.put(&e);
        }
        front.push(d);
        // Wait until all are answered, reading only rsp_prod: the
        // responses stay unread and the next round writes over them.
        let want = front.req_prod_pvt;
        let answered = wait_up_to(d, 10, |_| {
            let rsp_prod = front.header().rsp_prod.load(Ordering::Acquire);
            if rsp_prod.wrapping_sub(front.rsp_cons) > front.size * (round + 1) {
                return Err(format!(
                    "rsp_prod {rsp_prod} ran past the requests ({want})"
                ));
            }
            Ok((rsp_prod == want).then_some(()))
        })?;
        if answered.is_none() {
            return Err(format!("round {round}: not every request answered in 10 s"));
        }
    }
    // Recover: skip what was never read, as a frontend that restarts its
    // reading would.
    front.rsp_cons = front.header().rsp_prod.load(Ordering::Acquire);
    front.good_read(d, 0, 4)?;
    front.detach(d)?;
    Ok(format!(
        "{rounds} full rings answered with none read back, then served again"
    ))
}

fn xenstore_churn(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let fe = front.frontend_path.clone();
    let changes = [
        ("ring-ref", "4294967296"),
        ("ring-ref", "x"),
        ("event-channel", "-1"),
        ("event-channel", "99999999999999999999999"),
        ("ring-page-order", "31"),
        ("ring-page-order", "banana"),
        ("multi-queue-num-queues", "65535"),
        ("protocol", "x86_32-abi"),
        ("protocol", "arm-abi"),
        ("feature-persistent", "2"),
    ];
    // After connect these nodes mean nothing until the next connect: the
    // ring must go on working.
    for (name, value) in changes {
        frontend_write(d, &fe, name, value)?;
        d.settle();
        front.good_read(d, 0, 1)?;
    }
    d.xs_rm(&format!("{fe}/ring-ref"));
    d.xs_rm(&format!("{fe}/event-channel"));
    front.good_read(d, 0, 1)?;
    // State flapping, with the nodes broken: whatever stordom does, it
    // must end up in a valid state and take a proper reconnect.
    for state in [
        "1", "5", "3", "4", "2", "7", "abc", "", "6", "3", "4", "1", "5",
    ] {
        frontend_write(d, &fe, "state", state)?;
        d.settle();
    }
    expect_valid_backend_state(&front, d).map_err(|e| format!("{e} after the flapping"))?;
    frontend_write(d, &fe, "state", "6")?;
    wait_node(d, &format!("{}/state", front.backend_path), &["6"], 10)?;
    let error = d.xs_read(&format!("{}/error", front.backend_path));
    // Reconnect with good nodes, on the same ring page made anew.
    front.reset_ring(0);
    for (name, value) in [
        ("ring-ref", front.ring_gref().to_string()),
        ("event-channel", front.port.to_string()),
        ("protocol", "x86_64-abi".to_string()),
    ] {
        frontend_write(d, &fe, name, &value)?;
    }
    for node in ["ring-page-order", "multi-queue-num-queues"] {
        d.xs_rm(&format!("{fe}/{node}"));
    }
    frontend_write(d, &fe, "state", "1")?;
    wait_node(d, &format!("{}/state", front.backend_path), &["2"], 10)?;
    frontend_write(d, &fe, "state", "3")?;
    wait_node(d, &format!("{}/state", front.backend_path), &["4"], 10)?;
    front.good_read(d, 0, 4)?;
    front.detach(d)?;
    Ok(format!(
        "{} node changes and 13 state flaps (last error node {error:?}), then reconnected and served",
        changes.len() + 2
    ))
}

fn detach_in_flight(d: &mut dyn Dom0, devid: u32, _: &CaseConfig) -> Result<String, String> {
    let mut front = attach(d, devid)?;
    let list = front.data[0].gref;
    let segs: Vec<Segment> = front.data[1..]
        .iter()
        .cycle()
        .take(usize::from(front.max_indirect.min(64)))
        .map(|g| Segment::whole(g.gref))
        .collect();
    front.write_indirect_page(list, &segs);
    let n = front.size as usize;
    for _ in 0..n {
        let (_, e) = front.indirect_request(blkif::OP_READ, 0, segs.len() as u16, &[list]);
        front.put(&e);
    }
    front.push(d);
    // Gone at once, as a destroyed guest: grants ended, nodes removed,
    // without waiting for any answer.
    let (backend_path, frontend_path) = (front.backend_path.clone(), front.frontend_path.clone());
    front.release(d);
    crate::front::remove_vbd(d, &backend_path, &frontend_path)?;
    Ok(format!(
        "{n} requests of {} segments in flight when the frontend vanished; the vbd was removed",
        segs.len()
    ))
}

//! The random campaign: requests generated from a seed, each a valid
//! request or a mutation of one (operation, segment count, sector range,
//! segment sectors, grant refs, indirect pages) or a discard past the
//! disk's end, sent in batches; every
//! answer checked against what the generator knows the request to be.
//! Between batches the ring and xenstore state are mutated too: the
//! header's fields the backend must not trust are scribbled on; the
//! frontend's nodes are changed to garbage or removed after connect (the
//! ring must go on serving); its state is flapped through valid and
//! invalid values (the backend must stay in a valid state and close when
//! told); the ring indices are broken (the vbd must close with a reason).
//! After a flap or a break the vbd is attached again, and rings may start
//! just short of the indices' wrap. The same seed sends the same requests
//! and mutations.

use blkback::blkif::{self, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY};
use host_fuzz::FuzzRng;

use crate::cases::{
    Baseline, CaseConfig, after_case, expect_disconnected, expect_valid_backend_state,
};
use crate::dom0::Dom0;
use crate::front::{AttachOptions, DATA_PAGES, HostileFront, Segment, frontend_write};

/// Requests in flight at once.
const BATCH: usize = 16;
/// One batch in this many breaks the ring instead.
const RING_BREAK_ODDS: u64 = 128;
/// One batch in this many changes the frontend's xenstore nodes instead;
/// one such change in `STATE_FLAP_ODDS` flaps its state.
const XENSTORE_ODDS: u64 = 64;
const STATE_FLAP_ODDS: u64 = 4;
/// One batch in this many scribbles on the ring's header first.
const HEADER_SCRIBBLE_ODDS: u64 = 32;
/// A progress line every this many requests (a long campaign's log).
const PROGRESS_EVERY: u64 = 100_000;

/// Frontend nodes a connected backend must no longer act on: changing or
/// removing them after connect must leave the ring serving.
const CONNECTED_NODES: [&str; 11] = [
    "ring-ref",
    "ring-ref0",
    "queue-0/ring-ref",
    "event-channel",
    "queue-0/event-channel",
    "ring-page-order",
    "multi-queue-num-queues",
    "protocol",
    "feature-persistent",
    "virtual-device",
    "backend-id",
];
/// States a flapping frontend writes: every XenbusState, and garbage.
const FLAP_STATES: [&str; 13] = [
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "",
    "abc",
    "-3",
    "4294967300",
    "4 ",
];

/// What a generated request must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Okay,
    Refused,
    /// Valid or not depending on what the backend offers (a flush): any
    /// blkif status.
    Either,
}

/// A generated request.
#[derive(Debug)]
struct Generated {
    id: u64,
    entry: Vec<u8>,
    expect: Expect,
    /// A read whose pages are checked afterwards: its sector and segments.
    read: Option<(u64, Vec<Segment>)>,
    /// What was done to it, for a failure's message.
    what: String,
}

/// Counts of a campaign.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CampaignTally {
    pub sent: u64,
    pub okay: u64,
    pub refused: u64,
    /// Rings broken (each closed by stordom, then attached again).
    pub ring_breaks: u64,
    /// Times the frontend's nodes were changed or removed after connect.
    pub node_churns: u64,
    /// State flaps (each followed by a close and a fresh attach).
    pub state_flaps: u64,
    /// Times the ring's header was scribbled on.
    pub header_scribbles: u64,
    /// What stordom's heap did (see [`after_case`]).
    pub heap: String,
}

/// Runs `count` generated requests from `seed` on vbd `devid`, then the
/// checks every case ends with (`devid + 1` for the fresh vbd).
pub fn run_campaign(
    d: &mut dyn Dom0,
    devid: u32,
    seed: u64,
    count: u64,
    config: &CaseConfig,
) -> Result<CampaignTally, String> {
    let baseline = Baseline::take(d);
    let mut rng = FuzzRng::new(seed);
    let persistent = rng.one_in(2);
    let mut front = HostileFront::attach(d, devid, attach_options(&mut rng, persistent))?;
    let mut revoked = revoked_ref(d)?;
    let mut tally = CampaignTally::default();
    let mut next_progress = PROGRESS_EVERY;
    while tally.sent < count {
        if tally.sent >= next_progress {
            println!("hostile-front: seed {seed}: {tally:?}");
            next_progress += PROGRESS_EVERY;
        }
        if rng.one_in(RING_BREAK_ODDS) {
            front = break_ring(d, front, &mut rng).map_err(|e| format!("seed {seed}: {e}"))?;
            revoked = revoked_ref(d)?;
            tally.ring_breaks += 1;
            continue;
        }
        if rng.one_in(XENSTORE_ODDS) {
            if rng.one_in(STATE_FLAP_ODDS) {
                front = flap_state(d, front, &mut rng).map_err(|e| format!("seed {seed}: {e}"))?;
                revoked = revoked_ref(d)?;
                tally.state_flaps += 1;
            } else {
                churn_nodes(d, &front, &mut rng).map_err(|e| format!("seed {seed}: {e}"))?;
                tally.node_churns += 1;
            }
            continue;
        }
        if rng.one_in(HEADER_SCRIBBLE_ODDS) {
            let (req_event, rsp_event) = (rng.next_u64() as u32, rng.next_u64() as u32);
            front.scribble_header(req_event, rsp_event, &rng.bytes(48));
            tally.header_scribbles += 1;
        }
        let mut free: Vec<usize> = (0..DATA_PAGES).rev().collect();
        let mut readonly_free = true;
        let mut batch = Vec::new();
        while batch.len() < BATCH && tally.sent + (batch.len() as u64) < count {
            match generate(&mut front, &mut rng, &mut free, &mut readonly_free, revoked) {
                Some(g) => batch.push(g),
                None => break,
            }
        }
        if rng.one_in(64) {
            for _ in 0..32 {
                d.notify(front.port);
            }
        }
        let entries: Vec<Vec<u8>> = batch.iter().map(|g| g.entry.clone()).collect();
        let responses = front
            .exchange(d, &entries)
            .map_err(|e| format!("seed {seed}: {e}"))?;
        for r in responses {
            let at = batch
                .iter()
                .position(|g| g.id == r.id)
                .ok_or_else(|| format!("seed {seed}: response {r:?} names no request"))?;
            let g = batch.swap_remove(at);
            let fine = match g.expect {
                Expect::Okay => r.status == RSP_OKAY,
                Expect::Refused => r.status == RSP_ERROR || r.status == RSP_EOPNOTSUPP,
                Expect::Either => [RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP].contains(&r.status),
            };
            if !fine {
                return Err(format!(
                    "seed {seed}, request {} ({}): status {}, expected {:?}",
                    tally.sent, g.what, r.status, g.expect
                ));
            }
            if let Some((sector, segs)) = &g.read {
                front
                    .check_read(*sector, segs, Some(r.status == RSP_OKAY))
                    .map_err(|e| {
                        format!("seed {seed}, request {} ({}): {e}", tally.sent, g.what)
                    })?;
            }
            tally.sent += 1;
            if r.status == RSP_OKAY {
                tally.okay += 1;
            } else {
                tally.refused += 1;
            }
        }
    }
    front.detach(d)?;
    tally.heap = after_case(d, devid + 1, &baseline, config)?;
    Ok(tally)
}

/// Persistent grants or not, and a ring starting at 0 or just short of
/// the indices' wrap.
fn attach_options(rng: &mut FuzzRng, persistent: bool) -> AttachOptions {
    let start = if rng.one_in(4) {
        u32::MAX - rng.below(64) as u32
    } else {
        0
    };
    AttachOptions { persistent, start }
}

/// A grant ref just ended: nothing allocated afterwards may reuse it
/// before the next call.
fn revoked_ref(d: &mut dyn Dom0) -> Result<u32, String> {
    let grant = d.grant(false)?;
    let gref = grant.gref;
    d.revoke(grant);
    Ok(gref)
}

/// Moves `req_prod` more than a ring ahead or back behind what stordom
/// took, waits for it to close the vbd with a reason, and attaches it
/// again.
fn break_ring(
    d: &mut dyn Dom0,
    mut front: HostileFront,
    rng: &mut FuzzRng,
) -> Result<HostileFront, String> {
    let value = if rng.one_in(2) {
        let ahead = front.size + 1 + rng.below(1 << 20) as u32;
        front.req_prod_pvt.wrapping_add(ahead)
    } else {
        front
            .req_prod_pvt
            .wrapping_sub(1 + rng.below(u64::from(front.size)) as u32)
    };
    front.force_req_prod(d, value);
    expect_disconnected(&front, d).map_err(|e| format!("req_prod {value}: {e}"))?;
    reattach(d, front, rng)
}

/// Detaches `front` and attaches its vbd again: persistent grants as
/// before (the campaign draws that once), a ring start drawn afresh.
fn reattach(
    d: &mut dyn Dom0,
    front: HostileFront,
    rng: &mut FuzzRng,
) -> Result<HostileFront, String> {
    let (devid, persistent) = (front.devid, front.persistent);
    front.detach(d)?;
    HostileFront::attach(d, devid, attach_options(rng, persistent))
}

/// Changes or removes one to four of the frontend's nodes that mean
/// nothing after connect; the batches after it check that the ring still
/// serves.
fn churn_nodes(d: &mut dyn Dom0, front: &HostileFront, rng: &mut FuzzRng) -> Result<(), String> {
    for _ in 0..1 + rng.below(4) {
        let node = rng.pick(&CONNECTED_NODES);
        if rng.one_in(5) {
            d.xs_rm(&format!("{}/{node}", front.frontend_path));
        } else {
            let value = garbage_value(rng);
            frontend_write(d, &front.frontend_path, node, &value)
                .map_err(|e| format!("churning {node}: {e}"))?;
        }
    }
    Ok(())
}

/// A node value a hostile frontend might write: huge, negative, hex,
/// empty, long, non-numeric, with trailing junk, or plausible.
fn garbage_value(rng: &mut FuzzRng) -> String {
    match rng.below(8) {
        0 => rng.next_u64().to_string(),
        1 => format!("-{}", rng.below(1 << 40)),
        2 => String::new(),
        3 => format!("0x{:x}", rng.next_u64()),
        4 => "9".repeat(1 + rng.below(2000) as usize),
        5 => (0..1 + rng.below(64))
            .map(|_| char::from(b'!' + rng.below(94) as u8))
            .collect(),
        6 => format!("{} x", rng.below(64)),
        _ => rng.below(64).to_string(),
    }
}

/// Writes one to eight states, valid or not, to the frontend's `state`;
/// the backend must be in a valid state afterwards, close when the
/// frontend closes, and serve a fresh attach of the same vbd.
fn flap_state(
    d: &mut dyn Dom0,
    front: HostileFront,
    rng: &mut FuzzRng,
) -> Result<HostileFront, String> {
    let states: Vec<&str> = (0..1 + rng.below(8))
        .map(|_| rng.pick(&FLAP_STATES))
        .collect();
    for state in &states {
        frontend_write(d, &front.frontend_path, "state", state)?;
        if rng.one_in(2) {
            d.settle();
        }
    }
    d.settle();
    expect_valid_backend_state(&front, d)
        .map_err(|e| format!("{e} after the frontend's states {states:?}"))?;
    reattach(d, front, rng)
        .map_err(|e| format!("reattaching after the frontend's states {states:?}: {e}"))
}

/// A request from the pages in `free` (taking those it uses), or `None`
/// when too few are left for it.
fn generate(
    front: &mut HostileFront,
    rng: &mut FuzzRng,
    free: &mut Vec<usize>,
    readonly_free: &mut bool,
    revoked: u32,
) -> Option<Generated> {
    if rng.one_in(24) {
        return Some(discard_past_end(front, rng));
    }
    let indirect = front.max_indirect > 0 && rng.one_in(8);
    let op = if rng.one_in(2) {
        blkif::OP_READ
    } else {
        blkif::OP_WRITE
    };
    let listed = if indirect {
        1 + rng.below(24) as usize
    } else {
        match rng.below(20) {
            0..=9 => 1,
            10..=16 => 2 + rng.below(3) as usize,
            _ => 5 + rng.below(7) as usize,
        }
    };
    if free.len() < listed + usize::from(indirect) {
        return None;
    }
    let mut segs: Vec<Segment> = (0..listed)
        .map(|_| {
            let page = free.pop().expect("counted");
            let first_sect = rng.below(8) as u8;
            let last_sect = first_sect + rng.below(u64::from(8 - first_sect)) as u8;
            Segment {
                gref: front.data[page].gref,
                first_sect,
                last_sect,
            }
        })
        .collect();
    let list = indirect.then(|| front.data[free.pop().expect("counted")].gref);
    let total = |segs: &[Segment]| -> u64 {
        segs.iter()
            .map(|s| u64::from(s.last_sect.wrapping_sub(s.first_sect)) + 1)
            .sum()
    };
    let mut sector = rng.below(front.sectors - total(&segs) + 1);
    let mut operation = op;
    let mut nr_segments = listed as u64;
    let mut what = format!(
        "{} {} of {listed} segments at {sector}",
        if indirect { "indirect" } else { "direct" },
        if op == blkif::OP_READ {
            "read"
        } else {
            "write"
        }
    );
    let mutations = match rng.below(8) {
        0..=3 => 0,
        4..=6 => 1,
        _ => 2,
    };
    let mut garbage_list = false;
    for _ in 0..mutations {
        match rng.below(9) {
            0 => {
                operation = rng.pick(&[4, 7, 8, 9, 0x80, 0xff]);
                what += &format!(", operation {operation}");
            }
            1 => {
                nr_segments = if indirect {
                    let max = u64::from(front.max_indirect);
                    let far = max + 1 + rng.below(4096);
                    rng.pick(&[0, max + 1, far, u64::from(u16::MAX)])
                } else {
                    rng.pick(&[0, 12, 13, 200, 255])
                };
                what += &format!(", nr_segments {nr_segments}");
            }
            2 if nr_segments > 1 && nr_segments <= segs.len() as u64 => {
                // Fewer segments than listed: still a valid request.
                nr_segments = 1 + rng.below(nr_segments - 1);
                segs.truncate(nr_segments as usize);
                what += &format!(", only {nr_segments} segments");
            }
            3 => {
                let s = rng.below(segs.len() as u64) as usize;
                segs[s].first_sect = 1 + rng.below(7) as u8;
                segs[s].last_sect = rng.below(u64::from(segs[s].first_sect)) as u8;
                what += &format!(", segment {s} backwards");
            }
            4 => {
                let s = rng.below(segs.len() as u64) as usize;
                segs[s].last_sect = 8 + rng.below(248) as u8;
                what += &format!(", segment {s} past its page");
            }
            5 => {
                let end = front.sectors;
                sector = match rng.below(4) {
                    0 => end.saturating_sub(total(&segs)) + 1 + rng.below(8),
                    1 => end,
                    2 => u64::MAX - rng.below(16),
                    _ => rng.next_u64() | 1 << 63,
                };
                what += &format!(", sector {sector}");
            }
            6 => {
                let s = rng.below(segs.len() as u64) as usize;
                segs[s].gref = if *readonly_free && rng.one_in(2) {
                    *readonly_free = false;
                    front.readonly.gref
                } else {
                    rng.pick(&[0, u32::MAX, 0x7fff_ffff, revoked])
                };
                what += &format!(", segment {s} on ref {}", segs[s].gref);
            }
            7 if indirect => {
                garbage_list = true;
                what += ", garbage indirect page";
            }
            8 => {
                operation = blkif::OP_FLUSH_DISKCACHE;
                what += ", a flush";
            }
            _ => {}
        }
    }
    let flush = operation == blkif::OP_FLUSH_DISKCACHE;
    let expect = if flush {
        // A flush ignores its segments, and the backend may not offer it.
        Expect::Either
    } else {
        let max_segments = if indirect {
            u64::from(front.max_indirect)
        } else {
            blkif::MAX_SEGMENTS_PER_REQUEST as u64
        };
        let counted = (1..=max_segments).contains(&nr_segments);
        let usable = |s: &Segment| {
            let pooled = front.data.iter().any(|g| g.gref == s.gref);
            // Persistent grants are mapped writable (as Linux blkback
            // maps them), so a read-only one then serves nothing.
            let readable =
                s.gref == front.readonly.gref && operation == blkif::OP_WRITE && !front.persistent;
            (pooled || readable)
                && s.first_sect <= s.last_sect
                && s.last_sect <= blkif::LAST_SECTOR_IN_PAGE
        };
        let named = &segs[..(nr_segments as usize).min(segs.len())];
        let fits = sector
            .checked_add(total(named))
            .is_some_and(|end| end <= front.sectors);
        let valid = [blkif::OP_READ, blkif::OP_WRITE].contains(&operation)
            && counted
            && named.iter().all(usable)
            && fits
            && !garbage_list;
        if valid { Expect::Okay } else { Expect::Refused }
    };
    let writing = op == blkif::OP_WRITE && !flush;
    if writing {
        front.prepare_write(sector, &segs);
    } else {
        front.prepare_read(&segs);
    }
    let (id, entry) = match list {
        Some(list) => {
            if garbage_list {
                front.with_page(list, |page| rng.fill(page));
            } else {
                front.write_indirect_page(list, &segs);
            }
            front.indirect_request(operation, sector, nr_segments as u16, &[list])
        }
        None => front.rw_request(operation, sector, nr_segments as u8, &segs),
    };
    let read = (op == blkif::OP_READ && !flush && expect != Expect::Either && !garbage_list)
        .then_some((sector, segs));
    Some(Generated {
        id,
        entry,
        expect,
        read,
        what,
    })
}

/// A discard that does not fit the disk (one that fits would zero what
/// the pattern says is there): refused, or not offered at all.
fn discard_past_end(front: &mut HostileFront, rng: &mut FuzzRng) -> Generated {
    let end = front.sectors;
    let (sector, sectors) = match rng.below(3) {
        0 => (end - rng.below(8), 9 + rng.below(64)),
        1 => (end + rng.below(1 << 20), 1 + rng.below(64)),
        _ => (u64::MAX - rng.below(64), 65 + rng.below(64)),
    };
    let (id, entry) = front.discard_request(sector, sectors);
    Generated {
        id,
        entry,
        expect: Expect::Refused,
        read: None,
        what: format!("discard of {sectors} sectors at {sector}"),
    }
}

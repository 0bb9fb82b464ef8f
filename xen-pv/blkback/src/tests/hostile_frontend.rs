//! The ring engine against a hostile frontend, from a seed: mutations of
//! valid requests of every ABI (operations, segment counts, sector ranges
//! past the end or overflowing, bad, revoked, read-only and other guests'
//! grants, garbage indirect pages, flipped bytes), ring indices moved out
//! of bounds, frontends that stop reading responses, with or without
//! persistent grants. After every step: every request answered at most
//! once with a valid status (OKAY only when it was valid), no response
//! byte but the response's own fields (XSA-216), a broken ring
//! disconnected with a reason, the bystander on another vbd still served,
//! and the mapped grants back to the bystander's once the frontend closed.

use alloc::collections::BTreeMap;

use super::*;

const HOSTILE: DomId = FRONTEND;
const BYSTANDER: DomId = 8;
/// The hostile vbd's `cached` disk: 2048 sectors, flushes, discards.
const HOSTILE_SECTORS: u64 = 2048;

/// What a grant reference the frontend names really is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GrantKind {
    Writable,
    ReadOnly,
    /// Never granted, revoked, or granted by another domain.
    Unusable,
}

/// The answer a generated request must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Okay,
    Refused,
    /// Bytes were flipped or a page holds garbage: any valid status.
    Either,
}

/// A request the hostile frontend sends, and what it must get back.
struct Sent {
    expect: Expect,
    /// The operation the response must carry, when known.
    operation: Option<u8>,
    /// The request as generated, for a failure's message.
    what: String,
}

/// The hostile frontend's requests: those not yet answered, and what was.
#[derive(Default)]
struct Ledger {
    outstanding: BTreeMap<u64, Sent>,
    sent: u64,
    okay: u64,
    refused: u64,
}

/// The hostile frontend's grants.
struct GrantPool {
    refs: Vec<(u32, GrantKind)>,
}

impl GrantPool {
    fn new(front: &SimBlkfront<'_>, sim: &SimXen, foreign: u32) -> GrantPool {
        let mut refs: Vec<(u32, GrantKind)> = (0..6)
            .map(|_| (front.grant(false, &[]), GrantKind::Writable))
            .chain((0..2).map(|_| (front.grant(true, &pattern(3)), GrantKind::ReadOnly)))
            .collect();
        let revoked = front.grant(false, &[]);
        assert!(sim.revoke_grant(HOSTILE, revoked));
        let unusable = [revoked, foreign, 0, 9_999_999, u32::MAX];
        refs.extend(unusable.iter().map(|&gref| (gref, GrantKind::Unusable)));
        GrantPool { refs }
    }

    /// Mostly a writable grant, now and then any other.
    fn pick(&self, rng: &mut FuzzRng) -> (u32, GrantKind) {
        if rng.one_in(6) {
            rng.pick(&self.refs)
        } else {
            self.refs[rng.below(6) as usize]
        }
    }

    /// Revokes a grant the backend does not hold mapped (Xen refuses the
    /// others), as a frontend ending access between requests would.
    fn revoke_one(&mut self, sim: &SimXen, rng: &mut FuzzRng) {
        let at = rng.below(self.refs.len() as u64) as usize;
        let (gref, kind) = self.refs[at];
        if kind != GrantKind::Unusable && sim.revoke_grant(HOSTILE, gref) {
            self.refs[at].1 = GrantKind::Unusable;
        }
    }
}

/// A segment, valid or not, and whether it is.
fn hostile_segment(
    rng: &mut FuzzRng,
    pool: &GrantPool,
    usable: impl Fn(GrantKind) -> bool,
) -> (Seg, bool) {
    let (gref, kind) = pool.pick(rng);
    let first_sect = if rng.one_in(20) {
        rng.below(256) as u8
    } else {
        rng.below(8) as u8
    };
    let last_sect = match rng.below(20) {
        0 => rng.below(256) as u8,
        1 => first_sect.wrapping_sub(1),
        _ => first_sect.max(rng.below(8) as u8),
    };
    let valid = usable(kind) && first_sect <= last_sect && last_sect <= blkif::LAST_SECTOR_IN_PAGE;
    (seg(gref, first_sect, last_sect), valid)
}

/// `listed` segments and a start sector: the segments, whether each is
/// valid, the sector, and whether the sectors they cover fit the disk.
fn hostile_transfer(
    rng: &mut FuzzRng,
    pool: &GrantPool,
    listed: usize,
    usable: impl Fn(GrantKind) -> bool + Copy,
) -> (Vec<Seg>, Vec<bool>, u64, bool) {
    let (segs, valid_segs): (Vec<Seg>, Vec<bool>) = (0..listed)
        .map(|_| hostile_segment(rng, pool, usable))
        .unzip();
    let sectors = segs
        .iter()
        .map(|s| u64::from(s.last_sect.wrapping_sub(s.first_sect)) + 1)
        .sum();
    let (sector, fits) = hostile_sector(rng, sectors);
    (segs, valid_segs, sector, fits)
}

/// A start sector for `sectors` sectors: inside, at the end, past it, or
/// overflowing 64 bits; and whether the range fits the disk.
fn hostile_sector(rng: &mut FuzzRng, sectors: u64) -> (u64, bool) {
    let room = HOSTILE_SECTORS.saturating_sub(sectors);
    let sector = match rng.below(12) {
        0 => room,
        1 => room + 1 + rng.below(64),
        2 => u64::MAX - rng.below(sectors.max(1).saturating_mul(2)),
        3 => rng.next_u64(),
        _ => rng.below(room + 1),
    };
    let fits = sector
        .checked_add(sectors)
        .is_some_and(|end| end <= HOSTILE_SECTORS);
    (sector, fits)
}

/// A segment count: mostly a valid one, sometimes zero or too many.
fn hostile_count(rng: &mut FuzzRng, max: u64) -> u64 {
    match rng.below(16) {
        0 => 0,
        1 => max + 1 + rng.below(8),
        2 => rng.below(u64::from(u16::MAX) + 1),
        _ => 1 + rng.below(max),
    }
}

/// One hostile request with id `id`: its bytes and what it must get.
fn hostile_request(
    rng: &mut FuzzRng,
    front: &SimBlkfront<'_>,
    pool: &GrantPool,
    persistent: bool,
    id: u64,
) -> (Vec<u8>, Sent) {
    // Persistent grants are mapped writable, so read-only grants fail then.
    let writable_for = |write: bool| {
        move |kind: GrantKind| match kind {
            GrantKind::Writable => true,
            GrantKind::ReadOnly => write && !persistent,
            GrantKind::Unusable => false,
        }
    };
    let okay_if = |valid: bool| if valid { Expect::Okay } else { Expect::Refused };
    let (bytes, sent) = match rng.below(10) {
        0..=4 => {
            let operation = if rng.one_in(12) {
                let unknown = 9 + rng.below(247) as u8;
                rng.pick(&[4, 7, 8, 0xff, unknown])
            } else {
                rng.pick(&[blkif::OP_READ, blkif::OP_WRITE, blkif::OP_WRITE_BARRIER])
            };
            let write = operation != blkif::OP_READ;
            let count = hostile_count(rng, blkif::MAX_SEGMENTS_PER_REQUEST as u64).min(255);
            let listed = (count as usize).min(blkif::MAX_SEGMENTS_PER_REQUEST);
            let (segs, valid_segs, sector, fits) =
                hostile_transfer(rng, pool, listed, writable_for(write));
            let valid_data = valid_segs.iter().all(|v| *v) && fits;
            let valid = match operation {
                blkif::OP_READ | blkif::OP_WRITE => {
                    (1..=listed as u64).contains(&count) && valid_data
                }
                blkif::OP_WRITE_BARRIER => count == 0 || (count <= listed as u64 && valid_data),
                _ => false,
            };
            let bytes = front.data_request(operation, id, sector, count as u8, &segs);
            (
                bytes,
                Sent {
                    expect: okay_if(valid),
                    operation: Some(operation),
                    what: format!(
                        "data op {operation} count {count} sector {sector:#x} segs {segs:?} valid {valid_segs:?} persistent {persistent}"
                    ),
                },
            )
        }
        5..=6 => {
            let inner = if rng.one_in(12) {
                rng.pick(&[blkif::OP_WRITE_BARRIER, blkif::OP_FLUSH_DISKCACHE, 0xff])
            } else {
                rng.pick(&[blkif::OP_READ, blkif::OP_WRITE])
            };
            let write = inner == blkif::OP_WRITE;
            let count = hostile_count(rng, 256);
            let listed = (count as usize).min(256);
            let (segs, valid_segs, sector, fits) =
                hostile_transfer(rng, pool, listed, writable_for(write));
            let (list, list_usable, garbage) = match rng.below(12) {
                0 => (pool.pick(rng).0, false, false),
                1 => {
                    let mut garbage = rng.bytes(PAGE_SIZE);
                    while names_the_ring(&garbage, front) {
                        garbage = rng.bytes(PAGE_SIZE);
                    }
                    (front.grant(true, &garbage), true, true)
                }
                _ => (
                    front.grant(rng.one_in(2), &segment_page(&segs)),
                    true,
                    false,
                ),
            };
            let valid = [blkif::OP_READ, blkif::OP_WRITE].contains(&inner)
                && (1..=256).contains(&count)
                && list_usable
                && valid_segs.iter().all(|v| *v)
                && fits;
            let mut pages = [list; blkif::MAX_INDIRECT_PAGES_PER_REQUEST];
            pages[1..]
                .iter_mut()
                .for_each(|p| *p = rng.next_u64() as u32);
            let bytes = front.indirect_request(inner, id, sector, count as u16, &pages);
            let expect = match garbage && inner <= blkif::OP_WRITE && (1..=256).contains(&count) {
                true => Expect::Either,
                false => okay_if(valid),
            };
            // Answered as the operation it carries, as Linux does.
            (
                bytes,
                Sent {
                    expect,
                    operation: Some(inner).filter(|_| expect == Expect::Okay),
                    what: format!(
                        "indirect op {inner} count {count} sector {sector:#x} list {list} usable {list_usable} garbage {garbage} segs {segs:?} valid {valid_segs:?} persistent {persistent}"
                    ),
                },
            )
        }
        7 => {
            let nr_sectors = match rng.below(6) {
                0 => rng.next_u64(),
                1 => u64::MAX - rng.below(4),
                2 => 0,
                _ => rng.below(HOSTILE_SECTORS + 1),
            };
            let (sector, fits) = hostile_sector(rng, nr_sectors);
            let secure = rng.one_in(8);
            let bytes = front.discard_request(id, sector, nr_sectors, secure);
            (
                bytes,
                Sent {
                    expect: okay_if(fits && !secure),
                    operation: Some(blkif::OP_DISCARD),
                    what: format!("discard {sector:#x}+{nr_sectors:#x} secure {secure}"),
                },
            )
        }
        8 => {
            let bytes = front.data_request(blkif::OP_FLUSH_DISKCACHE, id, rng.next_u64(), 0, &[]);
            (
                bytes,
                Sent {
                    expect: Expect::Okay,
                    operation: Some(blkif::OP_FLUSH_DISKCACHE),
                    what: "flush".into(),
                },
            )
        }
        _ => {
            let mut bytes = rng.bytes(front.protocol().entry_size());
            bytes[0] = rng.below(9) as u8;
            let at = id_offset(front.protocol());
            bytes[at..at + 8].copy_from_slice(&id.to_le_bytes());
            (
                bytes,
                Sent {
                    expect: Expect::Either,
                    operation: None,
                    what: "garbage".into(),
                },
            )
        }
    };
    let (bytes, sent) = flip_bytes_outside_the_id(rng, front.protocol(), bytes, sent);
    if names_the_ring(&bytes, front) {
        // Reading into its own ring page only breaks the frontend itself
        // (its responses are overwritten), which the checks here cannot
        // tell from a backend bug: send a flush instead.
        let flush = front.data_request(blkif::OP_FLUSH_DISKCACHE, id, 0, 0, &[]);
        let sent = Sent {
            expect: Expect::Okay,
            operation: Some(blkif::OP_FLUSH_DISKCACHE),
            what: "flush".into(),
        };
        return (flush, sent);
    }
    (bytes, sent)
}

/// Whether some four bytes of `bytes` could name a page of `front`'s ring
/// as a grant reference.
fn names_the_ring(bytes: &[u8], front: &SimBlkfront<'_>) -> bool {
    bytes.windows(4).any(|w| {
        let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        front.ring_refs().contains(&word)
    })
}

/// Now and then flips a few bytes of a request (never its id, so its
/// answer can still be matched).
fn flip_bytes_outside_the_id(
    rng: &mut FuzzRng,
    protocol: Protocol,
    mut bytes: Vec<u8>,
    sent: Sent,
) -> (Vec<u8>, Sent) {
    if !rng.one_in(16) {
        return (bytes, sent);
    }
    let id_at = id_offset(protocol);
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(bytes.len() as u64) as usize;
        if !(id_at..id_at + 8).contains(&at) {
            bytes[at] = rng.next_u64() as u8;
        }
    }
    let either = Sent {
        expect: Expect::Either,
        operation: None,
        what: format!("{} with bytes flipped", sent.what),
    };
    (bytes, either)
}

/// Checks the responses the frontend finds: each answers a request sent
/// and not yet answered, with a valid status that agrees with what the
/// request deserved, and carries no byte but its own fields.
fn check_responses(front: &mut SimBlkfront<'_>, ledger: &mut Ledger, closing: bool) {
    let protocol = front.protocol();
    for entry in front.raw_responses() {
        let id = u64::from_le_bytes(entry[..8].try_into().unwrap());
        let (operation, padding, status) = (
            entry[8],
            entry[9],
            i16::from_le_bytes([entry[10], entry[11]]),
        );
        let Some(sent) = ledger.outstanding.remove(&id) else {
            panic!("response to request {id:#x}, never sent or answered twice");
        };
        assert_eq!(padding, 0, "response padding of {id:#x}");
        if protocol == Protocol::X86_64 {
            assert_eq!(entry[12..16], [0; 4], "response padding of {id:#x}");
        }
        assert!([RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP].contains(&status));
        match status {
            RSP_OKAY => ledger.okay += 1,
            _ => ledger.refused += 1,
        }
        if let Some(expected) = sent.operation {
            assert_eq!(operation, expected, "operation answered for {id:#x}");
        }
        match sent.expect {
            Expect::Okay if !closing => {
                assert_eq!(
                    status, RSP_OKAY,
                    "valid request {id:#x} failed: {}",
                    sent.what
                )
            }
            Expect::Refused => assert_ne!(
                status, RSP_OKAY,
                "invalid request {id:#x} succeeded: {}",
                sent.what
            ),
            _ => {}
        }
    }
}

/// The bystander writes a page and reads it back through its own vbd.
pub(super) fn bystander_is_served(
    h: &mut Harness<'_>,
    front: &mut SimBlkfront<'_>,
    page: u32,
    round: u64,
) {
    let data = pattern(round as u8);
    front.fill(page, &data);
    let sector = (round % 16) * 8;
    let write = front.data_request(blkif::OP_WRITE, 1, sector, 1, &[seg(page, 0, 7)]);
    assert_eq!(h.io(front, &[write]), [ok(1, blkif::OP_WRITE)]);
    front.fill(page, &[0; PAGE_SIZE]);
    let read = front.data_request(blkif::OP_READ, 2, sector, 1, &[seg(page, 0, 7)]);
    assert_eq!(h.io(front, &[read]), [ok(2, blkif::OP_READ)]);
    assert_eq!(front.page(page), data, "the bystander's data");
}

/// A new ring of the hostile frontend: any ABI, indices anywhere (near
/// the wrap too), one to four pages, persistent grants or not.
fn hostile_connect<'a>(
    h: &mut Harness<'a>,
    rng: &mut FuzzRng,
    id: VbdId,
) -> (SimBlkfront<'a>, bool) {
    let persistent = rng.one_in(2);
    h.frontend_write(id, "feature-persistent", if persistent { "1" } else { "0" });
    let protocol = rng.pick(&[Protocol::X86_32, Protocol::X86_64, Protocol::native()]);
    let (near_wrap, anywhere) = (u32::MAX - rng.below(64) as u32, rng.next_u64() as u32);
    let start = rng.pick(&[0, near_wrap, anywhere]);
    let order = rng.pick(&[None, Some(0), Some(1), Some(2)]);
    let front = SimBlkfront::with_pages(h.sim, HOSTILE, protocol, start, order);
    // The last ring's page order must not outlive it.
    let stale_order = format!("{}/ring-page-order", frontend_path(id));
    h.xs.channel_mut().dom0_rm(&stale_order);
    h.publish_ring(id, &front, "3");
    assert_eq!(h.backend_state(id).as_deref(), Some("4"));
    (front, persistent)
}

/// The frontend closes; the backend answers or fails what it holds and
/// unmaps every grant of the hostile frontend.
fn hostile_close(
    h: &mut Harness<'_>,
    id: VbdId,
    front: &mut SimBlkfront<'_>,
    ledger: &mut Ledger,
    bystander_grants: usize,
) {
    h.frontend_write(id, "state", "6");
    h.pump();
    check_responses(front, ledger, true);
    ledger.outstanding.clear();
    assert_eq!(h.backend_state(id).as_deref(), Some("6"));
    assert_eq!(
        h.sim.mapped_grants(),
        bystander_grants,
        "grants left mapped"
    );
    h.frontend_write(id, "state", "1");
    h.pump();
}

/// One hostile session of `steps` steps.
fn hostile_session(h: &mut Harness<'_>, rng: &mut FuzzRng, steps: u64, ledger: &mut Ledger) {
    let (_, mut calm) = h.serve(BYSTANDER, "ram:64K", "w", Protocol::X86_64);
    let calm_page = calm.grant(false, &[]);
    bystander_is_served(h, &mut calm, calm_page, 0);
    let bystander_grants = h.sim.mapped_grants();

    let id = h.add_vbd(HOSTILE, DEVID, "cached", "w");
    h.pump();
    let (mut front, mut persistent) = hostile_connect(h, rng, id);
    let mut pool = GrantPool::new(&front, h.sim, calm_page);
    let mut next_id = 0u64;
    for step in 0..steps {
        // A second a step: the log's rate limit lets each step speak.
        let now = h.platform.now_ns.get();
        h.platform.now_ns.set(now + LOG_WINDOW_NS);
        if rng.one_in(25) {
            // req_prod beyond the ring or behind what was taken.
            let size = front.ring_size();
            let delta = match rng.below(3) {
                0 => size + 1 + rng.below(1 << 20) as u32,
                1 => (1 + rng.below(u64::from(size)) as u32).wrapping_neg(),
                _ => rng.next_u64() as u32 | 0x8000_0000,
            };
            h.pump();
            check_responses(&mut front, ledger, false);
            front.shift_req_prod(delta);
            h.pump();
            assert_eq!(
                h.backend_state(id).as_deref(),
                Some("5"),
                "a broken ring is closed"
            );
            assert!(h.backend_node(id, "error").is_some(), "with a reason");
            bystander_is_served(h, &mut calm, calm_page, step);
            hostile_close(h, id, &mut front, ledger, bystander_grants);
            (front, persistent) = hostile_connect(h, rng, id);
            pool = GrantPool::new(&front, h.sim, calm_page);
            continue;
        }
        let batch: Vec<Vec<u8>> = (0..1 + rng.below(40))
            .map(|_| {
                next_id += 1;
                let id = next_id | rng.next_u64() << 32;
                let (bytes, sent) = hostile_request(rng, &front, &pool, persistent, id);
                ledger.sent += 1;
                ledger.outstanding.insert(id, sent);
                bytes
            })
            .collect();
        let queued = front.submit(&batch);
        for unsent in &batch[queued..] {
            let at = id_offset(front.protocol());
            let unsent_id = u64::from_le_bytes(unsent[at..at + 8].try_into().unwrap());
            ledger.outstanding.remove(&unsent_id);
            ledger.sent -= 1;
        }
        h.pump();
        // Now and then the frontend leaves its responses unread.
        if !rng.one_in(8) {
            check_responses(&mut front, ledger, false);
            assert!(ledger.outstanding.is_empty(), "requests left unanswered");
        }
        if rng.one_in(6) {
            pool.revoke_one(h.sim, rng);
        }
        if rng.one_in(4) {
            bystander_is_served(h, &mut calm, calm_page, step);
        }
    }
    hostile_close(h, id, &mut front, ledger, bystander_grants);
    bystander_is_served(h, &mut calm, calm_page, steps);
}

#[test]
fn fuzz_ring_engine_against_a_hostile_frontend() {
    let mut run = FuzzRun::new("ring engine", 0x0405_711e, 40);
    let mut rng = run.rng();
    let mut ledger = Ledger::default();
    while run.another() {
        run_with_window(4096, |h| hostile_session(h, &mut rng, 60, &mut ledger));
    }
    let Ledger {
        sent,
        okay,
        refused,
        ..
    } = ledger;
    std::println!(
        "fuzz ring engine: {sent} hostile requests, {okay} answered OKAY, {refused} refused"
    );
}

/// XSA-155: a frontend thread rewrites its ring's request slots while the
/// backend reads them. Each request is copied out once and judged on that
/// copy, so whatever the bytes were, nothing panics, the bystander is
/// served, and closing leaves nothing of the frontend's mapped.
#[test]
fn requests_rewritten_while_the_backend_reads_them_harm_nobody() {
    run(|h| {
        let (_, mut calm) = h.serve(BYSTANDER, "ram:64K", "w", Protocol::X86_64);
        let calm_page = calm.grant(false, &[]);
        bystander_is_served(h, &mut calm, calm_page, 0);
        let bystander_grants = h.sim.mapped_grants();
        let (id, mut front) = h.serve(HOSTILE, "cached", "w", Protocol::X86_64);
        let pool = GrantPool::new(&front, h.sim, calm_page);
        let ring_page = h.sim.grant_page_ptr(HOSTILE, front.ring_refs()[0]).unwrap();
        let ring_address = ring_page.as_ptr() as usize;
        let stop = core::sync::atomic::AtomicBool::new(false);
        let mut rng = FuzzRng::new(0x155);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut scribbles = FuzzRng::new(0x155_0001);
                while !stop.load(core::sync::atomic::Ordering::Relaxed) {
                    // Past the 64-byte header: the slots, not the indices.
                    let offset = 64 + scribbles.below(PAGE_SIZE as u64 - 64) as usize;
                    let byte = scribbles.next_u64() as u8;
                    // SAFETY: the ring page stays granted (never revoked)
                    // until the scope ends; the backend reads shared ring
                    // memory with volatile byte copies, as it must for a
                    // guest writing concurrently, which this thread plays.
                    unsafe { (ring_address as *mut u8).add(offset).write_volatile(byte) };
                }
            });
            for round in 0..300u64 {
                let batch: Vec<Vec<u8>> = (0..16)
                    .map(|i| hostile_request(&mut rng, &front, &pool, false, round * 16 + i).0)
                    .collect();
                front.submit(&batch);
                h.pump();
                front.raw_responses();
                if round % 30 == 0 {
                    bystander_is_served(h, &mut calm, calm_page, round);
                }
            }
            stop.store(true, core::sync::atomic::Ordering::Relaxed);
        });
        let state = h.backend_state(id);
        let broken_with_reason = h.backend_node(id, "error").is_some();
        assert!(state.as_deref() == Some("4") || broken_with_reason);
        h.frontend_write(id, "state", "6");
        h.pump();
        assert_eq!(h.sim.mapped_grants(), bystander_grants);
        bystander_is_served(h, &mut calm, calm_page, 1);
    });
}

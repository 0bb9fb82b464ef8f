//! Hostile xenstore traffic: a frontend flooding watch events, and (from
//! a seed) a frontend churning its nodes after connect.

use alloc::collections::BTreeMap;

use super::hostile_frontend::bystander_is_served;
use super::*;
use crate::vbd::FRONTEND_TOKEN;
use xen_pv::xenstore::{MAX_QUEUED_WATCH_EVENTS, Tx};

const FLOODER: DomId = FRONTEND;
const CALM: DomId = 8;
/// Passes of the loop within which the calm vbd's every step completes
/// while the flood goes on: one to take the events, one to act.
const MAX_PASSES_PER_STEP: u64 = 3;
/// Xenstore requests one pass may make under any flood: a rescan and
/// [`VBD_UPDATES_PER_PASS`] updates of a few reads each (26 seen; a
/// state machine run per event would make hundreds under this flood).
const MAX_REQUESTS_PER_PASS: u64 = 64;

/// Writes of its nodes a flooding frontend makes between two passes.
const FLOOD_WRITES_PER_PASS: u64 = 40;

/// What a flooding frontend does between two passes: rewrites of its
/// `state` and of nodes of distinct names below it (each event with its
/// own path), and `spurious` more events of such paths.
fn flood(h: &mut Harness<'_>, id: VbdId, spurious: u64, round: u64) {
    for i in 0..FLOOD_WRITES_PER_PASS {
        h.frontend_write(id, "state", "4");
        let below = format!("state/n{}", (round * FLOOD_WRITES_PER_PASS + i) % 500);
        h.frontend_write(id, &below, &format!("{i}"));
    }
    let daemon = h.xs.channel_mut();
    let token = format!("{FRONTEND_TOKEN}{}/{}", id.frontend, id.devid);
    for i in 0..spurious {
        let path = format!("{}/state/s{i}", frontend_path(id));
        daemon.inject_watch_event(&path, &token);
    }
    daemon.inject_watch_event(&format!("{}/garbage", backend_path(id)), WATCH_TOKEN);
}

/// Runs passes, flooding before each, until `done`; returns how many it
/// took, checking that none made more than [`MAX_REQUESTS_PER_PASS`]
/// xenstore requests.
fn passes_until(
    h: &mut Harness<'_>,
    flooder: VbdId,
    spurious: u64,
    mut done: impl FnMut(&mut Harness<'_>) -> bool,
) -> u64 {
    for pass in 1..=20 {
        flood(h, flooder, spurious, pass);
        let before = h.xs.channel_mut().requests();
        h.pass();
        let requests = h.xs.channel_mut().requests() - before;
        assert!(
            requests <= MAX_REQUESTS_PER_PASS,
            "{requests} xenstore requests in one pass"
        );
        if done(h) {
            return pass;
        }
    }
    panic!("not done in 20 passes of the flood");
}

/// A frontend rewrites its nodes in a loop, and adds spurious events (with
/// 2000 a pass, the client drops events and every vbd is looked at again):
/// another guest's vbd is still attached, connected, served and detached
/// within [`MAX_PASSES_PER_STEP`] passes each, each pass makes a bounded
/// number of xenstore requests, and the flooder is served all along.
#[test]
fn a_frontend_flooding_watch_events_delays_no_other_vbd() {
    for spurious in [0, 2000] {
        run(|h| {
            let (flooder, mut flooding) = h.serve(FLOODER, "ram:64K", "w", Protocol::X86_64);
            let flooding_page = flooding.grant(false, &[]);
            let dropped = h.xs.dropped_watch_events();

            let calm = h.add_vbd(CALM, DEVID, "ram:64K", "w");
            let attached = passes_until(h, flooder, spurious, |h| {
                h.backend_state(calm).as_deref() == Some("2")
            });
            let front = SimBlkfront::new(h.sim, CALM, Protocol::X86_64, 0);
            for (name, value) in front.ring_nodes() {
                h.frontend_write(calm, &name, &value);
            }
            h.frontend_write(calm, "state", "3");
            let connected = passes_until(h, flooder, spurious, |h| {
                h.backend_state(calm).as_deref() == Some("4")
            });
            let mut calm_front = front;
            let page = calm_front.grant(false, &[]);
            let read = calm_front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(page, 0, 7)]);
            assert_eq!(calm_front.submit(&[read]), 1);
            let served = passes_until(h, flooder, spurious, |_| !calm_front.responses().is_empty());
            let read = flooding.data_request(blkif::OP_READ, 9, 0, 1, &[seg(flooding_page, 0, 7)]);
            assert_eq!(flooding.submit(&[read]), 1);
            let flooder_served =
                passes_until(h, flooder, spurious, |_| !flooding.responses().is_empty());

            h.xs.channel_mut()
                .dom0_write(&format!("{}/online", backend_path(calm)), b"0");
            h.frontend_write(calm, "state", "6");
            let detached = passes_until(h, flooder, spurious, |h| {
                h.backend_state(calm).as_deref() == Some("6")
            });
            let passes = [attached, connected, served, flooder_served, detached];
            assert!(
                passes.iter().all(|p| *p <= MAX_PASSES_PER_STEP),
                "passes per step with {spurious} spurious events a pass: {passes:?}"
            );
            let lost = h.xs.dropped_watch_events() > dropped;
            assert_eq!(lost, spurious > 0, "events dropped by the client");
            assert_eq!(
                h.vbds.status(flooder).unwrap().state,
                XenbusState::Connected
            );
        });
    }
}

/// The toolstack's events for a new vbd are pushed out of the client's
/// full queue by a flood: the dropped events make stordom look at every
/// vbd and rescan, so the vbd is found all the same.
#[test]
fn a_vbd_whose_events_the_client_dropped_is_found_all_the_same() {
    run(|h| {
        let (flooder, _) = h.serve(FLOODER, "ram:64K", "w", Protocol::X86_64);
        let calm = h.add_vbd(CALM, DEVID, "ram:64K", "w");
        let token = format!("{FRONTEND_TOKEN}{}/{}", flooder.frontend, flooder.devid);
        for i in 0..MAX_QUEUED_WATCH_EVENTS + 8 {
            let path = format!("{}/state/s{i}", frontend_path(flooder));
            h.xs.channel_mut().inject_watch_event(&path, &token);
        }
        // A request of stordom's queues every event that came before its
        // reply: the toolstack's, first, are dropped.
        let dropped = h.xs.dropped_watch_events();
        h.xs.read(Tx::NONE, "backend").unwrap_or_default();
        assert!(
            h.xs.dropped_watch_events() > dropped + 8,
            "the toolstack's events dropped"
        );
        h.pass();
        h.pass();
        assert_eq!(h.backend_state(calm).as_deref(), Some("2"));
    });
}

/// The churned frontend's disk (2048 sectors, several queues).
const CHURNED_TARGET: &str = "multiqueue";
/// Blocks of one page (8 sectors) the churned frontend reads and writes.
const CHURNED_BLOCKS: u64 = 2048 / 8;
/// Data pages the honest frontend grants per connection.
const DATA_PAGES: usize = 4;
/// Connections whose heap use sets the baseline.
const HEAP_WARM_UP_CONNECTIONS: usize = 8;
/// How far stordom's heap in use may rise above the baseline: the
/// client's watch-event queue (1024 entries) and message buffer keep
/// their largest capacity, which a later burst may set.
const HEAP_SLACK_BYTES: i64 = 96 * 1024;

/// Frontend nodes the churn rewrites or deletes.
const CHURNED_NODES: &[&str] = &[
    "ring-ref",
    "ring-ref0",
    "ring-ref1",
    "ring-ref3",
    "event-channel",
    "ring-page-order",
    "multi-queue-num-queues",
    "queue-0/ring-ref",
    "queue-0/event-channel",
    "queue-1/ring-ref",
    "queue-1/ring-ref0",
    "queue-1/event-channel",
    "queue-9/ring-ref",
    "protocol",
    "feature-persistent",
];

/// A request of the honest frontend not answered yet.
#[derive(Clone, Copy, Debug)]
enum Pending {
    Write { block: u64, seed: u8 },
    Read { block: u64, page: u32 },
}

/// What the churn did, for the summary.
#[derive(Default)]
struct ChurnTally {
    steps: u64,
    connections: u64,
    answered: u64,
    disconnects: u64,
    churned_connects: u64,
    live_bytes: Vec<i64>,
}

/// The honest frontend of one connection: its rings (the first carries
/// the I/O), data pages and requests in flight, and the disk as it must
/// read (block -> pattern seed; blocks not known are not checked).
struct Connection<'a> {
    fronts: Vec<SimBlkfront<'a>>,
    pages: Vec<u32>,
    pending: BTreeMap<u64, Pending>,
    next_id: u64,
    /// The backend connected to churned nodes: whatever it took for a
    /// ring (this one in another ABI, a data page), its responses mean
    /// nothing to this frontend any more.
    churned: bool,
}

/// A value for a churned node: changed, non-numeric, huge, empty, or a
/// grant of the frontend that is no ring.
fn churned_value(rng: &mut FuzzRng, connection: &Connection<'_>) -> String {
    match rng.below(9) {
        0 => format!("{}", rng.next_u64() as u32),
        1 => format!("{}", rng.below(8)),
        2 => rng
            .pick(&["x", "4x", "-1", " 3", "0x10", "x86_64-abi", "x86_32-abi"])
            .into(),
        3 => "9".repeat(1 + rng.below(40) as usize),
        4 => "7".repeat(1000 + rng.below(1000) as usize),
        5 => String::new(),
        6 => format!("{}", rng.pick(&connection.pages)),
        7 => format!("{}", connection.fronts[0].ring_refs()[0] + 1),
        _ => {
            let len = 1 + rng.below(16) as usize;
            String::from_utf8_lossy(&rng.bytes(len)).into_owned()
        }
    }
}

/// Rewrites or deletes one of the frontend's ring nodes.
fn churn_a_node(h: &mut Harness<'_>, rng: &mut FuzzRng, id: VbdId, connection: &Connection<'_>) {
    let name = rng.pick(CHURNED_NODES);
    if rng.one_in(4) {
        let node = format!("{}/{name}", frontend_path(id));
        h.xs.channel_mut().dom0_rm(&node);
    } else {
        let value = churned_value(rng, connection);
        h.frontend_write(id, name, &value);
    }
}

/// Watch events nobody caused: the frontend's and the backend's tokens
/// with paths and ids of every kind.
fn spurious_events(h: &mut Harness<'_>, rng: &mut FuzzRng, id: VbdId) {
    let token_of = |frontend: &str| format!("{FRONTEND_TOKEN}{frontend}");
    let frontend_tokens = [
        token_of(&format!("{}/{}", id.frontend, id.devid)),
        token_of("99/1"),
        token_of("x/y"),
        token_of(""),
    ];
    let backend_paths = [
        backend_path(id),
        format!("{}/state", backend_path(id)),
        "backend/vbd".into(),
        "backend/vbd/42/768".into(),
        "backend/vbd/x/y/z".into(),
        "/local/domain/1/backend/vbd/7".into(),
        "elsewhere".into(),
    ];
    for _ in 0..1 + rng.below(20) {
        let daemon = h.xs.channel_mut();
        if rng.one_in(2) {
            let path = format!("{}/state/{}", frontend_path(id), rng.below(100));
            let token = &frontend_tokens[rng.below(frontend_tokens.len() as u64) as usize];
            daemon.inject_watch_event(&path, token);
        } else {
            let path = &backend_paths[rng.below(backend_paths.len() as u64) as usize];
            daemon.inject_watch_event(path, WATCH_TOKEN);
        }
    }
}

impl<'a> Connection<'a> {
    /// The honest frontend connects: one or two queues, any ABI, ring
    /// size and indices, persistent grants or not.
    fn connect(h: &mut Harness<'a>, rng: &mut FuzzRng, id: VbdId) -> Connection<'a> {
        let persistent = rng.one_in(2);
        h.frontend_write(id, "feature-persistent", if persistent { "1" } else { "0" });
        let protocol = rng.pick(&[Protocol::X86_32, Protocol::X86_64]);
        let order = rng.pick(&[None, Some(0), Some(1), Some(2)]);
        let queues = 1 + rng.below(2) as usize;
        let fronts: Vec<SimBlkfront<'a>> = (0..queues)
            .map(|_| {
                let near_wrap = u32::MAX - rng.below(64) as u32;
                let start = rng.pick(&[0, near_wrap]);
                SimBlkfront::with_pages(h.sim, id.frontend, protocol, start, order)
            })
            .collect();
        if queues > 1 {
            h.frontend_write(id, "multi-queue-num-queues", &format!("{queues}"));
        }
        for (queue, front) in fronts.iter().enumerate() {
            for (name, value) in front.ring_nodes() {
                let shared = name == "protocol" || name == "ring-page-order";
                let name = match queues {
                    1 => name,
                    _ if shared => name,
                    _ => format!("queue-{queue}/{name}"),
                };
                h.frontend_write(id, &name, &value);
            }
        }
        h.frontend_write(id, "state", rng.pick(&["3", "4"]));
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("4"), "honest connect");
        let pages = (0..DATA_PAGES)
            .map(|_| fronts[0].grant(false, &[]))
            .collect();
        Connection {
            fronts,
            pages,
            pending: BTreeMap::new(),
            next_id: 0,
            churned: false,
        }
    }

    /// Puts up to [`DATA_PAGES`] writes and reads of distinct blocks on
    /// the ring, without letting the backend see them yet.
    fn submit(&mut self, rng: &mut FuzzRng, disk: &BTreeMap<u64, u8>) {
        let mut blocks: Vec<u64> = Vec::new();
        let mut batch = Vec::new();
        for &page in &self.pages[..1 + rng.below(DATA_PAGES as u64) as usize] {
            let block = rng.below(CHURNED_BLOCKS);
            if blocks.contains(&block) {
                continue;
            }
            blocks.push(block);
            self.next_id += 1;
            let (id, front) = (self.next_id, &self.fronts[0]);
            let (operation, pending) = if rng.one_in(2) || !disk.contains_key(&block) {
                let seed = rng.next_u64() as u8;
                front.fill(page, &pattern(seed));
                (blkif::OP_WRITE, Pending::Write { block, seed })
            } else {
                front.fill(page, &[0xee; PAGE_SIZE]);
                (blkif::OP_READ, Pending::Read { block, page })
            };
            let request = front.data_request(operation, id, block * 8, 1, &[seg(page, 0, 7)]);
            batch.push(request);
            self.pending.insert(id, pending);
        }
        let queued = self.fronts[0].submit(&batch);
        assert_eq!(queued, batch.len(), "the ring had room");
    }

    /// Checks the responses on the ring: each answers a request in flight,
    /// once; OKAY with the right data, or (only once `connected` is
    /// false) an error.
    fn check_responses(
        &mut self,
        disk: &mut BTreeMap<u64, u8>,
        connected: bool,
        tally: &mut ChurnTally,
    ) {
        if self.churned {
            self.fronts[0].raw_responses();
            self.pending.clear();
            return;
        }
        for response in self.fronts[0].responses() {
            let pending = self.pending.remove(&response.id);
            let pending = pending.unwrap_or_else(|| panic!("stray response {response:?}"));
            tally.answered += 1;
            if response.status != RSP_OKAY {
                assert!(!connected, "{pending:?} failed on a connected vbd");
                if let Pending::Write { block, .. } = pending {
                    disk.remove(&block);
                }
                continue;
            }
            match pending {
                Pending::Write { block, seed } => {
                    disk.insert(block, seed);
                }
                Pending::Read { block, page } => {
                    if let Some(&seed) = disk.get(&block) {
                        let data = self.fronts[0].page(page);
                        assert!(data == pattern(seed), "block {block} read back wrong");
                    }
                }
            }
        }
    }

    /// The frontend is done with this connection: what was never answered
    /// leaves its block unknown; its grants are revoked (they must all be
    /// unmapped by now).
    fn end(self, h: &mut Harness<'_>, disk: &mut BTreeMap<u64, u8>) {
        for pending in self.pending.values() {
            if let Pending::Write { block, .. } = pending {
                disk.remove(block);
            }
        }
        let rings = self
            .fronts
            .iter()
            .flat_map(|f| f.ring_refs().iter().copied());
        for gref in rings.chain(self.pages.iter().copied()) {
            assert!(
                h.sim.revoke_grant(FRONTEND, gref),
                "grant {gref} still mapped"
            );
        }
    }
}

/// The vbd's backend directory, if it exists.
fn backend_dir_exists(h: &mut Harness<'_>, id: VbdId) -> bool {
    h.xs.channel_mut().dom0_read(&backend_path(id)).is_some()
}

/// The frontend closes (or the vbd is gone), everything is answered or
/// given up, every grant is back, the frontend's directory is clean and
/// the backend waits in InitWait again; then stordom's heap is sampled.
fn reset(
    h: &mut Harness<'_>,
    id: VbdId,
    connection: Connection<'_>,
    disk: &mut BTreeMap<u64, u8>,
    bystander_grants: usize,
    tally: &mut ChurnTally,
) {
    let mut connection = connection;
    h.frontend_write(id, "state", "6");
    h.pump();
    connection.check_responses(disk, false, tally);
    if backend_dir_exists(h, id) {
        assert_eq!(h.backend_state(id).as_deref(), Some("6"), "closed");
    }
    assert_eq!(
        h.sim.mapped_grants(),
        bystander_grants,
        "grants left mapped"
    );
    connection.end(h, disk);
    // The frontend's directory as blkfront finds it at boot.
    h.xs.channel_mut().dom0_rm(&frontend_path(id));
    if backend_dir_exists(h, id) {
        h.frontend_write(id, "", "");
        h.frontend_write(id, "backend", &backend_path(id));
        h.frontend_write(id, "backend-id", &format!("{GUEST}"));
        h.frontend_write(id, "virtual-device", &format!("{}", id.devid));
        h.frontend_write(id, "state", "1");
    } else {
        h.add_vbd(id.frontend, id.devid, CHURNED_TARGET, "w");
        disk.clear();
    }
    h.pump();
    assert_eq!(h.backend_state(id).as_deref(), Some("2"), "InitWait again");
    assert_eq!(h.vbds.status(id).map(|s| s.connected), Some(false));
    tally.live_bytes.push(crate::alloc_count::live_bytes());
}

/// The frontend closes, churns its ring nodes, and connects again: the
/// backend connects to whatever they name or refuses with a reason.
fn connect_churned(h: &mut Harness<'_>, rng: &mut FuzzRng, id: VbdId, connection: &Connection<'_>) {
    h.frontend_write(id, "state", "6");
    h.pump();
    for _ in 0..1 + rng.below(3) {
        churn_a_node(h, rng, id, connection);
    }
    h.frontend_write(id, "state", rng.pick(&["3", "4"]));
    h.pump();
    let state = h.backend_state(id);
    let refused = state.as_deref() == Some("5") && h.backend_node(id, "error").is_some();
    assert!(
        state.as_deref() == Some("4") || refused,
        "churned connect left state {state:?}"
    );
}

/// One step of churn after connect; true if the toolstack removed the
/// vbd (a vbd added again serves a new disk).
fn churn_step(
    h: &mut Harness<'_>,
    rng: &mut FuzzRng,
    id: VbdId,
    connection: &Connection<'_>,
) -> bool {
    match rng.below(10) {
        0..=3 => churn_a_node(h, rng, id, connection),
        4..=5 => {
            let values = [
                "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "-1", "", "x",
            ];
            if rng.one_in(6) {
                let node = format!("{}/state", frontend_path(id));
                h.xs.channel_mut().dom0_rm(&node);
            } else {
                h.frontend_write(id, "state", rng.pick(&values));
            }
        }
        6 => {
            h.xs.channel_mut().dom0_rm(&backend_path(id));
            if rng.one_in(2) {
                h.pump();
                h.add_vbd(id.frontend, id.devid, CHURNED_TARGET, "w");
            }
            return true;
        }
        _ => spurious_events(h, rng, id),
    }
    false
}

/// After connect, with I/O flowing, the frontend rewrites and deletes its
/// ring, event-channel, page-order, queue, protocol and persistent-grant
/// nodes with changed, non-numeric, huge and empty values, flaps its
/// state through every value, the toolstack removes (and re-adds) the
/// backend directory, and spurious watch events fire; from a seed. After
/// every step: each request answered once, OKAY with the right data while
/// the vbd stays connected; a vbd that leaves Connected closes cleanly
/// and leaves no grant mapped; an error logged is also in the `error`
/// node; the bystander's vbd is served; and stordom's heap in use does
/// not grow from one connection to the next.
#[test]
fn fuzz_xenstore_churn_after_connect() {
    let mut run = FuzzRun::new("xenstore churn", 0xc4_0211, 400);
    let mut rng = run.rng();
    let mut tally = ChurnTally::default();
    run_with_window(4096, |h| {
        let (_, mut calm) = h.serve(CALM, "ram:64K", "w", Protocol::X86_64);
        let calm_page = calm.grant(false, &[]);
        bystander_is_served(h, &mut calm, calm_page, 0);
        let bystander_grants = h.sim.mapped_grants();
        let id = h.add_vbd(FRONTEND, DEVID, CHURNED_TARGET, "w");
        h.pump();
        let mut disk = BTreeMap::new();
        let mut connection = Connection::connect(h, &mut rng, id);
        tally.connections += 1;
        while run.another() {
            tally.steps += 1;
            // A second a step: the log's rate limit lets each step speak.
            let now = h.platform.now_ns.get();
            h.platform.now_ns.set(now + LOG_WINDOW_NS);
            let logged = h.platform.lines.len();
            connection.submit(&mut rng, &disk);
            if rng.one_in(12) {
                connect_churned(h, &mut rng, id, &connection);
                tally.churned_connects += 1;
                connection.churned = true;
                // Whatever it connected to may have written the disk.
                disk.clear();
            } else if churn_step(h, &mut rng, id, &connection) {
                h.pump();
                // Answered before the removal, or given up.
                connection.check_responses(&mut disk, false, &mut tally);
                disk.clear();
            } else {
                h.pump();
                let state = h.backend_state(id);
                let cleanly = ["4", "5", "6"].map(Some).contains(&state.as_deref());
                assert!(cleanly, "left Connected for state {state:?}");
            }
            let connected = h.backend_state(id).as_deref() == Some("4");
            connection.check_responses(&mut disk, connected, &mut tally);
            if let Some(status) = h.vbds.status(id) {
                let serving = matches!(status.state, XenbusState::Connected | XenbusState::Closing);
                assert!(!status.connected || serving, "rings in state {status:?}");
            }
            let complained = h.platform.lines[logged..]
                .iter()
                .any(|l| l.starts_with(&format!("vbd {id}: error:")));
            if complained && backend_dir_exists(h, id) {
                assert!(
                    h.backend_node(id, "error").is_some(),
                    "a reason in xenstore"
                );
            }
            if rng.one_in(5) {
                bystander_is_served(h, &mut calm, calm_page, tally.steps);
            }
            if connected && !connection.churned && rng.below(4) != 0 {
                assert!(connection.pending.is_empty(), "a connected vbd answers all");
                continue;
            }
            tally.disconnects += u64::from(!connected);
            reset(h, id, connection, &mut disk, bystander_grants, &mut tally);
            connection = Connection::connect(h, &mut rng, id);
            tally.connections += 1;
        }
        bystander_is_served(h, &mut calm, calm_page, tally.steps);
    });
    let samples = &tally.live_bytes;
    if let Some(&baseline) = samples.iter().take(HEAP_WARM_UP_CONNECTIONS).max() {
        let highest = samples.iter().copied().max().unwrap_or(baseline);
        let last = samples.last().copied().unwrap_or(baseline);
        std::println!(
            "fuzz xenstore churn: heap in use at InitWait {baseline} bytes after {HEAP_WARM_UP_CONNECTIONS} connections, at most {highest}, last {last}"
        );
        assert!(
            highest <= baseline + HEAP_SLACK_BYTES,
            "stordom's heap grew from {baseline} to {highest} bytes over {} connections",
            samples.len()
        );
    }
    let ChurnTally {
        steps,
        connections,
        answered,
        disconnects,
        churned_connects,
        ..
    } = tally;
    std::println!(
        "fuzz xenstore churn: {steps} steps, {connections} connections, {disconnects} disconnects, {churned_connects} connects to churned nodes, {answered} requests answered"
    );
}

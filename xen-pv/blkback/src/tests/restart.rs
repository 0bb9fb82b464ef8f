//! An in-place restart: an engine serving with requests in flight is
//! abandoned where it stands (forgotten, as a panic leaves it), the
//! record of what it held gives its grants and ports back, and a new
//! engine adopts the vbds: every request answered exactly once, the disk
//! as a correct run leaves it.

use alloc::collections::BTreeMap;
use core::cell::Cell;
use core::mem::{forget, replace};
use core::ptr::NonNull;

use super::*;
use xen_pv::event::EvtchnSend;
use xen_pv::grant::GrantRef;
use xen_pv::held::{Released, release_all};
use xen_pv::hypercall::{Command, HypercallOp};

/// Blocks of a kept disk, in 512-byte sectors.
const KEPT_SECTORS: u64 = 2048;
/// 4 KiB blocks the workloads use (of the disk's 256).
const BLOCKS_USED: u64 = 48;
/// Requests a guest leaves unanswered on one ring at most.
const UNANSWERED_PER_RING: usize = 12;

/// RAM that outlives engine instances, as a RAM disk's memory outlives a
/// restart: each instance opens a new disk over it. Its completions come
/// newest first (as a device with many queues may finish them), and while
/// `hold` is set the oldest of each queue is held back (a slow request):
/// requests are in flight when an instance dies, with later ones done.
pub(super) struct KeptRam {
    memory: NonNull<[u64]>,
    hold: Cell<bool>,
}

impl KeptRam {
    pub(super) fn new() -> Rc<KeptRam> {
        let words = (KEPT_SECTORS * 512 / 8) as usize;
        let memory = NonNull::from(Box::leak(vec![0u64; words].into_boxed_slice()));
        Rc::new(KeptRam {
            memory,
            hold: Cell::new(false),
        })
    }

    /// A new disk (4 queues) over the memory.
    pub(super) fn disk(self: &Rc<Self>, hal: &GrantWindowHal) -> Disk {
        // SAFETY: the memory is this KeptRam's, never moves, and lives as
        // long as the Rc the disk holds; only disks touch it.
        let ram = unsafe { RamDisk::new(hal.clone(), self.memory.cast(), 512, KEPT_SECTORS, 4) };
        Disk::new(KeptRamDisk {
            ram,
            kept: self.clone(),
            held: Vec::new(),
        })
    }
}

impl Drop for KeptRam {
    fn drop(&mut self) {
        // SAFETY: leaked from a box in `new`; the last disk over it is gone.
        drop(unsafe { Box::from_raw(self.memory.as_ptr()) });
    }
}

struct KeptRamDisk {
    ram: RamDisk<GrantWindowHal>,
    kept: Rc<KeptRam>,
    held: Vec<(u16, Completion)>,
}

impl QueuedDevice for KeptRamDisk {
    fn geometry(&self) -> Geometry {
        self.ram.geometry()
    }

    fn submit(
        &mut self,
        queue: u16,
        tag: u64,
        request: blockdev::Request<'_>,
    ) -> Result<(), SubmitError> {
        self.ram.submit(queue, tag, request)
    }

    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        let mut buf = [Completion::default(); 64];
        let n = self.ram.poll(queue, &mut buf);
        uncounted(|| self.held.extend(buf[..n].iter().map(|c| (queue, *c))));
        let slow = match self.kept.hold.get() {
            true => self.held.iter().position(|(q, _)| *q == queue),
            false => None,
        };
        let mut given = 0;
        for slot in out.iter_mut() {
            let newest = self.held.iter().rposition(|(q, _)| *q == queue);
            let Some(at) = newest.filter(|at| Some(*at) != slow) else {
                break;
            };
            *slot = self.held.remove(at).1;
            given += 1;
        }
        given
    }
}

impl<'a> Harness<'a> {
    /// The engine dies where it stands: nothing of it is dropped or
    /// closed. The record gives back what it held (checked against the
    /// simulated Xen), and a new engine starts over the same disks'
    /// memory and the same xenstore connection.
    fn restart(&mut self) -> Released {
        let ports_bound = self.sim.guest_interdomain_ports();
        let released = release_all(&Hypervisor(self.sim), self.held_grants, self.held_ports);
        assert_eq!(self.sim.mapped_grants(), 0, "{released:?}");
        assert_eq!(self.sim.guest_interdomain_ports(), 0);
        assert_eq!(released.ports_closed, ports_bound);
        assert_eq!((released.grants_failed, released.ports_failed), (0, 0));
        let events = EventChannels::new(
            Hypervisor(self.sim),
            self.sim.shared_info(),
            self.held_ports,
        );
        forget(replace(&mut self.events, events));
        let window = GfnWindow::new(WINDOW, self.held_grants.capacity());
        let grants = GrantMapper::new(Hypervisor(self.sim), window, self.held_grants);
        forget(replace(&mut self.grants, grants));
        let vbds = VbdBackends::new(self.spare_opener.twin());
        forget(replace(&mut self.vbds, vbds));
        self.vbds.start(&mut self.xs).unwrap();
        self.pump();
        released
    }

    /// A vbd of `target` whose frontend opens `queues` rings (persistent
    /// grants if asked), connected.
    fn attach_guest(
        &mut self,
        frontend: DomId,
        target: &str,
        queues: usize,
        persistent: bool,
    ) -> Guest<'a> {
        let id = self.add_vbd(frontend, DEVID, target, "w");
        self.pump();
        let rings: Vec<SimBlkfront<'a>> = (0..queues)
            .map(|_| SimBlkfront::new(self.sim, frontend, Protocol::X86_64, 0))
            .collect();
        if persistent {
            self.frontend_write(id, "feature-persistent", "1");
        }
        if queues > 1 {
            self.frontend_write(id, "multi-queue-num-queues", &format!("{queues}"));
        }
        for (queue, ring) in rings.iter().enumerate() {
            for (name, value) in ring.ring_nodes() {
                let node = match name.as_str() {
                    "protocol" => name,
                    _ if queues == 1 => name,
                    _ => format!("queue-{queue}/{name}"),
                };
                self.frontend_write(id, &node, &value);
            }
        }
        self.frontend_write(id, "state", "4");
        self.pump();
        assert_eq!(self.backend_state(id).as_deref(), Some("4"));
        let pages = (0..UNANSWERED_PER_RING * queues)
            .map(|_| rings[0].grant(false, &[]))
            .collect();
        Guest {
            id,
            rings,
            pages,
            busy_pages: Vec::new(),
            next_id: 1,
            unanswered: BTreeMap::new(),
            answers: BTreeMap::new(),
            blocks: BTreeMap::new(),
        }
    }
}

/// A request a guest waits for the answer of.
struct Pending {
    block: u64,
    page: usize,
    /// For a read, what the block holds (no write to it is unanswered).
    expect: Option<Vec<u8>>,
}

/// A guest that checks every answer: one per request, of the data the
/// block holds. At most one request per block is unanswered, so what a
/// correct backend leaves is known whatever order it works in.
struct Guest<'s> {
    id: VbdId,
    rings: Vec<SimBlkfront<'s>>,
    /// Its data pages (kept mapped by a persistent backend).
    pages: Vec<GrantRef>,
    busy_pages: Vec<usize>,
    next_id: u64,
    unanswered: BTreeMap<u64, Pending>,
    /// Answers seen, by request id.
    answers: BTreeMap<u64, u32>,
    /// What each written block holds.
    blocks: BTreeMap<u64, Vec<u8>>,
}

impl Guest<'_> {
    /// Publishes up to `count` random writes, barriers and reads of blocks
    /// with no unanswered request.
    fn submit(&mut self, rng: &mut FuzzRng, count: usize) {
        for _ in 0..count {
            let id = self.next_id;
            let ring = (id % self.rings.len() as u64) as usize;
            let on_ring = self
                .unanswered
                .keys()
                .filter(|r| **r % self.rings.len() as u64 == ring as u64)
                .count();
            let block = rng.below(BLOCKS_USED);
            let page = (0..self.pages.len()).find(|p| !self.busy_pages.contains(p));
            let busy = self.unanswered.values().any(|p| p.block == block);
            let (Some(page), false, true) = (page, busy, on_ring < UNANSWERED_PER_RING) else {
                continue;
            };
            let front = &mut self.rings[ring];
            let segment = [seg(self.pages[page], 0, 7)];
            let (request, expect) = match rng.below(5) {
                0 | 1 => (
                    front.data_request(blkif::OP_READ, id, block * 8, 1, &segment),
                    Some(self.blocks.get(&block).cloned().unwrap_or(vec![0; 4096])),
                ),
                operation => {
                    let data = rng.bytes(4096);
                    front.fill(self.pages[page], &data);
                    self.blocks.insert(block, data);
                    let op = match operation {
                        2 => blkif::OP_WRITE_BARRIER,
                        _ => blkif::OP_WRITE,
                    };
                    (front.data_request(op, id, block * 8, 1, &segment), None)
                }
            };
            assert_eq!(front.submit(&[request]), 1);
            self.next_id += 1;
            self.busy_pages.push(page);
            self.unanswered.insert(
                id,
                Pending {
                    block,
                    page,
                    expect,
                },
            );
        }
    }

    /// Takes the answers published: each request answered once, okay, a
    /// read with the block's data.
    fn collect(&mut self) {
        for ring in 0..self.rings.len() {
            for response in self.rings[ring].responses() {
                let id = response.id;
                let seen = self.answers.entry(id).or_default();
                *seen += 1;
                assert_eq!(*seen, 1, "request {id} of vbd {} answered twice", self.id);
                assert_eq!(response.status, RSP_OKAY, "request {id}");
                let pending = self.unanswered.remove(&id).expect("a request it made");
                if let Some(expect) = pending.expect {
                    let read = self.rings[ring].page(self.pages[pending.page]);
                    assert!(read == expect, "request {id}: read the wrong data");
                }
                self.busy_pages.retain(|p| *p != pending.page);
            }
        }
    }

    /// Every request answered, and every block reads back as written.
    fn check_all_answered_and_read_back(&mut self, h: &mut Harness<'_>) {
        h.pump();
        self.collect();
        assert!(
            self.unanswered.is_empty(),
            "vbd {}: requests {:?} never answered",
            self.id,
            self.unanswered.keys().collect::<Vec<_>>()
        );
        assert_eq!(self.answers.len() as u64, self.next_id - 1);
        let blocks: Vec<(u64, Vec<u8>)> =
            self.blocks.iter().map(|(b, d)| (*b, d.clone())).collect();
        for (block, data) in blocks {
            let target = self.rings[0].grant(false, &[]);
            let id = 1 << 40 | block;
            let read =
                self.rings[0].data_request(blkif::OP_READ, id, block * 8, 1, &[seg(target, 0, 7)]);
            assert_eq!(h.io(&mut self.rings[0], &[read]), [ok(id, blkif::OP_READ)]);
            assert!(
                self.rings[0].page(target) == data,
                "block {block} of vbd {}",
                self.id
            );
        }
    }
}

/// Two guests (one with persistent grants and two queues) with reads and
/// writes taken by the device, some answered and some published only,
/// when the engine dies; the new engine adopts both vbds.
#[test]
fn a_restarted_engine_answers_every_request_once_and_keeps_the_data() {
    run(|h| {
        let disks = h.spare_opener.kept.clone();
        let mut rng = FuzzRng::new(0x12);
        let mut plain = h.attach_guest(FRONTEND, "kept0", 1, false);
        let mut kept = h.attach_guest(FRONTEND + 1, "kept1", 2, true);
        for guest in [&mut plain, &mut kept] {
            guest.submit(&mut rng, 10);
        }
        h.pump();
        plain.collect();
        kept.collect();
        // The device holds the oldest request of each ring back: the later
        // ones are done, their answers wait for it. Then more are
        // published that the engine never takes.
        disks.iter().for_each(|d| d.hold.set(true));
        plain.submit(&mut rng, 8);
        kept.submit(&mut rng, 12);
        h.pass();
        plain.collect();
        kept.collect();
        let slow =
            h.vbds.status(plain.id).unwrap().in_flight + h.vbds.status(kept.id).unwrap().in_flight;
        assert!(slow >= 3, "{slow}: the oldest of each ring at least");
        let done_unanswered = plain.unanswered.len() + kept.unanswered.len() - slow;
        assert!(done_unanswered >= 10, "{done_unanswered}");
        plain.submit(&mut rng, 6);
        kept.submit(&mut rng, 6);
        let unanswered = (plain.unanswered.len() + kept.unanswered.len()) as u64;
        let mapped = h.sim.mapped_grants();
        let sends = h.sim.calls(HypercallOp::EventChannel, EvtchnSend::CMD);
        let released = h.restart();
        // Each adopted ring's frontend is signalled once, for answers the
        // dead engine may have put on it unsignalled (the device holds
        // the rest: nothing new is answered yet).
        assert_eq!(
            h.sim.calls(HypercallOp::EventChannel, EvtchnSend::CMD) - sends,
            3
        );
        assert_eq!(
            h.vbds.adoptions(),
            Adoptions {
                vbds: 2,
                unanswered_requests: unanswered
            }
        );
        assert_eq!(released.grants_unmapped, mapped);
        assert_eq!(released.ports_closed, 3, "one per ring");
        assert!(h.logged(&format!("vbd {}: adopted: 1 ring(s)", plain.id)));
        assert!(h.logged(&format!("vbd {}: adopted: 2 ring(s)", kept.id)));
        disks.iter().for_each(|d| d.hold.set(false));
        plain.check_all_answered_and_read_back(h);
        kept.check_all_answered_and_read_back(h);
        for id in [plain.id, kept.id] {
            assert_eq!(h.backend_state(id).as_deref(), Some("4"));
            assert_eq!(h.backend_node(id, "error"), None);
        }
    });
}

/// A seeded random workload abandoned after each of its steps in turn,
/// each time adopted by a new engine: the same checks at every point.
#[test]
fn restarts_at_every_step_of_a_random_workload_lose_and_repeat_nothing() {
    const STEPS: u64 = 10;
    for stop in 1..=STEPS {
        run(|h| {
            let disks = h.spare_opener.kept.clone();
            let mut rng = FuzzRng::new(0x5eed ^ stop);
            let mut plain = h.attach_guest(FRONTEND, "kept0", 1, false);
            let mut kept = h.attach_guest(FRONTEND + 1, "kept1", 2, true);
            for step in 1..=stop {
                for guest in [&mut plain, &mut kept] {
                    let count = 1 + rng.below(6) as usize;
                    guest.submit(&mut rng, count);
                }
                disks.iter().for_each(|d| d.hold.set(rng.one_in(2)));
                for _ in 0..rng.below(3) {
                    h.pass();
                }
                if step < stop {
                    plain.collect();
                    kept.collect();
                }
            }
            h.restart();
            disks.iter().for_each(|d| d.hold.set(false));
            plain.check_all_answered_and_read_back(h);
            kept.check_all_answered_and_read_back(h);
        });
    }
}

/// Indices a frontend scribbled on while stordom was down close its vbd
/// with the reason, and only its vbd.
#[test]
fn garbage_indices_at_adoption_close_only_that_vbd() {
    run(|h| {
        let mut rng = FuzzRng::new(0xbad);
        let mut broken = h.attach_guest(FRONTEND, "kept0", 1, false);
        let mut bystander = h.attach_guest(FRONTEND + 1, "kept1", 1, false);
        broken.submit(&mut rng, 4);
        bystander.submit(&mut rng, 4);
        h.pump();
        broken.collect();
        broken.rings[0].shift_req_prod(1000);
        h.restart();
        assert_eq!(h.backend_state(broken.id).as_deref(), Some("5"));
        let why = h.backend_node(broken.id, "error").unwrap();
        assert!(why.contains("broke a ring"), "{why}");
        bystander.submit(&mut rng, 6);
        bystander.check_all_answered_and_read_back(h);
        assert_eq!(h.backend_state(bystander.id).as_deref(), Some("4"));
    });
}

/// A vbd not left Connected on both ends takes the ordinary path: one in
/// InitWait is offered again, one whose frontend was closing is closed
/// and connects afresh, and neither is adopted.
#[test]
fn a_vbd_mid_handshake_is_not_adopted() {
    run(|h| {
        let waiting = h.add_vbd(FRONTEND, DEVID, "kept0", "w");
        h.pump();
        assert_eq!(h.backend_state(waiting).as_deref(), Some("2"));
        let mut closing = h.attach_guest(FRONTEND + 1, "kept1", 1, false);
        // The frontend starts closing; stordom dies before it looks.
        h.frontend_write(closing.id, "state", "5");
        h.restart();
        assert!(!h.logged("adopted"));
        assert_eq!(h.backend_state(waiting).as_deref(), Some("2"));
        assert_eq!(h.backend_state(closing.id).as_deref(), Some("5"));
        assert_eq!(h.sim.mapped_grants(), 0, "no ring of either was mapped");

        let front = SimBlkfront::new(h.sim, FRONTEND, Protocol::X86_64, 0);
        h.publish_ring(waiting, &front, "3");
        assert_eq!(h.backend_state(waiting).as_deref(), Some("4"));
        h.frontend_write(closing.id, "state", "6");
        h.pump();
        assert_eq!(h.backend_state(closing.id).as_deref(), Some("6"));
        h.frontend_write(closing.id, "state", "1");
        h.pump();
        assert_eq!(h.backend_state(closing.id).as_deref(), Some("2"));
        let ring = SimBlkfront::new(h.sim, FRONTEND + 1, Protocol::X86_64, 0);
        h.publish_ring(closing.id, &ring, "3");
        assert_eq!(h.backend_state(closing.id).as_deref(), Some("4"));
        closing.rings = vec![ring];
        closing.pages = vec![closing.rings[0].grant(false, &[])];
        closing.submit(&mut FuzzRng::new(1), 1);
        closing.check_all_answered_and_read_back(h);
    });
}

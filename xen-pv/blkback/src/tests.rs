//! The backend against the simulated Xen, xenstored and blkfront, serving
//! RAM disks: the xenbus dance, every operation, every invalid field.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use blockdev::partition::{PartitionTable, TableError};
use blockdev::{Completion, Disk, DiskView, Geometry, QueuedDevice, SubmitError};
use drivers::{NullDisk, RamDisk};
use zerocopy::IntoBytes;

use super::*;
use crate::alloc_count::{count, uncounted};
use crate::blkif::{self, Protocol, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY};
use crate::controllers::BringUpFailures;
use crate::rate_limited_log::LOG_WINDOW_NS;
use crate::sim_blkfront::{GrantWindowHal, Response, Seg, SimBlkfront, SimPlatform, segment_page};
use crate::statistics::{LATENCY_BUCKETS, LatencyHistogram, WATCHDOG_NS};
use crate::vbd::{DETACH_GRACE_NS, OPEN_RECHECK_NS};
use core::sync::atomic::{AtomicU32, AtomicU64};
use host_fuzz::{FuzzRng, FuzzRun};
use xen_pv::event::{EventChannels, EvtchnSend};
use xen_pv::grant::{GfnWindow, GrantMapper, GrantRef, MapGrantRef, UnmapGrantRef};
use xen_pv::held::{HeldGrants, HeldPorts};
use xen_pv::hypercall::{Command, HypercallOp};
use xen_pv::ring::{PeerChannel, TimedOut};
use xen_pv::sim::xenstore::SimXenstored;
use xen_pv::sim::{GUEST, SimXen};
use xen_pv::xenbus::XenbusState;
use xen_pv::xenstore::{Access, Perm, Xenstore, XenstoreInterface};
use xen_pv::{Hypercall, PAGE_SIZE};

mod bounce;
mod engine_benchmark;
mod failed_controllers;
mod hostile_frontend;
mod partitions;
mod restart;
mod xenstore_churn;

const WINDOW: u64 = 0x10_0000;
const FRONTEND: DomId = 7;
const DEVID: u32 = 51712;

/// What the test disk saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read(u64),
    Write(u64),
    Flush,
    Discard(u64, u64),
}

/// A RAM disk that records its operations, can claim a volatile write
/// cache, and can hold completions back (a slow device).
struct Spy {
    disk: RamDisk<GrantWindowHal>,
    storage: Box<[u64]>,
    cached: bool,
    hold: bool,
    /// Completions held back, with their queue.
    held: Vec<(u16, Completion)>,
    ops: Vec<Op>,
    /// Behind an IOMMU that maps only this DMA memory (see
    /// [`bounce::fails_dma_into_grants`]).
    grant_blind: Option<GrantWindowHal>,
}

impl Spy {
    fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        self.storage.as_bytes()[offset..offset + len].to_vec()
    }
}

/// Moves the completions of `queue` from `held` into `out`, oldest first.
fn hand_over_held(held: &mut Vec<(u16, Completion)>, queue: u16, out: &mut [Completion]) -> usize {
    let mut given = 0;
    for slot in out.iter_mut() {
        let Some(at) = held.iter().position(|(q, _)| *q == queue) else {
            break;
        };
        *slot = held.remove(at).1;
        given += 1;
    }
    given
}

struct SpyDisk(Rc<RefCell<Spy>>);

impl QueuedDevice for SpyDisk {
    fn geometry(&self) -> Geometry {
        let spy = self.0.borrow();
        Geometry {
            volatile_write_cache: spy.cached,
            ..spy.disk.geometry()
        }
    }

    fn submit(
        &mut self,
        queue: u16,
        tag: u64,
        request: blockdev::Request<'_>,
    ) -> Result<(), SubmitError> {
        let mut spy = self.0.borrow_mut();
        if let Some(fault) = bounce::fails_dma_into_grants(spy.grant_blind.as_ref(), tag, &request)
        {
            uncounted(|| spy.held.push((queue, fault)));
            return Ok(());
        }
        let op = match request {
            blockdev::Request::Read { lba, .. } => Op::Read(lba),
            blockdev::Request::Write { lba, .. } => Op::Write(lba),
            blockdev::Request::Flush => Op::Flush,
            blockdev::Request::Discard { lba, blocks } => Op::Discard(lba, blocks),
            blockdev::Request::WriteZeroes { .. } => return Err(SubmitError::Unsupported),
        };
        uncounted(|| spy.ops.push(op));
        spy.disk.submit(queue, tag, request)
    }

    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        let mut spy = self.0.borrow_mut();
        let mut buf = [Completion::default(); 64];
        let n = spy.disk.poll(queue, &mut buf);
        uncounted(|| spy.held.extend(buf[..n].iter().map(|c| (queue, *c))));
        if spy.hold {
            return 0;
        }
        hand_over_held(&mut spy.held, queue, out)
    }
}

type Disks = Rc<RefCell<Vec<Rc<RefCell<Spy>>>>>;

struct TestOpener {
    hal: GrantWindowHal,
    disks: Disks,
    /// `shared0`, made on first use and sliced by `shared0@start+count`.
    shared: Option<Disk>,
    /// `parted0`, made on first use, with its partition table.
    parted: Option<(Disk, Result<PartitionTable, TableError>)>,
    /// `nvme0n1` and `nvme0n2`: two disks on one set of queues.
    namespaces: [Disk; 2],
    /// `kept0` and `kept1`: RAM that outlives engine instances.
    kept: [Rc<restart::KeptRam>; 2],
    /// The controllers and disks that "failed to come up" (see
    /// `tests/failed_controllers.rs`).
    failures: BringUpFailures,
    /// Opens of `nbd:` targets answered [`OpenError::InProgress`] so far
    /// (such a target opens once its port number of them were).
    nbd_waits: u64,
}

impl TestOpener {
    /// An opener of the same disks, for an engine restarted in place.
    fn twin(&self) -> TestOpener {
        TestOpener {
            hal: self.hal.clone(),
            disks: self.disks.clone(),
            shared: None,
            parted: None,
            namespaces: self.namespaces.clone(),
            kept: self.kept.clone(),
            failures: self.failures.clone(),
            nbd_waits: 0,
        }
    }

    fn spy(&self, block_size: u32, blocks: u64, cached: bool) -> Disk {
        self.spy_with(block_size, blocks, 1, cached)
    }

    fn spy_with(&self, block_size: u32, blocks: u64, queues: u16, cached: bool) -> Disk {
        Disk::new(self.spy_device(block_size, blocks, queues, cached))
    }

    /// 1 GiB that stores nothing: the engine benchmark's disk.
    fn null_disk(&self) -> Disk {
        Disk::new(NullDisk::new(self.hal.clone(), 1 << 21, 1))
    }

    /// A RAM disk that records what it is asked (found by [`Harness::disk`]).
    fn spy_device(&self, block_size: u32, blocks: u64, queues: u16, cached: bool) -> SpyDisk {
        let words = (u64::from(block_size) * blocks / 8) as usize;
        let mut storage = vec![0u64; words].into_boxed_slice();
        let base = core::ptr::NonNull::new(storage.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: the storage is owned by the same Spy as the disk, never
        // moves (boxed) and outlives it; tests only read it between polls.
        let disk = unsafe { RamDisk::new(self.hal.clone(), base, block_size, blocks, queues) };
        let spy = Rc::new(RefCell::new(Spy {
            disk,
            storage,
            cached,
            hold: false,
            held: Vec::new(),
            ops: Vec::new(),
            grant_blind: None,
        }));
        self.disks.borrow_mut().push(spy.clone());
        SpyDisk(spy)
    }
}

/// A controller whose namespaces share its queues, as NVMe's do: a
/// completion is found by polling the queue it was submitted on, whichever
/// namespace it belongs to.
struct SharedQueueController {
    namespaces: Vec<RamDisk<GrantWindowHal>>,
    /// Keeps the RAM behind `namespaces`.
    _storage: Vec<Box<[u64]>>,
    /// Completions of every namespace, per queue, in the order they ended.
    finished: Vec<(u16, Completion)>,
    /// Holds completions back (a slow controller).
    hold: bool,
}

struct ControllerNamespace {
    controller: Rc<RefCell<SharedQueueController>>,
    index: usize,
}

impl QueuedDevice for ControllerNamespace {
    fn geometry(&self) -> Geometry {
        self.controller.borrow().namespaces[self.index].geometry()
    }

    fn submit(
        &mut self,
        queue: u16,
        tag: u64,
        request: blockdev::Request<'_>,
    ) -> Result<(), SubmitError> {
        let mut controller = self.controller.borrow_mut();
        let controller = &mut *controller;
        controller.namespaces[self.index].submit(queue, tag, request)?;
        let mut done = [Completion::default(); 4];
        let n = controller.namespaces[self.index].poll(queue, &mut done);
        controller
            .finished
            .extend(done[..n].iter().map(|c| (queue, *c)));
        Ok(())
    }

    fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
        let mut controller = self.controller.borrow_mut();
        if controller.hold {
            return 0;
        }
        hand_over_held(&mut controller.finished, queue, out)
    }
}

impl SharedQueueController {
    /// Two namespaces of 2048 512-byte blocks.
    fn new(hal: &GrantWindowHal) -> Rc<RefCell<Self>> {
        let mut storage: Vec<Box<[u64]>> = (0..2)
            .map(|_| vec![0u64; 2048 * 512 / 8].into_boxed_slice())
            .collect();
        let namespaces = storage
            .iter_mut()
            .map(|s| {
                let base = core::ptr::NonNull::new(s.as_mut_ptr().cast::<u8>()).unwrap();
                // SAFETY: the storage lives (boxed, never moved) in the
                // same controller as the disk.
                unsafe { RamDisk::new(hal.clone(), base, 512, 2048, 1) }
            })
            .collect();
        Rc::new(RefCell::new(SharedQueueController {
            namespaces,
            _storage: storage,
            finished: Vec::new(),
            hold: false,
        }))
    }
}

impl TargetOpener for TestOpener {
    fn open(
        &mut self,
        _vbd_path: &str,
        target: &Target<'_>,
        read_only: bool,
    ) -> Result<OpenedTarget, OpenError> {
        // The disks stand for devices, not for stordom's heap.
        uncounted(|| self.open_uncounted(target, read_only))
    }
}

impl TestOpener {
    fn open_uncounted(
        &mut self,
        target: &Target<'_>,
        _read_only: bool,
    ) -> Result<OpenedTarget, OpenError> {
        let disk = match *target {
            Target::Ram { bytes } if bytes <= 1 << 20 => self.spy(512, bytes / 512, false),
            Target::Ram { .. } => return Err(OpenError::OutOfMemory),
            Target::Disk { name: "cached" } => self.spy(512, 2048, true),
            Target::Disk { name: "disk4k" } => self.spy(4096, 256, false),
            Target::Disk { name: "large" } => self.spy(512, 32768, false),
            Target::Disk { name: "multiqueue" } => self.spy_with(512, 2048, 8, false),
            Target::Disk { name: "plain" } => {
                let disk = RamDisk::allocate(self.hal.clone(), 16384, 1);
                Disk::new(disk.ok_or(OpenError::OutOfMemory)?)
            }
            Target::Disk { name: "null" } => self.null_disk(),
            Target::Disk { name: "nvme0n1" } => self.namespaces[0].clone(),
            Target::Disk { name: "nvme0n2" } => self.namespaces[1].clone(),
            Target::Disk { name: "kept0" } => self.kept[0].disk(&self.hal),
            Target::Disk { name: "kept1" } => self.kept[1].disk(&self.hal),
            Target::Range {
                disk: "shared0",
                start,
                sectors,
            } => {
                let shared = match &self.shared {
                    Some(shared) => shared.clone(),
                    None => self.spy(512, 2048, false),
                };
                self.shared = Some(shared.clone());
                return claim_sectors(&shared, start, sectors).map(OpenedTarget::from);
            }
            Target::Disk { name: "parted0" } => self.partitioned(false).0,
            Target::Disk { name: "blind" } => return self.grant_blind(DataPath::ZeroCopy),
            Target::Disk {
                name: "blindbounced",
            } => return self.grant_blind(DataPath::Bounce),
            Target::Disk { name: "signalled" } => {
                return Ok(OpenedTarget {
                    view: self.spy(512, 2048, false).claim_all()?,
                    data_path: DataPath::ZeroCopy,
                    completions: CompletionSignal::Event,
                });
            }
            Target::Disk {
                name: "nullbounced",
            } => {
                return Ok(OpenedTarget {
                    view: self.null_disk().claim_all()?,
                    data_path: DataPath::Bounce,
                    completions: CompletionSignal::Polled,
                });
            }
            Target::Partition { disk, number } => {
                return self.open_partition(disk, number).map(OpenedTarget::from);
            }
            Target::Disk { name: disk } | Target::Range { disk, .. } => {
                return Err(self.failures.refusal(disk));
            }
            Target::Module { .. } => return Err(OpenError::NotFound),
            Target::Nbd {
                export: "refused", ..
            } => return Err(OpenError::Network("the server refused the export".into())),
            Target::Nbd { port, .. } if self.nbd_waits < u64::from(port) => {
                self.nbd_waits += 1;
                return Err(OpenError::InProgress);
            }
            Target::Nbd { .. } => self.spy(512, 2048, true),
        };
        Ok(disk.claim_all()?.into())
    }
}

/// The simulated xenstored, its work not counted as stordom's allocations
/// (also when the client waits on it).
struct Xenstored<'a>(SimXenstored<'a>);

impl PeerChannel for Xenstored<'_> {
    fn notify(&mut self) {
        uncounted(|| self.0.notify());
    }

    fn wait(&mut self) -> Result<(), TimedOut> {
        uncounted(|| self.0.wait())
    }
}

impl<'a> core::ops::Deref for Xenstored<'a> {
    type Target = SimXenstored<'a>;
    fn deref(&self) -> &SimXenstored<'a> {
        &self.0
    }
}

impl core::ops::DerefMut for Xenstored<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// The simulated Xen, its work not counted as stordom's allocations.
#[derive(Clone, Copy)]
struct Hypervisor<'a>(&'a SimXen);

// SAFETY: forwards to the simulated Xen unchanged.
unsafe impl Hypercall for Hypervisor<'_> {
    unsafe fn hypercall(&self, op: HypercallOp, args: [u64; 5]) -> i64 {
        // SAFETY: the caller's guarantees are passed on unchanged.
        uncounted(|| unsafe { self.0.hypercall(op, args) })
    }
}

struct Harness<'a> {
    sim: &'a SimXen,
    xs: Xenstore<'a, Xenstored<'a>>,
    events: EventChannels<'a, Hypervisor<'a>>,
    grants: GrantMapper<'a, Hypervisor<'a>>,
    /// What the engine holds of Xen, as the kernel's statics record it.
    held_grants: &'a HeldGrants,
    held_ports: &'a HeldPorts,
    platform: SimPlatform,
    vbds: VbdBackends<TestOpener>,
    /// The opener of the next instance, after a restart.
    spare_opener: TestOpener,
    disks: Disks,
    controller: Rc<RefCell<SharedQueueController>>,
}

fn run(test: impl FnOnce(&mut Harness<'_>)) {
    run_with_window(4096, test);
}

/// As [`run`], with a GFN window of `frames` frames for grant mappings.
fn run_with_window(frames: usize, test: impl FnOnce(&mut Harness<'_>)) {
    let sim = Rc::new(SimXen::new());
    let iface = XenstoreInterface::new_boxed(0);
    let held_grants: &HeldGrants = &HeldGrants::<[AtomicU64; 4096]>::new();
    let held_ports: &HeldPorts = &HeldPorts::<[AtomicU32; 64]>::new();
    let disks = Disks::default();
    let hal = GrantWindowHal::new(sim.clone());
    let controller = SharedQueueController::new(&hal);
    let namespace = |index| ControllerNamespace {
        controller: controller.clone(),
        index,
    };
    let first = Disk::new(namespace(0));
    let second = first.sharing_queues(namespace(1));
    let opener = TestOpener {
        hal,
        disks: disks.clone(),
        shared: None,
        parted: None,
        namespaces: [first, second],
        kept: [restart::KeptRam::new(), restart::KeptRam::new()],
        failures: failed_controllers::failures(),
        nbd_waits: 0,
    };
    let spare_opener = opener.twin();
    let mut h = Harness {
        sim: &sim,
        xs: Xenstore::new(&iface, Xenstored(SimXenstored::new(&iface, GUEST))),
        events: EventChannels::new(Hypervisor(&sim), sim.shared_info(), held_ports),
        grants: GrantMapper::new(
            Hypervisor(&sim),
            GfnWindow::new(WINDOW, frames),
            held_grants,
        ),
        held_grants,
        held_ports,
        platform: SimPlatform::new(&opener.hal),
        vbds: VbdBackends::new(opener),
        spare_opener,
        disks,
        controller,
    };
    h.vbds.start(&mut h.xs).unwrap();
    assert_eq!(h.pump(), Progress::Idle);
    test(&mut h);
}

fn backend_path(id: VbdId) -> String {
    format!(
        "/local/domain/{GUEST}/backend/vbd/{}/{}",
        id.frontend, id.devid
    )
}

fn frontend_path(id: VbdId) -> String {
    format!("/local/domain/{}/device/vbd/{}", id.frontend, id.devid)
}

impl<'a> Harness<'a> {
    /// One pass of the kernel's loop: xenstore traffic, watch events, one
    /// poll of the rings. Returns whether xenstore moved or an event was
    /// handled, and the rings' progress. What stordom's code allocates is
    /// counted (see [`crate::alloc_count`]).
    fn pass(&mut self) -> (bool, Progress) {
        let moved = uncounted(|| self.xs.channel_mut().step());
        let mut svc = XenBackendServices {
            events: &mut self.events,
            grants: &mut self.grants,
            platform: &mut self.platform,
        };
        let ((intake, polled, attended), _) = count(|| {
            let intake = self.vbds.take_watch_events(&mut self.xs, |event| {
                panic!("an event of no blkback watch: {event:?}")
            });
            let polled = self.vbds.poll_rings(&mut svc);
            let attended = self.vbds.attend(&mut self.xs, &mut svc, &polled.attention);
            (intake, polled, attended)
        });
        let progress = match (polled.progress, attended) {
            (Progress::Idle, Progress::Idle) => Progress::Idle,
            _ => Progress::Busy,
        };
        (moved || intake.unwrap().taken > 0, progress)
    }

    /// Runs the kernel's loop until nothing moves: xenstore traffic, watch
    /// events, ring polls.
    fn pump(&mut self) -> Progress {
        let mut progress = Progress::Busy;
        for _ in 0..100 {
            let moved;
            (moved, progress) = self.pass();
            if !moved && progress == Progress::Idle {
                break;
            }
        }
        progress
    }

    /// Moves the clock `ns` on, then pumps (a detached vbd's directory
    /// goes a grace after Closed).
    fn pump_after(&mut self, ns: u64) -> Progress {
        self.platform.now_ns.set(self.platform.now_ns.get() + ns);
        self.pump()
    }

    /// The toolstack creates a vbd as libxl does.
    fn add_vbd(&mut self, frontend: DomId, devid: u32, params: &str, mode: &str) -> VbdId {
        let id = VbdId { frontend, devid };
        let (be, fe) = (backend_path(id), frontend_path(id));
        let daemon = self.xs.channel_mut();
        let parent = format!("/local/domain/{GUEST}/backend/vbd/{frontend}");
        daemon.dom0_write(&parent, b"");
        let backend_perms = [
            Perm {
                domid: 0,
                access: Access::None,
            },
            Perm {
                domid: GUEST,
                access: Access::Read,
            },
        ];
        daemon.dom0_set_perms(&parent, &backend_perms);
        let device_perms = [
            Perm {
                domid: GUEST,
                access: Access::None,
            },
            Perm {
                domid: frontend,
                access: Access::Read,
            },
        ];
        let nodes = [
            ("", String::new()),
            ("frontend-id", format!("{frontend}")),
            ("online", "1".into()),
            ("removable", "0".into()),
            ("bootable", "1".into()),
            ("dev", "xvda".into()),
            ("type", "phy".into()),
            ("mode", mode.into()),
            ("device-type", "disk".into()),
            ("discard-enable", "1".into()),
            ("frontend", fe.clone()),
            ("params", params.into()),
            ("state", "1".into()),
        ];
        for (name, value) in nodes {
            let path = if name.is_empty() {
                be.clone()
            } else {
                format!("{be}/{name}")
            };
            daemon.dom0_write(&path, value.as_bytes());
            daemon.dom0_set_perms(&path, &device_perms);
        }
        // As libxl: the frontend's home is its own, unreadable to others,
        // so once its device directory is removed the backend reading it
        // gets EACCES rather than ENOENT.
        let home = format!("/local/domain/{frontend}");
        if daemon.dom0_read(&home).is_none() {
            daemon.dom0_write(&home, b"");
            let home_perms = [Perm {
                domid: frontend,
                access: Access::None,
            }];
            daemon.dom0_set_perms(&home, &home_perms);
        }
        self.frontend_write(id, "", "");
        self.frontend_write(id, "backend", &be);
        self.frontend_write(id, "backend-id", &format!("{GUEST}"));
        self.frontend_write(id, "virtual-device", &format!("{devid}"));
        self.frontend_write(id, "state", "1");
        id
    }

    /// The frontend writes one of its nodes.
    fn frontend_write(&mut self, id: VbdId, name: &str, value: &str) {
        let path = match name {
            "" => frontend_path(id),
            _ => format!("{}/{name}", frontend_path(id)),
        };
        let perms = [
            Perm {
                domid: id.frontend,
                access: Access::None,
            },
            Perm {
                domid: GUEST,
                access: Access::Read,
            },
        ];
        let daemon = self.xs.channel_mut();
        daemon.dom0_write(&path, value.as_bytes());
        daemon.dom0_set_perms(&path, &perms);
    }

    /// A backend node as dom0 reads it.
    fn backend_node(&mut self, id: VbdId, name: &str) -> Option<String> {
        let path = format!("{}/{name}", backend_path(id));
        let value = self.xs.channel_mut().dom0_read(&path)?;
        Some(String::from_utf8(value).unwrap())
    }

    fn backend_state(&mut self, id: VbdId) -> Option<String> {
        self.backend_node(id, "state")
    }

    /// The frontend publishes its ring and moves to `state` (3, or 4 for
    /// a frontend that skips Initialised).
    fn publish_ring(&mut self, id: VbdId, front: &SimBlkfront<'_>, state: &str) {
        for (name, value) in front.ring_nodes() {
            self.frontend_write(id, &name, &value);
        }
        self.frontend_write(id, "state", state);
        self.pump();
    }

    /// A new ring of the frontend of `id` (indices from `start`), which the
    /// backend connects.
    fn connect(
        &mut self,
        id: VbdId,
        protocol: Protocol,
        start: u32,
        state: &str,
    ) -> SimBlkfront<'a> {
        let front = SimBlkfront::new(self.sim, id.frontend, protocol, start);
        self.publish_ring(id, &front, state);
        assert_eq!(self.backend_state(id).as_deref(), Some("4"));
        front
    }

    /// A vbd of `params` for `frontend`, in InitWait then connected.
    fn serve(
        &mut self,
        frontend: DomId,
        params: &str,
        mode: &str,
        protocol: Protocol,
    ) -> (VbdId, SimBlkfront<'a>) {
        let id = self.add_vbd(frontend, DEVID, params, mode);
        self.pump();
        assert_eq!(self.backend_state(id).as_deref(), Some("2"));
        (id, self.connect(id, protocol, 0, "3"))
    }

    /// A vbd of a 1 MiB RAM disk with a connected frontend.
    fn connected(&mut self, protocol: Protocol, start: u32) -> (VbdId, SimBlkfront<'a>) {
        let id = self.add_vbd(FRONTEND, DEVID, "ram:1M", "w");
        self.pump();
        (id, self.connect(id, protocol, start, "3"))
    }

    /// A vbd of a disk with a volatile write cache, connected, with a page
    /// granted to write from and one to read into.
    fn cached_frontend(&mut self) -> (VbdId, SimBlkfront<'a>, GrantRef, GrantRef) {
        let id = self.add_vbd(FRONTEND, DEVID, "cached", "w");
        self.pump();
        let front = self.connect(id, Protocol::X86_64, 0, "3");
        let page = front.grant(true, &pattern(9));
        let into = front.grant(false, &[0; 4096]);
        (id, front, page, into)
    }

    /// A vbd of a 1 MiB RAM disk whose frontend asked for persistent
    /// grants, connected.
    fn persistent_frontend(&mut self, protocol: Protocol) -> (VbdId, SimBlkfront<'a>) {
        let id = self.add_vbd(FRONTEND, DEVID, "ram:1M", "w");
        self.pump();
        self.frontend_write(id, "feature-persistent", "1");
        (id, self.connect(id, protocol, 0, "3"))
    }

    /// The frontend of `id` closes: every grant is unmapped.
    fn close_leaving_nothing_mapped(&mut self, id: VbdId) {
        self.frontend_write(id, "state", "6");
        self.pump();
        assert_eq!(self.sim.mapped_grants(), 0);
    }

    fn io(&mut self, front: &mut SimBlkfront<'_>, requests: &[Vec<u8>]) -> Vec<Response> {
        assert_eq!(front.submit(requests), requests.len());
        self.pump();
        front.responses()
    }

    /// The statuses of `requests`' responses, by id (refusals are answered
    /// before requests that go to the disk).
    fn statuses(&mut self, front: &mut SimBlkfront<'_>, requests: &[Vec<u8>]) -> Vec<i16> {
        let mut responses = self.io(front, requests);
        responses.sort_by_key(|r| r.id);
        responses.iter().map(|r| r.status).collect()
    }

    fn disk(&self, index: usize) -> Rc<RefCell<Spy>> {
        self.disks.borrow()[index].clone()
    }

    fn logged(&self, needle: &str) -> bool {
        self.platform.lines.iter().any(|l| l.contains(needle))
    }
}

fn seg(gref: u32, first_sect: u8, last_sect: u8) -> Seg {
    Seg {
        gref,
        first_sect,
        last_sect,
    }
}

fn ok(id: u64, operation: u8) -> Response {
    Response {
        id,
        operation,
        status: RSP_OKAY,
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

/// Writes two segments through the frontend, reads them back into fresh
/// pages, and checks the disk itself.
fn write_then_read(protocol: Protocol) {
    run(|h| {
        let (id, mut front) = h.connected(protocol, 0);
        assert_eq!(h.backend_node(id, "sectors").as_deref(), Some("2048"));
        assert_eq!(h.backend_node(id, "sector-size").as_deref(), Some("512"));
        assert_eq!(
            h.backend_node(id, "physical-sector-size").as_deref(),
            Some("512")
        );
        assert_eq!(h.backend_node(id, "info").as_deref(), Some("0"));
        assert_eq!(h.backend_node(id, "feature-barrier").as_deref(), Some("1"));
        assert_eq!(
            h.backend_node(id, "feature-flush-cache").as_deref(),
            Some("0")
        );
        assert_eq!(h.backend_node(id, "feature-discard").as_deref(), Some("1"));
        assert_eq!(
            h.backend_node(id, "discard-granularity").as_deref(),
            Some("512")
        );
        assert_eq!(
            h.backend_node(id, "discard-alignment").as_deref(),
            Some("0")
        );
        assert_eq!(
            h.backend_node(id, "feature-persistent").as_deref(),
            Some("1")
        );

        let (a, b) = (pattern(1), pattern(2));
        let (ga, gb) = (front.grant(true, &a), front.grant(true, &b));
        let write =
            front.data_request(blkif::OP_WRITE, 10, 100, 2, &[seg(ga, 0, 7), seg(gb, 2, 3)]);
        assert_eq!(h.io(&mut front, &[write]), [ok(10, blkif::OP_WRITE)]);
        assert!(front.notifications() >= 1);

        let disk = h.disk(0);
        assert_eq!(disk.borrow().bytes(100 * 512, 4096), a);
        assert_eq!(disk.borrow().bytes(108 * 512, 1024), b[1024..2048]);

        let (ra, rb) = (front.grant(false, &[]), front.grant(false, &[]));
        let read = front.data_request(blkif::OP_READ, 11, 100, 2, &[seg(ra, 0, 7), seg(rb, 4, 5)]);
        assert_eq!(h.io(&mut front, &[read]), [ok(11, blkif::OP_READ)]);
        assert_eq!(front.page(ra), a);
        assert_eq!(front.page(rb)[2048..3072], b[1024..2048]);
        assert!(front.page(rb)[..2048].iter().all(|&x| x == 0));
        assert_eq!(
            h.grants.stats().mapped,
            1,
            "only the ring page stays mapped"
        );
        assert_eq!(h.pump(), Progress::Idle);
        let status = h.vbds.status(id).unwrap();
        assert_eq!(
            (status.state, status.connected, status.in_flight),
            (XenbusState::Connected, true, 0)
        );
    });
}

#[test]
fn write_then_read_x86_64_abi() {
    write_then_read(Protocol::X86_64);
}

#[test]
fn write_then_read_x86_32_abi() {
    write_then_read(Protocol::X86_32);
}

#[test]
fn ring_indices_wrap_at_u32_max() {
    run(|h| {
        let (_, mut front) = h.connected(Protocol::X86_64, u32::MAX - 5);
        let page = front.grant(false, &[]);
        let mut answered = Vec::new();
        for batch in 0..3u64 {
            let requests: Vec<Vec<u8>> = (0..32u64)
                .map(|i| {
                    front.data_request(blkif::OP_READ, batch * 32 + i, i, 1, &[seg(page, 0, 0)])
                })
                .collect();
            answered.extend(h.io(&mut front, &requests));
        }
        let ids: Vec<u64> = answered.iter().map(|r| r.id).collect();
        assert_eq!(ids, (0..96).collect::<Vec<u64>>());
        assert!(answered.iter().all(|r| r.status == RSP_OKAY));
    });
}

#[test]
fn every_invalid_field_gets_its_status() {
    run(|h| {
        let (_, mut front) = h.connected(Protocol::X86_64, 0);
        let page = front.grant(false, &[]);
        let readonly_page = front.grant(true, &[]);
        let good = [seg(page, 0, 7)];
        let rw =
            |op, id, sector, nr: u8, segs: &[Seg]| front.data_request(op, id, sector, nr, segs);
        let cases: Vec<(Vec<u8>, i16)> = vec![
            (rw(4, 1, 0, 1, &good), RSP_EOPNOTSUPP),
            (rw(200, 2, 0, 1, &good), RSP_EOPNOTSUPP),
            (rw(blkif::OP_INDIRECT, 3, 0, 1, &good), RSP_ERROR),
            (rw(blkif::OP_READ, 4, 0, 0, &[]), RSP_ERROR),
            (rw(blkif::OP_READ, 5, 0, 12, &good), RSP_ERROR),
            (rw(blkif::OP_READ, 6, 0, 1, &[seg(page, 5, 4)]), RSP_ERROR),
            (rw(blkif::OP_READ, 7, 0, 1, &[seg(page, 0, 8)]), RSP_ERROR),
            (rw(blkif::OP_READ, 8, 2048, 1, &good), RSP_ERROR),
            (rw(blkif::OP_READ, 9, 2041, 1, &good), RSP_ERROR),
            (rw(blkif::OP_READ, 10, u64::MAX - 3, 1, &good), RSP_ERROR),
            (rw(blkif::OP_READ, 11, 0, 1, &[seg(9999, 0, 7)]), RSP_ERROR),
            (
                rw(
                    blkif::OP_READ,
                    12,
                    0,
                    2,
                    &[seg(page, 0, 7), seg(9999, 0, 0)],
                ),
                RSP_ERROR,
            ),
            (
                rw(blkif::OP_READ, 13, 0, 1, &[seg(readonly_page, 0, 7)]),
                RSP_ERROR,
            ),
            (rw(blkif::OP_FLUSH_DISKCACHE, 14, 0, 0, &[]), RSP_EOPNOTSUPP),
            (front.discard_request(15, 0, 8, true), RSP_EOPNOTSUPP),
            (front.discard_request(16, 2040, 9, false), RSP_ERROR),
            (front.discard_request(17, u64::MAX, 2, false), RSP_ERROR),
            (rw(blkif::OP_READ, 18, 2040, 1, &good), RSP_OKAY),
        ];
        let requests: Vec<Vec<u8>> = cases.iter().map(|(r, _)| r.clone()).collect();
        h.platform.now_ns.set(LOG_WINDOW_NS);
        let responses = h.io(&mut front, &requests);
        assert_eq!(responses.len(), cases.len());
        for (i, (_, status)) in cases.iter().enumerate() {
            let response = responses.iter().find(|r| r.id == i as u64 + 1).unwrap();
            assert_eq!(response.status, *status, "request {}", i + 1);
        }
        assert_eq!(
            h.grants.stats().mapped,
            1,
            "failed maps leave nothing mapped"
        );
        // 17 refusals in one second: 10 lines, the rest counted.
        let refusals = h
            .platform
            .lines
            .iter()
            .filter(|l| l.contains("request"))
            .count();
        assert_eq!(
            refusals,
            rate_limited_log::MAX_LOG_LINES_PER_SECOND as usize
        );
        h.platform.now_ns.set(2_500_000_000);
        let again = front.data_request(4, 99, 0, 1, &good);
        assert_eq!(h.io(&mut front, &[again])[0].status, RSP_EOPNOTSUPP);
        assert!(h.logged("7 more messages suppressed"));
        // The ring is still served.
        let read = front.data_request(blkif::OP_READ, 100, 0, 1, &good);
        assert_eq!(h.io(&mut front, &[read]), [ok(100, blkif::OP_READ)]);
    });
}

#[test]
fn writes_to_a_read_only_disk_are_refused() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "ram:64K", "r");
        let be = backend_path(id);
        h.xs.channel_mut()
            .dom0_write(&format!("{be}/device-type"), b"cdrom");
        h.xs.channel_mut()
            .dom0_write(&format!("{be}/removable"), b"1");
        h.pump();
        assert_eq!(h.backend_node(id, "info").as_deref(), Some("7"));
        let mut front = h.connect(id, Protocol::X86_64, 0, "3");
        let page = front.grant(true, &pattern(3));
        let requests = [
            front.data_request(blkif::OP_WRITE, 1, 0, 1, &[seg(page, 0, 7)]),
            front.data_request(blkif::OP_WRITE_BARRIER, 2, 0, 1, &[seg(page, 0, 7)]),
            front.discard_request(3, 0, 8, false),
            front.data_request(
                blkif::OP_READ,
                4,
                0,
                1,
                &[seg(front.grant(false, &[]), 0, 7)],
            ),
        ];
        let statuses = h.statuses(&mut front, &requests);
        assert_eq!(statuses, [RSP_ERROR, RSP_ERROR, RSP_ERROR, RSP_OKAY]);
        assert!(
            h.disk(0)
                .borrow()
                .ops
                .iter()
                .all(|op| matches!(op, Op::Read(_)))
        );
    });
}

#[test]
fn discard_zeroes_the_range() {
    run(|h| {
        let (_, mut front) = h.connected(Protocol::X86_32, 0);
        let data = front.grant(true, &pattern(9));
        let write = front.data_request(blkif::OP_WRITE, 1, 16, 1, &[seg(data, 0, 7)]);
        let discard = front.discard_request(2, 18, 4, false);
        let empty = front.discard_request(3, 0, 0, false);
        let mut responses = h.io(&mut front, &[write, discard, empty]);
        responses.sort_by_key(|r| r.id);
        assert_eq!(
            responses,
            [
                ok(1, blkif::OP_WRITE),
                ok(2, blkif::OP_DISCARD),
                ok(3, blkif::OP_DISCARD)
            ]
        );
        let disk = h.disk(0);
        let disk = disk.borrow();
        assert_eq!(disk.bytes(16 * 512, 1024), pattern(9)[..1024]);
        assert!(disk.bytes(18 * 512, 2048).iter().all(|&b| b == 0));
        assert_eq!(disk.bytes(22 * 512, 1024), pattern(9)[3072..]);
        assert_eq!(disk.ops, [Op::Write(16), Op::Discard(18, 4)]);
    });
}

#[test]
fn a_huge_discard_goes_to_the_device_in_bounded_pieces() {
    run(|h| {
        let (_, mut front) = h.serve(FRONTEND, "large", "w", Protocol::X86_64);
        let discard = front.discard_request(1, 0, 32768, false);
        assert_eq!(h.io(&mut front, &[discard]), [ok(1, blkif::OP_DISCARD)]);
        let pieces = (0..4)
            .map(|i| Op::Discard(i * 8192, 8192))
            .collect::<Vec<_>>();
        assert_eq!(h.disk(0).borrow().ops, pieces, "4 MiB at a time");
    });
}

#[test]
fn a_4k_disk_takes_only_aligned_io() {
    run(|h| {
        let (id, mut front) = h.serve(FRONTEND, "disk4k", "w", Protocol::X86_64);
        assert_eq!(h.backend_node(id, "sectors").as_deref(), Some("2048"));
        assert_eq!(h.backend_node(id, "sector-size").as_deref(), Some("4096"));
        assert_eq!(
            h.backend_node(id, "discard-granularity").as_deref(),
            Some("4096")
        );
        let page = front.grant(true, &pattern(4));
        let requests = [
            front.data_request(blkif::OP_WRITE, 1, 8, 1, &[seg(page, 0, 7)]),
            front.data_request(blkif::OP_WRITE, 2, 4, 1, &[seg(page, 0, 7)]),
            front.data_request(blkif::OP_WRITE, 3, 8, 1, &[seg(page, 1, 7)]),
            front.data_request(blkif::OP_WRITE, 4, 8, 1, &[seg(page, 0, 3)]),
            front.discard_request(5, 8, 4, false),
            front.discard_request(6, 16, 8, false),
        ];
        let statuses = h.statuses(&mut front, &requests);
        assert_eq!(
            statuses,
            [
                RSP_OKAY, RSP_ERROR, RSP_ERROR, RSP_ERROR, RSP_ERROR, RSP_OKAY
            ]
        );
        let disk = h.disk(0);
        assert_eq!(disk.borrow().ops, [Op::Write(1), Op::Discard(2, 1)]);
        assert_eq!(disk.borrow().bytes(4096, 4096), pattern(4));
    });
}

#[test]
fn only_a_polled_device_keeps_the_loop_busy_while_requests_are_in_flight() {
    // An NBD export's replies wake the loop through the vif's event
    // channel: waiting for them must not spin (it took the CPU dom0's
    // netback and NBD server needed). A polled device's completions are
    // found only by polling.
    for (target, busy) in [("cached", Progress::Busy), ("signalled", Progress::Idle)] {
        run(|h| {
            let id = h.add_vbd(FRONTEND, DEVID, target, "w");
            h.pump();
            let mut front = h.connect(id, Protocol::X86_64, 0, "3");
            let disk = h.disk(0);
            disk.borrow_mut().hold = true;
            let page = front.grant(true, &pattern(5));
            let write = front.data_request(blkif::OP_WRITE, 1, 0, 1, &[seg(page, 0, 7)]);
            assert!(h.io(&mut front, &[write]).is_empty(), "held");
            assert_eq!(h.pump(), busy, "{target}");
            disk.borrow_mut().hold = false;
            h.pump();
            assert_eq!(front.responses(), [ok(1, blkif::OP_WRITE)], "{target}");
        });
    }
}

#[test]
fn flush_and_barrier_wait_for_the_device_and_order() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "cached", "w");
        h.pump();
        assert_eq!(
            h.backend_node(id, "feature-flush-cache").as_deref(),
            Some("1")
        );
        let mut front = h.connect(id, Protocol::X86_64, 0, "3");
        let disk = h.disk(0);
        disk.borrow_mut().hold = true;
        let page = front.grant(true, &pattern(5));
        let requests = [
            front.data_request(blkif::OP_WRITE, 1, 0, 1, &[seg(page, 0, 7)]),
            front.data_request(blkif::OP_WRITE_BARRIER, 2, 8, 1, &[seg(page, 0, 7)]),
            front.data_request(blkif::OP_WRITE, 3, 16, 1, &[seg(page, 0, 7)]),
        ];
        assert!(
            h.io(&mut front, &requests).is_empty(),
            "nothing answered while the device holds"
        );
        assert_eq!(
            disk.borrow().ops,
            [Op::Write(0)],
            "the barrier waits for the older write"
        );
        assert_eq!(h.pump(), Progress::Busy);

        disk.borrow_mut().hold = false;
        h.pump();
        let responses = front.responses();
        assert_eq!(
            responses,
            [
                ok(1, blkif::OP_WRITE),
                ok(2, blkif::OP_WRITE_BARRIER),
                ok(3, blkif::OP_WRITE)
            ]
        );
        assert_eq!(
            disk.borrow().ops,
            [
                Op::Write(0),
                Op::Flush,
                Op::Write(8),
                Op::Flush,
                Op::Write(16)
            ]
        );

        disk.borrow_mut().hold = true;
        let flush = front.data_request(blkif::OP_FLUSH_DISKCACHE, 4, 0, 0, &[]);
        assert!(
            h.io(&mut front, &[flush]).is_empty(),
            "no flush acknowledged before the device's"
        );
        disk.borrow_mut().hold = false;
        h.pump();
        assert_eq!(front.responses(), [ok(4, blkif::OP_FLUSH_DISKCACHE)]);
        assert_eq!(disk.borrow().ops.last(), Some(&Op::Flush));
        assert_eq!(h.pump(), Progress::Idle);
    });
}

#[test]
fn frontend_closes_and_comes_back() {
    run(|h| {
        let (id, mut front) = h.connected(Protocol::X86_64, 0);
        let page = front.grant(true, &pattern(6));
        let write = front.data_request(blkif::OP_WRITE, 1, 0, 1, &[seg(page, 0, 7)]);
        assert_eq!(h.io(&mut front, &[write]), [ok(1, blkif::OP_WRITE)]);

        h.frontend_write(id, "state", "5");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("5"));
        // A closing frontend is still served until it is Closed.
        let target = front.grant(false, &[]);
        let read = front.data_request(blkif::OP_READ, 2, 0, 1, &[seg(target, 0, 7)]);
        assert_eq!(h.io(&mut front, &[read]), [ok(2, blkif::OP_READ)]);
        h.frontend_write(id, "state", "6");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("6"));
        assert!(!h.vbds.status(id).unwrap().connected);
        assert_eq!(h.sim.mapped_grants(), 0, "ring page unmapped");

        // Guest reboot: a new ring, the same disk.
        h.frontend_write(id, "state", "1");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("2"));
        let mut front = h.connect(id, Protocol::X86_32, 7, "3");
        let target = front.grant(false, &[]);
        let read = front.data_request(blkif::OP_READ, 3, 0, 1, &[seg(target, 0, 7)]);
        assert_eq!(h.io(&mut front, &[read]), [ok(3, blkif::OP_READ)]);
        assert_eq!(front.page(target), pattern(6));
    });
}

#[test]
fn frontends_that_skip_states_are_served() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "ram:64K", "w");
        h.pump();
        // Straight to Connected, never Initialised.
        h.connect(id, Protocol::X86_64, 0, "4");
        // Closed, then Initialised again with no Initialising in between.
        h.frontend_write(id, "state", "6");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("6"));
        assert_eq!(h.sim.mapped_grants(), 0);
        let mut front = h.connect(id, Protocol::X86_64, 0, "3");
        let page = front.grant(false, &[]);
        let read = front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(page, 0, 0)]);
        assert_eq!(h.io(&mut front, &[read]), [ok(1, blkif::OP_READ)]);
    });
}

#[test]
fn online_0_detaches_and_removes_the_nodes() {
    run(|h| {
        let (id, mut front) = h.connected(Protocol::X86_64, 0);
        // libxl: online=0 and state=5 on the backend, then waits for 6.
        let be = backend_path(id);
        h.xs.channel_mut().dom0_write(&format!("{be}/online"), b"0");
        h.xs.channel_mut().dom0_write(&format!("{be}/state"), b"5");
        h.pump();
        assert_eq!(
            h.backend_state(id).as_deref(),
            Some("5"),
            "waits for the frontend"
        );
        let page = front.grant(false, &[]);
        let read = front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(page, 0, 7)]);
        assert_eq!(
            h.io(&mut front, &[read]),
            [ok(1, blkif::OP_READ)],
            "served meanwhile"
        );
        h.frontend_write(id, "state", "6");
        h.pump();
        // libxl must see Closed before anything vanishes: it fails the
        // detach if the state node is removed while it waits.
        assert_eq!(h.backend_state(id).as_deref(), Some("6"));
        // Then the backend removes its own directory, a grace later.
        h.pump_after(DETACH_GRACE_NS);
        assert_eq!(h.xs.channel_mut().dom0_read(&be), None, "directory removed");
        assert!(h.vbds.status(id).is_none());
        assert_eq!(h.sim.mapped_grants(), 0);
        assert!(h.logged("removed"));
        assert_eq!(h.pump(), Progress::Idle);
    });
}

#[test]
fn xl_destroy_with_requests_in_flight_leaves_closed_for_libxl_to_read() {
    run(|h| {
        let (id, mut front) = h.connected(Protocol::X86_64, 0);
        let page = front.grant(false, &[]);
        let reads: Vec<_> = (0..8)
            .map(|n| front.data_request(blkif::OP_READ, n, n * 8, 1, &[seg(page, 0, 7)]))
            .collect();
        assert_eq!(front.submit(&reads), reads.len());
        // libxl's forced removal: online=0, state=5 and the frontend's
        // directory removed in one transaction, then it waits for 6.
        let be = backend_path(id);
        h.xs.channel_mut().dom0_write(&format!("{be}/online"), b"0");
        h.xs.channel_mut().dom0_write(&format!("{be}/state"), b"5");
        h.xs.channel_mut().dom0_rm(&frontend_path(id));
        h.pump();
        assert_eq!(
            h.backend_state(id).as_deref(),
            Some("6"),
            "Closed, and still there for libxl to read"
        );
        assert_eq!(h.sim.mapped_grants(), 0, "every grant unmapped at close");
        h.pump_after(DETACH_GRACE_NS);
        assert_eq!(h.xs.channel_mut().dom0_read(&be), None, "directory removed");
        assert!(h.vbds.status(id).is_none());
    });
}

#[test]
fn detach_removes_the_nodes_a_grace_after_closed_while_the_frontend_stays() {
    run(|h| {
        let (id, _front) = h.connected(Protocol::X86_64, 0);
        let be = backend_path(id);
        h.xs.channel_mut().dom0_write(&format!("{be}/online"), b"0");
        h.frontend_write(id, "state", "6");
        h.pump();
        // libxl reads Closed, then waits for the backend directory to go
        // before it removes the frontend.
        assert_eq!(h.backend_state(id).as_deref(), Some("6"));
        h.pump_after(500_000_000);
        assert_eq!(
            h.backend_state(id).as_deref(),
            Some("6"),
            "still in its grace"
        );
        h.pump_after(600_000_000);
        assert_eq!(h.xs.channel_mut().dom0_read(&be), None, "directory removed");
        assert!(h.vbds.status(id).is_none());
        assert_eq!(h.sim.mapped_grants(), 0);
    });
}

#[test]
fn detach_finishes_when_the_frontend_vanishes_without_a_watch_event() {
    run(|h| {
        let (id, _front) = h.connected(Protocol::X86_64, 0);
        let be = backend_path(id);
        h.xs.channel_mut().dom0_write(&format!("{be}/online"), b"0");
        h.frontend_write(id, "state", "6");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("6"));
        h.xs.channel_mut().dom0_rm_unwatched(&frontend_path(id));
        h.pump();
        assert!(
            h.xs.channel_mut().dom0_read(&be).is_some(),
            "not rechecked before its time"
        );
        h.pump_after(DETACH_GRACE_NS);
        assert_eq!(h.xs.channel_mut().dom0_read(&be), None, "directory removed");
        assert!(h.vbds.status(id).is_none());
    });
}

#[test]
fn online_0_before_the_frontend_connected_closes_at_once() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "ram:64K", "w");
        h.pump();
        let be = backend_path(id);
        h.xs.channel_mut().dom0_write(&format!("{be}/online"), b"0");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("6"));
        h.xs.channel_mut().dom0_rm(&frontend_path(id));
        h.pump_after(DETACH_GRACE_NS);
        assert_eq!(h.xs.channel_mut().dom0_read(&be), None);
        assert!(h.vbds.status(id).is_none());
    });
}

#[test]
fn a_target_still_connecting_is_asked_again_until_it_opens() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "nbd:10.0.0.2:3/disk0", "w");
        let refused = h.add_vbd(9, 768, "nbd:10.0.0.2/refused", "w");
        h.pump();
        // Neither served nor failed: still Initialising, no complaint.
        assert_eq!(h.backend_state(id).as_deref(), Some("1"));
        assert_eq!(h.backend_node(id, "error"), None);
        assert!(h.vbds.targets_opening());
        for _ in 0..2 {
            h.pump_after(OPEN_RECHECK_NS - 1);
            assert_eq!(h.backend_state(id).as_deref(), Some("1"));
            assert!(h.vbds.targets_opening());
            h.pump_after(1);
        }
        assert_eq!(h.backend_state(id).as_deref(), Some("2"));
        assert_eq!(h.backend_node(id, "error"), None);
        // The refused one failed rather than waits: none is opening.
        assert!(!h.vbds.targets_opening());
        // Once open, no more asking: the loop is idle.
        assert_eq!(h.pump_after(OPEN_RECHECK_NS), Progress::Idle);
        let mut front = h.connect(id, Protocol::X86_64, 0, "3");
        let page = front.grant(false, &[]);
        let read = front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(page, 0, 7)]);
        assert_eq!(h.io(&mut front, &[read]), [ok(1, blkif::OP_READ)]);
        assert_eq!(h.backend_state(refused).as_deref(), Some("6"));
        let error = h.backend_node(refused, "error").unwrap();
        assert!(error.contains("refused the export"), "{error}");
    });
}

#[test]
fn a_target_still_connecting_stops_counting_once_its_vbd_is_taken_offline() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "nbd:10.0.0.2:1000/disk0", "w");
        h.pump();
        assert!(h.vbds.targets_opening());
        let be = backend_path(id);
        h.xs.channel_mut().dom0_write(&format!("{be}/online"), b"0");
        h.pump();
        // A restart's pause is reported once no vbd waits on its target.
        assert!(!h.vbds.targets_opening());
        assert_eq!(h.backend_state(id).as_deref(), Some("6"));
        h.xs.channel_mut().dom0_rm(&frontend_path(id));
        h.pump_after(DETACH_GRACE_NS);
        assert_eq!(h.xs.channel_mut().dom0_read(&be), None);
        assert!(h.vbds.status(id).is_none());
    });
}

#[test]
fn a_bad_target_is_reported_and_the_others_keep_working() {
    run(|h| {
        let missing = h.add_vbd(8, 768, "nvme9n1", "w");
        let too_big = h.add_vbd(9, 768, "ram:1G", "w");
        let garbage = h.add_vbd(10, 768, "ram:12X", "w");
        let (good, mut front) = h.connected(Protocol::X86_64, 0);
        for (id, why) in [
            (missing, "no such disk"),
            (too_big, "out of memory"),
            (garbage, "syntax"),
        ] {
            assert_eq!(h.backend_state(id).as_deref(), Some("6"));
            let error = h.backend_node(id, "error").unwrap();
            assert!(error.contains(why), "{error}");
            assert!(h.logged(&error));
        }
        let page = front.grant(false, &[]);
        let read = front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(page, 0, 7)]);
        assert_eq!(h.io(&mut front, &[read]), [ok(1, blkif::OP_READ)]);
        assert_eq!(h.vbds.status(good).unwrap().state, XenbusState::Connected);
        // The toolstack gives up on the failed one: it goes away cleanly.
        let be = backend_path(missing);
        h.xs.channel_mut().dom0_write(&format!("{be}/online"), b"0");
        h.pump();
        assert_eq!(h.backend_state(missing).as_deref(), Some("6"));
        h.pump_after(DETACH_GRACE_NS);
        assert!(h.vbds.status(missing).is_none());
    });
}

#[test]
fn a_frontend_that_breaks_the_ring_is_disconnected() {
    run(|h| {
        let (id, mut front) = h.connected(Protocol::X86_64, 0);
        let (_, mut other_front) = h.serve(8, "ram:64K", "w", Protocol::X86_64);

        front.corrupt_req_prod(33);
        h.sim.remote_send(FRONTEND, front.port()).unwrap();
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("5"));
        let error = h.backend_node(id, "error").unwrap();
        assert!(error.contains("broke a ring"), "{error}");
        assert!(!h.vbds.status(id).unwrap().connected);
        assert!(front.responses().is_empty());

        let page = other_front.grant(false, &[]);
        let read = other_front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(page, 0, 7)]);
        assert_eq!(h.io(&mut other_front, &[read]), [ok(1, blkif::OP_READ)]);
        assert_eq!(h.sim.mapped_grants(), 1, "only the other ring");
    });
}

#[test]
fn a_vbd_removed_by_the_toolstack_is_dropped() {
    run(|h| {
        let (id, mut front) = h.connected(Protocol::X86_64, 0);
        let disk = h.disk(0);
        disk.borrow_mut().hold = true;
        let page = front.grant(false, &[]);
        let read = front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(page, 0, 7)]);
        assert!(h.io(&mut front, &[read]).is_empty());
        h.xs.channel_mut().dom0_rm(&backend_path(id));
        h.pump();
        assert!(
            h.vbds.status(id).is_some(),
            "kept while the device holds a request"
        );
        assert!(h.sim.mapped_grants() > 0);
        disk.borrow_mut().hold = false;
        assert_eq!(h.pump(), Progress::Idle);
        assert!(h.vbds.status(id).is_none());
        assert_eq!(h.sim.mapped_grants(), 0);
        assert_eq!(front.responses(), [ok(1, blkif::OP_READ)]);
    });
}

#[test]
fn answered_requests_stay_counted_after_their_vbd_is_gone() {
    run(|h| {
        let (id, mut front) = h.connected(Protocol::X86_64, 0);
        let page = front.grant(false, &[]);
        let halves = [seg(page, 0, 3), seg(page, 4, 7)];
        let read = front.data_request(blkif::OP_READ, 1, 0, 2, &halves);
        let flush = front.data_request(blkif::OP_FLUSH_DISKCACHE, 2, 0, 0, &[]);
        assert_eq!(h.io(&mut front, &[read, flush]).len(), 2);
        let answered = |h: &Harness<'_>| (h.vbds.answered().answered, h.vbds.answered().segments);
        assert_eq!(answered(h), (2, 2));
        h.close_leaving_nothing_mapped(id);
        assert_eq!(answered(h), (2, 2), "its ring closed");
        h.xs.channel_mut().dom0_rm(&backend_path(id));
        assert_eq!(h.pump(), Progress::Idle);
        assert!(h.vbds.status(id).is_none());
        assert_eq!(answered(h), (2, 2), "the vbd removed");
    });
}

#[test]
fn unusable_frontend_details_are_reported() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "ram:64K", "w");
        h.pump();
        h.frontend_write(id, "ring-ref", "12345");
        h.frontend_write(id, "event-channel", "1");
        h.frontend_write(id, "state", "3");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("5"));
        assert!(h.backend_node(id, "error").unwrap().contains("ring-ref"));
        assert_eq!(h.sim.mapped_grants(), 0);

        // The frontend restarts without closing: offered the disk again.
        h.frontend_write(id, "protocol", "arm-abi");
        h.frontend_write(id, "state", "1");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("2"));
        h.frontend_write(id, "state", "3");
        h.pump();
        assert!(h.backend_node(id, "error").unwrap().contains("protocol"));
    });
}

#[test]
fn other_watches_are_left_to_the_kernel() {
    run(|h| {
        let event = xen_pv::xenstore::WatchEvent {
            path: "control/shutdown".into(),
            token: "kernel".into(),
        };
        assert!(!h.vbds.on_watch_event(&event));
        h.xs.channel_mut()
            .inject_watch_event("control/shutdown", "kernel");
        h.xs.channel_mut().step();
        let mut others = Vec::new();
        let intake = h
            .vbds
            .take_watch_events(&mut h.xs, |e| others.push(e.clone()))
            .unwrap();
        assert_eq!(intake.taken, 1);
        assert_eq!(others, [event]);
    });
}

/// Where the request id sits in an entry of each ABI (every layout has it
/// there).
fn id_offset(protocol: Protocol) -> usize {
    match protocol {
        Protocol::X86_64 => 8,
        Protocol::X86_32 => 4,
    }
}

/// A valid request of any kind, for the parser fuzz to mutate.
fn valid_entry(front: &SimBlkfront<'_>, rng: &mut FuzzRng, id: u64) -> Vec<u8> {
    let segs: Vec<Seg> = (0..blkif::MAX_SEGMENTS_PER_REQUEST)
        .map(|_| {
            let first_sect = rng.below(8) as u8;
            seg(
                rng.below(64) as u32,
                first_sect,
                first_sect + rng.below(8 - u64::from(first_sect)) as u8,
            )
        })
        .collect();
    let sector = rng.below(4096);
    match rng.below(5) {
        0 => {
            let operation = rng.pick(&[blkif::OP_READ, blkif::OP_WRITE, blkif::OP_WRITE_BARRIER]);
            front.data_request(operation, id, sector, 1 + rng.below(11) as u8, &segs)
        }
        1 => front.data_request(blkif::OP_FLUSH_DISKCACHE, id, 0, 0, &[]),
        2 => front.discard_request(id, sector, rng.below(4096), rng.one_in(4)),
        _ => {
            let operation = rng.pick(&[blkif::OP_READ, blkif::OP_WRITE]);
            let pages: Vec<u32> = (0..8).map(|_| rng.below(64) as u32).collect();
            front.indirect_request(operation, id, sector, 1 + rng.below(256) as u16, &pages)
        }
    }
}

#[test]
fn fuzz_blkif_parsing_for_every_abi() {
    let mut run = FuzzRun::new("blkif parsing", 0x5eed, 20_000);
    let mut rng = run.rng();
    let sim = SimXen::new();
    let fronts = [Protocol::X86_32, Protocol::X86_64, Protocol::native()]
        .map(|protocol| SimBlkfront::new(&sim, FRONTEND, protocol, 0));
    while run.another() {
        let front = &fronts[rng.below(3) as usize];
        let protocol = front.protocol();
        let id = rng.next_u64();
        let mut entry = [0u8; blkif::ENTRY_SIZE_X86_64];
        if rng.one_in(4) {
            rng.fill(&mut entry);
            entry[0] = rng.below(9) as u8;
        } else {
            let valid = valid_entry(front, &mut rng, id);
            entry[..valid.len()].copy_from_slice(&valid);
        }
        let id_at = id_offset(protocol);
        for _ in 0..rng.below(4) {
            let at = rng.below(protocol.entry_size() as u64) as usize;
            entry[at] = rng.next_u64() as u8;
        }
        let wire_id = u64::from_le_bytes(entry[id_at..id_at + 8].try_into().unwrap());
        let max_indirect = rng.pick(&[0, 1, 11, 256, u16::MAX]);
        match blkif::parse_request(protocol, &entry, max_indirect) {
            Ok(
                blkif::BlkifRequest::ReadWrite { id, segments, .. }
                | blkif::BlkifRequest::Barrier { id, segments, .. },
            ) => {
                assert_eq!(id, wire_id);
                let segs = segments.as_slice();
                assert!(segs.len() <= blkif::MAX_SEGMENTS_PER_REQUEST);
                assert!(
                    segs.iter().all(|s| s.first_sect <= s.last_sect
                        && s.last_sect <= blkif::LAST_SECTOR_IN_PAGE)
                );
            }
            Ok(blkif::BlkifRequest::Indirect {
                id, nr_segments, ..
            }) => {
                assert_eq!(id, wire_id);
                assert!(nr_segments >= 1 && nr_segments <= max_indirect);
                let pages = usize::from(nr_segments).div_ceil(blkif::SEGMENTS_PER_INDIRECT_PAGE);
                assert!(pages <= blkif::MAX_INDIRECT_PAGES_PER_REQUEST);
            }
            Ok(blkif::BlkifRequest::Flush { id } | blkif::BlkifRequest::Discard { id, .. }) => {
                assert_eq!(id, wire_id)
            }
            Err(refused) => {
                assert_eq!(refused.id, wire_id);
                assert!([RSP_ERROR, RSP_EOPNOTSUPP].contains(&refused.status));
            }
        }
    }
}

#[test]
fn random_requests_are_all_answered_without_harm() {
    for protocol in [Protocol::X86_32, Protocol::X86_64] {
        run(|h| {
            let (id, mut front) = h.connected(protocol, 0);
            let grefs: Vec<u32> = (0..4)
                .map(|i| front.grant(i % 2 == 0, &[]))
                .chain([0, 9999])
                .collect();
            let mut rng = FuzzRng::new(0x5eed_0000 ^ protocol.entry_size() as u64);
            for round in 0..40u64 {
                let requests: Vec<Vec<u8>> = (0..32u64)
                    .map(|i| {
                        let segs: Vec<Seg> = (0..11)
                            .map(|_| Seg {
                                gref: grefs[rng.below(grefs.len() as u64) as usize],
                                first_sect: rng.below(10) as u8,
                                last_sect: rng.below(10) as u8,
                            })
                            .collect();
                        let op = rng.below(9) as u8;
                        let nr = rng.below(14) as u8;
                        let sector = rng.below(2100);
                        front.data_request(op, round * 32 + i, sector, nr, &segs)
                    })
                    .collect();
                let mut responses = h.io(&mut front, &requests);
                responses.sort_by_key(|r| r.id);
                let ids: Vec<u64> = responses.iter().map(|r| r.id).collect();
                assert_eq!(ids, (round * 32..round * 32 + 32).collect::<Vec<_>>());
                assert!(
                    responses
                        .iter()
                        .all(|r| [RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP].contains(&r.status))
                );
            }
            assert_eq!(h.vbds.status(id).unwrap().state, XenbusState::Connected);
            assert_eq!(h.grants.stats().mapped, 1);
            assert_eq!(h.pump(), Progress::Idle);
        });
    }
}

#[test]
fn hostile_frontend_nodes_leave_the_backend_consistent() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "ram:64K", "w");
        h.pump();
        let values = [
            "0",
            "1",
            "2",
            "3",
            "4",
            "5",
            "6",
            "7",
            "8",
            "9",
            "-1",
            "",
            "4x",
            "x86_32-abi",
            "99999999999999999999",
            "\u{0}",
            "3 ",
        ];
        let mut rng = FuzzRng::new(77);
        let mut fronts = Vec::new();
        for _ in 0..300 {
            let value = values[rng.below(values.len() as u64) as usize];
            match rng.below(6) {
                0 => h.frontend_write(id, "ring-ref", value),
                1 => h.frontend_write(id, "event-channel", value),
                2 => h.frontend_write(id, "protocol", value),
                3 => {
                    let front = SimBlkfront::new(h.sim, FRONTEND, Protocol::X86_64, 0);
                    h.publish_ring(id, &front, value);
                    fronts.push(front);
                }
                _ => h.frontend_write(id, "state", value),
            }
            h.pump();
            let status = h.vbds.status(id).unwrap();
            assert!(status.connected == (status.state == XenbusState::Connected));
            assert!(h.sim.mapped_grants() <= 1);
        }
        // Whatever happened, a clean close and reconnect works.
        h.frontend_write(id, "state", "6");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("6"));
        assert_eq!(h.sim.mapped_grants(), 0);
        h.frontend_write(id, "state", "1");
        h.pump();
        let mut front = h.connect(id, Protocol::X86_64, 0, "3");
        assert_eq!(
            h.backend_node(id, "error"),
            None,
            "cleared by the reconnect"
        );
        let page = front.grant(false, &[]);
        let read = front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(page, 0, 7)]);
        assert_eq!(h.io(&mut front, &[read]), [ok(1, blkif::OP_READ)]);
    });
}

fn indirect_round_trip(protocol: Protocol) {
    run(|h| {
        let (id, mut front) = h.connected(protocol, 0);
        assert_eq!(
            h.backend_node(id, "feature-max-indirect-segments")
                .as_deref(),
            Some("256")
        );
        let sources: Vec<u32> = (0..40u8).map(|i| front.grant(true, &pattern(i))).collect();
        let segs: Vec<Seg> = sources.iter().map(|&g| seg(g, 0, 7)).collect();
        let list = front.grant(true, &segment_page(&segs));
        let write = front.indirect_request(blkif::OP_WRITE, 1, 64, 40, &[list]);
        assert_eq!(h.io(&mut front, &[write]), [ok(1, blkif::OP_WRITE)]);
        let disk = h.disk(0);
        for i in 0..40u8 {
            let at = (64 + 8 * usize::from(i)) * 512;
            assert_eq!(disk.borrow().bytes(at, 4096), pattern(i), "page {i}");
        }

        let targets: Vec<u32> = (0..40).map(|_| front.grant(false, &[])).collect();
        // Read back half pages: sectors 4..=7 of each source page.
        let segs: Vec<Seg> = targets.iter().map(|&g| seg(g, 4, 7)).collect();
        let list = front.grant(true, &segment_page(&segs));
        let read = front.indirect_request(blkif::OP_READ, 2, 64, 40, &[list]);
        assert_eq!(h.io(&mut front, &[read]), [ok(2, blkif::OP_READ)]);
        for (i, &target) in targets.iter().enumerate() {
            let want = disk.borrow().bytes((64 + 4 * i) * 512, 2048);
            assert_eq!(front.page(target)[2048..], want, "segment {i}");
        }
        assert_eq!(
            h.grants.stats().mapped,
            1,
            "indirect and data pages unmapped"
        );
    });
}

#[test]
fn indirect_requests_x86_64_abi() {
    indirect_round_trip(Protocol::X86_64);
}

#[test]
fn indirect_requests_x86_32_abi() {
    indirect_round_trip(Protocol::X86_32);
}

#[test]
fn invalid_indirect_requests_are_refused() {
    run(|h| {
        let (_, mut front) = h.connected(Protocol::X86_64, 0);
        let page = front.grant(false, &[]);
        let good = front.grant(true, &segment_page(&[seg(page, 0, 7)]));
        let bad_sectors = front.grant(true, &segment_page(&[seg(page, 0, 7), seg(page, 6, 2)]));
        let bad_gref = front.grant(true, &segment_page(&[seg(9999, 0, 7)]));
        let cases = [
            (
                front.indirect_request(blkif::OP_READ, 1, 0, 1, &[good]),
                RSP_OKAY,
            ),
            (
                front.indirect_request(blkif::OP_READ, 2, 0, 257, &[good]),
                RSP_ERROR,
            ),
            (
                front.indirect_request(blkif::OP_READ, 3, 0, 0, &[good]),
                RSP_ERROR,
            ),
            (
                front.indirect_request(blkif::OP_READ, 4, 0, 1, &[9999]),
                RSP_ERROR,
            ),
            (
                front.indirect_request(blkif::OP_READ, 5, 0, 2, &[bad_sectors]),
                RSP_ERROR,
            ),
            (
                front.indirect_request(blkif::OP_READ, 6, 0, 1, &[bad_gref]),
                RSP_ERROR,
            ),
            (
                front.indirect_request(blkif::OP_FLUSH_DISKCACHE, 7, 0, 1, &[good]),
                RSP_ERROR,
            ),
            (
                front.indirect_request(blkif::OP_READ, 8, 2047, 1, &[good]),
                RSP_ERROR,
            ),
            (
                front.indirect_request(blkif::OP_WRITE, 9, 0, 1, &[good]),
                RSP_OKAY,
            ),
        ];
        let requests: Vec<Vec<u8>> = cases.iter().map(|(r, _)| r.clone()).collect();
        let want: Vec<i16> = cases.iter().map(|(_, s)| *s).collect();
        assert_eq!(h.statuses(&mut front, &requests), want);
        assert_eq!(h.grants.stats().mapped, 1);
    });
}

#[test]
fn mapped_grants_per_ring_are_bounded() {
    run(|h| {
        let (_, mut front) = h.connected(Protocol::X86_64, 0);
        let page = front.grant(false, &[]);
        let segs = vec![seg(page, 0, 7); 256];
        let list = front.grant(true, &segment_page(&segs));
        let requests: Vec<Vec<u8>> = (0..8)
            .map(|id| front.indirect_request(blkif::OP_READ, id, 0, 256, &[list]))
            .collect();
        let disk = h.disk(0);
        disk.borrow_mut().hold = true;
        assert!(h.io(&mut front, &requests).is_empty());
        assert_eq!(
            disk.borrow().ops.len(),
            4,
            "four requests of 256 grants fit"
        );
        assert_eq!(
            h.grants.stats().mapped,
            1 + ring_io::MAX_MAPPED_GRANTS_PER_RING
        );
        disk.borrow_mut().hold = false;
        h.pump();
        let responses = front.responses();
        assert_eq!(responses.len(), 8);
        assert!(responses.iter().all(|r| r.status == RSP_OKAY));
        assert_eq!(h.grants.stats().mapped, 1);
    });
}

/// The hypercalls the backend made to answer `requests` (submitted at
/// once), as kinds of the hypercall profile: grant map and unmap calls,
/// and ring notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CallsMade {
    maps: u64,
    unmaps: u64,
    notifies: u64,
}

impl Harness<'_> {
    fn calls_made(&mut self, front: &mut SimBlkfront<'_>, requests: &[Vec<u8>]) -> CallsMade {
        let calls = |sim: &SimXen| CallsMade {
            maps: sim.calls(HypercallOp::GrantTable, MapGrantRef::CMD),
            unmaps: sim.calls(HypercallOp::GrantTable, UnmapGrantRef::CMD),
            notifies: sim.calls(HypercallOp::EventChannel, EvtchnSend::CMD),
        };
        let before = calls(self.sim);
        let responses = self.io(front, requests);
        assert_eq!(responses.len(), requests.len());
        assert!(responses.iter().all(|r| r.status == RSP_OKAY));
        let after = calls(self.sim);
        CallsMade {
            maps: after.maps - before.maps,
            unmaps: after.unmaps - before.unmaps,
            notifies: after.notifies - before.notifies,
        }
    }
}

/// What one request costs in hypercalls on the serving path, as Linux
/// blkfront sends them: a 4 KiB read, and a 128 KiB write (blkfront's
/// default of 32 indirect segments: a 1 MiB write is eight of them), with
/// and without persistent grants, once the kept grants are mapped. The
/// loop's sleep (`SCHEDOP_poll`) is the kernel's and comes on top.
#[test]
fn hypercalls_per_request_on_the_serving_path() {
    for persistent in [false, true] {
        run(|h| {
            let (id, mut front) = match persistent {
                true => h.persistent_frontend(Protocol::X86_64),
                false => h.connected(Protocol::X86_64, 0),
            };
            let page = front.grant(false, &[]);
            let pages: Vec<u32> = (0..32).map(|_| front.grant(false, &[])).collect();
            let segs: Vec<Seg> = pages.iter().map(|&g| seg(g, 0, 7)).collect();
            let list = front.grant(false, &segment_page(&segs));
            let read = front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(page, 0, 7)]);
            let write = front.indirect_request(blkif::OP_WRITE, 2, 256, 32, &[list]);
            let calls = |maps, unmaps| CallsMade {
                maps,
                unmaps,
                notifies: 1,
            };
            // The read's grant, then the write's indirect page and data
            // grants (each batch a call); kept grants, the indirect page
            // among them, cost none.
            let (read_4k, write_128k) = match persistent {
                true => (calls(0, 0), calls(0, 0)),
                false => (calls(1, 1), calls(2, 2)),
            };
            // The first of each maps the grants kept from then on.
            h.calls_made(&mut front, core::slice::from_ref(&read));
            h.calls_made(&mut front, core::slice::from_ref(&write));
            for _ in 0..2 {
                let made = (
                    h.calls_made(&mut front, core::slice::from_ref(&read)),
                    h.calls_made(&mut front, core::slice::from_ref(&write)),
                );
                assert_eq!(made, (read_4k, write_128k), "persistent: {persistent}");
            }
            h.close_leaving_nothing_mapped(id);
        });
    }
}

#[test]
fn a_kept_indirect_page_serves_a_later_read_as_its_data_page() {
    // Linux blkfront takes indirect pages and data pages from one pool of
    // persistent grants: the page an indirect write listed its segments
    // in may be a read's data page next. The first such read's data page
    // is mapped writable once, in place of the read-only mapping kept for
    // the indirect page, and later reads cost no hypercall (before, every
    // such read mapped and unmapped it anew).
    run(|h| {
        let (id, mut front) = h.persistent_frontend(Protocol::X86_64);
        let pages: Vec<u32> = (0..32).map(|_| front.grant(false, &[])).collect();
        let segs: Vec<Seg> = pages.iter().map(|&g| seg(g, 0, 7)).collect();
        front.fill(pages[0], &pattern(9));
        let list = front.grant(false, &segment_page(&segs));
        let write = front.indirect_request(blkif::OP_WRITE, 1, 256, 32, &[list]);
        h.calls_made(&mut front, core::slice::from_ref(&write));
        let read = front.data_request(blkif::OP_READ, 2, 256, 1, &[seg(list, 0, 7)]);
        let calls = |maps, unmaps| CallsMade {
            maps,
            unmaps,
            notifies: 1,
        };
        // The writable mapping, and the read-only one unmapped.
        assert_eq!(
            h.calls_made(&mut front, core::slice::from_ref(&read)),
            calls(1, 1)
        );
        assert_eq!(front.page(list), pattern(9), "the read's data landed");
        for _ in 0..2 {
            let made = h.calls_made(&mut front, core::slice::from_ref(&read));
            assert_eq!(made, calls(0, 0));
            // The page lists the write's segments again.
            front.fill(list, &segment_page(&segs));
            let made = h.calls_made(&mut front, core::slice::from_ref(&write));
            assert_eq!(
                made,
                calls(0, 0),
                "the indirect page reads its kept mapping"
            );
        }
        h.close_leaving_nothing_mapped(id);
    });
}

#[test]
fn persistent_grants_are_mapped_once_and_unmapped_on_disconnect() {
    run(|h| {
        let (id, mut front) = h.persistent_frontend(Protocol::X86_32);
        let pool: Vec<u32> = (0..3).map(|_| front.grant(false, &[])).collect();
        let maps_before = h.grants.stats().maps;
        for round in 0..5u8 {
            front.fill(pool[0], &pattern(round));
            front.fill(pool[1], &pattern(round + 100));
            let sector = u64::from(round) * 16;
            // Both halves of one page in one request: the second half
            // cannot borrow the kept mapping the first one uses.
            let segs = [seg(pool[0], 0, 7), seg(pool[1], 0, 3), seg(pool[1], 4, 7)];
            let write = front.data_request(blkif::OP_WRITE, 1, sector, 3, &segs);
            let read = front.data_request(blkif::OP_READ, 2, sector, 1, &[seg(pool[2], 0, 7)]);
            let responses = h.io(&mut front, &[write]);
            assert_eq!(responses, [ok(1, blkif::OP_WRITE)]);
            assert_eq!(h.io(&mut front, &[read]), [ok(2, blkif::OP_READ)]);
            assert_eq!(front.page(pool[2]), pattern(round));
            let disk = h.disk(0);
            assert_eq!(
                disk.borrow().bytes((sector as usize + 8) * 512, 4096),
                pattern(round + 100)
            );
        }
        let maps = h.grants.stats().maps - maps_before;
        assert_eq!(
            maps,
            3 + 5,
            "three kept grants, one extra mapping per round"
        );
        assert_eq!(h.grants.stats().mapped, 1 + 3);
        h.close_leaving_nothing_mapped(id);
    });
}

#[test]
fn a_fresh_grant_per_request_keeps_the_latest_grants_and_the_mapped_count_bounded() {
    run(|h| {
        let (id, mut front) = h.persistent_frontend(Protocol::X86_64);
        let mut most_mapped = 0;
        let mut last_page = 0;
        for round in 0..200u64 {
            let requests: Vec<Vec<u8>> = (0..32u64)
                .map(|i| {
                    last_page = front.grant(false, &[]);
                    let operation = [blkif::OP_WRITE, blkif::OP_READ][i as usize % 2];
                    let sector = (round * 32 + i) % 256 * 8;
                    front.data_request(
                        operation,
                        round * 32 + i,
                        sector,
                        1,
                        &[seg(last_page, 0, 7)],
                    )
                })
                .collect();
            let responses = h.io(&mut front, &requests);
            assert_eq!(responses.len(), requests.len());
            assert!(responses.iter().all(|r| r.status == RSP_OKAY));
            most_mapped = most_mapped.max(h.grants.stats().mapped);
        }
        assert!(most_mapped <= 1 + persistent::MAX_PERSISTENT_GRANTS_PER_RING);
        assert!(most_mapped > persistent::MAX_PERSISTENT_GRANTS_PER_RING / 2);
        // The latest grant is kept (the oldest ones made room for it).
        let maps_before = h.grants.stats().maps;
        let read = front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(last_page, 0, 7)]);
        assert_eq!(h.io(&mut front, &[read]), [ok(1, blkif::OP_READ)]);
        assert_eq!(h.grants.stats().maps, maps_before, "no new mapping");
        h.close_leaving_nothing_mapped(id);
    });
}

#[test]
fn a_flooding_frontend_takes_a_bounded_share_of_each_pass() {
    run(|h| {
        let flood_id = h.add_vbd(FRONTEND, DEVID, "ram:64K", "w");
        let calm_id = h.add_vbd(FRONTEND + 1, DEVID, "ram:64K", "w");
        h.pump();
        // 512 entries, refilled after every pass with requests refused at
        // once (which need no slot: only the budget bounds them).
        let mut flood = SimBlkfront::with_pages(h.sim, FRONTEND, Protocol::X86_64, 0, Some(4));
        h.publish_ring(flood_id, &flood, "3");
        let mut calm = h.connect(calm_id, Protocol::X86_64, 0, "3");
        let page = calm.grant(false, &[]);
        let mut next_id = 0u64;
        let late_id = h.add_vbd(FRONTEND + 2, DEVID, "ram:64K", "w");
        for pass in 0..64u64 {
            let refill: Vec<Vec<u8>> = (0..flood.ring_size())
                .map(|_| {
                    next_id += 1;
                    flood.data_request(0xff, next_id, 0, 1, &[])
                })
                .collect();
            flood.submit(&refill);
            let read = calm.data_request(blkif::OP_READ, pass, 0, 1, &[seg(page, 0, 7)]);
            assert_eq!(calm.submit(&[read]), 1);
            let requests_before = h.xs.channel_mut().requests();
            h.pass();
            assert_eq!(
                calm.responses(),
                [ok(pass, blkif::OP_READ)],
                "answered in its pass"
            );
            // Its budget once per pass, and once per xenstore wait of the
            // toolstack's work (the late vbd's), when the rings are served
            // too.
            let waits = (h.xs.channel_mut().requests() - requests_before) as usize;
            let answered = flood.responses();
            let budget = ring_io::REQUESTS_TAKEN_PER_RING_PER_PASS;
            if waits == 0 {
                assert_eq!(answered.len(), budget);
            } else {
                assert!(answered.len() <= budget * (1 + waits));
            }
            assert!(answered.iter().all(|r| r.status != RSP_OKAY));
        }
        // The toolstack was heard meanwhile.
        assert_eq!(h.backend_state(late_id).as_deref(), Some("2"));
        assert_eq!(
            h.vbds.status(flood_id).unwrap().state,
            XenbusState::Connected
        );
    });
}

/// A vbd's connect makes tens of xenstore round trips, each waiting for
/// xenstored (hundreds of milliseconds when dom0 is busy): the other
/// vbds' rings are served during those waits, not after them.
#[test]
fn rings_are_served_while_another_vbd_waits_for_xenstore() {
    run(|h| {
        let busy_id = h.add_vbd(FRONTEND, DEVID, "ram:1M", "w");
        let late_id = h.add_vbd(FRONTEND + 1, DEVID, "ram:1M", "w");
        h.pump();
        // 128 entries: four passes' budget of requests.
        let mut busy = SimBlkfront::with_pages(h.sim, FRONTEND, Protocol::X86_64, 0, Some(2));
        h.publish_ring(busy_id, &busy, "3");
        assert_eq!(h.backend_state(busy_id).as_deref(), Some("4"));
        let late = SimBlkfront::new(h.sim, FRONTEND + 1, Protocol::X86_64, 0);
        for (name, value) in late.ring_nodes() {
            h.frontend_write(late_id, &name, &value);
        }
        h.frontend_write(late_id, "state", "3");
        let page = busy.grant(false, &[]);
        let reads: Vec<Vec<u8>> = (0..u64::from(busy.ring_size()))
            .map(|i| busy.data_request(blkif::OP_READ, i, i, 1, &[seg(page, 0, 0)]))
            .collect();
        assert_eq!(busy.submit(&reads), reads.len());
        // The toolstack's part of a pass alone: the rings are not polled.
        h.xs.channel_mut().step();
        let intake = h.vbds.take_watch_events(&mut h.xs, |event| {
            panic!("an event of no blkback watch: {event:?}")
        });
        assert!(intake.unwrap().taken > 0);
        let mut svc = XenBackendServices {
            events: &mut h.events,
            grants: &mut h.grants,
            platform: &mut h.platform,
        };
        h.vbds.attend(&mut h.xs, &mut svc, &[]);
        assert_eq!(h.backend_state(late_id).as_deref(), Some("4"));
        assert!(h.vbds.ring_passes_while_waiting() >= 4);
        let answered = busy.responses();
        assert_eq!(answered.len(), reads.len(), "answered during the connect");
        assert!(answered.iter().all(|r| r.status == RSP_OKAY));
        assert_eq!(h.pump(), Progress::Idle);
    });
}

/// The unserved-rings report's gap runs from the start of one serving
/// pass to the next, the loop's or one in a xenstore wait, and not across
/// an idle halt.
#[test]
fn unserved_gaps_run_from_one_serving_pass_to_the_next() {
    run(|h| {
        let (_, _front) = h.connected(Protocol::X86_64, 0);
        let gap = |len_ns, ended_ns| UnservedGap { len_ns, ended_ns };
        let start = h.platform.now_ns.get();
        h.vbds.take_longest_unserved(start);
        h.pump_after(300_000_000);
        let loop_passes = start + 300_000_000;
        assert_eq!(
            h.vbds.take_longest_unserved(loop_passes),
            gap(300_000_000, loop_passes)
        );
        h.vbds.idle_until(loop_passes + 5_000_000_000);
        h.pump_after(5_001_000_000);
        let woken = loop_passes + 5_001_000_000;
        assert_eq!(h.vbds.take_longest_unserved(woken), gap(1_000_000, woken));

        // A new vbd: the toolstack's part of a pass alone, 2 s on.
        h.add_vbd(FRONTEND + 1, DEVID, "ram:64K", "w");
        let waits = woken + 2_000_000_000;
        h.platform.now_ns.set(waits);
        h.xs.channel_mut().step();
        let intake = h.vbds.take_watch_events(&mut h.xs, |event| {
            panic!("an event of no blkback watch: {event:?}")
        });
        assert!(intake.unwrap().taken > 0);
        let passes_before = h.vbds.ring_passes_while_waiting();
        let mut svc = XenBackendServices {
            events: &mut h.events,
            grants: &mut h.grants,
            platform: &mut h.platform,
        };
        h.vbds.attend(&mut h.xs, &mut svc, &[]);
        assert!(h.vbds.ring_passes_while_waiting() > passes_before);
        // Its waits' passes closed the 2 s gap; none since is as long.
        assert_eq!(
            h.vbds.take_longest_unserved(waits + 500_000_000),
            gap(2_000_000_000, waits)
        );
    });
}

#[test]
fn each_pass_starts_serving_one_vbd_further() {
    run(|h| {
        let ids =
            [FRONTEND, FRONTEND + 1, FRONTEND + 2].map(|f| h.add_vbd(f, DEVID, "ram:64K", "w"));
        h.pump();
        let mut fronts = ids.map(|id| h.connect(id, Protocol::X86_64, 0, "3"));
        let mut first_served = Vec::new();
        for pass in 0..6u64 {
            // A second a pass: the log's rate limit lets each refusal show.
            let now = h.platform.now_ns.get();
            h.platform.now_ns.set(now + LOG_WINDOW_NS);
            for front in &mut fronts {
                let refused = front.data_request(0xff, pass, 0, 1, &[]);
                assert_eq!(front.submit(&[refused]), 1);
            }
            let logged = h.platform.lines.len();
            h.pass();
            let first = h.platform.lines[logged..]
                .iter()
                .find(|l| l.contains("refused"));
            first_served.push(String::from(&first.unwrap()[..14]));
            fronts
                .iter_mut()
                .for_each(|f| assert_eq!(f.responses().len(), 1));
        }
        let order = ["vbd 7/51712: r", "vbd 8/51712: r", "vbd 9/51712: r"];
        let start = order.iter().position(|o| *o == first_served[0]).unwrap();
        let expected: Vec<&str> = (start..start + 6).map(|i| order[i % 3]).collect();
        assert_eq!(first_served, expected);
    });
}

#[test]
fn a_frontend_that_returns_while_requests_drain_is_served_again() {
    for (returning_state, backend_after) in [("1", "2"), ("3", "4")] {
        run(|h| {
            let (id, mut front) = h.connected(Protocol::X86_64, 0);
            let disk = h.disk(0);
            disk.borrow_mut().hold = true;
            let page = front.grant(false, &[]);
            let read = front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(page, 0, 7)]);
            assert!(h.io(&mut front, &[read]).is_empty());
            h.frontend_write(id, "state", "6");
            h.pump();
            assert_eq!(h.backend_state(id).as_deref(), Some("5"), "draining");
            // The guest rebooted fast: a new ring before the old one drained.
            let front = SimBlkfront::new(h.sim, FRONTEND, Protocol::X86_64, 0);
            h.publish_ring(id, &front, returning_state);
            assert_eq!(h.backend_state(id).as_deref(), Some("5"));
            disk.borrow_mut().hold = false;
            h.pump();
            assert_eq!(h.backend_state(id).as_deref(), Some(backend_after));
            assert_eq!(h.sim.mapped_grants(), usize::from(backend_after == "4"));
        });
    }
}

#[test]
fn a_frontend_may_open_several_queues() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "multiqueue", "w");
        h.pump();
        let max = format!("{}", served_disk::MAX_QUEUES);
        assert_eq!(h.backend_node(id, "multi-queue-max-queues"), Some(max));
        let mut fronts = h.connect_queues(id, 3);
        assert_eq!(h.backend_state(id).as_deref(), Some("4"));
        assert_eq!(h.sim.mapped_grants(), 3);

        let source = fronts[0].grant(true, &pattern(8));
        let write = fronts[0].data_request(blkif::OP_WRITE, 1, 40, 1, &[seg(source, 0, 7)]);
        assert_eq!(h.io(&mut fronts[0], &[write]), [ok(1, blkif::OP_WRITE)]);
        let target = fronts[2].grant(false, &[]);
        let read = fronts[2].data_request(blkif::OP_READ, 2, 40, 1, &[seg(target, 0, 7)]);
        assert_eq!(h.io(&mut fronts[2], &[read]), [ok(2, blkif::OP_READ)]);
        assert_eq!(fronts[2].page(target), pattern(8));
        assert!(fronts[1].responses().is_empty());

        h.frontend_write(id, "state", "6");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("6"));
        assert_eq!(h.sim.mapped_grants(), 0);
        // Asking for more queues than offered is refused with a reason.
        h.frontend_write(id, "multi-queue-num-queues", "5");
        h.frontend_write(id, "state", "3");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("5"));
        assert!(h.backend_node(id, "error").unwrap().contains("queues"));
        assert_eq!(h.sim.mapped_grants(), 0);
    });
}

#[test]
fn a_single_queue_disk_offers_no_queues() {
    run(|h| {
        let (id, _front) = h.connected(Protocol::X86_64, 0);
        assert_eq!(h.backend_node(id, "multi-queue-max-queues"), None);
    });
}

#[test]
fn a_full_grant_window_fails_requests_not_the_backend() {
    run_with_window(4, |h| {
        let (id, mut front) = h.connected(Protocol::X86_64, 0);
        let page = front.grant(false, &[]);
        let segs = [seg(page, 0, 0); 11];
        let big = front.data_request(blkif::OP_READ, 1, 0, 11, &segs);
        let small = front.data_request(blkif::OP_READ, 2, 0, 1, &segs[..1]);
        assert_eq!(h.statuses(&mut front, &[big]), [RSP_ERROR]);
        assert_eq!(h.statuses(&mut front, &[small]), [RSP_OKAY]);
        assert_eq!(h.grants.stats().mapped, 1);
        assert_eq!(h.vbds.status(id).unwrap().state, XenbusState::Connected);
    });
}

#[test]
fn multi_page_rings_hold_more_requests() {
    for (protocol, order) in [(Protocol::X86_64, 4), (Protocol::X86_32, 1)] {
        run(|h| {
            let id = h.add_vbd(FRONTEND, DEVID, "ram:1M", "w");
            h.pump();
            let max = format!("{}", ring_io::MAX_RING_PAGE_ORDER);
            assert_eq!(h.backend_node(id, "max-ring-page-order"), Some(max));
            let mut front =
                SimBlkfront::with_pages(h.sim, FRONTEND, protocol, u32::MAX - 9, Some(order));
            h.publish_ring(id, &front, "3");
            assert_eq!(h.backend_state(id).as_deref(), Some("4"));
            assert_eq!(h.sim.mapped_grants(), 1 << order);
            let slots = xen_pv::ring::ring_entries(PAGE_SIZE << order, protocol.entry_size());
            let source = front.grant(true, &pattern(11));
            let requests: Vec<Vec<u8>> = (0..u64::from(slots))
                .map(|i| {
                    let sector = i % 256 * 8;
                    front.data_request(blkif::OP_WRITE, i, sector, 1, &[seg(source, 0, 7)])
                })
                .collect();
            let mut responses = h.io(&mut front, &requests);
            responses.sort_by_key(|r| r.id);
            assert_eq!(responses.len(), slots as usize);
            assert!(responses.iter().all(|r| r.status == RSP_OKAY));
            let last = (slots as usize - 1) % 256 * 8 * 512;
            assert_eq!(h.disk(0).borrow().bytes(last, 4096), pattern(11));
            h.frontend_write(id, "state", "6");
            h.pump();
            assert_eq!(h.sim.mapped_grants(), 0);
        });
    }
}

#[test]
fn a_ring_larger_than_offered_is_refused() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "ram:64K", "w");
        h.pump();
        let front = SimBlkfront::with_pages(h.sim, FRONTEND, Protocol::X86_64, 0, Some(5));
        h.publish_ring(id, &front, "3");
        assert_eq!(h.backend_state(id).as_deref(), Some("5"));
        assert!(
            h.backend_node(id, "error")
                .unwrap()
                .contains("ring-page-order")
        );
        assert_eq!(h.sim.mapped_grants(), 0);
    });
}

#[test]
fn a_frontend_naming_no_protocol_gets_the_native_abi() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "ram:64K", "w");
        h.pump();
        let mut front = SimBlkfront::new(h.sim, FRONTEND, Protocol::native(), 0);
        for (name, value) in front.ring_nodes() {
            if name != "protocol" {
                h.frontend_write(id, &name, &value);
            }
        }
        h.frontend_write(id, "state", "3");
        h.pump();
        assert_eq!(h.backend_state(id).as_deref(), Some("4"));
        let page = front.grant(false, &[]);
        let read = front.data_request(blkif::OP_READ, 0x1234_5678_9abc, 0, 1, &[seg(page, 0, 7)]);
        assert_eq!(
            h.io(&mut front, &[read]),
            [ok(0x1234_5678_9abc, blkif::OP_READ)]
        );
    });
}

#[test]
fn slices_of_one_disk_serve_several_guests_apart() {
    run(|h| {
        let (a, mut front_a) = h.serve(7, "shared0@0+1024", "w", Protocol::X86_64);
        let (b, mut front_b) = h.serve(8, "shared0@1024+1024", "w", Protocol::X86_32);
        let overlapping = h.add_vbd(9, DEVID, "shared0@1000+100", "w");
        let beyond = h.add_vbd(10, DEVID, "shared0@2000+100", "w");
        h.pump();
        assert!(
            h.backend_node(overlapping, "error")
                .unwrap()
                .contains("in use")
        );
        assert!(h.backend_node(beyond, "error").unwrap().contains("size"));
        assert_eq!(h.backend_node(b, "sectors").as_deref(), Some("1024"));

        let disk = h.disk(0);
        disk.borrow_mut().hold = true;
        let page_a = front_a.grant(true, &pattern(21));
        let page_b = front_b.grant(true, &pattern(22));
        let write_a = front_a.data_request(blkif::OP_WRITE, 5, 0, 1, &[seg(page_a, 0, 7)]);
        let write_b = front_b.data_request(blkif::OP_WRITE, 5, 0, 1, &[seg(page_b, 0, 7)]);
        assert_eq!(front_a.submit(&[write_a]), 1);
        assert_eq!(front_b.submit(&[write_b]), 1);
        h.pump();
        disk.borrow_mut().hold = false;
        h.pump();
        // Both used tag 0 of queue 0; each got its own completion.
        assert_eq!(front_a.responses(), [ok(5, blkif::OP_WRITE)]);
        assert_eq!(front_b.responses(), [ok(5, blkif::OP_WRITE)]);
        assert_eq!(disk.borrow().bytes(0, 4096), pattern(21));
        assert_eq!(disk.borrow().bytes(1024 * 512, 4096), pattern(22));

        let target = front_b.grant(false, &[]);
        let past_end = front_b.data_request(blkif::OP_READ, 6, 1024, 1, &[seg(target, 0, 7)]);
        assert_eq!(h.statuses(&mut front_b, &[past_end]), [RSP_ERROR]);

        // Detaching one frees its range for a new vbd.
        h.xs.channel_mut()
            .dom0_write(&format!("{}/online", backend_path(a)), b"0");
        h.frontend_write(a, "state", "6");
        h.pump();
        h.xs.channel_mut().dom0_rm(&frontend_path(a));
        h.pump_after(DETACH_GRACE_NS);
        assert!(h.vbds.status(a).is_none());
        let again = h.add_vbd(11, DEVID, "shared0@0+512", "w");
        h.pump();
        assert_eq!(h.backend_state(again).as_deref(), Some("2"));
    });
}

#[test]
fn two_namespaces_of_one_controller_keep_their_completions() {
    run(|h| {
        let (_, mut front_a) = h.serve(7, "nvme0n1", "w", Protocol::X86_64);
        let (_, mut front_b) = h.serve(8, "nvme0n2", "w", Protocol::X86_64);
        let page_a = front_a.grant(true, &pattern(31));
        let page_b = front_b.grant(true, &pattern(32));
        // Both rings use their slot 0 for these; both namespaces' requests
        // end on the controller's queues before either ring polls.
        let controller = h.controller.clone();
        controller.borrow_mut().hold = true;
        let write_a = front_a.data_request(blkif::OP_WRITE, 1, 0, 1, &[seg(page_a, 0, 7)]);
        let write_b = front_b.data_request(blkif::OP_WRITE, 2, 0, 1, &[seg(page_b, 0, 7)]);
        assert_eq!(front_a.submit(&[write_a]), 1);
        assert_eq!(front_b.submit(&[write_b]), 1);
        h.pump();
        controller.borrow_mut().hold = false;
        h.pump();
        assert_eq!(front_a.responses(), [ok(1, blkif::OP_WRITE)]);
        assert_eq!(front_b.responses(), [ok(2, blkif::OP_WRITE)]);
        for round in 0..4u64 {
            let target_a = front_a.grant(false, &[]);
            let target_b = front_b.grant(false, &[]);
            let read_a =
                front_a.data_request(blkif::OP_READ, 10 + round, 0, 1, &[seg(target_a, 0, 7)]);
            let read_b =
                front_b.data_request(blkif::OP_READ, 20 + round, 0, 1, &[seg(target_b, 0, 7)]);
            assert_eq!(front_a.submit(&[read_a]), 1);
            assert_eq!(front_b.submit(&[read_b]), 1);
            controller.borrow_mut().hold = true;
            h.pump();
            controller.borrow_mut().hold = false;
            h.pump();
            assert_eq!(front_a.responses(), [ok(10 + round, blkif::OP_READ)]);
            assert_eq!(front_b.responses(), [ok(20 + round, blkif::OP_READ)]);
            assert_eq!(front_a.page(target_a), pattern(31));
            assert_eq!(front_b.page(target_b), pattern(32));
        }
    });
}

impl<'a> Harness<'a> {
    /// The rings of `count` queues the frontend of `id` publishes, then
    /// Connected.
    fn connect_queues(&mut self, id: VbdId, count: usize) -> Vec<SimBlkfront<'a>> {
        let fronts: Vec<SimBlkfront<'a>> = (0..count)
            .map(|_| SimBlkfront::new(self.sim, id.frontend, Protocol::X86_64, 0))
            .collect();
        self.frontend_write(id, "multi-queue-num-queues", &format!("{count}"));
        for (queue, front) in fronts.iter().enumerate() {
            self.frontend_write(id, &format!("queue-{queue}"), "");
            for (name, value) in front.ring_nodes() {
                let node = match name.as_str() {
                    "protocol" => name,
                    _ => format!("queue-{queue}/{name}"),
                };
                self.frontend_write(id, &node, &value);
            }
        }
        self.frontend_write(id, "state", "3");
        self.pump();
        fronts
    }
}

impl Harness<'_> {
    /// Publishes statistics as the loop does once a second, a few times
    /// over: what did not fit in the xenstore ring goes out the next time.
    fn publish_statistics(&mut self) {
        for _ in 0..4 {
            self.vbds.publish_statistics(&mut self.xs);
            uncounted(|| while self.xs.channel_mut().step() {});
        }
    }

    fn watchdog(&mut self) {
        let now = self.platform.now_ns.get();
        let mut svc = XenBackendServices {
            events: &mut self.events,
            grants: &mut self.grants,
            platform: &mut self.platform,
        };
        self.vbds.watchdog(&mut svc, now);
    }

    /// Overwrites `statistics/<name>` of `id` behind the backend's back,
    /// then publishes: a node whose value did not change is not written
    /// again.
    fn assert_unchanged_not_republished(&mut self, id: VbdId, name: &str) {
        let node = format!("statistics/{name}");
        let path = format!("{}/{node}", backend_path(id));
        self.xs.channel_mut().dom0_write(&path, b"stale");
        self.publish_statistics();
        assert_eq!(
            self.backend_node(id, &node).as_deref(),
            Some("stale"),
            "{node}"
        );
    }

    fn statistic(&mut self, id: VbdId, name: &str) -> Option<u64> {
        self.backend_node(id, &format!("statistics/{name}"))
            .and_then(|v| v.parse().ok())
    }
}

#[test]
fn statistics_count_what_was_answered_and_show_the_ring() {
    run(|h| {
        let (id, mut front, page, into) = h.cached_frontend();
        let requests = [
            front.data_request(blkif::OP_WRITE, 1, 0, 1, &[seg(page, 0, 7)]),
            front.data_request(blkif::OP_WRITE, 2, 8, 1, &[seg(page, 2, 3)]),
            front.data_request(blkif::OP_READ, 3, 0, 1, &[seg(into, 0, 7)]),
            front.data_request(blkif::OP_FLUSH_DISKCACHE, 4, 0, 0, &[]),
            front.data_request(blkif::OP_WRITE_BARRIER, 5, 16, 1, &[seg(page, 0, 0)]),
            // Past the end of the 1 MiB disk: refused, an error.
            front.data_request(blkif::OP_READ, 6, 1 << 40, 1, &[seg(into, 0, 7)]),
        ];
        let answered = h.io(&mut front, &requests);
        assert_eq!(answered.len(), 6, "{answered:?}");
        h.platform.now_ns.set(7_000_000_000);
        let discard = front.discard_request(7, 0, 8, false);
        assert_eq!(h.io(&mut front, &[discard]).len(), 1);
        h.publish_statistics();
        for (name, want) in [
            ("rd_req", 1),
            ("wr_req", 3),
            ("f_req", 2),
            ("ds_req", 1),
            ("rd_sect", 8),
            ("wr_sect", 8 + 2 + 1),
            ("oo_req", 0),
            ("errors", 1),
            ("in_flight", 0),
            ("last_completion_ms", 7000),
            ("ring-0/req_prod", 7),
            ("ring-0/req_cons", 7),
            ("ring-0/rsp_prod", 7),
        ] {
            assert_eq!(h.statistic(id, name), Some(want), "statistics/{name}");
        }
        h.assert_unchanged_not_republished(id, "rd_req");
        let read = front.data_request(blkif::OP_READ, 8, 0, 1, &[seg(into, 0, 7)]);
        assert_eq!(h.io(&mut front, &[read]).len(), 1);
        h.publish_statistics();
        assert_eq!(h.statistic(id, "rd_req"), Some(2));
    });
}

/// A histogram's buckets with `counted` requests (bucket, requests), the
/// others empty.
fn buckets(counted: &[(usize, u64)]) -> [u64; LATENCY_BUCKETS] {
    let mut buckets = [0; LATENCY_BUCKETS];
    for &(bucket, requests) in counted {
        buckets[bucket] = requests;
    }
    buckets
}

/// Submits `request` while the device holds its completion, moves the
/// simulated clock `held_ns` on, then lets it complete.
fn answered_after(
    h: &mut Harness<'_>,
    front: &mut SimBlkfront<'_>,
    request: Vec<u8>,
    held_ns: u64,
) {
    let disk = h.disk(0);
    disk.borrow_mut().hold = true;
    assert!(h.io(front, &[request]).is_empty(), "held by the device");
    h.platform.now_ns.set(h.platform.now_ns.get() + held_ns);
    disk.borrow_mut().hold = false;
    h.pump();
    assert_eq!(front.responses().len(), 1);
}

#[test]
fn latencies_land_in_their_buckets_by_operation() {
    run(|h| {
        let (id, mut front, page, into) = h.cached_frontend();
        // Answered in the pass that took them (the clock stands still):
        // 0 ns, a refused one (past the end of the disk) as well.
        let reads = [
            front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(into, 0, 7)]),
            front.data_request(blkif::OP_READ, 2, 1 << 40, 1, &[seg(into, 0, 7)]),
        ];
        assert_eq!(h.io(&mut front, &reads).len(), 2);
        let write = front.data_request(blkif::OP_WRITE, 3, 0, 1, &[seg(page, 0, 7)]);
        answered_after(h, &mut front, write, 3_000_000);
        let barrier = front.data_request(blkif::OP_WRITE_BARRIER, 4, 8, 1, &[seg(page, 0, 7)]);
        answered_after(h, &mut front, barrier, 50_001);
        let flush = front.data_request(blkif::OP_FLUSH_DISKCACHE, 5, 0, 0, &[]);
        answered_after(h, &mut front, flush, 1_000_000_000);
        let discard = front.discard_request(6, 0, 8, false);
        answered_after(h, &mut front, discard, 1_000_000_001);

        let latencies = h.vbds.snapshots()[0].totals.latencies;
        assert_eq!(
            latencies.read,
            LatencyHistogram {
                buckets: buckets(&[(0, 2)]),
                sum_ns: 0,
            }
        );
        // 50.001 us: over the 50 us bound, in the 100 us bucket; 3 ms in
        // the 5 ms one.
        assert_eq!(
            latencies.write,
            LatencyHistogram {
                buckets: buckets(&[(1, 1), (6, 1)]),
                sum_ns: 3_050_001,
            }
        );
        // 1 s exactly: the 1 s bucket (bounds are inclusive); a ns more:
        // the last.
        assert_eq!(
            latencies.other,
            LatencyHistogram {
                buckets: buckets(&[(12, 1), (13, 1)]),
                sum_ns: 2_000_000_001,
            }
        );

        h.publish_statistics();
        for (name, want) in [
            (
                "latency/bounds_us",
                "50 100 250 500 1000 2500 5000 10000 25000 50000 100000 250000 1000000",
            ),
            ("latency/read", "2 0 0 0 0 0 0 0 0 0 0 0 0 0"),
            ("latency/write", "0 1 0 0 0 0 1 0 0 0 0 0 0 0"),
            ("latency/other", "0 0 0 0 0 0 0 0 0 0 0 0 1 1"),
        ] {
            let node = format!("statistics/{name}");
            assert_eq!(h.backend_node(id, &node).as_deref(), Some(want), "{node}");
        }
        h.assert_unchanged_not_republished(id, "latency/read");
        let read = front.data_request(blkif::OP_READ, 7, 0, 1, &[seg(into, 0, 7)]);
        answered_after(h, &mut front, read, 400_000);
        h.publish_statistics();
        assert_eq!(
            h.backend_node(id, "statistics/latency/read").as_deref(),
            Some("2 0 0 1 0 0 0 0 0 0 0 0 0 0")
        );
    });
}

#[test]
fn a_vbds_latencies_sum_its_rings() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "multiqueue", "w");
        h.pump();
        let mut fronts = h.connect_queues(id, 2);
        for (front, held_ns) in fronts.iter_mut().zip([0, 300_000]) {
            let into = front.grant(false, &[]);
            let read = front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(into, 0, 7)]);
            answered_after(h, front, read, held_ns);
        }
        let latencies = h.vbds.snapshots()[0].totals.latencies;
        assert_eq!(
            latencies.read,
            LatencyHistogram {
                buckets: buckets(&[(0, 1), (3, 1)]),
                sum_ns: 300_000,
            }
        );
        h.publish_statistics();
        assert_eq!(
            h.backend_node(id, "statistics/latency/read").as_deref(),
            Some("1 0 0 1 0 0 0 0 0 0 0 0 0 0")
        );
    });
}

#[test]
fn the_watchdog_reports_a_stuck_request_once_and_the_heartbeat_shows_it() {
    run(|h| {
        let id = h.add_vbd(FRONTEND, DEVID, "cached", "w");
        h.pump();
        let mut front = h.connect(id, Protocol::X86_64, 0, "3");
        let disk = h.disk(0);
        disk.borrow_mut().hold = true;
        let page = front.grant(true, &pattern(1));
        let write = front.data_request(blkif::OP_WRITE, 0x77, 0, 1, &[seg(page, 0, 7)]);
        assert!(h.io(&mut front, &[write]).is_empty());
        let mut beat = String::new();
        assert_eq!(h.vbds.heartbeat(&mut beat), 1);
        assert!(
            beat.contains(&format!("vbd {id} ring 0 req_prod=1 req_cons=1 rsp_prod=0")),
            "{beat}"
        );
        assert!(beat.contains("in_flight=1"), "{beat}");

        h.platform.now_ns.set(WATCHDOG_NS - 1);
        h.watchdog();
        assert!(!h.logged("watchdog"), "not before its time");
        h.platform.now_ns.set(WATCHDOG_NS);
        h.watchdog();
        h.platform.now_ns.set(3 * WATCHDOG_NS);
        h.watchdog();
        let reports: Vec<&String> = h
            .platform
            .lines
            .iter()
            .filter(|l| l.contains("watchdog"))
            .collect();
        assert_eq!(reports.len(), 1, "once per request: {reports:?}");
        assert!(
            reports[0].contains(&format!("vbd {id} ring 0: request 0x77"))
                && reports[0].contains("on the device"),
            "{}",
            reports[0]
        );

        disk.borrow_mut().hold = false;
        h.pump();
        assert_eq!(front.responses(), [ok(0x77, blkif::OP_WRITE)]);
        let mut beat = String::new();
        assert_eq!(h.vbds.heartbeat(&mut beat), 0);
        assert!(beat.is_empty());
    });
}

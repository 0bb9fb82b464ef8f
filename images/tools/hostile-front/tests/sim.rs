//! The named cases and the random campaign against stordom's blkback
//! engine on the simulated Xen and xenstored: the same attack code as
//! under Xen, with this frontend as domain 0 and a simulated stordom
//! serving RAM disks.

use std::rc::Rc;

use blkback::sim_blkfront::{GrantWindowHal, SimPlatform};
use blkback::{OpenError, OpenedTarget, Target, TargetOpener, VbdBackends, XenBackendServices};
use blockdev::Disk;
use core::sync::atomic::{AtomicU32, AtomicU64};
use drivers::RamDisk;
use host_fuzz::FuzzRun;
use hostile_front::campaign::run_campaign;
use hostile_front::cases::{CASES, CaseConfig, FIRST_DEVID, run_case};
use hostile_front::dom0::{Dom0, Grant};
use xen_pv::event::EventChannels;
use xen_pv::grant::{GfnWindow, GrantMapper};
use xen_pv::held::{HeldGrants, HeldPorts};
use xen_pv::hypercall::HypercallOp;
use xen_pv::sim::xenstore::SimXenstored;
use xen_pv::sim::{GUEST, SimXen};
use xen_pv::xenstore::{Access, Perm, Xenstore, XenstoreInterface};
use xen_pv::{Hypercall, PAGE_SIZE};

/// Where the simulated stordom maps grants.
const WINDOW_GFN: u64 = 0x10_0000;
/// How far the simulated clock moves per settle (the detach grace and
/// the xenstore waits count on it).
const SETTLE_NS: u64 = 20_000_000;

/// The simulated Xen as a hypercall interface.
#[derive(Clone, Copy)]
struct Xen<'a>(&'a SimXen);

// SAFETY: forwards to the simulated Xen unchanged.
unsafe impl Hypercall for Xen<'_> {
    unsafe fn hypercall(&self, op: HypercallOp, args: [u64; 5]) -> i64 {
        // SAFETY: the caller's guarantees are passed on unchanged.
        unsafe { self.0.hypercall(op, args) }
    }
}

/// stordom's targets here: RAM disks only.
struct RamDisks {
    hal: GrantWindowHal,
}

impl TargetOpener for RamDisks {
    fn open(
        &mut self,
        _vbd_path: &str,
        target: &Target<'_>,
        _read_only: bool,
    ) -> Result<OpenedTarget, OpenError> {
        let Target::Ram { bytes } = *target else {
            return Err(OpenError::NotFound);
        };
        let disk =
            RamDisk::allocate(self.hal.clone(), bytes / 512, 1).ok_or(OpenError::OutOfMemory)?;
        Ok(Disk::new(disk).claim_all()?.into())
    }
}

/// Domain 0 of the simulation, with stordom (the simulated guest) in the
/// loop: each settle is one pass of stordom's serve loop.
struct SimDom0<'a> {
    sim: &'a SimXen,
    xs: Xenstore<'a, SimXenstored<'a>>,
    events: EventChannels<'a, Xen<'a>>,
    grants: GrantMapper<'a, Xen<'a>>,
    platform: SimPlatform,
    vbds: VbdBackends<RamDisks>,
    /// Grants revoked while stordom mapped them: ended once it unmaps
    /// them, as Linux's gntalloc does.
    deferred: Vec<u32>,
}

fn with_sim_dom0(test: impl FnOnce(&mut SimDom0<'_>)) {
    let sim = Rc::new(SimXen::new());
    let iface = XenstoreInterface::new_boxed(0);
    let hal = GrantWindowHal::new(sim.clone());
    let held_grants: &HeldGrants = &HeldGrants::<[AtomicU64; 4096]>::new();
    let held_ports: &HeldPorts = &HeldPorts::<[AtomicU32; 64]>::new();
    let mut d = SimDom0 {
        sim: &sim,
        xs: Xenstore::new(&iface, SimXenstored::new(&iface, GUEST)),
        events: EventChannels::new(Xen(&sim), sim.shared_info(), held_ports),
        grants: GrantMapper::new(Xen(&sim), GfnWindow::new(WINDOW_GFN, 4096), held_grants),
        platform: SimPlatform::new(&hal),
        vbds: VbdBackends::new(RamDisks { hal }),
        deferred: Vec::new(),
    };
    d.vbds.start(&mut d.xs).unwrap();
    d.settle();
    test(&mut d);
}

impl Dom0 for SimDom0<'_> {
    fn domid(&self) -> u16 {
        0
    }

    fn backend_domid(&self) -> u16 {
        GUEST
    }

    fn grant(&mut self, readonly: bool) -> Result<Grant, String> {
        let gref = self.sim.offer_grant(0, readonly, &[0; PAGE_SIZE]);
        let page = self.sim.grant_page_ptr(0, gref).ok_or("no page")?;
        Ok(Grant { gref, page })
    }

    fn revoke(&mut self, grant: Grant) {
        if !self.sim.revoke_grant(0, grant.gref) {
            self.deferred.push(grant.gref);
        }
    }

    fn alloc_port(&mut self) -> Result<u32, String> {
        Ok(self.sim.remote_alloc_unbound(0))
    }

    fn close_port(&mut self, _port: u32) {}

    fn notify(&mut self, port: u32) {
        // An unbound port (stordom gave up on the ring) drops it, as Xen.
        let _ = self.sim.remote_send(0, port);
    }

    fn xs_write(&mut self, path: &str, value: &str) -> Result<(), String> {
        self.xs.channel_mut().dom0_write(path, value.as_bytes());
        Ok(())
    }

    fn xs_read(&mut self, path: &str) -> Option<String> {
        let value = self.xs.channel_mut().dom0_read(path)?;
        String::from_utf8(value).ok()
    }

    fn xs_rm(&mut self, path: &str) {
        self.xs.channel_mut().dom0_rm(path);
    }

    fn xs_set_perms(&mut self, path: &str, owner: u16, reader: u16) -> Result<(), String> {
        let perms = [
            Perm {
                domid: owner,
                access: Access::None,
            },
            Perm {
                domid: reader,
                access: Access::Read,
            },
        ];
        self.xs.channel_mut().dom0_set_perms(path, &perms);
        Ok(())
    }

    fn settle(&mut self) {
        self.platform
            .now_ns
            .set(self.platform.now_ns.get() + SETTLE_NS);
        self.xs.channel_mut().step();
        let mut svc = XenBackendServices {
            events: &mut self.events,
            grants: &mut self.grants,
            platform: &mut self.platform,
        };
        let intake = self.vbds.take_watch_events(&mut self.xs, |event| {
            panic!("an event of no blkback watch: {event:?}")
        });
        assert!(intake.is_ok());
        let polled = self.vbds.poll_rings(&mut svc);
        self.vbds.attend(&mut self.xs, &mut svc, &polled.attention);
        self.xs.channel_mut().step();
        let sim = self.sim;
        self.deferred.retain(|&gref| !sim.revoke_grant(0, gref));
    }

    fn now_ms(&self) -> u64 {
        self.platform.now_ns.get() / 1_000_000
    }

    fn backend_alive(&mut self) -> bool {
        true
    }

    fn grants_mapped(&mut self) -> Option<u64> {
        Some(self.sim.mapped_grants() as u64)
    }

    fn heap_in_use(&mut self) -> Option<u64> {
        None
    }
}

/// The cases at host-test scale.
const HOST: CaseConfig = CaseConfig {
    fresh_grants: 1200,
    storm_events: 5_000,
    rewritten_requests: 400,
    grant_slack: 0,
    heap_slack: None,
};

#[test]
fn every_named_case_passes_against_the_engine() {
    with_sim_dom0(|d| {
        for (n, case) in CASES.iter().enumerate() {
            let result = run_case(d, case, FIRST_DEVID + 4 * n as u32, &HOST);
            assert!(result.is_ok(), "{}: {result:?}", case.name);
        }
        assert_eq!(d.sim.mapped_grants(), 0);
    });
}

#[test]
fn the_random_campaign_passes_and_is_reproducible() {
    let tally = |seed| {
        let mut tally = None;
        with_sim_dom0(|d| tally = Some(run_campaign(d, FIRST_DEVID, seed, 3000, &HOST)));
        tally.unwrap()
    };
    let first = tally(20261129).unwrap();
    assert_eq!(first.sent, 3000);
    assert!(first.okay > 1000 && first.refused > 500, "{first:?}");
    assert!(first.ring_breaks > 0, "{first:?}");
    assert!(
        first.node_churns > 0 && first.state_flaps > 0 && first.header_scribbles > 0,
        "{first:?}"
    );
    assert_eq!(tally(20261129).unwrap(), first);
    assert_ne!(tally(7).unwrap(), first);
}

/// Campaigns of 500 requests from seeds of one run (`make fuzz` runs it
/// for FUZZ_SECS; each campaign's seed is in the failure message).
#[test]
fn fuzz_hostile_front_campaigns() {
    let mut run = FuzzRun::new("hostile-front campaigns", 0x0b1a_57ed, 3);
    let mut seeds = run.rng();
    while run.another() {
        let seed = seeds.next_u64();
        with_sim_dom0(|d| {
            let tally = run_campaign(d, FIRST_DEVID, seed, 500, &HOST);
            assert!(tally.is_ok(), "campaign seed {seed}: {tally:?}");
        });
    }
}

//! stordom on its vif (`vif = [ ... ]` in its xl config: `device/vif/0`):
//! the netfront (xen-pv/netfront) on pages and grants of stordom's own, a
//! smoltcp interface with one IPv4 address (ARP, ICMP echo, TCP), the
//! metrics endpoint (net/http-metrics) on TCP port 80, and the NBD links
//! of `nbd:` vbds (see [`crate::nbd`]).
//!
//! The address: `stordom.ip=ADDR/PREFIX` on the command line wins (the
//! operator's word for this domain); else the first address of the vif's
//! `ip` node in dom0's backend directory (what `vif = [ 'ip=...' ]` sets
//! for dom0's hotplug script), as a /24; else a DHCPv4 lease
//! ([`kernel::vif_address`]), its router the default route. Until a
//! lease comes, and after it is lost, the vif has no address: nothing is
//! served and the NBD links wait ([`crate::nbd::NbdLinks::network_up`]).
//!
//! What the network may cost the serve loop each turn is bounded
//! ([`FRAMES_IN_PER_TURN`] frames taken, [`EGRESS_PASSES_PER_TURN`]
//! egress passes, the endpoint's few connections, a socket buffer's
//! worth each way per NBD link), and it never keeps
//! the loop awake when idle: the loop sleeps until the vif's port fires or
//! smoltcp's next timer ([`NetTurn::wake_in_ns`]; the DHCP client's
//! retries and renewals are among them).
//!
//! In-place restarts: the pool of pages and the grant table are reserved
//! at boot, before serving begins ([`reserve_at_boot`]), so they stay
//! out of the allocator across restarts. The dead instance's netfront is
//! never torn down in place (a panic leaves no safe way to run it): the
//! next instance closes its event channel, ends its grants as netback
//! lets go of them (they are recorded in statics, see [`OFFERED`]), and
//! its netfront resets the stale connection (Closed, then a new one) as
//! after a backend restart. Nothing of DHCP is kept: the new instance
//! asks for a lease afresh.

use crate::arch::clock;
use crate::memory;
use crate::nbd::SharedNbdLinks;
use crate::own_grant_table::{self, OwnGrantTable};
use crate::xen::{Hypercalls, PortChannel, XenConnection};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use http_metrics::{Metrics, MetricsServer};
use kernel::cmdline::Ipv4Cidr;
use kernel::vif_address::{AddressSource, DhcpChange, DhcpClient, configure_interface};
use netfront::{Netfront, NetfrontConfig, NetfrontHal, OwnPage, Phase};
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress};
use spin::Once;
use xen_pv::event::{AllocUnbound, EventChannels, EvtchnClose, EvtchnSend, Port};
use xen_pv::grant::{GRANT_ENTRIES_PER_FRAME, GrantRef, GrantStillMapped, RESERVED_GRANT_ENTRIES};
use xen_pv::hypercall::command;
use xen_pv::xenstore::{Tx, WatchEvent, Xenstore};
use xen_pv::{DOMID_SELF, DomId, Errno, PAGE_SIZE};

/// The vif served (the first; others are ignored).
const VIF_DIR: &str = "device/vif/0";
/// Token of the watch on the netback's state.
const NET_WATCH_TOKEN: &str = "stordom-netfront";
/// RX buffers posted, TX buffers, and pages a backend that keeps grants
/// mapped may cost over the domain's life (then the netfront gives up).
const NETFRONT_CONFIG: NetfrontConfig = NetfrontConfig {
    rx_buffers: 64,
    tx_buffers: 32,
    max_leaked_pages: 16,
};
/// The pool: both rings, every buffer, and the leak allowance.
const POOL_PAGES: usize = 2
    + NETFRONT_CONFIG.rx_buffers as usize
    + NETFRONT_CONFIG.tx_buffers as usize
    + NETFRONT_CONFIG.max_leaked_pages;
/// Received frames handed to smoltcp per loop turn.
pub const FRAMES_IN_PER_TURN: usize = 32;
/// smoltcp egress passes per loop turn (each bounded).
pub const EGRESS_PASSES_PER_TURN: usize = 8;
/// The longest the loop sleeps while every TX buffer is in flight, should
/// netback's event not come (it is asked for).
const TX_EXHAUSTED_WAIT_NS: u64 = 1_000_000;

/// What [`reserve_at_boot`] set aside for the domain's life.
struct NetReservation {
    /// The pool's first frame (`POOL_PAGES` contiguous frames).
    pool_start: u64,
    table: &'static OwnGrantTable,
}

static RESERVATION: Once<NetReservation> = Once::new();
/// Entries of the grant table's first frame the netfront offered and has
/// not ended, by any instance: a bit per entry. What a dead instance left
/// is ended by the next one once netback lets go.
static OFFERED: [AtomicU64; GRANT_ENTRIES_PER_FRAME / 64] =
    [const { AtomicU64::new(0) }; GRANT_ENTRIES_PER_FRAME / 64];
/// The netfront's event channel (0: none), for the next instance to close.
static NETFRONT_PORT: AtomicU32 = AtomicU32::new(0);

/// At boot, before serving begins: when the domain has a vif, sets aside
/// its pages and maps the grant table, for the domain's life.
pub fn reserve_at_boot(xen: &mut XenConnection) {
    if xen
        .store
        .read(Tx::NONE, &alloc::format!("{VIF_DIR}/backend"))
        .is_err()
    {
        return;
    }
    let table = match own_grant_table::get_or_map(&mut xen.store) {
        Ok(table) => table,
        Err(why) => {
            log::warn!("net: {VIF_DIR} not served: {why}");
            return;
        }
    };
    let Some(pool_start) = memory::alloc_frames(POOL_PAGES as u64) else {
        log::warn!("net: {VIF_DIR} not served: no memory for {POOL_PAGES} pages");
        return;
    };
    RESERVATION.call_once(|| NetReservation { pool_start, table });
    log::info!(
        "net: {VIF_DIR}: {POOL_PAGES} pages ({} KiB) reserved",
        POOL_PAGES * PAGE_SIZE / 1024
    );
}

/// [`NetfrontHal`] over the reservation: pages of the pool, grants in
/// the grant table's first frame (lowest free entries; the grant-DMA
/// check takes the highest), an unbound port by hypercall.
struct KernelNetfrontHal {
    reservation: &'static NetReservation,
    hypercalls: Hypercalls,
    pages_handed_out: usize,
    /// Grants a former instance left (a bit per entry), ended as soon as
    /// netback lets go of them.
    stale: [u64; GRANT_ENTRIES_PER_FRAME / 64],
}

impl KernelNetfrontHal {
    /// The HAL of this instance: closes a former instance's port and
    /// takes note of its grants.
    fn new(reservation: &'static NetReservation, hypercalls: Hypercalls) -> Self {
        let stale_port = NETFRONT_PORT.swap(0, Ordering::AcqRel);
        if stale_port != 0 {
            let _ = command(&hypercalls, &mut EvtchnClose { port: stale_port });
        }
        let mut hal = KernelNetfrontHal {
            reservation,
            hypercalls,
            pages_handed_out: 0,
            stale: core::array::from_fn(|word| OFFERED[word].load(Ordering::Acquire)),
        };
        hal.end_stale_grants();
        hal
    }

    fn end_stale_grants(&mut self) {
        for (word, bits) in self.stale.iter_mut().enumerate() {
            let mut left = *bits;
            while left != 0 {
                let bit = left.trailing_zeros() as usize;
                left &= left - 1;
                let gref = word * 64 + bit;
                if self.reservation.table.entries[gref].end().is_ok() {
                    *bits &= !(1 << bit);
                    OFFERED[word].fetch_and(!(1 << bit), Ordering::AcqRel);
                }
            }
        }
    }
}

// SAFETY: pages come from the reservation, contiguous identity-mapped
// frames taken at boot and never given back (kept across restarts), each
// handed out once per HAL and zeroed first; a HAL is made once per
// serving instance, and the previous instance's netfront never runs
// again.
unsafe impl NetfrontHal for KernelNetfrontHal {
    fn alloc_page(&mut self) -> Option<OwnPage> {
        if self.pages_handed_out >= POOL_PAGES {
            return None;
        }
        let phys = self.reservation.pool_start + (self.pages_handed_out * PAGE_SIZE) as u64;
        self.pages_handed_out += 1;
        let ptr = NonNull::new(phys as *mut u8)?;
        // SAFETY: a frame of the reservation, identity-mapped writable,
        // handed out to this netfront alone.
        unsafe { ptr.as_ptr().write_bytes(0, PAGE_SIZE) };
        Some(OwnPage {
            ptr,
            gfn: phys / PAGE_SIZE as u64,
        })
    }

    fn grant_access(&mut self, grantee: DomId, gfn: u64, readonly: bool) -> Option<GrantRef> {
        self.end_stale_grants();
        let gfn = u32::try_from(gfn).ok()?;
        let entries = self.reservation.table.entries;
        let gref = (RESERVED_GRANT_ENTRIES..entries.len())
            .find(|&gref| entries[gref].is_free() && entries[gref].offer(grantee, gfn, readonly))?;
        OFFERED[gref / 64].fetch_or(1 << (gref % 64), Ordering::AcqRel);
        GrantRef::try_from(gref).ok()
    }

    fn end_access(&mut self, gref: GrantRef) -> Result<(), GrantStillMapped> {
        let index = gref as usize;
        let entry = self
            .reservation
            .table
            .entries
            .get(index)
            .ok_or(GrantStillMapped)?;
        entry.end()?;
        OFFERED[index / 64].fetch_and(!(1 << (index % 64)), Ordering::AcqRel);
        Ok(())
    }

    fn alloc_unbound_port(&mut self, remote: DomId) -> Result<u32, Errno> {
        let mut arg = AllocUnbound {
            dom: DOMID_SELF,
            remote_dom: remote,
            port: 0,
        };
        command(&self.hypercalls, &mut arg)?;
        NETFRONT_PORT.store(arg.port, Ordering::Release);
        Ok(arg.port)
    }

    fn close_port(&mut self, port: u32) {
        let _ = command(&self.hypercalls, &mut EvtchnClose { port });
        let _ = NETFRONT_PORT.compare_exchange(port, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    fn notify(&mut self, port: u32) {
        let _ = command(&self.hypercalls, &mut EvtchnSend { port });
    }
}

/// What one [`NetStack::turn`] asks of the loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetTurn {
    /// Work is left (a frame budget used up, frames waiting): turn again
    /// without sleeping.
    pub busy: bool,
    /// smoltcp's next timer, from now: the longest the loop may sleep.
    pub wake_in_ns: Option<u64>,
}

/// The vif, its interface and the metrics endpoint.
pub struct NetStack {
    netfront: Netfront<KernelNetfrontHal>,
    iface: Interface,
    sockets: SocketSet<'static>,
    server: MetricsServer,
    /// A watch event on the backend's state came since the last turn.
    attend_due: bool,
    /// The port whose events wake the loop (a handler in its channels).
    watched_port: Option<u32>,
    /// The phase last logged.
    logged_phase: Phase,
    /// The `nbd:` vbds' links, their sockets in `sockets`.
    nbd: SharedNbdLinks,
    /// The DHCP client, when no address was given.
    dhcp: Option<DhcpClient>,
}

fn smoltcp_now(now_ns: u64) -> Instant {
    Instant::from_micros((now_ns / 1000) as i64)
}

impl NetStack {
    /// Brings the vif up, when [`reserve_at_boot`] reserved for it: starts
    /// the netfront's handshake and makes the interface; `nbd`'s links
    /// may connect through it from then on.
    pub fn bring_up(
        xs: &mut Xenstore<'static, PortChannel>,
        command_line_ip: Option<Ipv4Cidr>,
        nbd: SharedNbdLinks,
    ) -> Option<NetStack> {
        let reservation = RESERVATION.get()?;
        let xen = crate::xen::get()?;
        let hal = KernelNetfrontHal::new(reservation, &xen.hypercalls);
        let mut netfront = match Netfront::new(hal, NETFRONT_CONFIG, VIF_DIR) {
            Ok(netfront) => netfront,
            Err(e) => {
                log::warn!("net: {VIF_DIR}: {e:?}");
                return None;
            }
        };
        if let Err(e) = netfront.start(xs, NET_WATCH_TOKEN) {
            log::warn!("net: {VIF_DIR}: starting: {e:?}");
            return None;
        }
        let vif_node = xs
            .read_string(Tx::NONE, &alloc::format!("{}/ip", netfront.backend_dir()))
            .ok();
        let source = AddressSource::choose(command_line_ip, vif_node.as_deref());
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(netfront.mac())));
        config.random_seed = crate::arch::cpu::rdtsc();
        let now = smoltcp_now(clock::now_ns());
        let mut iface = Interface::new(config, &mut netfront, now);
        let mut sockets = SocketSet::new(Vec::new());
        let server = MetricsServer::new(&mut sockets);
        let dhcp = match source.fixed() {
            Some((cidr, from)) => {
                configure_interface(&mut iface, Some(cidr), None);
                log_address(netfront.mac(), cidr, from);
                None
            }
            None => {
                log::info!("net: {VIF_DIR}: no address given; asking DHCP");
                Some(DhcpClient::start(&mut sockets))
            }
        };
        nbd.borrow_mut().network_up(dhcp.is_none());
        Some(NetStack {
            logged_phase: netfront.phase(),
            netfront,
            iface,
            sockets,
            server,
            attend_due: false,
            watched_port: None,
            nbd,
            dhcp,
        })
    }

    /// Takes a watch event if it is the netfront's.
    pub fn note_watch_event(&mut self, event: &WatchEvent) -> bool {
        let ours = event.token == NET_WATCH_TOKEN;
        self.attend_due |= ours;
        ours
    }

    /// One bounded turn: the handshake when the backend moved, then
    /// frames in, the endpoint, frames out. `metrics` is gathered only
    /// when a request asks for it.
    pub fn turn(
        &mut self,
        xs: &mut Xenstore<'static, PortChannel>,
        events: &mut EventChannels<'static, Hypercalls>,
        now_ns: u64,
        metrics: impl FnOnce() -> Metrics,
    ) -> NetTurn {
        if core::mem::take(&mut self.attend_due) || self.netfront.needs_attend() {
            if let Err(e) = self.netfront.attend(xs) {
                log::warn!("net: {VIF_DIR}: {e:?}");
            }
            self.log_phase();
        }
        self.watch_port(events);
        let now = smoltcp_now(now_ns);
        if !self.netfront.is_running() {
            // No frames move, but the links' timers and deadlines run.
            let nbd = self
                .nbd
                .borrow_mut()
                .pump(&mut self.sockets, &mut self.iface);
            return NetTurn {
                busy: false,
                wake_in_ns: nbd.wake_in_ns,
            };
        }
        let mut turn = NetTurn::default();
        self.iface.poll_maintenance(now);
        let mut frames_in = 0;
        while frames_in < FRAMES_IN_PER_TURN
            && self
                .iface
                .poll_ingress_single(now, &mut self.netfront, &mut self.sockets)
                != PollIngressSingleResult::None
        {
            frames_in += 1;
        }
        let statistics = self.netfront.statistics();
        let mut metrics = Some(metrics);
        let served = self.server.poll(&mut self.sockets, now, || {
            let mut gathered = metrics.take().map_or_else(Metrics::default, |m| m());
            gathered.net = statistics;
            gathered
        });
        let nbd = self
            .nbd
            .borrow_mut()
            .pump(&mut self.sockets, &mut self.iface);
        for _ in 0..EGRESS_PASSES_PER_TURN {
            if self
                .iface
                .poll_egress(now, &mut self.netfront, &mut self.sockets)
                == PollResult::None
            {
                break;
            }
        }
        // After the egress passes: a lease's expiry is found there. The
        // links see the change next turn.
        let dhcp_changed = self.take_dhcp_change();
        // With every TX buffer in flight nothing goes out, and smoltcp
        // takes no frame in without a TX buffer to answer with: spinning
        // then only takes the CPU netback needs to hand the buffers back
        // (the NBD bench spent 40,000 loop turns a second so). Wait for
        // netback's event, which the netfront asked for when it found no
        // buffer free, or the short fallback.
        let tx_exhausted = self.netfront.free_tx_buffers() == 0;
        let frames_waiting = frames_in == FRAMES_IN_PER_TURN || self.netfront.has_pending_rx();
        turn.busy =
            served.answered > 0 || nbd.busy || dhcp_changed || (frames_waiting && !tx_exhausted);
        let smoltcp_wake = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|delay| delay.total_micros() * 1000);
        turn.wake_in_ns = match (smoltcp_wake, nbd.wake_in_ns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if tx_exhausted {
            turn.wake_in_ns = Some(
                turn.wake_in_ns
                    .map_or(TX_EXHAUSTED_WAIT_NS, |ns| ns.max(TX_EXHAUSTED_WAIT_NS)),
            );
        } else if turn.wake_in_ns == Some(0) {
            turn.busy = true;
        }
        // The netfront may have reset the connection on a broken ring.
        self.watch_port(events);
        turn
    }

    /// Puts the DHCP client's news on the interface, tells the links and
    /// the console; whether there was any.
    fn take_dhcp_change(&mut self) -> bool {
        let Some(dhcp) = self.dhcp.as_mut() else {
            return false;
        };
        let Some(change) = dhcp.update(&mut self.iface, &mut self.sockets) else {
            return false;
        };
        match change {
            DhcpChange::Leased(lease) => {
                log::info!("net: {VIF_DIR}: DHCP: leased {lease}");
                log_address(self.netfront.mac(), lease.address, "DHCP");
            }
            DhcpChange::Lost => log::warn!("net: {VIF_DIR}: DHCP: lease lost; address removed"),
        }
        self.nbd
            .borrow_mut()
            .network_up(matches!(change, DhcpChange::Leased(_)));
        true
    }

    /// Keeps the loop's channels waiting on the netfront's port (no-op
    /// handler: an event only has to end the loop's sleep).
    fn watch_port(&mut self, events: &mut EventChannels<'static, Hypercalls>) {
        let port = self.netfront.port();
        if port == self.watched_port {
            return;
        }
        if let Some(old) = self.watched_port {
            events.forget_handler(Port(old));
        }
        if let Some(new) = port {
            events.set_handler(Port(new), Box::new(|_| {}));
        }
        self.watched_port = port;
    }

    fn log_phase(&mut self) {
        let phase = self.netfront.phase();
        if phase == self.logged_phase {
            return;
        }
        self.logged_phase = phase;
        match phase {
            Phase::Running => log::info!(
                "net: {VIF_DIR}: connected to {} (port {:?})",
                self.netfront.backend_dir(),
                self.netfront.port()
            ),
            Phase::Failed => log::warn!("net: {VIF_DIR}: gave up: {:?}", self.netfront.error()),
            other => log::info!("net: {VIF_DIR}: {other:?}"),
        }
    }
}

/// The vif's address line (a Xen scenario looks for it).
fn log_address(mac: [u8; 6], cidr: Ipv4Cidr, from: &str) {
    log::info!(
        "net: {VIF_DIR}: mac {}, address {cidr} (from {from}), metrics on port {}",
        EthernetAddress(mac),
        http_metrics::HTTP_PORT
    );
}

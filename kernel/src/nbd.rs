//! `target=nbd:HOST:PORT/EXPORT`: a vbd served from an NBD server over
//! stordom's vif. Each such vbd has a link of its own (net/nbd-disk over
//! nbd-client) whose TCP socket lives in the [`crate::net::NetStack`]'s
//! socket set; the opener makes links and hands out their devices, the
//! network's turn pumps them. Both reach the links through one
//! [`SharedNbdLinks`], made by the serve loop before either.
//!
//! Bounds: [`NBD_LINKS_MAX`] links, each with [`SOCKET_BUFFER_BYTES`] of
//! receive and of transmit buffer (allocated when the link is made, for a
//! 1 MiB request to stream), [`QUEUE_DEPTH`] requests in flight of at most
//! 1 MiB. Opening answers [`OpenError::InProgress`] until the first
//! handshake finished (the vbd asks again), and fails with the reason
//! when the server refuses the export or none answers within
//! [`nbd_disk::OPEN_TIMEOUT_NS`]. While the vif awaits its DHCP lease a
//! new link makes no attempt (none could start without an address) but
//! its open timeout runs.
//!
//! Nothing of it is static: after an in-place restart the new instance
//! makes new links (the dead one's heap, sockets included, is gone) and
//! blkback replays the rings' unanswered requests on them.

use crate::arch::clock;
use crate::platform::KernelHal;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use blkback::{CompletionSignal, DataPath, MAX_INDIRECT_SEGMENTS, OpenError, OpenedTarget, VbdId};
use blockdev::{Disk, PhysAddr};
use core::cell::RefCell;
use core::net::{Ipv4Addr, SocketAddrV4};
use core::ptr::NonNull;
use drivers::Hal;
use nbd_disk::{
    LinkEvent, NbdDevice, NbdHost, NbdLink, NbdLinkConfig, NbdTransport, OpeningStatus,
    TransportState,
};
use smoltcp::iface::{Context, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::IpAddress;

/// Links at once (one per `nbd:` vbd).
pub const NBD_LINKS_MAX: usize = 8;
/// Each link's TCP receive buffer, and its transmit buffer.
pub const SOCKET_BUFFER_BYTES: usize = 256 * 1024;
/// Requests in flight per link (the device's queue depth).
pub const QUEUE_DEPTH: u16 = 32;
/// The largest read or write: blkif's largest indirect request.
const MAX_TRANSFER_BYTES: u32 = 1 << 20;
/// A link still opening that its vbd stopped asking for this long (the
/// vbd went away or failed) is dropped; vbds ask every 100 ms.
const ABANDONED_NS: u64 = 2_000_000_000;
/// Local ports of the links' connections: the IANA dynamic range.
const LOCAL_PORTS: core::ops::RangeInclusive<u16> = 49152..=65535;

/// Request memory and time for the links: the identity map of RAM (grant
/// mappings included, as the RAM disks reach them) and the TSC clock.
#[derive(Clone, Copy, Default)]
pub struct KernelNbdHost;

// SAFETY: `phys_to_virt` answers only for ranges the kernel maps directly,
// writable; a request's segments are blkback's grant mappings (or bounce
// pages), which stay mapped until the request's completion was collected.
unsafe impl NbdHost for KernelNbdHost {
    fn segment(&self, phys: PhysAddr, len: u32) -> Option<NonNull<u8>> {
        KernelHal.phys_to_virt(phys, len as usize)
    }

    fn now_ns(&self) -> u64 {
        clock::now_ns()
    }
}

/// What the network can do for links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Network {
    /// No vif (or it could not be brought up).
    Absent,
    /// A vif still without an IPv4 address (DHCP pending, or the lease
    /// lost).
    AwaitingAddress,
    Up,
}

struct LinkEntry {
    vbd_path: String,
    server: SocketAddrV4,
    export: String,
    link: Rc<RefCell<NbdLink<KernelNbdHost>>>,
    /// The socket, until the network's turn puts it in its set.
    unplaced: Option<tcp::Socket<'static>>,
    placed: Option<SocketHandle>,
    /// Its device was handed to the vbd.
    handed_out: bool,
    last_asked_ns: u64,
}

impl LinkEntry {
    /// No vbd wants it any more.
    fn abandoned(&self, now: u64) -> bool {
        match self.handed_out {
            // The device (held by the vbd's disk) holds the other reference.
            true => Rc::strong_count(&self.link) == 1,
            false => now >= self.last_asked_ns + ABANDONED_NS,
        }
    }

    /// `5/51712` of `backend/vbd/5/51712`, for the log.
    fn vbd(&self) -> &str {
        self.vbd_path
            .strip_prefix("backend/vbd/")
            .unwrap_or(&self.vbd_path)
    }
}

/// The links, shared by the opener and the network.
pub struct NbdLinks {
    network: Network,
    entries: Vec<LinkEntry>,
    /// Sockets of dropped links, for the network's turn to remove.
    retired: Vec<SocketHandle>,
    next_port: u16,
}

/// The handle the opener and the network share.
pub type SharedNbdLinks = Rc<RefCell<NbdLinks>>;

/// What one [`NbdLinks::pump`] asks of the loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NbdTurn {
    /// Bytes or a connection moved: turn again without sleeping.
    pub busy: bool,
    /// The longest the loop may sleep (a backoff or timeout due).
    pub wake_in_ns: Option<u64>,
}

impl NbdLinks {
    /// No links, and no network until [`Self::network_up`].
    pub fn shared() -> SharedNbdLinks {
        Rc::new(RefCell::new(NbdLinks {
            network: Network::Absent,
            entries: Vec::with_capacity(NBD_LINKS_MAX),
            retired: Vec::with_capacity(NBD_LINKS_MAX),
            next_port: *LOCAL_PORTS.start(),
        }))
    }

    /// The vif is up, with an address or awaiting one (the network's
    /// bring-up, then each DHCP lease and its loss, say which).
    pub fn network_up(&mut self, has_address: bool) {
        self.network = match has_address {
            true => Network::Up,
            false => Network::AwaitingAddress,
        };
    }

    /// Opens export `export` of the server at `address`:`port` for the vbd
    /// at `vbd_path`: makes its link on the first call and answers
    /// [`OpenError::InProgress`] until the link's first handshake, then
    /// hands out the device. While the vif awaits its address the link
    /// waits too, until its open timeout.
    pub fn open(
        &mut self,
        vbd_path: &str,
        address: Ipv4Addr,
        port: u16,
        export: &str,
        read_only: bool,
    ) -> Result<OpenedTarget, OpenError> {
        match self.network {
            Network::Absent => {
                return Err(OpenError::Network(
                    "nbd needs stordom to have a vif (vif = [ ... ] in its config)".into(),
                ));
            }
            Network::AwaitingAddress | Network::Up => {}
        }
        let server = SocketAddrV4::new(address, port);
        let now = clock::now_ns();
        let found = self.entries.iter().position(|e| e.vbd_path == vbd_path);
        let Some(index) = found else {
            self.add(vbd_path, server, export, now)?;
            return Err(OpenError::InProgress);
        };
        let entry = &mut self.entries[index];
        if entry.server != server || entry.export != export || entry.handed_out {
            // The toolstack changed the target, or a vbd reopens: afresh.
            self.remove(index);
            self.add(vbd_path, server, export, now)?;
            return Err(OpenError::InProgress);
        }
        entry.last_asked_ns = now;
        let status = entry.link.borrow().opening_status();
        let failure = match status {
            OpeningStatus::Connecting => return Err(OpenError::InProgress),
            OpeningStatus::Ready => match NbdDevice::new(entry.link.clone()) {
                Some(_)
                    if !read_only
                        && entry.link.borrow().export().is_some_and(|e| e.read_only()) =>
                {
                    format!(
                        "nbd: export {export:?} of {server} is read-only: attach it with mode r"
                    )
                }
                Some(device) => {
                    entry.handed_out = true;
                    // Replies come as frames on the vif, whose event
                    // wakes the loop: no polling while they are awaited.
                    return Ok(OpenedTarget {
                        view: Disk::new(device).claim_all()?,
                        data_path: DataPath::ZeroCopy,
                        completions: CompletionSignal::Event,
                    });
                }
                None => format!("nbd: {server}: no export after the handshake"),
            },
            OpeningStatus::Failed(_) if self.network == Network::AwaitingAddress => format!(
                "nbd: cannot serve export {export:?} of {server}: stordom's vif got no address \
                 (no DHCP lease) in time"
            ),
            OpeningStatus::Failed(reason) => {
                format!("nbd: cannot serve export {export:?} of {server}: {reason}")
            }
        };
        self.remove(index);
        Err(OpenError::Network(failure))
    }

    fn add(
        &mut self,
        vbd_path: &str,
        server: SocketAddrV4,
        export: &str,
        now: u64,
    ) -> Result<(), OpenError> {
        if self.entries.len() >= NBD_LINKS_MAX {
            return Err(OpenError::Network(format!(
                "nbd: all {NBD_LINKS_MAX} links are in use"
            )));
        }
        let config = NbdLinkConfig {
            server,
            export_name: export.into(),
            queue_depth: QUEUE_DEPTH,
            max_segments: MAX_INDIRECT_SEGMENTS,
            max_transfer_bytes: MAX_TRANSFER_BYTES,
        };
        let link = NbdLink::new(config, KernelNbdHost).ok_or(OpenError::OutOfMemory)?;
        let socket = new_socket().ok_or(OpenError::OutOfMemory)?;
        let entry = LinkEntry {
            vbd_path: vbd_path.into(),
            server,
            export: export.into(),
            link: Rc::new(RefCell::new(link)),
            unplaced: Some(socket),
            placed: None,
            handed_out: false,
            last_asked_ns: now,
        };
        log::info!(
            "nbd: {}: connecting to {server} export {export:?}",
            entry.vbd()
        );
        self.entries.push(entry);
        Ok(())
    }

    fn remove(&mut self, index: usize) {
        let entry = self.entries.swap_remove(index);
        self.retired.extend(entry.placed);
    }

    /// Every link's reconnects so far, by vbd, for the metrics.
    pub fn reconnects(&self) -> Vec<(VbdId, u64)> {
        self.entries
            .iter()
            .filter_map(|e| Some((vbd_id(&e.vbd_path)?, e.link.borrow().reconnects())))
            .collect()
    }

    /// Drops the links no vbd wants, then pumps each link once over its
    /// socket (bounded: a socket buffer's worth each way), logging what
    /// happened to its connection.
    pub fn pump(&mut self, sockets: &mut SocketSet<'static>, iface: &mut Interface) -> NbdTurn {
        let now = clock::now_ns();
        let mut index = 0;
        while index < self.entries.len() {
            if self.entries[index].abandoned(now) {
                log::info!("nbd: {}: link closed", self.entries[index].vbd());
                self.remove(index);
            } else {
                index += 1;
            }
        }
        for handle in self.retired.drain(..) {
            sockets.remove(handle);
        }
        let mut turn = NbdTurn::default();
        let has_address = self.network == Network::Up;
        for entry in &mut self.entries {
            let handle = match (entry.placed, entry.unplaced.take()) {
                (Some(handle), _) => handle,
                (None, Some(socket)) => *entry.placed.insert(sockets.add(socket)),
                (None, None) => continue,
            };
            // A first connection waits for the address rather than fail
            // attempts into backoff; the opener's checks time it out.
            // Links that served go on (their requests' deadlines run).
            if !has_address && entry.link.borrow().opening_status() == OpeningStatus::Connecting {
                continue;
            }
            let mut transport = SmoltcpTransport {
                socket: sockets.get_mut::<tcp::Socket>(handle),
                cx: iface.context(),
                server: entry.server,
                next_port: &mut self.next_port,
            };
            let mut link = entry.link.borrow_mut();
            let pump = link.pump(&mut transport);
            turn.busy |= pump.moved;
            if let Some(wake_at) = pump.wake_at_ns {
                let wake_in = wake_at.saturating_sub(now);
                turn.wake_in_ns = Some(turn.wake_in_ns.map_or(wake_in, |w| w.min(wake_in)));
            }
            let Some(event) = pump.event else {
                continue;
            };
            let vbd = entry.vbd();
            match event {
                LinkEvent::Connected(_) | LinkEvent::Reconnected { .. } => {
                    log::info!("nbd: {vbd}: {}", link.describe(&event));
                }
                _ => log::warn!("nbd: {vbd}: {}", link.describe(&event)),
            }
        }
        turn
    }
}

/// The vbd of backend path `backend/vbd/<frontend>/<devid>`.
fn vbd_id(vbd_path: &str) -> Option<VbdId> {
    let (frontend, devid) = vbd_path.strip_prefix("backend/vbd/")?.split_once('/')?;
    Some(VbdId {
        frontend: frontend.parse().ok()?,
        devid: devid.parse().ok()?,
    })
}

/// A link's TCP socket, with a smoltcp interface's context to connect.
struct SmoltcpTransport<'a> {
    socket: &'a mut tcp::Socket<'static>,
    cx: &'a mut Context,
    server: SocketAddrV4,
    next_port: &'a mut u16,
}

impl NbdTransport for SmoltcpTransport<'_> {
    fn state(&self) -> TransportState {
        match self.socket.state() {
            State::SynSent | State::SynReceived => TransportState::Connecting,
            State::Established => TransportState::Established,
            _ => TransportState::Closed,
        }
    }

    fn connect(&mut self) -> bool {
        // A new local port each time: the server may still hold the last.
        let port = *self.next_port;
        *self.next_port = if port == *LOCAL_PORTS.end() {
            *LOCAL_PORTS.start()
        } else {
            port + 1
        };
        let remote = (IpAddress::Ipv4(*self.server.ip()), self.server.port());
        self.socket.connect(self.cx, remote, port).is_ok()
    }

    fn abort(&mut self) {
        self.socket.abort();
    }

    fn send(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> usize {
        self.socket
            .send(|space| {
                let n = fill(space);
                (n, n)
            })
            .unwrap_or(0)
    }

    fn receive(&mut self, take: impl FnOnce(&[u8])) -> usize {
        self.socket
            .recv(|bytes| {
                take(bytes);
                (bytes.len(), bytes.len())
            })
            .unwrap_or(0)
    }
}

/// A TCP socket with its buffers, or `None` without the memory. Nagle is
/// off: a request header must not wait for the previous one's ACK.
fn new_socket() -> Option<tcp::Socket<'static>> {
    let buffer = || {
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(SOCKET_BUFFER_BYTES).ok()?;
        bytes.resize(SOCKET_BUFFER_BYTES, 0);
        Some(tcp::SocketBuffer::new(bytes))
    };
    let mut socket = tcp::Socket::new(buffer()?, buffer()?);
    socket.set_nagle_enabled(false);
    Some(socket)
}

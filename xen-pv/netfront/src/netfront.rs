//! The netfront: its xenbus handshake with the backend and the
//! connection's lifetime. The data path is in [`crate::datapath`].
//!
//! The handshake, as Linux netback expects it (xen-netback/xenbus.c):
//! the backend probes to InitWait; the frontend then grants its rings,
//! allocates an event channel, writes `tx-ring-ref`, `rx-ring-ref`,
//! `event-channel`, `request-rx-copy=1`, `feature-rx-notify=1` and its
//! (absent) offloads, and switches to Connected in the same transaction.
//! netback connects only when it sees the frontend Connected (it ignores
//! Initialised), maps the rings and goes Connected itself (after its
//! hotplug script): only then does the data path run. Closing: the
//! frontend answers a backend's Closing with Closed (netback disconnects
//! and goes Closed), ends its grants once the backend is Closed, and
//! writes Initialising, which sends netback back to InitWait: a new
//! connection, as after a backend restart.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use xen_pv::DomId;
use xen_pv::PAGE_SIZE;
use xen_pv::ring::FrontRing;
use xen_pv::xenbus::XenbusState;
use xen_pv::xenstore::XsError;

use crate::datapath::{RxAssembly, TxBuffers};
use crate::hal::{NetfrontHal, XenbusStore};
use crate::nodes::{feature_enabled, parse_backend_path, parse_domid, parse_mac};
use crate::pages::{PagePool, RX_RING_PAGE, ShareError, TX_RING_PAGE};
use crate::wire::{RX_ENTRY_LEN, RX_RING_SIZE, TX_ENTRY_LEN, TX_RING_SIZE};

/// The IP MTU. stordom does not negotiate `feature-sg`, so netback keeps
/// the vif at 1500 and sends every frame in one slot.
pub const MTU: usize = 1500;
/// The largest Ethernet frame sent or received (header, no FCS).
pub const MAX_FRAME_LEN: usize = MTU + ETHERNET_HEADER_LEN;
/// An Ethernet header: netback refuses shorter TX packets.
pub const ETHERNET_HEADER_LEN: usize = 14;

/// How large a netfront is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetfrontConfig {
    /// RX buffers (one page each) kept posted, 1 to 256.
    pub rx_buffers: u16,
    /// TX buffers (one page each), 1 to 256: frames in flight at most.
    pub tx_buffers: u16,
    /// Pages a backend that keeps our grants mapped may cost us over
    /// the netfront's life before it refuses to connect again.
    pub max_leaked_pages: usize,
}

impl Default for NetfrontConfig {
    fn default() -> Self {
        NetfrontConfig {
            rx_buffers: 128,
            tx_buffers: 64,
            max_leaked_pages: 2 + 128 + 64,
        }
    }
}

/// Why a netfront could not be made or connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetfrontError {
    /// The configuration asks for no buffers or more than a ring holds.
    BadConfig,
    /// No memory for the pages.
    OutOfMemory,
    /// A xenstore operation failed.
    Store(XsError),
    /// A node is missing or malformed (its name).
    BadNode(&'static str),
    /// The backend does not offer `feature-rx-copy` (flipping is not
    /// supported).
    NoRxCopy,
    /// Sharing the pages failed.
    Share(ShareError),
    /// No event channel could be allocated.
    NoPort,
    /// The backend closed this many connections in a row before
    /// connecting them (netback refusing our nodes, say): we stop
    /// offering new ones rather than loop with it.
    BackendNeverConnects(u32),
}

/// Connections the backend may close before connecting, in a row.
pub const MAX_UNCONNECTED_ATTEMPTS: u32 = 4;

/// Why a connection's data path was abandoned: something the backend
/// wrote into the rings broke the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokenRing {
    /// The TX response index ran past the requests made.
    TxOverflow,
    /// The RX response index ran past the buffers posted.
    RxOverflow,
    /// A TX response named an id not in flight.
    TxUnknownId(u16),
}

/// Where the connection with the backend stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not started: [`Netfront::start`] not called yet.
    Stopped,
    /// Initialising: waiting for the backend's InitWait.
    WaitingForBackend,
    /// Rings published and Connected written: waiting for the backend to
    /// connect.
    Published,
    /// Both ends Connected: frames flow.
    Running,
    /// The backend broke a ring (see [`Netfront::broken_ring`]): the
    /// data path stopped; the next [`Netfront::attend`] says Closed so
    /// that the backend disconnects, and a new connection follows.
    Broken,
    /// Closed written: waiting for the backend to be Closed before the
    /// grants are ended.
    Closing,
    /// The frontend's directory is gone (the vif was removed).
    Gone,
    /// A connection failed (see [`Netfront::error`]); nothing more is
    /// tried until [`Netfront::start`] is called again.
    Failed,
}

/// Counters of a netfront's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Statistics {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// TX responses with an error status (ERROR, DROPPED or unknown).
    pub tx_errors: u64,
    /// Frames given to a TX token when no buffer was free (lost).
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames dropped: error status, bad offset or size, oversize,
    /// runt, or a blank checksum that could not be completed.
    pub rx_dropped: u64,
    /// Blank checksums completed in software.
    pub rx_checksums_completed: u64,
    /// Responses that broke the protocol without breaking the ring
    /// (bad offsets or sizes, unknown statuses, too many extra slots).
    pub bad_responses: u64,
    /// Connections made (rings published).
    pub connects: u64,
    /// Data paths abandoned because the backend broke a ring.
    pub broken_rings: u64,
}

/// The rings and port of one connection.
pub(crate) struct Link {
    pub(crate) tx: FrontRing<'static>,
    pub(crate) rx: FrontRing<'static>,
    pub(crate) port: u32,
}

/// A netif frontend (one queue).
pub struct Netfront<H> {
    pub(crate) hal: H,
    config: NetfrontConfig,
    frontend_dir: String,
    backend_dir: String,
    backend_id: DomId,
    mac: [u8; 6],
    phase: Phase,
    /// The state last written to our `state` node.
    written_state: XenbusState,
    error: Option<NetfrontError>,
    broken_ring: Option<BrokenRing>,
    /// Connections published since one last reached Running.
    unconnected_attempts: u32,
    pub(crate) pages: PagePool,
    pub(crate) link: Option<Link>,
    pub(crate) tx: TxBuffers,
    pub(crate) rx: RxAssembly,
    pub(crate) stats: Statistics,
}

impl<H: NetfrontHal> Netfront<H> {
    /// A netfront for the vif whose frontend directory is `frontend_dir`
    /// (e.g. `device/vif/0`), with every page it will use allocated now.
    pub fn new(
        mut hal: H,
        config: NetfrontConfig,
        frontend_dir: &str,
    ) -> Result<Self, NetfrontError> {
        let rx = usize::from(config.rx_buffers);
        let tx = usize::from(config.tx_buffers);
        if !(1..=RX_RING_SIZE as usize).contains(&rx) || !(1..=TX_RING_SIZE as usize).contains(&tx)
        {
            return Err(NetfrontError::BadConfig);
        }
        let pages = PagePool::allocate(&mut hal, rx, tx, config.max_leaked_pages)
            .ok_or(NetfrontError::OutOfMemory)?;
        Ok(Netfront {
            hal,
            config,
            frontend_dir: String::from(frontend_dir.trim_end_matches('/')),
            backend_dir: String::new(),
            backend_id: 0,
            mac: [0; 6],
            phase: Phase::Stopped,
            written_state: XenbusState::Unknown,
            error: None,
            broken_ring: None,
            unconnected_attempts: 0,
            pages,
            link: None,
            tx: TxBuffers::new(config.tx_buffers),
            rx: RxAssembly::new(),
            stats: Statistics::default(),
        })
    }

    /// Reads where the backend is, watches its state (events carry
    /// `token`; call [`Self::attend`] for each) and says Initialising.
    pub fn start<S: XenbusStore>(
        &mut self,
        store: &mut S,
        token: &str,
    ) -> Result<(), NetfrontError> {
        self.error = None;
        self.unconnected_attempts = 0;
        self.release();
        let outcome = self.read_frontend_nodes(store).and_then(|()| {
            let state = format!("{}/state", self.backend_dir);
            store.watch(&state, token).map_err(NetfrontError::Store)?;
            self.set_state(store, XenbusState::Initialising)
        });
        match outcome {
            Ok(()) => {
                self.phase = Phase::WaitingForBackend;
                self.attend(store)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Takes the backend's state as it is now and moves the connection
    /// on: call it when the backend's state node fires, and after
    /// [`Self::start`]. Errors also leave the netfront [`Phase::Failed`].
    pub fn attend<S: XenbusStore>(&mut self, store: &mut S) -> Result<(), NetfrontError> {
        if matches!(self.phase, Phase::Stopped | Phase::Gone | Phase::Failed) {
            return Ok(());
        }
        if self.link.is_none() {
            // Grants a former backend held: give them back as soon as it lets go.
            self.pages.end_grants(&mut self.hal);
        }
        if self.phase == Phase::Broken {
            return self.close(store).map_err(|e| self.fail(e));
        }
        let backend = self.backend_state(store);
        let outcome = match (self.phase, backend) {
            (Phase::Published, XenbusState::Connected) => {
                self.phase = Phase::Running;
                self.unconnected_attempts = 0;
                // The backend may have missed our posted RX buffers.
                self.notify_backend();
                Ok(())
            }
            // Our rings are published; netback goes Connected once it
            // has seen our Connected.
            (Phase::Published, XenbusState::InitWait) => Ok(()),
            // The backend waits for rings: a first connection, or a new
            // backend after a restart (whatever we had is stale).
            (_, XenbusState::InitWait) => {
                self.release();
                self.connect(store)
            }
            (Phase::Published | Phase::Running, XenbusState::Closing)
            | (Phase::WaitingForBackend, XenbusState::Connected | XenbusState::Closing) => {
                // A stale backend (connected to a former instance of
                // ours) is reset the same way.
                self.close(store)
            }
            (
                Phase::Published | Phase::Running | Phase::Closing,
                XenbusState::Closed | XenbusState::Unknown | XenbusState::Initialising,
            )
            | (Phase::WaitingForBackend, XenbusState::Closed) => self.reinitialise(store),
            _ => Ok(()),
        };
        outcome.map_err(|e| self.fail(e))
    }

    /// The data path is up: frames can be sent and received.
    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Why the netfront failed, when it did.
    pub fn error(&self) -> Option<&NetfrontError> {
        self.error.as_ref()
    }

    /// The vif's MAC address (from the `mac` node; zero before start).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The event channel port of the connection, while there is one.
    pub fn port(&self) -> Option<u32> {
        self.link.as_ref().map(|l| l.port)
    }

    /// The backend's directory (empty before start).
    pub fn backend_dir(&self) -> &str {
        &self.backend_dir
    }

    /// The backend's domain id.
    pub fn backend_id(&self) -> DomId {
        self.backend_id
    }

    pub fn statistics(&self) -> Statistics {
        self.stats
    }

    /// Pages lost to grants a backend never gave back.
    pub fn leaked_pages(&self) -> usize {
        self.pages.leaked()
    }

    /// Grants still held by the backend (ended when it lets go).
    pub fn grants_held_by_backend(&self) -> usize {
        if self.link.is_some() {
            0
        } else {
            self.pages.held_by_backend()
        }
    }

    pub fn config(&self) -> NetfrontConfig {
        self.config
    }

    fn node(&self, name: &str) -> String {
        format!("{}/{}", self.frontend_dir, name)
    }

    fn read_frontend_nodes<S: XenbusStore>(&mut self, store: &mut S) -> Result<(), NetfrontError> {
        let read = |store: &mut S, name: &'static str| {
            store
                .read(&format!("{}/{}", self.frontend_dir, name))
                .map_err(|_| NetfrontError::BadNode(name))
        };
        let backend_dir = parse_backend_path(&read(store, "backend")?)
            .ok_or(NetfrontError::BadNode("backend"))?;
        let backend_id =
            parse_domid(&read(store, "backend-id")?).ok_or(NetfrontError::BadNode("backend-id"))?;
        let mac = parse_mac(&read(store, "mac")?).ok_or(NetfrontError::BadNode("mac"))?;
        self.backend_dir = backend_dir;
        self.backend_id = backend_id;
        self.mac = mac;
        Ok(())
    }

    fn backend_state<S: XenbusStore>(&self, store: &mut S) -> XenbusState {
        store
            .read(&format!("{}/state", self.backend_dir))
            .map_or(XenbusState::Unknown, |v| XenbusState::parse(&v))
    }

    fn set_state<S: XenbusStore>(
        &mut self,
        store: &mut S,
        state: XenbusState,
    ) -> Result<(), NetfrontError> {
        store
            .write(&self.node("state"), state.as_str().as_bytes())
            .map_err(NetfrontError::Store)?;
        self.written_state = state;
        Ok(())
    }

    fn fail(&mut self, error: NetfrontError) -> NetfrontError {
        self.release();
        self.phase = Phase::Failed;
        self.error = Some(error.clone());
        error
    }

    /// Grants the pages, sets up the rings, posts the RX buffers and
    /// publishes everything with state Connected, in one transaction.
    fn connect<S: XenbusStore>(&mut self, store: &mut S) -> Result<(), NetfrontError> {
        if self.unconnected_attempts >= MAX_UNCONNECTED_ATTEMPTS {
            return Err(NetfrontError::BackendNeverConnects(
                self.unconnected_attempts,
            ));
        }
        self.unconnected_attempts += 1;
        // The toolstack may have pointed us at another backend.
        self.read_frontend_nodes(store)?;
        if !feature_enabled(store.read(&format!("{}/feature-rx-copy", self.backend_dir))) {
            return Err(NetfrontError::NoRxCopy);
        }
        self.pages
            .share(&mut self.hal, self.backend_id)
            .map_err(NetfrontError::Share)?;
        let port = match self.hal.alloc_unbound_port(self.backend_id) {
            Ok(port) => port,
            Err(_) => {
                self.pages.end_grants(&mut self.hal);
                return Err(NetfrontError::NoPort);
            }
        };
        let ring = |index: usize, entry: usize| {
            let base = self.pages.page(index).page.ptr;
            // SAFETY: a page from the HAL: aligned, PAGE_SIZE bytes,
            // mapped for the netfront's life (the trait's contract), and
            // touched only through this ring view until it is dropped at
            // release.
            unsafe {
                base.as_ptr().write_bytes(0, PAGE_SIZE);
                FrontRing::init(base, PAGE_SIZE, entry, 0)
            }
        };
        self.link = Some(Link {
            tx: ring(TX_RING_PAGE, TX_ENTRY_LEN),
            rx: ring(RX_RING_PAGE, RX_ENTRY_LEN),
            port,
        });
        self.tx.reset();
        self.rx.reset();
        self.post_all_rx_buffers();
        let grant = |index: usize| {
            let gref = self.pages.page(index).gref.unwrap_or_default();
            format!("{gref}")
        };
        let (tx_ref, rx_ref, channel) =
            (grant(TX_RING_PAGE), grant(RX_RING_PAGE), format!("{port}"));
        let names = [
            self.node("tx-ring-ref"),
            self.node("rx-ring-ref"),
            self.node("event-channel"),
            self.node("request-rx-copy"),
            self.node("feature-rx-notify"),
            self.node("feature-sg"),
            self.node("feature-gso-tcpv4"),
            self.node("feature-gso-tcpv6"),
            self.node("feature-no-csum-offload"),
            self.node("feature-ipv6-csum-offload"),
            self.node("state"),
        ];
        let values: [&[u8]; 11] = [
            tx_ref.as_bytes(),
            rx_ref.as_bytes(),
            channel.as_bytes(),
            b"1",
            b"1",
            // One slot per frame both ways: MTU 1500, no scatter-gather.
            b"0",
            b"0",
            b"0",
            // Full checksums from netback; none left blank for it.
            b"1",
            b"0",
            XenbusState::Connected.as_str().as_bytes(),
        ];
        let nodes: Vec<(&str, &[u8])> = names.iter().map(String::as_str).zip(values).collect();
        store.write_all(&nodes).map_err(NetfrontError::Store)?;
        self.written_state = XenbusState::Connected;
        self.phase = Phase::Published;
        self.stats.connects += 1;
        Ok(())
    }

    /// Stops the data path and says Closed: netback disconnects (unmaps
    /// the rings) and goes Closed, when the grants can be ended.
    fn close<S: XenbusStore>(&mut self, store: &mut S) -> Result<(), NetfrontError> {
        self.phase = Phase::Closing;
        self.set_state(store, XenbusState::Closed)
    }

    /// The backend is Closed (or gone, or new): ends what it can of the
    /// connection and says Initialising, unless the vif itself is gone.
    fn reinitialise<S: XenbusStore>(&mut self, store: &mut S) -> Result<(), NetfrontError> {
        self.release();
        if store.read(&self.node("backend")).is_err() {
            // The toolstack removed our directory: writing state would
            // recreate a node of a device that no longer exists.
            self.phase = Phase::Gone;
            return Ok(());
        }
        self.phase = Phase::WaitingForBackend;
        if self.written_state != XenbusState::Initialising {
            self.set_state(store, XenbusState::Initialising)?;
        }
        Ok(())
    }

    /// Drops the connection's rings and port and ends the grants the
    /// backend lets go of (the others are retried later).
    fn release(&mut self) {
        if let Some(link) = self.link.take() {
            self.hal.close_port(link.port);
        }
        self.pages.end_grants(&mut self.hal);
        self.tx.reset();
        self.rx.reset();
    }

    pub(crate) fn notify_backend(&mut self) {
        if let Some(link) = &self.link {
            self.hal.notify(link.port);
        }
    }

    /// Stops the data path of a ring the backend broke; the next
    /// [`Self::attend`] closes the connection.
    pub(crate) fn note_broken(&mut self, why: BrokenRing) {
        self.stats.broken_rings += 1;
        self.broken_ring = Some(why);
        self.phase = Phase::Broken;
    }

    /// How the backend last broke a ring, if it ever did.
    pub fn broken_ring(&self) -> Option<BrokenRing> {
        self.broken_ring
    }

    /// Whether [`Self::attend`] has work even without a xenstore event
    /// (a broken ring to close).
    pub fn needs_attend(&self) -> bool {
        self.phase == Phase::Broken
    }
}

/// Zeroed storage for a frame.
pub(crate) fn frame_buffer() -> Vec<u8> {
    vec![0; MAX_FRAME_LEN]
}

//! Host simulations for netfront tests: [`SimHal`], the hypervisor side
//! (our pages, our grant table with the backend's mappings and copies
//! through it, event channels), and [`SimNetback`], a backend that
//! behaves as Linux netback does on xenstore and on the rings, and can
//! misbehave on command.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

use xen_pv::grant::{GrantRef, GrantStillMapped};
use xen_pv::ring::{BackRing, SringHeader};
use xen_pv::sim::xenstore::SimXenstored;
use xen_pv::xenbus::XenbusState;
use xen_pv::xenstore::{Access, Perm};
use xen_pv::{DomId, Errno, PAGE_SIZE};

use crate::hal::{NetfrontHal, OwnPage};
use crate::nodes::parse_unsigned;
use crate::wire::{
    NETIF_RSP_ERROR, NETIF_RSP_OKAY, NETTXF_EXTRA_INFO, NETTXF_MORE_DATA, RX_ENTRY_LEN, RxRequest,
    RxResponse, TX_ENTRY_LEN, TxRequest, TxResponse,
};

/// The backend's domain (dom0, as with a stock vif).
pub const BACKEND: DomId = 0;
/// The frame number of the first simulated page.
const FIRST_GFN: u64 = 0x8_0000;

#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE_SIZE]);

struct OwnGrant {
    gfn: u64,
    grantee: DomId,
    readonly: bool,
    mapped: bool,
}

#[derive(Default)]
struct SimHost {
    pages: Vec<Box<AlignedPage>>,
    page_limit: Option<usize>,
    grants: BTreeMap<GrantRef, OwnGrant>,
    next_gref: GrantRef,
    grant_limit: Option<usize>,
    /// Our unbound or bound ports, each with the domain it is for and
    /// the notifications we sent on it.
    ports: BTreeMap<u32, (DomId, u64)>,
    next_port: u32,
    notifications_to_frontend: u64,
}

impl SimHost {
    fn page_ptr(&self, gfn: u64) -> Option<NonNull<u8>> {
        let index = usize::try_from(gfn.checked_sub(FIRST_GFN)?).ok()?;
        self.pages
            .get(index)
            .map(|p| NonNull::from(&p.0).cast::<u8>())
    }

    /// The page of grant `gref` if it lets `dom` in (for writing too,
    /// when `write`).
    fn granted(&self, dom: DomId, gref: GrantRef, write: bool) -> Option<NonNull<u8>> {
        let grant = self.grants.get(&gref)?;
        if grant.grantee != dom || (write && grant.readonly) {
            return None;
        }
        self.page_ptr(grant.gfn)
    }
}

/// The simulated hypervisor as netfront sees it, shared with the
/// [`SimNetback`] that plays the other domain.
#[derive(Clone, Default)]
pub struct SimHal(Rc<RefCell<SimHost>>);

impl SimHal {
    pub fn new() -> Self {
        let hal = SimHal::default();
        hal.0.borrow_mut().next_gref = 8;
        hal.0.borrow_mut().next_port = 1;
        hal
    }

    /// Lets at most `pages` pages be allocated in all.
    pub fn limit_pages(&self, pages: usize) {
        self.0.borrow_mut().page_limit = Some(pages);
    }

    /// Lets at most `grants` grants stand at once.
    pub fn limit_grants(&self, grants: usize) {
        self.0.borrow_mut().grant_limit = Some(grants);
    }

    pub fn pages_allocated(&self) -> usize {
        self.0.borrow().pages.len()
    }

    /// Grants standing now.
    pub fn grants(&self) -> usize {
        self.0.borrow().grants.len()
    }

    /// Ports allocated and not closed.
    pub fn open_ports(&self) -> usize {
        self.0.borrow().ports.len()
    }

    /// Notifications we sent on `port`.
    pub fn notifications_to_backend(&self, port: u32) -> u64 {
        self.0.borrow().ports.get(&port).map_or(0, |p| p.1)
    }

    /// Notifications we sent on every port, closed ones excepted.
    pub fn all_notifications_to_backend(&self) -> u64 {
        self.0.borrow().ports.values().map(|p| p.1).sum()
    }

    /// Notifications the backend sent us.
    pub fn notifications_to_frontend(&self) -> u64 {
        self.0.borrow().notifications_to_frontend
    }

    /// Domain `dom` (the backend) maps grant `gref`; `None` when it may
    /// not.
    pub fn backend_map(&self, dom: DomId, gref: GrantRef) -> Option<NonNull<u8>> {
        let mut host = self.0.borrow_mut();
        let page = host.granted(dom, gref, true)?;
        host.grants.get_mut(&gref)?.mapped = true;
        Some(page)
    }

    pub fn backend_unmap(&self, gref: GrantRef) {
        if let Some(grant) = self.0.borrow_mut().grants.get_mut(&gref) {
            grant.mapped = false;
        }
    }

    /// Grant copy out of our page (what netback does with TX requests).
    pub fn backend_copy_from(
        &self,
        dom: DomId,
        gref: GrantRef,
        offset: usize,
        len: usize,
    ) -> Option<Vec<u8>> {
        let page = self.0.borrow().granted(dom, gref, false)?;
        if offset + len > PAGE_SIZE {
            return None;
        }
        // SAFETY: a live page of the host, `offset + len` within it.
        let bytes = unsafe { core::slice::from_raw_parts(page.as_ptr().add(offset), len) };
        Some(bytes.to_vec())
    }

    /// Grant copy into our page (what netback does for RX).
    pub fn backend_copy_to(&self, dom: DomId, gref: GrantRef, offset: usize, data: &[u8]) -> bool {
        let Some(page) = self.0.borrow().granted(dom, gref, true) else {
            return false;
        };
        if offset + data.len() > PAGE_SIZE {
            return false;
        }
        // SAFETY: a live page of the host, the range within it.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), page.as_ptr().add(offset), data.len())
        };
        true
    }

    /// Whether our port `port` exists and is for `dom`.
    pub fn port_is_for(&self, port: u32, dom: DomId) -> bool {
        self.0.borrow().ports.get(&port).is_some_and(|p| p.0 == dom)
    }

    fn notify_frontend(&self) {
        self.0.borrow_mut().notifications_to_frontend += 1;
    }
}

// SAFETY: pages are boxed, page-aligned, zeroed and never freed while
// any clone of the host lives (the netfront holds one).
unsafe impl NetfrontHal for SimHal {
    fn alloc_page(&mut self) -> Option<OwnPage> {
        let mut host = self.0.borrow_mut();
        if host
            .page_limit
            .is_some_and(|limit| host.pages.len() >= limit)
        {
            return None;
        }
        host.pages.push(Box::new(AlignedPage([0; PAGE_SIZE])));
        let gfn = FIRST_GFN + host.pages.len() as u64 - 1;
        Some(OwnPage {
            ptr: host.page_ptr(gfn)?,
            gfn,
        })
    }

    fn grant_access(&mut self, grantee: DomId, gfn: u64, readonly: bool) -> Option<GrantRef> {
        let mut host = self.0.borrow_mut();
        if host
            .grant_limit
            .is_some_and(|limit| host.grants.len() >= limit)
        {
            return None;
        }
        host.page_ptr(gfn)?;
        let gref = host.next_gref;
        host.next_gref += 1;
        host.grants.insert(
            gref,
            OwnGrant {
                gfn,
                grantee,
                readonly,
                mapped: false,
            },
        );
        Some(gref)
    }

    fn end_access(&mut self, gref: GrantRef) -> Result<(), GrantStillMapped> {
        let mut host = self.0.borrow_mut();
        match host.grants.get(&gref) {
            Some(grant) if grant.mapped => Err(GrantStillMapped),
            _ => {
                host.grants.remove(&gref);
                Ok(())
            }
        }
    }

    fn alloc_unbound_port(&mut self, remote: DomId) -> Result<u32, Errno> {
        let mut host = self.0.borrow_mut();
        let port = host.next_port;
        host.next_port += 1;
        host.ports.insert(port, (remote, 0));
        Ok(port)
    }

    fn close_port(&mut self, port: u32) {
        self.0.borrow_mut().ports.remove(&port);
    }

    fn notify(&mut self, port: u32) {
        if let Some(p) = self.0.borrow_mut().ports.get_mut(&port) {
            p.1 += 1;
        }
    }
}

/// How the simulated netback answers TX requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxAnswer {
    /// NETIF_RSP_OKAY with the request's id.
    Okay,
    /// This status with the request's id.
    Status(i16),
    /// OKAY with this id instead of the request's.
    WrongId(u16),
    /// Two OKAY answers to each request.
    Twice,
    /// No answer at all (the frames are still taken).
    Withhold,
}

/// One RX slot as the simulated netback fills it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RxSlot {
    /// `data` copied at `offset` of the posted page; the response says
    /// `flags`, and `status` (the data's length when `None`).
    Data {
        data: Vec<u8>,
        offset: u16,
        flags: u16,
        status: Option<i16>,
    },
    /// An extra-info slot (`kind`, `flags`); its request's page unused.
    Extra { kind: u8, flags: u8 },
}

impl RxSlot {
    /// A whole frame in one slot.
    pub fn frame(data: &[u8], flags: u16) -> RxSlot {
        RxSlot::Data {
            data: data.to_vec(),
            offset: 0,
            flags,
            status: None,
        }
    }
}

/// One connection's rings, as the backend has them mapped.
struct BackLink {
    tx: BackRing<'static>,
    rx: BackRing<'static>,
    tx_ring: (GrantRef, NonNull<u8>),
    rx_ring: (GrantRef, NonNull<u8>),
    port: u32,
}

/// A simulated Linux netback for one vif: the toolstack's nodes, the
/// xenbus dance of xen-netback/xenbus.c, and the rings.
pub struct SimNetback {
    host: SimHal,
    frontend_id: DomId,
    frontend_dir: String,
    backend_dir: String,
    state: XenbusState,
    link: Option<BackLink>,
    /// Frames the frontend sent, oldest first.
    pub transmitted: VecDeque<Vec<u8>>,
    /// Packets (each one or more slots) waiting for RX buffers.
    pub pending_rx: VecDeque<Vec<RxSlot>>,
    pub tx_answer: TxAnswer,
    /// Leave the rings mapped at disconnect (a backend that holds on).
    pub keep_rings_mapped: bool,
    /// Refuse every connection (as a netback that cannot map the rings
    /// or bind the port would).
    pub refuse_connects: bool,
    /// Connections made.
    pub connects: u64,
    /// Why the last connection attempt was refused, as netback's
    /// xenbus_dev_fatal would say.
    pub refused: Option<String>,
}

impl SimNetback {
    /// The toolstack creates vif `devid` of domain `frontend_id` with
    /// `mac`, and netback probes it (writes its features, InitWait).
    pub fn new(
        host: SimHal,
        store: &mut SimXenstored,
        frontend_id: DomId,
        devid: u32,
        mac: &str,
    ) -> Self {
        let frontend_dir = format!("/local/domain/{frontend_id}/device/vif/{devid}");
        let backend_dir = format!("/local/domain/{BACKEND}/backend/vif/{frontend_id}/{devid}");
        let mut netback = SimNetback {
            host,
            frontend_id,
            frontend_dir,
            backend_dir,
            state: XenbusState::Initialising,
            link: None,
            transmitted: VecDeque::new(),
            pending_rx: VecDeque::new(),
            tx_answer: TxAnswer::Okay,
            keep_rings_mapped: false,
            refuse_connects: false,
            connects: 0,
            refused: None,
        };
        netback.toolstack_nodes(store, mac);
        netback.probe(store);
        netback
    }

    fn toolstack_nodes(&self, store: &mut SimXenstored, mac: &str) {
        let f = &self.frontend_dir;
        store.dom0_write(&format!("{f}/backend"), self.backend_dir.as_bytes());
        store.dom0_write(&format!("{f}/backend-id"), format!("{BACKEND}").as_bytes());
        store.dom0_write(&format!("{f}/mac"), mac.as_bytes());
        store.dom0_write(&format!("{f}/handle"), b"0");
        store.dom0_write(&format!("{f}/state"), b"1");
        let b = &self.backend_dir;
        store.dom0_write(b, b"");
        store.dom0_set_perms(
            b,
            &[
                Perm {
                    domid: BACKEND,
                    access: Access::None,
                },
                Perm {
                    domid: self.frontend_id,
                    access: Access::Read,
                },
            ],
        );
        for (name, value) in [
            ("frontend", f.as_str()),
            ("mac", mac),
            ("handle", "0"),
            ("online", "1"),
            ("script", "/etc/xen/scripts/vif-bridge"),
        ] {
            store.dom0_write(&format!("{b}/{name}"), value.as_bytes());
        }
        store.dom0_write(
            &format!("{b}/frontend-id"),
            format!("{}", self.frontend_id).as_bytes(),
        );
    }

    /// netback_probe: its features, then InitWait.
    fn probe(&mut self, store: &mut SimXenstored) {
        for (name, value) in [
            ("feature-sg", "1"),
            ("feature-gso-tcpv4", "1"),
            ("feature-gso-tcpv6", "1"),
            ("feature-ipv6-csum-offload", "1"),
            ("feature-rx-copy", "1"),
            ("feature-rx-flip", "0"),
            ("feature-multicast-control", "1"),
            ("feature-dynamic-multicast-control", "1"),
            ("feature-split-event-channels", "1"),
            ("multi-queue-max-queues", "2"),
            ("feature-ctrl-ring", "1"),
        ] {
            store.dom0_write(&format!("{}/{name}", self.backend_dir), value.as_bytes());
        }
        self.switch(store, XenbusState::InitWait);
    }

    pub fn frontend_dir(&self) -> &str {
        &self.frontend_dir
    }

    pub fn backend_dir(&self) -> &str {
        &self.backend_dir
    }

    pub fn state(&self) -> XenbusState {
        self.state
    }

    pub fn is_connected(&self) -> bool {
        self.link.is_some()
    }

    /// A node of the frontend's directory, as text.
    pub fn frontend_node(&self, store: &SimXenstored, name: &str) -> Option<String> {
        let value = store.dom0_read(&format!("{}/{name}", self.frontend_dir))?;
        String::from_utf8(value).ok()
    }

    fn switch(&mut self, store: &mut SimXenstored, state: XenbusState) {
        self.state = state;
        store.dom0_write(
            &format!("{}/state", self.backend_dir),
            state.as_str().as_bytes(),
        );
    }

    /// Sets the backend's state node to anything (a backend gone
    /// strange, or restarted), without doing what the state implies.
    pub fn force_state(&mut self, store: &mut SimXenstored, state: XenbusState) {
        if state != XenbusState::Connected {
            self.disconnect();
        }
        self.switch(store, state);
    }

    /// One round: follow the frontend's state as netback's
    /// frontend_changed does, then serve the rings. True if anything
    /// moved.
    pub fn step(&mut self, store: &mut SimXenstored) -> bool {
        let frontend = store
            .dom0_read(&format!("{}/state", self.frontend_dir))
            .map_or(XenbusState::Unknown, |v| XenbusState::parse(&v));
        let before = self.state;
        match (frontend, self.state) {
            (XenbusState::Initialising, XenbusState::Closed) => {
                self.switch(store, XenbusState::InitWait)
            }
            (XenbusState::Connected, XenbusState::InitWait) => {
                if self.connect(store) {
                    self.switch(store, XenbusState::Connected);
                } else {
                    // xenbus_dev_fatal: an error node, and Closing.
                    let why = self.refused.clone().unwrap_or_default();
                    store.dom0_write(&format!("{}/error", self.backend_dir), why.as_bytes());
                    self.switch(store, XenbusState::Closing);
                }
            }
            (
                XenbusState::Closing | XenbusState::Closed,
                XenbusState::Connected | XenbusState::InitWait,
            ) => {
                self.disconnect();
                self.switch(store, XenbusState::Closing);
            }
            (XenbusState::Closed, XenbusState::Closing) => self.switch(store, XenbusState::Closed),
            _ => {}
        }
        let served = self.serve();
        served || before != self.state
    }

    fn read_number(&self, store: &SimXenstored, name: &str) -> Option<u32> {
        parse_unsigned(&store.dom0_read(&format!("{}/{name}", self.frontend_dir))?)
    }

    /// read_xenbus_vif_flags and connect_data_rings.
    fn connect(&mut self, store: &SimXenstored) -> bool {
        self.refused = None;
        let refuse = |why: &str| Some(String::from(why));
        if self.refuse_connects {
            self.refused = refuse("refused by the test");
            return false;
        }
        if self.read_number(store, "request-rx-copy") != Some(1) {
            self.refused = refuse("request-rx-copy");
            return false;
        }
        let refs = (
            self.read_number(store, "tx-ring-ref"),
            self.read_number(store, "rx-ring-ref"),
            self.read_number(store, "event-channel"),
        );
        let (Some(tx_ref), Some(rx_ref), Some(port)) = refs else {
            self.refused = refuse("ring-ref or event-channel");
            return false;
        };
        if !self.host.port_is_for(port, BACKEND) {
            self.refused = refuse("binding the event channel");
            return false;
        }
        let (Some(tx_page), Some(rx_page)) = (
            self.host.backend_map(BACKEND, tx_ref),
            self.host.backend_map(BACKEND, rx_ref),
        ) else {
            self.host.backend_unmap(tx_ref);
            self.host.backend_unmap(rx_ref);
            self.refused = refuse("mapping shared-frames");
            return false;
        };
        // SAFETY: pages of the host, which this netback keeps alive (it
        // holds a clone) and which are never freed while it lives; the
        // frontend initialised both rings before publishing them.
        let (tx, rx) = unsafe {
            (
                BackRing::attach(tx_page, PAGE_SIZE, TX_ENTRY_LEN),
                BackRing::attach(rx_page, PAGE_SIZE, RX_ENTRY_LEN),
            )
        };
        self.link = Some(BackLink {
            tx,
            rx,
            tx_ring: (tx_ref, tx_page),
            rx_ring: (rx_ref, rx_page),
            port,
        });
        self.connects += 1;
        true
    }

    fn disconnect(&mut self) {
        if let Some(link) = self.link.take()
            && !self.keep_rings_mapped
        {
            self.host.backend_unmap(link.tx_ring.0);
            self.host.backend_unmap(link.rx_ring.0);
        }
    }

    /// Takes TX requests and fills RX buffers; true if any moved.
    fn serve(&mut self) -> bool {
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        let mut moved = false;
        let mut entry = [0u8; TX_ENTRY_LEN];
        let mut notify = false;
        while link.tx.next_request(&mut entry).unwrap_or(false) {
            moved = true;
            let request = TxRequest::decode(&entry);
            let single_slot = request.flags & (NETTXF_MORE_DATA | NETTXF_EXTRA_INFO) == 0;
            let data = self.host.backend_copy_from(
                BACKEND,
                request.gref,
                usize::from(request.offset),
                usize::from(request.size),
            );
            let status = match data {
                Some(frame) if single_slot && frame.len() >= 14 => {
                    self.transmitted.push_back(frame);
                    NETIF_RSP_OKAY
                }
                _ => NETIF_RSP_ERROR,
            };
            let answers: &[(u16, i16)] = match self.tx_answer {
                TxAnswer::Okay => &[(request.id, status)],
                TxAnswer::Status(s) => &[(request.id, s)],
                TxAnswer::WrongId(id) => &[(id, NETIF_RSP_OKAY)],
                TxAnswer::Twice => &[(request.id, status), (request.id, status)],
                TxAnswer::Withhold => &[],
            };
            for (id, status) in answers {
                link.tx.put_response(
                    &TxResponse {
                        id: *id,
                        status: *status,
                    }
                    .encode(),
                );
            }
            notify |= link.tx.push_responses();
        }
        let mut entry = [0u8; RX_ENTRY_LEN];
        while let Some(packet) = self.pending_rx.front() {
            if link.rx.unconsumed_requests().unwrap_or(0) < packet.len() as u32 {
                break;
            }
            let packet = self.pending_rx.pop_front().unwrap_or_default();
            for slot in packet {
                if !link.rx.next_request(&mut entry).unwrap_or(false) {
                    break;
                }
                let request = RxRequest::decode(&entry);
                let response = match slot {
                    RxSlot::Data {
                        data,
                        offset,
                        flags,
                        status,
                    } => {
                        let copied = self.host.backend_copy_to(
                            BACKEND,
                            request.gref,
                            usize::from(offset),
                            &data,
                        );
                        let status = status.unwrap_or(if copied {
                            data.len() as i16
                        } else {
                            NETIF_RSP_ERROR
                        });
                        RxResponse {
                            id: request.id,
                            offset,
                            flags,
                            status,
                        }
                        .encode()
                    }
                    RxSlot::Extra { kind, flags } => [kind, flags, 0, 0, 0, 0, 0, 0],
                };
                link.rx.put_response(&response);
            }
            moved = true;
            notify |= link.rx.push_responses();
        }
        // As netback: ask to be woken by the next TX request, and by RX
        // buffers while frames wait for them.
        let _ = link.tx.final_check_for_requests();
        if !self.pending_rx.is_empty() {
            let _ = link.rx.final_check_for_requests();
        }
        if notify {
            self.host.notify_frontend();
        }
        moved
    }

    /// Queues a frame for the frontend (one slot).
    pub fn deliver(&mut self, frame: &[u8]) {
        self.pending_rx
            .push_back(alloc::vec![RxSlot::frame(frame, 0)]);
    }

    /// RX requests the frontend has posted and we have not used.
    pub fn rx_buffers_posted(&self) -> u32 {
        self.link
            .as_ref()
            .map_or(0, |l| l.rx.unconsumed_requests().unwrap_or(0))
    }

    /// Moves the RX ring's shared response index by `delta` (a backend
    /// claiming answers it never gave).
    pub fn corrupt_rx_rsp_prod(&mut self, delta: u32) {
        if let Some(link) = &self.link {
            Self::header(link.rx_ring.1)
                .rsp_prod
                .fetch_add(delta, Ordering::Release);
        }
    }

    /// As [`Self::corrupt_rx_rsp_prod`], for the TX ring.
    pub fn corrupt_tx_rsp_prod(&mut self, delta: u32) {
        if let Some(link) = &self.link {
            Self::header(link.tx_ring.1)
                .rsp_prod
                .fetch_add(delta, Ordering::Release);
        }
    }

    fn header(page: NonNull<u8>) -> &'static SringHeader {
        // SAFETY: a mapped ring page of the host (alive as long as any
        // clone of it, this netback's included); the header is atomics.
        unsafe { page.cast::<SringHeader>().as_ref() }
    }

    /// Notifications the frontend sent on the connection's port.
    pub fn notifications_from_frontend(&self) -> u64 {
        self.link
            .as_ref()
            .map_or(0, |l| self.host.notifications_to_backend(l.port))
    }
}

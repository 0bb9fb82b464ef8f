//! The address order, the interface's configuration, and the DHCP client
//! against a fake server over a wire of frame queues.

use super::*;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use smoltcp::iface::Config;
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    DHCP_CLIENT_PORT, DHCP_SERVER_PORT, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};
use std::format;

const CLIENT_MAC: EthernetAddress = EthernetAddress([0x00, 0x16, 0x3e, 0, 0, 1]);
const SERVER_MAC: EthernetAddress = EthernetAddress([0x00, 0x16, 0x3e, 0, 0, 2]);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const OFFERED: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const LEASE_SECS: u32 = 120;

fn cidr(address: [u8; 4], prefix: u8) -> Ipv4Cidr {
    Ipv4Cidr {
        address: Ipv4Addr::from(address),
        prefix,
    }
}

#[test]
fn the_command_line_wins_then_the_vif_node_then_dhcp() {
    let given = cidr([192, 168, 1, 2], 16);
    assert_eq!(
        AddressSource::choose(Some(given), Some("10.0.0.2")),
        AddressSource::CommandLine(given)
    );
    assert_eq!(
        AddressSource::choose(None, Some("10.0.0.2 10.0.0.3/8")),
        AddressSource::VifNode(cidr([10, 0, 0, 2], 24))
    );
    assert_eq!(
        AddressSource::choose(None, Some("10.0.0.2/28")),
        AddressSource::VifNode(cidr([10, 0, 0, 2], 28))
    );
    for unusable in [
        None,
        Some(""),
        Some("  "),
        Some("vif-ip"),
        Some("10.0.0.2/40"),
    ] {
        assert_eq!(AddressSource::choose(None, unusable), AddressSource::Dhcp);
    }
    assert_eq!(
        AddressSource::CommandLine(given).fixed(),
        Some((given, "stordom.ip"))
    );
    assert_eq!(
        AddressSource::VifNode(given).fixed(),
        Some((given, "the vif's ip node"))
    );
    assert_eq!(AddressSource::Dhcp.fixed(), None);
}

#[test]
fn a_lease_reads_as_its_console_line() {
    let mut lease = Lease {
        address: cidr([10, 0, 0, 5], 24),
        server: SERVER,
        router: Some(ROUTER),
        lease_secs: Some(3600),
    };
    assert_eq!(
        format!("{lease}"),
        "10.0.0.5/24 from 10.0.0.1 (router 10.0.0.254, lease 3600 s)"
    );
    lease.router = None;
    lease.lease_secs = None;
    assert_eq!(
        format!("{lease}"),
        "10.0.0.5/24 from 10.0.0.1 (no router, lease time unknown)"
    );
}

/// Frames each way between the client's interface and the fake server.
#[derive(Default)]
struct Wire {
    to_server: VecDeque<Vec<u8>>,
    to_client: VecDeque<Vec<u8>>,
}

struct FrameIn(Vec<u8>);
struct FrameOut<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for FrameIn {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for FrameOut<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        self.0.push_back(frame);
        result
    }
}

impl Device for Wire {
    type RxToken<'a> = FrameIn;
    type TxToken<'a> = FrameOut<'a>;

    fn receive(&mut self, _: Instant) -> Option<(FrameIn, FrameOut<'_>)> {
        let frame = self.to_client.pop_front()?;
        Some((FrameIn(frame), FrameOut(&mut self.to_server)))
    }

    fn transmit(&mut self, _: Instant) -> Option<FrameOut<'_>> {
        Some(FrameOut(&mut self.to_server))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// What the fake server reads of a client's DHCP message.
#[derive(Clone, Copy, Debug)]
struct ClientMessage {
    kind: DhcpMessageType,
    transaction_id: u32,
    mac: EthernetAddress,
}

/// The DHCP message in a frame the client sent (ARP and the rest: none).
fn dhcp_message(frame: &[u8]) -> Option<ClientMessage> {
    let ethernet = EthernetFrame::new_checked(frame).ok()?;
    (ethernet.ethertype() == EthernetProtocol::Ipv4).then_some(())?;
    let ip = Ipv4Packet::new_checked(ethernet.payload()).ok()?;
    (ip.next_header() == IpProtocol::Udp).then_some(())?;
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    (udp.dst_port() == DHCP_SERVER_PORT).then_some(())?;
    let dhcp = DhcpPacket::new_checked(udp.payload()).ok()?;
    let repr = DhcpRepr::parse(&dhcp).ok()?;
    Some(ClientMessage {
        kind: repr.message_type,
        transaction_id: repr.transaction_id,
        mac: repr.client_hardware_address,
    })
}

/// The fake server's answer to `request`, broadcast as udhcpd does.
fn answer(
    request: ClientMessage,
    message_type: DhcpMessageType,
    router: Option<Ipv4Addr>,
) -> Vec<u8> {
    let reply = DhcpRepr {
        message_type,
        transaction_id: request.transaction_id,
        secs: 0,
        client_hardware_address: request.mac,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: OFFERED,
        server_ip: SERVER,
        router,
        subnet_mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: false,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(SERVER),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: Some(LEASE_SECS),
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let udp_len = 8 + reply.buffer_len();
    let ip = Ipv4Repr {
        src_addr: SERVER,
        dst_addr: Ipv4Addr::BROADCAST,
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    };
    let ethernet = EthernetRepr {
        src_addr: SERVER_MAC,
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0; ethernet.buffer_len() + ip.buffer_len() + udp_len];
    let checksums = ChecksumCapabilities::default();
    ethernet.emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    let ip_at = ethernet.buffer_len();
    ip.emit(
        &mut Ipv4Packet::new_unchecked(&mut frame[ip_at..]),
        &checksums,
    );
    let udp_at = ip_at + ip.buffer_len();
    let udp = UdpRepr {
        src_port: DHCP_SERVER_PORT,
        dst_port: DHCP_CLIENT_PORT,
    };
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut frame[udp_at..]),
        &IpAddress::Ipv4(SERVER),
        &IpAddress::Ipv4(Ipv4Addr::BROADCAST),
        reply.buffer_len(),
        |payload| {
            let emitted = reply.emit(&mut DhcpPacket::new_unchecked(payload));
            assert!(emitted.is_ok());
        },
        &checksums,
    );
    frame
}

/// The client's interface on a wire, with its DHCP client.
struct Rig {
    wire: Wire,
    iface: Interface,
    sockets: SocketSet<'static>,
    dhcp: DhcpClient,
    now: Instant,
}

impl Rig {
    fn new() -> Rig {
        let mut wire = Wire::default();
        let iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(CLIENT_MAC)),
            &mut wire,
            Instant::ZERO,
        );
        let mut sockets = SocketSet::new(Vec::new());
        let dhcp = DhcpClient::start(&mut sockets);
        Rig {
            wire,
            iface,
            sockets,
            dhcp,
            now: Instant::ZERO,
        }
    }

    /// One poll of the interface, then the client's news.
    fn turn(&mut self) -> Option<DhcpChange> {
        self.iface.poll(self.now, &mut self.wire, &mut self.sockets);
        self.dhcp.update(&mut self.iface, &mut self.sockets)
    }

    /// The DHCP messages the client sent since the last call (all else dropped).
    fn sent(&mut self) -> Vec<ClientMessage> {
        self.wire
            .to_server
            .drain(..)
            .filter_map(|frame| dhcp_message(&frame))
            .collect()
    }

    /// The server answers the one message the client sent, of `expected` type.
    fn answer_the(
        &mut self,
        expected: DhcpMessageType,
        reply: DhcpMessageType,
        router: Option<Ipv4Addr>,
    ) {
        let sent = self.sent();
        assert_eq!(sent.len(), 1, "one DHCP message expected");
        assert_eq!(sent[0].kind, expected);
        self.wire
            .to_client
            .push_back(answer(sent[0], reply, router));
    }

    fn addresses(&self) -> Vec<IpCidr> {
        self.iface.ip_addrs().to_vec()
    }

    fn default_router(&self) -> Option<IpAddress> {
        self.iface
            .routes()
            .get_default_ipv4_route()
            .map(|route| route.via_router)
    }

    /// Leased through DISCOVER, OFFER, REQUEST, ACK.
    fn lease(&mut self) -> Option<DhcpChange> {
        assert_eq!(self.turn(), None);
        self.answer_the(
            DhcpMessageType::Discover,
            DhcpMessageType::Offer,
            Some(ROUTER),
        );
        assert_eq!(self.turn(), None, "an OFFER configures nothing");
        assert!(self.addresses().is_empty());
        self.answer_the(DhcpMessageType::Request, DhcpMessageType::Ack, Some(ROUTER));
        self.turn()
    }
}

#[test]
fn a_discover_goes_out_and_the_offer_and_ack_configure_the_interface() {
    let mut rig = Rig::new();
    let lease = Lease {
        address: cidr([10, 0, 0, 5], 24),
        server: SERVER,
        router: Some(ROUTER),
        lease_secs: Some(LEASE_SECS),
    };
    assert_eq!(rig.lease(), Some(DhcpChange::Leased(lease)));
    assert_eq!(rig.dhcp.lease(), Some(lease));
    assert_eq!(rig.addresses(), [IpCidr::new(IpAddress::Ipv4(OFFERED), 24)]);
    assert_eq!(rig.default_router(), Some(IpAddress::Ipv4(ROUTER)));
    assert_eq!(rig.turn(), None, "nothing new");
}

#[test]
fn a_renewal_is_no_news_but_a_new_router_is() {
    let mut rig = Rig::new();
    assert_eq!(rig.turn(), None);
    rig.answer_the(
        DhcpMessageType::Discover,
        DhcpMessageType::Offer,
        Some(ROUTER),
    );
    assert_eq!(rig.turn(), None);
    let sent = rig.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind, DhcpMessageType::Request);
    let ack = |router| answer(sent[0], DhcpMessageType::Ack, router);
    rig.wire.to_client.push_back(ack(Some(ROUTER)));
    assert!(matches!(rig.turn(), Some(DhcpChange::Leased(_))));
    // The same ACK again, as a renewal's: the lease stands, nothing said.
    rig.wire.to_client.push_back(ack(Some(ROUTER)));
    assert_eq!(rig.turn(), None);
    let moved = Ipv4Addr::new(10, 0, 0, 253);
    rig.wire.to_client.push_back(ack(Some(moved)));
    let Some(DhcpChange::Leased(lease)) = rig.turn() else {
        panic!("a new router is news");
    };
    assert_eq!(lease.router, Some(moved));
    assert_eq!(rig.default_router(), Some(IpAddress::Ipv4(moved)));
    rig.wire.to_client.push_back(ack(None));
    assert!(matches!(rig.turn(), Some(DhcpChange::Leased(_))));
    assert_eq!(rig.default_router(), None, "a lease without a router");
}

#[test]
fn waiting_for_a_server_sleeps_until_the_next_discover() {
    let mut rig = Rig::new();
    assert_eq!(rig.turn(), None);
    assert_eq!(rig.sent().len(), 1, "the first DISCOVER");
    let delay = rig
        .iface
        .poll_delay(rig.now, &rig.sockets)
        .expect("the next DISCOVER is timed");
    assert!(delay >= Duration::from_secs(1), "no busy loop: {delay}");
    assert_eq!(rig.turn(), None);
    assert!(rig.sent().is_empty(), "nothing before the timer");
    rig.now += delay;
    assert_eq!(rig.turn(), None);
    let sent = rig.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind, DhcpMessageType::Discover);
}

#[test]
fn a_lease_not_renewed_is_lost_and_its_address_and_route_removed() {
    let mut rig = Rig::new();
    assert!(matches!(rig.lease(), Some(DhcpChange::Leased(_))));
    let expiry = rig.now + Duration::from_secs(u64::from(LEASE_SECS));
    let mut lost_at = None;
    // The server never answers again: renewing, rebinding, then expiry,
    // each turn at the interface's next timer.
    for _ in 0..1000 {
        let delay = rig.iface.poll_delay(rig.now, &rig.sockets);
        rig.now += delay.expect("a lease has timers");
        match rig.turn() {
            Some(DhcpChange::Lost) => {
                lost_at = Some(rig.now);
                break;
            }
            None => {}
            Some(change) => panic!("{change:?}"),
        }
        let _ = rig.sent();
    }
    assert_eq!(lost_at, Some(expiry));
    assert!(rig.addresses().is_empty());
    assert_eq!(rig.default_router(), None);
    assert_eq!(rig.dhcp.lease(), None);
    // Asking again at once, and a second loss is not reported.
    assert_eq!(rig.turn(), None);
    let sent = rig.sent();
    assert!(sent.iter().any(|m| m.kind == DhcpMessageType::Discover));
}

#[test]
fn a_fixed_address_replaces_any_other_and_the_route_goes_with_none() {
    let mut rig = Rig::new();
    configure_interface(&mut rig.iface, Some(cidr([10, 0, 0, 9], 24)), Some(ROUTER));
    configure_interface(&mut rig.iface, Some(cidr([10, 1, 0, 9], 16)), None);
    assert_eq!(
        rig.addresses(),
        [IpCidr::new(IpAddress::Ipv4(Ipv4Addr::new(10, 1, 0, 9)), 16)]
    );
    assert_eq!(rig.default_router(), None);
    configure_interface(&mut rig.iface, None, None);
    assert!(rig.addresses().is_empty());
}

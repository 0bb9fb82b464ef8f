//! The vif's IPv4 address: which source gives it, and a DHCPv4 lease put
//! on the smoltcp interface (`net.rs` in the binary drives both).
//!
//! Order: `stordom.ip=ADDR/PREFIX` on the command line (the operator's
//! word for this domain); else the first address of the vif's `ip` node
//! in dom0's backend directory (what `vif = [ 'ip=...' ]` sets), as a /24;
//! else a lease from a DHCPv4 server on the vif, with its router as the
//! default route.

use crate::cmdline::Ipv4Cidr;
use alloc::boxed::Box;
use alloc::vec;
use core::fmt;
use core::net::Ipv4Addr;
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::dhcpv4;
use smoltcp::wire::{DhcpMessageType, DhcpPacket, DhcpRepr, IpAddress, IpCidr};

/// The prefix of an address taken from the vif's `ip` node.
const VIF_NODE_PREFIX: u8 = 24;
/// The largest DHCP message a 1500-byte frame carries (less the IPv4 and
/// UDP headers): the client keeps the last one received, to read the
/// lease time off the ACK.
const DHCP_MESSAGE_BYTES_MAX: usize = 1500 - 20 - 8;

/// Where the vif's address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSource {
    /// `stordom.ip=`.
    CommandLine(Ipv4Cidr),
    /// The first address of the vif's `ip` node, as a /24.
    VifNode(Ipv4Cidr),
    /// Neither: ask a DHCP server.
    Dhcp,
}

impl AddressSource {
    /// The first of: the command line's address, the first usable
    /// address of the vif's `ip` node (its text), DHCP.
    pub fn choose(command_line: Option<Ipv4Cidr>, vif_node: Option<&str>) -> Self {
        if let Some(cidr) = command_line {
            return Self::CommandLine(cidr);
        }
        match vif_node.and_then(first_vif_address) {
            Some(cidr) => Self::VifNode(cidr),
            None => Self::Dhcp,
        }
    }

    /// A fixed address, and what gave it (for the console).
    pub fn fixed(self) -> Option<(Ipv4Cidr, &'static str)> {
        match self {
            Self::CommandLine(cidr) => Some((cidr, "stordom.ip")),
            Self::VifNode(cidr) => Some((cidr, "the vif's ip node")),
            Self::Dhcp => None,
        }
    }
}

/// The first address of a vif's `ip` node (addresses separated by
/// spaces, each with or without a prefix).
fn first_vif_address(node: &str) -> Option<Ipv4Cidr> {
    Ipv4Cidr::parse(node.split_ascii_whitespace().next()?, VIF_NODE_PREFIX)
}

/// Puts `address` on the interface in place of any other (none: no
/// address), and `router` as its default route (none: no default route).
pub fn configure_interface(
    iface: &mut Interface,
    address: Option<Ipv4Cidr>,
    router: Option<Ipv4Addr>,
) {
    iface.update_ip_addrs(|addresses| {
        addresses.clear();
        if let Some(cidr) = address {
            // Cannot fail: the list was just emptied.
            let _ = addresses.push(IpCidr::new(IpAddress::Ipv4(cidr.address), cidr.prefix));
        }
    });
    let routes = iface.routes_mut();
    match router {
        // Cannot fail: the old default route, our only route, goes first.
        Some(router) => {
            let _ = routes.add_default_ipv4_route(router);
        }
        None => {
            let _ = routes.remove_default_ipv4_route();
        }
    }
}

/// A DHCPv4 lease, as put on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Cidr,
    /// The server that granted it (its server identifier).
    pub server: Ipv4Addr,
    /// The default route, when the server offered one.
    pub router: Option<Ipv4Addr>,
    /// Seconds, as the ACK said (`None`: it said none, or the ACK was no
    /// longer at hand).
    pub lease_secs: Option<u32>,
}

impl Lease {
    /// The same address, server and router: a renewal, no news.
    fn renews(&self, other: &Lease) -> bool {
        (self.address, self.server, self.router) == (other.address, other.server, other.router)
    }
}

/// `ADDR/PREFIX from SERVER (router R, lease N s)`.
impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} from {} (", self.address, self.server)?;
        match self.router {
            Some(router) => write!(f, "router {router}, ")?,
            None => f.write_str("no router, ")?,
        }
        match self.lease_secs {
            Some(secs) => write!(f, "lease {secs} s)"),
            None => f.write_str("lease time unknown)"),
        }
    }
}

/// What [`DhcpClient::update`] changed on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpChange {
    /// A new lease (or a renewal that moved the address, server or
    /// router) is on the interface.
    Leased(Lease),
    /// The lease expired or the server took it back: no address, no
    /// default route.
    Lost,
}

/// The vif's DHCPv4 client: smoltcp's socket in the interface's set (the
/// interface's polls run it; its timers are in `Interface::poll_delay`),
/// and the lease it put on the interface.
pub struct DhcpClient {
    handle: SocketHandle,
    lease: Option<Lease>,
}

impl DhcpClient {
    /// Adds the client's socket to `sockets`; the interface's next egress
    /// poll sends the DISCOVER. The socket's message buffer is leaked:
    /// one per serving instance, and an in-place restart starts the heap
    /// afresh.
    pub fn start(sockets: &mut SocketSet<'static>) -> Self {
        let mut socket = dhcpv4::Socket::new();
        socket.set_receive_packet_buffer(Box::leak(
            vec![0; DHCP_MESSAGE_BYTES_MAX].into_boxed_slice(),
        ));
        DhcpClient {
            handle: sockets.add(socket),
            lease: None,
        }
    }

    /// The lease on the interface.
    pub fn lease(&self) -> Option<Lease> {
        self.lease
    }

    /// Takes the socket's news (after the interface's polls) and puts it
    /// on the interface.
    pub fn update(&mut self, iface: &mut Interface, sockets: &mut SocketSet) -> Option<DhcpChange> {
        let socket = sockets.get_mut::<dhcpv4::Socket>(self.handle);
        let lease = match socket.poll()? {
            dhcpv4::Event::Configured(config) => Lease {
                address: Ipv4Cidr {
                    address: config.address.address(),
                    prefix: config.address.prefix_len(),
                },
                server: config.server.identifier,
                router: config.router,
                lease_secs: config
                    .packet
                    .and_then(|message| acked_lease_secs(&message, config.address.address())),
            },
            dhcpv4::Event::Deconfigured => {
                self.lease.take()?;
                configure_interface(iface, None, None);
                return Some(DhcpChange::Lost);
            }
        };
        let renewal = self.lease.is_some_and(|old| old.renews(&lease));
        self.lease = Some(lease);
        if renewal {
            return None;
        }
        configure_interface(iface, Some(lease.address), lease.router);
        Some(DhcpChange::Leased(lease))
    }
}

/// The lease time of `message` when it is the ACK of `address` (the
/// socket keeps the last message received, which a stray one may have
/// replaced).
fn acked_lease_secs(message: &DhcpPacket<&[u8]>, address: Ipv4Addr) -> Option<u32> {
    let repr = DhcpRepr::parse(message).ok()?;
    (repr.message_type == DhcpMessageType::Ack && repr.your_ip == address)
        .then_some(repr.lease_duration)?
}

#[cfg(test)]
mod tests;

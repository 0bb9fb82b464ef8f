//! smoltcp over netfronts: two vifs joined by a simulated switch carry
//! a TCP stream, and an idle device hands out no tokens.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use super::Vif;
use crate::NetfrontConfig;

const STREAM_BYTES: usize = 1 << 20;
const PORT: u16 = 5000;

/// The byte at `offset` of the stream: not periodic in any small power
/// of two, so a lost or repeated segment shows.
fn stream_byte(offset: usize) -> u8 {
    (offset.wrapping_mul(131) ^ (offset >> 11)) as u8
}

struct Host {
    vif: Vif,
    iface: Interface,
}

impl Host {
    fn new(mac: [u8; 6], address: [u8; 4]) -> Host {
        let text = alloc::format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            mac[0],
            mac[1],
            mac[2],
            mac[3],
            mac[4],
            mac[5]
        );
        let mut vif = Vif::with_mac(NetfrontConfig::default(), &text);
        vif.connect();
        assert_eq!(vif.netfront.mac(), mac);
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(
            vif.netfront.mac(),
        )));
        let mut iface = Interface::new(config, &mut vif.netfront, Instant::ZERO);
        let [a, b, c, d] = address;
        iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::new(IpAddress::v4(a, b, c, d), 24))
                .unwrap();
        });
        Host { vif, iface }
    }

    fn poll(&mut self, now: Instant, sockets: &mut SocketSet<'_>) -> PollResult {
        self.iface.poll(now, &mut self.vif.netfront, sockets)
    }
}

/// The switch: each backend runs, and what one vif sent goes to the
/// other. Returns the frames moved.
fn switch(a: &mut Host, b: &mut Host) -> usize {
    a.vif.netback.step(a.vif.xs.channel_mut());
    b.vif.netback.step(b.vif.xs.channel_mut());
    let mut moved = 0;
    while let Some(frame) = a.vif.netback.transmitted.pop_front() {
        b.vif.netback.deliver(&frame);
        moved += 1;
    }
    while let Some(frame) = b.vif.netback.transmitted.pop_front() {
        a.vif.netback.deliver(&frame);
        moved += 1;
    }
    a.vif.netback.step(a.vif.xs.channel_mut());
    b.vif.netback.step(b.vif.xs.channel_mut());
    moved
}

fn tcp_socket<'a>(rx: &'a mut [u8], tx: &'a mut [u8]) -> tcp::Socket<'a> {
    tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx))
}

#[test]
fn two_netfronts_carry_a_one_mib_tcp_stream() {
    let mut client = Host::new([0, 0x16, 0x3e, 0, 0, 1], [10, 0, 0, 1]);
    let mut server = Host::new([0, 0x16, 0x3e, 0, 0, 2], [10, 0, 0, 2]);
    let (mut buffers, mut storage) = (
        vec![vec![0u8; 64 * 1024]; 4],
        [SocketStorage::EMPTY, SocketStorage::EMPTY],
    );
    let [c_rx, c_tx, s_rx, s_tx] = &mut buffers[..] else {
        unreachable!()
    };
    let [c_storage, s_storage] = &mut storage;
    let mut client_sockets = SocketSet::new(core::slice::from_mut(c_storage));
    let mut server_sockets = SocketSet::new(core::slice::from_mut(s_storage));
    let client_handle: SocketHandle = client_sockets.add(tcp_socket(c_rx, c_tx));
    let server_handle: SocketHandle = server_sockets.add(tcp_socket(s_rx, s_tx));
    server_sockets
        .get_mut::<tcp::Socket>(server_handle)
        .listen(PORT)
        .unwrap();
    client_sockets
        .get_mut::<tcp::Socket>(client_handle)
        .connect(
            client.iface.context(),
            (IpAddress::v4(10, 0, 0, 2), PORT),
            49152,
        )
        .unwrap();

    let (mut sent, mut received) = (0usize, 0usize);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut millis = 0;
    while received < STREAM_BYTES {
        millis += 1;
        assert!(millis < 200_000, "stalled at {received} bytes");
        let now = Instant::from_millis(millis);
        client.poll(now, &mut client_sockets);
        let socket = client_sockets.get_mut::<tcp::Socket>(client_handle);
        if socket.can_send() && sent < STREAM_BYTES {
            sent += socket
                .send(|room| {
                    let n = room.len().min(STREAM_BYTES - sent);
                    for (i, b) in room[..n].iter_mut().enumerate() {
                        *b = stream_byte(sent + i);
                    }
                    (n, n)
                })
                .unwrap();
        }
        client.poll(now, &mut client_sockets);
        switch(&mut client, &mut server);
        server.poll(now, &mut server_sockets);
        let socket = server_sockets.get_mut::<tcp::Socket>(server_handle);
        while socket.can_recv() {
            let n = socket.recv_slice(&mut chunk).unwrap();
            for (i, b) in chunk[..n].iter().enumerate() {
                assert_eq!(*b, stream_byte(received + i), "byte {}", received + i);
            }
            received += n;
        }
        server.poll(now, &mut server_sockets);
        switch(&mut client, &mut server);
    }
    assert_eq!(received, STREAM_BYTES);

    // Let the last ACKs cross, then nothing may move any more.
    for _ in 0..100 {
        millis += 1;
        let now = Instant::from_millis(millis);
        client.poll(now, &mut client_sockets);
        server.poll(now, &mut server_sockets);
        switch(&mut client, &mut server);
    }
    let kicks = (
        client.vif.netback.notifications_from_frontend(),
        server.vif.netback.notifications_from_frontend(),
    );
    for _ in 0..50 {
        millis += 1;
        let now = Instant::from_millis(millis);
        assert_eq!(client.poll(now, &mut client_sockets), PollResult::None);
        assert_eq!(server.poll(now, &mut server_sockets), PollResult::None);
        assert_eq!(
            switch(&mut client, &mut server),
            0,
            "an idle stream sends nothing"
        );
        assert!(client.vif.netfront.receive(now).is_none());
    }
    assert_eq!(
        (
            client.vif.netback.notifications_from_frontend(),
            server.vif.netback.notifications_from_frontend(),
        ),
        kicks,
        "idle devices do not kick their backends"
    );
    for host in [&client, &server] {
        let stats = host.vif.netfront.statistics();
        assert_eq!(
            (stats.rx_dropped, stats.tx_dropped, stats.bad_responses),
            (0, 0, 0),
            "{stats:?}"
        );
        assert_eq!(host.vif.hal.pages_allocated(), 2 + 128 + 64);
    }
    let frames = client.vif.netfront.statistics().tx_frames;
    assert!(
        frames as usize >= STREAM_BYTES / 1460,
        "{frames} frames for 1 MiB"
    );
}

#[test]
fn an_idle_device_yields_no_tokens_and_sends_nothing() {
    let mut host = Host::new([0, 0x16, 0x3e, 0, 0, 3], [10, 0, 0, 3]);
    let mut storage = [SocketStorage::EMPTY];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let (mut rx, mut tx) = (vec![0u8; 1024], vec![0u8; 1024]);
    let handle = sockets.add(tcp_socket(&mut rx, &mut tx));
    sockets.get_mut::<tcp::Socket>(handle).listen(PORT).unwrap();
    let kicks = host.vif.netback.notifications_from_frontend();
    let wakeups = host.vif.hal.notifications_to_frontend();
    for millis in 0..1000 {
        let now = Instant::from_millis(millis);
        assert_eq!(host.poll(now, &mut sockets), PollResult::None);
        assert!(host.vif.netfront.receive(now).is_none());
        host.vif.netback.step(host.vif.xs.channel_mut());
    }
    assert!(host.vif.netback.transmitted.is_empty());
    assert_eq!(host.vif.netback.notifications_from_frontend(), kicks);
    assert_eq!(host.vif.hal.notifications_to_frontend(), wakeups);
    assert!(!host.vif.netfront.has_pending_rx());
    // Armed: the first frame that comes wakes us.
    host.vif.netback.deliver(&super::frame(0, 60));
    host.vif.netback.step(host.vif.xs.channel_mut());
    assert_eq!(host.vif.hal.notifications_to_frontend(), wakeups + 1);
    let _: Vec<u8> = Vec::new();
}

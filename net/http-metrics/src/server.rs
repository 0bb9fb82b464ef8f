//! The endpoint's TCP side: [`CONNECTIONS`] smoltcp sockets listening on
//! port 80, each taking one request head (at most
//! [`REQUEST_HEAD_MAX`] bytes), sending one response and closing.
//! Memory is bounded (fixed socket buffers, one head and one response
//! per connection) and so is time: a connection that has not sent its
//! head within [`HEAD_DEADLINE`], or not taken its whole response within
//! [`CONNECTION_DEADLINE`], is aborted and its socket listens again.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::time::{Duration, Instant};

use crate::render::{Metrics, answer};
use crate::request::{BadRequest, REQUEST_HEAD_MAX, head_end, parse_request};

/// The TCP port served.
pub const HTTP_PORT: u16 = 80;
/// Connections served at once; more wait in the peer's SYN retries.
pub const CONNECTIONS: usize = 4;
/// Each socket's receive buffer (a request head, no body).
const SOCKET_RX_BYTES: usize = REQUEST_HEAD_MAX;
/// Each socket's send buffer; a larger response goes out in parts.
const SOCKET_TX_BYTES: usize = 8 * 1024;
/// From the connection to the end of the request head.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// From the connection to the last byte of the response taken.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(15);

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Listening (or in the handshake).
    Idle,
    /// Connected at this time, reading the head.
    Reading(Instant),
    /// Sending the response (connected at this time).
    Writing(Instant),
    /// Response sent and FIN queued: waiting for the close to finish.
    Closing(Instant),
}

struct Connection {
    socket: SocketHandle,
    phase: Phase,
    head: Vec<u8>,
    response: Vec<u8>,
    sent: usize,
}

/// What one [`MetricsServer::poll`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Responses queued.
    pub answered: usize,
    /// Connections aborted (deadline passed, or reset by the peer).
    pub aborted: usize,
    /// Something moved (bytes taken or queued, a phase changed).
    pub busy: bool,
}

/// The metrics endpoint's connections.
pub struct MetricsServer {
    connections: Vec<Connection>,
}

impl MetricsServer {
    /// Adds [`CONNECTIONS`] sockets to `sockets`, each listening on
    /// [`HTTP_PORT`].
    pub fn new(sockets: &mut SocketSet<'_>) -> MetricsServer {
        let connections = (0..CONNECTIONS)
            .map(|_| {
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; SOCKET_RX_BYTES]),
                    tcp::SocketBuffer::new(vec![0; SOCKET_TX_BYTES]),
                );
                // A peer that stops answering is dropped by smoltcp too.
                socket.set_timeout(Some(CONNECTION_DEADLINE));
                let _ = socket.listen(HTTP_PORT);
                Connection {
                    socket: sockets.add(socket),
                    phase: Phase::Idle,
                    head: Vec::new(),
                    response: Vec::new(),
                    sent: 0,
                }
            })
            .collect();
        MetricsServer { connections }
    }

    /// Moves every connection on: takes request bytes, answers complete
    /// heads (gathering `metrics` only for a path that shows them),
    /// queues response bytes, closes, aborts what overstays, and listens
    /// again. Bounded: one head and a socket's worth of response per
    /// connection per call.
    pub fn poll(
        &mut self,
        sockets: &mut SocketSet<'_>,
        now: Instant,
        mut metrics: impl FnMut() -> Metrics,
    ) -> Served {
        let mut served = Served::default();
        for connection in &mut self.connections {
            let socket = sockets.get_mut::<tcp::Socket>(connection.socket);
            connection.step(socket, now, &mut metrics, &mut served);
        }
        served
    }

    /// Connections not listening (reading, writing or closing).
    pub fn open_connections(&self) -> usize {
        self.connections
            .iter()
            .filter(|c| c.phase != Phase::Idle)
            .count()
    }
}

impl Connection {
    fn step(
        &mut self,
        socket: &mut tcp::Socket<'_>,
        now: Instant,
        metrics: &mut impl FnMut() -> Metrics,
        served: &mut Served,
    ) {
        match (self.phase, socket.state()) {
            (Phase::Idle, State::Listen | State::SynReceived) => {}
            (Phase::Idle, State::Established | State::CloseWait) => {
                self.phase = Phase::Reading(now);
                served.busy = true;
                self.read(socket, now, metrics, served);
            }
            // A handshake that failed, or a socket left closed.
            (Phase::Idle, _) => self.listen_again(socket, served),
            (Phase::Reading(_), State::Established | State::CloseWait) => {
                self.read(socket, now, metrics, served);
            }
            (Phase::Writing(since), State::Established | State::CloseWait) => {
                if now >= since + CONNECTION_DEADLINE {
                    return self.abort(socket, served);
                }
                self.write(socket, served);
            }
            (Phase::Closing(_), State::TimeWait | State::Closed) => {
                self.listen_again(socket, served);
            }
            (Phase::Closing(since), _) => {
                if now >= since + CONNECTION_DEADLINE {
                    self.abort(socket, served);
                }
            }
            // The peer reset or closed before its answer was taken.
            (Phase::Reading(_) | Phase::Writing(_), _) => self.abort(socket, served),
        }
    }

    fn read(
        &mut self,
        socket: &mut tcp::Socket<'_>,
        now: Instant,
        metrics: &mut impl FnMut() -> Metrics,
        served: &mut Served,
    ) {
        let Phase::Reading(since) = self.phase else {
            return;
        };
        let mut chunk = [0u8; 256];
        while socket.can_recv() && self.head.len() < REQUEST_HEAD_MAX {
            let room = (REQUEST_HEAD_MAX - self.head.len()).min(chunk.len());
            match socket.recv_slice(&mut chunk[..room]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.head.extend_from_slice(&chunk[..n]);
                    served.busy = true;
                }
            }
        }
        let request = match head_end(&self.head) {
            Some(end) => parse_request(&self.head[..end]),
            None if self.head.len() >= REQUEST_HEAD_MAX => Err(BadRequest::TooLong),
            // The peer finished sending without ending its head.
            None if !socket.may_recv() => Err(BadRequest::Malformed),
            None if now >= since + HEAD_DEADLINE => return self.abort(socket, served),
            None => return,
        };
        self.response = answer(request, &mut *metrics);
        self.head = Vec::new();
        self.sent = 0;
        self.phase = Phase::Writing(since);
        served.answered += 1;
        served.busy = true;
        self.write(socket, served);
    }

    fn write(&mut self, socket: &mut tcp::Socket<'_>, served: &mut Served) {
        let Phase::Writing(since) = self.phase else {
            return;
        };
        if let Ok(n) = socket.send_slice(&self.response[self.sent..])
            && n > 0
        {
            self.sent += n;
            served.busy = true;
        }
        if self.sent == self.response.len() {
            self.response = Vec::new();
            socket.close();
            self.phase = Phase::Closing(since);
            served.busy = true;
        }
    }

    fn abort(&mut self, socket: &mut tcp::Socket<'_>, served: &mut Served) {
        socket.abort();
        served.aborted += 1;
        self.listen_again(socket, served);
    }

    /// Forgets the connection and listens again (from TIME-WAIT too: the
    /// peer has everything, and a socket must not sit out CLOSE_DELAY).
    fn listen_again(&mut self, socket: &mut tcp::Socket<'_>, served: &mut Served) {
        self.head = Vec::new();
        self.response = Vec::new();
        self.sent = 0;
        self.phase = Phase::Idle;
        served.busy = true;
        if socket.is_open() {
            socket.abort();
        }
        let _ = socket.listen(HTTP_PORT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::sample_metrics;
    use alloc::string::String;
    use smoltcp::iface::{Config, Interface};
    use smoltcp::phy::{Loopback, Medium};
    use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};

    struct Net {
        device: Loopback,
        iface: Interface,
        sockets: SocketSet<'static>,
        server: MetricsServer,
        now: Instant,
    }

    impl Net {
        fn new() -> Net {
            let mut device = Loopback::new(Medium::Ethernet);
            let config = Config::new(EthernetAddress([2, 0, 0, 0, 0, 1]).into());
            let mut iface = Interface::new(config, &mut device, Instant::ZERO);
            iface.update_ip_addrs(|a| {
                a.push(IpCidr::new(IpAddress::v4(127, 0, 0, 1), 8)).unwrap();
            });
            let mut sockets = SocketSet::new(Vec::new());
            let server = MetricsServer::new(&mut sockets);
            Net {
                device,
                iface,
                sockets,
                server,
                now: Instant::ZERO,
            }
        }

        fn client(&mut self, local_port: u16) -> SocketHandle {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 4096]),
                tcp::SocketBuffer::new(vec![0; 64 * 1024]),
            );
            socket
                .connect(
                    self.iface.context(),
                    (IpAddress::v4(127, 0, 0, 1), HTTP_PORT),
                    local_port,
                )
                .unwrap();
            self.sockets.add(socket)
        }

        /// Runs the stack and the server for `steps` 10 ms steps,
        /// collecting what the client `handle` receives.
        fn run(&mut self, steps: usize, handle: Option<SocketHandle>, got: &mut Vec<u8>) -> Served {
            let mut total = Served::default();
            for _ in 0..steps {
                self.now += Duration::from_millis(10);
                self.iface
                    .poll(self.now, &mut self.device, &mut self.sockets);
                let served = self
                    .server
                    .poll(&mut self.sockets, self.now, sample_metrics);
                total.answered += served.answered;
                total.aborted += served.aborted;
                if let Some(handle) = handle {
                    let client = self.sockets.get_mut::<tcp::Socket>(handle);
                    while client.can_recv() {
                        let mut buf = [0u8; 1024];
                        let n = client.recv_slice(&mut buf).unwrap();
                        got.extend_from_slice(&buf[..n]);
                    }
                    if !client.may_recv() && client.state() == State::CloseWait {
                        client.close();
                    }
                }
            }
            total
        }

        fn send(&mut self, handle: SocketHandle, bytes: &[u8]) {
            let mut got = Vec::new();
            for _ in 0..50 {
                if self.sockets.get::<tcp::Socket>(handle).may_send() {
                    break;
                }
                self.run(1, Some(handle), &mut got);
            }
            let client = self.sockets.get_mut::<tcp::Socket>(handle);
            assert_eq!(client.send_slice(bytes), Ok(bytes.len()));
        }
    }

    fn get(net: &mut Net, port: u16, head: &[u8]) -> String {
        let client = net.client(port);
        net.send(client, head);
        let mut got = Vec::new();
        net.run(200, Some(client), &mut got);
        String::from_utf8(got).unwrap()
    }

    #[test]
    fn serves_metrics_vbds_and_404_then_listens_again() {
        let mut net = Net::new();
        let metrics = get(&mut net, 40000, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(metrics.starts_with("HTTP/1.0 200 OK\r\n"), "{metrics}");
        assert!(
            metrics.contains("stordom_vbd_read_bytes_total{frontend=\"3\",devid=\"51712\"} 40960")
        );
        let vbds = get(&mut net, 40001, b"GET /vbds HTTP/1.0\r\n\r\n");
        assert!(vbds.contains("\"target\": \"ram:256M\""), "{vbds}");
        let missing = get(&mut net, 40002, b"GET /nonexistent HTTP/1.0\r\n\r\n");
        assert!(missing.starts_with("HTTP/1.0 404 Not Found"), "{missing}");
        // More requests than sockets, one after another: each socket is
        // used again without sitting out TIME-WAIT.
        for port in 40010..40020 {
            let again = get(&mut net, port, b"GET /metrics HTTP/1.0\r\n\r\n");
            assert!(again.starts_with("HTTP/1.0 200 OK"), "{again}");
        }
        net.run(10, None, &mut Vec::new());
        assert_eq!(net.server.open_connections(), 0);
    }

    #[test]
    fn a_silent_peer_is_dropped_at_the_head_deadline() {
        let mut net = Net::new();
        let client = net.client(40100);
        net.send(client, b"GET /metr");
        let mut got = Vec::new();
        let early = net.run(100, Some(client), &mut got);
        assert_eq!(early.aborted, 0);
        assert_eq!(net.server.open_connections(), 1);
        let late = net.run(500, Some(client), &mut got);
        assert_eq!((late.aborted, late.answered), (1, 0));
        assert!(got.is_empty());
        assert_eq!(net.server.open_connections(), 0);
    }

    #[test]
    fn a_head_too_long_is_answered_431() {
        let mut net = Net::new();
        let mut head = Vec::from(&b"GET /"[..]);
        head.resize(REQUEST_HEAD_MAX + 200, b'a');
        let answer = get(&mut net, 40200, &head);
        assert!(
            answer.starts_with("HTTP/1.0 431 Request Header Fields Too Large"),
            "{answer}"
        );
    }

    #[test]
    fn a_peer_that_closes_without_a_head_gets_400() {
        let mut net = Net::new();
        let client = net.client(40300);
        net.send(client, b"GET / HTTP/1.0\r\n");
        net.sockets.get_mut::<tcp::Socket>(client).close();
        let mut got = Vec::new();
        net.run(200, Some(client), &mut got);
        let got = String::from_utf8(got).unwrap();
        assert!(got.starts_with("HTTP/1.0 400 Bad Request"), "{got}");
    }
}

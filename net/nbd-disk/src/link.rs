//! The link: one NBD client, the connection's state machine around it,
//! and the request slots whose segments its payloads move through.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::net::SocketAddrV4;

use blockdev::{Completion, Geometry, IoError, Request, Segment, SubmitError};
use nbd_client::{
    NbdClient, NbdCommand, NbdConfig, NbdConnectionError, NbdExport, NbdLinkState, NbdOrder,
    NbdPayload, NbdRequestError, NbdServerError, NbdSubmitError,
};

use crate::{
    ATTEMPT_TIMEOUT_NS, BACKOFF_FIRST_NS, BACKOFF_MAX_NS, NbdHost, NbdTransport, OPEN_TIMEOUT_NS,
    REQUEST_TIMEOUT_NS, STALL_TIMEOUT_NS,
};

/// The largest physical block size advertised (a server's preferred size
/// may be far larger than anything a guest's I/O scheduler can use).
const MAX_PHYSICAL_BLOCK: u32 = 64 * 1024;
/// Transmit and receive passes per pump: a ring buffer offers its free or
/// filled space in at most two pieces.
const PASSES: usize = 2;

/// What a link is made with.
#[derive(Clone, Debug)]
pub struct NbdLinkConfig {
    /// The server (for the log; the transport knows where to connect).
    pub server: SocketAddrV4,
    /// The export (empty: the server's default).
    pub export_name: String,
    /// Requests in flight at once (the device's queue depth).
    pub queue_depth: u16,
    /// Most segments of one read or write.
    pub max_segments: u16,
    /// Most bytes of one read or write (the server's maximum lowers it).
    pub max_transfer_bytes: u32,
}

/// Where the caller's connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportState {
    /// None, or ended (reset, or closed by the server).
    Closed,
    /// Being set up.
    Connecting,
    /// Bytes flow both ways.
    Established,
}

/// Why a connection (or an attempt at one) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// The transport could not start a connection.
    CannotConnect,
    /// Refused or reset while connecting.
    Refused,
    /// No connection within [`ATTEMPT_TIMEOUT_NS`].
    ConnectTimeout,
    /// Connected, but no finished handshake within [`ATTEMPT_TIMEOUT_NS`].
    HandshakeTimeout,
    /// Closed or reset by the server.
    Closed,
    /// Replies awaited and nothing received for [`STALL_TIMEOUT_NS`].
    Stalled,
    /// The server broke the protocol or refused the export.
    Protocol(NbdConnectionError),
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossReason::CannotConnect => f.write_str("the connection could not be started"),
            LossReason::Refused => f.write_str("refused or reset while connecting"),
            LossReason::ConnectTimeout => write!(
                f,
                "no connection within {} s",
                ATTEMPT_TIMEOUT_NS / 1_000_000_000
            ),
            LossReason::HandshakeTimeout => write!(
                f,
                "no handshake within {} s",
                ATTEMPT_TIMEOUT_NS / 1_000_000_000
            ),
            LossReason::Closed => f.write_str("closed or reset by the server"),
            LossReason::Stalled => write!(f, "no reply for {} s", STALL_TIMEOUT_NS / 1_000_000_000),
            LossReason::Protocol(error) => write!(f, "protocol: {error:?}"),
        }
    }
}

/// Something worth a log line, from [`NbdLink::pump`]; shown with
/// [`NbdLink::describe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The first handshake finished: the export is known.
    Connected(NbdExport),
    /// A later handshake finished; `replayed` requests go out again.
    Reconnected { replayed: usize },
    /// An attempt before the first connection failed.
    AttemptFailed {
        reason: LossReason,
        retry_in_ns: u64,
    },
    /// A served connection ended.
    Lost {
        reason: LossReason,
        retry_in_ns: u64,
    },
    /// The export cannot be served any more (its size changed): every
    /// request failed, and the device takes no more.
    Failed(LossReason),
}

/// Where opening the export stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpeningStatus {
    /// The export is known: [`crate::NbdDevice::new`] makes its device.
    Ready,
    /// Still trying.
    Connecting,
    /// Given up: the server spoke but would not serve the export, or no
    /// connection came within [`OPEN_TIMEOUT_NS`] (the last reason).
    Failed(LossReason),
}

/// What one [`NbdLink::pump`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkPump {
    /// Bytes or the connection moved: pump again soon.
    pub moved: bool,
    /// The latest clock reading by which the link wants another pump.
    pub wake_at_ns: Option<u64>,
    /// Something to log.
    pub event: Option<LinkEvent>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No connection; the next attempt at `until`.
    Waiting {
        until: u64,
    },
    Connecting {
        since: u64,
    },
    Handshaking {
        since: u64,
    },
    Serving,
    Failed,
}

/// One request's memory while it is in flight.
struct RequestSlot {
    /// The submitter's tag; `None` when free.
    tag: Option<u64>,
    /// Its segments, copied at submission (capacity fixed at creation).
    segments: Vec<Segment>,
    /// The segment the last payload piece touched, and the request offset
    /// it starts at: pieces mostly come in order.
    cursor: (usize, u64),
}

/// The request slots as [`NbdPayload`]: the client's tag is a slot index.
struct SlotMemory<'a, H: NbdHost> {
    slots: &'a mut [RequestSlot],
    host: &'a H,
}

impl<H: NbdHost> SlotMemory<'_, H> {
    /// Calls `copy(memory, done, n)` for each piece of request `tag`'s
    /// bytes `at..at + len` that lies in one segment: `n` bytes at
    /// `memory`, the `done`th to the `done + n`th of the range.
    fn for_each_piece(
        &mut self,
        tag: u64,
        at: u32,
        len: usize,
        mut copy: impl FnMut(*mut u8, usize, usize),
    ) {
        let Some(slot) = self.slots.get_mut(tag as usize) else {
            return;
        };
        let (mut index, mut start) = slot.cursor;
        if u64::from(at) < start {
            (index, start) = (0, 0);
        }
        let mut done = 0;
        while done < len {
            let Some(segment) = slot.segments.get(index) else {
                return;
            };
            let end = start + u64::from(segment.len);
            let position = u64::from(at) + done as u64;
            if position >= end {
                (index, start) = (index + 1, end);
                continue;
            }
            let n = ((end - position) as usize).min(len - done);
            let phys = segment.phys + (position - start);
            // Checked at submission; a host that forgot meanwhile loses the piece.
            if let Some(memory) = self.host.segment(phys, n as u32) {
                copy(memory.as_ptr(), done, n);
            }
            done += n;
            slot.cursor = (index, start);
        }
    }
}

impl<H: NbdHost> NbdPayload for SlotMemory<'_, H> {
    fn write_payload(&mut self, tag: u64, at: u32, out: &mut [u8]) {
        let len = out.len();
        self.for_each_piece(tag, at, len, |memory, done, n| {
            // SAFETY: the host vouched for `n` bytes at `memory` while the
            // request is in flight (the client asks only for requests in
            // flight); `done + n <= out.len()`; guest memory is not `out`.
            unsafe { core::ptr::copy_nonoverlapping(memory, out[done..].as_mut_ptr(), n) };
        });
    }

    fn read_payload(&mut self, tag: u64, at: u32, bytes: &[u8]) {
        self.for_each_piece(tag, at, bytes.len(), |memory, done, n| {
            // SAFETY: as in `write_payload`, the other way.
            unsafe { core::ptr::copy_nonoverlapping(bytes[done..].as_ptr(), memory, n) };
        });
    }

    fn read_zeroes(&mut self, tag: u64, at: u32, len: u32) {
        self.for_each_piece(tag, at, len as usize, |memory, _, n| {
            // SAFETY: the host vouched for `n` bytes at `memory` while the
            // request is in flight.
            unsafe { memory.write_bytes(0, n) };
        });
    }
}

/// One NBD export's connection and requests (see the crate documentation).
pub struct NbdLink<H: NbdHost> {
    config: NbdLinkConfig,
    client: NbdClient,
    host: H,
    slots: Vec<RequestSlot>,
    phase: Phase,
    /// The wait after the next failed attempt.
    backoff_ns: u64,
    created_ns: u64,
    /// Since when nothing was received while replies were awaited.
    quiet_since: u64,
    ever_connected: bool,
    last_loss: Option<LossReason>,
    reconnects: u64,
}

impl<H: NbdHost> NbdLink<H> {
    /// A link with everything allocated, its first attempt due at once;
    /// `None` for a configuration the client refuses (no queue depth, an
    /// export name over 4096 bytes) or no memory for the segment lists.
    pub fn new(config: NbdLinkConfig, host: H) -> Option<Self> {
        let client = NbdClient::new(NbdConfig {
            export_name: config.export_name.as_bytes().to_vec(),
            max_in_flight: usize::from(config.queue_depth),
            max_payload: config.max_transfer_bytes,
            request_timeout: REQUEST_TIMEOUT_NS,
            structured_replies: true,
        })?;
        let mut slots = Vec::new();
        slots
            .try_reserve_exact(usize::from(config.queue_depth))
            .ok()?;
        for _ in 0..config.queue_depth {
            let mut segments = Vec::new();
            segments
                .try_reserve_exact(usize::from(config.max_segments))
                .ok()?;
            slots.push(RequestSlot {
                tag: None,
                segments,
                cursor: (0, 0),
            });
        }
        let now = host.now_ns();
        Some(NbdLink {
            config,
            client,
            host,
            slots,
            phase: Phase::Waiting { until: now },
            backoff_ns: BACKOFF_FIRST_NS,
            created_ns: now,
            quiet_since: now,
            ever_connected: false,
            last_loss: None,
            reconnects: 0,
        })
    }

    /// The export, once a handshake has finished.
    pub fn export(&self) -> Option<&NbdExport> {
        self.client.export()
    }

    /// Connections made after the first.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.iter().filter(|slot| slot.tag.is_some()).count()
    }

    /// Where opening stands (see [`OpeningStatus`]).
    pub fn opening_status(&self) -> OpeningStatus {
        if self.phase == Phase::Failed {
            return OpeningStatus::Failed(self.last_loss.unwrap_or(LossReason::Closed));
        }
        if self.ever_connected {
            return OpeningStatus::Ready;
        }
        match self.last_loss {
            Some(reason @ LossReason::Protocol(_)) => OpeningStatus::Failed(reason),
            last if self.host.now_ns() >= self.created_ns + OPEN_TIMEOUT_NS => {
                OpeningStatus::Failed(last.unwrap_or(LossReason::ConnectTimeout))
            }
            _ => OpeningStatus::Connecting,
        }
    }

    /// The device's shape, once the export is known: its size and block
    /// size (`NBD_INFO_BLOCK_SIZE`'s minimum, 512 without one or below),
    /// its flags (flush: a volatile cache; trim: discard; write-zeroes)
    /// and this link's limits.
    pub fn geometry(&self) -> Option<Geometry> {
        let export = self.client.export()?;
        let block = export.block_size.map_or(512, |b| b.minimum.max(512));
        let physical = export.block_size.map_or(block, |b| {
            b.preferred.clamp(block, MAX_PHYSICAL_BLOCK.max(block))
        });
        let server_max = export.block_size.map_or(u32::MAX, |b| b.maximum);
        // NBD lengths are 32-bit: the most blocks one trim or write-zeroes covers.
        let max_ranged = u64::from(u32::MAX / block);
        Some(Geometry {
            logical_block_size: block,
            physical_block_size: physical,
            blocks: export.size / u64::from(block),
            volatile_write_cache: export.can_flush(),
            discard_granularity: export.can_trim().then_some(1),
            max_discard_blocks: if export.can_trim() { max_ranged } else { 0 },
            max_write_zeroes_blocks: if export.can_write_zeroes() {
                max_ranged
            } else {
                0
            },
            max_transfer_bytes: self.config.max_transfer_bytes.min(server_max) / block * block,
            max_segments: self.config.max_segments,
            queues: 1,
            queue_depth: self.config.queue_depth,
        })
    }

    /// Moves the connection on: starts an attempt when its backoff is
    /// over, moves bytes both ways (at most [`PASSES`] pieces each way
    /// through the transport's buffers), notices a connection ended, an
    /// attempt or a connection overstaying, and fails requests past their
    /// deadline.
    pub fn pump(&mut self, transport: &mut impl NbdTransport) -> LinkPump {
        let now = self.host.now_ns();
        self.client.expire(now);
        let mut pump = LinkPump::default();
        match self.phase {
            Phase::Failed => {}
            Phase::Waiting { until } if now < until => pump.wake_at_ns = Some(until),
            Phase::Waiting { .. } => {
                pump.moved = true;
                if transport.connect() {
                    self.phase = Phase::Connecting { since: now };
                    pump.wake_at_ns = Some(now + ATTEMPT_TIMEOUT_NS);
                } else {
                    pump.event = Some(self.lose(transport, now, LossReason::CannotConnect));
                }
            }
            Phase::Connecting { since } => match transport.state() {
                TransportState::Connecting if now >= since + ATTEMPT_TIMEOUT_NS => {
                    pump.event = Some(self.lose(transport, now, LossReason::ConnectTimeout));
                }
                TransportState::Connecting => pump.wake_at_ns = Some(since + ATTEMPT_TIMEOUT_NS),
                TransportState::Closed => {
                    pump.event = Some(self.lose(transport, now, LossReason::Refused));
                }
                TransportState::Established => {
                    self.client.connection_started();
                    self.phase = Phase::Handshaking { since };
                    self.exchange(transport, now, &mut pump);
                }
            },
            Phase::Handshaking { .. } | Phase::Serving => self.exchange(transport, now, &mut pump),
        }
        pump.moved |= pump.event.is_some();
        pump
    }

    /// Moves bytes on an established connection and acts on what came.
    fn exchange(&mut self, transport: &mut impl NbdTransport, now: u64, pump: &mut LinkPump) {
        let received = match self.move_bytes(transport, &mut pump.moved) {
            Ok(received) => received,
            Err(error) => {
                pump.event = Some(self.lose(transport, now, LossReason::Protocol(error)));
                return;
            }
        };
        if received > 0 || self.client.pending() == 0 {
            self.quiet_since = now;
        }
        let established = transport.state() == TransportState::Established;
        match self.phase {
            Phase::Handshaking { .. } if self.client.link_state() == NbdLinkState::Ready => {
                self.phase = Phase::Serving;
                self.backoff_ns = BACKOFF_FIRST_NS;
                self.quiet_since = now;
                let event = match (self.ever_connected, self.client.export()) {
                    (false, Some(export)) => LinkEvent::Connected(*export),
                    _ => {
                        self.reconnects += 1;
                        LinkEvent::Reconnected {
                            replayed: self.client.pending(),
                        }
                    }
                };
                self.ever_connected = true;
                pump.event = Some(event);
            }
            _ if !established => pump.event = Some(self.lose(transport, now, LossReason::Closed)),
            Phase::Handshaking { since } if now >= since + ATTEMPT_TIMEOUT_NS => {
                pump.event = Some(self.lose(transport, now, LossReason::HandshakeTimeout));
            }
            Phase::Handshaking { since } => pump.wake_at_ns = Some(since + ATTEMPT_TIMEOUT_NS),
            Phase::Serving if self.client.pending() > 0 => {
                if now >= self.quiet_since + STALL_TIMEOUT_NS {
                    pump.event = Some(self.lose(transport, now, LossReason::Stalled));
                } else {
                    pump.wake_at_ns = Some(self.quiet_since + STALL_TIMEOUT_NS);
                }
            }
            _ => {}
        }
    }

    /// Transmits what the client has, receives what the server sent, and
    /// transmits what the replies let go; returns the bytes received.
    fn move_bytes(
        &mut self,
        transport: &mut impl NbdTransport,
        moved: &mut bool,
    ) -> Result<usize, NbdConnectionError> {
        let client = &mut self.client;
        let mut memory = SlotMemory {
            slots: &mut self.slots,
            host: &self.host,
        };
        *moved |= transmit(client, transport, &mut memory);
        let mut received = 0;
        for _ in 0..PASSES {
            let mut result = Ok(());
            let n = transport.receive(|bytes| result = client.receive(bytes, &mut memory));
            result?;
            if n == 0 {
                break;
            }
            received += n;
        }
        *moved |= received > 0;
        *moved |= transmit(client, transport, &mut memory);
        Ok(received)
    }

    /// Ends the connection; the next attempt after the backoff, which
    /// doubles (up to [`BACKOFF_MAX_NS`]). A client that failed (the
    /// export changed) makes the link fail instead.
    fn lose(
        &mut self,
        transport: &mut impl NbdTransport,
        now: u64,
        reason: LossReason,
    ) -> LinkEvent {
        transport.abort();
        self.client.connection_lost();
        self.last_loss = Some(reason);
        if self.client.link_state() == NbdLinkState::Failed {
            self.phase = Phase::Failed;
            return LinkEvent::Failed(reason);
        }
        let wait = self.backoff_ns;
        self.backoff_ns = (wait * 2).min(BACKOFF_MAX_NS);
        self.phase = Phase::Waiting { until: now + wait };
        match self.ever_connected {
            true => LinkEvent::Lost {
                reason,
                retry_in_ns: wait,
            },
            false => LinkEvent::AttemptFailed {
                reason,
                retry_in_ns: wait,
            },
        }
    }

    /// Queues `request` (already checked against [`Self::geometry`]) under
    /// `tag`; its segments are copied into a free slot.
    pub(crate) fn submit(&mut self, tag: u64, request: Request<'_>) -> Result<(), SubmitError> {
        let block = u64::from(
            self.geometry()
                .ok_or(SubmitError::DeviceFailed)?
                .logical_block_size,
        );
        let offset_of = |lba: u64| lba.checked_mul(block).ok_or(SubmitError::OutOfRange);
        let length_of = |blocks: u64| {
            blocks
                .checked_mul(block)
                .and_then(|bytes| u32::try_from(bytes).ok())
                .ok_or(SubmitError::TooLarge)
        };
        let data_length = |segments: &[Segment]| {
            u32::try_from(segments.iter().map(|s| u64::from(s.len)).sum::<u64>())
                .map_err(|_| SubmitError::TooLarge)
        };
        let (command, segments) = match request {
            Request::Read { lba, segments } => {
                let (offset, len) = (offset_of(lba)?, data_length(segments)?);
                (NbdCommand::Read { offset, len }, segments)
            }
            Request::Write { lba, segments } => {
                let (offset, len) = (offset_of(lba)?, data_length(segments)?);
                let fua = false;
                (NbdCommand::Write { offset, len, fua }, segments)
            }
            Request::Flush => (NbdCommand::Flush, &[][..]),
            Request::Discard { lba, blocks } => {
                let (offset, len, fua) = (offset_of(lba)?, length_of(blocks)?, false);
                (NbdCommand::Trim { offset, len, fua }, &[][..])
            }
            Request::WriteZeroes { lba, blocks } => {
                let (offset, len, fua) = (offset_of(lba)?, length_of(blocks)?, false);
                (NbdCommand::WriteZeroes { offset, len, fua }, &[][..])
            }
        };
        if segments
            .iter()
            .any(|s| self.host.segment(s.phys, s.len).is_none())
        {
            return Err(SubmitError::BadAddress);
        }
        let index = self
            .slots
            .iter()
            .position(|slot| slot.tag.is_none())
            .ok_or(SubmitError::QueueFull)?;
        let slot = &mut self.slots[index];
        if segments.len() > slot.segments.capacity() {
            return Err(SubmitError::TooLarge);
        }
        let now = self.host.now_ns();
        self.client
            .submit(now, index as u64, command, NbdOrder::Free)
            .map_err(submit_error)?;
        slot.segments.clear();
        slot.segments.extend_from_slice(segments);
        slot.cursor = (0, 0);
        slot.tag = Some(tag);
        Ok(())
    }

    /// Moves finished requests into `out` (failing those past their
    /// deadline first); returns how many.
    pub(crate) fn poll(&mut self, out: &mut [Completion]) -> usize {
        self.client.expire(self.host.now_ns());
        let mut count = 0;
        while count < out.len() {
            let Some(done) = self.client.next_completion() else {
                break;
            };
            let slot = self.slots.get_mut(done.tag as usize);
            let Some(tag) = slot.and_then(|slot| slot.tag.take()) else {
                continue;
            };
            out[count] = Completion {
                tag,
                result: done.result.map_err(io_error),
            };
            count += 1;
        }
        count
    }

    /// A log line's text for `event` (the caller adds whose link it is).
    pub fn describe<'a>(&'a self, event: &'a LinkEvent) -> impl fmt::Display + 'a {
        EventText { link: self, event }
    }
}

struct EventText<'a, H: NbdHost> {
    link: &'a NbdLink<H>,
    event: &'a LinkEvent,
}

impl<H: NbdHost> fmt::Display for EventText<'_, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let server = self.link.config.server;
        match *self.event {
            LinkEvent::Connected(export) => {
                write!(
                    f,
                    "connected to {server} export {:?}: {} bytes, flags",
                    self.link.config.export_name, export.size
                )?;
                let flags = [
                    (export.read_only(), "read-only"),
                    (export.can_flush(), "flush"),
                    (export.can_fua(), "fua"),
                    (export.can_trim(), "trim"),
                    (export.can_write_zeroes(), "write-zeroes"),
                    (export.rotational(), "rotational"),
                    (export.can_multi_conn(), "multi-conn"),
                    (export.structured_replies, "structured-replies"),
                ];
                let mut any = false;
                for (_, name) in flags.iter().filter(|(set, _)| *set) {
                    write!(f, " {name}")?;
                    any = true;
                }
                if !any {
                    f.write_str(" none")?;
                }
                if let Some(b) = export.block_size {
                    write!(
                        f,
                        ", block sizes {}/{}/{}",
                        b.minimum, b.preferred, b.maximum
                    )?;
                }
                Ok(())
            }
            LinkEvent::Reconnected { replayed } => {
                write!(f, "reconnected; {replayed} requests replayed")
            }
            LinkEvent::AttemptFailed {
                reason,
                retry_in_ns,
            } => write!(
                f,
                "cannot connect to {server} ({reason}); retrying in {} ms",
                retry_in_ns / 1_000_000
            ),
            LinkEvent::Lost {
                reason,
                retry_in_ns,
            } => write!(
                f,
                "connection lost ({reason}); reconnecting in {} ms",
                retry_in_ns / 1_000_000
            ),
            LinkEvent::Failed(reason) => {
                write!(f, "export unusable ({reason}); every request fails")
            }
        }
    }
}

/// Gives the transport what the client has to send, in at most
/// [`PASSES`] pieces; whether anything went.
fn transmit<H: NbdHost>(
    client: &mut NbdClient,
    transport: &mut impl NbdTransport,
    memory: &mut SlotMemory<'_, H>,
) -> bool {
    let mut sent_any = false;
    for _ in 0..PASSES {
        if !client.wants_to_transmit() {
            break;
        }
        if transport.send(|out| client.transmit(out, memory)) == 0 {
            break;
        }
        sent_any = true;
    }
    sent_any
}

fn submit_error(error: NbdSubmitError) -> SubmitError {
    match error {
        NbdSubmitError::Full => SubmitError::QueueFull,
        NbdSubmitError::ReadOnly | NbdSubmitError::NotSupported => SubmitError::Unsupported,
        NbdSubmitError::OutOfRange => SubmitError::OutOfRange,
        NbdSubmitError::Misaligned => SubmitError::Misaligned,
        NbdSubmitError::BadLength => SubmitError::TooLarge,
        NbdSubmitError::NotConnected | NbdSubmitError::Closed => SubmitError::DeviceFailed,
    }
}

fn io_error(error: NbdRequestError) -> IoError {
    match error {
        NbdRequestError::TimedOut => IoError::Timeout,
        NbdRequestError::ExportSizeChanged | NbdRequestError::Server(NbdServerError::Io) => {
            IoError::Media
        }
        NbdRequestError::Server(NbdServerError::Invalid | NbdServerError::Overflow) => {
            IoError::InvalidRequest
        }
        NbdRequestError::Server(NbdServerError::NotSupported) => IoError::Unsupported,
        // The protocol's errno values, as the server sent them.
        NbdRequestError::Server(NbdServerError::NotPermitted) => IoError::Device { code: 1 },
        NbdRequestError::Server(NbdServerError::NoMemory) => IoError::Device { code: 12 },
        NbdRequestError::Server(NbdServerError::NoSpace) => IoError::Device { code: 28 },
        NbdRequestError::Server(NbdServerError::Other(code)) => IoError::Device { code },
    }
}

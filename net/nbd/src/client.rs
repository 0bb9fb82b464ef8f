//! The client: the handshake, the in-flight table, the reply parser and
//! the replay of unanswered requests after a reconnect.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::error::*;
use crate::wire::*;

/// What the client is configured with.
#[derive(Clone, Debug)]
pub struct NbdConfig {
    /// The export to ask for (at most 4096 bytes; empty means the default).
    pub export_name: Vec<u8>,
    /// How many requests may be in flight at once (1..=65536): the size of
    /// the preallocated table.
    pub max_in_flight: usize,
    /// The longest read or write payload the caller will ask for; the
    /// server's maximum block size lowers it.
    pub max_payload: u32,
    /// How long (in the caller's clock ticks) a request may wait for its
    /// reply, across reconnects, before it fails with
    /// [`NbdRequestError::TimedOut`].
    pub request_timeout: u64,
    /// Whether to ask for structured replies.
    pub structured_replies: bool,
}

/// What the server said about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NbdExport {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Block size constraints, if the server sent them.
    pub block_size: Option<NbdBlockSize>,
    /// Whether structured replies were negotiated.
    pub structured_replies: bool,
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum payload sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NbdBlockSize {
    /// Requests' offsets and lengths are multiples of this.
    pub minimum: u32,
    /// The size the server handles best.
    pub preferred: u32,
    /// The largest read or write payload.
    pub maximum: u32,
}

const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

impl NbdExport {
    /// Writes, trims and write-zeroes are refused.
    pub fn read_only(&self) -> bool {
        self.flags & NBD_FLAG_READ_ONLY != 0
    }
    /// The server has a volatile cache that `Flush` empties.
    pub fn can_flush(&self) -> bool {
        self.flags & NBD_FLAG_SEND_FLUSH != 0
    }
    /// Writes may carry forced unit access.
    pub fn can_fua(&self) -> bool {
        self.flags & NBD_FLAG_SEND_FUA != 0
    }
    /// The export behaves like a spinning disk.
    pub fn rotational(&self) -> bool {
        self.flags & NBD_FLAG_ROTATIONAL != 0
    }
    /// `Trim` is understood.
    pub fn can_trim(&self) -> bool {
        self.flags & NBD_FLAG_SEND_TRIM != 0
    }
    /// `WriteZeroes` is understood.
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & NBD_FLAG_SEND_WRITE_ZEROES != 0
    }
    /// Several connections to the export see one cache.
    pub fn can_multi_conn(&self) -> bool {
        self.flags & NBD_FLAG_CAN_MULTI_CONN != 0
    }
}

/// One request. Offsets and lengths are in bytes of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdCommand {
    /// Read `len` bytes at `offset` (delivered through [`NbdPayload`]).
    Read {
        /// First byte.
        offset: u64,
        /// How many.
        len: u32,
    },
    /// Write `len` bytes at `offset` (taken through [`NbdPayload`]).
    Write {
        /// First byte.
        offset: u64,
        /// How many.
        len: u32,
        /// Forced unit access: durable before the reply.
        fua: bool,
    },
    /// Make every write acknowledged so far durable. Sent only once every
    /// write-type request submitted before it has its reply (the protocol
    /// covers only writes the server has replied to); completed at once if
    /// the server has no volatile cache (no `NBD_FLAG_SEND_FLUSH`).
    Flush,
    /// Discard `len` bytes at `offset`.
    Trim {
        /// First byte.
        offset: u64,
        /// How many.
        len: u32,
        /// Forced unit access.
        fua: bool,
    },
    /// Make `len` bytes at `offset` read as zeroes.
    WriteZeroes {
        /// First byte.
        offset: u64,
        /// How many.
        len: u32,
        /// Forced unit access.
        fua: bool,
    },
}

impl NbdCommand {
    fn changes_data(&self) -> bool {
        !matches!(self, NbdCommand::Read { .. } | NbdCommand::Flush)
    }

    /// Wire type, flags, offset and length.
    fn wire_fields(&self) -> (u16, u16, u64, u32) {
        let fua_flag = |fua: bool| if fua { NBD_CMD_FLAG_FUA } else { 0 };
        match *self {
            NbdCommand::Read { offset, len } => (NBD_CMD_READ, 0, offset, len),
            NbdCommand::Write { offset, len, fua } => (NBD_CMD_WRITE, fua_flag(fua), offset, len),
            NbdCommand::Flush => (NBD_CMD_FLUSH, 0, 0, 0),
            NbdCommand::Trim { offset, len, fua } => (NBD_CMD_TRIM, fua_flag(fua), offset, len),
            NbdCommand::WriteZeroes { offset, len, fua } => {
                (NBD_CMD_WRITE_ZEROES, fua_flag(fua), offset, len)
            }
        }
    }
}

/// How a request is ordered against the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdOrder {
    /// Only the rule every `Flush` keeps (see [`NbdCommand::Flush`]).
    Free,
    /// A drain point (blkif's `WRITE_BARRIER`): sent only after every
    /// earlier request completed, and no later request is sent before it
    /// completes.
    Drain,
}

/// The caller's memory for request payloads. Write data is copied from it
/// straight into the transmit buffer and read data straight into it from
/// the received bytes, piece by piece as they come, so a request spread
/// over several pages (a blkif request's grant-mapped segments) is never
/// gathered into a buffer of the client's. `at` is the byte offset within
/// the request.
pub trait NbdPayload {
    /// Copies write request `tag`'s bytes `at..at + out.len()` into `out`.
    fn write_payload(&mut self, tag: u64, at: u32, out: &mut [u8]);
    /// Stores `bytes` as read request `tag`'s bytes from `at`.
    fn read_payload(&mut self, tag: u64, at: u32, bytes: &[u8]);
    /// Stores `len` zero bytes as read request `tag`'s bytes from `at` (a
    /// hole the server reported instead of sending zeroes).
    fn read_zeroes(&mut self, tag: u64, at: u32, len: u32);
}

/// A finished request: the caller's tag and how it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NbdCompletion {
    /// The tag the request was submitted with.
    pub tag: u64,
    /// Success, or why it failed.
    pub result: Result<(), NbdRequestError>,
}

/// Where the connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdLinkState {
    /// No connection: requests wait for one (or their deadline).
    Down,
    /// A connection is negotiating.
    Handshaking,
    /// Requests are being sent and answered.
    Ready,
    /// `NBD_CMD_DISC` has been sent: the caller closes the connection.
    Disconnected,
    /// The export changed; the client takes no more requests.
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotPhase {
    Free,
    /// Waiting to be sent (new, or to be replayed on the next connection).
    Queued,
    /// Its header or payload is partly in the transmit stream.
    Sending,
    AwaitingReply,
    /// Completed as timed out while the server may still answer: the slot
    /// stays reserved so the late reply is recognised and swallowed.
    TimedOutOnWire,
}

#[derive(Clone, Copy, Debug)]
struct InFlightSlot {
    phase: SlotPhase,
    tag: u64,
    command: NbdCommand,
    order: NbdOrder,
    /// Submission order, for flush and drain ordering and FIFO sending.
    sequence: u64,
    deadline: u64,
    /// The cookie of its latest send: the slot index in the low 16 bits,
    /// a per-send generation above, so no reply can match an older send.
    cookie: u64,
    /// Bytes of a structured read reply covered by data and hole chunks.
    read_covered: u64,
    /// The first error chunk of a structured reply.
    failure: Option<NbdServerError>,
}

const FREE_SLOT: InFlightSlot = InFlightSlot {
    phase: SlotPhase::Free,
    tag: 0,
    command: NbdCommand::Flush,
    order: NbdOrder::Free,
    sequence: 0,
    deadline: 0,
    cookie: 0,
    read_covered: 0,
    failure: None,
};

/// Which option reply the handshake waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AwaitedOption {
    StructuredReply,
    Go,
}

/// The receive parser's position in the server's byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxStep {
    Idle,
    /// The 18-byte greeting.
    Greeting,
    /// The 20-byte header of a reply to `awaited`.
    OptionReplyHeader(AwaitedOption),
    /// An option reply's payload: the head is kept, the rest skipped.
    OptionReplyBody {
        awaited: AwaitedOption,
        reply: u32,
        len: u32,
        done: u32,
    },
    /// `NBD_OPT_EXPORT_NAME`'s reply: size, flags and maybe 124 zeroes.
    ExportNameReply {
        len: u32,
        done: u32,
    },
    /// A simple (16-byte) or structured (20-byte) reply header.
    ReplyHeader,
    /// A simple read reply's data.
    SimpleReadData {
        slot: usize,
        len: u32,
        done: u32,
    },
    /// A structured chunk's payload: a fixed head, then data or skipped bytes.
    Chunk {
        slot: usize,
        flags: u16,
        chunk_type: u16,
        len: u32,
        done: u32,
        /// Where a data chunk's bytes go within the request.
        data_at: u32,
    },
}

/// The longest option reply the client accepts: an info or error reply
/// carries at most a string of 4096 bytes and a few fixed fields.
const MAX_OPTION_REPLY: u32 = NBD_MAX_STRING as u32 + 16;
/// The head of an option reply payload the client reads: an info type and
/// the block size fields.
const OPTION_REPLY_HEAD: u32 = 14;
/// Bytes of `NBD_OPT_EXPORT_NAME`'s reply the client reads: size and flags.
const EXPORT_NAME_REPLY_HEAD: u32 = 10;
const EXPORT_NAME_REPLY_ZEROES: u32 = 124;
/// The longest error chunk: error, message length, message, offset.
const MAX_ERROR_CHUNK: u32 = 6 + NBD_MAX_STRING as u32 + 8;

/// An NBD client connection engine with no I/O of its own: the caller moves
/// bytes between it and a connection (std TCP, smoltcp) with
/// [`receive`](Self::receive) and [`transmit`](Self::transmit), drives
/// time with [`expire`](Self::expire), and tells it when connections start
/// and end.
pub struct NbdClient {
    config: NbdConfig,
    link: NbdLinkState,
    /// The export as the first handshake found it; later ones must agree.
    export: Option<NbdExport>,
    slots: Vec<InFlightSlot>,
    completions: VecDeque<NbdCompletion>,
    next_sequence: u64,
    next_generation: u64,
    /// Handshake bytes and `NBD_CMD_DISC` waiting to go out.
    control: Vec<u8>,
    control_sent: usize,
    /// The request whose header (and payload) is being transmitted.
    sending: Option<(usize, [u8; NBD_REQUEST_LEN])>,
    /// Bytes of `sending`'s header and payload already transmitted.
    sending_done: u64,
    disconnect_requested: bool,
    rx: RxStep,
    /// The fixed head of whatever `rx` is parsing.
    head: [u8; NBD_CHUNK_HEADER_LEN],
    head_len: usize,
    /// The server's handshake flags of this connection.
    server_no_zeroes: bool,
    /// Negotiated on this connection.
    structured: bool,
    /// `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE` seen in this `NBD_OPT_GO`.
    go_export: Option<(u64, u16)>,
    go_block_size: Option<NbdBlockSize>,
}

impl NbdClient {
    /// A client with its whole in-flight table allocated; no connection yet.
    /// Returns `None` for an export name over 4096 bytes or a table size
    /// outside 1..=65536.
    pub fn new(config: NbdConfig) -> Option<Self> {
        if config.export_name.len() > NBD_MAX_STRING
            || !(1..=1 << 16).contains(&config.max_in_flight)
        {
            return None;
        }
        // The largest control message: NBD_OPT_GO with the name, after the
        // client flags and NBD_OPT_STRUCTURED_REPLY.
        let control = Vec::with_capacity(4 + 16 + 16 + 4 + config.export_name.len() + 4);
        Some(NbdClient {
            slots: alloc::vec![FREE_SLOT; config.max_in_flight],
            completions: VecDeque::with_capacity(config.max_in_flight),
            config,
            link: NbdLinkState::Down,
            export: None,
            next_sequence: 0,
            next_generation: 1,
            control,
            control_sent: 0,
            sending: None,
            sending_done: 0,
            disconnect_requested: false,
            rx: RxStep::Idle,
            head: [0; NBD_CHUNK_HEADER_LEN],
            head_len: 0,
            server_no_zeroes: false,
            structured: false,
            go_export: None,
            go_block_size: None,
        })
    }

    /// Where the connection stands.
    pub fn link_state(&self) -> NbdLinkState {
        self.link
    }

    /// The export, once a handshake has completed.
    pub fn export(&self) -> Option<&NbdExport> {
        self.export.as_ref()
    }

    /// The capacities of everything the client allocated, which nothing the
    /// server sends may grow.
    #[cfg(test)]
    pub(crate) fn footprint(&self) -> (usize, usize, usize) {
        (
            self.control.capacity(),
            self.completions.capacity(),
            self.slots.capacity(),
        )
    }

    /// Requests submitted and not yet completed.
    pub fn pending(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| !matches!(slot.phase, SlotPhase::Free | SlotPhase::TimedOutOnWire))
            .count()
    }

    /// A new connection is up: the handshake starts (the server speaks
    /// first). Returns false if the client has failed or disconnected.
    pub fn connection_started(&mut self) -> bool {
        if matches!(self.link, NbdLinkState::Failed | NbdLinkState::Disconnected) {
            return false;
        }
        self.reset_connection();
        self.link = NbdLinkState::Handshaking;
        self.rx = RxStep::Greeting;
        true
    }

    /// The connection is gone (closed, reset, or dropped by the caller after
    /// an error). Every request without a complete reply is queued again; a
    /// partly received reply is forgotten.
    pub fn connection_lost(&mut self) {
        self.reset_connection();
        if !matches!(self.link, NbdLinkState::Failed | NbdLinkState::Disconnected) {
            self.link = NbdLinkState::Down;
        }
    }

    fn reset_connection(&mut self) {
        for slot in &mut self.slots {
            match slot.phase {
                SlotPhase::Sending | SlotPhase::AwaitingReply => slot.phase = SlotPhase::Queued,
                SlotPhase::TimedOutOnWire => *slot = FREE_SLOT,
                SlotPhase::Free | SlotPhase::Queued => {}
            }
            slot.read_covered = 0;
            slot.failure = None;
        }
        self.control.clear();
        self.control_sent = 0;
        self.sending = None;
        self.sending_done = 0;
        self.rx = RxStep::Idle;
        self.head_len = 0;
        self.structured = false;
        self.go_export = None;
        self.go_block_size = None;
    }

    /// Queues a request; its completion comes out of
    /// [`next_completion`](Self::next_completion). `now` is the caller's
    /// clock; the request fails as timed out at `now + request_timeout`.
    pub fn submit(
        &mut self,
        now: u64,
        tag: u64,
        command: NbdCommand,
        order: NbdOrder,
    ) -> Result<(), NbdSubmitError> {
        if self.disconnect_requested || self.link == NbdLinkState::Failed {
            return Err(NbdSubmitError::Closed);
        }
        let export = self.export.ok_or(NbdSubmitError::NotConnected)?;
        self.check_command(&export, &command)?;
        let in_use = self
            .slots
            .iter()
            .filter(|s| s.phase != SlotPhase::Free)
            .count();
        if in_use + self.completions.len() >= self.slots.len() {
            return Err(NbdSubmitError::Full);
        }
        if command == NbdCommand::Flush && !export.can_flush() {
            // Without a volatile cache every acknowledged write is durable.
            self.completions.push_back(NbdCompletion {
                tag,
                result: Ok(()),
            });
            return Ok(());
        }
        let index = self
            .slots
            .iter()
            .position(|s| s.phase == SlotPhase::Free)
            .ok_or(NbdSubmitError::Full)?;
        self.slots[index] = InFlightSlot {
            phase: SlotPhase::Queued,
            tag,
            command,
            order,
            sequence: self.next_sequence,
            deadline: now.saturating_add(self.config.request_timeout),
            ..FREE_SLOT
        };
        self.next_sequence += 1;
        Ok(())
    }

    fn check_command(
        &self,
        export: &NbdExport,
        command: &NbdCommand,
    ) -> Result<(), NbdSubmitError> {
        let (_, flags, offset, len) = command.wire_fields();
        if command.changes_data() && export.read_only() {
            return Err(NbdSubmitError::ReadOnly);
        }
        let supported = match command {
            NbdCommand::Trim { .. } => export.can_trim(),
            NbdCommand::WriteZeroes { .. } => export.can_write_zeroes(),
            _ => true,
        };
        if !supported || (flags & NBD_CMD_FLAG_FUA != 0 && !export.can_fua()) {
            return Err(NbdSubmitError::NotSupported);
        }
        if *command == NbdCommand::Flush {
            return Ok(());
        }
        let max_payload = export.block_size.map_or(self.config.max_payload, |b| {
            b.maximum.min(self.config.max_payload)
        });
        let carries_payload = matches!(command, NbdCommand::Read { .. } | NbdCommand::Write { .. });
        if len == 0 || (carries_payload && len > max_payload) {
            return Err(NbdSubmitError::BadLength);
        }
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > export.size)
        {
            return Err(NbdSubmitError::OutOfRange);
        }
        let minimum = u64::from(export.block_size.map_or(1, |b| b.minimum));
        if offset % minimum != 0 || u64::from(len) % minimum != 0 {
            return Err(NbdSubmitError::Misaligned);
        }
        Ok(())
    }

    /// Fails every request whose deadline is at or before `now`. A request
    /// whose bytes are partly transmitted is failed once they are all out
    /// (its payload is the caller's until then).
    pub fn expire(&mut self, now: u64) {
        for slot in &mut self.slots {
            if slot.deadline > now {
                continue;
            }
            let next = match slot.phase {
                SlotPhase::Queued => SlotPhase::Free,
                SlotPhase::AwaitingReply => SlotPhase::TimedOutOnWire,
                SlotPhase::Free | SlotPhase::Sending | SlotPhase::TimedOutOnWire => continue,
            };
            let result = Err(NbdRequestError::TimedOut);
            self.completions.push_back(NbdCompletion {
                tag: slot.tag,
                result,
            });
            *slot = InFlightSlot {
                phase: next,
                ..*slot
            };
        }
    }

    /// The next finished request, if any.
    pub fn next_completion(&mut self) -> Option<NbdCompletion> {
        self.completions.pop_front()
    }

    /// Asks for a clean end: once every request has completed,
    /// `NBD_CMD_DISC` is transmitted and the link state becomes
    /// [`NbdLinkState::Disconnected`]. New requests are refused.
    pub fn request_disconnect(&mut self) {
        self.disconnect_requested = true;
    }

    /// Whether [`transmit`](Self::transmit) has bytes to give.
    pub fn wants_to_transmit(&self) -> bool {
        self.control_sent < self.control.len()
            || self.sending.is_some()
            || (self.link == NbdLinkState::Ready
                && (self.next_to_send().is_some() || self.disconnect_due()))
    }

    fn disconnect_due(&self) -> bool {
        self.disconnect_requested && self.pending() == 0
    }

    /// Fills `out` with bytes for the server (handshake messages, request
    /// headers, write payloads copied from `payload`); returns how many.
    pub fn transmit(&mut self, out: &mut [u8], payload: &mut impl NbdPayload) -> usize {
        let mut written = self.transmit_control(out);
        while written < out.len() && self.link == NbdLinkState::Ready {
            if self.sending.is_none() && !self.start_next_request() {
                break;
            }
            written += self.transmit_request(&mut out[written..], payload);
        }
        // The loop may have just queued NBD_CMD_DISC.
        written + self.transmit_control(&mut out[written..])
    }

    fn transmit_control(&mut self, out: &mut [u8]) -> usize {
        let pending = &self.control[self.control_sent..];
        let n = pending.len().min(out.len());
        out[..n].copy_from_slice(&pending[..n]);
        self.control_sent += n;
        if self.control_sent == self.control.len() {
            self.control.clear();
            self.control_sent = 0;
        }
        n
    }

    /// Picks the next request to send and prepares its header (or the
    /// disconnect); false if nothing may be sent now.
    fn start_next_request(&mut self) -> bool {
        let Some(index) = self.next_to_send() else {
            if self.disconnect_due() {
                let disc = encode_request(NBD_CMD_DISC, 0, 0, 0, 0);
                self.control.extend_from_slice(&disc);
                self.link = NbdLinkState::Disconnected;
            }
            return false;
        };
        let generation = self.next_generation;
        self.next_generation += 1;
        let slot = &mut self.slots[index];
        slot.cookie = (generation << 16) | index as u64;
        slot.phase = SlotPhase::Sending;
        let (command, flags, offset, len) = slot.command.wire_fields();
        self.sending = Some((
            index,
            encode_request(command, flags, slot.cookie, offset, len),
        ));
        self.sending_done = 0;
        true
    }

    fn transmit_request(&mut self, out: &mut [u8], payload: &mut impl NbdPayload) -> usize {
        let Some((index, header)) = self.sending else {
            return 0;
        };
        let slot = self.slots[index];
        let payload_len = match slot.command {
            NbdCommand::Write { len, .. } => u64::from(len),
            _ => 0,
        };
        let mut written = 0;
        if self.sending_done < NBD_REQUEST_LEN as u64 {
            let rest = &header[self.sending_done as usize..];
            let n = rest.len().min(out.len());
            out[..n].copy_from_slice(&rest[..n]);
            written = n;
            self.sending_done += n as u64;
        }
        let payload_done = self.sending_done.saturating_sub(NBD_REQUEST_LEN as u64);
        let n = (payload_len - payload_done).min((out.len() - written) as u64) as usize;
        if n > 0 {
            payload.write_payload(
                slot.tag,
                payload_done as u32,
                &mut out[written..written + n],
            );
            written += n;
            self.sending_done += n as u64;
        }
        if self.sending_done == NBD_REQUEST_LEN as u64 + payload_len {
            self.slots[index].phase = SlotPhase::AwaitingReply;
            self.sending = None;
        }
        written
    }

    /// The oldest queued request its ordering allows to go out now.
    fn next_to_send(&self) -> Option<usize> {
        // The oldest unfinished request of each kind that holds others back.
        let mut oldest_any = u64::MAX;
        let mut oldest_write = u64::MAX;
        let mut oldest_drain = u64::MAX;
        let mut candidate: Option<usize> = None;
        for (index, slot) in self.slots.iter().enumerate() {
            if matches!(slot.phase, SlotPhase::Free | SlotPhase::TimedOutOnWire) {
                continue;
            }
            oldest_any = oldest_any.min(slot.sequence);
            if slot.command.changes_data() {
                oldest_write = oldest_write.min(slot.sequence);
            }
            if slot.order == NbdOrder::Drain {
                oldest_drain = oldest_drain.min(slot.sequence);
            }
            if slot.phase == SlotPhase::Queued
                && candidate.is_none_or(|c| self.slots[c].sequence > slot.sequence)
            {
                candidate = Some(index);
            }
        }
        // Sending strictly oldest-first keeps a held flush or drain from
        // being overtaken by requests submitted after it.
        let slot = &self.slots[candidate?];
        let held = oldest_drain < slot.sequence
            || (slot.order == NbdOrder::Drain && oldest_any < slot.sequence)
            || (slot.command == NbdCommand::Flush && oldest_write < slot.sequence);
        (!held).then_some(candidate?)
    }

    /// Feeds bytes the server sent. Read data goes to `payload` as it
    /// arrives; completions queue up for
    /// [`next_completion`](Self::next_completion). On an error the
    /// connection is unusable: the client has already treated it as lost
    /// (requests queued for replay) and the caller closes it.
    pub fn receive(
        &mut self,
        mut input: &[u8],
        payload: &mut impl NbdPayload,
    ) -> Result<(), NbdConnectionError> {
        while !input.is_empty() {
            if let Err(error) = self.receive_step(&mut input, payload) {
                self.connection_lost();
                return Err(error);
            }
        }
        Ok(())
    }

    /// Moves bytes of `input` into the head buffer until it holds `want`;
    /// true once it does.
    fn gather_head(&mut self, input: &mut &[u8], want: usize) -> bool {
        let n = (want - self.head_len.min(want)).min(input.len());
        self.head[self.head_len..self.head_len + n].copy_from_slice(&input[..n]);
        self.head_len += n;
        *input = &input[n..];
        self.head_len >= want
    }

    fn receive_step(
        &mut self,
        input: &mut &[u8],
        payload: &mut impl NbdPayload,
    ) -> Result<(), NbdConnectionError> {
        match self.rx {
            RxStep::Idle => Err(NbdConnectionError::NotConnected),
            RxStep::Greeting => {
                if self.gather_head(input, 18) {
                    self.head_len = 0;
                    self.on_greeting()?;
                }
                Ok(())
            }
            RxStep::OptionReplyHeader(awaited) => {
                if self.gather_head(input, 20) {
                    self.head_len = 0;
                    self.on_option_reply_header(awaited)?;
                }
                Ok(())
            }
            RxStep::OptionReplyBody {
                awaited,
                reply,
                len,
                done,
            } => {
                let done = self.consume_body(input, done, len.min(OPTION_REPLY_HEAD), len);
                self.rx = RxStep::OptionReplyBody {
                    awaited,
                    reply,
                    len,
                    done,
                };
                if done == len {
                    self.on_option_reply(awaited, reply, len)?;
                }
                Ok(())
            }
            RxStep::ExportNameReply { len, done } => {
                let done = self.consume_body(input, done, EXPORT_NAME_REPLY_HEAD, len);
                self.rx = RxStep::ExportNameReply { len, done };
                if done == len {
                    let (size, flags) = (be_u64(&self.head, 0), be_u16(&self.head, 8));
                    self.handshake_done(size, flags, None)?;
                }
                Ok(())
            }
            RxStep::ReplyHeader => self.receive_reply_header(input),
            RxStep::SimpleReadData { slot, len, done } => {
                let n = (len - done).min(input.len() as u32);
                if self.slots[slot].phase == SlotPhase::AwaitingReply {
                    payload.read_payload(self.slots[slot].tag, done, &input[..n as usize]);
                }
                *input = &input[n as usize..];
                self.rx = RxStep::SimpleReadData {
                    slot,
                    len,
                    done: done + n,
                };
                if done + n == len {
                    self.rx = RxStep::ReplyHeader;
                    self.finish_request(slot, Ok(()));
                }
                Ok(())
            }
            RxStep::Chunk { .. } => self.receive_chunk(input, payload),
        }
    }

    /// Reads a body's first `head` bytes into the head buffer and skips
    /// the rest; returns the new count of bytes consumed.
    fn consume_body(&mut self, input: &mut &[u8], done: u32, head: u32, len: u32) -> u32 {
        if done < head {
            self.gather_head(input, head as usize);
            return self.head_len as u32;
        }
        let n = (len - done).min(input.len() as u32);
        *input = &input[n as usize..];
        done + n
    }

    fn on_greeting(&mut self) -> Result<(), NbdConnectionError> {
        let magic = be_u64(&self.head, 0);
        if magic != NBD_INIT_MAGIC {
            return Err(NbdConnectionError::BadGreetingMagic(magic));
        }
        match be_u64(&self.head, 8) {
            NBD_OPTS_MAGIC => {}
            NBD_CLISERV_MAGIC => return Err(NbdConnectionError::OldstyleServer),
            other => return Err(NbdConnectionError::BadGreetingMagic(other)),
        }
        let flags = be_u16(&self.head, 16);
        let fixed = flags & NBD_FLAG_FIXED_NEWSTYLE != 0;
        self.server_no_zeroes = flags & NBD_FLAG_NO_ZEROES != 0;
        let mut client_flags = 0;
        if fixed {
            client_flags |= NBD_FLAG_C_FIXED_NEWSTYLE;
        }
        if self.server_no_zeroes {
            client_flags |= NBD_FLAG_C_NO_ZEROES;
        }
        self.control.extend_from_slice(&client_flags.to_be_bytes());
        if !fixed {
            // A plain newstyle server knows no option but the export name.
            self.send_export_name();
        } else if self.config.structured_replies {
            queue_option(&mut self.control, NBD_OPT_STRUCTURED_REPLY, &[]);
            self.rx = RxStep::OptionReplyHeader(AwaitedOption::StructuredReply);
        } else {
            self.send_go();
        }
        Ok(())
    }

    fn send_go(&mut self) {
        let name = &self.config.export_name;
        let name_len = (name.len() as u32).to_be_bytes();
        // One information request: the block size constraints.
        let requests = [
            0,
            1,
            (NBD_INFO_BLOCK_SIZE >> 8) as u8,
            NBD_INFO_BLOCK_SIZE as u8,
        ];
        queue_option(&mut self.control, NBD_OPT_GO, &[&name_len, name, &requests]);
        self.rx = RxStep::OptionReplyHeader(AwaitedOption::Go);
    }

    fn send_export_name(&mut self) {
        queue_option(
            &mut self.control,
            NBD_OPT_EXPORT_NAME,
            &[&self.config.export_name],
        );
        let zeroes = if self.server_no_zeroes {
            0
        } else {
            EXPORT_NAME_REPLY_ZEROES
        };
        self.rx = RxStep::ExportNameReply {
            len: EXPORT_NAME_REPLY_HEAD + zeroes,
            done: 0,
        };
    }

    fn on_option_reply_header(&mut self, awaited: AwaitedOption) -> Result<(), NbdConnectionError> {
        let magic = be_u64(&self.head, 0);
        if magic != NBD_OPTION_REPLY_MAGIC {
            return Err(NbdConnectionError::BadOptionReplyMagic(magic));
        }
        let sent = match awaited {
            AwaitedOption::StructuredReply => NBD_OPT_STRUCTURED_REPLY,
            AwaitedOption::Go => NBD_OPT_GO,
        };
        let answered = be_u32(&self.head, 8);
        if answered != sent {
            return Err(NbdConnectionError::OptionReplyMismatch { sent, answered });
        }
        let (reply, len) = (be_u32(&self.head, 12), be_u32(&self.head, 16));
        if len > MAX_OPTION_REPLY {
            return Err(NbdConnectionError::OversizedOptionReply(len));
        }
        self.rx = RxStep::OptionReplyBody {
            awaited,
            reply,
            len,
            done: 0,
        };
        if len == 0 {
            self.on_option_reply(awaited, reply, 0)?;
        }
        Ok(())
    }

    /// Acts on a whole option reply (its head is in `self.head`).
    fn on_option_reply(
        &mut self,
        awaited: AwaitedOption,
        reply: u32,
        len: u32,
    ) -> Result<(), NbdConnectionError> {
        self.head_len = 0;
        let refusal = NbdOptionRefusal::from_reply_type(reply);
        match awaited {
            AwaitedOption::StructuredReply => {
                match reply {
                    NBD_REP_ACK => self.structured = true,
                    _ if reply & NBD_REP_FLAG_ERROR == 0 => {
                        let option = NBD_OPT_STRUCTURED_REPLY;
                        return Err(NbdConnectionError::UnexpectedOptionReply { option, reply });
                    }
                    // Without TLS or with the server leaving, nothing else will work.
                    NBD_REP_ERR_TLS_REQD | NBD_REP_ERR_SHUTDOWN => {
                        let option = NBD_OPT_STRUCTURED_REPLY;
                        return Err(NbdConnectionError::Refused { option, refusal });
                    }
                    // Any other refusal: simple replies it is.
                    _ => {}
                }
                self.send_go();
            }
            AwaitedOption::Go => match reply {
                NBD_REP_INFO => {
                    self.on_info(len)?;
                    self.rx = RxStep::OptionReplyHeader(AwaitedOption::Go);
                }
                NBD_REP_ACK => {
                    let (size, flags) = self
                        .go_export
                        .ok_or(NbdConnectionError::MissingExportInfo)?;
                    self.handshake_done(size, flags, self.go_block_size)?;
                }
                NBD_REP_ERR_UNSUP => self.send_export_name(),
                _ if reply & NBD_REP_FLAG_ERROR != 0 => {
                    return Err(NbdConnectionError::Refused {
                        option: NBD_OPT_GO,
                        refusal,
                    });
                }
                _ => {
                    let option = NBD_OPT_GO;
                    return Err(NbdConnectionError::UnexpectedOptionReply { option, reply });
                }
            },
        }
        Ok(())
    }

    fn on_info(&mut self, len: u32) -> Result<(), NbdConnectionError> {
        if len < 2 {
            return Err(NbdConnectionError::BadInfoLength {
                info: u16::MAX,
                len,
            });
        }
        let info = be_u16(&self.head, 0);
        let bad_length = NbdConnectionError::BadInfoLength { info, len };
        match info {
            NBD_INFO_EXPORT if len != 12 => Err(bad_length),
            NBD_INFO_EXPORT => {
                self.go_export = Some((be_u64(&self.head, 2), be_u16(&self.head, 10)));
                Ok(())
            }
            NBD_INFO_BLOCK_SIZE if len != 14 => Err(bad_length),
            NBD_INFO_BLOCK_SIZE => {
                let block_size = NbdBlockSize {
                    minimum: be_u32(&self.head, 2),
                    preferred: be_u32(&self.head, 6),
                    maximum: be_u32(&self.head, 10),
                };
                let valid = block_size.minimum.is_power_of_two()
                    && block_size.minimum <= 1 << 16
                    && block_size.preferred.is_power_of_two()
                    && block_size.preferred >= block_size.minimum
                    && block_size.maximum >= block_size.minimum;
                if !valid {
                    let NbdBlockSize {
                        minimum,
                        preferred,
                        maximum,
                    } = block_size;
                    return Err(NbdConnectionError::BadBlockSize {
                        minimum,
                        preferred,
                        maximum,
                    });
                }
                self.go_block_size = Some(block_size);
                Ok(())
            }
            // Names and descriptions the client did not ask for: ignored.
            _ => Ok(()),
        }
    }

    fn handshake_done(
        &mut self,
        size: u64,
        flags: u16,
        block_size: Option<NbdBlockSize>,
    ) -> Result<(), NbdConnectionError> {
        self.head_len = 0;
        if flags & NBD_FLAG_HAS_FLAGS == 0 {
            return Err(NbdConnectionError::BadTransmissionFlags(flags));
        }
        if let Some(was) = self.export.map(|e| e.size).filter(|&was| was != size) {
            self.fail_everything();
            return Err(NbdConnectionError::ExportSizeChanged { was, now: size });
        }
        let structured_replies = self.structured;
        self.export = Some(NbdExport {
            size,
            flags,
            block_size,
            structured_replies,
        });
        self.link = NbdLinkState::Ready;
        self.rx = RxStep::ReplyHeader;
        Ok(())
    }

    /// The export is not the one the requests were meant for: every request
    /// fails and the client stops.
    fn fail_everything(&mut self) {
        for index in 0..self.slots.len() {
            if matches!(
                self.slots[index].phase,
                SlotPhase::Queued | SlotPhase::Sending | SlotPhase::AwaitingReply
            ) {
                self.finish_request(index, Err(NbdRequestError::ExportSizeChanged));
            }
        }
        self.link = NbdLinkState::Failed;
    }

    fn receive_reply_header(&mut self, input: &mut &[u8]) -> Result<(), NbdConnectionError> {
        if !self.gather_head(input, 4) {
            return Ok(());
        }
        let magic = be_u32(&self.head, 0);
        let want = match magic {
            NBD_SIMPLE_REPLY_MAGIC => NBD_SIMPLE_REPLY_LEN,
            NBD_STRUCTURED_REPLY_MAGIC => NBD_CHUNK_HEADER_LEN,
            other => return Err(NbdConnectionError::BadReplyMagic(other)),
        };
        if !self.gather_head(input, want) {
            return Ok(());
        }
        self.head_len = 0;
        if magic == NBD_SIMPLE_REPLY_MAGIC {
            self.on_simple_reply(be_u32(&self.head, 4), be_u64(&self.head, 8))
        } else {
            let (flags, chunk_type) = (be_u16(&self.head, 4), be_u16(&self.head, 6));
            let (cookie, len) = (be_u64(&self.head, 8), be_u32(&self.head, 16));
            self.on_chunk_header(flags, chunk_type, cookie, len)
        }
    }

    /// The slot a reply's cookie names, if it is waiting for one.
    fn slot_of_cookie(&self, cookie: u64) -> Result<usize, NbdConnectionError> {
        let index = (cookie & 0xffff) as usize;
        match self.slots.get(index) {
            Some(slot)
                if slot.cookie == cookie
                    && matches!(
                        slot.phase,
                        SlotPhase::AwaitingReply | SlotPhase::TimedOutOnWire
                    ) =>
            {
                Ok(index)
            }
            _ => Err(NbdConnectionError::UnknownCookie(cookie)),
        }
    }

    fn on_simple_reply(&mut self, error: u32, cookie: u64) -> Result<(), NbdConnectionError> {
        let index = self.slot_of_cookie(cookie)?;
        let slot = self.slots[index];
        if error == NBD_ESHUTDOWN {
            return Err(NbdConnectionError::ServerShuttingDown);
        }
        self.rx = RxStep::ReplyHeader;
        match slot.command {
            // Structured replies make a read's reply self-describing; the
            // server must not fall back to a simple one.
            NbdCommand::Read { .. } if self.structured => {
                Err(NbdConnectionError::WrongReplyKind(cookie))
            }
            NbdCommand::Read { len, .. } if error == 0 => {
                self.rx = RxStep::SimpleReadData {
                    slot: index,
                    len,
                    done: 0,
                };
                Ok(())
            }
            _ if error == 0 => {
                self.finish_request(index, Ok(()));
                Ok(())
            }
            _ => {
                let failure = NbdRequestError::Server(NbdServerError::from_wire(error));
                self.finish_request(index, Err(failure));
                Ok(())
            }
        }
    }

    fn on_chunk_header(
        &mut self,
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        len: u32,
    ) -> Result<(), NbdConnectionError> {
        if !self.structured {
            return Err(NbdConnectionError::WrongReplyKind(cookie));
        }
        let index = self.slot_of_cookie(cookie)?;
        let read_len = match self.slots[index].command {
            NbdCommand::Read { len, .. } => Some(len),
            _ => None,
        };
        let done_flag = flags & NBD_REPLY_FLAG_DONE != 0;
        let valid = match (chunk_type, read_len) {
            (NBD_REPLY_TYPE_NONE, _) => len == 0 && done_flag,
            (NBD_REPLY_TYPE_OFFSET_DATA, Some(read_len)) => len > 8 && len - 8 <= read_len,
            (NBD_REPLY_TYPE_OFFSET_HOLE, Some(_)) => len == 12,
            (NBD_REPLY_TYPE_ERROR, _) | (NBD_REPLY_TYPE_ERROR_OFFSET, _) => {
                (6..=MAX_ERROR_CHUNK).contains(&len)
            }
            // An error type this client does not know is still an error.
            _ if chunk_type & NBD_REPLY_TYPE_ERROR_BIT != 0 => (6..=MAX_ERROR_CHUNK).contains(&len),
            _ => false,
        };
        if !valid {
            return Err(NbdConnectionError::BadChunk {
                cookie,
                chunk_type,
                len,
            });
        }
        self.rx = RxStep::Chunk {
            slot: index,
            flags,
            chunk_type,
            len,
            done: 0,
            data_at: 0,
        };
        if len == 0 {
            self.finish_chunk(index, flags)?;
        }
        Ok(())
    }

    fn chunk_head_len(chunk_type: u16) -> u32 {
        match chunk_type {
            NBD_REPLY_TYPE_NONE => 0,
            NBD_REPLY_TYPE_OFFSET_DATA => 8,
            NBD_REPLY_TYPE_OFFSET_HOLE => 12,
            _ => 6,
        }
    }

    fn receive_chunk(
        &mut self,
        input: &mut &[u8],
        payload: &mut impl NbdPayload,
    ) -> Result<(), NbdConnectionError> {
        let RxStep::Chunk {
            slot: index,
            flags,
            chunk_type,
            len,
            mut done,
            mut data_at,
        } = self.rx
        else {
            return Ok(());
        };
        let head = Self::chunk_head_len(chunk_type);
        if done < head {
            if !self.gather_head(input, head as usize) {
                self.rx = RxStep::Chunk {
                    slot: index,
                    flags,
                    chunk_type,
                    len,
                    done: self.head_len as u32,
                    data_at,
                };
                return Ok(());
            }
            done = head;
            self.head_len = 0;
            data_at = self.on_chunk_head(index, chunk_type, len, payload)?;
        }
        let n = (len - done).min(input.len() as u32);
        let slot = self.slots[index];
        if chunk_type == NBD_REPLY_TYPE_OFFSET_DATA && slot.phase == SlotPhase::AwaitingReply {
            payload.read_payload(slot.tag, data_at + (done - head), &input[..n as usize]);
        }
        *input = &input[n as usize..];
        done += n;
        self.rx = RxStep::Chunk {
            slot: index,
            flags,
            chunk_type,
            len,
            done,
            data_at,
        };
        if done == len {
            self.finish_chunk(index, flags)?;
        }
        Ok(())
    }

    /// Checks a chunk's fixed head and acts on it; returns where a data
    /// chunk's bytes go within the read.
    fn on_chunk_head(
        &mut self,
        index: usize,
        chunk_type: u16,
        len: u32,
        payload: &mut impl NbdPayload,
    ) -> Result<u32, NbdConnectionError> {
        let slot = self.slots[index];
        match chunk_type {
            NBD_REPLY_TYPE_OFFSET_DATA | NBD_REPLY_TYPE_OFFSET_HOLE => {
                let (at, extent) = if chunk_type == NBD_REPLY_TYPE_OFFSET_DATA {
                    (be_u64(&self.head, 0), len - 8)
                } else {
                    (be_u64(&self.head, 0), be_u32(&self.head, 8))
                };
                let at = self.check_read_extent(index, at, extent)?;
                if chunk_type == NBD_REPLY_TYPE_OFFSET_HOLE
                    && slot.phase == SlotPhase::AwaitingReply
                {
                    payload.read_zeroes(slot.tag, at, extent);
                }
                Ok(at)
            }
            _ => {
                let (error, message_len) =
                    (be_u32(&self.head, 0), u32::from(be_u16(&self.head, 4)));
                let fits = match chunk_type {
                    NBD_REPLY_TYPE_ERROR => len == 6 + message_len,
                    NBD_REPLY_TYPE_ERROR_OFFSET => len == 6 + message_len + 8,
                    _ => len >= 6 + message_len,
                };
                if !fits {
                    return Err(NbdConnectionError::BadChunk {
                        cookie: slot.cookie,
                        chunk_type,
                        len,
                    });
                }
                if error == NBD_ESHUTDOWN {
                    return Err(NbdConnectionError::ServerShuttingDown);
                }
                // The first error is the one reported.
                let slot = &mut self.slots[index];
                slot.failure = slot.failure.or(Some(NbdServerError::from_wire(error)));
                Ok(0)
            }
        }
    }

    /// A data or hole extent of a read reply: inside the read, and not
    /// more bytes in all than the read has. Returns its offset in the read.
    fn check_read_extent(
        &mut self,
        index: usize,
        at: u64,
        extent: u32,
    ) -> Result<u32, NbdConnectionError> {
        let slot = &mut self.slots[index];
        let NbdCommand::Read { offset, len } = slot.command else {
            return Err(NbdConnectionError::ChunkOutOfRange(slot.cookie));
        };
        let inside = at
            .checked_sub(offset)
            .filter(|rel| extent > 0 && rel + u64::from(extent) <= u64::from(len));
        slot.read_covered += u64::from(extent);
        match inside {
            Some(rel) if slot.read_covered <= u64::from(len) => Ok(rel as u32),
            _ => Err(NbdConnectionError::ChunkOutOfRange(slot.cookie)),
        }
    }

    fn finish_chunk(&mut self, index: usize, flags: u16) -> Result<(), NbdConnectionError> {
        self.rx = RxStep::ReplyHeader;
        if flags & NBD_REPLY_FLAG_DONE == 0 {
            return Ok(());
        }
        let slot = self.slots[index];
        let result = match (slot.failure, slot.command) {
            (Some(failure), _) => Err(NbdRequestError::Server(failure)),
            (None, NbdCommand::Read { len, .. }) if slot.read_covered != u64::from(len) => {
                return Err(NbdConnectionError::IncompleteRead(slot.cookie));
            }
            (None, _) => Ok(()),
        };
        self.finish_request(index, result);
        Ok(())
    }

    /// Completes a request once: a request already completed as timed out
    /// only gives its slot back.
    fn finish_request(&mut self, index: usize, result: Result<(), NbdRequestError>) {
        let slot = core::mem::replace(&mut self.slots[index], FREE_SLOT);
        if slot.phase != SlotPhase::TimedOutOnWire {
            self.completions.push_back(NbdCompletion {
                tag: slot.tag,
                result,
            });
        }
    }
}

/// Appends one option (header and data pieces) to the control bytes.
fn queue_option(control: &mut Vec<u8>, option: u32, data: &[&[u8]]) {
    let len: usize = data.iter().map(|d| d.len()).sum();
    control.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
    control.extend_from_slice(&option.to_be_bytes());
    control.extend_from_slice(&(len as u32).to_be_bytes());
    data.iter().for_each(|d| control.extend_from_slice(d));
}

//! The request/reply engine, watches and transactions.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use super::XenstoreInterface;
use super::wire::{
    HEADER_LEN, Header, MsgType, PAYLOAD_MAX, Perm, XsError, encode_perms, parse_perms,
    split_strings,
};
use crate::DomId;
use crate::ring::{PeerChannel, TimedOut};

/// Longest absolute path xenstored accepts (`XENSTORE_ABS_PATH_MAX`).
pub const PATH_MAX: usize = 3072;
/// Watch events kept while nobody polls; older ones are dropped (counted).
pub const MAX_QUEUED_WATCH_EVENTS: usize = 1024;
/// Bytes of paths and tokens kept queued, likewise: a guest names the
/// paths below a watched node of its own (up to [`PATH_MAX`] each), so
/// the count alone would let it make stordom hold megabytes.
pub const MAX_QUEUED_WATCH_EVENT_BYTES: usize = 64 * 1024;
/// Attempts of a transaction that keeps hitting EAGAIN.
pub const MAX_TX_ATTEMPTS: usize = 16;

/// A transaction id; [`Tx::NONE`] outside transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tx(pub u32);

impl Tx {
    pub const NONE: Tx = Tx(0);
}

/// A fired watch: the path that changed and the token given to `watch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

/// Where a connection's two byte streams stand, kept outside the heap (a
/// `static`) so that a connection made after an in-place restart can take
/// the ring up mid-message: the dead instance may have sent part of a
/// request or read part of a reply, and both streams must stay framed.
pub struct StreamRecord {
    next_req_id: AtomicU32,
    /// Bytes of the request being sent not yet in the ring.
    request_left: AtomicU32,
    /// Bytes of the message being received already taken from the ring.
    reply_taken: AtomicU32,
    /// The first bytes of that message (its header, once taken whole).
    reply_header: [AtomicU8; HEADER_LEN],
}

impl StreamRecord {
    pub const fn new() -> Self {
        StreamRecord {
            next_req_id: AtomicU32::new(1),
            request_left: AtomicU32::new(0),
            reply_taken: AtomicU32::new(0),
            reply_header: [const { AtomicU8::new(0) }; HEADER_LEN],
        }
    }
}

impl Default for StreamRecord {
    fn default() -> Self {
        Self::new()
    }
}

/// A xenstore connection.
pub struct Xenstore<'a, C> {
    iface: &'a XenstoreInterface,
    channel: C,
    /// Where the streams stand, for a successor (see [`Xenstore::resume`]).
    record: Option<&'a StreamRecord>,
    next_req_id: u32,
    /// A reply or event being assembled across partial ring reads.
    partial: Vec<u8>,
    watch_events: VecDeque<WatchEvent>,
    /// Bytes of the paths and tokens in `watch_events`.
    queued_watch_bytes: usize,
    dropped_watch_events: u64,
    /// Set once the stream is unusable; every later call fails with it.
    broken: Option<XsError>,
    /// The writes of the [`Xenstore::write_batch`] under way.
    batch: Option<BatchReplies>,
}

/// The writes of a [`Xenstore::write_batch`]: its first request id, and
/// the first error answered to one of them.
#[derive(Clone, Copy)]
struct BatchReplies {
    first: u32,
    error: Option<XsError>,
}

impl<'a, C: PeerChannel> Xenstore<'a, C> {
    pub fn new(iface: &'a XenstoreInterface, channel: C) -> Self {
        Xenstore {
            iface,
            channel,
            record: None,
            next_req_id: 1,
            partial: Vec::new(),
            watch_events: VecDeque::new(),
            queued_watch_bytes: 0,
            dropped_watch_events: 0,
            broken: None,
            batch: None,
        }
    }

    /// A connection over a ring an earlier connection (of a dead instance
    /// of this domain) used with `record`: the rest of a request it left
    /// half sent goes out as zero bytes (xenstored then answers or
    /// rejects a request nobody waits for), a message it left half read is
    /// completed and dropped as a stale one, and request ids go on from
    /// where it stopped, so none of its late replies is taken for a new
    /// one. Call [`Self::reset_watches`] next.
    pub fn resume(
        iface: &'a XenstoreInterface,
        channel: C,
        record: &'a StreamRecord,
    ) -> Result<Self, XsError> {
        let mut xs = Self::new(iface, channel);
        xs.next_req_id = record.next_req_id.load(Ordering::Acquire);
        let taken = record.reply_taken.swap(0, Ordering::AcqRel) as usize;
        xs.partial = record
            .reply_header
            .iter()
            .take(taken)
            .map(|b| b.load(Ordering::Acquire))
            .collect();
        xs.partial.resize(taken, 0);
        let left = record.request_left.swap(0, Ordering::AcqRel) as usize;
        xs.record = Some(record);
        if left > 0 {
            xs.send(&alloc::vec![0; left.min(HEADER_LEN + PAYLOAD_MAX)])?;
            xs.channel.notify();
        }
        Ok(xs)
    }

    /// Records the streams in `record` from now on (see [`Self::resume`]).
    pub fn keep_record(&mut self, record: &'a StreamRecord) {
        record
            .next_req_id
            .store(self.next_req_id, Ordering::Release);
        self.record = Some(record);
    }

    /// Drops every watch and transaction xenstored holds for this
    /// connection (a dead instance's), then the watch events queued so
    /// far: they were for those watches.
    pub fn reset_watches(&mut self) -> Result<(), XsError> {
        self.request(MsgType::ResetWatches, Tx::NONE, &[], b"")?;
        self.watch_events.clear();
        self.queued_watch_bytes = 0;
        Ok(())
    }

    /// Runs `body` on this connection with a channel that does `work`
    /// while a request waits for xenstored's reply (see
    /// [`PeerChannel::wait_working`]): a caller whose requests are not
    /// its only duty keeps doing the others meanwhile. `work` must not
    /// use this connection (it cannot: `body` has it).
    pub fn with_wait_work<T>(
        &mut self,
        work: &mut dyn FnMut() -> bool,
        body: impl FnOnce(&mut Xenstore<'a, WorkingChannel<'_, C>>) -> T,
    ) -> T {
        let mut working = Xenstore {
            iface: self.iface,
            channel: WorkingChannel {
                inner: &mut self.channel,
                work,
            },
            record: self.record,
            next_req_id: self.next_req_id,
            partial: core::mem::take(&mut self.partial),
            watch_events: core::mem::take(&mut self.watch_events),
            queued_watch_bytes: self.queued_watch_bytes,
            dropped_watch_events: self.dropped_watch_events,
            broken: self.broken,
            batch: self.batch,
        };
        let result = body(&mut working);
        let Xenstore {
            next_req_id,
            partial,
            watch_events,
            queued_watch_bytes,
            dropped_watch_events,
            broken,
            batch,
            ..
        } = working;
        self.next_req_id = next_req_id;
        self.partial = partial;
        self.watch_events = watch_events;
        self.queued_watch_bytes = queued_watch_bytes;
        self.dropped_watch_events = dropped_watch_events;
        self.broken = broken;
        self.batch = batch;
        result
    }

    /// The channel (tests reach the simulated daemon through it).
    pub fn channel_mut(&mut self) -> &mut C {
        &mut self.channel
    }

    /// Watch events queued (they arrived while waiting for replies): the
    /// store port's event that announced them was consumed by that wait,
    /// so a caller about to sleep must take them first.
    pub fn queued_watch_events(&self) -> usize {
        self.watch_events.len()
    }

    /// Watch events dropped because the queue was full.
    pub fn dropped_watch_events(&self) -> u64 {
        self.dropped_watch_events
    }

    pub fn read(&mut self, tx: Tx, path: &str) -> Result<Vec<u8>, XsError> {
        self.request(MsgType::Read, tx, &[path], b"")
    }

    /// Reads a node that holds text.
    pub fn read_string(&mut self, tx: Tx, path: &str) -> Result<String, XsError> {
        String::from_utf8(self.read(tx, path)?).map_err(|_| XsError::Invalid)
    }

    pub fn write(&mut self, tx: Tx, path: &str, value: &[u8]) -> Result<(), XsError> {
        self.request(MsgType::Write, tx, &[path], value).map(drop)
    }

    /// Writes `path` outside any transaction without waiting for
    /// xenstored's answer, which is dropped when it comes (an error too):
    /// for values that are only reported, such as statistics, whose
    /// publishing must not hold up the caller for a round trip. Returns
    /// false, sending nothing, when the request does not fit in the ring
    /// now (try again later).
    pub fn write_unacknowledged(&mut self, path: &str, value: &[u8]) -> Result<bool, XsError> {
        self.unacknowledged_writes().write(path, value)
    }

    /// Unacknowledged writes (as [`Self::write_unacknowledged`]) that
    /// wake xenstored once, when the returned batch is dropped, rather
    /// than once each: a notify is a hypercall, and a vbd's statistics
    /// are a score of nodes a second under load.
    pub fn unacknowledged_writes(&mut self) -> UnacknowledgedWrites<'_, 'a, C> {
        UnacknowledgedWrites {
            xs: self,
            sent: false,
        }
    }

    /// [`Self::write_unacknowledged`] without the notify.
    fn send_unacknowledged(&mut self, path: &str, value: &[u8]) -> Result<bool, XsError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        if !valid_string_arg(path) || path.len() + 1 + value.len() > PAYLOAD_MAX {
            return Err(XsError::Invalid);
        }
        let len = path.len() + 1 + value.len();
        let room = self
            .iface
            .requests()
            .writable()
            .map_err(|_| self.fail(XsError::RingCorrupt))?;
        if room < HEADER_LEN + len {
            return Ok(false);
        }
        let header = Header {
            msg_type: MsgType::Write as u32,
            req_id: self.take_req_id(),
            tx_id: Tx::NONE.0,
            len: len as u32,
        };
        self.begin_request(len);
        // Fits whole (checked above), so none of these waits.
        self.send(&header.encode())?;
        self.send(path.as_bytes())?;
        self.send(b"\0")?;
        self.send(value)?;
        Ok(true)
    }

    /// Writes `nodes` (path, value), in order, outside any transaction,
    /// waiting for one reply: all but the last go unacknowledged (or
    /// acknowledged, when the ring has no room), the last acknowledged.
    /// xenstored answers a connection's requests in order, so when the
    /// last is answered the others were done; an error answered to any
    /// of them fails the call. Not atomic: readers may see some nodes
    /// before others (publish what they read only after, e.g. with a
    /// state change).
    pub fn write_batch(&mut self, nodes: &[(&str, &[u8])]) -> Result<(), XsError> {
        let Some(((last_path, last_value), rest)) = nodes.split_last() else {
            return Ok(());
        };
        self.batch = Some(BatchReplies {
            first: self.next_req_id,
            error: None,
        });
        let written = self.write_batch_in_order(rest, last_path, last_value);
        let batch = self.batch.take();
        written?;
        match batch.and_then(|b| b.error) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn write_batch_in_order(
        &mut self,
        rest: &[(&str, &[u8])],
        last_path: &str,
        last_value: &[u8],
    ) -> Result<(), XsError> {
        // The acknowledged writes' notifies wake xenstored for the
        // unacknowledged ones sent before them.
        for (path, value) in rest {
            if !self.send_unacknowledged(path, value)? {
                self.write(Tx::NONE, path, value)?;
            }
        }
        self.write(Tx::NONE, last_path, last_value)
    }

    pub fn mkdir(&mut self, tx: Tx, path: &str) -> Result<(), XsError> {
        self.request(MsgType::Mkdir, tx, &[path], b"").map(drop)
    }

    /// Removes a node and everything below it.
    pub fn rm(&mut self, tx: Tx, path: &str) -> Result<(), XsError> {
        self.request(MsgType::Rm, tx, &[path], b"").map(drop)
    }

    /// Names of the children of `path`.
    pub fn directory(&mut self, tx: Tx, path: &str) -> Result<Vec<String>, XsError> {
        split_strings(&self.request(MsgType::Directory, tx, &[path], b"")?)
    }

    pub fn get_perms(&mut self, tx: Tx, path: &str) -> Result<Vec<Perm>, XsError> {
        parse_perms(&self.request(MsgType::GetPerms, tx, &[path], b"")?)
    }

    pub fn set_perms(&mut self, tx: Tx, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        self.request(MsgType::SetPerms, tx, &[path], &encode_perms(perms))
            .map(drop)
    }

    /// The home path of domain `domid` (`/local/domain/<domid>`).
    pub fn domain_path(&mut self, domid: DomId) -> Result<String, XsError> {
        let id = alloc::format!("{domid}");
        let reply = self.request(MsgType::GetDomainPath, Tx::NONE, &[&id], b"")?;
        split_strings(&reply)?.pop().ok_or(XsError::Protocol)
    }

    /// Watches `path` and everything below it; events carry `token`.
    /// Xenstored fires one event right away.
    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        self.request(MsgType::Watch, Tx::NONE, &[path, token], b"")
            .map(drop)
    }

    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        self.request(MsgType::Unwatch, Tx::NONE, &[path, token], b"")
            .map(drop)
    }

    /// The next watch event, without blocking: queued ones first (those
    /// that arrived while waiting for replies), then any in the ring.
    pub fn poll_watch_event(&mut self) -> Result<Option<WatchEvent>, XsError> {
        loop {
            if let Some(event) = self.watch_events.pop_front() {
                self.queued_watch_bytes -= watch_event_bytes(&event);
                return Ok(Some(event));
            }
            let Some((header, payload)) = self.try_receive()? else {
                return Ok(None);
            };
            // Anything but an event here is a reply nobody waits for.
            if header.msg_type == MsgType::WatchEvent as u32 {
                self.queue_watch_event(&payload);
            }
        }
    }

    /// Runs `body` in a transaction and commits it, starting over while
    /// xenstored reports a conflict (EAGAIN). `body` may run several
    /// times, so it must not have effects outside xenstore.
    pub fn transaction<T>(
        &mut self,
        mut body: impl FnMut(&mut Self, Tx) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        for _ in 0..MAX_TX_ATTEMPTS {
            let tx = self.transaction_start()?;
            match body(self, tx) {
                Ok(value) => match self.transaction_end(tx, true) {
                    Ok(()) => return Ok(value),
                    Err(XsError::Again) => continue,
                    Err(e) => return Err(e),
                },
                Err(e) => {
                    // The body's error matters more than a failed abort.
                    let _ = self.transaction_end(tx, false);
                    if e != XsError::Again {
                        return Err(e);
                    }
                }
            }
        }
        Err(XsError::TooManyRetries)
    }

    fn transaction_start(&mut self) -> Result<Tx, XsError> {
        let reply = self.request(MsgType::TransactionStart, Tx::NONE, &[], b"\0")?;
        let id = split_strings(&reply)?
            .first()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|id| *id != 0)
            .ok_or(XsError::Protocol)?;
        Ok(Tx(id))
    }

    fn transaction_end(&mut self, tx: Tx, commit: bool) -> Result<(), XsError> {
        let verdict: &[u8] = if commit { b"T\0" } else { b"F\0" };
        self.request(MsgType::TransactionEnd, tx, &[], verdict)
            .map(drop)
    }

    /// Sends one request (each of `strings` nul-terminated, then `tail` as
    /// is) and waits for its reply, queueing watch events that arrive in
    /// between.
    fn request(
        &mut self,
        msg_type: MsgType,
        tx: Tx,
        strings: &[&str],
        tail: &[u8],
    ) -> Result<Vec<u8>, XsError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        if !strings.iter().all(|s| valid_string_arg(s)) {
            return Err(XsError::Invalid);
        }
        let len = strings.iter().map(|s| s.len() + 1).sum::<usize>() + tail.len();
        if len > PAYLOAD_MAX {
            return Err(XsError::RequestTooLarge);
        }
        let req_id = self.take_req_id();
        let header = Header {
            msg_type: msg_type as u32,
            req_id,
            tx_id: tx.0,
            len: len as u32,
        };
        self.begin_request(len);
        self.send(&header.encode())?;
        for s in strings {
            self.send(s.as_bytes())?;
            self.send(b"\0")?;
        }
        self.send(tail)?;
        self.channel.notify();
        loop {
            let (reply, payload) = self.receive()?;
            if reply.msg_type == MsgType::WatchEvent as u32 {
                self.queue_watch_event(&payload);
            } else if reply.req_id != req_id {
                // A reply to an unacknowledged write or to an abandoned
                // request (e.g. after a timeout).
                self.note_batch_reply(&reply, &payload, req_id);
                continue;
            } else if reply.msg_type == MsgType::Error as u32 {
                return Err(XsError::from_payload(&payload));
            } else if reply.msg_type == msg_type as u32 {
                return Ok(payload);
            } else {
                return Err(self.fail(XsError::Protocol));
            }
        }
    }

    fn take_req_id(&mut self) -> u32 {
        let id = self.next_req_id;
        self.next_req_id = id.wrapping_add(1);
        if let Some(record) = self.record {
            record
                .next_req_id
                .store(self.next_req_id, Ordering::Release);
        }
        id
    }

    /// A request of `payload` bytes (after its header) is sent next.
    fn begin_request(&mut self, payload: usize) {
        if let Some(record) = self.record {
            record
                .request_left
                .store((HEADER_LEN + payload) as u32, Ordering::Release);
        }
    }

    fn send(&mut self, mut bytes: &[u8]) -> Result<(), XsError> {
        loop {
            let written = self
                .iface
                .requests()
                .write(bytes)
                .map_err(|_| self.fail(XsError::RingCorrupt))?;
            if let Some(record) = self.record {
                let left = record.request_left.load(Ordering::Acquire);
                let left = left.saturating_sub(written as u32);
                record.request_left.store(left, Ordering::Release);
            }
            bytes = &bytes[written..];
            if bytes.is_empty() {
                return Ok(());
            }
            // The ring is full: let xenstored drain it.
            self.channel.notify();
            self.channel.wait().map_err(|_| XsError::Timeout)?;
        }
    }

    fn receive(&mut self) -> Result<(Header, Vec<u8>), XsError> {
        loop {
            if let Some(message) = self.try_receive()? {
                return Ok(message);
            }
            self.channel.wait().map_err(|_| XsError::Timeout)?;
        }
    }

    /// Reads what the ring holds of the current message; returns it once
    /// complete. Never reads past the message, so partial reads resume.
    fn try_receive(&mut self) -> Result<Option<(Header, Vec<u8>)>, XsError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        loop {
            let header = match <&[u8; HEADER_LEN]>::try_from(
                self.partial.get(..HEADER_LEN).unwrap_or(&[]),
            ) {
                Ok(bytes) => Some(Header::decode(bytes).map_err(|e| self.fail(e))?),
                Err(_) => None,
            };
            let wanted = header.map_or(HEADER_LEN, |h| HEADER_LEN + h.len as usize);
            if let (Some(header), true) = (header, self.partial.len() == wanted) {
                let payload = self.partial.split_off(HEADER_LEN);
                self.partial.clear();
                if let Some(record) = self.record {
                    record.reply_taken.store(0, Ordering::Release);
                }
                return Ok(Some((header, payload)));
            }
            let have = self.partial.len();
            self.partial.resize(wanted, 0);
            let read = self.iface.responses().read(&mut self.partial[have..]);
            let read = read.map_err(|_| self.fail(XsError::RingCorrupt))?;
            self.partial.truncate(have + read);
            if let Some(record) = self.record {
                for (kept, byte) in record.reply_header.iter().zip(&self.partial).skip(have) {
                    kept.store(*byte, Ordering::Release);
                }
                record
                    .reply_taken
                    .store(self.partial.len() as u32, Ordering::Release);
            }
            if read == 0 {
                return Ok(None);
            }
            // Space was freed: xenstored may be waiting to write more.
            self.channel.notify();
        }
    }

    /// Keeps the first error answered to a [`Self::write_batch`] write
    /// sent before the one `awaited` (that one's reply is its caller's).
    fn note_batch_reply(&mut self, reply: &Header, payload: &[u8], awaited: u32) {
        if let Some(batch) = &mut self.batch
            && reply.msg_type == MsgType::Error as u32
            && reply.req_id.wrapping_sub(batch.first) < awaited.wrapping_sub(batch.first)
        {
            batch.error.get_or_insert(XsError::from_payload(payload));
        }
    }

    fn queue_watch_event(&mut self, payload: &[u8]) {
        // A malformed event carries nothing usable; drop it.
        let Ok(mut fields) = split_strings(payload) else {
            return;
        };
        if fields.len() < 2 {
            return;
        }
        let token = fields.swap_remove(1);
        let path = fields.swap_remove(0);
        let event = WatchEvent { path, token };
        let bytes = watch_event_bytes(&event);
        while self.watch_events.len() == MAX_QUEUED_WATCH_EVENTS
            || self.queued_watch_bytes + bytes > MAX_QUEUED_WATCH_EVENT_BYTES
        {
            let Some(oldest) = self.watch_events.pop_front() else {
                break;
            };
            self.queued_watch_bytes -= watch_event_bytes(&oldest);
            self.dropped_watch_events += 1;
        }
        self.queued_watch_bytes += bytes;
        self.watch_events.push_back(event);
    }

    fn fail(&mut self, e: XsError) -> XsError {
        self.broken = Some(e);
        e
    }
}

/// Writes sent without waiting for their replies, xenstored woken once
/// for all of them when dropped (see [`Xenstore::unacknowledged_writes`]).
pub struct UnacknowledgedWrites<'x, 'a, C: PeerChannel> {
    xs: &'x mut Xenstore<'a, C>,
    sent: bool,
}

impl<C: PeerChannel> UnacknowledgedWrites<'_, '_, C> {
    /// As [`Xenstore::write_unacknowledged`], the notify left to the drop.
    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<bool, XsError> {
        let sent = self.xs.send_unacknowledged(path, value)?;
        self.sent |= sent;
        Ok(sent)
    }
}

impl<C: PeerChannel> Drop for UnacknowledgedWrites<'_, '_, C> {
    fn drop(&mut self) {
        if self.sent {
            self.xs.channel.notify();
        }
    }
}

/// A connection's channel lent to [`Xenstore::with_wait_work`]: its
/// waits do the lender's work.
pub struct WorkingChannel<'w, C> {
    inner: &'w mut C,
    work: &'w mut dyn FnMut() -> bool,
}

impl<C: PeerChannel> PeerChannel for WorkingChannel<'_, C> {
    fn notify(&mut self) {
        self.inner.notify();
    }

    fn wait(&mut self) -> Result<(), TimedOut> {
        self.inner.wait_working(self.work)
    }
}

/// What a queued event counts against [`MAX_QUEUED_WATCH_EVENT_BYTES`].
fn watch_event_bytes(event: &WatchEvent) -> usize {
    event.path.len() + event.token.len()
}

/// Whether a path or token can be sent: non-empty, bounded, and free of
/// nul bytes (which would split it on the wire).
fn valid_string_arg(s: &str) -> bool {
    !s.is_empty() && s.len() <= PATH_MAX && !s.as_bytes().contains(&0)
}

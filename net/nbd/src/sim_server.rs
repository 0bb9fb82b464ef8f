//! A simulated NBD server, for the client's tests and (feature `sim`)
//! other crates': fixed or plain newstyle, with or without `NBD_OPT_GO`
//! and structured replies, replies released in order or shuffled, read
//! replies split into many chunks and holes.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::wire::*;

/// What the simulated server offers.
#[derive(Clone, Debug)]
pub struct SimServerOptions {
    pub export_name: Vec<u8>,
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
    pub knows_go: bool,
    pub knows_structured: bool,
    pub transmission_flags: u16,
    pub block_size: Option<(u32, u32, u32)>,
    /// Releases the replies of each batch of requests in random order.
    pub shuffle_replies: bool,
    /// Splits structured read replies into many chunks, zero runs as holes.
    pub split_reads: bool,
}

impl SimServerOptions {
    pub fn everything(export_name: &[u8]) -> Self {
        SimServerOptions {
            export_name: export_name.to_vec(),
            fixed_newstyle: true,
            no_zeroes: true,
            knows_go: true,
            knows_structured: true,
            // HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN
            transmission_flags: 1 | 4 | 8 | 32 | 64 | 256,
            block_size: Some((512, 4096, 1 << 20)),
            shuffle_replies: true,
            split_reads: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SimPhase {
    ClientFlags,
    Options,
    Transmission,
    Closed,
}

/// One request as the simulated server received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub command: u16,
    pub flags: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub struct SimServer {
    pub options: SimServerOptions,
    phase: SimPhase,
    client_no_zeroes: bool,
    structured: bool,
    input: Vec<u8>,
    pub output: VecDeque<u8>,
    /// Replies produced but not yet released into `output`.
    held_replies: Vec<Vec<u8>>,
    /// Every request received, in order.
    pub seen: Vec<SeenRequest>,
    rng: SimRandom,
}

impl SimServer {
    pub fn new(options: SimServerOptions, seed: u64) -> Self {
        let mut output = VecDeque::new();
        let mut handshake_flags = 0u16;
        if options.fixed_newstyle {
            handshake_flags |= NBD_FLAG_FIXED_NEWSTYLE;
        }
        if options.no_zeroes {
            handshake_flags |= NBD_FLAG_NO_ZEROES;
        }
        output.extend(NBD_INIT_MAGIC.to_be_bytes());
        output.extend(NBD_OPTS_MAGIC.to_be_bytes());
        output.extend(handshake_flags.to_be_bytes());
        SimServer {
            options,
            phase: SimPhase::ClientFlags,
            client_no_zeroes: false,
            structured: false,
            input: Vec::new(),
            output,
            held_replies: Vec::new(),
            seen: Vec::new(),
            rng: SimRandom(seed),
        }
    }

    pub fn closed(&self) -> bool {
        self.phase == SimPhase::Closed
    }

    /// Takes the client's bytes and acts on every whole message, against `disk`.
    pub fn receive(&mut self, bytes: &[u8], disk: &mut [u8]) {
        self.input.extend_from_slice(bytes);
        while self.step(disk) {}
    }

    /// Moves every held reply into the output, shuffled if so configured.
    pub fn release_replies(&mut self) {
        let mut replies = core::mem::take(&mut self.held_replies);
        if self.options.shuffle_replies {
            for i in (1..replies.len()).rev() {
                replies.swap(i, self.rng.below(i as u64 + 1) as usize);
            }
        }
        replies
            .into_iter()
            .for_each(|reply| self.output.extend(reply));
    }

    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        (self.input.len() >= n).then(|| self.input.drain(..n).collect())
    }

    fn step(&mut self, disk: &mut [u8]) -> bool {
        match self.phase {
            SimPhase::ClientFlags => match self.take(4) {
                Some(flags) => {
                    self.client_no_zeroes = be_u32(&flags, 0) & NBD_FLAG_C_NO_ZEROES != 0;
                    self.phase = SimPhase::Options;
                    true
                }
                None => false,
            },
            SimPhase::Options => {
                if self.input.len() < 16 {
                    return false;
                }
                let len = be_u32(&self.input, 12) as usize;
                let Some(option) = self.take(16 + len) else {
                    return false;
                };
                self.on_option(be_u32(&option, 8), &option[16..], disk.len() as u64);
                true
            }
            SimPhase::Transmission => self.on_request(disk),
            SimPhase::Closed => false,
        }
    }

    fn option_reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        self.output.extend(option_reply_bytes(option, reply, data));
    }

    fn on_option(&mut self, option: u32, data: &[u8], size: u64) {
        match option {
            NBD_OPT_STRUCTURED_REPLY if self.options.knows_structured => {
                self.structured = true;
                self.option_reply(option, NBD_REP_ACK, &[]);
            }
            NBD_OPT_GO if self.options.knows_go => {
                let name_len = be_u32(data, 0) as usize;
                if data[4..4 + name_len] != self.options.export_name[..] {
                    self.option_reply(option, NBD_REP_ERR_UNKNOWN, b"no such export");
                    return;
                }
                let mut export = Vec::from(NBD_INFO_EXPORT.to_be_bytes());
                export.extend(size.to_be_bytes());
                export.extend(self.options.transmission_flags.to_be_bytes());
                self.option_reply(option, NBD_REP_INFO, &export);
                // A name the client did not ask for: to be ignored.
                self.option_reply(option, NBD_REP_INFO, &[0, 1, b'x']);
                if let Some((minimum, preferred, maximum)) = self.options.block_size {
                    let mut info = Vec::from(NBD_INFO_BLOCK_SIZE.to_be_bytes());
                    [minimum, preferred, maximum]
                        .iter()
                        .for_each(|v| info.extend(v.to_be_bytes()));
                    self.option_reply(option, NBD_REP_INFO, &info);
                }
                self.option_reply(option, NBD_REP_ACK, &[]);
                self.phase = SimPhase::Transmission;
            }
            NBD_OPT_EXPORT_NAME => {
                if data != &self.options.export_name[..] {
                    self.phase = SimPhase::Closed;
                    return;
                }
                self.output.extend(size.to_be_bytes());
                self.output
                    .extend(self.options.transmission_flags.to_be_bytes());
                if !self.client_no_zeroes {
                    self.output.extend([0; 124]);
                }
                self.phase = SimPhase::Transmission;
            }
            _ => self.option_reply(option, NBD_REP_ERR_UNSUP, b""),
        }
    }

    fn on_request(&mut self, disk: &mut [u8]) -> bool {
        if self.input.len() < NBD_REQUEST_LEN {
            return false;
        }
        let header = &self.input[..NBD_REQUEST_LEN];
        assert_eq!(
            be_u32(header, 0),
            NBD_REQUEST_MAGIC,
            "the client sent a bad request magic"
        );
        let request = SeenRequest {
            flags: be_u16(header, 4),
            command: be_u16(header, 6),
            cookie: be_u64(header, 8),
            offset: be_u64(header, 16),
            len: be_u32(header, 24),
        };
        let payload_len = if request.command == NBD_CMD_WRITE {
            request.len as usize
        } else {
            0
        };
        let Some(message) = self.take(NBD_REQUEST_LEN + payload_len) else {
            return false;
        };
        self.seen.push(request);
        let range = request.offset as usize..request.offset as usize + request.len as usize;
        match request.command {
            NBD_CMD_READ => {
                let data = disk[range].to_vec();
                let reply = if self.structured {
                    self.structured_read_reply(request.cookie, request.offset, &data)
                } else {
                    let mut reply = simple_reply_bytes(0, request.cookie);
                    reply.extend(data);
                    reply
                };
                self.held_replies.push(reply);
            }
            NBD_CMD_WRITE => {
                disk[range].copy_from_slice(&message[NBD_REQUEST_LEN..]);
                self.held_replies
                    .push(simple_reply_bytes(0, request.cookie));
            }
            NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES => {
                disk[range].fill(0);
                self.held_replies
                    .push(simple_reply_bytes(0, request.cookie));
            }
            NBD_CMD_FLUSH => self
                .held_replies
                .push(simple_reply_bytes(0, request.cookie)),
            NBD_CMD_DISC => self.phase = SimPhase::Closed,
            _ => self
                .held_replies
                .push(simple_reply_bytes(NBD_EINVAL, request.cookie)),
        }
        true
    }

    fn structured_read_reply(&mut self, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
        let mut pieces = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let n = if self.options.split_reads {
                1 + self.rng.below(data.len() as u64 - at as u64).min(700) as usize
            } else {
                data.len() - at
            };
            pieces.push((at, n));
            at += n;
        }
        // Chunks of one reply may come in any order, but DONE comes last.
        if self.options.split_reads {
            for i in (1..pieces.len()).rev() {
                pieces.swap(i, self.rng.below(i as u64 + 1) as usize);
            }
        }
        let mut reply = Vec::new();
        for (at, n) in pieces {
            let piece = &data[at..at + n];
            let chunk_offset = (offset + at as u64).to_be_bytes();
            if self.options.split_reads && piece.iter().all(|&b| b == 0) {
                let mut hole = Vec::from(chunk_offset);
                hole.extend((n as u32).to_be_bytes());
                reply.extend(chunk_bytes(0, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, &hole));
            } else {
                let mut payload = Vec::from(chunk_offset);
                payload.extend_from_slice(piece);
                reply.extend(chunk_bytes(0, NBD_REPLY_TYPE_OFFSET_DATA, cookie, &payload));
            }
        }
        reply.extend(chunk_bytes(
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_NONE,
            cookie,
            &[],
        ));
        reply
    }
}

/// The server's shuffles and splits: a linear congruential generator
/// (MMIX's constants), std-free so that feature `sim` builds in `no_std`
/// workspaces.
struct SimRandom(u64);

impl SimRandom {
    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

pub fn option_reply_bytes(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::from(NBD_OPTION_REPLY_MAGIC.to_be_bytes());
    bytes.extend(option.to_be_bytes());
    bytes.extend(reply.to_be_bytes());
    bytes.extend((data.len() as u32).to_be_bytes());
    bytes.extend_from_slice(data);
    bytes
}

pub fn simple_reply_bytes(error: u32, cookie: u64) -> Vec<u8> {
    let mut bytes = Vec::from(NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    bytes.extend(error.to_be_bytes());
    bytes.extend(cookie.to_be_bytes());
    bytes
}

pub fn chunk_bytes(flags: u16, chunk_type: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::from(NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    bytes.extend(flags.to_be_bytes());
    bytes.extend(chunk_type.to_be_bytes());
    bytes.extend(cookie.to_be_bytes());
    bytes.extend((payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

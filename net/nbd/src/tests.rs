//! The client against a simulated server (scripted and randomised), and
//! against hostile byte streams.

mod disconnects;
mod hostile;
mod scripted;

use std::collections::HashMap;
use std::vec::Vec;

use host_fuzz::FuzzRng;

use crate::sim_server::{SimServer, SimServerOptions};
use crate::*;

/// The caller's memory: one buffer per tag (write data, read destination).
#[derive(Default)]
struct TagBuffers {
    buffers: HashMap<u64, Vec<u8>>,
}

impl NbdPayload for TagBuffers {
    fn write_payload(&mut self, tag: u64, at: u32, out: &mut [u8]) {
        let at = at as usize;
        out.copy_from_slice(&self.buffers[&tag][at..at + out.len()]);
    }
    fn read_payload(&mut self, tag: u64, at: u32, bytes: &[u8]) {
        let at = at as usize;
        self.buffers.get_mut(&tag).unwrap()[at..at + bytes.len()].copy_from_slice(bytes);
    }
    fn read_zeroes(&mut self, tag: u64, at: u32, len: u32) {
        let at = at as usize;
        self.buffers.get_mut(&tag).unwrap()[at..at + len as usize].fill(0);
    }
}

const DISK_SIZE: usize = 1 << 20;

const READ_0: NbdCommand = NbdCommand::Read {
    offset: 0,
    len: 512,
};

fn test_config() -> NbdConfig {
    NbdConfig {
        export_name: b"disk0".to_vec(),
        max_in_flight: 32,
        max_payload: 1 << 20,
        request_timeout: 1000,
        structured_replies: true,
    }
}

/// A client, a simulated server and the disk behind it, with byte moves
/// between them in random-sized pieces.
struct Rig {
    client: NbdClient,
    server: SimServer,
    disk: Vec<u8>,
    memory: TagBuffers,
    rng: FuzzRng,
    /// The largest piece of bytes moved at once.
    max_piece: u64,
    /// Completion results by tag, each in the order it came.
    completed: HashMap<u64, Vec<Result<(), NbdRequestError>>>,
    seed: u64,
    /// Every byte the client received, when set.
    record: Option<Vec<u8>>,
    /// Drops the connection once this many bytes went this way on it
    /// (true: to the server), then connects to a new server on the same disk.
    cut_after: Option<(bool, u64)>,
    /// Bytes moved to the server and to the client on this connection.
    moved: (u64, u64),
}

impl Rig {
    fn new(options: SimServerOptions, seed: u64) -> Self {
        let mut client = NbdClient::new(test_config()).unwrap();
        assert!(client.connection_started());
        let mut disk = std::vec![0u8; DISK_SIZE];
        FuzzRng::new(seed ^ 0xd15c).fill(&mut disk[..DISK_SIZE / 16]);
        Rig {
            client,
            server: SimServer::new(options, seed),
            disk,
            memory: TagBuffers::default(),
            rng: FuzzRng::new(seed),
            max_piece: 1 << 16,
            completed: HashMap::new(),
            seed,
            record: None,
            cut_after: None,
            moved: (0, 0),
        }
    }

    /// A rig whose handshake with a server offering everything is done.
    fn ready(seed: u64) -> Self {
        let mut rig = Rig::new(SimServerOptions::everything(b"disk0"), seed);
        rig.pump(true).unwrap();
        rig
    }

    /// Moves bytes both ways until neither side has more; replies are
    /// released as they are produced when `release` is set.
    fn pump(&mut self, release: bool) -> Result<(), NbdConnectionError> {
        loop {
            let mut moved = false;
            while self.client.wants_to_transmit() {
                let mut buf = std::vec![0u8; 1 + self.rng.below(self.max_piece) as usize];
                let n = self.client.transmit(&mut buf, &mut self.memory);
                let delivered = self.cut_piece(true, n);
                self.server.receive(&buf[..delivered], &mut self.disk);
                moved |= n > 0;
                if delivered < n {
                    self.reconnect();
                    break;
                }
                if n == 0 {
                    break;
                }
            }
            if release {
                self.server.release_replies();
            }
            while !self.server.output.is_empty() {
                let n = (1 + self.rng.below(self.max_piece) as usize).min(self.server.output.len());
                let piece: Vec<u8> = self.server.output.drain(..n).collect();
                if let Some(record) = &mut self.record {
                    record.extend_from_slice(&piece);
                }
                let delivered = self.cut_piece(false, n);
                self.client.receive(&piece[..delivered], &mut self.memory)?;
                moved = true;
                if delivered < n {
                    self.reconnect();
                    break;
                }
            }
            self.collect();
            if !moved {
                return Ok(());
            }
        }
    }

    /// How much of `n` bytes going one way arrive before the cut.
    fn cut_piece(&mut self, to_server: bool, n: usize) -> usize {
        let moved = if to_server {
            &mut self.moved.0
        } else {
            &mut self.moved.1
        };
        let allowed = match self.cut_after {
            Some((side, limit)) if side == to_server => {
                (limit.saturating_sub(*moved) as usize).min(n)
            }
            _ => n,
        };
        *moved += allowed as u64;
        allowed
    }

    /// The connection drops; the client reconnects to a fresh server on the same disk.
    fn reconnect(&mut self) {
        self.client.connection_lost();
        self.cut_after = None;
        self.moved = (0, 0);
        self.server = SimServer::new(self.server.options.clone(), self.rng.next_u64());
        assert!(self.client.connection_started());
    }

    fn collect(&mut self) {
        while let Some(done) = self.client.next_completion() {
            self.completed
                .entry(done.tag)
                .or_default()
                .push(done.result);
        }
    }

    fn submit(&mut self, tag: u64, command: NbdCommand, order: NbdOrder) {
        let len = match command {
            NbdCommand::Read { len, .. } | NbdCommand::Write { len, .. } => len as usize,
            _ => 0,
        };
        let mut buffer = std::vec![0u8; len];
        if matches!(command, NbdCommand::Write { .. }) {
            FuzzRng::new(tag ^ self.seed).fill(&mut buffer);
        }
        self.memory.buffers.insert(tag, buffer);
        self.client.submit(0, tag, command, order).unwrap();
    }

    fn result_of(&self, tag: u64) -> Result<(), NbdRequestError> {
        let results = &self.completed[&tag];
        assert_eq!(
            results.len(),
            1,
            "tag {tag} completed {} times",
            results.len()
        );
        results[0]
    }
}

/// Requests whose replies the test checks against a model disk: writes to
/// distinct ranges, then reads of them and of data never written.
fn write_then_read_batches(rig: &mut Rig, batch: u64) -> Vec<(u64, NbdCommand)> {
    (0..8)
        .map(|i| {
            let offset = (i * 8 + batch % 8) * 4096;
            let len = 512 * (1 + (i as u32 * 3) % 16);
            let command = if batch.is_multiple_of(2) {
                NbdCommand::Write {
                    offset,
                    len,
                    fua: i % 3 == 0,
                }
            } else {
                NbdCommand::Read { offset, len }
            };
            let tag = batch * 100 + i;
            rig.submit(tag, command, NbdOrder::Free);
            (tag, command)
        })
        .collect()
}

/// Checks each read's buffer against the disk.
fn assert_reads_match_disk(rig: &Rig, requests: &[(u64, NbdCommand)]) {
    for (tag, command) in requests {
        assert_eq!(rig.result_of(*tag), Ok(()));
        if let NbdCommand::Read { offset, len } = *command {
            let want = &rig.disk[offset as usize..offset as usize + len as usize];
            assert!(
                rig.memory.buffers[tag] == want,
                "read {tag} returned other data"
            );
        }
    }
}

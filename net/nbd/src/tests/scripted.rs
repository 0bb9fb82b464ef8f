//! Handshake variants, many requests in flight with replies reordered and
//! split, ordering of flushes and drains, timeouts and refusals.

use super::sim_server::*;
use super::*;
use crate::wire::*;

/// Writes then reads back through a server with `options`, bytes moved in
/// pieces of at most `max_piece`.
fn round_trip(options: SimServerOptions, max_piece: u64, seed: u64) -> Rig {
    let mut rig = Rig::new(options, seed);
    rig.max_piece = max_piece;
    rig.pump(true).unwrap();
    assert_eq!(rig.client.link_state(), NbdLinkState::Ready);
    let writes = write_then_read_batches(&mut rig, 0);
    rig.pump(true).unwrap();
    assert_reads_match_disk(&rig, &writes);
    let reads = write_then_read_batches(&mut rig, 1);
    rig.pump(true).unwrap();
    assert_reads_match_disk(&rig, &reads);
    rig
}

#[test]
fn go_with_structured_replies_and_block_size_reports_the_export() {
    let rig = round_trip(SimServerOptions::everything(b"disk0"), 1 << 16, 1);
    let export = rig.client.export().unwrap();
    assert_eq!(export.size, DISK_SIZE as u64);
    assert!(export.structured_replies && export.can_flush() && export.can_fua());
    assert!(export.can_trim() && export.can_write_zeroes() && export.can_multi_conn());
    assert!(!export.read_only() && !export.rotational());
    let block_size = NbdBlockSize {
        minimum: 512,
        preferred: 4096,
        maximum: 1 << 20,
    };
    assert_eq!(export.block_size, Some(block_size));
}

#[test]
fn every_handshake_fallback_round_trips_data() {
    let base = SimServerOptions::everything(b"disk0");
    let variants = [
        SimServerOptions {
            knows_go: false,
            ..base.clone()
        },
        SimServerOptions {
            knows_structured: false,
            ..base.clone()
        },
        SimServerOptions {
            knows_go: false,
            knows_structured: false,
            no_zeroes: false,
            ..base.clone()
        },
        SimServerOptions {
            fixed_newstyle: false,
            no_zeroes: false,
            ..base.clone()
        },
        SimServerOptions {
            fixed_newstyle: false,
            ..base.clone()
        },
        SimServerOptions {
            block_size: None,
            ..base.clone()
        },
    ];
    for (i, options) in variants.into_iter().enumerate() {
        let expect_structured = options.fixed_newstyle && options.knows_structured;
        let rig = round_trip(options, 1 << 16, 10 + i as u64);
        let export = rig.client.export().unwrap();
        assert_eq!(export.structured_replies, expect_structured, "variant {i}");
        assert_eq!(export.size, DISK_SIZE as u64);
    }
}

#[test]
fn replies_reordered_and_read_chunks_split_byte_by_byte_still_land_right() {
    let rig = round_trip(SimServerOptions::everything(b"disk0"), 1, 2);
    // All eight requests of a batch were in flight together.
    let first_reply = rig
        .server
        .seen
        .iter()
        .position(|r| r.command == NBD_CMD_READ)
        .unwrap();
    assert!(first_reply >= 8);
    let simple = SimServerOptions {
        knows_structured: false,
        ..SimServerOptions::everything(b"disk0")
    };
    round_trip(simple, 3, 3);
}

#[test]
fn a_flush_waits_for_the_replies_of_the_writes_before_it() {
    let mut rig = Rig::ready(7);
    let write = |offset| NbdCommand::Write {
        offset,
        len: 4096,
        fua: false,
    };
    rig.submit(1, write(0), NbdOrder::Free);
    rig.submit(2, write(8192), NbdOrder::Free);
    rig.submit(3, NbdCommand::Flush, NbdOrder::Free);
    rig.submit(
        4,
        NbdCommand::Read {
            offset: 0,
            len: 512,
        },
        NbdOrder::Free,
    );
    rig.pump(false).unwrap();
    let commands: Vec<u16> = rig.server.seen.iter().map(|r| r.command).collect();
    assert_eq!(
        commands,
        [NBD_CMD_WRITE, NBD_CMD_WRITE],
        "flush sent before the writes' replies"
    );
    rig.pump(true).unwrap();
    let commands: Vec<u16> = rig.server.seen.iter().map(|r| r.command).collect();
    assert_eq!(
        commands,
        [NBD_CMD_WRITE, NBD_CMD_WRITE, NBD_CMD_FLUSH, NBD_CMD_READ]
    );
    (1..=4).for_each(|tag| assert_eq!(rig.result_of(tag), Ok(())));
}

#[test]
fn a_barrier_as_drained_flush_and_fua_write_runs_alone() {
    let mut rig = Rig::ready(7);
    rig.submit(
        1,
        NbdCommand::Read {
            offset: 0,
            len: 512,
        },
        NbdOrder::Free,
    );
    rig.submit(2, NbdCommand::Flush, NbdOrder::Drain);
    rig.submit(
        3,
        NbdCommand::Write {
            offset: 0,
            len: 512,
            fua: true,
        },
        NbdOrder::Drain,
    );
    rig.submit(
        4,
        NbdCommand::Read {
            offset: 0,
            len: 512,
        },
        NbdOrder::Free,
    );
    let mut sent_counts = Vec::new();
    for _ in 0..5 {
        rig.pump(false).unwrap();
        sent_counts.push(rig.server.seen.len());
        rig.server.release_replies();
    }
    rig.pump(true).unwrap();
    assert_eq!(
        sent_counts,
        [1, 2, 3, 4, 4],
        "a drain overlapped another request"
    );
    assert_eq!(rig.server.seen[2].flags, NBD_CMD_FLAG_FUA);
    assert_eq!(rig.memory.buffers[&4], rig.memory.buffers[&3]);
}

#[test]
fn refused_submissions_say_why() {
    let mut rig = Rig::ready(7);
    let mut submit = |command| rig.client.submit(0, 9, command, NbdOrder::Free);
    assert_eq!(
        submit(NbdCommand::Read {
            offset: DISK_SIZE as u64,
            len: 512
        }),
        Err(NbdSubmitError::OutOfRange)
    );
    assert_eq!(
        submit(NbdCommand::Read {
            offset: u64::MAX - 10,
            len: 512
        }),
        Err(NbdSubmitError::OutOfRange)
    );
    assert_eq!(
        submit(NbdCommand::Read {
            offset: 1,
            len: 512
        }),
        Err(NbdSubmitError::Misaligned)
    );
    assert_eq!(
        submit(NbdCommand::Read { offset: 0, len: 0 }),
        Err(NbdSubmitError::BadLength)
    );
    assert_eq!(
        submit(NbdCommand::Read {
            offset: 0,
            len: 2 << 20
        }),
        Err(NbdSubmitError::BadLength)
    );

    let mut options = SimServerOptions::everything(b"disk0");
    options.transmission_flags = 1 | 2; // HAS_FLAGS, READ_ONLY
    let mut rig = Rig::new(options, 8);
    rig.pump(true).unwrap();
    let mut submit = |command| rig.client.submit(0, 9, command, NbdOrder::Free);
    assert_eq!(
        submit(NbdCommand::Write {
            offset: 0,
            len: 512,
            fua: false
        }),
        Err(NbdSubmitError::ReadOnly)
    );
    assert_eq!(
        submit(NbdCommand::Read {
            offset: 0,
            len: 512
        }),
        Ok(())
    );
    // No volatile cache: the flush completes at once.
    assert_eq!(submit(NbdCommand::Flush), Ok(()));
    assert_eq!(
        rig.client.next_completion(),
        Some(NbdCompletion {
            tag: 9,
            result: Ok(())
        })
    );

    let mut options = SimServerOptions::everything(b"disk0");
    options.transmission_flags = 1; // nothing optional
    let mut rig = Rig::new(options, 9);
    rig.pump(true).unwrap();
    let mut submit = |command| rig.client.submit(0, 9, command, NbdOrder::Free);
    assert_eq!(
        submit(NbdCommand::Trim {
            offset: 0,
            len: 512,
            fua: false
        }),
        Err(NbdSubmitError::NotSupported)
    );
    assert_eq!(
        submit(NbdCommand::WriteZeroes {
            offset: 0,
            len: 512,
            fua: false
        }),
        Err(NbdSubmitError::NotSupported)
    );
    assert_eq!(
        submit(NbdCommand::Write {
            offset: 0,
            len: 512,
            fua: true
        }),
        Err(NbdSubmitError::NotSupported)
    );

    let mut client = NbdClient::new(test_config()).unwrap();
    assert_eq!(
        client.submit(0, 1, NbdCommand::Flush, NbdOrder::Free),
        Err(NbdSubmitError::NotConnected)
    );
    assert!(
        NbdClient::new(NbdConfig {
            max_in_flight: 0,
            ..test_config()
        })
        .is_none()
    );
    assert!(
        NbdClient::new(NbdConfig {
            export_name: std::vec![b'a'; 4097],
            ..test_config()
        })
        .is_none()
    );
}

#[test]
fn a_full_table_refuses_until_completions_are_collected() {
    let mut rig = Rig::ready(7);
    for tag in 0..32 {
        rig.submit(
            tag,
            NbdCommand::Read {
                offset: 0,
                len: 512,
            },
            NbdOrder::Free,
        );
    }
    let refused = rig.client.submit(0, 99, READ_0, NbdOrder::Free);
    assert_eq!(refused, Err(NbdSubmitError::Full));
    rig.pump(true).unwrap();
    assert_eq!(rig.client.submit(0, 99, READ_0, NbdOrder::Free), Ok(()));
}

#[test]
fn trims_write_zeroes_and_a_clean_disconnect() {
    let mut rig = Rig::ready(7);
    rig.submit(
        1,
        NbdCommand::Trim {
            offset: 0,
            len: 4096,
            fua: true,
        },
        NbdOrder::Free,
    );
    rig.submit(
        2,
        NbdCommand::WriteZeroes {
            offset: 8192,
            len: 4096,
            fua: false,
        },
        NbdOrder::Free,
    );
    rig.client.request_disconnect();
    let read = NbdCommand::Read {
        offset: 0,
        len: 512,
    };
    assert_eq!(
        rig.client.submit(0, 3, read, NbdOrder::Free),
        Err(NbdSubmitError::Closed)
    );
    rig.pump(true).unwrap();
    assert_eq!((rig.result_of(1), rig.result_of(2)), (Ok(()), Ok(())));
    assert!(
        rig.disk[..4096]
            .iter()
            .chain(&rig.disk[8192..12288])
            .all(|&b| b == 0)
    );
    assert_eq!(rig.client.link_state(), NbdLinkState::Disconnected);
    assert!(rig.server.closed());
    assert!(!rig.client.connection_started());
}

/// A ready rig with one request of each given command sent and its reply
/// held; returns the cookies.
fn rig_with_sent(commands: &[NbdCommand]) -> (Rig, Vec<u64>) {
    let mut rig = Rig::ready(7);
    for (tag, command) in commands.iter().enumerate() {
        rig.submit(tag as u64, *command, NbdOrder::Free);
    }
    rig.pump(false).unwrap();
    rig.server.release_replies();
    rig.server.output.clear();
    let cookies = rig.server.seen.iter().map(|r| r.cookie).collect();
    (rig, cookies)
}

const WRITE_0: NbdCommand = NbdCommand::Write {
    offset: 0,
    len: 512,
    fua: false,
};

fn error_chunk(error: u32, message: &[u8], offset: Option<u64>) -> Vec<u8> {
    let mut payload = Vec::from(error.to_be_bytes());
    payload.extend((message.len() as u16).to_be_bytes());
    payload.extend_from_slice(message);
    payload.extend(offset.map(u64::to_be_bytes).into_iter().flatten());
    payload
}

#[test]
fn server_errors_fail_only_their_request() {
    let (mut rig, cookies) = rig_with_sent(&[WRITE_0, READ_0, READ_0, READ_0, READ_0]);
    let mut stream = simple_reply_bytes(NBD_ENOSPC, cookies[0]);
    let error = error_chunk(NBD_EIO, b"disk on fire", None);
    stream.extend(chunk_bytes(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        cookies[1],
        &error,
    ));
    let error = error_chunk(NBD_EPERM, b"", Some(0));
    stream.extend(chunk_bytes(
        0,
        NBD_REPLY_TYPE_ERROR_OFFSET,
        cookies[2],
        &error,
    ));
    stream.extend(chunk_bytes(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_NONE,
        cookies[2],
        &[],
    ));
    // An error type the client does not know is still an error.
    let error = error_chunk(12345, b"?", None);
    stream.extend(chunk_bytes(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR_BIT | 77,
        cookies[3],
        &error,
    ));
    let mut data = Vec::from(0u64.to_be_bytes());
    data.extend([7u8; 512]);
    stream.extend(chunk_bytes(
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_OFFSET_DATA,
        cookies[4],
        &data,
    ));
    rig.client.receive(&stream, &mut rig.memory).unwrap();
    rig.collect();
    let server = |e| Err(NbdRequestError::Server(e));
    assert_eq!(rig.result_of(0), server(NbdServerError::NoSpace));
    assert_eq!(rig.result_of(1), server(NbdServerError::Io));
    assert_eq!(rig.result_of(2), server(NbdServerError::NotPermitted));
    assert_eq!(rig.result_of(3), server(NbdServerError::Other(12345)));
    assert_eq!(rig.result_of(4), Ok(()));
    assert_eq!(rig.memory.buffers[&4], [7u8; 512]);
}

type Violation = fn(u64, u64) -> (Vec<u8>, NbdConnectionError);

fn data_chunk(cookie: u64, flags: u16, at: u64, len: usize) -> Vec<u8> {
    let mut payload = Vec::from(at.to_be_bytes());
    payload.extend(std::vec![1u8; len]);
    chunk_bytes(flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, &payload)
}

fn bad_chunk(cookie: u64, chunk_type: u16, len: u32) -> NbdConnectionError {
    NbdConnectionError::BadChunk {
        cookie,
        chunk_type,
        len,
    }
}

const DONE: u16 = NBD_REPLY_FLAG_DONE;

/// Server streams that break the protocol, given the cookies of a read and
/// a write in flight, and the error each must end the connection with.
const VIOLATIONS: [Violation; 14] = [
    |_, _| {
        (
            std::vec![0xde, 0xad, 0xbe, 0xef],
            NbdConnectionError::BadReplyMagic(0xdead_beef),
        )
    },
    |read, _| {
        (
            simple_reply_bytes(0, read ^ (1 << 40)),
            NbdConnectionError::UnknownCookie(read ^ (1 << 40)),
        )
    },
    |_, _| {
        (
            simple_reply_bytes(0, 31),
            NbdConnectionError::UnknownCookie(31),
        )
    },
    |read, _| {
        (
            simple_reply_bytes(0, read),
            NbdConnectionError::WrongReplyKind(read),
        )
    },
    |read, _| {
        (
            chunk_bytes(0, NBD_REPLY_TYPE_NONE, read, &[]),
            bad_chunk(read, NBD_REPLY_TYPE_NONE, 0),
        )
    },
    |_, write| {
        (
            data_chunk(write, DONE, 0, 512),
            bad_chunk(write, NBD_REPLY_TYPE_OFFSET_DATA, 520),
        )
    },
    |read, _| {
        (
            data_chunk(read, DONE, 0, 513),
            bad_chunk(read, NBD_REPLY_TYPE_OFFSET_DATA, 521),
        )
    },
    |read, _| {
        (
            data_chunk(read, DONE, 256, 512),
            NbdConnectionError::ChunkOutOfRange(read),
        )
    },
    |read, _| {
        let overlapping = [data_chunk(read, 0, 0, 300), data_chunk(read, DONE, 0, 300)].concat();
        (overlapping, NbdConnectionError::ChunkOutOfRange(read))
    },
    |read, _| {
        (
            data_chunk(read, DONE, 0, 300),
            NbdConnectionError::IncompleteRead(read),
        )
    },
    |read, _| {
        let short = &error_chunk(NBD_EIO, b"abc", None)[..8];
        (
            chunk_bytes(DONE, NBD_REPLY_TYPE_ERROR, read, short),
            bad_chunk(read, NBD_REPLY_TYPE_ERROR, 8),
        )
    },
    |read, _| {
        let huge = std::vec![0; 5000];
        (
            chunk_bytes(DONE, NBD_REPLY_TYPE_ERROR, read, &huge),
            bad_chunk(read, NBD_REPLY_TYPE_ERROR, 5000),
        )
    },
    |read, _| (chunk_bytes(DONE, 99, read, &[]), bad_chunk(read, 99, 0)),
    |_, write| {
        (
            simple_reply_bytes(NBD_ESHUTDOWN, write),
            NbdConnectionError::ServerShuttingDown,
        )
    },
];

#[test]
fn every_transmission_violation_ends_the_connection_and_the_requests_are_replayed() {
    let (mut rig, mut cookies) = rig_with_sent(&[READ_0, WRITE_0]);
    for (i, violation) in VIOLATIONS.iter().enumerate() {
        let (stream, want) = violation(cookies[0], cookies[1]);
        assert_eq!(
            rig.client.receive(&stream, &mut rig.memory),
            Err(want),
            "case {i}"
        );
        assert_eq!(rig.client.link_state(), NbdLinkState::Down);
        assert_eq!(rig.client.pending(), 2);
        rig.server = SimServer::new(SimServerOptions::everything(b"disk0"), i as u64);
        assert!(rig.client.connection_started());
        rig.pump(false).unwrap();
        rig.server.release_replies();
        rig.server.output.clear();
        assert_eq!(rig.server.seen.len(), 2, "case {i}: both requests replayed");
        cookies = rig.server.seen.iter().map(|r| r.cookie).collect();
        rig.collect();
        assert!(rig.completed.is_empty(), "case {i}: a request completed");
    }
    // The last connection answers for real: each completes once.
    rig.server = SimServer::new(SimServerOptions::everything(b"disk0"), 99);
    rig.client.connection_lost();
    assert!(rig.client.connection_started());
    rig.pump(true).unwrap();
    assert_eq!((rig.result_of(0), rig.result_of(1)), (Ok(()), Ok(())));
}

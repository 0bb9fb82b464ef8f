//! Hostile servers: every handshake refusal and violation, random bytes,
//! and mutated valid streams (no panic, no growth of the client's memory).

use super::*;
use crate::sim_server::*;
use crate::wire::*;
use host_fuzz::FuzzRun;

fn greeting(flags: u16) -> Vec<u8> {
    [NBD_INIT_MAGIC.to_be_bytes(), NBD_OPTS_MAGIC.to_be_bytes()]
        .concat()
        .into_iter()
        .chain(flags.to_be_bytes())
        .collect()
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let payload = [
        &NBD_INFO_EXPORT.to_be_bytes()[..],
        &size.to_be_bytes(),
        &flags.to_be_bytes(),
    ]
    .concat();
    option_reply_bytes(NBD_OPT_GO, NBD_REP_INFO, &payload)
}

/// The stream of a server that accepts structured replies, then `go`.
fn handshake_then(go: &[&[u8]]) -> Vec<u8> {
    let mut stream = greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    stream.extend(option_reply_bytes(
        NBD_OPT_STRUCTURED_REPLY,
        NBD_REP_ACK,
        &[],
    ));
    go.iter().for_each(|part| stream.extend_from_slice(part));
    stream
}

fn feed(stream: &[u8]) -> Result<NbdClient, NbdConnectionError> {
    let mut client = NbdClient::new(test_config()).unwrap();
    assert!(client.connection_started());
    client.receive(stream, &mut TagBuffers::default())?;
    Ok(client)
}

#[test]
fn every_handshake_refusal_and_violation_has_its_error() {
    use NbdConnectionError as E;
    let refused = |option, refusal| E::Refused { option, refusal };
    let ack = option_reply_bytes(NBD_OPT_GO, NBD_REP_ACK, &[]);
    let block_size = |min: u32, pref: u32, max: u32| {
        let payload = [
            &NBD_INFO_BLOCK_SIZE.to_be_bytes()[..],
            &min.to_be_bytes(),
            &pref.to_be_bytes(),
            &max.to_be_bytes(),
        ]
        .concat();
        option_reply_bytes(NBD_OPT_GO, NBD_REP_INFO, &payload)
    };
    let mut cases: Vec<(Vec<u8>, E)> = std::vec![
        ([0u8; 18].to_vec(), E::BadGreetingMagic(0)),
        (
            [
                NBD_INIT_MAGIC.to_be_bytes(),
                NBD_CLISERV_MAGIC.to_be_bytes()
            ]
            .concat()
            .into_iter()
            .chain([0, 0])
            .collect(),
            E::OldstyleServer,
        ),
        (
            [greeting(1), std::vec![0; 20]].concat(),
            E::BadOptionReplyMagic(0)
        ),
        (
            [
                greeting(1),
                option_reply_bytes(NBD_OPT_GO, NBD_REP_ACK, &[])
            ]
            .concat(),
            E::OptionReplyMismatch {
                sent: NBD_OPT_STRUCTURED_REPLY,
                answered: NBD_OPT_GO
            },
        ),
        (
            [
                greeting(1),
                option_reply_bytes(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[0; 5000])
            ]
            .concat(),
            E::OversizedOptionReply(5000),
        ),
        (
            [
                greeting(1),
                option_reply_bytes(NBD_OPT_STRUCTURED_REPLY, NBD_REP_INFO, &[])
            ]
            .concat(),
            E::UnexpectedOptionReply {
                option: NBD_OPT_STRUCTURED_REPLY,
                reply: NBD_REP_INFO
            },
        ),
        (
            [
                greeting(1),
                option_reply_bytes(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_TLS_REQD, b"tls")
            ]
            .concat(),
            refused(NBD_OPT_STRUCTURED_REPLY, NbdOptionRefusal::TlsRequired),
        ),
        (handshake_then(&[&ack]), E::MissingExportInfo),
        (
            handshake_then(&[&option_reply_bytes(NBD_OPT_GO, 2, &[])]),
            E::UnexpectedOptionReply {
                option: NBD_OPT_GO,
                reply: 2
            },
        ),
        (
            handshake_then(&[&option_reply_bytes(NBD_OPT_GO, NBD_REP_INFO, &[0])]),
            E::BadInfoLength {
                info: u16::MAX,
                len: 1
            },
        ),
        (
            handshake_then(&[&option_reply_bytes(NBD_OPT_GO, NBD_REP_INFO, &[0, 0, 1])]),
            E::BadInfoLength {
                info: NBD_INFO_EXPORT,
                len: 3
            },
        ),
        (
            handshake_then(&[&option_reply_bytes(NBD_OPT_GO, NBD_REP_INFO, &[0, 3, 1])]),
            E::BadInfoLength {
                info: NBD_INFO_BLOCK_SIZE,
                len: 3
            },
        ),
        (
            handshake_then(&[&block_size(3, 4096, 65536)]),
            E::BadBlockSize {
                minimum: 3,
                preferred: 4096,
                maximum: 65536
            },
        ),
        (
            handshake_then(&[&block_size(4096, 512, 65536)]),
            E::BadBlockSize {
                minimum: 4096,
                preferred: 512,
                maximum: 65536
            },
        ),
        (
            handshake_then(&[&info_export(1 << 20, 0), &ack]),
            E::BadTransmissionFlags(0)
        ),
    ];
    let refusals = [
        (NBD_REP_ERR_POLICY, NbdOptionRefusal::Policy),
        (NBD_REP_ERR_INVALID, NbdOptionRefusal::Invalid),
        (NBD_REP_ERR_PLATFORM, NbdOptionRefusal::Platform),
        (NBD_REP_ERR_TLS_REQD, NbdOptionRefusal::TlsRequired),
        (NBD_REP_ERR_UNKNOWN, NbdOptionRefusal::UnknownExport),
        (NBD_REP_ERR_SHUTDOWN, NbdOptionRefusal::ShuttingDown),
        (
            NBD_REP_ERR_BLOCK_SIZE_REQD,
            NbdOptionRefusal::BlockSizeRequired,
        ),
        (NBD_REP_ERR_TOO_BIG, NbdOptionRefusal::TooBig),
        (
            NBD_REP_FLAG_ERROR | 99,
            NbdOptionRefusal::Other(NBD_REP_FLAG_ERROR | 99),
        ),
    ];
    for (reply, refusal) in refusals {
        let stream = handshake_then(&[&option_reply_bytes(NBD_OPT_GO, reply, b"no")]);
        cases.push((stream, refused(NBD_OPT_GO, refusal)));
    }
    for (i, (stream, want)) in cases.into_iter().enumerate() {
        assert_eq!(feed(&stream).err(), Some(want), "case {i}");
    }
    // The simulated server refuses an unknown name the same way.
    let mut rig = Rig::new(SimServerOptions::everything(b"other"), 1);
    let refusal = refused(NBD_OPT_GO, NbdOptionRefusal::UnknownExport);
    assert_eq!(rig.pump(true), Err(refusal));
    assert_eq!(rig.client.link_state(), NbdLinkState::Down);
}

#[test]
fn an_unsupported_structured_reply_option_means_simple_replies() {
    let mut stream = greeting(NBD_FLAG_FIXED_NEWSTYLE);
    stream.extend(option_reply_bytes(
        NBD_OPT_STRUCTURED_REPLY,
        NBD_REP_ERR_POLICY,
        b"no",
    ));
    stream.extend(info_export(4096, 1));
    stream.extend(option_reply_bytes(NBD_OPT_GO, NBD_REP_ACK, &[]));
    let client = feed(&stream).unwrap();
    let export = client.export().unwrap();
    assert_eq!(
        (export.size, export.structured_replies, export.block_size),
        (4096, false, None)
    );
}

#[test]
fn a_reconnect_to_an_export_of_another_size_fails_every_request() {
    let mut rig = Rig::new(SimServerOptions::everything(b"disk0"), 4);
    rig.pump(true).unwrap();
    rig.submit(
        1,
        NbdCommand::Read {
            offset: 0,
            len: 512,
        },
        NbdOrder::Free,
    );
    rig.client.connection_lost();
    rig.disk.truncate(DISK_SIZE / 2);
    rig.server = SimServer::new(SimServerOptions::everything(b"disk0"), 5);
    assert!(rig.client.connection_started());
    let changed = NbdConnectionError::ExportSizeChanged {
        was: DISK_SIZE as u64,
        now: DISK_SIZE as u64 / 2,
    };
    assert_eq!(rig.pump(true), Err(changed));
    rig.collect();
    assert_eq!(rig.result_of(1), Err(NbdRequestError::ExportSizeChanged));
    assert_eq!(rig.client.link_state(), NbdLinkState::Failed);
    assert!(!rig.client.connection_started());
    let refused = rig.client.submit(0, 2, READ_0, NbdOrder::Free);
    assert_eq!(refused, Err(NbdSubmitError::Closed));
}

/// Feeds `stream` in random pieces; the client may fail but not panic or grow.
fn feed_hostile(rng: &mut FuzzRng, stream: &[u8], with_requests: bool) {
    let mut rig = Rig::new(SimServerOptions::everything(b"disk0"), rng.next_u64());
    if with_requests {
        rig.pump(true).unwrap();
        submit_fuzz_requests(&mut rig);
        rig.pump(false).unwrap();
        rig.server.output.clear();
    }
    let before = rig.client.footprint();
    let mut rest = stream;
    while !rest.is_empty() {
        let n = (1 + rng.below(64) as usize).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        if rig.client.receive(piece, &mut rig.memory).is_err() {
            break;
        }
        let mut out = [0u8; 256];
        while rig.client.transmit(&mut out, &mut rig.memory) > 0 {}
        rig.client.expire(rng.below(2000));
        rig.collect();
    }
    assert_eq!(rig.client.footprint(), before, "the client's memory grew");
    for results in rig.completed.values() {
        assert_eq!(results.len(), 1, "a request completed twice");
    }
}

#[test]
fn fuzz_random_server_bytes() {
    let mut run = FuzzRun::new("nbd_random_server_bytes", 0x6e62_6401, 1000);
    let mut rng = run.rng();
    while run.another() {
        let len = rng.below(400) as usize;
        let mut stream = rng.bytes(len);
        // Often start right, so the random part reaches the later parsers.
        if rng.one_in(2) {
            stream = [
                handshake_then(&[&info_export(DISK_SIZE as u64, 0x17f)]),
                stream,
            ]
            .concat();
        }
        let with_requests = rng.one_in(2);
        feed_hostile(&mut rng, &stream, with_requests);
    }
}

/// The reads and the write the mutated streams answer.
fn submit_fuzz_requests(rig: &mut Rig) {
    for tag in 0..4 {
        rig.submit(
            tag,
            NbdCommand::Read {
                offset: tag * 4096,
                len: 4096,
            },
            NbdOrder::Free,
        );
    }
    rig.submit(
        4,
        NbdCommand::Write {
            offset: 0,
            len: 512,
            fua: false,
        },
        NbdOrder::Free,
    );
}

#[test]
fn fuzz_mutated_server_streams() {
    let mut run = FuzzRun::new("nbd_mutated_server_streams", 0x6e62_6402, 1000);
    let mut rng = run.rng();
    while run.another() {
        // A valid run, its server bytes recorded: the handshake, then the
        // replies to the requests (the same cookies in any run like it).
        let seed = rng.next_u64();
        let mut rig = Rig::new(SimServerOptions::everything(b"disk0"), seed);
        rig.record = Some(Vec::new());
        rig.pump(true).unwrap();
        let handshake_len = rig.record.as_ref().unwrap().len();
        submit_fuzz_requests(&mut rig);
        rig.pump(true).unwrap();
        let mut stream = rig.record.take().unwrap();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(stream.len() as u64) as usize;
            stream[at] = rng.next_u64() as u8;
        }
        let mut rig = Rig::new(SimServerOptions::everything(b"disk0"), seed);
        let before = rig.client.footprint();
        let (handshake, replies) = stream.split_at(handshake_len);
        if rig.client.receive(handshake, &mut rig.memory).is_ok() && rig.client.export().is_some() {
            submit_fuzz_requests(&mut rig);
            let mut out = std::vec![0u8; 1 << 16];
            while rig.client.transmit(&mut out, &mut rig.memory) > 0 {}
            let _ = rig.client.receive(replies, &mut rig.memory);
        }
        rig.collect();
        assert_eq!(rig.client.footprint(), before, "the client's memory grew");
        assert!(
            rig.completed.values().all(|results| results.len() == 1),
            "a request completed twice"
        );
    }
}

//! The connection dropping at every byte of a run, timeouts, and a
//! randomised server against a model disk.

use super::*;
use crate::sim_server::*;
use host_fuzz::FuzzRun;

/// A small run: writes and a flush, then reads; returns the bytes that
/// went to the server and to the client.
fn small_run(cut_after: Option<(bool, u64)>) -> (u64, u64) {
    let mut rig = Rig::new(SimServerOptions::everything(b"disk0"), 21);
    rig.cut_after = cut_after;
    rig.max_piece = 700;
    let mut totals = (0, 0);
    let mut pump = |rig: &mut Rig| {
        // Violations cannot happen here; a cut is the only way a connection ends.
        rig.pump(true).unwrap();
        totals = (totals.0 + rig.moved.0, totals.1 + rig.moved.1);
    };
    pump(&mut rig);
    let writes: Vec<(u64, NbdCommand)> = (0..4)
        .map(|i| {
            (
                i,
                NbdCommand::Write {
                    offset: i * 8192,
                    len: 512 * (1 + i as u32),
                    fua: i == 1,
                },
            )
        })
        .collect();
    writes
        .iter()
        .for_each(|&(tag, command)| rig.submit(tag, command, NbdOrder::Free));
    rig.submit(4, NbdCommand::Flush, NbdOrder::Free);
    pump(&mut rig);
    let reads: Vec<(u64, NbdCommand)> = (0..4)
        .map(|i| {
            (
                10 + i,
                NbdCommand::Read {
                    offset: i * 8192,
                    len: 1024,
                },
            )
        })
        .collect();
    reads
        .iter()
        .for_each(|&(tag, command)| rig.submit(tag, command, NbdOrder::Free));
    pump(&mut rig);
    assert_reads_match_disk(&rig, &writes);
    assert_reads_match_disk(&rig, &reads);
    assert_eq!(rig.result_of(4), Ok(()));
    for (tag, command) in writes {
        let NbdCommand::Write { offset, len, .. } = command else {
            unreachable!()
        };
        assert!(
            rig.disk[offset as usize..][..len as usize] == rig.memory.buffers[&tag][..],
            "write {tag} lost"
        );
    }
    assert_eq!(rig.completed.len(), 9);
    totals
}

#[test]
fn a_connection_dropped_at_any_byte_is_replayed_and_nothing_completes_twice() {
    let (to_server, to_client) = small_run(None);
    assert!(
        to_server > 2000 && to_client > 2000,
        "the run is too small to mean much"
    );
    for cut in 0..to_server {
        small_run(Some((true, cut)));
    }
    for cut in 0..to_client {
        small_run(Some((false, cut)));
    }
}

#[test]
fn a_request_waiting_for_a_connection_times_out() {
    let mut rig = Rig::ready(31);
    rig.client.connection_lost();
    rig.submit(
        1,
        NbdCommand::Read {
            offset: 0,
            len: 512,
        },
        NbdOrder::Free,
    );
    rig.client.expire(999);
    assert_eq!(rig.client.next_completion(), None);
    rig.client.expire(1000);
    rig.collect();
    assert_eq!(rig.result_of(1), Err(NbdRequestError::TimedOut));
    rig.server = SimServer::new(SimServerOptions::everything(b"disk0"), 32);
    assert!(rig.client.connection_started());
    rig.pump(true).unwrap();
    assert!(rig.server.seen.is_empty(), "a timed-out request was sent");
}

#[test]
fn a_late_reply_to_a_timed_out_read_is_swallowed() {
    let mut rig = Rig::ready(31);
    rig.submit(
        1,
        NbdCommand::Read {
            offset: 0,
            len: 4096,
        },
        NbdOrder::Free,
    );
    rig.pump(false).unwrap();
    rig.client.expire(1000);
    assert_eq!(rig.client.pending(), 0);
    rig.pump(true).unwrap();
    assert_eq!(rig.result_of(1), Err(NbdRequestError::TimedOut));
    assert!(
        rig.memory.buffers[&1].iter().all(|&b| b == 0),
        "data delivered after the timeout"
    );
    for tag in 0..32 {
        rig.submit(100 + tag, NbdCommand::Flush, NbdOrder::Free);
    }
}

#[test]
fn a_request_partly_transmitted_times_out_only_once_it_is_out() {
    let mut rig = Rig::ready(31);
    rig.submit(
        1,
        NbdCommand::Write {
            offset: 0,
            len: 4096,
            fua: false,
        },
        NbdOrder::Free,
    );
    let mut out = [0u8; 100];
    assert_eq!(rig.client.transmit(&mut out, &mut rig.memory), 100);
    rig.client.expire(5000);
    assert_eq!(rig.client.next_completion(), None);
    rig.server.receive(&out, &mut rig.disk);
    rig.pump(false).unwrap();
    rig.client.expire(5000);
    rig.pump(true).unwrap();
    assert_eq!(rig.result_of(1), Err(NbdRequestError::TimedOut));
}

fn random_options(rng: &mut FuzzRng) -> SimServerOptions {
    SimServerOptions {
        export_name: b"disk0".to_vec(),
        fixed_newstyle: !rng.one_in(5),
        no_zeroes: rng.one_in(2),
        knows_go: !rng.one_in(4),
        knows_structured: !rng.one_in(3),
        transmission_flags: 1 | 4 | 8 | 32 | 64,
        block_size: rng.pick(&[None, Some((512, 4096, 1 << 20)), Some((1, 512, 65536))]),
        shuffle_replies: rng.one_in(2),
        split_reads: rng.one_in(2),
    }
}

/// Random batches of requests on disjoint ranges against a random server,
/// checked against a model disk, with an occasional dropped connection.
#[test]
fn fuzz_randomised_server_against_a_model_disk() {
    let mut run = FuzzRun::new("nbd_randomised_server", 0x6e62_6403, 40);
    let mut rng = run.rng();
    while run.another() {
        let mut rig = Rig::new(random_options(&mut rng), rng.next_u64());
        rig.max_piece = rng.pick(&[1, 7, 600, 1 << 16]);
        rig.pump(true).unwrap();
        let mut model = rig.disk.clone();
        for batch in 0..4u64 {
            let mut expected = Vec::new();
            for i in 0..rng.below(12) {
                let (offset, len) = (
                    i * 65536 + rng.below(64) * 512,
                    512 * (1 + rng.below(64) as u32),
                );
                let range = offset as usize..offset as usize + len as usize;
                let tag = batch * 100 + i;
                let command = match rng.below(5) {
                    0 => NbdCommand::Read { offset, len },
                    1 => NbdCommand::Trim {
                        offset,
                        len,
                        fua: false,
                    },
                    2 => NbdCommand::WriteZeroes {
                        offset,
                        len,
                        fua: rng.one_in(2),
                    },
                    3 => NbdCommand::Flush,
                    _ => NbdCommand::Write {
                        offset,
                        len,
                        fua: rng.one_in(2),
                    },
                };
                rig.submit(tag, command, NbdOrder::Free);
                match command {
                    NbdCommand::Read { .. } => expected.push((tag, model[range].to_vec())),
                    NbdCommand::Write { .. } => {
                        model[range].copy_from_slice(&rig.memory.buffers[&tag])
                    }
                    NbdCommand::Trim { .. } | NbdCommand::WriteZeroes { .. } => {
                        model[range].fill(0)
                    }
                    NbdCommand::Flush => {}
                }
            }
            if rng.one_in(3) {
                rig.cut_after = Some((rng.one_in(2), rng.below(3000)));
            }
            rig.pump(true).unwrap();
            for (tag, want) in expected {
                assert_eq!(rig.result_of(tag), Ok(()));
                assert!(
                    rig.memory.buffers[&tag] == want,
                    "read {tag} returned other data"
                );
            }
            assert!(rig.completed.values().all(|r| r.len() == 1 && r[0].is_ok()));
            assert!(rig.disk == model, "the disk differs from the model");
        }
    }
}

//! The client against the simulated xenstored.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::wire::{Header, MsgType};
use super::*;
use crate::sim::xenstore::SimXenstored;

const GUEST: crate::DomId = 5;
const HOME: &str = "/local/domain/5";

fn with_client(start: u32, test: impl FnOnce(&mut Xenstore<'_, SimXenstored<'_>>)) {
    let iface = XenstoreInterface::new_boxed(start);
    let daemon = SimXenstored::new(&iface, GUEST);
    let mut xs = Xenstore::new(&iface, daemon);
    test(&mut xs);
}

/// An encoded reply header with no transaction.
fn header(msg_type: MsgType, req_id: u32, len: u32) -> [u8; 16] {
    Header {
        msg_type: msg_type as u32,
        req_id,
        tx_id: 0,
        len,
    }
    .encode()
}

fn event(path: &str, token: &str) -> WatchEvent {
    WatchEvent {
        path: path.into(),
        token: token.into(),
    }
}

#[test]
fn basic_operations_roundtrip() {
    with_client(0, |xs| {
        xs.write(Tx::NONE, "device/vbd/768/state", b"1").unwrap();
        assert_eq!(
            xs.read_string(Tx::NONE, "device/vbd/768/state").unwrap(),
            "1"
        );
        assert_eq!(
            xs.read(Tx::NONE, &alloc::format!("{HOME}/device/vbd/768/state"))
                .unwrap(),
            b"1"
        );
        xs.mkdir(Tx::NONE, "backend/vbd").unwrap();
        xs.write(Tx::NONE, "device/vbd/832/state", b"").unwrap();
        assert_eq!(
            xs.directory(Tx::NONE, "device/vbd").unwrap(),
            ["768", "832"]
        );
        assert_eq!(
            xs.directory(Tx::NONE, "backend/vbd").unwrap(),
            [] as [String; 0]
        );
        xs.rm(Tx::NONE, "device/vbd").unwrap();
        assert_eq!(
            xs.read(Tx::NONE, "device/vbd/768/state"),
            Err(XsError::NoEntry)
        );
        assert_eq!(xs.domain_path(7).unwrap(), "/local/domain/7");
    });
}

#[test]
fn large_messages_survive_partial_reads_and_writes() {
    // Requests and replies larger than the 1024-byte rings, moved a few
    // bytes per step, with indices crossing u32::MAX on the way.
    with_client(u32::MAX - 100, |xs| {
        xs.channel_mut().set_chunks(7, 3);
        let value: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
        xs.write(Tx::NONE, "data", &value).unwrap();
        assert_eq!(
            xs.channel_mut()
                .dom0_read(&alloc::format!("{HOME}/data"))
                .unwrap(),
            value
        );
        assert_eq!(xs.read(Tx::NONE, "data").unwrap(), value);
        assert!(xs.channel_mut().notifications() > 3);
    });
}

#[test]
fn watch_events_between_request_and_reply_are_queued_in_order() {
    with_client(0, |xs| {
        xs.watch("backend", "be").unwrap();
        // The initial event arrived before the watch's own reply.
        xs.channel_mut().inject_watch_event("/elsewhere", "other");
        xs.channel_mut().set_chunks(5, 2);
        xs.write(Tx::NONE, "backend/vbd/1/51712/state", b"2")
            .unwrap();
        assert_eq!(
            xs.read(Tx::NONE, "backend/vbd/1/51712/state").unwrap(),
            b"2"
        );
        let mut events = Vec::new();
        while let Some(e) = xs.poll_watch_event().unwrap() {
            events.push(e);
        }
        assert_eq!(
            events,
            [
                // Relative watches report relative paths.
                event("backend", "be"),
                event("/elsewhere", "other"),
                event("backend/vbd/1/51712/state", "be"),
            ]
        );
        xs.unwatch("backend", "be").unwrap();
        assert_eq!(xs.channel_mut().watch_count(), 0);
        assert_eq!(xs.unwatch("backend", "be"), Err(XsError::NoEntry));
        xs.write(Tx::NONE, "backend/x", b"").unwrap();
        assert_eq!(xs.poll_watch_event().unwrap(), None);
    });
}

#[test]
fn waits_lent_to_other_work_do_it_and_keep_the_connection_whole() {
    with_client(0, |xs| {
        xs.watch("backend", "be").unwrap();
        // Replies and events come a few bytes per wait.
        xs.channel_mut().set_chunks(5, 2);
        let mut works = 0;
        let mut work = || {
            works += 1;
            true
        };
        xs.with_wait_work(&mut work, |xs| {
            xs.write(Tx::NONE, "backend/vbd/1/51712/state", b"2")
                .unwrap();
        });
        assert!(works > 0, "the waits did the work");
        xs.write(Tx::NONE, "backend/vbd/1/51712/state", b"4")
            .unwrap();
        assert_eq!(
            xs.read(Tx::NONE, "backend/vbd/1/51712/state").unwrap(),
            b"4"
        );
        let mut events = Vec::new();
        while let Some(e) = xs.poll_watch_event().unwrap() {
            events.push(e);
        }
        let state = event("backend/vbd/1/51712/state", "be");
        assert_eq!(events, [event("backend", "be"), state.clone(), state]);
    });
}

#[test]
fn watch_events_in_the_ring_are_seen_without_a_request() {
    with_client(0, |xs| {
        xs.watch("/local/domain/0/backend", "dom0").unwrap();
        assert_eq!(xs.poll_watch_event().unwrap().unwrap().token, "dom0");
        xs.channel_mut()
            .dom0_write("/local/domain/0/backend/vbd/5/768/state", b"4");
        xs.channel_mut().step();
        let e = xs.poll_watch_event().unwrap().unwrap();
        assert_eq!(e.path, "/local/domain/0/backend/vbd/5/768/state");
        assert_eq!(xs.poll_watch_event().unwrap(), None);
    });
}

#[test]
fn watch_event_queue_is_bounded() {
    with_client(0, |xs| {
        for i in 0..client_limit() + 6 {
            xs.channel_mut()
                .inject_watch_event(&alloc::format!("/p{i}"), "t");
        }
        // A request in between pulls all events into the queue.
        xs.channel_mut().set_chunks(64, 1 << 20);
        xs.mkdir(Tx::NONE, "x").unwrap();
        assert_eq!(xs.dropped_watch_events(), 6);
        assert_eq!(xs.queued_watch_events(), client_limit());
        assert_eq!(xs.poll_watch_event().unwrap().unwrap().path, "/p6");
    });
}

fn client_limit() -> usize {
    super::MAX_QUEUED_WATCH_EVENTS
}

#[test]
fn watch_event_queue_bytes_are_bounded_too() {
    with_client(0, |xs| {
        // Long paths, as a guest may create below a watched node of its own.
        let long = |i: usize| alloc::format!("/d/{i:04}/{}", "x".repeat(3000));
        let fitting = super::MAX_QUEUED_WATCH_EVENT_BYTES / (long(0).len() + 1);
        for i in 0..fitting + 3 {
            xs.channel_mut().inject_watch_event(&long(i), "t");
        }
        xs.channel_mut().set_chunks(64, 1 << 20);
        xs.mkdir(Tx::NONE, "x").unwrap();
        assert_eq!(xs.dropped_watch_events(), 3);
        let mut kept = 0;
        while let Some(event) = xs.poll_watch_event().unwrap() {
            assert_eq!(event.path, long(kept + 3), "the newest are kept");
            kept += 1;
        }
        assert_eq!(kept, fitting);
        // Emptied, the queue takes as many again.
        for i in 0..fitting {
            xs.channel_mut().inject_watch_event(&long(i), "t");
        }
        xs.mkdir(Tx::NONE, "y").unwrap();
        assert_eq!(xs.dropped_watch_events(), 3);
    });
}

#[test]
fn daemon_errors_map_to_typed_errors() {
    with_client(0, |xs| {
        assert_eq!(xs.read(Tx::NONE, "missing"), Err(XsError::NoEntry));
        // dom0's tree is not readable or writable by the guest.
        xs.channel_mut().dom0_write("/local/domain/0/secret", b"s");
        assert_eq!(
            xs.read(Tx::NONE, "/local/domain/0/secret"),
            Err(XsError::Access)
        );
        assert_eq!(
            xs.write(Tx::NONE, "/local/domain/0/x", b"1"),
            Err(XsError::Access)
        );
        assert_eq!(xs.rm(Tx::NONE, "/"), Err(XsError::Access));
        assert_eq!(xs.read(Tx::NONE, "bad//path"), Err(XsError::Invalid));
        for e in [
            XsError::Again,
            XsError::Busy,
            XsError::TooBig,
            XsError::NoSpace,
        ] {
            xs.channel_mut().fail_next(e);
            assert_eq!(xs.mkdir(Tx::NONE, "d"), Err(e));
        }
        // The connection is still fine after daemon errors.
        xs.write(Tx::NONE, "ok", b"1").unwrap();
    });
}

#[test]
fn unknown_error_strings_and_stale_replies() {
    with_client(0, |xs| {
        // Request ids start at 1: a stale reply (id 99) is skipped, the
        // error for id 1 is an unknown string.
        let stale = header(MsgType::Read, 99, 1);
        let error = header(MsgType::Error, 1, 8);
        let d = xs.channel_mut();
        d.inject_raw(&stale);
        d.inject_raw(b"x");
        d.inject_raw(&error);
        d.inject_raw(b"EWEIRD\0\0");
        assert_eq!(xs.read(Tx::NONE, "missing"), Err(XsError::UnknownError));
        // The daemon's own reply to request 1 is now stale too.
        xs.write(Tx::NONE, "k", b"v").unwrap();
        assert_eq!(xs.read(Tx::NONE, "k").unwrap(), b"v");
    });
}

#[test]
fn permissions_roundtrip_and_restrict() {
    with_client(0, |xs| {
        xs.write(Tx::NONE, "shared", b"x").unwrap();
        let perms = xs.get_perms(Tx::NONE, "shared").unwrap();
        assert_eq!(perms[0].domid, GUEST);
        let wanted = [
            Perm {
                domid: GUEST,
                access: Access::None,
            },
            Perm {
                domid: 0,
                access: Access::Read,
            },
            Perm {
                domid: 9,
                access: Access::Both,
            },
        ];
        xs.set_perms(Tx::NONE, "shared", &wanted).unwrap();
        assert_eq!(xs.get_perms(Tx::NONE, "shared").unwrap(), wanted);
        // Once dom0 takes ownership, the guest may no longer change them.
        let dom0_only = [Perm {
            domid: 0,
            access: Access::None,
        }];
        xs.channel_mut()
            .dom0_set_perms(&alloc::format!("{HOME}/shared"), &dom0_only);
        assert_eq!(
            xs.set_perms(Tx::NONE, "shared", &wanted),
            Err(XsError::Access)
        );
        assert_eq!(xs.read(Tx::NONE, "shared"), Err(XsError::Access));
    });
}

#[test]
fn transaction_retries_after_a_conflict() {
    with_client(0, |xs| {
        xs.write(Tx::NONE, "counter", b"1").unwrap();
        let mut attempts = 0;
        let result = xs.transaction(|xs, tx| {
            attempts += 1;
            let n: u32 = xs
                .read_string(tx, "counter")?
                .parse()
                .map_err(|_| XsError::Invalid)?;
            if attempts == 1 {
                // Someone else commits meanwhile: our commit must fail.
                xs.channel_mut()
                    .dom0_write(&alloc::format!("{HOME}/counter"), b"10");
            }
            xs.write(tx, "counter", alloc::format!("{}", n + 1).as_bytes())?;
            Ok(n + 1)
        });
        assert_eq!(result, Ok(11));
        assert_eq!(attempts, 2);
        assert_eq!(xs.read(Tx::NONE, "counter").unwrap(), b"11");
        assert_eq!(xs.channel_mut().open_transactions(), 0);
    });
}

#[test]
fn transaction_gives_up_and_aborts_cleanly() {
    with_client(0, |xs| {
        let mut attempts = 0;
        let always_conflicts = xs.transaction(|xs, tx| {
            attempts += 1;
            xs.write(tx, "k", b"v")?;
            xs.channel_mut().dom0_write("/other", b"x");
            Ok(())
        });
        assert_eq!(always_conflicts, Err(XsError::TooManyRetries));
        assert_eq!(attempts, super::client::MAX_TX_ATTEMPTS);
        assert_eq!(xs.read(Tx::NONE, "k"), Err(XsError::NoEntry));

        let failed: Result<(), _> = xs.transaction(|xs, tx| {
            xs.write(tx, "k", b"v")?;
            xs.read(tx, "missing").map(drop)
        });
        assert_eq!(failed, Err(XsError::NoEntry));
        assert_eq!(xs.read(Tx::NONE, "k"), Err(XsError::NoEntry), "aborted");
        assert_eq!(xs.channel_mut().open_transactions(), 0);

        // EAGAIN inside the body restarts the transaction as well.
        let mut tries = 0;
        let ok = xs.transaction(|xs, tx| {
            tries += 1;
            if tries == 1 {
                xs.channel_mut().fail_next(XsError::Again);
            }
            xs.write(tx, "k", b"v")
        });
        assert_eq!((ok, tries), (Ok(()), 2));
        assert_eq!(xs.read(Tx::NONE, "k").unwrap(), b"v");
    });
}

#[test]
fn local_limits_are_checked_before_sending() {
    with_client(0, |xs| {
        assert_eq!(
            xs.write(Tx::NONE, "big", &vec![0; 4096]),
            Err(XsError::RequestTooLarge)
        );
        assert_eq!(xs.read(Tx::NONE, "a\0b"), Err(XsError::Invalid));
        assert_eq!(xs.read(Tx::NONE, ""), Err(XsError::Invalid));
        assert_eq!(xs.read(Tx::NONE, &"p".repeat(3073)), Err(XsError::Invalid));
        assert_eq!(xs.channel_mut().notifications(), 0, "nothing was sent");
    });
}

#[test]
fn malformed_replies_break_the_connection_without_panicking() {
    with_client(0, |xs| {
        let oversized = header(MsgType::Read, 1, 5000);
        xs.channel_mut().inject_raw(&oversized);
        assert_eq!(xs.read(Tx::NONE, "x"), Err(XsError::Protocol));
        assert_eq!(
            xs.read(Tx::NONE, "x"),
            Err(XsError::Protocol),
            "stays broken"
        );
        assert_eq!(xs.poll_watch_event(), Err(XsError::Protocol));
    });
    with_client(0, |xs| {
        let wrong_type = header(MsgType::Write, 1, 0);
        xs.channel_mut().inject_raw(&wrong_type);
        assert_eq!(xs.read(Tx::NONE, "x"), Err(XsError::Protocol));
    });
    with_client(0, |xs| {
        let bad_dir = header(MsgType::Directory, 1, 2);
        xs.channel_mut().inject_raw(&bad_dir);
        xs.channel_mut().inject_raw(b"\xff\0");
        assert_eq!(xs.directory(Tx::NONE, "x"), Err(XsError::Protocol));
        // Malformed watch events are dropped, not fatal.
        let ev = header(MsgType::WatchEvent, 0, 3);
        xs.channel_mut().inject_raw(&ev);
        xs.channel_mut().inject_raw(b"ab\0");
        xs.channel_mut().step();
        assert_eq!(xs.poll_watch_event(), Ok(None));
    });
    with_client(0, |xs| {
        // A reply that never completes: the channel times out.
        let truncated = header(MsgType::Read, 1, 4000);
        xs.channel_mut().inject_raw(&truncated);
        assert_eq!(xs.read(Tx::NONE, "x"), Err(XsError::Timeout));
    });
    // A daemon that corrupts the ring indices.
    let iface = XenstoreInterface::new_boxed(0);
    let daemon = SimXenstored::new(&iface, GUEST);
    let mut xs = Xenstore::new(&iface, daemon);
    iface
        .rsp_prod
        .store(5000, core::sync::atomic::Ordering::Relaxed);
    assert_eq!(xs.poll_watch_event(), Err(XsError::RingCorrupt));
}

/// Waits a body's requests made on `xs`.
fn waits_of(
    xs: &mut Xenstore<'_, SimXenstored<'_>>,
    body: impl FnOnce(&mut Xenstore<'_, WorkingChannel<'_, SimXenstored<'_>>>),
) -> usize {
    let mut waits = 0;
    let mut count = || {
        waits += 1;
        false
    };
    xs.with_wait_work(&mut count, body);
    waits
}

#[test]
fn a_batch_of_writes_waits_for_one_reply() {
    with_client(0, |xs| {
        let one = waits_of(xs, |xs| xs.write(Tx::NONE, "data/x", b"0").unwrap());
        let nodes: [(&str, &[u8]); 4] = [
            ("data/a", b"1"),
            ("data/b", b"2"),
            ("data/c", b"3"),
            ("data/d", b"4"),
        ];
        let batch = waits_of(xs, |xs| xs.write_batch(&nodes).unwrap());
        assert_eq!(batch, one);
        for (path, value) in nodes {
            assert_eq!(xs.read(Tx::NONE, path).unwrap(), value);
        }
        assert_eq!(xs.write_batch(&[]), Ok(()));
    });
}

#[test]
fn an_error_answered_to_any_write_of_a_batch_fails_it() {
    with_client(0, |xs| {
        xs.channel_mut().fail_next(XsError::NoSpace);
        let nodes: [(&str, &[u8]); 3] = [("data/a", b"1"), ("data/b", b"2"), ("data/c", b"3")];
        assert_eq!(xs.write_batch(&nodes), Err(XsError::NoSpace));
        assert_eq!(xs.read(Tx::NONE, "data/a"), Err(XsError::NoEntry));
        assert_eq!(xs.read(Tx::NONE, "data/c").unwrap(), b"3");
        // The error was the batch's: the next batch and requests are fine.
        assert_eq!(xs.write_batch(&nodes), Ok(()));
        // An error answered to a write sent before the batch is not its.
        assert!(xs.write_unacknowledged("data/s", b"0").unwrap());
        xs.channel_mut().fail_next(XsError::Access);
        assert_eq!(xs.write_batch(&nodes), Ok(()));
        // A write that does not fit the ring behind the first is
        // acknowledged: the first's error, answered while it waits, still
        // fails the batch.
        let big = vec![b'v'; 900];
        let big_nodes: [(&str, &[u8]); 3] = [("data/p", &big), ("data/q", &big), ("data/r", &big)];
        xs.channel_mut().fail_next(XsError::Access);
        assert_eq!(xs.write_batch(&big_nodes), Err(XsError::Access));
        assert_eq!(xs.write_batch(&big_nodes), Ok(()));
        assert_eq!(xs.read(Tx::NONE, "data/r").unwrap(), big);
    });
}

#[test]
fn unacknowledged_writes_land_and_their_replies_are_dropped() {
    with_client(0, |xs| {
        assert!(xs.write_unacknowledged("data/a", b"1").unwrap());
        assert!(xs.write_unacknowledged("data/b", b"2").unwrap());
        // Nothing was waited for: xenstored has not even read them yet.
        assert_eq!(
            xs.channel_mut().dom0_read(&alloc::format!("{HOME}/data/a")),
            None
        );
        // The next request finds its own reply behind theirs.
        assert_eq!(xs.read_string(Tx::NONE, "data/a").unwrap(), "1");
        assert_eq!(xs.read_string(Tx::NONE, "data/b").unwrap(), "2");
        assert_eq!(xs.poll_watch_event().unwrap(), None);
    });
}

#[test]
fn a_batch_of_unacknowledged_writes_wakes_xenstored_once() {
    with_client(0, |xs| {
        let before = xs.channel_mut().notifications();
        {
            let mut writes = xs.unacknowledged_writes();
            for (path, value) in [("data/a", b"1"), ("data/b", b"2"), ("data/c", b"3")] {
                assert!(writes.write(path, value).unwrap());
            }
        }
        assert_eq!(xs.channel_mut().notifications(), before + 1);
        assert_eq!(xs.read_string(Tx::NONE, "data/c").unwrap(), "3");
        assert_eq!(xs.read_string(Tx::NONE, "data/a").unwrap(), "1");
        // Nothing sent, nothing to wake it for.
        let before = xs.channel_mut().notifications();
        drop(xs.unacknowledged_writes());
        assert_eq!(xs.channel_mut().notifications(), before);
    });
}

#[test]
fn an_unacknowledged_write_that_does_not_fit_is_not_sent() {
    with_client(0, |xs| {
        let value = [b'x'; 400];
        let mut sent = 0;
        while xs.write_unacknowledged("data/big", &value).unwrap() {
            sent += 1;
        }
        // 1024-byte ring, 16-byte header + "data/big\0" + 400 bytes each.
        assert_eq!(sent, 2);
        // Once xenstored drained the ring, there is room again and the
        // connection is intact.
        xs.channel_mut().step();
        assert!(xs.write_unacknowledged("data/big", &value).unwrap());
        assert_eq!(xs.read(Tx::NONE, "data/big").unwrap(), value);
        assert_eq!(
            xs.write_unacknowledged("data/\0", b"1"),
            Err(XsError::Invalid)
        );
    });
}

#[test]
fn a_connection_resumed_mid_message_keeps_the_streams_framed() {
    // An instance dies with a watch event half read; its successor
    // resumes the same ring from the record, drops the old instance's
    // watches, and works.
    let iface = XenstoreInterface::new_boxed(u32::MAX - 30);
    let record = StreamRecord::new();
    let mut old = Xenstore::new(&iface, SimXenstored::new(&iface, GUEST));
    old.keep_record(&record);
    old.watch("w", "old-token").unwrap();
    old.write(Tx::NONE, "w", b"1").unwrap();
    old.channel_mut().set_chunks(16, 5);
    old.channel_mut().inject_watch_event("w/x", "old-token");
    old.channel_mut().step();
    assert_eq!(
        old.poll_watch_event().unwrap(),
        Some(event("w", "old-token"))
    );
    // Part of the second event is taken.
    old.channel_mut().step();
    assert_eq!(
        old.poll_watch_event().unwrap(),
        Some(event("w", "old-token"))
    );
    assert_eq!(old.poll_watch_event().unwrap(), None);
    let spare = XenstoreInterface::new_boxed(0);
    let daemon = core::mem::replace(old.channel_mut(), SimXenstored::new(&spare, GUEST));
    core::mem::forget(old);

    let mut new = Xenstore::resume(&iface, daemon, &record).unwrap();
    new.reset_watches().unwrap();
    assert_eq!(new.channel_mut().watch_count(), 0);
    assert_eq!(new.poll_watch_event().unwrap(), None);
    new.watch("w", "new-token").unwrap();
    assert_eq!(new.read(Tx::NONE, "w").unwrap(), b"1");
    new.channel_mut()
        .dom0_write(&alloc::format!("{HOME}/w"), b"2");
    let seen: Vec<WatchEvent> = core::iter::from_fn(|| new.poll_watch_event().unwrap()).collect();
    assert!(seen.iter().all(|e| e.token == "new-token"), "{seen:?}");
    assert_eq!(new.read(Tx::NONE, "w").unwrap(), b"2");
}

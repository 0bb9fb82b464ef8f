//! Hostile xenstore traffic: a frontend flooding watch events, and (from
//! a seed) a frontend churning its nodes after connect.

use super::*;
use crate::vbd::FRONTEND_TOKEN;

const FLOODER: DomId = FRONTEND;
const CALM: DomId = 8;
/// Passes of the loop within which the calm vbd's every step completes
/// while the flood goes on: one to take the events, one to act.
const MAX_PASSES_PER_STEP: u64 = 3;
/// Xenstore requests one pass may make under any flood: a rescan and
/// [`VBD_UPDATES_PER_PASS`] updates of a few reads each (26 seen; a
/// state machine run per event would make hundreds under this flood).
const MAX_REQUESTS_PER_PASS: u64 = 64;

/// Writes of its nodes a flooding frontend makes between two passes.
const FLOOD_WRITES_PER_PASS: u64 = 40;

/// What a flooding frontend does between two passes: rewrites of its
/// `state` and of nodes of distinct names below it (each event with its
/// own path), and `spurious` more events of such paths.
fn flood(h: &mut Harness<'_>, id: VbdId, spurious: u64, round: u64) {
    for i in 0..FLOOD_WRITES_PER_PASS {
        h.frontend_write(id, "state", "4");
        let below = format!("state/n{}", (round * FLOOD_WRITES_PER_PASS + i) % 500);
        h.frontend_write(id, &below, &format!("{i}"));
    }
    let daemon = h.xs.channel_mut();
    let token = format!("{FRONTEND_TOKEN}{}/{}", id.frontend, id.devid);
    for i in 0..spurious {
        let path = format!("{}/state/s{i}", frontend_path(id));
        daemon.inject_watch_event(&path, &token);
    }
    daemon.inject_watch_event(&format!("{}/garbage", backend_path(id)), WATCH_TOKEN);
}

/// Runs passes, flooding before each, until `done`; returns how many it
/// took, checking that none made more than [`MAX_REQUESTS_PER_PASS`]
/// xenstore requests.
fn passes_until(
    h: &mut Harness<'_>,
    flooder: VbdId,
    spurious: u64,
    mut done: impl FnMut(&mut Harness<'_>) -> bool,
) -> u64 {
    for pass in 1..=20 {
        flood(h, flooder, spurious, pass);
        let before = h.xs.channel_mut().requests();
        h.pass();
        let requests = h.xs.channel_mut().requests() - before;
        assert!(
            requests <= MAX_REQUESTS_PER_PASS,
            "{requests} xenstore requests in one pass"
        );
        if done(h) {
            return pass;
        }
    }
    panic!("not done in 20 passes of the flood");
}

/// A frontend rewrites its nodes in a loop, and adds spurious events (with
/// 2000 a pass, the client drops events and every vbd is looked at again):
/// another guest's vbd is still attached, connected, served and detached
/// within [`MAX_PASSES_PER_STEP`] passes each, each pass makes a bounded
/// number of xenstore requests, and the flooder is served all along.
#[test]
fn a_frontend_flooding_watch_events_delays_no_other_vbd() {
    for spurious in [0, 2000] {
        run(|h| {
            let (flooder, mut flooding) = h.serve(FLOODER, "ram:64K", "w", Protocol::X86_64);
            let flooding_page = flooding.grant(false, &[]);
            let dropped = h.xs.dropped_watch_events();

            let calm = h.add_vbd(CALM, DEVID, "ram:64K", "w");
            let attached = passes_until(h, flooder, spurious, |h| {
                h.backend_state(calm).as_deref() == Some("2")
            });
            let front = SimBlkfront::new(h.sim, CALM, Protocol::X86_64, 0);
            for (name, value) in front.ring_nodes() {
                h.frontend_write(calm, &name, &value);
            }
            h.frontend_write(calm, "state", "3");
            let connected = passes_until(h, flooder, spurious, |h| {
                h.backend_state(calm).as_deref() == Some("4")
            });
            let mut calm_front = front;
            let page = calm_front.grant(false, &[]);
            let read = calm_front.data_request(blkif::OP_READ, 1, 0, 1, &[seg(page, 0, 7)]);
            assert_eq!(calm_front.submit(&[read]), 1);
            let served = passes_until(h, flooder, spurious, |_| !calm_front.responses().is_empty());
            let read = flooding.data_request(blkif::OP_READ, 9, 0, 1, &[seg(flooding_page, 0, 7)]);
            assert_eq!(flooding.submit(&[read]), 1);
            let flooder_served =
                passes_until(h, flooder, spurious, |_| !flooding.responses().is_empty());

            h.xs.channel_mut()
                .dom0_write(&format!("{}/online", backend_path(calm)), b"0");
            h.frontend_write(calm, "state", "6");
            let detached = passes_until(h, flooder, spurious, |h| {
                h.backend_state(calm).as_deref() == Some("6")
            });
            let passes = [attached, connected, served, flooder_served, detached];
            assert!(
                passes.iter().all(|p| *p <= MAX_PASSES_PER_STEP),
                "passes per step with {spurious} spurious events a pass: {passes:?}"
            );
            let lost = h.xs.dropped_watch_events() > dropped;
            assert_eq!(lost, spurious > 0, "events dropped by the client");
            assert_eq!(
                h.vbds.status(flooder).unwrap().state,
                XenbusState::Connected
            );
        });
    }
}

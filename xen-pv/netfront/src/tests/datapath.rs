//! Frames through a well-behaved backend: buffers reused, RX kept
//! posted, multi-slot and checksum-blank packets, notifications.

use alloc::vec;
use alloc::vec::Vec;

use super::{Vif, frame};
use crate::checksum::tests::{udp_checksum_verifies, udp_frame};
use crate::sim::RxSlot;
use crate::wire::{
    NETRXF_CSUM_BLANK, NETRXF_DATA_VALIDATED, NETRXF_EXTRA_INFO, NETRXF_MORE_DATA,
    XEN_NETIF_EXTRA_FLAG_MORE,
};
use crate::{MAX_FRAME_LEN, Phase};

#[test]
fn frames_flow_both_ways_and_buffers_are_reused() {
    let mut vif = Vif::connected();
    let mut sent = Vec::new();
    for i in 0..200u32 {
        let len = 14 + (i as usize * 37) % (MAX_FRAME_LEN - 13);
        let f = frame(i as u8, len);
        assert!(vif.send(&f), "frame {i}");
        sent.push(f);
        if i % 5 == 4 {
            vif.netback.step(vif.xs.channel_mut());
        }
    }
    vif.netback.step(vif.xs.channel_mut());
    assert_eq!(Vec::from(vif.netback.transmitted.clone()), sent);
    let mut delivered = Vec::new();
    let mut received = Vec::new();
    for i in 0..300u32 {
        let f = frame(
            i as u8 ^ 0x55,
            14 + (i as usize * 53) % (MAX_FRAME_LEN - 13),
        );
        vif.netback.deliver(&f);
        delivered.push(f);
        if i % 7 == 6 {
            received.extend(vif.receive_all());
        }
    }
    while received.len() < delivered.len() {
        let more = vif.receive_all();
        assert!(!more.is_empty(), "frames stuck");
        received.extend(more);
    }
    assert_eq!(received, delivered);
    let stats = vif.netfront.statistics();
    assert_eq!((stats.tx_frames, stats.rx_frames), (200, 300));
    assert_eq!(
        (stats.tx_errors, stats.rx_dropped, stats.bad_responses),
        (0, 0, 0)
    );
    assert_eq!(
        vif.netback.rx_buffers_posted(),
        16,
        "every buffer back in the ring"
    );
    assert_eq!(
        vif.hal.pages_allocated(),
        2 + 16 + 8,
        "no page allocated per frame"
    );
    assert_eq!(vif.netfront.phase(), Phase::Running);
}

#[test]
fn tx_stops_when_every_buffer_is_in_flight_and_resumes_on_completion() {
    let mut vif = Vif::connected();
    vif.netback.tx_answer = crate::sim::TxAnswer::Withhold;
    for i in 0..8 {
        assert!(vif.send(&frame(i, 60)));
    }
    vif.netback.step(vif.xs.channel_mut());
    assert!(
        !vif.send(&frame(9, 60)),
        "no buffer: the caller keeps its frame"
    );
    assert_eq!(vif.netfront.free_tx_buffers(), 0);
    // RX is not held up by TX.
    vif.netback.deliver(&frame(7, 64));
    assert_eq!(vif.receive_all().len(), 1);
    vif.netback.tx_answer = crate::sim::TxAnswer::Okay;
    assert!(vif.send(&frame(9, 60)) || vif.netfront.free_tx_buffers() == 0);
}

#[test]
fn multi_slot_packets_are_assembled_or_dropped_when_oversized() {
    let mut vif = Vif::connected();
    let head = frame(1, 700);
    let tail = frame(2, 800);
    vif.netback.pending_rx.push_back(vec![
        RxSlot::frame(&head, NETRXF_MORE_DATA),
        RxSlot::frame(&tail, 0),
    ]);
    // Three pages' worth: more than an MTU-sized frame.
    vif.netback.pending_rx.push_back(vec![
        RxSlot::frame(&frame(3, 1000), NETRXF_MORE_DATA),
        RxSlot::frame(&frame(4, 1000), NETRXF_MORE_DATA),
        RxSlot::frame(&frame(5, 1000), 0),
    ]);
    vif.netback.deliver(&frame(6, 100));
    let received = vif.receive_all();
    assert_eq!(received, vec![[head, tail].concat(), frame(6, 100)]);
    assert_eq!(vif.netfront.statistics().rx_dropped, 1);
    assert_eq!(vif.netback.rx_buffers_posted(), 16);
}

#[test]
fn a_packet_split_across_polls_is_finished_on_the_next() {
    let mut vif = Vif::connected();
    vif.netback
        .pending_rx
        .push_back(vec![RxSlot::frame(&frame(1, 100), NETRXF_MORE_DATA)]);
    assert!(vif.receive_all().is_empty());
    vif.netback
        .pending_rx
        .push_back(vec![RxSlot::frame(&frame(2, 50), 0)]);
    assert_eq!(
        vif.receive_all(),
        vec![[frame(1, 100), frame(2, 50)].concat()]
    );
}

#[test]
fn extra_info_slots_are_skipped_and_bounded() {
    let mut vif = Vif::connected();
    let f = frame(9, 90);
    vif.netback.pending_rx.push_back(vec![
        RxSlot::frame(&f, NETRXF_EXTRA_INFO),
        RxSlot::Extra {
            kind: 1,
            flags: XEN_NETIF_EXTRA_FLAG_MORE,
        },
        RxSlot::Extra { kind: 4, flags: 0 },
    ]);
    let mut too_many = vec![RxSlot::frame(&f, NETRXF_EXTRA_INFO)];
    too_many.extend((0..5).map(|i| RxSlot::Extra {
        kind: 1,
        flags: if i < 4 { XEN_NETIF_EXTRA_FLAG_MORE } else { 0 },
    }));
    vif.netback.pending_rx.push_back(too_many);
    assert_eq!(vif.receive_all(), vec![f]);
    let stats = vif.netfront.statistics();
    assert_eq!((stats.rx_dropped, stats.bad_responses), (1, 1));
    assert_eq!(vif.netback.rx_buffers_posted(), 16);
}

#[test]
fn a_blank_checksum_is_completed_and_a_validated_one_passed_on() {
    let mut vif = Vif::connected();
    let blank = udp_frame(b"netfront checksum", 0x1234);
    vif.netback.pending_rx.push_back(vec![RxSlot::frame(
        &blank,
        NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED,
    )]);
    let mut arp = frame(0, 60);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    vif.netback
        .pending_rx
        .push_back(vec![RxSlot::frame(&arp, NETRXF_CSUM_BLANK)]);
    let good = udp_frame(b"already fine", 0);
    vif.netback
        .pending_rx
        .push_back(vec![RxSlot::frame(&good, NETRXF_DATA_VALIDATED)]);
    let received = vif.receive_all();
    assert_eq!(received.len(), 2);
    assert!(udp_checksum_verifies(&received[0]));
    assert_eq!(received[0][..40], blank[..40]);
    assert_eq!(
        received[1], good,
        "a validated frame is passed on untouched"
    );
    let stats = vif.netfront.statistics();
    assert_eq!((stats.rx_checksums_completed, stats.rx_dropped), (1, 1));
}

#[test]
fn frames_netback_would_refuse_are_not_sent() {
    let mut vif = Vif::connected();
    assert_eq!(vif.netfront.send_with(13, |b| b.len()), Some(13));
    assert_eq!(
        vif.netfront.send_with(MAX_FRAME_LEN + 1, |b| b.len()),
        Some(MAX_FRAME_LEN)
    );
    vif.netback.step(vif.xs.channel_mut());
    assert!(vif.netback.transmitted.is_empty());
    assert_eq!(vif.netfront.statistics().tx_dropped, 2);
    assert_eq!(vif.netfront.free_tx_buffers(), 8);
}

#[test]
fn notifications_follow_the_event_indices() {
    let mut vif = Vif::connected();
    let kicks = vif.netback.notifications_from_frontend();
    // netback has not asked to be woken for TX (req_event is where the
    // ring started), so the first request notifies, later ones in the
    // same batch do not.
    assert!(vif.send(&frame(1, 60)));
    assert!(vif.send(&frame(2, 60)));
    let after_two = vif.netback.notifications_from_frontend();
    assert_eq!(after_two, kicks + 1);
    vif.netback.step(vif.xs.channel_mut());
    // Receiving with nothing there sends nothing.
    assert!(vif.receive_all().is_empty());
    assert!(vif.receive_all().is_empty());
    assert_eq!(vif.netback.notifications_from_frontend(), after_two);
    // The RX event index is armed: the next frame notifies us.
    let woken = vif.hal.notifications_to_frontend();
    vif.netback.deliver(&frame(3, 60));
    vif.netback.step(vif.xs.channel_mut());
    assert_eq!(vif.hal.notifications_to_frontend(), woken + 1);
    assert!(vif.netfront.has_pending_rx());
}

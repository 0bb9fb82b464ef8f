//! A backend that writes garbage into the rings: ids, statuses, sizes,
//! offsets, response indices, and a seeded random campaign of all of
//! them. Nothing may panic; bad slots are dropped and counted; a broken
//! ring gets the connection closed and a fresh one.

use alloc::vec;
use alloc::vec::Vec;

use super::{Vif, frame};
use crate::sim::{RxSlot, TxAnswer};
use crate::wire::{
    NETIF_RSP_ERROR, NETIF_RSP_NULL, NETRXF_CSUM_BLANK, NETRXF_EXTRA_INFO, NETRXF_MORE_DATA,
};
use crate::{BrokenRing, Phase};

/// Runs the attend that a broken ring asks for, then the reconnection.
fn recover(vif: &mut Vif) {
    assert!(vif.netfront.needs_attend());
    vif.netfront.attend(&mut vif.xs).unwrap();
    assert_eq!(vif.netfront.phase(), Phase::Closing);
    vif.settle();
    assert_eq!(vif.netfront.phase(), Phase::Running);
    vif.netback.tx_answer = TxAnswer::Okay;
    // The new connection carries frames both ways.
    assert!(vif.send(&frame(1, 60)));
    vif.netback.deliver(&frame(2, 60));
    assert_eq!(vif.receive_all(), vec![frame(2, 60)]);
}

#[test]
fn a_tx_answer_with_an_unknown_id_breaks_the_ring() {
    for answer in [
        TxAnswer::WrongId(999),
        TxAnswer::WrongId(7),
        TxAnswer::Twice,
    ] {
        let mut vif = Vif::connected();
        vif.netback.tx_answer = answer;
        assert!(vif.send(&frame(0, 60)));
        vif.netback.step(vif.xs.channel_mut());
        let _ = vif.send(&frame(1, 60));
        assert_eq!(vif.netfront.phase(), Phase::Broken, "{answer:?}");
        // Two answers to one request claim more than was asked.
        let expected = match answer {
            TxAnswer::Twice => matches!(vif.netfront.broken_ring(), Some(BrokenRing::TxOverflow)),
            _ => matches!(vif.netfront.broken_ring(), Some(BrokenRing::TxUnknownId(_))),
        };
        assert!(expected, "{:?}", vif.netfront.broken_ring());
        assert!(!vif.send(&frame(2, 60)), "the data path is stopped");
        assert_eq!(vif.netfront.receive_with(|f| f.len()), None);
        recover(&mut vif);
        assert_eq!(vif.netfront.statistics().broken_rings, 1);
    }
}

#[test]
fn bad_tx_statuses_are_counted_and_the_buffer_reclaimed() {
    let mut vif = Vif::connected();
    for status in [NETIF_RSP_ERROR, -2, NETIF_RSP_NULL, 77, i16::MIN] {
        vif.netback.tx_answer = TxAnswer::Status(status);
        assert!(vif.send(&frame(0, 60)));
        vif.netback.step(vif.xs.channel_mut());
    }
    vif.netfront.receive_with(|_| ());
    let stats = vif.netfront.statistics();
    assert_eq!((stats.tx_errors, stats.bad_responses), (5, 3));
    assert_eq!(vif.netfront.free_tx_buffers(), 8);
    assert_eq!(vif.netfront.phase(), Phase::Running);
}

#[test]
fn bad_rx_slots_are_dropped_and_their_buffers_reposted() {
    let mut vif = Vif::connected();
    let data = |offset: u16, flags: u16, status: i16| RxSlot::Data {
        data: Vec::new(),
        offset,
        flags,
        status: Some(status),
    };
    for slots in [
        vec![data(4000, 0, 200)],
        vec![data(0, 0, 4097)],
        vec![data(u16::MAX, 0, i16::MAX)],
        vec![data(0, 0, NETIF_RSP_ERROR)],
        vec![data(0, 0, -2)],
        vec![data(0, 0, i16::MIN)],
        vec![data(0, 0, 0)],
        vec![data(0, 0, 13)],
        vec![data(0, NETRXF_MORE_DATA, 100), data(0, 0, -1)],
        vec![data(0, NETRXF_CSUM_BLANK, 60)],
    ] {
        vif.netback.pending_rx.push_back(slots);
    }
    vif.netback.deliver(&frame(5, 70));
    assert_eq!(vif.receive_all(), vec![frame(5, 70)]);
    let stats = vif.netfront.statistics();
    assert_eq!(stats.rx_dropped, 10);
    assert_eq!(stats.bad_responses, 3, "offsets or sizes past the page");
    assert_eq!(vif.netback.rx_buffers_posted(), 16);
    assert_eq!(vif.netfront.phase(), Phase::Running);
}

#[test]
fn response_indices_past_the_requests_break_the_ring() {
    for rx in [true, false] {
        let mut vif = Vif::connected();
        if rx {
            vif.netback.corrupt_rx_rsp_prod(17);
        } else {
            assert!(vif.send(&frame(0, 60)));
            vif.netback.step(vif.xs.channel_mut());
            vif.netback.corrupt_tx_rsp_prod(1000);
        }
        assert_eq!(vif.netfront.receive_with(|f| f.len()), None);
        let expected = if rx {
            BrokenRing::RxOverflow
        } else {
            BrokenRing::TxOverflow
        };
        assert_eq!(vif.netfront.broken_ring(), Some(expected));
        recover(&mut vif);
    }
}

/// xorshift64*: a seeded generator, so a failing campaign replays.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

#[test]
fn a_random_campaign_of_garbage_never_panics_and_bounds_what_we_hold() {
    let seed = 0x6e65_7466_726f_6e74;
    let mut random = Random(seed);
    let mut vif = Vif::connected();
    let pages = vif.hal.pages_allocated();
    let flags = [
        0,
        NETRXF_MORE_DATA,
        NETRXF_EXTRA_INFO,
        NETRXF_CSUM_BLANK,
        0xffff,
    ];
    let statuses = [
        0i16,
        1,
        13,
        14,
        60,
        1514,
        1515,
        4096,
        4097,
        -1,
        -2,
        i16::MIN,
        i16::MAX,
    ];
    for round in 0..3000 {
        match random.below(10) {
            0..=3 => {
                let slots = (0..=random.below(4))
                    .map(|_| {
                        if random.below(5) == 0 {
                            RxSlot::Extra {
                                kind: random.next() as u8,
                                flags: random.next() as u8,
                            }
                        } else {
                            let len = random.below(1600) as usize;
                            RxSlot::Data {
                                data: frame(random.next() as u8, len),
                                offset: random.pick(&[0, 0, 1, 2600, 4095, u16::MAX]),
                                flags: random.pick(&flags),
                                status: if random.below(2) == 0 {
                                    None
                                } else {
                                    Some(random.pick(&statuses))
                                },
                            }
                        }
                    })
                    .collect();
                vif.netback.pending_rx.push_back(slots);
            }
            4..=6 => {
                let _ = vif.send(&frame(round as u8, 14 + random.below(1501) as usize));
            }
            7 => {
                vif.netback.tx_answer = match random.below(8) {
                    0 => TxAnswer::WrongId(random.next() as u16),
                    1 => TxAnswer::Twice,
                    2 => TxAnswer::Withhold,
                    3 | 4 => TxAnswer::Status(random.pick(&statuses)),
                    _ => TxAnswer::Okay,
                }
            }
            8 if random.below(20) == 0 => vif.netback.corrupt_rx_rsp_prod(random.below(600) as u32),
            _ => {}
        }
        for frame in vif.receive_all() {
            assert!(
                (14..=crate::MAX_FRAME_LEN).contains(&frame.len()),
                "seed {seed:#x} round {round}"
            );
        }
        if vif.netfront.needs_attend() {
            vif.netfront.attend(&mut vif.xs).unwrap();
            vif.settle();
            vif.netback.pending_rx.clear();
            assert_eq!(
                vif.netfront.phase(),
                Phase::Running,
                "seed {seed:#x} round {round}"
            );
        }
        // Frames sent but never answered stay ours, bounded by the buffers.
        vif.netback.transmitted.clear();
    }
    let stats = vif.netfront.statistics();
    assert!(
        stats.rx_frames > 0 && stats.rx_dropped > 0 && stats.broken_rings > 0,
        "{stats:?}"
    );
    assert_eq!(
        vif.hal.pages_allocated(),
        pages,
        "no allocation however bad the backend"
    );
    assert_eq!(vif.hal.grants(), pages);
}

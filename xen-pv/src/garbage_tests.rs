//! Whatever a peer writes, parsing must not panic: deterministic
//! pseudo-random inputs against every parser of peer-written data.

use alloc::vec::Vec;

use crate::sim::xenstore::SimXenstored;
use crate::xenstore::wire::{Header, MsgType};
use crate::xenstore::{Tx, Xenstore, XenstoreInterface};

/// xorshift64*: reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn random_xenstore_reply_streams_never_panic() {
    let mut rng = Rng(0xc0ffee);
    for _ in 0..400 {
        let iface = XenstoreInterface::new_boxed(rng.next() as u32);
        let mut daemon = SimXenstored::new(&iface, 3);
        daemon.set_chunks(1 + rng.below(64) as usize, 1 + rng.below(64) as usize);
        // A plausible header (sometimes matching the first request id)
        // followed by garbage of any length.
        let msg_type = [
            MsgType::Read as u32,
            MsgType::Error as u32,
            MsgType::WatchEvent as u32,
            rng.next() as u32,
        ];
        let header = Header {
            msg_type: msg_type[rng.below(4) as usize],
            req_id: rng.below(3) as u32,
            tx_id: 0,
            len: rng.below(5000) as u32,
        };
        daemon.inject_raw(&header.encode());
        let garbage_len = rng.below(300) as usize;
        daemon.inject_raw(&rng.bytes(garbage_len));
        let mut xs = Xenstore::new(&iface, daemon);
        for _ in 0..3 {
            let _ = xs.read(Tx::NONE, "a");
            let _ = xs.directory(Tx::NONE, "/");
            let _ = xs.poll_watch_event();
            let _ = xs.get_perms(Tx::NONE, "/");
        }
    }
}

#[test]
fn byte_rings_with_random_indices_stay_in_bounds() {
    use crate::ring::ByteRing;
    use core::sync::atomic::{AtomicU8, AtomicU32, Ordering};
    let mut rng = Rng(7);
    let data: Vec<AtomicU8> = (0..64).map(|_| AtomicU8::new(0)).collect();
    let (cons, prod) = (AtomicU32::new(0), AtomicU32::new(0));
    let ring = ByteRing::new(&data, &cons, &prod);
    for _ in 0..10_000 {
        // The peer scribbles over the indices now and then.
        if rng.below(4) == 0 {
            cons.store(rng.next() as u32, Ordering::Relaxed);
            prod.store(
                cons.load(Ordering::Relaxed)
                    .wrapping_add(rng.below(70) as u32),
                Ordering::Relaxed,
            );
        }
        let mut buf = [0u8; 100];
        let want = rng.below(100) as usize;
        if let Ok(n) = ring.read(&mut buf[..want]) {
            assert!(n <= want.min(64));
        }
        if let Ok(n) = ring.write(&buf[..want]) {
            assert!(n <= want.min(64));
        }
    }
}

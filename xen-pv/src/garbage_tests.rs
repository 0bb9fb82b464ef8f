//! Whatever a peer writes, parsing must not panic: deterministic
//! pseudo-random inputs against every parser of peer-written data.

use alloc::vec::Vec;

use crate::sim::xenstore::SimXenstored;
use crate::xenstore::wire::{self, HEADER_LEN, Header, MsgType, Perm, XsError};
use crate::xenstore::{Tx, Xenstore, XenstoreInterface};
use host_fuzz::{FuzzRng, FuzzRun};

/// Reply streams for the client: a plausible header (sometimes matching the
/// first request id, sometimes a watch event) followed by garbage, or a
/// valid message with a few bytes flipped.
fn garbage_reply_stream(rng: &mut FuzzRng) -> Vec<u8> {
    let unknown = rng.next_u64() as u32;
    let msg_type = rng.pick(&[
        MsgType::Read as u32,
        MsgType::Error as u32,
        MsgType::WatchEvent as u32,
        MsgType::Directory as u32,
        MsgType::GetPerms as u32,
        unknown,
    ]);
    let payload_len = rng.below(300) as usize;
    let mut payload = rng.bytes(payload_len);
    if rng.one_in(2) {
        // Mostly text with nul separators, as real replies are.
        for byte in payload.iter_mut() {
            let text = [b'a', b'/', b'0', b'r', b'b', 0, *byte];
            *byte = rng.pick(&text);
        }
    }
    let header = Header {
        msg_type,
        req_id: rng.below(3) as u32,
        tx_id: rng.below(2) as u32,
        len: if rng.one_in(4) {
            rng.next_u64() as u32
        } else {
            payload.len() as u32
        },
    };
    let mut stream = header.encode().to_vec();
    stream.extend_from_slice(&payload);
    for _ in 0..rng.below(4) {
        let at = rng.below(stream.len() as u64) as usize;
        stream[at] = rng.next_u64() as u8;
    }
    stream
}

#[test]
fn fuzz_xenstore_client_with_garbage_replies() {
    let mut run = FuzzRun::new("xenstore client", 0xc0ffee, 400);
    let mut rng = run.rng();
    while run.another() {
        let iface = XenstoreInterface::new_boxed(rng.next_u64() as u32);
        let mut daemon = SimXenstored::new(&iface, 3);
        daemon.set_chunks(1 + rng.below(64) as usize, 1 + rng.below(64) as usize);
        for _ in 0..1 + rng.below(3) {
            daemon.inject_raw(&garbage_reply_stream(&mut rng));
        }
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
fn fuzz_xenstore_wire_parsers() {
    let mut run = FuzzRun::new("xenstore wire", 0x5707e, 20_000);
    let mut rng = run.rng();
    while run.another() {
        let mut header = [0u8; HEADER_LEN];
        rng.fill(&mut header);
        if rng.one_in(2) {
            header[12..].copy_from_slice(&(rng.below(5000) as u32).to_le_bytes());
        }
        if let Ok(decoded) = Header::decode(&header) {
            assert!(decoded.len as usize <= wire::PAYLOAD_MAX);
            assert_eq!(decoded.encode(), header);
        }
        let len = rng.below(64) as usize;
        let mut payload = rng.bytes(len);
        if rng.one_in(2) {
            for byte in payload.iter_mut() {
                let perm_text = [b'r', b'w', b'b', b'n', b'0', b'7', b'x', 0, 0xff, *byte];
                *byte = rng.pick(&perm_text);
            }
        }
        if let Ok(strings) = wire::split_strings(&payload) {
            assert!(strings.iter().all(|s| !s.contains('\0')));
        }
        if let Ok(perms) = wire::parse_perms(&payload) {
            let mut encoded = Vec::new();
            perms.iter().for_each(|p| p.encode_into(&mut encoded));
            assert_eq!(wire::parse_perms(&encoded), Ok(perms));
        }
        let _ = Perm::parse(&payload);
        if let Some(name) = XsError::from_payload(&payload).wire_name() {
            assert!(payload.starts_with(name.as_bytes()));
        }
    }
}

#[test]
fn byte_rings_with_random_indices_stay_in_bounds() {
    use crate::ring::ByteRing;
    use core::sync::atomic::{AtomicU8, AtomicU32, Ordering};
    let mut rng = FuzzRng::new(7);
    let data: Vec<AtomicU8> = (0..64).map(|_| AtomicU8::new(0)).collect();
    let (cons, prod) = (AtomicU32::new(0), AtomicU32::new(0));
    let ring = ByteRing::new(&data, &cons, &prod);
    for _ in 0..10_000 {
        // The peer scribbles over the indices now and then.
        if rng.below(4) == 0 {
            cons.store(rng.next_u64() as u32, Ordering::Relaxed);
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

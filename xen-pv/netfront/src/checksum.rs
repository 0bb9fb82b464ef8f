//! Completing the checksum of a received frame the backend marked
//! `NETRXF_csum_blank` (its checksum field holds no final sum). stordom
//! asks netback for full checksums (`feature-no-csum-offload=1`), so such
//! frames should not come; one that does is completed here, in our own
//! copy, or dropped when it is not a frame whose checksum we can complete.

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERNET_HEADER_LEN: usize = 14;
const IP_PROTOCOL_TCP: u8 = 6;
const IP_PROTOCOL_UDP: u8 = 17;
/// Where the checksum field lies in each transport header.
const TCP_CHECKSUM_AT: usize = 16;
const UDP_CHECKSUM_AT: usize = 6;

/// Why a blank checksum could not be completed (the frame is dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumError {
    /// Not IPv4 carrying TCP or UDP: nothing we know how to complete.
    UnsupportedProtocol,
    /// A header's lengths do not fit the frame.
    Malformed,
    /// A fragment: its transport checksum covers data not in this frame.
    Fragment,
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// One's-complement sum of `data` as big-endian 16-bit words, added to
/// `sum` (not folded).
fn add_words(mut sum: u32, data: &[u8]) -> u32 {
    let mut pairs = data.chunks_exact(2);
    for pair in &mut pairs {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u32::from(*last) << 8;
    }
    // Fold early so the sum of a 64 KiB packet cannot overflow.
    (sum & 0xffff) + (sum >> 16)
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Computes the TCP or UDP checksum of the IPv4 packet in `frame` (an
/// Ethernet frame) and stores it in its checksum field.
pub fn complete_blank_checksum(frame: &mut [u8]) -> Result<(), ChecksumError> {
    if frame.len() < ETHERNET_HEADER_LEN + 20 {
        return Err(ChecksumError::Malformed);
    }
    if be16(frame, 12) != ETHERTYPE_IPV4 {
        return Err(ChecksumError::UnsupportedProtocol);
    }
    let ip = &frame[ETHERNET_HEADER_LEN..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(be16(ip, 2));
    if ip[0] >> 4 != 4 || header_len < 20 || total_len < header_len || total_len > ip.len() {
        return Err(ChecksumError::Malformed);
    }
    // More-fragments set, or a fragment offset: not a whole datagram.
    if be16(ip, 6) & 0x3fff != 0 {
        return Err(ChecksumError::Fragment);
    }
    let protocol = ip[9];
    let checksum_at = match protocol {
        IP_PROTOCOL_TCP => TCP_CHECKSUM_AT,
        IP_PROTOCOL_UDP => UDP_CHECKSUM_AT,
        _ => return Err(ChecksumError::UnsupportedProtocol),
    };
    let segment_len = total_len - header_len;
    if segment_len < checksum_at + 2 {
        return Err(ChecksumError::Malformed);
    }
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&ip[12..20]);
    pseudo[9] = protocol;
    pseudo[10..].copy_from_slice(&(segment_len as u16).to_be_bytes());
    let start = ETHERNET_HEADER_LEN + header_len;
    let segment = &mut frame[start..start + segment_len];
    segment[checksum_at..checksum_at + 2].fill(0);
    let sum = add_words(add_words(0, &pseudo), segment);
    let mut checksum = !fold(sum);
    if protocol == IP_PROTOCOL_UDP && checksum == 0 {
        // A zero UDP checksum means "none"; all ones is the same sum.
        checksum = 0xffff;
    }
    segment[checksum_at..checksum_at + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// An Ethernet frame with an IPv4 UDP datagram carrying `payload`,
    /// its UDP checksum left as `checksum`.
    pub(crate) fn udp_frame(payload: &[u8], checksum: u16) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = [
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let ip_sum = !fold(add_words(0, &ip));
        ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&1234u16.to_be_bytes());
        frame.extend_from_slice(&5678u16.to_be_bytes());
        frame.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        frame.extend_from_slice(&checksum.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// Whether the UDP checksum of `frame` (as built above) verifies.
    pub(crate) fn udp_checksum_verifies(frame: &[u8]) -> bool {
        let ip = &frame[14..34];
        let udp = &frame[34..];
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&ip[12..20]);
        pseudo[9] = 17;
        pseudo[10..].copy_from_slice(&(udp.len() as u16).to_be_bytes());
        fold(add_words(add_words(0, &pseudo), udp)) == 0xffff
    }

    #[test]
    fn a_blank_udp_checksum_is_completed() {
        for len in [0usize, 1, 17, 1472] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut frame = udp_frame(&payload, 0xdead);
            assert_eq!(complete_blank_checksum(&mut frame), Ok(()));
            assert!(udp_checksum_verifies(&frame), "{len}-byte payload");
        }
    }

    #[test]
    fn frames_it_cannot_complete_are_refused_without_panicking() {
        let good = udp_frame(b"hello", 0);
        let cases: [(usize, &[u8], ChecksumError); 4] = [
            (12, &[0x08, 0x06], ChecksumError::UnsupportedProtocol),
            (14 + 6, &[0x20], ChecksumError::Fragment),
            (14 + 2, &[0x07, 0xd0], ChecksumError::Malformed),
            (14 + 9, &[1], ChecksumError::UnsupportedProtocol),
        ];
        for (at, bytes, error) in cases {
            let mut bad = good.clone();
            bad[at..at + bytes.len()].copy_from_slice(bytes);
            assert_eq!(complete_blank_checksum(&mut bad), Err(error), "{at}");
        }
        // Every truncation of a good frame: an answer, never a panic.
        for cut in 0..good.len() {
            let mut short = good[..cut].to_vec();
            let _ = complete_blank_checksum(&mut short);
        }
    }
}

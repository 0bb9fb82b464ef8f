//! The netif wire formats (public/io/netif.h): ring entries, their flags
//! and statuses. Entries are encoded and decoded by hand, little-endian,
//! from copies taken out of the shared ring: the backend may rewrite a
//! slot at any time, so the slot itself is never read twice.

use xen_pv::PAGE_SIZE;
use xen_pv::grant::GrantRef;
use xen_pv::ring::ring_entries;

/// Bytes of a TX ring entry (the union of request, response and extra
/// info is 12 bytes).
pub const TX_ENTRY_LEN: usize = 12;
/// Bytes of an RX ring entry.
pub const RX_ENTRY_LEN: usize = 8;
/// Entries of the one-page TX ring (`NET_TX_RING_SIZE`). netif has no
/// multi-page rings: Linux netback maps exactly one page per ring.
pub const TX_RING_SIZE: u32 = ring_entries(PAGE_SIZE, TX_ENTRY_LEN);
/// Entries of the one-page RX ring (`NET_RX_RING_SIZE`).
pub const RX_RING_SIZE: u32 = ring_entries(PAGE_SIZE, RX_ENTRY_LEN);

/// `NETTXF_csum_blank`: the protocol checksum is left for the backend.
pub const NETTXF_CSUM_BLANK: u16 = 1 << 0;
/// `NETTXF_data_validated`: the checksum is known good.
pub const NETTXF_DATA_VALIDATED: u16 = 1 << 1;
/// `NETTXF_more_data`: the packet goes on in the next slot.
pub const NETTXF_MORE_DATA: u16 = 1 << 2;
/// `NETTXF_extra_info`: an extra-info slot follows.
pub const NETTXF_EXTRA_INFO: u16 = 1 << 3;

/// `NETRXF_data_validated`: the backend checked the checksum.
pub const NETRXF_DATA_VALIDATED: u16 = 1 << 0;
/// `NETRXF_csum_blank`: the checksum field holds only the pseudo-header
/// sum; the receiver must complete it.
pub const NETRXF_CSUM_BLANK: u16 = 1 << 1;
/// `NETRXF_more_data`: the packet goes on in the next slot.
pub const NETRXF_MORE_DATA: u16 = 1 << 2;
/// `NETRXF_extra_info`: an extra-info slot follows this one.
pub const NETRXF_EXTRA_INFO: u16 = 1 << 3;

/// `XEN_NETIF_EXTRA_FLAG_MORE`: another extra-info slot follows.
pub const XEN_NETIF_EXTRA_FLAG_MORE: u8 = 1 << 0;

/// `NETIF_RSP_DROPPED`.
pub const NETIF_RSP_DROPPED: i16 = -2;
/// `NETIF_RSP_ERROR`.
pub const NETIF_RSP_ERROR: i16 = -1;
/// `NETIF_RSP_OKAY`.
pub const NETIF_RSP_OKAY: i16 = 0;
/// `NETIF_RSP_NULL`: the answer to an extra-info slot.
pub const NETIF_RSP_NULL: i16 = 1;

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// `struct netif_tx_request`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxRequest {
    pub gref: GrantRef,
    pub offset: u16,
    pub flags: u16,
    pub id: u16,
    pub size: u16,
}

impl TxRequest {
    pub fn encode(&self) -> [u8; TX_ENTRY_LEN] {
        let mut out = [0; TX_ENTRY_LEN];
        out[0..4].copy_from_slice(&self.gref.to_le_bytes());
        out[4..6].copy_from_slice(&self.offset.to_le_bytes());
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..10].copy_from_slice(&self.id.to_le_bytes());
        out[10..12].copy_from_slice(&self.size.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; TX_ENTRY_LEN]) -> Self {
        TxRequest {
            gref: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            offset: u16_at(bytes, 4),
            flags: u16_at(bytes, 6),
            id: u16_at(bytes, 8),
            size: u16_at(bytes, 10),
        }
    }
}

/// `struct netif_tx_response`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxResponse {
    pub id: u16,
    pub status: i16,
}

impl TxResponse {
    pub fn encode(&self) -> [u8; TX_ENTRY_LEN] {
        let mut out = [0; TX_ENTRY_LEN];
        out[0..2].copy_from_slice(&self.id.to_le_bytes());
        out[2..4].copy_from_slice(&self.status.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; TX_ENTRY_LEN]) -> Self {
        TxResponse {
            id: u16_at(bytes, 0),
            status: u16_at(bytes, 2) as i16,
        }
    }
}

/// `struct netif_rx_request`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxRequest {
    pub id: u16,
    pub gref: GrantRef,
}

impl RxRequest {
    pub fn encode(&self) -> [u8; RX_ENTRY_LEN] {
        let mut out = [0; RX_ENTRY_LEN];
        out[0..2].copy_from_slice(&self.id.to_le_bytes());
        out[4..8].copy_from_slice(&self.gref.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; RX_ENTRY_LEN]) -> Self {
        RxRequest {
            id: u16_at(bytes, 0),
            gref: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        }
    }
}

/// `struct netif_rx_response`. In an extra-info slot the same bytes are
/// a [`ExtraInfo`] instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxResponse {
    /// The request's id, echoed; not relied on: netif puts each response
    /// in the slot of the request it used, and extra-info slots overlay
    /// the id, so the slot index says which buffer was filled.
    pub id: u16,
    pub offset: u16,
    pub flags: u16,
    /// Bytes received in this slot, or a negative `NETIF_RSP_*`.
    pub status: i16,
}

impl RxResponse {
    pub fn encode(&self) -> [u8; RX_ENTRY_LEN] {
        let mut out = [0; RX_ENTRY_LEN];
        out[0..2].copy_from_slice(&self.id.to_le_bytes());
        out[2..4].copy_from_slice(&self.offset.to_le_bytes());
        out[4..6].copy_from_slice(&self.flags.to_le_bytes());
        out[6..8].copy_from_slice(&self.status.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; RX_ENTRY_LEN]) -> Self {
        RxResponse {
            id: u16_at(bytes, 0),
            offset: u16_at(bytes, 2),
            flags: u16_at(bytes, 4),
            status: u16_at(bytes, 6) as i16,
        }
    }
}

/// The head of `struct netif_extra_info`: its type and flags (the rest
/// is type-specific and unused here: no extra type is negotiated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtraInfo {
    pub kind: u8,
    pub flags: u8,
}

impl ExtraInfo {
    pub fn decode(bytes: &[u8]) -> Self {
        ExtraInfo {
            kind: bytes[0],
            flags: bytes[1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_and_layouts_match_netif_h() {
        assert_eq!(TX_RING_SIZE, 256);
        assert_eq!(RX_RING_SIZE, 256);
        let tx = TxRequest {
            gref: 0x0403_0201,
            offset: 0x0605,
            flags: 0x0807,
            id: 0x0a09,
            size: 0x0c0b,
        };
        assert_eq!(tx.encode(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(TxRequest::decode(&tx.encode()), tx);
        let rx = RxRequest {
            id: 0x0201,
            gref: 0x0807_0605,
        };
        assert_eq!(rx.encode(), [1, 2, 0, 0, 5, 6, 7, 8]);
        assert_eq!(RxRequest::decode(&rx.encode()), rx);
        let rsp = RxResponse {
            id: 1,
            offset: 2,
            flags: NETRXF_MORE_DATA,
            status: -2,
        };
        assert_eq!(rsp.encode(), [1, 0, 2, 0, 4, 0, 0xfe, 0xff]);
        assert_eq!(RxResponse::decode(&rsp.encode()), rsp);
        let txr = TxResponse { id: 7, status: -1 };
        assert_eq!(TxResponse::decode(&txr.encode()), txr);
    }
}

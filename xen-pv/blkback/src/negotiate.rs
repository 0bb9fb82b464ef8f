//! Negotiation with a frontend over xenstore: what the backend offers at
//! InitWait, the disk's size at Connected, and the details the frontend
//! published for its rings.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use blockdev::Geometry;
use xen_pv::DomId;
use xen_pv::grant::GrantRef;
use xen_pv::ring::PeerChannel;
use xen_pv::xenstore::{Tx, Xenstore, XsError};

use crate::blkif::Protocol;
use crate::ring_io::MAX_RING_PAGE_ORDER;
use crate::served_disk::ServedDisk;

/// `info` bits (`VDISK_*` in blkif.h).
const VDISK_CDROM: u32 = 1;
const VDISK_REMOVABLE: u32 = 2;
const VDISK_READONLY: u32 = 4;

/// What the toolstack asked for the vbd, besides its target.
pub(crate) struct Offer {
    pub read_only: bool,
    pub cdrom: bool,
    pub removable: bool,
    /// `discard-enable` is not 0.
    pub discard_enabled: bool,
}

/// Publishes the features of `disk` under the backend directory `path`
/// (see the crate documentation for the list), in one round trip.
pub(crate) fn publish_features<C: PeerChannel>(
    xs: &mut Xenstore<'_, C>,
    path: &str,
    disk: &ServedDisk,
    offer: &Offer,
) -> Result<(), XsError> {
    let info = [
        (offer.cdrom, VDISK_CDROM),
        (offer.removable, VDISK_REMOVABLE),
        (offer.read_only, VDISK_READONLY),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .fold(0, |info, (_, bit)| info | bit);
    let discard = disk
        .discard_granularity_bytes()
        .filter(|_| offer.discard_enabled);
    let max_indirect = disk.max_indirect_segments();
    let max_queues = disk.max_queues();
    let mut nodes = vec![
        ("feature-flush-cache", u8::from(disk.flushes()).to_string()),
        ("feature-barrier", "1".to_string()),
        ("feature-persistent", "1".to_string()),
        ("max-ring-page-order", MAX_RING_PAGE_ORDER.to_string()),
    ];
    if max_queues > 1 {
        nodes.push(("multi-queue-max-queues", max_queues.to_string()));
    }
    if max_indirect > 0 {
        nodes.push(("feature-max-indirect-segments", max_indirect.to_string()));
    }
    match discard {
        Some(granularity) => nodes.extend([
            ("feature-discard", "1".to_string()),
            ("discard-granularity", granularity.to_string()),
            ("discard-alignment", "0".to_string()),
            ("discard-secure", "0".to_string()),
        ]),
        None => nodes.push(("feature-discard", "0".to_string())),
    }
    nodes.push(("info", info.to_string()));
    write_nodes(xs, path, &nodes)
}

/// Publishes the disk's size under `path`, in one round trip: `sectors`
/// (512-byte units), `sector-size`, `physical-sector-size`.
pub(crate) fn publish_size<C: PeerChannel>(
    xs: &mut Xenstore<'_, C>,
    path: &str,
    sectors: u64,
    geometry: &Geometry,
) -> Result<(), XsError> {
    let nodes = [
        ("sectors", sectors.to_string()),
        ("sector-size", geometry.logical_block_size.to_string()),
        (
            "physical-sector-size",
            geometry.physical_block_size.to_string(),
        ),
    ];
    write_nodes(xs, path, &nodes)
}

/// Writes `nodes` (name, value) under `path`, waiting for one reply (see
/// [`Xenstore::write_batch`]): not atomically, which the frontend does not
/// notice, since it reads them only once the state written after them
/// tells it to.
fn write_nodes<C: PeerChannel>(
    xs: &mut Xenstore<'_, C>,
    path: &str,
    nodes: &[(&str, String)],
) -> Result<(), XsError> {
    let paths: Vec<String> = nodes
        .iter()
        .map(|(name, _)| format!("{path}/{name}"))
        .collect();
    let batch: Vec<(&str, &[u8])> = paths
        .iter()
        .zip(nodes)
        .map(|(path, (_, value))| (path.as_str(), value.as_bytes()))
        .collect();
    xs.write_batch(&batch)
}

/// What a frontend published for its ring (its xenstore directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendRing {
    /// The frontend domain.
    pub domid: DomId,
    /// `ring-ref`, or `ring-ref0..` for a ring of `1 << ring-page-order`
    /// pages: the grants of the shared ring's pages, in order.
    pub ring_refs: Vec<GrantRef>,
    /// `event-channel`: the frontend's unbound port.
    pub event_channel: u32,
    /// `protocol`: the ABI of the ring entries.
    pub protocol: Protocol,
    /// `feature-persistent`: the frontend keeps its data grants.
    pub persistent: bool,
}

/// Reads what the frontend published for its rings: `ring-ref` (or
/// `ring-ref0..` after `ring-page-order`) and `event-channel` in its
/// directory, or in `queue-<n>/` for each of `multi-queue-num-queues`
/// queues; `protocol` and `feature-persistent`. The inner `Err` explains
/// what is unusable.
pub(crate) fn read_frontend_rings<C: PeerChannel>(
    xs: &mut Xenstore<'_, C>,
    frontend: &str,
    domid: DomId,
    max_queues: u16,
) -> Result<Result<Vec<FrontendRing>, String>, XsError> {
    let number = |xs: &mut Xenstore<'_, C>, path: &str| -> Result<Option<u32>, XsError> {
        Ok(read_optional(xs, path)?
            .as_deref()
            .and_then(parse_number::<u32>))
    };
    let protocol = read_optional(xs, &format!("{frontend}/protocol"))?;
    let Some(protocol) = Protocol::from_xenstore(protocol.as_deref()) else {
        return Ok(Err(format!("unknown protocol {protocol:?}")));
    };
    let persistent = number(xs, &format!("{frontend}/feature-persistent"))? == Some(1);
    let queues_node = format!("{frontend}/multi-queue-num-queues");
    let queues = match read_optional(xs, &queues_node)? {
        None => 1,
        Some(text) => match parse_number::<u16>(&text).filter(|q| (1..=max_queues).contains(q)) {
            Some(queues) => queues,
            None => return Ok(Err(format!("{text:?} queues asked, at most {max_queues}"))),
        },
    };
    let order_node = format!("{frontend}/ring-page-order");
    let page_order = match read_optional(xs, &order_node)? {
        None => None,
        Some(text) => match parse_number::<u32>(&text).filter(|o| *o <= MAX_RING_PAGE_ORDER) {
            Some(order) => Some(order),
            None => {
                return Ok(Err(format!(
                    "ring-page-order {text:?} beyond {MAX_RING_PAGE_ORDER}"
                )));
            }
        },
    };
    let mut rings = Vec::with_capacity(usize::from(queues));
    for queue in 0..queues {
        let dir = if queues == 1 {
            String::from(frontend)
        } else {
            format!("{frontend}/queue-{queue}")
        };
        let ref_names: Vec<String> = match page_order {
            None => alloc::vec![format!("{dir}/ring-ref")],
            Some(order) => (0..1u32 << order)
                .map(|i| format!("{dir}/ring-ref{i}"))
                .collect(),
        };
        let mut ring_refs = Vec::with_capacity(ref_names.len());
        for name in &ref_names {
            match number(xs, name)? {
                Some(gref) => ring_refs.push(gref),
                None => return Ok(Err(format!("no usable {name}"))),
            }
        }
        let Some(event_channel) = number(xs, &format!("{dir}/event-channel"))? else {
            return Ok(Err(format!("no usable event-channel in {dir}")));
        };
        rings.push(FrontendRing {
            domid,
            ring_refs,
            event_channel,
            protocol,
            persistent,
        });
    }
    Ok(Ok(rings))
}

/// A node's text, `None` if it does not exist (or is not text).
pub(crate) fn read_optional<C: PeerChannel>(
    xs: &mut Xenstore<'_, C>,
    path: &str,
) -> Result<Option<String>, XsError> {
    match xs.read_string(Tx::NONE, path) {
        Ok(value) => Ok(Some(value)),
        Err(XsError::NoEntry | XsError::Invalid) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A decimal number of digits only.
pub(crate) fn parse_number<T: core::str::FromStr>(text: &str) -> Option<T> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

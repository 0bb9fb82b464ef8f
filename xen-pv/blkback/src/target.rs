//! What a vbd serves: the `target=` of the xl disk spec, which libxl
//! writes to the backend's `params` node, and the kernel's side of opening
//! it.
//!
//! # Syntax
//! | `target=`                 | serves                                              |
//! |---------------------------|-----------------------------------------------------|
//! | `ram:64M`                 | a new zero-filled RAM disk; size in bytes with an optional `K`/`M`/`G`/`T` (binary) suffix, a multiple of 512 |
//! | `module:0`                | boot module 0 (as the boot loader listed them)      |
//! | `nvme0n1`                 | a whole disk, named by the kernel (`nvme<c>n<ns>`, `ahci<c>p<port>`, `virtio<c>`; see [`crate::controllers`]) |
//! | `nvme0n1:p1`, `module:0:p1` | partition 1 of that disk or module, numbered as Linux does (GPT: entry index + 1; MBR: primaries 1-4 by slot, logical partitions from 5) |
//! | `nvme0n1@2048+1048576`    | 1048576 sectors from sector 2048 of that disk; sectors are 512 bytes, as everywhere in blkif, and must be aligned to the disk's logical block size |
//! | `nbd:10.0.0.2:10809/disk0` | export `disk0` of the NBD server at 10.0.0.2, port 10809, reached over stordom's vif; `nbd:HOST[:PORT][/EXPORT]`: HOST an IPv4 address (there is no DNS), PORT 1-65535 (default [`NBD_DEFAULT_PORT`]), EXPORT at most [`MAX_NBD_EXPORT`] bytes with no control characters (absent or empty: the server's default export) |
//!
//! This module parses; [`TargetOpener::open`] (the kernel) maps a
//! [`Target`] to a claimed [`DiskView`]: [`blockdev::Disk::claim_all`] for a
//! whole disk, [`claim_sectors`] for a [`Target::Range`], [`claim_partition`]
//! for a [`Target::Partition`] (from the table the kernel read when it
//! found the disk, with [`blockdev::partition::read_partition_table`]).
//! Several vbds may serve ranges or partitions of one disk; overlapping
//! claims, and a whole disk with any of its parts, are refused.
//!
//! A [`Target::Nbd`] has no disk until its server has answered: the
//! kernel's opener answers [`OpenError::InProgress`] while it connects,
//! and the vbd asks again a little later.
//!
//! Partitions are tested on the host (the table parser in blockdev, and a
//! vbd on a partition of a simulated GPT disk in `tests/partitions.rs`)
//! and under Xen by the `partitions` scenario (an MBR in a boot module).

use core::fmt;
use core::net::Ipv4Addr;

use alloc::string::String;
use blockdev::partition::{EntryError, PartitionTable, TableError};
use blockdev::{ClaimError, Disk, DiskView};

use crate::controllers::BringUpFailure;
use crate::served_disk::OpenedTarget;

/// Longest disk name accepted.
pub const MAX_DISK_NAME: usize = 32;
/// The NBD port an `nbd:` target without one connects to (IANA's).
pub const NBD_DEFAULT_PORT: u16 = 10809;
/// Longest export name an `nbd:` target may ask for, in bytes (the
/// protocol allows 4096; xenstore values and logs stay short).
pub const MAX_NBD_EXPORT: usize = 256;

/// A parsed `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// A fresh RAM disk of `bytes` bytes.
    Ram { bytes: u64 },
    /// Boot module number `index`.
    Module { index: u32 },
    /// A whole disk.
    Disk { name: &'a str },
    /// Partition `number` (from 1) of a disk; `disk` is a disk name or
    /// `module:N`.
    Partition { disk: &'a str, number: u32 },
    /// `sectors` 512-byte sectors of a disk, from sector `start`.
    Range {
        disk: &'a str,
        start: u64,
        sectors: u64,
    },
    /// Export `export` (empty: the server's default) of the NBD server at
    /// `address`:`port`.
    Nbd {
        address: Ipv4Addr,
        port: u16,
        export: &'a str,
    },
}

/// What is wrong with an `nbd:` target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdTargetError {
    /// The host is not a dotted IPv4 address (a name, IPv6, or garbage).
    HostNotIpv4,
    /// The address cannot be connected to (0.0.0.0, broadcast, multicast).
    UnusableAddress,
    /// The port is not a number from 1 to 65535.
    BadPort,
    /// The export name is longer than [`MAX_NBD_EXPORT`] bytes.
    ExportTooLong,
    /// The export name has a control character.
    BadExportName,
}

impl fmt::Display for NbdTargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdTargetError::HostNotIpv4 => {
                f.write_str("the host must be an IPv4 address such as 10.0.0.2 (there is no DNS)")
            }
            NbdTargetError::UnusableAddress => {
                f.write_str("the address is unspecified, broadcast or multicast")
            }
            NbdTargetError::BadPort => f.write_str("the port must be a number from 1 to 65535"),
            NbdTargetError::ExportTooLong => {
                write!(f, "the export name is longer than {MAX_NBD_EXPORT} bytes")
            }
            NbdTargetError::BadExportName => f.write_str("the export name has a control character"),
        }
    }
}

/// Why a target cannot be served; reported in the backend's `error` node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// The `params` value does not follow the target syntax.
    BadSyntax,
    /// No disk, partition or module of that name or number.
    NotFound,
    /// A size or range that is zero, unaligned or beyond the disk.
    BadSize,
    /// Not enough memory for the RAM disk (or the backend's state).
    OutOfMemory,
    /// The target is already served read-write to another frontend.
    Busy,
    /// The disk's geometry cannot be served over blkif (block size not a
    /// multiple of 512, no blocks).
    BadGeometry,
    /// The disk's partition table could not be read or trusted.
    PartitionTable(TableError),
    /// The partition's table entry is unusable.
    BadPartition(EntryError),
    /// The disk's controller (or the disk itself) failed to come up when
    /// stordom started.
    BringUpFailed(BringUpFailure),
    /// An `nbd:` target that does not follow its syntax, and why.
    BadNbdTarget(NbdTargetError),
    /// A network target cannot be served: no network, no connection to
    /// its server in time, or the server refused (the kernel's words).
    Network(String),
    /// Not an error yet: the target is being made ready (a network target
    /// connecting); the vbd asks again shortly.
    InProgress,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::BadSyntax => f.write_str("target syntax not understood"),
            OpenError::NotFound => f.write_str("no such disk, partition or module"),
            OpenError::BadSize => f.write_str("bad size or range"),
            OpenError::OutOfMemory => f.write_str("out of memory"),
            OpenError::Busy => f.write_str("target is in use"),
            OpenError::BadGeometry => f.write_str("disk geometry cannot be served"),
            OpenError::PartitionTable(why) => {
                write!(f, "the disk's partition table is unusable: {why}")
            }
            OpenError::BadPartition(why) => write!(f, "the partition {why}"),
            OpenError::BringUpFailed(failure) => write!(f, "{failure}"),
            OpenError::BadNbdTarget(why) => write!(f, "bad nbd target: {why}"),
            OpenError::Network(why) => f.write_str(why),
            OpenError::InProgress => f.write_str("still connecting"),
        }
    }
}

/// Opens targets; the kernel implements it over its disks and modules.
pub trait TargetOpener {
    /// Claims `target` for the vbd at `vbd_path` (`backend/vbd/<frontend>/
    /// <devid>`); `read_only` when the toolstack's `mode` is `r`. Each
    /// ring of the vbd opens a queue of the view, and moves data the way
    /// the returned data path says.
    fn open(
        &mut self,
        vbd_path: &str,
        target: &Target<'_>,
        read_only: bool,
    ) -> Result<OpenedTarget, OpenError>;
}

impl From<ClaimError> for OpenError {
    fn from(error: ClaimError) -> Self {
        match error {
            ClaimError::OutOfRange => OpenError::BadSize,
            ClaimError::Busy | ClaimError::NoHandles => OpenError::Busy,
        }
    }
}

/// Claims `sectors` 512-byte sectors of `disk` from sector `start` (a
/// [`Target::Range`]); both must fall on the disk's logical blocks.
pub fn claim_sectors(disk: &Disk, start: u64, sectors: u64) -> Result<DiskView, OpenError> {
    let per_block = u64::from(disk.geometry().logical_block_size) / 512;
    let aligned = |n: u64| per_block > 0 && n.is_multiple_of(per_block);
    if !aligned(start) || !aligned(sectors) {
        return Err(OpenError::BadSize);
    }
    Ok(disk.claim(start / per_block, sectors / per_block)?)
}

/// Claims partition `number` of `disk` (a [`Target::Partition`]) as
/// `table`, read from the disk when it was found, lists it.
pub fn claim_partition(
    disk: &Disk,
    table: &Result<PartitionTable, TableError>,
    number: u32,
) -> Result<DiskView, OpenError> {
    let table = table.as_ref().map_err(|e| OpenError::PartitionTable(*e))?;
    let entry = table.entry(number).ok_or(OpenError::NotFound)?;
    let extent = entry.extent.map_err(OpenError::BadPartition)?;
    Ok(disk.claim(extent.start, extent.blocks)?)
}

impl<'a> Target<'a> {
    /// Parses a `params` value (see the module documentation).
    pub fn parse(params: &'a str) -> Result<Target<'a>, OpenError> {
        if let Some(size) = params.strip_prefix("ram:") {
            let bytes = parse_size(size).ok_or(OpenError::BadSyntax)?;
            if bytes == 0 || !bytes.is_multiple_of(512) {
                return Err(OpenError::BadSize);
            }
            return Ok(Target::Ram { bytes });
        }
        if let Some(rest) = params.strip_prefix("nbd:") {
            return parse_nbd(rest).map_err(OpenError::BadNbdTarget);
        }
        if let Some(rest) = params.strip_prefix("module:") {
            let (digits, partition) = split_partition(rest)?;
            let index = parse_u32(digits).ok_or(OpenError::BadSyntax)?;
            return Ok(match partition {
                None => Target::Module { index },
                // The kernel names a module's disk `module:N`: no zeros
                // before N, or the name would not match.
                Some(_) if digits.len() > 1 && digits.starts_with('0') => {
                    return Err(OpenError::BadSyntax);
                }
                Some(number) => Target::Partition {
                    disk: &params[.."module:".len() + digits.len()],
                    number,
                },
            });
        }
        if let (disk, Some(number)) = split_partition(params)? {
            return Ok(Target::Partition {
                disk: disk_name(disk)?,
                number,
            });
        }
        if let Some((disk, range)) = params.split_once('@') {
            let (start, sectors) = range.split_once('+').ok_or(OpenError::BadSyntax)?;
            let (start, sectors) = parse_number(start)
                .zip(parse_number(sectors))
                .ok_or(OpenError::BadSyntax)?;
            if sectors == 0 || start.checked_add(sectors).is_none() {
                return Err(OpenError::BadSize);
            }
            return Ok(Target::Range {
                disk: disk_name(disk)?,
                start,
                sectors,
            });
        }
        Ok(Target::Disk {
            name: disk_name(params)?,
        })
    }
}

/// `HOST[:PORT][/EXPORT]` of an `nbd:` target.
fn parse_nbd(text: &str) -> Result<Target<'_>, NbdTargetError> {
    let (authority, export) = text.split_once('/').unwrap_or((text, ""));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => {
            let port = parse_number(port)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|&p| p != 0)
                .ok_or(NbdTargetError::BadPort)?;
            (host, port)
        }
        None => (authority, NBD_DEFAULT_PORT),
    };
    let address: Ipv4Addr = host.parse().map_err(|_| NbdTargetError::HostNotIpv4)?;
    if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
        return Err(NbdTargetError::UnusableAddress);
    }
    if export.len() > MAX_NBD_EXPORT {
        return Err(NbdTargetError::ExportTooLong);
    }
    if export.chars().any(char::is_control) {
        return Err(NbdTargetError::BadExportName);
    }
    Ok(Target::Nbd {
        address,
        port,
        export,
    })
}

/// Splits `text` at a `:pN` suffix into what comes before and N (from 1).
fn split_partition(text: &str) -> Result<(&str, Option<u32>), OpenError> {
    let Some((before, number)) = text.split_once(":p") else {
        return Ok((text, None));
    };
    let number = parse_u32(number)
        .filter(|&n| n > 0)
        .ok_or(OpenError::BadSyntax)?;
    Ok((before, Some(number)))
}

/// A disk name: a lowercase letter, then lowercase letters and digits.
fn disk_name(name: &str) -> Result<&str, OpenError> {
    let mut chars = name.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if starts_well && rest_ok && name.len() <= MAX_DISK_NAME {
        Ok(name)
    } else {
        Err(OpenError::BadSyntax)
    }
}

/// A decimal number of digits only (no sign, no spaces).
fn parse_number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_u32(text: &str) -> Option<u32> {
    parse_number(text).and_then(|n| u32::try_from(n).ok())
}

/// A byte count with an optional binary suffix.
fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        b'T' | b't' => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    parse_number(digits)?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses() {
        assert_eq!(
            Target::parse("ram:64M"),
            Ok(Target::Ram { bytes: 64 << 20 })
        );
        assert_eq!(Target::parse("ram:4096"), Ok(Target::Ram { bytes: 4096 }));
        assert_eq!(Target::parse("module:0"), Ok(Target::Module { index: 0 }));
        assert_eq!(
            Target::parse("nvme0n1"),
            Ok(Target::Disk { name: "nvme0n1" })
        );
        assert_eq!(
            Target::parse("nvme0n1:p2"),
            Ok(Target::Partition {
                disk: "nvme0n1",
                number: 2
            })
        );
        assert_eq!(
            Target::parse("module:3:p12"),
            Ok(Target::Partition {
                disk: "module:3",
                number: 12
            })
        );
        assert_eq!(
            Target::parse("ahci0@2048+1048576"),
            Ok(Target::Range {
                disk: "ahci0",
                start: 2048,
                sectors: 1048576
            })
        );
    }

    #[test]
    fn nbd_targets_parse() {
        let nbd = |address: [u8; 4], port, export| Target::Nbd {
            address: Ipv4Addr::from(address),
            port,
            export,
        };
        let cases = [
            (
                "nbd:10.0.0.2:10809/disk0",
                nbd([10, 0, 0, 2], 10809, "disk0"),
            ),
            (
                "nbd:10.0.0.2/disk0",
                nbd([10, 0, 0, 2], NBD_DEFAULT_PORT, "disk0"),
            ),
            ("nbd:192.168.1.1:1", nbd([192, 168, 1, 1], 1, "")),
            ("nbd:192.168.1.1:65535/", nbd([192, 168, 1, 1], 65535, "")),
            ("nbd:127.0.0.1", nbd([127, 0, 0, 1], NBD_DEFAULT_PORT, "")),
            (
                "nbd:10.1.2.3:2000/a/b:c@d",
                nbd([10, 1, 2, 3], 2000, "a/b:c@d"),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Target::parse(text), Ok(want), "{text:?}");
        }
        let longest = alloc::format!("nbd:10.0.0.2/{}", "x".repeat(MAX_NBD_EXPORT));
        assert!(matches!(Target::parse(&longest), Ok(Target::Nbd { .. })));
    }

    #[test]
    fn malformed_nbd_targets_say_why() {
        let overlong = alloc::format!("nbd:10.0.0.2/{}", "x".repeat(MAX_NBD_EXPORT + 1));
        let cases = [
            ("nbd:", NbdTargetError::HostNotIpv4),
            (
                "nbd:server.example:10809/disk0",
                NbdTargetError::HostNotIpv4,
            ),
            ("nbd:localhost/disk0", NbdTargetError::HostNotIpv4),
            ("nbd:10.0.0/disk0", NbdTargetError::HostNotIpv4),
            ("nbd:10.0.0.256/disk0", NbdTargetError::HostNotIpv4),
            ("nbd:010.0.0.1/disk0", NbdTargetError::HostNotIpv4),
            ("nbd:[::1]:10809/disk0", NbdTargetError::HostNotIpv4),
            ("nbd:::1/disk0", NbdTargetError::HostNotIpv4),
            ("nbd: 10.0.0.2/disk0", NbdTargetError::HostNotIpv4),
            ("nbd:0.0.0.0/disk0", NbdTargetError::UnusableAddress),
            ("nbd:255.255.255.255/disk0", NbdTargetError::UnusableAddress),
            ("nbd:224.0.0.1/disk0", NbdTargetError::UnusableAddress),
            ("nbd:10.0.0.2:/disk0", NbdTargetError::BadPort),
            ("nbd:10.0.0.2:0/disk0", NbdTargetError::BadPort),
            ("nbd:10.0.0.2:65536/disk0", NbdTargetError::BadPort),
            ("nbd:10.0.0.2:-1/disk0", NbdTargetError::BadPort),
            ("nbd:10.0.0.2:nbd/disk0", NbdTargetError::BadPort),
            ("nbd:10.0.0.2:10809:1/disk0", NbdTargetError::HostNotIpv4),
            ("nbd:10.0.0.2/disk\n0", NbdTargetError::BadExportName),
            ("nbd:10.0.0.2/disk\u{7f}", NbdTargetError::BadExportName),
            (overlong.as_str(), NbdTargetError::ExportTooLong),
        ];
        for (text, why) in cases {
            assert_eq!(
                Target::parse(text),
                Err(OpenError::BadNbdTarget(why)),
                "{text:?}"
            );
        }
        let shown = alloc::format!("{}", OpenError::BadNbdTarget(NbdTargetError::HostNotIpv4));
        assert!(shown.contains("IPv4") && shown.contains("DNS"), "{shown}");
    }

    #[test]
    fn malformed_targets_are_refused() {
        for bad in [
            "",
            "ram:",
            "ram:12X",
            "ram:-1",
            "ram:99999999999999999999",
            "ram:100000000000T",
            "module:",
            "module:x",
            "module:99999999999",
            "nvme0n1:p0",
            "nvme0n1:p",
            "nvme0n1:p1:p2",
            "nvme0n1:p4294967296",
            "module:0:p0",
            "module:0:p",
            "module::p1",
            "module:x:p1",
            "module:0:p1x",
            "module:01:p1",
            "ram:64M:p1",
            "nvme0n1@1",
            "nvme0n1@+5",
            "NVME",
            "0disk",
            "nvme/0",
            "nvme 0",
            ":p1",
            "@1+1",
            "phy:/dev/sda",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert_eq!(Target::parse(bad), Err(OpenError::BadSyntax), "{bad:?}");
        }
        for bad_size in [
            "ram:0",
            "ram:1000",
            "nvme0n1@1+0",
            "nvme0n1@1+18446744073709551615",
        ] {
            assert_eq!(
                Target::parse(bad_size),
                Err(OpenError::BadSize),
                "{bad_size:?}"
            );
        }
    }
}

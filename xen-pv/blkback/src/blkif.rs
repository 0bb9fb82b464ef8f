//! blkif wire structures (public/io/blkif.h) for the three ABIs, and
//! copy-once-then-validate request parsing.
//!
//! A frontend names its ABI in xenstore (`protocol`): "x86_32-abi" packs
//! 64-bit fields at 4-byte alignment, "x86_64-abi" aligns them to 8; a
//! frontend that names none uses the backend's native ABI (x86-64 here).
//! All structures below are alignment-1 with explicit padding, so their
//! layout is the header's on every host.

use alloc::vec::Vec;
use core::mem::size_of;
use zerocopy::little_endian::{I16, U16, U32, U64};

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Segments carried directly in a request.
pub const MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// Grant references of indirect segment pages in an indirect request.
pub const MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segment entries in one indirect page.
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = xen_pv::PAGE_SIZE / size_of::<WireSegment>();
/// Segments the indirect pages of one request can list, whatever the
/// backend advertised.
pub const MAX_INDIRECT_SEGMENTS: usize =
    MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_PAGE;
/// Last 512-byte sector of a 4 KiB page.
pub const LAST_SECTOR_IN_PAGE: u8 = 7;
/// Ring entry size of the x86-64 ABI (the request; responses are smaller).
pub const ENTRY_SIZE_X86_64: usize = 112;
/// Ring entry size of the x86-32 ABI.
pub const ENTRY_SIZE_X86_32: usize = 108;

/// BlkifRequest operations (`BLKIF_OP_*`).
pub const OP_READ: u8 = 0;
pub const OP_WRITE: u8 = 1;
pub const OP_WRITE_BARRIER: u8 = 2;
pub const OP_FLUSH_DISKCACHE: u8 = 3;
pub const OP_DISCARD: u8 = 5;
pub const OP_INDIRECT: u8 = 6;

/// Response status (`BLKIF_RSP_*`).
pub const RSP_OKAY: i16 = 0;
pub const RSP_ERROR: i16 = -1;
pub const RSP_EOPNOTSUPP: i16 = -2;

/// `BLKIF_DISCARD_SECURE`: the discard must make the data unrecoverable.
pub const DISCARD_SECURE: u8 = 1;

/// `struct blkif_request_segment`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct WireSegment {
    pub gref: U32,
    pub first_sect: u8,
    pub last_sect: u8,
    pub _pad: [u8; 2],
}

impl WireSegment {
    pub fn new(gref: u32, first_sect: u8, last_sect: u8) -> Self {
        WireSegment {
            gref: U32::new(gref),
            first_sect,
            last_sect,
            _pad: [0; 2],
        }
    }
}

/// Read/write request, x86-64 ABI (also native).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestX86_64 {
    pub operation: u8,
    pub nr_segments: u8,
    pub handle: U16,
    pub _pad1: [u8; 4],
    pub id: U64,
    pub sector_number: U64,
    pub seg: [WireSegment; MAX_SEGMENTS_PER_REQUEST],
}

/// Read/write request, x86-32 ABI (64-bit fields 4-byte aligned).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestX86_32 {
    pub operation: u8,
    pub nr_segments: u8,
    pub handle: U16,
    pub id: U64,
    pub sector_number: U64,
    pub seg: [WireSegment; MAX_SEGMENTS_PER_REQUEST],
}

/// Discard request, x86-64 ABI.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DiscardX86_64 {
    pub operation: u8,
    pub flag: u8,
    pub handle: U16,
    pub _pad1: [u8; 4],
    pub id: U64,
    pub sector_number: U64,
    pub nr_sectors: U64,
}

/// Discard request, x86-32 ABI.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DiscardX86_32 {
    pub operation: u8,
    pub flag: u8,
    pub handle: U16,
    pub id: U64,
    pub sector_number: U64,
    pub nr_sectors: U64,
}

/// Indirect request, x86-64 ABI: segments live in granted pages.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IndirectX86_64 {
    pub operation: u8,
    pub indirect_op: u8,
    pub nr_segments: U16,
    pub _pad1: [u8; 4],
    pub id: U64,
    pub sector_number: U64,
    pub handle: U16,
    pub _pad2: [u8; 2],
    pub indirect_grefs: [U32; MAX_INDIRECT_PAGES_PER_REQUEST],
    pub _pad3: [u8; 4],
}

/// Indirect request, x86-32 ABI.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IndirectX86_32 {
    pub operation: u8,
    pub indirect_op: u8,
    pub nr_segments: U16,
    pub id: U64,
    pub sector_number: U64,
    pub handle: U16,
    pub _pad2: [u8; 2],
    pub indirect_grefs: [U32; MAX_INDIRECT_PAGES_PER_REQUEST],
    pub _pad3: [u8; 8],
}

/// Response, x86-64 ABI.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ResponseX86_64 {
    pub id: U64,
    pub operation: u8,
    pub _pad1: u8,
    pub status: I16,
    pub _pad2: [u8; 4],
}

/// Response, x86-32 ABI.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ResponseX86_32 {
    pub id: U64,
    pub operation: u8,
    pub _pad1: u8,
    pub status: I16,
}

/// The ABI a frontend speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    X86_32,
    X86_64,
}

impl Protocol {
    /// The ABI for the frontend's `protocol` node (absent: native).
    pub fn from_xenstore(protocol: Option<&str>) -> Option<Protocol> {
        match protocol {
            None => Some(Protocol::native()),
            Some("x86_32-abi") => Some(Protocol::X86_32),
            Some("x86_64-abi") => Some(Protocol::X86_64),
            Some(_) => None,
        }
    }

    /// This backend's own ABI.
    pub fn native() -> Protocol {
        Protocol::X86_64
    }

    /// Bytes per ring slot.
    pub fn entry_size(self) -> usize {
        match self {
            Protocol::X86_32 => ENTRY_SIZE_X86_32,
            Protocol::X86_64 => ENTRY_SIZE_X86_64,
        }
    }
}

/// A ring slot's bytes, copied out of shared memory (large enough for
/// either ABI; the tail is unused for x86-32).
pub type Entry = [u8; ENTRY_SIZE_X86_64];

/// One data segment: part of a granted page, in 512-byte sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GrantedSegment {
    pub gref: u32,
    pub first_sect: u8,
    pub last_sect: u8,
}

impl GrantedSegment {
    /// Sectors covered (validated segments only).
    pub fn sectors(&self) -> u32 {
        u32::from(self.last_sect - self.first_sect) + 1
    }
}

/// Direction of a data transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// A validated request; nothing in it still points into shared memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlkifRequest {
    /// Read or write of the sectors named by the direct segments.
    ReadWrite {
        id: u64,
        direction: Direction,
        handle: u16,
        sector: u64,
        segments: SegmentList,
    },
    /// Write with barrier semantics (deprecated but still sent).
    Barrier {
        id: u64,
        handle: u16,
        sector: u64,
        segments: SegmentList,
    },
    /// Flush the device's write cache.
    Flush { id: u64 },
    /// Discard a sector range.
    Discard {
        id: u64,
        sector: u64,
        nr_sectors: u64,
        secure: bool,
    },
    /// Read or write whose segments are in `nr_segments` entries spread
    /// over the granted indirect pages.
    Indirect {
        id: u64,
        direction: Direction,
        handle: u16,
        sector: u64,
        nr_segments: u16,
        indirect_grefs: [u32; MAX_INDIRECT_PAGES_PER_REQUEST],
    },
}

/// Up to [`MAX_SEGMENTS_PER_REQUEST`] validated segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SegmentList {
    len: u8,
    items: [GrantedSegment; MAX_SEGMENTS_PER_REQUEST],
}

impl SegmentList {
    pub fn as_slice(&self) -> &[GrantedSegment] {
        &self.items[..usize::from(self.len)]
    }
}

/// Why a request was refused (the backend answers it with an error
/// status carrying the request's `id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// The operation code is not one this backend implements.
    UnsupportedOperation,
    /// A data request with no segments.
    NoSegments,
    /// More segments than the request (or the negotiated indirect limit) allows.
    TooManySegments,
    /// A segment whose sector range is empty or leaves the page.
    BadSegment,
    /// An indirect request whose inner operation is not read or write.
    BadIndirectOperation,
}

/// A refused request: enough to answer it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub id: u64,
    pub operation: u8,
    pub error: RequestError,
    /// The status to answer with.
    pub status: i16,
}

/// Fields shared by the read/write layouts of both ABIs.
struct RawReadWrite {
    operation: u8,
    nr_segments: u8,
    handle: u16,
    id: u64,
    sector: u64,
    seg: [WireSegment; MAX_SEGMENTS_PER_REQUEST],
}

/// Decodes and validates one copied ring entry. `max_indirect_segments`
/// is what the backend advertised (`feature-max-indirect-segments`; 0
/// refuses indirect requests).
pub fn parse_request(
    protocol: Protocol,
    entry: &Entry,
    max_indirect_segments: u16,
) -> Result<BlkifRequest, Refused> {
    let operation = entry[0];
    let rw = read_write_view(protocol, entry);
    let refuse = |error: RequestError| Refused {
        id: rw.id,
        operation,
        error,
        status: if error == RequestError::UnsupportedOperation {
            RSP_EOPNOTSUPP
        } else {
            RSP_ERROR
        },
    };
    match operation {
        OP_READ | OP_WRITE | OP_WRITE_BARRIER => {
            let segments = validate_segments(&rw).map_err(refuse)?;
            let (id, handle, sector) = (rw.id, rw.handle, rw.sector);
            Ok(match operation {
                OP_WRITE_BARRIER => BlkifRequest::Barrier {
                    id,
                    handle,
                    sector,
                    segments,
                },
                _ => BlkifRequest::ReadWrite {
                    id,
                    direction: if operation == OP_READ {
                        Direction::Read
                    } else {
                        Direction::Write
                    },
                    handle,
                    sector,
                    segments,
                },
            })
        }
        OP_FLUSH_DISKCACHE => Ok(BlkifRequest::Flush { id: rw.id }),
        OP_DISCARD => {
            let (id, flag, sector, nr_sectors) = match protocol {
                Protocol::X86_64 => {
                    let d = read_prefix::<DiscardX86_64>(entry);
                    (
                        d.id.get(),
                        d.flag,
                        d.sector_number.get(),
                        d.nr_sectors.get(),
                    )
                }
                Protocol::X86_32 => {
                    let d = read_prefix::<DiscardX86_32>(entry);
                    (
                        d.id.get(),
                        d.flag,
                        d.sector_number.get(),
                        d.nr_sectors.get(),
                    )
                }
            };
            Ok(BlkifRequest::Discard {
                id,
                sector,
                nr_sectors,
                secure: flag & DISCARD_SECURE != 0,
            })
        }
        OP_INDIRECT => {
            let (indirect_op, nr_segments, id, sector, handle, grefs) = match protocol {
                Protocol::X86_64 => {
                    let r = read_prefix::<IndirectX86_64>(entry);
                    (
                        r.indirect_op,
                        r.nr_segments.get(),
                        r.id.get(),
                        r.sector_number.get(),
                        r.handle.get(),
                        r.indirect_grefs,
                    )
                }
                Protocol::X86_32 => {
                    let r = read_prefix::<IndirectX86_32>(entry);
                    (
                        r.indirect_op,
                        r.nr_segments.get(),
                        r.id.get(),
                        r.sector_number.get(),
                        r.handle.get(),
                        r.indirect_grefs,
                    )
                }
            };
            let refuse = |error| Refused {
                id,
                operation,
                error,
                status: RSP_ERROR,
            };
            let direction = match indirect_op {
                OP_READ => Direction::Read,
                OP_WRITE => Direction::Write,
                _ => return Err(refuse(RequestError::BadIndirectOperation)),
            };
            if max_indirect_segments == 0 {
                return Err(Refused {
                    status: RSP_EOPNOTSUPP,
                    ..refuse(RequestError::UnsupportedOperation)
                });
            }
            if nr_segments == 0 {
                return Err(refuse(RequestError::NoSegments));
            }
            if nr_segments > max_indirect_segments
                || usize::from(nr_segments) > MAX_INDIRECT_SEGMENTS
            {
                return Err(refuse(RequestError::TooManySegments));
            }
            Ok(BlkifRequest::Indirect {
                id,
                direction,
                handle,
                sector,
                nr_segments,
                indirect_grefs: grefs.map(|g| g.get()),
            })
        }
        _ => Err(refuse(RequestError::UnsupportedOperation)),
    }
}

/// Copies a `T` from the start of the entry. The inline const proves at
/// compile time that every view fits, so the zeroed fallback never runs.
fn read_prefix<T: FromBytes>(entry: &Entry) -> T {
    const { assert!(size_of::<T>() <= ENTRY_SIZE_X86_64) };
    T::read_from_prefix(entry).map_or_else(|_| T::new_zeroed(), |(value, _)| value)
}

fn read_write_view(protocol: Protocol, entry: &Entry) -> RawReadWrite {
    match protocol {
        Protocol::X86_64 => {
            let r = read_prefix::<RequestX86_64>(entry);
            RawReadWrite {
                operation: r.operation,
                nr_segments: r.nr_segments,
                handle: r.handle.get(),
                id: r.id.get(),
                sector: r.sector_number.get(),
                seg: r.seg,
            }
        }
        Protocol::X86_32 => {
            let r = read_prefix::<RequestX86_32>(entry);
            RawReadWrite {
                operation: r.operation,
                nr_segments: r.nr_segments,
                handle: r.handle.get(),
                id: r.id.get(),
                sector: r.sector_number.get(),
                seg: r.seg,
            }
        }
    }
}

fn validate_segments(rw: &RawReadWrite) -> Result<SegmentList, RequestError> {
    let n = usize::from(rw.nr_segments);
    if n == 0 && rw.operation != OP_WRITE_BARRIER {
        return Err(RequestError::NoSegments);
    }
    if n > MAX_SEGMENTS_PER_REQUEST {
        return Err(RequestError::TooManySegments);
    }
    let mut list = SegmentList::default();
    for (slot, wire) in list.items.iter_mut().zip(&rw.seg[..n]) {
        if wire.first_sect > wire.last_sect || wire.last_sect > LAST_SECTOR_IN_PAGE {
            return Err(RequestError::BadSegment);
        }
        *slot = GrantedSegment {
            gref: wire.gref.get(),
            first_sect: wire.first_sect,
            last_sect: wire.last_sect,
        };
    }
    list.len = rw.nr_segments;
    Ok(list)
}

/// The fixed fields of a read, write or barrier request.
#[derive(Clone, Copy, Debug)]
pub struct ReadWriteFields {
    pub operation: u8,
    /// Written as given, whatever the segments passed with it hold.
    pub nr_segments: u8,
    pub handle: u16,
    pub id: u64,
    pub sector: u64,
}

/// Encodes a read, write or barrier request in `protocol`'s ABI (a
/// frontend's side; tests and hostile frontends may lie in any field).
/// Segments beyond [`MAX_SEGMENTS_PER_REQUEST`] are left out.
pub fn encode_read_write(protocol: Protocol, f: &ReadWriteFields, segs: &[WireSegment]) -> Vec<u8> {
    let mut seg = [WireSegment::new_zeroed(); MAX_SEGMENTS_PER_REQUEST];
    for (slot, s) in seg.iter_mut().zip(segs) {
        *slot = *s;
    }
    let (handle, id, sector_number) = (U16::new(f.handle), U64::new(f.id), U64::new(f.sector));
    let (operation, nr_segments) = (f.operation, f.nr_segments);
    match protocol {
        Protocol::X86_64 => RequestX86_64 {
            operation,
            nr_segments,
            handle,
            _pad1: [0; 4],
            id,
            sector_number,
            seg,
        }
        .as_bytes()
        .to_vec(),
        Protocol::X86_32 => RequestX86_32 {
            operation,
            nr_segments,
            handle,
            id,
            sector_number,
            seg,
        }
        .as_bytes()
        .to_vec(),
    }
}

/// The fixed fields of an indirect request.
#[derive(Clone, Copy, Debug)]
pub struct IndirectFields {
    /// The operation the segments are for (read or write).
    pub indirect_op: u8,
    pub nr_segments: u16,
    pub handle: u16,
    pub id: u64,
    pub sector: u64,
}

/// Encodes an indirect request listing its segments in the pages
/// `indirect_grefs` (at most [`MAX_INDIRECT_PAGES_PER_REQUEST`] are kept).
pub fn encode_indirect(protocol: Protocol, f: &IndirectFields, indirect_grefs: &[u32]) -> Vec<u8> {
    let mut grefs = [U32::new(0); MAX_INDIRECT_PAGES_PER_REQUEST];
    for (slot, gref) in grefs.iter_mut().zip(indirect_grefs) {
        *slot = U32::new(*gref);
    }
    let (id, sector_number, handle) = (U64::new(f.id), U64::new(f.sector), U16::new(f.handle));
    let (indirect_op, nr_segments) = (f.indirect_op, U16::new(f.nr_segments));
    match protocol {
        Protocol::X86_64 => IndirectX86_64 {
            operation: OP_INDIRECT,
            indirect_op,
            nr_segments,
            _pad1: [0; 4],
            id,
            sector_number,
            handle,
            _pad2: [0; 2],
            indirect_grefs: grefs,
            _pad3: [0; 4],
        }
        .as_bytes()
        .to_vec(),
        Protocol::X86_32 => IndirectX86_32 {
            operation: OP_INDIRECT,
            indirect_op,
            nr_segments,
            id,
            sector_number,
            handle,
            _pad2: [0; 2],
            indirect_grefs: grefs,
            _pad3: [0; 8],
        }
        .as_bytes()
        .to_vec(),
    }
}

/// Encodes a discard request.
pub fn encode_discard(
    protocol: Protocol,
    id: u64,
    sector: u64,
    nr_sectors: u64,
    secure: bool,
) -> Vec<u8> {
    let flag = if secure { DISCARD_SECURE } else { 0 };
    let (id, sector_number, nr_sectors) = (U64::new(id), U64::new(sector), U64::new(nr_sectors));
    let (operation, handle) = (OP_DISCARD, U16::new(0));
    match protocol {
        Protocol::X86_64 => DiscardX86_64 {
            operation,
            flag,
            handle,
            _pad1: [0; 4],
            id,
            sector_number,
            nr_sectors,
        }
        .as_bytes()
        .to_vec(),
        Protocol::X86_32 => DiscardX86_32 {
            operation,
            flag,
            handle,
            id,
            sector_number,
            nr_sectors,
        }
        .as_bytes()
        .to_vec(),
    }
}

/// Encodes a response into `out`; returns the bytes to put in the ring
/// slot (the ABI's response size).
pub fn encode_response(
    protocol: Protocol,
    id: u64,
    operation: u8,
    status: i16,
    out: &mut Entry,
) -> &[u8] {
    let (id, status) = (U64::new(id), I16::new(status));
    let len = match protocol {
        Protocol::X86_64 => {
            let r = ResponseX86_64 {
                id,
                operation,
                _pad1: 0,
                status,
                _pad2: [0; 4],
            };
            out[..size_of::<ResponseX86_64>()].copy_from_slice(r.as_bytes());
            size_of::<ResponseX86_64>()
        }
        Protocol::X86_32 => {
            let r = ResponseX86_32 {
                id,
                operation,
                _pad1: 0,
                status,
            };
            out[..size_of::<ResponseX86_32>()].copy_from_slice(r.as_bytes());
            size_of::<ResponseX86_32>()
        }
    };
    &out[..len]
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;
    use zerocopy::FromZeros;

    fn entry_of<T: IntoBytes + Immutable>(value: &T) -> Entry {
        let mut e = [0xee; ENTRY_SIZE_X86_64];
        e[..size_of::<T>()].copy_from_slice(value.as_bytes());
        e
    }

    fn seg(gref: u32, first: u8, last: u8) -> WireSegment {
        WireSegment {
            gref: U32::new(gref),
            first_sect: first,
            last_sect: last,
            _pad: [0; 2],
        }
    }

    fn rw64(op: u8, nr: u8, segs: &[WireSegment]) -> RequestX86_64 {
        let mut r = RequestX86_64::new_zeroed();
        r.operation = op;
        r.nr_segments = nr;
        r.handle = U16::new(51712);
        r.id = U64::new(0xdead_beef_0000_0001);
        r.sector_number = U64::new(1 << 40);
        r.seg[..segs.len()].copy_from_slice(segs);
        r
    }

    #[test]
    fn layouts_match_blkif_h() {
        assert_eq!(size_of::<WireSegment>(), 8);
        assert_eq!(size_of::<RequestX86_64>(), 112);
        assert_eq!(offset_of!(RequestX86_64, id), 8);
        assert_eq!(offset_of!(RequestX86_64, sector_number), 16);
        assert_eq!(offset_of!(RequestX86_64, seg), 24);
        assert_eq!(size_of::<RequestX86_32>(), 108);
        assert_eq!(offset_of!(RequestX86_32, id), 4);
        assert_eq!(offset_of!(RequestX86_32, sector_number), 12);
        assert_eq!(offset_of!(RequestX86_32, seg), 20);
        assert_eq!(size_of::<DiscardX86_64>(), 32);
        assert_eq!(offset_of!(DiscardX86_64, nr_sectors), 24);
        assert_eq!(size_of::<DiscardX86_32>(), 28);
        assert_eq!(offset_of!(DiscardX86_32, nr_sectors), 20);
        assert_eq!(size_of::<IndirectX86_64>(), 64);
        assert_eq!(offset_of!(IndirectX86_64, handle), 24);
        assert_eq!(offset_of!(IndirectX86_64, indirect_grefs), 28);
        assert_eq!(size_of::<IndirectX86_32>(), 64);
        assert_eq!(offset_of!(IndirectX86_32, handle), 20);
        assert_eq!(offset_of!(IndirectX86_32, indirect_grefs), 24);
        assert_eq!(size_of::<ResponseX86_64>(), 16);
        assert_eq!(size_of::<ResponseX86_32>(), 12);
        assert_eq!(offset_of!(ResponseX86_32, status), 10);
        assert_eq!(
            xen_pv::ring::ring_entries(4096, Protocol::X86_32.entry_size()),
            32
        );
    }

    #[test]
    fn protocol_names() {
        assert_eq!(Protocol::from_xenstore(None), Some(Protocol::X86_64));
        assert_eq!(
            Protocol::from_xenstore(Some("x86_32-abi")),
            Some(Protocol::X86_32)
        );
        assert_eq!(
            Protocol::from_xenstore(Some("x86_64-abi")),
            Some(Protocol::X86_64)
        );
        assert_eq!(Protocol::from_xenstore(Some("arm-abi")), None);
    }

    #[test]
    fn read_write_requests_in_both_abis() {
        let r64 = rw64(OP_WRITE, 2, &[seg(10, 0, 7), seg(11, 2, 3)]);
        let parsed = parse_request(Protocol::X86_64, &entry_of(&r64), 0).unwrap();
        let BlkifRequest::ReadWrite {
            id,
            direction,
            handle,
            sector,
            segments,
        } = parsed
        else {
            panic!("not a read/write: {parsed:?}");
        };
        assert_eq!(
            (id, direction, handle, sector),
            (0xdead_beef_0000_0001, Direction::Write, 51712, 1 << 40)
        );
        assert_eq!(segments.as_slice().len(), 2);
        assert_eq!(
            segments.as_slice()[1],
            GrantedSegment {
                gref: 11,
                first_sect: 2,
                last_sect: 3
            }
        );
        assert_eq!(
            segments
                .as_slice()
                .iter()
                .map(GrantedSegment::sectors)
                .sum::<u32>(),
            10
        );

        let mut r32 = RequestX86_32::new_zeroed();
        r32.operation = OP_READ;
        r32.nr_segments = 1;
        r32.id = U64::new(77);
        r32.sector_number = U64::new(9);
        r32.seg[0] = seg(5, 1, 1);
        match parse_request(Protocol::X86_32, &entry_of(&r32), 0).unwrap() {
            BlkifRequest::ReadWrite {
                id: 77,
                direction: Direction::Read,
                sector: 9,
                segments,
                ..
            } => assert_eq!(
                segments.as_slice(),
                [GrantedSegment {
                    gref: 5,
                    first_sect: 1,
                    last_sect: 1
                }]
            ),
            other => panic!("{other:?}"),
        }
        // The same bytes read with the wrong ABI give a different id.
        let misread = parse_request(Protocol::X86_64, &entry_of(&r32), 0);
        assert!(!matches!(
            misread,
            Ok(BlkifRequest::ReadWrite { id: 77, .. })
        ));
    }

    #[test]
    fn bad_requests_are_refused_with_their_id() {
        let cases = [
            (rw64(OP_READ, 0, &[]), RequestError::NoSegments),
            (rw64(OP_READ, 12, &[]), RequestError::TooManySegments),
            (rw64(OP_READ, 255, &[]), RequestError::TooManySegments),
            (rw64(OP_WRITE, 1, &[seg(1, 4, 3)]), RequestError::BadSegment),
            (rw64(OP_WRITE, 1, &[seg(1, 0, 8)]), RequestError::BadSegment),
            (
                rw64(4, 1, &[seg(1, 0, 0)]),
                RequestError::UnsupportedOperation,
            ),
            (rw64(200, 1, &[]), RequestError::UnsupportedOperation),
        ];
        for (request, error) in cases {
            let refused = parse_request(Protocol::X86_64, &entry_of(&request), 0).unwrap_err();
            assert_eq!(refused.error, error);
            assert_eq!(refused.id, 0xdead_beef_0000_0001);
            let status = if error == RequestError::UnsupportedOperation {
                RSP_EOPNOTSUPP
            } else {
                RSP_ERROR
            };
            assert_eq!(refused.status, status);
        }
        // A barrier may carry no data; a flush never looks at segments.
        assert!(matches!(
            parse_request(
                Protocol::X86_64,
                &entry_of(&rw64(OP_WRITE_BARRIER, 0, &[])),
                0
            ),
            Ok(BlkifRequest::Barrier { .. })
        ));
        assert_eq!(
            parse_request(
                Protocol::X86_64,
                &entry_of(&rw64(OP_FLUSH_DISKCACHE, 200, &[])),
                0
            ),
            Ok(BlkifRequest::Flush {
                id: 0xdead_beef_0000_0001
            })
        );
    }

    #[test]
    fn discard_in_both_abis() {
        let mut d64 = DiscardX86_64::new_zeroed();
        d64.operation = OP_DISCARD;
        d64.flag = DISCARD_SECURE;
        d64.id = U64::new(3);
        d64.sector_number = U64::new(2048);
        d64.nr_sectors = U64::new(4096);
        let want = BlkifRequest::Discard {
            id: 3,
            sector: 2048,
            nr_sectors: 4096,
            secure: true,
        };
        assert_eq!(
            parse_request(Protocol::X86_64, &entry_of(&d64), 0),
            Ok(want.clone())
        );
        let mut d32 = DiscardX86_32::new_zeroed();
        d32.operation = OP_DISCARD;
        d32.flag = DISCARD_SECURE;
        d32.id = U64::new(3);
        d32.sector_number = U64::new(2048);
        d32.nr_sectors = U64::new(4096);
        assert_eq!(
            parse_request(Protocol::X86_32, &entry_of(&d32), 0),
            Ok(want)
        );
    }

    #[test]
    fn indirect_requests_respect_the_advertised_limit() {
        let mut i32_ = IndirectX86_32::new_zeroed();
        i32_.operation = OP_INDIRECT;
        i32_.indirect_op = OP_WRITE;
        i32_.nr_segments = U16::new(256);
        i32_.id = U64::new(9);
        i32_.handle = U16::new(768);
        i32_.indirect_grefs[1] = U32::new(42);
        let e = entry_of(&i32_);
        match parse_request(Protocol::X86_32, &e, 256).unwrap() {
            BlkifRequest::Indirect {
                id: 9,
                direction: Direction::Write,
                handle: 768,
                nr_segments: 256,
                indirect_grefs,
                ..
            } => assert_eq!(indirect_grefs[1], 42),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_request(Protocol::X86_32, &e, 128).unwrap_err().error,
            RequestError::TooManySegments
        );
        let off = parse_request(Protocol::X86_32, &e, 0).unwrap_err();

        assert_eq!(
            (off.error, off.status),
            (RequestError::UnsupportedOperation, RSP_EOPNOTSUPP)
        );

        let mut i64_ = IndirectX86_64::new_zeroed();
        i64_.operation = OP_INDIRECT;
        i64_.indirect_op = OP_FLUSH_DISKCACHE;
        i64_.nr_segments = U16::new(1);
        i64_.id = U64::new(10);
        let bad = parse_request(Protocol::X86_64, &entry_of(&i64_), 256).unwrap_err();
        assert_eq!(
            (bad.id, bad.error),
            (10, RequestError::BadIndirectOperation)
        );
        i64_.indirect_op = OP_READ;
        i64_.nr_segments = U16::new(0);
        assert_eq!(
            parse_request(Protocol::X86_64, &entry_of(&i64_), 256)
                .unwrap_err()
                .error,
            RequestError::NoSegments
        );
    }

    /// Found by `fuzz_blkif_parsing_for_every_abi`: a limit above what
    /// eight indirect pages can list let more segments through.
    #[test]
    fn indirect_segments_beyond_eight_pages_are_refused_whatever_the_limit() {
        let mut request = IndirectX86_64::new_zeroed();
        request.operation = OP_INDIRECT;
        request.indirect_op = OP_READ;
        request.nr_segments = U16::new(MAX_INDIRECT_SEGMENTS as u16 + 1);
        let refused = parse_request(Protocol::X86_64, &entry_of(&request), u16::MAX).unwrap_err();
        assert_eq!(refused.error, RequestError::TooManySegments);
        request.nr_segments = U16::new(MAX_INDIRECT_SEGMENTS as u16);
        assert!(parse_request(Protocol::X86_64, &entry_of(&request), u16::MAX).is_ok());
    }

    #[test]
    fn responses_encode_per_abi() {
        let mut out = [0xff; ENTRY_SIZE_X86_64];
        let r = encode_response(
            Protocol::X86_64,
            0x0102_0304_0506_0708,
            OP_READ,
            RSP_EOPNOTSUPP,
            &mut out,
        );
        assert_eq!(r, [8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0xfe, 0xff, 0, 0, 0, 0]);
        let r = encode_response(Protocol::X86_32, 5, OP_WRITE, RSP_OKAY, &mut out);
        assert_eq!(r, [5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn x86_32_requests_through_a_shared_ring() {
        use core::ptr::NonNull;
        use xen_pv::ring::{BackRing, FrontRing};
        let mut page = alloc::vec![0u64; 512];
        let base = NonNull::new(page.as_mut_ptr().cast::<u8>()).unwrap();
        let size = Protocol::X86_32.entry_size();
        // SAFETY: `page` is an aligned page that outlives both views.
        let (mut front, mut back) = unsafe {
            (
                FrontRing::init(base, 4096, size, u32::MAX - 1),
                BackRing::attach(base, 4096, size),
            )
        };
        for id in 0..4u64 {
            let mut r = RequestX86_32::new_zeroed();
            r.operation = OP_READ;
            r.nr_segments = 1;
            r.id = U64::new(id);
            r.seg[0] = seg(100 + id as u32, 0, 7);
            front.put_request(r.as_bytes());
        }
        front.push_requests();
        let mut entry = [0u8; ENTRY_SIZE_X86_64];
        let mut out = [0u8; ENTRY_SIZE_X86_64];
        while back.next_request(&mut entry).unwrap() {
            let Ok(BlkifRequest::ReadWrite { id, segments, .. }) =
                parse_request(Protocol::X86_32, &entry, 0)
            else {
                panic!("bad request");
            };
            assert_eq!(segments.as_slice()[0].gref, 100 + id as u32);
            back.put_response(encode_response(
                Protocol::X86_32,
                id,
                OP_READ,
                RSP_OKAY,
                &mut out,
            ));
        }
        back.push_responses();
        let mut ids = alloc::vec::Vec::new();
        while front.next_response(&mut entry) {
            let (rsp, _) = ResponseX86_32::read_from_prefix(&entry).unwrap();
            assert_eq!(rsp.status.get(), RSP_OKAY);
            ids.push(rsp.id.get());
        }
        assert_eq!(ids, [0, 1, 2, 3]);
    }
}

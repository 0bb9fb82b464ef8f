//! Request planning: a parsed request checked against the disk and turned
//! into at most three device steps (a barrier is a flush, the write and a
//! flush, after every older request finished).

use crate::blkif::{self, Direction, GrantedSegment};
use crate::served_disk::ServedDisk;

/// One device operation of a request.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) enum Step {
    Read {
        lba: u64,
    },
    Write {
        lba: u64,
    },
    #[default]
    Flush,
    Discard {
        lba: u64,
        blocks: u64,
    },
}

/// A request's device operations still to run, in order.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Steps {
    items: [Step; 3],
    next: u8,
    len: u8,
}

impl Steps {
    fn of(steps: &[Step]) -> Steps {
        let mut items = [Step::Flush; 3];
        let len = steps.len().min(items.len());
        items[..len].copy_from_slice(&steps[..len]);
        Steps {
            items,
            next: 0,
            len: len as u8,
        }
    }

    /// The step to run next.
    pub(crate) fn current(&self) -> Option<Step> {
        (self.next < self.len).then(|| self.items[usize::from(self.next)])
    }

    /// The current step is done.
    pub(crate) fn pop(&mut self) {
        self.next = (self.next + 1).min(self.len);
    }

    /// The current step is done in part; `rest` remains of it.
    pub(crate) fn replace_current(&mut self, rest: Step) {
        if let Some(item) = self.items.get_mut(usize::from(self.next)) {
            *item = rest;
        }
    }

    /// No step is left to run (the request failed).
    pub(crate) fn clear(&mut self) {
        self.next = self.len;
    }
}

/// A refusal: the status to answer with and why (for the log).
pub(crate) type Refusal = (i16, &'static str);

/// What a valid request does.
pub(crate) struct Plan {
    pub steps: Steps,
    /// Its data grants may be mapped read-only (the device only reads them).
    pub map_readonly: bool,
    /// It waits for every older request and holds back newer ones.
    pub barrier: bool,
}

impl Plan {
    fn new(steps: &[Step]) -> Plan {
        Plan {
            steps: Steps::of(steps),
            map_readonly: true,
            barrier: false,
        }
    }
}

/// The operation code a read or write is answered with.
pub(crate) fn data_operation(direction: Direction) -> u8 {
    match direction {
        Direction::Read => blkif::OP_READ,
        Direction::Write => blkif::OP_WRITE,
    }
}

/// Plans a read or write of `segments` from `sector`.
pub(crate) fn plan_data(
    direction: Direction,
    sector: u64,
    segments: &[GrantedSegment],
    disk: &ServedDisk,
) -> Result<Plan, Refusal> {
    let write = direction == Direction::Write;
    let lba = check_data(disk, sector, segments, write)?;
    let step = if write {
        Step::Write { lba }
    } else {
        Step::Read { lba }
    };
    Ok(Plan {
        map_readonly: write,
        ..Plan::new(&[step])
    })
}

/// Plans a barrier: `segments` (maybe none) written at `sector` between
/// flushes, once every older request finished.
pub(crate) fn plan_barrier(
    sector: u64,
    segments: &[GrantedSegment],
    disk: &ServedDisk,
) -> Result<Plan, Refusal> {
    let steps: &[Step] = if segments.is_empty() {
        &[Step::Flush]
    } else {
        let lba = check_data(disk, sector, segments, true)?;
        if disk.flushes() {
            &[Step::Flush, Step::Write { lba }, Step::Flush]
        } else {
            &[Step::Write { lba }]
        }
    };
    Ok(Plan {
        barrier: true,
        ..Plan::new(steps)
    })
}

/// Plans a cache flush.
pub(crate) fn plan_flush(disk: &ServedDisk) -> Result<Plan, Refusal> {
    if !disk.flushes() {
        return Err((blkif::RSP_EOPNOTSUPP, "flush not advertised"));
    }
    Ok(Plan::new(&[Step::Flush]))
}

/// Plans a discard of `nr_sectors` from `sector`.
pub(crate) fn plan_discard(
    sector: u64,
    nr_sectors: u64,
    secure: bool,
    disk: &ServedDisk,
) -> Result<Plan, Refusal> {
    if disk.discard_granularity_bytes().is_none() {
        return Err((blkif::RSP_EOPNOTSUPP, "discard not advertised"));
    }
    if secure {
        return Err((blkif::RSP_EOPNOTSUPP, "secure discard not advertised"));
    }
    if disk.read_only() {
        return Err((blkif::RSP_ERROR, "discard on a read-only disk"));
    }
    let end = sector.checked_add(nr_sectors);
    if end.is_none_or(|end| end > disk.sectors()) {
        return Err((blkif::RSP_ERROR, "discard beyond the disk"));
    }
    let (Some(lba), Some(blocks)) = (disk.block_of(sector), disk.block_of(nr_sectors)) else {
        return Err((blkif::RSP_ERROR, "discard not aligned to the block size"));
    };
    let steps: &[Step] = if blocks == 0 {
        &[]
    } else {
        &[Step::Discard { lba, blocks }]
    };
    Ok(Plan::new(steps))
}

/// Checks a read or write against the disk; returns its first block.
fn check_data(
    disk: &ServedDisk,
    sector: u64,
    segments: &[GrantedSegment],
    write: bool,
) -> Result<u64, Refusal> {
    if write && disk.read_only() {
        return Err((blkif::RSP_ERROR, "write to a read-only disk"));
    }
    let mut total = 0u64;
    for s in segments {
        let aligned = disk.block_of(u64::from(s.first_sect)).is_some()
            && disk.block_of(u64::from(s.sectors())).is_some();
        if !aligned {
            return Err((blkif::RSP_ERROR, "segment not aligned to the block size"));
        }
        total += u64::from(s.sectors());
    }
    let end = sector.checked_add(total);
    if end.is_none_or(|end| end > disk.sectors()) {
        return Err((blkif::RSP_ERROR, "sectors beyond the disk"));
    }
    disk.block_of(sector)
        .ok_or((blkif::RSP_ERROR, "sector not aligned to the block size"))
}

/// Why a ring entry was refused, for the log.
pub(crate) fn refusal_reason(error: blkif::RequestError) -> &'static str {
    match error {
        blkif::RequestError::UnsupportedOperation => "unsupported operation",
        blkif::RequestError::NoSegments => "no segments",
        blkif::RequestError::TooManySegments => "too many segments",
        blkif::RequestError::BadSegment => "bad first/last sector",
        blkif::RequestError::BadIndirectOperation => "bad indirect operation",
    }
}

//! Copying between a request's segments and one contiguous buffer: a RAM
//! disk's storage, or an NVMe queue's bounce buffer.

use core::ptr::NonNull;

use crate::hal::Hal;
use blockdev::{Segment, SubmitError};

/// Which way [`copy`] copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CopyDirection {
    /// From the segments, one after another, into the buffer (a write).
    FromSegments,
    /// From the buffer into the segments (a read).
    IntoSegments,
}

/// Checks that every segment is RAM `hal` maps, so that a [`copy`] over
/// them copies everything or nothing.
pub(crate) fn check_mapped(hal: &impl Hal, segments: &[Segment]) -> Result<(), SubmitError> {
    for segment in segments {
        hal.phys_to_virt(segment.phys, segment.len as usize)
            .ok_or(SubmitError::BadAddress)?;
    }
    Ok(())
}

/// Copies between `buffer` and `segments` (the first segment at the
/// buffer's start, each next one after it), as `direction` says. Fails
/// with `BadAddress` at the first segment `hal` does not map: call
/// [`check_mapped`] first to copy all or nothing.
///
/// # Safety
///
/// `buffer` is valid for reads and writes of the segments' total length
/// and overlaps none of them.
pub(crate) unsafe fn copy(
    hal: &impl Hal,
    buffer: NonNull<u8>,
    segments: &[Segment],
    direction: CopyDirection,
) -> Result<(), SubmitError> {
    let mut at = 0;
    for segment in segments {
        let len = segment.len as usize;
        let mapped = hal
            .phys_to_virt(segment.phys, len)
            .ok_or(SubmitError::BadAddress)?;
        // SAFETY: `at + len` stays within the segments' total length, for
        // which the caller vouched `buffer`; `phys_to_virt` vouched for
        // `mapped`; the two do not overlap (the caller's promise).
        unsafe {
            let buffered = buffer.as_ptr().add(at);
            match direction {
                CopyDirection::FromSegments => {
                    core::ptr::copy_nonoverlapping(mapped.as_ptr(), buffered, len);
                }
                CopyDirection::IntoSegments => {
                    core::ptr::copy_nonoverlapping(buffered, mapped.as_ptr(), len);
                }
            }
        }
        at += len;
    }
    Ok(())
}

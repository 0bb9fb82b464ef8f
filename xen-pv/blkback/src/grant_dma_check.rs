//! The start-up check that picks a disk's [`DataPath`]: whether its device
//! can DMA into a grant-mapped page. The kernel grants a page of its own to
//! itself, maps that grant the way the engine maps a frontend's, and has
//! the device read a block into it; this module judges what came back.
//!
//! The page is filled with each of [`GRANT_FILL_PATTERNS`] in turn before
//! the device reads into it: a read that never lands leaves the fill, and
//! a block that happens to equal one fill cannot equal both.

use alloc::string::String;
use core::fmt;

use crate::served_disk::DataPath;

/// What the grant-mapped page is filled with before each device read.
pub const GRANT_FILL_PATTERNS: [u8; 2] = [0xa5, 0x5a];

/// Why device DMA into grant mappings was not verified: the disk's vbds
/// use bounce buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrantDmaFailure {
    /// The check could not be set up (its own grant not offered or not
    /// mapped, no buffer, no queue).
    Setup(String),
    /// Reading the block into an ordinary DMA buffer failed: nothing to
    /// compare with.
    ReferenceRead(String),
    /// The device failed (or timed out) reading into the grant-mapped page.
    DeviceError(String),
    /// The device completed, but the page does not hold the block.
    Mismatch {
        /// The fill the page had before the read.
        fill: u8,
        /// The first byte that differs from the block.
        offset: usize,
        /// The page still holds nothing but the fill: the data went
        /// elsewhere, or nowhere.
        untouched: bool,
    },
}

impl fmt::Display for GrantDmaFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantDmaFailure::Setup(why) => write!(f, "check not possible: {why}"),
            GrantDmaFailure::ReferenceRead(why) => write!(f, "reference read failed: {why}"),
            GrantDmaFailure::DeviceError(why) => write!(f, "device error: {why}"),
            GrantDmaFailure::Mismatch {
                fill,
                offset,
                untouched: true,
            } => write!(
                f,
                "the page kept its fill {fill:#04x} (differs from the block at byte {offset})"
            ),
            GrantDmaFailure::Mismatch { fill, offset, .. } => write!(
                f,
                "the page differs from the block at byte {offset} (fill {fill:#04x})"
            ),
        }
    }
}

/// The data path a disk's vbds take after the check ended with `outcome`.
pub fn data_path_after(outcome: &Result<(), GrantDmaFailure>) -> DataPath {
    match outcome {
        Ok(()) => DataPath::ZeroCopy,
        Err(_) => DataPath::Bounce,
    }
}

/// Compares the block the device read into the grant-mapped page with
/// `reference`, the same block read into an ordinary DMA buffer, once per
/// fill pattern. `read_into_grant(fill, page)` fills the grant-mapped page
/// with `fill`, has the device read the block into it, and copies what
/// the page then holds (`reference.len()` bytes) into `page`.
pub fn verify_grant_dma<E: fmt::Display>(
    reference: &[u8],
    page: &mut [u8],
    mut read_into_grant: impl FnMut(u8, &mut [u8]) -> Result<(), E>,
) -> Result<(), GrantDmaFailure> {
    let page = page
        .get_mut(..reference.len())
        .ok_or_else(|| GrantDmaFailure::Setup("the page is smaller than a block".into()))?;
    for fill in GRANT_FILL_PATTERNS {
        read_into_grant(fill, page)
            .map_err(|e| GrantDmaFailure::DeviceError(alloc::format!("{e}")))?;
        if let Some(offset) = page.iter().zip(reference).position(|(a, b)| a != b) {
            return Err(GrantDmaFailure::Mismatch {
                fill,
                offset,
                untouched: page.iter().all(|&b| b == fill),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    fn block() -> Vec<u8> {
        (0..512u32).map(|i| (i * 13 % 251) as u8).collect()
    }

    /// A device that lands `landed(fill)` in the page.
    fn check(reference: &[u8], landed: impl Fn(u8) -> Vec<u8>) -> Result<(), GrantDmaFailure> {
        let mut page = vec![0u8; 4096];
        verify_grant_dma(reference, &mut page, |fill, page: &mut [u8]| {
            page.copy_from_slice(&landed(fill));
            Ok::<(), &str>(())
        })
    }

    #[test]
    fn a_device_that_reaches_the_grant_is_zero_copy() {
        let block = block();
        let outcome = check(&block, |_| block.clone());
        assert_eq!(outcome, Ok(()));
        assert_eq!(data_path_after(&outcome), DataPath::ZeroCopy);
    }

    #[test]
    fn a_read_that_never_lands_leaves_the_fill_and_bounces() {
        let block = block();
        let outcome = check(&block, |fill| vec![fill; 512]);
        assert_eq!(
            outcome,
            Err(GrantDmaFailure::Mismatch {
                fill: GRANT_FILL_PATTERNS[0],
                offset: 0,
                untouched: true
            })
        );
        assert_eq!(data_path_after(&outcome), DataPath::Bounce);
        assert!(
            alloc::format!("{}", outcome.unwrap_err()).contains("kept its fill 0xa5"),
            "the log says why"
        );
    }

    #[test]
    fn a_block_equal_to_one_fill_does_not_pass_for_landed_data() {
        for (at, &fill) in GRANT_FILL_PATTERNS.iter().enumerate() {
            let block = vec![fill; 512];
            let outcome = check(&block, |fill| vec![fill; 512]);
            let other = GRANT_FILL_PATTERNS[1 - at];
            assert_eq!(
                outcome,
                Err(GrantDmaFailure::Mismatch {
                    fill: other,
                    offset: 0,
                    untouched: true
                })
            );
        }
    }

    #[test]
    fn data_that_lands_corrupted_or_partly_is_a_mismatch() {
        let block = block();
        let outcome = check(&block, |fill| {
            let mut page = block.clone();
            page[300..].fill(fill);
            page
        });
        assert_eq!(
            outcome,
            Err(GrantDmaFailure::Mismatch {
                fill: GRANT_FILL_PATTERNS[0],
                offset: 300,
                untouched: false
            })
        );
    }

    #[test]
    fn a_device_error_or_timeout_bounces() {
        let block = block();
        let mut page = vec![0u8; 4096];
        let outcome = verify_grant_dma(&block, &mut page, |_, _: &mut [u8]| {
            Err("no completion within 60 s")
        });
        assert_eq!(
            outcome,
            Err(GrantDmaFailure::DeviceError(
                "no completion within 60 s".into()
            ))
        );
        assert_eq!(data_path_after(&outcome), DataPath::Bounce);
    }

    #[test]
    fn a_block_larger_than_the_page_cannot_be_checked() {
        let mut page = vec![0u8; 256];
        let outcome = verify_grant_dma(&block(), &mut page, |_, _: &mut [u8]| Ok::<(), &str>(()));
        assert!(matches!(outcome, Err(GrantDmaFailure::Setup(_))));
    }
}

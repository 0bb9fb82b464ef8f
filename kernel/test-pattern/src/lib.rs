//! The data pattern test peers and stordom agree on, so each side can
//! check what the other wrote without sending it: the kernel's disk and
//! Xen self-tests, and dom0's gntshare tool.
#![no_std]

/// The byte at `offset` of page `page` of a pattern seeded with `seed`.
pub fn pattern_byte(seed: u32, page: usize, offset: usize) -> u8 {
    let x = (seed as usize)
        .wrapping_mul(31)
        .wrapping_add(page.wrapping_mul(7))
        .wrapping_add(offset);
    (x.wrapping_mul(2_654_435_761) >> 8) as u8
}

/// The first offset in `page` where `bytes` differs from the pattern.
pub fn first_mismatch(seed: u32, page: usize, bytes: &[u8]) -> Option<usize> {
    bytes
        .iter()
        .enumerate()
        .position(|(offset, &b)| b != pattern_byte(seed, page, offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_differs_between_pages_seeds_and_offsets() {
        let page0: [u8; 64] = core::array::from_fn(|o| pattern_byte(1, 0, o));
        let page1: [u8; 64] = core::array::from_fn(|o| pattern_byte(1, 1, o));
        let seed2: [u8; 64] = core::array::from_fn(|o| pattern_byte(2, 0, o));
        assert_ne!(page0, page1);
        assert_ne!(page0, seed2);
        assert!(page0.windows(2).any(|w| w[0] != w[1]));
        assert_eq!(first_mismatch(1, 0, &page0), None);
        let mut bad = page0;
        bad[17] ^= 1;
        assert_eq!(first_mismatch(1, 0, &bad), Some(17));
    }
}

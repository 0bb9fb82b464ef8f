//! Guest memory for the parsers' host tests.

use std::vec::Vec;

use crate::start_info::PhysRead;

/// Guest memory as a flat byte vector starting at physical 0.
pub struct Mem(pub Vec<u8>);

impl PhysRead for Mem {
    fn read(&self, paddr: u64, buf: &mut [u8]) -> bool {
        let Ok(start) = usize::try_from(paddr) else {
            return false;
        };
        match start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

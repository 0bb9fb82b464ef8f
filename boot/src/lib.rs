//! stordom's boot layer: the PVH and multiboot2 entries and the parsing of
//! what the loader hands over. `start_info` and `multiboot2` are portable
//! and host-tested; `entry` holds the bare-metal entry stubs and is left
//! out of host unit tests.
#![no_std]

#[cfg(not(test))]
pub mod entry;
pub mod multiboot2;
pub mod start_info;
#[cfg(test)]
extern crate std;
#[cfg(test)]
mod test_memory;

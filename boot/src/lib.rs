//! stordom's boot layer: the PVH entry and the parsing of what the loader
//! hands over. `start_info` is portable and host-tested; `pvh` is the
//! bare-metal entry and is left out of host unit tests.
#![no_std]

#[cfg(not(test))]
pub mod pvh;
pub mod start_info;

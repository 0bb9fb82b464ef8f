//! The portable half of the stordom kernel: memory bookkeeping and the
//! command line. Host-tested; the bare-metal binary is `src/main.rs`.
#![no_std]

pub mod cmdline;
pub mod frames;
pub mod paging;

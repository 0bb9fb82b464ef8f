//! stordom's storage drivers: PCI, NVMe, AHCI, virtio-blk and a RAM disk,
//! all behind one tagged submit / polled completion [`BlockDevice`] trait.
//!
//! The crate is portable `no_std` code: everything it needs from the kernel
//! (DMA memory, MMIO mappings, a clock) comes through the [`Hal`] trait, so
//! `cargo test` runs every driver against simulated controllers on the host.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod ahci;
pub mod block;
pub mod hal;
pub mod nvme;
pub mod pci;
pub mod ramdisk;
mod region;
#[cfg(test)]
mod testing;
pub mod virtio;

pub use block::{BlockDevice, Completion, Geometry, IoError, Request, Segment, SubmitError};
pub use hal::{DmaRegion, Hal, PAGE_SIZE, PhysAddr};
pub use ramdisk::RamDisk;

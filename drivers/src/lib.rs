//! stordom's storage drivers: PCI, NVMe, AHCI, virtio-blk, a RAM disk and a
//! null disk, all behind the block layer's tagged submit / polled completion
//! [`blockdev::QueuedDevice`] trait.
//!
//! The crate is portable `no_std` code: everything it needs from the kernel
//! (DMA memory, MMIO mappings, a clock) comes through the [`Hal`] trait, so
//! `cargo test` runs every driver against simulated controllers on the host.
//!
//! # Wiring (what the kernel does)
//! 1. Implement [`Hal`] on a zero-sized, `Clone + Default` type over the
//!    frame allocator and page tables (`Default` for virtio, `Clone` for
//!    AHCI, whose ports each hold one).
//! 2. Find configuration space: [`pci::acpi::find_mcfg`] from the RSDP, then
//!    [`pci::Ecam::map`]; without an MCFG, [`pci::PortConfig`] over a
//!    [`pci::PortIo`] for 0xCF8/0xCFC.
//! 3. [`pci::enumerate`] the buses and pick functions by
//!    [`pci::Function::storage_kind`]:
//!    - NVMe: [`nvme::NvmeController::from_pci`], put it in an
//!      `Rc<RefCell<_>>`, and make an [`nvme::NvmeNamespace`] per namespace;
//!    - AHCI: [`ahci::probe_pci`] gives an [`ahci::AhciPort`] per disk;
//!    - virtio-blk: [`virtio::VirtioBlock::from_pci`];
//!    - a RAM disk: [`RamDisk::new`] over a boot module or
//!      [`RamDisk::allocate`].
//! 4. Serve each as a [`blockdev::Disk`] (the namespaces of one NVMe
//!    controller on one set of queues: [`blockdev::Disk::sharing_queues`]);
//!    consumers submit and poll on its queue handles. Polling also detects
//!    timeouts and resets the controller or port.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod ahci;
pub mod hal;
mod instant;
pub mod nulldisk;
pub mod nvme;
pub mod pci;
pub mod ramdisk;
mod region;
mod segment_copy;
#[cfg(test)]
mod testing;
pub mod virtio;

pub use hal::{DmaRegion, Hal, PAGE_SIZE, PhysAddr};
pub use nulldisk::NullDisk;
pub use ramdisk::RamDisk;

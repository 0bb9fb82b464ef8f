//! What the drivers get from the kernel: DMA memory from the frame
//! allocator, the identity map for RAM, uncached MMIO mappings, the clock,
//! and port I/O for legacy PCI configuration access.

use crate::arch::{clock, cpu};
use crate::memory;
use core::ptr::NonNull;
use drivers::hal::{DmaRegion, Hal, PAGE_SIZE, PhysAddr};
use drivers::pci::PortIo;

/// The kernel's [`Hal`]: a handle to global state, so copies are free.
#[derive(Clone, Copy, Default)]
pub struct KernelHal;

// SAFETY: dma_alloc returns whole zeroed frames from the frame allocator
// (contiguous, page aligned, owned until freed, identity-mapped write-back,
// which is coherent on x86); phys_to_virt only answers for ranges recorded
// as directly mapped; map_mmio maps uncached; the TSC clock is monotonic.
unsafe impl Hal for KernelHal {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        let phys = memory::alloc_frames(pages as u64)?;
        Some(DmaRegion {
            phys,
            virt: NonNull::new(phys as *mut u8)?,
            pages,
        })
    }

    unsafe fn dma_free(&self, region: DmaRegion) {
        memory::free_frames(region.phys, region.pages as u64);
    }

    fn phys_to_virt(&self, phys: PhysAddr, len: usize) -> Option<NonNull<u8>> {
        if memory::is_direct(phys, len as u64) {
            NonNull::new(phys as *mut u8)
        } else {
            None
        }
    }

    fn virt_to_phys(&self, virt: NonNull<u8>) -> Option<PhysAddr> {
        // RAM (kernel image, stacks and heap included) is identity-mapped.
        let addr = virt.as_ptr() as u64;
        memory::is_direct(addr, 1).then_some(addr)
    }

    unsafe fn map_mmio(&self, phys: PhysAddr, len: usize) -> Option<NonNull<u8>> {
        NonNull::new(memory::map_mmio(phys, len.max(PAGE_SIZE) as u64)? as *mut u8)
    }

    fn now_ns(&self) -> u64 {
        clock::now_ns()
    }
}

/// Port I/O for the 0xCF8/0xCFC configuration mechanism.
pub struct KernelPorts;

impl PortIo for KernelPorts {
    fn read32(&mut self, port: u16) -> u32 {
        cpu::inl(port)
    }

    fn write32(&mut self, port: u16, value: u32) {
        cpu::outl(port, value);
    }
}

//! The hardware abstraction the kernel provides to the drivers.

use core::ptr::NonNull;

pub use blockdev::{DmaRegion, PAGE_SIZE, PhysAddr};

/// What the drivers need from the kernel (or from a test harness).
///
/// Drivers hold their `Hal` by value; a kernel typically implements it on a
/// zero-sized type over its global frame allocator and page tables.
///
/// # Safety
///
/// An implementation guarantees that:
/// - `dma_alloc` returns memory that is physically contiguous, page aligned,
///   zeroed, owned by nobody else until passed back to `dma_free`, mapped at
///   `virt` for its whole length, and coherent with device DMA (cacheable
///   write-back memory is fine on x86);
/// - `virt_to_phys` inverts the kernel's mapping of RAM;
/// - `phys_to_virt` only returns a pointer when `len` bytes of RAM at `phys`
///   are mapped contiguously there;
/// - `map_mmio` returns a mapping of the whole requested range that is
///   uncached (strong uncacheable or equivalent), so volatile accesses reach
///   the device in program order;
/// - `now_ns` never goes backwards.
pub unsafe trait Hal {
    /// Allocates `pages` pages of DMA memory, or `None` when out of memory.
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion>;

    /// Gives back memory from [`Hal::dma_alloc`].
    ///
    /// # Safety
    ///
    /// `region` came from this `Hal`'s `dma_alloc`, no device will access it
    /// any more, and no pointer into it is used afterwards.
    unsafe fn dma_free(&self, region: DmaRegion);

    /// Where `len` bytes of RAM at `phys` are mapped, or `None` when they are
    /// not (all of them) mapped RAM.
    fn phys_to_virt(&self, phys: PhysAddr, len: usize) -> Option<NonNull<u8>>;

    /// The physical address of `virt`, a pointer into RAM the kernel maps:
    /// memory from `dma_alloc` or `phys_to_virt`, but also kernel stacks and
    /// heap; `None` for anything else. Only the virtio-blk adapter needs
    /// it: virtio-drivers names buffers by virtual address and keeps some
    /// request headers on the stack.
    fn virt_to_phys(&self, virt: NonNull<u8>) -> Option<PhysAddr>;

    /// Maps `len` bytes of device registers at `phys` uncached.
    ///
    /// # Safety
    ///
    /// `phys..phys + len` is a register window (a BAR) of a device this
    /// driver owns, and nothing else maps it with conflicting attributes.
    unsafe fn map_mmio(&self, phys: PhysAddr, len: usize) -> Option<NonNull<u8>>;

    /// A monotonic clock in nanoseconds, used for command timeouts.
    fn now_ns(&self) -> u64;

    /// Called once in every iteration of a busy-wait loop (for a controller
    /// reset or a synchronous admin command). A kernel may pause or poll
    /// other work; a test harness steps its simulated device here.
    fn relax(&self) {
        core::hint::spin_loop();
    }
}

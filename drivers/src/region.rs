//! Volatile, bounds-checked access to memory a device also sees: register
//! windows (MMIO) and DMA memory.

use core::ptr::NonNull;

/// A window of device-visible memory accessed only through volatile loads
/// and stores, at offsets checked against its length.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region {
    base: NonNull<u8>,
    len: usize,
}

impl Region {
    /// # Safety
    ///
    /// `base` is valid for volatile reads and writes of `len` bytes for as
    /// long as this `Region` (or a copy) is used.
    pub(crate) unsafe fn new(base: NonNull<u8>, len: usize) -> Self {
        Self { base, len }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn pointer<T>(&self, offset: usize) -> *mut T {
        let size = core::mem::size_of::<T>();
        assert!(
            offset.checked_add(size).is_some_and(|end| end <= self.len),
            "device memory access out of bounds"
        );
        assert!(
            offset.is_multiple_of(core::mem::align_of::<T>()),
            "misaligned device memory access"
        );
        // SAFETY: `offset + size <= len` was checked, so the result stays
        // within the allocation `base` points into (see `new`).
        unsafe { self.base.as_ptr().add(offset).cast() }
    }

    pub(crate) fn read8(&self, offset: usize) -> u8 {
        // SAFETY: `pointer` checked bounds and alignment; `new` promised validity.
        unsafe { self.pointer::<u8>(offset).read_volatile() }
    }

    pub(crate) fn write8(&self, offset: usize, value: u8) {
        // SAFETY: `pointer` checked bounds and alignment; `new` promised validity.
        unsafe { self.pointer::<u8>(offset).write_volatile(value) }
    }

    pub(crate) fn read32(&self, offset: usize) -> u32 {
        // SAFETY: `pointer` checked bounds and alignment; `new` promised validity.
        unsafe { self.pointer::<u32>(offset).read_volatile() }
    }

    pub(crate) fn write32(&self, offset: usize, value: u32) {
        let register = self.pointer::<u32>(offset);
        // Simulated devices give some registers write-one-to-set or
        // write-one-to-clear behaviour, which plain memory lacks.
        #[cfg(test)]
        // SAFETY: `pointer` checked bounds and alignment; `new` promised validity.
        let value = crate::testing::merge_register_write(
            register as usize,
            unsafe { register.read_volatile() },
            value,
        );
        // SAFETY: `pointer` checked bounds and alignment; `new` promised validity.
        unsafe { register.write_volatile(value) }
    }

    /// 64-bit registers are accessed as two 32-bit halves, low first: some
    /// controllers (and some hypervisors' emulations) reject 64-bit MMIO.
    pub(crate) fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
    }

    pub(crate) fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    pub(crate) fn fill(&self, offset: usize, len: usize, value: u8) {
        for i in offset..offset + len {
            self.write8(i, value);
        }
    }

    pub(crate) fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = self.read8(offset + i);
        }
    }
}

impl From<&crate::hal::DmaRegion> for Region {
    /// Drivers only build regions over memory from their own `Hal::dma_alloc`
    /// and stop using them before handing that memory back.
    fn from(dma: &crate::hal::DmaRegion) -> Self {
        // SAFETY: the `Hal` contract maps `dma.len()` bytes at `dma.virt`,
        // owned by the driver until it frees the region.
        unsafe { Self::new(dma.virt, dma.len()) }
    }
}

//! The two ways to reach configuration space.

use core::ptr::NonNull;

use super::Bdf;
use super::acpi::McfgEntry;
use crate::hal::Hal;
use crate::region::Region;

/// Reads and writes of configuration space dwords. `offset` is a multiple
/// of 4; absent functions read as all ones.
pub trait ConfigAccess {
    /// Reads the dword at `offset` of `bdf`'s configuration space.
    fn read32(&mut self, bdf: Bdf, offset: u16) -> u32;
    /// Writes the dword at `offset` of `bdf`'s configuration space.
    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32);
}

/// PCI Express memory-mapped configuration (ECAM) for a range of buses.
pub struct Ecam {
    window: Region,
    first_bus: u8,
    last_bus: u8,
}

impl Ecam {
    /// Maps the window an MCFG entry describes.
    ///
    /// # Safety
    ///
    /// The entry comes from the platform's MCFG and nobody else maps it.
    pub unsafe fn map(hal: &impl Hal, entry: &McfgEntry) -> Option<Self> {
        let len = entry.window_len();
        // SAFETY: the caller vouches that this is the ECAM window.
        let base = unsafe { hal.map_mmio(entry.base, len) }?;
        // SAFETY: `map_mmio` mapped `len` bytes at `base`.
        Some(unsafe { Self::new(base, len, entry.start_bus, entry.end_bus) })
    }

    /// ECAM over an already mapped window.
    ///
    /// # Safety
    ///
    /// `base` maps `len` bytes of the ECAM window of buses
    /// `first_bus..=last_bus`, uncached.
    pub unsafe fn new(base: NonNull<u8>, len: usize, first_bus: u8, last_bus: u8) -> Self {
        // SAFETY: passed on from the caller.
        let window = unsafe { Region::new(base, len) };
        Self {
            window,
            first_bus,
            last_bus,
        }
    }

    fn offset(&self, bdf: Bdf, offset: u16) -> Option<usize> {
        if !(self.first_bus..=self.last_bus).contains(&bdf.bus)
            || bdf.device >= 32
            || bdf.function >= 8
            || offset >= 4096
        {
            return None;
        }
        let at = (usize::from(bdf.bus - self.first_bus) << 20)
            | (usize::from(bdf.device) << 15)
            | (usize::from(bdf.function) << 12)
            | usize::from(offset & !3);
        (at + 4 <= self.window.len()).then_some(at)
    }
}

impl ConfigAccess for Ecam {
    fn read32(&mut self, bdf: Bdf, offset: u16) -> u32 {
        self.offset(bdf, offset)
            .map_or(u32::MAX, |at| self.window.read32(at))
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        if let Some(at) = self.offset(bdf, offset) {
            self.window.write32(at, value);
        }
    }
}

/// 32-bit port I/O, provided by the kernel's architecture module.
pub trait PortIo {
    /// `in` of a dword from `port`.
    fn read32(&mut self, port: u16) -> u32;
    /// `out` of a dword to `port`.
    fn write32(&mut self, port: u16, value: u32);
}

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// The legacy 0xCF8/0xCFC mechanism: the first 256 bytes of each function.
pub struct PortConfig<P: PortIo>(pub P);

impl<P: PortIo> PortConfig<P> {
    fn select(&mut self, bdf: Bdf, offset: u16) -> bool {
        if bdf.device >= 32 || bdf.function >= 8 || offset >= 256 {
            return false;
        }
        let address = (1 << 31)
            | (u32::from(bdf.bus) << 16)
            | (u32::from(bdf.device) << 11)
            | (u32::from(bdf.function) << 8)
            | u32::from(offset & 0xfc);
        self.0.write32(CONFIG_ADDRESS, address);
        true
    }
}

impl<P: PortIo> ConfigAccess for PortConfig<P> {
    fn read32(&mut self, bdf: Bdf, offset: u16) -> u32 {
        if self.select(bdf, offset) {
            self.0.read32(CONFIG_DATA)
        } else {
            u32::MAX
        }
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        if self.select(bdf, offset) {
            self.0.write32(CONFIG_DATA, value);
        }
    }
}

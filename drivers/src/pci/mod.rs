//! PCI: configuration space access (ECAM or port I/O), enumeration, BAR
//! decoding and sizing, command register, capability list and MSI-X.

mod access;
pub mod acpi;
#[cfg(test)]
pub(crate) mod tests;

use alloc::vec::Vec;
use core::ops::RangeInclusive;

pub use access::{ConfigAccess, Ecam, PortConfig, PortIo};

/// A function's address: bus, device (0-31), function (0-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number, below 32.
    pub device: u8,
    /// Function number, below 8.
    pub function: u8,
}

/// Configuration space offsets of the type 0 header.
mod header {
    pub const VENDOR_DEVICE: u16 = 0x00;
    pub const COMMAND_STATUS: u16 = 0x04;
    pub const CLASS: u16 = 0x08;
    pub const HEADER_TYPE: u16 = 0x0c;
    pub const BAR0: u16 = 0x10;
    /// Type 1 (bridge) header: primary, secondary, subordinate bus.
    pub const BRIDGE_BUSES: u16 = 0x18;
    pub const CAPABILITIES: u16 = 0x34;
}

/// Command register bits.
pub mod command {
    /// Respond to I/O space accesses.
    pub const IO_SPACE: u16 = 1 << 0;
    /// Respond to memory space accesses.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// May master the bus (DMA).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Do not assert legacy INTx interrupts.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

const STATUS_CAPABILITIES: u32 = 1 << (16 + 4);
const CAPABILITY_MSIX: u8 = 0x11;
const VENDOR_NONE: u16 = 0xffff;
const VIRTIO_VENDOR: u16 = 0x1af4;

/// What kind of storage controller a function is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageKind {
    /// NVM Express (class 01, subclass 08, interface 02).
    Nvme,
    /// AHCI SATA (class 01, subclass 06, interface 01).
    Ahci,
    /// virtio block device (transitional 0x1001 or modern 0x1042).
    VirtioBlock,
}

/// A present function and its identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code.
    pub class: u8,
    /// Subclass code.
    pub subclass: u8,
    /// Programming interface.
    pub interface: u8,
    /// Header type without the multi-function bit (0: endpoint, 1: bridge).
    pub header_type: u8,
}

impl Function {
    /// The storage controller kind, if it is one stordom drives.
    pub fn storage_kind(&self) -> Option<StorageKind> {
        match (self.class, self.subclass, self.interface) {
            (0x01, 0x08, 0x02) => Some(StorageKind::Nvme),
            (0x01, 0x06, 0x01) => Some(StorageKind::Ahci),
            _ if self.vendor == VIRTIO_VENDOR && matches!(self.device, 0x1001 | 0x1042) => {
                Some(StorageKind::VirtioBlock)
            }
            _ => None,
        }
    }
}

/// Every present function on `buses`, found by probing each device slot.
pub fn enumerate(config: &mut impl ConfigAccess, buses: RangeInclusive<u8>) -> Vec<Function> {
    let mut found = Vec::new();
    for bus in buses {
        for device in 0..32 {
            for function in 0..8 {
                let bdf = Bdf {
                    bus,
                    device,
                    function,
                };
                let ids = config.read32(bdf, header::VENDOR_DEVICE);
                if ids as u16 == VENDOR_NONE {
                    if function == 0 {
                        break;
                    }
                    continue;
                }
                let class = config.read32(bdf, header::CLASS);
                let header_type = (config.read32(bdf, header::HEADER_TYPE) >> 16) as u8;
                found.push(Function {
                    bdf,
                    vendor: ids as u16,
                    device: (ids >> 16) as u16,
                    class: (class >> 24) as u8,
                    subclass: (class >> 16) as u8,
                    interface: (class >> 8) as u8,
                    header_type: header_type & 0x7f,
                });
                if function == 0 && header_type & 0x80 == 0 {
                    break;
                }
            }
        }
    }
    found
}

/// Every present function reachable from bus `root`: that bus, then the
/// secondary bus of each PCI-to-PCI bridge found, as firmware numbered
/// them; each bus scanned once, in bus, device, function order. Where
/// every config access is expensive (port I/O trapped to a device model)
/// this reads a few hundred words instead of every slot of 256 buses.
pub fn enumerate_behind_bridges(config: &mut impl ConfigAccess, root: u8) -> Vec<Function> {
    let mut found = Vec::new();
    let mut scanned = [false; 256];
    let mut pending = alloc::vec![root];
    while let Some(bus) = pending.pop() {
        if core::mem::replace(&mut scanned[usize::from(bus)], true) {
            continue;
        }
        let start = found.len();
        found.extend(enumerate(config, bus..=bus));
        for f in &found[start..] {
            if f.header_type == 1 {
                let secondary = (config.read32(f.bdf, header::BRIDGE_BUSES) >> 8) as u8;
                pending.push(secondary);
            }
        }
    }
    found.sort_by_key(|f| f.bdf);
    found
}

/// A decoded base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// A memory window.
    Memory {
        /// Physical base address.
        address: u64,
        /// Size in bytes.
        size: u64,
        /// Whether reads have no side effects.
        prefetchable: bool,
        /// Whether it occupies two BAR slots.
        wide: bool,
    },
    /// An I/O port window.
    Io {
        /// First port.
        port: u32,
        /// Number of ports.
        size: u32,
    },
}

/// Decodes and sizes the six BARs of an endpoint (`None` for unused slots
/// and for the upper half of a 64-bit BAR). Decoding is switched off while
/// sizing so the probe values are never decoded as addresses.
pub fn bars(config: &mut impl ConfigAccess, bdf: Bdf) -> [Option<Bar>; 6] {
    let mut bars = [None; 6];
    let saved_command = config.read32(bdf, header::COMMAND_STATUS) & 0xffff;
    let decode = u32::from(command::IO_SPACE | command::MEMORY_SPACE);
    config.write32(bdf, header::COMMAND_STATUS, saved_command & !decode);
    let mut index = 0;
    while index < 6 {
        let offset = header::BAR0 + 4 * index as u16;
        let low = probe(config, bdf, offset);
        if low.value & 1 == 1 {
            let size = (!(low.mask & !0x3)).wrapping_add(1) & 0xffff;
            if low.mask & !0x3 != 0 {
                bars[index] = Some(Bar::Io {
                    port: low.value & !0x3,
                    size,
                });
            }
            index += 1;
            continue;
        }
        let wide = (low.value >> 1) & 0x3 == 0x2 && index < 5;
        let (address, mask) = if wide {
            let high = probe(config, bdf, offset + 4);
            (
                u64::from(low.value & !0xf) | (u64::from(high.value) << 32),
                u64::from(low.mask & !0xf) | (u64::from(high.mask) << 32),
            )
        } else {
            (
                u64::from(low.value & !0xf),
                u64::from(low.mask & !0xf) | 0xffff_ffff_0000_0000,
            )
        };
        if mask & 0xffff_ffff_ffff_fff0 != 0 && mask != 0xffff_ffff_0000_0000 {
            let size = (!mask).wrapping_add(1);
            bars[index] = Some(Bar::Memory {
                address,
                size,
                prefetchable: low.value & 0x8 != 0,
                wide,
            });
        }
        index += if wide { 2 } else { 1 };
    }
    config.write32(bdf, header::COMMAND_STATUS, saved_command);
    bars
}

struct Probe {
    value: u32,
    mask: u32,
}

/// Reads a BAR, writes all ones to learn which bits are writable, restores.
fn probe(config: &mut impl ConfigAccess, bdf: Bdf, offset: u16) -> Probe {
    let value = config.read32(bdf, offset);
    config.write32(bdf, offset, 0xffff_ffff);
    let mask = config.read32(bdf, offset);
    config.write32(bdf, offset, value);
    Probe { value, mask }
}

/// Turns on memory decoding and bus mastering and turns off INTx (stordom
/// polls). Leaves the status bits alone (they are write-one-to-clear).
pub fn enable_memory_and_bus_master(config: &mut impl ConfigAccess, bdf: Bdf) {
    let command = config.read32(bdf, header::COMMAND_STATUS) & 0xffff;
    let wanted = command::MEMORY_SPACE | command::BUS_MASTER | command::INTX_DISABLE;
    config.write32(bdf, header::COMMAND_STATUS, command | u32::from(wanted));
}

/// Turns off bus mastering: the function can no longer read or write
/// memory (an in-place restart stops what the previous instance left in
/// flight; the driver's bring-up turns it on again).
pub fn disable_bus_master(config: &mut impl ConfigAccess, bdf: Bdf) {
    let command = config.read32(bdf, header::COMMAND_STATUS) & 0xffff;
    config.write32(
        bdf,
        header::COMMAND_STATUS,
        command & !u32::from(command::BUS_MASTER),
    );
}

/// One entry of the capability list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Capability id.
    pub id: u8,
    /// Its offset in configuration space.
    pub offset: u16,
}

/// The capability list, stopping at a loop or a pointer into the header.
pub fn capabilities(config: &mut impl ConfigAccess, bdf: Bdf) -> Vec<Capability> {
    let mut found = Vec::new();
    if config.read32(bdf, header::COMMAND_STATUS) & STATUS_CAPABILITIES == 0 {
        return found;
    }
    let mut offset = (config.read32(bdf, header::CAPABILITIES) & 0xfc) as u16;
    // 48 capabilities fill the 192 bytes after the header; more is a loop.
    while offset >= 0x40 && found.len() < 48 {
        let entry = config.read32(bdf, offset);
        found.push(Capability {
            id: entry as u8,
            offset,
        });
        offset = ((entry >> 8) & 0xfc) as u16;
    }
    found
}

/// Where a function's MSI-X table and pending-bit array are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msix {
    /// Offset of the capability in configuration space.
    pub capability: u16,
    /// Number of table entries.
    pub table_size: u16,
    /// BAR index holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u32,
    /// BAR index holding the pending-bit array.
    pub pending_bar: u8,
    /// Offset of the pending-bit array in that BAR.
    pub pending_offset: u32,
}

/// Parses the MSI-X capability, if the function has one.
pub fn msix(config: &mut impl ConfigAccess, bdf: Bdf) -> Option<Msix> {
    let capability = capabilities(config, bdf)
        .into_iter()
        .find(|c| c.id == CAPABILITY_MSIX)?
        .offset;
    let control = config.read32(bdf, capability) >> 16;
    let table = config.read32(bdf, capability + 4);
    let pending = config.read32(bdf, capability + 8);
    Some(Msix {
        capability,
        table_size: (control & 0x7ff) as u16 + 1,
        table_bar: (table & 0x7) as u8,
        table_offset: table & !0x7,
        pending_bar: (pending & 0x7) as u8,
        pending_offset: pending & !0x7,
    })
}

/// Sizes BAR `index` of a function that is about to be driven, turns on
/// memory decoding and bus mastering, and returns the BAR's (address,
/// length); `None` if it is not a memory BAR the address space can hold.
pub fn prepare_memory_bar(
    config: &mut impl ConfigAccess,
    bdf: Bdf,
    index: usize,
) -> Option<(u64, usize)> {
    let Some(Bar::Memory { address, size, .. }) = bars(config, bdf).get(index).copied().flatten()
    else {
        return None;
    };
    let len = usize::try_from(size).ok()?;
    enable_memory_and_bus_master(config, bdf);
    Some((address, len))
}

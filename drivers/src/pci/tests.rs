//! PCI code against a simulated configuration space.

use std::collections::BTreeMap;
use std::vec::Vec;

use super::*;
use crate::hal::Hal;
use crate::testing::TestHal;

/// A function's 256 bytes of configuration space, with the writable bits
/// of each BAR (zero bits read back as zero, like real decoders).
#[derive(Clone)]
pub(crate) struct SimFunction {
    space: [u32; 64],
    bar_masks: [u32; 6],
}

impl SimFunction {
    pub(crate) fn new(vendor: u16, device: u16, class: [u8; 3], header_type: u8) -> Self {
        let mut space = [0; 64];
        space[0] = u32::from(vendor) | (u32::from(device) << 16);
        space[2] =
            (u32::from(class[0]) << 24) | (u32::from(class[1]) << 16) | (u32::from(class[2]) << 8);
        space[3] = u32::from(header_type) << 16;
        Self {
            space,
            bar_masks: [0; 6],
        }
    }

    pub(crate) fn bar(mut self, index: usize, value: u32, mask: u32) -> Self {
        self.space[4 + index] = value;
        self.bar_masks[index] = mask;
        self
    }
}

#[derive(Default)]
pub(crate) struct SimConfig {
    pub(crate) functions: BTreeMap<Bdf, SimFunction>,
    /// Every (bdf, offset, value) written, in order.
    writes: Vec<(Bdf, u16, u32)>,
}

impl ConfigAccess for SimConfig {
    fn read32(&mut self, bdf: Bdf, offset: u16) -> u32 {
        self.functions
            .get(&bdf)
            .map_or(u32::MAX, |f| f.space[usize::from(offset / 4)])
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        self.writes.push((bdf, offset, value));
        let Some(function) = self.functions.get_mut(&bdf) else {
            return;
        };
        let index = usize::from(offset / 4);
        function.space[index] = match index {
            // Status bits are read-only or write-one-to-clear: writing
            // zeroes there changes nothing.
            1 => (value & 0xffff) | (function.space[index] & 0xffff_0000),
            4..=9 => {
                let mask = function.bar_masks[index - 4];
                (value & mask) | (function.space[index] & !mask)
            }
            _ => value,
        };
    }
}

fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
    Bdf {
        bus,
        device,
        function,
    }
}

fn platform() -> SimConfig {
    let mut config = SimConfig::default();
    let nvme = SimFunction::new(0x1b36, 0x0010, [1, 8, 2], 0)
        // 64-bit, 16 KiB, above 4 GiB.
        .bar(0, 0x2345_0004, 0xffff_c000)
        .bar(1, 0x1, 0xffff_ffff)
        .bar(2, 0xfe00_0000, 0xffff_f000)
        .bar(3, 0xc041, 0xffff_ffe0);
    config.functions.insert(bdf(0, 3, 0), nvme);
    config.functions.insert(
        bdf(0, 4, 0),
        SimFunction::new(0x8086, 0x1234, [6, 1, 0], 0x80),
    );
    config
        .functions
        .insert(bdf(0, 4, 2), SimFunction::new(0x8086, 0x2922, [1, 6, 1], 0));
    config
        .functions
        .insert(bdf(0, 5, 0), SimFunction::new(0x8086, 0x1111, [2, 0, 0], 0));
    // A single-function device whose function 1 aliases function 0.
    config
        .functions
        .insert(bdf(0, 5, 1), SimFunction::new(0x8086, 0x1111, [2, 0, 0], 0));
    config
        .functions
        .insert(bdf(2, 0, 0), SimFunction::new(0x1af4, 0x1042, [1, 0, 0], 0));
    config
}

#[test]
fn enumeration_finds_functions_and_kinds() {
    let mut config = platform();
    let found = enumerate(&mut config, 0..=3);
    let where_kind: Vec<(Bdf, Option<StorageKind>)> =
        found.iter().map(|f| (f.bdf, f.storage_kind())).collect();
    assert_eq!(
        where_kind,
        [
            (bdf(0, 3, 0), Some(StorageKind::Nvme)),
            (bdf(0, 4, 0), None),
            (bdf(0, 4, 2), Some(StorageKind::Ahci)),
            (bdf(0, 5, 0), None),
            (bdf(2, 0, 0), Some(StorageKind::VirtioBlock)),
        ]
    );
    assert_eq!(
        found[1].header_type, 0,
        "the multi-function bit is stripped"
    );
}

#[test]
fn bars_are_decoded_and_sized_without_side_effects() {
    let mut config = platform();
    let nvme = bdf(0, 3, 0);
    config.functions.get_mut(&nvme).unwrap().space[1] = 0x0010_0006;
    let before = config.functions[&nvme].space;
    let bars = bars(&mut config, nvme);
    assert_eq!(
        bars[0],
        Some(Bar::Memory {
            address: 0x1_2345_0000,
            size: 0x4000,
            prefetchable: false,
            wide: true
        })
    );
    assert_eq!(bars[1], None, "upper half of BAR0");
    assert_eq!(
        bars[2],
        Some(Bar::Memory {
            address: 0xfe00_0000,
            size: 0x1000,
            prefetchable: false,
            wide: false
        })
    );
    assert_eq!(
        bars[3],
        Some(Bar::Io {
            port: 0xc040,
            size: 32
        })
    );
    assert_eq!(bars[4], None);
    assert_eq!(
        config.functions[&nvme].space, before,
        "BARs and command restored"
    );
    let command_writes: Vec<u32> = config
        .writes
        .iter()
        .filter(|w| w.1 == 4)
        .map(|w| w.2)
        .collect();
    assert_eq!(
        command_writes,
        [0x0000_0004, 0x0000_0006],
        "decoding off while sizing"
    );
}

#[test]
fn enabling_keeps_status_bits() {
    let mut config = platform();
    let nvme = bdf(0, 3, 0);
    config.functions.get_mut(&nvme).unwrap().space[1] = 0xf900_0000;
    enable_memory_and_bus_master(&mut config, nvme);
    assert_eq!(config.writes, [(nvme, 4, 0x0406)]);
}

#[test]
fn capability_walk_and_msix() {
    let mut config = platform();
    let nvme = bdf(0, 3, 0);
    let function = config.functions.get_mut(&nvme).unwrap();
    function.space[1] = STATUS_CAPABILITIES;
    function.space[0x34 / 4] = 0x40;
    function.space[0x40 / 4] = 0x0001_5001; // power management, next 0x50
    function.space[0x50 / 4] = 0x801f_0011; // MSI-X, 32 entries, enabled, last
    function.space[0x54 / 4] = 0x0000_2000; // table in BAR0 at 0x2000
    function.space[0x58 / 4] = 0x0000_3002; // pending bits in BAR2 at 0x3000
    let found = capabilities(&mut config, nvme);
    assert_eq!(
        found,
        [
            Capability {
                id: 1,
                offset: 0x40
            },
            Capability {
                id: 0x11,
                offset: 0x50
            }
        ]
    );
    let table = msix(&mut config, nvme).unwrap();
    assert_eq!(
        table,
        Msix {
            capability: 0x50,
            table_size: 32,
            table_bar: 0,
            table_offset: 0x2000,
            pending_bar: 2,
            pending_offset: 0x3000
        }
    );

    // A list that loops back on itself ends anyway.
    config.functions.get_mut(&nvme).unwrap().space[0x50 / 4] = 0x0000_4011;
    assert_eq!(capabilities(&mut config, nvme).len(), 48);
    assert_eq!(msix(&mut config, bdf(0, 4, 2)), None);
}

/// Port I/O that decodes 0xCF8/0xCFC into the simulated space.
struct SimPorts {
    config: SimConfig,
    address: u32,
}

impl PortIo for SimPorts {
    fn read32(&mut self, port: u16) -> u32 {
        assert_eq!(port, 0xcfc);
        let a = self.address;
        assert!(a & (1 << 31) != 0, "enable bit set");
        self.config.read32(
            bdf(
                (a >> 16) as u8,
                ((a >> 11) & 0x1f) as u8,
                ((a >> 8) & 7) as u8,
            ),
            (a & 0xfc) as u16,
        )
    }

    fn write32(&mut self, port: u16, value: u32) {
        match port {
            0xcf8 => self.address = value,
            0xcfc => {
                let a = self.address;
                self.config.write32(
                    bdf(
                        (a >> 16) as u8,
                        ((a >> 11) & 0x1f) as u8,
                        ((a >> 8) & 7) as u8,
                    ),
                    (a & 0xfc) as u16,
                    value,
                )
            }
            _ => panic!("unexpected port {port:#x}"),
        }
    }
}

#[test]
fn enumeration_behind_bridges_scans_only_the_buses_bridges_lead_to() {
    let mut config = platform();
    // A bridge on bus 0 to bus 2 (where the virtio function is), another
    // on bus 2 to bus 9, and a device on bus 7 that no bridge leads to.
    let mut to_bus_2 = SimFunction::new(0x8086, 0x7000, [6, 4, 0], 1);
    to_bus_2.space[0x18 / 4] = 0x0002_0200;
    config.functions.insert(bdf(0, 6, 0), to_bus_2);
    let mut to_bus_9 = SimFunction::new(0x8086, 0x7001, [6, 4, 0], 1);
    to_bus_9.space[0x18 / 4] = 0x0009_0902;
    config.functions.insert(bdf(2, 1, 0), to_bus_9);
    config
        .functions
        .insert(bdf(9, 0, 0), SimFunction::new(0x1b36, 0x0010, [1, 8, 2], 0));
    config
        .functions
        .insert(bdf(7, 0, 0), SimFunction::new(0x1b36, 0x0010, [1, 8, 2], 0));
    let found: Vec<Bdf> = enumerate_behind_bridges(&mut config, 0)
        .iter()
        .map(|f| f.bdf)
        .collect();
    assert_eq!(
        found,
        [
            bdf(0, 3, 0),
            bdf(0, 4, 0),
            bdf(0, 4, 2),
            bdf(0, 5, 0),
            bdf(0, 6, 0),
            bdf(2, 0, 0),
            bdf(2, 1, 0),
            bdf(9, 0, 0),
        ]
    );
    // The full scan finds the same, plus the device no bridge leads to.
    let all = enumerate(&mut config, 0..=255);
    assert_eq!(all.len(), found.len() + 1);
    // A bridge that leads back to its own bus is scanned once.
    let mut looped = platform();
    let mut to_bus_0 = SimFunction::new(0x8086, 0x7000, [6, 4, 0], 1);
    to_bus_0.space[0x18 / 4] = 0x0000_0000;
    looped.functions.insert(bdf(0, 6, 0), to_bus_0);
    assert_eq!(enumerate_behind_bridges(&mut looped, 0).len(), 5);
}

#[test]
fn port_io_mechanism_reaches_the_same_functions() {
    let mut ports = PortConfig(SimPorts {
        config: platform(),
        address: 0,
    });
    let found = enumerate(&mut ports, 0..=2);
    assert_eq!(found.len(), 5);
    assert_eq!(found[4].device, 0x1042);
    assert_eq!(
        ports.read32(bdf(0, 3, 0), 0x100),
        u32::MAX,
        "extended space is out of reach"
    );
}

#[test]
fn ecam_addresses_functions_by_bus_device_function() {
    let hal = TestHal::new();
    let entry = acpi::McfgEntry {
        base: hal.add_mmio(2 << 20),
        segment: 0,
        start_bus: 4,
        end_bus: 5,
    };
    // SAFETY: the window is the test's simulated ECAM.
    let mut ecam = unsafe { Ecam::map(&hal, &entry) }.unwrap();
    let function = bdf(5, 3, 2);
    ecam.write32(function, 0x104, 0xdead_beef);
    let expected_offset = (1 << 20) | (3 << 15) | (2 << 12) | 0x104;
    assert_eq!(
        hal.bytes(entry.base + expected_offset, 4),
        0xdead_beefu32.to_le_bytes()
    );
    assert_eq!(ecam.read32(function, 0x104), 0xdead_beef);
    assert_eq!(
        ecam.read32(bdf(3, 0, 0), 0),
        u32::MAX,
        "bus below the window"
    );
    assert_eq!(
        ecam.read32(bdf(6, 0, 0), 0),
        u32::MAX,
        "bus above the window"
    );
    assert!(
        hal.phys_to_virt(entry.base, 4).is_none(),
        "registers are not RAM"
    );
}

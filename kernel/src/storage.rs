//! Finding the disks: PCI through ECAM (ACPI MCFG) or the port-I/O
//! fallback, then NVMe namespaces, AHCI ports and virtio-blk devices, each
//! a [`blockdev::Disk`] with a name an operator can use.

use crate::memory;
use crate::platform::{KernelHal, KernelPorts};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use drivers::ahci::{self, AhciConfig};
use drivers::nvme::{NvmeConfig, NvmeController, NvmeNamespace};
use drivers::pci::{self, Bdf, ConfigAccess, Ecam, PortConfig, StorageKind, acpi};
use drivers::virtio::VirtioBlock;

/// A disk stordom can serve.
pub struct NamedDisk {
    /// `nvme0n1`, `ahci0p2`, `virtio0`, ...
    pub name: String,
    /// The device.
    pub disk: blockdev::Disk,
}

/// Configuration space, however it is reached.
pub enum PciConfig {
    /// Memory-mapped (PCI Express), from the MCFG table.
    Ecam(Ecam, u8, u8),
    /// The legacy 0xCF8/0xCFC ports: buses 0-255, 256 bytes per function.
    Ports(PortConfig<KernelPorts>),
}

impl ConfigAccess for PciConfig {
    fn read32(&mut self, bdf: Bdf, offset: u16) -> u32 {
        match self {
            Self::Ecam(e, ..) => e.read32(bdf, offset),
            Self::Ports(p) => p.read32(bdf, offset),
        }
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        match self {
            Self::Ecam(e, ..) => e.write32(bdf, offset, value),
            Self::Ports(p) => p.write32(bdf, offset, value),
        }
    }
}

/// Opens configuration space: ECAM when the RSDP leads to an MCFG, else
/// the ports if `allow_ports`.
pub fn pci_config(rsdp: u64, allow_ports: bool) -> Option<PciConfig> {
    let mcfg = if rsdp == 0 {
        Err(acpi::AcpiError::NotFound)
    } else {
        acpi::find_mcfg(memory::read_firmware, rsdp)
    };
    match mcfg.as_deref() {
        Ok([entry, ..]) => {
            // SAFETY: the window comes from the platform's MCFG and nothing
            // else in stordom maps it.
            if let Some(ecam) = unsafe { Ecam::map(&KernelHal, entry) } {
                log::info!(
                    "pci: ECAM at {:#x}, buses {}-{}",
                    entry.base,
                    entry.start_bus,
                    entry.end_bus
                );
                return Some(PciConfig::Ecam(ecam, entry.start_bus, entry.end_bus));
            }
            log::warn!("pci: ECAM window at {:#x} could not be mapped", entry.base);
        }
        Ok([]) => log::warn!("pci: MCFG lists no ECAM window"),
        Err(e) => log::info!("pci: no MCFG ({e:?})"),
    }
    allow_ports.then(|| {
        log::info!("pci: using port I/O configuration access");
        PciConfig::Ports(PortConfig(KernelPorts))
    })
}

/// Brings up every storage controller found and returns its disks.
pub fn discover(config: &mut PciConfig) -> Vec<NamedDisk> {
    let buses = match config {
        PciConfig::Ecam(_, first, last) => *first..=*last,
        PciConfig::Ports(_) => 0..=255,
    };
    let mut disks = Vec::new();
    let (mut nvme_index, mut ahci_index, mut virtio_index) = (0, 0, 0);
    for function in pci::enumerate(config, buses) {
        log::debug!(
            "pci: {:02x}:{:02x}.{} {:04x}:{:04x} class {:02x}{:02x}{:02x}",
            function.bdf.bus,
            function.bdf.device,
            function.bdf.function,
            function.vendor,
            function.device,
            function.class,
            function.subclass,
            function.interface
        );
        let Some(kind) = function.storage_kind() else {
            continue;
        };
        let at = function.bdf;
        let place = format!("{:02x}:{:02x}.{}", at.bus, at.device, at.function);
        match kind {
            StorageKind::Nvme => {
                let index = nvme_index;
                nvme_index += 1;
                // SAFETY: stordom owns every controller it finds; this one
                // is brought up once, here.
                match unsafe {
                    NvmeController::from_pci(KernelHal, config, at, NvmeConfig::default())
                } {
                    Ok(controller) => {
                        let namespaces: Vec<u32> =
                            controller.namespaces().iter().map(|n| n.id).collect();
                        log::info!(
                            "nvme{index}: {place}, {} namespace(s), volatile write cache {}",
                            namespaces.len(),
                            if controller.info().volatile_write_cache {
                                "on"
                            } else {
                                "off"
                            }
                        );
                        let shared = Rc::new(RefCell::new(controller));
                        // The namespaces share the controller's queues.
                        let mut first: Option<blockdev::Disk> = None;
                        for nsid in namespaces {
                            let Some(ns) = NvmeNamespace::new(shared.clone(), nsid) else {
                                continue;
                            };
                            let disk = match &first {
                                Some(first) => first.sharing_queues(ns),
                                None => blockdev::Disk::new(ns),
                            };
                            first.get_or_insert_with(|| disk.clone());
                            disks.push(NamedDisk {
                                name: format!("nvme{index}n{nsid}"),
                                disk,
                            });
                        }
                    }
                    Err(e) => log::error!("nvme{index}: {place}: {e:?}"),
                }
            }
            StorageKind::Ahci => {
                let index = ahci_index;
                ahci_index += 1;
                // SAFETY: as for NVMe.
                match unsafe { ahci::probe_pci(KernelHal, config, at, AhciConfig::default()) } {
                    Ok(probe) => {
                        for (port, e) in &probe.failed {
                            log::error!("ahci{index}p{port}: {e:?}");
                        }
                        for port in probe.ports {
                            log::info!(
                                "ahci{index}p{}: {place}, NCQ {}",
                                port.number(),
                                if port.uses_ncq() { "on" } else { "off" }
                            );
                            disks.push(NamedDisk {
                                name: format!("ahci{index}p{}", port.number()),
                                disk: blockdev::Disk::new(port),
                            });
                        }
                    }
                    Err(e) => log::error!("ahci{index}: {place}: {e:?}"),
                }
            }
            StorageKind::VirtioBlock => {
                let index = virtio_index;
                virtio_index += 1;
                // SAFETY: as for NVMe.
                match unsafe { VirtioBlock::from_pci(KernelHal, config, at) } {
                    Ok(dev) => {
                        log::info!("virtio{index}: {place}");
                        disks.push(NamedDisk {
                            name: format!("virtio{index}"),
                            disk: blockdev::Disk::new(dev),
                        });
                    }
                    Err(e) => log::error!("virtio{index}: {place}: {e:?}"),
                }
            }
        }
    }
    disks
}

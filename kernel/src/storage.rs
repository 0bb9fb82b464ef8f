//! Finding the disks: PCI through ECAM (ACPI MCFG) or the port-I/O
//! fallback, then NVMe namespaces, AHCI ports and virtio-blk devices, each
//! a [`blockdev::Disk`] with a name an operator can use; reading their
//! partition tables; synchronous I/O for that and the test jobs.

use crate::arch::clock;
use crate::memory;
use crate::platform::{KernelHal, KernelPorts};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use blkback::DataPath;
use blkback::controllers::{BringUpFailures, ControllerKind, ControllerNumbering, disk_name};
use blockdev::partition::{self, PartitionTable, TableError};
use blockdev::{Completion, QueueHandle, Request, Segment};
use core::cell::RefCell;
use drivers::ahci::{self, AhciConfig, AhciError};
use drivers::hal::{DmaRegion, Hal, PAGE_SIZE};
use drivers::nvme::{NvmeConfig, NvmeController, NvmeError, NvmeNamespace};
use drivers::pci::{self, Bdf, ConfigAccess, Ecam, PortConfig, StorageKind, acpi};
use drivers::virtio::{VirtioBlock, VirtioBlockError};

/// A disk stordom can serve.
pub struct NamedDisk {
    /// `nvme0n1`, `ahci0p2`, `virtio0`, ...
    pub name: String,
    /// The device.
    pub disk: blockdev::Disk,
    /// The controller whose DMA moves its data (`nvme0`, `ahci0`, ...);
    /// `None` when the CPU copies (RAM disks, boot modules).
    pub controller: Option<String>,
    /// How its vbds move data (the start-up check's verdict).
    pub data_path: DataPath,
}

impl NamedDisk {
    /// A disk whose device DMAs, zero-copy until checked.
    fn on_controller(name: String, disk: blockdev::Disk, controller: &str) -> Self {
        Self {
            name,
            disk,
            controller: Some(controller.into()),
            data_path: DataPath::ZeroCopy,
        }
    }
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

/// Every PCI function present.
fn functions(config: &mut PciConfig) -> Vec<pci::Function> {
    // ECAM reads are cheap: every bus in the window. Port I/O may trap
    // to a device model each time (an HVM guest): follow the bridges.
    match config {
        PciConfig::Ecam(_, first, last) => {
            let buses = *first..=*last;
            pci::enumerate(config, buses)
        }
        PciConfig::Ports(_) => pci::enumerate_behind_bridges(config, 0),
    }
}

/// What bringing up the storage controllers on PCI found.
#[derive(Default)]
pub struct Discovery {
    /// The disks of the controllers that came up.
    pub disks: Vec<NamedDisk>,
    /// The controllers (and AHCI ports' disks) that failed to come up.
    pub failures: BringUpFailures,
}

/// The disks of every storage controller on PCI (reached through the
/// RSDP's MCFG, or ports if `allow_ports`), each controller brought up,
/// and the controllers that failed to come up.
pub fn find_disks(rsdp: u64, allow_ports: bool) -> Discovery {
    let Some(mut pci) = pci_config(rsdp, allow_ports) else {
        return Discovery::default();
    };
    let found = discover(&mut pci);
    let names: Vec<&str> = found.disks.iter().map(|d| d.name.as_str()).collect();
    let failed: Vec<&str> = found.failures.iter().map(|f| f.device.as_str()).collect();
    let failed = if failed.is_empty() {
        String::new()
    } else {
        format!("; failed to come up: {}", failed.join(", "))
    };
    log::info!(
        "storage: {} disk(s): {}{failed}",
        found.disks.len(),
        names.join(" ")
    );
    found
}

/// Stops every storage controller on PCI from reaching memory (see
/// `pci::disable_bus_master`).
pub fn stop_bus_mastering(rsdp: u64, allow_ports: bool) {
    let Some(mut pci) = pci_config(rsdp, allow_ports) else {
        return;
    };
    for function in functions(&mut pci) {
        if function.storage_kind().is_some() {
            pci::disable_bus_master(&mut pci, function.bdf);
        }
    }
}

/// Brings up every storage controller found: its disks, or why it failed.
/// Each controller takes the next name of its kind, whether it comes up
/// or not, so the others' names stay as they are.
fn discover(config: &mut PciConfig) -> Discovery {
    let functions = functions(config);
    let mut found = Discovery::default();
    let mut numbering = ControllerNumbering::new();
    for function in functions {
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
        let controller = numbering.name_next(controller_kind(kind));
        let place = format!("{:02x}:{:02x}.{}", at.bus, at.device, at.function);
        let brought_up = match kind {
            StorageKind::Nvme => bring_up_nvme(config, at, &controller, &place, &mut found)
                .map_err(|e| e.to_string()),
            StorageKind::Ahci => bring_up_ahci(config, at, &controller, &place, &mut found)
                .map_err(|e| e.to_string()),
            StorageKind::VirtioBlock => {
                bring_up_virtio(config, at, &controller, &place, &mut found)
                    .map_err(|e| e.to_string())
            }
        };
        if let Err(why) = brought_up {
            log::error!(
                "storage: controller {controller} at {place} failed to come up: {why}; its disks are not served"
            );
            found.failures.controller_failed(&controller, why);
        }
    }
    found
}

fn controller_kind(kind: StorageKind) -> ControllerKind {
    match kind {
        StorageKind::Nvme => ControllerKind::Nvme,
        StorageKind::Ahci => ControllerKind::Ahci,
        StorageKind::VirtioBlock => ControllerKind::Virtio,
    }
}

/// Brings up the NVMe controller at `at` and adds its namespaces.
fn bring_up_nvme(
    config: &mut PciConfig,
    at: Bdf,
    controller_name: &str,
    place: &str,
    found: &mut Discovery,
) -> Result<(), NvmeError> {
    // SAFETY: stordom owns every controller it finds; this one is brought
    // up once, here.
    let controller =
        unsafe { NvmeController::from_pci(KernelHal, config, at, NvmeConfig::default()) }?;
    let namespaces: Vec<u32> = controller.namespaces().iter().map(|n| n.id).collect();
    log::info!(
        "{controller_name}: {place}, {} namespace(s), volatile write cache {}, SGLs {:?}",
        namespaces.len(),
        if controller.info().volatile_write_cache {
            "on"
        } else {
            "off"
        },
        controller.info().sgl
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
        found.disks.push(NamedDisk::on_controller(
            disk_name(ControllerKind::Nvme, controller_name, nsid),
            disk,
            controller_name,
        ));
    }
    Ok(())
}

/// Brings up the AHCI controller at `at` and adds the disks of its ports;
/// a port whose disk fails is recorded as failed.
fn bring_up_ahci(
    config: &mut PciConfig,
    at: Bdf,
    controller_name: &str,
    place: &str,
    found: &mut Discovery,
) -> Result<(), AhciError> {
    // SAFETY: as for NVMe.
    let probe = unsafe { ahci::probe_pci(KernelHal, config, at, AhciConfig::default()) }?;
    for (port, e) in &probe.failed {
        let name = disk_name(ControllerKind::Ahci, controller_name, u32::from(*port));
        log::error!("storage: disk {name} at {place} failed to come up: {e}; it is not served");
        found.failures.disk_failed(&name, e);
    }
    for port in probe.ports {
        let name = disk_name(
            ControllerKind::Ahci,
            controller_name,
            u32::from(port.number()),
        );
        log::info!(
            "{name}: {place}, NCQ {}",
            if port.uses_ncq() { "on" } else { "off" }
        );
        found.disks.push(NamedDisk::on_controller(
            name,
            blockdev::Disk::new(port),
            controller_name,
        ));
    }
    Ok(())
}

/// Brings up the virtio-blk device at `at`, one disk.
fn bring_up_virtio(
    config: &mut PciConfig,
    at: Bdf,
    controller_name: &str,
    place: &str,
    found: &mut Discovery,
) -> Result<(), VirtioBlockError> {
    // SAFETY: as for NVMe.
    let device = unsafe { VirtioBlock::from_pci(KernelHal, config, at) }?;
    log::info!("{controller_name}: {place}");
    found.disks.push(NamedDisk::on_controller(
        disk_name(ControllerKind::Virtio, controller_name, 0),
        blockdev::Disk::new(device),
        controller_name,
    ));
    Ok(())
}

/// Longest a single request may take before it is called hung (drivers
/// time out and reset well before this).
pub const REQUEST_DEADLINE_NS: u64 = 60_000_000_000;
/// A DMA buffer, freed on drop: for synchronous I/O at boot and in the
/// test jobs.
pub struct Buffer(Option<DmaRegion>);

impl Buffer {
    pub fn new(bytes: usize) -> Result<Self, String> {
        KernelHal
            .dma_alloc(bytes.div_ceil(PAGE_SIZE))
            .map(|r| Self(Some(r)))
            .ok_or_else(|| format!("no memory for a {bytes}-byte buffer"))
    }

    fn region(&self) -> &DmaRegion {
        self.0.as_ref().expect("buffer is live until dropped")
    }

    pub fn phys(&self, offset: usize) -> u64 {
        self.region().phys + offset as u64
    }

    pub fn bytes(&mut self) -> &mut [u8] {
        let r = self.region();
        // SAFETY: the region is ours, mapped, and len() bytes long.
        unsafe { core::slice::from_raw_parts_mut(r.virt.as_ptr(), r.len()) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(region) = self.0.take() {
            // SAFETY: no request using the buffer is in flight any more:
            // its users wait for their completions, which drivers give
            // (timed out, if need be) before `run_sync`'s deadline.
            unsafe { KernelHal.dma_free(region) };
        }
    }
}

/// A queue handle on the whole of `disk`.
pub fn open_whole(disk: &NamedDisk) -> Result<QueueHandle, String> {
    let view = disk.disk.claim_all().map_err(|e| format!("{e:?}"))?;
    view.open_queue().map_err(|e| format!("{e:?}"))
}

/// Submits `request` and waits for its completion.
pub fn run_sync(dev: &mut QueueHandle, tag: u64, request: Request<'_>) -> Result<(), String> {
    dev.submit(tag, request).map_err(|e| format!("{e:?}"))?;
    let start = clock::now_ns();
    let mut done = [Completion::default(); 8];
    loop {
        let n = dev.poll(&mut done);
        if let Some(c) = done[..n].iter().find(|c| c.tag == tag) {
            return c.result.map_err(|e| format!("{e:?}"));
        }
        if clock::now_ns() - start > REQUEST_DEADLINE_NS {
            return Err("no completion within 60 s".into());
        }
        core::hint::spin_loop();
    }
}

/// Reads `disk`'s partition table, through a queue of its own, before
/// anything else uses the disk.
pub fn read_partitions(disk: &NamedDisk) -> Result<PartitionTable, TableError> {
    let mut queue = open_whole(disk);
    let mut buffer = Buffer::new(partition::MAX_READ_BYTES);
    partition::read_partition_table(&disk.disk.geometry(), |lba, out| {
        let read = match (&mut queue, &mut buffer) {
            (Ok(queue), Ok(buffer)) => {
                let segments = [Segment {
                    phys: buffer.phys(0),
                    len: out.len() as u32,
                }];
                let request = Request::Read {
                    lba,
                    segments: &segments,
                };
                run_sync(queue, 0, request)
                    .map(|()| out.copy_from_slice(&buffer.bytes()[..out.len()]))
            }
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        if let Err(e) = &read {
            log::warn!("partitions: {}: reading block {lba}: {e}", disk.name);
        }
        read.is_ok()
    })
}

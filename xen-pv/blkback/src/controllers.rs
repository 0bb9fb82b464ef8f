//! The names of PCI storage controllers and of their disks, and what is
//! remembered of the ones that failed to come up.
//!
//! Controllers are numbered per kind in the order they are found on the
//! bus: `nvme0`, `nvme1`, ..., `ahci0`, ..., `virtio0`, .... A controller
//! that fails to come up still takes its number, so the names of the
//! others do not depend on whether it did. Their disks are `nvme<c>n<nsid>`
//! (a namespace), `ahci<c>p<port>` (the disk on a port) and `virtio<c>`
//! (the device is its one disk).
//!
//! A vbd whose target names a disk of a failed controller (or a failed
//! AHCI port) is refused with [`OpenError::BringUpFailed`], which says
//! which device failed and why, rather than "no such disk".

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::target::OpenError;

/// The kinds of storage controller stordom drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControllerKind {
    /// NVMe: one disk per active namespace.
    Nvme,
    /// AHCI: one disk per port with a device.
    Ahci,
    /// virtio-blk: the device is one disk.
    Virtio,
}

impl ControllerKind {
    const ALL: [ControllerKind; 3] = [Self::Nvme, Self::Ahci, Self::Virtio];

    /// The prefix of its controllers' names.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Nvme => "nvme",
            Self::Ahci => "ahci",
            Self::Virtio => "virtio",
        }
    }

    /// The letter between a controller's name and the number of one of
    /// its disks (`n` for a namespace, `p` for a port); `None` when the
    /// controller is its one disk.
    fn unit_letter(self) -> Option<char> {
        match self {
            Self::Nvme => Some('n'),
            Self::Ahci => Some('p'),
            Self::Virtio => None,
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Nvme => 0,
            Self::Ahci => 1,
            Self::Virtio => 2,
        }
    }
}

/// Hands out controller names in bus order, one counter per kind.
#[derive(Debug, Default)]
pub struct ControllerNumbering {
    next: [u32; 3],
}

impl ControllerNumbering {
    pub fn new() -> Self {
        Self::default()
    }

    /// The name of the next controller of `kind` found (whether it comes
    /// up or not): `nvme0`, then `nvme1`, ...
    pub fn name_next(&mut self, kind: ControllerKind) -> String {
        let counter = &mut self.next[kind.index()];
        let name = format!("{}{}", kind.prefix(), *counter);
        *counter += 1;
        name
    }
}

/// The name of disk `unit` of controller `controller` of `kind`:
/// namespace `unit` of an NVMe (`nvme0n1`), the disk on port `unit` of an
/// AHCI controller (`ahci0p2`); a virtio-blk device's one disk takes the
/// controller's name (`unit` is ignored).
pub fn disk_name(kind: ControllerKind, controller: &str, unit: u32) -> String {
    match kind.unit_letter() {
        Some(letter) => format!("{controller}{letter}{unit}"),
        None => controller.into(),
    }
}

/// The controller a disk name belongs to (`nvme1n2` to `nvme1`, `ahci0p3`
/// to `ahci0`, `virtio2` to itself); `None` for names no controller gives
/// (`module:0`, `nvme1`, `nvme01n1`, ...).
pub fn controller_of(disk: &str) -> Option<&str> {
    ControllerKind::ALL.iter().find_map(|&kind| {
        let digits = leading_number(disk.strip_prefix(kind.prefix())?)?;
        let (controller, unit) = disk.split_at(kind.prefix().len() + digits);
        let well_formed = match kind.unit_letter() {
            Some(letter) => unit
                .strip_prefix(letter)
                .and_then(leading_number)
                .is_some_and(|digits| digits == unit.len() - 1),
            None => unit.is_empty(),
        };
        well_formed.then_some(controller)
    })
}

/// The length of the decimal number `text` starts with, written as
/// [`ControllerNumbering`] and the name functions write numbers (no
/// leading zero); `None` when it starts with none.
fn leading_number(text: &str) -> Option<usize> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let leading_zero = digits > 1 && text.starts_with('0');
    (digits > 0 && !leading_zero).then_some(digits)
}

/// A controller, or one AHCI port's disk, that failed to come up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BringUpFailure {
    /// `controller nvme1`, `disk ahci0p2`: what failed, as the `error`
    /// node and the console say it.
    pub device: String,
    /// Why, as its driver said.
    pub reason: String,
}

impl fmt::Display for BringUpFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed to come up: {}", self.device, self.reason)
    }
}

/// The controllers and AHCI ports that failed to come up, by name (found
/// again, and so recorded again, at each start of the serve job).
#[derive(Clone, Debug, Default)]
pub struct BringUpFailures {
    /// `(controller or disk name, failure)`.
    failed: Vec<(String, BringUpFailure)>,
}

impl BringUpFailures {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that controller `controller` (`nvme1`) failed, and why.
    pub fn controller_failed(&mut self, controller: &str, reason: impl fmt::Display) {
        self.record(controller, format!("controller {controller}"), reason);
    }

    /// Records that the disk `disk` (`ahci0p2`) of a controller that came
    /// up failed, and why.
    pub fn disk_failed(&mut self, disk: &str, reason: impl fmt::Display) {
        self.record(disk, format!("disk {disk}"), reason);
    }

    fn record(&mut self, name: &str, device: String, reason: impl fmt::Display) {
        let failure = BringUpFailure {
            device,
            reason: reason.to_string(),
        };
        self.failed.push((name.into(), failure));
    }

    /// Every failure, in the order recorded.
    pub fn iter(&self) -> impl Iterator<Item = &BringUpFailure> {
        self.failed.iter().map(|(_, failure)| failure)
    }

    pub fn is_empty(&self) -> bool {
        self.failed.is_empty()
    }

    /// Why `disk`, which no opener found, cannot be served: its own or its
    /// controller's failure to come up, else [`OpenError::NotFound`].
    pub fn refusal(&self, disk: &str) -> OpenError {
        let controller = controller_of(disk);
        self.failed
            .iter()
            .find(|(name, _)| name == disk || Some(name.as_str()) == controller)
            .map_or(OpenError::NotFound, |(_, failure)| {
                OpenError::BringUpFailed(failure.clone())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_controller_keeps_its_number() {
        let mut numbering = ControllerNumbering::new();
        let names: Vec<String> = [
            ControllerKind::Nvme,
            ControllerKind::Ahci,
            ControllerKind::Nvme,
            ControllerKind::Virtio,
            ControllerKind::Nvme,
        ]
        .into_iter()
        .map(|kind| numbering.name_next(kind))
        .collect();
        // Whether nvme1 came up or not, the next NVMe is nvme2.
        assert_eq!(names, ["nvme0", "ahci0", "nvme1", "virtio0", "nvme2"]);
    }

    #[test]
    fn disk_names_lead_back_to_their_controller() {
        let named = disk_name;
        assert_eq!(named(ControllerKind::Nvme, "nvme1", 2), "nvme1n2");
        assert_eq!(named(ControllerKind::Ahci, "ahci0", 5), "ahci0p5");
        assert_eq!(named(ControllerKind::Virtio, "virtio3", 0), "virtio3");
        for (kind, controller, unit) in [
            (ControllerKind::Nvme, "nvme1", 2),
            (ControllerKind::Nvme, "nvme12", 10),
            (ControllerKind::Ahci, "ahci0", 5),
            (ControllerKind::Virtio, "virtio3", 0),
        ] {
            let disk = named(kind, controller, unit);
            assert_eq!(controller_of(&disk), Some(controller), "{disk}");
        }
        for not_a_disk in [
            "nvme1",
            "nvme",
            "nvmen1",
            "nvme1n",
            "nvme01n1",
            "nvme1n01",
            "nvme1n1x",
            "nvme1p1",
            "ahci0",
            "ahci0n1",
            "ahci0p",
            "virtio",
            "virtio0n1",
            "module:0",
            "ram0",
            "",
        ] {
            assert_eq!(controller_of(not_a_disk), None, "{not_a_disk:?}");
        }
    }

    #[test]
    fn disks_of_a_failed_controller_or_port_are_refused_with_the_reason() {
        let mut failures = BringUpFailures::new();
        assert!(failures.is_empty());
        failures.controller_failed("nvme1", "the controller did not become ready");
        failures.disk_failed("ahci0p2", "the port did not link up");
        let refused = |disk: &str| match failures.refusal(disk) {
            OpenError::BringUpFailed(failure) => failure.to_string(),
            other => format!("{other:?}"),
        };
        for disk in ["nvme1n1", "nvme1n7"] {
            assert_eq!(
                refused(disk),
                "controller nvme1 failed to come up: the controller did not become ready"
            );
        }
        assert_eq!(
            refused("ahci0p2"),
            "disk ahci0p2 failed to come up: the port did not link up"
        );
        for unknown in ["nvme0n1", "nvme10n1", "ahci0p1", "virtio0", "module:1"] {
            assert_eq!(failures.refusal(unknown), OpenError::NotFound, "{unknown}");
        }
        assert_eq!(failures.iter().count(), 2);
    }
}

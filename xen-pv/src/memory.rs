//! `memory_op` and the shared_info page.

use core::sync::atomic::{AtomicI8, AtomicU8, AtomicU32, AtomicU64, Ordering, fence};

use crate::hypercall::command;
use crate::{DOMID_SELF, DomId, Errno, Hypercall, PAGE_SIZE};

/// `XENMAPSPACE_shared_info`: map the shared_info page.
pub const XENMAPSPACE_SHARED_INFO: u32 = 0;
/// `XENMAPSPACE_grant_table`: map a frame of the domain's own grant table.
pub const XENMAPSPACE_GRANT_TABLE: u32 = 1;

/// `struct xen_add_to_physmap` (XENMEM_add_to_physmap).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct AddToPhysmap {
    pub domid: DomId,
    pub size: u16,
    pub space: u32,
    pub idx: u64,
    pub gpfn: u64,
}

xen_command!(AddToPhysmap, Memory, 7, "struct xen_add_to_physmap");

/// Places the shared_info page at guest frame `gfn` (a free, unpopulated
/// frame the kernel reserved); the kernel then maps `gfn` and views it as a
/// [`SharedInfo`].
pub fn map_shared_info<H: Hypercall + ?Sized>(h: &H, gfn: u64) -> Result<(), Errno> {
    add_to_own_physmap(h, XENMAPSPACE_SHARED_INFO, 0, gfn)
}

/// Places frame `index` of the domain's own (v1) grant table at guest
/// frame `gfn` (a frame the kernel gives up for it, as for shared_info);
/// the kernel then views it as [`crate::grant::GrantEntryV1`]s to grant
/// its own pages.
pub fn map_grant_table_frame<H: Hypercall + ?Sized>(
    h: &H,
    index: u64,
    gfn: u64,
) -> Result<(), Errno> {
    add_to_own_physmap(h, XENMAPSPACE_GRANT_TABLE, index, gfn)
}

/// XENMEM_add_to_physmap for this domain: item `idx` of `space` at `gfn`.
fn add_to_own_physmap<H: Hypercall + ?Sized>(
    h: &H,
    space: u32,
    idx: u64,
    gfn: u64,
) -> Result<(), Errno> {
    let mut arg = AddToPhysmap {
        domid: DOMID_SELF,
        size: 0,
        space,
        idx,
        gpfn: gfn,
    };
    command(h, &mut arg).map(drop)
}

/// Number of vCPU slots in shared_info (`XEN_LEGACY_MAX_VCPUS`).
pub const LEGACY_MAX_VCPUS: usize = 32;
/// Words of pending/mask bits: `sizeof(xen_ulong_t) * 8` on x86-64.
pub const EVTCHN_WORDS: usize = 64;
/// Bits per pending/mask word.
pub const EVTCHN_WORD_BITS: usize = 64;

/// `struct vcpu_time_info`: Xen's per-vCPU clock parameters.
#[repr(C)]
pub struct VcpuTimeInfo {
    pub version: AtomicU32,
    _pad0: u32,
    pub tsc_timestamp: AtomicU64,
    pub system_time: AtomicU64,
    pub tsc_to_system_mul: AtomicU32,
    pub tsc_shift: AtomicI8,
    pub flags: AtomicU8,
    _pad1: [u8; 2],
}

/// A consistent copy of a vCPU's clock parameters (Xen's pvclock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockParams {
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
}

impl ClockParams {
    /// Nanoseconds of Xen system time (since the domain's boot) at TSC
    /// value `tsc`.
    pub fn nanos_at(&self, tsc: u64) -> u64 {
        let delta = tsc.wrapping_sub(self.tsc_timestamp);
        // Shifts of 64 or more (never sent by a sane Xen) give 0, not a panic.
        let shift = u32::from(self.tsc_shift.unsigned_abs());
        let scaled = if self.tsc_shift >= 0 {
            delta.checked_shl(shift)
        } else {
            delta.checked_shr(shift)
        }
        .unwrap_or(0);
        let ns = (u128::from(scaled) * u128::from(self.tsc_to_system_mul)) >> 32;
        self.system_time.wrapping_add(ns as u64)
    }
}

/// Tries at reading the clock before concluding Xen is stuck mid-update.
const CLOCK_READ_TRIES: usize = 1000;

impl VcpuTimeInfo {
    /// Reads the parameters. Xen makes `version` odd while it writes them,
    /// so a read is retried until it saw one even, unchanged version.
    pub fn read(&self) -> Option<ClockParams> {
        (0..CLOCK_READ_TRIES).find_map(|_| {
            let before = self.version.load(Ordering::Acquire);
            let params = ClockParams {
                tsc_timestamp: self.tsc_timestamp.load(Ordering::Relaxed),
                system_time: self.system_time.load(Ordering::Relaxed),
                tsc_to_system_mul: self.tsc_to_system_mul.load(Ordering::Relaxed),
                tsc_shift: self.tsc_shift.load(Ordering::Relaxed),
            };
            fence(Ordering::Acquire);
            let after = self.version.load(Ordering::Relaxed);
            (before.is_multiple_of(2) && before == after).then_some(params)
        })
    }
}

/// `struct vcpu_info` (x86-64): the per-vCPU part of shared_info.
#[repr(C)]
pub struct VcpuInfo {
    /// Set by Xen when any event is pending for this vCPU.
    pub evtchn_upcall_pending: AtomicU8,
    /// Non-zero blocks upcalls (PV only; HVM uses the interrupt flag).
    pub evtchn_upcall_mask: AtomicU8,
    _pad: [u8; 6],
    /// One bit per pending word in [`SharedInfo::evtchn_pending`].
    pub evtchn_pending_sel: AtomicU64,
    _arch: [u64; 2],
    pub time: VcpuTimeInfo,
}

/// `struct shared_info` (x86-64), padded to its page.
#[repr(C)]
pub struct SharedInfo {
    pub vcpu_info: [VcpuInfo; LEGACY_MAX_VCPUS],
    pub evtchn_pending: [AtomicU64; EVTCHN_WORDS],
    pub evtchn_mask: [AtomicU64; EVTCHN_WORDS],
    pub wc_version: AtomicU32,
    pub wc_sec: AtomicU32,
    pub wc_nsec: AtomicU32,
    pub wc_sec_hi: AtomicU32,
    _rest: [u8; PAGE_SIZE - 3088],
}

#[cfg(any(test, feature = "sim"))]
impl SharedInfo {
    /// A zeroed page, as Xen presents it before any event.
    pub fn new_zeroed() -> alloc::boxed::Box<SharedInfo> {
        // SAFETY: every field is an atomic integer or plain bytes, for which
        // all-zero is a valid value.
        alloc::boxed::Box::new(unsafe { core::mem::zeroed() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn shared_info_layout_matches_xen() {
        assert_eq!(size_of::<VcpuTimeInfo>(), 32);
        assert_eq!(size_of::<VcpuInfo>(), 64);
        assert_eq!(offset_of!(VcpuInfo, evtchn_pending_sel), 8);
        assert_eq!(offset_of!(VcpuInfo, time), 32);
        assert_eq!(offset_of!(SharedInfo, evtchn_pending), 2048);
        assert_eq!(offset_of!(SharedInfo, evtchn_mask), 2560);
        assert_eq!(offset_of!(SharedInfo, wc_version), 3072);
        assert_eq!(size_of::<SharedInfo>(), PAGE_SIZE);
        assert_eq!(size_of::<AddToPhysmap>(), 24);
    }

    #[test]
    fn pvclock_scales_tsc_and_respects_the_version() {
        let shared = SharedInfo::new_zeroed();
        let time = &shared.vcpu_info[0].time;
        time.tsc_timestamp.store(1_000_000, Ordering::Relaxed);
        time.system_time.store(5_000, Ordering::Relaxed);
        // 0.5 ns per tick: a 2 GHz TSC.
        time.tsc_to_system_mul.store(0x8000_0000, Ordering::Relaxed);
        time.version.store(3, Ordering::Relaxed);
        assert_eq!(time.read(), None, "Xen is mid-update");
        time.version.store(4, Ordering::Relaxed);
        let clock = time.read().unwrap();
        assert_eq!(clock.nanos_at(1_002_000), 6_000);
        let halved = ClockParams {
            tsc_shift: -1,
            ..clock
        };
        assert_eq!(halved.nanos_at(1_002_000), 5_500);
        let doubled = ClockParams {
            tsc_shift: 1,
            ..clock
        };
        assert_eq!(doubled.nanos_at(1_002_000), 7_000);
        // A TSC a little behind the timestamp (another vCPU's) wraps
        // rather than panicking.
        let _ = clock.nanos_at(999_999);
        let absurd = ClockParams {
            tsc_shift: 100,
            ..clock
        };
        assert_eq!(absurd.nanos_at(1_002_000), 5_000);
    }
}

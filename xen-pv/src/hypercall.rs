//! The hypercall interface: one raw entry point and typed wrappers above it.
//!
//! All hypercalls go through [`Hypercall::hypercall`]. The typed wrappers
//! only accept argument structures that implement one of the command traits
//! below, so a caller can never pair a sub-command with the wrong structure.

use core::fmt;
use core::marker::PhantomData;

/// Hypercall numbers (`__HYPERVISOR_*` in public/xen.h) that stordom uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum HypercallOp {
    /// `memory_op`: physmap changes and the memory map.
    Memory = 12,
    /// `multicall`: several hypercalls in one trip into Xen.
    Multicall = 13,
    /// `xen_version`: version and feature queries.
    XenVersion = 17,
    /// `console_io`: the hypervisor's own console (debug builds / dom0).
    ConsoleIo = 18,
    /// `grant_table_op`: map, unmap and copy grants.
    GrantTable = 20,
    /// `vcpu_op`: per-vCPU registrations (the runstate area).
    Vcpu = 24,
    /// `sched_op`: yield, block, shutdown.
    Sched = 29,
    /// `event_channel_op`: event channel management.
    EventChannel = 32,
    /// `hvm_op`: HVM parameters and the upcall vector.
    Hvm = 34,
}

impl HypercallOp {
    /// Every hypercall this crate knows.
    pub const ALL: [HypercallOp; 9] = [
        Self::Memory,
        Self::Multicall,
        Self::XenVersion,
        Self::ConsoleIo,
        Self::GrantTable,
        Self::Vcpu,
        Self::Sched,
        Self::EventChannel,
        Self::Hvm,
    ];

    /// The hypercall numbered `number`, if this crate knows it.
    pub fn from_number(number: u64) -> Option<HypercallOp> {
        Self::ALL.into_iter().find(|op| *op as u64 == number)
    }
}

/// The way into the hypervisor.
///
/// # Safety
/// An implementation must perform hypercall `op` with `args` as the first
/// five hypercall arguments and return Xen's result unchanged (or, for a
/// simulation, behave exactly as Xen documents the call). It must not touch
/// memory other than what the hypercall itself is documented to access.
pub unsafe trait Hypercall {
    /// Performs one hypercall and returns Xen's raw result (negative errno on
    /// failure).
    ///
    /// # Safety
    /// Every argument that the hypercall interprets as a pointer must point
    /// to a valid, live structure of the layout Xen expects for `op` and its
    /// sub-command, writable where Xen writes results.
    unsafe fn hypercall(&self, op: HypercallOp, args: [u64; 5]) -> i64;
}

// SAFETY: forwarding to a `Hypercall` implementation keeps its guarantees.
unsafe impl<H: Hypercall + ?Sized> Hypercall for &H {
    unsafe fn hypercall(&self, op: HypercallOp, args: [u64; 5]) -> i64 {
        // SAFETY: the caller's guarantees are passed on unchanged.
        unsafe { (**self).hypercall(op, args) }
    }
}

/// A Xen error number (public/errno.h), as returned negated by hypercalls.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(1);
    pub const ENOENT: Errno = Errno(2);
    pub const ESRCH: Errno = Errno(3);
    pub const EIO: Errno = Errno(5);
    pub const E2BIG: Errno = Errno(7);
    pub const EBADF: Errno = Errno(9);
    pub const EAGAIN: Errno = Errno(11);
    pub const ENOMEM: Errno = Errno(12);
    pub const EACCES: Errno = Errno(13);
    pub const EFAULT: Errno = Errno(14);
    pub const EBUSY: Errno = Errno(16);
    pub const EEXIST: Errno = Errno(17);
    pub const ENODEV: Errno = Errno(19);
    pub const EINVAL: Errno = Errno(22);
    pub const ENOSPC: Errno = Errno(28);
    pub const ENOSYS: Errno = Errno(38);
    pub const EOPNOTSUPP: Errno = Errno(95);

    /// The symbolic name, where this crate knows it.
    pub fn name(self) -> Option<&'static str> {
        const NAMES: &[(Errno, &str)] = &[
            (Errno::EPERM, "EPERM"),
            (Errno::ENOENT, "ENOENT"),
            (Errno::ESRCH, "ESRCH"),
            (Errno::EIO, "EIO"),
            (Errno::E2BIG, "E2BIG"),
            (Errno::EBADF, "EBADF"),
            (Errno::EAGAIN, "EAGAIN"),
            (Errno::ENOMEM, "ENOMEM"),
            (Errno::EACCES, "EACCES"),
            (Errno::EFAULT, "EFAULT"),
            (Errno::EBUSY, "EBUSY"),
            (Errno::EEXIST, "EEXIST"),
            (Errno::ENODEV, "ENODEV"),
            (Errno::EINVAL, "EINVAL"),
            (Errno::ENOSPC, "ENOSPC"),
            (Errno::ENOSYS, "ENOSYS"),
            (Errno::EOPNOTSUPP, "EOPNOTSUPP"),
        ];
        NAMES.iter().find(|(e, _)| *e == self).map(|(_, n)| *n)
    }

    /// Splits a raw hypercall result into success value or error.
    pub fn check(ret: i64) -> Result<u64, Errno> {
        if ret < 0 {
            // Xen errnos are small; anything else is reported as EINVAL
            // rather than truncated into a misleading value.
            Err(ret
                .checked_neg()
                .and_then(|e| i32::try_from(e).ok())
                .map_or(Errno::EINVAL, Errno))
        } else {
            Ok(ret as u64)
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "Errno({})", self.0),
        }
    }
}

/// An argument structure of one hypercall sub-command.
///
/// # Safety
/// `Self` must have exactly the `repr(C)` layout that Xen expects for
/// sub-command `CMD` of hypercall `OP`.
pub unsafe trait Command {
    /// The hypercall this structure belongs to.
    const OP: HypercallOp;
    /// The sub-command number (first hypercall argument).
    const CMD: u32;
}

/// Issues `T::CMD` with a pointer to `arg`.
pub fn command<H: Hypercall + ?Sized, T: Command>(h: &H, arg: &mut T) -> Result<u64, Errno> {
    let ptr = core::ptr::from_mut(arg) as u64;
    // SAFETY: `T: Command` guarantees the layout Xen expects for this
    // sub-command, and `arg` is a live exclusive reference for the call.
    Errno::check(unsafe { h.hypercall(T::OP, [u64::from(T::CMD), ptr, 0, 0, 0]) })
}

/// Issues `T::CMD` over an array of structures (`grant_table_op` style:
/// command, pointer, count).
pub fn command_batch<H: Hypercall + ?Sized, T: Command>(
    h: &H,
    args: &mut [T],
) -> Result<u64, Errno> {
    let count = u32::try_from(args.len()).map_err(|_| Errno::E2BIG)?;
    let ptr = args.as_mut_ptr() as u64;
    // SAFETY: as in `command`; `count` elements are live behind `ptr`.
    Errno::check(unsafe { h.hypercall(T::OP, [u64::from(T::CMD), ptr, u64::from(count), 0, 0]) })
}

/// `struct multicall_entry` (x86-64): one call of a [`multicall`], built
/// from a sub-command's argument structure, which stays borrowed until
/// the entry is gone.
#[derive(Debug)]
#[repr(C)]
pub struct MulticallEntry<'a> {
    pub op: u64,
    /// The call's raw result, once the multicall was made.
    pub result: u64,
    pub args: [u64; 6],
    _arg: PhantomData<&'a mut ()>,
}

impl<'a> MulticallEntry<'a> {
    /// `T::CMD` with a pointer to `arg`, as [`command`] issues it.
    pub fn command<T: Command>(arg: &'a mut T) -> Self {
        Self {
            op: T::OP as u64,
            result: 0,
            args: [
                u64::from(T::CMD),
                core::ptr::from_mut(arg) as u64,
                0,
                0,
                0,
                0,
            ],
            _arg: PhantomData,
        }
    }

    /// A placeholder that borrows nothing, for the unused tail of a
    /// fixed array of entries: never to be passed to [`multicall`].
    pub(crate) fn unused() -> Self {
        Self {
            op: 0,
            result: 0,
            args: [0; 6],
            _arg: PhantomData,
        }
    }

    /// The call's result, as [`Errno::check`] splits it.
    pub fn outcome(&self) -> Result<u64, Errno> {
        Errno::check(self.result as i64)
    }
}

/// Makes the calls of `entries` in order in one trip into Xen; each
/// entry's result is in its `result`. Fails as a whole (no call made) when
/// Xen refuses the batch itself. Under nested emulation the trip, more than
/// the work, is what a hypercall costs.
pub fn multicall<H: Hypercall + ?Sized>(
    h: &H,
    entries: &mut [MulticallEntry<'_>],
) -> Result<(), Errno> {
    let count = u32::try_from(entries.len()).map_err(|_| Errno::E2BIG)?;
    let ptr = entries.as_mut_ptr() as u64;
    // SAFETY: each entry was built by `MulticallEntry::command` from an
    // exclusive borrow of its argument, of the layout its sub-command
    // expects, still live (the entries borrow it); `count` entries are
    // behind `ptr`, and Xen writes only their `result`s.
    Errno::check(unsafe { h.hypercall(HypercallOp::Multicall, [ptr, u64::from(count), 0, 0, 0]) })
        .map(drop)
}

/// `CONSOLEIO_write` of the hypervisor console (visible in `xl dmesg` on
/// debug hypervisors); the PV console ring is the normal output path.
pub fn console_io_write<H: Hypercall + ?Sized>(h: &H, bytes: &[u8]) -> Result<u64, Errno> {
    const CONSOLEIO_WRITE: u64 = 0;
    let count = u32::try_from(bytes.len()).map_err(|_| Errno::E2BIG)?;
    // SAFETY: Xen only reads `count` bytes from the live slice.
    Errno::check(unsafe {
        h.hypercall(
            HypercallOp::ConsoleIo,
            [
                CONSOLEIO_WRITE,
                u64::from(count),
                bytes.as_ptr() as u64,
                0,
                0,
            ],
        )
    })
}

/// The hypervisor's version as (major, minor).
pub fn xen_version<H: Hypercall + ?Sized>(h: &H) -> Result<(u16, u16), Errno> {
    const XENVER_VERSION: u64 = 0;
    // SAFETY: XENVER_version takes no pointer argument.
    let v = Errno::check(unsafe {
        h.hypercall(HypercallOp::XenVersion, [XENVER_VERSION, 0, 0, 0, 0])
    })?;
    Ok(((v >> 16) as u16, v as u16))
}

/// `struct xen_feature_info` for `XENVER_get_features`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct FeatureInfo {
    pub submap_idx: u32,
    pub submap: u32,
}

xen_command!(FeatureInfo, XenVersion, 6, "struct xen_feature_info");

/// `XENFEAT_hvm_callback_vector`: the callback-IRQ fallback may use a vector.
pub const XENFEAT_HVM_CALLBACK_VECTOR: u32 = 8;

/// Whether Xen advertises feature bit `feature` (a `XENFEAT_*` number).
pub fn has_feature<H: Hypercall + ?Sized>(h: &H, feature: u32) -> Result<bool, Errno> {
    let mut info = FeatureInfo {
        submap_idx: feature / 32,
        submap: 0,
    };
    command(h, &mut info)?;
    Ok(info.submap & (1 << (feature % 32)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_check_maps_negative_results() {
        assert_eq!(Errno::check(5), Ok(5));
        assert_eq!(Errno::check(-11), Err(Errno::EAGAIN));
        assert_eq!(Errno::check(i64::MIN), Err(Errno::EINVAL));
        assert_eq!(std::format!("{:?}", Errno::EAGAIN), "EAGAIN");
        assert_eq!(std::format!("{:?}", Errno(1234)), "Errno(1234)");
    }

    #[test]
    fn typed_wrappers_reach_the_hypervisor() {
        let sim = crate::sim::SimXen::new();
        assert_eq!(xen_version(&sim), Ok((4, 19)));
        assert_eq!(has_feature(&sim, XENFEAT_HVM_CALLBACK_VECTOR), Ok(true));
        assert_eq!(has_feature(&sim, 40), Ok(false));
        console_io_write(&sim, b"early boot\n").unwrap();
        assert_eq!(sim.console_output(), b"early boot\n");
        crate::memory::map_shared_info(&sim, 0xfeff0).unwrap();
        assert_eq!(sim.shared_info_gfn(), Some(0xfeff0));
        sim.fail_next_hypercall(Errno::ENOSYS);
        assert_eq!(xen_version(&sim), Err(Errno::ENOSYS));
    }

    #[test]
    fn ring_params_come_from_hvm_params() {
        use crate::hvm::*;
        let sim = crate::sim::SimXen::new();
        sim.set_param(PARAM_STORE_PFN, 0xfeffc);
        sim.set_param(PARAM_STORE_EVTCHN, 1);
        sim.set_param(PARAM_CONSOLE_PFN, 0xfefff);
        sim.set_param(PARAM_CONSOLE_EVTCHN, 2);
        assert_eq!(
            store_ring(&sim),
            Ok(RingParams {
                gfn: 0xfeffc,
                port: 1
            })
        );
        assert_eq!(
            console_ring(&sim),
            Ok(RingParams {
                gfn: 0xfefff,
                port: 2
            })
        );
        sim.set_param(PARAM_CONSOLE_EVTCHN, 1 << 40);
        assert_eq!(console_ring(&sim), Err(Errno::EINVAL));
    }
}

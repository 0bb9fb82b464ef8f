//! stordom as a Xen guest: finding Xen, its hypercall page, its view of
//! time, and leaving through it.

use crate::memory;
use kernel::paging::Access;
use spin::Once;
use xen_pv::arch::{HypercallPage, InstallError, XenCpuid};

/// Xen, once the hypercall page is installed.
pub struct Xen {
    /// Where Xen's CPUID leaves are.
    pub cpuid: XenCpuid,
    /// The hypercall entry points.
    pub hypercalls: HypercallPage,
}

static XEN: Once<Xen> = Once::new();

/// Why Xen could not be brought up.
#[derive(Debug)]
pub enum XenError {
    /// No frame for the hypercall page.
    OutOfMemory,
    /// Xen refused or ignored the hypercall page.
    HypercallPage(InstallError),
    /// The hypercall page could not be made executable.
    Protect,
}

impl core::fmt::Display for XenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfMemory => write!(f, "no frame for the hypercall page"),
            Self::HypercallPage(e) => write!(f, "hypercall page not installed: {e:?}"),
            Self::Protect => write!(f, "hypercall page could not be made executable"),
        }
    }
}

/// Whether we run on Xen, from CPUID.
pub fn detect() -> Option<XenCpuid> {
    XenCpuid::detect()
}

/// Installs the hypercall page in a fresh frame, then maps it read+execute
/// (it is writable only while Xen fills it, never executable and writable).
pub fn init(cpuid: XenCpuid) -> Result<&'static Xen, XenError> {
    let frame = memory::alloc_frames(1).ok_or(XenError::OutOfMemory)?;
    let page = core::ptr::NonNull::new(frame as *mut u8).ok_or(XenError::OutOfMemory)?;
    // SAFETY: we run at CPL 0 on Xen (CPUID said so); the frame is ours,
    // identity-mapped writable, and is used for nothing else.
    let hypercalls =
        unsafe { HypercallPage::install(page, frame, &cpuid) }.map_err(XenError::HypercallPage)?;
    memory::protect(frame, 4096, Access::CODE).map_err(|_| XenError::Protect)?;
    Ok(XEN.call_once(|| Xen { cpuid, hypercalls }))
}

/// Xen, if `init` succeeded.
pub fn get() -> Option<&'static Xen> {
    XEN.get()
}

/// The guest TSC frequency Xen reports (leaf base+3, sub-leaf 0, ECX in
/// kHz), in Hz. PVH guests have no PIT to calibrate against.
pub fn tsc_hz(cpuid: &XenCpuid) -> Option<u64> {
    if cpuid.max_leaf < cpuid.base + 3 {
        return None;
    }
    let khz = core::arch::x86_64::__cpuid_count(cpuid.base + 3, 0).ecx;
    (khz != 0).then(|| u64::from(khz) * 1000)
}

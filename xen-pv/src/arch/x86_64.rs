//! x86-64: CPUID detection, hypercall page installation, the call ABI.

use core::arch::asm;
use core::arch::x86_64::__cpuid;
use core::ptr::NonNull;

use crate::PAGE_SIZE;
use crate::hypercall::{Hypercall, HypercallOp};

/// Where Xen's CPUID leaves were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XenCpuid {
    /// The leaf holding the "XenVMMXenVMM" signature (0x4000_0000 + n*0x100).
    pub base: u32,
    /// The highest Xen leaf available.
    pub max_leaf: u32,
}

impl XenCpuid {
    /// Looks for Xen's signature in the hypervisor CPUID range. Xen may sit
    /// above another hypervisor's leaves (viridian), hence the scan.
    pub fn detect() -> Option<XenCpuid> {
        (0..0x100u32)
            .map(|n| 0x4000_0000 + n * 0x100)
            .find_map(|base| {
                // CPUID is unprivileged and side-effect free on x86-64.
                let r = __cpuid(base);
                let signature = [
                    r.ebx.to_le_bytes(),
                    r.ecx.to_le_bytes(),
                    r.edx.to_le_bytes(),
                ];
                (signature.as_flattened() == b"XenVMMXenVMM" && r.eax >= base + 2).then_some(
                    XenCpuid {
                        base,
                        max_leaf: r.eax,
                    },
                )
            })
    }

    /// The MSR to which the hypercall page's guest-physical address is
    /// written (leaf base+2, EBX).
    pub fn hypercall_msr(&self) -> u32 {
        __cpuid(self.base + 2).ebx
    }
}

/// Why the hypercall page could not be installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallError {
    /// The page address is not 4 KiB aligned.
    Misaligned,
    /// Xen did not overwrite the page after the MSR write.
    NotWritten,
}

/// Xen's hypercall page: 128 stubs of 32 bytes, one per hypercall number.
pub struct HypercallPage {
    page: NonNull<u8>,
}

// SAFETY: the page is written once by Xen at installation and only executed
// afterwards; sharing the pointer between CPUs is harmless.
unsafe impl Send for HypercallPage {}
// SAFETY: as above; calls through it carry no shared mutable state.
unsafe impl Sync for HypercallPage {}

impl HypercallPage {
    /// `ret` opcode used to pre-fill the page so an install failure is seen.
    const RET: u8 = 0xc3;

    /// Asks Xen to fill `page` with hypercall stubs and checks it did.
    ///
    /// # Safety
    /// Must run at CPL 0 on Xen (`xen` from [`XenCpuid::detect`]). `page` is
    /// a 4 KiB page, writable now and executable for as long as the returned
    /// value is used, mapped at guest-physical address `gpa`, and used for
    /// nothing else.
    pub unsafe fn install(
        page: NonNull<u8>,
        gpa: u64,
        xen: &XenCpuid,
    ) -> Result<HypercallPage, InstallError> {
        if !gpa.is_multiple_of(PAGE_SIZE as u64)
            || !(page.as_ptr() as usize).is_multiple_of(PAGE_SIZE)
        {
            return Err(InstallError::Misaligned);
        }
        // SAFETY: the caller hands over a writable page of PAGE_SIZE bytes.
        unsafe { page.as_ptr().write_bytes(Self::RET, PAGE_SIZE) };
        let msr = xen.hypercall_msr();
        // SAFETY: writing the Xen hypercall MSR only makes Xen fill the page
        // the caller reserved for it; CPL 0 is guaranteed by the caller.
        unsafe {
            asm!("wrmsr", in("ecx") msr, in("eax") gpa as u32, in("edx") (gpa >> 32) as u32,
                 options(nostack, preserves_flags));
        }
        // SAFETY: the page is still ours and readable; volatile because Xen
        // wrote it behind the compiler's back.
        let first = unsafe { page.as_ptr().read_volatile() };
        if first == Self::RET {
            return Err(InstallError::NotWritten);
        }
        Ok(HypercallPage { page })
    }
}

// SAFETY: each call enters Xen through the stub Xen wrote for `op`, with the
// x86-64 hypercall ABI (rdi, rsi, rdx, r10, r8; result in rax).
unsafe impl Hypercall for HypercallPage {
    unsafe fn hypercall(&self, op: HypercallOp, args: [u64; 5]) -> i64 {
        let entry = self.page.as_ptr() as u64 + 32 * op as u64;
        let ret: i64;
        // SAFETY: `entry` is a Xen-written stub inside the installed page;
        // pointer arguments are valid per the caller's contract. Xen may
        // clobber the argument registers, rcx and r11, so all are outputs.
        unsafe {
            asm!(
                "call {entry}",
                entry = in(reg) entry,
                lateout("rax") ret,
                inlateout("rdi") args[0] => _,
                inlateout("rsi") args[1] => _,
                inlateout("rdx") args[2] => _,
                inlateout("r10") args[3] => _,
                inlateout("r8") args[4] => _,
                lateout("rcx") _,
                lateout("r11") _,
            );
        }
        ret
    }
}

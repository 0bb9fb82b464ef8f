//! Small CPU primitives: port I/O, MSRs, CPUID, halting, exiting.

use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the kernel owns the machine; every port it writes (UART, PIT,
    // debug-exit, 0xe9) has no memory side effects.
    unsafe { Port::new(port).write(value) }
}

/// Writes `bytes` to an I/O port with one `rep outsb`: under a hypervisor
/// that is one trap for the whole buffer instead of one per byte.
pub fn outsb(port: u16, bytes: &[u8]) {
    // SAFETY: as for `outb`; `rep outsb` only reads the `bytes.len()` bytes
    // at `bytes`, which the slice guarantees are readable, and the
    // direction flag is clear (the ABI keeps it clear between functions).
    unsafe {
        core::arch::asm!("rep outsb", in("dx") port, inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _, options(nostack, preserves_flags, readonly))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    // SAFETY: as for `outb`: port reads here only have device side effects.
    unsafe { Port::new(port).read() }
}

/// Writes a dword to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { Port::new(port).write(value) }
}

/// Reads a dword from an I/O port.
pub fn inl(port: u16) -> u32 {
    // SAFETY: as for `outb`.
    unsafe { Port::new(port).read() }
}

/// Reads an MSR.
pub fn rdmsr(msr: u32) -> u64 {
    // SAFETY: only called for architectural MSRs after CPUID showed the
    // feature they belong to.
    unsafe { Msr::new(msr).read() }
}

/// Writes an MSR.
///
/// # Safety
/// The MSR must exist and the value must not break the kernel's invariants
/// (paging, segmentation, interrupt delivery).
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { Msr::new(msr).write(value) }
}

/// CPUID leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    cpuid_count(leaf, 0)
}

/// CPUID leaf `leaf`, subleaf `subleaf`: (eax, ebx, ecx, edx).
pub fn cpuid_count(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Masks interrupts on this CPU.
pub fn disable_interrupts() {
    x86_64::instructions::interrupts::disable();
}

/// Executes an undefined instruction (#UD), for the negative tests.
pub fn raise_invalid_opcode() -> ! {
    // SAFETY: ud2 raises #UD, whose handler reports it and never returns.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86-64 (CR4.TSD is left clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Calls `next` on a fresh boot stack (its top), never coming back: the
/// frames of the current stack, whatever they hold, are never used again.
pub fn run_on_boot_stack(next: extern "C" fn() -> !) -> ! {
    // SAFETY: the boot stack is mapped, writable and ours; `next` never
    // returns, so nothing needs the abandoned frames. The top is page
    // aligned, so `next` starts with the stack aligned as the ABI wants.
    unsafe {
        core::arch::asm!(
            "mov rsp, {top}",
            "xor ebp, ebp",
            "call {next}",
            "ud2",
            top = in(reg) boot::entry::stack_top(),
            next = in(reg) next,
            options(noreturn)
        )
    }
}

/// The current stack pointer.
#[inline(always)]
pub fn stack_pointer() -> u64 {
    let rsp: u64;
    // SAFETY: reads a register into a local; touches no memory.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags))
    };
    rsp
}

/// How the machine is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The job finished as asked.
    Success,
    /// A fault, panic or failed check.
    Failure,
}

/// isa-debug-exit: QEMU exits with (code << 1) | 1, so success is 33 and
/// failure 35 (0 cannot be produced).
const DEBUG_EXIT_PORT: u16 = 0xf4;
const DEBUG_EXIT_SUCCESS: u32 = 0x10;
const DEBUG_EXIT_FAILURE: u32 = 0x11;

/// Leaves the machine: the debug-exit device under bare QEMU, otherwise
/// halts for good.
pub fn exit(status: ExitStatus) -> ! {
    outl(
        DEBUG_EXIT_PORT,
        if status == ExitStatus::Success {
            DEBUG_EXIT_SUCCESS
        } else {
            DEBUG_EXIT_FAILURE
        },
    );
    halt_forever()
}

/// Stops this CPU with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        disable_interrupts();
        x86_64::instructions::hlt();
    }
}

//! What the freestanding binary needs from a runtime: the C memory
//! functions the precompiled `core` calls, the unwinding symbols the
//! precompiled `alloc` references, and the panic handler.

use crate::arch::cpu;
use crate::console;

// The loops below are written with volatile accesses or string
// instructions so the compiler cannot turn them back into calls to
// themselves.

/// # Safety
/// C `memcpy`: `n` bytes readable at `src`, writable at `dst`, no overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; rep movsb copies exactly n
    // bytes forward (DF is clear in the ABI).
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memmove`: `n` bytes readable at `src`, writable at `dst`; may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dst is below src or the
        // ranges do not overlap; the caller guarantees the ranges.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: dst overlaps src from above: copy backwards with DF set from
    // the last byte, then clear DF again as the ABI requires.
    unsafe {
        core::arch::asm!(
            "std", "rep movsb", "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        );
    }
    dst
}

/// # Safety
/// C `memset`: `n` bytes writable at `dst`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; rep stosb stores n bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memcmp`: `n` bytes readable at both pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n and the caller guarantees n readable bytes at each.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As `memcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// # Safety
/// C `strlen`: `s` points at a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the caller guarantees a terminator, so every byte up to it is readable.
    while unsafe { s.add(n).read_volatile() } != 0 {
        n += 1;
    }
    n
}

/// Referenced by the precompiled `alloc`; with panic=abort nothing unwinds.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Referenced by the precompiled `alloc`; reaching it is a bug.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    console::fatal(format_args!(
        "FATAL: _Unwind_Resume called with panic=abort\n"
    ));
    crate::power::exit(cpu::ExitStatus::Failure)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    x86_64::instructions::interrupts::disable();
    console::fatal(format_args!("PANIC: {info}\n"));
    console::stack_dump(cpu::stack_pointer());
    crate::power::exit(cpu::ExitStatus::Failure)
}

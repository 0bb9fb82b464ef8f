//! What the freestanding binary needs from a runtime: the C memory
//! functions the precompiled `core` calls (the copying ones are the
//! architecture's, in `arch`), the unwinding symbols the precompiled
//! `alloc` references, and the panic handler.

use crate::arch::cpu;
use crate::console;

// The loops below are written with volatile accesses so the compiler
// cannot turn them back into calls to themselves.

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

/// Once serving began, a panic restarts stordom in place (see
/// `restart`); before, or when the restart cap forbids it, the domain
/// crashes.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    cpu::disable_interrupts();
    console::fatal(format_args!("PANIC: {info}\n"));
    console::stack_dump(cpu::stack_pointer());
    crate::restart::after_fatal("panic", format_args!("{}", info.message()))
}

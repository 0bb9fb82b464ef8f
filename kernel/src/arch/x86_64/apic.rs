//! Local APIC (x2APIC when the CPU has it, xAPIC MMIO otherwise) and its
//! timer, used for timeouts and polling intervals.

use super::clock;
use super::cpu::{cpuid, rdmsr, wrmsr};
use super::interrupts::{SPURIOUS_VECTOR, set_handler};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_GLOBAL_ENABLE: u64 = 1 << 11;
const X2APIC_ENABLE: u64 = 1 << 10;
const X2APIC_MSR_BASE: u32 = 0x800;

const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xb0;
const REG_SVR: u32 = 0xf0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3e0;

const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
/// Divide configuration 0b0011: bus clock / 16.
const DIVIDE_BY_16: u32 = 0x3;

/// Vector of the timer interrupt.
pub const TIMER_VECTOR: u8 = 0x20;

/// 0: none, 1: xAPIC at `MMIO_BASE`, 2: x2APIC.
static MODE: AtomicUsize = AtomicUsize::new(0);
static MMIO_BASE: AtomicU64 = AtomicU64::new(0);
static TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);
static TIMER_FIRED: AtomicU64 = AtomicU64::new(0);

const MODE_XAPIC: usize = 1;
const MODE_X2APIC: usize = 2;

fn read(reg: u32) -> u32 {
    match MODE.load(Ordering::Relaxed) {
        MODE_X2APIC => rdmsr(X2APIC_MSR_BASE + (reg >> 4)) as u32,
        // SAFETY: MMIO_BASE is the APIC page mapped uncached by `init`, and
        // `reg` is a register offset inside it.
        _ => unsafe {
            ((MMIO_BASE.load(Ordering::Relaxed) + u64::from(reg)) as *const u32).read_volatile()
        },
    }
}

fn write(reg: u32, value: u32) {
    match MODE.load(Ordering::Relaxed) {
        // SAFETY: x2APIC mode is on, so the x2APIC MSR range exists.
        MODE_X2APIC => unsafe { wrmsr(X2APIC_MSR_BASE + (reg >> 4), u64::from(value)) },
        // SAFETY: as in `read`.
        _ => unsafe {
            ((MMIO_BASE.load(Ordering::Relaxed) + u64::from(reg)) as *mut u32).write_volatile(value)
        },
    }
}

/// Remaps the legacy 8259 PICs above the exception vectors and masks them.
/// Left alone they deliver the PIT's IRQ 0 on vector 8, which looks like a
/// double fault.
pub fn disable_legacy_pic() {
    use super::cpu::outb;
    const PIC_VECTOR_BASE: u8 = 0xf0;
    for (command, data, base, cascade) in [
        (0x20, 0x21, PIC_VECTOR_BASE, 4),
        (0xa0, 0xa1, PIC_VECTOR_BASE + 8, 2),
    ] {
        outb(command, 0x11); // ICW1: initialise, ICW4 follows
        outb(data, base); // ICW2: vector base
        outb(data, cascade); // ICW3: cascade wiring
        outb(data, 0x01); // ICW4: 8086 mode
        outb(data, 0xff); // mask every line
    }
}

/// What `init` found.
pub struct ApicInfo {
    /// x2APIC (MSR) rather than xAPIC (MMIO).
    pub x2apic: bool,
    /// Timer ticks (bus clock / 16) per millisecond.
    pub ticks_per_ms: u64,
}

/// Why the APIC timer is unavailable.
#[derive(Debug)]
pub enum ApicError {
    /// CPUID reports no local APIC.
    NoApic,
    /// The APIC page could not be mapped.
    MapFailed,
    /// The timer did not count during calibration.
    TimerStopped,
}

/// Enables the local APIC and calibrates its timer against the TSC clock.
/// `map_mmio` maps the xAPIC page uncached.
pub fn init(map_mmio: impl FnOnce(u64) -> Option<u64>) -> Result<ApicInfo, ApicError> {
    let (_, _, ecx, edx) = cpuid(1);
    if edx & (1 << 9) == 0 {
        return Err(ApicError::NoApic);
    }
    let x2apic = ecx & (1 << 21) != 0;
    let base = rdmsr(IA32_APIC_BASE);
    if x2apic {
        // SAFETY: CPUID reports x2APIC; enabling it keeps the APIC's state.
        unsafe { wrmsr(IA32_APIC_BASE, base | APIC_GLOBAL_ENABLE | X2APIC_ENABLE) };
        MODE.store(MODE_X2APIC, Ordering::Relaxed);
    } else {
        let mmio = map_mmio(base & 0x000f_ffff_ffff_f000).ok_or(ApicError::MapFailed)?;
        MMIO_BASE.store(mmio, Ordering::Relaxed);
        // SAFETY: CPUID reports an APIC; this only sets its global enable.
        unsafe { wrmsr(IA32_APIC_BASE, base | APIC_GLOBAL_ENABLE) };
        MODE.store(MODE_XAPIC, Ordering::Relaxed);
    }
    write(REG_TPR, 0);
    write(REG_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));

    write(REG_TIMER_INITIAL, u32::MAX);
    clock::spin_for(10_000_000);
    let counted = u32::MAX - read(REG_TIMER_CURRENT);
    write(REG_TIMER_INITIAL, 0);
    if counted == 0 {
        return Err(ApicError::TimerStopped);
    }
    let ticks_per_ms = u64::from(counted) / 10;
    TICKS_PER_MS.store(ticks_per_ms.max(1), Ordering::Relaxed);
    set_handler(TIMER_VECTOR, on_timer);
    Ok(ApicInfo {
        x2apic,
        ticks_per_ms,
    })
}

fn on_timer() {
    TIMER_FIRED.fetch_add(1, Ordering::Relaxed);
}

/// Number of timer interrupts taken so far.
pub fn timer_interrupts() -> u64 {
    TIMER_FIRED.load(Ordering::Relaxed)
}

/// Arms a one-shot timer interrupt `ns` from now (clamped to the counter's range).
pub fn arm_oneshot(ns: u64) {
    let ticks = (u128::from(ns) * u128::from(TICKS_PER_MS.load(Ordering::Relaxed)) / 1_000_000)
        .clamp(1, u128::from(u32::MAX));
    write(REG_LVT_TIMER, u32::from(TIMER_VECTOR));
    write(REG_TIMER_INITIAL, ticks as u32);
}

/// Sleeps at least `ns`, halting between timer interrupts.
pub fn sleep(ns: u64) {
    let deadline = clock::now_ns() + ns;
    loop {
        let now = clock::now_ns();
        if now >= deadline {
            return;
        }
        halt_until_interrupt(deadline - now);
    }
}

/// Halts until an interrupt: an event, or the timer after at most `max_ns`.
pub fn halt_until_interrupt(max_ns: u64) {
    arm_oneshot(max_ns);
    // sti;hlt back to back: an interrupt pending now wakes the hlt.
    x86_64::instructions::interrupts::enable_and_hlt();
    x86_64::instructions::interrupts::disable();
}

/// Signals end of interrupt.
pub fn end_of_interrupt() {
    if MODE.load(Ordering::Relaxed) != 0 {
        write(REG_EOI, 0);
    }
}

//! Monotonic clock from the TSC, calibrated against the PIT (channel 2,
//! gated through port 0x61, so no interrupt is needed).

use super::cpu::{inb, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

const PIT_HZ: u64 = 1_193_182;
/// 10 ms of PIT ticks.
const PIT_LATCH: u64 = PIT_HZ / 100;

/// Records the boot TSC; timestamps count from here.
pub fn mark_boot() {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
}

/// Why the clock could not be calibrated.
#[derive(Debug)]
pub enum ClockError {
    /// The PIT never counted down (no PIT on this platform).
    NoPit,
}

/// Measures the TSC frequency; returns it in Hz.
pub fn calibrate() -> Result<u64, ClockError> {
    // Best of three: a preempted measurement (the host is shared) only
    // ever reads long.
    let mut best = u64::MAX;
    for _ in 0..3 {
        best = best.min(pit_window_cycles()?);
    }
    let hz = best * PIT_HZ / PIT_LATCH;
    TSC_HZ.store(hz, Ordering::Relaxed);
    Ok(hz)
}

/// TSC cycles during one PIT_LATCH countdown.
fn pit_window_cycles() -> Result<u64, ClockError> {
    // Gate on, speaker off; channel 2, lobyte/hibyte, mode 0.
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, PIT_LATCH as u8);
    outb(0x42, (PIT_LATCH >> 8) as u8);
    let start = rdtsc();
    // Output goes high at terminal count. Give up after ~a second of a
    // 10 GHz TSC so a platform without a PIT cannot hang the boot.
    while inb(0x61) & 0x20 == 0 {
        if rdtsc() - start > 10_000_000_000 {
            return Err(ClockError::NoPit);
        }
    }
    Ok(rdtsc() - start)
}

/// Takes the TSC frequency from a trusted source (the hypervisor); returns it.
pub fn set_tsc_hz(hz: u64) -> u64 {
    TSC_HZ.store(hz, Ordering::Relaxed);
    hz
}

/// TSC frequency in Hz, 0 before calibration.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Nanoseconds since boot (0 before calibration).
pub fn now_ns() -> u64 {
    let hz = tsc_hz();
    if hz == 0 {
        return 0;
    }
    let cycles = rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed));
    (u128::from(cycles) * 1_000_000_000 / u128::from(hz)) as u64
}

/// Busy-waits `ns` nanoseconds on the TSC.
pub fn spin_for(ns: u64) {
    let end = now_ns() + ns;
    while now_ns() < end {
        core::hint::spin_loop();
    }
}

//! x86-64: descriptor tables, interrupt entry, local APIC, TSC clock, and
//! the ways out of the machine.

pub mod apic;
pub mod clock;
pub mod cpu;
mod gdt;

pub use gdt::ist_guard_pages;
pub mod interrupts;

/// Loads the GDT/TSS and the IDT: from here on every fault is reported.
pub fn init_cpu() {
    gdt::init();
    interrupts::init();
    apic::disable_legacy_pic();
}

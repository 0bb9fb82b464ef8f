//! x86-64: descriptor tables, interrupt entry, local APIC, TSC clock,
//! paging (the table format, host-tested in the kernel's lib, and the MMU),
//! the C memory functions, and the ways out of the machine.

pub mod apic;
pub mod clock;
pub mod cpu;
mod gdt;

pub use gdt::ist_guard_pages;
pub mod interrupts;
mod mem;
pub mod mmu;
pub use kernel::paging;

/// Loads the GDT/TSS and the IDT: from here on every fault is reported.
pub fn init_cpu() {
    gdt::init();
    interrupts::init();
    apic::disable_legacy_pic();
}

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

/// A digest of what the CPU needs to take an exception (IDT, GDT, TSS and
/// its IST pointers). These never change after `init_cpu`; a different
/// digest later means something wrote over them, and the next exception
/// or interrupt would triple-fault with no report.
pub fn descriptor_tables_digest() -> u64 {
    let mut digest = 0xcbf2_9ce4_8422_2325_u64;
    for bytes in [interrupts::idt_bytes(), gdt::gdt_bytes(), gdt::tss_bytes()] {
        for &b in bytes {
            digest = (digest ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    digest
}

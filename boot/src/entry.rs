//! The two ways in: the PVH entry (Xen's ELF note; Xen or QEMU start it
//! with `%ebx` = the `hvm_start_info` block) and the multiboot2 entry (the
//! header GRUB looks for; it starts it with `%eax` = the multiboot2 magic
//! and `%ebx` = the information block), both in 32-bit protected mode with
//! paging off. They share the stub that turns on long mode, NX, write
//! protection and SSE with identity page tables for the first 4 GiB, then
//! calls `stordom_main(start_info_paddr, multiboot2_paddr)` in 64-bit mode
//! (the one the loader did not give is 0).
//!
//! Only boot-time state lives here: the kernel replaces these page tables
//! and this GDT as soon as it knows the memory map.

// XEN_ELFNOTE_PHYS32_ENTRY (18). QEMU reads an 8-byte value for a 64-bit
// ELF, and the note must be 4-aligned or QEMU reads the wrong bytes.
core::arch::global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_entry32
    .balign 4
    .popsection
    "#,
    options(att_syntax)
);

// The multiboot2 header (Multiboot2 Specification 3.1): i386
// architecture, an entry address tag naming the 32-bit entry, and no
// request for EFI boot services, so a loader on EFI exits them first. The
// linker puts it first in the image, inside the first 32 KiB of the file
// where loaders look for it.
core::arch::global_asm!(
    r#"
    .pushsection .multiboot2, "a"
    .balign 8
mb2_header:
    .long 0xe85250d6
    .long 0
    .long mb2_header_end - mb2_header
    .long -(0xe85250d6 + (mb2_header_end - mb2_header))
    .balign 8
    .word 3
    .word 0
    .long 12
    .long mb2_entry32
    .balign 8
    .word 0
    .word 0
    .long 8
mb2_header_end:
    .popsection
    "#,
    options(att_syntax)
);

// The stubs. Register use: %ebx = the loader's block on entry (saved
// first); %eax = the multiboot2 magic for the multiboot2 entry.
core::arch::global_asm!(
    r#"
    .pushsection .text.entry, "ax"
    .code32
    .global pvh_entry32
pvh_entry32:
    cli
    cld
    movl %ebx, boot_start_info_paddr
    jmp entry32_common

    .global mb2_entry32
mb2_entry32:
    cli
    cld
    cmpl $0x36d76289, %eax
    jne no_long_mode
    movl %ebx, boot_multiboot2_paddr

entry32_common:
    movl $boot_stack_top, %esp

    /* Long mode is required; NX is used when the CPU has it. */
    movl $0x80000001, %eax
    cpuid
    testl $(1 << 29), %edx
    jz no_long_mode
    xorl %esi, %esi
    testl $(1 << 20), %edx
    jz 1f
    movl $(1 << 11), %esi
    movl $1, boot_nx_enabled
1:
    /* PML4[0] -> PDPT, PDPT[0..4] -> four PDs of 2 MiB pages = 4 GiB. */
    movl $early_pdpt, %eax
    orl $0x3, %eax
    movl %eax, early_pml4
    movl $0, early_pml4 + 4
    xorl %ecx, %ecx
    movl $early_pd, %eax
    orl $0x3, %eax
2:
    movl %eax, early_pdpt(, %ecx, 8)
    movl $0, early_pdpt + 4(, %ecx, 8)
    addl $0x1000, %eax
    incl %ecx
    cmpl $4, %ecx
    jb 2b
    xorl %ecx, %ecx
3:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, early_pd(, %ecx, 8)
    movl $0, early_pd + 4(, %ecx, 8)
    incl %ecx
    cmpl $2048, %ecx
    jb 3b

    /* CR4: PAE, OSFXSR, OSXMMEXCPT (the precompiled core uses SSE). */
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4
    movl $early_pml4, %eax
    movl %eax, %cr3
    /* EFER: LME, and NXE when supported. */
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    orl %esi, %eax
    wrmsr
    /* CR0: PG, WP, MP, PE on; EM and TS off. */
    movl %cr0, %eax
    andl $~((1 << 2) | (1 << 3)), %eax
    orl $((1 << 31) | (1 << 16) | (1 << 1) | 1), %eax
    movl %eax, %cr0
    lgdt early_gdt_ptr
    ljmp $0x08, $entry64

no_long_mode:
    hlt
    jmp no_long_mode

    .code64
entry64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl boot_start_info_paddr, %edi
    movl boot_multiboot2_paddr, %esi
    call stordom_main
    ud2
    .popsection

    .pushsection .rodata.early_gdt, "a"
    .balign 8
early_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
early_gdt_end:
early_gdt_ptr:
    .word early_gdt_end - early_gdt - 1
    .long early_gdt
    .popsection

    .pushsection .data.boot, "aw"
    .balign 4
    .global boot_start_info_paddr
boot_start_info_paddr:
    .long 0
boot_multiboot2_paddr:
    .long 0
    .global boot_nx_enabled
boot_nx_enabled:
    .long 0
    .popsection

    .pushsection .bss.boot, "aw", @nobits
    .balign 4096
early_pml4:
    .skip 4096
early_pdpt:
    .skip 4096
early_pd:
    .skip 4 * 4096
    /* An unmapped page under the boot stack turns an overflow into a fault. */
    .global boot_stack_guard
boot_stack_guard:
    .skip 4096
boot_stack:
    .skip 128 * 1024
    .global boot_stack_top
boot_stack_top:
    .popsection
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    static boot_nx_enabled: u32;
    static boot_stack_guard: u8;
    static boot_stack_top: u8;
}

/// Whether the entry stub turned on EFER.NXE (the CPU has NX).
pub fn nx_enabled() -> bool {
    // SAFETY: written once by the entry stub before any Rust code runs and
    // never again; reading a u32 static is a plain aligned load.
    unsafe { core::ptr::addr_of!(boot_nx_enabled).read_volatile() != 0 }
}

/// Address one past the boot stack (its initial stack pointer).
pub fn stack_top() -> u64 {
    core::ptr::addr_of!(boot_stack_top) as u64
}

/// Physical address of the guard page under the boot stack (identity mapped).
pub fn stack_guard_page() -> u64 {
    core::ptr::addr_of!(boot_stack_guard) as u64
}

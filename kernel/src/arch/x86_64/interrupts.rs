//! The IDT, one uniform entry stub per vector, and dispatch.
//!
//! Every stub pushes (error code or 0, vector) and jumps to a common path
//! that saves all registers and the FPU/SSE state (Rust code may use SSE)
//! before calling [`interrupt_dispatch`]. Exceptions are fatal: they print
//! what happened and leave the machine with a failure status.

use super::gdt::{
    self, IST_DOUBLE_FAULT, IST_EXCEPTION, IST_INTERRUPT, IST_MACHINE_CHECK, IST_NMI,
};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};
use x86_64::VirtAddr;
use x86_64::structures::DescriptorTablePointer;

/// First vector that is not a CPU exception.
pub const FIRST_INTERRUPT_VECTOR: u8 = 32;
/// Vector the local APIC reports spurious interrupts on.
pub const SPURIOUS_VECTOR: u8 = 0xff;
const STUB_SIZE: usize = 16;

// Vectors 8, 10-14, 17, 21, 29, 30 have a CPU-pushed error code; the others
// get a 0 so the frame layout is the same for all. Each stub is padded to
// STUB_SIZE bytes so stub N is at interrupt_stubs + N * STUB_SIZE.
core::arch::global_asm!(
    r#"
    .pushsection .text.interrupts, "ax"
    .balign 16
    .global interrupt_stubs
interrupt_stubs:
    vector = 0
    .rept 256
    .balign 16
    .if (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    pushq $0
    .endif
    pushq $vector
    jmp interrupt_common
    vector = vector + 1
    .endr

interrupt_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    movq %rsp, %rbx
    andq $-16, %rsp
    subq $512, %rsp
    fxsave64 (%rsp)
    cld
    call interrupt_dispatch
    fxrstor64 (%rsp)
    movq %rbx, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
    .popsection
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    static interrupt_stubs: u8;
}

/// What the entry path saved, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct InterruptFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const EMPTY: Self = Self {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    /// A present, DPL 0, 64-bit interrupt gate (IF cleared on entry).
    fn new(handler: u64, selector: u16, ist: u8) -> Self {
        Self {
            offset_low: handler as u16,
            selector,
            ist,
            type_attr: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[Gate; 256]>);

// SAFETY: written only by `init`, once, on the boot CPU before interrupts
// are enabled; afterwards only the CPU reads it.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([Gate::EMPTY; 256]));

fn ist_for(vector: u8) -> u8 {
    match vector {
        2 => IST_NMI,
        8 => IST_DOUBLE_FAULT,
        18 => IST_MACHINE_CHECK,
        v if v < FIRST_INTERRUPT_VECTOR => IST_EXCEPTION,
        _ => IST_INTERRUPT,
    }
}

pub fn init() {
    let stubs = core::ptr::addr_of!(interrupt_stubs) as u64;
    let selector = gdt::code_selector();
    // SAFETY: interrupts are off and this runs once on the only CPU, so
    // nothing else reads or writes the IDT while it is filled.
    let idt = unsafe { &mut *IDT.0.get() };
    for (vector, gate) in idt.iter_mut().enumerate() {
        *gate = Gate::new(
            stubs + (vector * STUB_SIZE) as u64,
            selector,
            ist_for(vector as u8),
        );
    }
    let pointer = DescriptorTablePointer {
        limit: (size_of::<[Gate; 256]>() - 1) as u16,
        base: VirtAddr::new(IDT.0.get() as u64),
    };
    // SAFETY: the IDT is 'static and every gate points at a stub above.
    unsafe { x86_64::instructions::tables::lidt(&pointer) };
}

/// The IDT's bytes, for [`super::descriptor_tables_digest`].
pub(super) fn idt_bytes() -> &'static [u8] {
    // SAFETY: the IDT is written only by `init`, before this is called
    // (the loop that digests it runs long after); reading its bytes is
    // reading plain data.
    unsafe { core::slice::from_raw_parts(IDT.0.get().cast::<u8>(), size_of::<[Gate; 256]>()) }
}

/// Handlers for vectors >= 32, stored as fn pointers (0 = none).
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

/// Installs `handler` for interrupt `vector` (>= 32).
pub fn set_handler(vector: u8, handler: fn()) {
    assert!(
        vector >= FIRST_INTERRUPT_VECTOR,
        "vector {vector} is a CPU exception"
    );
    HANDLERS[vector as usize].store(handler as usize, Ordering::Release);
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range exceeded",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection fault",
    "page fault",
    "reserved",
    "x87 floating-point",
    "alignment check",
    "machine check",
    "SIMD floating-point",
    "virtualisation",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

/// The vector (+1) each IST stack is serving, 0 when free. An entry on a
/// stack already in use has overwritten the frame of the one before it (the
/// CPU starts every IST entry at the top of the stack): that is reported
/// and fatal, never silently resumed.
static IST_IN_USE: [AtomicUsize; gdt::IST_COUNT + 1] =
    [const { AtomicUsize::new(0) }; gdt::IST_COUNT + 1];

#[unsafe(no_mangle)]
extern "C" fn interrupt_dispatch(frame: &mut InterruptFrame) {
    let vector = frame.vector as u8;
    let slot = &IST_IN_USE[usize::from(ist_for(vector))];
    let before = slot.swap(usize::from(vector) + 1, Ordering::AcqRel);
    if before != 0 {
        nested_entry(vector, before - 1);
    }
    if vector < FIRST_INTERRUPT_VECTOR {
        report_exception(frame);
    }
    if vector == SPURIOUS_VECTOR {
        return;
    }
    let handler = HANDLERS[vector as usize].load(Ordering::Acquire);
    if handler == 0 {
        log::warn!("interrupt on vector {vector} with no handler");
    } else {
        // SAFETY: only `set_handler` stores here, and it stores `fn()` pointers.
        let handler: fn() = unsafe { core::mem::transmute::<usize, fn()>(handler) };
        handler();
    }
    super::apic::end_of_interrupt();
    slot.store(0, Ordering::Release);
}

/// A second entry on an IST stack in use: print what collided and stop.
fn nested_entry(vector: u8, interrupted: usize) -> ! {
    static REPORTED: AtomicUsize = AtomicUsize::new(0);
    if REPORTED.fetch_add(1, Ordering::AcqRel) == 0 {
        crate::console::fatal(format_args!(
            "FATAL: vector {vector} entered its IST stack while vector {interrupted} was using it\n"
        ));
    }
    crate::power::exit(super::cpu::ExitStatus::Failure)
}

fn report_exception(frame: &InterruptFrame) -> ! {
    use crate::console::fatal;
    let vector = frame.vector as usize;
    fatal(format_args!(
        "FATAL: exception {vector} ({}) error code {:#x}\n  RIP {:#018x}  CS {:#x}  RFLAGS {:#x}\n  RSP {:#018x}  SS {:#x}  CR2 {:#018x}\n  RAX {:#018x} RBX {:#018x} RCX {:#018x} RDX {:#018x}\n  RSI {:#018x} RDI {:#018x} RBP {:#018x} R8  {:#018x}\n  R9  {:#018x} R10 {:#018x} R11 {:#018x} R12 {:#018x}\n  R13 {:#018x} R14 {:#018x} R15 {:#018x}\n",
        EXCEPTION_NAMES[vector],
        frame.error_code,
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        frame.ss,
        x86_64::registers::control::Cr2::read_raw(),
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp,
        frame.r8,
        frame.r9,
        frame.r10,
        frame.r11,
        frame.r12,
        frame.r13,
        frame.r14,
        frame.r15,
    ));
    crate::console::stack_dump(frame.rsp);
    crate::restart::after_fatal(
        "fault",
        format_args!(
            "exception {vector} ({}) at RIP {:#x}",
            EXCEPTION_NAMES[vector], frame.rip
        ),
    )
}

/// Every IST stack is free again: an in-place restart abandoned the
/// handler that was using one (it never returns).
pub fn release_ist_stacks() {
    for slot in &IST_IN_USE {
        slot.store(0, Ordering::Release);
    }
}

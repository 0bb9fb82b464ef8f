//! GDT with a TSS whose IST stacks carry every interrupt and exception.
//!
//! Every vector runs on an IST stack so an interrupt never writes into the
//! red zone of the code it interrupts (the precompiled `core` uses one).
//! Exceptions and interrupts get separate stacks, so a fault inside an
//! interrupt handler does not overwrite the handler's frame.

use core::cell::UnsafeCell;
use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;

/// IST slots (1-based, as the IDT encodes them).
pub const IST_INTERRUPT: u8 = 1;
pub const IST_EXCEPTION: u8 = 2;
pub const IST_DOUBLE_FAULT: u8 = 3;
pub const IST_NMI: u8 = 4;
pub const IST_MACHINE_CHECK: u8 = 5;
/// Number of IST slots in use.
pub const IST_COUNT: usize = 5;
const IST_SIZE: usize = 32 * 1024;
const GUARD_SIZE: usize = 4096;

/// One IST stack with an unmapped guard page under it (unmapped by
/// `memory::init`): an overflow faults instead of running into the next
/// stack.
#[repr(C, align(4096))]
struct IstStack {
    guard: [u8; GUARD_SIZE],
    stack: [u8; IST_SIZE],
}

#[repr(C)]
struct IstStacks(UnsafeCell<[IstStack; IST_COUNT]>);

// SAFETY: the stacks are only ever used by the CPU through the TSS; Rust
// code takes nothing but their addresses.
unsafe impl Sync for IstStacks {}

static IST_STACKS: IstStacks = IstStacks(UnsafeCell::new(
    [const {
        IstStack {
            guard: [0; GUARD_SIZE],
            stack: [0; IST_SIZE],
        }
    }; IST_COUNT],
));

/// The guard page under each IST stack, to be unmapped.
pub fn ist_guard_pages() -> [u64; IST_COUNT] {
    let base = IST_STACKS.0.get() as u64;
    core::array::from_fn(|i| base + (i * size_of::<IstStack>()) as u64)
}

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(
    GlobalDescriptorTable,
    SegmentSelector,
    SegmentSelector,
    SegmentSelector,
)> = Once::new();

/// Kernel code selector, for IDT gates.
pub fn code_selector() -> u16 {
    GDT.get().map_or(0x08, |g| g.1.0)
}

pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        let mut ist = tss.interrupt_stack_table;
        for (slot, guard) in ist.iter_mut().zip(ist_guard_pages()) {
            // Stacks grow down: the slot holds the top of the stack above
            // the guard.
            *slot = VirtAddr::new(guard + size_of::<IstStack>() as u64);
        }
        tss.interrupt_stack_table = ist;
        tss
    });
    let (gdt, code, data, tss_sel) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        (gdt, code, data, tss_sel)
    });
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, which is 'static;
    // the code and data descriptors are flat 64-bit kernel segments like the
    // boot GDT's, and the TSS descriptor points at a 'static TSS.
    unsafe {
        CS::set_reg(*code);
        SS::set_reg(*data);
        DS::set_reg(*data);
        ES::set_reg(*data);
        load_tss(*tss_sel);
    }
}

/// The GDT's bytes, for [`super::descriptor_tables_digest`] (empty before
/// `init`).
pub(super) fn gdt_bytes() -> &'static [u8] {
    GDT.get().map_or(&[], |(gdt, ..)| {
        let entries = gdt.entries();
        // SAFETY: the 'static GDT built by `init` is plain data, never
        // written again; its entries are viewed as the bytes they are.
        unsafe {
            core::slice::from_raw_parts(
                entries.as_ptr().cast::<u8>(),
                core::mem::size_of_val(entries),
            )
        }
    })
}

/// The TSS's bytes (IST pointers included), for
/// [`super::descriptor_tables_digest`] (empty before `init`).
pub(super) fn tss_bytes() -> &'static [u8] {
    TSS.get().map_or(&[], |tss| {
        // SAFETY: the 'static TSS is plain data, never written after `init`.
        unsafe {
            core::slice::from_raw_parts(
                core::ptr::from_ref(tss).cast::<u8>(),
                size_of::<TaskStateSegment>(),
            )
        }
    })
}

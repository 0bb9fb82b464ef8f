//! A host `Hal` for tests: heap memory as "physical" memory at a fixed
//! offset (so a driver that confuses physical and virtual addresses fails),
//! simulated register windows, a virtual clock, and a hook that steps a
//! simulated device whenever a driver busy-waits.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::boxed::Box;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::rc::Rc;
use std::vec::Vec;

use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::hal::{DmaRegion, Hal, PAGE_SIZE, PhysAddr};
use blockdev::{Completion, IoError, QueuedDevice, Request, Segment};

/// How a simulated register combines a write with its value.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WriteRule {
    /// Ones set bits, zeroes leave them (AHCI command issue, SActive).
    SetBits,
    /// Ones clear bits, zeroes leave them (interrupt and error status).
    ClearBits,
}

std::thread_local! {
    /// Rules by host address; each test runs on its own thread.
    static WRITE_RULES: RefCell<BTreeMap<usize, WriteRule>> = const { RefCell::new(BTreeMap::new()) };
}

/// Gives the register at `phys` a write rule for the rest of the test.
pub(crate) fn set_write_rule(phys: PhysAddr, rule: WriteRule) {
    WRITE_RULES.with(|rules| rules.borrow_mut().insert(virt_of(phys) as usize, rule));
}

/// The value a register at host address `address` holds after `written`
/// is written over `old`.
pub(crate) fn merge_register_write(address: usize, old: u32, written: u32) -> u32 {
    match WRITE_RULES.with(|rules| rules.borrow().get(&address).copied()) {
        None => written,
        Some(WriteRule::SetBits) => old | written,
        Some(WriteRule::ClearBits) => old & !written,
    }
}

/// Physical address = virtual address + this.
pub(crate) const PHYS_OFFSET: u64 = 1 << 48;

/// Virtual time one busy-wait iteration takes.
const RELAX_NS: u64 = 1_000;

#[derive(Default)]
struct Inner {
    /// Live allocations by physical address: (pages, freed by the test itself).
    allocations: RefCell<BTreeMap<PhysAddr, (usize, bool)>>,
    mmio: RefCell<BTreeMap<PhysAddr, usize>>,
    clock: Cell<u64>,
    device: RefCell<Option<Box<dyn FnMut()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The rules name addresses in windows freed below.
        WRITE_RULES.with(|rules| rules.borrow_mut().clear());
        let allocations = core::mem::take(self.allocations.get_mut());
        for (phys, (pages, _)) in allocations {
            free_pages(phys, pages);
        }
        for (phys, len) in core::mem::take(self.mmio.get_mut()) {
            // SAFETY: allocated by `add_mmio` with this layout.
            unsafe { dealloc(virt_of(phys), window_layout(len)) };
        }
    }
}

fn layout(pages: usize) -> Layout {
    Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE).unwrap()
}

/// Register windows are aligned to their power-of-two size, as BARs are.
fn window_layout(len: usize) -> Layout {
    let size = len.max(PAGE_SIZE).next_power_of_two();
    Layout::from_size_align(size, size).unwrap()
}

fn allocate_pages(pages: usize) -> NonNull<u8> {
    // SAFETY: the layout has a non-zero size.
    NonNull::new(unsafe { alloc_zeroed(layout(pages)) }).expect("host out of memory")
}

fn free_pages(phys: PhysAddr, pages: usize) {
    // SAFETY: `phys` names a live allocation of `pages` pages from `allocate_pages`.
    unsafe { dealloc(virt_of(phys), layout(pages)) }
}

/// The host pointer behind a test "physical" address.
pub(crate) fn virt_of(phys: PhysAddr) -> *mut u8 {
    phys.wrapping_sub(PHYS_OFFSET) as usize as *mut u8
}

fn phys_of(virt: NonNull<u8>) -> PhysAddr {
    virt.as_ptr() as usize as u64 + PHYS_OFFSET
}

/// A cheaply cloned handle; clones share memory, clock and device.
#[derive(Clone, Default)]
pub(crate) struct TestHal(Rc<Inner>);

impl TestHal {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Steps `device` whenever a driver busy-waits.
    pub(crate) fn set_device(&self, device: impl FnMut() + 'static) {
        *self.0.device.borrow_mut() = Some(Box::new(device));
    }

    /// Runs the device hook once, as a busy-wait iteration would.
    pub(crate) fn step_device(&self) {
        let hook = self.0.device.borrow_mut().take();
        if let Some(mut hook) = hook {
            hook();
            *self.0.device.borrow_mut() = Some(hook);
        }
    }

    pub(crate) fn advance(&self, ns: u64) {
        self.0.clock.set(self.0.clock.get() + ns);
    }

    /// A zeroed register window for a simulated device; returns its address.
    pub(crate) fn add_mmio(&self, len: usize) -> PhysAddr {
        // SAFETY: the layout has a non-zero size.
        let window =
            NonNull::new(unsafe { alloc_zeroed(window_layout(len)) }).expect("host out of memory");
        let phys = phys_of(window);
        self.0.mmio.borrow_mut().insert(phys, len);
        phys
    }

    /// DMA memory owned by the test (not counted as a driver allocation).
    pub(crate) fn dma_buffer(&self, pages: usize) -> DmaRegion {
        let virt = allocate_pages(pages);
        let phys = phys_of(virt);
        self.0.allocations.borrow_mut().insert(phys, (pages, true));
        DmaRegion { phys, virt, pages }
    }

    /// A test buffer filled with a pattern that depends on `seed`.
    pub(crate) fn buffer_with_pattern(&self, pages: usize, seed: u8) -> DmaRegion {
        let buffer = self.dma_buffer(pages);
        let bytes: Vec<u8> = (0..buffer.len())
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect();
        self.write_bytes(buffer.phys, &bytes);
        buffer
    }

    pub(crate) fn bytes(&self, phys: PhysAddr, len: usize) -> Vec<u8> {
        // SAFETY: tests only name memory they allocated through this Hal.
        unsafe { std::slice::from_raw_parts(virt_of(phys), len).to_vec() }
    }

    pub(crate) fn write_bytes(&self, phys: PhysAddr, bytes: &[u8]) {
        // SAFETY: tests only name memory they allocated through this Hal.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), virt_of(phys), bytes.len()) }
    }

    /// DMA allocations a driver made and has not freed.
    pub(crate) fn driver_allocations(&self) -> usize {
        self.0
            .allocations
            .borrow()
            .values()
            .filter(|(_, by_test)| !by_test)
            .count()
    }
}

// SAFETY: memory comes zeroed and page aligned from the host allocator and
// stays allocated until freed; "physical" addresses are a fixed offset from
// it; the register windows are host memory the simulated device shares;
// the clock only moves forward.
unsafe impl Hal for TestHal {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        let virt = allocate_pages(pages);
        let phys = phys_of(virt);
        self.0.allocations.borrow_mut().insert(phys, (pages, false));
        Some(DmaRegion { phys, virt, pages })
    }

    unsafe fn dma_free(&self, region: DmaRegion) {
        let entry = self.0.allocations.borrow_mut().remove(&region.phys);
        assert_eq!(
            entry,
            Some((region.pages, false)),
            "freeing memory that was not allocated"
        );
        free_pages(region.phys, region.pages);
    }

    fn phys_to_virt(&self, phys: PhysAddr, len: usize) -> Option<NonNull<u8>> {
        let allocations = self.0.allocations.borrow();
        let (&start, &(pages, _)) = allocations.range(..=phys).next_back()?;
        let end = phys.checked_add(len as u64)?;
        (end <= start + (pages * PAGE_SIZE) as u64).then(|| NonNull::new(virt_of(phys)))?
    }

    fn virt_to_phys(&self, virt: NonNull<u8>) -> Option<PhysAddr> {
        // All host memory (stacks too) is "RAM" at the fixed offset.
        Some(phys_of(virt))
    }

    unsafe fn map_mmio(&self, phys: PhysAddr, len: usize) -> Option<NonNull<u8>> {
        let window = *self.0.mmio.borrow().get(&phys)?;
        (len <= window).then(|| NonNull::new(virt_of(phys)))?
    }

    fn now_ns(&self) -> u64 {
        self.0.clock.get()
    }

    fn relax(&self) {
        self.advance(RELAX_NS);
        self.step_device();
    }
}

/// Polls `queue` (stepping the simulated device between tries) until one
/// completion arrives.
pub(crate) fn poll_one(hal: &TestHal, device: &mut impl QueuedDevice, queue: u16) -> Completion {
    let mut out = [Completion::default(); 1];
    for _ in 0..1000 {
        if device.poll(queue, &mut out) == 1 {
            return out[0];
        }
        hal.relax();
    }
    panic!("no completion on queue {queue}");
}

/// Submits `request` on `queue` and polls until it completes; checks the
/// tag and returns the result.
pub(crate) fn run_one(
    hal: &TestHal,
    device: &mut impl QueuedDevice,
    queue: u16,
    tag: u64,
    request: Request<'_>,
) -> Result<(), IoError> {
    device.submit(queue, tag, request).unwrap();
    let completion = poll_one(hal, device, queue);
    assert_eq!(completion.tag, tag);
    completion.result
}

pub(crate) fn read_request(lba: u64, segments: &[Segment]) -> Request<'_> {
    Request::Read { lba, segments }
}

pub(crate) fn write_request(lba: u64, segments: &[Segment]) -> Request<'_> {
    Request::Write { lba, segments }
}

pub(crate) fn segment(phys: PhysAddr, len: u32) -> Segment {
    Segment { phys, len }
}

/// What a simulated device reads from "physical" memory.
pub(crate) fn read_phys<T: FromBytes>(phys: PhysAddr) -> T {
    let mut bytes = std::vec![0u8; core::mem::size_of::<T>()];
    // SAFETY: drivers only hand devices memory from the test Hal.
    unsafe { std::ptr::copy_nonoverlapping(virt_of(phys), bytes.as_mut_ptr(), bytes.len()) };
    T::read_from_bytes(&bytes).expect("sized read")
}

/// What a simulated device writes to "physical" memory.
pub(crate) fn write_phys<T: IntoBytes + Immutable + ?Sized>(phys: PhysAddr, value: &T) {
    let bytes = value.as_bytes();
    // SAFETY: drivers only hand devices memory from the test Hal.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), virt_of(phys), bytes.len()) };
}

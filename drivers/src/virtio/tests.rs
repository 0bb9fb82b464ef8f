//! The virtio-blk adapter against a simulated device behind a fake
//! transport that executes the split virtqueue on notification.

use std::cell::RefCell;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error as VirtioError, PhysAddr as VirtioPhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::*;
use crate::hal::PhysAddr;
use crate::testing::{
    TestHal, read_phys, read_request, run_one, segment, virt_of, write_phys, write_request,
};

std::thread_local! {
    static CURRENT_HAL: RefCell<Option<TestHal>> = const { RefCell::new(None) };
}

/// The test `Hal` as a `Default` type, as the virtio adapter needs: each
/// default is a handle to this thread's `TestHal`.
#[derive(Clone)]
struct ThreadHal(TestHal);

impl Default for ThreadHal {
    fn default() -> Self {
        Self(
            CURRENT_HAL
                .with(|hal| hal.borrow().clone())
                .expect("no test Hal on this thread"),
        )
    }
}

// SAFETY: forwards to `TestHal`.
unsafe impl Hal for ThreadHal {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        self.0.dma_alloc(pages)
    }

    unsafe fn dma_free(&self, region: DmaRegion) {
        // SAFETY: forwarded contract.
        unsafe { self.0.dma_free(region) }
    }

    fn phys_to_virt(&self, phys: PhysAddr, len: usize) -> Option<NonNull<u8>> {
        self.0.phys_to_virt(phys, len)
    }

    fn virt_to_phys(&self, virt: NonNull<u8>) -> Option<PhysAddr> {
        self.0.virt_to_phys(virt)
    }

    unsafe fn map_mmio(&self, phys: PhysAddr, len: usize) -> Option<NonNull<u8>> {
        // SAFETY: forwarded contract.
        unsafe { self.0.map_mmio(phys, len) }
    }

    fn now_ns(&self) -> u64 {
        self.0.now_ns()
    }
}

const FEATURE_FLUSH: u64 = 1 << 9;
const FEATURE_VERSION_1: u64 = 1 << 32;
const DESCRIPTOR_NEXT: u16 = 1;
const REQUEST_IN: u32 = 0;
const REQUEST_OUT: u32 = 1;
const REQUEST_FLUSH: u32 = 4;
const STATUS_OK: u8 = 0;
const STATUS_IO_ERROR: u8 = 1;
const STATUS_UNSUPPORTED: u8 = 2;

#[derive(Clone, Copy)]
struct Queue {
    size: u16,
    descriptors: u64,
    available: u64,
    used: u64,
}

#[derive(Default)]
struct FakeDisk {
    data: Vec<u8>,
    status: DeviceStatus,
    queue: Option<Queue>,
    next_available: u16,
    /// Leave reads and writes in the queue until `run` is called.
    defer: bool,
    fail_next: bool,
    flushes: usize,
}

impl FakeDisk {
    /// Executes available requests (in defer mode only flushes, which the
    /// driver sends alone).
    fn run(&mut self, include_data: bool) {
        let Some(queue) = self.queue else { return };
        while self.next_available != read_phys::<u16>(queue.available + 2) {
            let slot = u64::from(self.next_available % queue.size);
            let head: u16 = read_phys(queue.available + 4 + 2 * slot);
            let mut chain = Vec::new();
            let mut index = head;
            loop {
                let at = queue.descriptors + 16 * u64::from(index);
                let (address, len, flags, next) = (
                    read_phys::<u64>(at),
                    read_phys::<u32>(at + 8),
                    read_phys::<u16>(at + 12),
                    read_phys::<u16>(at + 14),
                );
                chain.push((address, len as usize));
                if flags & DESCRIPTOR_NEXT == 0 {
                    break;
                }
                index = next;
            }
            let kind: u32 = read_phys(chain[0].0);
            if kind != REQUEST_FLUSH && !include_data {
                return;
            }
            let sector: u64 = read_phys(chain[0].0 + 8);
            let (status_address, _) = *chain.last().unwrap();
            let status = self.execute(kind, sector, &chain[1..chain.len() - 1]);
            write_phys(status_address, &status);
            let used_index: u16 = read_phys(queue.used + 2);
            let entry = queue.used + 4 + 8 * u64::from(used_index % queue.size);
            write_phys(entry, &u32::from(head));
            write_phys(entry + 4, &1u32);
            write_phys(queue.used + 2, &used_index.wrapping_add(1));
            self.next_available = self.next_available.wrapping_add(1);
        }
    }

    fn execute(&mut self, kind: u32, sector: u64, buffers: &[(u64, usize)]) -> u8 {
        let mut at = sector as usize * 512;
        let len: usize = buffers.iter().map(|b| b.1).sum();
        match kind {
            REQUEST_FLUSH => {
                self.flushes += 1;
                return STATUS_OK;
            }
            REQUEST_IN | REQUEST_OUT
                if at + len <= self.data.len() && !std::mem::take(&mut self.fail_next) => {}
            REQUEST_IN | REQUEST_OUT => return STATUS_IO_ERROR,
            _ => return STATUS_UNSUPPORTED,
        }
        for &(address, len) in buffers {
            let disk = &mut self.data[at..at + len];
            // SAFETY: the driver only names memory from the test Hal.
            unsafe {
                if kind == REQUEST_IN {
                    std::ptr::copy_nonoverlapping(disk.as_ptr(), virt_of(address), len);
                } else {
                    std::ptr::copy_nonoverlapping(virt_of(address), disk.as_mut_ptr(), len);
                }
            }
            at += len;
        }
        STATUS_OK
    }
}

struct FakeTransport(Rc<RefCell<FakeDisk>>);

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }

    fn read_device_features(&mut self) -> u64 {
        FEATURE_FLUSH | FEATURE_VERSION_1
    }

    fn write_driver_features(&mut self, features: u64) {
        assert_eq!(features, FEATURE_FLUSH | FEATURE_VERSION_1);
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        16
    }

    fn notify(&mut self, _queue: u16) {
        let mut disk = self.0.borrow_mut();
        let include_data = !disk.defer;
        disk.run(include_data);
    }

    fn get_status(&self) -> DeviceStatus {
        self.0.borrow().status
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.0.borrow_mut().status = status;
    }

    fn set_guest_page_size(&mut self, _size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        _queue: u16,
        size: u32,
        descriptors: VirtioPhysAddr,
        driver_area: VirtioPhysAddr,
        device_area: VirtioPhysAddr,
    ) {
        self.0.borrow_mut().queue = Some(Queue {
            size: size as u16,
            descriptors,
            available: driver_area,
            used: device_area,
        });
    }

    fn queue_unset(&mut self, _queue: u16) {
        self.0.borrow_mut().queue = None;
    }

    fn queue_used(&mut self, _queue: u16) -> bool {
        self.0.borrow().queue.is_some()
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        0
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, VirtioError> {
        let mut config = [0u8; 64];
        config[..8].copy_from_slice(&((self.0.borrow().data.len() / 512) as u64).to_le_bytes());
        T::read_from_prefix(&config[offset..])
            .map(|(value, _)| value)
            .map_err(|_| VirtioError::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> Result<(), VirtioError> {
        Err(VirtioError::Unsupported)
    }
}

struct Setup {
    hal: TestHal,
    disk: Rc<RefCell<FakeDisk>>,
}

impl Setup {
    fn new() -> (Self, VirtioBlock<ThreadHal, FakeTransport>) {
        let hal = TestHal::new();
        CURRENT_HAL.with(|current| *current.borrow_mut() = Some(hal.clone()));
        let disk = Rc::new(RefCell::new(FakeDisk {
            data: vec![0; 4096 * 512],
            ..FakeDisk::default()
        }));
        let device = VirtioBlock::new(ThreadHal::default(), FakeTransport(disk.clone())).unwrap();
        (Self { hal, disk }, device)
    }
}

#[test]
fn scattered_write_then_read_back() {
    let (setup, mut device) = Setup::new();
    assert_eq!(device.geometry().blocks, 4096);
    let source = setup.hal.buffer_with_pattern(3, 4);
    let segments = [
        segment(source.phys + 512, 1024),
        segment(source.phys + 8192, 4096),
    ];
    assert_eq!(
        run_one(&setup.hal, &mut device, 0, 1, write_request(7, &segments)),
        Ok(())
    );
    let mut expected = setup.hal.bytes(source.phys + 512, 1024);
    expected.extend(setup.hal.bytes(source.phys + 8192, 4096));
    assert_eq!(
        setup.disk.borrow().data[7 * 512..7 * 512 + 5120],
        expected[..]
    );
    let target = setup.hal.dma_buffer(2);
    let read = [segment(target.phys, 5120)];
    assert_eq!(
        run_one(&setup.hal, &mut device, 0, 2, read_request(7, &read)),
        Ok(())
    );
    assert_eq!(setup.hal.bytes(target.phys, 5120), expected);
}

#[test]
fn flush_waits_for_requests_in_flight() {
    let (setup, mut device) = Setup::new();
    setup.disk.borrow_mut().defer = true;
    let buffer = setup.hal.dma_buffer(1);
    let segments = [segment(buffer.phys, 512)];
    device.submit(0, 1, write_request(0, &segments)).unwrap();
    device.submit(0, 2, Request::Flush).unwrap();
    assert_eq!(
        device.submit(0, 3, Request::Flush),
        Err(SubmitError::QueueFull)
    );
    let mut out = [Completion::default(); 4];
    assert_eq!(device.poll(0, &mut out), 0);
    assert_eq!(setup.disk.borrow().flushes, 0, "the flush is held back");
    setup.disk.borrow_mut().run(true);
    assert_eq!(device.poll(0, &mut out), 2);
    assert_eq!(out[..2].iter().map(|c| c.tag).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(setup.disk.borrow().flushes, 1);
}

#[test]
fn limits_and_errors() {
    let (setup, mut device) = Setup::new();
    let buffer = setup.hal.dma_buffer(2);
    assert_eq!(
        device.submit(0, 1, Request::Discard { lba: 0, blocks: 1 }),
        Err(SubmitError::Unsupported)
    );
    let split = [segment(buffer.phys, 256), segment(buffer.phys + 4096, 256)];
    assert_eq!(
        device.submit(0, 1, read_request(0, &split)),
        Err(SubmitError::Misaligned)
    );
    setup.disk.borrow_mut().fail_next = true;
    let segments = [segment(buffer.phys, 512)];
    assert_eq!(
        run_one(&setup.hal, &mut device, 0, 2, read_request(0, &segments)),
        Err(IoError::Media)
    );

    setup.disk.borrow_mut().defer = true;
    for tag in 0..MAX_PARTS as u64 {
        device.submit(0, tag, read_request(tag, &segments)).unwrap();
    }
    assert_eq!(
        device.submit(0, 9, read_request(0, &segments)),
        Err(SubmitError::QueueFull)
    );
    setup.disk.borrow_mut().run(true);
    let mut out = [Completion::default(); 8];
    assert_eq!(device.poll(0, &mut out), MAX_PARTS);
    drop(device);
    assert_eq!(setup.hal.driver_allocations(), 0);
}

//! Physical memory: the frame allocator over usable RAM, the kernel's own
//! page tables (identity map of all RAM, W^X kernel image, guard page under
//! the boot stack, uncached MMIO on request) and the heap.

use crate::arch::mmu;
use crate::arch::paging::{MapError, PAGE, PageAccess, PageTables, TableMemory};
use boot::start_info::{MemoryType, StartInfo};
use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::frames::{FRAME_SIZE, FrameAllocator};
use kernel::heap_usage::HeapUsage;
use linked_list_allocator::{Heap, LockedHeap};
use spin::Mutex;

unsafe extern "C" {
    static __kernel_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __kernel_end: u8;
}

fn symbol(s: &u8) -> u64 {
    s as *const u8 as u64
}

/// The early page tables from the entry stub map only the first 4 GiB.
const EARLY_MAPPED: u64 = 4 << 30;

static FRAMES: Mutex<FrameAllocator> = Mutex::new(FrameAllocator::new());
static TABLES: Mutex<Option<PageTables<KernelTables>>> = Mutex::new(None);
/// Set once CR3 holds the kernel's tables (all RAM reachable).
static TABLES_LIVE: AtomicBool = AtomicBool::new(false);

/// The frame allocator as it stood when serving began: an in-place
/// restart goes back to it, so every frame the dead instance took (DMA
/// queues, bounce buffers, RAM disks not kept) is free again.
static FRAMES_AT_SERVING: Mutex<Option<FrameAllocator>> = Mutex::new(None);
/// Page-table frames taken since serving began (an MMIO mapping of a
/// device found again after a restart): the tables keep using them, so an
/// in-place restart must not give them back. Bounded: a table wanted
/// beyond it is refused (the mapping fails).
static TABLE_FRAMES_SINCE_SERVING: Mutex<([u64; 64], usize)> = Mutex::new(([0; 64], 0));
/// The heap's memory `(start, bytes)`, for starting it afresh.
static HEAP_MEMORY: Mutex<(u64, u64)> = Mutex::new((0, 0));

#[global_allocator]
static HEAP: CountingHeap = CountingHeap {
    heap: LockedHeap::empty(),
    usage: HeapUsage::new(),
};

/// The kernel's heap, counting what it hands out (see [`heap_usage`]).
struct CountingHeap {
    heap: LockedHeap,
    usage: HeapUsage,
}

// SAFETY: every call goes to the locked heap unchanged; the counters only
// watch. (`realloc` and `alloc_zeroed` keep their default bodies, which
// call `alloc` and `dealloc` here, so they are counted too.)
unsafe impl GlobalAlloc for CountingHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller promised.
        let block = unsafe { self.heap.alloc(layout) };
        if !block.is_null() {
            self.usage.allocated(layout.size());
        }
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY: as the caller promised.
        unsafe { self.heap.dealloc(block, layout) };
        self.usage.freed(layout.size());
    }
}

/// The heap's use, for publishing.
pub fn heap_usage() -> &'static HeapUsage {
    &HEAP.usage
}

/// Page-table frames come from the frame allocator and are reached
/// through the identity map.
struct KernelTables;

// SAFETY: every table is a frame taken from FRAMES (so used for nothing
// else) and addressed through the identity map, which covers all RAM once
// the kernel's tables are live and the first 4 GiB before (alloc_table
// refuses frames above that until then).
unsafe impl TableMemory for KernelTables {
    fn alloc_table(&mut self) -> Option<u64> {
        let mut frames = FRAMES.lock();
        let frame = frames.alloc(1, FRAME_SIZE).ok()?;
        if frame + FRAME_SIZE > EARLY_MAPPED && !TABLES_LIVE.load(Ordering::Acquire) {
            let _ = frames.free(frame, 1);
            return None;
        }
        if FRAMES_AT_SERVING.lock().is_some() {
            let mut since = TABLE_FRAMES_SINCE_SERVING.lock();
            let (kept, count) = &mut *since;
            let Some(slot) = kept.get_mut(*count) else {
                let _ = frames.free(frame, 1);
                return None;
            };
            *slot = frame;
            *count += 1;
        }
        // SAFETY: the frame is ours and mapped (see the impl's comment).
        unsafe { core::ptr::write_bytes(frame as *mut u8, 0, PAGE as usize) };
        Some(frame)
    }

    fn table(&mut self, addr: u64) -> &mut [u64; 512] {
        // SAFETY: addr came from alloc_table (or is the root), see above.
        unsafe { &mut *(addr as *mut [u64; 512]) }
    }
}

/// What memory setup produced, for the boot log.
pub struct MemorySummary {
    /// Bytes of RAM in the memory map.
    pub ram_bytes: u64,
    /// One past the highest RAM address.
    pub ram_end: u64,
    /// Bytes free for allocation after setup.
    pub free_bytes: u64,
    /// Heap size in bytes.
    pub heap_bytes: u64,
    /// Kernel image [start, end).
    pub kernel: (u64, u64),
    /// Highest RAM address checked writable through the new tables.
    pub highest_checked: u64,
}

/// Why memory setup failed.
#[derive(Debug)]
pub enum MemoryError {
    /// No room for page tables or the heap.
    OutOfMemory,
    /// A page-table operation failed.
    Map(MapError),
    /// The kernel's own tables contain writable+executable pages.
    WritableExecutable(usize),
    /// A RAM frame read back differently from what was written.
    RamCheckFailed(u64),
}

impl core::fmt::Display for MemoryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfMemory => write!(f, "out of memory for page tables or the heap"),
            Self::Map(e) => write!(f, "page-table update failed: {e:?}"),
            Self::WritableExecutable(n) => {
                write!(f, "{n} writable+executable pages in the kernel's tables")
            }
            Self::RamCheckFailed(at) => {
                write!(f, "RAM at {at:#x} did not read back what was written")
            }
        }
    }
}

impl From<MapError> for MemoryError {
    fn from(e: MapError) -> Self {
        Self::Map(e)
    }
}

/// Builds the allocator, switches to the kernel's page tables and starts
/// the heap.
pub fn init(info: &StartInfo) -> Result<MemorySummary, MemoryError> {
    // SAFETY: linker-script symbols; only their addresses are used.
    let (kstart, text_end, rodata_end, kend) = unsafe {
        (
            symbol(&__kernel_start),
            symbol(&__text_end),
            symbol(&__rodata_end),
            symbol(&__kernel_end),
        )
    };
    let ram = || {
        info.memory_map()
            .iter()
            .filter(|r| r.kind == MemoryType::Ram)
    };
    {
        let mut frames = FRAMES.lock();
        for r in ram() {
            if let Err(e) = frames.add_region(r.start, r.len) {
                log::warn!(
                    "memory: region {:#x}+{:#x} not usable: {e:?}",
                    r.start,
                    r.len
                );
            }
        }
        // Low memory holds firmware and loader data; the kernel, start_info
        // and the modules must survive.
        let reserved = [(0, 1 << 20), (kstart, kend - kstart)]
            .into_iter()
            .chain(info.occupied());
        for (start, len) in reserved {
            frames
                .reserve(start, len)
                .map_err(|_| MemoryError::OutOfMemory)?;
        }
    }

    let mut tables = PageTables::new(KernelTables, boot::entry::nx_enabled())?;
    for r in ram() {
        let start = r.start.next_multiple_of(PAGE).max(PAGE);
        let end = r.end() & !(PAGE - 1);
        if start < end {
            tables.map(start, start, end - start, PageAccess::DATA)?;
        }
    }
    for r in info
        .memory_map()
        .iter()
        .filter(|r| matches!(r.kind, MemoryType::AcpiReclaimable | MemoryType::AcpiNvs))
    {
        let start = r.start & !(PAGE - 1);
        tables.map(
            start,
            start,
            r.end().next_multiple_of(PAGE) - start,
            PageAccess::READ_ONLY,
        )?;
    }
    if info.rsdp != 0 {
        let page = info.rsdp & !(PAGE - 1);
        if tables.translate(page).is_none() {
            tables.map(page, page, PAGE, PageAccess::READ_ONLY)?;
        }
    }
    tables.map(kstart, kstart, text_end - kstart, PageAccess::CODE)?;
    tables.map(
        text_end,
        text_end,
        rodata_end - text_end,
        PageAccess::READ_ONLY,
    )?;
    tables.map(rodata_end, rodata_end, kend - rodata_end, PageAccess::DATA)?;
    tables.unmap(boot::entry::stack_guard_page(), PAGE)?;
    for guard in crate::arch::ist_guard_pages() {
        tables.unmap(guard, PAGE)?;
    }
    let wx = tables.writable_executable_leaves();
    if wx != 0 {
        return Err(MemoryError::WritableExecutable(wx));
    }
    let root = tables.root();
    *TABLES.lock() = Some(tables);
    // SAFETY: the new tables identity-map everything the kernel touches:
    // its image (code executable, data writable), its stack, all RAM and
    // the loader's data, so execution continues unchanged at the same
    // addresses.
    unsafe { mmu::load_root(root) };
    TABLES_LIVE.store(true, Ordering::Release);

    for r in ram() {
        add_direct_range(r.start, r.end());
    }
    let highest_checked = check_ram_ends(info)?;

    let (free, heap_bytes) = {
        let mut frames = FRAMES.lock();
        // A quarter of what is free, up to 16 MiB: each connected vbd
        // takes about half a MiB of heap (with an eighth, 32 MiB ran out
        // of heap at the eighth vbd with frames to spare: the footprint
        // scenario), the rest stays frames for RAM disks and DMA.
        let heap_bytes = (frames.free_bytes() / 4).clamp(1 << 20, 16 << 20) & !(FRAME_SIZE - 1);
        let heap = frames
            .alloc(heap_bytes / FRAME_SIZE, FRAME_SIZE)
            .map_err(|_| MemoryError::OutOfMemory)?;
        // SAFETY: the frames are freshly allocated, mapped writable, and
        // handed to the heap for good.
        unsafe { HEAP.heap.lock().init(heap as *mut u8, heap_bytes as usize) };
        HEAP.usage.set_size(heap_bytes as usize);
        *HEAP_MEMORY.lock() = (heap, heap_bytes);
        (frames.free_bytes(), heap_bytes)
    };
    Ok(MemorySummary {
        ram_bytes: ram().map(|r| r.len).sum(),
        ram_end: ram().map(|r| r.end()).max().unwrap_or(0),
        free_bytes: free,
        heap_bytes,
        kernel: (kstart, kend),
        highest_checked,
    })
}

/// Writes and reads back the last free frame of every RAM region through
/// the new tables, proving they reach the top of memory (above 4 GiB too).
fn check_ram_ends(info: &StartInfo) -> Result<u64, MemoryError> {
    let frames = FRAMES.lock();
    let mut highest = 0;
    for r in info
        .memory_map()
        .iter()
        .filter(|r| r.kind == MemoryType::Ram)
    {
        let last = (r.end() & !(PAGE - 1)).saturating_sub(PAGE);
        if last < PAGE || !frames.overlaps_free(last, PAGE) {
            continue;
        }
        let p = last as *mut u64;
        let pattern = 0x5354_4f52_444f_4d00 ^ last;
        // SAFETY: the frame is free (nobody owns it) and mapped writable by
        // the tables just loaded.
        let read = unsafe {
            p.write_volatile(pattern);
            p.read_volatile()
        };
        if read != pattern {
            return Err(MemoryError::RamCheckFailed(last));
        }
        highest = highest.max(last + PAGE - 1);
    }
    Ok(highest)
}

/// Identity-maps the pages covering `[phys, phys+len)` with `access`
/// (replacing any earlier mapping) and returns the virtual address of
/// `phys`, equal to it.
pub fn map_identity(phys: u64, len: u64, access: PageAccess) -> Result<u64, MapError> {
    let start = phys & !(PAGE - 1);
    let end = phys
        .checked_add(len)
        .ok_or(MapError::BadRange)?
        .next_multiple_of(PAGE);
    let mut guard = TABLES.lock();
    let tables = guard.as_mut().ok_or(MapError::OutOfTables)?;
    tables.map(start, start, end - start, access)?;
    for page in (start..end).step_by(PAGE as usize) {
        mmu::flush_page(page);
    }
    Ok(phys)
}

/// Maps `len` bytes of device registers at `phys` uncached.
pub fn map_mmio(phys: u64, len: u64) -> Option<u64> {
    map_identity(phys, len, PageAccess::MMIO).ok()
}

/// Changes how kernel-owned memory at `[phys, phys+len)` may be used.
pub fn protect(phys: u64, len: u64, access: PageAccess) -> Result<(), MapError> {
    map_identity(phys, len, access).map(drop)
}

/// Returns frames from [`alloc_frames`].
pub fn free_frames(start: u64, frames: u64) {
    if let Err(e) = FRAMES.lock().free(start, frames) {
        log::error!("memory: freeing {frames} frame(s) at {start:#x}: {e:?}");
    }
}

/// Ranges the kernel maps one-to-one as ordinary memory and may hand to
/// devices: all RAM, and windows registered later (grant mappings).
static DIRECT_RANGES: Mutex<([(u64, u64); 32], usize)> = Mutex::new(([(0, 0); 32], 0));

/// Records `[start, end)` as directly mapped memory (see [`is_direct`]).
pub fn add_direct_range(start: u64, end: u64) {
    let mut guard = DIRECT_RANGES.lock();
    let (ranges, len) = &mut *guard;
    if *len < ranges.len() {
        ranges[*len] = (start, end);
        *len += 1;
    } else {
        log::error!("memory: no room to record direct range {start:#x}-{end:#x}");
    }
}

/// Whether `[phys, phys+len)` lies in one directly mapped range.
pub fn is_direct(phys: u64, len: u64) -> bool {
    let Some(end) = phys.checked_add(len) else {
        return false;
    };
    let guard = DIRECT_RANGES.lock();
    guard.0[..guard.1]
        .iter()
        .any(|&(s, e)| s <= phys && end <= e)
}

/// Copies firmware data (ACPI tables) from physical memory, mapping the
/// pages read-only first where they are not mapped yet.
pub fn read_firmware(phys: u64, buf: &mut [u8]) -> bool {
    let Some(end) = phys.checked_add(buf.len() as u64) else {
        return false;
    };
    let first = phys & !(PAGE - 1);
    {
        let mut guard = TABLES.lock();
        let Some(tables) = guard.as_mut() else {
            return false;
        };
        for page in (first..end).step_by(PAGE as usize) {
            if tables.translate(page).is_none()
                && tables.map(page, page, PAGE, PageAccess::READ_ONLY).is_err()
            {
                return false;
            }
        }
    }
    // SAFETY: every page of the range is mapped (checked or mapped above),
    // and firmware tables are only read.
    unsafe { core::ptr::copy_nonoverlapping(phys as *const u8, buf.as_mut_ptr(), buf.len()) };
    true
}

/// Allocates `frames` zeroed, contiguous, identity-mapped frames.
pub fn alloc_frames(frames: u64) -> Option<u64> {
    let start = FRAMES.lock().alloc(frames, FRAME_SIZE).ok()?;
    // SAFETY: freshly allocated RAM, identity-mapped writable.
    unsafe { core::ptr::write_bytes(start as *mut u8, 0, (frames * FRAME_SIZE) as usize) };
    Some(start)
}

/// Reads a u64 at `addr` if it is mapped (for diagnostics: never faults,
/// and gives up rather than wait for a lock a crashed context may hold).
pub fn read_u64(addr: u64) -> Option<u64> {
    if !addr.is_multiple_of(8) {
        return None;
    }
    let mut guard = TABLES.try_lock()?;
    match guard.as_mut() {
        Some(tables) => tables.translate(addr)?,
        None if addr < EARLY_MAPPED => (addr, PageAccess::DATA),
        None => return None,
    };
    // SAFETY: the page is mapped (just checked) and aligned; a stale read
    // of a diagnostic word is harmless.
    Some(unsafe { (addr as *const u64).read_volatile() })
}

/// Serving begins: what is allocated now stays across in-place restarts.
pub fn mark_serving_start() {
    let snapshot = FRAMES.lock().clone();
    *FRAMES_AT_SERVING.lock() = Some(snapshot);
}

/// Takes the locks a dead instance may have held (one vCPU: it was
/// interrupted holding them and never runs again) and starts the heap
/// afresh over its memory: every allocation of the dead instance is
/// forgotten, none freed.
///
/// # Safety
/// The caller abandons every context that used the heap, the frame
/// allocator or the page tables: nothing of the dead instance runs again
/// or is dropped, and nothing of its heap is used after this.
pub unsafe fn restart_heap() {
    // SAFETY: the caller's promise: the holders are gone for good.
    unsafe {
        HEAP_MEMORY.force_unlock();
        FRAMES.force_unlock();
        FRAMES_AT_SERVING.force_unlock();
        TABLE_FRAMES_SINCE_SERVING.force_unlock();
        TABLES.force_unlock();
        DIRECT_RANGES.force_unlock();
        HEAP.heap.force_unlock();
    }
    let (start, bytes) = *HEAP_MEMORY.lock();
    let mut heap = HEAP.heap.lock();
    *heap = Heap::empty();
    // SAFETY: the heap's own frames, mapped writable, used by nothing else
    // now that the dead instance's allocations are forgotten.
    unsafe { heap.init(start as *mut u8, bytes as usize) };
    HEAP.usage.emptied();
}

/// Gives back every frame taken since [`mark_serving_start`] but the
/// `kept` ranges (`(start, frames)`) and the page tables: run once no
/// device can reach the dead instance's frames any more.
pub fn restart_frames(kept: impl Iterator<Item = (u64, u64)>) {
    let Some(at_start) = FRAMES_AT_SERVING.lock().clone() else {
        return;
    };
    let since = TABLE_FRAMES_SINCE_SERVING.lock();
    let tables = since.0[..since.1].iter().map(|&frame| (frame, 1));
    let mut frames = FRAMES.lock();
    *frames = at_start;
    for (start, count) in kept.chain(tables) {
        if let Err(e) = frames.reserve(start, count * FRAME_SIZE) {
            log::error!("memory: keeping {count} frame(s) at {start:#x}: {e:?}");
        }
    }
}

//! The MMU side of paging: switching to page tables and dropping stale
//! translations. The table format is [`super::paging`].

/// Switches this CPU to the page tables rooted at physical `root`.
///
/// # Safety
/// The tables must map everything the kernel touches from here on (its
/// image, stacks, heap and the data it uses) at the addresses it uses now.
pub unsafe fn load_root(root: u64) {
    // SAFETY: the caller guarantees the new tables keep the kernel mapped.
    unsafe {
        core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags));
    }
}

/// Drops this CPU's cached translation of the page at `addr`.
pub fn flush_page(addr: u64) {
    x86_64::instructions::tlb::flush(x86_64::VirtAddr::new(addr));
}

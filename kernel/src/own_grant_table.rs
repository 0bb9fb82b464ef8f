//! The first frame of stordom's own grant table, mapped once for the
//! domain's life: the grant-DMA check's grants and the netfront's are
//! offered in it. Mapping it again would move the frame away from the
//! first mapping's address (Xen's add_to_physmap of a grant-table frame
//! is a move), so every user shares this one mapping.

use crate::memory;
use crate::xen::{Hypercalls, PortChannel};
use alloc::format;
use alloc::string::String;
use spin::Once;
use xen_pv::grant::{GRANT_ENTRIES_PER_FRAME, GrantEntryV1};
use xen_pv::memory::map_grant_table_frame;
use xen_pv::xenstore::{Tx, Xenstore};
use xen_pv::{DomId, PAGE_SIZE};

/// The first frame of stordom's grant table, mapped.
pub struct OwnGrantTable {
    /// stordom's own domain id.
    pub domid: DomId,
    pub entries: &'static [GrantEntryV1; GRANT_ENTRIES_PER_FRAME],
}

static TABLE: Once<OwnGrantTable> = Once::new();

/// The table, mapped by the first call over a frame it takes from the
/// allocator. Call it before serving begins: that frame must stay out of
/// the allocator across in-place restarts.
pub fn get_or_map(
    store: &mut Xenstore<'static, PortChannel>,
) -> Result<&'static OwnGrantTable, String> {
    if let Some(table) = TABLE.get() {
        return Ok(table);
    }
    let domid: DomId = store
        .read_string(Tx::NONE, "domid")
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or("own domid unreadable in xenstore")?;
    let frame = memory::alloc_frames(1).ok_or("no frame for the grant table")?;
    let hypercalls: Hypercalls = &crate::xen::get().ok_or("Xen is not set up")?.hypercalls;
    map_grant_table_frame(&hypercalls, 0, frame / PAGE_SIZE as u64)
        .map_err(|e| format!("mapping the grant table: {e:?}"))?;
    // SAFETY: Xen now backs this identity-mapped frame with the first
    // frame of the domain's (v1) grant table, for the domain's life;
    // GrantEntryV1 mirrors an entry with atomics, as Xen changes it.
    let entries = unsafe { &*(frame as *const _) };
    Ok(TABLE.call_once(|| OwnGrantTable { domid, entries }))
}

//! The start-up check of each DMA controller's data path: can its device
//! DMA into a grant-mapped page? stordom grants a page of its own to
//! itself (Xen's map_grant_ref accepts a domain's own grant: only
//! transitive grants may not point at their granter), maps that grant
//! through the same mapper and window as blkback maps a frontend's (in an
//! HVM domain Xen puts both in the p2m as grant mappings, which the IOMMU
//! follows or not), and has the device read block 0 into it, which is
//! compared with the same block read into an ordinary DMA buffer
//! (blkback::grant_dma_check judges). Read-only: nothing is written to
//! any disk. A controller whose check fails or cannot be made gets bounce
//! buffers; the verdict is logged and published under `data/dma/<disk>`.

use crate::own_grant_table::{self, OwnGrantTable};
use crate::storage::{self, Buffer, NamedDisk};
use crate::xen::{Hypercalls, XenConnection};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use blkback::DataPath;
use blkback::grant_dma_check::{GrantDmaFailure, data_path_after, verify_grant_dma};
use blockdev::{Request, Segment};
use xen_pv::grant::{GrantEntryV1, GrantMapper, GrantSpec, Mapping, RESERVED_GRANT_ENTRIES};
use xen_pv::xenstore::Tx;
use xen_pv::{DomId, PAGE_SIZE};

/// Checks every controller that DMAs (once each, on its first disk), sets
/// the data path of each of its disks, logs the verdict and publishes it.
pub fn check_disks(xen: &mut XenConnection, disks: &mut [NamedDisk]) {
    let mut controllers: Vec<String> = Vec::new();
    for controller in disks.iter().filter_map(|d| d.controller.clone()) {
        if !controllers.contains(&controller) {
            controllers.push(controller);
        }
    }
    if controllers.is_empty() {
        return;
    }
    let table = own_grant_table::get_or_map(&mut xen.store);
    for controller in &controllers {
        let mut members = disks
            .iter_mut()
            .filter(|d| d.controller.as_ref() == Some(controller));
        let Some(first) = members.next() else {
            continue;
        };
        // A fresh page and grant for each controller: the first mapping
        // of a grant of one's own page moves the page away from its frame
        // number (OwnGrant::end), so a second mapping of the same grant
        // finds a hole there (GNTST_bad_page, seen under Xen 4.17).
        let grant = table.clone().and_then(OwnGrant::offer);
        let outcome = match grant {
            Ok(mut grant) => {
                let outcome = check_controller(&mut xen.grants, &mut grant, first);
                grant.end();
                outcome
            }
            Err(why) => Err(GrantDmaFailure::Setup(why)),
        };
        let data_path = data_path_after(&outcome);
        first.data_path = data_path;
        let mut names = vec![first.name.clone()];
        for disk in members {
            disk.data_path = data_path;
            names.push(disk.name.clone());
        }
        let names = names.join(" ");
        match &outcome {
            Ok(()) => log::info!(
                "dma: {controller} ({names}): device DMA into grant-mapped pages verified: zero-copy"
            ),
            Err(why) => log::warn!(
                "dma: {controller} ({names}): device DMA into grant-mapped pages failed ({why}): bounce buffers"
            ),
        }
    }
    for disk in disks.iter().filter(|d| d.controller.is_some()) {
        let value = match disk.data_path {
            DataPath::ZeroCopy => "zero-copy",
            DataPath::Bounce => "bounce",
        };
        let node = format!("data/dma/{}", disk.name);
        if let Err(e) = xen.store.write(Tx::NONE, &node, value.as_bytes()) {
            log::warn!("dma: writing {node}: {e:?}");
        }
    }
}

/// A page of stordom's own, granted to itself.
struct OwnGrant {
    domid: DomId,
    entry: &'static GrantEntryV1,
    gref: u32,
    page: Buffer,
}

impl OwnGrant {
    /// Grants a fresh page in the table's highest free entry to its own
    /// domain.
    fn offer(table: &OwnGrantTable) -> Result<OwnGrant, String> {
        let (gref, entry) = table
            .entries
            .iter()
            .enumerate()
            .skip(RESERVED_GRANT_ENTRIES)
            .rev()
            .find(|(_, e)| e.is_free())
            .ok_or("no free grant entry")?;
        let page = Buffer::new(PAGE_SIZE)?;
        let gfn = u32::try_from(page.phys(0) / PAGE_SIZE as u64)
            .map_err(|_| "the page lies above what a v1 grant names")?;
        if !entry.offer(table.domid, gfn, false) {
            return Err("the grant entry was taken meanwhile".into());
        }
        Ok(OwnGrant {
            domid: table.domid,
            entry,
            gref: gref as u32,
            page,
        })
    }

    /// Ends the grant. Its page is never given back to the allocator:
    /// mapping a domain's own page through a grant in an HVM domain moves
    /// it (Xen 4.17's p2m_add_page removes the frame's other guest-physical
    /// mapping, "aliased!"), so after the check its old frame number is a
    /// hole, which DMA or the CPU must never use again. One page per
    /// controller is the price of the check.
    fn end(self) {
        if self.entry.end().is_err() {
            log::warn!("dma: grant {} is still mapped", self.gref);
        }
        core::mem::forget(self.page);
    }
}

/// Reads block 0 of `disk` into an ordinary buffer, then (through a
/// mapping of `grant`) into the granted page, and compares.
fn check_controller(
    grants: &mut GrantMapper<'static, Hypercalls>,
    grant: &mut OwnGrant,
    disk: &NamedDisk,
) -> Result<(), GrantDmaFailure> {
    let setup = GrantDmaFailure::Setup;
    let block = disk.disk.geometry().logical_block_size as usize;
    if block > PAGE_SIZE {
        return Err(setup(format!("{block}-byte blocks are larger than a page")));
    }
    let mut queue = storage::open_whole(disk).map_err(setup)?;
    let mut reference = Buffer::new(block).map_err(setup)?;
    let one_block = |phys| {
        [Segment {
            phys,
            len: block as u32,
        }]
    };
    // The reference first: a device upset by a faulting DMA must not spoil it.
    let segments = one_block(reference.phys(0));
    storage::run_sync(&mut queue, 0, read_block_0(&segments))
        .map_err(GrantDmaFailure::ReferenceRead)?;
    let spec = GrantSpec {
        domid: grant.domid,
        gref: grant.gref,
        readonly: false,
    };
    let mut results = Vec::with_capacity(1);
    grants.map_batch(&[spec], &mut results);
    let mut mapping: Vec<Mapping> = match results.pop() {
        Some(Ok(mapping)) => vec![mapping],
        Some(Err(e)) => return Err(setup(format!("mapping its own grant: {e:?}"))),
        None => return Err(setup("mapping its own grant: no result".into())),
    };
    let window_phys = mapping[0].gfn * PAGE_SIZE as u64;
    let segments = one_block(window_phys);
    let mut landed = vec![0u8; block];
    let outcome = verify_grant_dma(&reference.bytes()[..block], &mut landed, |fill, out| {
        // SAFETY: the grant is mapped at this identity-mapped window frame
        // until the unmap below; the device writes it only during
        // `run_sync`, while this slice is not alive.
        unsafe { core::ptr::write_bytes(window_phys as *mut u8, fill, PAGE_SIZE) };
        storage::run_sync(&mut queue, 0, read_block_0(&segments))?;
        // SAFETY: as above; the read is complete.
        let page = unsafe { core::slice::from_raw_parts(window_phys as *const u8, block) };
        out.copy_from_slice(page);
        Ok::<(), String>(())
    });
    let mut failed = Vec::new();
    grants.unmap_batch(&mut mapping, &mut failed);
    for (m, e) in failed {
        log::warn!("dma: unmapping its own grant at gfn {:#x}: {e:?}", m.gfn);
    }
    outcome
}

fn read_block_0(segments: &[Segment]) -> Request<'_> {
    Request::Read { lba: 0, segments }
}

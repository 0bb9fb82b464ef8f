//! x86-64 4-level page tables, built and edited through [`TableMemory`] so
//! the logic runs on the host against fake memory.
//!
//! Leaves carry the permissions; intermediate entries are always
//! present+writable+executable so the leaf alone decides.

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const TABLE_FLAGS: u64 = PRESENT | WRITABLE;

/// 4 KiB.
pub const PAGE: u64 = 4096;
/// 2 MiB, the large-page size used for RAM.
pub const LARGE_PAGE: u64 = 2 << 20;

/// How a mapping may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageAccess {
    /// Stores allowed.
    pub writable: bool,
    /// Instruction fetch allowed.
    pub executable: bool,
    /// Uncached (device registers).
    pub uncached: bool,
}

impl PageAccess {
    /// Kernel code.
    pub const CODE: Self = Self {
        writable: false,
        executable: true,
        uncached: false,
    };
    /// Constants and firmware tables.
    pub const READ_ONLY: Self = Self {
        writable: false,
        executable: false,
        uncached: false,
    };
    /// Ordinary RAM.
    pub const DATA: Self = Self {
        writable: true,
        executable: false,
        uncached: false,
    };
    /// Device registers.
    pub const MMIO: Self = Self {
        writable: true,
        executable: false,
        uncached: true,
    };
}

/// Why a mapping change failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// No memory for a page table.
    OutOfTables,
    /// Address, length or alignment is invalid (not page aligned, not canonical, wraps).
    BadRange,
}

/// Where page tables live.
///
/// # Safety
/// `table` must return the 512 entries stored at physical address `addr`
/// for every `addr` that `alloc_table` returned (or the root), and that
/// memory must be used for nothing else while the tables are live.
pub unsafe trait TableMemory {
    /// Allocates a zeroed, page-aligned table and returns its physical address.
    fn alloc_table(&mut self) -> Option<u64>;
    /// The table at physical address `addr`.
    fn table(&mut self, addr: u64) -> &mut [u64; 512];
}

/// A set of page tables rooted at one PML4.
pub struct PageTables<M: TableMemory> {
    mem: M,
    root: u64,
    nx: bool,
}

fn index(virt: u64, level: u32) -> usize {
    ((virt >> (12 + 9 * level)) & 0x1ff) as usize
}

impl<M: TableMemory> PageTables<M> {
    /// New, empty tables. `nx` says whether EFER.NXE is on (the bit is
    /// reserved, and faults, when it is off).
    pub fn new(mut mem: M, nx: bool) -> Result<Self, MapError> {
        let root = mem.alloc_table().ok_or(MapError::OutOfTables)?;
        Ok(Self { mem, root, nx })
    }

    /// Physical address of the PML4 (what CR3 gets).
    pub fn root(&self) -> u64 {
        self.root
    }

    fn leaf_bits(&self, access: PageAccess) -> u64 {
        let mut bits = PRESENT;
        if access.writable {
            bits |= WRITABLE;
        }
        if access.uncached {
            bits |= CACHE_DISABLE | WRITE_THROUGH;
        }
        if !access.executable && self.nx {
            bits |= NO_EXECUTE;
        }
        bits
    }

    fn access_of(&self, entry: u64) -> PageAccess {
        PageAccess {
            writable: entry & WRITABLE != 0,
            executable: entry & NO_EXECUTE == 0,
            uncached: entry & CACHE_DISABLE != 0,
        }
    }

    /// The next-level table under `table[i]`, created (or split from a
    /// large page) as needed.
    fn descend(&mut self, table: u64, i: usize) -> Result<u64, MapError> {
        let entry = self.mem.table(table)[i];
        if entry & PRESENT != 0 && entry & HUGE == 0 {
            return Ok(entry & ADDR_MASK);
        }
        let next = self.mem.alloc_table().ok_or(MapError::OutOfTables)?;
        if entry & PRESENT != 0 {
            // Split a 2 MiB page into 512 4 KiB pages with the same rights.
            let base = entry & ADDR_MASK & !(LARGE_PAGE - 1);
            let bits = entry & !ADDR_MASK & !HUGE;
            for (k, e) in self.mem.table(next).iter_mut().enumerate() {
                *e = (base + k as u64 * PAGE) | bits;
            }
        }
        self.mem.table(table)[i] = next | TABLE_FLAGS;
        Ok(next)
    }

    fn check(virt: u64, phys: u64, len: u64) -> Result<(), MapError> {
        let aligned =
            virt.is_multiple_of(PAGE) && phys.is_multiple_of(PAGE) && len.is_multiple_of(PAGE);
        let end_ok = virt.checked_add(len).is_some_and(|e| e <= 1 << 47)
            && phys.checked_add(len).is_some_and(|e| e <= 1 << 52);
        if aligned && end_ok {
            Ok(())
        } else {
            Err(MapError::BadRange)
        }
    }

    /// Maps `[virt, virt+len)` to `[phys, phys+len)`, replacing whatever was
    /// there. Uses 2 MiB pages where both sides are aligned.
    pub fn map(
        &mut self,
        virt: u64,
        phys: u64,
        len: u64,
        access: PageAccess,
    ) -> Result<(), MapError> {
        Self::check(virt, phys, len)?;
        let bits = self.leaf_bits(access);
        let mut done = 0;
        while done < len {
            let (v, p) = (virt + done, phys + done);
            let pdpt = self.descend(self.root, index(v, 3))?;
            let pd = self.descend(pdpt, index(v, 2))?;
            let pd_entry = self.mem.table(pd)[index(v, 1)];
            let large_fits = v % LARGE_PAGE == 0 && p % LARGE_PAGE == 0 && len - done >= LARGE_PAGE;
            // A large page may replace a large page or nothing, never a table
            // (it would leak the table and whatever differs inside it).
            if large_fits && !(pd_entry & PRESENT != 0 && pd_entry & HUGE == 0) {
                self.mem.table(pd)[index(v, 1)] = p | bits | HUGE;
                done += LARGE_PAGE;
            } else {
                let pt = self.descend(pd, index(v, 1))?;
                self.mem.table(pt)[index(v, 0)] = p | bits;
                done += PAGE;
            }
        }
        Ok(())
    }

    /// Removes the 4 KiB mappings of `[virt, virt+len)` (splitting large pages).
    pub fn unmap(&mut self, virt: u64, len: u64) -> Result<(), MapError> {
        Self::check(virt, 0, len)?;
        for v in (virt..virt + len).step_by(PAGE as usize) {
            let pdpt = self.descend(self.root, index(v, 3))?;
            let pd = self.descend(pdpt, index(v, 2))?;
            let pt = self.descend(pd, index(v, 1))?;
            self.mem.table(pt)[index(v, 0)] = 0;
        }
        Ok(())
    }

    /// Where `virt` maps to and how, if it is mapped.
    pub fn translate(&mut self, virt: u64) -> Option<(u64, PageAccess)> {
        let mut table = self.root;
        for level in (0..4).rev() {
            let entry = self.mem.table(table)[index(virt, level)];
            if entry & PRESENT == 0 {
                return None;
            }
            let leaf = level == 0 || (entry & HUGE != 0 && level == 1);
            if leaf {
                let page = if level == 0 { PAGE } else { LARGE_PAGE };
                let base = entry & ADDR_MASK & !(page - 1);
                return Some((base + virt % page, self.access_of(entry)));
            }
            table = entry & ADDR_MASK;
        }
        None
    }

    /// Calls `f(virt, len, access)` for every leaf mapping, in address order.
    pub fn for_each_leaf(&mut self, mut f: impl FnMut(u64, u64, PageAccess)) {
        self.walk(self.root, 3, 0, &mut f);
    }

    fn walk(
        &mut self,
        table: u64,
        level: u32,
        base: u64,
        f: &mut impl FnMut(u64, u64, PageAccess),
    ) {
        for i in 0..512u64 {
            let entry = self.mem.table(table)[i as usize];
            if entry & PRESENT == 0 {
                continue;
            }
            let virt = base | (i << (12 + 9 * level));
            if level == 0 || (level == 1 && entry & HUGE != 0) {
                f(
                    virt,
                    if level == 0 { PAGE } else { LARGE_PAGE },
                    self.access_of(entry),
                );
            } else {
                self.walk(entry & ADDR_MASK, level - 1, virt, f);
            }
        }
    }

    /// Number of leaves that are both writable and executable (must be 0).
    pub fn writable_executable_leaves(&mut self) -> usize {
        let mut n = 0;
        self.for_each_leaf(|_, _, a| n += usize::from(a.writable && a.executable));
        n
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::boxed::Box;
    use std::collections::HashMap;

    /// Tables in a hash map keyed by a fake physical address.
    struct FakeMemory {
        tables: HashMap<u64, Box<[u64; 512]>>,
        next: u64,
        limit: usize,
    }

    impl FakeMemory {
        fn new(limit: usize) -> Self {
            Self {
                tables: HashMap::new(),
                next: 0x100_0000,
                limit,
            }
        }
    }

    // SAFETY: every address handed out has its own boxed table.
    unsafe impl TableMemory for FakeMemory {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.tables.len() == self.limit {
                return None;
            }
            self.next += PAGE;
            self.tables.insert(self.next, Box::new([0; 512]));
            Some(self.next)
        }
        fn table(&mut self, addr: u64) -> &mut [u64; 512] {
            self.tables.get_mut(&addr).expect("not a table")
        }
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn ram_above_4g_uses_large_pages_and_translates() {
        let mut pt = PageTables::new(FakeMemory::new(64), true).unwrap();
        pt.map(4 * GIB, 4 * GIB, 2 * GIB, PageAccess::DATA).unwrap();
        assert_eq!(
            pt.translate(4 * GIB + 12345),
            Some((4 * GIB + 12345, PageAccess::DATA))
        );
        assert_eq!(
            pt.translate(6 * GIB - 1),
            Some((6 * GIB - 1, PageAccess::DATA))
        );
        assert_eq!(pt.translate(6 * GIB), None);
        let mut leaves = 0;
        pt.for_each_leaf(|_, len, _| {
            assert_eq!(len, LARGE_PAGE);
            leaves += 1;
        });
        assert_eq!(leaves, 1024);
    }

    #[test]
    fn kernel_sections_split_large_pages_and_keep_w_xor_x() {
        let mut pt = PageTables::new(FakeMemory::new(64), true).unwrap();
        pt.map(0, 0, 64 * MIB, PageAccess::DATA).unwrap();
        pt.map(MIB, MIB, 64 * 1024, PageAccess::CODE).unwrap();
        pt.map(
            MIB + 64 * 1024,
            MIB + 64 * 1024,
            16 * 1024,
            PageAccess::READ_ONLY,
        )
        .unwrap();
        pt.unmap(0, PAGE).unwrap();
        assert_eq!(pt.translate(0), None);
        assert_eq!(pt.translate(PAGE), Some((PAGE, PageAccess::DATA)));
        assert_eq!(pt.translate(MIB + 100), Some((MIB + 100, PageAccess::CODE)));
        assert_eq!(
            pt.translate(MIB + 70 * 1024),
            Some((MIB + 70 * 1024, PageAccess::READ_ONLY))
        );
        assert_eq!(
            pt.translate(MIB + 80 * 1024),
            Some((MIB + 80 * 1024, PageAccess::DATA))
        );
        assert_eq!(
            pt.translate(2 * MIB),
            Some((2 * MIB, PageAccess::DATA)),
            "neighbouring large page untouched"
        );
        assert_eq!(pt.writable_executable_leaves(), 0);
        pt.map(
            3 * MIB,
            3 * MIB,
            PAGE,
            PageAccess {
                writable: true,
                executable: true,
                uncached: false,
            },
        )
        .unwrap();
        assert_eq!(
            pt.writable_executable_leaves(),
            1,
            "the check sees a W+X page"
        );
    }

    #[test]
    fn mmio_is_uncached_and_without_nx_support_everything_is_executable() {
        let mut pt = PageTables::new(FakeMemory::new(16), true).unwrap();
        pt.map(0xfee0_0000, 0xfee0_0000, PAGE, PageAccess::MMIO)
            .unwrap();
        assert_eq!(pt.translate(0xfee0_0010).unwrap().1, PageAccess::MMIO);
        let mut pt = PageTables::new(FakeMemory::new(16), false).unwrap();
        pt.map(0, 0, PAGE * 2, PageAccess::DATA).unwrap();
        assert!(
            pt.translate(0).unwrap().1.executable,
            "NX bit is reserved when EFER.NXE is off"
        );
    }

    #[test]
    fn bad_ranges_and_table_exhaustion_are_errors() {
        let mut pt = PageTables::new(FakeMemory::new(3), true).unwrap();
        assert_eq!(
            pt.map(1, 0, PAGE, PageAccess::DATA),
            Err(MapError::BadRange)
        );
        assert_eq!(pt.map(0, 0, 100, PageAccess::DATA), Err(MapError::BadRange));
        assert_eq!(
            pt.map(1 << 47, 0, PAGE, PageAccess::DATA),
            Err(MapError::BadRange)
        );
        assert_eq!(
            pt.map(!(PAGE - 1), 0, PAGE, PageAccess::DATA),
            Err(MapError::BadRange)
        );
        assert_eq!(
            pt.map(0, 0, PAGE, PageAccess::DATA),
            Err(MapError::OutOfTables)
        );
    }

    #[test]
    fn large_page_never_replaces_a_table() {
        let mut pt = PageTables::new(FakeMemory::new(16), true).unwrap();
        pt.map(0, 0, PAGE, PageAccess::CODE).unwrap();
        pt.map(0, 0, LARGE_PAGE, PageAccess::DATA).unwrap();
        let mut n = 0;
        pt.for_each_leaf(|_, len, a| {
            assert_eq!((len, a), (PAGE, PageAccess::DATA));
            n += 1;
        });
        assert_eq!(n, 512);
    }
}

//! Parsing of the PVH `hvm_start_info` block (xen/include/public/arch-x86/hvm/start_info.h).
//!
//! The loader (QEMU or Xen) writes it; it is trusted to be there but not to
//! be sane, so every count and length is bounded and every pointer is read
//! through [`PhysRead`], which may refuse.

use core::fmt;

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const START_MAGIC: u32 = 0x336e_c578;
/// Bound on memory-map entries we accept (E820 maps are far smaller).
pub const MAX_MEMMAP_ENTRIES: usize = 128;
/// Bound on boot modules.
pub const MAX_MODULES: usize = 16;
/// Bound on a command line (ours or a module's), NUL excluded.
pub const MAX_CMDLINE: usize = 1024;

const START_INFO_SIZE: usize = 56;
const MODLIST_ENTRY_SIZE: usize = 32;
const MEMMAP_ENTRY_SIZE: usize = 24;

/// Reads guest-physical memory for the parser.
pub trait PhysRead {
    /// Fills `buf` from physical address `paddr`; false if that range is not readable.
    fn read(&self, paddr: u64, buf: &mut [u8]) -> bool;
}

/// Why a start_info block was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartInfoError {
    /// The block (or a table it points to) could not be read.
    Unreadable(u64),
    /// The magic value is not `XEN_HVM_START_MAGIC_VALUE`.
    BadMagic(u32),
    /// Version 0 has no memory map; we need one.
    NoMemoryMap,
    /// More memory-map entries than [`MAX_MEMMAP_ENTRIES`].
    TooManyMemmapEntries(u32),
    /// More modules than [`MAX_MODULES`].
    TooManyModules(u32),
    /// A command line has no NUL within [`MAX_CMDLINE`] bytes or is not UTF-8.
    BadCmdline(u64),
    /// A multiboot2 information block larger than
    /// [`crate::multiboot2::MAX_INFO_SIZE`] or smaller than its header.
    BadInfoSize(u32),
    /// A multiboot2 tag at this address is malformed (size too small,
    /// past the block's end, a module ending before it starts).
    BadTag(u64),
}

impl fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable(pa) => write!(f, "cannot read physical address {pa:#x}"),
            Self::BadMagic(m) => write!(f, "bad start_info magic {m:#x}"),
            Self::NoMemoryMap => write!(f, "start_info version 0 carries no memory map"),
            Self::TooManyMemmapEntries(n) => {
                write!(f, "{n} memory map entries (max {MAX_MEMMAP_ENTRIES})")
            }
            Self::TooManyModules(n) => write!(f, "{n} modules (max {MAX_MODULES})"),
            Self::BadCmdline(pa) => {
                write!(f, "command line at {pa:#x} is unterminated or not UTF-8")
            }
            Self::BadInfoSize(n) => write!(f, "multiboot2 information of {n} bytes"),
            Self::BadTag(pa) => write!(f, "malformed multiboot2 tag at {pa:#x}"),
        }
    }
}

/// E820-style region type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryType {
    /// Usable RAM.
    Ram,
    /// Reserved by firmware or the platform.
    Reserved,
    /// ACPI tables, reclaimable after parsing.
    AcpiReclaimable,
    /// ACPI non-volatile storage.
    AcpiNvs,
    /// Known-bad memory.
    Unusable,
    /// Disabled memory.
    Disabled,
    /// Persistent memory.
    Persistent,
    /// A type this parser does not know; treated as reserved.
    Other(u32),
}

impl MemoryType {
    /// From the E820 type number (multiboot2 uses the same numbers).
    pub(crate) fn from_raw(raw: u32) -> Self {
        match raw {
            1 => Self::Ram,
            2 => Self::Reserved,
            3 => Self::AcpiReclaimable,
            4 => Self::AcpiNvs,
            5 => Self::Unusable,
            6 => Self::Disabled,
            7 => Self::Persistent,
            other => Self::Other(other),
        }
    }
}

/// One memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First physical byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the region is.
    pub kind: MemoryType,
}

impl MemoryRegion {
    /// One past the last byte, saturating so a hostile length cannot wrap.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// A boot module: a blob the loader placed in memory (later: disk images).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Module<'a> {
    /// Physical address of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// The module's own command line ("" when none).
    pub cmdline: &'a str,
}

/// How stordom was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Xen's or QEMU's PVH entry, with an `hvm_start_info` block.
    Pvh,
    /// A multiboot2 loader (GRUB, e.g. GRUB's EFI image in an HVM guest
    /// or on bare metal), with a multiboot2 information block.
    Multiboot2,
}

/// What the loader handed over (an `hvm_start_info` or a multiboot2
/// information block): owned copies of every table, so the originals'
/// memory can be reused once the caller has reserved what it must keep.
pub struct StartInfo<'a> {
    /// The loader's protocol.
    pub protocol: BootProtocol,
    /// Physical address of the block itself.
    pub paddr: u64,
    /// Its length in bytes (the tables it points to aside).
    pub(crate) block_len: u64,
    /// start_info version (1 and up carry the memory map); 0 for multiboot2.
    pub version: u32,
    /// SIF_* flags.
    pub flags: u32,
    /// ACPI RSDP address, 0 when not given.
    pub rsdp: u64,
    /// Our command line.
    pub cmdline: &'a str,
    pub(crate) cmdline_span: (u64, u64),
    pub(crate) memmap: [MemoryRegion; MAX_MEMMAP_ENTRIES],
    pub(crate) memmap_len: usize,
    pub(crate) memmap_span: (u64, u64),
    pub(crate) modules: [Module<'a>; MAX_MODULES],
    pub(crate) modules_len: usize,
    pub(crate) modlist_span: (u64, u64),
}

/// Backing store for the strings of a [`StartInfo`] (command lines are
/// copied here, so no reference into loader memory survives parsing).
pub struct StringArena {
    buf: [u8; MAX_CMDLINE * (MAX_MODULES + 1)],
    pub(crate) used: usize,
}

impl Default for StringArena {
    fn default() -> Self {
        Self::new()
    }
}

impl StringArena {
    /// An empty arena.
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_CMDLINE * (MAX_MODULES + 1)],
            used: 0,
        }
    }
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

/// Copies a NUL-terminated string at `paddr` into the arena; returns the
/// arena range and the number of bytes the string occupies in memory (NUL
/// included). Address 0 means "no string".
pub(crate) fn read_cstr(
    mem: &impl PhysRead,
    paddr: u64,
    arena: &mut StringArena,
) -> Result<((usize, usize), u64), StartInfoError> {
    if paddr == 0 {
        return Ok(((arena.used, arena.used), 0));
    }
    let start = arena.used;
    for i in 0..MAX_CMDLINE {
        let mut byte = [0u8];
        let addr = paddr
            .checked_add(i as u64)
            .ok_or(StartInfoError::BadCmdline(paddr))?;
        if !mem.read(addr, &mut byte) {
            return Err(StartInfoError::Unreadable(addr));
        }
        if byte[0] == 0 {
            core::str::from_utf8(&arena.buf[start..start + i])
                .map_err(|_| StartInfoError::BadCmdline(paddr))?;
            arena.used = start + i;
            return Ok(((start, start + i), i as u64 + 1));
        }
        if start + i >= arena.buf.len() {
            return Err(StartInfoError::BadCmdline(paddr));
        }
        arena.buf[start + i] = byte[0];
    }
    Err(StartInfoError::BadCmdline(paddr))
}

/// Address of entry `index` of a table at `base`, refusing to wrap.
fn table_entry(base: u64, index: usize, entry_size: usize) -> Result<u64, StartInfoError> {
    base.checked_add((index * entry_size) as u64)
        .ok_or(StartInfoError::Unreadable(base))
}

pub(crate) fn arena_str(arena: &StringArena, range: (usize, usize)) -> &str {
    // The range was validated as UTF-8 when it was copied in.
    core::str::from_utf8(&arena.buf[range.0..range.1]).unwrap_or("")
}

/// An unused memory-map slot.
pub(crate) const NO_REGION: MemoryRegion = MemoryRegion {
    start: 0,
    len: 0,
    kind: MemoryType::Reserved,
};

/// A module as a parser finds it: start, length, and the arena range of
/// its command line.
pub(crate) type RawModule = (u64, u64, (usize, usize));

/// The modules of `raw`, their command lines read from `arena`.
pub(crate) fn resolve_modules<'a>(
    arena: &'a StringArena,
    raw: &[RawModule],
) -> [Module<'a>; MAX_MODULES] {
    let mut modules = [Module {
        start: 0,
        len: 0,
        cmdline: "",
    }; MAX_MODULES];
    for (slot, &(start, len, range)) in modules.iter_mut().zip(raw) {
        *slot = Module {
            start,
            len,
            cmdline: arena_str(arena, range),
        };
    }
    modules
}

impl<'a> StartInfo<'a> {
    /// Parses the block at `paddr`, copying every table and string out.
    pub fn parse(
        mem: &impl PhysRead,
        paddr: u64,
        arena: &'a mut StringArena,
    ) -> Result<Self, StartInfoError> {
        let mut raw = [0u8; START_INFO_SIZE];
        if !mem.read(paddr, &mut raw) {
            return Err(StartInfoError::Unreadable(paddr));
        }
        let magic = u32_at(&raw, 0);
        if magic != START_MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        let version = u32_at(&raw, 4);
        if version < 1 {
            return Err(StartInfoError::NoMemoryMap);
        }
        let nr_modules = u32_at(&raw, 12);
        let modlist_paddr = u64_at(&raw, 16);
        let cmdline_paddr = u64_at(&raw, 24);
        let memmap_paddr = u64_at(&raw, 40);
        let memmap_entries = u32_at(&raw, 48);
        if memmap_entries as usize > MAX_MEMMAP_ENTRIES {
            return Err(StartInfoError::TooManyMemmapEntries(memmap_entries));
        }
        if nr_modules as usize > MAX_MODULES {
            return Err(StartInfoError::TooManyModules(nr_modules));
        }

        let mut memmap = [NO_REGION; MAX_MEMMAP_ENTRIES];
        for (i, slot) in memmap.iter_mut().take(memmap_entries as usize).enumerate() {
            let mut e = [0u8; MEMMAP_ENTRY_SIZE];
            let at = table_entry(memmap_paddr, i, MEMMAP_ENTRY_SIZE)?;
            if !mem.read(at, &mut e) {
                return Err(StartInfoError::Unreadable(at));
            }
            *slot = MemoryRegion {
                start: u64_at(&e, 0),
                len: u64_at(&e, 8),
                kind: MemoryType::from_raw(u32_at(&e, 16)),
            };
        }

        let (cmdline_range, cmdline_len) = read_cstr(mem, cmdline_paddr, arena)?;
        let mut module_raw: [RawModule; MAX_MODULES] = [(0, 0, (0, 0)); MAX_MODULES];
        for (i, slot) in module_raw.iter_mut().take(nr_modules as usize).enumerate() {
            let mut e = [0u8; MODLIST_ENTRY_SIZE];
            let at = table_entry(modlist_paddr, i, MODLIST_ENTRY_SIZE)?;
            if !mem.read(at, &mut e) {
                return Err(StartInfoError::Unreadable(at));
            }
            let (range, _) = read_cstr(mem, u64_at(&e, 16), arena)?;
            *slot = (u64_at(&e, 0), u64_at(&e, 8), range);
        }

        let arena: &'a StringArena = arena;
        let modules = resolve_modules(arena, &module_raw[..nr_modules as usize]);
        Ok(Self {
            protocol: BootProtocol::Pvh,
            paddr,
            block_len: START_INFO_SIZE as u64,
            version,
            flags: u32_at(&raw, 8),
            rsdp: u64_at(&raw, 32),
            cmdline: arena_str(arena, cmdline_range),
            cmdline_span: (cmdline_paddr, cmdline_len),
            memmap,
            memmap_len: memmap_entries as usize,
            memmap_span: (
                memmap_paddr,
                (memmap_entries as usize * MEMMAP_ENTRY_SIZE) as u64,
            ),
            modules,
            modules_len: nr_modules as usize,
            modlist_span: (
                modlist_paddr,
                (nr_modules as usize * MODLIST_ENTRY_SIZE) as u64,
            ),
        })
    }

    /// The memory map as the loader gave it.
    pub fn memory_map(&self) -> &[MemoryRegion] {
        &self.memmap[..self.memmap_len]
    }

    /// The boot modules.
    pub fn modules(&self) -> &[Module<'a>] {
        &self.modules[..self.modules_len]
    }

    /// Physical ranges (start, len) the loader's data occupies: its block,
    /// the tables it points to, command lines and modules. A frame allocator must not hand
    /// these out while anything may still read them.
    pub fn occupied(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        [
            (self.paddr, self.block_len),
            self.cmdline_span,
            self.memmap_span,
            self.modlist_span,
        ]
        .into_iter()
        .chain(self.modules().iter().map(|m| (m.start, m.len)))
        .filter(|&(_, len)| len > 0)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::test_memory::Mem;
    use std::vec::Vec;

    impl Mem {
        fn put(&mut self, at: usize, bytes: &[u8]) {
            self.0[at..at + bytes.len()].copy_from_slice(bytes);
        }
        fn put_u32(&mut self, at: usize, v: u32) {
            self.put(at, &v.to_le_bytes());
        }
        fn put_u64(&mut self, at: usize, v: u64) {
            self.put(at, &v.to_le_bytes());
        }
    }

    /// A start_info at 0x1000 with a two-entry map, a command line and one module.
    fn sample() -> Mem {
        let mut m = Mem(std::vec![0u8; 0x4000]);
        m.put_u32(0x1000, START_MAGIC);
        m.put_u32(0x1004, 1);
        m.put_u32(0x100c, 1); // nr_modules
        m.put_u64(0x1010, 0x1200); // modlist
        m.put_u64(0x1018, 0x1100); // cmdline
        m.put_u64(0x1020, 0xf_0000); // rsdp
        m.put_u64(0x1028, 0x1300); // memmap
        m.put_u32(0x1030, 2);
        m.put(0x1100, b"loglevel=debug fault=panic\0");
        m.put_u64(0x1200, 0x2000);
        m.put_u64(0x1208, 0x800);
        m.put_u64(0x1210, 0x1180);
        m.put(0x1180, b"disk0\0");
        m.put_u64(0x1300, 0);
        m.put_u64(0x1308, 0x9_fc00);
        m.put_u32(0x1310, 1);
        m.put_u64(0x1318, 0x10_0000);
        m.put_u64(0x1320, 0x7ff0_0000);
        m.put_u32(0x1328, 2);
        m
    }

    #[test]
    fn parses_map_modules_and_cmdline() {
        let mem = sample();
        let mut arena = StringArena::new();
        let si = StartInfo::parse(&mem, 0x1000, &mut arena).unwrap();
        assert_eq!(si.cmdline, "loglevel=debug fault=panic");
        assert_eq!(si.rsdp, 0xf_0000);
        assert_eq!(si.memory_map().len(), 2);
        assert_eq!(
            si.memory_map()[0],
            MemoryRegion {
                start: 0,
                len: 0x9_fc00,
                kind: MemoryType::Ram
            }
        );
        assert_eq!(si.memory_map()[1].kind, MemoryType::Reserved);
        assert_eq!(
            si.modules(),
            &[Module {
                start: 0x2000,
                len: 0x800,
                cmdline: "disk0"
            }]
        );
        let occupied: Vec<_> = si.occupied().collect();
        assert!(occupied.contains(&(0x1000, 56)));
        assert!(occupied.contains(&(0x1100, 27)));
        assert!(occupied.contains(&(0x1300, 48)));
        assert!(occupied.contains(&(0x1200, 32)));
        assert!(occupied.contains(&(0x2000, 0x800)));
    }

    #[test]
    fn rejects_bad_magic_and_version_zero() {
        let mut mem = sample();
        mem.put_u32(0x1000, 0xdead_beef);
        assert_eq!(
            StartInfo::parse(&mem, 0x1000, &mut StringArena::new()).err(),
            Some(StartInfoError::BadMagic(0xdead_beef))
        );
        let mut mem = sample();
        mem.put_u32(0x1004, 0);
        assert_eq!(
            StartInfo::parse(&mem, 0x1000, &mut StringArena::new()).err(),
            Some(StartInfoError::NoMemoryMap)
        );
    }

    #[test]
    fn bounds_counts_and_strings() {
        let mut mem = sample();
        mem.put_u32(0x1030, 100_000);
        assert_eq!(
            StartInfo::parse(&mem, 0x1000, &mut StringArena::new()).err(),
            Some(StartInfoError::TooManyMemmapEntries(100_000))
        );
        let mut mem = sample();
        mem.put_u32(0x100c, 17);
        assert_eq!(
            StartInfo::parse(&mem, 0x1000, &mut StringArena::new()).err(),
            Some(StartInfoError::TooManyModules(17))
        );
        let mut mem = sample();
        mem.put(0x1100, &[b'a'; MAX_CMDLINE + 8]);
        assert_eq!(
            StartInfo::parse(&mem, 0x1000, &mut StringArena::new()).err(),
            Some(StartInfoError::BadCmdline(0x1100))
        );
        let mut mem = sample();
        mem.put(0x1100, &[0xff, 0xfe, 0]);
        assert_eq!(
            StartInfo::parse(&mem, 0x1000, &mut StringArena::new()).err(),
            Some(StartInfoError::BadCmdline(0x1100))
        );
    }

    #[test]
    fn unreadable_tables_are_errors_not_panics() {
        let mut mem = sample();
        mem.put_u64(0x1028, u64::MAX - 8);
        assert!(matches!(
            StartInfo::parse(&mem, 0x1000, &mut StringArena::new()),
            Err(StartInfoError::Unreadable(_))
        ));
        let mut mem = sample();
        mem.put_u64(0x1018, u64::MAX - 2);
        assert!(StartInfo::parse(&mem, 0x1000, &mut StringArena::new()).is_err());
        assert_eq!(
            StartInfo::parse(&mem, 0xffff_0000, &mut StringArena::new()).err(),
            Some(StartInfoError::Unreadable(0xffff_0000))
        );
    }

    /// Interesting values for a start_info field a loader writes.
    fn hostile_word(rng: &mut host_fuzz::FuzzRng) -> u64 {
        let boundary = [0, 1, 2, 16, 17, 128, 129, 0x1000, 0x1ff8, 0x3ffc, 0x4000];
        let wide = [u64::MAX, u64::MAX - 8, u64::from(u32::MAX), 1 << 63];
        match rng.below(4) {
            0 => rng.pick(&boundary),
            1 => rng.pick(&wide),
            2 => rng.below(0x4000),
            _ => rng.next_u64(),
        }
    }

    #[test]
    fn fuzz_start_info_parsing() {
        let mut run = host_fuzz::FuzzRun::new("start_info", 0x57a7, 5_000);
        let mut rng = run.rng();
        while run.another() {
            let mut mem = sample();
            for _ in 0..1 + rng.below(6) {
                match rng.below(3) {
                    0 => {
                        let field = rng.pick(&[0x1004, 0x100c, 0x1030, 0x1210]);
                        mem.put_u32(field, hostile_word(&mut rng) as u32);
                    }
                    1 => {
                        let field = rng.pick(&[0x1010, 0x1018, 0x1028, 0x1200, 0x1208, 0x1210]);
                        mem.put_u64(field, hostile_word(&mut rng));
                    }
                    _ => {
                        let at = 0x1000 + rng.below(0x400) as usize;
                        mem.0[at] = rng.next_u64() as u8;
                    }
                }
            }
            let paddr = if rng.one_in(20) {
                hostile_word(&mut rng)
            } else {
                0x1000
            };
            let mut arena = StringArena::new();
            if let Ok(si) = StartInfo::parse(&mem, paddr, &mut arena) {
                assert!(si.memory_map().len() <= MAX_MEMMAP_ENTRIES);
                assert!(si.modules().len() <= MAX_MODULES);
                assert!(si.cmdline.len() < MAX_CMDLINE);
                assert!(si.occupied().all(|(_, len)| len > 0));
            }
        }
    }

    #[test]
    fn missing_cmdline_is_empty() {
        let mut mem = sample();
        mem.put_u64(0x1018, 0);
        let mut arena = StringArena::new();
        let si = StartInfo::parse(&mem, 0x1000, &mut arena).unwrap();
        assert_eq!(si.cmdline, "");
        assert_eq!(si.modules()[0].cmdline, "disk0");
    }
}

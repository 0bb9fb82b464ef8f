//! Parsing of the multiboot2 information block (the Multiboot2
//! Specification, version 2.0, section 3.6) into a [`StartInfo`], so the
//! kernel sees one form whichever loader started it.
//!
//! The loader (GRUB) is trusted to be there but not to be sane: the block's
//! size is bounded, every tag must lie inside it, and every count and
//! string is bounded as for `hvm_start_info`.

use crate::start_info::{
    BootProtocol, MAX_MEMMAP_ENTRIES, MAX_MODULES, MemoryRegion, MemoryType, NO_REGION, PhysRead,
    RawModule, StartInfo, StartInfoError, StringArena, arena_str, read_cstr, resolve_modules,
    u32_at, u64_at,
};

/// What a multiboot2 loader leaves in `%eax`.
pub const BOOTLOADER_MAGIC: u32 = 0x36d7_6289;
/// Largest information block accepted (GRUB's, with an EFI memory map
/// tag, is a few KiB).
pub const MAX_INFO_SIZE: u32 = 64 * 1024;

const TAG_END: u32 = 0;
const TAG_CMDLINE: u32 = 1;
const TAG_MODULE: u32 = 3;
const TAG_MEMORY_MAP: u32 = 6;
const TAG_ACPI_OLD: u32 = 14;
const TAG_ACPI_NEW: u32 = 15;
/// Bytes of a tag's header (type, size).
const TAG_HEADER: u32 = 8;
/// Bytes of a memory-map entry we read (base, length, type); the loader
/// says how long its entries are, which may be more.
const MEMMAP_ENTRY_MIN: u32 = 20;

impl<'a> StartInfo<'a> {
    /// Parses the multiboot2 information block at `paddr`, copying every
    /// table and string out. The RSDP is the copy inside the block (the
    /// ACPI tags carry the structure itself, not its address).
    pub fn parse_multiboot2(
        mem: &impl PhysRead,
        paddr: u64,
        arena: &'a mut StringArena,
    ) -> Result<Self, StartInfoError> {
        let read = |at: u64, buf: &mut [u8]| {
            (at != 0 && mem.read(at, buf))
                .then_some(())
                .ok_or(StartInfoError::Unreadable(at))
        };
        let mut head = [0u8; 8];
        read(paddr, &mut head)?;
        let total = u32_at(&head, 0);
        if !(TAG_HEADER * 2..=MAX_INFO_SIZE).contains(&total) {
            return Err(StartInfoError::BadInfoSize(total));
        }
        let mut memmap = [NO_REGION; MAX_MEMMAP_ENTRIES];
        let mut memmap_len = None;
        let mut cmdline = None;
        let mut module_raw: [RawModule; MAX_MODULES] = [(0, 0, (0, 0)); MAX_MODULES];
        let mut modules_len = 0;
        let (mut rsdp_old, mut rsdp_new) = (0, 0);
        let mut at = TAG_HEADER;
        // Each tag takes at least 8 bytes: the loop ends within the block.
        while at + TAG_HEADER <= total {
            let tag_paddr = paddr + u64::from(at);
            read(tag_paddr, &mut head)?;
            let (kind, size) = (u32_at(&head, 0), u32_at(&head, 4));
            if size < TAG_HEADER || size > total - at {
                return Err(StartInfoError::BadTag(tag_paddr));
            }
            let body = tag_paddr + u64::from(TAG_HEADER);
            let body_len = u64::from(size - TAG_HEADER);
            match kind {
                TAG_END => break,
                TAG_CMDLINE => cmdline = Some(string_in(mem, body, body_len, arena)?),
                TAG_MODULE => {
                    if body_len < 8 {
                        return Err(StartInfoError::BadTag(tag_paddr));
                    }
                    read(body, &mut head)?;
                    let (start, end) = (u32_at(&head, 0), u32_at(&head, 4));
                    let len = end
                        .checked_sub(start)
                        .ok_or(StartInfoError::BadTag(tag_paddr))?;
                    let slot = module_raw
                        .get_mut(modules_len)
                        .ok_or(StartInfoError::TooManyModules(modules_len as u32 + 1))?;
                    let name = string_in(mem, body + 8, body_len - 8, arena)?;
                    *slot = (u64::from(start), u64::from(len), name);
                    modules_len += 1;
                }
                TAG_MEMORY_MAP => {
                    memmap_len = Some(memory_map(mem, tag_paddr, body_len, &mut memmap)?);
                }
                TAG_ACPI_OLD if body_len > 0 => rsdp_old = body,
                TAG_ACPI_NEW if body_len > 0 => rsdp_new = body,
                _ => {}
            }
            at = (at + size).next_multiple_of(8);
        }
        let memmap_len = memmap_len.ok_or(StartInfoError::NoMemoryMap)?;
        let arena: &'a StringArena = arena;
        let modules = resolve_modules(arena, &module_raw[..modules_len]);
        Ok(StartInfo {
            protocol: BootProtocol::Multiboot2,
            paddr,
            block_len: u64::from(total),
            version: 0,
            flags: 0,
            rsdp: if rsdp_new != 0 { rsdp_new } else { rsdp_old },
            cmdline: cmdline.map_or("", |range| arena_str(arena, range)),
            // The strings and the map lie inside the block.
            cmdline_span: (0, 0),
            memmap,
            memmap_len,
            memmap_span: (0, 0),
            modules,
            modules_len,
            modlist_span: (0, 0),
        })
    }
}

/// Copies the NUL-terminated string a tag carries at `paddr` (in the
/// `len` bytes of the tag left, which must hold its NUL) into the arena.
fn string_in(
    mem: &impl PhysRead,
    paddr: u64,
    len: u64,
    arena: &mut StringArena,
) -> Result<(usize, usize), StartInfoError> {
    let used = arena.used;
    let (range, with_nul) = read_cstr(mem, paddr, arena)?;
    if with_nul > len {
        arena.used = used;
        return Err(StartInfoError::BadCmdline(paddr));
    }
    Ok(range)
}

/// Fills `out` from the memory-map tag at `tag_paddr` with `body_len`
/// bytes after its header; the number of entries.
fn memory_map(
    mem: &impl PhysRead,
    tag_paddr: u64,
    body_len: u64,
    out: &mut [MemoryRegion; MAX_MEMMAP_ENTRIES],
) -> Result<usize, StartInfoError> {
    let body = tag_paddr + u64::from(TAG_HEADER);
    let mut e = [0u8; MEMMAP_ENTRY_MIN as usize];
    if body_len < 8 || !mem.read(body, &mut e[..8]) {
        return Err(StartInfoError::BadTag(tag_paddr));
    }
    let entry_size = u32_at(&e, 0);
    if entry_size < MEMMAP_ENTRY_MIN {
        return Err(StartInfoError::BadTag(tag_paddr));
    }
    let count = (body_len - 8) / u64::from(entry_size);
    if count > MAX_MEMMAP_ENTRIES as u64 {
        return Err(StartInfoError::TooManyMemmapEntries(count as u32));
    }
    for (i, slot) in out.iter_mut().take(count as usize).enumerate() {
        let at = body + 8 + i as u64 * u64::from(entry_size);
        if !mem.read(at, &mut e) {
            return Err(StartInfoError::Unreadable(at));
        }
        *slot = MemoryRegion {
            start: u64_at(&e, 0),
            len: u64_at(&e, 8),
            kind: MemoryType::from_raw(u32_at(&e, 16)),
        };
    }
    Ok(count as usize)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::test_memory::Mem;
    use std::vec::Vec;

    /// A multiboot2 block being built: tags appended 8-aligned.
    struct Block(Vec<u8>);

    impl Block {
        fn new() -> Self {
            Block(std::vec![0; 8])
        }
        fn tag(mut self, kind: u32, body: &[u8]) -> Self {
            self.0.extend(kind.to_le_bytes());
            self.0.extend((body.len() as u32 + 8).to_le_bytes());
            self.0.extend(body);
            while !self.0.len().is_multiple_of(8) {
                self.0.push(0);
            }
            self
        }
        /// Ends it and places it at `at` in 64 KiB of memory.
        fn place(self, at: usize) -> Mem {
            let mut b = self.tag(TAG_END, &[]).0;
            let total = b.len() as u32;
            b[..4].copy_from_slice(&total.to_le_bytes());
            let mut m = Mem(std::vec![0; 0x10000]);
            m.0[at..at + b.len()].copy_from_slice(&b);
            m
        }
    }

    fn mmap_body(entry_size: u32, entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(entry_size.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        for &(base, len, kind) in entries {
            let mut e = Vec::new();
            e.extend(base.to_le_bytes());
            e.extend(len.to_le_bytes());
            e.extend(kind.to_le_bytes());
            e.resize(entry_size as usize, 0);
            b.extend(e);
        }
        b
    }

    fn module_body(start: u32, end: u32, name: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(start.to_le_bytes());
        b.extend(end.to_le_bytes());
        b.extend(name.as_bytes());
        b.push(0);
        b
    }

    /// What GRUB hands over: a command line, a module, a memory map of
    /// 24-byte entries, and an ACPI 2.0 RSDP copy.
    fn grub_like() -> Block {
        Block::new()
            .tag(TAG_CMDLINE, b"loglevel=debug\0")
            .tag(TAG_MODULE, &module_body(0x8000, 0x8800, "disk0"))
            .tag(21, &[1, 2, 3, 4]) // load base address: ignored
            .tag(
                TAG_MEMORY_MAP,
                &mmap_body(
                    24,
                    &[
                        (0, 0x9_fc00, 1),
                        (0x10_0000, 0x7ff0_0000, 1),
                        (0xf000, 0x1000, 3),
                    ],
                ),
            )
            .tag(TAG_ACPI_NEW, b"RSD PTR \x01\x02")
    }

    #[test]
    fn parses_what_grub_hands_over() {
        let mem = grub_like().place(0x1000);
        let mut arena = StringArena::new();
        let si = StartInfo::parse_multiboot2(&mem, 0x1000, &mut arena).unwrap();
        assert_eq!(si.protocol, BootProtocol::Multiboot2);
        assert_eq!(si.cmdline, "loglevel=debug");
        assert_eq!(si.memory_map().len(), 3);
        assert_eq!(si.memory_map()[1].start, 0x10_0000);
        assert_eq!(si.memory_map()[1].kind, MemoryType::Ram);
        assert_eq!(si.memory_map()[2].kind, MemoryType::AcpiReclaimable);
        let m = si.modules()[0];
        assert_eq!((m.start, m.len, m.cmdline), (0x8000, 0x800, "disk0"));
        // The RSDP copy: right after the ACPI tag's header.
        let mut sig = [0u8; 8];
        assert!(mem.read(si.rsdp, &mut sig));
        assert_eq!(&sig, b"RSD PTR ");
        let total = u64::from(u32_at(&mem.0, 0x1000));
        let occupied: Vec<_> = si.occupied().collect();
        assert_eq!(occupied, [(0x1000, total), (0x8000, 0x800)]);
    }

    #[test]
    fn longer_memory_map_entries_are_read_by_their_size() {
        let mem = Block::new()
            .tag(
                TAG_MEMORY_MAP,
                &mmap_body(32, &[(0x1000, 0x2000, 1), (0x4000, 0x1000, 2)]),
            )
            .place(0x100);
        let mut arena = StringArena::new();
        let si = StartInfo::parse_multiboot2(&mem, 0x100, &mut arena).unwrap();
        assert_eq!(si.memory_map()[1].start, 0x4000);
        assert_eq!(si.memory_map()[1].kind, MemoryType::Reserved);
        assert_eq!(si.cmdline, "");
        assert_eq!(si.rsdp, 0);
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let parse =
            |mem: &Mem, at| StartInfo::parse_multiboot2(mem, at, &mut StringArena::new()).err();
        // No memory map.
        let mem = Block::new().tag(TAG_CMDLINE, b"x\0").place(0x100);
        assert_eq!(parse(&mem, 0x100), Some(StartInfoError::NoMemoryMap));
        // Sizes: too small, too large, a tag running past the end.
        let mut mem = grub_like().place(0x100);
        mem.0[0x100..0x104].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(parse(&mem, 0x100), Some(StartInfoError::BadInfoSize(4)));
        mem.0[0x100..0x104].copy_from_slice(&(MAX_INFO_SIZE + 1).to_le_bytes());
        assert_eq!(
            parse(&mem, 0x100),
            Some(StartInfoError::BadInfoSize(MAX_INFO_SIZE + 1))
        );
        let mut mem = grub_like().place(0x100);
        mem.0[0x10c..0x110].copy_from_slice(&0x1000u32.to_le_bytes());
        assert_eq!(parse(&mem, 0x100), Some(StartInfoError::BadTag(0x108)));
        let mut mem = grub_like().place(0x100);
        mem.0[0x10c..0x110].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(parse(&mem, 0x100), Some(StartInfoError::BadTag(0x108)));
        // A command line without its NUL inside the tag.
        let mem = Block::new().tag(TAG_CMDLINE, b"abc").place(0x100);
        assert_eq!(parse(&mem, 0x100), Some(StartInfoError::BadCmdline(0x110)));
        // A module ending before it starts; too many modules.
        let mem = Block::new()
            .tag(TAG_MODULE, &module_body(0x2000, 0x1000, ""))
            .place(0x100);
        assert_eq!(parse(&mem, 0x100), Some(StartInfoError::BadTag(0x108)));
        let mut b = grub_like();
        for _ in 0..MAX_MODULES {
            b = b.tag(TAG_MODULE, &module_body(0x8000, 0x8001, ""));
        }
        let mem = b.place(0x100);
        assert_eq!(
            parse(&mem, 0x100),
            Some(StartInfoError::TooManyModules(MAX_MODULES as u32 + 1))
        );
        // Memory-map entries too short, or too many.
        let mem = Block::new()
            .tag(TAG_MEMORY_MAP, &mmap_body(16, &[(0, 1, 1)]))
            .place(0x100);
        assert_eq!(parse(&mem, 0x100), Some(StartInfoError::BadTag(0x108)));
        let many = std::vec![(0, 0x1000, 1); MAX_MEMMAP_ENTRIES + 1];
        let mem = Block::new()
            .tag(TAG_MEMORY_MAP, &mmap_body(24, &many))
            .place(0x100);
        assert_eq!(
            parse(&mem, 0x100),
            Some(StartInfoError::TooManyMemmapEntries(
                MAX_MEMMAP_ENTRIES as u32 + 1
            ))
        );
        // Unreadable.
        assert_eq!(parse(&mem, 0), Some(StartInfoError::Unreadable(0)));
        assert_eq!(
            parse(&mem, 0xfffc),
            Some(StartInfoError::Unreadable(0xfffc))
        );
    }

    #[test]
    fn fuzz_multiboot2_parsing() {
        let mut run = host_fuzz::FuzzRun::new("multiboot2", 0x3b2, 5_000);
        let mut rng = run.rng();
        let good = grub_like().place(0x1000);
        let total = u32_at(&good.0, 0x1000) as usize;
        while run.another() {
            let mut mem = Mem(good.0.clone());
            for _ in 0..1 + rng.below(8) {
                let at = 0x1000 + rng.below(total as u64 + 8) as usize;
                if rng.one_in(2) {
                    mem.0[at] = rng.next_u64() as u8;
                } else {
                    let any = rng.next_u64() as u32;
                    let word = rng.pick(&[0, 1, 7, 8, 9, 24, 0xffff_ffff, any]);
                    mem.0[at & !3..(at & !3) + 4].copy_from_slice(&word.to_le_bytes());
                }
            }
            let mut arena = StringArena::new();
            if let Ok(si) = StartInfo::parse_multiboot2(&mem, 0x1000, &mut arena) {
                assert!(si.memory_map().len() <= MAX_MEMMAP_ENTRIES);
                assert!(si.modules().len() <= MAX_MODULES);
                assert!(si.cmdline.len() < crate::start_info::MAX_CMDLINE);
                assert!(si.block_len <= u64::from(MAX_INFO_SIZE));
                assert!(si.rsdp == 0 || (0x1000..0x1000 + si.block_len).contains(&si.rsdp));
            }
        }
    }
}

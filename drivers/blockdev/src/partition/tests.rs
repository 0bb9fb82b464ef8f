use super::gpt_field::*;
use super::images::*;
use super::*;
use host_fuzz::{FuzzRng, FuzzRun};
use std::format;
use std::vec;

fn geometry(block_size: usize, blocks: u64) -> Geometry {
    Geometry {
        logical_block_size: block_size as u32,
        physical_block_size: block_size as u32,
        blocks,
        volatile_write_cache: false,
        discard_granularity: None,
        max_discard_blocks: 0,
        max_write_zeroes_blocks: 0,
        max_transfer_bytes: 1 << 20,
        max_segments: 32,
        queues: 1,
        queue_depth: 1,
    }
}

/// Reads `image`'s table with a reader that holds the parser to its
/// promises (whole blocks, within the transfer limit, never past the
/// end) and fails reads of block `bad`.
fn parse_with(
    image: &[u8],
    geometry: &Geometry,
    bad: Option<u64>,
) -> Result<PartitionTable, TableError> {
    let size = geometry.logical_block_size as usize;
    let limit = MAX_READ_BYTES.min(geometry.max_transfer_bytes as usize);
    read_partition_table(geometry, |lba, buf| {
        assert!(
            !buf.is_empty() && buf.len() % size == 0,
            "{} bytes",
            buf.len()
        );
        assert!(buf.len() <= limit.max(size), "{} bytes", buf.len());
        let blocks = (buf.len() / size) as u64;
        assert!(lba + blocks <= geometry.blocks, "read past the disk");
        if bad.is_some_and(|b| (lba..lba + blocks).contains(&b)) {
            return false;
        }
        let at = lba as usize * size;
        buf.copy_from_slice(&image[at..at + buf.len()]);
        true
    })
}

fn parse(image: &[u8], block_size: usize) -> Result<PartitionTable, TableError> {
    let blocks = (image.len() / block_size) as u64;
    parse_with(image, &geometry(block_size, blocks), None)
}

/// `(number, start, blocks)` of the usable entries.
fn usable(table: &PartitionTable) -> Vec<(u32, u64, u64)> {
    let entries = table.entries.iter();
    entries
        .filter_map(|e| e.extent.ok().map(|x| (e.number, x.start, x.blocks)))
        .collect()
}

fn refused(table: &PartitionTable) -> Vec<(u32, EntryError)> {
    let entries = table.entries.iter();
    entries
        .filter_map(|e| e.extent.err().map(|why| (e.number, why)))
        .collect()
}

/// A 2048-block disk with a GPT of partitions 1 and 3, and them.
fn sample_gpt(block_size: usize) -> (Vec<u8>, Vec<(u32, u64, u64)>) {
    let mut image = vec![0; block_size * 2048];
    let first = 2 + gpt_array_blocks(block_size);
    let last = 2048 - 2 - gpt_array_blocks(block_size);
    write_gpt(
        &mut image,
        block_size,
        &[(first, first + 99), (0, 0), (first + 100, last)],
    );
    let partitions = vec![(1, first, 100), (3, first + 100, last - first - 99)];
    (image, partitions)
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    assert_eq!(crc32(b""), 0);
}

#[test]
fn a_gpt_numbers_its_partitions_by_entry_at_both_block_sizes() {
    for block_size in [512, 4096] {
        let (image, partitions) = sample_gpt(block_size);
        let table = parse(&image, block_size).unwrap();
        assert_eq!(table.scheme, Scheme::Gpt, "{block_size}");
        assert_eq!(usable(&table), partitions, "{block_size}");
        assert_eq!(table.entry(2), None, "an unused entry keeps its number");
        assert_eq!(
            table.entry(3).unwrap().extent.unwrap(),
            Extent {
                start: partitions[1].1,
                blocks: partitions[1].2
            }
        );
    }
}

#[test]
fn a_corrupt_primary_gpt_gives_way_to_the_backup_and_both_to_an_error() {
    /// A byte of the primary header or array flipped (at an offset from
    /// the block size), or a header field changed and sealed with fresh
    /// CRCs (to a value from the block size and the disk's blocks), so
    /// that the check named is the one that refuses it.
    enum Break {
        Flip(fn(usize) -> usize),
        Field(usize, usize, fn(usize, u64) -> u64),
    }
    let cases = [
        ("signature", Break::Flip(|s| s), GptError::Signature),
        ("header byte", Break::Flip(|s| s + 60), GptError::HeaderCrc),
        (
            "array byte",
            Break::Flip(|s| 2 * s + 40),
            GptError::ArrayCrc,
        ),
        (
            "header size 91",
            Break::Field(HEADER_SIZE, 4, |_, _| 91),
            GptError::HeaderSize,
        ),
        (
            "header size over the block",
            Break::Field(HEADER_SIZE, 4, |s, _| s as u64 + 1),
            GptError::HeaderSize,
        ),
        (
            "MyLBA",
            Break::Field(MY_LBA, 8, |_, _| 2),
            GptError::Misplaced,
        ),
        (
            "first usable 0",
            Break::Field(FIRST_USABLE, 8, |_, _| 0),
            GptError::UsableRange,
        ),
        (
            "first usable over the header",
            Break::Field(FIRST_USABLE, 8, |_, _| 1),
            GptError::UsableRange,
        ),
        (
            "last usable past the disk",
            Break::Field(LAST_USABLE, 8, |_, b| b),
            GptError::UsableRange,
        ),
        (
            "usable reversed",
            Break::Field(LAST_USABLE, 8, |s, _| gpt_array_blocks(s)),
            GptError::UsableRange,
        ),
        (
            "entry size 100",
            Break::Field(ENTRY_SIZE, 4, |_, _| 100),
            GptError::EntrySize,
        ),
        (
            "entry size 384",
            Break::Field(ENTRY_SIZE, 4, |_, _| 384),
            GptError::EntrySize,
        ),
        (
            "entry size 8192",
            Break::Field(ENTRY_SIZE, 4, |_, _| 8192),
            GptError::EntrySize,
        ),
        (
            "8193 entries",
            Break::Field(ENTRY_COUNT, 4, |_, _| 8193),
            GptError::ArrayTooLarge,
        ),
        (
            "array at 0",
            Break::Field(ARRAY_LBA, 8, |_, _| 0),
            GptError::ArrayPlace,
        ),
        (
            "array over the header",
            Break::Field(ARRAY_LBA, 8, |_, _| 1),
            GptError::ArrayPlace,
        ),
        (
            "array in the usable range",
            Break::Field(ARRAY_LBA, 8, |s, _| gpt_array_blocks(s) + 2),
            GptError::ArrayPlace,
        ),
        (
            "array past the disk",
            Break::Field(ARRAY_LBA, 8, |_, b| b - 1),
            GptError::ArrayPlace,
        ),
        (
            "array at the end of u64",
            Break::Field(ARRAY_LBA, 8, |_, _| u64::MAX),
            GptError::ArrayPlace,
        ),
    ];
    for block_size in [512, 4096] {
        let (good, partitions) = sample_gpt(block_size);
        let blocks = 2048;
        for (name, breaks, error) in &cases {
            let mut image = good.clone();
            match breaks {
                Break::Flip(at) => image[at(block_size)] ^= 1,
                Break::Field(field, len, value) => {
                    let value = value(block_size, blocks);
                    set_field(&mut image, block_size, 1, *field, *len, value);
                    seal_gpt(&mut image, block_size, 1);
                }
            }
            let table = parse(&image, block_size).unwrap();
            assert_eq!(
                table.scheme,
                Scheme::GptBackup(*error),
                "{name} {block_size}"
            );
            assert_eq!(usable(&table), partitions, "{name} {block_size}");
            // The backup's header broken too: no table.
            image[(blocks as usize - 1) * block_size + 60] ^= 1;
            assert_eq!(
                parse(&image, block_size),
                Err(TableError::Gpt {
                    primary: *error,
                    backup: GptError::HeaderCrc
                }),
                "{name} {block_size}"
            );
        }
        // The backup's usable range may not start on block 0 either.
        let mut image = good.clone();
        image[block_size] ^= 1;
        set_field(&mut image, block_size, blocks - 1, FIRST_USABLE, 8, 0);
        seal_gpt(&mut image, block_size, blocks - 1);
        let error = TableError::Gpt {
            primary: GptError::Signature,
            backup: GptError::UsableRange,
        };
        assert_eq!(parse(&image, block_size), Err(error));
        // An unreadable primary header or array: the backup is used.
        for bad in [1, 2] {
            let table = parse_with(&good, &geometry(block_size, blocks), Some(bad)).unwrap();
            let error = GptError::Unreadable { lba: bad };
            assert_eq!(table.scheme, Scheme::GptBackup(error));
        }
    }
}

#[test]
fn gpt_entries_of_256_bytes_are_read() {
    let size = 512;
    let (mut image, partitions) = sample_gpt(size);
    for header in [1, 2047] {
        let array = if header == 1 {
            2
        } else {
            2047 - gpt_array_blocks(size)
        };
        let entries = &mut image[array as usize * size..][..128 * 128];
        let copy = entries.to_vec();
        entries.fill(0);
        // Entries 0 and 2 into 256-byte slots 0 and 2.
        entries[..128].copy_from_slice(&copy[..128]);
        entries[512..640].copy_from_slice(&copy[256..384]);
        set_field(&mut image, size, header, ENTRY_SIZE, 4, 256);
        set_field(&mut image, size, header, ENTRY_COUNT, 4, 64);
        seal_gpt(&mut image, size, header);
    }
    let table = parse(&image, size).unwrap();
    assert_eq!(table.scheme, Scheme::Gpt);
    assert_eq!(usable(&table), partitions);
}

#[test]
fn reads_keep_to_the_device_transfer_limit() {
    for (block_size, limit) in [(512, 512), (512, 1536), (4096, 4096), (4096, 12288)] {
        let (image, partitions) = sample_gpt(block_size);
        let geometry = Geometry {
            max_transfer_bytes: limit,
            ..geometry(block_size, 2048)
        };
        let table = parse_with(&image, &geometry, None).unwrap();
        assert_eq!(usable(&table), partitions, "{block_size} {limit}");
    }
}

#[test]
fn unusable_gpt_entries_are_refused_with_their_reason() {
    let mut image = vec![0; 512 * 2048];
    // Usable blocks 34-2013.
    write_gpt(
        &mut image,
        512,
        &[
            (100, 199),
            (300, 250),
            (1000, 1999),
            (1500, 1600),
            (10, 50),
            (2000, 2048),
            (1990, 2020),
            (200, 299),
            (0, u64::MAX),
        ],
    );
    let table = parse(&image, 512).unwrap();
    assert_eq!(usable(&table), [(1, 100, 100), (8, 200, 100)]);
    assert_eq!(
        refused(&table),
        [
            (2, EntryError::Empty),
            (3, EntryError::Overlaps { other: 4 }),
            (4, EntryError::Overlaps { other: 3 }),
            (5, EntryError::OutsideUsable),
            (6, EntryError::OutsideDisk),
            (7, EntryError::OutsideUsable),
            (9, EntryError::OutsideDisk),
        ]
    );
}

#[test]
fn every_partition_of_a_nest_of_overlaps_is_refused() {
    let mut image = vec![0; 512 * 2048];
    write_gpt(
        &mut image,
        512,
        &[
            (100, 999),
            (200, 299),
            (500, 599),
            (1000, 1099),
            (1099, 1200),
        ],
    );
    let table = parse(&image, 512).unwrap();
    assert_eq!(usable(&table), []);
    assert_eq!(
        refused(&table),
        [
            (1, EntryError::Overlaps { other: 2 }),
            (2, EntryError::Overlaps { other: 1 }),
            (3, EntryError::Overlaps { other: 1 }),
            (4, EntryError::Overlaps { other: 5 }),
            (5, EntryError::Overlaps { other: 4 }),
        ]
    );
}

#[test]
fn mbr_primaries_are_numbered_by_slot_at_both_block_sizes() {
    for block_size in [512, 4096] {
        let mut image = vec![0; block_size * 1024];
        let records = [(0x83, 1, 99), (0, 0, 0), (0x83, 100, 200), (0x07, 600, 424)];
        write_mbr(&mut image, block_size, 0, &records);
        let table = parse(&image, block_size).unwrap();
        assert_eq!(table.scheme, Scheme::Mbr);
        assert_eq!(usable(&table), [(1, 1, 99), (3, 100, 200), (4, 600, 424)]);
        assert_eq!(refused(&table), []);
    }
}

/// A 4096-block disk: primary 1, extended 2 (blocks 1024-4095, of `kind`)
/// holding EBRs at 1024, 1536 and 2560 with logicals 5, 6 and 7.
fn sample_mbr(block_size: usize, kind: u8) -> Vec<u8> {
    let mut image = vec![0; block_size * 4096];
    write_mbr(
        &mut image,
        block_size,
        0,
        &[(0x83, 1, 1023), (kind, 1024, 3072)],
    );
    write_mbr(
        &mut image,
        block_size,
        1024,
        &[(0x83, 1, 511), (0x05, 512, 1024)],
    );
    write_mbr(
        &mut image,
        block_size,
        1536,
        &[(0x83, 1, 1023), (0x85, 1536, 9)],
    );
    write_mbr(&mut image, block_size, 2560, &[(0x83, 2, 100)]);
    image
}

#[test]
fn logical_partitions_follow_the_ebr_chain_from_5() {
    for (block_size, kind) in [(512, 0x05), (4096, 0x0f), (512, 0x85)] {
        let table = parse(&sample_mbr(block_size, kind), block_size).unwrap();
        assert_eq!(table.scheme, Scheme::Mbr);
        assert_eq!(
            usable(&table),
            [
                (1, 1, 1023),
                (5, 1025, 511),
                (6, 1537, 1023),
                (7, 2562, 100)
            ]
        );
        assert_eq!(refused(&table), [(2, EntryError::Extended)]);
    }
}

#[test]
fn broken_ebr_chains_make_the_table_unusable() {
    let ebr = |lba, why| Err(TableError::Ebr { lba, why });
    let mut looping = sample_mbr(512, 0x05);
    write_mbr(&mut looping, 512, 2560, &[(0x83, 2, 100), (0x05, 0, 512)]);
    // 128 EBRs read, three to a round: the next would be the third.
    assert_eq!(parse(&looping, 512), ebr(2560, EbrError::TooMany));
    let mut unsigned = sample_mbr(512, 0x05);
    unsigned[1536 * 512 + 511] = 0;
    assert_eq!(parse(&unsigned, 512), ebr(1536, EbrError::Signature));
    let mut outside = sample_mbr(512, 0x05);
    write_mbr(&mut outside, 512, 2560, &[(0x83, 2, 100), (0x05, 3072, 1)]);
    assert_eq!(parse(&outside, 512), ebr(2560, EbrError::LinkOutside));
    let failing = sample_mbr(512, 0x05);
    let result = parse_with(&failing, &geometry(512, 4096), Some(1536));
    assert_eq!(result, Err(TableError::Read { lba: 1536 }));
}

#[test]
fn partitions_over_the_table_or_outside_their_container_are_refused() {
    let mut image = sample_mbr(512, 0x05);
    // The container ends at 3072; logical 5 reaches past it; 6 covers
    // the next EBR; 7 starts on its own EBR.
    write_mbr(&mut image, 512, 1024, &[(0x83, 1, 2100), (0x05, 512, 1024)]);
    write_mbr(&mut image, 512, 1536, &[(0x83, 1, 1100), (0x05, 1536, 9)]);
    write_mbr(&mut image, 512, 2560, &[(0x83, 0, 100)]);
    // Primary 1 starts on the MBR; primary 3 covers the first EBR.
    let records = [(0x83, 0, 10), (0x05, 1024, 2048), (0x83, 1000, 30)];
    write_mbr(&mut image, 512, 0, &records);
    let table = parse(&image, 512).unwrap();
    assert_eq!(usable(&table), []);
    assert_eq!(
        refused(&table),
        [
            (1, EntryError::CoversTable),
            (2, EntryError::Extended),
            (3, EntryError::CoversTable),
            (5, EntryError::OutsideExtended),
            (6, EntryError::CoversTable),
            (7, EntryError::CoversTable),
        ]
    );
    // An extended partition on block 0 is not followed.
    let mut image = vec![0; 512 * 1024];
    write_mbr(&mut image, 512, 0, &[(0x05, 0, 1024), (0x83, 1, 10)]);
    let table = parse(&image, 512).unwrap();
    assert_eq!(refused(&table), [(1, EntryError::CoversTable)]);
    assert_eq!(usable(&table), [(2, 1, 10)]);
}

#[test]
fn mbr_entries_with_no_blocks_past_the_disk_or_overlapping_are_refused() {
    let mut image = sample_mbr(512, 0x05);
    let records = [
        (0x83, 10, 0),
        (0x05, 1024, 3072),
        (0x83, 4000, 100),
        (0x83, 1100, 10),
    ];
    write_mbr(&mut image, 512, 0, &records);
    let table = parse(&image, 512).unwrap();
    assert_eq!(usable(&table), [(6, 1537, 1023), (7, 2562, 100)]);
    assert_eq!(
        refused(&table),
        [
            (1, EntryError::Empty),
            (2, EntryError::Extended),
            (3, EntryError::OutsideDisk),
            (4, EntryError::Overlaps { other: 5 }),
            (5, EntryError::Overlaps { other: 4 }),
        ]
    );
}

#[test]
fn blocks_that_hold_no_table_give_no_partitions() {
    let none = |image: &[u8], blocks| {
        let table = parse_with(image, &geometry(512, blocks), None).unwrap();
        assert_eq!((table.scheme, table.entries.len()), (Scheme::None, 0));
    };
    none(&[0; 512 * 16], 16);
    none(&[], 0);
    // A file system's boot sector: signed, but no boot indicator is 0 or
    // 0x80.
    let mut boot_sector = vec![0; 512 * 16];
    write_mbr(&mut boot_sector, 512, 0, &[(0x83, 1, 10)]);
    boot_sector[MBR_RECORDS] = 0x12;
    none(&boot_sector, 16);
    // Without the signature, a GPT is not looked for either.
    let (mut gpt, _) = sample_gpt(512);
    gpt[510] = 0;
    none(&gpt, 2048);
}

#[test]
fn read_failures_and_bad_block_sizes_are_errors() {
    let (image, _) = sample_gpt(512);
    let failed = parse_with(&image, &geometry(512, 2048), Some(0));
    assert_eq!(failed, Err(TableError::Read { lba: 0 }));
    for size in [256, 520, 32768] {
        let result = parse_with(&image, &geometry(size, 8), None);
        assert_eq!(result, Err(TableError::BlockSize(size as u32)));
    }
    // A disk too small for either header.
    let mut tiny = vec![0; 512];
    write_mbr(&mut tiny, 512, 0, &[(0xee, 1, 1)]);
    let error = GptError::NoBlock;
    let both = TableError::Gpt {
        primary: error,
        backup: error,
    };
    assert_eq!(parse(&tiny, 512), Err(both));
}

#[test]
fn the_console_line_names_each_partition_in_512_byte_sectors() {
    let mut image = vec![0; 4096 * 64];
    write_gpt(&mut image, 4096, &[(6, 9), (8, 20), (30, 40), (50, 49)]);
    let line = format!("{}", parse(&image, 4096).unwrap());
    assert_eq!(
        line,
        "GPT: p1 refused (overlaps partition 2), p2 refused (overlaps partition 1), \
         p3 240+88, p4 refused (has no blocks)"
    );
    image[4096 + 60] ^= 1;
    let line = format!("{}", parse(&image, 4096).unwrap());
    assert!(line.starts_with("GPT from the backup header (primary: header CRC32 mismatch): p1"));
    // The line the `partitions` scenario looks for has this shape.
    let line = format!("{}", parse(&sample_mbr(512, 0x05), 512).unwrap());
    assert_eq!(
        line,
        "MBR: p1 1+1023, p2 refused (is an extended partition, served through its logical \
         partitions), p5 1025+511, p6 1537+1023, p7 2562+100"
    );
    let mut empty = vec![0; 512 * 128];
    write_gpt(&mut empty, 512, &[]);
    assert_eq!(
        format!("{}", parse(&empty, 512).unwrap()),
        "GPT, no partitions"
    );
    assert_eq!(
        format!("{}", parse(&[0; 512], 512).unwrap()),
        "no partition table"
    );
    let error = TableError::Ebr {
        lba: 7,
        why: EbrError::TooMany,
    };
    assert_eq!(
        format!("{error}"),
        "MBR extended boot record at block 7: more than 128 in the chain (a loop?)"
    );
}

/// A value near an edge a parser might get wrong.
fn hostile(rng: &mut FuzzRng, blocks: u64) -> u64 {
    let edges = [
        0,
        1,
        2,
        blocks - 1,
        blocks,
        blocks + 1,
        u64::from(u32::MAX),
        u64::MAX,
    ];
    match rng.below(3) {
        0 => rng.pick(&edges),
        1 => rng.below(blocks + 2),
        _ => rng.next_u64(),
    }
}

/// A table that mostly makes sense: a GPT, or an MBR with an EBR chain.
fn plausible_table(rng: &mut FuzzRng, image: &mut [u8], size: usize, blocks: u64) {
    let spot = |rng: &mut FuzzRng| rng.below(blocks + 8);
    if rng.one_in(2) && blocks > 2 + 2 * gpt_array_blocks(size) {
        let partitions: Vec<(u64, u64)> = (0..rng.below(8))
            .map(|_| {
                let first = spot(rng);
                (first, first + rng.below(blocks / 2))
            })
            .collect();
        write_gpt(image, size, &partitions);
        return;
    }
    let record = |rng: &mut FuzzRng| {
        let kind = rng.pick(&[0x83, 0x83, 0x05, 0x0f, 0x85, 0, 0xee]);
        (kind, spot(rng) as u32, rng.below(blocks) as u32)
    };
    let primaries: Vec<_> = (0..4).map(|_| record(rng)).collect();
    write_mbr(image, size, 0, &primaries);
    // Chains from the extended partitions' first blocks, their links
    // anywhere (a loop, now and then).
    for &(kind, start, _) in &primaries {
        let mut ebr = u64::from(start);
        if !EXTENDED_TYPES.contains(&kind) {
            continue;
        }
        for _ in 0..rng.below(6) {
            if ebr >= blocks {
                break;
            }
            let next = rng.below(blocks / 2 + 1) as u32;
            let link = (rng.pick(&[0x05, 0x05, 0x85, 0]), next, 1);
            let data = (
                rng.pick(&[0x83, 0x83, 0, 0x05]),
                rng.below(8) as u32,
                rng.below(blocks / 4) as u32,
            );
            write_mbr(image, size, ebr, &[data, link]);
            ebr = u64::from(start) + u64::from(next);
        }
    }
}

/// Garbles the image: bytes, then sometimes header fields sealed with
/// fresh CRCs, so checks after the CRCs are reached too.
fn garble(rng: &mut FuzzRng, image: &mut [u8], size: usize, blocks: u64) {
    for _ in 0..rng.below(4) {
        // Mostly where the tables are: the first blocks and the last.
        let anywhere = rng.below(blocks);
        let block = rng.pick(&[0, 1, 2, blocks - 1, anywhere]).min(blocks - 1);
        let at = block as usize * size + rng.below(size as u64) as usize;
        image[at] = rng.next_u64() as u8;
    }
    if rng.one_in(2) && blocks > 1 {
        let header = rng.pick(&[1, blocks - 1]);
        for _ in 0..rng.below(3) {
            let fields = [
                (HEADER_SIZE, 4),
                (MY_LBA, 8),
                (FIRST_USABLE, 8),
                (LAST_USABLE, 8),
                (ARRAY_LBA, 8),
                (ENTRY_COUNT, 4),
                (ENTRY_SIZE, 4),
            ];
            let (field, len) = rng.pick(&fields);
            set_field(image, size, header, field, len, hostile(rng, blocks));
        }
        seal_gpt(image, size, header);
    }
}

#[test]
fn fuzz_partition_tables() {
    let mut run = FuzzRun::new("partition tables", 0x9a27_7ab1, 3_000);
    let mut rng = run.rng();
    while run.another() {
        let size = rng.pick(&[512, 512, 4096]);
        let blocks = 1 + rng.below(if size == 512 { 400 } else { 80 });
        let mut image = vec![0; size * blocks as usize];
        if rng.one_in(8) {
            rng.fill(&mut image[..size]);
            image[510..512].copy_from_slice(&[0x55, 0xaa]);
        } else {
            plausible_table(&mut rng, &mut image, size, blocks);
        }
        garble(&mut rng, &mut image, size, blocks);
        let geometry = Geometry {
            max_transfer_bytes: rng.pick(&[512, 4096, 1536, 1 << 20]),
            ..geometry(size, blocks)
        };
        let bad = rng.one_in(20).then(|| rng.below(blocks));
        let Ok(table) = parse_with(&image, &geometry, bad) else {
            continue;
        };
        let _ = format!("{table}");
        let numbers: Vec<u32> = table.entries.iter().map(|e| e.number).collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
        assert!(
            numbers.iter().all(|&n| (1..=8192).contains(&n)),
            "{numbers:?}"
        );
        let found: Vec<Extent> = table.entries.iter().filter_map(|e| e.extent.ok()).collect();
        for (i, a) in found.iter().enumerate() {
            assert!(
                a.blocks > 0 && a.start > 0 && a.end() <= blocks,
                "{a:?} on {blocks}"
            );
            for b in &found[i + 1..] {
                assert!(a.end() <= b.start || b.end() <= a.start, "{a:?} {b:?}");
            }
        }
    }
}

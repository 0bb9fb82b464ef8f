//! `job=disk-selftest` and `job=disk-bench`: prove the drivers on real
//! (emulated) hardware, and measure them.

use crate::arch::clock;
use crate::storage::{Buffer, NamedDisk, REQUEST_DEADLINE_NS, open_whole, run_sync};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use blockdev::{Completion, Geometry, QueueHandle, Request, Segment, SubmitError};
use drivers::hal::PAGE_SIZE;
use test_pattern::{first_mismatch, pattern_byte};

/// Bytes of the large scatter-gather transfer.
const LARGE_IO: usize = 1 << 20;

fn fill(buf: &mut Buffer, seed: u32, len: usize) {
    for (i, b) in buf.bytes()[..len].iter_mut().enumerate() {
        *b = pattern_byte(seed, i / PAGE_SIZE, i % PAGE_SIZE);
    }
}

fn check(buf: &mut Buffer, at: usize, seed: u32, len: usize) -> Result<(), String> {
    let bytes = &buf.bytes()[at..at + len];
    for (page, chunk) in bytes.chunks(PAGE_SIZE).enumerate() {
        if let Some(offset) = first_mismatch(seed, page, chunk) {
            return Err(format!(
                "data differs at byte {}",
                page * PAGE_SIZE + offset
            ));
        }
    }
    Ok(())
}

/// `pages` page-sized segments of `buf` in reverse page order, merged into
/// fewer, larger ones when the device takes fewer segments.
fn scattered(buf: &Buffer, bytes: usize, max_segments: usize) -> Vec<Segment> {
    let pages = bytes / PAGE_SIZE;
    let per_segment = pages.div_ceil(max_segments.max(1));
    (0..pages.div_ceil(per_segment))
        .map(|i| {
            let first = i * per_segment;
            let count = per_segment.min(pages - first);
            (first, count)
        })
        .rev()
        .map(|(first, count)| Segment {
            phys: buf.phys(first * PAGE_SIZE),
            len: (count * PAGE_SIZE) as u32,
        })
        .collect()
}

/// One disk's self-test; Ok lists what was checked.
fn selftest(disk: &NamedDisk, seed: u32) -> Result<String, String> {
    let mut queue = open_whole(disk)?;
    let dev = &mut queue;
    let g: Geometry = dev.geometry();
    let bs = g.logical_block_size as usize;
    let mut done = Vec::new();
    let large = LARGE_IO.min(g.max_transfer_bytes as usize) / PAGE_SIZE * PAGE_SIZE;
    if g.blocks < (large / bs) as u64 * 4 {
        return Err(format!("{} blocks is too small to test", g.blocks));
    }
    let mut wbuf = Buffer::new(large + PAGE_SIZE)?;
    let mut rbuf = Buffer::new(large + PAGE_SIZE)?;

    // 1. A large transfer written from scattered pages, read back into one run.
    let lba = (large / bs) as u64;
    let segments = scattered(&wbuf, large, usize::from(g.max_segments));
    fill(&mut wbuf, seed, large);
    run_sync(
        dev,
        1,
        Request::Write {
            lba,
            segments: &segments,
        },
    )
    .map_err(|e| format!("large write: {e}"))?;
    let whole = [Segment {
        phys: rbuf.phys(0),
        len: large as u32,
    }];
    run_sync(
        dev,
        2,
        Request::Read {
            lba,
            segments: &whole,
        },
    )
    .map_err(|e| format!("large read: {e}"))?;
    // The disk took the segments in list order, so the contiguous
    // read-back holds them one after another.
    let mut at = 0;
    for s in &segments {
        let (from, len) = ((s.phys - wbuf.phys(0)) as usize, s.len as usize);
        if rbuf.bytes()[at..at + len] != wbuf.bytes()[from..from + len] {
            return Err(format!(
                "large read differs in the piece written from buffer offset {from:#x}"
            ));
        }
        at += len;
    }
    done.push(format!(
        "{} KiB in {} segments",
        large / 1024,
        segments.len()
    ));

    // 2. 512-byte aligned but not 4 KiB aligned: odd block, buffer at +512.
    if bs == 512 {
        let (lba, len) = (7, 3 * 512);
        fill(&mut wbuf, seed + 1, PAGE_SIZE);
        let src = wbuf.bytes()[..len].to_vec();
        wbuf.bytes()[512..512 + len].copy_from_slice(&src);
        run_sync(
            dev,
            3,
            Request::Write {
                lba,
                segments: &[Segment {
                    phys: wbuf.phys(512),
                    len: len as u32,
                }],
            },
        )
        .map_err(|e| format!("unaligned write: {e}"))?;
        run_sync(
            dev,
            4,
            Request::Read {
                lba,
                segments: &[Segment {
                    phys: rbuf.phys(1024),
                    len: len as u32,
                }],
            },
        )
        .map_err(|e| format!("unaligned read: {e}"))?;
        if rbuf.bytes()[1024..1024 + len] != src[..] {
            return Err("unaligned read-back differs".into());
        }
        done.push("unaligned 1.5 KiB".into());
    }

    // 3. The last block.
    let last = g.blocks - 1;
    fill(&mut wbuf, seed + 2, bs);
    run_sync(
        dev,
        5,
        Request::Write {
            lba: last,
            segments: &[Segment {
                phys: wbuf.phys(0),
                len: bs as u32,
            }],
        },
    )
    .map_err(|e| format!("last-block write: {e}"))?;
    run_sync(
        dev,
        6,
        Request::Read {
            lba: last,
            segments: &[Segment {
                phys: rbuf.phys(0),
                len: bs as u32,
            }],
        },
    )
    .map_err(|e| format!("last-block read: {e}"))?;
    check(&mut rbuf, 0, seed + 2, bs).map_err(|e| format!("last block: {e}"))?;
    done.push(format!("last block {last}"));

    // 4. Beyond the end: an error, not a hang.
    let beyond = [Segment {
        phys: rbuf.phys(0),
        len: bs as u32,
    }];
    match run_sync(
        dev,
        7,
        Request::Read {
            lba: g.blocks,
            segments: &beyond,
        },
    ) {
        Ok(()) => return Err("read beyond the end succeeded".into()),
        Err(e) => done.push(format!("beyond end refused ({e})")),
    }

    // 5. Flush.
    run_sync(dev, 8, Request::Flush).map_err(|e| format!("flush: {e}"))?;
    done.push("flush".into());

    // 6. Write zeroes over written data.
    if g.max_write_zeroes_blocks >= 8 {
        run_sync(dev, 9, Request::WriteZeroes { lba, blocks: 8 })
            .map_err(|e| format!("write-zeroes: {e}"))?;
        run_sync(
            dev,
            10,
            Request::Read {
                lba,
                segments: &[Segment {
                    phys: rbuf.phys(0),
                    len: 8 * bs as u32,
                }],
            },
        )
        .map_err(|e| format!("read after write-zeroes: {e}"))?;
        if rbuf.bytes()[..8 * bs].iter().any(|&b| b != 0) {
            return Err("write-zeroes left data behind".into());
        }
        done.push("write-zeroes".into());
    }

    // 7. Discard.
    if let Some(granularity) = g.discard_granularity {
        let blocks = u64::from(granularity.max(8));
        run_sync(dev, 11, Request::Discard { lba: 0, blocks })
            .map_err(|e| format!("discard: {e}"))?;
        done.push("discard".into());
    }
    Ok(done.join(", "))
}

/// Runs the self-test on every disk; false if any failed (or none exist).
pub fn selftest_all(disks: &[NamedDisk]) -> bool {
    let mut failed = 0;
    for (i, disk) in disks.iter().enumerate() {
        let g = disk.disk.geometry();
        log::info!(
            "disk-selftest: {}: {} blocks of {} bytes ({} MiB), write cache {}, discard {}",
            disk.name,
            g.blocks,
            g.logical_block_size,
            (g.blocks * u64::from(g.logical_block_size)) >> 20,
            if g.volatile_write_cache {
                "volatile"
            } else {
                "none"
            },
            if g.discard_granularity.is_some() {
                "yes"
            } else {
                "no"
            },
        );
        let start = clock::now_ns();
        match selftest(disk, 100 * i as u32 + 1) {
            Ok(what) => log::info!(
                "disk-selftest: {}: PASS in {} ms ({what})",
                disk.name,
                (clock::now_ns() - start) / 1_000_000
            ),
            Err(why) => {
                log::error!("disk-selftest: {}: FAIL: {why}", disk.name);
                failed += 1;
            }
        }
    }
    log::info!("disk-selftest: {} disk(s), {failed} failed", disks.len());
    failed == 0 && !disks.is_empty()
}

/// How long each benchmark case runs.
const BENCH_NS: u64 = 1_000_000_000;

/// A small xorshift generator for random block addresses.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs `depth` requests of `bytes` at a time for BENCH_NS; returns
/// completed requests per second.
fn bench_case(
    dev: &mut QueueHandle,
    write: bool,
    random: bool,
    bytes: usize,
    depth: usize,
) -> Result<u64, String> {
    let g = dev.geometry();
    let depth = depth.min(usize::from(g.queue_depth.saturating_sub(1)).max(1));
    let blocks_per_io = (bytes / g.logical_block_size as usize) as u64;
    let span = (g.blocks / blocks_per_io)
        .min((1 << 30) / bytes as u64)
        .max(1);
    let buf = Buffer::new(bytes * depth)?;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut next_seq = 0u64;
    let mut issue = |dev: &mut QueueHandle, slot: usize| -> Result<(), String> {
        let index = if random {
            rng.next() % span
        } else {
            let i = next_seq % span;
            next_seq += 1;
            i
        };
        let segments = [Segment {
            phys: buf.phys(slot * bytes),
            len: bytes as u32,
        }];
        let lba = index * blocks_per_io;
        let request = if write {
            Request::Write {
                lba,
                segments: &segments,
            }
        } else {
            Request::Read {
                lba,
                segments: &segments,
            }
        };
        match dev.submit(slot as u64, request) {
            Ok(()) => Ok(()),
            Err(SubmitError::QueueFull) => Err("queue full at the advertised depth".into()),
            Err(e) => Err(format!("{e:?}")),
        }
    };
    for slot in 0..depth {
        issue(dev, slot)?;
    }
    let start = clock::now_ns();
    let mut completed = 0u64;
    let mut in_flight = depth;
    let mut done = [Completion::default(); 64];
    while in_flight > 0 {
        let n = dev.poll(&mut done);
        let running = clock::now_ns() - start < BENCH_NS;
        for c in &done[..n] {
            c.result.map_err(|e| format!("{e:?}"))?;
            completed += 1;
            if running {
                issue(dev, c.tag as usize)?;
            } else {
                in_flight -= 1;
            }
        }
        if clock::now_ns() - start > BENCH_NS + REQUEST_DEADLINE_NS {
            return Err("requests stopped completing".into());
        }
    }
    let elapsed = clock::now_ns() - start;
    Ok(completed * 1_000_000_000 / elapsed.max(1))
}

/// Benchmarks every disk and prints one table.
pub fn bench_all(disks: &[NamedDisk]) -> bool {
    log::info!(
        "disk-bench: each case runs {} ms; IOPS for 4 KiB, MiB/s for 1 MiB",
        BENCH_NS / 1_000_000
    );
    log::info!(
        "disk-bench: {:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "device",
        "rr4k-qd1",
        "rr4k-qd32",
        "rw4k-qd1",
        "rw4k-qd32",
        "seqrd-1m",
        "seqwr-1m"
    );
    let mut ok = true;
    for disk in disks {
        let mut queue = match open_whole(disk) {
            Ok(queue) => queue,
            Err(e) => {
                log::error!("disk-bench: {}: {e}", disk.name);
                ok = false;
                continue;
            }
        };
        let dev = &mut queue;
        let cases = [
            (false, true, 4096, 1),
            (false, true, 4096, 32),
            (true, true, 4096, 1),
            (true, true, 4096, 32),
            (false, false, LARGE_IO, 4),
            (true, false, LARGE_IO, 4),
        ];
        let mut cells = Vec::new();
        for (write, random, bytes, depth) in cases {
            let bytes = if bytes == LARGE_IO {
                LARGE_IO.min(dev.geometry().max_transfer_bytes as usize)
            } else {
                bytes
            };
            match bench_case(dev, write, random, bytes, depth) {
                Ok(per_sec) if bytes == 4096 => cells.push(format!("{per_sec}")),
                Ok(per_sec) => cells.push(format!("{}", (per_sec * bytes as u64) >> 20)),
                Err(e) => {
                    log::error!("disk-bench: {}: {e}", disk.name);
                    cells.push("error".into());
                    ok = false;
                }
            }
        }
        log::info!(
            "disk-bench: {:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            disk.name,
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5]
        );
    }
    ok && !disks.is_empty()
}

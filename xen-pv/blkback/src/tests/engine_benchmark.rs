//! The ring engine under load on the host: the simulated blkfront sends
//! batches of reads and writes to a vbd over a null disk, for every shape
//! of request (4 KiB and 1 MiB, direct and indirect segments, persistent
//! grants on and off, zero-copy and through bounce buffers). `cargo test` checks that the engine's steady state
//! allocates nothing; `make bench-engine` measures requests per second on
//! one core (the engine, the simulated Xen and the simulated frontend all
//! run on this thread) and allocations per request.

use std::time::{Duration, Instant};

use super::*;

/// Guest requests in flight at once: each batch is sent, then served to
/// the last response.
const REQUESTS_PER_BATCH: u64 = 4;

/// 4 ring pages (128 entries): a batch of 1 MiB requests split into direct
/// ring requests (4 x 24) fits.
const BENCH_RING_PAGE_ORDER: u32 = 2;

/// The shape of every guest request of a run.
#[derive(Clone, Copy, Debug)]
struct RequestShape {
    /// 4 KiB pages each request moves.
    pages: u16,
    /// Segments listed in an indirect page; otherwise split, as blkfront
    /// does without indirect descriptors, into ring requests of at most
    /// 11 segments.
    indirect: bool,
    persistent: bool,
    /// Served through bounce buffers ([`DataPath::Bounce`]).
    bounce: bool,
}

impl RequestShape {
    fn every() -> impl Iterator<Item = RequestShape> {
        [false, true].into_iter().flat_map(|bounce| {
            [1, 256].into_iter().flat_map(move |pages| {
                [false, true].into_iter().flat_map(move |indirect| {
                    [false, true].map(|persistent| RequestShape {
                        pages,
                        indirect,
                        persistent,
                        bounce,
                    })
                })
            })
        })
    }

    fn bytes(self) -> u64 {
        u64::from(self.pages) * PAGE_SIZE as u64
    }

    fn size_label(self) -> &'static str {
        if self.pages == 1 { "4 KiB" } else { "1 MiB" }
    }

    fn segments_label(self) -> &'static str {
        if self.indirect { "indirect" } else { "direct" }
    }

    fn persistent_label(self) -> &'static str {
        if self.persistent { "on" } else { "off" }
    }

    fn data_path_label(self) -> &'static str {
        if self.bounce { "bounce" } else { "zero-copy" }
    }
}

/// A connected vbd over the null disk, and one batch of requests of
/// `shape` in ring form, half writes and half reads. Each request has its
/// own pages, reused batch after batch (as blkfront does with persistent
/// grants).
fn loaded_ring<'a>(h: &mut Harness<'a>, shape: RequestShape) -> (SimBlkfront<'a>, Vec<Vec<u8>>) {
    let target = if shape.bounce { "nullbounced" } else { "null" };
    let id = h.add_vbd(FRONTEND, DEVID, target, "w");
    h.pump();
    if shape.persistent {
        h.frontend_write(id, "feature-persistent", "1");
    }
    let front = SimBlkfront::with_pages(
        h.sim,
        FRONTEND,
        Protocol::X86_64,
        0,
        Some(BENCH_RING_PAGE_ORDER),
    );
    h.publish_ring(id, &front, "3");
    assert_eq!(h.backend_state(id).as_deref(), Some("4"));
    let mut ring_requests = Vec::new();
    for i in 0..REQUESTS_PER_BATCH {
        let pages: Vec<Seg> = (0..shape.pages)
            .map(|_| seg(front.grant(false, &[]), 0, 7))
            .collect();
        let sector = i * u64::from(shape.pages) * 8;
        let operation = if i % 2 == 0 {
            blkif::OP_WRITE
        } else {
            blkif::OP_READ
        };
        if shape.indirect {
            let ring_id = ring_requests.len() as u64;
            let list = front.grant(true, &segment_page(&pages));
            ring_requests.push(front.indirect_request(
                operation,
                ring_id,
                sector,
                shape.pages,
                &[list],
            ));
        } else {
            for (piece, segs) in pages.chunks(blkif::MAX_SEGMENTS_PER_REQUEST).enumerate() {
                let piece_sector = sector + (piece * blkif::MAX_SEGMENTS_PER_REQUEST * 8) as u64;
                let ring_id = ring_requests.len() as u64;
                ring_requests.push(front.data_request(
                    operation,
                    ring_id,
                    piece_sector,
                    segs.len() as u8,
                    segs,
                ));
            }
        }
    }
    (front, ring_requests)
}

/// Sends the batch and runs the kernel's loop until every request is
/// answered; returns the heap allocations the engine made meanwhile.
fn serve_batch(h: &mut Harness<'_>, front: &mut SimBlkfront<'_>, ring_requests: &[Vec<u8>]) -> u64 {
    assert_eq!(front.submit(ring_requests), ring_requests.len());
    let (_, allocations) = count(|| h.pump());
    let responses = front.responses();
    assert_eq!(responses.len(), ring_requests.len());
    assert!(responses.iter().all(|r| r.status == RSP_OKAY));
    allocations
}

/// Heap allocations in the engine over `batches` batches of `shape` in
/// steady state (after two batches sized the ring's buffers), and the ring
/// requests they carried.
fn steady_state_allocations(shape: RequestShape, batches: u64) -> (u64, u64) {
    let mut measured = (0, 0);
    run(|h| {
        let (mut front, ring_requests) = loaded_ring(h, shape);
        for _ in 0..2 {
            serve_batch(h, &mut front, &ring_requests);
        }
        let allocations: u64 = (0..batches)
            .map(|_| serve_batch(h, &mut front, &ring_requests))
            .sum();
        measured = (allocations, batches * ring_requests.len() as u64);
    });
    measured
}

#[test]
fn the_hot_path_allocates_nothing_per_request() {
    let measured: Vec<(RequestShape, u64, u64)> = RequestShape::every()
        .map(|shape| {
            let (allocations, ring_requests) = steady_state_allocations(shape, 8);
            (shape, allocations, ring_requests)
        })
        .collect();
    for (shape, allocations, ring_requests) in &measured {
        std::println!("{shape:?}: {allocations} allocations in {ring_requests} ring requests");
    }
    assert!(
        measured.iter().all(|&(_, allocations, _)| allocations == 0),
        "{measured:?}"
    );
}

/// Timed rounds of each shape, after a warm-up round.
const BENCH_ROUNDS: usize = 5;
const BENCH_ROUND: Duration = Duration::from_millis(150);

/// What the benchmark measured for one shape.
struct ShapeFigures {
    shape: RequestShape,
    ring_requests_per_request: u64,
    /// Guest requests per second in each timed round, sorted.
    requests_per_second: Vec<f64>,
    allocations_per_ring_request: f64,
}

impl ShapeFigures {
    fn median(&self) -> f64 {
        self.requests_per_second[self.requests_per_second.len() / 2]
    }

    fn mib_per_second(&self) -> f64 {
        self.median() * self.shape.bytes() as f64 / f64::from(1 << 20)
    }

    fn json(&self) -> String {
        let shape = self.shape;
        let rounds: Vec<String> = self
            .requests_per_second
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect();
        format!(
            "{{\"request_bytes\": {}, \"segments\": \"{}\", \"persistent_grants\": {}, \
             \"data_path\": \"{}\", \
             \"ring_requests_per_request\": {}, \"requests_per_second_median\": {:.0}, \
             \"requests_per_second_rounds\": [{}], \"mib_per_second_median\": {:.1}, \
             \"allocations_per_ring_request\": {}}}",
            shape.bytes(),
            shape.segments_label(),
            shape.persistent,
            shape.data_path_label(),
            self.ring_requests_per_request,
            self.median(),
            rounds.join(", "),
            self.mib_per_second(),
            self.allocations_per_ring_request,
        )
    }
}

/// Batches of `shape` served for one round's time: guest requests per
/// second, the engine's allocations, ring requests carried.
fn timed_round(
    h: &mut Harness<'_>,
    front: &mut SimBlkfront<'_>,
    ring_requests: &[Vec<u8>],
) -> (f64, u64, u64) {
    let start = Instant::now();
    let (mut batches, mut allocations) = (0, 0);
    while start.elapsed() < BENCH_ROUND {
        allocations += serve_batch(h, front, ring_requests);
        batches += 1;
    }
    let per_second = (batches * REQUESTS_PER_BATCH) as f64 / start.elapsed().as_secs_f64();
    (
        per_second,
        allocations,
        batches * ring_requests.len() as u64,
    )
}

fn benchmark_shape(shape: RequestShape) -> ShapeFigures {
    let mut figures = None;
    run(|h| {
        let (mut front, ring_requests) = loaded_ring(h, shape);
        timed_round(h, &mut front, &ring_requests);
        let rounds: Vec<(f64, u64, u64)> = (0..BENCH_ROUNDS)
            .map(|_| timed_round(h, &mut front, &ring_requests))
            .collect();
        let mut requests_per_second: Vec<f64> = rounds.iter().map(|r| r.0).collect();
        requests_per_second.sort_by(f64::total_cmp);
        let allocations: u64 = rounds.iter().map(|r| r.1).sum();
        let carried: u64 = rounds.iter().map(|r| r.2).sum();
        figures = Some(ShapeFigures {
            shape,
            ring_requests_per_request: ring_requests.len() as u64 / REQUESTS_PER_BATCH,
            requests_per_second,
            allocations_per_ring_request: allocations as f64 / carried as f64,
        });
    });
    figures.expect("the harness ran the measurement")
}

/// `make bench-engine`: prints the table, and writes it as JSON to
/// `STORDOM_ENGINE_BENCH_JSON` when set.
#[test]
#[ignore = "a benchmark: run in release by `make bench-engine`"]
fn engine_benchmark() {
    let measured: Vec<ShapeFigures> = RequestShape::every().map(benchmark_shape).collect();
    std::println!(
        "host engine benchmark: {REQUESTS_PER_BATCH} requests per batch, null disk, \
         {BENCH_ROUNDS} rounds of {} ms, median (min-max)",
        BENCH_ROUND.as_millis()
    );
    std::println!(
        "| request | segments | persistent grants | data path | ring requests each | requests/s | MiB/s | allocations per ring request |"
    );
    std::println!("|---|---|---|---|---:|---:|---:|---:|");
    for figures in &measured {
        let shape = figures.shape;
        let (min, max) = (
            figures.requests_per_second[0],
            figures.requests_per_second[figures.requests_per_second.len() - 1],
        );
        std::println!(
            "| {} | {} | {} | {} | {} | {:.0} ({min:.0}-{max:.0}) | {:.0} | {} |",
            shape.size_label(),
            shape.segments_label(),
            shape.persistent_label(),
            shape.data_path_label(),
            figures.ring_requests_per_request,
            figures.median(),
            figures.mib_per_second(),
            figures.allocations_per_ring_request,
        );
    }
    if let Ok(path) = std::env::var("STORDOM_ENGINE_BENCH_JSON") {
        let shapes: Vec<String> = measured.iter().map(ShapeFigures::json).collect();
        let json = format!(
            "{{\"requests_per_batch\": {REQUESTS_PER_BATCH}, \"rounds\": {BENCH_ROUNDS}, \
             \"round_ms\": {}, \"shapes\": [\n  {}\n]}}\n",
            BENCH_ROUND.as_millis(),
            shapes.join(",\n  ")
        );
        std::fs::write(&path, json).expect("writing the benchmark's JSON");
        std::println!("written to {path}");
    }
}

//! Disks, the views claimed of them and the queue handles opened on a
//! view: how consumers share devices without seeing each other's work.
//!
//! One [`QueueRouter`] stands for the hardware queues of one controller.
//! Every [`QueueHandle`] opened on a disk of that controller is bound to one
//! hardware queue (the least used one) and gets a number; a tag submitted
//! on the handle travels to the device with that number in its top bits,
//! and whichever handle polls the hardware queue sorts what it finds into
//! per-handle lists. So the namespaces of one NVMe controller, or the
//! ranges of one disk, may share queues and still never take each other's
//! completions.

use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use crate::{Completion, Geometry, QueuedDevice, Request, SubmitError};

/// Tag bits a handle leaves to its user; the handle's number sits above.
const HANDLE_TAG_BITS: u32 = 48;

/// Completions fetched from the device per pass of [`QueueHandle::poll`].
const POLL_BATCH: usize = 32;

/// Why a view or a handle could not be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimError {
    /// The range is empty or leaves the disk.
    OutOfRange,
    /// The range overlaps one claimed and not yet released.
    Busy,
    /// Every handle number of the controller is in use.
    NoHandles,
}

/// A handle's routing state.
struct Route {
    /// The hardware queue it submits on.
    queue: u16,
    /// Its completions found by any handle's poll, not yet handed over.
    finished: VecDeque<Completion>,
    /// Submitted and not yet routed back.
    in_flight: usize,
    /// Whether the handle still exists; a closed route is kept until its
    /// last completion came back, so its number is not reused too early.
    open: bool,
}

struct Routes {
    queues: u16,
    routes: Vec<Option<Route>>,
}

impl Routes {
    /// Routes `completion` to its handle; drops it if the handle is gone.
    fn deliver(&mut self, completion: Completion) {
        let owner = (completion.tag >> HANDLE_TAG_BITS) as usize;
        let Some(slot) = self.routes.get_mut(owner) else {
            return;
        };
        let Some(route) = slot else {
            return;
        };
        route.in_flight = route.in_flight.saturating_sub(1);
        if route.open {
            route.finished.push_back(Completion {
                tag: completion.tag & QueueHandle::MAX_TAG,
                result: completion.result,
            });
        } else if route.in_flight == 0 {
            *slot = None;
        }
    }
}

/// The hardware queues of one controller, shared by the handles of all its
/// disks.
#[derive(Clone)]
pub struct QueueRouter(Rc<RefCell<Routes>>);

impl QueueRouter {
    fn new(queues: u16) -> Self {
        QueueRouter(Rc::new(RefCell::new(Routes {
            queues: queues.max(1),
            routes: Vec::new(),
        })))
    }

    /// A new route on the least used queue, with room for `depth`
    /// completions; returns its number and queue.
    fn open(&self, depth: usize) -> Result<(u16, u16), ClaimError> {
        let mut routes = self.0.borrow_mut();
        let queue = (0..routes.queues)
            .min_by_key(|&q| {
                routes
                    .routes
                    .iter()
                    .flatten()
                    .filter(|r| r.open && r.queue == q)
                    .count()
            })
            .unwrap_or(0);
        let route = Route {
            queue,
            finished: VecDeque::with_capacity(depth),
            in_flight: 0,
            open: true,
        };
        let id = match routes.routes.iter().position(Option::is_none) {
            Some(free) => free,
            None if routes.routes.len() <= usize::from(u16::MAX) => {
                routes.routes.push(None);
                routes.routes.len() - 1
            }
            None => return Err(ClaimError::NoHandles),
        };
        routes.routes[id] = Some(route);
        Ok((id as u16, queue))
    }

    fn close(&self, id: u16) {
        let mut routes = self.0.borrow_mut();
        if let Some(slot) = routes.routes.get_mut(usize::from(id)) {
            match slot {
                Some(route) if route.in_flight > 0 => {
                    route.open = false;
                    route.finished.clear();
                }
                _ => *slot = None,
            }
        }
    }
}

struct DiskState {
    device: Rc<RefCell<dyn QueuedDevice>>,
    router: QueueRouter,
    geometry: Geometry,
    /// Claimed ranges: `(id, start, blocks)`.
    claims: RefCell<Vec<(u32, u64, u64)>>,
    next_claim: Cell<u32>,
}

/// A device as consumers see it: something to claim views of. Clones
/// share the device.
#[derive(Clone)]
pub struct Disk(Rc<DiskState>);

impl Disk {
    /// A disk of its own queues.
    pub fn new(device: impl QueuedDevice + 'static) -> Disk {
        let geometry = device.geometry();
        Self::on_router(
            Rc::new(RefCell::new(device)),
            QueueRouter::new(geometry.queues),
        )
    }

    /// A disk on the same hardware queues as `self` (another namespace of
    /// the same NVMe controller).
    pub fn sharing_queues(&self, device: impl QueuedDevice + 'static) -> Disk {
        Self::on_router(Rc::new(RefCell::new(device)), self.0.router.clone())
    }

    fn on_router(device: Rc<RefCell<dyn QueuedDevice>>, router: QueueRouter) -> Disk {
        let geometry = device.borrow().geometry();
        Disk(Rc::new(DiskState {
            device,
            router,
            geometry,
            claims: RefCell::new(Vec::new()),
            next_claim: Cell::new(0),
        }))
    }

    /// The whole device's shape.
    pub fn geometry(&self) -> Geometry {
        self.0.geometry
    }

    /// The whole disk, for one consumer.
    pub fn claim_all(&self) -> Result<DiskView, ClaimError> {
        self.claim(0, self.0.geometry.blocks)
    }

    /// `blocks` logical blocks from block `start`, for one consumer.
    /// Refused when the range leaves the disk or overlaps a view not yet
    /// dropped (two guests writing the same blocks would corrupt each
    /// other).
    pub fn claim(&self, start: u64, blocks: u64) -> Result<DiskView, ClaimError> {
        let end = start.checked_add(blocks).ok_or(ClaimError::OutOfRange)?;
        if blocks == 0 || end > self.0.geometry.blocks {
            return Err(ClaimError::OutOfRange);
        }
        let mut claims = self.0.claims.borrow_mut();
        if claims.iter().any(|&(_, s, b)| start < s + b && s < end) {
            return Err(ClaimError::Busy);
        }
        let id = self.0.next_claim.get();
        self.0.next_claim.set(id.wrapping_add(1));
        claims.push((id, start, blocks));
        let device = self.0.geometry;
        Ok(DiskView(Rc::new(ViewState {
            disk: self.clone(),
            id,
            start,
            geometry: Geometry {
                blocks,
                max_discard_blocks: device.max_discard_blocks.min(blocks),
                max_write_zeroes_blocks: device.max_write_zeroes_blocks.min(blocks),
                ..device
            },
        })))
    }
}

struct ViewState {
    disk: Disk,
    id: u32,
    start: u64,
    geometry: Geometry,
}

impl Drop for ViewState {
    fn drop(&mut self) {
        self.disk.0.claims.borrow_mut().retain(|c| c.0 != self.id);
    }
}

/// A claimed range of a [`Disk`]; free again once the view and every
/// handle opened on it are dropped.
pub struct DiskView(Rc<ViewState>);

impl DiskView {
    /// The view's shape: its blocks, the device's limits.
    pub fn geometry(&self) -> Geometry {
        self.0.geometry
    }

    /// A queue of its own for one consumer (one blkif ring).
    pub fn open_queue(&self) -> Result<QueueHandle, ClaimError> {
        let depth = usize::from(self.0.geometry.queue_depth);
        let (id, queue) = self.0.disk.0.router.open(depth)?;
        Ok(QueueHandle {
            view: self.0.clone(),
            id,
            queue,
        })
    }
}

/// One consumer's queue: requests submitted here see only the view's
/// blocks, and their completions come back here alone.
pub struct QueueHandle {
    view: Rc<ViewState>,
    id: u16,
    queue: u16,
}

impl QueueHandle {
    /// The largest tag a handle takes.
    pub const MAX_TAG: u64 = (1 << HANDLE_TAG_BITS) - 1;

    /// The view's shape.
    pub fn geometry(&self) -> Geometry {
        self.view.geometry
    }

    /// Moves `(lba, count)` of the view into the device's numbering.
    fn place(&self, lba: u64, count: u64) -> Result<u64, SubmitError> {
        match lba.checked_add(count) {
            Some(end) if end <= self.view.geometry.blocks => Ok(self.view.start + lba),
            _ => Err(SubmitError::OutOfRange),
        }
    }

    /// Starts `request` (block numbers of the view); its completion will
    /// carry `tag`, at most [`Self::MAX_TAG`].
    pub fn submit(&mut self, tag: u64, request: Request<'_>) -> Result<(), SubmitError> {
        if tag > Self::MAX_TAG {
            return Err(SubmitError::BadTag);
        }
        let block_size = u64::from(self.view.geometry.logical_block_size).max(1);
        let placed = match request {
            Request::Read { lba, segments } => Request::Read {
                lba: self.place(lba, transfer_blocks(segments, block_size))?,
                segments,
            },
            Request::Write { lba, segments } => Request::Write {
                lba: self.place(lba, transfer_blocks(segments, block_size))?,
                segments,
            },
            Request::Flush => Request::Flush,
            Request::Discard { lba, blocks } => Request::Discard {
                lba: self.place(lba, blocks)?,
                blocks,
            },
            Request::WriteZeroes { lba, blocks } => Request::WriteZeroes {
                lba: self.place(lba, blocks)?,
                blocks,
            },
        };
        let disk = &self.view.disk.0;
        let tag = u64::from(self.id) << HANDLE_TAG_BITS | tag;
        disk.device.borrow_mut().submit(self.queue, tag, placed)?;
        let mut routes = disk.router.0.borrow_mut();
        if let Some(Some(route)) = routes.routes.get_mut(usize::from(self.id)) {
            route.in_flight += 1;
        }
        Ok(())
    }

    /// Writes this handle's finished requests into `out` and returns how
    /// many; completions of other handles found on the way are kept for
    /// them. Never blocks.
    pub fn poll(&mut self, out: &mut [Completion]) -> usize {
        let disk = &self.view.disk.0;
        let mut routes = disk.router.0.borrow_mut();
        let mut device = disk.device.borrow_mut();
        let mut batch = [Completion::default(); POLL_BATCH];
        // Completions are bounded by what the queue holds.
        let passes = usize::from(disk.geometry.queue_depth) / POLL_BATCH + 1;
        for _ in 0..passes {
            let n = device.poll(self.queue, &mut batch).min(POLL_BATCH);
            for completion in &batch[..n] {
                routes.deliver(*completion);
            }
            if n < POLL_BATCH {
                break;
            }
        }
        match routes.routes.get_mut(usize::from(self.id)) {
            Some(Some(route)) => crate::hand_over(&mut route.finished, out),
            _ => 0,
        }
    }
}

impl Drop for QueueHandle {
    fn drop(&mut self) {
        self.view.disk.0.router.close(self.id);
    }
}

/// Blocks a read or write of `segments` covers (rounded up; the device
/// refuses a partial block).
fn transfer_blocks(segments: &[crate::Segment], block_size: u64) -> u64 {
    let bytes: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
    bytes.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Segment;
    use std::vec;

    /// What the recorder saw: `(queue, lba, blocks)`.
    type Placements = Rc<RefCell<Vec<(u16, u64, u64)>>>;

    /// A 4K-block device that completes at once, records placements, and
    /// can hold its completions back.
    struct Recorder {
        placed: Placements,
        done: Vec<(u16, Completion)>,
        queues: u16,
    }

    impl QueuedDevice for Recorder {
        fn geometry(&self) -> Geometry {
            Geometry {
                logical_block_size: 4096,
                physical_block_size: 4096,
                blocks: 100,
                volatile_write_cache: false,
                discard_granularity: Some(1),
                max_discard_blocks: 64,
                max_write_zeroes_blocks: 0,
                max_transfer_bytes: 1 << 20,
                max_segments: 32,
                queues: self.queues,
                queue_depth: 64,
            }
        }

        fn submit(
            &mut self,
            queue: u16,
            tag: u64,
            request: Request<'_>,
        ) -> Result<(), SubmitError> {
            match request {
                Request::Discard { lba, blocks } => {
                    self.placed.borrow_mut().push((queue, lba, blocks))
                }
                Request::Read { lba, .. } => self.placed.borrow_mut().push((queue, lba, 1)),
                _ => {}
            }
            self.done.push((
                queue,
                Completion {
                    tag,
                    result: Ok(()),
                },
            ));
            Ok(())
        }

        fn poll(&mut self, queue: u16, out: &mut [Completion]) -> usize {
            let mut given = 0;
            while given < out.len() {
                let Some(at) = self.done.iter().position(|(q, _)| *q == queue) else {
                    break;
                };
                out[given] = self.done.remove(at).1;
                given += 1;
            }
            given
        }
    }

    fn recorder(queues: u16) -> (Recorder, Placements) {
        let placed = Rc::new(RefCell::new(Vec::new()));
        let device = Recorder {
            placed: placed.clone(),
            done: Vec::new(),
            queues,
        };
        (device, placed)
    }

    #[test]
    fn views_place_requests_and_refuse_overlaps() {
        let (device, placed) = recorder(1);
        let disk = Disk::new(device);
        let low = disk.claim(0, 80).unwrap();
        let high = disk.claim(90, 10).unwrap();
        assert_eq!(disk.claim(5, 10).err(), Some(ClaimError::Busy));
        assert_eq!(disk.claim(95, 10).err(), Some(ClaimError::OutOfRange));
        assert_eq!(disk.claim(0, 0).err(), Some(ClaimError::OutOfRange));
        assert_eq!(high.geometry().blocks, 10);
        assert_eq!(high.geometry().max_discard_blocks, 10);

        let (mut low_q, mut high_q) = (low.open_queue().unwrap(), high.open_queue().unwrap());
        let discard = |lba, blocks| Request::Discard { lba, blocks };
        high_q.submit(7, discard(2, 3)).unwrap();
        low_q.submit(7, discard(0, 10)).unwrap();
        assert_eq!(
            low_q.submit(8, discard(75, 6)),
            Err(SubmitError::OutOfRange)
        );
        assert_eq!(
            low_q.submit(1 << 48, discard(0, 1)),
            Err(SubmitError::BadTag)
        );
        let segments = [Segment { phys: 0, len: 4096 }];
        let read = Request::Read {
            lba: 9,
            segments: &segments,
        };
        high_q.submit(8, read).unwrap();
        assert_eq!(*placed.borrow(), [(0, 92, 3), (0, 0, 10), (0, 99, 1)]);
        let read = Request::Read {
            lba: 10,
            segments: &segments,
        };
        assert_eq!(high_q.submit(9, read), Err(SubmitError::OutOfRange));

        let mut out = [Completion::default(); 4];
        assert_eq!(low_q.poll(&mut out), 1);
        assert_eq!(out[0].tag, 7);
        assert_eq!(
            high_q.poll(&mut out),
            2,
            "kept for the handle that did not poll"
        );
        assert_eq!((out[0].tag, out[1].tag), (7, 8));
        assert_eq!(high_q.poll(&mut out), 0);

        drop(low_q);
        assert_eq!(disk.claim(0, 90).err(), Some(ClaimError::Busy));
        drop(low);
        assert!(disk.claim(0, 90).is_ok(), "a dropped view frees its range");
    }

    #[test]
    fn disks_sharing_queues_keep_their_completions() {
        // Two namespaces of one controller: one set of hardware queues.
        let (device, _) = recorder(2);
        let shared = Rc::new(RefCell::new(device));
        struct Namespace(Rc<RefCell<Recorder>>);
        impl QueuedDevice for Namespace {
            fn geometry(&self) -> Geometry {
                self.0.borrow().geometry()
            }
            fn submit(&mut self, q: u16, tag: u64, r: Request<'_>) -> Result<(), SubmitError> {
                self.0.borrow_mut().submit(q, tag, r)
            }
            fn poll(&mut self, q: u16, out: &mut [Completion]) -> usize {
                self.0.borrow_mut().poll(q, out)
            }
        }
        let first = Disk::new(Namespace(shared.clone()));
        let second = first.sharing_queues(Namespace(shared.clone()));
        let (a, b) = (first.claim_all().unwrap(), second.claim_all().unwrap());
        // Four handles on two queues: two handles on each.
        let mut handles = vec![
            a.open_queue().unwrap(),
            b.open_queue().unwrap(),
            a.open_queue().unwrap(),
            b.open_queue().unwrap(),
        ];
        for handle in &mut handles {
            handle.submit(0, Request::Flush).unwrap();
        }
        let queues: Vec<u16> = shared.borrow().done.iter().map(|d| d.0).collect();
        assert_eq!(queues, [0, 1, 0, 1]);
        let mut out = [Completion::default(); 8];
        for handle in &mut handles {
            assert_eq!(handle.poll(&mut out), 1, "each handle gets its own tag 0");
            assert_eq!(out[0].tag, 0);
        }
        // A handle dropped with a request in flight: its completion is
        // dropped, and its number is not reused before that.
        handles[0].submit(1, Request::Flush).unwrap();
        handles.remove(0);
        let mut fresh = a.open_queue().unwrap();
        fresh.submit(1, Request::Flush).unwrap();
        assert_eq!(fresh.poll(&mut out), 1);
        assert_eq!(fresh.poll(&mut out), 0);
    }
}

//! `sched_op`: domain shutdown, and blocking until an event channel fires
//! (`SCHEDOP_poll`), which lets stordom sleep with interrupts off.

use crate::hypercall::command;
use crate::{Errno, Hypercall};

/// Why the domain stops (`SHUTDOWN_*` in public/sched.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ShutdownReason {
    /// Clean exit: the toolstack destroys the domain.
    Poweroff = 0,
    /// Restart the domain.
    Reboot = 1,
    /// Fatal error: the toolstack applies `on_crash` (and may keep a dump).
    Crash = 3,
}

/// `struct sched_shutdown`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct SchedShutdown {
    pub reason: u32,
}

xen_command!(SchedShutdown, Sched, 2, "struct sched_shutdown");

/// `struct sched_poll`: block until one of `nr_ports` ports at `ports` is
/// pending or Xen's system time reaches `timeout` (0: no timeout).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct SchedPoll {
    pub ports: u64,
    pub nr_ports: u32,
    _pad: u32,
    pub timeout: u64,
}

xen_command!(SchedPoll, Sched, 3, "struct sched_poll");

/// Xen refuses polls of more ports than this (`do_poll`).
pub const MAX_POLL_PORTS: usize = 128;

/// Blocks this vCPU until one of `ports` is pending, any other event
/// channel of the domain turns pending (Xen wakes every vCPU that polls
/// more than one port on any event), or Xen's system time reaches
/// `deadline_ns` (0: none). Ports already pending return at once, which
/// closes the race between a last look at the rings and the block. Needs
/// no interrupt: the vCPU may keep them off. More than [`MAX_POLL_PORTS`]
/// ports: only the first are checked up front, and the deadline bounds the
/// wait for the others.
pub fn poll<H: Hypercall + ?Sized>(h: &H, ports: &[u32], deadline_ns: u64) -> Result<(), Errno> {
    let ports = &ports[..ports.len().min(MAX_POLL_PORTS)];
    command(
        h,
        &mut SchedPoll {
            ports: ports.as_ptr() as u64,
            nr_ports: ports.len() as u32,
            _pad: 0,
            timeout: deadline_ns,
        },
    )
    .map(drop)
}

/// Asks Xen to stop this domain. On real Xen this does not return on
/// success; the caller should halt if it does.
pub fn shutdown<H: Hypercall + ?Sized>(h: &H, reason: ShutdownReason) -> Result<(), Errno> {
    command(
        h,
        &mut SchedShutdown {
            reason: reason as u32,
        },
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimXen;

    #[test]
    fn shutdown_passes_the_reason() {
        let sim = SimXen::new();
        shutdown(&sim, ShutdownReason::Crash).unwrap();
        assert_eq!(sim.shutdown_reason(), Some(3));
        shutdown(&sim, ShutdownReason::Poweroff).unwrap();
        assert_eq!(sim.shutdown_reason(), Some(0));
        assert_eq!(core::mem::size_of::<SchedShutdown>(), 4);
    }

    #[test]
    fn poll_passes_ports_and_deadline() {
        let sim = SimXen::new();
        poll(&sim, &[3, 5], 1_000_000).unwrap();
        assert_eq!(sim.last_poll(), Some((alloc::vec![3, 5], 1_000_000)));
        let many: alloc::vec::Vec<u32> = (0..300).collect();
        poll(&sim, &many, 7).unwrap();
        assert_eq!(sim.last_poll().map(|(p, _)| p.len()), Some(MAX_POLL_PORTS));
        // Layout of struct sched_poll on x86-64.
        assert_eq!(core::mem::size_of::<SchedPoll>(), 24);
        assert_eq!(core::mem::offset_of!(SchedPoll, timeout), 16);
    }
}

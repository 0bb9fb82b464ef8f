//! `sched_op`: domain shutdown, and blocking until an event channel fires
//! (`SCHEDOP_poll`), which lets stordom sleep with interrupts off.

use crate::event::{EvtchnSend, Port};
use crate::hypercall::{MulticallEntry, command, multicall};
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

/// The most sends [`send_then_poll`] takes into its one trip.
pub const MAX_FOLDED_SENDS: usize = 16;

/// Sends on each port of `sends`, then polls `ports` as [`poll`] does, in
/// one trip into Xen (a [`multicall`]): a notify that has to go out before
/// a sleep rides with it rather than costing an exit of its own. At most
/// [`MAX_FOLDED_SENDS`] ride along; the rest go first, each in a call of
/// its own. A send's failure is ignored, as a lone send's would be (the
/// peer finds the ring's news on its next look); the result is the
/// poll's. If Xen refused the multicall itself, the sends were made one
/// by one and the error is returned: the caller waits another way.
pub fn send_then_poll<H: Hypercall + ?Sized>(
    h: &H,
    sends: &[Port],
    ports: &[u32],
    deadline_ns: u64,
) -> Result<(), Errno> {
    let (alone, folded) = sends.split_at(sends.len().saturating_sub(MAX_FOLDED_SENDS));
    for port in alone {
        let _ = command(h, &mut EvtchnSend { port: port.0 });
    }
    let ports = &ports[..ports.len().min(MAX_POLL_PORTS)];
    let mut args = [EvtchnSend::default(); MAX_FOLDED_SENDS];
    let mut sched_poll = SchedPoll {
        ports: ports.as_ptr() as u64,
        nr_ports: ports.len() as u32,
        _pad: 0,
        timeout: deadline_ns,
    };
    let mut calls: [MulticallEntry<'_>; MAX_FOLDED_SENDS + 1] =
        core::array::from_fn(|_| MulticallEntry::unused());
    for ((call, arg), port) in calls.iter_mut().zip(&mut args).zip(folded) {
        arg.port = port.0;
        *call = MulticallEntry::command(arg);
    }
    calls[folded.len()] = MulticallEntry::command(&mut sched_poll);
    let calls = &mut calls[..=folded.len()];
    if let Err(e) = multicall(h, calls) {
        for port in folded {
            let _ = command(h, &mut EvtchnSend { port: port.0 });
        }
        return Err(e);
    }
    calls[folded.len()].outcome().map(drop)
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

    #[test]
    fn sends_ride_with_the_poll_in_one_multicall() {
        use crate::hypercall::HypercallOp::{EventChannel, Multicall};
        let sim = SimXen::new();
        let sends = [Port(7), Port(9)];
        send_then_poll(&sim, &sends, &[3, 5], 1_000).unwrap();
        assert_eq!(sim.calls(Multicall, 0), 1, "one trip into Xen");
        assert_eq!(sim.calls(EventChannel, 4), 2, "both sends made");
        assert_eq!(sim.last_poll(), Some((alloc::vec![3, 5], 1_000)));
        // More than fit: the first go alone, the last ride along.
        let many: alloc::vec::Vec<Port> = (0..20).map(Port).collect();
        send_then_poll(&sim, &many, &[3], 2_000).unwrap();
        assert_eq!(sim.calls(Multicall, 0), 2);
        assert_eq!(sim.calls(EventChannel, 4), 22);
        assert_eq!(sim.last_poll(), Some((alloc::vec![3], 2_000)));
        // Layout of struct multicall_entry on x86-64.
        assert_eq!(core::mem::size_of::<MulticallEntry<'_>>(), 64);
    }

    #[test]
    fn a_refused_multicall_still_makes_the_sends() {
        use crate::hypercall::HypercallOp::EventChannel;
        let sim = SimXen::new();
        sim.fail_next_hypercall(Errno::ENOSYS);
        let sends = [Port(7), Port(9)];
        assert_eq!(
            send_then_poll(&sim, &sends, &[3], 1_000),
            Err(Errno::ENOSYS)
        );
        assert_eq!(sim.calls(EventChannel, 4), 2);
        assert_eq!(
            sim.last_poll(),
            None,
            "no poll: the caller waits another way"
        );
    }
}

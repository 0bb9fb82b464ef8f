//! `sched_op`: domain shutdown.

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
}

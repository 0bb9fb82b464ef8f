//! Leaving the machine: through Xen when we run on it (poweroff, or crash
//! so the toolstack sees the failure), else through the bare-metal path.

use crate::arch::cpu::{self, ExitStatus};
use xen_pv::sched::{ShutdownReason, shutdown};

/// Stops stordom with `status`. Never returns.
pub fn exit(status: ExitStatus) -> ! {
    if let Some(xen) = crate::xen::get() {
        let reason = match status {
            ExitStatus::Success => ShutdownReason::Poweroff,
            ExitStatus::Failure => ShutdownReason::Crash,
        };
        if let Err(e) = shutdown(&xen.hypercalls, reason) {
            crate::console::fatal(format_args!("SCHEDOP_shutdown failed: {e:?}\n"));
        }
    }
    cpu::exit(status)
}

//! Xen guest interfaces as portable `no_std` code.
//!
//! Every hypercall goes through the [`Hypercall`] trait: the kernel provides
//! the real one ([`arch::HypercallPage`]), host tests provide the simulated
//! Xen in `sim` (feature `sim`). Everything above that trait (event
//! channels, grant tables, xenstore, the PV console, shared rings) is
//! architecture-independent and tested on the host.
//!
//! # Bring-up, as the kernel does it
//! 1. [`arch::XenCpuid::detect`]; reserve one page (writable, later
//!    executable) and call [`arch::HypercallPage::install`] with its virtual
//!    and guest-physical addresses.
//! 2. Pick a free GFN, [`memory::map_shared_info`] it, map that frame and
//!    view it as a `&'static` [`memory::SharedInfo`].
//! 3. [`hvm::setup_upcall`] with the vector whose IDT stub calls
//!    [`event::EventChannels::handle_upcall`] for the current vCPU (and EOIs
//!    the LAPIC when it returns [`hvm::UpcallMethod::PerVcpuVector`]).
//! 4. [`hvm::console_ring`] and [`hvm::store_ring`] give frames and ports:
//!    map the frames as [`console::XenconsInterface`] and
//!    [`xenstore::XenstoreInterface`], and implement [`ring::PeerChannel`]
//!    for each (notify = send on the port, wait = halt until
//!    [`event::take_pending`] finds its port fired, with a deadline), so
//!    waits never need the [`event::EventChannels`], which the job that
//!    serves owns.
//! 5. Reserve a range of unpopulated GFNs for [`grant::GfnWindow`].
//! 6. Exit with [`sched::shutdown`]: poweroff on a clean exit, crash from
//!    the panic handler.
//!
//! # Serving disks
//! The blkif protocol and its backend live in the `blkback` crate, which
//! uses this crate's event channels, grants, xenstore and rings.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

/// Declares that `$ty` is the argument structure of sub-command `$cmd` of
/// hypercall `$op`, mirroring the C structure named by `$c`. Every use has
/// a size/offset test against the header.
macro_rules! xen_command {
    ($ty:ty, $op:ident, $cmd:expr, $c:literal) => {
        // SAFETY: `$ty` is `repr(C)` with the field layout of Xen's `$c`
        // (checked by the module's layout test).
        unsafe impl $crate::hypercall::Command for $ty {
            const OP: $crate::hypercall::HypercallOp = $crate::hypercall::HypercallOp::$op;
            const CMD: u32 = $cmd;
        }
    };
}

pub mod arch;
pub mod console;
pub mod event;
pub mod grant;
pub mod held;
pub mod hvm;
pub mod hypercall;
pub mod memory;
pub mod profile;
pub mod ring;
pub mod sched;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod vcpu;
pub mod xenbus;
pub mod xenstore;

#[cfg(test)]
mod garbage_tests;

pub use hypercall::{Errno, Hypercall};

/// A Xen domain id (`domid_t`).
pub type DomId = u16;
/// The calling domain, as Xen understands it in most hypercall arguments.
pub const DOMID_SELF: DomId = 0x7ff0;
/// Size of a Xen page; grants, rings and shared_info are all one page.
pub const PAGE_SIZE: usize = 4096;

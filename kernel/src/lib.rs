//! The host-tested half of the stordom kernel: frame bookkeeping, the
//! heap's use counters, the command line, the serve loop's idle polling,
//! held ring notifies and vCPU time split, the restart policy and the RAM
//! disks kept across restarts, the vif's address (its sources' order and
//! the DHCP client), the x86-64 page-table format and the copy and fill
//! loops behind `memcpy` and `memset`. The bare-metal binary is
//! `src/main.rs`.
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod cmdline;
pub mod cpu_split;
pub mod frames;
pub mod heap_usage;
pub mod held_notifies;
pub mod idle_poll;
pub mod ram_disk_registry;
pub mod restart_policy;
pub mod vif_address;
// The x86-64 page-table format: architecture code, so it lives under
// `arch/x86_64/`; built here to be host-tested, and reached by the kernel
// through its `arch` facade (`arch::paging`).
#[path = "arch/x86_64/paging.rs"]
pub mod paging;
// The same for the string instructions the C memory functions use.
#[path = "arch/x86_64/string_ops.rs"]
pub mod string_ops;

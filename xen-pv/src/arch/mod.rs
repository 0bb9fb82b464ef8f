//! The only architecture-specific code: Xen detection and the hypercall
//! instruction path. Portable code names `arch::*`, never `x86_64` directly.

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;

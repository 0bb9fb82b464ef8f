//! The architecture layer. Only x86-64 exists; portable code reaches the
//! CPU through the re-exports here and never names x86_64 directly.

mod x86_64;

pub use self::x86_64::*;

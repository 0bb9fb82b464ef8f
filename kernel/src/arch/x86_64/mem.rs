//! The C copy and fill functions the precompiled `core` calls, on the
//! kernel lib's string-instruction loops (`string_ops`, host-tested).

use kernel::string_ops;

/// # Safety
/// C `memcpy`: `n` bytes readable at `src`, writable at `dst`, no overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's guarantees are copy_forward's.
    unsafe { string_ops::copy_forward(dst, src, n) };
    dst
}

/// # Safety
/// C `memmove`: `n` bytes readable at `src`, writable at `dst`; may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the ranges. A forward copy is correct
    // when dst is below src or the ranges do not overlap; otherwise dst
    // overlaps src from above, which copy_backward allows.
    unsafe {
        if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
            string_ops::copy_forward(dst, src, n);
        } else {
            string_ops::copy_backward(dst, src, n);
        }
    }
    dst
}

/// # Safety
/// C `memset`: `n` bytes writable at `dst`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range.
    unsafe { string_ops::fill(dst, c as u8, n) };
    dst
}

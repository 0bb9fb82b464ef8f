//! Little-endian fields of hostile bytes: partition tables here, and the
//! drivers' ACPI tables and NVMe Identify data.
//!
//! A field not wholly inside the bytes reads as 0 rather than panicking:
//! callers check lengths first, and a check they miss must not let a
//! guest's or a firmware's bytes crash stordom.

/// The `N` bytes from `at`, when they are all inside `bytes`.
fn le_field_bytes<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..)?.first_chunk().copied()
}

/// The little-endian `u16` at byte `at` of `bytes` (0 when outside).
pub fn le_u16_at(bytes: &[u8], at: usize) -> u16 {
    le_field_bytes(bytes, at).map_or(0, u16::from_le_bytes)
}

/// The little-endian `u32` at byte `at` of `bytes` (0 when outside).
pub fn le_u32_at(bytes: &[u8], at: usize) -> u32 {
    le_field_bytes(bytes, at).map_or(0, u32::from_le_bytes)
}

/// The little-endian `u64` at byte `at` of `bytes` (0 when outside).
pub fn le_u64_at(bytes: &[u8], at: usize) -> u64 {
    le_field_bytes(bytes, at).map_or(0, u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BYTES: [u8; 9] = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09];

    /// The three readers' values at `at`.
    fn le_fields_at(bytes: &[u8], at: usize) -> (u16, u32, u64) {
        (
            le_u16_at(bytes, at),
            le_u32_at(bytes, at),
            le_u64_at(bytes, at),
        )
    }

    #[test]
    fn fields_read_little_endian_and_as_zero_when_outside() {
        // Offsets inside, reaching past the end, and where `at + size`
        // would overflow.
        let expected = [
            (0, (0x0201, 0x0403_0201, 0x0807_0605_0403_0201)),
            (1, (0x0302, 0x0504_0302, 0x0908_0706_0504_0302)),
            (2, (0x0403, 0x0605_0403, 0)),
            (5, (0x0706, 0x0908_0706, 0)),
            (6, (0x0807, 0, 0)),
            (7, (0x0908, 0, 0)),
            (8, (0, 0, 0)),
            (9, (0, 0, 0)),
            (10, (0, 0, 0)),
            (usize::MAX - 3, (0, 0, 0)),
            (usize::MAX, (0, 0, 0)),
        ];
        for (at, values) in expected {
            assert_eq!(le_fields_at(&BYTES, at), values, "at {at}");
        }
        assert_eq!(le_fields_at(&[], 0), (0, 0, 0));
    }
}

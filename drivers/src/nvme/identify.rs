//! Parsing of Identify data, trusting nothing the controller reports.

use super::sgl::SglSupport;
use blockdev::le_field::{le_u16_at, le_u32_at, le_u64_at};

/// What stordom uses from Identify Controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerInfo {
    /// Serial number (ASCII, space padded).
    pub serial: [u8; 20],
    /// Model number (ASCII, space padded).
    pub model: [u8; 40],
    /// Maximum data transfer size in bytes; `None` when unlimited.
    pub max_transfer_bytes: Option<u64>,
    /// Whether a volatile write cache is present (flush is needed).
    pub volatile_write_cache: bool,
    /// Whether Dataset Management (deallocate) is supported.
    pub dataset_management: bool,
    /// Whether Write Zeroes is supported.
    pub write_zeroes: bool,
    /// Whether NVM commands may name their data with SGLs.
    pub sgl: SglSupport,
}

impl ControllerInfo {
    /// Parses Identify Controller data (memory page size 4 KiB assumed).
    pub fn parse(data: &[u8; 4096]) -> Self {
        let mut serial = [0; 20];
        serial.copy_from_slice(&data[4..24]);
        let mut model = [0; 40];
        model.copy_from_slice(&data[24..64]);
        let mdts = data[77];
        let optional_commands = le_u16_at(data, 520);
        Self {
            serial,
            model,
            // Beyond 2^20 pages the limit cannot matter to us.
            max_transfer_bytes: (mdts != 0).then(|| 4096u64 << mdts.min(20)),
            volatile_write_cache: data[525] & 1 != 0,
            dataset_management: optional_commands & (1 << 2) != 0,
            write_zeroes: optional_commands & (1 << 3) != 0,
            sgl: SglSupport::from_sgls(le_u32_at(data, 536)),
        }
    }
}

/// An active namespace stordom can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace id.
    pub id: u32,
    /// Capacity in logical blocks.
    pub blocks: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Preferred write granularity in logical blocks (1 when unreported).
    pub write_granularity: u32,
    /// Preferred deallocate granularity in logical blocks (1 when unreported).
    pub discard_granularity: u32,
}

/// Why a namespace is not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamespaceError {
    /// It reports zero blocks.
    Empty,
    /// Its LBA format index is beyond the formats it lists.
    BadFormat,
    /// Its block size is below 512 bytes or above 64 KiB.
    UnsupportedBlockSize,
    /// Its LBA format carries metadata, which stordom does not handle.
    Metadata,
}

impl Namespace {
    /// Parses Identify Namespace data for namespace `id`.
    pub fn parse(id: u32, data: &[u8; 4096]) -> Result<Self, NamespaceError> {
        let blocks = le_u64_at(data, 0);
        if blocks == 0 {
            return Err(NamespaceError::Empty);
        }
        let formats = usize::from(data[25]) + 1;
        let format = usize::from(data[26] & 0x0f) | (usize::from(data[26] >> 5) << 4);
        if format >= formats.min(64) {
            return Err(NamespaceError::BadFormat);
        }
        let descriptor = le_u32_at(data, 128 + 4 * format);
        if descriptor & 0xffff != 0 {
            return Err(NamespaceError::Metadata);
        }
        let block_shift = (descriptor >> 16) & 0xff;
        if !(9..=16).contains(&block_shift) {
            return Err(NamespaceError::UnsupportedBlockSize);
        }
        let optimal_io_reported = data[24] & (1 << 4) != 0;
        let (write_granularity, discard_granularity) = if optimal_io_reported {
            (
                u32::from(le_u16_at(data, 64)) + 1,
                u32::from(le_u16_at(data, 66)) + 1,
            )
        } else {
            (1, 1)
        };
        Ok(Self {
            id,
            blocks,
            block_size: 1 << block_shift,
            write_granularity,
            discard_granularity,
        })
    }
}

/// The ids in an Active Namespace ID list (zero ends it; ids must rise).
pub(crate) fn active_namespace_ids(data: &[u8; 4096]) -> impl Iterator<Item = u32> + '_ {
    let mut previous = 0;
    (0..1024)
        .map(|i| le_u32_at(data, i * 4))
        .take_while(move |&id| {
            let rising = id > previous && id != u32::MAX;
            previous = id;
            rising
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace_data(blocks: u64, shift: u8, metadata: u16) -> [u8; 4096] {
        let mut data = [0u8; 4096];
        data[0..8].copy_from_slice(&blocks.to_le_bytes());
        data[25] = 1; // two formats
        data[26] = 1; // using the second
        data[132..134].copy_from_slice(&metadata.to_le_bytes());
        data[134] = shift;
        data
    }

    #[test]
    fn namespace_checks() {
        let good = Namespace::parse(3, &namespace_data(1000, 12, 0)).unwrap();
        assert_eq!(
            (
                good.id,
                good.blocks,
                good.block_size,
                good.discard_granularity
            ),
            (3, 1000, 4096, 1)
        );
        assert_eq!(
            Namespace::parse(1, &namespace_data(0, 9, 0)),
            Err(NamespaceError::Empty)
        );
        assert_eq!(
            Namespace::parse(1, &namespace_data(8, 8, 0)),
            Err(NamespaceError::UnsupportedBlockSize)
        );
        assert_eq!(
            Namespace::parse(1, &namespace_data(8, 9, 8)),
            Err(NamespaceError::Metadata)
        );
        let mut bad_index = namespace_data(8, 9, 0);
        bad_index[26] = 5;
        assert_eq!(
            Namespace::parse(1, &bad_index),
            Err(NamespaceError::BadFormat)
        );
        let mut optimal = namespace_data(8, 9, 0);
        optimal[24] = 1 << 4;
        optimal[64] = 7;
        optimal[66] = 15;
        let parsed = Namespace::parse(1, &optimal).unwrap();
        assert_eq!(
            (parsed.write_granularity, parsed.discard_granularity),
            (8, 16)
        );
    }

    #[test]
    fn namespace_list_stops_at_zero_or_disorder() {
        let mut data = [0u8; 4096];
        for (i, id) in [1u32, 2, 5, 4, 9].iter().enumerate() {
            data[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
        }
        assert!(active_namespace_ids(&data).eq([1, 2, 5]));
    }

    #[test]
    fn controller_fields() {
        let mut data = [0u8; 4096];
        data[77] = 5;
        data[520] = 0b1100;
        data[525] = 1;
        let info = ControllerInfo::parse(&data);
        assert_eq!(info.max_transfer_bytes, Some(128 * 1024));
        assert!(info.volatile_write_cache && info.dataset_management && info.write_zeroes);
        assert_eq!(info.sgl, SglSupport::Unsupported);
        for (sgls, support) in [
            (0b01, SglSupport::Unaligned),
            (0b10, SglSupport::DwordAligned),
            (0b11, SglSupport::Unsupported),
        ] {
            data[536] = sgls;
            assert_eq!(ControllerInfo::parse(&data).sgl, support);
        }
        data[77] = 0;
        assert_eq!(ControllerInfo::parse(&data).max_transfer_bytes, None);
    }
}

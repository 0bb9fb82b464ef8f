//! ATA pieces AHCI carries: register FISes, IDENTIFY DEVICE data, status
//! and error decoding, TRIM ranges.

use blockdev::IoError;

/// ATA commands stordom issues.
pub(crate) mod command {
    pub const DATA_SET_MANAGEMENT: u8 = 0x06;
    pub const READ_DMA_EXT: u8 = 0x25;
    pub const READ_LOG_EXT: u8 = 0x2f;
    pub const WRITE_DMA_EXT: u8 = 0x35;
    pub const READ_FPDMA_QUEUED: u8 = 0x60;
    pub const WRITE_FPDMA_QUEUED: u8 = 0x61;
    pub const IDENTIFY_DEVICE: u8 = 0xec;
    pub const FLUSH_CACHE_EXT: u8 = 0xea;
}

/// The NCQ command error log (READ LOG EXT address).
pub(crate) const NCQ_ERROR_LOG: u8 = 0x10;
/// Data Set Management feature: TRIM.
pub(crate) const DSM_TRIM: u16 = 1;
/// One TRIM range covers at most this many blocks.
pub(crate) const TRIM_RANGE_MAX_BLOCKS: u64 = 0xffff;
/// TRIM ranges in the one 512-byte block stordom sends.
pub(crate) const TRIM_RANGES_PER_COMMAND: u64 = 64;

const FIS_HOST_TO_DEVICE: u8 = 0x27;
/// Device register: LBA addressing.
const DEVICE_LBA: u8 = 1 << 6;

/// A Register Host-to-Device FIS for a command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CommandFis {
    pub command: u8,
    pub lba: u64,
    pub count: u16,
    pub features: u16,
}

impl CommandFis {
    pub(crate) fn bytes(&self) -> [u8; 20] {
        let lba = self.lba.to_le_bytes();
        let [features_low, features_high] = self.features.to_le_bytes();
        let [count_low, count_high] = self.count.to_le_bytes();
        let mut fis = [0u8; 20];
        fis[0] = FIS_HOST_TO_DEVICE;
        fis[1] = 0x80; // this is a command, not a control update
        fis[2] = self.command;
        fis[3] = features_low;
        fis[4..7].copy_from_slice(&lba[0..3]);
        fis[7] = DEVICE_LBA;
        fis[8..11].copy_from_slice(&lba[3..6]);
        fis[11] = features_high;
        fis[12] = count_low;
        fis[13] = count_high;
        fis
    }

    #[cfg(test)]
    pub(crate) fn parse(fis: &[u8; 20]) -> Self {
        let mut lba = [0u8; 8];
        lba[0..3].copy_from_slice(&fis[4..7]);
        lba[3..6].copy_from_slice(&fis[8..11]);
        Self {
            command: fis[2],
            lba: u64::from_le_bytes(lba),
            count: u16::from_le_bytes([fis[12], fis[13]]),
            features: u16::from_le_bytes([fis[3], fis[11]]),
        }
    }
}

/// What stordom uses from IDENTIFY DEVICE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtaIdentity {
    /// Model number, as ASCII.
    pub model: [u8; 40],
    /// Capacity in logical sectors.
    pub sectors: u64,
    /// Logical sector size in bytes.
    pub logical_sector_size: u32,
    /// Physical sector size in bytes.
    pub physical_sector_size: u32,
    /// NCQ queue depth; `None` without NCQ.
    pub ncq_depth: Option<u8>,
    /// Whether DATA SET MANAGEMENT TRIM is supported.
    pub trim: bool,
    /// Whether a volatile write cache is enabled.
    pub write_cache: bool,
}

/// Why IDENTIFY data is not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentifyError {
    /// The device does not support 48-bit addressing.
    NoLba48,
    /// It reports zero sectors.
    Empty,
    /// The logical sector size is not a power of two from 512 to 64 KiB.
    BadSectorSize,
}

impl AtaIdentity {
    /// Parses the 256 words of IDENTIFY DEVICE data.
    pub fn parse(words: &[u16; 256]) -> Result<Self, IdentifyError> {
        if words[83] & (1 << 10) == 0 {
            return Err(IdentifyError::NoLba48);
        }
        let sectors = (0..4).fold(0u64, |acc, i| acc | (u64::from(words[100 + i]) << (16 * i)));
        if sectors == 0 {
            return Err(IdentifyError::Empty);
        }
        // Word 106 is valid when bit 14 is set and bit 15 clear.
        let sector_info = words[106];
        let described = sector_info & 0xc000 == 0x4000;
        let logical_sector_size = if described && sector_info & (1 << 12) != 0 {
            2 * (u32::from(words[117]) | (u32::from(words[118]) << 16))
        } else {
            512
        };
        if !logical_sector_size.is_power_of_two() || !(512..=65536).contains(&logical_sector_size) {
            return Err(IdentifyError::BadSectorSize);
        }
        let per_physical = if described && sector_info & (1 << 13) != 0 {
            1u32 << (sector_info & 0xf)
        } else {
            1
        };
        let mut model = [0u8; 40];
        for (i, word) in words[27..47].iter().enumerate() {
            // ATA strings hold the first character in the high byte.
            model[2 * i..2 * i + 2].copy_from_slice(&word.to_be_bytes());
        }
        Ok(Self {
            model,
            sectors,
            logical_sector_size,
            physical_sector_size: logical_sector_size.saturating_mul(per_physical),
            ncq_depth: (words[76] & (1 << 8) != 0).then_some((words[75] & 0x1f) as u8 + 1),
            trim: words[169] & 1 != 0,
            write_cache: words[82] & (1 << 5) != 0 && words[85] & (1 << 5) != 0,
        })
    }
}

/// Status register: an error occurred.
pub(crate) const STATUS_ERROR: u8 = 1 << 0;
/// Status register: data request.
pub(crate) const STATUS_DRQ: u8 = 1 << 3;
/// Status register: busy.
pub(crate) const STATUS_BUSY: u8 = 1 << 7;

/// The block-layer view of an ATA error register.
pub(crate) fn io_error(status: u8, error: u8) -> IoError {
    const ABORTED: u8 = 1 << 2;
    const ID_NOT_FOUND: u8 = 1 << 4;
    const UNCORRECTABLE: u8 = 1 << 6;
    if error & UNCORRECTABLE != 0 {
        IoError::Media
    } else if error & ID_NOT_FOUND != 0 {
        IoError::OutOfRange
    } else if error & ABORTED != 0 {
        IoError::Unsupported
    } else {
        IoError::Device {
            code: u32::from(status) | (u32::from(error) << 8),
        }
    }
}

/// What the NCQ command error log says: the failed tag (`None` when the
/// failure was not of a queued command) and its status and error.
pub(crate) fn parse_ncq_error_log(log: &[u8; 512]) -> (Option<u8>, u8, u8) {
    const NOT_QUEUED: u8 = 1 << 7;
    let tag = (log[0] & NOT_QUEUED == 0).then_some(log[0] & 0x1f);
    (tag, log[2], log[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identify_words(sectors: u64) -> [u16; 256] {
        let mut words = [0u16; 256];
        words[83] = 1 << 10;
        for i in 0..4 {
            words[100 + i] = (sectors >> (16 * i)) as u16;
        }
        words
    }

    #[test]
    fn identify_parsing() {
        let mut words = identify_words(1 << 33);
        words[27] = u16::from_be_bytes(*b"QE");
        words[28] = u16::from_be_bytes(*b"MU");
        words[75] = 31;
        words[76] = 1 << 8;
        words[82] = 1 << 5;
        words[85] = 1 << 5;
        words[169] = 1;
        words[106] = 0x4000 | (1 << 13) | 3;
        let identity = AtaIdentity::parse(&words).unwrap();
        assert_eq!(&identity.model[..4], b"QEMU");
        assert_eq!(identity.sectors, 1 << 33);
        assert_eq!(
            (identity.logical_sector_size, identity.physical_sector_size),
            (512, 4096)
        );
        assert_eq!(identity.ncq_depth, Some(32));
        assert!(identity.trim && identity.write_cache);

        words[106] = 0x4000 | (1 << 12);
        words[117] = 2048;
        assert_eq!(
            AtaIdentity::parse(&words).unwrap().logical_sector_size,
            4096
        );
        words[117] = 300;
        assert_eq!(
            AtaIdentity::parse(&words),
            Err(IdentifyError::BadSectorSize)
        );
        assert_eq!(
            AtaIdentity::parse(&identify_words(0)),
            Err(IdentifyError::Empty)
        );
        assert_eq!(AtaIdentity::parse(&[0; 256]), Err(IdentifyError::NoLba48));
    }

    #[test]
    fn fis_round_trip_and_errors() {
        let fis = CommandFis {
            command: command::WRITE_FPDMA_QUEUED,
            lba: 0x0000_1234_5678_9abc,
            count: 5 << 3,
            features: 300,
        };
        let bytes = fis.bytes();
        assert_eq!((bytes[0], bytes[1], bytes[7]), (0x27, 0x80, 0x40));
        assert_eq!(CommandFis::parse(&bytes), fis);
        assert_eq!(io_error(0x51, 0x40), IoError::Media);
        assert_eq!(io_error(0x51, 0x04), IoError::Unsupported);
        assert_eq!(io_error(0x51, 0x10), IoError::OutOfRange);
        assert_eq!(io_error(0x51, 0x80), IoError::Device { code: 0x8051 });
        let mut log = [0u8; 512];
        log[0] = 7;
        log[2] = 0x51;
        log[3] = 0x40;
        assert_eq!(parse_ncq_error_log(&log), (Some(7), 0x51, 0x40));
        log[0] = 0x80;
        assert_eq!(parse_ncq_error_log(&log).0, None);
    }
}

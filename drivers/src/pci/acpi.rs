//! Just enough ACPI to find PCI Express configuration space: the RSDP, the
//! XSDT (or RSDT) and the MCFG table. Physical memory is read through a
//! closure, so the kernel decides how, and tests feed bytes.

use alloc::vec;
use alloc::vec::Vec;
use blockdev::le_field::{le_u16_at, le_u32_at, le_u64_at};

/// One ECAM window of the MCFG table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McfgEntry {
    /// Physical base of the window (of bus 0, even if `start_bus` is not 0).
    pub base: u64,
    /// PCI segment group.
    pub segment: u16,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded.
    pub end_bus: u8,
}

impl McfgEntry {
    /// Bytes of configuration space for the entry's buses.
    pub fn window_len(&self) -> usize {
        (usize::from(self.end_bus.saturating_sub(self.start_bus)) + 1) << 20
    }
}

/// Why the tables could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// The RSDP signature or checksum is wrong.
    BadRsdp,
    /// A table's signature is not the expected one.
    BadSignature,
    /// A table's length is shorter than its header or its contents.
    BadLength,
    /// A table's bytes do not sum to zero.
    BadChecksum,
    /// Physical memory at an address could not be read.
    Unreadable,
    /// No table with the signature is listed.
    NotFound,
}

const HEADER_LEN: usize = 36;
/// Tables larger than this are refused rather than read.
const MAX_TABLE_LEN: u32 = 1 << 20;

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
}

/// Checks a table's header, length and checksum.
fn check_table(table: &[u8], signature: &[u8; 4]) -> Result<(), AcpiError> {
    if table.len() < HEADER_LEN {
        return Err(AcpiError::BadLength);
    }
    if &table[..4] != signature {
        return Err(AcpiError::BadSignature);
    }
    if le_u32_at(table, 4) as usize != table.len() {
        return Err(AcpiError::BadLength);
    }
    if !checksum_ok(table) {
        return Err(AcpiError::BadChecksum);
    }
    Ok(())
}

/// Parses an MCFG table given its bytes (exactly its length).
pub fn parse_mcfg(table: &[u8]) -> Result<Vec<McfgEntry>, AcpiError> {
    check_table(table, b"MCFG")?;
    // The header is followed by 8 reserved bytes, then 16-byte entries.
    let entries = table.get(HEADER_LEN + 8..).ok_or(AcpiError::BadLength)?;
    Ok(entries
        .chunks_exact(16)
        .map(|entry| McfgEntry {
            base: le_u64_at(entry, 0),
            segment: le_u16_at(entry, 8),
            start_bus: entry[10],
            end_bus: entry[11],
        })
        .filter(|entry| entry.start_bus <= entry.end_bus)
        .collect())
}

/// Reads the whole table at `address`: its header first, for the length.
fn read_table(
    read_phys: &mut impl FnMut(u64, &mut [u8]) -> bool,
    address: u64,
) -> Result<Vec<u8>, AcpiError> {
    let mut header = [0u8; HEADER_LEN];
    if !read_phys(address, &mut header) {
        return Err(AcpiError::Unreadable);
    }
    let len = le_u32_at(&header, 4);
    if !(HEADER_LEN as u32..=MAX_TABLE_LEN).contains(&len) {
        return Err(AcpiError::BadLength);
    }
    let mut table = vec![0; len as usize];
    if !read_phys(address, &mut table) {
        return Err(AcpiError::Unreadable);
    }
    Ok(table)
}

/// Finds the table with `signature` through the RSDP at `rsdp_address`,
/// preferring the XSDT (64-bit pointers) to the RSDT. `read_phys(addr, buf)`
/// fills `buf` from physical memory and says whether it could.
pub fn find_table(
    mut read_phys: impl FnMut(u64, &mut [u8]) -> bool,
    rsdp_address: u64,
    signature: &[u8; 4],
) -> Result<Vec<u8>, AcpiError> {
    let mut rsdp = [0u8; 36];
    if !read_phys(rsdp_address, &mut rsdp[..20]) {
        return Err(AcpiError::Unreadable);
    }
    if &rsdp[..8] != b"RSD PTR " || !checksum_ok(&rsdp[..20]) {
        return Err(AcpiError::BadRsdp);
    }
    let revision = rsdp[15];
    let (root, root_signature, pointer_size) = if revision >= 2 {
        if !read_phys(rsdp_address, &mut rsdp) {
            return Err(AcpiError::Unreadable);
        }
        if !checksum_ok(&rsdp) {
            return Err(AcpiError::BadRsdp);
        }
        (le_u64_at(&rsdp, 24), b"XSDT", 8)
    } else {
        (u64::from(le_u32_at(&rsdp, 16)), b"RSDT", 4)
    };
    let root_table = read_table(&mut read_phys, root)?;
    check_table(&root_table, root_signature)?;
    for pointer in root_table[HEADER_LEN..].chunks_exact(pointer_size) {
        let address = if pointer_size == 8 {
            le_u64_at(pointer, 0)
        } else {
            u64::from(le_u32_at(pointer, 0))
        };
        let table = read_table(&mut read_phys, address)?;
        if &table[..4] == signature {
            check_table(&table, signature)?;
            return Ok(table);
        }
    }
    Err(AcpiError::NotFound)
}

/// The ECAM windows, from the RSDP at `rsdp_address`.
pub fn find_mcfg(
    read_phys: impl FnMut(u64, &mut [u8]) -> bool,
    rsdp_address: u64,
) -> Result<Vec<McfgEntry>, AcpiError> {
    parse_mcfg(&find_table(read_phys, rsdp_address, b"MCFG")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn table(signature: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut table = vec![0u8; HEADER_LEN];
        table[..4].copy_from_slice(signature);
        table.extend_from_slice(body);
        let len = table.len() as u32;
        table[4..8].copy_from_slice(&len.to_le_bytes());
        table[9] = 0u8.wrapping_sub(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)));
        table
    }

    fn mcfg() -> Vec<u8> {
        let mut body = vec![0u8; 8];
        body.extend_from_slice(&0xb000_0000u64.to_le_bytes());
        body.extend_from_slice(&[0, 0, 0, 0xff, 0, 0, 0, 0]);
        table(b"MCFG", &body)
    }

    #[test]
    fn mcfg_entries_and_checks() {
        let entries = parse_mcfg(&mcfg()).unwrap();
        assert_eq!(
            entries,
            [McfgEntry {
                base: 0xb000_0000,
                segment: 0,
                start_bus: 0,
                end_bus: 255
            }]
        );
        assert_eq!(entries[0].window_len(), 256 << 20);
        let mut corrupt = mcfg();
        corrupt[40] ^= 1;
        assert_eq!(parse_mcfg(&corrupt), Err(AcpiError::BadChecksum));
        assert_eq!(
            parse_mcfg(&table(b"APIC", &[])),
            Err(AcpiError::BadSignature)
        );
        assert_eq!(parse_mcfg(&mcfg()[..30]), Err(AcpiError::BadLength));
    }

    /// Physical memory holding an RSDP, an XSDT listing a FACP and an MCFG.
    fn memory(revision: u8) -> BTreeMap<u64, Vec<u8>> {
        let mut memory = BTreeMap::new();
        memory.insert(0x2000, table(b"FACP", &[1, 2, 3]));
        memory.insert(0x3000, mcfg());
        let mut rsdp = vec![0u8; 36];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[15] = revision;
        if revision >= 2 {
            let pointers: Vec<u8> = [0x2000u64, 0x3000]
                .iter()
                .flat_map(|p| p.to_le_bytes())
                .collect();
            memory.insert(0x1000, table(b"XSDT", &pointers));
            rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
            rsdp[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        } else {
            let pointers: Vec<u8> = [0x2000u32, 0x3000]
                .iter()
                .flat_map(|p| p.to_le_bytes())
                .collect();
            memory.insert(0x1000, table(b"RSDT", &pointers));
            rsdp[16..20].copy_from_slice(&0x1000u32.to_le_bytes());
        }
        rsdp[8] = 0u8.wrapping_sub(rsdp[..20].iter().fold(0u8, |s, b| s.wrapping_add(*b)));
        rsdp[32] = 0u8.wrapping_sub(rsdp.iter().fold(0u8, |s, b| s.wrapping_add(*b)));
        memory.insert(0xe0000, rsdp);
        memory
    }

    fn reader(memory: &BTreeMap<u64, Vec<u8>>) -> impl FnMut(u64, &mut [u8]) -> bool + '_ {
        |address, buffer| match memory.get(&address) {
            Some(bytes) if bytes.len() >= buffer.len() => {
                buffer.copy_from_slice(&bytes[..buffer.len()]);
                true
            }
            _ => false,
        }
    }

    #[test]
    fn finds_mcfg_through_xsdt_and_rsdt() {
        for revision in [0, 2] {
            let memory = memory(revision);
            let entries = find_mcfg(reader(&memory), 0xe0000).unwrap();
            assert_eq!(entries[0].base, 0xb000_0000, "revision {revision}");
        }
    }

    #[test]
    fn walk_errors() {
        let memory = memory(2);
        assert_eq!(
            find_table(reader(&memory), 0xe0000, b"HPET"),
            Err(AcpiError::NotFound)
        );
        assert_eq!(
            find_table(reader(&memory), 0x2000, b"MCFG"),
            Err(AcpiError::BadRsdp)
        );
        assert_eq!(
            find_table(reader(&memory), 0x9999, b"MCFG"),
            Err(AcpiError::Unreadable)
        );
        let mut broken = memory.clone();
        broken.get_mut(&0x1000).unwrap()[40] ^= 0xff;
        assert_eq!(
            find_table(reader(&broken), 0xe0000, b"MCFG"),
            Err(AcpiError::BadChecksum)
        );
    }
}

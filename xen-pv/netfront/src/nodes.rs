//! Parsing the xenstore nodes a netfront reads. The toolstack writes the
//! frontend's directory and the backend its own; a driver domain trusts
//! neither, so every value is checked here and refused when malformed.

use alloc::string::String;

use xen_pv::DomId;

/// The first domain id that names no domain (`DOMID_FIRST_RESERVED`).
const DOMID_FIRST_RESERVED: u32 = 0x7ff0;
/// The longest backend path accepted (netback's are ~40 bytes).
pub const MAX_BACKEND_PATH_LEN: usize = 256;

fn text(value: &[u8]) -> Option<&str> {
    core::str::from_utf8(value)
        .ok()
        .map(|s| s.trim_end_matches('\0'))
}

/// A decimal number as xenstore nodes hold them.
pub fn parse_unsigned(value: &[u8]) -> Option<u32> {
    let text = text(value)?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `backend-id`: a real domain's id.
pub fn parse_domid(value: &[u8]) -> Option<DomId> {
    parse_unsigned(value)
        .filter(|id| *id < DOMID_FIRST_RESERVED)
        .map(|id| id as DomId)
}

/// `backend`: an absolute xenstore path of plain characters.
pub fn parse_backend_path(value: &[u8]) -> Option<String> {
    let text = text(value)?;
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"/_-.".contains(&b);
    let valid = text.starts_with('/')
        && text.len() > 1
        && text.len() <= MAX_BACKEND_PATH_LEN
        && !text.ends_with('/')
        && !text.contains("//")
        && text.bytes().all(plain);
    valid.then(|| String::from(text))
}

/// `mac`: six colon-separated hex octets of a unicast, non-zero address.
pub fn parse_mac(value: &[u8]) -> Option<[u8; 6]> {
    let text = text(value)?;
    let mut mac = [0u8; 6];
    let mut octets = text.split(':');
    for octet in &mut mac {
        let part = octets.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *octet = u8::from_str_radix(part, 16).ok()?;
    }
    let multicast = mac[0] & 1 != 0;
    (octets.next().is_none() && !multicast && mac != [0; 6]).then_some(mac)
}

/// Whether a backend feature node says "1" (absent or anything else: no).
pub fn feature_enabled(value: Result<alloc::vec::Vec<u8>, xen_pv::xenstore::XsError>) -> bool {
    value.ok().and_then(|v| parse_unsigned(&v)) == Some(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_parsed_strictly() {
        assert_eq!(
            parse_mac(b"00:16:3e:0a:0B:ff"),
            Some([0x00, 0x16, 0x3e, 0x0a, 0x0b, 0xff])
        );
        assert_eq!(
            parse_mac(b"00:16:3e:0a:0b:ff\0"),
            parse_mac(b"00:16:3e:0a:0b:ff")
        );
        for bad in [
            &b""[..],
            b"00:16:3e:0a:0b",
            b"00:16:3e:0a:0b:ff:00",
            b"0:16:3e:0a:0b:ff",
            b"00:16:3e:0a:0b:fg",
            b"01:16:3e:0a:0b:ff",
            b"00:00:00:00:00:00",
            b"00-16-3e-0a-0b-ff",
            b"+0:16:3e:0a:0b:ff",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn domids_and_paths_are_checked() {
        assert_eq!(parse_domid(b"0"), Some(0));
        assert_eq!(parse_domid(b"32751"), Some(32751));
        assert_eq!(parse_domid(b"32752"), None);
        assert_eq!(parse_domid(b"-1"), None);
        assert_eq!(parse_domid(b"+1"), None);
        assert_eq!(parse_domid(b"99999999999999"), None);
        assert_eq!(
            parse_backend_path(b"/local/domain/0/backend/vif/5/0").as_deref(),
            Some("/local/domain/0/backend/vif/5/0")
        );
        for bad in [
            &b"local/domain/0"[..],
            b"/",
            b"/a//b",
            b"/a/b/",
            b"/a b",
            b"/a\nb",
        ] {
            assert_eq!(parse_backend_path(bad), None, "{bad:?}");
        }
        let long = [b'a'; MAX_BACKEND_PATH_LEN];
        let mut path = alloc::vec![b'/'];
        path.extend_from_slice(&long);
        assert_eq!(parse_backend_path(&path), None);
    }
}

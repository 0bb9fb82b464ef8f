//! The xenstore wire protocol (public/io/xs_wire.h): message header, types,
//! error strings, permission strings.

use alloc::string::String;
use alloc::vec::Vec;

use crate::DomId;

/// Largest payload either side may send (`XENSTORE_PAYLOAD_MAX`).
pub const PAYLOAD_MAX: usize = 4096;
/// Size of `struct xsd_sockmsg`.
pub const HEADER_LEN: usize = 16;

/// Message types (`enum xsd_sockmsg_type`) that this client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MsgType {
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    /// Drops every watch and transaction of the connection
    /// (`XS_RESET_WATCHES`, which unprivileged domains may send).
    ResetWatches = 21,
}

impl MsgType {
    /// The type with wire number `n`, if this crate knows it.
    pub fn from_wire(n: u32) -> Option<MsgType> {
        use MsgType::*;
        [
            Directory,
            Read,
            GetPerms,
            Watch,
            Unwatch,
            TransactionStart,
            TransactionEnd,
            GetDomainPath,
            Write,
            Mkdir,
            Rm,
            SetPerms,
            WatchEvent,
            Error,
            ResetWatches,
        ]
        .into_iter()
        .find(|t| *t as u32 == n)
    }
}

/// `struct xsd_sockmsg`, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Raw type: replies may carry types this crate does not know.
    pub msg_type: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub len: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        for (dst, v) in
            out.chunks_exact_mut(4)
                .zip([self.msg_type, self.req_id, self.tx_id, self.len])
        {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Decodes a header, refusing payload lengths beyond [`PAYLOAD_MAX`].
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, XsError> {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let header = Header {
            msg_type: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        };
        if header.len as usize > PAYLOAD_MAX {
            return Err(XsError::Protocol);
        }
        Ok(header)
    }
}

/// Xenstore failures: the daemon's error strings, then local ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XsError {
    /// EINVAL: malformed request (bad path, bad value).
    Invalid,
    /// EACCES: permissions forbid the access.
    Access,
    /// EEXIST: the node already exists.
    Exists,
    /// EISDIR: the operation needs a leaf.
    IsDir,
    /// ENOENT: no such node (or transaction, or watch).
    NoEntry,
    /// ENOMEM: the daemon is out of memory.
    NoMemory,
    /// ENOSPC: a quota was exceeded.
    NoSpace,
    /// EIO: internal daemon failure.
    Io,
    /// ENOTEMPTY: the directory is not empty.
    NotEmpty,
    /// ENOSYS: the daemon does not implement the request.
    NotImplemented,
    /// EROFS: the store is read-only.
    ReadOnly,
    /// EBUSY: the daemon is busy; retry.
    Busy,
    /// EAGAIN: the transaction conflicted; retry it.
    Again,
    /// EISCONN: already connected.
    IsConnected,
    /// E2BIG: request or value too large.
    TooBig,
    /// EPERM: operation not permitted.
    NotPermitted,
    /// An error string this crate does not know.
    UnknownError,
    /// The daemon sent something that breaks the protocol.
    Protocol,
    /// The request would exceed [`PAYLOAD_MAX`]; it was not sent.
    RequestTooLarge,
    /// The shared ring indices are inconsistent; the connection is unusable.
    RingCorrupt,
    /// The channel gave up waiting for the daemon.
    Timeout,
    /// A transaction kept conflicting past the retry limit.
    TooManyRetries,
}

const ERROR_STRINGS: &[(&str, XsError)] = &[
    ("EINVAL", XsError::Invalid),
    ("EACCES", XsError::Access),
    ("EEXIST", XsError::Exists),
    ("EISDIR", XsError::IsDir),
    ("ENOENT", XsError::NoEntry),
    ("ENOMEM", XsError::NoMemory),
    ("ENOSPC", XsError::NoSpace),
    ("EIO", XsError::Io),
    ("ENOTEMPTY", XsError::NotEmpty),
    ("ENOSYS", XsError::NotImplemented),
    ("EROFS", XsError::ReadOnly),
    ("EBUSY", XsError::Busy),
    ("EAGAIN", XsError::Again),
    ("EISCONN", XsError::IsConnected),
    ("E2BIG", XsError::TooBig),
    ("EPERM", XsError::NotPermitted),
];

impl XsError {
    /// Decodes an XS_ERROR payload ("EAGAIN\0").
    pub fn from_payload(payload: &[u8]) -> XsError {
        let name = payload.strip_suffix(b"\0").unwrap_or(payload);
        ERROR_STRINGS
            .iter()
            .find(|(s, _)| s.as_bytes() == name)
            .map_or(XsError::UnknownError, |(_, e)| *e)
    }

    /// The wire string of a daemon error (what xenstored sends).
    pub fn wire_name(self) -> Option<&'static str> {
        ERROR_STRINGS
            .iter()
            .find(|(_, e)| *e == self)
            .map(|(s, _)| *s)
    }
}

/// Access a permission entry grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    None,
    Read,
    Write,
    Both,
}

impl Access {
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }
    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
}

/// One permission entry ("r5"); the first entry of a node names its owner
/// and the access of every domain not listed after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perm {
    pub domid: DomId,
    pub access: Access,
}

impl Perm {
    /// Parses "b0", "r5", ...
    pub fn parse(s: &[u8]) -> Option<Perm> {
        let (&letter, digits) = s.split_first()?;
        let access = match letter {
            b'n' => Access::None,
            b'r' => Access::Read,
            b'w' => Access::Write,
            b'b' => Access::Both,
            _ => return None,
        };
        let domid = core::str::from_utf8(digits).ok()?.parse().ok()?;
        Some(Perm { domid, access })
    }

    /// Appends "r5\0".
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let letter = match self.access {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        };
        out.extend_from_slice(alloc::format!("{letter}{}\0", self.domid).as_bytes());
    }
}

/// Splits a payload of nul-terminated strings ("a\0b\0"); a missing final
/// nul is tolerated, invalid UTF-8 is a protocol error.
pub fn split_strings(payload: &[u8]) -> Result<Vec<String>, XsError> {
    let body = payload.strip_suffix(b"\0").unwrap_or(payload);
    if body.is_empty() {
        return Ok(Vec::new());
    }
    body.split(|b| *b == 0)
        .map(|s| {
            core::str::from_utf8(s)
                .map(String::from)
                .map_err(|_| XsError::Protocol)
        })
        .collect()
}

/// Encodes a permission list as a payload tail.
pub fn encode_perms(perms: &[Perm]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in perms {
        p.encode_into(&mut out);
    }
    out
}

/// Parses a permission list payload.
pub fn parse_perms(payload: &[u8]) -> Result<Vec<Perm>, XsError> {
    let body = payload.strip_suffix(b"\0").unwrap_or(payload);
    body.split(|b| *b == 0)
        .map(|s| Perm::parse(s).ok_or(XsError::Protocol))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_bound() {
        let h = Header {
            msg_type: MsgType::Write as u32,
            req_id: 7,
            tx_id: 3,
            len: 12,
        };
        let bytes = h.encode();
        assert_eq!(bytes[..4], [11, 0, 0, 0]);
        assert_eq!(Header::decode(&bytes), Ok(h));
        let big = Header { len: 4097, ..h }.encode();
        assert_eq!(Header::decode(&big), Err(XsError::Protocol));
    }

    #[test]
    fn error_strings_map_to_variants() {
        assert_eq!(XsError::from_payload(b"EAGAIN\0"), XsError::Again);
        assert_eq!(XsError::from_payload(b"ENOENT"), XsError::NoEntry);
        assert_eq!(XsError::from_payload(b"EWHAT\0"), XsError::UnknownError);
        assert_eq!(XsError::from_payload(b""), XsError::UnknownError);
        for (s, e) in ERROR_STRINGS {
            assert_eq!(e.wire_name(), Some(*s));
        }
        assert_eq!(MsgType::from_wire(16), Some(MsgType::Error));
        assert_eq!(MsgType::from_wire(0xffff), None);
    }

    #[test]
    fn strings_and_perms_parse_or_fail_cleanly() {
        assert_eq!(split_strings(b"a\0bc\0").unwrap(), ["a", "bc"]);
        assert_eq!(split_strings(b"").unwrap(), [] as [String; 0]);
        assert_eq!(split_strings(b"\xff\0"), Err(XsError::Protocol));
        let perms = [
            Perm {
                domid: 0,
                access: Access::None,
            },
            Perm {
                domid: 5,
                access: Access::Both,
            },
        ];
        let wire = encode_perms(&perms);
        assert_eq!(wire, b"n0\0b5\0");
        assert_eq!(parse_perms(&wire).unwrap(), perms);
        assert_eq!(parse_perms(b"x5\0"), Err(XsError::Protocol));
        assert_eq!(parse_perms(b"r\0"), Err(XsError::Protocol));
        assert_eq!(parse_perms(b"r99999\0"), Err(XsError::Protocol));
    }
}

//! The xenbus device states (public/io/xenbus.h) that both ends of a PV
//! device publish in their `state` node.

/// `enum xenbus_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    /// Backend: waiting for the frontend's ring details.
    InitWait = 2,
    /// Frontend: ring details published.
    Initialised = 3,
    Connected = 4,
    /// Going down; the other end should close too.
    Closing = 5,
    Closed = 6,
    /// Frontend: reconfiguration requested (not used by blkif).
    Reconfiguring = 7,
    /// Frontend: reconfiguration done (not used by blkif).
    Reconfigured = 8,
}

impl XenbusState {
    /// Parses a `state` node as the peer wrote it. Anything that is not a
    /// known state number reads as `Unknown`, which both ends treat as
    /// "the other end is gone".
    pub fn parse(value: &[u8]) -> XenbusState {
        let number = core::str::from_utf8(value)
            .ok()
            .and_then(|s| s.trim_end_matches('\0').trim().parse::<u32>().ok());
        match number {
            Some(1) => XenbusState::Initialising,
            Some(2) => XenbusState::InitWait,
            Some(3) => XenbusState::Initialised,
            Some(4) => XenbusState::Connected,
            Some(5) => XenbusState::Closing,
            Some(6) => XenbusState::Closed,
            Some(7) => XenbusState::Reconfiguring,
            Some(8) => XenbusState::Reconfigured,
            _ => XenbusState::Unknown,
        }
    }

    /// The node value to write.
    pub fn as_str(self) -> &'static str {
        const VALUES: [&str; 9] = ["0", "1", "2", "3", "4", "5", "6", "7", "8"];
        VALUES[self as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_garbage_is_unknown() {
        for n in 0..=8u8 {
            let text = [b'0' + n];
            let state = XenbusState::parse(&text);
            assert_eq!(state as u8, n);
            assert_eq!(state.as_str().as_bytes(), text);
        }
        for garbage in [&b""[..], b"9", b"-1", b"4x", b"\xff", b"99999999999"] {
            assert_eq!(XenbusState::parse(garbage), XenbusState::Unknown);
        }
        assert_eq!(XenbusState::parse(b"4\0"), XenbusState::Connected);
    }
}

//! When stordom restarts in place, and what it says about it: the
//! operator's control node (`control/restart`), the cap that ends a crash
//! loop, and the reason text kept (outside the heap) across the restart.

use core::fmt::{self, Write};

/// Longest reason kept and published in `data/last-restart`; longer ones
/// are cut.
pub const REASON_MAX: usize = 160;
/// A panic or watchdog restart this soon after the previous restart began
/// crashes the domain instead: the new instance failed the same way, and
/// restarting again would loop.
pub const MIN_RESTART_SPACING_NS: u64 = 10_000_000_000;

/// What a value written to `control/restart` asks for. Dom0 writes it;
/// anything, garbage too, maps to one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlRequest<'a> {
    /// Restart, with the operator's words (printable ASCII, cut to
    /// [`OPERATOR_WORDS_MAX`]; may be empty after that).
    Restart(&'a str),
    /// Test hook: panic in the serve loop (the panic path restarts).
    InjectPanic,
    /// Test hook: spin in the serve loop until the loop watchdog restarts.
    InjectHang,
    /// An empty value (the node cleared): nothing to do.
    Nothing,
}

/// Longest operator text taken from `control/restart`.
pub const OPERATOR_WORDS_MAX: usize = 64;

impl<'a> ControlRequest<'a> {
    /// Reads a `control/restart` value. Surrounding whitespace and a
    /// trailing NUL are ignored; `panic` and `hang` are the test hooks;
    /// any other value is a plain request, whose words are kept up to the
    /// first byte that is not printable ASCII.
    pub fn parse(value: &'a [u8]) -> Self {
        let value = value.strip_suffix(b"\0").unwrap_or(value).trim_ascii();
        match value {
            b"" => Self::Nothing,
            b"panic" => Self::InjectPanic,
            b"hang" => Self::InjectHang,
            _ => {
                let printable = value
                    .iter()
                    .take(OPERATOR_WORDS_MAX)
                    .take_while(|b| b.is_ascii_graphic() || **b == b' ')
                    .count();
                // Printable ASCII is valid UTF-8.
                Self::Restart(core::str::from_utf8(&value[..printable]).unwrap_or(""))
            }
        }
    }
}

/// Whether a restart may happen now, from when the last one began.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestartCap {
    last_start_ns: Option<u64>,
    /// A restart is under way (the new instance is not serving yet).
    in_progress: bool,
}

/// Why a restart was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The failure came while restarting: the new instance cannot start.
    DuringRestart,
    /// The previous restart began less than [`MIN_RESTART_SPACING_NS`]
    /// ago.
    TooSoon { since_ns: u64 },
}

impl RestartCap {
    pub const fn new() -> Self {
        RestartCap {
            last_start_ns: None,
            in_progress: false,
        }
    }

    /// Begins a restart at `now_ns`, or refuses it.
    pub fn begin(&mut self, now_ns: u64) -> Result<(), Refusal> {
        if self.in_progress {
            return Err(Refusal::DuringRestart);
        }
        if let Some(last) = self.last_start_ns {
            let since_ns = now_ns.saturating_sub(last);
            if since_ns < MIN_RESTART_SPACING_NS {
                return Err(Refusal::TooSoon { since_ns });
            }
        }
        self.last_start_ns = Some(now_ns);
        self.in_progress = true;
        Ok(())
    }

    /// The new instance serves: a later failure may restart again.
    pub fn serving(&mut self) {
        self.in_progress = false;
    }
}

/// Text of at most [`REASON_MAX`] bytes in a fixed buffer (no heap: it is
/// written in a panic and read after the heap was reset). Bytes that are
/// not printable ASCII become `?`; what does not fit is cut.
#[derive(Clone, Copy)]
pub struct ReasonText {
    bytes: [u8; REASON_MAX],
    len: usize,
}

impl ReasonText {
    pub const fn new() -> Self {
        ReasonText {
            bytes: [0; REASON_MAX],
            len: 0,
        }
    }

    /// `prefix: <args>`, e.g. `panic: <message>`.
    pub fn format(prefix: &str, args: fmt::Arguments<'_>) -> Self {
        let mut text = Self::new();
        let _ = write!(text, "{prefix}: {args}");
        text
    }

    pub fn as_str(&self) -> &str {
        // Only printable ASCII is ever stored.
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

impl Default for ReasonText {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for ReasonText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if self.len == REASON_MAX {
                break;
            }
            self.bytes[self.len] = match b {
                b'\n' | b'\t' => b' ',
                b if b.is_ascii_graphic() || b == b' ' => b,
                _ => b'?',
            };
            self.len += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_values_map_to_requests_whatever_dom0_writes() {
        use ControlRequest::*;
        assert_eq!(ControlRequest::parse(b""), Nothing);
        assert_eq!(ControlRequest::parse(b"  \n"), Nothing);
        assert_eq!(ControlRequest::parse(b"panic"), InjectPanic);
        assert_eq!(ControlRequest::parse(b"hang\n"), InjectHang);
        assert_eq!(ControlRequest::parse(b"hang\0"), InjectHang);
        assert_eq!(ControlRequest::parse(b"Panic"), Restart("Panic"));
        assert_eq!(
            ControlRequest::parse(b"upgrade to 1.2"),
            Restart("upgrade to 1.2")
        );
        assert_eq!(ControlRequest::parse(b"ok\xff\x00junk"), Restart("ok"));
        assert_eq!(ControlRequest::parse(b"\xc3\xa9t\xc3\xa9"), Restart(""));
        let long = [b'x'; 5000];
        assert_eq!(
            ControlRequest::parse(&long),
            Restart(core::str::from_utf8(&long[..OPERATOR_WORDS_MAX]).unwrap())
        );
    }

    #[test]
    fn the_cap_refuses_a_restart_during_one_or_too_soon_after_the_last() {
        let mut cap = RestartCap::new();
        assert_eq!(cap.begin(5), Ok(()));
        assert_eq!(cap.begin(6), Err(Refusal::DuringRestart));
        cap.serving();
        assert_eq!(
            cap.begin(5 + MIN_RESTART_SPACING_NS - 1),
            Err(Refusal::TooSoon {
                since_ns: MIN_RESTART_SPACING_NS - 1
            })
        );
        assert_eq!(cap.begin(5 + MIN_RESTART_SPACING_NS), Ok(()));
        cap.serving();
        // A clock that went backwards is not a reason to loop.
        assert!(cap.begin(0).is_err());
    }

    #[test]
    fn reasons_are_printable_and_bounded() {
        let text = ReasonText::format("panic", format_args!("bad\nthing\x07 {}", "é"));
        assert_eq!(text.as_str(), "panic: bad thing? ??");
        let long = ReasonText::format("watchdog", format_args!("{:0>500}", 1));
        assert_eq!(long.as_str().len(), REASON_MAX);
        assert!(long.as_str().starts_with("watchdog: 000"));
    }
}

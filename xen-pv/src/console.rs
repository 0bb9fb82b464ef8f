//! The PV console ring (`xencons_interface`): what `xl console` shows.

use core::fmt;
use core::sync::atomic::{AtomicU8, AtomicU32};

use crate::ring::{ByteRing, PeerChannel};

/// Bytes of the guest -> console direction.
pub const OUT_SIZE: usize = 2048;
/// Bytes of the console -> guest direction.
pub const IN_SIZE: usize = 1024;

/// `struct xencons_interface`: the shared console page.
#[repr(C)]
pub struct XenconsInterface {
    pub input: [AtomicU8; IN_SIZE],
    pub output: [AtomicU8; OUT_SIZE],
    pub in_cons: AtomicU32,
    pub in_prod: AtomicU32,
    pub out_cons: AtomicU32,
    pub out_prod: AtomicU32,
}

impl XenconsInterface {
    /// Guest output, read by xenconsoled.
    pub fn output(&self) -> ByteRing<'_> {
        ByteRing::new(&self.output, &self.out_cons, &self.out_prod)
    }

    /// Keyboard input from `xl console`.
    pub fn input(&self) -> ByteRing<'_> {
        ByteRing::new(&self.input, &self.in_cons, &self.in_prod)
    }
}

#[cfg(any(test, feature = "sim"))]
impl XenconsInterface {
    /// A zeroed page.
    pub fn new_boxed() -> alloc::boxed::Box<XenconsInterface> {
        // SAFETY: all fields are atomics, for which zero is valid.
        alloc::boxed::Box::new(unsafe { core::mem::zeroed() })
    }
}

/// Times a full ring is waited on before output is dropped: a dead
/// xenconsoled must not stop the domain.
const MAX_WAITS: usize = 64;

/// Console output over the ring, notifying xenconsoled through `C`.
pub struct PvConsole<'a, C> {
    iface: &'a XenconsInterface,
    channel: C,
    dropped: u64,
}

impl<'a, C: PeerChannel> PvConsole<'a, C> {
    pub fn new(iface: &'a XenconsInterface, channel: C) -> Self {
        PvConsole {
            iface,
            channel,
            dropped: 0,
        }
    }

    /// Bytes dropped because the ring stayed full (or was corrupt).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The channel (tests reach the simulated console daemon through it).
    pub fn channel_mut(&mut self) -> &mut C {
        &mut self.channel
    }

    /// Writes all of `bytes`, waiting for xenconsoled while the ring is
    /// full; gives up (counting the loss) if it stops draining.
    pub fn write_bytes(&mut self, mut bytes: &[u8]) {
        let mut waits = 0;
        while !bytes.is_empty() {
            let Ok(written) = self.iface.output().write(bytes) else {
                break;
            };
            bytes = &bytes[written..];
            self.channel.notify();
            if bytes.is_empty() || waits == MAX_WAITS || self.channel.wait().is_err() {
                break;
            }
            waits += 1;
        }
        self.dropped += bytes.len() as u64;
    }
}

impl<C: PeerChannel> fmt::Write for PvConsole<'_, C> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Severity of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    fn tag(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        }
    }
}

/// A log line assembled in a fixed buffer (no allocation, one write to
/// the console so lines do not interleave); over-long lines are cut and
/// marked with `~`.
pub struct LogLine<const N: usize> {
    buf: [u8; N],
    len: usize,
    truncated: bool,
}

impl<const N: usize> LogLine<N> {
    /// "[    12.345678] INFO  message\r\n" for `uptime_ns` since boot.
    pub fn format(uptime_ns: u64, level: Level, message: fmt::Arguments<'_>) -> Self {
        let mut line = LogLine {
            buf: [0; N],
            len: 0,
            truncated: false,
        };
        let secs = uptime_ns / 1_000_000_000;
        let micros = uptime_ns % 1_000_000_000 / 1000;
        // Writing into the buffer cannot fail; overflow sets `truncated`.
        let _ = fmt::write(
            &mut line,
            format_args!("[{secs:>6}.{micros:06}] {} {message}", level.tag()),
        );
        // The console is a raw terminal: end lines with CR LF.
        let tail: &[u8] = if line.truncated { b"~\r\n" } else { b"\r\n" };
        let at = line.len.min(N.saturating_sub(tail.len()));
        let end = (at + tail.len()).min(N);
        line.buf[at..end].copy_from_slice(&tail[..end - at]);
        line.len = end;
        line
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> fmt::Write for LogLine<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = N - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        self.truncated |= n < s.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::TimedOut;
    use alloc::vec::Vec;
    use core::mem::{offset_of, size_of};

    /// xenconsoled draining `per_wait` bytes per wait, or dead (0).
    struct Daemon<'a> {
        iface: &'a XenconsInterface,
        per_wait: usize,
        seen: Vec<u8>,
        notified: usize,
    }

    impl PeerChannel for Daemon<'_> {
        fn notify(&mut self) {
            self.notified += 1;
        }
        fn wait(&mut self) -> Result<(), TimedOut> {
            let mut buf = alloc::vec![0; self.per_wait];
            let n = self.iface.output().read(&mut buf).map_err(|_| TimedOut)?;
            self.seen.extend_from_slice(&buf[..n]);
            if n == 0 { Err(TimedOut) } else { Ok(()) }
        }
    }

    #[test]
    fn layout_matches_console_h() {
        assert_eq!(offset_of!(XenconsInterface, output), 1024);
        assert_eq!(offset_of!(XenconsInterface, in_cons), 3072);
        assert_eq!(offset_of!(XenconsInterface, out_prod), 3084);
        assert_eq!(size_of::<XenconsInterface>(), 3088);
    }

    #[test]
    fn output_larger_than_the_ring_waits_for_the_daemon() {
        let iface = XenconsInterface::new_boxed();
        iface
            .out_cons
            .store(u32::MAX - 5, core::sync::atomic::Ordering::Relaxed);
        iface
            .out_prod
            .store(u32::MAX - 5, core::sync::atomic::Ordering::Relaxed);
        let daemon = Daemon {
            iface: &iface,
            per_wait: 1000,
            seen: Vec::new(),
            notified: 0,
        };
        let mut con = PvConsole::new(&iface, daemon);
        let text: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
        con.write_bytes(&text);
        assert_eq!(con.dropped(), 0);
        let mut rest = [0u8; OUT_SIZE];
        let n = iface.output().read(&mut rest).unwrap();
        let d = con.channel_mut();
        d.seen.extend_from_slice(&rest[..n]);
        assert_eq!(d.seen, text);
        assert!(d.notified >= 3);
    }

    #[test]
    fn a_dead_daemon_costs_output_not_liveness() {
        let iface = XenconsInterface::new_boxed();
        let daemon = Daemon {
            iface: &iface,
            per_wait: 0,
            seen: Vec::new(),
            notified: 0,
        };
        let mut con = PvConsole::new(&iface, daemon);
        con.write_bytes(&[b'x'; 3000]);
        assert_eq!(con.dropped(), 3000 - OUT_SIZE as u64);
        con.write_bytes(b"more");
        assert_eq!(con.dropped(), 3000 - OUT_SIZE as u64 + 4);
    }

    #[test]
    fn log_lines_carry_time_and_level_and_are_bounded() {
        let line = LogLine::<80>::format(
            12_345_678_901,
            Level::Info,
            format_args!("vbd {} connected", 768),
        );
        assert_eq!(
            line.as_bytes(),
            b"[    12.345678] INFO  vbd 768 connected\r\n"
        );
        let warn = LogLine::<80>::format(0, Level::Warn, format_args!("x"));
        assert_eq!(warn.as_bytes(), b"[     0.000000] WARN  x\r\n");
        let long = LogLine::<32>::format(0, Level::Error, format_args!("{}", "y".repeat(100)));
        assert_eq!(long.as_bytes().len(), 32);
        assert!(long.as_bytes().ends_with(b"yy~\r\n"));
        let tiny = LogLine::<2>::format(0, Level::Error, format_args!("z"));
        assert_eq!(tiny.as_bytes(), b"~\r");
    }
}

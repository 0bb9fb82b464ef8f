//! Console output and the `log` backend. Sinks: the 0xe9 debug port
//! (QEMU's debugcon; Xen's own console for HVM/PVH guests), COM1 on bare
//! metal, and the Xen PV console ring (what `xl console` shows) once it is
//! connected. Lines carry a timestamp and a level.
//!
//! Port output is lock-free (a byte at a time to the UART, one `rep outsb`
//! per piece to 0xe9), so an exception or panic can always print, even if
//! it interrupted a half-written line.

use crate::arch::{clock, cpu};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};
use kernel::cmdline::LogLevel;
use xen_pv::console::{Level, LogLine};

const COM1: u16 = 0x3f8;
const DEBUGCON: u16 = 0xe9;
/// Longest log line; longer ones are cut and marked.
const LINE_MAX: usize = 512;

/// Off under Xen: a PVH guest has no UART, and in an HVM guest every
/// access to the device model's UART is a round trip to dom0 (two per
/// byte: 2.4 of the 2.7 s an HVM stordom took to serve under nested TCG
/// went to its early lines). The 0xe9 port, which Xen itself prints,
/// carries them instead.
static COM1_ENABLED: AtomicBool = AtomicBool::new(true);

/// Programs COM1 for 115200 8N1 with FIFOs, unless running on Xen.
pub fn init() {
    if crate::xen::detect().is_some() {
        COM1_ENABLED.store(false, Ordering::Relaxed);
        return;
    }
    cpu::outb(COM1 + 1, 0x00); // no UART interrupts
    cpu::outb(COM1 + 3, 0x80); // DLAB on
    cpu::outb(COM1, 0x01); // divisor 1 = 115200
    cpu::outb(COM1 + 1, 0x00);
    cpu::outb(COM1 + 3, 0x03); // 8N1, DLAB off
    cpu::outb(COM1 + 2, 0xc7); // FIFOs on and cleared
    cpu::outb(COM1 + 4, 0x0b);
}

fn put_serial_byte(b: u8) {
    // Wait for the transmitter, bounded: an absent UART reads 0xff
    // (ready), and a stuck one must not hang the kernel.
    for _ in 0..100_000 {
        if cpu::inb(COM1 + 5) & 0x20 != 0 {
            break;
        }
    }
    cpu::outb(COM1, b);
}

fn write_all_sinks(bytes: &[u8]) {
    if COM1_ENABLED.load(Ordering::Relaxed) {
        bytes.iter().copied().for_each(put_serial_byte);
    }
    // Under Xen every port access is a VM exit: a line costs one exit
    // (Xen emulates the string instruction) instead of one per byte.
    cpu::outsb(DEBUGCON, bytes);
    crate::xen::console_write(bytes);
}

/// A writer to every console.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_all_sinks(s.as_bytes());
        Ok(())
    }
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => Level::Error,
            log::Level::Warn => Level::Warn,
            log::Level::Info => Level::Info,
            log::Level::Debug => Level::Debug,
            log::Level::Trace => Level::Trace,
        };
        let line = LogLine::<LINE_MAX>::format(clock::now_ns(), level, *record.args());
        write_all_sinks(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Installs the logger at `level`.
pub fn init_log(level: LogLevel) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(match level {
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    });
}

/// Prints a fatal message whatever the log level.
pub fn fatal(args: fmt::Arguments) {
    let _ = Console.write_fmt(args);
}

/// Prints the 16 words above `rsp`, where they are mapped.
pub fn stack_dump(rsp: u64) {
    let _ = writeln!(Console, "  stack at {rsp:#018x}:");
    for row in 0..8u64 {
        let at = rsp.wrapping_add(row * 16);
        match (
            crate::memory::read_u64(at),
            crate::memory::read_u64(at.wrapping_add(8)),
        ) {
            (Some(a), Some(b)) => {
                let _ = writeln!(Console, "    {at:#018x}: {a:#018x} {b:#018x}");
            }
            _ => {
                let _ = writeln!(Console, "    {at:#018x}: <not mapped>");
                return;
            }
        }
    }
}

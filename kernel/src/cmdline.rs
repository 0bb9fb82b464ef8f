//! The kernel command line: space-separated `key=value` words.

use crate::idle_poll::DEFAULT_IDLE_POLL_NS;
use core::fmt;
use core::net::Ipv4Addr;

/// Minimum severity that reaches the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Only errors.
    Error,
    /// Errors and warnings.
    Warn,
    /// The default.
    Info,
    /// Diagnostic detail.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "error" => Self::Error,
            "warn" => Self::Warn,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => return None,
        })
    }
}

/// A deliberate fault, for the harness's negative tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Read an unmapped address (#PF).
    PageFault,
    /// Call `panic!`.
    Panic,
    /// Execute `ud2` (#UD).
    InvalidOpcode,
    /// Recurse until the boot stack's guard page is hit.
    StackOverflow,
    /// Recurse inside an interrupt handler until its IST stack's guard
    /// page is hit.
    InterruptStackOverflow,
    /// Take an interrupt inside an interrupt handler (the IST nesting check
    /// must stop it).
    NestedInterrupt,
}

impl Fault {
    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "pagefault" => Self::PageFault,
            "panic" => Self::Panic,
            "ud" => Self::InvalidOpcode,
            "stackoverflow" => Self::StackOverflow,
            "iststackoverflow" => Self::InterruptStackOverflow,
            "nestedinterrupt" => Self::NestedInterrupt,
            _ => return None,
        })
    }
}

/// What stordom does once booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Report what the machine looks like and exit (the default on bare
    /// metal).
    Boot,
    /// Serve blkif backends (the default under Xen).
    Serve,
    /// Exercise the Xen interfaces against a cooperating dom0 and exit.
    XenSelftest,
    /// Write, read back and check every disk found, then exit.
    DiskSelftest,
    /// Measure every disk found and print a table, then exit.
    DiskBench,
}

impl Job {
    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "boot" => Self::Boot,
            "serve" => Self::Serve,
            "xen-selftest" => Self::XenSelftest,
            "disk-selftest" => Self::DiskSelftest,
            "disk-bench" => Self::DiskBench,
            _ => return None,
        })
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options<'a> {
    /// `loglevel=`.
    pub log_level: LogLevel,
    /// `fault=`: trigger this fault once booted.
    pub fault: Option<Fault>,
    /// `job=`: what to do once booted (None: the platform's default).
    pub job: Option<Job>,
    /// `idle_poll_us=`: how long the serve loop polls after its last work
    /// before it sleeps, in nanoseconds (see `idle_poll`).
    pub idle_poll_ns: u64,
    /// `stordom.ip=ADDR/PREFIX`: the vif's IPv4 address (it wins over
    /// the vif's `ip` node and DHCP).
    pub ip: Option<Ipv4Cidr>,
    /// The first word not understood, reported rather than silently dropped.
    pub unknown: Option<&'a str>,
}

/// An IPv4 address and its network's prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// `ADDR/PREFIX`, or a bare `ADDR` with `default_prefix`.
    pub fn parse(text: &str, default_prefix: u8) -> Option<Self> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, prefix.parse().ok()?),
            None => (text, default_prefix),
        };
        (prefix <= 32).then_some(())?;
        Some(Self {
            address: address.parse().ok()?,
            prefix,
        })
    }
}

/// `ADDR/PREFIX`.
impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl<'a> Options<'a> {
    /// Parses a command line. Bad words are kept in `unknown`; the rest
    /// still applies, so a typo never stops the boot.
    pub fn parse(cmdline: &'a str) -> Self {
        let mut opts = Self {
            log_level: LogLevel::Info,
            fault: None,
            job: None,
            idle_poll_ns: DEFAULT_IDLE_POLL_NS,
            ip: None,
            unknown: None,
        };
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            let understood = match key {
                "loglevel" => LogLevel::parse(value).map(|l| opts.log_level = l).is_some(),
                "fault" => Fault::parse(value).map(|f| opts.fault = Some(f)).is_some(),
                "job" => Job::parse(value).map(|j| opts.job = Some(j)).is_some(),
                "idle_poll_us" => value
                    .parse::<u64>()
                    .ok()
                    .and_then(|us| us.checked_mul(1000))
                    .map(|ns| opts.idle_poll_ns = ns)
                    .is_some(),
                "stordom.ip" => Ipv4Cidr::parse(value, 32)
                    .filter(|_| value.contains('/'))
                    .map(|cidr| opts.ip = Some(cidr))
                    .is_some(),
                _ => false,
            };
            if !understood && opts.unknown.is_none() {
                opts.unknown = Some(word);
            }
        }
        opts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let o = Options::parse("");
        assert_eq!(
            o,
            Options {
                log_level: LogLevel::Info,
                fault: None,
                job: None,
                idle_poll_ns: DEFAULT_IDLE_POLL_NS,
                ip: None,
                unknown: None
            }
        );
    }

    #[test]
    fn known_words() {
        let o = Options::parse("  loglevel=debug   fault=pagefault ");
        assert_eq!(o.log_level, LogLevel::Debug);
        assert_eq!(o.fault, Some(Fault::PageFault));
        assert_eq!(Options::parse("fault=ud").fault, Some(Fault::InvalidOpcode));
        assert_eq!(Options::parse("fault=panic").fault, Some(Fault::Panic));
        assert_eq!(
            Options::parse("job=xen-selftest").job,
            Some(Job::XenSelftest)
        );
        assert_eq!(Options::parse("job=boot").job, Some(Job::Boot));
        assert_eq!(Options::parse("job=serve").job, Some(Job::Serve));
        assert_eq!(
            Options::parse("job=disk-selftest").job,
            Some(Job::DiskSelftest)
        );
        assert_eq!(Options::parse("job=disk-bench").job, Some(Job::DiskBench));
        assert_eq!(Options::parse("job=dance").unknown, Some("job=dance"));
        assert_eq!(Options::parse("idle_poll_us=0").idle_poll_ns, 0);
        assert_eq!(Options::parse("idle_poll_us=750").idle_poll_ns, 750_000);
        let bad = Options::parse("idle_poll_us=-1");
        assert_eq!(bad.unknown, Some("idle_poll_us=-1"));
        assert_eq!(bad.idle_poll_ns, DEFAULT_IDLE_POLL_NS);
        assert_eq!(
            Options::parse("fault=stackoverflow").fault,
            Some(Fault::StackOverflow)
        );
        assert_eq!(
            Options::parse("fault=iststackoverflow").fault,
            Some(Fault::InterruptStackOverflow)
        );
        assert_eq!(
            Options::parse("fault=nestedinterrupt").fault,
            Some(Fault::NestedInterrupt)
        );
    }

    #[test]
    fn the_vif_address_needs_its_prefix() {
        let ip = Options::parse("stordom.ip=10.0.0.2/24").ip;
        assert_eq!(
            ip,
            Some(Ipv4Cidr {
                address: Ipv4Addr::new(10, 0, 0, 2),
                prefix: 24
            })
        );
        for bad in [
            "stordom.ip=10.0.0.2",
            "stordom.ip=10.0.0.2/33",
            "stordom.ip=10.0.0/24",
            "stordom.ip=/24",
            "stordom.ip=10.0.0.2/",
        ] {
            let o = Options::parse(bad);
            assert_eq!((o.ip, o.unknown), (None, Some(bad)));
        }
        assert_eq!(
            Ipv4Cidr::parse("192.168.1.9", 24),
            Some(Ipv4Cidr {
                address: Ipv4Addr::new(192, 168, 1, 9),
                prefix: 24
            })
        );
        assert_eq!(std::format!("{}", ip.expect("parsed above")), "10.0.0.2/24");
    }

    #[test]
    fn unknown_words_are_reported_and_do_not_stop_parsing() {
        let o = Options::parse("loglevel=loud fault=ud colour");
        assert_eq!(o.unknown, Some("loglevel=loud"));
        assert_eq!(o.log_level, LogLevel::Info);
        assert_eq!(o.fault, Some(Fault::InvalidOpcode));
    }
}

//! Rate-limited logging: a frontend cannot flood the console.

use alloc::string::String;
use core::fmt;

use crate::BackendServices;

/// Log lines one vbd may print per second; the rest are counted.
pub const MAX_LOG_LINES_PER_SECOND: u32 = 10;

/// The second those lines are counted in.
pub(crate) const LOG_WINDOW_NS: u64 = 1_000_000_000;

/// Prints at most [`MAX_LOG_LINES_PER_SECOND`] lines a second for one vbd.
pub struct RateLimitedLog {
    label: String,
    window_start_ns: u64,
    lines_in_window: u32,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(label: String) -> Self {
        RateLimitedLog {
            label,
            window_start_ns: 0,
            lines_in_window: 0,
            suppressed: 0,
        }
    }

    pub fn line<S: BackendServices>(&mut self, svc: &mut S, args: fmt::Arguments<'_>) {
        let now = svc.now_ns();
        if now.saturating_sub(self.window_start_ns) >= LOG_WINDOW_NS {
            if self.suppressed > 0 {
                let (label, n) = (&self.label, self.suppressed);
                svc.log(format_args!("{label}: {n} more messages suppressed"));
            }
            self.window_start_ns = now;
            self.lines_in_window = 0;
            self.suppressed = 0;
        }
        if self.lines_in_window < MAX_LOG_LINES_PER_SECOND {
            self.lines_in_window += 1;
            let label = &self.label;
            svc.log(format_args!("{label}: {args}"));
        } else {
            self.suppressed += 1;
        }
    }
}

//! How long the serve loop keeps polling once the rings went quiet, before
//! it sleeps (adaptive polling). Under nested emulation each sleep is a
//! `SCHEDOP_poll` and a wake-up, two exits of the vCPU, per request at
//! queue depth 1: a frontend that answers its completion with its next
//! request within the window finds stordom still polling.

/// The window when the command line names none (`idle_poll_us=`): none.
/// On these 2-core machines under nested TCG a polling stordom takes the
/// CPU the guest and dom0 need: the same build side by side (the `ab`
/// scenario, runs/20261207-065713-ab) gave 4k QD1 read p50 733-782 us
/// polling 200 us against 561-602 us sleeping at once, QD1 write 0.77x
/// the IOPS, QD32 even. Worth trying where stordom has a core of its own.
pub const DEFAULT_IDLE_POLL_NS: u64 = 0;

/// When the loop last had work, and how long after it may not sleep.
pub struct IdlePoll {
    window_ns: u64,
    last_busy_ns: u64,
}

impl IdlePoll {
    /// A loop that polls `window_ns` after its last work (0: sleeps at
    /// once).
    pub fn new(window_ns: u64) -> Self {
        Self {
            window_ns,
            last_busy_ns: 0,
        }
    }

    /// The loop found work at `now_ns`.
    pub fn busy(&mut self, now_ns: u64) {
        self.last_busy_ns = now_ns;
    }

    /// Whether the loop, idle at `now_ns`, may sleep.
    pub fn may_sleep(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_busy_ns) >= self.window_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_only_a_window_after_the_last_work() {
        let mut poll = IdlePoll::new(200);
        poll.busy(1_000);
        assert!(!poll.may_sleep(1_000));
        assert!(!poll.may_sleep(1_199));
        assert!(poll.may_sleep(1_200));
        poll.busy(1_150);
        assert!(!poll.may_sleep(1_200));
        assert!(poll.may_sleep(900_000));
        let mut at_once = IdlePoll::new(0);
        at_once.busy(5);
        assert!(at_once.may_sleep(5));
    }
}

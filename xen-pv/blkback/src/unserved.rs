//! How long the rings went unserved. The loop serves them once a turn, and
//! again in each xenstore wait of the toolstack's work, so a long turn
//! need not have kept them waiting: the gap between serving passes says
//! whether it did.

/// A stretch of time with no serving pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnservedGap {
    /// Its length.
    pub len_ns: u64,
    /// When it ended: the start of the pass that closed it, or the time it
    /// was taken at if still open.
    pub ended_ns: u64,
}

/// The longest gap between the starts of two consecutive serving passes,
/// from the times the passes began (no clock reading of its own).
#[derive(Default)]
pub(crate) struct UnservedGaps {
    /// When the last pass began; `None` before the first.
    last_pass_ns: Option<u64>,
    /// The longest gap closed since the last [`Self::take_longest`].
    longest: UnservedGap,
}

impl UnservedGaps {
    /// A serving pass began at `now`.
    pub(crate) fn served(&mut self, now: u64) {
        if let Some(last) = self.last_pass_ns {
            let len_ns = now.saturating_sub(last);
            if len_ns > self.longest.len_ns {
                self.longest = UnservedGap {
                    len_ns,
                    ended_ns: now,
                };
            }
        }
        self.last_pass_ns = Some(now);
    }

    /// Nothing needed serving until `now` (an idle halt, which any event
    /// ends), so the next gap counts from there.
    pub(crate) fn idle_until(&mut self, now: u64) {
        self.last_pass_ns = Some(now);
    }

    /// The longest gap since the last call, the one still open at `now`
    /// included (a gap is long already before a pass closes it).
    pub(crate) fn take_longest(&mut self, now: u64) -> UnservedGap {
        let open = UnservedGap {
            len_ns: self.last_pass_ns.map_or(0, |last| now.saturating_sub(last)),
            ended_ns: now,
        };
        let closed = core::mem::take(&mut self.longest);
        if open.len_ns > closed.len_ns {
            open
        } else {
            closed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(len_ns: u64, ended_ns: u64) -> UnservedGap {
        UnservedGap { len_ns, ended_ns }
    }

    #[test]
    fn the_longest_gap_between_passes_is_taken_once() {
        let mut gaps = UnservedGaps::default();
        gaps.served(100);
        gaps.served(150);
        gaps.served(900);
        gaps.served(1000);
        assert_eq!(gaps.take_longest(1010), gap(750, 900));
        // Taken: only what came since counts.
        gaps.served(1200);
        assert_eq!(gaps.take_longest(1250), gap(200, 1200));
    }

    #[test]
    fn a_gap_still_open_counts() {
        let mut gaps = UnservedGaps::default();
        assert_eq!(gaps.take_longest(500).len_ns, 0, "no pass yet");
        gaps.served(1000);
        gaps.served(1100);
        assert_eq!(gaps.take_longest(3000), gap(1900, 3000));
        // Closed later, it counts whole.
        gaps.served(3500);
        assert_eq!(gaps.take_longest(3600), gap(2400, 3500));
    }

    #[test]
    fn an_idle_halt_is_no_gap() {
        let mut gaps = UnservedGaps::default();
        gaps.served(1000);
        gaps.idle_until(9000);
        gaps.served(9100);
        assert_eq!(gaps.take_longest(9150), gap(100, 9100));
    }
}

//! The serve loop's vCPU time split between its turns and its sleeps.

use xen_pv::vcpu::CpuTimes;

/// Where the vCPU's running time (Xen's runstate) went: inside the turns
/// (stordom's own work and its hypercalls), and across the sleeps (Xen's
/// way into the block and back out of it, under the emulator a world
/// switch each way), with the wait for a physical CPU after each wake-up.
/// The serve loop reads the runstate once at each turn's end and once
/// after each sleep, each reading ending one span and starting the next,
/// so the two cover all its running time.
#[derive(Clone, Copy, Default)]
pub struct CpuSplit {
    pub running_in_turns_ns: u64,
    pub running_in_sleeps_ns: u64,
    pub runnable_in_sleeps_ns: u64,
}

impl CpuSplit {
    /// Adds a turn that began at `start` and ended at `end`.
    pub fn add_turn(&mut self, start: Option<CpuTimes>, end: Option<CpuTimes>) {
        if let (Some(start), Some(end)) = (start, end) {
            self.running_in_turns_ns += end.since(&start).running;
        }
    }

    /// Adds a sleep entered at `before` and left at `after`.
    pub fn add_sleep(&mut self, before: Option<CpuTimes>, after: Option<CpuTimes>) {
        if let (Some(before), Some(after)) = (before, after) {
            let spent = after.since(&before);
            self.running_in_sleeps_ns += spent.running;
            self.runnable_in_sleeps_ns += spent.runnable;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(running: u64, runnable: u64, blocked: u64) -> Option<CpuTimes> {
        Some(CpuTimes {
            running,
            runnable,
            blocked,
            offline: 0,
        })
    }

    #[test]
    fn turns_count_running_and_sleeps_count_running_and_runnable() {
        let mut split = CpuSplit::default();
        split.add_turn(times(100, 10, 0), times(160, 15, 0));
        split.add_sleep(times(165, 15, 0), times(200, 40, 900));
        split.add_turn(times(200, 40, 900), times(230, 40, 900));
        assert_eq!(split.running_in_turns_ns, 90);
        assert_eq!(split.running_in_sleeps_ns, 35);
        assert_eq!(split.runnable_in_sleeps_ns, 25);
    }

    #[test]
    fn a_reading_missing_on_either_side_adds_nothing() {
        let mut split = CpuSplit::default();
        split.add_turn(None, times(50, 0, 0));
        split.add_turn(times(50, 0, 0), None);
        split.add_sleep(None, times(50, 5, 5));
        split.add_sleep(times(50, 5, 5), None);
        assert_eq!(split.running_in_turns_ns, 0);
        assert_eq!(split.running_in_sleeps_ns, 0);
        assert_eq!(split.runnable_in_sleeps_ns, 0);
    }
}

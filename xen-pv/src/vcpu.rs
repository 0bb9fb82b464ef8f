//! `vcpu_op`: the runstate area, where Xen records how long a vCPU has
//! run, waited for a physical CPU, blocked and been offline. It tells a
//! slow stordom apart from one Xen did not run.

use crate::hypercall::{Errno, Hypercall, HypercallOp};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// `VCPUOP_register_runstate_memory_area`.
const VCPUOP_REGISTER_RUNSTATE_MEMORY_AREA: u64 = 5;
/// `RUNSTATE_running`: the index of [`CpuTimes::running`] in `time[]`.
const RUNSTATE_RUNNING: u32 = 0;
/// Set in `state_entry_time` while Xen writes the area (only when the
/// guest enabled `VMASST_TYPE_runstate_update_flag`; harmless otherwise).
const RUNSTATE_UPDATE: u64 = 1 << 63;

/// `struct vcpu_runstate_info`, written by Xen at each of the vCPU's
/// context switches.
#[repr(C)]
pub struct RunstateArea {
    state: AtomicU32,
    _pad: u32,
    state_entry_time: AtomicU64,
    time: [AtomicU64; 4],
}

impl RunstateArea {
    /// An area Xen has not written yet.
    pub const fn new() -> Self {
        Self {
            state: AtomicU32::new(0),
            _pad: 0,
            state_entry_time: AtomicU64::new(0),
            time: [const { AtomicU64::new(0) }; 4],
        }
    }

    /// The vCPU's accumulated times at Xen system time `now_ns`, read by
    /// the vCPU itself (so it is running: the time since it entered that
    /// state counts as running). `None` before Xen's first write.
    pub fn times_at(&self, now_ns: u64) -> Option<CpuTimes> {
        let entry = self.state_entry_time.load(Ordering::Acquire) & !RUNSTATE_UPDATE;
        if entry == 0 {
            return None;
        }
        let [running, runnable, blocked, offline] =
            self.time.each_ref().map(|t| t.load(Ordering::Relaxed));
        let current = if self.state.load(Ordering::Relaxed) == RUNSTATE_RUNNING {
            now_ns.saturating_sub(entry)
        } else {
            0
        };
        Some(CpuTimes {
            running: running.saturating_add(current),
            runnable,
            blocked,
            offline,
        })
    }
}

impl Default for RunstateArea {
    fn default() -> Self {
        Self::new()
    }
}

/// Nanoseconds a vCPU spent in each runstate since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub running: u64,
    /// Ready to run but not given a physical CPU (steal time).
    pub runnable: u64,
    pub blocked: u64,
    pub offline: u64,
}

impl CpuTimes {
    /// The time spent in each state between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            running: self.running.saturating_sub(earlier.running),
            runnable: self.runnable.saturating_sub(earlier.runnable),
            blocked: self.blocked.saturating_sub(earlier.blocked),
            offline: self.offline.saturating_sub(earlier.offline),
        }
    }
}

/// Asks Xen to keep `vcpu`'s runstate in `area` from now on. Xen writes
/// it by virtual address at every context switch, so `area` must stay
/// mapped at this address for the domain's life: hence `'static`.
pub fn register_runstate_area<H: Hypercall + ?Sized>(
    h: &H,
    vcpu: u32,
    area: &'static RunstateArea,
) -> Result<(), Errno> {
    // `struct vcpu_register_runstate_memory_area`: one guest address.
    let mut arg: u64 = core::ptr::from_ref(area) as u64;
    // SAFETY: the argument is a live u64 holding the address of a
    // `'static` area with the layout of `struct vcpu_runstate_info`, made
    // of atomics, so Xen's later writes race with nothing unsound.
    Errno::check(unsafe {
        h.hypercall(
            HypercallOp::Vcpu,
            [
                VCPUOP_REGISTER_RUNSTATE_MEMORY_AREA,
                u64::from(vcpu),
                core::ptr::from_mut(&mut arg) as u64,
                0,
                0,
            ],
        )
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn the_area_has_the_layout_of_vcpu_runstate_info() {
        assert_eq!(size_of::<RunstateArea>(), 48);
        assert_eq!(offset_of!(RunstateArea, state_entry_time), 8);
        assert_eq!(offset_of!(RunstateArea, time), 16);
    }

    #[test]
    fn the_running_state_counts_up_to_now_and_others_stay_as_written() {
        let area = RunstateArea::new();
        assert_eq!(area.times_at(1_000), None);
        area.time[0].store(100, Ordering::Relaxed);
        area.time[1].store(7, Ordering::Relaxed);
        area.time[2].store(50, Ordering::Relaxed);
        area.state_entry_time.store(900, Ordering::Release);
        let t = area.times_at(1_000).unwrap();
        assert_eq!(
            (t.running, t.runnable, t.blocked, t.offline),
            (200, 7, 50, 0)
        );
        // A clock behind the entry time (TSC skew) adds nothing.
        assert_eq!(area.times_at(800).unwrap().running, 100);
        area.state.store(1, Ordering::Relaxed);
        assert_eq!(area.times_at(1_000).unwrap().running, 100);
        let later = CpuTimes {
            running: 300,
            runnable: 17,
            blocked: 50,
            offline: 0,
        };
        assert_eq!(
            later.since(&t),
            CpuTimes {
                running: 100,
                runnable: 10,
                blocked: 0,
                offline: 0
            }
        );
    }
}

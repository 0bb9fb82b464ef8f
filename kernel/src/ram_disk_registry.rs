//! The RAM disks (`target=ram:SIZE`) of the vbds, kept by backend path in
//! a fixed-capacity table outside the heap, so that their memory (frames
//! from the frame allocator) outlives an in-place restart and the new
//! instance serves the same data to the vbds it adopts.
//!
//! Bound: [`RAM_DISKS_MAX`] RAM disks at once, keys up to
//! [`RAM_DISK_KEY_MAX`] bytes (`backend/vbd/<domid>/<devid>` needs at most
//! 33); a vbd asking for one more, or with a longer path, is refused.

/// RAM disks held at once.
pub const RAM_DISKS_MAX: usize = 64;
/// Longest backend path a RAM disk can be kept under.
pub const RAM_DISK_KEY_MAX: usize = 48;

/// One RAM disk's frames: `[start, start + frames * 4096)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamFrames {
    pub start: u64,
    pub frames: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    key: [u8; RAM_DISK_KEY_MAX],
    key_len: usize,
    memory: RamFrames,
    /// Served by the running instance (else kept from a dead one).
    open: bool,
}

impl Entry {
    fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }
}

/// Why a RAM disk cannot be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamDiskRefusal {
    /// [`RAM_DISKS_MAX`] are held already.
    Full,
    /// The backend path is longer than [`RAM_DISK_KEY_MAX`].
    KeyTooLong,
    /// The running instance serves this vbd's RAM disk already.
    Busy,
    /// No memory for it.
    OutOfMemory,
}

/// What [`RamDiskRegistry::open`] gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenedRam {
    pub memory: RamFrames,
    /// The memory is a dead instance's RAM disk for this vbd, data kept
    /// (else freshly allocated, zeroed).
    pub kept: bool,
}

/// The table.
pub struct RamDiskRegistry {
    entries: [Option<Entry>; RAM_DISKS_MAX],
}

impl RamDiskRegistry {
    pub const fn new() -> Self {
        RamDiskRegistry {
            entries: [None; RAM_DISKS_MAX],
        }
    }

    fn find(&self, key: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.is_some_and(|e| e.key() == key.as_bytes()))
    }

    /// The RAM disk of `frames` frames for the vbd at `key`: the one a
    /// dead instance left for it when it has that size, else new memory
    /// from `alloc` (a kept one of another size is given to `free`: the
    /// toolstack changed the vbd).
    pub fn open(
        &mut self,
        key: &str,
        frames: u64,
        alloc: impl FnOnce(u64) -> Option<u64>,
        free: impl FnOnce(RamFrames),
    ) -> Result<OpenedRam, RamDiskRefusal> {
        if key.len() > RAM_DISK_KEY_MAX {
            return Err(RamDiskRefusal::KeyTooLong);
        }
        if let Some(at) = self.find(key) {
            let entry = self.entries[at].as_mut().ok_or(RamDiskRefusal::Busy)?;
            if entry.open {
                return Err(RamDiskRefusal::Busy);
            }
            if entry.memory.frames == frames {
                entry.open = true;
                return Ok(OpenedRam {
                    memory: entry.memory,
                    kept: true,
                });
            }
            free(entry.memory);
            self.entries[at] = None;
        }
        let slot = self
            .entries
            .iter()
            .position(Option::is_none)
            .ok_or(RamDiskRefusal::Full)?;
        let start = alloc(frames).ok_or(RamDiskRefusal::OutOfMemory)?;
        let mut entry = Entry {
            key: [0; RAM_DISK_KEY_MAX],
            key_len: key.len(),
            memory: RamFrames { start, frames },
            open: true,
        };
        entry.key[..key.len()].copy_from_slice(key.as_bytes());
        self.entries[slot] = Some(entry);
        Ok(OpenedRam {
            memory: entry.memory,
            kept: false,
        })
    }

    /// The vbd at `key` let its RAM disk go (detached): its memory, for
    /// the caller to free.
    pub fn close(&mut self, key: &str) -> Option<RamFrames> {
        let at = self.find(key)?;
        self.entries[at].take().map(|e| e.memory)
    }

    /// The running instance is abandoned: every RAM disk is kept for the
    /// next one, none open.
    pub fn abandon_all(&mut self) {
        for entry in self.entries.iter_mut().flatten() {
            entry.open = false;
        }
    }

    /// The memory of every RAM disk held (to keep it out of the frame
    /// allocator's reset).
    pub fn held(&self) -> impl Iterator<Item = RamFrames> + '_ {
        self.entries.iter().flatten().map(|e| e.memory)
    }

    /// Frees, through `free`, each kept RAM disk whose vbd `exists` says
    /// is gone (removed while no instance served it).
    pub fn drop_orphans(
        &mut self,
        mut exists: impl FnMut(&str) -> bool,
        mut free: impl FnMut(RamFrames),
    ) {
        for slot in &mut self.entries {
            let Some(entry) = slot else { continue };
            let key = core::str::from_utf8(entry.key()).unwrap_or("");
            if !entry.open && !exists(key) {
                free(entry.memory);
                *slot = None;
            }
        }
    }

    /// Kept RAM disks no instance has opened since the restart.
    pub fn orphans(&self) -> usize {
        self.entries.iter().flatten().filter(|e| !e.open).count()
    }
}

impl Default for RamDiskRegistry {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;
    use std::format;
    use std::vec::Vec;

    fn frames_from(next: &Cell<u64>) -> impl FnOnce(u64) -> Option<u64> + '_ {
        move |frames| {
            let start = next.get();
            next.set(start + frames * 4096);
            Some(start)
        }
    }

    #[test]
    fn a_restart_gives_each_vbd_its_own_ram_disk_back() {
        let next = Cell::new(0x10_0000);
        let mut reg = RamDiskRegistry::new();
        let never_freed = |m: RamFrames| panic!("freed {m:?}");
        let a = reg
            .open("backend/vbd/1/51712", 16, frames_from(&next), never_freed)
            .unwrap();
        let b = reg
            .open("backend/vbd/2/51712", 8, frames_from(&next), never_freed)
            .unwrap();
        assert!(!a.kept && !b.kept && a.memory.start != b.memory.start);
        assert_eq!(
            reg.open("backend/vbd/1/51712", 16, frames_from(&next), never_freed),
            Err(RamDiskRefusal::Busy)
        );
        reg.abandon_all();
        assert_eq!(reg.orphans(), 2);
        assert_eq!(reg.held().collect::<Vec<_>>(), [a.memory, b.memory]);
        let again = reg
            .open("backend/vbd/2/51712", 8, |_| None, never_freed)
            .unwrap();
        assert_eq!(
            again,
            OpenedRam {
                memory: b.memory,
                kept: true
            }
        );
        // vbd 1 vanished while stordom restarted; vbd 2 is served.
        let mut freed = None;
        reg.drop_orphans(|key| key != "backend/vbd/1/51712", |m| freed = Some(m));
        assert_eq!(freed, Some(a.memory));
        assert_eq!(reg.orphans(), 0);
        assert_eq!(reg.close("backend/vbd/2/51712"), Some(b.memory));
        assert_eq!(reg.held().count(), 0);
    }

    #[test]
    fn a_kept_disk_of_another_size_is_replaced_and_the_table_is_bounded() {
        let next = Cell::new(0x10_0000);
        let mut reg = RamDiskRegistry::new();
        let first = reg
            .open("backend/vbd/1/1", 4, frames_from(&next), |_| {})
            .unwrap();
        reg.abandon_all();
        let mut freed = None;
        let resized = reg
            .open("backend/vbd/1/1", 8, frames_from(&next), |m| {
                freed = Some(m)
            })
            .unwrap();
        assert_eq!(freed, Some(first.memory));
        assert!(!resized.kept && resized.memory.frames == 8);
        for i in 1..RAM_DISKS_MAX {
            let key = format!("backend/vbd/{i}/51712");
            reg.open(&key, 1, frames_from(&next), |_| {}).unwrap();
        }
        assert_eq!(
            reg.open("backend/vbd/9/9", 1, frames_from(&next), |_| {}),
            Err(RamDiskRefusal::Full)
        );
        let long = std::string::String::from("x").repeat(RAM_DISK_KEY_MAX + 1);
        assert_eq!(
            reg.open(&long, 1, frames_from(&next), |_| {}),
            Err(RamDiskRefusal::KeyTooLong)
        );
        assert_eq!(
            reg.open("backend/vbd/1/1", 8, |_| None, |_| {}),
            Err(RamDiskRefusal::Busy)
        );
    }
}

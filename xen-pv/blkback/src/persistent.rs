//! Persistent grants (`feature-persistent`): blkfront then moves data
//! through a fixed pool of granted pages (its indirect pages too), so the
//! backend maps each once and keeps it, saving a map and an unmap
//! hypercall per segment (and per indirect page).

use alloc::collections::{BTreeMap, TryReserveError};
use alloc::vec::Vec;

use xen_pv::grant::{GrantRef, Mapping};

use crate::request_slot::reserved;

/// Grants one ring keeps mapped at most (Linux blkback's default).
pub const MAX_PERSISTENT_GRANTS_PER_RING: usize = 1056;

/// Kept grants unmapped in one batch when a new grant finds the cache
/// full: the least recently used of those no request is using (about 6%
/// of the cache, as Linux blkback purges 5% at a time).
pub const PERSISTENT_GRANTS_EVICTED_AT_ONCE: usize = 64;

struct Kept {
    mapping: Mapping,
    /// A segment of a request in flight uses it.
    in_use: bool,
    /// When it was last lent or kept, in uses of the cache.
    last_used: u64,
}

/// The grants a ring keeps mapped, by reference, purged least recently
/// used first: a frontend that sends a new grant with every request keeps
/// the cache full of its latest grants, never more, and is always served.
pub struct PersistentGrants {
    kept: BTreeMap<GrantRef, Kept>,
    /// Lends and keeps so far: the clock of `last_used`.
    uses: u64,
    /// The unused kept grants by age while choosing which to evict (room
    /// reserved at connect, so evicting allocates nothing).
    eviction_candidates: Vec<(u64, GrantRef)>,
    /// Evicted mappings the ring has still to unmap.
    evicted: Vec<Mapping>,
}

impl PersistentGrants {
    /// An empty cache, with the room eviction needs.
    pub fn new() -> Result<PersistentGrants, TryReserveError> {
        Ok(PersistentGrants {
            kept: BTreeMap::new(),
            uses: 0,
            eviction_candidates: reserved(MAX_PERSISTENT_GRANTS_PER_RING)?,
            evicted: reserved(PERSISTENT_GRANTS_EVICTED_AT_ONCE)?,
        })
    }

    /// The frame of kept grant `gref`, now in use; `None` if it is not
    /// kept or another segment uses it (that one is mapped on its own).
    pub fn take(&mut self, gref: GrantRef) -> Option<u64> {
        self.take_if(gref, |_| true)
    }

    /// As [`Self::take`], for a data segment: only a writable mapping (an
    /// indirect page is kept read-only).
    pub fn take_writable(&mut self, gref: GrantRef) -> Option<u64> {
        self.take_if(gref, |kept| !kept.mapping.grant.readonly)
    }

    fn take_if(&mut self, gref: GrantRef, usable: impl Fn(&Kept) -> bool) -> Option<u64> {
        let kept = self
            .kept
            .get_mut(&gref)
            .filter(|k| !k.in_use && usable(k))?;
        kept.in_use = true;
        self.uses += 1;
        kept.last_used = self.uses;
        Some(kept.mapping.gfn)
    }

    /// Keeps a fresh mapping (in use); when the cache is full, first
    /// evicts the least recently used unused grants (see
    /// [`Self::evicted_mut`]). Hands the mapping back when its grant is
    /// kept already or every kept grant is in use.
    ///
    /// A writable mapping of a grant kept read-only (an indirect page that
    /// is now a read's data page: Linux blkfront takes both from one pool)
    /// replaces it, and the read-only one joins the evicted: otherwise
    /// every later read through that page would map it anew.
    pub fn keep(&mut self, mapping: Mapping) -> Result<(), Mapping> {
        let gref = mapping.grant.gref;
        if let Some(kept) = self.kept.get(&gref) {
            let upgrade = kept.mapping.grant.readonly
                && !kept.in_use
                && !mapping.grant.readonly
                && self.evicted.len() < self.evicted.capacity();
            if !upgrade {
                return Err(mapping);
            }
            if let Some(read_only) = self.kept.remove(&gref) {
                self.evicted.push(read_only.mapping);
            }
        }
        if self.kept.len() >= MAX_PERSISTENT_GRANTS_PER_RING {
            self.evict_least_recently_used();
        }
        if self.kept.len() >= MAX_PERSISTENT_GRANTS_PER_RING {
            return Err(mapping);
        }
        self.uses += 1;
        let (in_use, last_used) = (true, self.uses);
        self.kept.insert(
            gref,
            Kept {
                mapping,
                in_use,
                last_used,
            },
        );
        Ok(())
    }

    /// Keeps a fresh mapping that no segment uses (an indirect page, read
    /// already) as [`Self::keep`] does.
    pub fn keep_unused(&mut self, mapping: Mapping) -> Result<(), Mapping> {
        let gref = mapping.grant.gref;
        self.keep(mapping)?;
        self.release(gref);
        Ok(())
    }

    /// Moves up to [`PERSISTENT_GRANTS_EVICTED_AT_ONCE`] unused kept
    /// grants, oldest use first, to the evicted list (if it has room).
    fn evict_least_recently_used(&mut self) {
        let room = self.evicted.capacity() - self.evicted.len();
        self.eviction_candidates.clear();
        let unused = self.kept.iter().filter(|(_, k)| !k.in_use);
        let candidates = unused.map(|(&gref, k)| (k.last_used, gref));
        let capacity = self.eviction_candidates.capacity();
        self.eviction_candidates.extend(candidates.take(capacity));
        let count = room.min(self.eviction_candidates.len());
        if count == 0 {
            return;
        }
        self.eviction_candidates.select_nth_unstable(count - 1);
        for &(_, gref) in &self.eviction_candidates[..count] {
            if let Some(kept) = self.kept.remove(&gref) {
                self.evicted.push(kept.mapping);
            }
        }
        self.eviction_candidates.clear();
    }

    /// The evicted mappings, for the ring to unmap (in one batch) and
    /// leave empty.
    pub fn evicted_mut(&mut self) -> &mut Vec<Mapping> {
        &mut self.evicted
    }

    /// A segment is done with kept grant `gref`.
    pub fn release(&mut self, gref: GrantRef) {
        if let Some(kept) = self.kept.get_mut(&gref) {
            kept.in_use = false;
        }
    }

    /// Every kept (or evicted, not yet unmapped) mapping, to unmap on
    /// disconnect.
    pub fn into_mappings(self) -> Vec<Mapping> {
        let mut mappings = self.evicted;
        mappings.extend(self.kept.into_values().map(|k| k.mapping));
        mappings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xen_pv::grant::GrantSpec;

    fn mapping(gref: GrantRef) -> Mapping {
        Mapping {
            gfn: 0x1000 + u64::from(gref),
            handle: gref,
            grant: GrantSpec {
                domid: 3,
                gref,
                readonly: false,
            },
        }
    }

    #[test]
    fn kept_grants_are_lent_once_at_a_time_and_bounded() {
        let mut grants = PersistentGrants::new().unwrap();
        assert_eq!(grants.take(5), None);
        assert_eq!(grants.keep(mapping(5)), Ok(()));
        assert_eq!(grants.take(5), None, "in use by the request that mapped it");
        grants.release(5);
        assert_eq!(grants.take(5), Some(0x1005));
        assert_eq!(grants.keep(mapping(5)), Err(mapping(5)), "kept already");
        for gref in 6..MAX_PERSISTENT_GRANTS_PER_RING as u32 + 5 {
            assert_eq!(grants.keep(mapping(gref)), Ok(()));
        }
        let one_too_many = MAX_PERSISTENT_GRANTS_PER_RING as u32 + 5;
        assert!(
            grants.keep(mapping(one_too_many)).is_err(),
            "all in use: nothing to evict"
        );
        assert!(grants.evicted_mut().is_empty());
        assert_eq!(grants.into_mappings().len(), MAX_PERSISTENT_GRANTS_PER_RING);
    }

    #[test]
    fn a_read_only_kept_grant_is_lent_for_reading_only() {
        let mut grants = PersistentGrants::new().unwrap();
        let mut read_only = mapping(7);
        read_only.grant.readonly = true;
        assert_eq!(grants.keep_unused(read_only), Ok(()));
        assert_eq!(grants.take_writable(7), None, "a data segment maps it anew");
        assert_eq!(grants.take(7), Some(0x1007));
        assert_eq!(grants.take(7), None, "in use");
        grants.release(7);
        assert_eq!(grants.keep_unused(mapping(8)), Ok(()));
        assert_eq!(grants.take_writable(8), Some(0x1008));
    }

    #[test]
    fn a_writable_mapping_replaces_a_read_only_kept_one() {
        let mut grants = PersistentGrants::new().unwrap();
        let mut read_only = mapping(7);
        read_only.grant.readonly = true;
        assert_eq!(grants.keep_unused(read_only), Ok(()));
        assert_eq!(grants.take_writable(7), None);
        let mut writable = mapping(7);
        writable.gfn = 0x2007;
        assert_eq!(grants.keep(writable), Ok(()), "kept in its place");
        assert_eq!(grants.evicted_mut().len(), 1, "the read-only one to unmap");
        assert!(grants.evicted_mut()[0].grant.readonly);
        grants.evicted_mut().clear();
        grants.release(7);
        assert_eq!(grants.take_writable(7), Some(0x2007));
        assert!(grants.keep(mapping(7)).is_err(), "kept already, writable");
    }

    #[test]
    fn a_full_cache_evicts_the_least_recently_used_unused_grants_in_a_batch() {
        let mut grants = PersistentGrants::new().unwrap();
        let max = MAX_PERSISTENT_GRANTS_PER_RING as u32;
        for gref in 0..max {
            assert_eq!(grants.keep(mapping(gref)), Ok(()));
            grants.release(gref);
        }
        // Grant 0 is used again (recent); grant 1 is in use.
        assert_eq!(grants.take(0), Some(0x1000));
        grants.release(0);
        assert_eq!(grants.take(1), Some(0x1001));
        assert_eq!(grants.keep(mapping(max)), Ok(()));
        let evicted: Vec<GrantRef> = grants.evicted_mut().iter().map(|m| m.grant.gref).collect();
        let expected: Vec<GrantRef> = (2..2 + PERSISTENT_GRANTS_EVICTED_AT_ONCE as u32).collect();
        let mut sorted = evicted.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, expected, "the oldest unused ones");
        assert_eq!(grants.take(0), Some(0x1000), "kept: used recently");
        assert_eq!(grants.take(2), None, "evicted");
        grants.evicted_mut().clear();
        assert_eq!(
            grants.into_mappings().len(),
            MAX_PERSISTENT_GRANTS_PER_RING + 1 - PERSISTENT_GRANTS_EVICTED_AT_ONCE
        );
    }
}

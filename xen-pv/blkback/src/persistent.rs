//! Persistent grants (`feature-persistent`): blkfront then moves data
//! through a fixed pool of granted pages, so the backend maps each once and
//! keeps it, saving a map and an unmap hypercall per segment.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use xen_pv::grant::{GrantRef, Mapping};

/// Grants one ring keeps mapped at most (Linux blkback's default); later
/// ones are mapped per request as without the feature.
pub const MAX_PERSISTENT_GRANTS_PER_RING: usize = 1056;

struct Kept {
    mapping: Mapping,
    /// A segment of a request in flight uses it.
    in_use: bool,
}

/// The grants a ring keeps mapped, by reference.
#[derive(Default)]
pub struct PersistentGrants {
    kept: BTreeMap<GrantRef, Kept>,
}

impl PersistentGrants {
    /// The frame of kept grant `gref`, now in use; `None` if it is not
    /// kept or another segment uses it (that one is mapped on its own).
    pub fn take(&mut self, gref: GrantRef) -> Option<u64> {
        let kept = self.kept.get_mut(&gref).filter(|k| !k.in_use)?;
        kept.in_use = true;
        Some(kept.mapping.gfn)
    }

    /// Keeps a fresh mapping (in use) while there is room; hands it back
    /// when full or when its grant is kept already.
    pub fn keep(&mut self, mapping: Mapping) -> Result<(), Mapping> {
        let gref = mapping.grant.gref;
        if self.kept.len() >= MAX_PERSISTENT_GRANTS_PER_RING || self.kept.contains_key(&gref) {
            return Err(mapping);
        }
        let in_use = true;
        self.kept.insert(gref, Kept { mapping, in_use });
        Ok(())
    }

    /// A segment is done with kept grant `gref`.
    pub fn release(&mut self, gref: GrantRef) {
        if let Some(kept) = self.kept.get_mut(&gref) {
            kept.in_use = false;
        }
    }

    /// Every kept mapping, to unmap on disconnect.
    pub fn into_mappings(self) -> Vec<Mapping> {
        self.kept.into_values().map(|k| k.mapping).collect()
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
        let mut grants = PersistentGrants::default();
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
        assert!(grants.keep(mapping(one_too_many)).is_err());
        assert_eq!(grants.into_mappings().len(), MAX_PERSISTENT_GRANTS_PER_RING);
    }
}

//! `job=xen-selftest`: exercises the Xen interfaces against a cooperating
//! dom0 (images/scenarios/xen-guest). stordom reads its domid and name
//! from xenstore, announces itself under its `data/stordom-test` node,
//! waits for a watch to fire when dom0 writes `grant` there
//! ("DOMID SEED GREF..."), maps those grants, checks the pattern dom0's
//! gntshare wrote (kernel::pattern), unmaps them and checks the grant
//! accounting is back to zero, then writes `result`.

use crate::arch::clock;
use crate::xen::{Hypercalls, XenConnection};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use test_pattern::first_mismatch;
use xen_pv::grant::{GrantMapper, GrantSpec, Mapping};
use xen_pv::ring::PeerChannel;
use xen_pv::xenstore::{Tx, XsError};
use xen_pv::{DomId, PAGE_SIZE};

/// How long dom0 gets to offer its grant.
const GRANT_WAIT_NS: u64 = 120_000_000_000;

fn xs(what: &str, e: XsError) -> String {
    format!("xenstore {what}: {e:?}")
}

/// Runs the self-test; Ok carries a one-line summary.
pub fn run(xen: &mut XenConnection) -> Result<String, String> {
    let store = &mut xen.store;
    let domid = store
        .read_string(Tx::NONE, "domid")
        .map_err(|e| xs("read domid", e))?;
    let name = store
        .read_string(Tx::NONE, "name")
        .map_err(|e| xs("read name", e))?;
    log::info!("xen-selftest: xenstore says domid {domid}, name \"{name}\"");

    let base = format!("/local/domain/{domid}/data/stordom-test");
    let grant_path = format!("{base}/grant");
    store
        .watch(&grant_path, "grant")
        .map_err(|e| xs("watch", e))?;
    store
        .write(Tx::NONE, &format!("{base}/ready"), b"1")
        .map_err(|e| xs("write ready", e))?;
    log::info!("xen-selftest: watching {grant_path}");

    // A watch fires once when set; wait for one that finds a value.
    let start = clock::now_ns();
    let offer = loop {
        match store.poll_watch_event().map_err(|e| xs("watch event", e))? {
            Some(event) if event.token == "grant" => {
                log::info!("xen-selftest: watch fired for {}", event.path);
                match store.read_string(Tx::NONE, &grant_path) {
                    Ok(value) if !value.is_empty() => break value,
                    Ok(_) | Err(XsError::NoEntry) => {}
                    Err(e) => return Err(xs("read grant", e)),
                }
            }
            Some(_) => {}
            None if clock::now_ns() - start > GRANT_WAIT_NS => {
                return Err("no grant offered within 120 s".to_string());
            }
            None => {
                let _ = store.channel_mut().wait();
            }
        }
    };
    let summary = check_grants(&mut xen.grants, &offer)?;
    store
        .write(Tx::NONE, &format!("{base}/result"), summary.as_bytes())
        .map_err(|e| xs("write result", e))?;
    store
        .unwatch(&grant_path, "grant")
        .map_err(|e| xs("unwatch", e))?;
    Ok(summary)
}

/// Parses "DOMID SEED GREF...", maps the grants read-only, checks them
/// and unmaps them.
fn check_grants(
    grants: &mut GrantMapper<'static, Hypercalls>,
    offer: &str,
) -> Result<String, String> {
    let mut words = offer.split_ascii_whitespace();
    let bad = || format!("malformed grant offer \"{offer}\"");
    let domid: DomId = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
    let seed: u32 = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
    let specs = words
        .map(|w| {
            w.parse().map(|gref| GrantSpec {
                domid,
                gref,
                readonly: true,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad())?;
    if specs.is_empty() {
        return Err(bad());
    }

    let mut results = Vec::with_capacity(specs.len());
    grants.map_batch(&specs, &mut results);
    let mut mapped: Vec<Mapping> = results
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| format!("grant map: {e:?}"))?;
    let stats = grants.stats();
    log::info!(
        "xen-selftest: mapped {} grant(s) from domain {domid} in {} hypercall(s); {} mapped now",
        mapped.len(),
        stats.hypercalls,
        stats.mapped
    );

    let mut failures = Vec::new();
    for (page, m) in mapped.iter().enumerate() {
        // SAFETY: Xen mapped the granted page at this identity-mapped
        // window frame; it stays mapped until the unmap below.
        let bytes = unsafe {
            core::slice::from_raw_parts((m.gfn * PAGE_SIZE as u64) as *const u8, PAGE_SIZE)
        };
        if let Some(offset) = first_mismatch(seed, page, bytes) {
            failures.push(format!(
                "page {page} (gref {}) differs at byte {offset}",
                m.grant.gref
            ));
        }
    }
    let mut failed = Vec::new();
    grants.unmap_batch(&mut mapped, &mut failed);
    let unmap_errors: Vec<String> = failed
        .iter()
        .map(|(m, e)| format!("unmap gref {}: {e:?}", m.grant.gref))
        .collect();
    let after = grants.stats();
    log::info!(
        "xen-selftest: unmapped; {} mapped now ({} maps, {} unmaps in all)",
        after.mapped,
        after.maps,
        after.unmaps
    );
    failures.extend(unmap_errors);
    if after.mapped != 0 {
        failures.push(format!("{} grant(s) still mapped", after.mapped));
    }
    if failures.is_empty() {
        Ok(format!("pass pages={} domain={domid}", specs.len()))
    } else {
        Err(failures.join("; "))
    }
}

//! usage: hostile-front [--grant-slack N] [--target T] STORDOM_DOMID all | CASE... | random SEED COUNT
//!
//! Attacks stordom (domain STORDOM_DOMID) from dom0 as a hostile blkfront
//! and prints one `RESULT name=hostile:<case>` line per case (see
//! `hostile_front::cases`), or one for the random campaign, whose seed it
//! prints first. `--grant-slack N`: grants stordom may hold above a case's
//! baseline afterwards, for other frontends' requests in flight (0 when
//! this is the only frontend). `--target T`: what the vbds serve (the
//! backend's `params`; default a fresh RAM disk, `ram:1M`), e.g. a slice of
//! a passed-through disk whose neighbours the caller checks. Exit status 0
//! only if every case passed.

mod linux;

use std::io::Write;

use hostile_front::campaign::run_campaign;
use hostile_front::cases::{CASES, CaseConfig, FIRST_DEVID, run_case};
use hostile_front::front::HOSTILE_TARGET;
use hostile_front::result_line;

/// The random campaign's vbd (the cases use the ones below it).
const CAMPAIGN_DEVID: u32 = FIRST_DEVID + 0x100;

fn usage() -> ! {
    eprintln!(
        "usage: hostile-front [--grant-slack N] [--target T] STORDOM_DOMID all | CASE... | random SEED COUNT"
    );
    eprintln!(
        "cases: {}",
        CASES.iter().map(|c| c.name).collect::<Vec<_>>().join(" ")
    );
    std::process::exit(2)
}

fn number<T: std::str::FromStr>(text: Option<&String>) -> T {
    text.and_then(|t| t.parse().ok()).unwrap_or_else(|| usage())
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut config = CaseConfig::FULL;
    let mut target = HOSTILE_TARGET.to_string();
    loop {
        match args.first().map(String::as_str) {
            Some("--grant-slack") => config.grant_slack = number(args.get(1)),
            Some("--target") => target = args.get(1).cloned().unwrap_or_else(|| usage()),
            _ => break,
        }
        args.drain(..2);
    }
    let backend: u16 = number(args.first());
    let mut dom0 = linux::XenDom0::open(backend, target).unwrap_or_else(|e| {
        eprintln!("hostile-front: {e}");
        std::process::exit(1)
    });
    let mut all_passed = true;
    let mut report = |name: &str, result: Result<String, String>| {
        all_passed &= result.is_ok();
        println!("{}", result_line(name, &result));
        std::io::stdout().flush().ok();
    };
    match args.get(1).map(String::as_str) {
        Some("random") => {
            let (seed, count): (u64, u64) = (number(args.get(2)), number(args.get(3)));
            println!("hostile-front: random campaign, seed {seed}, {count} requests");
            let result = run_campaign(&mut dom0, CAMPAIGN_DEVID, seed, count, &config).map(|t| {
                format!(
                    "seed {seed}: {} requests answered as expected ({} okay, {} refused), \
                     {} rings broken and closed, {} state flaps closed, nodes churned {} times \
                     and the ring header scribbled on {} times with the ring serving on; {}",
                    t.sent,
                    t.okay,
                    t.refused,
                    t.ring_breaks,
                    t.state_flaps,
                    t.node_churns,
                    t.header_scribbles,
                    t.heap
                )
            });
            report("random", result);
        }
        Some(_) => {
            let names: Vec<&str> = match args[1].as_str() {
                "all" => CASES.iter().map(|c| c.name).collect(),
                _ => args[1..].iter().map(String::as_str).collect(),
            };
            for name in names {
                let Some(at) = CASES.iter().position(|c| c.name == name) else {
                    usage()
                };
                let devid = FIRST_DEVID + 4 * at as u32;
                report(name, run_case(&mut dom0, &CASES[at], devid, &config));
            }
        }
        None => usage(),
    }
    std::process::exit(if all_passed { 0 } else { 1 })
}

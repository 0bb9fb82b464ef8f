//! Offers `COUNT` pages filled with a known pattern to domain `DOMID`
//! through Linux's gntalloc device, prints their grant references on one
//! line, and keeps them granted until stdin closes (or a line is read).
//!
//! usage: gntshare DOMID COUNT \[SEED\]
//! Page i holds `test_pattern::pattern_byte(seed, i, offset)`, which
//! stordom recomputes to check what it mapped.

use std::io::{BufRead, Write};

use gntalloc::{Gntalloc, MAX_PAGES, PAGE};
use test_pattern::pattern_byte;

fn fail(msg: String) -> ! {
    eprintln!("gntshare: {msg}");
    std::process::exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        fail("usage: gntshare DOMID COUNT [SEED]".into());
    }
    let domid: u16 = args[1]
        .parse()
        .unwrap_or_else(|_| fail(format!("bad domid {}", args[1])));
    let count: usize = args[2]
        .parse()
        .unwrap_or_else(|_| fail(format!("bad count {}", args[2])));
    if count == 0 || count > MAX_PAGES {
        fail(format!("count must be 1..={MAX_PAGES}"));
    }
    let seed: u32 = args
        .get(3)
        .map_or(Ok(1), |s| s.parse())
        .unwrap_or_else(|_| fail("bad seed".into()));

    let dev = Gntalloc::open().unwrap_or_else(|e| fail(format!("/dev/xen/gntalloc: {e}")));
    let shared = dev
        .share(domid, count, true)
        .unwrap_or_else(|e| fail(format!("granting {count} pages: {e}")));
    // SAFETY: `share` mapped count * PAGE writable bytes, kept until exit.
    let pages = unsafe { std::slice::from_raw_parts_mut(shared.mem.as_ptr(), count * PAGE) };
    for (i, b) in pages.iter_mut().enumerate() {
        *b = pattern_byte(seed, i / PAGE, i % PAGE);
    }
    let refs: Vec<String> = shared.grefs.iter().map(u32::to_string).collect();
    println!("{}", refs.join(" "));
    std::io::stdout().flush().ok();
    // Hold the grants until told to stop; exiting closes the device,
    // which ends them.
    let _ = std::io::stdin().lock().lines().next();
}

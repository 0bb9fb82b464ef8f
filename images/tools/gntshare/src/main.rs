//! Offers `COUNT` pages filled with a known pattern to domain `DOMID`
//! through Linux's gntalloc device, prints their grant references on one
//! line, and keeps them granted until stdin closes (or a line is read).
//!
//! usage: gntshare DOMID COUNT \[SEED\]
//! Page i holds `test_pattern::pattern_byte(seed, i, offset)`, which
//! stordom recomputes to check what it mapped.

use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use test_pattern::pattern_byte;

const PAGE: usize = 4096;
const GNTALLOC_FLAG_WRITABLE: u16 = 1;

/// `struct ioctl_gntalloc_alloc_gref` with room for `MAX_PAGES` references.
#[repr(C)]
struct AllocGref {
    domid: u16,
    flags: u16,
    count: u32,
    index: u64,
    gref_ids: [u32; MAX_PAGES],
}

const MAX_PAGES: usize = 64;

/// `_IOC(_IOC_NONE, 'G', 5, sizeof(struct ioctl_gntalloc_alloc_gref))`,
/// where the struct as declared (one gref_id) is 24 bytes.
const IOCTL_GNTALLOC_ALLOC_GREF: libc::c_ulong = (24 << 16) | ((b'G' as libc::c_ulong) << 8) | 5;

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

    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/xen/gntalloc")
        .unwrap_or_else(|e| fail(format!("/dev/xen/gntalloc: {e}")));
    let mut req = AllocGref {
        domid,
        flags: GNTALLOC_FLAG_WRITABLE,
        count: count as u32,
        index: 0,
        gref_ids: [0; MAX_PAGES],
    };
    // SAFETY: the request struct matches the kernel's layout and has room
    // for `count` grant references after the fixed fields.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_GNTALLOC_ALLOC_GREF, &mut req) };
    if rc != 0 {
        fail(format!(
            "IOCTL_GNTALLOC_ALLOC_GREF: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: maps the pages just allocated, at the offset the ioctl
    // returned; the result is checked before use.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            count * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            dev.as_raw_fd(),
            req.index as libc::off_t,
        )
    };
    if mem == libc::MAP_FAILED {
        fail(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: mmap returned a writable mapping of count * PAGE bytes.
    let pages = unsafe { std::slice::from_raw_parts_mut(mem.cast::<u8>(), count * PAGE) };
    for (i, b) in pages.iter_mut().enumerate() {
        *b = pattern_byte(seed, i / PAGE, i % PAGE);
    }
    let refs: Vec<String> = req.gref_ids[..count].iter().map(u32::to_string).collect();
    println!("{}", refs.join(" "));
    std::io::stdout().flush().ok();
    // Hold the grants until told to stop; dropping the mapping and the
    // device revokes them.
    let _ = std::io::stdin().lock().lines().next();
}

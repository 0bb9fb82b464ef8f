//! Grants from Linux's gntalloc device (`/dev/xen/gntalloc`,
//! include/uapi/xen/gntalloc.h): pages this domain allocates, grants to
//! another domain and maps for itself, until it ends them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

pub const PAGE: usize = 4096;
/// Pages one [`Gntalloc::share`] may grant.
pub const MAX_PAGES: usize = 64;

/// `struct ioctl_gntalloc_alloc_gref` with room for [`MAX_PAGES`]
/// references (the kernel writes `count` of them).
#[repr(C)]
struct AllocGref {
    domid: u16,
    flags: u16,
    count: u32,
    index: u64,
    gref_ids: [u32; MAX_PAGES],
}

/// `struct ioctl_gntalloc_dealloc_gref`.
#[repr(C)]
struct DeallocGref {
    index: u64,
    count: u32,
}

const GNTALLOC_FLAG_WRITABLE: u16 = 1;
/// `_IOC(_IOC_NONE, 'G', nr, size)`.
const fn ioc_none_g(nr: u8, size: usize) -> libc::c_ulong {
    ((size as libc::c_ulong) << 16) | ((b'G' as libc::c_ulong) << 8) | nr as libc::c_ulong
}
/// The struct as declared, with one gref_id, is 24 bytes.
const IOCTL_GNTALLOC_ALLOC_GREF: libc::c_ulong = ioc_none_g(5, 24);
const IOCTL_GNTALLOC_DEALLOC_GREF: libc::c_ulong = ioc_none_g(6, size_of::<DeallocGref>());

/// The gntalloc device.
pub struct Gntalloc(File);

/// Pages granted and mapped here.
#[derive(Debug)]
pub struct SharedPages {
    /// The grant reference of each page, in order.
    pub grefs: Vec<u32>,
    /// The first page as this domain maps it (always writable here).
    pub mem: NonNull<u8>,
    /// gntalloc's offset of the pages (for [`Gntalloc::end`]).
    index: u64,
}

impl Gntalloc {
    pub fn open() -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/xen/gntalloc")?;
        Ok(Gntalloc(file))
    }

    /// Allocates `count` zeroed pages (1..=[`MAX_PAGES`]), grants them to
    /// `domid` (read-only unless `writable`) and maps them here.
    pub fn share(&self, domid: u16, count: usize, writable: bool) -> io::Result<SharedPages> {
        if count == 0 || count > MAX_PAGES {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut request = AllocGref {
            domid,
            flags: if writable { GNTALLOC_FLAG_WRITABLE } else { 0 },
            count: count as u32,
            index: 0,
            gref_ids: [0; MAX_PAGES],
        };
        let fd = self.0.as_raw_fd();
        // SAFETY: the request matches the kernel's layout and has room for
        // `count` grant references after the fixed fields.
        if unsafe { libc::ioctl(fd, IOCTL_GNTALLOC_ALLOC_GREF, &mut request) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: maps the pages just allocated, at the offset the ioctl
        // returned; the result is checked before use.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                count * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                request.index as libc::off_t,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedPages {
            grefs: request.gref_ids[..count].to_vec(),
            mem: NonNull::new(mem.cast()).ok_or(io::ErrorKind::Other)?,
            index: request.index,
        })
    }

    /// Unmaps the pages and ends their grants: at once, or (in the kernel)
    /// once the other domain has unmapped them.
    pub fn end(&self, pages: SharedPages) {
        let count = pages.grefs.len();
        // SAFETY: `pages` was mapped by `share` with this length, and is
        // given up here: nothing refers to it afterwards.
        unsafe { libc::munmap(pages.mem.as_ptr().cast(), count * PAGE) };
        let mut request = DeallocGref {
            index: pages.index,
            count: count as u32,
        };
        // SAFETY: the request matches the kernel's layout.
        unsafe {
            libc::ioctl(
                self.0.as_raw_fd(),
                IOCTL_GNTALLOC_DEALLOC_GREF,
                &mut request,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_uapi() {
        assert_eq!(IOCTL_GNTALLOC_ALLOC_GREF, 0x0018_4705);
        assert_eq!(IOCTL_GNTALLOC_DEALLOC_GREF, 0x0010_4706);
    }
}

//! [`Dom0`] under Xen, from Linux's Xen devices: grants from
//! /dev/xen/gntalloc (one page each), an event channel from
//! /dev/xen/evtchn, xenstore in its wire protocol over xenstored's socket
//! (as the xenstore-* tools talk to it) or else /dev/xen/xenbus, and `xl
//! list` to see whether the backend domain still runs.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use gntalloc::{Gntalloc, SharedPages};
use hostile_front::dom0::{Dom0, Grant};
use xen_pv::xenstore::wire::{HEADER_LEN, Header, MsgType};
use xen_pv::xenstore::{Access, Perm};

/// `_IOC(_IOC_NONE, 'E', nr, size)`.
const fn ioc_none_e(nr: u8, size: usize) -> libc::c_ulong {
    ((size as libc::c_ulong) << 16) | ((b'E' as libc::c_ulong) << 8) | nr as libc::c_ulong
}

/// `struct ioctl_evtchn_bind_unbound_port`, `_unbind` and `_notify` each
/// hold one `unsigned int`.
const IOCTL_EVTCHN_BIND_UNBOUND_PORT: libc::c_ulong = ioc_none_e(2, 4);
const IOCTL_EVTCHN_UNBIND: libc::c_ulong = ioc_none_e(3, 4);
const IOCTL_EVTCHN_NOTIFY: libc::c_ulong = ioc_none_e(4, 4);
/// Where xenstored listens in dom0 (libxenstore's default).
const XENSTORED_SOCKET: &str = "/var/run/xenstored/socket";
/// The longest one [`Dom0::settle`] waits for a notification.
const SETTLE_MS: i32 = 20;

/// dom0's devices.
pub struct XenDom0 {
    backend: u16,
    /// The vbds' `params` (`--target`).
    target: String,
    gntalloc: Gntalloc,
    /// The pages of the grants not yet ended, by grant reference.
    granted: HashMap<u32, SharedPages>,
    evtchn: File,
    xenstore: Box<dyn XenstoreStream>,
    req_id: u32,
    started: Instant,
}

/// A connection that carries xenstore's wire protocol.
trait XenstoreStream: Read + Write {}
impl<T: Read + Write> XenstoreStream for T {}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

impl XenDom0 {
    pub fn open(backend: u16, target: String) -> Result<Self, String> {
        let open = |path: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("{path}: {e}"))
        };
        let xenstore: Box<dyn XenstoreStream> = match UnixStream::connect(XENSTORED_SOCKET) {
            Ok(socket) => Box::new(socket),
            Err(_) => Box::new(open("/dev/xen/xenbus")?),
        };
        Ok(XenDom0 {
            backend,
            target,
            gntalloc: Gntalloc::open().map_err(|e| format!("/dev/xen/gntalloc: {e}"))?,
            granted: HashMap::new(),
            evtchn: open("/dev/xen/evtchn")?,
            xenstore,
            req_id: 0,
            started: Instant::now(),
        })
    }

    /// One xenstore request and its reply's payload.
    fn xenstore(&mut self, kind: MsgType, payload: &[u8]) -> Result<Vec<u8>, String> {
        self.req_id = self.req_id.wrapping_add(1);
        let header = Header {
            msg_type: kind as u32,
            req_id: self.req_id,
            tx_id: 0,
            len: payload.len() as u32,
        };
        let mut message = header.encode().to_vec();
        message.extend_from_slice(payload);
        self.xenstore
            .write_all(&message)
            .map_err(|e| format!("xenstore write: {e}"))?;
        let mut head = [0u8; HEADER_LEN];
        self.xenstore
            .read_exact(&mut head)
            .map_err(|e| format!("xenstore read: {e}"))?;
        let reply = Header::decode(&head).map_err(|e| format!("xenstore reply: {e:?}"))?;
        let mut body = vec![0u8; reply.len as usize];
        self.xenstore
            .read_exact(&mut body)
            .map_err(|e| format!("xenstore read: {e}"))?;
        if reply.msg_type == MsgType::Error as u32 {
            let text = String::from_utf8_lossy(&body);
            return Err(text.trim_end_matches('\0').to_string());
        }
        Ok(body)
    }

    fn evtchn_ioctl(&self, request: libc::c_ulong, arg: u32) -> i32 {
        let mut arg = arg;
        // SAFETY: each evtchn ioctl used here takes a pointer to one
        // unsigned int, which `arg` is and outlives the call.
        unsafe { libc::ioctl(self.evtchn.as_raw_fd(), request, &mut arg) }
    }
}

fn path_payload(path: &str) -> Vec<u8> {
    let mut payload = path.as_bytes().to_vec();
    payload.push(0);
    payload
}

impl Dom0 for XenDom0 {
    fn domid(&self) -> u16 {
        0
    }

    fn target(&self) -> &str {
        &self.target
    }

    fn backend_domid(&self) -> u16 {
        self.backend
    }

    fn grant(&mut self, readonly: bool) -> Result<Grant, String> {
        let shared = self
            .gntalloc
            .share(self.backend, 1, !readonly)
            .map_err(|e| format!("granting a page: {e}"))?;
        let grant = Grant {
            gref: shared.grefs[0],
            page: shared.mem,
        };
        self.granted.insert(grant.gref, shared);
        Ok(grant)
    }

    fn revoke(&mut self, grant: Grant) {
        if let Some(shared) = self.granted.remove(&grant.gref) {
            self.gntalloc.end(shared);
        }
    }

    fn alloc_port(&mut self) -> Result<u32, String> {
        let port = self.evtchn_ioctl(IOCTL_EVTCHN_BIND_UNBOUND_PORT, u32::from(self.backend));
        u32::try_from(port).map_err(|_| os_error("IOCTL_EVTCHN_BIND_UNBOUND_PORT"))
    }

    fn close_port(&mut self, port: u32) {
        self.evtchn_ioctl(IOCTL_EVTCHN_UNBIND, port);
    }

    fn notify(&mut self, port: u32) {
        self.evtchn_ioctl(IOCTL_EVTCHN_NOTIFY, port);
    }

    fn xs_write(&mut self, path: &str, value: &str) -> Result<(), String> {
        let mut payload = path_payload(path);
        payload.extend_from_slice(value.as_bytes());
        self.xenstore(MsgType::Write, &payload)
            .map(drop)
            .map_err(|e| format!("writing {path}: {e}"))
    }

    fn xs_read(&mut self, path: &str) -> Option<String> {
        let value = self.xenstore(MsgType::Read, &path_payload(path)).ok()?;
        String::from_utf8(value).ok()
    }

    fn xs_rm(&mut self, path: &str) {
        // Missing already is as good as removed.
        let _ = self.xenstore(MsgType::Rm, &path_payload(path));
    }

    fn xs_set_perms(&mut self, path: &str, owner: u16, reader: u16) -> Result<(), String> {
        let mut payload = path_payload(path);
        let perms = [
            Perm {
                domid: owner,
                access: Access::None,
            },
            Perm {
                domid: reader,
                access: Access::Read,
            },
        ];
        perms.iter().for_each(|p| p.encode_into(&mut payload));
        self.xenstore(MsgType::SetPerms, &payload)
            .map(drop)
            .map_err(|e| format!("permissions of {path}: {e}"))
    }

    fn settle(&mut self) {
        let mut poll = libc::pollfd {
            fd: self.evtchn.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, SETTLE_MS) };
        if ready > 0 {
            // Pending ports come as u32s; writing them back unmasks them.
            let mut ports = [0u8; 64];
            if let Ok(n) = self.evtchn.read(&mut ports) {
                let _ = self.evtchn.write_all(&ports[..n - n % 4]);
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn backend_alive(&mut self) -> bool {
        // A crashed domain (kept by on_crash=preserve) still has its
        // xenstore home: ask xl for its state flags instead.
        let Ok(out) = std::process::Command::new("xl")
            .args(["list", &self.backend.to_string()])
            .output()
        else {
            return false;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let state = text
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(4));
        out.status.success() && state.is_some_and(|s| !s.contains(['s', 'c', 'd']))
    }

    fn grants_mapped(&mut self) -> Option<u64> {
        let node = format!("/local/domain/{}/data/grants-mapped", self.backend);
        self.xs_read(&node)?.parse().ok()
    }

    fn heap_in_use(&mut self) -> Option<u64> {
        let node = format!("/local/domain/{}/data/heap-in-use", self.backend);
        self.xs_read(&node)?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_uapi() {
        assert_eq!(IOCTL_EVTCHN_BIND_UNBOUND_PORT, 0x0004_4502);
        assert_eq!(IOCTL_EVTCHN_UNBIND, 0x0004_4503);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
    }
}

//! What the hostile frontend needs from the domain it runs in: grants,
//! an event channel, xenstore, and a way to let the backend work. dom0
//! provides it under Xen ([`crate::linux`]); the host tests provide it
//! with the simulated Xen and stordom's own engine.

use core::ptr::NonNull;

/// A page this domain granted to the backend.
#[derive(Debug)]
pub struct Grant {
    pub gref: u32,
    /// The page as this domain maps it (writable, whatever the grant).
    pub page: NonNull<u8>,
}

/// The frontend's domain.
pub trait Dom0 {
    /// The domain this frontend runs in (its id in the backend's paths).
    fn domid(&self) -> u16;
    /// What the vbds are attached as (the backend's `params`).
    fn target(&self) -> &str {
        crate::front::HOSTILE_TARGET
    }
    /// The backend's domain.
    fn backend_domid(&self) -> u16;
    /// Grants a zeroed page to the backend, read-only or writable.
    fn grant(&mut self, readonly: bool) -> Result<Grant, String>;
    /// Ends a grant; the page is gone for this domain at once (the grant
    /// itself lasts until the backend unmaps it).
    fn revoke(&mut self, grant: Grant);
    /// An unbound event-channel port the backend may bind.
    fn alloc_port(&mut self) -> Result<u32, String>;
    /// Closes a port of [`Self::alloc_port`].
    fn close_port(&mut self, port: u32);
    /// Notifies the backend on `port`.
    fn notify(&mut self, port: u32);
    /// Writes a xenstore node (creating its parents).
    fn xs_write(&mut self, path: &str, value: &str) -> Result<(), String>;
    /// Reads a xenstore node; `None` when it is missing.
    fn xs_read(&mut self, path: &str) -> Option<String>;
    /// Removes a node and everything under it (missing is fine).
    fn xs_rm(&mut self, path: &str);
    /// Sets a node's permissions: `owner` (every other domain gets no
    /// access) and `reader`, which may read it.
    fn xs_set_perms(&mut self, path: &str, owner: u16, reader: u16) -> Result<(), String>;
    /// Lets the backend work for a moment: until a notification from it,
    /// at most 20 ms (under Xen); one pass of its loop (simulated).
    fn settle(&mut self);
    /// Milliseconds on this domain's clock (simulated: moved by settles).
    fn now_ms(&self) -> u64;
    /// The backend domain still exists.
    fn backend_alive(&mut self) -> bool;
    /// The number of grants the backend holds mapped, as it publishes it.
    fn grants_mapped(&mut self) -> Option<u64>;
    /// The backend's heap bytes in use, as it publishes it.
    fn heap_in_use(&mut self) -> Option<u64>;
}

/// Calls `attempt` until it gives a value or `secs` seconds passed,
/// letting the backend work between attempts; `None` when time ran out.
pub fn wait_up_to<T>(
    d: &mut dyn Dom0,
    secs: u32,
    mut attempt: impl FnMut(&mut dyn Dom0) -> Result<Option<T>, String>,
) -> Result<Option<T>, String> {
    let deadline = d.now_ms() + u64::from(secs) * 1000;
    loop {
        if let Some(value) = attempt(d)? {
            return Ok(Some(value));
        }
        if d.now_ms() >= deadline {
            return Ok(None);
        }
        d.settle();
    }
}

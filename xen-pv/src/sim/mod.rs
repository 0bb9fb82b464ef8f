//! A simulated Xen for host tests: one guest (the driver domain under test)
//! plus foreign domains that grant pages and own event channel ends, all in
//! one process and deterministic. [`xenstore`] holds the xenstored side.

pub mod xenstore;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

use crate::event::{
    AllocUnbound, BindInterdomain, BindVcpu, EvtchnClose, EvtchnSend, EvtchnUnmask, Port,
};
use crate::grant::{GNTMAP_HOST_MAP, GNTMAP_READONLY};
use crate::grant::{GrantRef, MapGrantRef, UnmapGrantRef};
use crate::hvm::{GetParam, SetEvtchnUpcallVector, SetParam};
use crate::hypercall::{
    Command, FeatureInfo, HypercallOp, MulticallEntry, XENFEAT_HVM_CALLBACK_VECTOR,
};
use crate::memory::{AddToPhysmap, EVTCHN_WORD_BITS, SharedInfo, XENMAPSPACE_SHARED_INFO};
use crate::sched::{SchedPoll, SchedShutdown};
use crate::{DomId, Errno, Hypercall, PAGE_SIZE};

/// The simulated guest's own domain id.
pub const GUEST: DomId = 1;

/// A page-aligned page, as Xen's are: rings placed in one may hold
/// atomics.
#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE_SIZE]);

impl core::ops::Deref for AlignedPage {
    type Target = [u8; PAGE_SIZE];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl core::ops::DerefMut for AlignedPage {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

type Page = Box<AlignedPage>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortState {
    Unbound { remote: DomId },
    Interdomain { remote: DomId, remote_port: u32 },
}

struct Grant {
    grantee: DomId,
    readonly: bool,
    page: Page,
}

enum Frame {
    Granted {
        dom: DomId,
        gref: GrantRef,
        readonly: bool,
    },
}

#[derive(Default)]
struct World {
    guest_ports: BTreeMap<u32, PortState>,
    port_vcpu: BTreeMap<u32, u32>,
    remote_ports: BTreeMap<(DomId, u32), PortState>,
    remote_notifications: BTreeMap<(DomId, u32), u64>,
    grants: BTreeMap<(DomId, GrantRef), Grant>,
    next_gref: GrantRef,
    frames: BTreeMap<u64, Frame>,
    handles: BTreeMap<u32, u64>,
    next_handle: u32,
    params: BTreeMap<u32, u64>,
    upcall_vectors: BTreeMap<u32, u8>,
    upcall_vector_supported: bool,
    shared_info_gfn: Option<u64>,
    shutdown: Option<u32>,
    last_poll: Option<(Vec<u32>, u64)>,
    console: Vec<u8>,
    calls: BTreeMap<(u32, u32), u64>,
    fail_next: Option<Errno>,
}

/// The simulated hypervisor, seen from the guest through [`Hypercall`].
pub struct SimXen {
    world: RefCell<World>,
    shared: Box<SharedInfo>,
}

impl Default for SimXen {
    fn default() -> Self {
        Self::new()
    }
}

/// Reinterprets a hypercall pointer argument as the structure Xen reads.
///
/// # Safety
/// `ptr` must point to `count` live, exclusively borrowed `T`s, as
/// [`Hypercall::hypercall`]'s contract demands of the caller.
unsafe fn args_mut<'a, T>(ptr: u64, count: u64) -> &'a mut [T] {
    // SAFETY: guaranteed by the caller.
    unsafe { core::slice::from_raw_parts_mut(ptr as *mut T, count as usize) }
}

impl SimXen {
    pub fn new() -> Self {
        SimXen {
            world: RefCell::new(World {
                next_gref: 8,
                next_handle: 1,
                upcall_vector_supported: true,
                ..World::default()
            }),
            shared: SharedInfo::new_zeroed(),
        }
    }

    /// The guest's shared_info page (what the kernel maps at the GFN it
    /// passed to `map_shared_info`).
    pub fn shared_info(&self) -> &SharedInfo {
        &self.shared
    }

    /// GFN that shared_info was placed at, if it was.
    pub fn shared_info_gfn(&self) -> Option<u64> {
        self.world.borrow().shared_info_gfn
    }

    /// Sets an HVM parameter as the toolstack would at domain build.
    pub fn set_param(&self, index: u32, value: u64) {
        self.world.borrow_mut().params.insert(index, value);
    }

    /// HVM parameter as the guest set it.
    pub fn param(&self, index: u32) -> Option<u64> {
        self.world.borrow().params.get(&index).copied()
    }

    /// Makes HVMOP_set_evtchn_upcall_vector fail like an old Xen.
    pub fn disable_upcall_vector(&self) {
        self.world.borrow_mut().upcall_vector_supported = false;
    }

    /// The per-vCPU upcall vector the guest registered.
    pub fn upcall_vector(&self, vcpu: u32) -> Option<u8> {
        self.world.borrow().upcall_vectors.get(&vcpu).copied()
    }

    /// The ports and deadline of the last SCHEDOP_poll.
    pub fn last_poll(&self) -> Option<(Vec<u32>, u64)> {
        self.world.borrow().last_poll.clone()
    }

    /// The reason of SCHEDOP_shutdown, if the guest called it.
    pub fn shutdown_reason(&self) -> Option<u32> {
        self.world.borrow().shutdown
    }

    /// What the guest wrote with CONSOLEIO_write.
    pub fn console_output(&self) -> Vec<u8> {
        self.world.borrow().console.clone()
    }

    /// How many times hypercall `op` with sub-command `cmd` was issued.
    pub fn calls(&self, op: HypercallOp, cmd: u32) -> u64 {
        let key = (op as u32, cmd);
        self.world.borrow().calls.get(&key).copied().unwrap_or(0)
    }

    /// Makes the next hypercall fail as a whole with `errno`.
    pub fn fail_next_hypercall(&self, errno: Errno) {
        self.world.borrow_mut().fail_next = Some(errno);
    }

    /// Domain `dom` allocates a port that the guest may bind to.
    pub fn remote_alloc_unbound(&self, dom: DomId) -> u32 {
        let mut w = self.world.borrow_mut();
        let port = (1..)
            .find(|p| !w.remote_ports.contains_key(&(dom, *p)))
            .unwrap_or(0);
        w.remote_ports
            .insert((dom, port), PortState::Unbound { remote: GUEST });
        port
    }

    /// Domain `dom` binds to the guest's unbound port `guest_port`.
    pub fn remote_bind(&self, dom: DomId, guest_port: Port) -> Result<u32, Errno> {
        let mut w = self.world.borrow_mut();
        match w.guest_ports.get(&guest_port.0) {
            Some(PortState::Unbound { remote }) if *remote == dom => {}
            _ => return Err(Errno::EINVAL),
        }
        let port = (1..)
            .find(|p| !w.remote_ports.contains_key(&(dom, *p)))
            .unwrap_or(0);
        w.remote_ports.insert(
            (dom, port),
            PortState::Interdomain {
                remote: GUEST,
                remote_port: guest_port.0,
            },
        );
        w.guest_ports.insert(
            guest_port.0,
            PortState::Interdomain {
                remote: dom,
                remote_port: port,
            },
        );
        Ok(port)
    }

    /// Whether domain `dom`'s port `port` is unbound and reserved for the
    /// guest: what Xen leaves of an interdomain channel whose guest end
    /// was closed, so the guest may bind it again.
    pub fn remote_port_awaits_guest(&self, dom: DomId, port: u32) -> bool {
        self.world.borrow().remote_ports.get(&(dom, port))
            == Some(&PortState::Unbound { remote: GUEST })
    }

    /// Interdomain channels the guest has bound now.
    pub fn guest_interdomain_ports(&self) -> usize {
        let w = self.world.borrow();
        w.guest_ports
            .values()
            .filter(|p| matches!(p, PortState::Interdomain { .. }))
            .count()
    }

    /// Domain `dom` notifies its port `port`; the guest's end goes pending.
    pub fn remote_send(&self, dom: DomId, port: u32) -> Result<(), Errno> {
        let target = match self.world.borrow().remote_ports.get(&(dom, port)) {
            Some(PortState::Interdomain { remote_port, .. }) => *remote_port,
            _ => return Err(Errno::EINVAL),
        };
        self.raise(target);
        Ok(())
    }

    /// Notifications the guest sent to domain `dom`'s port `port`.
    pub fn notifications(&self, dom: DomId, port: u32) -> u64 {
        self.world
            .borrow()
            .remote_notifications
            .get(&(dom, port))
            .copied()
            .unwrap_or(0)
    }

    /// Domain `dom` grants the guest a page holding `contents`.
    pub fn offer_grant(&self, dom: DomId, readonly: bool, contents: &[u8]) -> GrantRef {
        let mut w = self.world.borrow_mut();
        let gref = w.next_gref;
        w.next_gref += 1;
        let mut page: Page = Box::new(AlignedPage([0; PAGE_SIZE]));
        let n = contents.len().min(PAGE_SIZE);
        page[..n].copy_from_slice(&contents[..n]);
        w.grants.insert(
            (dom, gref),
            Grant {
                grantee: GUEST,
                readonly,
                page,
            },
        );
        gref
    }

    /// Domain `dom` ends its grant `gref` (`gnttab_end_foreign_access`);
    /// refused, as Xen does, while the guest has it mapped.
    pub fn revoke_grant(&self, dom: DomId, gref: GrantRef) -> bool {
        let mut w = self.world.borrow_mut();
        let mapped = w.frames.values().any(|f| match f {
            Frame::Granted {
                dom: d, gref: g, ..
            } => (*d, *g) == (dom, gref),
        });
        !mapped && w.grants.remove(&(dom, gref)).is_some()
    }

    /// The current contents of a granted page.
    pub fn granted_page(&self, dom: DomId, gref: GrantRef) -> Option<Vec<u8>> {
        self.world
            .borrow()
            .grants
            .get(&(dom, gref))
            .map(|g| g.page.to_vec())
    }

    /// Where a granted page's bytes are, as the granting domain sees them
    /// (a simulated frontend writes its ring and data there).
    pub fn grant_page_ptr(&self, dom: DomId, gref: GrantRef) -> Option<NonNull<u8>> {
        let mut w = self.world.borrow_mut();
        let grant = w.grants.get_mut(&(dom, gref))?;
        Some(NonNull::from(&mut grant.page.0).cast())
    }

    /// Where guest frame `gfn` (a mapped grant) is in host
    /// memory: the simulation's answer to "the kernel maps the grant
    /// window". Valid while the frame stays mapped.
    pub fn frame_ptr(&self, gfn: u64) -> Option<NonNull<u8>> {
        let mut w = self.world.borrow_mut();
        let w = &mut *w;
        let page = match w.frames.get_mut(&gfn)? {
            Frame::Granted { dom, gref, .. } => &mut w.grants.get_mut(&(*dom, *gref))?.page,
        };
        Some(NonNull::from(&mut page.0).cast())
    }

    /// What the guest sees at frame `gfn`: a mapped grant.
    pub fn frame(&self, gfn: u64) -> Option<Vec<u8>> {
        let w = self.world.borrow();
        match w.frames.get(&gfn)? {
            Frame::Granted { dom, gref, .. } => {
                w.grants.get(&(*dom, *gref)).map(|g| g.page.to_vec())
            }
        }
    }

    /// Whether frame `gfn` holds a read-only grant mapping.
    pub fn frame_is_readonly(&self, gfn: u64) -> bool {
        matches!(
            self.world.borrow().frames.get(&gfn),
            Some(Frame::Granted { readonly: true, .. })
        )
    }

    /// Grant mappings currently present in the guest's physmap.
    pub fn mapped_grants(&self) -> usize {
        let w = self.world.borrow();
        w.frames
            .values()
            .filter(|f| matches!(f, Frame::Granted { .. }))
            .count()
    }

    /// Xen's 2-level delivery: pending, then (if unmasked) selector and
    /// the vCPU's upcall flag.
    fn raise(&self, port: u32) {
        let s = &self.shared;
        let (word, bit) = (
            port as usize / EVTCHN_WORD_BITS,
            1u64 << (port as usize % EVTCHN_WORD_BITS),
        );
        if s.evtchn_pending[word].fetch_or(bit, Ordering::SeqCst) & bit != 0 {
            return;
        }
        if s.evtchn_mask[word].load(Ordering::SeqCst) & bit != 0 {
            return;
        }
        self.select(port);
    }

    fn select(&self, port: u32) {
        let word = port as usize / EVTCHN_WORD_BITS;
        let vcpu = self
            .world
            .borrow()
            .port_vcpu
            .get(&port)
            .copied()
            .unwrap_or(0) as usize;
        let info = &self.shared.vcpu_info[vcpu];
        info.evtchn_pending_sel
            .fetch_or(1 << word, Ordering::SeqCst);
        info.evtchn_upcall_pending.store(1, Ordering::SeqCst);
    }

    fn event_channel_op(&self, cmd: u32, ptr: u64) -> Result<(), Errno> {
        match cmd {
            AllocUnbound::CMD => {
                // SAFETY: per the hypercall contract, ptr is an AllocUnbound.
                let arg = unsafe { &mut args_mut::<AllocUnbound>(ptr, 1)[0] };
                let mut w = self.world.borrow_mut();
                let port = (1..)
                    .find(|p| !w.guest_ports.contains_key(p))
                    .ok_or(Errno::ENOSPC)?;
                w.guest_ports.insert(
                    port,
                    PortState::Unbound {
                        remote: arg.remote_dom,
                    },
                );
                arg.port = port;
            }
            BindInterdomain::CMD => {
                // SAFETY: per the hypercall contract, ptr is a BindInterdomain.
                let arg = unsafe { &mut args_mut::<BindInterdomain>(ptr, 1)[0] };
                let mut w = self.world.borrow_mut();
                let key = (arg.remote_dom, arg.remote_port);
                if w.remote_ports.get(&key) != Some(&PortState::Unbound { remote: GUEST }) {
                    return Err(Errno::EINVAL);
                }
                let port = (1..)
                    .find(|p| !w.guest_ports.contains_key(p))
                    .ok_or(Errno::ENOSPC)?;
                w.guest_ports.insert(
                    port,
                    PortState::Interdomain {
                        remote: key.0,
                        remote_port: key.1,
                    },
                );
                w.remote_ports.insert(
                    key,
                    PortState::Interdomain {
                        remote: GUEST,
                        remote_port: port,
                    },
                );
                arg.local_port = port;
            }
            EvtchnSend::CMD => {
                // SAFETY: per the hypercall contract, ptr is an evtchn_send.
                let port = unsafe { args_mut::<EvtchnSend>(ptr, 1)[0].port };
                let mut w = self.world.borrow_mut();
                match w.guest_ports.get(&port) {
                    Some(PortState::Interdomain {
                        remote,
                        remote_port,
                    }) => {
                        let key = (*remote, *remote_port);
                        *w.remote_notifications.entry(key).or_default() += 1;
                    }
                    Some(PortState::Unbound { .. }) => {}
                    None => return Err(Errno::EINVAL),
                }
            }
            EvtchnClose::CMD => {
                // SAFETY: per the hypercall contract, ptr is an evtchn_close.
                let port = unsafe { args_mut::<EvtchnClose>(ptr, 1)[0].port };
                let mut w = self.world.borrow_mut();
                match w.guest_ports.remove(&port) {
                    Some(PortState::Interdomain {
                        remote,
                        remote_port,
                    }) => {
                        w.remote_ports
                            .insert((remote, remote_port), PortState::Unbound { remote: GUEST });
                    }
                    Some(PortState::Unbound { .. }) => {}
                    None => return Err(Errno::EINVAL),
                }
            }
            EvtchnUnmask::CMD => {
                // SAFETY: per the hypercall contract, ptr is an evtchn_unmask.
                let port = unsafe { args_mut::<EvtchnUnmask>(ptr, 1)[0].port };
                let (word, bit) = (
                    port as usize / EVTCHN_WORD_BITS,
                    1u64 << (port as usize % EVTCHN_WORD_BITS),
                );
                // Xen re-raises an event that became pending while masked.
                let s = &self.shared;
                s.evtchn_mask[word].fetch_and(!bit, Ordering::SeqCst);
                if s.evtchn_pending[word].load(Ordering::SeqCst) & bit != 0 {
                    self.select(port);
                }
            }
            BindVcpu::CMD => {
                // SAFETY: per the hypercall contract, ptr is an evtchn_bind_vcpu.
                let arg = unsafe { args_mut::<BindVcpu>(ptr, 1)[0] };
                let mut w = self.world.borrow_mut();
                if !w.guest_ports.contains_key(&arg.port)
                    || arg.vcpu as usize >= self.shared.vcpu_info.len()
                {
                    return Err(Errno::EINVAL);
                }
                w.port_vcpu.insert(arg.port, arg.vcpu);
            }
            _ => return Err(Errno::ENOSYS),
        }
        Ok(())
    }

    fn grant_table_op(&self, cmd: u32, ptr: u64, count: u64) -> Result<(), Errno> {
        let mut w = self.world.borrow_mut();
        match cmd {
            MapGrantRef::CMD => {
                // SAFETY: per the hypercall contract, `count` map structures.
                for op in unsafe { args_mut::<MapGrantRef>(ptr, count) } {
                    op.status = w.map(op);
                }
            }
            UnmapGrantRef::CMD => {
                // SAFETY: per the hypercall contract, `count` unmap structures.
                for op in unsafe { args_mut::<UnmapGrantRef>(ptr, count) } {
                    op.status = w.unmap(op);
                }
            }
            _ => return Err(Errno::ENOSYS),
        }
        Ok(())
    }

    fn hvm_op(&self, cmd: u32, ptr: u64) -> Result<(), Errno> {
        let mut w = self.world.borrow_mut();
        match cmd {
            SetParam::CMD => {
                // SAFETY: per the hypercall contract, ptr is a xen_hvm_param.
                let arg = unsafe { args_mut::<SetParam>(ptr, 1)[0] };
                w.params.insert(arg.index, arg.value);
            }
            GetParam::CMD => {
                // SAFETY: per the hypercall contract, ptr is a xen_hvm_param.
                let arg = unsafe { &mut args_mut::<GetParam>(ptr, 1)[0] };
                arg.value = *w.params.get(&arg.index).ok_or(Errno::EINVAL)?;
            }
            SetEvtchnUpcallVector::CMD if w.upcall_vector_supported => {
                // SAFETY: per the hypercall contract, ptr is the upcall vector struct.
                let arg = unsafe { args_mut::<SetEvtchnUpcallVector>(ptr, 1)[0] };
                w.upcall_vectors.insert(arg.vcpu, arg.vector);
            }
            _ => return Err(Errno::ENOSYS),
        }
        Ok(())
    }
}

impl World {
    fn map(&mut self, op: &mut MapGrantRef) -> i16 {
        let readonly = match op.flags {
            GNTMAP_HOST_MAP => false,
            f if f == GNTMAP_HOST_MAP | GNTMAP_READONLY => true,
            _ => return -1,
        };
        let Some(grant) = self.grants.get(&(op.dom, op.gref)) else {
            return -3;
        };
        if grant.grantee != GUEST || (grant.readonly && !readonly) {
            return -8;
        }
        let gfn = op.host_addr / PAGE_SIZE as u64;
        if !op.host_addr.is_multiple_of(PAGE_SIZE as u64) || self.frames.contains_key(&gfn) {
            return -5;
        }
        self.frames.insert(
            gfn,
            Frame::Granted {
                dom: op.dom,
                gref: op.gref,
                readonly,
            },
        );
        op.handle = self.next_handle;
        self.handles.insert(self.next_handle, gfn);
        self.next_handle += 1;
        0
    }

    fn unmap(&mut self, op: &UnmapGrantRef) -> i16 {
        let gfn = op.host_addr / PAGE_SIZE as u64;
        if self.handles.get(&op.handle) != Some(&gfn) {
            return -4;
        }
        self.handles.remove(&op.handle);
        self.frames.remove(&gfn);
        0
    }
}

// SAFETY: the simulation only dereferences pointer arguments as the
// structures Xen documents for each sub-command, within the call.
unsafe impl Hypercall for SimXen {
    unsafe fn hypercall(&self, op: HypercallOp, args: [u64; 5]) -> i64 {
        // A multicall's first argument is its entries, not a command.
        let cmd = if op == HypercallOp::Multicall {
            0
        } else {
            args[0] as u32
        };
        {
            let mut w = self.world.borrow_mut();
            *w.calls.entry((op as u32, cmd)).or_default() += 1;
            if let Some(errno) = w.fail_next.take() {
                return -i64::from(errno.0);
            }
        }
        let result = match op {
            HypercallOp::EventChannel => self.event_channel_op(cmd, args[1]),
            HypercallOp::GrantTable => self.grant_table_op(cmd, args[1], args[2]),
            HypercallOp::Hvm => self.hvm_op(cmd, args[1]),
            HypercallOp::Memory if cmd == AddToPhysmap::CMD => {
                // SAFETY: per the hypercall contract, ptr is a xen_add_to_physmap.
                let arg = unsafe { args_mut::<AddToPhysmap>(args[1], 1)[0] };
                if arg.space == XENMAPSPACE_SHARED_INFO && arg.idx == 0 {
                    self.world.borrow_mut().shared_info_gfn = Some(arg.gpfn);
                    Ok(())
                } else {
                    Err(Errno::EINVAL)
                }
            }
            HypercallOp::Sched if cmd == SchedShutdown::CMD => {
                // SAFETY: per the hypercall contract, ptr is a sched_shutdown.
                let arg = unsafe { args_mut::<SchedShutdown>(args[1], 1)[0] };
                self.world.borrow_mut().shutdown = Some(arg.reason);
                Ok(())
            }
            HypercallOp::Sched if cmd == SchedPoll::CMD => {
                // SAFETY: per the hypercall contract, ptr is a sched_poll
                // whose `ports` holds `nr_ports` ports.
                let arg = unsafe { args_mut::<SchedPoll>(args[1], 1)[0] };
                // SAFETY: as above.
                let ports = unsafe { args_mut::<u32>(arg.ports, u64::from(arg.nr_ports)) };
                self.world.borrow_mut().last_poll = Some((ports.to_vec(), arg.timeout));
                Ok(())
            }
            HypercallOp::ConsoleIo if cmd == 0 => {
                // SAFETY: per the hypercall contract, args[2] holds args[1] bytes.
                let bytes = unsafe { args_mut::<u8>(args[2], args[1]) };
                self.world.borrow_mut().console.extend_from_slice(bytes);
                Ok(())
            }
            HypercallOp::XenVersion if cmd == 0 => return 4 << 16 | 19,
            HypercallOp::XenVersion if cmd == FeatureInfo::CMD => {
                // SAFETY: per the hypercall contract, ptr is a xen_feature_info.
                let arg = unsafe { &mut args_mut::<FeatureInfo>(args[1], 1)[0] };
                arg.submap = if arg.submap_idx == 0 {
                    1 << XENFEAT_HVM_CALLBACK_VECTOR
                } else {
                    0
                };
                Ok(())
            }
            HypercallOp::Multicall => {
                // SAFETY: per the hypercall contract, args[0] holds args[1]
                // entries, each a call with valid arguments.
                let entries = unsafe { args_mut::<MulticallEntry<'_>>(args[0], args[1]) };
                for entry in entries {
                    let [a0, a1, a2, a3, a4, _] = entry.args;
                    entry.result = match HypercallOp::from_number(entry.op) {
                        // SAFETY: the entry's arguments are valid (above).
                        Some(op) => unsafe { self.hypercall(op, [a0, a1, a2, a3, a4]) },
                        None => -i64::from(Errno::ENOSYS.0),
                    } as u64;
                }
                Ok(())
            }
            _ => Err(Errno::ENOSYS),
        };
        match result {
            Ok(()) => 0,
            Err(e) => -i64::from(e.0),
        }
    }
}

//! Event channels: the 2-level ABI over shared_info.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use core::sync::atomic::Ordering;

use crate::held::HeldPorts;
use crate::hypercall::command;
use crate::memory::{EVTCHN_WORD_BITS, EVTCHN_WORDS, SharedInfo};
use crate::{DOMID_SELF, DomId, Errno, Hypercall};

/// An event channel port of this domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(pub u32);

/// Ports the 2-level ABI can address on x86-64.
pub const MAX_PORTS: u32 = (EVTCHN_WORDS * EVTCHN_WORD_BITS) as u32;

impl Port {
    fn word_and_bit(self) -> Option<(usize, u64)> {
        let n = self.0 as usize;
        (self.0 < MAX_PORTS).then(|| (n / EVTCHN_WORD_BITS, 1u64 << (n % EVTCHN_WORD_BITS)))
    }
}

/// `struct evtchn_alloc_unbound`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct AllocUnbound {
    pub dom: DomId,
    pub remote_dom: DomId,
    pub port: u32,
}

xen_command!(AllocUnbound, EventChannel, 6, "struct evtchn_alloc_unbound");

/// `struct evtchn_bind_interdomain`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BindInterdomain {
    pub remote_dom: DomId,
    pub remote_port: u32,
    pub local_port: u32,
}

xen_command!(
    BindInterdomain,
    EventChannel,
    0,
    "struct evtchn_bind_interdomain"
);

/// `struct evtchn_bind_vcpu`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BindVcpu {
    pub port: u32,
    pub vcpu: u32,
}

xen_command!(BindVcpu, EventChannel, 8, "struct evtchn_bind_vcpu");

/// The one-port structures (`evtchn_send`, `evtchn_close`,
/// `evtchn_unmask`), told apart by their command number.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct PortArg<const CMD: u32> {
    pub port: u32,
}

/// EVTCHNOP_close argument.
pub type EvtchnClose = PortArg<3>;
/// EVTCHNOP_send argument.
pub type EvtchnSend = PortArg<4>;
/// EVTCHNOP_unmask argument.
pub type EvtchnUnmask = PortArg<9>;

xen_command!(EvtchnClose, EventChannel, 3, "struct evtchn_close");
xen_command!(EvtchnSend, EventChannel, 4, "struct evtchn_send");
xen_command!(EvtchnUnmask, EventChannel, 9, "struct evtchn_unmask");

/// What runs when a port fires. Called from the upcall: keep it short
/// (typically: mark a ring as having work).
pub type Handler = Box<dyn FnMut(Port) + Send>;

/// Passes over the selector in one upcall before leaving the rest for the
/// next poll, so one busy port cannot hold a vCPU in the handler forever.
const MAX_SCAN_PASSES: usize = 8;

/// Takes (tests and clears) a pending event on `port` without dispatching
/// it: for a channel whose only user polls it (a xenstore or console wait),
/// so that user does not depend on whoever owns the [`EventChannels`].
///
/// Re-arms `vcpu`'s upcall as a dispatch would: Xen raises no upcall for
/// an event whose selector bit is still set, so the bit of the port's word
/// is cleared, and set again (with the upcall flagged pending, for the
/// next [`EventChannels::handle_upcall`]) if other ports of the word wait.
pub fn take_pending(shared: &SharedInfo, vcpu: usize, port: Port) -> bool {
    let word = port.0 as usize / EVTCHN_WORD_BITS;
    let bit = 1u64 << (port.0 as usize % EVTCHN_WORD_BITS);
    let (Some(pending), Some(mask)) = (
        shared.evtchn_pending.get(word),
        shared.evtchn_mask.get(word),
    ) else {
        return false;
    };
    if pending.fetch_and(!bit, Ordering::SeqCst) & bit == 0 {
        return false;
    }
    if let Some(info) = shared.vcpu_info.get(vcpu) {
        let selector = 1 << word;
        info.evtchn_pending_sel
            .fetch_and(!selector, Ordering::SeqCst);
        if pending.load(Ordering::SeqCst) & !mask.load(Ordering::SeqCst) != 0 {
            info.evtchn_pending_sel.fetch_or(selector, Ordering::SeqCst);
            info.evtchn_upcall_pending.store(1, Ordering::SeqCst);
        }
    }
    true
}

/// Event channels of this domain: hypercalls, masks and dispatch.
pub struct EventChannels<'a, H> {
    xen: H,
    shared: &'a SharedInfo,
    handlers: BTreeMap<Port, Handler>,
    unhandled: u64,
    /// The interdomain ports bound here, for a restart to close.
    held: &'a HeldPorts,
}

impl<'a, H: Hypercall> EventChannels<'a, H> {
    /// Takes over event delivery through `shared` (mapped with
    /// [`crate::memory::map_shared_info`]); interdomain ports bound from
    /// now on are recorded in `held` until closed.
    pub fn new(xen: H, shared: &'a SharedInfo, held: &'a HeldPorts) -> Self {
        EventChannels {
            xen,
            shared,
            handlers: BTreeMap::new(),
            unhandled: 0,
            held,
        }
    }

    /// Allocates a port that domain `remote` may bind to.
    pub fn alloc_unbound(&mut self, remote: DomId) -> Result<Port, Errno> {
        let mut arg = AllocUnbound {
            dom: DOMID_SELF,
            remote_dom: remote,
            port: 0,
        };
        command(&self.xen, &mut arg)?;
        Ok(Port(arg.port))
    }

    /// Binds a local port to `remote_port` of domain `remote` (which the
    /// remote allocated unbound for us), e.g. a frontend's ring channel.
    /// ENOSPC when the record of held ports is full: a port a restart
    /// could not close is not kept.
    pub fn bind_interdomain(&mut self, remote: DomId, remote_port: u32) -> Result<Port, Errno> {
        let mut arg = BindInterdomain {
            remote_dom: remote,
            remote_port,
            local_port: 0,
        };
        command(&self.xen, &mut arg)?;
        if !self.held.bound(arg.local_port) {
            command(
                &self.xen,
                &mut EvtchnClose {
                    port: arg.local_port,
                },
            )?;
            return Err(Errno::ENOSPC);
        }
        Ok(Port(arg.local_port))
    }

    /// [`Self::bind_interdomain`] for a port whose events only have to
    /// wake a poll loop (which then polls everything): its handler does
    /// nothing, so the event counts as handled.
    pub fn bind_interdomain_polled(
        &mut self,
        remote: DomId,
        remote_port: u32,
    ) -> Result<Port, Errno> {
        let port = self.bind_interdomain(remote, remote_port)?;
        self.set_handler(port, Box::new(|_| {}));
        Ok(port)
    }

    /// Notifies the other end of `port`.
    pub fn send(&self, port: Port) -> Result<(), Errno> {
        command(&self.xen, &mut EvtchnSend { port: port.0 }).map(drop)
    }

    /// Closes `port` and forgets its handler.
    pub fn close(&mut self, port: Port) -> Result<(), Errno> {
        self.handlers.remove(&port);
        self.held.closed(port.0);
        command(&self.xen, &mut EvtchnClose { port: port.0 }).map(drop)
    }

    /// Routes `port`'s upcalls to `vcpu`.
    pub fn bind_vcpu(&mut self, port: Port, vcpu: u32) -> Result<(), Errno> {
        command(&self.xen, &mut BindVcpu { port: port.0, vcpu }).map(drop)
    }

    /// Installs `handler` for `port` (replacing any previous one).
    pub fn set_handler(&mut self, port: Port, handler: Handler) {
        self.handlers.insert(port, handler);
    }

    /// Forgets `port`'s handler without closing the port (one its
    /// owner closed through other means): the port is no longer waited
    /// on, and its events count as unhandled.
    pub fn forget_handler(&mut self, port: Port) {
        self.handlers.remove(&port);
    }

    /// Stops delivery of `port`; events still become pending and are
    /// delivered after [`Self::unmask`].
    pub fn mask(&self, port: Port) -> Result<(), Errno> {
        let (word, bit) = port.word_and_bit().ok_or(Errno::EINVAL)?;
        self.shared.evtchn_mask[word].fetch_or(bit, Ordering::SeqCst);
        Ok(())
    }

    /// Re-enables delivery of `port`. If an event arrived while masked, Xen
    /// is asked to re-raise it (EVTCHNOP_unmask), so it is not lost.
    pub fn unmask(&self, port: Port) -> Result<(), Errno> {
        let (word, bit) = port.word_and_bit().ok_or(Errno::EINVAL)?;
        self.shared.evtchn_mask[word].fetch_and(!bit, Ordering::SeqCst);
        if self.shared.evtchn_pending[word].load(Ordering::SeqCst) & bit != 0 {
            command(&self.xen, &mut EvtchnUnmask { port: port.0 })?;
        }
        Ok(())
    }

    /// Every port bound here (with a handler or polled): what an idle loop
    /// waits on.
    pub fn ports(&self) -> impl Iterator<Item = Port> + '_ {
        self.handlers.keys().copied()
    }

    /// Whether an upcall is (still) pending for `vcpu`; the idle loop checks
    /// this before halting.
    pub fn has_pending(&self, vcpu: usize) -> bool {
        self.shared
            .vcpu_info
            .get(vcpu)
            .is_some_and(|v| v.evtchn_upcall_pending.load(Ordering::SeqCst) != 0)
    }

    /// Events that fired on ports without a handler (dropped, counted).
    pub fn unhandled_events(&self) -> u64 {
        self.unhandled
    }

    /// The upcall: dispatches every pending, unmasked port of `vcpu` to its
    /// handler. Masked ports stay pending. Returns how many were dispatched.
    pub fn handle_upcall(&mut self, vcpu: usize) -> usize {
        let Some(info) = self.shared.vcpu_info.get(vcpu) else {
            return 0;
        };
        let mut dispatched = 0;
        for _ in 0..MAX_SCAN_PASSES {
            // Clear the flag before taking the selector: an event that
            // arrives after this sets it again and is seen next pass.
            info.evtchn_upcall_pending.store(0, Ordering::SeqCst);
            let mut selector = info.evtchn_pending_sel.swap(0, Ordering::SeqCst);
            if selector == 0 {
                break;
            }
            while selector != 0 {
                let word = selector.trailing_zeros() as usize;
                selector &= selector - 1;
                dispatched += self.scan_word(word);
            }
        }
        dispatched
    }

    fn scan_word(&mut self, word: usize) -> usize {
        let pending = &self.shared.evtchn_pending[word];
        let ready =
            pending.load(Ordering::SeqCst) & !self.shared.evtchn_mask[word].load(Ordering::SeqCst);
        let mut bits = ready;
        let mut dispatched = 0;
        while bits != 0 {
            let bit = bits.trailing_zeros();
            bits &= bits - 1;
            // Test-and-clear: only the pass that clears the bit dispatches.
            if pending.fetch_and(!(1 << bit), Ordering::SeqCst) & (1 << bit) == 0 {
                continue;
            }
            let port = Port((word * EVTCHN_WORD_BITS) as u32 + bit);
            match self.handlers.get_mut(&port) {
                Some(handler) => {
                    handler(port);
                    dispatched += 1;
                }
                None => self.unhandled += 1,
            }
        }
        dispatched
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::{Command, HypercallOp};
    use crate::sim::SimXen;
    use alloc::sync::Arc;
    use alloc::vec::Vec;
    use core::mem::size_of;
    use core::sync::atomic::AtomicU32;
    use std::sync::Mutex;

    const FRONTEND: DomId = 7;

    fn recorder() -> (Arc<Mutex<Vec<Port>>>, impl Fn() -> Handler) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (seen, move || {
            let s = s.clone();
            Box::new(move |p| s.lock().unwrap().push(p)) as Handler
        })
    }

    #[test]
    fn layouts_match_event_channel_h() {
        assert_eq!(size_of::<AllocUnbound>(), 8);
        assert_eq!(size_of::<BindInterdomain>(), 12);
        assert_eq!(size_of::<BindVcpu>(), 8);
        assert_eq!(size_of::<EvtchnSend>(), 4);
    }

    #[test]
    fn bind_send_and_dispatch_between_domains() {
        let sim = SimXen::new();
        let held = HeldPorts::<[AtomicU32; 128]>::new();
        let mut ev = EventChannels::new(&sim, sim.shared_info(), &held);
        let remote_port = sim.remote_alloc_unbound(FRONTEND);
        let port = ev.bind_interdomain(FRONTEND, remote_port).unwrap();
        let (seen, handler) = recorder();
        ev.set_handler(port, handler());

        ev.send(port).unwrap();
        ev.send(port).unwrap();
        assert_eq!(sim.notifications(FRONTEND, remote_port), 2);

        sim.remote_send(FRONTEND, remote_port).unwrap();
        assert!(ev.has_pending(0));
        assert_eq!(ev.handle_upcall(0), 1);
        assert!(!ev.has_pending(0));
        assert_eq!(*seen.lock().unwrap(), [port]);
        assert_eq!(ev.handle_upcall(0), 0, "an event is dispatched once");

        // Binding twice to the same remote port is refused.
        assert_eq!(
            ev.bind_interdomain(FRONTEND, remote_port),
            Err(Errno::EINVAL)
        );
        ev.close(port).unwrap();
        assert_eq!(ev.send(port), Err(Errno::EINVAL));
    }

    #[test]
    fn alloc_unbound_lets_the_remote_bind() {
        let sim = SimXen::new();
        let held = HeldPorts::<[AtomicU32; 128]>::new();
        let mut ev = EventChannels::new(&sim, sim.shared_info(), &held);
        let port = ev.alloc_unbound(FRONTEND).unwrap();
        assert_eq!(sim.remote_bind(FRONTEND + 1, port), Err(Errno::EINVAL));
        let remote = sim.remote_bind(FRONTEND, port).unwrap();
        ev.send(port).unwrap();
        assert_eq!(sim.notifications(FRONTEND, remote), 1);
    }

    #[test]
    fn masked_events_are_not_dispatched_but_not_lost() {
        let sim = SimXen::new();
        let held = HeldPorts::<[AtomicU32; 128]>::new();
        let mut ev = EventChannels::new(&sim, sim.shared_info(), &held);
        let (seen, handler) = recorder();
        let mut ports = Vec::new();
        for _ in 0..3 {
            let rp = sim.remote_alloc_unbound(FRONTEND);
            let port = ev.bind_interdomain(FRONTEND, rp).unwrap();
            ev.set_handler(port, handler());
            ports.push((port, rp));
        }
        let (masked, masked_rp) = ports[1];
        ev.mask(masked).unwrap();
        for (_, rp) in &ports {
            sim.remote_send(FRONTEND, *rp).unwrap();
        }
        assert_eq!(ev.handle_upcall(0), 2);
        assert!(!seen.lock().unwrap().contains(&masked));

        // A second event while masked coalesces; nothing is dispatched.
        sim.remote_send(FRONTEND, masked_rp).unwrap();
        assert_eq!(ev.handle_upcall(0), 0);
        ev.unmask(masked).unwrap();
        assert!(ev.has_pending(0), "unmask re-raises the pending event");
        assert_eq!(ev.handle_upcall(0), 1);
        assert_eq!(seen.lock().unwrap().last(), Some(&masked));
        assert_eq!(sim.calls(HypercallOp::EventChannel, EvtchnUnmask::CMD), 1);
        // Unmasking with nothing pending needs no hypercall.
        ev.unmask(masked).unwrap();
        assert_eq!(sim.calls(HypercallOp::EventChannel, EvtchnUnmask::CMD), 1);
    }

    #[test]
    fn scan_covers_many_words_and_counts_unhandled() {
        let sim = SimXen::new();
        let held = HeldPorts::<[AtomicU32; 128]>::new();
        let mut ev = EventChannels::new(&sim, sim.shared_info(), &held);
        let (seen, handler) = recorder();
        // Bind enough ports to span two pending words (ports 1..=70).
        let mut last = None;
        for _ in 0..70 {
            let rp = sim.remote_alloc_unbound(FRONTEND);
            let port = ev.bind_interdomain(FRONTEND, rp).unwrap();
            if port.0 != 5 {
                ev.set_handler(port, handler());
            }
            sim.remote_send(FRONTEND, rp).unwrap();
            last = Some(port);
        }
        assert_eq!(last, Some(Port(70)));
        assert_eq!(ev.handle_upcall(0), 69);
        assert_eq!(ev.unhandled_events(), 1);
        let seen = seen.lock().unwrap();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "lowest port first");
        assert!(seen.contains(&Port(64)) && seen.contains(&Port(70)));
    }

    #[test]
    fn events_for_another_vcpu_wait_for_that_vcpu() {
        let sim = SimXen::new();
        let held = HeldPorts::<[AtomicU32; 128]>::new();
        let mut ev = EventChannels::new(&sim, sim.shared_info(), &held);
        let rp = sim.remote_alloc_unbound(FRONTEND);
        let port = ev.bind_interdomain(FRONTEND, rp).unwrap();
        ev.set_handler(port, Box::new(|_| {}));
        ev.bind_vcpu(port, 1).unwrap();
        sim.remote_send(FRONTEND, rp).unwrap();
        assert_eq!(ev.handle_upcall(0), 0);
        assert_eq!(ev.handle_upcall(1), 1);
        assert_eq!(ev.handle_upcall(99), 0, "out-of-range vCPU is ignored");
        assert_eq!(ev.mask(Port(MAX_PORTS)), Err(Errno::EINVAL));
    }

    #[test]
    fn upcall_setup_prefers_per_vcpu_vector_and_falls_back() {
        use crate::hvm::{PARAM_CALLBACK_IRQ, UpcallMethod, callback_vector_param, setup_upcall};
        let sim = SimXen::new();
        assert_eq!(setup_upcall(&sim, 0, 0xf3), Ok(UpcallMethod::PerVcpuVector));
        assert_eq!(sim.upcall_vector(0), Some(0xf3));

        let old = SimXen::new();
        old.disable_upcall_vector();
        assert_eq!(
            setup_upcall(&old, 0, 0xf3),
            Ok(UpcallMethod::CallbackVector)
        );
        assert_eq!(
            old.param(PARAM_CALLBACK_IRQ),
            Some(callback_vector_param(0xf3))
        );
    }

    #[test]
    fn a_polled_port_takes_its_own_event_once_and_rearms_the_upcall() {
        let sim = SimXen::new();
        let shared = sim.shared_info();
        let info = &shared.vcpu_info[0];
        shared.evtchn_pending[1].fetch_or(1 << 3 | 1 << 4, Ordering::SeqCst);
        info.evtchn_pending_sel.fetch_or(1 << 1, Ordering::SeqCst);
        assert!(!take_pending(shared, 0, Port(3)));
        assert!(take_pending(shared, 0, Port(67)));
        // Port 68 still waits: its word stays selected, the upcall pending.
        assert_eq!(info.evtchn_pending_sel.load(Ordering::SeqCst), 1 << 1);
        assert_eq!(info.evtchn_upcall_pending.load(Ordering::SeqCst), 1);
        assert!(!take_pending(shared, 0, Port(67)), "taken once");
        info.evtchn_upcall_pending.store(0, Ordering::SeqCst);
        assert!(take_pending(shared, 0, Port(68)));
        // Nothing left in the word: its selector bit is clear again, so
        // Xen raises an upcall for the next event in it.
        assert_eq!(info.evtchn_pending_sel.load(Ordering::SeqCst), 0);
        assert_eq!(info.evtchn_upcall_pending.load(Ordering::SeqCst), 0);
        assert!(!take_pending(shared, 0, Port(u32::MAX)));
    }
}

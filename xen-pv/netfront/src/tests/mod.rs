//! Host tests: the handshake against the simulated netback, the data
//! path against a misbehaving one, and smoltcp over two netfronts.

mod datapath;
mod handshake;
mod hostile;
mod tcp;

use alloc::boxed::Box;
use alloc::vec::Vec;

use xen_pv::sim::GUEST;
use xen_pv::sim::xenstore::SimXenstored;
use xen_pv::xenstore::{Xenstore, XenstoreInterface};

use crate::sim::{SimHal, SimNetback};
use crate::{Netfront, NetfrontConfig, Phase};

pub(crate) const MAC: &str = "00:16:3e:00:00:01";
pub(crate) const TOKEN: &str = "vif0";

/// One vif: our netfront, the xenstore both ends use, the simulated
/// hypervisor and netback.
pub(crate) struct Vif {
    pub xs: Xenstore<'static, SimXenstored<'static>>,
    pub hal: SimHal,
    pub netback: SimNetback,
    pub netfront: Netfront<SimHal>,
}

impl Vif {
    pub fn new(config: NetfrontConfig) -> Vif {
        Self::with_mac(config, MAC)
    }

    pub fn with_mac(config: NetfrontConfig, mac: &str) -> Vif {
        // Each test's xenstore page lives for the test process.
        let iface: &'static XenstoreInterface = Box::leak(XenstoreInterface::new_boxed(0));
        let mut xs = Xenstore::new(iface, SimXenstored::new(iface, GUEST));
        let hal = SimHal::new();
        let netback = SimNetback::new(hal.clone(), xs.channel_mut(), GUEST, 0, mac);
        let netfront = Netfront::new(hal.clone(), config, "device/vif/0").expect("pages");
        Vif {
            xs,
            hal,
            netback,
            netfront,
        }
    }

    pub fn small() -> Vif {
        Self::new(small_config())
    }

    /// A small vif, connected and running.
    pub fn connected() -> Vif {
        let mut vif = Self::small();
        vif.connect();
        vif
    }

    /// Runs the backend and the frontend's xenbus side until neither
    /// moves (the kernel would run attend on each watch event).
    pub fn settle(&mut self) {
        for _ in 0..32 {
            let moved = self.netback.step(self.xs.channel_mut());
            let before = self.netfront.phase();
            let _ = self.netfront.attend(&mut self.xs);
            if !moved && before == self.netfront.phase() {
                return;
            }
        }
        panic!("the handshake does not settle");
    }

    pub fn connect(&mut self) {
        self.netfront.start(&mut self.xs, TOKEN).expect("start");
        self.settle();
        assert_eq!(self.netfront.phase(), Phase::Running);
    }

    pub fn store(&mut self) -> &mut SimXenstored<'static> {
        self.xs.channel_mut()
    }

    /// Sends `frame` through the netfront; false when it had no buffer.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        self.netfront
            .send_with(frame.len(), |buf| buf.copy_from_slice(frame))
            .is_some()
    }

    /// Lets the backend run, then takes every frame the netfront has.
    pub fn receive_all(&mut self) -> Vec<Vec<u8>> {
        self.netback.step(self.xs.channel_mut());
        let mut frames = Vec::new();
        while let Some(frame) = self.netfront.receive_with(<[u8]>::to_vec) {
            frames.push(frame);
        }
        frames
    }
}

pub(crate) fn small_config() -> NetfrontConfig {
    NetfrontConfig {
        rx_buffers: 16,
        tx_buffers: 8,
        max_leaked_pages: 4,
    }
}

/// A frame whose bytes say `seed`, `len` long.
pub(crate) fn frame(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

//! smoltcp's `phy::Device` on a netfront: Ethernet frames of up to
//! [`MAX_FRAME_LEN`] bytes, checksums computed and verified by smoltcp
//! (netback is asked for full checksums, and we leave none blank).
//!
//! `receive` yields a token only for a frame that is there: an idle
//! netfront yields none (and has asked the backend to notify the next
//! frame), so a loop that polls the interface until nothing happens and
//! then waits for the event channel never spins.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::datapath::TxSender;
use crate::hal::NetfrontHal;
use crate::netfront::{MAX_FRAME_LEN, Netfront};

/// A received frame, already copied into the netfront's own memory.
pub struct NetfrontRxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for NetfrontRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

/// The right to send one frame.
pub struct NetfrontTxToken<'a, H> {
    sender: TxSender<'a, H>,
}

impl<H: NetfrontHal> phy::TxToken for NetfrontTxToken<'_, H> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.sender.send(len, f)
    }
}

impl<H: NetfrontHal> phy::Device for Netfront<H> {
    type RxToken<'a>
        = NetfrontRxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = NetfrontTxToken<'a, H>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.reclaim();
        let len = self.next_frame()?;
        // The reply token may find no free TX buffer: it then drops its
        // frame (counted), as a full NIC queue would.
        let sender = TxSender {
            hal: &mut self.hal,
            link: self.link.as_mut(),
            pages: &self.pages,
            tx: &mut self.tx,
            stats: &mut self.stats,
        };
        Some((
            NetfrontRxToken {
                frame: self.rx.frame(len),
            },
            NetfrontTxToken { sender },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        self.sender().map(|sender| NetfrontTxToken { sender })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        capabilities.max_transmission_unit = MAX_FRAME_LEN;
        capabilities
    }
}

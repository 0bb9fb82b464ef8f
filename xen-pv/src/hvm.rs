//! `hvm_op`: HVM parameters and event-channel upcall setup.

use crate::hypercall::{XENFEAT_HVM_CALLBACK_VECTOR, command, has_feature};
use crate::{DOMID_SELF, DomId, Errno, Hypercall};

/// `HVM_PARAM_CALLBACK_IRQ`: how event upcalls are delivered (domain-wide).
pub const PARAM_CALLBACK_IRQ: u32 = 0;
/// `HVM_PARAM_STORE_PFN`: frame of the xenstore ring.
pub const PARAM_STORE_PFN: u32 = 1;
/// `HVM_PARAM_STORE_EVTCHN`: event channel of the xenstore ring.
pub const PARAM_STORE_EVTCHN: u32 = 2;
/// `HVM_PARAM_CONSOLE_PFN`: frame of the PV console ring.
pub const PARAM_CONSOLE_PFN: u32 = 17;
/// `HVM_PARAM_CONSOLE_EVTCHN`: event channel of the PV console ring.
pub const PARAM_CONSOLE_EVTCHN: u32 = 18;

/// `struct xen_hvm_param`; `CMD` is HVMOP_set_param (0) or get_param (1).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct HvmParam<const CMD: u32> {
    pub domid: DomId,
    pub index: u32,
    pub value: u64,
}

/// HVMOP_set_param argument.
pub type SetParam = HvmParam<0>;
/// HVMOP_get_param argument.
pub type GetParam = HvmParam<1>;

xen_command!(SetParam, Hvm, 0, "struct xen_hvm_param");
xen_command!(GetParam, Hvm, 1, "struct xen_hvm_param");

/// `struct xen_hvm_evtchn_upcall_vector` (HVMOP_set_evtchn_upcall_vector).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct SetEvtchnUpcallVector {
    pub vcpu: u32,
    pub vector: u8,
}

xen_command!(
    SetEvtchnUpcallVector,
    Hvm,
    23,
    "struct xen_hvm_evtchn_upcall_vector"
);

/// Reads HVM parameter `index` of this domain.
pub fn get_param<H: Hypercall + ?Sized>(h: &H, index: u32) -> Result<u64, Errno> {
    let mut arg = GetParam {
        domid: DOMID_SELF,
        index,
        value: 0,
    };
    command(h, &mut arg)?;
    Ok(arg.value)
}

/// Sets HVM parameter `index` of this domain.
pub fn set_param<H: Hypercall + ?Sized>(h: &H, index: u32, value: u64) -> Result<(), Errno> {
    command(
        h,
        &mut SetParam {
            domid: DOMID_SELF,
            index,
            value,
        },
    )
    .map(drop)
}

/// A shared ring handed to the domain at creation: its frame and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingParams {
    pub gfn: u64,
    pub port: u32,
}

fn ring_params<H: Hypercall + ?Sized>(h: &H, pfn: u32, evtchn: u32) -> Result<RingParams, Errno> {
    let gfn = get_param(h, pfn)?;
    let port = u32::try_from(get_param(h, evtchn)?).map_err(|_| Errno::EINVAL)?;
    Ok(RingParams { gfn, port })
}

/// Where the xenstore ring is (`xenstore_domain_interface`).
pub fn store_ring<H: Hypercall + ?Sized>(h: &H) -> Result<RingParams, Errno> {
    ring_params(h, PARAM_STORE_PFN, PARAM_STORE_EVTCHN)
}

/// Where the PV console ring is (`xencons_interface`).
pub fn console_ring<H: Hypercall + ?Sized>(h: &H) -> Result<RingParams, Errno> {
    ring_params(h, PARAM_CONSOLE_PFN, PARAM_CONSOLE_EVTCHN)
}

/// How event upcalls were set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpcallMethod {
    /// Per-vCPU vector (HVMOP_set_evtchn_upcall_vector); the kernel must
    /// EOI the local APIC after each upcall.
    PerVcpuVector,
    /// Domain-wide HVM_PARAM_CALLBACK_IRQ of type "vector"; no EOI needed.
    CallbackVector,
}

/// `HVM_PARAM_CALLBACK_IRQ` value: delivery type 2 (vector) in bits 63:56.
pub fn callback_vector_param(vector: u8) -> u64 {
    (2u64 << 56) | u64::from(vector)
}

/// Routes event upcalls for `vcpu` to interrupt `vector`: the per-vCPU
/// vector where Xen has it, else the domain-wide callback vector.
///
/// With the per-vCPU vector, `HVM_PARAM_CALLBACK_IRQ` is set to 1 as Linux
/// and FreeBSD do: Xen then ignores it (the vector wins), but libxl reads a
/// zero there in an HVM guest as "no PV drivers" and refuses `xl shutdown`.
pub fn setup_upcall<H: Hypercall + ?Sized>(
    h: &H,
    vcpu: u32,
    vector: u8,
) -> Result<UpcallMethod, Errno> {
    match command(h, &mut SetEvtchnUpcallVector { vcpu, vector }) {
        Ok(_) => {
            set_param(h, PARAM_CALLBACK_IRQ, 1)?;
            Ok(UpcallMethod::PerVcpuVector)
        }
        Err(Errno::ENOSYS | Errno::EINVAL) if has_feature(h, XENFEAT_HVM_CALLBACK_VECTOR)? => {
            set_param(h, PARAM_CALLBACK_IRQ, callback_vector_param(vector))?;
            Ok(UpcallMethod::CallbackVector)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_and_callback_encoding() {
        assert_eq!(size_of::<GetParam>(), 16);
        assert_eq!(size_of::<SetEvtchnUpcallVector>(), 8);
        assert_eq!(callback_vector_param(0xf3), 0x0200_0000_0000_00f3);
    }
}

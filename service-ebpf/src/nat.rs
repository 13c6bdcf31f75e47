//! Address and port rewrites with incremental checksum updates.
//!
//! The kernel's csum helpers are used rather than our own arithmetic because they also handle
//! CHECKSUM_PARTIAL skbs (a local sender's veth packets carry only the pseudo-header sum, which
//! must change with the address and must not change with the port) and CHECKSUM_COMPLETE ones.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use service_common::IPPROTO_UDP;

use crate::packet::{IPV4_CHECK, IPV4_DST, IPV4_SRC, Ipv4Flow};

/// Offsets of the checksum inside the TCP and UDP headers.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

/// Which end of the flow a rewrite replaces.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

/// Replaces one end's address and port; `Err` when a helper refused (the packet is then dropped:
/// it may be half-written).
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    end: End,
    address: u32,
    port: u16,
) -> Result<(), i64> {
    let (address_offset, port_offset, old_address, old_port) = match end {
        End::Source => (IPV4_SRC, flow.l4_offset, flow.src_address, flow.src_port),
        End::Destination => (
            IPV4_DST,
            flow.l4_offset + 2,
            flow.dst_address,
            flow.dst_port,
        ),
    };
    // UDP's zero checksum means "none": MARK_MANGLED_0 keeps it zero, and a computed zero is
    // written as 0xffff.
    let (check_offset, l4_flags) = if flow.protocol == IPPROTO_UDP {
        (flow.l4_offset + UDP_CHECK, u64::from(BPF_F_MARK_MANGLED_0))
    } else {
        (flow.l4_offset + TCP_CHECK, 0)
    };

    if address != old_address {
        ctx.l4_csum_replace(
            check_offset,
            u64::from(old_address),
            u64::from(address),
            l4_flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
        )?;
        ctx.l3_csum_replace(IPV4_CHECK, u64::from(old_address), u64::from(address), 4)?;
        ctx.store(address_offset, &address, 0)?;
    }
    if port != old_port {
        ctx.l4_csum_replace(
            check_offset,
            u64::from(old_port),
            u64::from(port),
            l4_flags | 2,
        )?;
        ctx.store(port_offset, &port, 0)?;
    }
    Ok(())
}

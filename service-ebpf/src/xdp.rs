//! The XDP fast path of external links: NodePort, load-balancer and external-IP traffic (and
//! replies from backends on other nodes) is translated before the kernel allocates an skb, and
//! when the route out is another XDP-enabled external link (the usual case for a backend on
//! another node, or a reply going back to the client) it is sent from here, as a router would:
//! next hop from the kernel's FIB, TTL decremented, MAC addresses rewritten.
//!
//! Everything this program does not finish goes on to `external_ingress` at TC, which handles
//! every case: a translated packet for a local pod (the stack routes it into the pod's veth),
//! a packet whose next hop is not resolved yet, refusals (they need a new packet), ICMP errors,
//! anything not TCP or UDP over IPv4.
//!
//! Checksums are updated in software: XDP has no csum helpers, and no skb to tell a partial
//! checksum (a local sender's offload) from a full one. Packets from a wire carry full ones.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use network_types::ip::Ipv4Hdr;
use service_common::{CT_SNAT, IPPROTO_UDP};

use crate::{
    Origin,
    checksum::{Delta, half},
    maps::XDP_EGRESS,
    packet::{self, IPV4_OFFSET, Ipv4Flow, xdp_pointer},
    service::{self, Decision},
    target::{self, Target},
};

const AF_INET: u8 = 2;
/// Offsets inside the IPv4 header (without the Ethernet header before it).
const IP_TTL: usize = 8;
const IP_CHECK: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
/// Offsets of the checksum inside the TCP and UDP headers.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

/// The longest IPv4 packet a standard Ethernet frame carries. A longer one was merged by GRO
/// (generic XDP runs after GRO), and a merged TCP packet carries a partial checksum that the
/// software update here would corrupt: such packets go to TC untouched, whose csum helpers know.
/// Jumbo frames go to TC as well: slower, never wrong.
const LONGEST_UNMERGED_PACKET: u16 = 1500;

/// An (address, port) pair, network byte order.
type End = (u32, u16);

#[inline(always)]
pub fn serve(ctx: &XdpContext) -> u32 {
    let Some(flow) = packet::parse(ctx) else {
        return XDP_PASS;
    };
    match packet::Frame::read::<Ipv4Hdr>(ctx, IPV4_OFFSET) {
        Some(ip) if u16::from_be_bytes(ip.tot_len) <= LONGEST_UNMERGED_PACKET => {}
        _ => return XDP_PASS,
    }
    let (src, dst) = match target::of(&flow) {
        Target::Frontend(frontend, service) => {
            match service::decide(&flow, Origin::External, &frontend, service) {
                Decision::To(backend, entry) => {
                    let src = if entry.flags & CT_SNAT != 0 {
                        (entry.nat_address, entry.nat_port)
                    } else {
                        (flow.src_address, flow.src_port)
                    };
                    (src, (backend.address, backend.port))
                }
                // TC, on the same link, answers: that needs a new packet.
                Decision::Refuse => return XDP_PASS,
                Decision::Drop => return XDP_DROP,
            }
        }
        Target::Reply(entry, frontend) => {
            let dst = if entry.flags & CT_SNAT != 0 {
                (entry.nat_address, entry.nat_port)
            } else {
                (flow.dst_address, flow.dst_port)
            };
            ((frontend.address, frontend.port), dst)
        }
        Target::Other => return XDP_PASS,
    };
    let next_hop = next_hop(ctx, &flow, src, dst);
    if rewrite(ctx, &flow, src, dst, next_hop.is_some()).is_none() {
        // Nothing was written: every bound is checked before the first store.
        return XDP_PASS;
    }
    let Some(next_hop) = next_hop else {
        return XDP_PASS;
    };
    let Some(ethernet) = xdp_pointer::<[u8; 12]>(ctx, 0) else {
        return XDP_DROP;
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&next_hop.dmac);
    macs[6..].copy_from_slice(&next_hop.smac);
    // SAFETY: bounds-checked by xdp_pointer.
    unsafe { ethernet.write_unaligned(macs) };
    XDP_EGRESS.redirect(next_hop.ifindex, 0).unwrap_or(XDP_DROP)
}

/// Where the translated packet leaves, if it can be sent from here: the FIB knows the route and
/// the neighbour, the link is one of XDP_EGRESS, and the TTL allows one more hop.
#[inline(always)]
fn next_hop(ctx: &XdpContext, flow: &Ipv4Flow, src: End, dst: End) -> Option<bpf_fib_lookup> {
    let ip: Ipv4Hdr = packet::Frame::read(ctx, IPV4_OFFSET)?;
    if ip.ttl <= 1 {
        // The stack sends the time-exceeded error.
        return None;
    }
    // SAFETY: bpf_fib_lookup is plain data; all zeroes is a valid value.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = flow.protocol;
    fib.sport = src.1;
    fib.dport = dst.1;
    fib.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_3.ipv4_src = src.0;
    fib.__bindgen_anon_4.ipv4_dst = dst.0;
    // SAFETY: `fib` is a valid bpf_fib_lookup of the size passed.
    let result = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if result != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || XDP_EGRESS.get(fib.ifindex).is_none() {
        return None;
    }
    Some(fib)
}

/// Gives the packet `src` and `dst` (and, when `forwarded`, one hop less of TTL), with its IPv4
/// and L4 checksums updated (RFC 1624). None, with nothing written, when a header is out of
/// bounds.
#[inline(always)]
fn rewrite(ctx: &XdpContext, flow: &Ipv4Flow, src: End, dst: End, forwarded: bool) -> Option<()> {
    let ip = xdp_pointer::<[u8; Ipv4Hdr::LEN]>(ctx, IPV4_OFFSET)?;
    let ports = xdp_pointer::<[u16; 2]>(ctx, flow.l4_offset)?;
    let udp = flow.protocol == IPPROTO_UDP;
    let check = if udp {
        xdp_pointer::<u16>(ctx, flow.l4_offset + UDP_CHECK)?
    } else {
        xdp_pointer::<u16>(ctx, flow.l4_offset + TCP_CHECK)?
    };
    // SAFETY: all three were bounds-checked by xdp_pointer.
    let mut header = unsafe { ip.read_unaligned() };
    let mut addresses = Delta::default();
    addresses.replace_address(&mut header, IP_SRC, src.0);
    addresses.replace_address(&mut header, IP_DST, dst.0);
    let mut ip_delta = Delta(addresses.0);
    if forwarded {
        let mut ttl_and_protocol = header;
        ttl_and_protocol[IP_TTL] -= 1;
        ip_delta.replace_half(&mut header, IP_TTL, half(&ttl_and_protocol, IP_TTL));
    }
    let ip_check = ip_delta.applied_to(half(&header, IP_CHECK));
    header[IP_CHECK..IP_CHECK + 2].copy_from_slice(&ip_check.to_ne_bytes());

    // The L4 checksum covers the pseudo-header addresses and the ports.
    let mut l4 = Delta(addresses.0);
    l4.record16(flow.src_port, src.1);
    l4.record16(flow.dst_port, dst.1);
    let old_check = unsafe { check.read_unaligned() };
    // UDP's zero checksum means "none" and stays zero; a computed zero is sent as 0xffff.
    let new_check = match (udp, old_check, l4.applied_to(old_check)) {
        (true, 0, _) => 0,
        (true, _, 0) => 0xffff,
        (_, _, new) => new,
    };
    unsafe {
        ip.write_unaligned(header);
        ports.write_unaligned([src.1, dst.1]);
        check.write_unaligned(new_check);
    }
    Some(())
}

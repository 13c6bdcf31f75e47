//! Refusing a new flow to a Service without endpoints, as kube-proxy's REJECT rule does: the
//! packet is turned in place into an ICMP port unreachable and sent back out of the link it came
//! in on. A TCP client's connect() then fails at once with ECONNREFUSED (Linux treats this ICMP
//! error as fatal for a connecting socket), and a UDP client's next receive does too.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};

use crate::packet::{IPV4_OFFSET, Ipv4Flow};

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
/// An ICMP error quotes the offending IP header and the first 8 bytes of its payload (RFC 792),
/// which hold the ports: enough for the client's kernel to find its socket.
const QUOTED_L4_LEN: usize = 8;
const ICMP_LEN: usize = 8;
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const TTL: u8 = 64;

/// What follows the Ethernet header in the answer.
#[repr(C)]
struct IcmpError {
    ip: [u8; IPV4_LEN],
    icmp: [u8; ICMP_LEN],
    quoted: [u8; IPV4_LEN + QUOTED_L4_LEN],
}

const ANSWER_LEN: usize = core::mem::size_of::<IcmpError>();

#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, flow: &Ipv4Flow) -> i32 {
    // A header with options would need a longer quote; such SYNs are rare enough to drop.
    if flow.l4_offset != IPV4_OFFSET + IPV4_LEN || build(ctx).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: reads the ingress ifindex from the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Egress of the link the packet arrived on: back towards the sender.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

#[inline(always)]
fn build(ctx: &TcContext) -> Result<(), i64> {
    let eth: [u8; ETH_LEN] = ctx.load(0)?;
    let mut answer = IcmpError {
        ip: [0; IPV4_LEN],
        icmp: [0; ICMP_LEN],
        quoted: ctx.load(IPV4_OFFSET)?,
    };
    let original = &answer.quoted;
    answer.ip = [
        0x45,
        0,
        0,
        ANSWER_LEN as u8,
        0,
        0,
        0,
        0,
        TTL,
        IPPROTO_ICMP,
        0,
        0,
        // From the address the client wrote to, to the client.
        original[16],
        original[17],
        original[18],
        original[19],
        original[12],
        original[13],
        original[14],
        original[15],
    ];
    answer.icmp[0] = ICMP_DEST_UNREACH;
    answer.icmp[1] = ICMP_PORT_UNREACH;
    let ip_check = checksum(answer.ip.as_mut_ptr(), IPV4_LEN as u32);
    answer.ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());
    // The ICMP checksum covers the ICMP header and the quote, which follow each other.
    let icmp_check = checksum(answer.icmp.as_mut_ptr(), (ICMP_LEN + IPV4_LEN + 8) as u32);
    answer.icmp[2..4].copy_from_slice(&icmp_check.to_ne_bytes());

    let mut reversed = [0u8; ETH_LEN];
    reversed[..6].copy_from_slice(&eth[6..12]);
    reversed[6..12].copy_from_slice(&eth[..6]);
    reversed[12..].copy_from_slice(&eth[12..]);
    // SAFETY: the helper only needs the context pointer; nothing holds packet pointers across it.
    let resized = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_LEN + ANSWER_LEN) as u32, 0) };
    if resized != 0 {
        return Err(resized);
    }
    ctx.store(0, &reversed, 0)?;
    ctx.store(ETH_LEN, &answer, 0)?;
    Ok(())
}

/// The Internet checksum of `len` bytes (a multiple of 4) at `data`, folded and complemented,
/// ready to store as it is.
#[inline(always)]
fn checksum(data: *mut u8, len: u32) -> u16 {
    // SAFETY: `data` points at `len` bytes of the caller's stack.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, data.cast(), len, 0) } as u64;
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

//! ICMP errors about translated flows (destination unreachable, frag-needed included, and time
//! exceeded), translated as Linux's nf_nat_icmp_reply_translation does: the quoted packet is
//! given back the addresses and ports its sender used, and the outer header is made to look like
//! the reply to the translated packet. Without this, the client's kernel would find no socket for
//! an error quoting the backend's address (a refused UDP flow times out instead of failing, path
//! MTU discovery breaks), and a backend would never hear of errors about its replies.
//!
//! An error about a flow whose entries expired is not translated: the packet path would not
//! translate the flow's packets either.
//!
//! Two directions:
//! - towards the client: the error quotes what this node sent to the backend (client or SNAT
//!   address -> backend), found through the flow's reverse entry;
//! - towards the backend: the error quotes the frontend's reply as the client received it
//!   (frontend -> client), found through the flow's forward entry.
//!
//! Checksums are updated in software (RFC 1624): the kernel helpers can only patch a checksum at
//! the packet's own L4 header, and here four checksums nest inside each other. Every updated
//! region (outer IPv4 header, ICMP message, quoted IPv4 header) keeps its sum, so a
//! CHECKSUM_COMPLETE skb's sum stays valid too.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use network_types::eth::EtherType;
use service_common::{
    CT_FORWARD, CT_REVERSE, CT_SNAT, ConntrackEntryV4, ConntrackKeyV4, IPPROTO_TCP, IPPROTO_UDP,
    conntrack_expired,
};

use crate::{
    checksum::{Delta, address, half},
    conntrack,
    maps::{BACKENDS_V4, CONNTRACK_V4, REV_NAT_V4},
    packet::IPV4_OFFSET,
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_LEN: usize = 8;
const ICMP_CHECK: usize = 2;
const IPV4_LEN: usize = 20;
/// What RFC 792 guarantees an error quotes: the offending IPv4 header and 8 bytes of its payload,
/// which hold the ports and, for UDP, the checksum.
const QUOTE_LEN: usize = IPV4_LEN + 8;
/// A quoted TCP checksum (at this offset in the quote) is only updated when the whole TCP header
/// is quoted, as nf_nat does: a shorter quote does not hold it.
const QUOTED_TCP_CHECK: usize = IPV4_LEN + 16;
const QUOTED_TCP_END: usize = IPV4_LEN + 20;
/// More-fragments flag and fragment offset, and the offset alone, in host order.
const IPV4_MF_AND_OFFSET: u16 = 0x3fff;
const IPV4_OFFSET_MASK: u16 = 0x1fff;

/// Offsets inside an IPv4 header and the 8 quoted L4 bytes.
const CHECK: usize = 10;
const SRC: usize = 12;
const DST: usize = 16;
const SRC_PORT: usize = 20;
const DST_PORT: usize = 22;
const UDP_CHECK: usize = 26;

/// A packet that is not TCP or UDP the NAT could parse: translated if it is an ICMP error about a
/// translated flow, else passed untouched.
#[inline(always)]
pub fn translate(ctx: &TcContext) -> i32 {
    let Some(error) = parse(ctx) else {
        return TC_ACT_OK;
    };
    let Some(translation) = lookup(&error) else {
        return TC_ACT_OK;
    };
    // A helper failed midway: the packet may be half-written, and must not leave.
    match rewrite(ctx, &error, &translation) {
        Ok(()) => TC_ACT_OK,
        Err(_) => TC_ACT_SHOT,
    }
}

/// An ICMP error with a complete quote: the headers as read (network byte order throughout).
struct IcmpError {
    outer: [u8; IPV4_LEN],
    icmp_offset: usize,
    icmp_check: u16,
    quote: [u8; QUOTE_LEN],
    /// The quoted TCP header is whole, so its checksum must follow the rewrite.
    tcp_check_quoted: bool,
}

/// What the error's addresses and ports become.
struct Translation {
    inner_src: (u32, u16),
    inner_dst: (u32, u16),
    outer_src: u32,
    outer_dst: u32,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<IcmpError> {
    let ether_type: u16 = ctx.load(12).ok()?;
    if ether_type != EtherType::Ipv4 as u16 {
        return None;
    }
    let outer: [u8; IPV4_LEN] = ctx.load(IPV4_OFFSET).ok()?;
    // The protocol first: everything that is not ICMP stops here.
    if outer[9] != IPPROTO_ICMP || outer[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(outer[0] & 0x0f) * 4;
    if ihl < IPV4_LEN || u16::from_be_bytes([outer[6], outer[7]]) & IPV4_MF_AND_OFFSET != 0 {
        return None;
    }
    let icmp_offset = IPV4_OFFSET + ihl;
    let icmp: [u8; ICMP_LEN] = ctx.load(icmp_offset).ok()?;
    if icmp[0] != ICMP_DEST_UNREACH && icmp[0] != ICMP_TIME_EXCEEDED {
        return None;
    }
    // The message ends at the outer total length: Ethernet padding after it is not quote.
    let end = (IPV4_OFFSET + usize::from(u16::from_be_bytes([outer[2], outer[3]])))
        .min(ctx.len() as usize);
    let quote_offset = icmp_offset + ICMP_LEN;
    if end < quote_offset + QUOTE_LEN {
        return None;
    }
    let quote: [u8; QUOTE_LEN] = ctx.load(quote_offset).ok()?;
    // Options would move the ports; a later fragment quotes no ports at all.
    if quote[0] != 0x45
        || u16::from_be_bytes([quote[6], quote[7]]) & IPV4_OFFSET_MASK != 0
        || (quote[9] != IPPROTO_TCP && quote[9] != IPPROTO_UDP)
    {
        return None;
    }
    Some(IcmpError {
        outer,
        icmp_offset,
        icmp_check: u16::from_ne_bytes([icmp[2], icmp[3]]),
        quote,
        tcp_check_quoted: quote[9] == IPPROTO_TCP && end >= quote_offset + QUOTED_TCP_END,
    })
}

#[inline(always)]
fn lookup(error: &IcmpError) -> Option<Translation> {
    let quote = &error.quote;
    let inner_src = (address(quote, SRC), half(quote, SRC_PORT));
    let inner_dst = (address(quote, DST), half(quote, DST_PORT));
    // Both directions key the flow the way the quoted packet's answer would travel.
    let mut key = ConntrackKeyV4 {
        src_address: inner_dst.0,
        dst_address: inner_src.0,
        src_port: inner_dst.1,
        dst_port: inner_src.1,
        protocol: quote[9],
        direction: CT_REVERSE,
        _pad: 0,
    };
    // An entry of an expired flow is as good as absent: the packet path no longer applies it.
    let now = conntrack::now_seconds();
    let lifetimes = conntrack::lifetimes();
    let live = |entry: &&ConntrackEntryV4| !conntrack_expired(entry, key.protocol, now, &lifetimes);
    // SAFETY: map values are plain data; a concurrent update can at worst give a stale value.
    if let Some(entry) = unsafe { CONNTRACK_V4.get(key) }.filter(live).copied() {
        // Towards the client: the quote was sent to the backend; it must show the frontend.
        let frontend = unsafe { REV_NAT_V4.get(entry.rev_nat_id) }?;
        let mut translation = Translation {
            inner_src,
            inner_dst: (frontend.address, frontend.port),
            outer_src: frontend.address,
            outer_dst: address(&error.outer, DST),
        };
        if entry.flags & CT_SNAT != 0 {
            translation.inner_src = (entry.nat_address, entry.nat_port);
            translation.outer_dst = entry.nat_address;
        }
        return Some(translation);
    }
    key.direction = CT_FORWARD;
    let entry = unsafe { CONNTRACK_V4.get(key) }.filter(live).copied()?;
    // Towards the backend: the quote came from the frontend; it must show the backend.
    let backend = unsafe { BACKENDS_V4.get(entry.backend_id) }?;
    let mut translation = Translation {
        inner_src: (backend.address, backend.port),
        inner_dst,
        outer_src: address(&error.outer, SRC),
        outer_dst: backend.address,
    };
    if entry.flags & CT_SNAT != 0 {
        translation.inner_dst = (entry.nat_address, entry.nat_port);
        translation.outer_src = entry.nat_address;
    }
    Some(translation)
}

#[inline(always)]
fn rewrite(ctx: &TcContext, error: &IcmpError, to: &Translation) -> Result<(), i64> {
    let mut outer = error.outer;
    let mut outer_delta = Delta::default();
    outer_delta.replace_address(&mut outer, SRC, to.outer_src);
    outer_delta.replace_address(&mut outer, DST, to.outer_dst);
    let outer_check = outer_delta.applied_to(half(&outer, CHECK));
    outer[CHECK..CHECK + 2].copy_from_slice(&outer_check.to_ne_bytes());

    let mut quote = error.quote;
    let mut addresses = Delta::default();
    addresses.replace_address(&mut quote, SRC, to.inner_src.0);
    addresses.replace_address(&mut quote, DST, to.inner_dst.0);
    let mut ports = Delta::default();
    ports.replace_half(&mut quote, SRC_PORT, to.inner_src.1);
    ports.replace_half(&mut quote, DST_PORT, to.inner_dst.1);
    // The L4 checksum covers the pseudo-header addresses and the ports. ICMP has no
    // pseudo-header: its sum changes with every field changed inside the message, the same ones
    // plus the quoted checksums.
    let l4 = Delta(addresses.0 + ports.0);
    let mut icmp = Delta(l4.0);
    let inner_check = addresses.applied_to(half(&quote, CHECK));
    icmp.replace_half(&mut quote, CHECK, inner_check);
    // UDP's zero checksum means "none" and stays zero; a computed zero is sent as 0xffff.
    let udp_check = half(&quote, UDP_CHECK);
    if quote[9] == IPPROTO_UDP && udp_check != 0 {
        let new = match l4.applied_to(udp_check) {
            0 => 0xffff,
            check => check,
        };
        icmp.replace_half(&mut quote, UDP_CHECK, new);
    }
    let quote_offset = error.icmp_offset + ICMP_LEN;
    if error.tcp_check_quoted {
        let tcp_check: u16 = ctx.load(quote_offset + QUOTED_TCP_CHECK)?;
        let new = l4.applied_to(tcp_check);
        icmp.record16(tcp_check, new);
        ctx.store(quote_offset + QUOTED_TCP_CHECK, &new, 0)?;
    }
    let icmp_check = icmp.applied_to(error.icmp_check);

    ctx.store(IPV4_OFFSET, &outer, 0)?;
    ctx.store(error.icmp_offset + ICMP_CHECK, &icmp_check, 0)?;
    ctx.store(quote_offset, &quote, 0)?;
    Ok(())
}

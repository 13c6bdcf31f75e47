//! Bounds-checked parsing of Ethernet / IPv4 / TCP|UDP headers.
//!
//! A packet is only ever rewritten when everything the rewrite touches was read successfully:
//! any header that does not fit in the packet, any fragment (the L4 header is only in the first
//! one, and rewriting that one alone would split the datagram between two hosts), an IHL below
//! the minimum or a total length that does not cover the L4 header all make [`parse`] return
//! `None`, and the caller passes the packet untouched.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};
use service_common::{IPPROTO_TCP, IPPROTO_UDP};

/// Where the fields the NAT touches sit in the packet, and their values (network byte order).
pub struct Ipv4Flow {
    pub src_address: u32,
    pub dst_address: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    /// TCP's flags byte (FIN, SYN, RST, ...); 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the L4 header: the IPv4 header may carry options.
    pub l4_offset: usize,
}

/// TCP flags, in [`Ipv4Flow::tcp_flags`].
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// Where the flags byte sits in the TCP header.
const TCP_FLAGS: usize = 13;

pub const IPV4_OFFSET: usize = EthHdr::LEN;
/// Offsets inside the IPv4 header.
pub const IPV4_CHECK: usize = IPV4_OFFSET + 10;
pub const IPV4_SRC: usize = IPV4_OFFSET + 12;
pub const IPV4_DST: usize = IPV4_OFFSET + 16;

/// More-fragments flag and fragment offset, in host order of the `frags` field.
const IPV4_MF_AND_OFFSET: u16 = 0x3fff;

/// Bounds-checked reads of a packet, whichever hook it is seen at.
pub trait Frame {
    /// The `T` at `offset`, if all of it is in the packet.
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
    fn len(&self) -> usize;
}

impl Frame for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load(offset).ok()
    }

    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        let at = xdp_pointer::<T>(self, offset)?;
        // SAFETY: `at` was bounds-checked against data_end.
        Some(unsafe { at.read_unaligned() })
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
}

/// A pointer to the `T` at `offset` of an XDP packet, if all of it is in the packet. The check
/// sits right before every access, where the verifier needs it.
#[inline(always)]
pub fn xdp_pointer<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let at = ctx.data() + offset;
    if at + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(at as *mut T)
}

#[inline(always)]
pub fn parse(ctx: &impl Frame) -> Option<Ipv4Flow> {
    let ether_type: u16 = ctx.read(12)?;
    if ether_type != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip: Ipv4Hdr = ctx.read(IPV4_OFFSET)?;
    let ihl = usize::from(ip.ihl());
    if ip.version() != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    if u16::from_be_bytes(ip.frags) & IPV4_MF_AND_OFFSET != 0 {
        return None;
    }
    let l4_header_len = match ip.proto {
        IPPROTO_TCP => TcpHdr::LEN,
        IPPROTO_UDP => UdpHdr::LEN,
        _ => return None,
    };
    if usize::from(u16::from_be_bytes(ip.tot_len)) < ihl + l4_header_len {
        return None;
    }
    let l4_offset = IPV4_OFFSET + ihl;
    // The whole L4 header, checksum included, must be in the packet, not just the ports.
    if ctx.len() < l4_offset + l4_header_len {
        return None;
    }
    let ports: [u16; 2] = ctx.read(l4_offset)?;
    let tcp_flags = if ip.proto == IPPROTO_TCP {
        ctx.read(l4_offset + TCP_FLAGS)?
    } else {
        0
    };
    Some(Ipv4Flow {
        src_address: u32::from_ne_bytes(ip.src_addr),
        dst_address: u32::from_ne_bytes(ip.dst_addr),
        src_port: ports[0],
        dst_port: ports[1],
        protocol: ip.proto,
        tcp_flags,
        l4_offset,
    })
}

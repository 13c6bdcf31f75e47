//! Hand-built Ethernet/IPv4/TCP|UDP packets with correct checksums, and a checker, for the
//! BPF_PROG_TEST_RUN fixtures. Built field by field (not captured) so each fixture states exactly
//! what it feeds the program and what must come out.

use std::net::Ipv4Addr;

pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// The frames' MAC addresses: every [`Packet`] goes from `SENDER_MAC` to `RECEIVER_MAC`.
pub const RECEIVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];

#[derive(Clone, Debug)]
pub struct Packet {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub protocol: u8,
    /// IPv4 options, a multiple of 4 bytes.
    pub ip_options: Vec<u8>,
    /// The IPv4 flags+fragment offset field (host order), e.g. 0x2000 for "more fragments".
    pub fragment: u16,
    pub payload: Vec<u8>,
    /// UDP only: send a zero ("no checksum") checksum.
    pub udp_without_checksum: bool,
    /// TCP only: the flags byte (SYN by default).
    pub tcp_flags: u8,
}

/// TCP flags for [`Packet::tcp_flags`].
pub const TCP_SYN: u8 = 0x02;
pub const TCP_SYN_ACK: u8 = 0x12;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN_ACK: u8 = 0x11;
pub const TCP_RST: u8 = 0x04;

impl Packet {
    pub fn new(protocol: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self {
            src,
            dst,
            protocol,
            ip_options: Vec::new(),
            fragment: 0,
            payload: b"hello".to_vec(),
            udp_without_checksum: false,
            tcp_flags: TCP_SYN,
        }
    }

    pub fn with_src(&self, src: (Ipv4Addr, u16)) -> Self {
        Self {
            src,
            ..self.clone()
        }
    }

    pub fn with_dst(&self, dst: (Ipv4Addr, u16)) -> Self {
        Self {
            dst,
            ..self.clone()
        }
    }

    pub fn with_tcp_flags(&self, tcp_flags: u8) -> Self {
        Self {
            tcp_flags,
            ..self.clone()
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut l4 = match self.protocol {
            TCP => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&self.src.1.to_be_bytes());
                h[2..4].copy_from_slice(&self.dst.1.to_be_bytes());
                h[4..8].copy_from_slice(&1000u32.to_be_bytes()); // seq
                h[12] = 5 << 4; // data offset
                h[13] = self.tcp_flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            UDP => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&self.src.1.to_be_bytes());
                h[2..4].copy_from_slice(&self.dst.1.to_be_bytes());
                let len = (8 + self.payload.len()) as u16;
                h[4..6].copy_from_slice(&len.to_be_bytes());
                h
            }
            other => panic!("no builder for protocol {other}"),
        };
        l4.extend_from_slice(&self.payload);
        let checksum_at = if self.protocol == TCP { 16 } else { 6 };
        if !(self.protocol == UDP && self.udp_without_checksum) {
            let mut sum = l4_checksum(self.src.0, self.dst.0, self.protocol, &l4);
            if self.protocol == UDP && sum == 0 {
                sum = 0xffff;
            }
            l4[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
        }

        let ihl = 20 + self.ip_options.len();
        assert_eq!(ihl % 4, 0, "IP options must fill whole words");
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.fragment.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.protocol;
        ip[12..16].copy_from_slice(&self.src.0.octets());
        ip[16..20].copy_from_slice(&self.dst.0.octets());
        ip.extend_from_slice(&self.ip_options);
        let sum = internet_checksum(&ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());

        let mut frame = ethernet(RECEIVER_MAC, SENDER_MAC);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }
}

fn ethernet(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ETHERTYPE_IPV4);
    frame
}

/// The answer a host sends back for `offending` (an option-less packet) when nothing listens on
/// its port: an ICMP destination unreachable / port unreachable (RFC 792, RFC 1122 3.2.2.1)
/// from the address the sender wrote to, back to the sender, in a frame with the MACs swapped.
/// It quotes the offending IPv4 header and the first 8 bytes of its L4 header.
pub fn icmp_port_unreachable(offending: &Packet) -> Vec<u8> {
    assert!(
        offending.ip_options.is_empty(),
        "the quote is sized for a 20-byte IPv4 header"
    );
    let original = offending.bytes();
    let mut frame = ethernet(SENDER_MAC, RECEIVER_MAC);
    frame.extend_from_slice(&ipv4_icmp(
        offending.dst.0,
        offending.src.0,
        Icmp::PORT_UNREACHABLE,
        &original[14..14 + 20 + 8],
    ));
    frame
}

/// An ICMP message's type, code and the 4 bytes after its checksum (unused, or e.g. the next-hop
/// MTU of a frag-needed error).
#[derive(Clone, Copy, Debug)]
pub struct Icmp {
    pub icmp_type: u8,
    pub code: u8,
    pub rest: [u8; 4],
}

impl Icmp {
    pub const PORT_UNREACHABLE: Self = Self {
        icmp_type: 3,
        code: 3,
        rest: [0; 4],
    };
    pub const TTL_EXCEEDED: Self = Self {
        icmp_type: 11,
        code: 0,
        rest: [0; 4],
    };
    pub const ECHO_REQUEST: Self = Self {
        icmp_type: 8,
        code: 0,
        rest: [0x12, 0x34, 0, 1], // identifier, sequence number
    };

    /// Fragmentation needed (type 3 code 4) with the next hop's MTU (RFC 1191).
    pub fn fragmentation_needed(mtu: u16) -> Self {
        let mtu = mtu.to_be_bytes();
        Self {
            icmp_type: 3,
            code: 4,
            rest: [0, 0, mtu[0], mtu[1]],
        }
    }
}

/// A frame from `SENDER_MAC` to `RECEIVER_MAC` carrying the ICMP message `icmp` from `src` to
/// `dst`, with `body` after the ICMP header: for an error, the quoted packet (from its IPv4
/// header on, cut wherever the test wants).
pub fn icmp_frame(src: Ipv4Addr, dst: Ipv4Addr, icmp: Icmp, body: &[u8]) -> Vec<u8> {
    let mut frame = ethernet(RECEIVER_MAC, SENDER_MAC);
    frame.extend_from_slice(&ipv4_icmp(src, dst, icmp, body));
    frame
}

fn ipv4_icmp(src: Ipv4Addr, dst: Ipv4Addr, icmp: Icmp, body: &[u8]) -> Vec<u8> {
    let mut message = vec![icmp.icmp_type, icmp.code, 0, 0];
    message.extend_from_slice(&icmp.rest);
    message.extend_from_slice(body);
    let sum = internet_checksum(&message, 0);
    message[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + message.len()) as u16).to_be_bytes());
    ip[8] = 64; // TTL; id, flags and fragment offset stay 0
    ip[9] = ICMP;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = internet_checksum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&message);
    ip
}

/// The (source, destination) addresses and ports of an Ethernet/IPv4/TCP|UDP frame.
pub fn flow_of(frame: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let ip = &frame[14..];
    let l4 = &ip[usize::from(ip[0] & 0x0f) * 4..];
    (
        (
            Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            u16::from_be_bytes([l4[0], l4[1]]),
        ),
        (
            Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
    )
}

/// RFC 1071 one's-complement sum, folded and inverted, over `data` plus an initial sum.
fn internet_checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    let pseudo_sum = u32::from(!internet_checksum(&pseudo, 0));
    internet_checksum(segment, pseudo_sum)
}

/// Checks an Ethernet/IPv4/TCP|UDP frame's IPv4 and L4 checksums; panics with the reason.
pub fn assert_checksums_valid(frame: &[u8]) {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    assert_eq!(
        internet_checksum(&ip[..ihl], 0),
        0,
        "IPv4 header checksum is wrong"
    );
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let segment = &ip[ihl..total];
    if ip[9] == UDP && segment[6..8] == [0, 0] {
        return; // "no checksum"
    }
    assert_eq!(
        l4_checksum(src, dst, ip[9], segment),
        0,
        "L4 checksum is wrong"
    );
}

/// Checks an Ethernet/IPv4/ICMP frame's IPv4 and ICMP checksums (the ICMP one covers the whole
/// ICMP message, quote included); panics with the reason.
pub fn assert_icmp_checksums_valid(frame: &[u8]) {
    let ip = &frame[14..];
    assert_eq!(ip[9], ICMP, "not an ICMP packet");
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    assert_eq!(
        internet_checksum(&ip[..ihl], 0),
        0,
        "IPv4 header checksum is wrong"
    );
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(
        internet_checksum(&ip[ihl..total], 0),
        0,
        "ICMP checksum is wrong"
    );
}

/// Checks an ICMP error frame's checksums: the outer IPv4 header, the ICMP message, the quoted
/// IPv4 header, and the quoted TCP or UDP checksum when the whole segment is quoted (only then
/// can it be verified); panics with the reason.
pub fn assert_icmp_error_checksums_valid(frame: &[u8]) {
    assert_icmp_checksums_valid(frame);
    let outer_ihl = usize::from(frame[14] & 0x0f) * 4;
    let quote = &frame[14 + outer_ihl + 8..];
    let ihl = usize::from(quote[0] & 0x0f) * 4;
    assert_eq!(
        internet_checksum(&quote[..ihl], 0),
        0,
        "quoted IPv4 header checksum is wrong"
    );
    let total = usize::from(u16::from_be_bytes([quote[2], quote[3]]));
    if quote.len() < total {
        return; // the segment is cut: its checksum cannot be checked
    }
    let src = Ipv4Addr::new(quote[12], quote[13], quote[14], quote[15]);
    let dst = Ipv4Addr::new(quote[16], quote[17], quote[18], quote[19]);
    let segment = &quote[ihl..total];
    if quote[9] == UDP && segment[6..8] == [0, 0] {
        return; // "no checksum"
    }
    assert_eq!(
        l4_checksum(src, dst, quote[9], segment),
        0,
        "quoted L4 checksum is wrong"
    );
}

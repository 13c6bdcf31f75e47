//! Keys and values of the BPF maps, shared by the kernel programs (`service-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding fields so that the kernel and userspace agree on
//! every byte (the kernel hashes keys bytewise: an uninitialised padding byte would make two equal
//! keys differ). Addresses and ports are kept in network byte order, exactly as they sit in the
//! packet, so the per-packet path never converts them.
//!
//! The maps are per address family: the `V4` types have IPv6 siblings to come, as in Cilium's
//! lb4_*/lb6_* maps; the family-independent [`ServiceEntry`] serves both.
#![no_std]

/// IANA protocol numbers, as the IPv4 `protocol` field carries them.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Map names: the kernel object's symbols and the file names under the agent's pin directory.
pub const SERVICES_V4_MAP: &str = "SERVICES_V4";
pub const FRONTEND_ADDRESSES_V4_MAP: &str = "FRONTEND_ADDRESSES_V4";
pub const BACKENDS_V4_MAP: &str = "BACKENDS_V4";
pub const REV_NAT_V4_MAP: &str = "REV_NAT_V4";
pub const CONNTRACK_V4_MAP: &str = "CONNTRACK_V4";
pub const NODE_V4_MAP: &str = "NODE_V4";
pub const SOCKET_REV_NAT_V4_MAP: &str = "SOCKET_REV_NAT_V4";
pub const XDP_EGRESS_MAP: &str = "XDP_EGRESS";
pub const ID_WATERMARKS_MAP: &str = "ID_WATERMARKS";

/// Every map of the object, all pinned under the layout directory: whatever the datapath reads
/// must outlive the agent.
pub const ALL_MAPS: [&str; 9] = [
    SERVICES_V4_MAP,
    FRONTEND_ADDRESSES_V4_MAP,
    BACKENDS_V4_MAP,
    REV_NAT_V4_MAP,
    CONNTRACK_V4_MAP,
    NODE_V4_MAP,
    SOCKET_REV_NAT_V4_MAP,
    XDP_EGRESS_MAP,
    ID_WATERMARKS_MAP,
];

/// The subdirectory of the agent's pin directory that holds its maps, named after their layout:
/// aya does not check a reused pin's key or value size, so a layout change moves to a new
/// directory rather than reuse old maps. Bump it whenever a pinned map's types change.
pub const PIN_LAYOUT: &str = "v6";

/// Capacities: 100,000 service ports with 4 slots on average (slot 0 and 3 backends), as many
/// distinct backends as a 100,000-pod cluster has, one rev-NAT entry per service port.
pub const SERVICES_V4_MAX_ENTRIES: u32 = 524_288;
pub const BACKENDS_V4_MAX_ENTRIES: u32 = 262_144;
pub const REV_NAT_V4_MAX_ENTRIES: u32 = 131_072;
/// Every address some frontend has: at most one per frontend.
pub const FRONTEND_ADDRESSES_V4_MAX_ENTRIES: u32 = REV_NAT_V4_MAX_ENTRIES;
pub const CONNTRACK_V4_MAX_ENTRIES: u32 = 262_144;
/// One entry per socket of the node's own processes that talks to a service (and per backend a
/// UDP socket sent to): far more than a node's processes keep open at once.
pub const SOCKET_REV_NAT_V4_MAX_ENTRIES: u32 = 131_072;
/// The links the XDP program may send translated packets out of: the external links it runs on.
pub const XDP_EGRESS_MAX_ENTRIES: u32 = 64;

/// `ID_WATERMARKS` (an array no program reads): the agent's next backend id and next rev-NAT id,
/// kept beside the maps whose entries name them, so that an id is never handed out twice while a
/// conntrack entry may still name it, across agent restarts too.
pub const ID_WATERMARK_BACKEND: u32 = 0;
pub const ID_WATERMARK_REV_NAT: u32 = 1;
pub const ID_WATERMARKS_MAX_ENTRIES: u32 = 2;

/// Key of `SERVICES_V4`: one frontend (virtual IP, port, protocol) and a slot.
///
/// Slot 0 holds the frontend's [`ServiceEntry::count`] and rev-NAT id; slots `1..=count` each hold
/// one backend id. Picking a backend is then two hash lookups, whatever the number of services
/// or endpoints (Cilium's lb4_key layout, scope included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKeyV4 {
    pub address: u32,
    pub port: u16,
    pub slot: u16,
    pub protocol: u8,
    /// [`SCOPE_DEFAULT`] or [`SCOPE_CLUSTER`].
    pub scope: u8,
    pub _pad: [u8; 2],
}

/// The slots every frontend has and the packet programs use. For a frontend with
/// [`SERVICE_LOCAL`] they hold only this node's endpoints.
pub const SCOPE_DEFAULT: u8 = 0;
/// A second set of slots that only [`SERVICE_LOCAL`] frontends have, holding every endpoint:
/// the node's own processes use it (the socket hooks), because externalTrafficPolicy governs
/// traffic entering the cluster, not the node's own connections. kube-proxy sends node-local
/// traffic to such a frontend through its Cluster chain, Cilium through its internal scope.
pub const SCOPE_CLUSTER: u8 = 1;

/// Value of `SERVICES_V4`. Which fields mean something depends on the key's slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Slots 1..: the backend at this slot (key of `BACKENDS_V4`).
    pub backend_id: u32,
    /// Slot 0: how many backend slots the frontend has. 0 means no ready endpoint.
    pub count: u16,
    /// Slot 0: `SERVICE_*` flags.
    pub flags: u16,
    /// Slot 0: key of `REV_NAT_V4`, also recorded in conntrack so replies can be translated back.
    pub rev_nat_id: u32,
}

/// The frontend is reached from outside the pod network (a node IP's nodePort, a load-balancer
/// or external IP): traffic to it that enters through an external interface is SNATed to the
/// node, unless [`SERVICE_LOCAL`] says to keep the client's address.
pub const SERVICE_EXTERNAL: u16 = 1 << 0;
/// externalTrafficPolicy Local: the slots hold only this node's endpoints, and the client's
/// address is kept. Such a frontend also has [`SCOPE_CLUSTER`] slots for the node's own processes.
pub const SERVICE_LOCAL: u16 = 1 << 1;
/// `count` is 0 only because every endpoint is on another node (policy Local): new flows are
/// dropped, as kube-proxy does, instead of refused as for a Service without endpoints.
pub const SERVICE_REMOTE_ENDPOINTS_ONLY: u16 = 1 << 2;

/// Value of `BACKENDS_V4`, keyed by a backend id the agent allocates and does not reuse while a
/// connection may still point at it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendV4 {
    pub address: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Value of `REV_NAT_V4`: the frontend a reply must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RevNatV4 {
    pub address: u32,
    pub port: u16,
    pub _pad: u16,
}

/// A conntrack entry's direction.
/// Forward: the client's packet to the frontend, keyed (client, frontend).
pub const CT_FORWARD: u8 = 0;
/// Reverse: the backend's reply, keyed (backend, client).
pub const CT_REVERSE: u8 = 1;

/// Key of `CONNTRACK_V4` (an LRU hash): a flow's 5-tuple as the packet carries it, plus direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConntrackKeyV4 {
    pub src_address: u32,
    pub dst_address: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub direction: u8,
    pub _pad: u16,
}

/// Value of `CONNTRACK_V4`: which backend a flow was given, which frontend it was for, and for
/// flows whose source is translated too ([`CT_SNAT`]) the other half of that translation.
///
/// Both entries of a flow carry its state: every packet in either direction refreshes
/// `last_seen` and the TCP flags of both (the forward entry is looked up on the way back, the
/// reverse entry on the way out), and an entry rebuilt from the other takes its state, so either
/// entry alone tells whether the flow is alive ([`conntrack_expired`]): the packet path, the SNAT
/// port allocator and the agent's collector all judge it by the same rule. The packet path
/// treats an expired entry as absent (a client's packet is balanced afresh, a reply passes
/// untranslated, an ICMP error about the flow too); the collector deletes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackEntryV4 {
    pub backend_id: u32,
    pub rev_nat_id: u32,
    /// With [`CT_SNAT`]: in a forward entry the source the flow is given (node IP and an
    /// allocated port, or the hairpin address); in a reverse entry the client's own address and
    /// port, which replies get back as destination.
    pub nat_address: u32,
    pub nat_port: u16,
    /// `CT_*` flags.
    pub flags: u16,
    /// When the flow last carried a packet, in whole seconds of the kernel's monotonic clock
    /// (`bpf_ktime_get_coarse_ns`, which is CLOCK_MONOTONIC_COARSE: the agent reads the same
    /// clock). Written at most once a second.
    pub last_seen: u32,
}

/// How long a flow may stay silent before its entries expire, by protocol and TCP state, in
/// seconds: Cilium's conntrack lifetimes by default. Written by the agent into [`NodeV4`] (its
/// `--conntrack-*-timeout` flags); a zero field means the default.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackLifetimes {
    /// TCP after the handshake (a packet without SYN was seen): 6 h.
    pub tcp_established: u32,
    /// TCP before the handshake completes (only SYNs so far): 60 s.
    pub tcp_syn: u32,
    /// TCP after FIN from both sides, or a RST: 10 s.
    pub tcp_closing: u32,
    /// UDP and anything else: 60 s.
    pub other: u32,
}

impl ConntrackLifetimes {
    pub const DEFAULT: Self = Self {
        tcp_established: 21_600,
        tcp_syn: 60,
        tcp_closing: 10,
        other: 60,
    };

    /// The lifetime of a flow of `protocol` whose entry has `flags`. A zero field (an agent that
    /// did not write it) counts as its default.
    pub const fn of(&self, protocol: u8, flags: u16) -> u32 {
        let (set, default) = if protocol != IPPROTO_TCP {
            (self.other, Self::DEFAULT.other)
        } else if flow_closed(flags) {
            (self.tcp_closing, Self::DEFAULT.tcp_closing)
        } else if flags & CT_SEEN_NON_SYN != 0 {
            (self.tcp_established, Self::DEFAULT.tcp_established)
        } else {
            (self.tcp_syn, Self::DEFAULT.tcp_syn)
        };
        // Ages are compared as i32 (see conntrack_expired): a longer lifetime would wrap.
        let lifetime = if set == 0 { default } else { set };
        if lifetime > i32::MAX as u32 {
            i32::MAX as u32
        } else {
            lifetime
        }
    }
}

impl Default for ConntrackLifetimes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Whether `entry` (of a flow of `protocol`) has outlived its lifetime at `now` (seconds, as
/// [`ConntrackEntryV4::last_seen`]). The age is signed: another CPU may have written a
/// `last_seen` a second ahead of our clock reading, which must count as fresh, not as four
/// billion seconds old.
pub const fn conntrack_expired(
    entry: &ConntrackEntryV4,
    protocol: u8,
    now: u32,
    lifetimes: &ConntrackLifetimes,
) -> bool {
    let idle = now.wrapping_sub(entry.last_seen) as i32;
    idle > lifetimes.of(protocol, entry.flags) as i32
}

/// How long a closed flow keeps its SNAT port: both FINs seen does not mean the last ACK arrived
/// (a new SYN to a backend socket still in LAST_ACK would be answered with a challenge ACK), and
/// a late retransmission should still find its translation. One second covers a round trip
/// many times over while still letting ports turn over at a high connection rate; the closed
/// flow's entries themselves live on until their closing lifetime.
pub const CLOSED_FLOW_LINGER_SECONDS: i32 = 1;

/// Whether the flow whose reverse entry is `holder` has given its SNAT port up at `now`: its TCP
/// connection closed a little while ago, or it expired.
pub const fn snat_port_reusable(
    holder: &ConntrackEntryV4,
    protocol: u8,
    now: u32,
    lifetimes: &ConntrackLifetimes,
) -> bool {
    let idle = now.wrapping_sub(holder.last_seen) as i32;
    (flow_closed(holder.flags) && idle > CLOSED_FLOW_LINGER_SECONDS)
        || conntrack_expired(holder, protocol, now, lifetimes)
}

/// The flow's source is translated as well as its destination (see [`ConntrackEntryV4`]).
pub const CT_SNAT: u16 = 1 << 0;
/// Set when the client sent a TCP FIN, the backend sent one, or either sent a RST: a flow whose
/// TCP connection closed (both FINs, or a RST) lives [`ConntrackLifetimes::tcp_closing`] longer,
/// gives its SNAT port back after [`CLOSED_FLOW_LINGER_SECONDS`] (netfilter's NAT reuses the
/// tuples of connections in TIME_WAIT and CLOSE the same way), a new SYN on its tuple is a
/// new connection, balanced afresh, and a SYN-ACK on its tuple belongs to a connection the node
/// did not balance (one to the backend's pod IP): it is not translated, and the reverse entry
/// is deleted.
pub const CT_FIN_FROM_CLIENT: u16 = 1 << 1;
pub const CT_FIN_FROM_BACKEND: u16 = 1 << 2;
pub const CT_RESET: u16 = 1 << 3;
/// A TCP packet without SYN was seen (or started the flow, picked up mid-connection): the
/// handshake is over, the flow gets the established lifetime (Cilium's `seen_non_syn`), and a
/// bare SYN on its tuple is a new connection (the old one ended unseen), balanced afresh. Before
/// it, a SYN is a retransmission and keeps the flow's backend.
pub const CT_SEEN_NON_SYN: u16 = 1 << 4;

/// Whether a flow's entry says its TCP connection is over (both FINs, or a RST).
pub const fn flow_closed(flags: u16) -> bool {
    flags & CT_RESET != 0
        || flags & (CT_FIN_FROM_CLIENT | CT_FIN_FROM_BACKEND)
            == (CT_FIN_FROM_CLIENT | CT_FIN_FROM_BACKEND)
}

/// The source given to a pod's flow that a Service sent back to the pod itself (hairpin): a pod
/// drops packets that carry its own address as source, so it sees this link-local address
/// (Cilium's choice, 169.254.42.1) and replies to it through the node. Network byte order.
pub const HAIRPIN_ADDRESS: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

/// Source ports given to SNATed flows, 1024-29999: below Linux's default ephemeral range
/// (32768-60999), so they never collide with the node's own connections, and below Kubernetes'
/// default nodePort range (30000-32767), which a reply's destination must never look like (the
/// agent refuses a `--node-port-range` that overlaps it). The widest such range: a backend can
/// hold 28,976 flows from one node at once.
pub const SNAT_PORT_FIRST: u16 = 1_024;
pub const SNAT_PORT_COUNT: u16 = 28_976;

/// The one entry (index 0) of the `NODE_V4` array: what the kernel side knows about its node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeV4 {
    /// The address SNATed flows leave with (the first `--node-ip`); 0 = none configured, and
    /// external traffic that would need SNAT is dropped.
    pub snat_address: u32,
    /// The number of possible CPUs: a CPU takes over the SNAT port of a closed or idle flow only
    /// if the port's offset modulo `cpus` is its number, so that two CPUs never take over the
    /// same port at once.
    pub cpus: u32,
    /// The cookie of the node's network namespace (the agent's own): the socket hooks serve its
    /// sockets fully, and sockets of other namespaces (pods) only as [`NODE_SOCKET_LB_PODS`]
    /// says. 0 = not written yet.
    pub netns_cookie: u64,
    /// [`NODE_SOCKET_LB_PODS`] or 0.
    pub flags: u32,
    pub _pad: u32,
    /// How long conntrack entries live.
    pub lifetimes: ConntrackLifetimes,
}

/// The socket hooks also balance the TCP connections of other network namespaces' sockets (pods
/// in the cgroup): connect() to a ClusterIP, external or load-balancer IP, or a node IP's
/// nodePort goes straight to a backend, as Cilium's socket load balancing does by default. The
/// packets then need no translation, and the kernel picks the client's port for the real tuple
/// (two Services sharing a backend can never hand it two flows with one tuple). Loopback
/// frontends (127.0.0.1:nodePort) stay the node's own: in a pod, 127.0.0.1 is the pod. UDP stays
/// with the packet path, where a removed backend's flows are purged; a connected UDP socket would
/// keep its backend.
pub const NODE_SOCKET_LB_PODS: u32 = 1;

/// Key of `SOCKET_REV_NAT_V4` (an LRU hash): a socket of the node's own processes and the backend
/// the socket hooks sent it to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SocketRevNatKeyV4 {
    /// bpf_get_socket_cookie: unique per socket for the life of the kernel.
    pub cookie: u64,
    pub address: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Value of `SOCKET_REV_NAT_V4`: the frontend the process asked for, which recvmsg and
/// getpeername report instead of the backend. `rev_nat_id` tells whether that frontend still
/// exists: an entry whose `REV_NAT_V4[rev_nat_id]` no longer names it is stale.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketRevNatV4 {
    pub address: u32,
    pub port: u16,
    pub _pad: u16,
    pub rev_nat_id: u32,
}

// The layouts above must have no implicit padding: size = sum of fields, and the kernel side sees
// the same alignment.
const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<ServiceKeyV4>() == 12 && align_of::<ServiceKeyV4>() == 4);
    assert!(size_of::<ServiceEntry>() == 12 && align_of::<ServiceEntry>() == 4);
    assert!(size_of::<BackendV4>() == 8 && align_of::<BackendV4>() == 4);
    assert!(size_of::<RevNatV4>() == 8 && align_of::<RevNatV4>() == 4);
    assert!(size_of::<ConntrackKeyV4>() == 16 && align_of::<ConntrackKeyV4>() == 4);
    assert!(size_of::<ConntrackEntryV4>() == 20 && align_of::<ConntrackEntryV4>() == 4);
    assert!(size_of::<ConntrackLifetimes>() == 16 && align_of::<ConntrackLifetimes>() == 4);
    assert!(size_of::<NodeV4>() == 40 && align_of::<NodeV4>() == 8);
    assert!(size_of::<SocketRevNatKeyV4>() == 16 && align_of::<SocketRevNatKeyV4>() == 8);
    assert!(size_of::<SocketRevNatV4>() == 12 && align_of::<SocketRevNatV4>() == 4);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, without implicit padding (asserted above), and
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for ServiceKeyV4 {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for BackendV4 {}
    unsafe impl aya::Pod for RevNatV4 {}
    unsafe impl aya::Pod for ConntrackKeyV4 {}
    unsafe impl aya::Pod for ConntrackEntryV4 {}
    unsafe impl aya::Pod for NodeV4 {}
    unsafe impl aya::Pod for ConntrackLifetimes {}
    unsafe impl aya::Pod for SocketRevNatKeyV4 {}
    unsafe impl aya::Pod for SocketRevNatV4 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lifetime_past_what_an_age_can_hold_is_clamped_not_wrapped() {
        let lifetimes = ConntrackLifetimes {
            other: u32::MAX,
            ..ConntrackLifetimes::DEFAULT
        };
        let entry = ConntrackEntryV4 {
            last_seen: 100,
            ..ConntrackEntryV4::default()
        };
        assert!(!conntrack_expired(&entry, IPPROTO_UDP, 200, &lifetimes));
        assert_eq!(
            ConntrackLifetimes::DEFAULT.of(IPPROTO_UDP, 0),
            60,
            "a zero field is its default"
        );
        let zero = ConntrackLifetimes {
            other: 0,
            ..ConntrackLifetimes::DEFAULT
        };
        assert_eq!(zero.of(IPPROTO_UDP, 0), 60);
    }
}

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
pub const BACKENDS_V4_MAP: &str = "BACKENDS_V4";
pub const REV_NAT_V4_MAP: &str = "REV_NAT_V4";
pub const CONNTRACK_V4_MAP: &str = "CONNTRACK_V4";

/// Capacities: 100,000 service ports with 4 slots on average (slot 0 and 3 backends), as many
/// distinct backends as a 100,000-pod cluster has, one rev-NAT entry per service port.
pub const SERVICES_V4_MAX_ENTRIES: u32 = 524_288;
pub const BACKENDS_V4_MAX_ENTRIES: u32 = 262_144;
pub const REV_NAT_V4_MAX_ENTRIES: u32 = 131_072;
pub const CONNTRACK_V4_MAX_ENTRIES: u32 = 262_144;

/// Key of `SERVICES_V4`: one frontend (virtual IP, port, protocol) and a slot.
///
/// Slot 0 holds the frontend's [`ServiceEntry::count`] and rev-NAT id; slots `1..=count` each hold
/// one backend id. Picking a backend is then two hash lookups, whatever the number of services
/// or endpoints (Cilium's lb4_key layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKeyV4 {
    pub address: u32,
    pub port: u16,
    pub slot: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Value of `SERVICES_V4`. Which fields mean something depends on the key's slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Slots 1..: the backend at this slot (key of `BACKENDS_V4`).
    pub backend_id: u32,
    /// Slot 0: how many backend slots the frontend has. 0 means no ready endpoint.
    pub count: u16,
    pub _pad: u16,
    /// Slot 0: key of `REV_NAT_V4`, also recorded in conntrack so replies can be translated back.
    pub rev_nat_id: u32,
}

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

/// Value of `CONNTRACK_V4`: which backend a flow was given, and which frontend it was for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackEntryV4 {
    pub backend_id: u32,
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
    assert!(size_of::<ConntrackEntryV4>() == 8 && align_of::<ConntrackEntryV4>() == 4);
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
}

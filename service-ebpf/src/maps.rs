//! The maps, shared with the agent through `service-common` types. The agent sizes and pins them.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap},
};
use service_common::{
    BACKENDS_V4_MAX_ENTRIES, BackendV4, CONNTRACK_V4_MAX_ENTRIES, ConntrackEntryV4, ConntrackKeyV4,
    FRONTEND_ADDRESSES_V4_MAX_ENTRIES, ID_WATERMARKS_MAX_ENTRIES, NodeV4, REV_NAT_V4_MAX_ENTRIES,
    RevNatV4, SERVICES_V4_MAX_ENTRIES, SOCKET_REV_NAT_V4_MAX_ENTRIES, ServiceEntry, ServiceKeyV4,
    SocketRevNatKeyV4, SocketRevNatV4, XDP_EGRESS_MAX_ENTRIES,
};

/// Service maps are sized for 100,000 services but allocate entries as the agent writes them
/// (BPF_F_NO_PREALLOC): a node with ten services should not pin tens of megabytes of kernel memory.
/// Lookups cost the same either way; only the agent's updates allocate.
const NO_PREALLOC: u32 = 1;

#[map]
pub static SERVICES_V4: HashMap<ServiceKeyV4, ServiceEntry> =
    HashMap::with_max_entries(SERVICES_V4_MAX_ENTRIES, NO_PREALLOC);

/// The addresses of every frontend (the value means nothing): looked up before `SERVICES_V4`, so
/// that a packet to any other address (a reply to a client's port, above all) costs one lookup
/// keyed by address only, whose bucket stays in cache, rather than a miss in the large table,
/// whose cost would grow with its fill.
#[map]
pub static FRONTEND_ADDRESSES_V4: HashMap<u32, u32> =
    HashMap::with_max_entries(FRONTEND_ADDRESSES_V4_MAX_ENTRIES, NO_PREALLOC);

#[map]
pub static BACKENDS_V4: HashMap<u32, BackendV4> =
    HashMap::with_max_entries(BACKENDS_V4_MAX_ENTRIES, NO_PREALLOC);

#[map]
pub static REV_NAT_V4: HashMap<u32, RevNatV4> =
    HashMap::with_max_entries(REV_NAT_V4_MAX_ENTRIES, NO_PREALLOC);

/// LRU: a flow nobody closes (UDP, a vanished client) ages out instead of filling the table.
#[map]
pub static CONNTRACK_V4: LruHashMap<ConntrackKeyV4, ConntrackEntryV4> =
    LruHashMap::with_max_entries(CONNTRACK_V4_MAX_ENTRIES, 0);

/// One entry, written by the agent at start.
#[map]
pub static NODE_V4: Array<NodeV4> = Array::with_max_entries(1, 0);

/// LRU: a socket may have one entry per backend it sent to, which nothing can enumerate when the
/// socket closes, so the entries of closed sockets age out instead.
#[map]
pub static SOCKET_REV_NAT_V4: LruHashMap<SocketRevNatKeyV4, SocketRevNatV4> =
    LruHashMap::with_max_entries(SOCKET_REV_NAT_V4_MAX_ENTRIES, 0);

/// The links `external_xdp` may redirect to, by ifindex (the agent adds each external link it
/// attached XDP to). A translated packet routed out of any other link is passed to the stack.
#[map]
pub static XDP_EGRESS: DevMapHash = DevMapHash::with_max_entries(XDP_EGRESS_MAX_ENTRIES, 0);

/// The agent's id high-water marks (see `service_common::ID_WATERMARK_BACKEND`). No program
/// reads it: it is here so that the loader creates and pins it beside the maps whose entries
/// name the ids, and it lives exactly as long as they do.
#[map]
pub static ID_WATERMARKS: Array<u32> = Array::with_max_entries(ID_WATERMARKS_MAX_ENTRIES, 0);

//! The maps, shared with the agent through `service-common` types. The agent sizes and pins them.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
};
use service_common::{
    BACKENDS_V4_MAX_ENTRIES, BackendV4, CONNTRACK_V4_MAX_ENTRIES, ConntrackEntryV4, ConntrackKeyV4,
    REV_NAT_V4_MAX_ENTRIES, RevNatV4, SERVICES_V4_MAX_ENTRIES, ServiceEntry, ServiceKeyV4,
};

#[map]
pub static SERVICES_V4: HashMap<ServiceKeyV4, ServiceEntry> =
    HashMap::with_max_entries(SERVICES_V4_MAX_ENTRIES, 0);

#[map]
pub static BACKENDS_V4: HashMap<u32, BackendV4> =
    HashMap::with_max_entries(BACKENDS_V4_MAX_ENTRIES, 0);

#[map]
pub static REV_NAT_V4: HashMap<u32, RevNatV4> =
    HashMap::with_max_entries(REV_NAT_V4_MAX_ENTRIES, 0);

/// LRU: a flow nobody closes (UDP, a vanished client) ages out instead of filling the table.
#[map]
pub static CONNTRACK_V4: LruHashMap<ConntrackKeyV4, ConntrackEntryV4> =
    LruHashMap::with_max_entries(CONNTRACK_V4_MAX_ENTRIES, 0);

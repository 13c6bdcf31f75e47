//! Packets to a frontend: keep the flow's backend if it still exists, else pick one at random
//! among the frontend's slots and record the flow, then rewrite.

use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_get_smp_processor_id},
    programs::TcContext,
};
use service_common::{
    BackendV4, CT_FIN_FROM_CLIENT, CT_FORWARD, CT_SNAT, ConntrackEntryV4, ConntrackKeyV4,
    ConntrackLifetimes, HAIRPIN_ADDRESS, NodeV4, SCOPE_DEFAULT, SERVICE_LOCAL,
    SERVICE_REMOTE_ENDPOINTS_ONLY, SNAT_PORT_COUNT, SNAT_PORT_FIRST, ServiceEntry, ServiceKeyV4,
    snat_port_reusable,
};

use crate::{
    Origin, backend, conntrack,
    maps::{BACKENDS_V4, CONNTRACK_V4, FRONTEND_ADDRESSES_V4, NODE_V4, SERVICES_V4},
    nat::{self, End},
    packet::Ipv4Flow,
    reject,
};

/// How many times a new SNATed flow draws source ports (two per draw: one anywhere, one in its
/// CPU's share) before it gives up (Cilium's SNAT_COLLISION_RETRIES is of the same order): with
/// 28,976 ports per backend, and the ports of closed or idle flows free again, the chance that
/// all of them hit live flows stays negligible until a single backend holds most of its ports in
/// live flows from this node.
const SNAT_PROBES: u32 = 16;

/// What becomes of a packet to a frontend.
pub enum Decision {
    /// To this backend, from the entry's source if it has [`CT_SNAT`].
    To(BackendV4, ConntrackEntryV4),
    /// No endpoint at all: tell the client at once (kube-proxy's REJECT).
    Refuse,
    /// Endpoints exist, but none may take this flow here (policy Local), or no source port
    /// was free.
    Drop,
}

/// The frontend `flow` is addressed to, if any: the address-only `FRONTEND_ADDRESSES_V4` first,
/// then `SERVICES_V4` (see the first map's comment).
#[inline(always)]
pub fn frontend_of(flow: &Ipv4Flow) -> Option<(ServiceKeyV4, &'static ServiceEntry)> {
    // SAFETY: map values are plain data; a concurrent update can at worst give a stale value.
    unsafe { FRONTEND_ADDRESSES_V4.get(flow.dst_address) }?;
    let frontend = frontend_key(flow);
    let service = unsafe { SERVICES_V4.get(frontend) }?;
    Some((frontend, service))
}

/// The frontend key a packet is looked up by.
#[inline(always)]
fn frontend_key(flow: &Ipv4Flow) -> ServiceKeyV4 {
    ServiceKeyV4 {
        address: flow.dst_address,
        port: flow.dst_port,
        slot: 0,
        protocol: flow.protocol,
        scope: SCOPE_DEFAULT,
        _pad: [0; 2],
    }
}

/// Follows a tracked flow, or balances and records a new one.
#[inline(always)]
pub fn decide(
    flow: &Ipv4Flow,
    origin: Origin,
    frontend: &ServiceKeyV4,
    service: &ServiceEntry,
) -> Decision {
    let forward_key = conntrack::key_of(flow, CT_FORWARD);
    // Read once: the lifetimes judge a tracked flow, the SNAT address serves a new one.
    let node = NODE_V4.get(0);
    let lifetimes = node.map_or(ConntrackLifetimes::DEFAULT, |node| node.lifetimes);
    let now = conntrack::now_seconds();
    match tracked_flow(flow, &forward_key, now, &lifetimes) {
        Some((backend, entry)) => Decision::To(backend, entry),
        None => new_flow(flow, origin, frontend, service, &forward_key, node, now),
    }
}

/// The TC side: rewrites the packet as [`decide`] says.
#[inline(always)]
pub fn to_frontend(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    origin: Origin,
    frontend: &ServiceKeyV4,
    service: &ServiceEntry,
) -> i32 {
    let (backend, entry) = match decide(flow, origin, frontend, service) {
        Decision::To(backend, entry) => (backend, entry),
        Decision::Refuse => return reject::port_unreachable(ctx, flow),
        Decision::Drop => return TC_ACT_SHOT,
    };
    if nat::rewrite(ctx, flow, End::Destination, backend.address, backend.port).is_err() {
        return TC_ACT_SHOT;
    }
    if entry.flags & CT_SNAT != 0
        && nat::rewrite(ctx, flow, End::Source, entry.nat_address, entry.nat_port).is_err()
    {
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

/// The backend and entry of the flow `forward_key` tracks, if it may go on, with `flow` recorded
/// in both its entries. Otherwise the forward entry is forgotten, and `flow` balanced as a new
/// flow:
/// - the flow expired, or a bare SYN reuses its tuple for a new connection
///   ([`conntrack::starts_anew`]). Its reverse entry is left to its own lifetime: a closed
///   flow's keeps its SNAT port from reuse for a moment (`CLOSED_FLOW_LINGER_SECONDS`);
/// - its backend was removed: re-balanced rather than sent to a dead address, this is what
///   keeps UDP flows alive across a server pod's restart (kube-proxy's stale conntrack);
/// - its SNAT port went to another flow while its reverse entry was evicted.
#[inline(always)]
fn tracked_flow(
    flow: &Ipv4Flow,
    forward_key: &ConntrackKeyV4,
    now: u32,
    lifetimes: &ConntrackLifetimes,
) -> Option<(BackendV4, ConntrackEntryV4)> {
    // SAFETY: a map value; a concurrent update can at worst give a stale value.
    let forward = unsafe { &mut *CONNTRACK_V4.get_ptr_mut(forward_key)? };
    if !conntrack::starts_anew(forward, flow, now, lifetimes) {
        conntrack::note(forward, now, conntrack::flags_of(flow, CT_FIN_FROM_CLIENT));
        let entry = *forward;
        // SAFETY: as above.
        if let Some(backend) = unsafe { BACKENDS_V4.get(entry.backend_id) }
            && conntrack::restore_reverse(flow, backend, &entry, now)
        {
            return Some((*backend, entry));
        }
    }
    let _ = CONNTRACK_V4.remove(forward_key);
    None
}

#[inline(always)]
fn new_flow(
    flow: &Ipv4Flow,
    origin: Origin,
    frontend: &ServiceKeyV4,
    service: &ServiceEntry,
    forward_key: &ConntrackKeyV4,
    node: Option<&'static NodeV4>,
    now: u32,
) -> Decision {
    if service.count == 0 {
        return if service.flags & SERVICE_REMOTE_ENDPOINTS_ONLY != 0 {
            Decision::Drop
        } else {
            Decision::Refuse
        };
    }
    let random = unsafe { bpf_get_prandom_u32() };
    // A slot caught mid-update: drop, the client retransmits.
    let Some((backend_id, backend)) = backend::choose(frontend, service.count, random) else {
        return Decision::Drop;
    };
    // The first packet's state: a flow picked up mid-connection (its entries were lost) is
    // established at once.
    let mut forward = ConntrackEntryV4 {
        backend_id,
        rev_nat_id: service.rev_nat_id,
        flags: conntrack::flags_of(flow, CT_FIN_FROM_CLIENT),
        last_seen: now,
        ..ConntrackEntryV4::default()
    };
    let hairpin = backend.address == flow.src_address;
    let node_snat = origin == Origin::External && service.flags & SERVICE_LOCAL == 0;
    if hairpin {
        // Replies go to the hairpin address; the pod's own port stays: the backend tuple
        // already tells its flows apart.
        forward.flags |= CT_SNAT;
        forward.nat_address = HAIRPIN_ADDRESS;
        forward.nat_port = flow.src_port;
    } else if node_snat {
        let Some(node) = node.filter(|node| node.snat_address != 0) else {
            return Decision::Drop;
        };
        forward.flags |= CT_SNAT;
        forward.nat_address = node.snat_address;
        let Some(port) = claim_snat_port(flow, &backend, &mut forward, node, now) else {
            return Decision::Drop;
        };
        forward.nat_port = port;
        return record_forward(forward_key, backend, forward, || {
            // Our claim is of no use: free the port.
            let (reverse_key, _) = conntrack::reverse_of(flow, &backend, &forward, now);
            let _ = CONNTRACK_V4.remove(reverse_key);
        });
    }
    // Reverse first: once the forward entry exists, replies must already be translatable. A full
    // LRU evicts rather than fails, so an error here is not worth dropping the packet for.
    let (reverse_key, reverse) = conntrack::reverse_of(flow, &backend, &forward, now);
    let _ = CONNTRACK_V4.insert(reverse_key, reverse, 0);
    // Another CPU may have recorded the flow meanwhile (a retransmitted first packet): its entry
    // wins, and the reverse entry just written is either the same or an unused one that ages out.
    record_forward(forward_key, backend, forward, || {})
}

/// Records a new flow's forward entry unless another CPU recorded the same flow first, in which
/// case that flow's backend and translation are the ones to use (after `lost`).
#[inline(always)]
fn record_forward(
    forward_key: &ConntrackKeyV4,
    backend: BackendV4,
    forward: ConntrackEntryV4,
    lost: impl FnOnce(),
) -> Decision {
    if CONNTRACK_V4
        .insert(forward_key, forward, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return Decision::To(backend, forward);
    }
    lost();
    // SAFETY: map values are plain data; a concurrent update can at worst give a stale value.
    let Some(winner) = (unsafe { CONNTRACK_V4.get(forward_key) }).copied() else {
        return Decision::Drop;
    };
    match unsafe { BACKENDS_V4.get(winner.backend_id) } {
        Some(backend) => Decision::To(*backend, winner),
        None => Decision::Drop,
    }
}

/// Finds a source port for a SNATed flow that no live flow to the same backend uses, and claims
/// it by writing the flow's reverse entry. Each probe tries a random port of the whole range,
/// free when no entry holds it: the insert with BPF_NOEXIST succeeds for one CPU only, whoever
/// comes first. Then a random port of this CPU's own share (offset modulo `cpus` = its number),
/// free as well when its flow gave it up (`snat_port_reusable`): the TCP connection closed (FIN
/// both ways, or RST), as netfilter reuses the tuples of connections in TIME_WAIT, or the flow
/// expired. Taking such a port over is a lookup and an overwrite, which two CPUs could both do
/// at once for one port: the shares keep them apart. Every insert is preceded by a
/// lookup, because an LRU insert takes a free node, evicting some other entry when the map is
/// full, even when it then fails. Returns the port in network byte order.
#[inline(always)]
fn claim_snat_port(
    flow: &Ipv4Flow,
    backend: &BackendV4,
    forward: &mut ConntrackEntryV4,
    node: &NodeV4,
    now: u32,
) -> Option<u16> {
    let cpus = node.cpus.max(1);
    let cpu = unsafe { bpf_get_smp_processor_id() } % cpus;
    // The share's size: the offsets below SNAT_PORT_COUNT that are `cpu` modulo `cpus`.
    let share = (u32::from(SNAT_PORT_COUNT) + cpus - 1 - cpu) / cpus;
    if share == 0 {
        return None;
    }
    for _ in 0..SNAT_PROBES {
        let anywhere = unsafe { bpf_get_prandom_u32() } % u32::from(SNAT_PORT_COUNT);
        let own = cpu + cpus * (unsafe { bpf_get_prandom_u32() } % share);
        for (offset, may_take_over) in [(anywhere, false), (own, true)] {
            forward.nat_port = (SNAT_PORT_FIRST + offset as u16).to_be();
            let (reverse_key, reverse) = conntrack::reverse_of(flow, backend, forward, now);
            // SAFETY: map values are plain data; a concurrent update can at worst give a stale
            // value.
            let claimed = match unsafe { CONNTRACK_V4.get(reverse_key) } {
                None => CONNTRACK_V4
                    .insert(reverse_key, reverse, u64::from(BPF_NOEXIST))
                    .is_ok(),
                Some(holder) => {
                    may_take_over
                        && snat_port_reusable(holder, flow.protocol, now, &node.lifetimes)
                        && CONNTRACK_V4
                            .insert(reverse_key, reverse, u64::from(BPF_EXIST))
                            .is_ok()
                }
            };
            if claimed {
                return Some(forward.nat_port);
            }
        }
    }
    None
}

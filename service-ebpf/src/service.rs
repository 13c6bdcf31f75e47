//! Packets to a frontend: keep the flow's backend if it still exists, else pick one at random
//! among the frontend's slots and record the flow, then rewrite.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use service_common::{
    BackendV4, CT_FORWARD, CT_REVERSE, CT_SNAT, ConntrackEntryV4, ConntrackKeyV4, HAIRPIN_ADDRESS,
    SERVICE_LOCAL, SERVICE_REMOTE_ENDPOINTS_ONLY, SNAT_PORT_COUNT, SNAT_PORT_FIRST, ServiceEntry,
    ServiceKeyV4,
};

use crate::{
    Origin, backend,
    maps::{BACKENDS_V4, CONNTRACK_V4, NODE_V4},
    nat::{self, End},
    packet::Ipv4Flow,
    reject,
};

/// How many random source ports a new SNATed flow tries before it gives up (Cilium's
/// SNAT_COLLISION_RETRIES is of the same order): with 4,536 ports per backend the chance that
/// all of them are taken stays negligible until a single backend holds thousands of flows from
/// this node.
const SNAT_PROBES: u32 = 16;

/// What becomes of a new flow.
enum NewFlow {
    To(BackendV4, ConntrackEntryV4),
    /// No endpoint at all: tell the client at once (kube-proxy's REJECT).
    Refuse,
    /// Endpoints exist, but none may take this flow here (policy Local), or no source port
    /// was free.
    Drop,
}

#[inline(always)]
pub fn to_frontend(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    origin: Origin,
    frontend: ServiceKeyV4,
    service: ServiceEntry,
) -> i32 {
    let forward_key = ConntrackKeyV4 {
        src_address: flow.src_address,
        dst_address: flow.dst_address,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        protocol: flow.protocol,
        direction: CT_FORWARD,
        _pad: 0,
    };
    // A flow whose backend was removed is re-balanced rather than sent to a dead address: this
    // is what keeps UDP flows alive across a server pod's restart (kube-proxy's stale conntrack).
    let tracked = unsafe { CONNTRACK_V4.get(forward_key) }.and_then(|entry| {
        unsafe { BACKENDS_V4.get(entry.backend_id) }.map(|backend| (*backend, *entry))
    });
    let (backend, entry) = match tracked {
        Some(tracked) => tracked,
        None => match new_flow(flow, origin, &frontend, &service, &forward_key) {
            NewFlow::To(backend, entry) => (backend, entry),
            NewFlow::Refuse => return reject::port_unreachable(ctx, flow),
            NewFlow::Drop => return TC_ACT_SHOT,
        },
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

#[inline(always)]
fn new_flow(
    flow: &Ipv4Flow,
    origin: Origin,
    frontend: &ServiceKeyV4,
    service: &ServiceEntry,
    forward_key: &ConntrackKeyV4,
) -> NewFlow {
    if service.count == 0 {
        return if service.flags & SERVICE_REMOTE_ENDPOINTS_ONLY != 0 {
            NewFlow::Drop
        } else {
            NewFlow::Refuse
        };
    }
    let random = unsafe { bpf_get_prandom_u32() };
    // A slot caught mid-update: drop, the client retransmits.
    let Some((backend_id, backend)) = backend::choose(frontend, service.count, random) else {
        return NewFlow::Drop;
    };
    let mut forward = ConntrackEntryV4 {
        backend_id,
        rev_nat_id: service.rev_nat_id,
        ..ConntrackEntryV4::default()
    };
    let mut reverse = forward;
    let mut reverse_key = ConntrackKeyV4 {
        src_address: backend.address,
        dst_address: flow.src_address,
        src_port: backend.port,
        dst_port: flow.src_port,
        protocol: flow.protocol,
        direction: CT_REVERSE,
        _pad: 0,
    };
    let hairpin = backend.address == flow.src_address;
    let node_snat = origin == Origin::External && service.flags & SERVICE_LOCAL == 0;
    if hairpin || node_snat {
        // Replies go to the translated source; the reverse entry remembers the real client.
        reverse.flags = CT_SNAT;
        reverse.nat_address = flow.src_address;
        reverse.nat_port = flow.src_port;
        forward.flags = CT_SNAT;
    }
    if hairpin {
        // The pod's own port stays: the backend tuple already tells its flows apart.
        forward.nat_address = HAIRPIN_ADDRESS;
        forward.nat_port = flow.src_port;
        reverse_key.dst_address = HAIRPIN_ADDRESS;
    } else if node_snat {
        let Some(snat_address) = NODE_V4
            .get(0)
            .map(|node| node.snat_address)
            .filter(|address| *address != 0)
        else {
            return NewFlow::Drop;
        };
        reverse_key.dst_address = snat_address;
        forward.nat_address = snat_address;
        let Some(port) = claim_snat_port(&mut reverse_key, &reverse) else {
            return NewFlow::Drop;
        };
        forward.nat_port = port;
        let _ = CONNTRACK_V4.insert(forward_key, forward, 0);
        return NewFlow::To(backend, forward);
    }
    // Reverse first: once the forward entry exists, replies must already be translatable. A full
    // LRU evicts rather than fails, so an error here is not worth dropping the packet for.
    let _ = CONNTRACK_V4.insert(reverse_key, reverse, 0);
    let _ = CONNTRACK_V4.insert(forward_key, forward, 0);
    NewFlow::To(backend, forward)
}

/// Finds a source port for a SNATed flow that no other flow to the same backend uses, by
/// claiming its reverse entry with BPF_NOEXIST: whoever inserts first owns the port, so two
/// clients racing on two CPUs never share a tuple. Returns the port in network byte order.
#[inline(always)]
fn claim_snat_port(reverse_key: &mut ConntrackKeyV4, reverse: &ConntrackEntryV4) -> Option<u16> {
    for _ in 0..SNAT_PROBES {
        let offset = (unsafe { bpf_get_prandom_u32() } % u32::from(SNAT_PORT_COUNT)) as u16;
        let port = (SNAT_PORT_FIRST + offset).to_be();
        reverse_key.dst_port = port;
        if CONNTRACK_V4
            .insert(*reverse_key, reverse, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some(port);
        }
    }
    None
}

//! The two conntrack entries of a translated flow, and keeping them paired.
//!
//! A flow has a forward entry (keyed by what the client sends: client -> frontend) and a reverse
//! entry (keyed by what the backend sends back: backend -> client, or backend -> node address and
//! SNAT port). Both live in one LRU map, which evicts entries one at a time: a flow whose traffic
//! is mostly one way keeps one entry fresh while the other ages out. Each is rebuilt from the
//! other when a packet finds it missing, so a live flow never loses its translation; and for a
//! SNATed flow, a reverse entry that another flow claimed in the meantime (its port looked free)
//! is detected, so that two flows never share one (backend, node port) tuple.
//!
//! The reverse entry also records how a TCP connection ends (FIN from either side, RST): the
//! SNAT port of a closed flow may be given to a new one (see `service::claim_snat_port`).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use service_common::{
    BackendV4, CT_FIN_FROM_BACKEND, CT_FIN_FROM_CLIENT, CT_FORWARD, CT_RESET, CT_REVERSE, CT_SNAT,
    ConntrackEntryV4, ConntrackKeyV4, RevNatV4, flow_closed,
};

use crate::{
    maps::CONNTRACK_V4,
    packet::{Ipv4Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The key a packet is looked up by: `CT_FORWARD` for a client's packet, `CT_REVERSE` for a
/// backend's.
#[inline(always)]
pub fn key_of(packet: &Ipv4Flow, direction: u8) -> ConntrackKeyV4 {
    ConntrackKeyV4 {
        src_address: packet.src_address,
        dst_address: packet.dst_address,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        protocol: packet.protocol,
        direction,
        _pad: 0,
    }
}

/// The reverse key and entry of the flow of `request` (a client packet), tracked as `forward`
/// towards `backend`: replies come from the backend to the flow's translated source.
#[inline(always)]
pub fn reverse_of(
    request: &Ipv4Flow,
    backend: &BackendV4,
    forward: &ConntrackEntryV4,
) -> (ConntrackKeyV4, ConntrackEntryV4) {
    let snat = forward.flags & CT_SNAT != 0;
    let key = ConntrackKeyV4 {
        src_address: backend.address,
        dst_address: if snat {
            forward.nat_address
        } else {
            request.src_address
        },
        src_port: backend.port,
        dst_port: if snat {
            forward.nat_port
        } else {
            request.src_port
        },
        protocol: request.protocol,
        direction: CT_REVERSE,
        _pad: 0,
    };
    let entry = ConntrackEntryV4 {
        backend_id: forward.backend_id,
        rev_nat_id: forward.rev_nat_id,
        nat_address: if snat { request.src_address } else { 0 },
        nat_port: if snat { request.src_port } else { 0 },
        flags: forward.flags,
        last_seen: now_seconds(),
    };
    (key, entry)
}

/// Called for a packet of a tracked flow: recreates the flow's reverse entry if it was evicted.
/// False when its key now belongs to another flow (which got this flow's SNAT port after the
/// eviction): this flow must then be balanced anew.
#[inline(always)]
pub fn restore_reverse(
    request: &Ipv4Flow,
    backend: &BackendV4,
    forward: &ConntrackEntryV4,
) -> bool {
    let (key, entry) = reverse_of(request, backend, forward);
    if CONNTRACK_V4.get_ptr_mut(key).is_none() {
        // Looked up first: an LRU insert takes a free node (evicting) even when the key exists.
        if CONNTRACK_V4
            .insert(key, entry, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return true;
        }
        // Another CPU wrote the key meanwhile: this flow restoring it too, or a new flow
        // claiming the port; the test below tells which.
    }
    let Some(found) = CONNTRACK_V4.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a map value; a concurrent update can at worst give a stale value.
    let found = unsafe { &mut *found };
    let ours = found.nat_address == entry.nat_address
        && found.nat_port == entry.nat_port
        && found.backend_id == entry.backend_id
        && found.rev_nat_id == entry.rev_nat_id;
    if ours {
        note_packet(found, request, CT_FIN_FROM_CLIENT);
    }
    ours
}

/// The kernel's monotonic clock in whole seconds, as [`ConntrackEntryV4::last_seen`] keeps it.
#[inline(always)]
pub fn now_seconds() -> u32 {
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Records in `reverse` (a flow's reverse entry) that the flow carried `packet` now, and whether
/// it is a TCP FIN (as `fin`) or a RST. A SYN of a closed flow (the client reused its port for a
/// new connection) reopens it. The clock is written once a second at most. A flag lost to a
/// concurrent write only delays the port's reuse until the idle limit.
#[inline(always)]
pub fn note_packet(reverse: &mut ConntrackEntryV4, packet: &Ipv4Flow, fin: u16) {
    let now = now_seconds();
    if reverse.last_seen != now {
        reverse.last_seen = now;
    }
    if packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && flow_closed(reverse.flags) {
        reverse.flags &= !(CT_FIN_FROM_CLIENT | CT_FIN_FROM_BACKEND | CT_RESET);
    }
    let mut closing = 0;
    if packet.tcp_flags & TCP_FIN != 0 {
        closing |= fin;
    }
    if packet.tcp_flags & TCP_RST != 0 {
        closing |= CT_RESET;
    }
    if closing != 0 && reverse.flags & closing != closing {
        reverse.flags |= closing;
    }
}

/// Called for a backend's reply that matched `reverse`, answering as `frontend`: recreates the
/// flow's forward entry if it was evicted, so that the client's next packet stays on its backend
/// (and on its SNAT port) instead of opening a new flow.
#[inline(always)]
pub fn restore_forward(reply: &Ipv4Flow, reverse: &ConntrackEntryV4, frontend: &RevNatV4) {
    let snat = reverse.flags & CT_SNAT != 0;
    let key = ConntrackKeyV4 {
        src_address: if snat {
            reverse.nat_address
        } else {
            reply.dst_address
        },
        dst_address: frontend.address,
        src_port: if snat {
            reverse.nat_port
        } else {
            reply.dst_port
        },
        dst_port: frontend.port,
        protocol: reply.protocol,
        direction: CT_FORWARD,
        _pad: 0,
    };
    // SAFETY: as above.
    if unsafe { CONNTRACK_V4.get(key) }.is_some() {
        return;
    }
    let entry = ConntrackEntryV4 {
        backend_id: reverse.backend_id,
        rev_nat_id: reverse.rev_nat_id,
        nat_address: if snat { reply.dst_address } else { 0 },
        nat_port: if snat { reply.dst_port } else { 0 },
        flags: reverse.flags & CT_SNAT,
        last_seen: 0,
    };
    let _ = CONNTRACK_V4.insert(key, entry, u64::from(BPF_NOEXIST));
}

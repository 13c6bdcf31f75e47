//! The two conntrack entries of a translated flow: keeping them paired, and keeping their state.
//!
//! A flow has a forward entry (keyed by what the client sends: client -> frontend) and a reverse
//! entry (keyed by what the backend sends back: backend -> client, or backend -> node address and
//! SNAT port). Both live in one LRU map, which evicts entries one at a time: a flow whose traffic
//! is mostly one way keeps one entry fresh while the other ages out. Each is rebuilt from the
//! other when a packet finds it missing, so a live flow never loses its translation; and for a
//! SNATed flow, a reverse entry that another flow claimed in the meantime (its port looked free)
//! is detected, so that two flows never share one (backend, node port) tuple.
//!
//! Both entries carry the flow's state: when it last carried a packet, and how far its TCP
//! connection got (handshake over, FIN from either side, RST). Every packet, in either direction,
//! writes it into both: the forward path looks the reverse entry up anyway, the reply path the
//! forward one. So whichever entry a packet finds tells whether the flow is still alive
//! ([`conntrack_expired`]), and whether a SYN on its tuple starts a new connection.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use service_common::{
    BackendV4, CT_FORWARD, CT_RESET, CT_REVERSE, CT_SEEN_NON_SYN, CT_SNAT, ConntrackEntryV4,
    ConntrackKeyV4, ConntrackLifetimes, IPPROTO_TCP, RevNatV4, conntrack_expired, flow_closed,
};

use crate::{
    maps::{CONNTRACK_V4, NODE_V4},
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

/// The kernel's monotonic clock in whole seconds, as [`ConntrackEntryV4::last_seen`] keeps it.
/// Read once per packet and handed down.
#[inline(always)]
pub fn now_seconds() -> u32 {
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// How long entries live, as the agent wrote them into `NODE_V4` (an array lookup, which the
/// verifier turns into an address computation).
#[inline(always)]
pub fn lifetimes() -> ConntrackLifetimes {
    NODE_V4
        .get(0)
        .map_or(ConntrackLifetimes::DEFAULT, |node| node.lifetimes)
}

/// The `CT_*` state flags `packet` adds to its flow, `fin` being the flag of a FIN from its
/// sender's side. None for anything but TCP.
#[inline(always)]
pub fn flags_of(packet: &Ipv4Flow, fin: u16) -> u16 {
    if packet.protocol != IPPROTO_TCP {
        return 0;
    }
    let mut flags = 0;
    if packet.tcp_flags & TCP_SYN == 0 {
        flags |= CT_SEEN_NON_SYN;
    }
    if packet.tcp_flags & TCP_FIN != 0 {
        flags |= fin;
    }
    if packet.tcp_flags & TCP_RST != 0 {
        flags |= CT_RESET;
    }
    flags
}

/// Records in one of a flow's entries that the flow carried a packet at `now`, with state
/// `flags`. Each field is written only when it changes (the clock once a second at most), so a
/// busy flow does not keep dirtying the entry's cache line on every CPU. A flag lost to a
/// concurrent write is written again from the flow's other entry by the next packet that
/// crosses both; at worst the flow keeps a longer lifetime than its state deserves.
#[inline(always)]
pub fn note(entry: &mut ConntrackEntryV4, now: u32, flags: u16) {
    if entry.last_seen != now {
        entry.last_seen = now;
    }
    if entry.flags & flags != flags {
        entry.flags |= flags;
    }
}

/// Whether the client's `packet` starts a new connection rather than continue the flow its
/// forward entry `entry` tracks: the flow expired, or the packet is a bare SYN (SYN without ACK)
/// and the flow's connection closed, or completed its handshake (the client reused the port
/// after the old connection died unseen). A SYN retransmitted before the handshake completes
/// keeps the flow.
#[inline(always)]
pub fn starts_anew(
    entry: &ConntrackEntryV4,
    packet: &Ipv4Flow,
    now: u32,
    lifetimes: &ConntrackLifetimes,
) -> bool {
    conntrack_expired(entry, packet.protocol, now, lifetimes)
        || (bare_syn(packet) && (flow_closed(entry.flags) || entry.flags & CT_SEEN_NON_SYN != 0))
}

/// Whether the backend's `packet` is no reply of the flow its reverse entry `entry` tracks: the
/// flow expired, or its connection closed and the packet opens one (a SYN-ACK: the tuple now
/// belongs to a connection this node did not balance, a direct one to the backend's pod IP).
#[inline(always)]
pub fn outlived(
    entry: &ConntrackEntryV4,
    packet: &Ipv4Flow,
    now: u32,
    lifetimes: &ConntrackLifetimes,
) -> bool {
    conntrack_expired(entry, packet.protocol, now, lifetimes)
        || (packet.protocol == IPPROTO_TCP
            && packet.tcp_flags & TCP_SYN != 0
            && flow_closed(entry.flags))
}

#[inline(always)]
fn bare_syn(packet: &Ipv4Flow) -> bool {
    packet.protocol == IPPROTO_TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The reverse key and entry of the flow of `request` (a client packet), tracked as `forward`
/// towards `backend`: replies come from the backend to the flow's translated source. The entry
/// carries the forward entry's state, seen at `now`.
#[inline(always)]
pub fn reverse_of(
    request: &Ipv4Flow,
    backend: &BackendV4,
    forward: &ConntrackEntryV4,
    now: u32,
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
        last_seen: now,
    };
    (key, entry)
}

/// Called for a packet of a tracked flow, whose forward entry `forward` already records it:
/// records it in the flow's reverse entry too, or recreates that entry if it was evicted. False
/// when its key now belongs to another flow (which got this flow's SNAT port after the
/// eviction): this flow must then be balanced anew.
#[inline(always)]
pub fn restore_reverse(
    request: &Ipv4Flow,
    backend: &BackendV4,
    forward: &ConntrackEntryV4,
    now: u32,
) -> bool {
    let (key, entry) = reverse_of(request, backend, forward, now);
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
    let ours = same_flow(found, &entry);
    if ours {
        note(found, now, forward.flags);
    }
    ours
}

/// Called for a backend's reply that matched `reverse` (which already records it), answering as
/// `frontend`: records the reply in the flow's forward entry too, or recreates that entry if it
/// was evicted, so that the client's next packet stays on its backend (and on its SNAT port)
/// instead of opening a new flow. A forward entry of another flow on the same tuple (the client
/// reused its port for a new connection, balanced afresh) is left alone.
#[inline(always)]
pub fn restore_forward(
    reply: &Ipv4Flow,
    reverse: &ConntrackEntryV4,
    frontend: &RevNatV4,
    now: u32,
) {
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
    let entry = ConntrackEntryV4 {
        backend_id: reverse.backend_id,
        rev_nat_id: reverse.rev_nat_id,
        nat_address: if snat { reply.dst_address } else { 0 },
        nat_port: if snat { reply.dst_port } else { 0 },
        flags: reverse.flags,
        last_seen: now,
    };
    match CONNTRACK_V4.get_ptr_mut(key) {
        // SAFETY: as above.
        Some(found) => {
            let found = unsafe { &mut *found };
            if same_flow(found, &entry) {
                note(found, now, reverse.flags);
            }
        }
        None => {
            let _ = CONNTRACK_V4.insert(key, entry, u64::from(BPF_NOEXIST));
        }
    }
}

/// Whether two entries of one direction and tuple stand for the same flow: the same backend and
/// frontend, and the same other half of the translation.
#[inline(always)]
fn same_flow(found: &ConntrackEntryV4, expected: &ConntrackEntryV4) -> bool {
    found.nat_address == expected.nat_address
        && found.nat_port == expected.nat_port
        && found.backend_id == expected.backend_id
        && found.rev_nat_id == expected.rev_nat_id
}

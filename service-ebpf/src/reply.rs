//! Packets that are not for a frontend: if one is a backend's reply to a translated flow, it is
//! made to come from the frontend again (and, for a SNATed flow, to go to the real client).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use service_common::{
    CT_FIN_FROM_BACKEND, CT_REVERSE, CT_SNAT, ConntrackEntryV4, NodeV4, RevNatV4,
};

use crate::{
    conntrack,
    maps::{CONNTRACK_V4, REV_NAT_V4},
    nat::{self, End},
    packet::Ipv4Flow,
};

/// The reverse entry and the frontend of the flow `flow` is a reply of, if it is one, with
/// `flow` recorded in both the flow's entries. A reverse entry that the flow outlived (expired,
/// or closed and the packet a SYN-ACK: [`conntrack::outlived`]) is deleted on the spot and the
/// packet left alone: it would otherwise rewrite the source of an unrelated connection that
/// reuses the tuple (one to the backend's pod IP, a protocol whose two ends use the same port)
/// for as long as that connection kept it fresh. `node` is `NODE_V4`'s entry if the caller read
/// it already; otherwise it is read only for a packet that hits.
#[inline(always)]
pub fn lookup(flow: &Ipv4Flow, node: Option<&NodeV4>) -> Option<(ConntrackEntryV4, RevNatV4)> {
    let reverse_key = conntrack::key_of(flow, CT_REVERSE);
    // SAFETY: a map value; a concurrent update can at worst give a stale value.
    let entry = unsafe { &mut *CONNTRACK_V4.get_ptr_mut(reverse_key)? };
    let lifetimes = match node {
        Some(node) => node.lifetimes,
        None => conntrack::lifetimes(),
    };
    let now = conntrack::now_seconds();
    if conntrack::outlived(entry, flow, now, &lifetimes) {
        let _ = CONNTRACK_V4.remove(reverse_key);
        return None;
    }
    conntrack::note(entry, now, conntrack::flags_of(flow, CT_FIN_FROM_BACKEND));
    let entry = *entry;
    // The frontend is gone (service deleted): nothing to translate to.
    let frontend = unsafe { REV_NAT_V4.get(entry.rev_nat_id) }.copied()?;
    conntrack::restore_forward(flow, &entry, &frontend, now);
    Some((entry, frontend))
}

/// The TC side: rewrites a reply as [`lookup`] found it.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    entry: &ConntrackEntryV4,
    frontend: &RevNatV4,
) -> i32 {
    if nat::rewrite(ctx, flow, End::Source, frontend.address, frontend.port).is_err() {
        return TC_ACT_SHOT;
    }
    if entry.flags & CT_SNAT != 0
        && nat::rewrite(
            ctx,
            flow,
            End::Destination,
            entry.nat_address,
            entry.nat_port,
        )
        .is_err()
    {
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

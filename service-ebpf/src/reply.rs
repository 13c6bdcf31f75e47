//! Packets that are not for a frontend: if one is a backend's reply to a translated flow, it is
//! made to come from the frontend again (and, for a SNATed flow, to go to the real client).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use service_common::{CT_FIN_FROM_BACKEND, CT_REVERSE, CT_SNAT, ConntrackEntryV4, RevNatV4};

use crate::{
    conntrack,
    maps::{CONNTRACK_V4, REV_NAT_V4},
    nat::{self, End},
    packet::Ipv4Flow,
};

/// The reverse entry and the frontend of the flow `flow` is a reply of, if it is one.
#[inline(always)]
pub fn lookup(flow: &Ipv4Flow) -> Option<(ConntrackEntryV4, RevNatV4)> {
    let reverse_key = conntrack::key_of(flow, CT_REVERSE);
    // SAFETY: a map value; a concurrent update can at worst give a stale value.
    let entry = unsafe { &mut *CONNTRACK_V4.get_ptr_mut(reverse_key)? };
    conntrack::note_packet(entry, flow, CT_FIN_FROM_BACKEND);
    let entry = *entry;
    // The frontend is gone (service deleted): nothing to translate to.
    let frontend = unsafe { REV_NAT_V4.get(entry.rev_nat_id) }.copied()?;
    conntrack::restore_forward(flow, &entry, &frontend);
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

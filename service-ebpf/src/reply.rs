//! Packets that are not for a frontend: if one is a backend's reply to a translated flow, it is
//! made to come from the frontend again (and, for a SNATed flow, to go to the real client).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use service_common::{CT_REVERSE, CT_SNAT};

use crate::{
    conntrack,
    maps::{CONNTRACK_V4, REV_NAT_V4},
    nat::{self, End},
    packet::Ipv4Flow,
};

#[inline(always)]
pub fn from_backend(ctx: &TcContext, flow: &Ipv4Flow) -> i32 {
    let reverse_key = conntrack::key_of(flow, CT_REVERSE);
    let Some(entry) = (unsafe { CONNTRACK_V4.get(reverse_key) }).copied() else {
        return TC_ACT_OK;
    };
    // The frontend is gone (service deleted): nothing to translate to.
    let Some(frontend) = (unsafe { REV_NAT_V4.get(entry.rev_nat_id) }) else {
        return TC_ACT_OK;
    };
    conntrack::restore_forward(flow, &entry, frontend);
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

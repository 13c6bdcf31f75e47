//! What a packet is to the dataplane: for a frontend, a reply of a translated flow, or neither.
//! Both TC programs and the XDP program ask the same question, in the same order.

use service_common::{
    ConntrackEntryV4, NodeV4, RevNatV4, SNAT_PORT_COUNT, SNAT_PORT_FIRST, ServiceEntry,
    ServiceKeyV4,
};

use crate::{maps::NODE_V4, packet::Ipv4Flow, reply, service};

pub enum Target {
    /// To this frontend, whose slot-0 entry is given.
    Frontend(ServiceKeyV4, &'static ServiceEntry),
    /// A backend's reply to a translated flow: the flow's reverse entry and its frontend.
    Reply(ConntrackEntryV4, RevNatV4),
    Other,
}

/// Looks `flow` up so that each kind of packet costs the same whatever the number of services.
/// A packet to the node's SNAT address at a SNAT port is looked for as a reply first: the node's
/// address is also a frontend address (its nodePorts), and a miss in the large `SERVICES_V4`
/// costs more the fuller it is. Everything else is looked for as a frontend first.
#[inline(always)]
pub fn of(flow: &Ipv4Flow) -> Target {
    let to_snat_port = node_if_to_snat_port(flow);
    if let Some(node) = to_snat_port
        && let Some((entry, frontend)) = reply::lookup(flow, Some(node))
    {
        return Target::Reply(entry, frontend);
    }
    if let Some((frontend, service)) = service::frontend_of(flow) {
        return Target::Frontend(frontend, service);
    }
    if to_snat_port.is_none()
        && let Some((entry, frontend)) = reply::lookup(flow, None)
    {
        return Target::Reply(entry, frontend);
    }
    Target::Other
}

/// The node's entry if `flow` goes to the node's SNAT address at a port SNATed flows get.
#[inline(always)]
fn node_if_to_snat_port(flow: &Ipv4Flow) -> Option<&'static NodeV4> {
    let port = u16::from_be(flow.dst_port);
    if !(SNAT_PORT_FIRST..SNAT_PORT_FIRST + SNAT_PORT_COUNT).contains(&port) {
        return None;
    }
    NODE_V4
        .get(0)
        .filter(|node| node.snat_address == flow.dst_address && node.snat_address != 0)
}

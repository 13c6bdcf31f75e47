//! From one Service to what it puts in the maps. Pure functions over the current map contents
//! (whose ids and slots an unchanged frontend keeps): the kernel is only touched by
//! `sync::Syncer`, and which service owns a contested frontend is `sync::Ledger`'s call.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use service_common::{
    BackendV4, RevNatV4, SCOPE_CLUSTER, SCOPE_DEFAULT, SERVICE_EXTERNAL, SERVICE_LOCAL,
    SERVICE_REMOTE_ENDPOINTS_ONLY, ServiceEntry, ServiceKeyV4,
};

use super::contents::{IdAllocator, MapContents};
use crate::model::{Endpoint, Node, Protocol, Service, ServicePort, TrafficPolicy};

/// A frontend as the maps key it: (address, port, protocol), all in network byte order.
pub(super) fn frontend_key(address: Ipv4Addr, port: u16, protocol: Protocol) -> ServiceKeyV4 {
    ServiceKeyV4 {
        address: u32::from_ne_bytes(address.octets()),
        port: port.to_be(),
        slot: 0,
        protocol: protocol.number(),
        scope: SCOPE_DEFAULT,
        _pad: [0; 2],
    }
}

fn backend_value(endpoint: &Endpoint, protocol: Protocol) -> BackendV4 {
    BackendV4 {
        address: u32::from_ne_bytes(endpoint.address.octets()),
        port: endpoint.port.to_be(),
        protocol: protocol.number(),
        _pad: 0,
    }
}

/// The endpoints that get new flows: the ready ones, or when none is ready the serving
/// terminating ones (kube-proxy's fallback, so a rolling update never blackholes a service).
fn serving_endpoints(endpoints: &[Endpoint]) -> Vec<&Endpoint> {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .filter(|e| e.serving && e.terminating)
        .collect()
}

/// The addresses and ports of one service port beyond its ClusterIP: for a nodePort, every node
/// IP and 127.0.0.1 (reached through the socket hooks); every external and load-balancer IP.
fn external_frontends<'a>(
    service: &'a Service,
    port: &'a ServicePort,
    node: &'a Node,
) -> impl Iterator<Item = ServiceKeyV4> + 'a {
    let node_port_addresses = port.node_port.into_iter().flat_map(|node_port| {
        node.ips
            .iter()
            .chain([&Ipv4Addr::LOCALHOST])
            .map(move |ip| (*ip, node_port))
    });
    let external_addresses = service
        .external_ips
        .iter()
        .chain(&service.load_balancer_ips)
        .map(|ip| (*ip, port.port));
    node_port_addresses
        .chain(external_addresses)
        .map(|(address, port_number)| frontend_key(address, port_number, port.protocol))
}

/// Every frontend `service` asks for on `node`: the ClusterIP of each port and its external
/// frontends. Two Services may ask for the same one (an external IP listed twice); the maps hold
/// one owner, chosen by the ledger.
pub fn wanted_frontends(service: &Service, node: &Node) -> BTreeSet<ServiceKeyV4> {
    service
        .ports
        .iter()
        .flat_map(|port| {
            [frontend_key(service.cluster_ip, port.port, port.protocol)]
                .into_iter()
                .chain(external_frontends(service, port, node))
        })
        .collect()
}

/// What a planning pass shares between services.
pub struct PlanContext<'a> {
    /// What the maps hold: an unchanged frontend keeps its rev-NAT id and slots.
    pub current: &'a MapContents,
    pub ids: &'a mut IdAllocator,
    /// The id of every backend some service uses (or the maps hold): one backend, one id.
    pub backend_ids: &'a mut HashMap<BackendV4, u32>,
}

/// What `service` puts in the maps on `node`, for the frontends `owns` grants it.
///
/// Each service port becomes several frontends, all plain `SERVICES_V4` entries so that the
/// packet path's lookup is the same for every kind (see [`wanted_frontends`]). A frontend with
/// the Local policy also gets [`SCOPE_CLUSTER`] slots with every endpoint, for the node's own
/// processes.
pub fn plan_service(
    service: &Service,
    node: &Node,
    owns: impl Fn(&ServiceKeyV4) -> bool,
    cx: &mut PlanContext,
) -> MapContents {
    let mut planner = Planner {
        cx,
        contents: MapContents::default(),
    };
    let local = service.external_traffic_policy == TrafficPolicy::Local;
    for port in &service.ports {
        let endpoints = serving_endpoints(&port.endpoints);
        // A terminating endpoint that gets no new flows keeps its backend entry, so the flows it
        // already has finish on it (conntrack purges only flows of removed backends).
        for endpoint in port.endpoints.iter().filter(|e| e.serving && e.terminating) {
            planner.backend_id(backend_value(endpoint, port.protocol));
        }
        let cluster_ip = frontend_key(service.cluster_ip, port.port, port.protocol);
        if owns(&cluster_ip) {
            planner.frontend(cluster_ip, 0, &endpoints, port.protocol);
        }

        let mut external_flags = SERVICE_EXTERNAL;
        let mut external_endpoints = endpoints.clone();
        if local {
            external_flags |= SERVICE_LOCAL;
            external_endpoints.retain(|e| e.node_name.is_some() && e.node_name == node.name);
            if external_endpoints.is_empty() && !endpoints.is_empty() {
                external_flags |= SERVICE_REMOTE_ENDPOINTS_ONLY;
            }
        }
        for frontend in external_frontends(service, port, node).filter(|key| owns(key)) {
            let planned =
                planner.frontend(frontend, external_flags, &external_endpoints, port.protocol);
            if let Some(rev_nat_id) = planned
                && local
            {
                let cluster = ServiceKeyV4 {
                    scope: SCOPE_CLUSTER,
                    ..frontend
                };
                planner.slots(
                    cluster,
                    SERVICE_EXTERNAL,
                    rev_nat_id,
                    &endpoints,
                    port.protocol,
                );
            }
        }
    }
    planner.contents
}

/// The state of one service's planning.
struct Planner<'a, 'b> {
    cx: &'a mut PlanContext<'b>,
    contents: MapContents,
}

impl Planner<'_, '_> {
    /// Programs one frontend with its slots and returns its rev-NAT id; None when the service
    /// already programmed it (its external IP listed twice, say).
    fn frontend(
        &mut self,
        frontend: ServiceKeyV4,
        flags: u16,
        endpoints: &[&Endpoint],
        protocol: Protocol,
    ) -> Option<u32> {
        if self.contents.services.contains_key(&frontend) {
            return None;
        }
        let rev_nat = RevNatV4 {
            address: frontend.address,
            port: frontend.port,
            _pad: 0,
        };
        let current = self.cx.current;
        let rev_nat_id = current
            .services
            .get(&frontend)
            .map(|meta| meta.rev_nat_id)
            .filter(|id| current.rev_nat.get(id) == Some(&rev_nat))
            .unwrap_or_else(|| self.cx.ids.rev_nat());
        self.contents.rev_nat.insert(rev_nat_id, rev_nat);
        self.slots(frontend, flags, rev_nat_id, endpoints, protocol);
        Some(rev_nat_id)
    }

    /// Programs the slots of `frontend` (a slot-0 key, of either scope) and the slot-0 entry
    /// that counts them.
    fn slots(
        &mut self,
        frontend: ServiceKeyV4,
        flags: u16,
        rev_nat_id: u32,
        endpoints: &[&Endpoint],
        protocol: Protocol,
    ) {
        let wanted: Vec<u32> = endpoints
            .iter()
            .map(|e| self.backend_id(backend_value(e, protocol)))
            .collect();
        let slots = assign_slots(self.cx.current, &frontend, &wanted);
        for (slot, backend_id) in slots.iter().enumerate() {
            let key = ServiceKeyV4 {
                slot: slot as u16 + 1,
                ..frontend
            };
            let entry = ServiceEntry {
                backend_id: *backend_id,
                ..ServiceEntry::default()
            };
            self.contents.services.insert(key, entry);
        }
        let meta = ServiceEntry {
            count: slots.len() as u16,
            flags,
            rev_nat_id,
            ..ServiceEntry::default()
        };
        self.contents.services.insert(frontend, meta);
    }

    /// The backend's id: the one it already has, else a fresh one.
    fn backend_id(&mut self, backend: BackendV4) -> u32 {
        let ids = &mut *self.cx.ids;
        let id = *self
            .cx
            .backend_ids
            .entry(backend)
            .or_insert_with(|| ids.backend());
        self.contents.backends.insert(id, backend);
        id
    }
}

/// Orders `wanted` backends into slots 1..=n so that a backend that keeps its place in `current`
/// keeps its slot: only the slots of removed or added backends are written.
fn assign_slots(current: &MapContents, frontend: &ServiceKeyV4, wanted: &[u32]) -> Vec<u32> {
    let count = wanted.len();
    let current_slot_of = |slot: usize| {
        let key = ServiceKeyV4 {
            slot: slot as u16,
            ..*frontend
        };
        current.services.get(&key).map(|e| e.backend_id)
    };
    let mut slots: Vec<Option<u32>> = (1..=count)
        .map(|slot| current_slot_of(slot).filter(|id| wanted.contains(id)))
        .collect();
    let placed: BTreeSet<u32> = slots.iter().flatten().copied().collect();
    let mut newcomers = wanted.iter().filter(|id| !placed.contains(id));
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = newcomers.next().copied();
    }
    slots.into_iter().flatten().collect()
}

//! From the desired model to map contents, and from two map contents to the ordered writes that
//! turn one into the other. Pure functions: the kernel is only touched by `sync::Syncer`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use service_common::{
    BackendV4, RevNatV4, SCOPE_CLUSTER, SCOPE_DEFAULT, SERVICE_EXTERNAL, SERVICE_LOCAL,
    SERVICE_REMOTE_ENDPOINTS_ONLY, ServiceEntry, ServiceKeyV4,
};

use crate::model::{DesiredState, Endpoint, Node, Protocol, TrafficPolicy};

/// What the service maps hold, or should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<ServiceKeyV4, ServiceEntry>,
    pub backends: BTreeMap<u32, BackendV4>,
    pub rev_nat: BTreeMap<u32, RevNatV4>,
}

impl MapContents {
    /// The (rev-NAT id, backend id) pairs programmed: which backends each frontend may send to.
    pub fn frontend_backends(&self) -> BTreeSet<(u32, u32)> {
        let mut pairs = BTreeSet::new();
        for (key, entry) in &self.services {
            if key.slot == 0 {
                continue;
            }
            let frontend = ServiceKeyV4 { slot: 0, ..*key };
            if let Some(meta) = self.services.get(&frontend) {
                pairs.insert((meta.rev_nat_id, entry.backend_id));
            }
        }
        pairs
    }

    /// Keeps this in step with a write that reached the maps.
    pub fn record(&mut self, op: &MapOp) {
        match op {
            MapOp::PutBackend(id, backend) => drop(self.backends.insert(*id, *backend)),
            MapOp::PutRevNat(id, rev_nat) => drop(self.rev_nat.insert(*id, *rev_nat)),
            MapOp::PutService(key, entry) => drop(self.services.insert(*key, *entry)),
            MapOp::DeleteService(key) => drop(self.services.remove(key)),
            MapOp::DeleteRevNat(id) => drop(self.rev_nat.remove(id)),
            MapOp::DeleteBackend(id) => drop(self.backends.remove(id)),
        }
    }
}

/// One map write. The order of a plan is what keeps a half-applied change invisible to packets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, BackendV4),
    PutRevNat(u32, RevNatV4),
    PutService(ServiceKeyV4, ServiceEntry),
    DeleteService(ServiceKeyV4),
    DeleteRevNat(u32),
    DeleteBackend(u32),
}

/// Ids that must never be handed out twice while a conntrack entry could still name them.
#[derive(Clone, Debug)]
pub struct IdAllocator {
    next_backend_id: u32,
    next_rev_nat_id: u32,
}

impl IdAllocator {
    /// Starts past every id the maps already hold (after an agent restart over pinned maps).
    pub fn after(contents: &MapContents) -> Self {
        let next = |ids: Option<&u32>| ids.map_or(1, |id| id + 1);
        Self {
            next_backend_id: next(contents.backends.keys().next_back()),
            next_rev_nat_id: next(contents.rev_nat.keys().next_back()),
        }
    }
}

/// A frontend as the maps key it: (address, port, protocol), all in network byte order.
fn frontend_key(address: Ipv4Addr, port: u16, protocol: Protocol) -> ServiceKeyV4 {
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

/// Computes what the maps must hold for `desired` on `node`, keeping every id and slot that
/// `current` already gives an unchanged frontend or backend, so that a change rewrites only what
/// differs.
///
/// Each service port becomes several frontends, all plain `SERVICES_V4` entries so that the
/// packet path's lookup is the same for every kind: the ClusterIP; for a nodePort, every node IP
/// and 127.0.0.1 (reached through the socket hooks); every external and load-balancer IP. A
/// frontend with the Local policy also gets [`SCOPE_CLUSTER`] slots with every endpoint, for
/// the node's own processes.
pub fn desired_contents(
    desired: &DesiredState,
    node: &Node,
    current: &MapContents,
    ids: &mut IdAllocator,
) -> MapContents {
    let mut planner = Planner {
        current,
        ids,
        contents: MapContents::default(),
        current_backend_ids: current.backends.iter().map(|(id, b)| (*b, *id)).collect(),
        backend_ids: BTreeMap::new(),
    };
    for service in desired.services.values() {
        let local = service.external_traffic_policy == TrafficPolicy::Local;
        for port in &service.ports {
            let endpoints = serving_endpoints(&port.endpoints);
            // A terminating endpoint that gets no new flows keeps its backend entry, so the
            // flows it already has finish on it (conntrack purges only flows of removed
            // backends).
            for endpoint in port.endpoints.iter().filter(|e| e.serving && e.terminating) {
                planner.backend_id(backend_value(endpoint, port.protocol));
            }
            planner.frontend(
                frontend_key(service.cluster_ip, port.port, port.protocol),
                0,
                &endpoints,
                port.protocol,
            );

            let mut external_flags = SERVICE_EXTERNAL;
            let mut external_endpoints = endpoints.clone();
            if local {
                external_flags |= SERVICE_LOCAL;
                external_endpoints.retain(|e| e.node_name.is_some() && e.node_name == node.name);
                if external_endpoints.is_empty() && !endpoints.is_empty() {
                    external_flags |= SERVICE_REMOTE_ENDPOINTS_ONLY;
                }
            }
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
            for (address, port_number) in node_port_addresses.chain(external_addresses) {
                let frontend = frontend_key(address, port_number, port.protocol);
                let claimed =
                    planner.frontend(frontend, external_flags, &external_endpoints, port.protocol);
                if let Some(rev_nat_id) = claimed
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
    }
    planner.contents
}

/// The state of one `desired_contents` pass.
struct Planner<'a> {
    current: &'a MapContents,
    ids: &'a mut IdAllocator,
    contents: MapContents,
    current_backend_ids: BTreeMap<BackendV4, u32>,
    backend_ids: BTreeMap<BackendV4, u32>,
}

impl Planner<'_> {
    /// Programs one frontend with its slots and returns its rev-NAT id. A frontend claimed
    /// earlier in the pass (two Services listing the same external IP and port) keeps its first
    /// owner, since the maps can hold only one: None then.
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
        let rev_nat_id = self
            .current
            .services
            .get(&frontend)
            .map(|meta| meta.rev_nat_id)
            .filter(|id| self.current.rev_nat.get(id) == Some(&rev_nat))
            .unwrap_or_else(|| {
                let id = self.ids.next_rev_nat_id;
                self.ids.next_rev_nat_id += 1;
                id
            });
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
        let slots = assign_slots(self.current, &frontend, &wanted);
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

    /// The backend's id: the one it has in the maps, else a fresh one.
    fn backend_id(&mut self, backend: BackendV4) -> u32 {
        let id = *self.backend_ids.entry(backend).or_insert_with(|| {
            self.current_backend_ids
                .get(&backend)
                .copied()
                .unwrap_or_else(|| {
                    let id = self.ids.next_backend_id;
                    self.ids.next_backend_id += 1;
                    id
                })
        });
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

/// The writes that turn `current` into `desired`, in an order that never exposes a half-written
/// frontend: backends and rev-NAT first, then backend slots, then the slot-0 count that makes
/// them reachable; removals in the reverse order (count first, then slots, then what they named).
pub fn diff(current: &MapContents, desired: &MapContents) -> Vec<MapOp> {
    let mut ops = Vec::new();
    for (id, backend) in &desired.backends {
        if current.backends.get(id) != Some(backend) {
            ops.push(MapOp::PutBackend(*id, *backend));
        }
    }
    for (id, rev_nat) in &desired.rev_nat {
        if current.rev_nat.get(id) != Some(rev_nat) {
            ops.push(MapOp::PutRevNat(*id, *rev_nat));
        }
    }
    let changed_services = desired
        .services
        .iter()
        .filter(|(key, entry)| current.services.get(key) != Some(entry));
    let (metas, slots): (Vec<_>, Vec<_>) = changed_services.partition(|(key, _)| key.slot == 0);
    ops.extend(slots.into_iter().map(|(k, e)| MapOp::PutService(*k, *e)));
    ops.extend(metas.into_iter().map(|(k, e)| MapOp::PutService(*k, *e)));

    let removed_services = current
        .services
        .keys()
        .filter(|key| !desired.services.contains_key(key));
    let (metas, slots): (Vec<&ServiceKeyV4>, Vec<_>) =
        removed_services.partition(|key| key.slot == 0);
    ops.extend(metas.into_iter().map(|k| MapOp::DeleteService(*k)));
    ops.extend(slots.into_iter().map(|k| MapOp::DeleteService(*k)));
    for id in current.rev_nat.keys() {
        if !desired.rev_nat.contains_key(id) {
            ops.push(MapOp::DeleteRevNat(*id));
        }
    }
    for id in current.backends.keys() {
        if !desired.backends.contains_key(id) {
            ops.push(MapOp::DeleteBackend(*id));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::SystemTime};

    use super::*;
    use crate::model::{Service, ServiceName, ServicePort, ServiceType, TrafficPolicy};

    fn endpoint(last_octet: u8, ready: bool) -> Endpoint {
        Endpoint {
            address: Ipv4Addr::new(10, 244, 0, last_octet),
            port: 8080,
            ready,
            serving: ready,
            terminating: false,
            node_name: None,
        }
    }

    fn state(services: &[(&str, [u8; 4], Vec<Endpoint>)]) -> DesiredState {
        let mut desired = DesiredState::default();
        for (name, ip, endpoints) in services {
            let name = ServiceName {
                namespace: "default".into(),
                name: (*name).into(),
            };
            let service = Service {
                name: name.clone(),
                service_type: ServiceType::ClusterIP,
                cluster_ip: Ipv4Addr::from(*ip),
                external_ips: Vec::new(),
                load_balancer_ips: Vec::new(),
                external_traffic_policy: TrafficPolicy::Cluster,
                health_check_node_port: None,
                ports: vec![ServicePort {
                    name: String::new(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    node_port: None,
                    endpoints: endpoints.clone(),
                }],
                created: SystemTime::UNIX_EPOCH,
            };
            desired.services.insert(name, service);
        }
        desired
    }

    /// Plans `desired` over `current` and returns the ops and the resulting contents.
    fn step(
        current: &MapContents,
        desired: &DesiredState,
        ids: &mut IdAllocator,
    ) -> (Vec<MapOp>, MapContents) {
        let next = desired_contents(desired, &Node::default(), current, ids);
        (diff(current, &next), next)
    }

    fn apply(current: &MapContents, ops: &[MapOp]) -> MapContents {
        let mut contents = current.clone();
        for op in ops {
            contents.record(op);
        }
        contents
    }

    fn slot_backends(contents: &MapContents) -> Vec<(u16, u32)> {
        let mut v: Vec<_> = contents
            .services
            .iter()
            .filter(|(k, _)| k.slot > 0)
            .map(|(k, e)| (k.slot, e.backend_id))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn new_service_writes_backends_then_slots_then_count() {
        let desired = state(&[(
            "web",
            [10, 96, 0, 10],
            vec![endpoint(2, true), endpoint(3, true)],
        )]);
        let mut ids = IdAllocator::after(&MapContents::default());
        let (ops, next) = step(&MapContents::default(), &desired, &mut ids);
        let kinds: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                MapOp::PutBackend(..) => "backend",
                MapOp::PutRevNat(..) => "revnat",
                MapOp::PutService(k, _) if k.slot == 0 => "count",
                MapOp::PutService(..) => "slot",
                _ => "delete",
            })
            .collect();
        assert_eq!(
            kinds,
            ["backend", "backend", "revnat", "slot", "slot", "count"]
        );
        let meta = next
            .services
            .iter()
            .find(|(k, _)| k.slot == 0)
            .map(|(_, e)| *e)
            .unwrap();
        assert_eq!(meta.count, 2);
        assert_eq!(
            next.rev_nat[&meta.rev_nat_id].address,
            u32::from_ne_bytes([10, 96, 0, 10])
        );
        assert_eq!(next.rev_nat[&meta.rev_nat_id].port, 80u16.to_be());
    }

    #[test]
    fn unchanged_state_plans_nothing() {
        let desired = state(&[("web", [10, 96, 0, 10], vec![endpoint(2, true)])]);
        let mut ids = IdAllocator::after(&MapContents::default());
        let (ops, next) = step(&MapContents::default(), &desired, &mut ids);
        let current = apply(&MapContents::default(), &ops);
        assert_eq!(current, next);
        let (ops, _) = step(&current, &desired, &mut ids);
        assert!(ops.is_empty(), "{ops:?}");
    }

    #[test]
    fn removing_a_backend_shrinks_count_before_deleting_and_keeps_other_slots() {
        let three = state(&[(
            "web",
            [10, 96, 0, 10],
            vec![endpoint(2, true), endpoint(3, true), endpoint(4, true)],
        )]);
        let mut ids = IdAllocator::after(&MapContents::default());
        let (ops, _) = step(&MapContents::default(), &three, &mut ids);
        let current = apply(&MapContents::default(), &ops);
        let before = slot_backends(&current);

        // Remove the backend in slot 1: the one in slot 3 moves into the hole, slot 2 untouched.
        let two = state(&[(
            "web",
            [10, 96, 0, 10],
            vec![endpoint(3, true), endpoint(4, true)],
        )]);
        let (ops, next) = step(&current, &two, &mut ids);
        let after = slot_backends(&next);
        assert_eq!(after, vec![(1, before[2].1), (2, before[1].1)]);
        let count_at = ops
            .iter()
            .position(|op| matches!(op, MapOp::PutService(k, e) if k.slot == 0 && e.count == 2))
            .expect("count update");
        let slot_delete_at = ops
            .iter()
            .position(|op| matches!(op, MapOp::DeleteService(k) if k.slot == 3))
            .expect("slot 3 delete");
        let backend_delete_at = ops
            .iter()
            .position(|op| matches!(op, MapOp::DeleteBackend(_)))
            .expect("backend delete");
        assert!(count_at < slot_delete_at && slot_delete_at < backend_delete_at);
        assert!(
            !ops.iter()
                .any(|op| matches!(op, MapOp::PutService(k, _) if k.slot == 2))
        );
        assert_eq!(apply(&current, &ops), next);
    }

    #[test]
    fn deleted_service_removes_count_first_and_everything_it_named() {
        let desired = state(&[("web", [10, 96, 0, 10], vec![endpoint(2, true)])]);
        let mut ids = IdAllocator::after(&MapContents::default());
        let (ops, _) = step(&MapContents::default(), &desired, &mut ids);
        let current = apply(&MapContents::default(), &ops);
        let (ops, next) = step(&current, &DesiredState::default(), &mut ids);
        assert_eq!(next, MapContents::default());
        assert!(matches!(ops[0], MapOp::DeleteService(k) if k.slot == 0));
        assert_eq!(apply(&current, &ops), MapContents::default());
    }

    #[test]
    fn ids_are_not_reused_after_deletion() {
        let desired = state(&[("web", [10, 96, 0, 10], vec![endpoint(2, true)])]);
        let mut ids = IdAllocator::after(&MapContents::default());
        let (ops, first) = step(&MapContents::default(), &desired, &mut ids);
        let current = apply(&MapContents::default(), &ops);
        let (ops, _) = step(&current, &DesiredState::default(), &mut ids);
        let empty = apply(&current, &ops);
        let other = state(&[("web", [10, 96, 0, 10], vec![endpoint(9, true)])]);
        let (_, second) = step(&empty, &other, &mut ids);
        let first_ids: BTreeSet<u32> = first.backends.keys().copied().collect();
        assert!(second.backends.keys().all(|id| !first_ids.contains(id)));
    }

    #[test]
    fn shared_backend_gets_one_id_and_unready_endpoints_are_not_programmed() {
        let desired = state(&[
            (
                "a",
                [10, 96, 0, 10],
                vec![endpoint(2, true), endpoint(5, false)],
            ),
            ("b", [10, 96, 0, 11], vec![endpoint(2, true)]),
        ]);
        let mut ids = IdAllocator::after(&MapContents::default());
        let next = desired_contents(
            &desired,
            &Node::default(),
            &MapContents::default(),
            &mut ids,
        );
        assert_eq!(next.backends.len(), 1);
        assert_eq!(slot_backends(&next).len(), 2);
    }

    #[test]
    fn terminating_serving_endpoints_are_the_fallback_when_none_is_ready() {
        let mut terminating = endpoint(2, false);
        terminating.serving = true;
        terminating.terminating = true;
        let desired = state(&[(
            "web",
            [10, 96, 0, 10],
            vec![terminating, endpoint(3, false)],
        )]);
        let mut ids = IdAllocator::after(&MapContents::default());
        let next = desired_contents(
            &desired,
            &Node::default(),
            &MapContents::default(),
            &mut ids,
        );
        let addresses: Vec<u32> = next.backends.values().map(|b| b.address).collect();
        assert_eq!(addresses, [u32::from_ne_bytes([10, 244, 0, 2])]);
    }

    #[test]
    fn local_policy_frontends_also_get_cluster_scope_slots_with_every_endpoint() {
        let mut local = endpoint(2, true);
        local.node_name = Some("node-a".into());
        let mut remote = endpoint(3, true);
        remote.node_name = Some("node-b".into());
        let mut desired = state(&[("web", [10, 96, 0, 10], vec![local, remote])]);
        let service = desired.services.values_mut().next().unwrap();
        service.service_type = ServiceType::NodePort;
        service.external_traffic_policy = TrafficPolicy::Local;
        service.ports[0].node_port = Some(30080);
        let node = Node {
            ips: vec![Ipv4Addr::new(192, 168, 100, 1)],
            name: Some("node-a".into()),
        };
        let mut ids = IdAllocator::after(&MapContents::default());
        let next = desired_contents(&desired, &node, &MapContents::default(), &mut ids);

        let node_port = frontend_key(Ipv4Addr::new(192, 168, 100, 1), 30080, Protocol::Tcp);
        let cluster = ServiceKeyV4 {
            scope: SCOPE_CLUSTER,
            ..node_port
        };
        let (default_meta, cluster_meta) = (next.services[&node_port], next.services[&cluster]);
        assert_eq!(
            default_meta.count, 1,
            "policy Local: only the local endpoint"
        );
        assert_eq!(default_meta.flags, SERVICE_EXTERNAL | SERVICE_LOCAL);
        assert_eq!(
            cluster_meta.count, 2,
            "the node's own processes: every endpoint"
        );
        assert_eq!(cluster_meta.flags, SERVICE_EXTERNAL);
        assert_eq!(cluster_meta.rev_nat_id, default_meta.rev_nat_id);
        // The ClusterIP frontend has no second scope: its slots already hold every endpoint.
        let cluster_ip = frontend_key(Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Tcp);
        assert_eq!(next.services[&cluster_ip].count, 2);
        let scoped: Vec<_> = next
            .services
            .keys()
            .filter(|key| key.scope == SCOPE_CLUSTER && key.slot == 0)
            .map(|key| (key.address, key.port))
            .collect();
        assert_eq!(
            scoped,
            [
                // 127.0.0.1 and the node IP, both at the nodePort.
                (u32::from_ne_bytes([127, 0, 0, 1]), 30080u16.to_be()),
                (u32::from_ne_bytes([192, 168, 100, 1]), 30080u16.to_be()),
            ]
        );
    }

    #[test]
    fn frontend_without_endpoints_has_count_zero() {
        let desired = state(&[("web", [10, 96, 0, 10], vec![])]);
        let mut ids = IdAllocator::after(&MapContents::default());
        let next = desired_contents(
            &desired,
            &Node::default(),
            &MapContents::default(),
            &mut ids,
        );
        assert_eq!(next.services.len(), 1);
        assert_eq!(next.services.values().next().unwrap().count, 0);
    }
}

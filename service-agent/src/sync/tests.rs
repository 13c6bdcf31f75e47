//! The ledger's plans, checked by applying them to an in-memory copy of the maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use service_common::{
    BackendV4, RevNatV4, SCOPE_CLUSTER, SERVICE_EXTERNAL, SERVICE_LOCAL, ServiceKeyV4,
};

use super::{
    Ledger, MapContents, MapOp, NextIds, Removals, contents::first_phase, plan::frontend_key,
};
use crate::model::{
    DesiredState, Endpoint, Node, Protocol, Service, ServiceName, ServicePort, ServiceType,
    TrafficPolicy,
};

pub(super) fn endpoint(last_octet: u8, ready: bool) -> Endpoint {
    Endpoint {
        address: Ipv4Addr::new(10, 244, 0, last_octet),
        port: 8080,
        ready,
        serving: ready,
        terminating: false,
        node_name: None,
    }
}

/// ClusterIP Services with one TCP port 80: (name, ClusterIP, endpoints).
pub(super) fn state(services: &[(&str, [u8; 4], Vec<Endpoint>)]) -> DesiredState {
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
        desired.services.insert(name, Arc::new(service));
    }
    desired
}

fn fresh() -> Ledger {
    Ledger::new(MapContents::default(), NextIds::default(), Node::default())
}

/// Plans `desired`, records every write as if the maps took it, and returns the writes and what
/// the maps then hold.
fn step(ledger: &mut Ledger, desired: &DesiredState) -> (Vec<MapOp>, MapContents) {
    let plan = ledger.plan(desired);
    for op in &plan.ops {
        ledger.record(op);
    }
    (plan.ops, ledger.current().clone())
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
    let mut ledger = fresh();
    let (ops, next) = step(&mut ledger, &desired);
    let kinds: Vec<&str> = ops
        .iter()
        .map(|op| match op {
            MapOp::PutBackend(..) => "backend",
            MapOp::PutRevNat(..) => "revnat",
            MapOp::PutService(k, _) if k.slot == 0 => "count",
            MapOp::PutService(..) => "slot",
            MapOp::PutFrontendAddress(..) => "address",
            _ => "delete",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "address", "backend", "backend", "revnat", "slot", "slot", "count"
        ]
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
    let mut ledger = fresh();
    let (ops, next) = step(&mut ledger, &desired);
    let current = apply(&MapContents::default(), &ops);
    assert_eq!(current, next);
    let (ops, _) = step(&mut ledger, &desired);
    assert!(ops.is_empty(), "{ops:?}");
}

#[test]
fn removing_a_backend_shrinks_count_before_deleting_and_keeps_other_slots() {
    let three = state(&[(
        "web",
        [10, 96, 0, 10],
        vec![endpoint(2, true), endpoint(3, true), endpoint(4, true)],
    )]);
    let mut ledger = fresh();
    let (ops, _) = step(&mut ledger, &three);
    let current = apply(&MapContents::default(), &ops);
    let before = slot_backends(&current);

    // Remove the backend in slot 1: the one in slot 3 moves into the hole, slot 2 untouched.
    let two = state(&[(
        "web",
        [10, 96, 0, 10],
        vec![endpoint(3, true), endpoint(4, true)],
    )]);
    let (ops, next) = step(&mut ledger, &two);
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
    let mut ledger = fresh();
    let (ops, _) = step(&mut ledger, &desired);
    let current = apply(&MapContents::default(), &ops);
    let (ops, next) = step(&mut ledger, &DesiredState::default());
    assert_eq!(next, MapContents::default());
    assert!(matches!(ops[0], MapOp::DeleteService(k) if k.slot == 0));
    assert_eq!(apply(&current, &ops), MapContents::default());
}

#[test]
fn ids_are_not_reused_after_deletion() {
    let desired = state(&[("web", [10, 96, 0, 10], vec![endpoint(2, true)])]);
    let mut ledger = fresh();
    let (_, first) = step(&mut ledger, &desired);
    step(&mut ledger, &DesiredState::default());
    let other = state(&[("web", [10, 96, 0, 10], vec![endpoint(9, true)])]);
    let (_, second) = step(&mut ledger, &other);
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
    let mut ledger = fresh();
    let next = step(&mut ledger, &desired).1;
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
    let mut ledger = fresh();
    let next = step(&mut ledger, &desired).1;
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
    let service = Arc::make_mut(desired.services.values_mut().next().unwrap());
    service.service_type = ServiceType::NodePort;
    service.external_traffic_policy = TrafficPolicy::Local;
    service.ports[0].node_port = Some(30080);
    let node = Node {
        ips: vec![Ipv4Addr::new(192, 168, 100, 1)],
        name: Some("node-a".into()),
    };
    let mut ledger = Ledger::new(MapContents::default(), NextIds::default(), node);
    let (_, next) = step(&mut ledger, &desired);

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
    let mut ledger = fresh();
    let next = step(&mut ledger, &desired).1;
    assert_eq!(next.services.len(), 1);
    assert_eq!(next.services.values().next().unwrap().count, 0);
}

/// What the maps mean, without the ids: per frontend key, its flags, its rev-NAT address and its
/// slots' backends; and every backend the maps hold. Two plans of the same state, one made
/// incrementally and one from scratch, must mean the same.
type Meaning = (
    BTreeMap<ServiceKeyV4, (u16, Option<RevNatV4>, Vec<Option<BackendV4>>)>,
    BTreeSet<BackendV4>,
);

fn meaning(contents: &MapContents) -> Meaning {
    let mut frontends = BTreeMap::new();
    for (key, meta) in contents.services.iter().filter(|(key, _)| key.slot == 0) {
        // Which slot holds which backend depends on history; the set of them must not.
        let mut slots: Vec<_> = (1..=meta.count)
            .map(|slot| {
                let entry = contents.services.get(&ServiceKeyV4 { slot, ..*key });
                entry.and_then(|entry| contents.backends.get(&entry.backend_id).copied())
            })
            .collect();
        slots.sort();
        let rev_nat = contents.rev_nat.get(&meta.rev_nat_id).copied();
        frontends.insert(*key, (meta.flags, rev_nat, slots));
    }
    // The packet path finds exactly the frontends' addresses.
    let addresses: BTreeSet<u32> = (contents.services.keys())
        .filter(|key| key.slot == 0)
        .map(|key| key.address)
        .collect();
    assert_eq!(contents.frontend_addresses, addresses);
    // Every slot key has its frontend, with a count that reaches it.
    for key in contents.services.keys().filter(|key| key.slot > 0) {
        let meta = contents.services[&ServiceKeyV4 { slot: 0, ..*key }];
        assert!(key.slot <= meta.count, "slot {key:?} beyond its count");
    }
    (frontends, contents.backends.values().copied().collect())
}

/// A small deterministic generator (no dependency for a test).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Replaces one random Service of eight (or deletes it) with a random one over few addresses, so
/// that Services share backends and contend for external IPs and nodePorts.
fn change_one_service(desired: &mut DesiredState, rng: &mut Lcg) {
    let index = rng.below(8) as u8;
    {
        let name = ServiceName {
            namespace: "default".into(),
            name: format!("svc-{index}"),
        };
        // One endpoint per address, as every source gives them.
        let endpoints: BTreeMap<Ipv4Addr, Endpoint> = (0..rng.below(4))
            .map(|_| {
                let mut endpoint = endpoint(2 + rng.below(6) as u8, rng.below(4) != 0);
                endpoint.terminating = !endpoint.ready && rng.below(2) == 0;
                endpoint.serving = endpoint.ready || endpoint.terminating;
                endpoint.node_name = Some(format!("node-{}", rng.below(2)));
                (endpoint.address, endpoint)
            })
            .collect();
        let node_port = (rng.below(2) == 0).then(|| 30000 + rng.below(2) as u16);
        let service = Service {
            name: name.clone(),
            service_type: ServiceType::NodePort,
            cluster_ip: Ipv4Addr::new(10, 96, 0, index),
            external_ips: (0..rng.below(2))
                .map(|_| Ipv4Addr::new(203, 0, 113, rng.below(2) as u8))
                .collect(),
            load_balancer_ips: Vec::new(),
            external_traffic_policy: if rng.below(2) == 0 {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            },
            health_check_node_port: None,
            ports: vec![ServicePort {
                name: String::new(),
                port: 80,
                protocol: Protocol::Tcp,
                node_port,
                endpoints: endpoints.into_values().collect(),
            }],
            created: SystemTime::UNIX_EPOCH + Duration::from_secs(rng.below(3)),
        };
        if rng.below(5) == 0 {
            desired.services.remove(&name);
        } else {
            desired.services.insert(name, Arc::new(service));
        }
    }
}

#[test]
fn incremental_plans_mean_what_a_plan_from_scratch_means() {
    let node = Node {
        ips: vec![Ipv4Addr::new(192, 168, 100, 1)],
        name: Some("node-0".into()),
    };
    let mut rng = Lcg(7);
    let mut ledger = Ledger::new(MapContents::default(), NextIds::default(), node.clone());
    let mut desired = DesiredState::default();
    for round in 0..1000 {
        change_one_service(&mut desired, &mut rng);
        let previous = ledger.current().clone();
        let (ops, incremental) = step(&mut ledger, &desired);
        assert_never_half_written(&previous, &ops, round);
        assert_only_old_or_new_backends(&previous, &ops, &incremental, round);
        let mut scratch = Ledger::new(MapContents::default(), NextIds::default(), node.clone());
        let (_, from_scratch) = step(&mut scratch, &desired);
        let ((frontends, backends), (expected_frontends, expected_backends)) =
            (meaning(&incremental), meaning(&from_scratch));
        for key in frontends.keys().chain(expected_frontends.keys()) {
            assert_eq!(
                frontends.get(key),
                expected_frontends.get(key),
                "round {round}, frontend {key:?}: {desired:#?}"
            );
        }
        assert_eq!(backends, expected_backends, "round {round}");
        let (again, _) = step(&mut ledger, &desired);
        assert!(again.is_empty(), "round {round}: replanned {again:?}");
    }
}

#[test]
fn the_oldest_service_owns_a_contested_external_ip_and_hands_it_on_when_deleted() {
    let contested = Ipv4Addr::new(203, 0, 113, 7);
    let with_external_ip = |name: &str, last_octet: u8, created: u64| {
        let mut desired = state(&[(
            name,
            [10, 96, 0, last_octet],
            vec![endpoint(last_octet, true)],
        )]);
        let (name, service) = desired.services.pop_first().unwrap();
        let mut service = Arc::unwrap_or_clone(service);
        service.external_ips = vec![contested];
        service.created = SystemTime::UNIX_EPOCH + Duration::from_secs(created);
        (name, Arc::new(service))
    };
    let owner = |contents: &MapContents| {
        let key = frontend_key(contested, 80, Protocol::Tcp);
        let slot = contents.services[&ServiceKeyV4 { slot: 1, ..key }];
        contents.backends[&slot.backend_id].address.to_ne_bytes()[3]
    };
    // "b" is older than "a": it keeps the address although "a" sorts first and came later.
    let (old_name, old) = with_external_ip("b", 11, 1);
    let (new_name, new) = with_external_ip("a", 12, 2);
    let mut desired = DesiredState::default();
    desired.services.insert(old_name.clone(), old);
    let mut ledger = fresh();
    let (_, contents) = step(&mut ledger, &desired);
    assert_eq!(owner(&contents), 11);
    desired.services.insert(new_name, new);
    let (ops, contents) = step(&mut ledger, &desired);
    assert_eq!(owner(&contents), 11, "a newer Service never takes it");
    assert!(
        ops.iter().all(|op| !matches!(op, MapOp::PutService(key, _) if key.address == u32::from_ne_bytes(contested.octets()))),
        "{ops:?}"
    );
    desired.services.remove(&old_name);
    let (_, contents) = step(&mut ledger, &desired);
    assert_eq!(owner(&contents), 12, "the other claimant takes over");
}

#[test]
fn one_endpoint_change_among_many_services_writes_only_that_service() {
    let services: Vec<(String, [u8; 4], Vec<Endpoint>)> = (0..1000u16)
        .map(|i| {
            let [high, low] = i.to_be_bytes();
            (
                format!("svc-{i}"),
                [10, 96, high, low],
                vec![endpoint(2, true), endpoint(3, true)],
            )
        })
        .collect();
    let as_refs: Vec<(&str, [u8; 4], Vec<Endpoint>)> = services
        .iter()
        .map(|(name, ip, endpoints)| (name.as_str(), *ip, endpoints.clone()))
        .collect();
    let mut desired = state(&as_refs);
    let mut ledger = fresh();
    let (ops, _) = step(&mut ledger, &desired);
    // Two backends shared by every service, then an address, a rev-NAT, two slots and a count
    // each.
    assert_eq!(ops.len(), 2 + 1000 * 5);
    let changed = desired.services.values_mut().nth(500).unwrap();
    Arc::make_mut(changed).ports[0]
        .endpoints
        .push(endpoint(4, true));
    let (ops, _) = step(&mut ledger, &desired);
    let kinds: Vec<&str> = ops
        .iter()
        .map(|op| match op {
            MapOp::PutBackend(..) => "backend",
            MapOp::PutService(k, _) if k.slot == 0 => "count",
            MapOp::PutService(..) => "slot",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["backend", "slot", "count"]);
}

/// Applies `ops` one at a time and checks what a packet could meet after each: every frontend
/// findable by its address, with its rev-NAT entry, and a count that reaches only slots naming
/// existing backends.
fn assert_never_half_written(start: &MapContents, ops: &[MapOp], round: usize) {
    let mut contents = start.clone();
    for (at, op) in ops.iter().enumerate() {
        contents.record(op);
        for (key, meta) in contents.services.iter().filter(|(key, _)| key.slot == 0) {
            let context = || format!("round {round}, after write {at} ({op:?}) of {ops:?}");
            assert!(
                contents.frontend_addresses.contains(&key.address),
                "{}",
                context()
            );
            assert!(
                contents.rev_nat.contains_key(&meta.rev_nat_id),
                "{}",
                context()
            );
            for slot in 1..=meta.count {
                let entry = contents.services.get(&ServiceKeyV4 { slot, ..*key });
                let backend = entry.and_then(|entry| contents.backends.get(&entry.backend_id));
                assert!(backend.is_some(), "slot {slot} of {key:?}: {}", context());
            }
        }
    }
}

#[test]
fn a_plan_that_replaces_a_service_removes_all_of_it_before_adding_anything() {
    let old = state(&[(
        "old",
        [10, 96, 0, 10],
        vec![endpoint(2, true), endpoint(3, true)],
    )]);
    // Another address, one backend of the old Service and one new one.
    let new = state(&[(
        "new",
        [10, 96, 0, 11],
        vec![endpoint(3, true), endpoint(4, true)],
    )]);
    for full in [false, true] {
        let mut ledger = fresh();
        let (_, programmed) = step(&mut ledger, &old);
        if full {
            // As after a failed sync: the plan compares the whole maps.
            ledger.reload(programmed.clone(), Removals::Frontends);
        }
        let moving = programmed
            .backends
            .iter()
            .find(|(_, b)| b.address == u32::from_ne_bytes([10, 244, 0, 3]));
        let moving = *moving.unwrap().0;
        let (ops, next) = step(&mut ledger, &new);
        let last_delete = ops.iter().rposition(MapOp::is_delete).unwrap();
        let first_put = ops.iter().position(|op| !op.is_delete()).unwrap();
        assert!(last_delete < first_put, "full: {full}: {ops:?}");
        assert_eq!(
            ops.iter().filter(|op| op.is_delete()).count(),
            // The old frontend's address, count, two slots, rev-NAT entry, and one backend.
            6,
            "full: {full}: {ops:?}"
        );
        // The backend both Services use keeps its entry and its id: its flows go on.
        assert!(
            !ops.iter().any(|op| matches!(op,
                MapOp::PutBackend(id, _) | MapOp::DeleteBackend(id) if *id == moving)),
            "full: {full}: {ops:?}"
        );
        assert!(next.backends.contains_key(&moving));
        assert_eq!(apply(&programmed, &ops), next);
        assert_eq!(meaning(&next), meaning(&step(&mut fresh(), &new).1));
    }
}

#[test]
fn a_frontend_that_stays_gets_its_new_rev_nat_entry_before_the_old_one_goes() {
    let desired = state(&[("web", [10, 96, 0, 10], vec![endpoint(2, true)])]);
    let (_, mut maps) = step(&mut fresh(), &desired);
    // Maps from somewhere else, whose rev-NAT entry does not say the frontend: it gets a new id,
    // and the frontend names the old one until then.
    let old_id = *maps.rev_nat.keys().next().unwrap();
    maps.rev_nat.get_mut(&old_id).unwrap().address = u32::from_ne_bytes([10, 96, 9, 9]);
    let mut ledger = Ledger::new(maps.clone(), NextIds::default(), Node::default());
    let (ops, next) = step(&mut ledger, &desired);
    assert_never_half_written(&maps, &ops, 0);
    assert!(!next.rev_nat.contains_key(&old_id), "{ops:?}");
    assert_eq!(meaning(&next), meaning(&step(&mut fresh(), &desired).1));
}

#[test]
fn after_a_failed_sync_the_next_plan_starts_from_what_the_maps_hold() {
    let desired = state(&[(
        "web",
        [10, 96, 0, 10],
        vec![endpoint(2, true), endpoint(3, true)],
    )]);
    let mut ledger = fresh();
    let plan = ledger.plan(&desired);
    // The ledger recorded one write, the kernel took two, and something left a stray backend.
    ledger.record(&plan.ops[0]);
    let mut maps = apply(&MapContents::default(), &plan.ops[..2]);
    let stray = BackendV4 {
        address: u32::from_ne_bytes([10, 244, 9, 9]),
        ..BackendV4::default()
    };
    maps.backends.insert(99, stray);
    ledger.reload(maps.clone(), Removals::Frontends);
    let (ops, contents) = step(&mut ledger, &desired);
    assert_eq!(apply(&maps, &ops), contents, "the plan applies to the maps");
    assert!(!contents.backends.contains_key(&99));
    assert_eq!(meaning(&contents), meaning(&step(&mut fresh(), &desired).1));
    // Ids go on past what the maps hold.
    let other = state(&[("web", [10, 96, 0, 10], vec![endpoint(7, true)])]);
    let (_, contents) = step(&mut ledger, &other);
    assert!(contents.backends.keys().all(|id| *id > 99), "{contents:?}");
}

/// The backends each frontend can reach: those of its slots 1..=count.
fn reachable(contents: &MapContents) -> BTreeMap<ServiceKeyV4, (u16, BTreeSet<u32>)> {
    (contents.services.iter())
        .filter(|(key, _)| key.slot == 0)
        .map(|(key, meta)| {
            let slots = (1..=meta.count)
                .filter_map(|slot| contents.services.get(&ServiceKeyV4 { slot, ..*key }));
            (*key, (meta.count, slots.map(|e| e.backend_id).collect()))
        })
        .collect()
}

/// Applies `ops` one at a time from `start` (ending at `end`) and checks that a packet never
/// meets a backend its frontend has neither before nor after the plan, and that a frontend
/// serving before and after never refuses connections (count 0) in between.
fn assert_only_old_or_new_backends(
    start: &MapContents,
    ops: &[MapOp],
    end: &MapContents,
    round: usize,
) {
    let (before, after) = (reachable(start), reachable(end));
    let mut contents = start.clone();
    for (at, op) in ops.iter().enumerate() {
        contents.record(op);
        for (key, (count, backends)) in reachable(&contents) {
            let context = || format!("round {round}, after write {at} ({op:?}) of {ops:?}");
            let old = before.get(&key).map(|(count, ids)| (*count, ids.clone()));
            let new = after.get(&key).map(|(count, ids)| (*count, ids.clone()));
            let (old_count, old_ids) = old.unwrap_or_default();
            let (new_count, new_ids) = new.unwrap_or_default();
            for id in &backends {
                assert!(
                    old_ids.contains(id) || new_ids.contains(id),
                    "{key:?} names backend {id}, which it has neither before nor after: {}",
                    context()
                );
            }
            assert!(
                count > 0 || old_count == 0 || new_count == 0,
                "{key:?} refuses connections mid-plan: {}",
                context()
            );
            // Without backends, the flags say whether to refuse or to drop (a Local frontend
            // whose endpoints are all on other nodes): as before the plan or as after it.
            let flags = contents.services[&key].flags;
            let empty_as = |c: &MapContents| {
                (c.services.get(&key)).is_some_and(|meta| meta.count == 0 && meta.flags == flags)
            };
            assert!(
                count > 0 || empty_as(start) || empty_as(end),
                "{key:?} has no backend and flags {flags:#x}, as neither before nor after: {}",
                context()
            );
        }
    }
}

/// The most entries each of the services, backends and rev-NAT maps held while `ops` were
/// applied one at a time from `start`.
fn peak_entries(start: &MapContents, ops: &[MapOp]) -> [usize; 3] {
    let sizes = |c: &MapContents| [c.services.len(), c.backends.len(), c.rev_nat.len()];
    let mut contents = start.clone();
    let mut peak = sizes(&contents);
    for op in ops {
        contents.record(op);
        for (peak, size) in peak.iter_mut().zip(sizes(&contents)) {
            *peak = (*peak).max(size);
        }
    }
    peak
}

/// Whether some frontend that serves before and after `start` -> `end` keeps none of its
/// backends: the plan after a full map leaves it as it is until its new backends are in.
fn replaces_every_backend_of_a_frontend(start: &MapContents, end: &MapContents) -> bool {
    let after = reachable(end);
    reachable(start).iter().any(|(key, (count, old))| {
        after
            .get(key)
            .is_some_and(|(_, new)| *count > 0 && !new.is_empty() && old.is_disjoint(new))
    })
}

#[test]
fn plans_after_a_full_map_shrink_what_stays_first_and_leave_the_ledger_right() {
    let node = Node {
        ips: vec![Ipv4Addr::new(192, 168, 100, 1)],
        name: Some("node-0".into()),
    };
    let mut rng = Lcg(11);
    let mut ledger = Ledger::new(MapContents::default(), NextIds::default(), node.clone());
    let mut desired = DesiredState::default();
    let mut shrunk = 0;
    for round in 0..1000 {
        change_one_service(&mut desired, &mut rng);
        // Every other plan follows a full map (and re-reads the maps); the plans in between
        // are incremental, and only right if the ledger's shares are what the maps hold.
        let after_full_map = round % 2 == 0;
        let previous = ledger.current().clone();
        if after_full_map {
            ledger.reload(previous.clone(), Removals::FrontendsAndSlots);
        }
        let (ops, next) = step(&mut ledger, &desired);
        assert_never_half_written(&previous, &ops, round);
        assert_only_old_or_new_backends(&previous, &ops, &next, round);
        if after_full_map {
            let shrinks = first_phase(&previous, &next, Removals::FrontendsAndSlots)
                != first_phase(&previous, &next, Removals::Frontends);
            shrunk += usize::from(shrinks);
            // It needs no more room than the maps hold before or after it.
            if !replaces_every_backend_of_a_frontend(&previous, &next) {
                let (before, after) = (peak_entries(&previous, &[]), peak_entries(&next, &[]));
                let peak = peak_entries(&previous, &ops);
                for map in 0..3 {
                    assert!(
                        peak[map] <= before[map].max(after[map]),
                        "round {round}: map {map} peaks at {peak:?}, {before:?} before, \
                         {after:?} after: {ops:?}"
                    );
                }
            }
        }
        let mut scratch = Ledger::new(MapContents::default(), NextIds::default(), node.clone());
        let (_, from_scratch) = step(&mut scratch, &desired);
        assert_eq!(meaning(&next), meaning(&from_scratch), "round {round}");
        let (again, _) = step(&mut ledger, &desired);
        assert!(again.is_empty(), "round {round}: replanned {again:?}");
    }
    assert!(
        shrunk > 50,
        "only {shrunk} plans shrank a frontend that stays"
    );
}

/// A ledger that programmed "web" (10.96.0.10) with `endpoints` (last octets), and the maps.
fn programmed(endpoints: &[u8]) -> (Ledger, MapContents) {
    let endpoints = endpoints.iter().map(|octet| endpoint(*octet, true));
    let desired = state(&[("web", [10, 96, 0, 10], endpoints.collect())]);
    let mut ledger = fresh();
    let (_, contents) = step(&mut ledger, &desired);
    (ledger, contents)
}

fn backend_id(contents: &MapContents, last_octet: u8) -> u32 {
    let address = u32::from_ne_bytes([10, 244, 0, last_octet]);
    let found = contents.backends.iter().find(|(_, b)| b.address == address);
    *found.unwrap().0
}

#[test]
fn after_a_full_map_a_replaced_backend_goes_before_its_successor_comes() {
    let next = state(&[(
        "web",
        [10, 96, 0, 10],
        vec![endpoint(3, true), endpoint(4, true), endpoint(5, true)],
    )]);
    for removals in [Removals::Frontends, Removals::FrontendsAndSlots] {
        let (mut ledger, before) = programmed(&[2, 3, 4]);
        let replaced = backend_id(&before, 2);
        let slot_1 = ServiceKeyV4 {
            slot: 1,
            ..frontend_key(Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Tcp)
        };
        assert_eq!(before.services[&slot_1].backend_id, replaced, "{before:?}");
        ledger.reload(before.clone(), removals);
        let (ops, after) = step(&mut ledger, &next);
        let deleted = ops
            .iter()
            .position(|op| *op == MapOp::DeleteBackend(replaced));
        let added = ops
            .iter()
            .position(|op| matches!(op, MapOp::PutBackend(..)));
        let (deleted, added) = (deleted.unwrap(), added.unwrap());
        if removals == Removals::Frontends {
            assert!(
                added < deleted,
                "with room to spare, plans stay as they were"
            );
            continue;
        }
        assert!(deleted < added, "{ops:?}");
        // Until then, only writes that need no room: overwrites, and deletes.
        let mut contents = before.clone();
        for op in &ops[..added] {
            if let MapOp::PutService(key, _) = op {
                assert!(contents.services.contains_key(key), "{op:?} in {ops:?}");
            } else {
                assert!(op.is_delete(), "{op:?} in {ops:?}");
            }
            contents.record(op);
        }
        // The slot of the replaced backend took a kept one: two slots, both kept backends.
        let kept = [backend_id(&before, 3), backend_id(&before, 4)];
        assert_eq!(
            reachable(&contents).into_values().next().unwrap(),
            (2, kept.into())
        );
        assert_never_half_written(&before, &ops, 0);
        assert_only_old_or_new_backends(&before, &ops, &after, 0);
        assert_eq!(meaning(&after), meaning(&step(&mut fresh(), &next).1));
    }
}

#[test]
fn after_a_full_map_a_frontend_that_keeps_none_of_its_backends_is_left_serving() {
    let (mut ledger, before) = programmed(&[2, 3]);
    ledger.reload(before.clone(), Removals::FrontendsAndSlots);
    let next = state(&[("web", [10, 96, 0, 10], vec![endpoint(4, true)])]);
    let (ops, after) = step(&mut ledger, &next);
    assert!(matches!(ops[0], MapOp::PutBackend(..)), "{ops:?}");
    assert_only_old_or_new_backends(&before, &ops, &after, 0);
    assert_eq!(meaning(&after), meaning(&step(&mut fresh(), &next).1));
}

#[test]
fn after_a_full_map_a_slot_whose_backend_the_maps_lack_is_not_kept_by_the_shrink() {
    let (mut ledger, mut before) = programmed(&[2, 3, 4]);
    // The maps read back lack the backend of slot 1 (removed by something other than the
    // syncer), which the desired state still has: it comes back in the second phase, and until
    // then no slot within the count may name it.
    before.backends.remove(&backend_id(&before, 2));
    ledger.reload(before.clone(), Removals::FrontendsAndSlots);
    let endpoints = [2, 3, 5].map(|octet| endpoint(octet, true));
    let next = state(&[("web", [10, 96, 0, 10], endpoints.into())]);
    let (ops, after) = step(&mut ledger, &next);
    assert_never_half_written(&before, &ops, 0);
    assert_eq!(meaning(&after), meaning(&step(&mut fresh(), &next).1));
}

#[test]
fn after_a_full_map_a_frontend_scaled_to_zero_frees_its_room_before_anything_is_added() {
    let web = |endpoints| ("web", [10, 96, 0, 10], endpoints);
    let api = |endpoints| ("api", [10, 96, 0, 11], endpoints);
    let before = state(&[api(vec![]), web(vec![endpoint(2, true), endpoint(3, true)])]);
    let mut ledger = fresh();
    let (_, programmed) = step(&mut ledger, &before);
    ledger.reload(programmed.clone(), Removals::FrontendsAndSlots);
    let after = state(&[api(vec![endpoint(4, true), endpoint(5, true)]), web(vec![])]);
    let (ops, next) = step(&mut ledger, &after);
    let first_put = ops
        .iter()
        .position(|op| matches!(op, MapOp::PutBackend(..)));
    let deletes = ops[..first_put.unwrap()].iter().filter(|op| op.is_delete());
    assert_eq!(
        deletes.count(),
        4,
        "web's two slots and two backends: {ops:?}"
    );
    assert_never_half_written(&programmed, &ops, 0);
    assert_only_old_or_new_backends(&programmed, &ops, &next, 0);
    assert_eq!(meaning(&next), meaning(&step(&mut fresh(), &after).1));
}

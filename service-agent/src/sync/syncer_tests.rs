//! The syncer against real BPF hash maps small enough to fill (root needed, as for the agent):
//! what the kernel answers (E2BIG from a full map, ENOENT from a delete of a missing key, the
//! count of a batch that stopped) is what the syncer must handle.

use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet},
    mem,
    net::Ipv4Addr,
    os::fd::AsFd as _,
};

use anyhow::Result;
use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, Map, MapData},
};
use service_common::{
    BackendV4, ConntrackEntryV4, ConntrackKeyV4, IPPROTO_TCP, IPPROTO_UDP, RevNatV4, ServiceEntry,
    ServiceKeyV4,
};

use super::{
    Ledger, MapContents, MapOp, Maps, NextIds, ServiceMap, SyncError, SyncReport, Syncer,
    plan::frontend_key,
    tests::{self, endpoint},
};
use crate::{
    dataplane::batch,
    model::{DesiredState, Endpoint, Node, Protocol},
};

/// A BPF hash map with room for `max_entries`, allocating as it fills (BPF_F_NO_PREALLOC) as
/// the agent's service maps do (root needed, as for the agent).
fn hash_map<K: Pod, V: Pod>(max_entries: u32) -> HashMap<MapData, K, V> {
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let fd = batch::test_map(
        BPF_MAP_TYPE_HASH,
        mem::size_of::<K>(),
        mem::size_of::<V>(),
        max_entries,
        BPF_F_NO_PREALLOC,
    );
    let map = Map::from_map_data(MapData::from_fd(fd).unwrap()).unwrap();
    HashMap::try_from(map).unwrap()
}

/// The service maps with the given room, conntrack, and the watermarks (kept in memory).
struct TestMaps {
    services: HashMap<MapData, ServiceKeyV4, ServiceEntry>,
    frontend_addresses: HashMap<MapData, u32, u32>,
    backends: HashMap<MapData, u32, BackendV4>,
    rev_nat: HashMap<MapData, u32, RevNatV4>,
    conntrack: HashMap<MapData, ConntrackKeyV4, ConntrackEntryV4>,
    room: Room,
    watermarks: NextIds,
    /// Every write in order: the watermarks written, or the kind of a run.
    writes: Vec<String>,
    /// How many of the next reads of conntrack fail.
    conntrack_read_failures: Cell<usize>,
    /// How many of the next runs of writes fail (EIO) before writing anything.
    write_failures: usize,
    /// When set, writes go one at a time, each followed by this check.
    watch: Option<Watch>,
}

/// What a packet may meet while a sync writes: for each frontend, the backends it had before
/// the sync and those the desired state gives it, and whether it serves (count > 0) in both.
struct Watch {
    allowed: BTreeMap<ServiceKeyV4, BTreeSet<BackendV4>>,
    serving: BTreeSet<ServiceKeyV4>,
    /// Writes checked.
    writes: usize,
}

impl Watch {
    /// Watches the way from what `maps` hold to `desired`.
    fn new(maps: &TestMaps, desired: &DesiredState) -> Self {
        let (before, after) = (
            reachable(&maps.read_contents().unwrap()),
            reachable(&from_scratch(desired)),
        );
        let mut allowed: BTreeMap<ServiceKeyV4, BTreeSet<BackendV4>> = BTreeMap::new();
        for (key, (_, backends)) in before.iter().chain(&after) {
            allowed.entry(*key).or_default().extend(backends);
        }
        let serving = (before.iter())
            .filter(|(key, (count, _))| {
                *count > 0 && after.get(key).is_some_and(|(count, _)| *count > 0)
            })
            .map(|(key, _)| *key)
            .collect();
        Self {
            allowed,
            serving,
            writes: 0,
        }
    }

    /// Panics, naming the write, when `held` exposes a backend that is gone or that the frontend
    /// has neither before nor after, or refuses connections on a frontend that serves before
    /// and after.
    fn check(&mut self, held: &MapContents, op: &MapOp) {
        self.writes += 1;
        let write = self.writes;
        for (key, meta) in held.services.iter().filter(|(key, _)| key.slot == 0) {
            assert!(
                meta.count > 0 || !self.serving.contains(key),
                "after write {write} ({op:?}): {key:?} refuses connections"
            );
            for slot in 1..=meta.count {
                let entry = held.services.get(&ServiceKeyV4 { slot, ..*key });
                let backend = entry.and_then(|entry| held.backends.get(&entry.backend_id));
                let Some(backend) = backend else {
                    panic!("after write {write} ({op:?}): slot {slot} of {key:?} names no backend");
                };
                assert!(
                    self.allowed
                        .get(key)
                        .is_some_and(|allowed| allowed.contains(backend)),
                    "after write {write} ({op:?}): {key:?} names {backend:?}, which it has neither \
                     before nor after"
                );
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Room {
    services: u32,
    backends: u32,
    rev_nat: u32,
    frontend_addresses: u32,
}

const ROOMY: Room = Room {
    services: 64,
    backends: 64,
    rev_nat: 64,
    frontend_addresses: 64,
};

impl TestMaps {
    fn new(room: Room) -> Self {
        Self {
            services: hash_map(room.services),
            frontend_addresses: hash_map(room.frontend_addresses),
            backends: hash_map(room.backends),
            rev_nat: hash_map(room.rev_nat),
            conntrack: hash_map(64),
            room,
            watermarks: NextIds::default(),
            writes: Vec::new(),
            conntrack_read_failures: Cell::new(0),
            write_failures: 0,
            watch: None,
        }
    }

    /// Writes a run of one kind with one batch.
    fn write(&mut self, run: &[MapOp]) -> Result<(), batch::Stopped> {
        let kind = format!("{:?}", run[0]);
        self.writes.push(kind[..kind.find('(').unwrap()].to_owned());
        match &run[0] {
            MapOp::PutService(..) => put_all(&self.services, run, |op| match op {
                MapOp::PutService(key, entry) => (*key, *entry),
                _ => unreachable!(),
            }),
            MapOp::PutBackend(..) => put_all(&self.backends, run, |op| match op {
                MapOp::PutBackend(id, backend) => (*id, *backend),
                _ => unreachable!(),
            }),
            MapOp::PutRevNat(..) => put_all(&self.rev_nat, run, |op| match op {
                MapOp::PutRevNat(id, rev_nat) => (*id, *rev_nat),
                _ => unreachable!(),
            }),
            MapOp::PutFrontendAddress(_) => put_all(&self.frontend_addresses, run, |op| match op {
                MapOp::PutFrontendAddress(address) => (*address, 1),
                _ => unreachable!(),
            }),
            MapOp::DeleteService(_) => delete_all(&self.services, run, |op| match op {
                MapOp::DeleteService(key) => *key,
                _ => unreachable!(),
            }),
            MapOp::DeleteBackend(_) => delete_all(&self.backends, run, |op| match op {
                MapOp::DeleteBackend(id) => *id,
                _ => unreachable!(),
            }),
            MapOp::DeleteRevNat(_) => delete_all(&self.rev_nat, run, |op| match op {
                MapOp::DeleteRevNat(id) => *id,
                _ => unreachable!(),
            }),
            MapOp::DeleteFrontendAddress(_) => {
                delete_all(&self.frontend_addresses, run, |op| match op {
                    MapOp::DeleteFrontendAddress(address) => *address,
                    _ => unreachable!(),
                })
            }
        }
    }
}

fn put_all<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    run: &[MapOp],
    entry: impl Fn(&MapOp) -> (K, V),
) -> Result<(), batch::Stopped> {
    let (keys, values): (Vec<K>, Vec<V>) = run.iter().map(entry).unzip();
    batch::update(map.map().fd().as_fd(), &keys, &values)
}

fn delete_all<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    run: &[MapOp],
    key: impl Fn(&MapOp) -> K,
) -> Result<(), batch::Stopped> {
    let keys: Vec<K> = run.iter().map(key).collect();
    batch::delete(map.map().fd().as_fd(), &keys)
}

impl Maps for TestMaps {
    fn read_contents(&self) -> Result<MapContents> {
        let mut contents = MapContents::default();
        for item in self.services.iter() {
            let (key, entry) = item?;
            contents.services.insert(key, entry);
        }
        for item in self.backends.iter() {
            let (id, backend) = item?;
            contents.backends.insert(id, backend);
        }
        for item in self.rev_nat.iter() {
            let (id, rev_nat) = item?;
            contents.rev_nat.insert(id, rev_nat);
        }
        for address in self.frontend_addresses.keys() {
            contents.frontend_addresses.insert(address?);
        }
        Ok(contents)
    }

    fn apply_run(&mut self, run: &[MapOp]) -> Result<(), batch::Stopped> {
        if self.write_failures > 0 {
            self.write_failures -= 1;
            return Err(batch::Stopped {
                written: 0,
                error: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        if self.watch.is_none() {
            return self.write(run);
        }
        for (at, op) in run.iter().enumerate() {
            (self.write(std::slice::from_ref(op))).map_err(|stopped| batch::Stopped {
                written: at + stopped.written,
                error: stopped.error,
            })?;
            let held = self.read_contents().unwrap();
            self.watch.as_mut().unwrap().check(&held, op);
        }
        Ok(())
    }

    fn capacity(&self, map: ServiceMap) -> u32 {
        match map {
            ServiceMap::Services => self.room.services,
            ServiceMap::Backends => self.room.backends,
            ServiceMap::RevNat => self.room.rev_nat,
            ServiceMap::FrontendAddresses => self.room.frontend_addresses,
        }
    }

    fn id_watermarks(&self) -> Result<NextIds> {
        Ok(self.watermarks)
    }

    fn set_id_watermarks(&mut self, next: NextIds) -> Result<()> {
        self.writes
            .push(format!("watermarks {} {}", next.backend, next.rev_nat));
        self.watermarks = next;
        Ok(())
    }

    fn forget_flows_where(
        &mut self,
        stale: &mut dyn FnMut(&ConntrackKeyV4, &ConntrackEntryV4) -> bool,
    ) -> Result<usize> {
        let failures = self.conntrack_read_failures.get();
        if failures > 0 {
            self.conntrack_read_failures.set(failures - 1);
            anyhow::bail!("reading CONNTRACK_V4: injected failure");
        }
        // Small chunks, so that a purge spans several.
        let swept = batch::delete_where(self.conntrack.map().fd().as_fd(), 2, stale)?;
        Ok(swept.deleted)
    }
}

/// ClusterIP Services (name, last octet of the ClusterIP, last octets of the endpoints).
fn state(services: &[(&str, u8, &[u8])]) -> DesiredState {
    let services: Vec<(&str, [u8; 4], Vec<Endpoint>)> = services
        .iter()
        .map(|(name, ip, endpoints)| {
            let endpoints = endpoints.iter().map(|octet| endpoint(*octet, true));
            (*name, [10, 96, 0, *ip], endpoints.collect())
        })
        .collect();
    tests::state(&services)
}

/// What a fresh agent would put in empty maps for `desired`, ids aside.
fn from_scratch(desired: &DesiredState) -> MapContents {
    let mut ledger = Ledger::new(MapContents::default(), NextIds::default(), Node::default());
    for op in ledger.plan(desired).ops {
        ledger.record(&op);
    }
    ledger.current().clone()
}

/// The maps' frontends with their backends' addresses and the backends held, without ids.
fn meaning(contents: &MapContents) -> Vec<(ServiceKeyV4, Vec<u32>)> {
    (contents.services.iter())
        .filter(|(key, _)| key.slot == 0)
        .map(|(key, meta)| {
            let mut backends: Vec<u32> = (1..=meta.count)
                .map(|slot| {
                    let entry = contents.services[&ServiceKeyV4 { slot, ..*key }];
                    contents.backends[&entry.backend_id].address
                })
                .collect();
            backends.sort_unstable();
            (*key, backends)
        })
        .collect()
}

/// The backends each frontend can reach (those of its slots 1..=count, that exist), and its
/// count.
fn reachable(contents: &MapContents) -> BTreeMap<ServiceKeyV4, (u16, BTreeSet<BackendV4>)> {
    (contents.services.iter())
        .filter(|(key, _)| key.slot == 0)
        .map(|(key, meta)| {
            let backends = (1..=meta.count)
                .filter_map(|slot| contents.services.get(&ServiceKeyV4 { slot, ..*key }))
                .filter_map(|entry| contents.backends.get(&entry.backend_id))
                .copied()
                .collect();
            (*key, (meta.count, backends))
        })
        .collect()
}

fn assert_serves(maps: &TestMaps, desired: &DesiredState) {
    let held = maps.read_contents().unwrap();
    let expected = from_scratch(desired);
    assert_eq!(meaning(&held), meaning(&expected));
    assert_eq!(held.services.len(), expected.services.len(), "{held:?}");
    assert_eq!(held.backends.len(), expected.backends.len(), "{held:?}");
    assert_eq!(held.rev_nat.len(), expected.rev_nat.len(), "{held:?}");
    assert_eq!(held.frontend_addresses, expected.frontend_addresses);
}

fn flow(port: u16, backend_id: u32, rev_nat_id: u32) -> (ConntrackKeyV4, ConntrackEntryV4) {
    udp_or_tcp_flow(IPPROTO_TCP, port, backend_id, rev_nat_id)
}

fn udp_or_tcp_flow(
    protocol: u8,
    port: u16,
    backend_id: u32,
    rev_nat_id: u32,
) -> (ConntrackKeyV4, ConntrackEntryV4) {
    let key = ConntrackKeyV4 {
        src_address: u32::from_ne_bytes([10, 244, 1, 1]),
        dst_address: u32::from_ne_bytes([10, 96, 0, 10]),
        src_port: port.to_be(),
        dst_port: 80u16.to_be(),
        protocol,
        ..ConntrackKeyV4::default()
    };
    let entry = ConntrackEntryV4 {
        backend_id,
        rev_nat_id,
        ..ConntrackEntryV4::default()
    };
    (key, entry)
}

fn flows(maps: &TestMaps) -> Vec<u16> {
    let mut ports: Vec<u16> = (maps.conntrack.keys())
        .map(|key| u16::from_be(key.unwrap().src_port))
        .collect();
    ports.sort_unstable();
    ports
}

#[test]
fn a_full_map_takes_what_the_plan_removes_before_what_it_adds() {
    // Room for exactly one Service with two endpoints, in every map.
    let mut maps = TestMaps::new(Room {
        services: 3,
        backends: 2,
        rev_nat: 1,
        frontend_addresses: 1,
    });
    let mut syncer = Syncer::new(&maps, Node::default()).unwrap();
    syncer
        .sync(&state(&[("old", 10, &[2, 3])]), &mut maps)
        .unwrap();
    let new = state(&[("new", 11, &[4, 5])]);
    let report = syncer.sync(&new, &mut maps).unwrap();
    assert_eq!(report.map_writes, 14, "7 entries out, 7 in");
    assert_serves(&maps, &new);
}

#[test]
fn a_full_map_is_one_error_naming_the_map_what_did_not_fit_and_whose() {
    let mut maps = TestMaps::new(Room {
        services: 2,
        ..ROOMY
    });
    let mut syncer = Syncer::new(&maps, Node::default()).unwrap();
    // Each Service needs a count and a slot: both slots fit, neither count does.
    let error = syncer
        .sync(&state(&[("a", 10, &[2]), ("b", 11, &[3])]), &mut maps)
        .unwrap_err();
    assert!(matches!(error, SyncError::MapFull(_)), "{error:?}");
    assert_eq!(
        error.to_string(),
        "SERVICES_V4 is full (2 entries): 2 of 4 writes did not fit, for default/a and 1 more \
         Service; the last good state keeps serving"
    );
    // No frontend was made reachable half-written: neither count was written.
    let held = maps.read_contents().unwrap();
    assert!(held.services.keys().all(|key| key.slot != 0), "{held:?}");
}

#[test]
fn after_a_failed_sync_the_next_one_rereads_the_maps_and_purges_stale_flows() {
    let mut maps = TestMaps::new(Room {
        services: 2,
        ..ROOMY
    });
    let mut syncer = Syncer::new(&maps, Node::default()).unwrap();
    let one = state(&[("b", 11, &[3])]);
    syncer.sync(&one, &mut maps).unwrap();
    let too_many = state(&[("a", 10, &[2]), ("b", 11, &[3])]);
    let error = syncer.sync(&too_many, &mut maps).unwrap_err();
    assert!(matches!(error, SyncError::MapFull(_)), "{error:?}");
    // Meanwhile something the syncer did not write: only reading the maps again finds it.
    let stray = RevNatV4 {
        address: u32::from_ne_bytes([10, 96, 9, 9]),
        port: 80u16.to_be(),
        _pad: 0,
    };
    maps.rev_nat.insert(77, stray, 0).unwrap();
    let (key, entry) = flow(40000, 1, 77);
    maps.conntrack.insert(key, entry, 0).unwrap();

    let report = syncer.sync(&one, &mut maps).unwrap();
    assert_serves(&maps, &one);
    assert_eq!(
        report.conntrack_purged, 1,
        "the flow of the stray rev-NAT id"
    );
    assert!(flows(&maps).is_empty());
}

#[test]
fn a_delete_that_finds_nothing_is_done_and_the_rest_of_its_run_goes_on() {
    let mut maps = TestMaps::new(ROOMY);
    let mut syncer = Syncer::new(&maps, Node::default()).unwrap();
    syncer
        .sync(&state(&[("web", 10, &[2, 3, 4])]), &mut maps)
        .unwrap();
    // The first of the three backend deletes will find nothing.
    let first_backend = maps.backends.keys().map(Result::unwrap).min().unwrap();
    maps.backends.remove(&first_backend).unwrap();

    let report = syncer.sync(&DesiredState::default(), &mut maps).unwrap();
    assert_eq!(report.already_deleted, 1);
    assert_eq!(maps.read_contents().unwrap(), MapContents::default());
    // Done, not retried: the next sync (which reads the maps again) has nothing to write.
    let report = syncer.sync(&DesiredState::default(), &mut maps).unwrap();
    assert_eq!(report, SyncReport::default());
}

#[test]
fn ids_go_past_the_watermarks_and_the_maps_and_are_recorded_before_use() {
    let mut maps = TestMaps::new(ROOMY);
    // A previous agent handed out ids up to 99 and 49, and left backend 120 in the maps.
    maps.watermarks = NextIds {
        backend: 100,
        rev_nat: 50,
    };
    let leftover = BackendV4 {
        address: u32::from_ne_bytes([10, 244, 9, 9]),
        ..BackendV4::default()
    };
    maps.backends.insert(120, leftover, 0).unwrap();
    let mut syncer = Syncer::new(&maps, Node::default()).unwrap();
    syncer
        .sync(&state(&[("web", 10, &[2])]), &mut maps)
        .unwrap();
    let held = maps.read_contents().unwrap();
    assert_eq!(held.backends.keys().copied().collect::<Vec<_>>(), [121]);
    assert_eq!(held.rev_nat.keys().copied().collect::<Vec<_>>(), [50]);
    assert_eq!(maps.writes[0], "watermarks 122 51", "{:?}", maps.writes);
    assert_eq!(
        maps.writes
            .iter()
            .filter(|w| w.starts_with("watermarks"))
            .count(),
        1
    );

    // No new id, no write; a new id, one write before the writes that use it.
    maps.writes.clear();
    syncer
        .sync(&state(&[("web", 10, &[2])]), &mut maps)
        .unwrap();
    syncer
        .sync(&state(&[("web", 10, &[2, 3, 4])]), &mut maps)
        .unwrap();
    assert_eq!(
        maps.writes,
        ["watermarks 124 51", "PutBackend", "PutService"],
        "slots and count are one run of puts"
    );

    // An agent started over these maps goes on from there, though backends 122 and 123 are gone
    // from the maps by then.
    syncer
        .sync(&state(&[("web", 10, &[2])]), &mut maps)
        .unwrap();
    let mut restarted = Syncer::new(&maps, Node::default()).unwrap();
    restarted
        .sync(&state(&[("web", 10, &[2, 5])]), &mut maps)
        .unwrap();
    let ids: Vec<u32> = maps.read_contents().unwrap().backends.into_keys().collect();
    assert_eq!(ids, [121, 124]);
}

#[test]
fn the_first_sync_purges_flows_that_name_ids_the_maps_do_not_hold() {
    let mut maps = TestMaps::new(ROOMY);
    let web = state(&[("web", 10, &[2])]);
    Syncer::new(&maps, Node::default())
        .unwrap()
        .sync(&web, &mut maps)
        .unwrap();
    let held = maps.read_contents().unwrap();
    let (backend, rev_nat) = (held.backends.keys().next(), held.rev_nat.keys().next());
    let (backend, rev_nat) = (*backend.unwrap(), *rev_nat.unwrap());
    for (port, backend_id, rev_nat_id) in [
        (40000, backend, rev_nat),
        (40001, backend + 100, rev_nat),
        (40002, backend, rev_nat + 100),
    ] {
        let (key, entry) = flow(port, backend_id, rev_nat_id);
        maps.conntrack.insert(key, entry, 0).unwrap();
    }

    // An agent restarted over these maps: nothing to write, two flows to forget (at the second
    // try, when the first cannot read conntrack).
    let mut restarted = Syncer::new(&maps, Node::default()).unwrap();
    maps.conntrack_read_failures.set(1);
    restarted.sync(&web, &mut maps).unwrap_err();
    let report = restarted.sync(&web, &mut maps).unwrap();
    assert_eq!(report.map_writes, 0);
    assert_eq!(report.conntrack_purged, 2);
    assert_eq!(flows(&maps), [40000]);

    // Later syncs that delete nothing leave conntrack alone.
    let (key, entry) = flow(40003, backend + 100, rev_nat);
    maps.conntrack.insert(key, entry, 0).unwrap();
    let report = restarted.sync(&web, &mut maps).unwrap();
    assert_eq!(report.conntrack_purged, 0);
}

#[test]
fn a_purge_that_failed_is_done_by_the_next_sync() {
    let mut maps = TestMaps::new(ROOMY);
    let mut syncer = Syncer::new(&maps, Node::default()).unwrap();
    // Two Services share a backend; one of them loses it, which ends its UDP flows only.
    syncer
        .sync(&state(&[("a", 10, &[2]), ("b", 11, &[2])]), &mut maps)
        .unwrap();
    let held = maps.read_contents().unwrap();
    let a = frontend_key(Ipv4Addr::new(10, 96, 0, 10), 80, Protocol::Tcp);
    let a_rev_nat = held.services[&a].rev_nat_id;
    let backend = *held.backends.keys().next().unwrap();
    for (protocol, port) in [(IPPROTO_UDP, 40000), (IPPROTO_TCP, 40001)] {
        let (key, entry) = udp_or_tcp_flow(protocol, port, backend, a_rev_nat);
        maps.conntrack.insert(key, entry, 0).unwrap();
    }
    let without = state(&[("a", 10, &[]), ("b", 11, &[2])]);
    maps.conntrack_read_failures.set(1);
    let error = syncer.sync(&without, &mut maps).unwrap_err();
    assert!(error.to_string().contains("injected failure"), "{error}");
    assert_eq!(flows(&maps), [40000, 40001]);

    // Nothing left to write; the purge still happens.
    let report = syncer.sync(&without, &mut maps).unwrap();
    assert_eq!((report.map_writes, report.conntrack_purged), (0, 1));
    assert_eq!(flows(&maps), [40001], "TCP flows finish on their backend");
}

/// The last octet of the address of the backend in `slot` of the ClusterIP 10.96.0.`ip`.
fn endpoint_in_slot(maps: &TestMaps, ip: u8, slot: u16) -> u8 {
    let held = maps.read_contents().unwrap();
    let frontend = frontend_key(Ipv4Addr::new(10, 96, 0, ip), 80, Protocol::Tcp);
    let entry = held.services[&ServiceKeyV4 { slot, ..frontend }];
    held.backends[&entry.backend_id].address.to_ne_bytes()[3]
}

#[test]
fn a_full_backend_map_takes_a_replaced_endpoint_on_the_retry() {
    // Room for web's three backends, one of which api shares.
    let mut maps = TestMaps::new(Room {
        backends: 3,
        ..ROOMY
    });
    let mut syncer = Syncer::new(&maps, Node::default()).unwrap();
    let before = state(&[("api", 11, &[4]), ("web", 10, &[2, 3, 4])]);
    syncer.sync(&before, &mut maps).unwrap();
    // A rolling update replaces the pod in web's first slot: the other two must move down.
    assert_eq!(endpoint_in_slot(&maps, 10, 1), 2);
    let after = state(&[("api", 11, &[4]), ("web", 10, &[3, 4, 5])]);

    // Planned as usual, the new backend comes before the old one goes: no room.
    let error = syncer.sync(&after, &mut maps).unwrap_err();
    let SyncError::MapFull(full) = &error else {
        panic!("{error:?}");
    };
    assert_eq!(full.map, "BACKENDS_V4");
    assert_serves(&maps, &before);

    // The retry shrinks web to the backends it keeps first.
    maps.watch = Some(Watch::new(&maps, &after));
    syncer.sync(&after, &mut maps).unwrap();
    assert_serves(&maps, &after);
    assert!(
        maps.watch.take().unwrap().writes >= 8,
        "the plan was checked write by write"
    );

    // What the ledger recorded is what the maps hold: the next change is planned from it.
    let next = state(&[("api", 11, &[4]), ("web", 10, &[4, 5])]);
    syncer.sync(&next, &mut maps).unwrap();
    assert_serves(&maps, &next);
}

#[test]
fn a_full_service_map_lets_one_service_shrink_as_another_grows_on_the_retry() {
    // Room for a count and four slots, and a count and two: then two and four.
    let mut maps = TestMaps::new(Room {
        services: 8,
        ..ROOMY
    });
    let mut syncer = Syncer::new(&maps, Node::default()).unwrap();
    let before = state(&[("a", 10, &[2, 3, 4, 5]), ("b", 11, &[6, 7])]);
    syncer.sync(&before, &mut maps).unwrap();
    let after = state(&[("a", 10, &[2, 3]), ("b", 11, &[6, 7, 8, 9])]);

    let error = syncer.sync(&after, &mut maps).unwrap_err();
    let SyncError::MapFull(full) = &error else {
        panic!("{error:?}");
    };
    assert_eq!(full.map, "SERVICES_V4");
    let held = maps.read_contents().unwrap();
    assert_eq!(meaning(&held), meaning(&from_scratch(&before)), "as before");

    maps.watch = Some(Watch::new(&maps, &after));
    syncer.sync(&after, &mut maps).unwrap();
    assert_serves(&maps, &after);
    assert!(
        maps.watch.take().unwrap().writes >= 7,
        "the plan was checked write by write"
    );
}

#[test]
fn only_the_retry_after_a_full_map_removes_a_replaced_backend_first() {
    let mut maps = TestMaps::new(ROOMY);
    let mut syncer = Syncer::new(&maps, Node::default()).unwrap();
    syncer
        .sync(&state(&[("web", 10, &[2, 3, 4])]), &mut maps)
        .unwrap();
    let swap = state(&[("web", 10, &[3, 4, 5])]);
    maps.write_failures = 1;
    let error = syncer.sync(&swap, &mut maps).unwrap_err();
    assert!(matches!(error, SyncError::Write { .. }), "{error:?}");
    maps.writes.clear();
    syncer.sync(&swap, &mut maps).unwrap();
    assert_eq!(
        maps.writes,
        ["PutBackend", "PutService", "DeleteBackend"],
        "the new backend in slot 1, as any plan with room does"
    );
    assert_serves(&maps, &swap);
}

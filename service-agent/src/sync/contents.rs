//! What the service maps hold, and the ordered writes that turn one such content into another.
//! Pure data: the kernel is only touched by `sync::Syncer`.

use std::collections::{BTreeMap, BTreeSet};

use service_common::{BackendV4, RevNatV4, ServiceEntry, ServiceKeyV4};

/// What the service maps hold, or should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<ServiceKeyV4, ServiceEntry>,
    pub backends: BTreeMap<u32, BackendV4>,
    pub rev_nat: BTreeMap<u32, RevNatV4>,
    /// The address of every frontend, for the packet path's first lookup. The ledger keeps it
    /// (an address is shared by the frontends of many services: every nodePort of a node IP), so
    /// a service's share leaves it empty and [`diff`] ignores it.
    pub frontend_addresses: BTreeSet<u32>,
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

    /// Adds what `other` holds (the share of another service).
    pub fn extend(&mut self, other: &MapContents) {
        self.services.extend(&other.services);
        self.backends.extend(&other.backends);
        self.rev_nat.extend(&other.rev_nat);
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
            MapOp::PutFrontendAddress(address) => drop(self.frontend_addresses.insert(*address)),
            MapOp::DeleteFrontendAddress(address) => drop(self.frontend_addresses.remove(address)),
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
    /// Comes before the first frontend with the address, and goes after the last one.
    PutFrontendAddress(u32),
    DeleteFrontendAddress(u32),
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

    pub fn backend(&mut self) -> u32 {
        self.next_backend_id += 1;
        self.next_backend_id - 1
    }

    pub fn rev_nat(&mut self) -> u32 {
        self.next_rev_nat_id += 1;
        self.next_rev_nat_id - 1
    }
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

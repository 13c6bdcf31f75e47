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

/// The maps a plan writes, one per kind of [`MapContents`] entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceMap {
    Services,
    Backends,
    RevNat,
    FrontendAddresses,
}

impl MapOp {
    pub fn map(&self) -> ServiceMap {
        match self {
            MapOp::PutService(..) | MapOp::DeleteService(_) => ServiceMap::Services,
            MapOp::PutBackend(..) | MapOp::DeleteBackend(_) => ServiceMap::Backends,
            MapOp::PutRevNat(..) | MapOp::DeleteRevNat(_) => ServiceMap::RevNat,
            MapOp::PutFrontendAddress(_) | MapOp::DeleteFrontendAddress(_) => {
                ServiceMap::FrontendAddresses
            }
        }
    }

    /// Deletes free room; puts may need it.
    pub fn is_delete(&self) -> bool {
        matches!(
            self,
            MapOp::DeleteService(_)
                | MapOp::DeleteRevNat(_)
                | MapOp::DeleteBackend(_)
                | MapOp::DeleteFrontendAddress(_)
        )
    }
}

/// The next backend id and the next rev-NAT id to hand out. Recorded in the pinned
/// `ID_WATERMARKS` map before any write uses an id below them, so that an agent started over the
/// maps (after a crash, an upgrade) never hands out an id a conntrack entry may still name, even
/// one whose backend or frontend is gone from the maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextIds {
    pub backend: u32,
    pub rev_nat: u32,
}

/// Ids that must never be handed out twice while a conntrack entry could still name them.
#[derive(Clone, Debug)]
pub struct IdAllocator {
    next: NextIds,
}

impl IdAllocator {
    /// Starts past every id the maps hold and past the ids a previous agent recorded (0: none).
    pub fn resume(contents: &MapContents, recorded: NextIds) -> Self {
        let mut ids = Self {
            next: NextIds {
                backend: recorded.backend.max(1),
                rev_nat: recorded.rev_nat.max(1),
            },
        };
        ids.skip_past(contents);
        ids
    }

    /// Moves past every id `contents` holds: ids never go back, whatever the maps say.
    pub fn skip_past(&mut self, contents: &MapContents) {
        let after = |ids: Option<&u32>| ids.map_or(0, |id| id.saturating_add(1));
        let next = &mut self.next;
        next.backend = next
            .backend
            .max(after(contents.backends.keys().next_back()));
        next.rev_nat = next.rev_nat.max(after(contents.rev_nat.keys().next_back()));
    }

    /// The ids not handed out yet: what `ID_WATERMARKS` must hold before any of the others is
    /// written to the maps.
    pub fn next(&self) -> NextIds {
        self.next
    }

    pub fn backend(&mut self) -> u32 {
        self.next.backend += 1;
        self.next.backend - 1
    }

    pub fn rev_nat(&mut self) -> u32 {
        self.next.rev_nat += 1;
        self.next.rev_nat - 1
    }
}

/// What a plan's first phase deletes on the way from `current` to `desired`: every frontend
/// `desired` does not have (its slot-0 key and all its slots), the rev-NAT entries that neither
/// `desired` nor a remaining frontend names, and the backends that neither `desired` nor a
/// remaining slot names.
///
/// The first phase only deletes, in [`diff`]'s order, so it needs no room in any map and exposes
/// no half-written frontend; the second phase, the rest of the diff, then finds the room the
/// first freed (a full map no longer fails a plan that removes as much as it adds). A backend or
/// rev-NAT entry that `desired` keeps (one moving from a deleted Service to another, with its
/// id) stays in place: deleting and re-adding it would cut its flows.
pub fn dropped(current: &MapContents, desired: &MapContents) -> MapContents {
    let frontend_dropped = |key: &ServiceKeyV4| {
        !desired
            .services
            .contains_key(&ServiceKeyV4 { slot: 0, ..*key })
    };
    let mut dropped = MapContents::default();
    let unwanted_rev_nat: BTreeSet<u32> = (current.rev_nat.keys())
        .filter(|id| !desired.rev_nat.contains_key(id))
        .copied()
        .collect();
    let unwanted_backends: BTreeSet<u32> = (current.backends.keys())
        .filter(|id| !desired.backends.contains_key(id))
        .copied()
        .collect();
    let (mut named_rev_nat, mut named_backends) = (BTreeSet::new(), BTreeSet::new());
    for (key, entry) in &current.services {
        if frontend_dropped(key) {
            dropped.services.insert(*key, *entry);
        } else if key.slot == 0 && unwanted_rev_nat.contains(&entry.rev_nat_id) {
            named_rev_nat.insert(entry.rev_nat_id);
        } else if key.slot != 0 && unwanted_backends.contains(&entry.backend_id) {
            named_backends.insert(entry.backend_id);
        }
    }
    for id in unwanted_rev_nat.difference(&named_rev_nat) {
        dropped.rev_nat.insert(*id, current.rev_nat[id]);
    }
    for id in unwanted_backends.difference(&named_backends) {
        dropped.backends.insert(*id, current.backends[id]);
    }
    dropped
}

impl MapContents {
    /// Whether `op` deletes an entry this holds.
    pub fn deleted_by(&self, op: &MapOp) -> bool {
        match op {
            MapOp::DeleteService(key) => self.services.contains_key(key),
            MapOp::DeleteRevNat(id) => self.rev_nat.contains_key(id),
            MapOp::DeleteBackend(id) => self.backends.contains_key(id),
            _ => false,
        }
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

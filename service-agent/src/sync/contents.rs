//! What the service maps hold, and the ordered writes that turn one such content into another.
//! Pure data: the kernel is only touched by `sync::Syncer`.

use std::collections::{BTreeMap, BTreeSet};

use service_common::{
    BACKENDS_V4_MAP, BackendV4, FRONTEND_ADDRESSES_V4_MAP, REV_NAT_V4_MAP, RevNatV4,
    SERVICES_V4_MAP, ServiceEntry, ServiceKeyV4,
};

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

impl ServiceMap {
    /// The map's name, as it is pinned and as messages name it.
    pub fn name(self) -> &'static str {
        match self {
            ServiceMap::Services => SERVICES_V4_MAP,
            ServiceMap::Backends => BACKENDS_V4_MAP,
            ServiceMap::RevNat => REV_NAT_V4_MAP,
            ServiceMap::FrontendAddresses => FRONTEND_ADDRESSES_V4_MAP,
        }
    }
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

/// What a plan's first phase removes, before its second phase adds anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removals {
    /// Every frontend that goes away, with the rev-NAT entries and backends only it named.
    Frontends,
    /// That, and every backend a frontend that stays loses: what a plan does after a map was
    /// full, since a backend replaced in a full map must go before its successor fits.
    FrontendsAndSlots,
}

/// What the maps hold after a plan's first phase on the way from `current` to `desired`: the
/// rest of the plan is [`diff`] from there to `desired`, and the first phase itself is [`diff`]
/// from `current` to here, which only deletes and overwrites existing keys. So it needs no room
/// in any map and exposes no half-written frontend, and the second phase finds the room the
/// first freed (a full map no longer fails a plan that removes as much as it adds).
///
/// Every frontend `desired` does not have goes (its slot-0 key and all its slots). With
/// [`Removals::FrontendsAndSlots`], each frontend that stays is also shrunk to the backends it
/// keeps (see `shrink`). Then the rev-NAT entries and backends go that neither `desired` nor what
/// remains names. A backend or rev-NAT entry that `desired` keeps (one moving from a deleted
/// Service to another, with its id) stays in place: deleting and re-adding it would cut its
/// flows.
pub fn first_phase(
    current: &MapContents,
    desired: &MapContents,
    removals: Removals,
) -> MapContents {
    let mut after = current.clone();
    after.services.retain(|key, _| {
        desired
            .services
            .contains_key(&ServiceKeyV4 { slot: 0, ..*key })
    });
    if removals == Removals::FrontendsAndSlots {
        let staying: Vec<ServiceKeyV4> = (after.services.keys())
            .filter(|key| key.slot == 0)
            .copied()
            .collect();
        for frontend in staying {
            shrink(&mut after, &frontend, desired);
        }
    }
    let (mut named_rev_nat, mut named_backends) = (BTreeSet::new(), BTreeSet::new());
    for (key, entry) in &after.services {
        if key.slot == 0 {
            named_rev_nat.insert(entry.rev_nat_id);
        } else {
            named_backends.insert(entry.backend_id);
        }
    }
    (after.rev_nat).retain(|id, _| named_rev_nat.contains(id) || desired.rev_nat.contains_key(id));
    (after.backends)
        .retain(|id, _| named_backends.contains(id) || desired.backends.contains_key(id));
    after
}

/// Shrinks `frontend` in `contents` to the backends it keeps, those of its reachable slots that
/// `desired` also gives it: they are moved into slots 1..=k (overwriting slots that exist), its
/// count lowered to k, and its slots above k removed, so that at no point may a packet meet a
/// backend that is gone or that neither the old nor the new frontend has. A kept backend whose
/// slot in `desired` is within 1..=k takes that one, others keep theirs when they can: the
/// second phase then has less to move. Conntrack names backends, not slots, so moving one cuts
/// no flow. A frontend that keeps none of its backends is left as it is (a count of 0 would
/// refuse connections until the second phase), unless `desired` gives it none either.
fn shrink(contents: &mut MapContents, frontend: &ServiceKeyV4, desired: &MapContents) {
    let (Some(meta), Some(desired_meta)) = (
        contents.services.get(frontend).copied(),
        desired.services.get(frontend).copied(),
    ) else {
        return;
    };
    let slot_of = |contents: &MapContents, slot: u16| {
        let key = ServiceKeyV4 { slot, ..*frontend };
        contents.services.get(&key).map(|entry| entry.backend_id)
    };
    // Where `desired` puts each of the frontend's backends.
    let wanted: BTreeMap<u32, u16> = (1..=desired_meta.count)
        .filter_map(|slot| Some((slot_of(desired, slot)?, slot)))
        .collect();
    // The kept backends, with their slot now.
    let mut kept: Vec<(u32, u16)> = Vec::new();
    let mut seen = BTreeSet::new();
    for slot in 1..=meta.count {
        if let Some(id) = slot_of(contents, slot)
            && wanted.contains_key(&id)
            && contents.backends.contains_key(&id)
            && seen.insert(id)
        {
            kept.push((id, slot));
        }
    }
    if kept.is_empty() && desired_meta.count > 0 {
        return;
    }
    let k = kept.len() as u16;
    let mut slots: Vec<Option<u32>> = vec![None; kept.len()];
    let mut placed = BTreeSet::new();
    for (id, _) in &kept {
        if take(&mut slots, wanted[id], *id) {
            placed.insert(*id);
        }
    }
    for (id, slot) in &kept {
        if !placed.contains(id) && take(&mut slots, *slot, *id) {
            placed.insert(*id);
        }
    }
    let mut homeless = (kept.iter())
        .map(|(id, _)| *id)
        .filter(|id| !placed.contains(id));
    for slot in slots.iter_mut().filter(|slot| slot.is_none()) {
        *slot = homeless.next();
    }
    contents
        .services
        .retain(|key, _| ServiceKeyV4 { slot: 0, ..*key } != *frontend || key.slot <= k);
    for (slot, id) in (1..).zip(slots) {
        let entry = ServiceEntry {
            backend_id: id.expect("k slots for k backends"),
            ..ServiceEntry::default()
        };
        contents
            .services
            .insert(ServiceKeyV4 { slot, ..*frontend }, entry);
    }
    let flags = match k {
        // With no backend, the flags only say whether to refuse or drop: as `desired` says.
        0 => desired_meta.flags,
        _ => meta.flags,
    };
    let shrunk = ServiceEntry {
        count: k,
        flags,
        ..meta
    };
    contents.services.insert(*frontend, shrunk);
}

/// Puts `id` in `slot` (1-based) if that slot is there and free.
fn take(slots: &mut [Option<u32>], slot: u16, id: u32) -> bool {
    match usize::from(slot)
        .checked_sub(1)
        .and_then(|at| slots.get_mut(at))
    {
        Some(free @ None) => {
            *free = Some(id);
            true
        }
        _ => false,
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

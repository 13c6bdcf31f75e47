//! What each Service put in the maps, so that a change re-plans only the Services it touched:
//! one endpoint change among 10,000 Services writes (and costs) what that Service owns.
//!
//! The maps' content is the union of every Service's share. A share depends on the Service, the
//! node, the current ids and slots (kept when unchanged), and which contested frontends the
//! Service owns. Ownership is the only link between Services: when a Service's frontends change,
//! every Service asking for one of them is re-planned too. Backends are shared by id; a backend
//! entry lives while some share holds it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, hash_map::Entry},
    sync::Arc,
    time::SystemTime,
};

use service_common::{BackendV4, ServiceKeyV4};

use super::{
    contents::{IdAllocator, MapContents, MapOp, NextIds, Removals, diff, first_phase},
    plan::{PlanContext, plan_service, wanted_frontends},
};
use crate::model::{DesiredState, Node, Service, ServiceName};

/// Who asks for a frontend. The oldest Service owns it (then the first by name), as the API
/// server's own allocators let the first holder keep an address: a new Service listing an
/// external IP already in use never takes it from the one serving it.
type Claimant = (SystemTime, ServiceName);

/// One Service as last planned.
struct Planned {
    service: Arc<Service>,
    /// Every frontend it asks for, owned or not.
    frontends: BTreeSet<ServiceKeyV4>,
    /// What it put in the maps.
    share: MapContents,
}

/// The writes of one sync, and which flows they take away from their frontend.
#[derive(Debug, Default)]
pub struct Plan {
    pub ops: Vec<MapOp>,
    /// (rev-NAT id, backend id) pairs that no frontend holds anymore.
    pub removed_pairs: BTreeSet<(u32, u32)>,
}

pub struct Ledger {
    node: Node,
    /// What the maps hold: read at start and after a failed sync, then kept in step with every
    /// successful write.
    current: MapContents,
    ids: IdAllocator,
    /// The id of each backend some share holds (at start: each backend the maps hold).
    backend_ids: HashMap<BackendV4, u32>,
    /// How many shares hold each backend id.
    backend_users: HashMap<u32, usize>,
    /// How many frontends (slot-0 keys) of all shares have each address.
    address_users: HashMap<u32, usize>,
    planned: BTreeMap<ServiceName, Planned>,
    claims: HashMap<ServiceKeyV4, BTreeSet<Claimant>>,
    /// Set at start and after a reload: the next plan compares the whole of the maps with the
    /// whole of the shares (removing what a previous agent or a failed sync left), not only
    /// changed shares, and removes this much first.
    full: Option<Removals>,
}

impl Ledger {
    /// Starts from what the maps hold, handing out ids past those and past `recorded` (the
    /// watermarks a previous agent left beside the maps).
    pub fn new(current: MapContents, recorded: NextIds, node: Node) -> Self {
        Ledger {
            node,
            ids: IdAllocator::resume(&current, recorded),
            backend_ids: current.backends.iter().map(|(id, b)| (*b, *id)).collect(),
            current,
            backend_users: HashMap::new(),
            address_users: HashMap::new(),
            planned: BTreeMap::new(),
            claims: HashMap::new(),
            full: Some(Removals::Frontends),
        }
    }

    pub fn current(&self) -> &MapContents {
        &self.current
    }

    /// Keeps the ledger in step with a write that reached the maps.
    pub fn record(&mut self, op: &MapOp) {
        self.current.record(op);
    }

    /// Takes `current` (read back from the maps after a failed sync) as what the maps hold:
    /// the next plan compares it whole with the shares, and its first phase removes what
    /// `removals` says. Ids keep going up.
    pub fn reload(&mut self, current: MapContents, removals: Removals) {
        self.ids.skip_past(&current);
        self.current = current;
        self.full = Some(removals);
    }

    /// The ids not handed out yet (see [`NextIds`]).
    pub fn next_ids(&self) -> NextIds {
        self.ids.next()
    }

    /// The Services whose planned shares hold what `ops` put: whom a write that did not fit
    /// leaves out. A scan of every share, for the failure path only.
    pub fn services_writing(&self, ops: &[MapOp]) -> Vec<ServiceName> {
        let (mut services, mut backends, mut rev_nat, mut addresses) = (
            HashSet::new(),
            HashSet::new(),
            HashSet::new(),
            HashSet::new(),
        );
        for op in ops {
            match op {
                MapOp::PutService(key, _) => drop(services.insert(*key)),
                MapOp::PutBackend(id, _) => drop(backends.insert(*id)),
                MapOp::PutRevNat(id, _) => drop(rev_nat.insert(*id)),
                MapOp::PutFrontendAddress(address) => drop(addresses.insert(*address)),
                _ => {}
            }
        }
        (self.planned.iter())
            .filter(|(_, planned)| {
                let share = &planned.share;
                share.services.keys().any(|key| services.contains(key))
                    || frontend_addresses(share).any(|address| addresses.contains(&address))
                    || share.backends.keys().any(|id| backends.contains(id))
                    || share.rev_nat.keys().any(|id| rev_nat.contains(id))
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The writes that bring the maps to `desired`, in an order that never exposes a
    /// half-written frontend, removals first (see [`first_phase`]). The ledger takes `desired` as
    /// planned at once; the caller records each write that succeeds, and after a failed one
    /// reloads what the maps hold.
    pub fn plan(&mut self, desired: &DesiredState) -> Plan {
        let changed = self.changed_services(desired);
        let (dirty, mut new_frontends) = self.update_claims(&changed, desired);
        // A full plan compares the whole maps below: the shares need not be collected here.
        let full = self.full.take();

        let mut before = MapContents::default();
        let mut after = MapContents::default();
        let mut user_changes: HashMap<u32, isize> = HashMap::new();
        let mut address_changes: HashMap<u32, isize> = HashMap::new();
        for name in &dirty {
            let previous = self.planned.remove(name);
            if let Some(previous) = &previous {
                for id in previous.share.backends.keys() {
                    *user_changes.entry(*id).or_default() -= 1;
                }
                for address in frontend_addresses(&previous.share) {
                    *address_changes.entry(address).or_default() -= 1;
                }
                if full.is_none() {
                    before.extend(&previous.share);
                }
            }
            let Some(service) = desired.services.get(name) else {
                continue;
            };
            let claimant = (service.created, name.clone());
            let claims = &self.claims;
            let owns =
                |key: &ServiceKeyV4| claims.get(key).and_then(BTreeSet::first) == Some(&claimant);
            let mut cx = PlanContext {
                current: &self.current,
                ids: &mut self.ids,
                backend_ids: &mut self.backend_ids,
            };
            let share = plan_service(service, &self.node, owns, &mut cx);
            for id in share.backends.keys() {
                *user_changes.entry(*id).or_default() += 1;
            }
            for address in frontend_addresses(&share) {
                *address_changes.entry(address).or_default() += 1;
            }
            if full.is_none() {
                after.extend(&share);
            }
            // A Service re-planned only because another one's claims moved asks for the same
            // frontends as before.
            let frontends = (new_frontends.remove(name))
                .or_else(|| previous.map(|previous| previous.frontends))
                .unwrap_or_else(|| wanted_frontends(service, &self.node));
            let planned = Planned {
                service: service.clone(),
                frontends,
                share,
            };
            self.planned.insert(name.clone(), planned);
        }
        let (added, removed) = count_users(&mut self.backend_users, user_changes);
        let (mut new_addresses, mut gone_addresses) =
            count_users(&mut self.address_users, address_changes);
        before.backends.retain(|id, _| removed.contains(id));
        for backend in before.backends.values() {
            self.backend_ids.remove(backend);
        }
        after.backends.retain(|id, _| added.contains(id));

        if full.is_some() {
            before = self.current.clone();
            after = MapContents::default();
            for planned in self.planned.values() {
                after.extend(&planned.share);
            }
            let users = &self.backend_users;
            self.backend_ids.retain(|_, id| users.contains_key(id));
            let programmed = &self.current.frontend_addresses;
            new_addresses = (self.address_users.keys())
                .filter(|address| !programmed.contains(address))
                .copied()
                .collect();
            gone_addresses = (programmed.iter())
                .filter(|address| !self.address_users.contains_key(address))
                .copied()
                .collect();
        }
        let removed_pairs = before
            .frontend_backends()
            .difference(&after.frontend_backends())
            .copied()
            .collect();
        // Removals first, so that what they free is there for what is added: the first phase
        // only deletes (and overwrites), the second is the rest of the diff. An address goes
        // once the last frontend that has it is gone (all of them are, after the first phase),
        // and is findable before the first one that has it.
        let removals = full.unwrap_or(Removals::Frontends);
        let cleared = first_phase(&before, &after, removals);
        let mut ops = diff(&before, &cleared);
        ops.extend(gone_addresses.into_iter().map(MapOp::DeleteFrontendAddress));
        ops.extend(new_addresses.into_iter().map(MapOp::PutFrontendAddress));
        ops.extend(diff(&cleared, &after));
        Plan { ops, removed_pairs }
    }

    /// The Services added, changed or removed since the last plan: both maps are sorted by name,
    /// so one walk finds them; an unchanged Service is usually the same `Arc`.
    fn changed_services(&self, desired: &DesiredState) -> Vec<ServiceName> {
        let mut changed = Vec::new();
        let mut planned = self.planned.iter().peekable();
        for (name, service) in &desired.services {
            while let Some((gone, _)) = planned.next_if(|(old, _)| *old < name) {
                changed.push(gone.clone());
            }
            match planned.next_if(|(old, _)| *old == name) {
                Some((_, old)) if Arc::ptr_eq(&old.service, service) || old.service == *service => {
                }
                _ => changed.push(name.clone()),
            }
        }
        changed.extend(planned.map(|(gone, _)| gone.clone()));
        changed
    }

    /// Moves the claims of `changed` Services to their new frontends, and returns the Services
    /// to re-plan (the changed ones and every other claimant of a frontend they left or asked
    /// for: its owner may have changed) with the frontends each changed one now asks for.
    fn update_claims(
        &mut self,
        changed: &[ServiceName],
        desired: &DesiredState,
    ) -> (
        BTreeSet<ServiceName>,
        HashMap<ServiceName, BTreeSet<ServiceKeyV4>>,
    ) {
        let mut touched = BTreeSet::new();
        let mut new_frontends = HashMap::new();
        for name in changed {
            if let Some(previous) = self.planned.get(name) {
                let claimant = (previous.service.created, name.clone());
                for key in &previous.frontends {
                    if let Entry::Occupied(mut claims) = self.claims.entry(*key) {
                        claims.get_mut().remove(&claimant);
                        if claims.get().is_empty() {
                            claims.remove();
                        }
                    }
                    touched.insert(*key);
                }
            }
            if let Some(service) = desired.services.get(name) {
                let claimant = (service.created, name.clone());
                let frontends = wanted_frontends(service, &self.node);
                for key in &frontends {
                    self.claims
                        .entry(*key)
                        .or_default()
                        .insert(claimant.clone());
                    touched.insert(*key);
                }
                new_frontends.insert(name.clone(), frontends);
            }
        }
        let mut dirty: BTreeSet<ServiceName> = changed.iter().cloned().collect();
        for key in &touched {
            let claimants = self.claims.get(key).into_iter().flatten();
            dirty.extend(claimants.map(|(_, name)| name.clone()));
        }
        (dirty, new_frontends)
    }
}

/// The addresses of `share`'s frontends, once per frontend.
fn frontend_addresses(share: &MapContents) -> impl Iterator<Item = u32> + '_ {
    (share.services.keys())
        .filter(|key| key.slot == 0)
        .map(|key| key.address)
}

/// Applies `changes` to how many users each key has, and returns the keys that gained their
/// first user and those that lost their last.
fn count_users(
    users: &mut HashMap<u32, usize>,
    changes: HashMap<u32, isize>,
) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let (mut added, mut removed) = (BTreeSet::new(), BTreeSet::new());
    for (key, change) in changes {
        let before = users.get(&key).copied().unwrap_or(0);
        let after = before.saturating_add_signed(change);
        if after == 0 {
            users.remove(&key);
            if before > 0 {
                removed.insert(key);
            }
        } else {
            users.insert(key, after);
            if before == 0 {
                added.insert(key);
            }
        }
    }
    (added, removed)
}

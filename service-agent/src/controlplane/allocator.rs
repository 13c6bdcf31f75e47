//! Cluster IPs for Services that do not ask for one. The API server records them in the Service
//! object; without one, the agent records them in `<state_dir>/clusterips.json`, because clients
//! and DNS keep using a Service's IP and it must not move on a reload or an agent restart.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{
    Ipv4Cidr,
    state_file::{read_if_present, write_atomically},
};
use crate::model::ServiceName;

const STATE_FILE_NAME: &str = "clusterips.json";

pub struct ClusterIpAllocator {
    cidr: Ipv4Cidr,
    /// None when nothing may be written (the `check` command).
    state_file: Option<PathBuf>,
    allocations: BTreeMap<ServiceName, Ipv4Addr>,
    /// What the state file holds, so that an unchanged allocation is not rewritten.
    saved: BTreeMap<ServiceName, Ipv4Addr>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    allocations: Vec<StoredAllocation>,
}

#[derive(Serialize, Deserialize)]
struct StoredAllocation {
    namespace: String,
    name: String,
    #[serde(rename = "clusterIP")]
    cluster_ip: Ipv4Addr,
}

impl ClusterIpAllocator {
    /// Loads the allocations a previous run left in `state_dir` (created when missing).
    pub fn new(cidr: Ipv4Cidr, state_dir: Option<&Path>) -> anyhow::Result<Self> {
        let mut allocator = ClusterIpAllocator {
            cidr,
            state_file: None,
            allocations: BTreeMap::new(),
            saved: BTreeMap::new(),
        };
        let Some(state_dir) = state_dir else {
            return Ok(allocator);
        };
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
        let state_file = state_dir.join(STATE_FILE_NAME);
        allocator.saved = load(&state_file)?;
        allocator.allocations = allocator.saved.clone();
        allocator.state_file = Some(state_file);
        Ok(allocator)
    }

    /// Gives every service in `services` a cluster IP and forgets every other service. A service
    /// keeps the IP it had unless that IP is now claimed explicitly (`reserved`: IP -> claimer) or
    /// outside the CIDR. A service missing from the result could not get one: the CIDR is full.
    pub fn allocate(
        &mut self,
        services: &[ServiceName],
        reserved: &HashMap<Ipv4Addr, ServiceName>,
    ) -> BTreeMap<ServiceName, Ipv4Addr> {
        let mut used: HashSet<Ipv4Addr> = reserved.keys().copied().collect();
        let mut assigned = BTreeMap::new();
        let mut homeless = Vec::new();
        // Every kept IP is settled before any new one is picked, so that a newcomer sorting first
        // cannot take the IP of a service that already had it.
        for service in services {
            match self.allocations.get(service) {
                Some(&ip) if !self.is_allocatable(ip) => {
                    tracing::info!(
                        "Service {service}: cluster IP {ip} is not allocatable from the service CIDR {}; allocating a new one",
                        self.cidr
                    );
                    homeless.push(service);
                }
                Some(&ip) if used.contains(&ip) => {
                    match reserved.get(&ip) {
                        Some(claimer) => tracing::warn!(
                            "Service {service}: its allocated cluster IP {ip} is now the explicit spec.clusterIP of Service {claimer}; allocating a new one"
                        ),
                        None => tracing::warn!(
                            "Service {service}: cluster IP {ip} is recorded for another service too; allocating a new one"
                        ),
                    }
                    homeless.push(service);
                }
                Some(&ip) => {
                    used.insert(ip);
                    assigned.insert(service.clone(), ip);
                }
                None => homeless.push(service),
            }
        }
        let mut candidates = self.allocatable_range();
        for service in homeless {
            if let Some(ip) = candidates
                .by_ref()
                .map(Ipv4Addr::from)
                .find(|ip| !used.contains(ip))
            {
                used.insert(ip);
                assigned.insert(service.clone(), ip);
            }
        }
        self.allocations = assigned.clone();
        assigned
    }

    /// Writes the allocations to the state file if they changed since the last write.
    pub fn save(&mut self) -> anyhow::Result<()> {
        let Some(state_file) = &self.state_file else {
            return Ok(());
        };
        if self.allocations == self.saved {
            return Ok(());
        }
        let contents = StateFile {
            allocations: self
                .allocations
                .iter()
                .map(|(service, &cluster_ip)| StoredAllocation {
                    namespace: service.namespace.clone(),
                    name: service.name.clone(),
                    cluster_ip,
                })
                .collect(),
        };
        let json =
            serde_json::to_vec_pretty(&contents).context("encoding cluster IP allocations")?;
        write_atomically(state_file, &json).with_context(|| {
            format!("saving cluster IP allocations to {}", state_file.display())
        })?;
        self.saved = self.allocations.clone();
        Ok(())
    }

    fn is_allocatable(&self, ip: Ipv4Addr) -> bool {
        self.allocatable_range().contains(&u32::from(ip))
    }

    /// Network + 2 up to broadcast - 1: network + 1 is the `kubernetes` Service's by convention.
    fn allocatable_range(&self) -> std::ops::RangeInclusive<u32> {
        let first = u32::from(self.cidr.network()).saturating_add(2);
        let last = u32::from(self.cidr.broadcast()).saturating_sub(1);
        first..=last
    }
}

fn load(state_file: &Path) -> anyhow::Result<BTreeMap<ServiceName, Ipv4Addr>> {
    let Some(json) = read_if_present(state_file)? else {
        return Ok(BTreeMap::new());
    };
    let contents: StateFile = serde_json::from_slice(&json).with_context(|| {
        format!(
            "{} is not a valid cluster IP allocation file; remove it to start afresh (Services \
             without an explicit clusterIP may then get new IPs)",
            state_file.display()
        )
    })?;
    Ok(contents
        .allocations
        .into_iter()
        .map(|stored| {
            let service = ServiceName {
                namespace: stored.namespace,
                name: stored.name,
            };
            (service, stored.cluster_ip)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::test_support::TempDir;

    fn service(name: &str) -> ServiceName {
        ServiceName {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn cidr(text: &str) -> Ipv4Cidr {
        text.parse().unwrap()
    }

    #[test]
    fn skips_network_and_first_host_and_broadcast() {
        let mut allocator = ClusterIpAllocator::new(cidr("10.0.0.0/29"), None).unwrap();
        let services: Vec<_> = (0..6).map(|i| service(&format!("s{i}"))).collect();
        let assigned = allocator.allocate(&services, &HashMap::new());
        let mut ips: Vec<_> = assigned.values().copied().collect();
        ips.sort();
        // .0 network, .1 kubernetes, .7 broadcast: five allocatable addresses for six services.
        let expected: Vec<Ipv4Addr> = (2..=6).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(ips, expected);
        assert_eq!(assigned.len(), 5);
    }

    #[test]
    fn keeps_ips_and_yields_to_explicit_claims() {
        let mut allocator = ClusterIpAllocator::new(cidr("10.0.0.0/24"), None).unwrap();
        let first = allocator.allocate(&[service("b")], &HashMap::new());
        assert_eq!(first[&service("b")], Ipv4Addr::new(10, 0, 0, 2));
        // "a" sorts first but must not take the IP "b" already has.
        let second = allocator.allocate(&[service("a"), service("b")], &HashMap::new());
        assert_eq!(second[&service("b")], Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(second[&service("a")], Ipv4Addr::new(10, 0, 0, 3));
        let claims = HashMap::from([(Ipv4Addr::new(10, 0, 0, 2), service("explicit"))]);
        let third = allocator.allocate(&[service("a"), service("b")], &claims);
        assert_eq!(third[&service("a")], Ipv4Addr::new(10, 0, 0, 3));
        assert_eq!(third[&service("b")], Ipv4Addr::new(10, 0, 0, 4));
    }

    #[test]
    fn persists_across_instances_and_forgets_deleted_services() {
        let dir = TempDir::new("allocator");
        let state_dir = dir.path().join("nested/state");
        let mut first = ClusterIpAllocator::new(cidr("10.96.0.0/12"), Some(&state_dir)).unwrap();
        let assigned = first.allocate(&[service("x"), service("y")], &HashMap::new());
        first.save().unwrap();

        let mut second = ClusterIpAllocator::new(cidr("10.96.0.0/12"), Some(&state_dir)).unwrap();
        // Asking in the other order would hand out IPs differently if nothing was remembered.
        let again = second.allocate(&[service("new"), service("y")], &HashMap::new());
        assert_eq!(again[&service("y")], assigned[&service("y")]);
        assert_eq!(again[&service("new")], assigned[&service("x")]);
        second.save().unwrap();
        let json = fs::read_to_string(state_dir.join(STATE_FILE_NAME)).unwrap();
        assert!(!json.contains("\"x\""), "{json}");
        assert!(!state_dir.join("clusterips.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_state_file_is_an_actionable_error() {
        let dir = TempDir::new("allocator-corrupt");
        fs::write(dir.path().join(STATE_FILE_NAME), "{ not json").unwrap();
        let error = ClusterIpAllocator::new(cidr("10.96.0.0/12"), Some(dir.path()))
            .err()
            .unwrap();
        assert!(format!("{error:#}").contains("remove it"), "{error:#}");
    }

    #[test]
    fn reallocates_ips_outside_a_changed_cidr() {
        let dir = TempDir::new("allocator-cidr");
        let mut old = ClusterIpAllocator::new(cidr("10.96.0.0/24"), Some(dir.path())).unwrap();
        old.allocate(&[service("x")], &HashMap::new());
        old.save().unwrap();
        let mut new = ClusterIpAllocator::new(cidr("10.200.0.0/24"), Some(dir.path())).unwrap();
        let assigned = new.allocate(&[service("x")], &HashMap::new());
        assert_eq!(assigned[&service("x")], Ipv4Addr::new(10, 200, 0, 2));
    }
}

//! nodePorts for the ports of NodePort and LoadBalancer Services that do not ask for one. The API
//! server records them in the Service object; without one, the agent records them in
//! `<state_dir>/nodeports.json`, because clients outside the cluster are configured with a
//! Service's nodePort and it must not move on a reload or an agent restart.
//!
//! A port number belongs to one Service at a time, whatever the protocol, as in the API server;
//! within that Service a TCP and a UDP port may share it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{
    PortRange,
    state_file::{read_if_present, write_atomically},
    validation::PortDefinition,
};
use crate::model::{Protocol, ServiceName};

const STATE_FILE_NAME: &str = "nodeports.json";

/// The port an allocated nodePort belongs to. Ports are told apart by name (unique within a
/// Service) rather than by position, so that reordering or adding ports moves no nodePort.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePortKey {
    pub service: ServiceName,
    pub port_name: String,
    pub protocol: Protocol,
}

impl NodePortKey {
    pub fn new(service: &ServiceName, port: &PortDefinition) -> Self {
        NodePortKey {
            service: service.clone(),
            port_name: port.name.clone(),
            protocol: port.protocol,
        }
    }
}

pub struct NodePortAllocator {
    range: PortRange,
    /// None when nothing may be written (the `check` command).
    state_file: Option<PathBuf>,
    allocations: BTreeMap<NodePortKey, u16>,
    /// What the state file holds, so that an unchanged allocation is not rewritten.
    saved: BTreeMap<NodePortKey, u16>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    allocations: Vec<StoredAllocation>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredAllocation {
    namespace: String,
    name: String,
    port_name: String,
    protocol: Protocol,
    node_port: u16,
}

impl NodePortAllocator {
    /// Loads the allocations a previous run left in `state_dir` (created when missing).
    pub fn new(range: PortRange, state_dir: Option<&Path>) -> anyhow::Result<Self> {
        let mut allocator = NodePortAllocator {
            range,
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

    /// Gives a nodePort to every port without an explicit one of the Services in `services`
    /// (each with all its ports) and forgets every other allocation. A port keeps the nodePort it
    /// had unless that is now outside the range or claimed explicitly by another Service or by
    /// another port of the same protocol (`reserved`: explicit nodePort -> claimer). A new
    /// nodePort is the one of a port with the same number and another protocol in the same
    /// Service when there is one (as the API server does, so that DNS's 53/TCP and 53/UDP get
    /// the same nodePort), else the lowest free one. A port missing from the result could not
    /// get one: the range is full.
    pub fn allocate(
        &mut self,
        services: &[(&ServiceName, &[PortDefinition])],
        reserved: &HashMap<u16, ServiceName>,
    ) -> BTreeMap<NodePortKey, u16> {
        // Which Service each port number belongs to, and which (number, protocol) pairs are
        // taken; a pair is only ever taken by the number's holder.
        let mut holders: HashMap<u16, &ServiceName> = reserved
            .iter()
            .map(|(&node_port, service)| (node_port, service))
            .collect();
        let mut taken: HashSet<(u16, Protocol)> = services
            .iter()
            .flat_map(|(_, ports)| ports.iter())
            .filter_map(|port| Some((port.node_port?, port.protocol)))
            .collect();
        let mut assigned = BTreeMap::new();
        let mut homeless = Vec::new();
        // Every kept nodePort is settled before any new one is picked, so that a newcomer
        // sorting first cannot take the nodePort of a port that already had it.
        for &(service, ports) in services {
            for port in ports.iter().filter(|port| port.node_port.is_none()) {
                let key = NodePortKey::new(service, port);
                match self.allocations.get(&key) {
                    Some(&node_port) if !self.range.contains(node_port) => {
                        tracing::info!(
                            "Service {service}: nodePort {node_port} of port {:?} is outside the node port range {}; allocating a new one",
                            port.name,
                            self.range
                        );
                        homeless.push((service, ports, port, key));
                    }
                    Some(&node_port)
                        if holders
                            .get(&node_port)
                            .is_some_and(|holder| *holder != service)
                            || taken.contains(&(node_port, port.protocol)) =>
                    {
                        match reserved.get(&node_port) {
                            Some(claimer) => tracing::warn!(
                                "Service {service}: the nodePort {node_port} allocated to port {:?} is now an explicit nodePort of Service {claimer}; allocating a new one",
                                port.name
                            ),
                            None => tracing::warn!(
                                "Service {service}: nodePort {node_port} of port {:?} is recorded for another Service too; allocating a new one",
                                port.name
                            ),
                        }
                        homeless.push((service, ports, port, key));
                    }
                    Some(&node_port) => {
                        holders.insert(node_port, service);
                        taken.insert((node_port, port.protocol));
                        assigned.insert(key, node_port);
                    }
                    None => homeless.push((service, ports, port, key)),
                }
            }
        }
        // One walk through the range for all newcomers: a port skipped once is held, and stays
        // held for the rest of this allocation.
        let mut free = self.range.first..=self.range.last;
        for (service, ports, port, key) in homeless {
            let shared = ports
                .iter()
                .filter(|sibling| sibling.port == port.port && sibling.protocol != port.protocol)
                .filter_map(|sibling| {
                    sibling
                        .node_port
                        .or_else(|| assigned.get(&NodePortKey::new(service, sibling)).copied())
                })
                .find(|&node_port| !taken.contains(&(node_port, port.protocol)));
            let Some(node_port) = shared.or_else(|| {
                free.by_ref()
                    .find(|node_port| !holders.contains_key(node_port))
            }) else {
                continue;
            };
            holders.insert(node_port, service);
            taken.insert((node_port, port.protocol));
            assigned.insert(key, node_port);
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
                .map(|(key, &node_port)| StoredAllocation {
                    namespace: key.service.namespace.clone(),
                    name: key.service.name.clone(),
                    port_name: key.port_name.clone(),
                    protocol: key.protocol,
                    node_port,
                })
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&contents).context("encoding nodePort allocations")?;
        write_atomically(state_file, &json)
            .with_context(|| format!("saving nodePort allocations to {}", state_file.display()))?;
        self.saved = self.allocations.clone();
        Ok(())
    }
}

fn load(state_file: &Path) -> anyhow::Result<BTreeMap<NodePortKey, u16>> {
    let Some(json) = read_if_present(state_file)? else {
        return Ok(BTreeMap::new());
    };
    let contents: StateFile = serde_json::from_slice(&json).with_context(|| {
        format!(
            "{} is not a valid nodePort allocation file; remove it to start afresh (Service ports \
             without an explicit nodePort may then get new nodePorts)",
            state_file.display()
        )
    })?;
    Ok(contents
        .allocations
        .into_iter()
        .map(|stored| {
            let key = NodePortKey {
                service: ServiceName {
                    namespace: stored.namespace,
                    name: stored.name,
                },
                port_name: stored.port_name,
                protocol: stored.protocol,
            };
            (key, stored.node_port)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::{objects::TargetPort, test_support::TempDir};

    fn service(name: &str) -> ServiceName {
        ServiceName {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn port(name: &str, number: u16, protocol: Protocol, node_port: Option<u16>) -> PortDefinition {
        PortDefinition {
            index: 0,
            name: name.into(),
            port: number,
            protocol,
            target_port: TargetPort::Number(number),
            node_port,
        }
    }

    fn http() -> Vec<PortDefinition> {
        vec![port("http", 80, Protocol::Tcp, None)]
    }

    fn key(service_name: &str, port_name: &str, protocol: Protocol) -> NodePortKey {
        NodePortKey {
            service: service(service_name),
            port_name: port_name.into(),
            protocol,
        }
    }

    fn range(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn allocates_from_the_range_around_explicit_ports_until_it_is_full() {
        let mut allocator = NodePortAllocator::new(range(30000, 30002), None).unwrap();
        let (a, b, c) = (service("a"), service("b"), service("c"));
        let explicit = vec![port("http", 80, Protocol::Tcp, Some(30000))];
        let (ports_a, ports_c) = (http(), http());
        let reserved = HashMap::from([(30000, b.clone())]);
        let assigned = allocator.allocate(
            &[(&a, &ports_a), (&b, &explicit), (&c, &ports_c)],
            &reserved,
        );
        assert_eq!(
            assigned,
            BTreeMap::from([
                (key("a", "http", Protocol::Tcp), 30001),
                (key("c", "http", Protocol::Tcp), 30002),
            ])
        );
        let d = service("d");
        let ports_d = http();
        let assigned = allocator.allocate(
            &[
                (&a, &ports_a),
                (&b, &explicit),
                (&c, &ports_c),
                (&d, &ports_d),
            ],
            &reserved,
        );
        assert!(!assigned.contains_key(&key("d", "http", Protocol::Tcp)));
        assert_eq!(assigned.len(), 2);
    }

    #[test]
    fn keeps_node_ports_and_yields_to_explicit_claims() {
        let mut allocator = NodePortAllocator::new(range(30000, 30100), None).unwrap();
        let (a, b) = (service("a"), service("b"));
        let ports = http();
        let first = allocator.allocate(&[(&b, &ports)], &HashMap::new());
        assert_eq!(first[&key("b", "http", Protocol::Tcp)], 30000);
        // "a" sorts first but must not take the nodePort "b" already has.
        let second = allocator.allocate(&[(&a, &ports), (&b, &ports)], &HashMap::new());
        assert_eq!(second[&key("b", "http", Protocol::Tcp)], 30000);
        assert_eq!(second[&key("a", "http", Protocol::Tcp)], 30001);
        // An explicit claim of another Service moves the holder, whatever its protocol.
        let claims = HashMap::from([(30000, service("explicit"))]);
        let third = allocator.allocate(&[(&a, &ports), (&b, &ports)], &claims);
        assert_eq!(third[&key("a", "http", Protocol::Tcp)], 30001);
        assert_eq!(third[&key("b", "http", Protocol::Tcp)], 30002);
        // So does an explicit claim of another port of the same Service and protocol.
        let with_admin = vec![
            port("admin", 8080, Protocol::Tcp, Some(30002)),
            port("http", 80, Protocol::Tcp, None),
        ];
        let claims = HashMap::from([(30002, b.clone())]);
        let fourth = allocator.allocate(&[(&a, &ports), (&b, &with_admin)], &claims);
        assert_eq!(fourth[&key("b", "http", Protocol::Tcp)], 30000);
    }

    #[test]
    fn ports_with_the_same_number_and_another_protocol_share_a_node_port() {
        let mut allocator = NodePortAllocator::new(range(30000, 30100), None).unwrap();
        let dns = service("dns");
        let ports = vec![
            port("dns-tcp", 53, Protocol::Tcp, None),
            port("dns-udp", 53, Protocol::Udp, None),
            port("metrics", 9153, Protocol::Tcp, None),
        ];
        let assigned = allocator.allocate(&[(&dns, &ports)], &HashMap::new());
        assert_eq!(assigned[&key("dns", "dns-tcp", Protocol::Tcp)], 30000);
        assert_eq!(assigned[&key("dns", "dns-udp", Protocol::Udp)], 30000);
        assert_eq!(assigned[&key("dns", "metrics", Protocol::Tcp)], 30001);

        // An explicit nodePort is shared too.
        let explicit_tcp = vec![
            port("dns-tcp", 53, Protocol::Tcp, Some(30053)),
            port("dns-udp", 53, Protocol::Udp, None),
        ];
        let claims = HashMap::from([(30053, dns.clone())]);
        let fresh = NodePortAllocator::new(range(30000, 30100), None)
            .unwrap()
            .allocate(&[(&dns, &explicit_tcp)], &claims);
        assert_eq!(
            fresh,
            BTreeMap::from([(key("dns", "dns-udp", Protocol::Udp), 30053)])
        );
    }

    #[test]
    fn persists_across_instances_and_forgets_released_services() {
        let dir = TempDir::new("node-port-allocator");
        let state_dir = dir.path().join("nested/state");
        let (x, y, new) = (service("x"), service("y"), service("new"));
        let ports = http();
        let mut first = NodePortAllocator::new(range(30000, 30100), Some(&state_dir)).unwrap();
        let assigned = first.allocate(&[(&x, &ports), (&y, &ports)], &HashMap::new());
        first.save().unwrap();

        let mut second = NodePortAllocator::new(range(30000, 30100), Some(&state_dir)).unwrap();
        // Asking in the other order would hand out ports differently if nothing was remembered.
        let again = second.allocate(&[(&new, &ports), (&y, &ports)], &HashMap::new());
        assert_eq!(
            again[&key("y", "http", Protocol::Tcp)],
            assigned[&key("y", "http", Protocol::Tcp)]
        );
        assert_eq!(
            again[&key("new", "http", Protocol::Tcp)],
            assigned[&key("x", "http", Protocol::Tcp)]
        );
        second.save().unwrap();
        let json = fs::read_to_string(state_dir.join(STATE_FILE_NAME)).unwrap();
        assert!(!json.contains("\"x\""), "{json}");
        assert!(json.contains("\"portName\": \"http\""), "{json}");
        assert!(!state_dir.join("nodeports.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_state_file_is_an_actionable_error() {
        let dir = TempDir::new("node-port-allocator-corrupt");
        fs::write(dir.path().join(STATE_FILE_NAME), "{ not json").unwrap();
        let error = NodePortAllocator::new(range(30000, 30100), Some(dir.path()))
            .err()
            .unwrap();
        assert!(format!("{error:#}").contains("remove it"), "{error:#}");
    }

    #[test]
    fn reallocates_node_ports_outside_a_changed_range() {
        let dir = TempDir::new("node-port-allocator-range");
        let x = service("x");
        let ports = http();
        let mut old = NodePortAllocator::new(range(30000, 30100), Some(dir.path())).unwrap();
        old.allocate(&[(&x, &ports)], &HashMap::new());
        old.save().unwrap();
        let mut new = NodePortAllocator::new(range(40000, 40100), Some(dir.path())).unwrap();
        let assigned = new.allocate(&[(&x, &ports)], &HashMap::new());
        assert_eq!(assigned[&key("x", "http", Protocol::Tcp)], 40000);
    }

    #[test]
    fn allocating_for_many_services_is_fast() {
        let mut allocator = NodePortAllocator::new(range(1, 65535), None).unwrap();
        let names: Vec<ServiceName> = (0..20_000).map(|i| service(&format!("s{i}"))).collect();
        let ports = vec![
            port("http", 80, Protocol::Tcp, None),
            port("https", 443, Protocol::Tcp, None),
        ];
        let services: Vec<(&ServiceName, &[PortDefinition])> =
            names.iter().map(|name| (name, ports.as_slice())).collect();
        let started = std::time::Instant::now();
        let first = allocator.allocate(&services, &HashMap::new());
        let second = allocator.allocate(&services, &HashMap::new());
        assert_eq!(first.len(), 40_000);
        assert_eq!(first, second);
        // A scan from the start of the range per port would be quadratic: 800 million probes.
        assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());
    }
}

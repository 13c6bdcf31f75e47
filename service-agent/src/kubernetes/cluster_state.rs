//! The cluster as the watches last reported it, and the desired state derived from it. Events
//! only mark the Services they touch; `rebuild` then recomputes those Services alone, so a burst
//! of events over 10,000 Services costs what the burst touched, and one sync follows it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};

use super::{
    endpoint_slice,
    service::{self, Conversion},
};
use crate::{
    controlplane::{
        endpoint_objects::EndpointObjectIndex,
        objects::{EndpointSlice, Located},
    },
    model::{DesiredState, Service, ServiceName},
};

/// A slice's identity: its namespace and name.
type SliceName = (String, String);

#[derive(Default)]
pub struct ClusterState {
    /// `--service-proxy-name`.
    proxy_name: Option<String>,
    /// Every served Service as last converted successfully, without endpoints.
    services: HashMap<ServiceName, Service>,
    /// The slices of each Service, by slice name.
    slices: HashMap<ServiceName, BTreeMap<String, Located<EndpointSlice>>>,
    /// Which Service each slice was filed under, for deletions and relabelled slices.
    slice_owners: HashMap<SliceName, ServiceName>,
    /// Services whose entry in `desired` is out of date.
    dirty: BTreeSet<ServiceName>,
    desired: DesiredState,
}

impl ClusterState {
    pub fn new(proxy_name: Option<String>) -> Self {
        ClusterState {
            proxy_name,
            ..ClusterState::default()
        }
    }

    /// Records an added or modified Service. A Service that fails conversion keeps its last good
    /// version (the problem is returned for the log).
    pub fn apply_service(&mut self, object: &core::Service) -> Option<String> {
        let name = service::service_name(object);
        match service::convert(object, self.proxy_name.as_deref()) {
            Ok(Conversion::Served(converted)) => {
                if self.services.get(&name) != Some(&converted) {
                    self.services.insert(name.clone(), converted);
                    self.dirty.insert(name);
                }
                None
            }
            Ok(Conversion::Skipped(reason)) => {
                tracing::debug!(service = %name, reason, "not served");
                if self.services.remove(&name).is_some() {
                    self.dirty.insert(name);
                }
                None
            }
            Err(problem) => Some(if self.services.contains_key(&name) {
                format!("{problem}; its last good version stays programmed")
            } else {
                format!("{problem}; not served")
            }),
        }
    }

    pub fn delete_service(&mut self, object: &core::Service) {
        let name = service::service_name(object);
        if self.services.remove(&name).is_some() {
            self.dirty.insert(name);
        }
    }

    /// Replaces every Service with a fresh list (the watch restarted): those not listed are gone.
    pub fn replace_services(&mut self, objects: &[core::Service]) -> Vec<String> {
        let listed: BTreeSet<ServiceName> = objects.iter().map(service::service_name).collect();
        let gone: Vec<ServiceName> = self
            .services
            .keys()
            .filter(|name| !listed.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            self.services.remove(&name);
            self.dirty.insert(name);
        }
        objects
            .iter()
            .filter_map(|object| self.apply_service(object))
            .collect()
    }

    /// Records an added or modified slice. A slice that fails conversion keeps its last good
    /// version.
    pub fn apply_slice(&mut self, object: &discovery::EndpointSlice) -> Option<String> {
        let slice_name = slice_name(object);
        let owner = endpoint_slice::owner(object);
        let converted = match endpoint_slice::convert(object) {
            Ok(converted) => converted,
            Err(problem) => {
                let kept = self.slice_owners.contains_key(&slice_name);
                return Some(format!(
                    "{problem}; {}",
                    if kept {
                        "its last good version stays programmed"
                    } else {
                        "its endpoints are not used"
                    }
                ));
            }
        };
        // A slice relabelled to another Service (or to none) leaves its old one.
        if let Some(previous) = self.slice_owners.get(&slice_name)
            && Some(previous) != owner.as_ref()
        {
            self.remove_slice(&slice_name);
        }
        if let Some(owner) = owner {
            self.slice_owners.insert(slice_name.clone(), owner.clone());
            self.slices
                .entry(owner.clone())
                .or_default()
                .insert(slice_name.1, converted);
            self.dirty.insert(owner);
        }
        None
    }

    pub fn delete_slice(&mut self, object: &discovery::EndpointSlice) {
        self.remove_slice(&slice_name(object));
    }

    /// Replaces every slice with a fresh list (the watch restarted).
    pub fn replace_slices(&mut self, objects: &[discovery::EndpointSlice]) -> Vec<String> {
        let listed: BTreeSet<SliceName> = objects.iter().map(slice_name).collect();
        let gone: Vec<SliceName> = self
            .slice_owners
            .keys()
            .filter(|name| !listed.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            self.remove_slice(&name);
        }
        objects
            .iter()
            .filter_map(|object| self.apply_slice(object))
            .collect()
    }

    fn remove_slice(&mut self, name: &SliceName) {
        let Some(owner) = self.slice_owners.remove(name) else {
            return;
        };
        if let Some(slices) = self.slices.get_mut(&owner) {
            slices.remove(&name.1);
            if slices.is_empty() {
                self.slices.remove(&owner);
            }
        }
        self.dirty.insert(owner);
    }

    /// Brings the desired state up to date with every change recorded since the last call, and
    /// returns whether it changed, with the problems found in the slices read.
    pub fn rebuild(&mut self) -> (bool, Vec<String>) {
        let mut changed = false;
        let mut problems = Vec::new();
        for name in std::mem::take(&mut self.dirty) {
            let rebuilt = self
                .services
                .get(&name)
                .map(|service| self.with_endpoints(service, &mut problems));
            changed |= match rebuilt {
                Some(service)
                    if self.desired.services.get(&name).map(|s| &**s) == Some(&service) =>
                {
                    false
                }
                Some(service) => {
                    self.desired.services.insert(name, Arc::new(service));
                    true
                }
                None => self.desired.services.remove(&name).is_some(),
            };
        }
        (changed, problems)
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// `service` with the endpoints of all its slices: merged, deduplicated, each endpoint with
    /// its conditions (which ones get traffic is the planner's choice, as in manifest mode).
    fn with_endpoints(&self, service: &Service, problems: &mut Vec<String>) -> Service {
        let slices = self.slices.get(&service.name).into_iter().flatten();
        let index = EndpointObjectIndex::new(&[], slices.map(|(_, slice)| slice), problems);
        let mut service = service.clone();
        let port_count = service.ports.len();
        for port in &mut service.ports {
            port.endpoints = index.endpoints(&service.name, port_count, &port.name, port.protocol);
        }
        service
    }
}

fn slice_name(object: &discovery::EndpointSlice) -> SliceName {
    (
        object.metadata.namespace.clone().unwrap_or_default(),
        object.metadata.name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::json;

    use super::*;

    fn service(name: &str, cluster_ip: &str, port: i32) -> core::Service {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "1",
                "creationTimestamp": "2024-05-01T10:00:00Z"},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}]}
        }))
        .unwrap()
    }

    /// A slice of `service` with one endpoint per (last octet, ready, terminating).
    fn slice(
        name: &str,
        service: &str,
        endpoints: &[(u8, bool, bool)],
    ) -> discovery::EndpointSlice {
        let endpoints: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|(octet, ready, terminating)| {
                json!({"addresses": [format!("10.244.0.{octet}")], "nodeName": "node-1",
                    "conditions": {"ready": ready, "serving": ready | terminating,
                        "terminating": terminating}})
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "1",
                "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))
        .unwrap()
    }

    fn name(name: &str) -> ServiceName {
        ServiceName {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    /// `address r/t` of each endpoint of `service`'s first port.
    fn endpoints(state: &ClusterState, service: &str) -> Vec<String> {
        state.desired().services[&name(service)].ports[0]
            .endpoints
            .iter()
            .map(|e| {
                format!(
                    "{} r={} t={}",
                    e.address, e.ready as u8, e.terminating as u8
                )
            })
            .collect()
    }

    #[test]
    fn slices_of_a_service_merge_and_duplicates_keep_the_most_ready() {
        let mut state = ClusterState::new(None);
        state.replace_services(&[service("web", "10.96.0.10", 80)]);
        state.replace_slices(&[
            slice("web-a", "web", &[(1, true, false), (2, false, true)]),
            slice(
                "web-b",
                "web",
                &[(2, true, false), (3, false, true), (4, false, false)],
            ),
            slice("db-a", "db", &[(9, true, false)]),
        ]);
        assert_eq!(state.rebuild(), (true, vec![]));
        assert_eq!(
            endpoints(&state, "web"),
            [
                "10.244.0.1 r=1 t=0",
                "10.244.0.2 r=1 t=0",
                "10.244.0.3 r=0 t=1"
            ]
        );
        let web = &state.desired().services[&name("web")];
        assert_eq!(web.cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(
            web.ports[0].endpoints[0].node_name.as_deref(),
            Some("node-1")
        );
        assert!(!state.desired().services.contains_key(&name("db")));
    }

    #[test]
    fn a_relist_that_changed_nothing_changes_nothing_and_one_that_did_withdraws() {
        let mut state = ClusterState::new(None);
        let services = [
            service("web", "10.96.0.10", 80),
            service("db", "10.96.0.11", 5432),
        ];
        let slices = [slice("web-a", "web", &[(1, true, false)])];
        state.replace_services(&services);
        state.replace_slices(&slices);
        assert!(state.rebuild().0);
        let before = state.desired().clone();

        state.replace_services(&services);
        state.replace_slices(&slices);
        assert_eq!(state.rebuild(), (false, vec![]));
        assert_eq!(state.desired(), &before);

        state.replace_services(&services[..1]);
        state.replace_slices(&[]);
        assert!(state.rebuild().0);
        assert_eq!(
            state.desired().services.keys().collect::<Vec<_>>(),
            [&name("web")]
        );
        assert!(endpoints(&state, "web").is_empty());
    }

    #[test]
    fn watch_events_touch_only_their_service() {
        let mut state = ClusterState::new(None);
        state.replace_services(&[service("web", "10.96.0.10", 80)]);
        state.replace_slices(&[slice("web-a", "web", &[(1, true, false)])]);
        state.rebuild();

        state.apply_slice(&slice(
            "web-a",
            "web",
            &[(1, false, true), (5, true, false)],
        ));
        assert!(state.rebuild().0);
        assert_eq!(
            endpoints(&state, "web"),
            ["10.244.0.1 r=0 t=1", "10.244.0.5 r=1 t=0"]
        );

        // Relabelled to another Service: the slice leaves web.
        state.apply_slice(&slice("web-a", "other", &[(5, true, false)]));
        assert!(state.rebuild().0);
        assert!(endpoints(&state, "web").is_empty());

        state.delete_service(&service("web", "10.96.0.10", 80));
        assert!(state.rebuild().0);
        assert!(state.desired().services.is_empty());
    }

    #[test]
    fn a_bad_update_keeps_the_last_good_service() {
        let mut state = ClusterState::new(None);
        state.replace_services(&[service("web", "10.96.0.10", 80)]);
        state.replace_slices(&[]);
        state.rebuild();
        let problem = state.apply_service(&service("web", "10.96.0.10", 70000));
        assert_eq!(
            problem.as_deref(),
            Some(
                "Service default/web: spec.ports[0].port: 70000 is not a port number; its last \
                 good version stays programmed"
            )
        );
        assert_eq!(state.rebuild(), (false, vec![]));
        assert_eq!(state.desired().services[&name("web")].ports[0].port, 80);

        // Becoming headless is a valid change: the Service is withdrawn.
        state.apply_service(&service("web", "None", 80));
        assert!(state.rebuild().0);
        assert!(state.desired().services.is_empty());
    }

    #[test]
    fn a_bad_slice_update_keeps_the_last_good_slice() {
        let mut state = ClusterState::new(None);
        state.replace_services(&[service("web", "10.96.0.10", 80)]);
        state.replace_slices(&[slice("web-a", "web", &[(1, true, false)])]);
        state.rebuild();
        let mut bad = slice("web-a", "web", &[(2, true, false)]);
        bad.address_type = "IPv5".into();
        assert_eq!(
            state.apply_slice(&bad).as_deref(),
            Some(
                "API server (EndpointSlice default/web-a): addressType: unknown type \"IPv5\"; \
                 its last good version stays programmed"
            )
        );
        assert_eq!(state.rebuild(), (false, vec![]));
        assert_eq!(endpoints(&state, "web"), ["10.244.0.1 r=1 t=0"]);
    }

    #[test]
    fn bad_endpoint_addresses_are_named_and_left_out() {
        let mut state = ClusterState::new(None);
        state.replace_services(&[service("web", "10.96.0.10", 80)]);
        let mut bad = slice("web-a", "web", &[(1, true, false), (2, true, false)]);
        bad.endpoints[0].addresses = vec!["10.244.0.300".into()];
        state.replace_slices(&[bad]);
        let (changed, problems) = state.rebuild();
        assert!(changed);
        assert_eq!(
            problems,
            [
                "API server (EndpointSlice default/web-a): endpoints[0].addresses[0]: \
              \"10.244.0.300\" is not an IPv4 address; the endpoint is left out"
            ]
        );
        assert_eq!(endpoints(&state, "web"), ["10.244.0.2 r=1 t=0"]);
    }
}

//! EndpointSlices as the API server serves them, turned into the control plane's own slice type,
//! so that manifest mode and API mode read endpoint conditions, ports and duplicates with the same
//! code (`controlplane::endpoint_objects`): ready first, serving-terminating as the fallback.

use k8s_openapi::api::discovery::v1 as discovery;

use crate::{
    controlplane::objects::{
        AddressType, EndpointConditions, EndpointPort, EndpointSlice, Located, ObjectMeta, Origin,
        Protocol, SliceEndpoint,
    },
    model::ServiceName,
};

/// The label by which the EndpointSlice controller names the slice's Service.
pub const SERVICE_NAME_LABEL: &str = EndpointSlice::SERVICE_NAME_LABEL;
/// The label the EndpointSlice controller puts on the slices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Where API objects come from, in messages: `API server (EndpointSlice prod/web-7xk2p)`.
pub fn api_origin() -> Origin {
    Origin::new("API server")
}

/// The Service a slice belongs to, None when it serves none this proxy handles (no service-name
/// label: a slice managed by hand for nothing; the headless label: nothing to proxy).
pub fn owner(slice: &discovery::EndpointSlice) -> Option<ServiceName> {
    let labels = slice.metadata.labels.as_ref()?;
    if labels.contains_key(HEADLESS_LABEL) {
        return None;
    }
    Some(ServiceName {
        namespace: slice.metadata.namespace.clone().unwrap_or_default(),
        name: labels.get(SERVICE_NAME_LABEL)?.clone(),
    })
}

/// Converts `slice`; an error names the slice and field. Addresses are checked later, by the
/// shared endpoint code, which leaves out only the bad endpoint.
pub fn convert(slice: &discovery::EndpointSlice) -> Result<Located<EndpointSlice>, String> {
    let metadata = ObjectMeta {
        name: slice.metadata.name.clone().unwrap_or_default(),
        namespace: slice.metadata.namespace.clone(),
        creation_timestamp: None,
        deletion_timestamp: None,
        labels: slice.metadata.labels.clone().unwrap_or_default(),
    };
    let context = |field: &str, problem: String| {
        format!(
            "{} (EndpointSlice {}/{}): {field}: {problem}",
            api_origin(),
            metadata.namespace(),
            metadata.name
        )
    };
    let address_type = match slice.address_type.as_str() {
        "IPv4" => AddressType::IPv4,
        "IPv6" => AddressType::IPv6,
        "FQDN" => AddressType::Fqdn,
        other => return Err(context("addressType", format!("unknown type {other:?}"))),
    };
    let mut ports = Vec::new();
    for (index, port) in slice.ports.iter().flatten().enumerate() {
        let protocol = match port.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some(other) => {
                return Err(context(
                    &format!("ports[{index}].protocol"),
                    format!("unknown protocol {other:?}"),
                ));
            }
        };
        let number = port
            .port
            .map(|number| {
                u16::try_from(number).map_err(|_| {
                    context(
                        &format!("ports[{index}].port"),
                        format!("{number} is not a port number"),
                    )
                })
            })
            .transpose()?;
        ports.push(EndpointPort {
            name: port.name.clone(),
            port: number,
            protocol,
        });
    }
    let endpoints = slice
        .endpoints
        .iter()
        .map(|endpoint| {
            let conditions = endpoint.conditions.as_ref();
            SliceEndpoint {
                addresses: endpoint.addresses.clone(),
                conditions: EndpointConditions {
                    ready: conditions.and_then(|c| c.ready),
                    serving: conditions.and_then(|c| c.serving),
                    terminating: conditions.and_then(|c| c.terminating),
                },
                node_name: endpoint.node_name.clone(),
            }
        })
        .collect();
    Ok(Located {
        origin: api_origin(),
        object: EndpointSlice {
            metadata,
            address_type,
            endpoints,
            ports,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An EndpointSlice as the EndpointSlice controller writes it (`kubectl get endpointslice -o
    /// json`), with `endpoints` replaced.
    fn slice(endpoints: serde_json::Value) -> discovery::EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-7xk2p",
                "generateName": "web-",
                "namespace": "prod",
                "resourceVersion": "5678",
                "labels": {
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "kubernetes.io/service-name": "web"
                },
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web",
                    "uid": "4b3c2f6e-0b7e-4d59-9a55-3c1f0b1f2a10", "controller": true,
                    "blockOwnerDeletion": true}]
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        }))
        .unwrap()
    }

    #[test]
    fn conditions_node_and_ports_carry_over() {
        let api_slice = slice(serde_json::json!([
            {"addresses": ["10.244.1.5"], "nodeName": "node-a", "zone": "a",
             "conditions": {"ready": false, "serving": true, "terminating": true},
             "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "prod"}},
            {"addresses": ["10.244.1.6"]}
        ]));
        assert_eq!(
            owner(&api_slice),
            Some(ServiceName {
                namespace: "prod".into(),
                name: "web".into()
            })
        );
        let located = convert(&api_slice).unwrap();
        assert_eq!(
            located.context(),
            "API server (EndpointSlice prod/web-7xk2p)"
        );
        let converted = located.object;
        assert_eq!(converted.address_type, AddressType::IPv4);
        assert_eq!(converted.ports[0].port, Some(8080));
        assert_eq!(converted.ports[0].name.as_deref(), Some("http"));
        let first = &converted.endpoints[0];
        assert_eq!(first.node_name.as_deref(), Some("node-a"));
        assert_eq!(
            (
                first.conditions.ready,
                first.conditions.serving,
                first.conditions.terminating
            ),
            (Some(false), Some(true), Some(true))
        );
        // Absent conditions stay absent: their defaults are applied where both modes read them.
        assert_eq!(converted.endpoints[1].conditions.ready, None);
    }

    #[test]
    fn headless_and_unowned_slices_have_no_owner() {
        let mut headless = slice(serde_json::json!([]));
        headless
            .metadata
            .labels
            .get_or_insert_default()
            .insert(HEADLESS_LABEL.into(), String::new());
        assert_eq!(owner(&headless), None);
        let mut unowned = slice(serde_json::json!([]));
        unowned.metadata.labels = None;
        assert_eq!(owner(&unowned), None);
    }

    #[test]
    fn bad_fields_are_named() {
        let mut bad = slice(serde_json::json!([]));
        bad.address_type = "IPv5".into();
        assert_eq!(
            convert(&bad).err().unwrap(),
            "API server (EndpointSlice prod/web-7xk2p): addressType: unknown type \"IPv5\""
        );
    }
}

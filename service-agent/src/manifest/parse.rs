//! One manifest file's text into API objects: YAML documents separated by `---` (JSON is YAML
//! too), and lists (`kind: List` or `ServiceList`...) of objects. Every error names the file, the
//! document and the field, so that it can be fixed without guesswork.
//!
//! Each document is turned into objects as soon as it is read and then dropped, so that a file of
//! ten thousand Services never holds all of its syntax trees at once (allocating and freeing those
//! was most of the time spent reading one). JSON is never built into a tree at all: its objects
//! are deserialized straight from their text.

use std::path::Path;

use serde::{Deserialize, de::DeserializeOwned};
use serde_json::value::RawValue;
use serde_yaml::Value;

use crate::controlplane::objects::{Located, Object, Origin};

/// The understood objects of a file, or every problem found in it: a file is used whole or not
/// at all, so that half of an edit never goes live.
pub fn parse_manifest(file: &Path, text: &str) -> Result<Vec<Located<Object>>, Vec<String>> {
    let chunks = match json_documents(text) {
        Some(documents) => vec![documents.into_iter().map(read_json_document).collect()],
        None => on_every_core(yaml_chunks(text), read_yaml_chunk),
    };
    let (mut objects, mut problems) = (Vec::new(), Vec::new());
    // Numbered across chunks as in one stream.
    for (index, document) in chunks.into_iter().flatten().enumerate() {
        let origin = |within: &str| format!("{}: document {}{within}", file.display(), index + 1);
        for (within, object) in document.objects {
            objects.push(Located {
                origin: Origin::new(origin(&within)),
                object,
            });
        }
        for (within, problem) in document.problems {
            problems.push(format!("{}{problem}", origin(&within)));
        }
        // After a syntax error the parser would only repeat it.
        if document.broken {
            break;
        }
    }
    if problems.is_empty() {
        Ok(objects)
    } else {
        Err(problems)
    }
}

/// What one document holds, before its number in the stream is known (the pieces of a large
/// stream are read in parallel). Each entry says where in the document it is (`, items[3]`, or
/// nothing for the document itself); a problem's text continues the origin it will be given.
#[derive(Default)]
struct Document {
    objects: Vec<(String, Object)>,
    problems: Vec<(String, String)>,
    /// The stream cannot be read past this document.
    broken: bool,
}

impl Document {
    fn problem(problem: String) -> Self {
        Document {
            problems: vec![(String::new(), problem)],
            ..Document::default()
        }
    }
}

/// A stream of JSON values, each as its text, if the whole of `text` is one. JSON is YAML too,
/// but serde_json reads it several times faster than libyaml does (what `kubectl get -o json`
/// prints can be megabytes). YAML's flow style starts with `{` too: whatever is not JSON
/// throughout is read as YAML, whose parser then also reports what is broken.
fn json_documents(text: &str) -> Option<Vec<&RawValue>> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    serde_json::Deserializer::from_str(text)
        .into_iter::<&RawValue>()
        .collect::<Result<_, _>>()
        .ok()
}

fn read_json_document(document: &RawValue) -> Document {
    let mut read = Document::default();
    read_object(JsonNode::new(document), String::new(), None, &mut read);
    read
}

/// The documents of one piece of a YAML stream, up to and including the first broken one.
fn read_yaml_chunk(chunk: &str) -> Vec<Document> {
    // Resolving merge keys walks every mapping; a piece without `<<` has none.
    let may_merge = chunk.contains("<<");
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(chunk) {
        let mut value = match Value::deserialize(document) {
            Ok(value) => value,
            Err(error) => {
                documents.push(Document {
                    broken: true,
                    ..Document::problem(format!(": {error}"))
                });
                break;
            }
        };
        // YAML merge keys (`<<: *defaults`) are resolved as kubectl resolves them.
        if may_merge && let Err(error) = value.apply_merge() {
            documents.push(Document::problem(format!(": {error}")));
            continue;
        }
        let mut read = Document::default();
        read_object(value, String::new(), None, &mut read);
        documents.push(read);
    }
    documents
}

/// Below this size a file is read on one core: threads would cost more than they save.
const PARALLEL_PARSE_ABOVE: usize = 256 * 1024;

/// Splits a large YAML stream into one piece per core, at document markers. YAML forbids a line
/// that starts with `---` and a space or line break inside any content (the spec's
/// c-forbidden), so such a line always begins a new document and the pieces parse exactly as the
/// whole. Streams with directives (`%YAML`), which belong to the document after them, stay whole.
fn yaml_chunks(text: &str) -> Vec<&str> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if cores == 1
        || text.len() < PARALLEL_PARSE_ABOVE
        || text.starts_with('%')
        || text.contains("\n%")
    {
        return vec![text];
    }
    let mut chunks = Vec::new();
    let mut start = 0;
    for part in 1..cores {
        let Some(marker) = next_document_marker(text, (text.len() * part / cores).max(start))
        else {
            break;
        };
        if marker > start {
            chunks.push(&text[start..marker]);
            start = marker;
        }
    }
    chunks.push(&text[start..]);
    chunks
}

/// Where the first `---` document-marker line that starts after byte `from` begins.
fn next_document_marker(text: &str, from: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut line = from + bytes[from..].iter().position(|&b| b == b'\n')? + 1;
    loop {
        let rest = &bytes[line..];
        if rest.starts_with(b"---")
            && matches!(rest.get(3), None | Some(b' ' | b'\t' | b'\r' | b'\n'))
        {
            return Some(line);
        }
        line += rest.iter().position(|&b| b == b'\n')? + 1;
    }
}

/// Runs `work` on each item, each on a thread of its own when there are several, and returns the
/// results in the items' order.
fn on_every_core<T: Send, R: Send>(items: Vec<T>, work: impl Fn(T) -> R + Sync) -> Vec<R> {
    if items.len() <= 1 {
        return items.into_iter().map(work).collect();
    }
    let work = &work;
    std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .into_iter()
            .map(|item| scope.spawn(move || work(item)))
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// A list's kind and apiVersion, which the API server leaves out of a typed list's items.
#[derive(Clone, Copy)]
struct ListItemType<'a> {
    kind: &'a str,
    api_version: &'a str,
}

const NOT_AN_OBJECT: &str = "expected a Kubernetes object (a mapping with apiVersion and kind)";

/// What telling a document's kind apart needs, as each syntax provides it.
trait Node: Sized {
    /// `None` for an empty document (e.g. after a trailing `---`); an error when this is no
    /// mapping.
    fn header(&self) -> Result<Option<Header>, String>;
    /// A list's `items`: `None` when there are none, an error when they are no list.
    fn into_items(self) -> Result<Option<Vec<Self>>, ()>;
    /// The object, or the path of the field that is wrong and what is wrong with it.
    fn into_object<T: DeserializeOwned>(self) -> Result<T, (String, String)>;
}

/// A document's kind and apiVersion (`None` when missing, an error when no string), and its
/// `namespace/name` for messages, read leniently since the object has not been checked yet.
struct Header {
    kind: Result<Option<String>, ()>,
    api_version: Result<Option<String>, ()>,
    qualified_name: String,
}

fn qualified_name(namespace: Option<&str>, name: Option<&str>) -> String {
    let namespace = namespace.filter(|ns| !ns.is_empty()).unwrap_or("default");
    format!("{namespace}/{}", name.unwrap_or("<unnamed>"))
}

/// Reads one document or list item into `read`; `within` says where it is in its document.
fn read_object<N: Node>(
    node: N,
    within: String,
    list_item_type: Option<ListItemType>,
    read: &mut Document,
) {
    let header = match node.header() {
        Ok(Some(header)) => header,
        Ok(None) => return,
        Err(problem) => {
            read.problems.push((within, format!(": {problem}")));
            return;
        }
    };
    let string_field =
        |name: &str, field: Result<Option<String>, ()>, inherited: Option<&str>| match field {
            Ok(Some(text)) => Ok(text),
            Ok(None) => inherited
                .map(str::to_owned)
                .ok_or_else(|| format!(": {name}: missing")),
            Err(()) => Err(format!(": {name}: must be a string")),
        };
    let (kind, api_version) = match (
        string_field("kind", header.kind, list_item_type.map(|t| t.kind)),
        string_field(
            "apiVersion",
            header.api_version,
            list_item_type.map(|t| t.api_version),
        ),
    ) {
        (Ok(kind), Ok(api_version)) => (kind, api_version),
        (kind, api_version) => {
            let problems = kind.err().into_iter().chain(api_version.err());
            read.problems
                .extend(problems.map(|problem| (within.clone(), problem)));
            return;
        }
    };
    let described = format!(" ({kind} {})", header.qualified_name);
    // The version within the group is not checked: the fields read here are the same in all
    // of them.
    let group = api_version
        .rsplit_once('/')
        .map_or("", |(group, _version)| group);
    let object = match (group, kind.as_str()) {
        ("", "Service") => into_object(node, &described).map(Object::Service),
        ("", "Pod") => into_object(node, &described).map(Object::Pod),
        ("", "Endpoints") => into_object(node, &described).map(Object::Endpoints),
        ("discovery.k8s.io", "EndpointSlice") => {
            into_object(node, &described).map(Object::EndpointSlice)
        }
        (_, list_kind) if list_kind.ends_with("List") => {
            read_list(node, &within, list_kind, &api_version, read);
            return;
        }
        _ => {
            tracing::debug!("{within}{described}: not a kind a Service proxy needs; skipped");
            return;
        }
    };
    match object {
        Ok(object) => read.objects.push((within, object)),
        Err(problem) => read.problems.push((within, problem)),
    }
}

fn into_object<N: Node, T: DeserializeOwned>(node: N, described: &str) -> Result<T, String> {
    node.into_object().map_err(|(path, message)| {
        // "." is the path of the object itself, e.g. for a missing top-level field.
        if path == "." {
            format!("{described}: {message}")
        } else {
            format!("{described}: {path}: {message}")
        }
    })
}

fn read_list<N: Node>(
    list: N,
    within: &str,
    list_kind: &str,
    api_version: &str,
    read: &mut Document,
) {
    let items = match list.into_items() {
        Ok(Some(items)) => items,
        Ok(None) => return,
        Err(()) => {
            let problem = format!(" ({list_kind}): items: must be a list");
            read.problems.push((within.to_owned(), problem));
            return;
        }
    };
    // `ServiceList` items are Services; a plain `List` says the kind of each of its items.
    let item_type = match list_kind.strip_suffix("List") {
        Some(item_kind) if !item_kind.is_empty() => Some(ListItemType {
            kind: item_kind,
            api_version,
        }),
        _ => None,
    };
    for (index, item) in items.into_iter().enumerate() {
        read_object(item, format!("{within}, items[{index}]"), item_type, read);
    }
}

/// A YAML document or list item, as a tree.
impl Node for Value {
    fn header(&self) -> Result<Option<Header>, String> {
        if self.is_null() {
            return Ok(None);
        }
        if !self.is_mapping() {
            return Err(NOT_AN_OBJECT.to_owned());
        }
        let string_field = |name: &str| match self.get(name) {
            Some(Value::String(text)) => Ok(Some(text.clone())),
            None | Some(Value::Null) => Ok(None),
            Some(_) => Err(()),
        };
        let metadata = self.get("metadata");
        let metadata_field =
            |name: &str| metadata.and_then(|m| m.get(name)).and_then(Value::as_str);
        Ok(Some(Header {
            kind: string_field("kind"),
            api_version: string_field("apiVersion"),
            qualified_name: qualified_name(metadata_field("namespace"), metadata_field("name")),
        }))
    }

    fn into_items(mut self) -> Result<Option<Vec<Self>>, ()> {
        match self.get_mut("items").map(std::mem::take) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Sequence(items)) => Ok(Some(items)),
            Some(_) => Err(()),
        }
    }

    fn into_object<T: DeserializeOwned>(self) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(self)
            .map_err(|error| (error.path().to_string(), error.inner().to_string()))
    }
}

/// A JSON document or list item, as its text: each object is deserialized straight from it.
struct JsonNode<'a> {
    text: &'a RawValue,
    /// The fields that tell an object's kind, read once (a List's items are among them);
    /// `None` when the value is no object.
    fields: Option<Result<JsonFields<'a>, String>>,
}

impl<'a> JsonNode<'a> {
    fn new(text: &'a RawValue) -> Self {
        let fields = (text.get().trim_start().starts_with('{'))
            .then(|| serde_json::from_str(text.get()).map_err(|e| json_message(&e)));
        JsonNode { text, fields }
    }
}

/// The fields of a JSON object that tell its kind, each as its text.
#[derive(Deserialize)]
struct JsonFields<'a> {
    #[serde(borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "apiVersion")]
    api_version: Option<&'a RawValue>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow, default)]
    items: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct JsonNames<'a> {
    #[serde(borrow, default)]
    namespace: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
}

/// A JSON string's value; `None` for anything else.
fn json_string(text: &RawValue) -> Option<String> {
    serde_json::from_str(text.get()).ok()
}

/// serde_json's message without its " at line L column C": positions within one object's text
/// would mislead, and the path names the field.
fn json_message(error: &serde_json::Error) -> String {
    let message = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    match message.strip_suffix(&position) {
        Some(without) => without.to_owned(),
        None => message,
    }
}

impl Node for JsonNode<'_> {
    fn header(&self) -> Result<Option<Header>, String> {
        let header = match &self.fields {
            None if self.text.get().trim_start() == "null" => return Ok(None),
            None => return Err(NOT_AN_OBJECT.to_owned()),
            Some(Err(problem)) => return Err(problem.clone()),
            Some(Ok(fields)) => fields,
        };
        let string_field = |field: Option<&RawValue>| match field {
            None => Ok(None),
            Some(text) => json_string(text).map(Some).ok_or(()),
        };
        let names = header
            .metadata
            .and_then(|metadata| serde_json::from_str::<JsonNames>(metadata.get()).ok());
        let name_field = |field: Option<&RawValue>| field.and_then(json_string);
        let (namespace, name) = names.map_or((None, None), |names| {
            (name_field(names.namespace), name_field(names.name))
        });
        Ok(Some(Header {
            kind: string_field(header.kind),
            api_version: string_field(header.api_version),
            qualified_name: qualified_name(namespace.as_deref(), name.as_deref()),
        }))
    }

    fn into_items(self) -> Result<Option<Vec<Self>>, ()> {
        let Some(Ok(fields)) = self.fields else {
            return Err(());
        };
        match fields.items {
            None => Ok(None),
            Some(items) => serde_json::from_str::<Vec<&RawValue>>(items.get())
                .map(|items| Some(items.into_iter().map(JsonNode::new).collect()))
                .map_err(|_| ()),
        }
    }

    fn into_object<T: DeserializeOwned>(self) -> Result<T, (String, String)> {
        let mut json = serde_json::Deserializer::from_str(self.text.get());
        serde_path_to_error::deserialize(&mut json)
            .map_err(|error| (error.path().to_string(), json_message(error.inner())))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::controlplane::objects::{
        AddressType, ExternalTrafficPolicy, LoadBalancerIpMode, PodPhase, Protocol, ServiceType,
        TargetPort,
    };

    fn parse(text: &str) -> Vec<Located<Object>> {
        parse_manifest(Path::new("examples/web.yaml"), text).unwrap_or_else(|problems| {
            panic!("unexpected problems: {problems:#?}");
        })
    }

    fn problems(text: &str) -> Vec<String> {
        match parse_manifest(Path::new("examples/web.yaml"), text) {
            Ok(objects) => panic!("expected problems, parsed {} objects", objects.len()),
            Err(problems) => problems,
        }
    }

    const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  creationTimestamp: \"2024-02-29T12:34:56Z\"
  labels: {app: web}
  annotations: {unknown: fields are fine}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20]
  selector: {app: web}
  publishNotReadyAddresses: true
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
  - {name: sig, port: 9, protocol: SCTP}
status: {loadBalancer: {}}
";

    #[test]
    fn parses_a_service() {
        let objects = parse(SERVICE);
        let [
            Located {
                origin,
                object: Object::Service(service),
            },
        ] = objects.as_slice()
        else {
            panic!("expected one Service, got {objects:?}");
        };
        assert_eq!(origin.to_string(), "examples/web.yaml: document 1");
        assert_eq!(service.metadata.name, "web");
        assert_eq!(service.metadata.namespace(), "shop");
        assert_eq!(
            service.metadata.creation_timestamp,
            Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_709_210_096))
        );
        let spec = &service.spec;
        assert_eq!(spec.service_type, ServiceType::NodePort);
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.20"));
        assert_eq!(spec.cluster_ips, ["10.96.0.20"]);
        assert_eq!(spec.selector["app"], "web");
        assert!(spec.publish_not_ready_addresses);
        assert_eq!(
            spec.ports[0].target_port,
            Some(TargetPort::Name("http".into()))
        );
        assert_eq!(spec.ports[0].node_port, Some(30080));
        assert_eq!(spec.ports[0].protocol, Protocol::Tcp);
        assert_eq!(spec.ports[1].target_port, Some(TargetPort::Number(5353)));
        assert_eq!(spec.ports[1].protocol, Protocol::Udp);
        assert_eq!(spec.ports[2].protocol, Protocol::Sctp);
        assert_eq!(spec.ports[2].target_port, None);
    }

    #[test]
    fn parses_external_addresses_and_load_balancer_status() {
        let objects = parse(
            "
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  externalIPs: [192.0.2.10, 2001:db8::10]
  externalTrafficPolicy: Global
  allocateLoadBalancerNodePorts: false
  ports: [{port: 80}]
status:
  loadBalancer:
    ingress:
    - {ip: 203.0.113.1, ipMode: VIP, ports: [{port: 80, protocol: TCP}]}
    - {ip: 203.0.113.2, ipMode: Proxy}
    - {hostname: lb.example.com}
",
        );
        let [
            Located {
                object: Object::Service(service),
                ..
            },
        ] = objects.as_slice()
        else {
            panic!("expected one Service, got {objects:?}");
        };
        let spec = &service.spec;
        assert_eq!(spec.external_ips, ["192.0.2.10", "2001:db8::10"]);
        assert_eq!(
            spec.external_traffic_policy,
            Some(ExternalTrafficPolicy::Cluster)
        );
        assert_eq!(spec.allocate_load_balancer_node_ports, Some(false));
        let ingress: Vec<_> = service
            .status
            .load_balancer
            .ingress
            .iter()
            .map(|ingress| (ingress.ip.as_deref(), ingress.ip_mode))
            .collect();
        assert_eq!(
            ingress,
            [
                (Some("203.0.113.1"), Some(LoadBalancerIpMode::Vip)),
                (Some("203.0.113.2"), Some(LoadBalancerIpMode::Proxy)),
                (None, None),
            ]
        );
        assert!(
            problems(&SERVICE.replace(
                "type: NodePort",
                "type: NodePort\n  externalTrafficPolicy: Nearest"
            ))[0]
                .contains("spec.externalTrafficPolicy: unknown variant `Nearest`"),
        );
    }

    #[test]
    fn parses_pods_endpoints_and_slices_across_documents() {
        let objects = parse(
            "
# A comment alone is no document; an empty one between two `---` is.
---
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  labels: {app: web}
  deletionTimestamp: \"2024-01-01T00:00:00Z\"
spec:
  nodeName: node-a
  containers:
  - name: app
    image: nginx
    ports: [{name: http, containerPort: 8080, protocol: TCP}]
status:
  phase: Running
  podIP: 10.0.0.5
  podIPs: [{ip: 10.0.0.5}]
  conditions: [{type: Ready, status: \"True\"}, {type: PodScheduled, status: \"True\"}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec: {replicas: 3}
---
apiVersion: v1
kind: Endpoints
metadata: {name: db, namespace: data}
subsets:
- addresses: [{ip: 10.0.1.2, nodeName: node-b}]
  notReadyAddresses: [{ip: 10.0.1.3}]
  ports: [{name: sql, port: 5432, protocol: TCP}]
---
{\"apiVersion\": \"discovery.k8s.io/v1\", \"kind\": \"EndpointSlice\",
 \"metadata\": {\"name\": \"db-abc\", \"labels\": {\"kubernetes.io/service-name\": \"db\"}},
 \"addressType\": \"IPv4\",
 \"endpoints\": [{\"addresses\": [\"10.0.1.4\"], \"conditions\": {\"ready\": false, \"terminating\": true}, \"nodeName\": \"node-c\"}],
 \"ports\": [{\"name\": \"sql\", \"port\": 5432}]}
---
",
        );
        let origins: Vec<String> = objects.iter().map(|o| o.origin.to_string()).collect();
        assert_eq!(
            origins,
            [
                "examples/web.yaml: document 2",
                "examples/web.yaml: document 4",
                "examples/web.yaml: document 5"
            ]
        );
        let Object::Pod(pod) = &objects[0].object else {
            panic!("document 2 is a Pod")
        };
        assert!(pod.metadata.deletion_timestamp.is_some());
        assert_eq!(pod.spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(pod.spec.containers[0].ports[0].container_port, 8080);
        assert_eq!(
            pod.spec.containers[0].ports[0].name.as_deref(),
            Some("http")
        );
        assert_eq!(pod.status.phase, Some(PodPhase::Running));
        assert_eq!(pod.status.pod_ips[0].ip, "10.0.0.5");
        assert_eq!(pod.status.conditions[0].condition_type, "Ready");
        assert_eq!(pod.status.conditions[0].status, "True");

        let Object::Endpoints(endpoints) = &objects[1].object else {
            panic!("document 4 is an Endpoints")
        };
        assert_eq!(endpoints.metadata.namespace(), "data");
        let subset = &endpoints.subsets[0];
        assert_eq!(subset.addresses[0].ip, "10.0.1.2");
        assert_eq!(subset.addresses[0].node_name.as_deref(), Some("node-b"));
        assert_eq!(subset.not_ready_addresses[0].ip, "10.0.1.3");
        assert_eq!(subset.ports[0].port, Some(5432));

        let Object::EndpointSlice(slice) = &objects[2].object else {
            panic!("document 5 is an EndpointSlice")
        };
        assert_eq!(slice.address_type, AddressType::IPv4);
        assert_eq!(slice.metadata.labels["kubernetes.io/service-name"], "db");
        let endpoint = &slice.endpoints[0];
        assert_eq!(
            endpoint.addresses[0].parse::<Ipv4Addr>().unwrap(),
            Ipv4Addr::new(10, 0, 1, 4)
        );
        assert_eq!(endpoint.conditions.ready, Some(false));
        assert_eq!(endpoint.conditions.serving, None);
        assert_eq!(endpoint.conditions.terminating, Some(true));
        assert_eq!(endpoint.node_name.as_deref(), Some("node-c"));
    }

    #[test]
    fn parses_lists_and_typed_lists() {
        let objects = parse(
            "
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: ConfigMap, metadata: {name: settings}}
- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{port: 80}]}}
---
apiVersion: v1
kind: ServiceList
items:
- {metadata: {name: b}, spec: {ports: [{port: 81}]}}
",
        );
        let described: Vec<String> = objects
            .iter()
            .map(|located| match &located.object {
                Object::Service(service) => {
                    format!("{}: {}", located.origin, service.metadata.name)
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            described,
            [
                "examples/web.yaml: document 1, items[1]: a",
                "examples/web.yaml: document 2, items[0]: b"
            ]
        );
    }

    #[test]
    fn errors_name_file_document_object_and_field() {
        let problems = problems(
            "
apiVersion: v1
kind: Service
metadata: {name: fine}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  ports:
  - port: eighty
",
        );
        assert_eq!(
            problems,
            [
                "examples/web.yaml: document 2 (Service default/web): spec.ports[0].port: invalid type: string \"eighty\", expected u16"
            ]
        );
    }

    #[test]
    fn reports_every_broken_document() {
        let problems = problems(
            "
kind: Service
metadata: {name: no-version}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: ns}
spec: {containers: [{ports: [{containerPort: 70000}]}]}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: s}, spec: {type: Magic}}
---
apiVersion: v1
kind: Service
metadata: {name: late, creationTimestamp: last tuesday}
---
apiVersion: v1
kind: Service
spec: {}
---
- just
- a list
",
        );
        let expected = [
            "examples/web.yaml: document 1: apiVersion: missing",
            "examples/web.yaml: document 2 (Pod ns/p): spec.containers[0].ports[0].containerPort: invalid value: integer `70000`, expected u16",
            "examples/web.yaml: document 3, items[0] (Service default/s): spec.type: unknown variant `Magic`, expected one of",
            "examples/web.yaml: document 4 (Service default/late): metadata.creationTimestamp: \"last tuesday\" is not an RFC 3339 time",
            "examples/web.yaml: document 5 (Service default/<unnamed>): missing field `metadata`",
            "examples/web.yaml: document 6: expected a Kubernetes object",
        ];
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
        for (problem, expected) in problems.iter().zip(expected) {
            assert!(
                problem.starts_with(expected),
                "{problem:?} does not start with {expected:?}"
            );
        }
    }

    #[test]
    fn yaml_syntax_errors_name_the_document() {
        let problems = problems(
            "apiVersion: v1\nkind: ConfigMap\n---\nmetadata: {name: [unclosed\n---\nkind: Pod\n",
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("examples/web.yaml: document 2: ")
                && problems[0].contains("line 4"),
            "{problems:?}"
        );
    }

    #[test]
    fn json_streams_are_read_like_yaml_streams() {
        let objects = parse(
            r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
{"apiVersion": "v1", "kind": "List", "items": [
  {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}}
]}"#,
        );
        assert_eq!(objects.len(), 1);
        assert_eq!(
            objects[0].origin.to_string(),
            "examples/web.yaml: document 2, items[0]"
        );
        let problems = problems(
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"ports": [{"port": "eighty"}]}}"#,
        );
        assert_eq!(
            problems,
            [
                "examples/web.yaml: document 1 (Service default/web): spec.ports[0].port: invalid type: string \"eighty\", expected u16"
            ]
        );
        // What is wrong is said as for YAML, without serde_json's positions within one object.
        let reported = self::problems(
            r#"{"apiVersion": "v1", "kind": 5}
[1, 2]
{"apiVersion": "v1", "kind": "ServiceList", "items": 3}
{"apiVersion": "v1", "kind": "List", "items": [{"kind": "Service", "metadata": {"name": "x", "namespace": "ns"}}]}"#,
        );
        assert_eq!(
            reported,
            [
                "examples/web.yaml: document 1: kind: must be a string",
                "examples/web.yaml: document 2: expected a Kubernetes object (a mapping with apiVersion and kind)",
                "examples/web.yaml: document 3 (ServiceList): items: must be a list",
                "examples/web.yaml: document 4, items[0]: apiVersion: missing",
            ]
        );
        // Flow-style YAML is not JSON, and broken JSON is reported by the YAML parser.
        assert_eq!(
            parse(
                "{apiVersion: v1, kind: Service, metadata: {name: f}, spec: {ports: [{port: 80}]}}"
            )
            .len(),
            1
        );
        let broken = self::problems(r#"{"apiVersion": "v1", "kind": "Service", "#);
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(
            broken[0].starts_with("examples/web.yaml: document 1: "),
            "{broken:?}"
        );
    }

    #[test]
    fn a_large_stream_parsed_in_pieces_numbers_documents_as_one_stream() {
        let service = |i: usize| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: big}}\nspec:\n  ports:\n  - port: {}\n",
                if i == 2999 {
                    "eighty".to_string()
                } else {
                    "80".to_string()
                }
            )
        };
        let text: String = (0..4000).map(|i| format!("---\n{}", service(i))).collect();
        assert!(text.len() > PARALLEL_PARSE_ABOVE && yaml_chunks(&text).len() > 1);
        assert_eq!(yaml_chunks(&text).concat(), text);
        let problems = problems(&text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("examples/web.yaml: document 3000 (Service big/s2999)"),
            "{problems:?}"
        );
        let fixed = text.replace("port: eighty", "port: 80");
        assert_eq!(parse(&fixed).len(), 4000);
    }

    #[test]
    fn only_lines_starting_with_three_dashes_and_a_break_are_document_markers() {
        let text = "a: ---\n----\nb: |\n  ---\n--- x\nc: 1\n---\n";
        assert_eq!(
            next_document_marker(text, 0),
            Some(text.find("--- x").unwrap())
        );
        let after = text.find("--- x").unwrap() + 1;
        assert_eq!(next_document_marker(text, after), Some(text.len() - 4));
        assert_eq!(next_document_marker("a: 1\nb: 2\n", 0), None);
    }

    #[test]
    fn merge_keys_are_resolved() {
        let objects = parse(
            "
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  ports:
  - &common {port: 80, protocol: UDP}
  - <<: *common
    port: 81
",
        );
        let Object::Service(service) = &objects[0].object else {
            panic!("expected a Service")
        };
        assert_eq!(service.spec.ports[1].port, 81);
        assert_eq!(service.spec.ports[1].protocol, Protocol::Udp);
    }
}

//! A stand-in for kube-apiserver, for tests and benchmarks: no real API server can be installed
//! on these machines, so this one speaks the part of its protocol that a list+watch client uses,
//! over plain HTTP on 127.0.0.1 in a chosen network namespace:
//!
//! - `GET /api/v1/services` and `GET /apis/discovery.k8s.io/v1/endpointslices`: a List with
//!   `metadata.resourceVersion` (items without `kind`/`apiVersion`, as the real server sends
//!   them);
//! - the same with `watch=true&resourceVersion=N`: a chunked stream of `ADDED`, `MODIFIED`,
//!   `DELETED` events after N, `BOOKMARK`s when asked for, and an `ERROR` event with a 410 Status
//!   when N is older than the kept history (the real server's "too old resource version");
//! - failure modes for tests: an outage (connections cut and refused), slow responses, and
//!   history expiry.
//!
//! Objects are `serde_json::Value`s in the real server's shapes (see [`objects`]).

mod http;
pub mod objects;

use std::{
    collections::BTreeMap,
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::netns;

/// The resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
}

impl Resource {
    const ALL: [Resource; 2] = [Resource::Services, Resource::EndpointSlices];

    fn path(self) -> &'static str {
        match self {
            Resource::Services => "/api/v1/services",
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::Services => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
        }
    }
}

/// What a watch event says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

struct WatchEvent {
    resource_version: u64,
    event_type: EventType,
    object: Value,
}

/// One resource's objects and the history that watches replay.
#[derive(Default)]
struct Collection {
    /// By (namespace, name), each with its current `metadata.resourceVersion`.
    objects: BTreeMap<(String, String), Value>,
    history: Vec<WatchEvent>,
}

/// A request as the server saw it, for tests to assert on (e.g. that a 410 caused a relist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    List(Resource),
    Watch {
        resource: Resource,
        resource_version: u64,
    },
}

struct State {
    /// The last resourceVersion handed out: one counter for all resources, as etcd's revision.
    resource_version: u64,
    collections: BTreeMap<Resource, Collection>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_watchable: u64,
    /// While true, every connection is cut and new ones are closed at once.
    outage: bool,
    /// Bumped to cut the watches in progress.
    connection_generation: u64,
    /// Added before every response.
    response_delay: Duration,
    requests: Vec<Request>,
    /// When the last List of each resource was fully written, for latency measurements.
    lists_written: BTreeMap<Resource, SystemTime>,
    /// When each event (by resourceVersion) was first fully written to a watch.
    events_written: BTreeMap<u64, SystemTime>,
    stopping: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every change of `state`, which live watches wait for.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update<T>(&self, change: impl FnOnce(&mut State) -> T) -> T {
        let result = change(&mut self.lock());
        self.changed.notify_all();
        result
    }
}

pub struct StandInApiServer {
    shared: Arc<Shared>,
    address: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl StandInApiServer {
    /// Listens on 127.0.0.1 (a free port) inside the network namespace `netns_name`, where the
    /// agent runs.
    pub fn start_in(netns_name: &str) -> Result<Self> {
        let listener = netns::enter(netns_name, || {
            TcpListener::bind("127.0.0.1:0").context("binding the stand-in API server")
        })?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                resource_version: 1,
                collections: Resource::ALL
                    .into_iter()
                    .map(|resource| (resource, Collection::default()))
                    .collect(),
                oldest_watchable: 0,
                outage: false,
                connection_generation: 0,
                response_delay: Duration::ZERO,
                requests: Vec::new(),
                lists_written: BTreeMap::new(),
                events_written: BTreeMap::new(),
                stopping: false,
            }),
            changed: Condvar::new(),
        });
        let acceptor = {
            let shared = shared.clone();
            thread::spawn(move || accept(&listener, &shared))
        };
        Ok(Self {
            shared,
            address,
            acceptor: Some(acceptor),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Writes a kubeconfig that points at this server (no credentials) into `dir`.
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let kubeconfig = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: stand-in
  cluster: {{server: \"{}\"}}
users:
- name: agent
  user: {{}}
contexts:
- name: stand-in
  context: {{cluster: stand-in, user: agent}}
current-context: stand-in
",
            self.url()
        );
        fs::write(&path, kubeconfig).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Creates or replaces an object (ADDED or MODIFIED), giving it the next resourceVersion;
    /// returns that version.
    pub fn apply(&self, resource: Resource, object: Value) -> u64 {
        self.shared.update(|state| apply(state, resource, object))
    }

    /// Creates or replaces many objects at once (the watches see them in order).
    pub fn apply_all(&self, resource: Resource, objects: impl IntoIterator<Item = Value>) {
        self.shared.update(|state| {
            for object in objects {
                apply(state, resource, object);
            }
        });
    }

    /// Deletes an object (DELETED, carrying its last state); false if there was none.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        self.shared.update(|state| {
            state.resource_version += 1;
            let resource_version = state.resource_version;
            let collection = state
                .collections
                .get_mut(&resource)
                .expect("every resource");
            let Some(mut object) = collection
                .objects
                .remove(&(namespace.to_owned(), name.to_owned()))
            else {
                return false;
            };
            object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
            collection.history.push(WatchEvent {
                resource_version,
                event_type: EventType::Deleted,
                object,
            });
            true
        })
    }

    /// Forgets the history, as etcd compaction does: a watch that resumes from any version
    /// handed out so far gets 410 Gone and must relist.
    pub fn expire_history(&self) {
        self.shared.update(|state| {
            state.oldest_watchable = state.resource_version + 1;
            for collection in state.collections.values_mut() {
                collection.history.clear();
            }
        });
    }

    /// Starts (true) or ends (false) an outage: live connections are cut, new ones closed.
    pub fn set_outage(&self, outage: bool) {
        self.shared.update(|state| {
            state.outage = outage;
            state.connection_generation += 1;
        });
    }

    /// Cuts every live connection (the watches end mid-stream), as a restarted server would.
    pub fn drop_connections(&self) {
        self.shared.update(|state| state.connection_generation += 1);
    }

    /// Makes every later response wait `delay` before its first byte.
    pub fn set_response_delay(&self, delay: Duration) {
        self.shared.update(|state| state.response_delay = delay);
    }

    /// The requests served so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// How many lists of `resource` were served so far.
    pub fn lists_of(&self, resource: Resource) -> usize {
        self.requests()
            .iter()
            .filter(|request| **request == Request::List(resource))
            .count()
    }

    /// When the last List of `resource` was fully written to the client.
    pub fn list_written(&self, resource: Resource) -> Option<SystemTime> {
        self.shared.lock().lists_written.get(&resource).copied()
    }

    /// When the event that gave out `resource_version` was first written to a watch.
    pub fn event_written(&self, resource_version: u64) -> Option<SystemTime> {
        self.shared
            .lock()
            .events_written
            .get(&resource_version)
            .copied()
    }
}

impl Drop for StandInApiServer {
    fn drop(&mut self) {
        self.shared.update(|state| state.stopping = true);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn apply(state: &mut State, resource: Resource, mut object: Value) -> u64 {
    state.resource_version += 1;
    let resource_version = state.resource_version;
    let metadata = &mut object["metadata"];
    metadata["resourceVersion"] = json!(resource_version.to_string());
    let key = (
        metadata["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
        metadata["name"].as_str().unwrap_or_default().to_owned(),
    );
    object["apiVersion"] = json!(resource.api_version());
    object["kind"] = json!(resource.kind());
    let collection = state
        .collections
        .get_mut(&resource)
        .expect("every resource");
    let event_type = if collection.objects.contains_key(&key) {
        EventType::Modified
    } else {
        EventType::Added
    };
    collection.objects.insert(key, object.clone());
    collection.history.push(WatchEvent {
        resource_version,
        event_type,
        object,
    });
    resource_version
}

/// How often the acceptor looks for a stop while no client connects. (Non-blocking: the
/// listener lives in another namespace, where the test process cannot connect to wake it.)
const ACCEPT_POLL_INTERVAL: Duration = Duration::from_millis(20);

fn accept(listener: &TcpListener, shared: &Arc<Shared>) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    loop {
        let (stopping, outage) = {
            let state = shared.lock();
            (state.stopping, state.outage)
        };
        if stopping {
            return;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) if stream.set_nonblocking(false).is_ok() => stream,
            Ok(_) => continue,
            Err(_) => {
                thread::sleep(ACCEPT_POLL_INTERVAL);
                continue;
            }
        };
        if outage {
            // Closed at once: the client sees its connection reset or its response cut.
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        thread::spawn(move || {
            // The agent hanging up or a cut connection ends the thread; nothing to report.
            let _ = http::serve_connection(stream, &shared);
        });
    }
}

/// How often a watch with bookmarks allowed gets one, like the real server's periodic bookmarks
/// (about a minute there; short here so tests exercise them).
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// The List response of `resource` now.
fn list(state: &State, resource: Resource) -> Value {
    let items: Vec<Value> = state.collections[&resource]
        .objects
        .values()
        .map(|object| {
            let mut item = object.clone();
            if let Some(item) = item.as_object_mut() {
                item.remove("kind");
                item.remove("apiVersion");
            }
            item
        })
        .collect();
    json!({
        "kind": format!("{}List", resource.kind()),
        "apiVersion": resource.api_version(),
        "metadata": {"resourceVersion": state.resource_version.to_string()},
        "items": items,
    })
}

/// The real server's answer to a watch from a compacted resourceVersion.
fn gone(resource_version: u64, oldest: u64) -> Value {
    json!({
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("too old resource version: {resource_version} ({oldest})"),
            "reason": "Expired",
            "code": 410
        }
    })
}

fn bookmark(resource: Resource, resource_version: u64) -> Value {
    json!({
        "type": "BOOKMARK",
        "object": {
            "kind": resource.kind(),
            "apiVersion": resource.api_version(),
            "metadata": {"resourceVersion": resource_version.to_string(), "creationTimestamp": null}
        }
    })
}

/// The events of `resource` after `since`, as (resourceVersion, watch line).
fn events_after(state: &State, resource: Resource, since: u64) -> Vec<(u64, Value)> {
    state.collections[&resource]
        .history
        .iter()
        .filter(|event| event.resource_version > since)
        .map(|event| {
            let line = json!({"type": event.event_type.as_str(), "object": event.object});
            (event.resource_version, line)
        })
        .collect()
}

/// When a watch asked to end (`timeoutSeconds`), or never.
fn watch_deadline(timeout_seconds: Option<u64>) -> Option<Instant> {
    timeout_seconds.map(|seconds| Instant::now() + Duration::from_secs(seconds))
}

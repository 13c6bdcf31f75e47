//! The API server as a live source: list and watch Services and EndpointSlices with kube's
//! watcher (which relists after a 410 Gone or a broken watch, and backs off on errors), keep the
//! cluster state in step, and hand the run loop a new desired state after each burst of events.

use std::{
    pin::Pin,
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};

use super::cluster_state::ClusterState;
use crate::model::DesiredState;

/// A burst ends when no event follows within this gap: little added to a single change's
/// latency, while events written back to back (and decoded one poll at a time) are gathered.
const BURST_GAP: Duration = Duration::from_millis(2);
/// A burst that never pauses is still synced this often.
const BURST_LIMIT: Duration = Duration::from_millis(100);

type Watch<K> = Pin<Box<dyn Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send>>;

/// One resource's watch, with what its current (re)list has buffered.
struct ResourceWatch<K> {
    /// The resource, for logs: `services`, `endpointslices`.
    resource: &'static str,
    stream: Watch<K>,
    /// Objects of a list in progress: applied together when it completes, so that a relist
    /// never shows the syncer a half-listed (and so half-withdrawn) cluster.
    relisting: Option<Vec<K>>,
    /// Whether a full list has completed at least once.
    listed: bool,
}

impl<K> ResourceWatch<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    fn new(client: &Client, resource: &'static str) -> Self {
        let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .boxed();
        ResourceWatch {
            resource,
            stream,
            relisting: None,
            listed: false,
        }
    }
}

/// What one watch event means for the cluster state.
enum Update<K> {
    Applied(K),
    Deleted(K),
    Relisted(Vec<K>),
}

impl<K> ResourceWatch<K> {
    /// Folds one watcher item into an update, if it completes one; errors are logged (the watcher
    /// retries by itself, after a backoff, and the dataplane stays as it is meanwhile).
    fn absorb(&mut self, item: Result<watcher::Event<K>, watcher::Error>) -> Option<Update<K>> {
        match item {
            Ok(watcher::Event::Init) => {
                tracing::info!(resource = self.resource, "listing");
                self.relisting = Some(Vec::new());
                None
            }
            Ok(watcher::Event::InitApply(object)) => {
                self.relisting.get_or_insert_default().push(object);
                None
            }
            Ok(watcher::Event::InitDone) => {
                let objects = self.relisting.take().unwrap_or_default();
                tracing::info!(
                    resource = self.resource,
                    objects = objects.len(),
                    "listed; watching"
                );
                self.listed = true;
                Some(Update::Relisted(objects))
            }
            Ok(watcher::Event::Apply(object)) => Some(Update::Applied(object)),
            Ok(watcher::Event::Delete(object)) => Some(Update::Deleted(object)),
            Err(error) => {
                tracing::warn!(
                    resource = self.resource,
                    reason = %error,
                    "list/watch failed; the dataplane stays as it is, retrying with backoff"
                );
                None
            }
        }
    }
}

pub struct KubernetesSource {
    services: ResourceWatch<core::Service>,
    slices: ResourceWatch<discovery::EndpointSlice>,
    state: ClusterState,
    /// Whether the state changed since the last refresh, or a relist asks for a sync anyway.
    pending: bool,
    problems: Vec<String>,
}

/// What a refresh produced: the state to serve, and the problems found since the last one.
pub struct KubernetesRefresh {
    pub state: DesiredState,
    pub problems: Vec<String>,
}

impl KubernetesSource {
    /// Starts watching; `proxy_name` is `--service-proxy-name`.
    pub fn new(client: &Client, proxy_name: Option<String>) -> Self {
        KubernetesSource {
            services: ResourceWatch::new(client, "services"),
            slices: ResourceWatch::new(client, "endpointslices"),
            state: ClusterState::new(proxy_name),
            pending: false,
            problems: Vec::new(),
        }
    }

    /// Waits for the next watch event, then keeps taking events while they follow each other
    /// closely, so that a burst (a rollout, a relist, an API server catching up) becomes one
    /// sync. Cancel-safe: an event is only taken once it is ready, and what was taken stays in
    /// the cluster state for the next refresh.
    pub async fn changed(&mut self) {
        self.next_event().await;
        let started = Instant::now();
        while started.elapsed() < BURST_LIMIT {
            if tokio::time::timeout(BURST_GAP, self.next_event())
                .await
                .is_err()
            {
                break;
            }
        }
    }

    async fn next_event(&mut self) {
        tokio::select! {
            Some(item) = self.services.stream.next() => self.absorb_service(item),
            Some(item) = self.slices.stream.next() => self.absorb_slice(item),
            // The watcher's streams never end; if one did, there would be nothing left to wait for.
            else => std::future::pending().await,
        }
    }

    /// The desired state, when it may differ from the last one returned (and a relist always
    /// counts, so that its sync shows it wrote nothing): None before both resources have been
    /// listed once, so an agent restarted over pinned maps never withdraws what a half-known
    /// cluster lacks.
    pub fn refresh(&mut self) -> Option<KubernetesRefresh> {
        if !self.services.listed || !self.slices.listed {
            return None;
        }
        let (changed, problems) = self.state.rebuild();
        self.report(problems);
        let relisted = std::mem::take(&mut self.pending);
        if !changed && !relisted {
            return None;
        }
        Some(KubernetesRefresh {
            state: self.state.desired().clone(),
            problems: std::mem::take(&mut self.problems),
        })
    }

    /// Logs problems when they are found (a bad update that changes nothing is not synced, and
    /// must not wait for the next change to be heard of), and keeps them for the next refresh.
    fn report(&mut self, problems: Vec<String>) {
        for problem in &problems {
            tracing::warn!("{problem}");
        }
        self.problems.extend(problems);
    }

    fn absorb_service(&mut self, item: Result<watcher::Event<core::Service>, watcher::Error>) {
        let problems = match self.services.absorb(item) {
            None => return,
            Some(Update::Applied(object)) => {
                self.state.apply_service(&object).into_iter().collect()
            }
            Some(Update::Deleted(object)) => {
                self.state.delete_service(&object);
                Vec::new()
            }
            Some(Update::Relisted(objects)) => {
                self.pending = true;
                self.state.replace_services(&objects)
            }
        };
        self.report(problems);
    }

    fn absorb_slice(
        &mut self,
        item: Result<watcher::Event<discovery::EndpointSlice>, watcher::Error>,
    ) {
        let problems = match self.slices.absorb(item) {
            None => return,
            Some(Update::Applied(object)) => self.state.apply_slice(&object).into_iter().collect(),
            Some(Update::Deleted(object)) => {
                self.state.delete_slice(&object);
                Vec::new()
            }
            Some(Update::Relisted(objects)) => {
                self.pending = true;
                self.state.replace_slices(&objects)
            }
        };
        self.report(problems);
    }
}

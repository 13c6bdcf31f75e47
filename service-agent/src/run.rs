//! `service-agent run`: load, attach, then keep the maps in step with the manifests or the API
//! server.

use std::{
    collections::BTreeSet,
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::IterableMap as _;
use service_agent::{
    api,
    conntrack_gc::ConntrackCollector,
    controlplane::PortRange,
    dataplane::{
        Dataplane, EXTERNAL_INGRESS_PROGRAM, LinkPins, MapsOrigin, POD_INGRESS_PROGRAM,
        SocketLbScope,
    },
    health,
    interfaces::LinkAttachments,
    model::{DesiredState, Node},
    service_health::ServiceHealthServers,
    socket_hooks,
    sync::Syncer,
    xdp::XdpAttachments,
};
use service_common::{ConntrackLifetimes, SNAT_PORT_COUNT, SNAT_PORT_FIRST};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing_subscriber::EnvFilter;

use crate::{
    RunArgs,
    source::{self, Refresh, Source},
};

/// How often manifests and links are looked at, besides the inotify wake-ups on manifest changes.
/// Both are a few stat/netlink calls when nothing changed.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

pub fn run(args: RunArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: RunArgs) -> Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tracing::info!(
        node_ips = ?args.node_ips,
        external_interfaces = ?args.external_interfaces,
        xdp_mode = ?args.xdp_mode,
        node_port_range = %args.node_port_range,
        node_name = ?args.node_name,
        cgroup = ?args.cgroup,
        socket_lb_host_only = args.socket_lb_host_only,
        lifetimes = ?args.conntrack_lifetimes(),
        "node settings"
    );

    if !args.external_interfaces.is_empty() && args.node_ips.is_empty() {
        bail!(
            "--external-interface needs --node-ip: traffic from outside is SNATed to the node's address"
        );
    }
    check_snat_ports(&args)?;
    if let Some(cgroup) = &args.cgroup {
        socket_hooks::check_cgroup(cgroup)?;
    }
    // From here on nothing removes what a previous agent left: an error exits and leaves the
    // datapath as it is, as SIGTERM does (`service-agent cleanup` is the one way to remove it).
    let (mut dataplane, origin) = Dataplane::load_pinned(&args.pin_dir, args.map_sizes())?;
    let api_mode = args.kubeconfig.is_some() || args.in_cluster;
    let node = Node {
        ips: args.node_ips.clone(),
        // In API mode the endpoints' nodeName is the kubelet's, which defaults to the hostname.
        name: args
            .node_name
            .clone()
            .or_else(|| api_mode.then(source::hostname).flatten()),
    };
    let result = serve_until_signal(
        &args,
        &mut dataplane,
        node,
        origin,
        &mut terminate,
        &mut interrupt,
    )
    .await;
    tracing::info!(
        "exiting: the datapath keeps running as it is (`service-agent cleanup` removes it)"
    );
    result
}

/// The program attachments, made (or adopted from a previous agent) once the maps serve what
/// the node should: at once when they were reused or copied from an older layout, else after
/// the first sync, so that a link never runs a program whose maps are still empty. The node
/// settings (`NODE_V4`) are written then too: until this agent is about to serve, the maps may
/// be the ones the previous agent's programs read, and an agent that fails at start must leave
/// them as they were.
struct Attachments {
    pods: LinkAttachments,
    external: LinkAttachments,
    xdp: XdpAttachments,
    cgroup: Option<PathBuf>,
    node: Node,
    socket_lb: SocketLbScope,
    lifetimes: ConntrackLifetimes,
    /// Set once the node settings are written and the socket hooks attached.
    started: bool,
    old_layouts_retired: bool,
    /// The attachment errors last logged: a link that keeps failing is logged once, not every
    /// tick.
    logged_errors: BTreeSet<String>,
}

impl Attachments {
    fn new(args: &RunArgs, node: Node) -> Self {
        Self {
            pods: LinkAttachments::new(POD_INGRESS_PROGRAM, args.pod_interfaces.clone()),
            external: LinkAttachments::new(
                EXTERNAL_INGRESS_PROGRAM,
                args.external_interfaces.clone(),
            ),
            xdp: XdpAttachments::new(args.xdp_mode, args.external_interfaces.clone()),
            cgroup: args.cgroup.clone(),
            node,
            socket_lb: if args.socket_lb_host_only {
                SocketLbScope::NodeOnly
            } else {
                SocketLbScope::NodeAndPods
            },
            lifetimes: args.conntrack_lifetimes(),
            started: false,
            old_layouts_retired: false,
            logged_errors: BTreeSet::new(),
        }
    }

    /// Attaches to new links and forgets vanished ones. Errors on one link are logged and
    /// retried on the next tick; failing to attach the socket hooks is fatal (a wrong --cgroup).
    fn reconcile(&mut self, dataplane: &mut Dataplane, proc_sys_net: &Path) -> Result<()> {
        if !dataplane.serving() {
            return Ok(());
        }
        let pins = dataplane.link_pins().context("a pinned dataplane")?;
        if !self.started {
            // Before any link runs this agent's programs: they serve only sockets of the
            // namespace it records, and age flows by its lifetimes.
            dataplane
                .maps
                .set_node(&self.node, self.socket_lb, self.lifetimes)?;
            // The flows the old programs started since the maps were copied, just before the
            // links get the new programs (again once they all have: see retire_old_layouts).
            dataplane.copy_late_flows()?;
        }
        let mut errors = Vec::new();
        for links in [&mut self.pods, &mut self.external] {
            errors.extend(attach_new_links(links, dataplane, &pins, proc_sys_net));
        }
        let (program, egress) = dataplane.xdp_program();
        if let Err(err) = self.xdp.reconcile(program, egress, &pins) {
            errors.push(err);
        }
        if !self.started {
            match &self.cgroup {
                Some(cgroup) => socket_hooks::attach(dataplane, cgroup)?,
                None => socket_hooks::detach_pinned(&pins)?,
            }
            self.started = true;
        }
        if errors.is_empty() && !self.old_layouts_retired {
            // Every link runs this agent's programs now: the old maps can go.
            if let Err(err) = dataplane.retire_old_layouts() {
                errors.push(err.context("removing the old map layout"));
            }
            self.old_layouts_retired = true;
        }
        let messages: BTreeSet<String> = errors.iter().map(|err| format!("{err:#}")).collect();
        for message in messages.difference(&self.logged_errors) {
            tracing::error!("{message}");
        }
        self.logged_errors = messages;
        Ok(())
    }
}

/// How long a failed sync waits before it is tried again: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_LAST: Duration = Duration::from_secs(30);

/// A desired state the maps do not hold yet because its sync failed, and when to try again.
struct PendingSync {
    refresh: Refresh,
    retry_at: Instant,
    backoff: Duration,
}

async fn serve_until_signal(
    args: &RunArgs,
    dataplane: &mut Dataplane,
    node: Node,
    origin: MapsOrigin,
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
) -> Result<()> {
    let node_name = node.name.clone();
    let mut syncer = Syncer::new(&dataplane.maps, node.clone())?;
    let mut attachments = Attachments::new(args, node);
    let mut source = Source::new(args).await?;
    let (published, state) = watch::channel(Arc::new(DesiredState::default()));
    let mut service_health = ServiceHealthServers::new(node_name, published.subscribe());
    // Health first: once the API socket answers (what tools and tests wait for), /healthz does.
    let (synced, ready) = watch::channel(false);
    if let Some(address) = args.metrics_address {
        health::serve(address, ready).await?;
    }
    let _api = api::serve(&args.api_socket, state)?;
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    let mut pending: Option<PendingSync> = None;
    let mut last_failure: Option<String> = None;
    let mut collector = ConntrackCollector::new(args.conntrack_lifetimes(), args.conntrack_map_max);
    // At once: maps pinned across a restart may hold flows long dead.
    let mut next_collection = Instant::now();
    loop {
        tokio::select! {
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            _ = ticks.tick() => {}
            changed = source.changed() => {
                if let Err(err) = changed {
                    tracing::warn!("{err:#}");
                }
            }
        }
        attachments.reconcile(dataplane, &args.proc_sys_net)?;
        if next_collection <= Instant::now() {
            collect_conntrack(&mut collector, dataplane);
            next_collection = Instant::now() + collector.interval();
        }
        let started = Instant::now();
        let (refresh, backoff) = match source.refresh()? {
            Some(refresh) => (refresh, RETRY_FIRST),
            None => match pending.take() {
                Some(due) if due.retry_at <= started => (due.refresh, due.backoff),
                not_due => {
                    pending = not_due;
                    continue;
                }
            },
        };
        let read = started.elapsed();
        if !*synced.borrow()
            && origin.serves()
            && refresh.state.services.is_empty()
            && refresh.problems > 0
        {
            // Every object failed (a stricter release over the same manifests, say): serving
            // nothing would empty what the previous agent programmed. Kept until a change
            // brings something this agent can serve.
            tracing::warn!(
                problems = refresh.problems,
                "no Service could be read; the maps keep what the previous agent programmed"
            );
            continue;
        }
        let synced_maps = syncer.sync(&refresh.state, &mut dataplane.maps);
        if !dataplane.serving() {
            // New maps now hold what the first sync wrote (all of it, or what fitted: serving
            // part of the Services beats serving none while the rest waits for room). Attached
            // before the state is published, so that a listed Service is a served one.
            dataplane.mark_serving()?;
            attachments.reconcile(dataplane, &args.proc_sys_net)?;
        }
        match synced_maps {
            Ok(report) => {
                tracing::info!(
                    services = refresh.state.services.len(),
                    map_writes = report.map_writes,
                    conntrack_purged = report.conntrack_purged,
                    problems = refresh.problems,
                    read_ms = read.as_millis(),
                    sync_ms = (started.elapsed() - read).as_millis(),
                    "synced"
                );
                if report.already_deleted > 0 {
                    tracing::warn!(
                        entries = report.already_deleted,
                        "map entries to delete were gone already (evicted, or removed by another \
                         process): the maps are re-read at the next sync"
                    );
                }
                if last_failure.take().is_some() {
                    tracing::info!("the maps hold the desired state again");
                }
                published.send_replace(Arc::new(refresh.state));
                service_health.reconcile(&published.borrow());
                synced.send_replace(true);
            }
            // The maps hold the last good state plus whatever writes succeeded, and serve it;
            // the same state is tried again after the backoff unless a newer one comes first.
            // A failure is logged once, and again only when it changes (a full map would
            // otherwise say the same every few seconds).
            Err(err) => {
                let message = err.to_string();
                if last_failure.as_deref() == Some(message.as_str()) {
                    tracing::debug!(
                        retry_in_ms = backoff.as_millis(),
                        "sync failed again: {message}"
                    );
                } else {
                    tracing::error!(retry_in_ms = backoff.as_millis(), "sync failed: {message}");
                    last_failure = Some(message);
                }
                pending = Some(PendingSync {
                    refresh,
                    retry_at: Instant::now() + backoff,
                    backoff: (backoff * 2).min(RETRY_LAST),
                });
            }
        }
    }
}

/// One run of the conntrack collector, logged with its figures. It runs on the loop (a full
/// table of 262,144 entries takes about 60 ms): a failed run is logged and retried at the next
/// interval.
fn collect_conntrack(collector: &mut ConntrackCollector, dataplane: &Dataplane) {
    match collector.collect(dataplane.maps.conntrack.map().fd().as_fd()) {
        Ok(report) => tracing::info!(
            scanned = report.scanned,
            deleted = report.deleted,
            took_ms = report.took.as_millis(),
            next_run_s = report.next_interval.as_secs(),
            "conntrack collected"
        ),
        Err(err) => tracing::warn!(
            retry_in_s = collector.interval().as_secs(),
            "collecting expired conntrack entries: {err}"
        ),
    }
}

/// SNATed flows get source ports in SNAT_PORT_FIRST.. (see service-common): a backend's reply to
/// one must never look like a request to a nodePort, and should not share a tuple with one of the
/// node's own connections.
fn check_snat_ports(args: &RunArgs) -> Result<()> {
    let snat = PortRange {
        first: SNAT_PORT_FIRST,
        last: SNAT_PORT_FIRST + (SNAT_PORT_COUNT - 1),
    };
    let overlap = |a: PortRange, b: PortRange| a.first <= b.last && b.first <= a.last;
    if overlap(args.node_port_range, snat) {
        bail!(
            "--node-port-range {} overlaps the ports external traffic is SNATed to ({snat}): \
             choose a nodePort range above {}",
            args.node_port_range,
            snat.last
        );
    }
    let path = args.proc_sys_net.join("ipv4/ip_local_port_range");
    if let Some(local) = fs::read_to_string(&path).ok().and_then(|text| {
        let mut bounds = text.split_whitespace().map(str::parse::<u16>);
        Some(PortRange {
            first: bounds.next()?.ok()?,
            last: bounds.next()?.ok()?,
        })
    }) && overlap(local, snat)
    {
        tracing::warn!(
            "{} ({local}) overlaps the SNAT ports ({snat}): a connection of the node's own \
             may share a tuple with a SNATed flow to the same backend",
            path.display()
        );
    }
    Ok(())
}

/// Attaches `links`' program to new links, with their sysctls; the errors, per link.
fn attach_new_links(
    links: &mut LinkAttachments,
    dataplane: &mut Dataplane,
    pins: &LinkPins,
    proc_sys_net: &Path,
) -> Vec<anyhow::Error> {
    let program = dataplane.tc_program(links.program());
    links.reconcile(program, pins, |name| write_link_sysctls(name, proc_sys_net))
}

/// Replies leave the backend's link with the service IP as source, for which the node has no
/// route back through that link: reverse-path filtering would drop them. The effective value is
/// max(all, link), so both must be 0 (Cilium does the same). And translated packets may carry
/// one of the node's own addresses as source (a nodePort reply, a SNATed request): without
/// accept_local the kernel drops them as martians before routing them on.
fn write_link_sysctls(name: &str, proc_sys_net: &Path) -> Result<()> {
    for (conf, key, value) in [
        ("all", "rp_filter", "0"),
        (name, "rp_filter", "0"),
        (name, "accept_local", "1"),
    ] {
        let path = proc_sys_net.join(format!("ipv4/conf/{conf}/{key}"));
        fs::write(&path, value)
            .with_context(|| format!("writing {value} to {}", path.display()))?;
    }
    Ok(())
}

//! `service-agent run`: load, attach, then keep the maps in step with the manifests or the API
//! server.

use std::{fs, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use service_agent::{
    api,
    controlplane::PortRange,
    dataplane::{Dataplane, EXTERNAL_INGRESS_PROGRAM, POD_INGRESS_PROGRAM, SocketLbScope},
    health,
    interfaces::LinkAttachments,
    model::{DesiredState, Node},
    service_health::ServiceHealthServers,
    socket_hooks::SocketHooks,
    sync::Syncer,
    xdp::XdpAttachments,
};
use service_common::{SNAT_PORT_COUNT, SNAT_PORT_FIRST};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing_subscriber::EnvFilter;

use crate::{
    RunArgs,
    source::{self, Source},
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
        "node settings"
    );

    if !args.external_interfaces.is_empty() && args.node_ips.is_empty() {
        bail!(
            "--external-interface needs --node-ip: traffic from outside is SNATed to the node's address"
        );
    }
    check_snat_ports(&args)?;
    let mut dataplane = Dataplane::load(Some(&args.pin_dir))?;
    tracing::info!(pin_dir = %args.pin_dir.display(), "dataplane loaded");
    let result = sync_until_signal(&args, &mut dataplane, &mut terminate, &mut interrupt).await;
    dataplane.remove_pins()?;
    tracing::info!("programs detached and pins removed");
    result
}

async fn sync_until_signal(
    args: &RunArgs,
    dataplane: &mut Dataplane,
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
) -> Result<()> {
    let api_mode = args.kubeconfig.is_some() || args.in_cluster;
    let node = Node {
        ips: args.node_ips.clone(),
        // In API mode the endpoints' nodeName is the kubelet's, which defaults to the hostname.
        name: args
            .node_name
            .clone()
            .or_else(|| api_mode.then(source::hostname).flatten()),
    };
    let socket_lb = if args.socket_lb_host_only {
        SocketLbScope::NodeOnly
    } else {
        SocketLbScope::NodeAndPods
    };
    dataplane.maps.set_node(&node, socket_lb)?;
    // After set_node: the programs serve only sockets of the namespace it records.
    let socket_hooks = args
        .cgroup
        .as_deref()
        .map(|cgroup| SocketHooks::attach(dataplane, cgroup))
        .transpose()?;
    let result = serve_until_signal(args, dataplane, node, terminate, interrupt).await;
    if let Some(hooks) = socket_hooks {
        hooks.detach(dataplane);
    }
    result
}

async fn serve_until_signal(
    args: &RunArgs,
    dataplane: &mut Dataplane,
    node: Node,
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
) -> Result<()> {
    let node_name = node.name.clone();
    let mut syncer = Syncer::new(&dataplane.maps, node)?;
    let mut links = [
        LinkAttachments::new(POD_INGRESS_PROGRAM, args.pod_interfaces.clone()),
        LinkAttachments::new(EXTERNAL_INGRESS_PROGRAM, args.external_interfaces.clone()),
    ];
    let mut xdp = XdpAttachments::new(args.xdp_mode, args.external_interfaces.clone());
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
    let result = loop {
        tokio::select! {
            _ = terminate.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
            _ = ticks.tick() => {}
            changed = source.changed() => {
                if let Err(err) = changed {
                    tracing::warn!("{err:#}");
                }
            }
        }
        for links in &mut links {
            if let Err(err) = attach_new_links(links, dataplane, &args.proc_sys_net) {
                tracing::error!("{err:#}");
            }
        }
        let (program, egress) = dataplane.xdp_program();
        if let Err(err) = xdp.reconcile(program, egress) {
            tracing::error!("{err:#}");
        }
        let started = std::time::Instant::now();
        let refresh = match source.refresh() {
            Ok(Some(refresh)) => refresh,
            Ok(None) => continue,
            Err(err) => break Err(err),
        };
        let read = started.elapsed();
        match syncer.sync(&refresh.state, &mut dataplane.maps) {
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
                published.send_replace(Arc::new(refresh.state));
                service_health.reconcile(&published.borrow());
                synced.send_replace(true);
            }
            // The maps hold the last good state plus whatever writes succeeded; the next change
            // retries from what the syncer knows was written.
            Err(err) => tracing::error!("sync failed: {err:#}"),
        }
    };
    for links in &mut links {
        links.detach_all(dataplane.tc_program(links.program()));
    }
    let (program, egress) = dataplane.xdp_program();
    xdp.detach_all(program, egress);
    result
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

fn attach_new_links(
    links: &mut LinkAttachments,
    dataplane: &mut Dataplane,
    proc_sys_net: &Path,
) -> Result<()> {
    for name in links.reconcile(dataplane.tc_program(links.program()))? {
        // Replies leave the backend's link with the service IP as source, for which the node
        // has no route back through that link: reverse-path filtering would drop them.
        // The effective value is max(all, link), so both must be 0 (Cilium does the same).
        // And translated packets may carry one of the node's own addresses as source (a
        // nodePort reply, a SNATed request): without accept_local the kernel drops them as
        // martians before routing them on.
        for (conf, key, value) in [
            ("all", "rp_filter", "0"),
            (name.as_str(), "rp_filter", "0"),
            (name.as_str(), "accept_local", "1"),
        ] {
            let path = proc_sys_net.join(format!("ipv4/conf/{conf}/{key}"));
            fs::write(&path, value)
                .with_context(|| format!("writing {value} to {}", path.display()))?;
        }
    }
    Ok(())
}

//! API-server mode end to end: the agent (`--kubeconfig`) watches a stand-in kube-apiserver
//! (`integration_tests::apiserver`) in the node's namespace, and real TCP/UDP traffic from a
//! client pod shows that the dataplane follows what the API says, and keeps what it has when the
//! API server misbehaves. Every test builds its own node, pods and API server, and fails, saying why,
//! when not run as root.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use integration_tests::{
    agent::Agent,
    apiserver::{
        Resource, StandInApiServer,
        objects::{self, Port, SliceEndpoint},
    },
    client::Transport,
    manifest::{SERVICE_TCP_PORT, SERVICE_UDP_PORT},
    netns,
    poll::{CONVERGENCE_TIMEOUT, eventually},
    require_root,
    servers::{TCP_PORT, UDP_PORT},
    topology::{Pod, Topology},
};

const DEFAULT: &str = "default";
const WEB: &str = "web";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const PORTS: [Port; 2] = [
    Port {
        name: "http",
        protocol: "TCP",
        port: SERVICE_TCP_PORT,
        target_port: TCP_PORT,
    },
    Port {
        name: "dns",
        protocol: "UDP",
        port: SERVICE_UDP_PORT,
        target_port: UDP_PORT,
    },
];
/// Longer than the watcher's first backoff steps (0.8 s, 1.6 s, 3.2 s, with jitter): how long
/// the agent may take to come back after the API server does.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(20);

fn tcp() -> SocketAddrV4 {
    SocketAddrV4::new(CLUSTER_IP, SERVICE_TCP_PORT)
}

fn udp() -> SocketAddrV4 {
    SocketAddrV4::new(CLUSTER_IP, SERVICE_UDP_PORT)
}

/// A node with a client pod and backend pods named `backends` (10.244.0.20, .21, ...).
fn node(backends: &[&str]) -> Result<(Topology, Pod, Vec<Pod>)> {
    let topology = Topology::new()?;
    let client = topology.add_pod("client", CLIENT_IP)?;
    let backends = (20u8..)
        .zip(backends)
        .map(|(host, name)| topology.add_backend_pod(name, Ipv4Addr::new(10, 244, 0, host)))
        .collect::<Result<_>>()?;
    Ok((topology, client, backends))
}

fn ready(pod: &Pod) -> SliceEndpoint<'_> {
    SliceEndpoint::ready(&pod.name, pod.ip, &pod.node_name)
}

fn web_service() -> serde_json::Value {
    objects::service(DEFAULT, WEB, CLUSTER_IP, &PORTS)
}

fn web_slice(name: &str, endpoints: &[SliceEndpoint]) -> serde_json::Value {
    objects::endpoint_slice(DEFAULT, WEB, name, endpoints, &PORTS)
}

fn start_agent<'t>(
    topology: &'t Topology,
    api: &StandInApiServer,
    extra_args: &[&str],
) -> Result<Agent<'t>> {
    let kubeconfig = api.write_kubeconfig(topology.scratch_dir())?;
    Agent::start_with_kubeconfig(topology, &kubeconfig, extra_args)
}

/// Publishes the Service `web` with the pods `ready` as its ready endpoints through `api`, starts
/// an agent on it and waits until `client` reaches exactly those pods through the ClusterIP.
fn serve_web<'t>(
    topology: &'t Topology,
    api: &StandInApiServer,
    client: &Pod,
    ready_pods: &[Pod],
) -> Result<Agent<'t>> {
    api.apply(Resource::Services, web_service());
    let endpoints: Vec<SliceEndpoint> = ready_pods.iter().map(ready).collect();
    api.apply(Resource::EndpointSlices, web_slice("web-abc", &endpoints));
    let agent = start_agent(topology, api, &[])?;
    let names: Vec<&str> = ready_pods.iter().map(|pod| pod.name.as_str()).collect();
    agent.wait_for_backends(client, Transport::Tcp, tcp(), &names)?;
    Ok(agent)
}

#[test]
fn a_service_created_through_the_api_answers_and_follows_its_slices() -> Result<()> {
    require_root("a_service_created_through_the_api_answers_and_follows_its_slices");
    let (topology, client, web) = node(&["web-0", "web-1", "web-2"])?;
    let api = StandInApiServer::start_in(topology.node_netns())?;
    let agent = start_agent(&topology, &api, &[])?;

    api.apply(Resource::Services, web_service());
    api.apply(
        Resource::EndpointSlices,
        web_slice("web-abc", &[ready(&web[0])]),
    );
    agent.wait_for_backends(&client, Transport::Tcp, tcp(), &["web-0"])?;
    agent.wait_for_backends(&client, Transport::Udp, udp(), &["web-0"])?;

    // Scaled up: the slice grows, and a second slice of the same Service adds another pod.
    api.apply(
        Resource::EndpointSlices,
        web_slice("web-abc", &[ready(&web[0]), ready(&web[1])]),
    );
    agent.wait_for_backends(&client, Transport::Tcp, tcp(), &["web-0", "web-1"])?;
    api.apply(
        Resource::EndpointSlices,
        web_slice("web-def", &[ready(&web[2])]),
    );
    agent.wait_for_backends(&client, Transport::Tcp, tcp(), &["web-0", "web-1", "web-2"])?;
    agent.wait_for_backends(&client, Transport::Udp, udp(), &["web-0", "web-1", "web-2"])?;

    // Scaled down: the second slice goes away.
    api.delete(Resource::EndpointSlices, DEFAULT, "web-def");
    agent.wait_for_backends(&client, Transport::Tcp, tcp(), &["web-0", "web-1"])?;

    // Deleted: the ClusterIP stops answering.
    api.delete(Resource::Services, DEFAULT, WEB);
    agent.wait_for_service_removal(DEFAULT, WEB)?;
    client.wait_until_unanswered(Transport::Tcp, tcp())?;
    client.wait_until_unanswered(Transport::Udp, udp())?;
    agent.stop()?;
    Ok(())
}

#[test]
fn a_terminating_endpoint_gets_no_new_flows_and_is_the_last_resort() -> Result<()> {
    require_root("a_terminating_endpoint_gets_no_new_flows_and_is_the_last_resort");
    let (topology, client, web) = node(&["web-0", "web-1"])?;
    let api = StandInApiServer::start_in(topology.node_netns())?;
    let agent = serve_web(&topology, &api, &client, &web)?;

    // web-0 is being deleted (terminating, still serving): new flows go to web-1 only.
    api.apply(
        Resource::EndpointSlices,
        web_slice("web-abc", &[ready(&web[0]).terminating(), ready(&web[1])]),
    );
    agent.wait_for_backends(&client, Transport::Tcp, tcp(), &["web-1"])?;
    agent.wait_for_backends(&client, Transport::Udp, udp(), &["web-1"])?;

    // With web-1 gone, the serving terminating endpoint is all there is: kube-proxy falls back
    // to it rather than refusing.
    api.apply(
        Resource::EndpointSlices,
        web_slice("web-abc", &[ready(&web[0]).terminating()]),
    );
    agent.wait_for_backends(&client, Transport::Tcp, tcp(), &["web-0"])?;
    agent.stop()?;
    Ok(())
}

#[test]
fn a_terminating_endpoints_open_connections_finish() -> Result<()> {
    require_root("a_terminating_endpoints_open_connections_finish");
    let (topology, client, web) = node(&["web-0", "web-1"])?;
    let api = StandInApiServer::start_in(topology.node_netns())?;
    let agent = serve_web(&topology, &api, &client, &web[..1])?;
    let mut open = client.tcp_connect(tcp())?;
    ensure!(
        open.request()? == "web-0",
        "the open connection is not on web-0"
    );

    api.apply(
        Resource::EndpointSlices,
        web_slice("web-abc", &[ready(&web[0]).terminating(), ready(&web[1])]),
    );
    agent.wait_for_backends(&client, Transport::Tcp, tcp(), &["web-1"])?;
    let answer = open
        .request()
        .context("the connection opened before web-0 started terminating")?;
    ensure!(
        answer == "web-0",
        "the open connection moved to {answer} instead of finishing on web-0"
    );
    agent.stop()?;
    Ok(())
}

/// A free TCP port on 127.0.0.1 in the namespace `netns_name` (for `--metrics-address`).
fn free_port(netns_name: &str) -> Result<u16> {
    netns::enter(netns_name, || {
        Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
    })
}

/// The status line of `GET path` on 127.0.0.1:`port` in `netns_name`.
fn probe(netns_name: &str, port: u16, path: &str) -> Result<String> {
    let response = netns::enter(netns_name, || {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })?;
    Ok(response.lines().next().unwrap_or_default().to_owned())
}

#[test]
fn an_api_server_down_at_start_or_slow_delays_readiness_only() -> Result<()> {
    require_root("an_api_server_down_at_start_or_slow_delays_readiness_only");
    let (topology, client, web) = node(&["web-0"])?;
    let api = StandInApiServer::start_in(topology.node_netns())?;
    api.apply(Resource::Services, web_service());
    api.apply(
        Resource::EndpointSlices,
        web_slice("web-abc", &[ready(&web[0])]),
    );
    api.set_outage(true);
    let port = free_port(topology.node_netns())?;
    let metrics_address = format!("127.0.0.1:{port}");
    let agent = start_agent(&topology, &api, &["--metrics-address", &metrics_address])?;
    let node_netns = topology.node_netns();

    ensure!(probe(node_netns, port, "/healthz")?.contains(" 200 "));
    eventually(CONVERGENCE_TIMEOUT, "a failed list logged", || {
        let log = agent.log()?;
        ensure!(
            log.contains("list/watch failed") && log.contains("resource=\"services\""),
            "no failed list of services in the log"
        );
        Ok(())
    })?;
    ensure!(
        probe(node_netns, port, "/readyz")?.contains(" 503 "),
        "ready before any list"
    );
    ensure!(agent.services()?.is_empty(), "programmed without a list");

    // Back, but slow: the lists take a second each; the agent waits for both, then serves.
    api.set_response_delay(Duration::from_secs(1));
    api.set_outage(false);
    eventually(RECOVERY_TIMEOUT, "ready after the first full sync", || {
        let status = probe(node_netns, port, "/readyz")?;
        ensure!(status.contains(" 200 "), "{status}");
        Ok(())
    })?;
    agent.wait_for_backends(&client, Transport::Tcp, tcp(), &["web-0"])?;
    agent.stop()?;
    Ok(())
}

#[test]
fn an_api_outage_mid_run_changes_nothing_in_the_dataplane() -> Result<()> {
    require_root("an_api_outage_mid_run_changes_nothing_in_the_dataplane");
    let (topology, client, web) = node(&["web-0", "web-1"])?;
    let api = StandInApiServer::start_in(topology.node_netns())?;
    let agent = serve_web(&topology, &api, &client, &web)?;
    let programmed = agent.services()?;
    let syncs = agent.synced_lines()?.len();

    api.set_outage(true);
    eventually(CONVERGENCE_TIMEOUT, "the cut watch logged", || {
        ensure!(
            agent.log()?.contains("list/watch failed"),
            "no failed watch in the log"
        );
        Ok(())
    })?;
    // Several backoff rounds: every one fails, and none may touch the maps.
    thread::sleep(Duration::from_secs(3));
    ensure!(
        agent.synced_lines()?.len() == syncs,
        "the agent synced during the outage: {:?}",
        &agent.synced_lines()?[syncs..]
    );
    ensure!(
        agent.services()? == programmed,
        "the programmed services changed"
    );
    agent.wait_for_backends(&client, Transport::Tcp, tcp(), &["web-0", "web-1"])?;
    agent.wait_for_backends(&client, Transport::Udp, udp(), &["web-0", "web-1"])?;

    // What changed meanwhile arrives once the API server is back.
    api.apply(
        Resource::EndpointSlices,
        web_slice("web-abc", &[ready(&web[1])]),
    );
    api.set_outage(false);
    eventually(
        RECOVERY_TIMEOUT,
        "the change made during the outage",
        || {
            let tally = client.tally(Transport::Tcp, tcp(), 20)?;
            ensure!(tally.keys().eq(["web-1"]), "answered by {tally:?}");
            Ok(())
        },
    )?;
    agent.stop()?;
    Ok(())
}

#[test]
fn a_watch_answered_410_gone_relists_without_flushing() -> Result<()> {
    require_root("a_watch_answered_410_gone_relists_without_flushing");
    let (topology, client, web) = node(&["web-0", "web-1"])?;
    let api = StandInApiServer::start_in(topology.node_netns())?;
    let agent = serve_web(&topology, &api, &client, &web[..1])?;
    let lists = api.lists_of(Resource::Services);
    let syncs = agent.synced_lines()?.len();

    // History compacted and the watches cut: resuming gets 410, the agent relists, finds the
    // same cluster, and its sync writes nothing.
    api.expire_history();
    api.drop_connections();
    eventually(RECOVERY_TIMEOUT, "a relist after 410 Gone", || {
        ensure!(
            api.lists_of(Resource::Services) > lists,
            "no new list of services"
        );
        ensure!(
            agent.synced_lines()?.len() > syncs,
            "no sync after the relist"
        );
        Ok(())
    })?;
    let relist_syncs = &agent.synced_lines()?[syncs..];
    ensure!(
        relist_syncs
            .iter()
            .all(|line| line.contains(" map_writes=0 ")),
        "a relist of an unchanged cluster wrote to the maps: {relist_syncs:?}"
    );
    agent.wait_for_backends(&client, Transport::Tcp, tcp(), &["web-0"])?;

    // A change made while the watch was away, then history lost: only the relist can see it.
    api.set_outage(true);
    api.apply(
        Resource::EndpointSlices,
        web_slice("web-abc", &[ready(&web[0]), ready(&web[1])]),
    );
    api.expire_history();
    api.set_outage(false);
    eventually(RECOVERY_TIMEOUT, "the change seen by the relist", || {
        let tally = client.tally(Transport::Tcp, tcp(), 20)?;
        ensure!(tally.keys().eq(["web-0", "web-1"]), "answered by {tally:?}");
        Ok(())
    })?;
    agent.stop()?;
    Ok(())
}

#[test]
fn a_burst_of_watch_events_becomes_a_few_syncs() -> Result<()> {
    require_root("a_burst_of_watch_events_becomes_a_few_syncs");
    const SERVICES: usize = 50;
    let (topology, client, web) = node(&["web-0"])?;
    let api = StandInApiServer::start_in(topology.node_netns())?;
    let agent = start_agent(&topology, &api, &[])?;
    eventually(CONVERGENCE_TIMEOUT, "the first sync", || {
        ensure!(!agent.synced_lines()?.is_empty(), "not synced yet");
        Ok(())
    })?;
    let syncs = agent.synced_lines()?.len();

    let name = |index: usize| format!("burst-{index}");
    let cluster_ip = |index: usize| Ipv4Addr::new(10, 96, 1, index as u8);
    api.apply_all(
        Resource::Services,
        (0..SERVICES).map(|i| objects::service(DEFAULT, &name(i), cluster_ip(i), &PORTS)),
    );
    api.apply_all(
        Resource::EndpointSlices,
        (0..SERVICES).map(|i| {
            let service = name(i);
            objects::endpoint_slice(
                DEFAULT,
                &service,
                &format!("{service}-x"),
                &[ready(&web[0])],
                &PORTS,
            )
        }),
    );
    eventually(CONVERGENCE_TIMEOUT, "every service of the burst", || {
        let programmed = agent.services()?.len();
        ensure!(
            programmed == SERVICES,
            "{programmed} of {SERVICES} programmed"
        );
        Ok(())
    })?;
    let burst_syncs = agent.synced_lines()?.len() - syncs;
    // 100 events, written back to back: gathered into a few syncs, not one each.
    ensure!(
        burst_syncs <= 10,
        "{burst_syncs} syncs for a burst of {} events",
        2 * SERVICES
    );
    let last = SocketAddrV4::new(cluster_ip(SERVICES - 1), SERVICE_TCP_PORT);
    agent.wait_for_backends(&client, Transport::Tcp, last, &["web-0"])?;
    agent.stop()?;
    Ok(())
}

#[test]
fn a_bad_update_is_reported_and_the_last_good_service_stays() -> Result<()> {
    require_root("a_bad_update_is_reported_and_the_last_good_service_stays");
    let (topology, client, web) = node(&["web-0"])?;
    let api = StandInApiServer::start_in(topology.node_netns())?;
    let agent = serve_web(&topology, &api, &client, &web[..1])?;

    // Something a validating API server would refuse, as a newer or broken one might send it.
    let mut broken = web_service();
    broken["spec"]["ports"][0]["port"] = serde_json::json!(70000);
    api.apply(Resource::Services, broken);
    eventually(CONVERGENCE_TIMEOUT, "the bad port reported", || {
        let expected = "Service default/web: spec.ports[0].port: 70000 is not a port number; \
                        its last good version stays programmed";
        ensure!(
            agent.log()?.contains(expected),
            "not in the log: {expected}"
        );
        Ok(())
    })?;
    agent.wait_for_backends(&client, Transport::Tcp, tcp(), &["web-0"])?;
    agent.wait_for_backends(&client, Transport::Udp, udp(), &["web-0"])?;
    agent.stop()?;
    Ok(())
}

//! Traffic from outside the pod network, on two nodes that each run their own agent with the same
//! manifests (as a DaemonSet does) and a client on the nodes' LAN (see `integration_tests::lan`):
//! NodePort with either externalTrafficPolicy, LoadBalancer ingress IPs and externalIPs, services
//! without endpoints, hairpin traffic, and many concurrent clients through one NodePort.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use integration_tests::{
    agent::Agent,
    client::Transport,
    lan::{self, CLIENT_IP, EXTERNAL_INTERFACE, Lan},
    manifest::{self, Exposure, ManifestDir, SERVICE_TCP_PORT, SERVICE_UDP_PORT},
    poll::{CONVERGENCE_TIMEOUT, eventually},
    require_root, servers,
    topology::Pod,
};

const DEFAULT: &str = "default";
const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];
const NODE_A: u8 = 1;
const NODE_B: u8 = 2;
/// Where the agent SNATs a pod that reaches its own service and lands on itself.
const HAIRPIN_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
/// A refused connection comes back within a round trip; a dropped one only after the timeout.
const REFUSAL_DEADLINE: Duration = Duration::from_millis(500);
/// The issue's bar for concurrent clients through one NodePort with SNAT.
const PARALLEL_CONNECTIONS: usize = 200;

/// The two nodes with their agents; each node runs the [`servers`] in the pods it is given.
struct Cluster {
    // Agents borrow the LAN's nodes; the struct is built and dropped in `with_cluster`.
    lan: Lan,
    manifests: ManifestDir,
}

impl Cluster {
    fn new() -> Result<Self> {
        let lan = Lan::new(&NODE_NAMES)?;
        let manifests = ManifestDir::create(lan.node(NODE_A))?;
        Ok(Self { lan, manifests })
    }

    /// A backend pod on node `index` at 10.244.<index>.<host>.
    fn backend(&self, index: u8, name: &str, host: u8) -> Result<Pod> {
        self.lan
            .node(index)
            .add_backend_pod(name, lan::pod_ip(index, host))
    }

    /// Starts one agent per node on the shared manifests, with the node's LAN link and IP, and
    /// the default XDP mode (native).
    fn agents(&self) -> Result<Vec<Agent<'_>>> {
        self.agents_in_xdp_mode("native")
    }

    fn agents_in_xdp_mode(&self, xdp_mode: &str) -> Result<Vec<Agent<'_>>> {
        [NODE_A, NODE_B]
            .into_iter()
            .map(|index| {
                let node_ip = lan::node_ip(index).to_string();
                Agent::start_with(
                    self.lan.node(index),
                    &[self.manifests.path()],
                    &[
                        "--external-interface",
                        EXTERNAL_INTERFACE,
                        "--node-ip",
                        &node_ip,
                        "--xdp-mode",
                        xdp_mode,
                    ],
                )
            })
            .collect()
    }
}

fn pods(pods: &[&Pod], app: &str) -> String {
    manifest::documents(
        pods.iter()
            .map(|pod| manifest::backend_pod(pod, DEFAULT, app, true)),
    )
}

fn tcp(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// Asks the backend behind `to` which address it sees the client come from.
fn peer_seen_by_backend(client: &Pod, to: SocketAddrV4) -> Result<Ipv4Addr> {
    let answer = client.tcp_connect(to)?.ask(servers::PEER_QUESTION)?;
    answer
        .parse()
        .with_context(|| format!("the backend behind {to} answered {answer:?} for its peer"))
}

/// The nodePort the agent allocated for `name`'s port `port_name`.
fn allocated_node_port(agent: &Agent, name: &str, port_name: &str) -> Result<u16> {
    eventually(CONVERGENCE_TIMEOUT, "a nodePort allocated", || {
        let services = agent.services()?;
        let service = services
            .iter()
            .find(|service| service["name"]["name"] == name)
            .with_context(|| format!("{name} not programmed"))?;
        let ports = service["ports"].as_array().context("no ports")?;
        let port = ports
            .iter()
            .find(|port| port["name"] == port_name)
            .with_context(|| format!("no port {port_name}: {service}"))?;
        let node_port = port["node_port"]
            .as_u64()
            .with_context(|| format!("no nodePort yet: {port}"))?;
        Ok(u16::try_from(node_port)?)
    })
}

/// Waits until `to` answers (programming is asynchronous) and returns the answering backend.
fn wait_for_answer(client: &Pod, transport: Transport, to: SocketAddrV4) -> Result<String> {
    eventually(
        CONVERGENCE_TIMEOUT,
        &format!("{transport} {to} answered"),
        || client.request(transport, to),
    )
}

/// Whether a TCP connection to `to` is refused (RST or ICMP port unreachable) quickly.
fn refused_quickly(client: &Pod, to: SocketAddrV4) -> Result<()> {
    let start = Instant::now();
    match client.tcp_connect(to) {
        Ok(_) => bail!("TCP {to} was accepted"),
        Err(error) => {
            let refused = error
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == ErrorKind::ConnectionRefused);
            ensure!(refused, "TCP {to} failed without being refused: {error:#}");
        }
    }
    let elapsed = start.elapsed();
    ensure!(
        elapsed < REFUSAL_DEADLINE,
        "TCP {to} was refused only after {elapsed:?}"
    );
    Ok(())
}

// With XDP native (the default), the packets between the client and node B never enter node
// A's stack: they are translated and sent on in XDP.
#[test]
fn nodeport_reaches_a_backend_on_the_other_node_and_replies_return_through_the_first() -> Result<()>
{
    require_root(
        "nodeport_reaches_a_backend_on_the_other_node_and_replies_return_through_the_first",
    );
    let cluster = Cluster::new()?;
    node_port_across_nodes(&cluster, "native")?;
    let counters = cluster.lan.xdp_counters(NODE_A)?;
    ensure!(
        counters
            .get("rx_queue_0_xdp_redirect")
            .copied()
            .unwrap_or(0)
            > 0,
        "node A's XDP program forwarded nothing: {counters:?}"
    );
    Ok(())
}

// The same in generic XDP, and with XDP off (TC does everything).
#[test]
fn nodeport_across_nodes_works_in_generic_xdp_and_without_xdp() -> Result<()> {
    require_root("nodeport_across_nodes_works_in_generic_xdp_and_without_xdp");
    for mode in ["generic", "off"] {
        let cluster = Cluster::new()?;
        node_port_across_nodes(&cluster, mode).with_context(|| format!("--xdp-mode {mode}"))?;
        let counters = cluster.lan.xdp_counters(NODE_A)?;
        ensure!(
            counters.get("rx_queue_0_xdp_packets").copied().unwrap_or(0) == 0,
            "--xdp-mode {mode} ran native XDP: {counters:?}"
        );
    }
    Ok(())
}

/// Client -> node A's NodePort with the backend on node B: works, and the backend sees node A.
fn node_port_across_nodes(cluster: &Cluster, xdp_mode: &str) -> Result<()> {
    let b_web = cluster.backend(NODE_B, "b-web", 20)?;
    let a_client = cluster
        .lan
        .node(NODE_A)
        .add_pod("a-client", lan::pod_ip(NODE_A, 10))?;
    let exposure = Exposure {
        service_type: "NodePort",
        node_ports: Some((30080, 30053)),
        ..Exposure::default()
    };
    cluster.manifests.write(
        "web.yaml",
        &manifest::documents([
            pods(&[&b_web], "web"),
            manifest::exposed_service(DEFAULT, "web", "web", &exposure),
        ]),
    )?;
    let agents = cluster.agents_in_xdp_mode(xdp_mode)?;
    let cluster_ip = agents[0].wait_for_service(DEFAULT, "web")?;
    let client = cluster.lan.client();
    let via_a = tcp(lan::node_ip(NODE_A), 30080);

    ensure!(wait_for_answer(&client, Transport::Tcp, via_a)? == "b-web");
    // The backend on B answers node A, which received the request and turns the reply back.
    let peer = peer_seen_by_backend(&client, via_a)?;
    ensure!(
        peer == lan::node_ip(NODE_A),
        "the backend saw {peer}, not node A's address (the NodePort SNAT)"
    );
    let udp_via_a = SocketAddrV4::new(lan::node_ip(NODE_A), 30053);
    ensure!(wait_for_answer(&client, Transport::Udp, udp_via_a)? == "b-web");
    // Node B serves the same nodePort with its local backend.
    let via_b = tcp(lan::node_ip(NODE_B), 30080);
    ensure!(wait_for_answer(&client, Transport::Tcp, via_b)? == "b-web");
    // The service's ClusterIP still works, from a pod on the node without the backend.
    let clusterip = tcp(cluster_ip, SERVICE_TCP_PORT);
    ensure!(wait_for_answer(&a_client, Transport::Tcp, clusterip)? == "b-web");
    ensure!(
        peer_seen_by_backend(&a_client, clusterip)? == a_client.ip,
        "a pod's source address must reach the backend unchanged"
    );
    Ok(())
}

// A LoadBalancer with policy Local: every node answers the load balancer's health check on the
// healthCheckNodePort with its own count of ready endpoints, as kube-proxy does, so that the
// load balancer sends traffic only to nodes that serve it.
#[test]
fn local_load_balancers_answer_health_checks_with_their_local_endpoints() -> Result<()> {
    require_root("local_load_balancers_answer_health_checks_with_their_local_endpoints");
    const HEALTH_CHECK_PORT: u16 = 32100;
    let cluster = Cluster::new()?;
    let b_web = cluster.backend(NODE_B, "b-web", 22)?;
    let exposure = Exposure {
        service_type: "LoadBalancer",
        local_policy: true,
        health_check_node_port: Some(HEALTH_CHECK_PORT),
        ..Exposure::default()
    };
    cluster.manifests.write(
        "web.yaml",
        &manifest::documents([
            pods(&[&b_web], "web"),
            manifest::exposed_service(DEFAULT, "web", "web", &exposure),
        ]),
    )?;
    let _agents = cluster.agents()?;
    let client = cluster.lan.client();
    let probe = |node: u8| {
        let to = SocketAddrV4::new(lan::node_ip(node), HEALTH_CHECK_PORT);
        eventually(
            CONVERGENCE_TIMEOUT,
            &format!("health check at {to}"),
            || http_get(&client, to),
        )
    };
    let on_b = probe(NODE_B)?;
    ensure!(
        on_b.starts_with("HTTP/1.1 200 OK")
            && on_b.contains("X-Load-Balancing-Endpoint-Weight: 1")
            && on_b.contains(r#""localEndpoints":1"#),
        "node B has the endpoint: {on_b}"
    );
    let on_a = probe(NODE_A)?;
    ensure!(
        on_a.starts_with("HTTP/1.1 503") && on_a.contains(r#""localEndpoints":0"#),
        "node A has no endpoint: {on_a}"
    );
    Ok(())
}

/// One HTTP request from `from`'s namespace; the whole answer.
fn http_get(from: &Pod, to: SocketAddrV4) -> Result<String> {
    integration_tests::netns::enter(&from.netns, || {
        let mut stream = TcpStream::connect_timeout(&to.into(), Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })
}

#[test]
fn local_policy_serves_only_where_an_endpoint_runs_and_keeps_the_client_address() -> Result<()> {
    require_root("local_policy_serves_only_where_an_endpoint_runs_and_keeps_the_client_address");
    let cluster = Cluster::new()?;
    let b_web = cluster.backend(NODE_B, "b-web", 20)?;
    let exposure = Exposure {
        service_type: "NodePort",
        node_ports: Some((30081, 30054)),
        local_policy: true,
        ..Exposure::default()
    };
    cluster.manifests.write(
        "web.yaml",
        &manifest::documents([
            pods(&[&b_web], "web"),
            manifest::exposed_service(DEFAULT, "web", "web", &exposure),
        ]),
    )?;
    let agents = cluster.agents()?;
    // Node A must be serving before its nodePort is tried: unserved, the node refuses.
    for agent in &agents {
        agent.wait_for_service(DEFAULT, "web")?;
    }
    let client = cluster.lan.client();

    let via_b = tcp(lan::node_ip(NODE_B), 30081);
    ensure!(wait_for_answer(&client, Transport::Tcp, via_b)? == "b-web");
    let peer = peer_seen_by_backend(&client, via_b)?;
    ensure!(
        peer == CLIENT_IP,
        "with the Local policy the backend must see the client ({CLIENT_IP}), saw {peer}"
    );
    let udp_via_b = SocketAddrV4::new(lan::node_ip(NODE_B), 30054);
    ensure!(wait_for_answer(&client, Transport::Udp, udp_via_b)? == "b-web");

    // Node A has no endpoint of its own: its nodePort drops, it neither forwards nor refuses.
    let via_a = tcp(lan::node_ip(NODE_A), 30081);
    match client.tcp_request(via_a) {
        Ok(backend) => bail!("{via_a} was answered by {backend} without a local endpoint"),
        Err(error) => {
            let refused = error
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == ErrorKind::ConnectionRefused);
            ensure!(!refused, "{via_a} must drop, not refuse: {error:#}");
        }
    }
    Ok(())
}

#[test]
fn load_balancer_ingress_and_external_ips_reach_backends_on_both_nodes() -> Result<()> {
    require_root("load_balancer_ingress_and_external_ips_reach_backends_on_both_nodes");
    let cluster = Cluster::new()?;
    let a_web = cluster.backend(NODE_A, "a-web", 20)?;
    let b_web = cluster.backend(NODE_B, "b-web", 20)?;
    let (ingress, external) = (
        Ipv4Addr::new(203, 0, 113, 10),
        Ipv4Addr::new(203, 0, 113, 20),
    );
    let exposure = Exposure {
        service_type: "LoadBalancer",
        external_ips: &[external],
        ingress_ips: &[ingress],
        ..Exposure::default()
    };
    cluster.manifests.write(
        "web.yaml",
        &manifest::documents([
            pods(&[&a_web, &b_web], "web"),
            manifest::exposed_service(DEFAULT, "web", "web", &exposure),
        ]),
    )?;
    let agents = cluster.agents()?;
    let client = cluster.lan.client();
    let both = ["a-web", "b-web"];

    for address in [ingress, external] {
        let to = tcp(address, SERVICE_TCP_PORT);
        agents[0].wait_for_backends(&client, Transport::Tcp, to, &both)?;
        let udp = SocketAddrV4::new(address, SERVICE_UDP_PORT);
        agents[0].wait_for_backends(&client, Transport::Udp, udp, &both)?;
    }
    // A LoadBalancer service also gets a nodePort, served on every node.
    let node_port = allocated_node_port(&agents[0], "web", "http")?;
    ensure!(
        allocated_node_port(&agents[1], "web", "http")? == node_port,
        "the two agents allocated different nodePorts for the same service"
    );
    let via_b = tcp(lan::node_ip(NODE_B), node_port);
    agents[1].wait_for_backends(&client, Transport::Tcp, via_b, &both)?;
    Ok(())
}

#[test]
fn services_without_endpoints_refuse_connections_at_once() -> Result<()> {
    require_root("services_without_endpoints_refuse_connections_at_once");
    let cluster = Cluster::new()?;
    let a_client = cluster
        .lan
        .node(NODE_A)
        .add_pod("a-client", lan::pod_ip(NODE_A, 10))?;
    let exposure = Exposure {
        service_type: "NodePort",
        node_ports: Some((30082, 30055)),
        ..Exposure::default()
    };
    // The selector matches no pod.
    cluster.manifests.write(
        "empty.yaml",
        &manifest::exposed_service(DEFAULT, "empty", "nothing", &exposure),
    )?;
    let agents = cluster.agents()?;
    let cluster_ip = agents[0].wait_for_service(DEFAULT, "empty")?;
    agents[1].wait_for_service(DEFAULT, "empty")?;

    refused_quickly(&a_client, tcp(cluster_ip, SERVICE_TCP_PORT))?;
    refused_quickly(&cluster.lan.client(), tcp(lan::node_ip(NODE_B), 30082))?;
    // UDP: the ICMP port unreachable makes the connected socket's receive fail at once.
    let udp = SocketAddrV4::new(cluster_ip, SERVICE_UDP_PORT);
    let start = Instant::now();
    match a_client.udp_request(udp) {
        Ok(answer) => bail!("UDP {udp} was answered: {answer}"),
        Err(error) => {
            let refused = error
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == ErrorKind::ConnectionRefused);
            ensure!(refused, "UDP {udp} failed without being refused: {error:#}");
        }
    }
    ensure!(start.elapsed() < REFUSAL_DEADLINE, "UDP {udp} refused late");
    Ok(())
}

// A backend's ICMP errors reach the external client through the node that translated the flow:
// here the UDP targetPort is a port nothing listens on, so the backend's kernel answers with a
// port unreachable about the datagram as node A sent it (node A's address and SNAT port, to the
// backend). Translated back, it makes the client's connected socket fail at once; untranslated,
// node A would swallow it and the client would only time out.
#[test]
fn a_backends_port_unreachable_reaches_the_external_client() -> Result<()> {
    require_root("a_backends_port_unreachable_reaches_the_external_client");
    let cluster = Cluster::new()?;
    let b_web = cluster.backend(NODE_B, "b-web", 20)?;
    let exposure = Exposure {
        service_type: "NodePort",
        node_ports: Some((30083, 30056)),
        udp_target_port: Some(9999),
        ..Exposure::default()
    };
    cluster.manifests.write(
        "closed.yaml",
        &manifest::documents([
            pods(&[&b_web], "closed"),
            manifest::exposed_service(DEFAULT, "closed", "closed", &exposure),
        ]),
    )?;
    let _agents = cluster.agents()?;
    let client = cluster.lan.client();
    // The TCP port reaches the backend once node A has programmed the service, UDP port included.
    ensure!(wait_for_answer(&client, Transport::Tcp, tcp(lan::node_ip(NODE_A), 30083))? == "b-web");

    let udp = SocketAddrV4::new(lan::node_ip(NODE_A), 30056);
    let start = Instant::now();
    match client.udp_request(udp) {
        Ok(answer) => bail!("UDP {udp} was answered: {answer}"),
        Err(error) => {
            let refused = error
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == ErrorKind::ConnectionRefused);
            ensure!(refused, "UDP {udp} failed without being refused: {error:#}");
        }
    }
    ensure!(start.elapsed() < REFUSAL_DEADLINE, "UDP {udp} refused late");
    Ok(())
}

#[test]
fn a_pod_reaching_its_own_service_gets_its_replies() -> Result<()> {
    require_root("a_pod_reaching_its_own_service_gets_its_replies");
    let cluster = Cluster::new()?;
    let a_web = cluster.backend(NODE_A, "a-web", 20)?;
    let exposure = Exposure {
        service_type: "ClusterIP",
        ..Exposure::default()
    };
    cluster.manifests.write(
        "web.yaml",
        &manifest::documents([
            pods(&[&a_web], "web"),
            manifest::exposed_service(DEFAULT, "web", "web", &exposure),
        ]),
    )?;
    let agents = cluster.agents()?;
    let cluster_ip = agents[0].wait_for_service(DEFAULT, "web")?;

    let to = tcp(cluster_ip, SERVICE_TCP_PORT);
    ensure!(wait_for_answer(&a_web, Transport::Tcp, to)? == "a-web");
    // The pod sees itself reached from the hairpin address: replying to its own address would
    // never leave the pod, so the agent must translate the source too.
    let peer = peer_seen_by_backend(&a_web, to)?;
    ensure!(
        peer == HAIRPIN_ADDRESS,
        "hairpin traffic must come from {HAIRPIN_ADDRESS}, came from {peer}"
    );
    let udp = SocketAddrV4::new(cluster_ip, SERVICE_UDP_PORT);
    ensure!(wait_for_answer(&a_web, Transport::Udp, udp)? == "a-web");
    Ok(())
}

#[test]
fn parallel_clients_through_one_nodeport_each_get_their_own_translation() -> Result<()> {
    require_root("parallel_clients_through_one_nodeport_each_get_their_own_translation");
    let cluster = Cluster::new()?;
    let b_web = cluster.backend(NODE_B, "b-web", 20)?;
    let exposure = Exposure {
        service_type: "NodePort",
        node_ports: Some((30083, 30056)),
        ..Exposure::default()
    };
    cluster.manifests.write(
        "web.yaml",
        &manifest::documents([
            pods(&[&b_web], "web"),
            manifest::exposed_service(DEFAULT, "web", "web", &exposure),
        ]),
    )?;
    let _agents = cluster.agents()?;
    let client = cluster.lan.client();
    let via_a = tcp(lan::node_ip(NODE_A), 30083);
    wait_for_answer(&client, Transport::Tcp, via_a)?;

    // Every connection is open before any asks, so that all their translations coexist.
    let mut sessions = (0..PARALLEL_CONNECTIONS)
        .map(|index| {
            client
                .tcp_connect(via_a)
                .with_context(|| format!("connection {index}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let answers = thread::scope(|scope| {
        let asking: Vec<_> = sessions
            .iter_mut()
            .map(|session| scope.spawn(move || session.request()))
            .collect();
        asking
            .into_iter()
            .map(|asked| asked.join().expect("a request thread panicked"))
            .collect::<Vec<_>>()
    });
    let failed: Vec<String> = answers
        .iter()
        .enumerate()
        .filter_map(|(index, answer)| match answer {
            Ok(backend) if backend == "b-web" => None,
            Ok(other) => Some(format!("connection {index}: answered by {other}")),
            Err(error) => Some(format!("connection {index}: {error:#}")),
        })
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {PARALLEL_CONNECTIONS} connections failed: {failed:?}",
        failed.len()
    );
    Ok(())
}

#[test]
fn type_changes_open_and_close_node_ports_live() -> Result<()> {
    require_root("type_changes_open_and_close_node_ports_live");
    let cluster = Cluster::new()?;
    let b_web = cluster.backend(NODE_B, "b-web", 20)?;
    let write = |exposure: &Exposure| {
        cluster.manifests.write(
            "web.yaml",
            &manifest::documents([
                pods(&[&b_web], "web"),
                manifest::exposed_service(DEFAULT, "web", "web", exposure),
            ]),
        )
    };
    let cluster_ip_only = Exposure {
        service_type: "ClusterIP",
        ..Exposure::default()
    };
    write(&cluster_ip_only)?;
    let agents = cluster.agents()?;
    let cluster_ip = agents[0].wait_for_service(DEFAULT, "web")?;
    let client = cluster.lan.client();
    let node_port = tcp(lan::node_ip(NODE_A), 30084);
    let ingress = Ipv4Addr::new(203, 0, 113, 30);
    let load_balancer = tcp(ingress, SERVICE_TCP_PORT);
    let unanswered = |to: SocketAddrV4| client.wait_until_unanswered(Transport::Tcp, to);
    unanswered(node_port)?;

    write(&Exposure {
        service_type: "NodePort",
        node_ports: Some((30084, 30057)),
        ..Exposure::default()
    })?;
    ensure!(wait_for_answer(&client, Transport::Tcp, node_port)? == "b-web");
    unanswered(load_balancer)?;

    write(&Exposure {
        service_type: "LoadBalancer",
        node_ports: Some((30084, 30057)),
        ingress_ips: &[ingress],
        ..Exposure::default()
    })?;
    ensure!(wait_for_answer(&client, Transport::Tcp, load_balancer)? == "b-web");
    ensure!(wait_for_answer(&client, Transport::Tcp, node_port)? == "b-web");

    write(&cluster_ip_only)?;
    unanswered(node_port)?;
    unanswered(load_balancer)?;
    ensure!(
        agents[0].wait_for_service(DEFAULT, "web")? == cluster_ip,
        "the ClusterIP changed with the type"
    );
    Ok(())
}

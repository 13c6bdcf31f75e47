//! The node's own processes as clients: `curl <ClusterIP>`, `curl 127.0.0.1:<nodePort>` and
//! `curl <node IP>:<nodePort>` run on a node, whose sockets the agent's cgroup socket programs
//! translate (`--cgroup`), and pods' TCP connections, which the same programs send straight to a
//! backend. Two nodes on a LAN (see `integration_tests::lan`), each with its own agent; both
//! agents attach to the same test cgroup. The client processes run in a node's or a pod's
//! network namespace and in that cgroup (see `integration_tests::node_client`).

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use integration_tests::{
    agent::{self, Agent},
    cgroup::TestCgroup,
    lan::{self, EXTERNAL_INTERFACE, Lan},
    manifest::{self, Exposure, ManifestDir, SERVICE_TCP_PORT, SERVICE_UDP_PORT},
    netns::{self, NetNs},
    node_client::{NodeClient, Reply, Request},
    poll::{CONVERGENCE_TIMEOUT, eventually},
    process::ip,
    require_root,
    topology::Pod,
};

const CLIENT_BINARY: &str = env!("CARGO_BIN_EXE_node-client");
const DEFAULT: &str = "default";
const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];
const NODE_A: u8 = 1;
const NODE_B: u8 = 2;
/// Requests per expected backend when checking who answers: each is a new process and socket,
/// so a new choice; with two backends the chance that one never shows up is 2^-19.
const REQUESTS_PER_BACKEND: usize = 10;
/// A refusal by the socket program is the connect() call's own result.
const REFUSAL_DEADLINE: Duration = Duration::from_millis(500);
/// What the server of the other namespace answers, so that a test can tell it from a backend.
const UNTRANSLATED: &str = "untranslated";

/// Two nodes, their agents' manifests and the cgroup the agents serve.
struct Cluster {
    lan: Lan,
    manifests: ManifestDir,
    cgroup: TestCgroup,
}

impl Cluster {
    fn new() -> Result<Self> {
        let lan = Lan::new(&NODE_NAMES)?;
        let manifests = ManifestDir::create(lan.node(NODE_A))?;
        let cgroup = TestCgroup::create(lan.node(NODE_A).run_id(), "node-processes")?;
        Ok(Self {
            lan,
            manifests,
            cgroup,
        })
    }

    fn backend(&self, index: u8, name: &str, host: u8) -> Result<Pod> {
        self.lan
            .node(index)
            .add_backend_pod(name, lan::pod_ip(index, host))
    }

    /// Writes the backend pods' objects and a Service `web` selecting them.
    fn serve(&self, backends: &[&Pod], exposure: &Exposure) -> Result<()> {
        let pods = backends
            .iter()
            .map(|pod| manifest::backend_pod(pod, DEFAULT, "web", true));
        let service = manifest::exposed_service(DEFAULT, "web", "web", exposure);
        self.manifests
            .write("web.yaml", &manifest::documents(pods.chain([service])))?;
        Ok(())
    }

    /// Backends `a-web` on node A and `b-web` on node B behind the NodePort Service `web` with
    /// `node_ports` (TCP, UDP), and both agents running and serving it: the agents and the
    /// ClusterIP.
    fn web_on_both_nodes(&self, node_ports: (u16, u16)) -> Result<(Vec<Agent<'_>>, Ipv4Addr)> {
        let a_web = self.backend(NODE_A, "a-web", 20)?;
        let b_web = self.backend(NODE_B, "b-web", 20)?;
        self.serve(
            &[&a_web, &b_web],
            &Exposure {
                service_type: "NodePort",
                node_ports: Some(node_ports),
                ..Exposure::default()
            },
        )?;
        let agents = self.agents()?;
        let cluster_ip = agents[0].wait_for_service(DEFAULT, "web")?;
        agents[1].wait_for_service(DEFAULT, "web")?;
        Ok((agents, cluster_ip))
    }

    /// One agent per node, both with `--cgroup` on the same directory.
    fn agents(&self) -> Result<Vec<Agent<'_>>> {
        self.agents_with(&[])
    }

    /// The same with more arguments for both agents.
    fn agents_with(&self, extra_args: &[&str]) -> Result<Vec<Agent<'_>>> {
        let cgroup = self
            .cgroup
            .path()
            .to_str()
            .context("non-UTF-8 cgroup path")?;
        [NODE_A, NODE_B]
            .into_iter()
            .map(|index| {
                let node_ip = lan::node_ip(index).to_string();
                let mut args = vec![
                    "--external-interface",
                    EXTERNAL_INTERFACE,
                    "--node-ip",
                    &node_ip,
                    "--cgroup",
                    cgroup,
                ];
                args.extend_from_slice(extra_args);
                Agent::start_with(self.lan.node(index), &[self.manifests.path()], &args)
            })
            .collect()
    }

    /// Processes of node `index` in the agents' cgroup.
    fn node_client(&self, index: u8) -> NodeClient<'_> {
        NodeClient::new(
            CLIENT_BINARY,
            self.lan.node(index).node_netns(),
            &self.cgroup,
        )
    }
}

/// Waits until requests to `to` are answered by exactly the backends `expected`, each reply
/// showing `to`, not a backend, as the socket's peer and as the UDP reply's source.
fn wait_for_backends(
    client: &NodeClient,
    request: Request,
    to: SocketAddrV4,
    expected: &[&str],
) -> Result<()> {
    let expected: BTreeSet<&str> = expected.iter().copied().collect();
    let requests = REQUESTS_PER_BACKEND * expected.len();
    eventually(
        CONVERGENCE_TIMEOUT,
        &format!("{request} {to} answered by exactly {expected:?}"),
        || {
            let mut answered = BTreeSet::new();
            for _ in 0..requests {
                let reply = client.request(request, to)?;
                check_addresses(&reply, request, to)?;
                answered.insert(reply.backend);
            }
            let answered: BTreeSet<&str> = answered.iter().map(String::as_str).collect();
            ensure!(answered == expected, "answered by {answered:?}");
            Ok(())
        },
    )
}

/// The process must see the address it asked for, never the backend's.
fn check_addresses(reply: &Reply, request: Request, to: SocketAddrV4) -> Result<()> {
    let (peer, source) = match request {
        Request::Tcp => (reply.peer, Some(to)),
        Request::UdpConnected => (reply.peer, reply.source),
        Request::UdpUnconnected => (Some(to), reply.source),
    };
    ensure!(
        peer == Some(to) && source == Some(to),
        "{request} {to}: getpeername gave {peer:?}, the reply came from {source:?}"
    );
    Ok(())
}

/// Whether `request` to `to` fails with ECONNREFUSED, and at once.
fn refused_at_once(client: &NodeClient, request: Request, to: SocketAddrV4) -> Result<()> {
    let start = Instant::now();
    match client.request(request, to) {
        Ok(reply) => bail!("{request} {to} was answered by {}", reply.backend),
        Err(error) => {
            let refused = error
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == ErrorKind::ConnectionRefused);
            ensure!(
                refused,
                "{request} {to} failed without being refused: {error:#}"
            );
        }
    }
    // Includes starting the process, which the refusal itself does not need.
    let elapsed = start.elapsed();
    ensure!(
        elapsed < REFUSAL_DEADLINE,
        "{request} {to} was refused only after {elapsed:?}"
    );
    Ok(())
}

#[test]
fn node_processes_reach_cluster_ips_and_node_ports_over_tcp() -> Result<()> {
    require_root("node_processes_reach_cluster_ips_and_node_ports_over_tcp");
    let cluster = Cluster::new()?;
    let (agents, cluster_ip) = cluster.web_on_both_nodes((30100, 30101))?;
    let both = ["a-web", "b-web"];

    let on_a = cluster.node_client(NODE_A);
    let cluster_ip_port = SocketAddrV4::new(cluster_ip, SERVICE_TCP_PORT);
    for to in [
        cluster_ip_port,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 30100),
        SocketAddrV4::new(lan::node_ip(NODE_A), 30100),
    ] {
        wait_for_backends(&on_a, Request::Tcp, to, &both)?;
    }
    // Node B's processes are served by node B's agent, through the same cgroup.
    let on_b = cluster.node_client(NODE_B);
    let b_node_port = SocketAddrV4::new(lan::node_ip(NODE_B), 30100);
    wait_for_backends(&on_b, Request::Tcp, b_node_port, &both)?;

    // Stopped agents leave their hooks attached: node processes are still served.
    let mut pin_dirs = Vec::new();
    for agent in agents {
        pin_dirs.push(agent.pin_dir().to_path_buf());
        agent.stop()?;
    }
    let reply = on_a
        .request(Request::Tcp, cluster_ip_port)
        .context("the stopped agents' hooks no longer serve node processes")?;
    ensure!(
        both.contains(&reply.backend.as_str()),
        "answered by {}",
        reply.backend
    );
    // `service-agent cleanup` detaches them: node A has no route to the ClusterIP itself.
    for pin_dir in &pin_dirs {
        let output = agent::cleanup(pin_dir)?;
        ensure!(
            output.status.success(),
            "cleanup: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    match on_a.request(Request::Tcp, cluster_ip_port) {
        Ok(reply) => bail!(
            "{cluster_ip_port} still answered by {} after cleanup",
            reply.backend
        ),
        Err(error) => ensure!(
            error
                .chain()
                .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
                .any(|io| io.kind() == ErrorKind::NetworkUnreachable),
            "expected no route to {cluster_ip_port}: {error:#}"
        ),
    }
    Ok(())
}

#[test]
fn node_processes_get_udp_replies_from_the_service_address() -> Result<()> {
    require_root("node_processes_get_udp_replies_from_the_service_address");
    let cluster = Cluster::new()?;
    let (_agents, cluster_ip) = cluster.web_on_both_nodes((30102, 30103))?;
    let both = ["a-web", "b-web"];

    let on_a = cluster.node_client(NODE_A);
    for to in [
        SocketAddrV4::new(cluster_ip, SERVICE_UDP_PORT),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 30103),
        SocketAddrV4::new(lan::node_ip(NODE_A), 30103),
    ] {
        // A connected socket only accepts what recvmsg reports as coming from its peer.
        wait_for_backends(&on_a, Request::UdpConnected, to, &both)?;
        wait_for_backends(&on_a, Request::UdpUnconnected, to, &both)?;
    }
    Ok(())
}

#[test]
fn node_processes_use_every_endpoint_of_a_local_policy_service() -> Result<()> {
    require_root("node_processes_use_every_endpoint_of_a_local_policy_service");
    let cluster = Cluster::new()?;
    let b_web = cluster.backend(NODE_B, "b-web", 20)?;
    cluster.serve(
        &[&b_web],
        &Exposure {
            service_type: "NodePort",
            node_ports: Some((30104, 30105)),
            local_policy: true,
            ..Exposure::default()
        },
    )?;
    let agents = cluster.agents()?;
    agents[0].wait_for_service(DEFAULT, "web")?;

    // Node A has no endpoint of its own: traffic from outside to its nodePort is dropped (see
    // external.rs), but its own processes are not external traffic, as in kube-proxy.
    let on_a = cluster.node_client(NODE_A);
    for to in [
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 30104),
        SocketAddrV4::new(lan::node_ip(NODE_A), 30104),
    ] {
        wait_for_backends(&on_a, Request::Tcp, to, &["b-web"])?;
    }
    let udp = SocketAddrV4::new(lan::node_ip(NODE_A), 30105);
    wait_for_backends(&on_a, Request::UdpConnected, udp, &["b-web"])?;
    Ok(())
}

#[test]
fn node_processes_are_refused_by_a_service_without_endpoints() -> Result<()> {
    require_root("node_processes_are_refused_by_a_service_without_endpoints");
    let cluster = Cluster::new()?;
    cluster.serve(
        &[],
        &Exposure {
            service_type: "NodePort",
            node_ports: Some((30106, 30107)),
            ..Exposure::default()
        },
    )?;
    let agents = cluster.agents()?;
    let cluster_ip = agents[0].wait_for_service(DEFAULT, "web")?;

    let on_a = cluster.node_client(NODE_A);
    let tcp = [
        SocketAddrV4::new(cluster_ip, SERVICE_TCP_PORT),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, 30106),
    ];
    let udp = [
        SocketAddrV4::new(cluster_ip, SERVICE_UDP_PORT),
        SocketAddrV4::new(lan::node_ip(NODE_A), 30107),
    ];
    // The first attempt may race the agent's first sync.
    eventually(CONVERGENCE_TIMEOUT, "refused", || {
        refused_at_once(&on_a, Request::Tcp, tcp[0])
    })?;
    for to in tcp {
        refused_at_once(&on_a, Request::Tcp, to)?;
    }
    // UDP: connect() itself, or sendto() on an unconnected socket, fails.
    for to in udp {
        refused_at_once(&on_a, Request::UdpConnected, to)?;
        refused_at_once(&on_a, Request::UdpUnconnected, to)?;
    }
    Ok(())
}

/// Serves one TCP connection on `at` in `netns`, answering as the backend [`UNTRANSLATED`]: what
/// a client reaches when nothing translated its connect().
fn untranslated_server(netns: &str, at: SocketAddrV4) -> Result<thread::JoinHandle<Result<()>>> {
    let listener = netns::enter(netns, || Ok(TcpListener::bind(at)?))?;
    Ok(thread::spawn(move || -> Result<()> {
        let (connection, _) = listener.accept()?;
        let mut line = String::new();
        BufReader::new(&connection).read_line(&mut line)?;
        writeln!(&connection, "{UNTRANSLATED}")?;
        Ok(())
    }))
}

#[test]
fn pods_tcp_connections_are_balanced_at_connect_and_their_loopback_stays_theirs() -> Result<()> {
    require_root("pods_tcp_connections_are_balanced_at_connect_and_their_loopback_stays_theirs");
    let cluster = Cluster::new()?;
    let (_agents, cluster_ip) = cluster.web_on_both_nodes((30110, 30111))?;
    let to = SocketAddrV4::new(cluster_ip, SERVICE_TCP_PORT);

    // A pod whose own addresses include the ClusterIP, with a listener there: a connection that
    // connect() did not translate stays inside the pod, where no packet program sees it. Only
    // the socket program can send it to a backend.
    let pod = cluster
        .lan
        .node(NODE_A)
        .add_pod("client", lan::pod_ip(NODE_A, 30))?;
    let address = format!("{cluster_ip}/32");
    ip(&["-n", &pod.netns, "addr", "add", &address, "dev", "lo"])?;
    let _decoy = netns::enter(&pod.netns, || Ok(TcpListener::bind(to)?))?;
    let in_pod = NodeClient::new(CLIENT_BINARY, &pod.netns, &cluster.cgroup);
    wait_for_backends(&in_pod, Request::Tcp, to, &["a-web", "b-web"])?;
    // The node's IP at the nodePort too (kube-proxy serves pods there as well).
    let node_port = SocketAddrV4::new(lan::node_ip(NODE_A), 30110);
    wait_for_backends(&in_pod, Request::Tcp, node_port, &["a-web", "b-web"])?;

    // In a pod, 127.0.0.1 is the pod itself: its nodePort there is the pod's own port.
    let loopback = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 30110);
    let server = untranslated_server(&pod.netns, loopback)?;
    let reply = in_pod.request(Request::Tcp, loopback)?;
    ensure!(
        reply.backend == UNTRANSLATED && reply.peer == Some(loopback),
        "a pod's connection to its own loopback was translated: {reply:?}"
    );
    server.join().expect("the server thread panicked")?;
    Ok(())
}

#[test]
fn with_host_only_socket_lb_other_namespaces_in_the_cgroup_are_not_translated() -> Result<()> {
    require_root("with_host_only_socket_lb_other_namespaces_in_the_cgroup_are_not_translated");
    let cluster = Cluster::new()?;
    let a_web = cluster.backend(NODE_A, "a-web", 20)?;
    cluster.serve(
        &[&a_web],
        &Exposure {
            service_type: "ClusterIP",
            ..Exposure::default()
        },
    )?;
    let agents = cluster.agents_with(&["--socket-lb-host-only"])?;
    let cluster_ip = agents[0].wait_for_service(DEFAULT, "web")?;
    let to = SocketAddrV4::new(cluster_ip, SERVICE_TCP_PORT);
    // The hooks are live for node A's processes.
    wait_for_backends(&cluster.node_client(NODE_A), Request::Tcp, to, &["a-web"])?;

    // Another namespace, where the ClusterIP is a local address with its own server: a process
    // there, in the same cgroup, must reach that server.
    let elsewhere = NetNs::create(&cluster.lan.node(NODE_A).run_id().netns_name("elsewhere"))?;
    let address = format!("{cluster_ip}/32");
    ip(&["-n", elsewhere.name(), "addr", "add", &address, "dev", "lo"])?;
    let server = untranslated_server(elsewhere.name(), to)?;
    let client = NodeClient::new(CLIENT_BINARY, elsewhere.name(), &cluster.cgroup);
    let reply = client.request(Request::Tcp, to)?;
    ensure!(
        reply.backend == UNTRANSLATED && reply.peer == Some(to),
        "a process of another namespace was translated: {reply:?}"
    );
    server.join().expect("the server thread panicked")?;
    Ok(())
}

#[test]
fn the_agent_refuses_a_cgroup_path_that_is_not_cgroup_v2() -> Result<()> {
    require_root("the_agent_refuses_a_cgroup_path_that_is_not_cgroup_v2");
    let node = integration_tests::topology::Topology::new()?;
    let manifests = ManifestDir::create(&node)?;
    let not_a_cgroup = node.scratch_dir().to_str().context("non-UTF-8 path")?;
    let started = Agent::start_with(&node, &[manifests.path()], &["--cgroup", not_a_cgroup]);
    match started {
        Ok(_) => bail!("the agent started with --cgroup {not_a_cgroup}"),
        Err(error) => ensure!(
            format!("{error:#}").contains("is not a cgroup v2 directory"),
            "the agent failed without saying why: {error:#}"
        ),
    }
    Ok(())
}

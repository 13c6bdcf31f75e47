//! ClusterIP Services end to end: a client pod's real TCP and UDP traffic to a Service's virtual IP,
//! translated by `service-agent` on the node to the backend pods that the manifests make ready.
//! Every test builds its own node and pods (see `integration_tests::topology`), so they run in
//! parallel, and fails, saying why, when not run as root.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    panic::{self, AssertUnwindSafe},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use integration_tests::{
    agent::{self, Agent},
    client::{Tally, Transport},
    manifest::{self, ManifestDir, SERVICE_TCP_PORT, SERVICE_UDP_PORT},
    poll::{CONVERGENCE_TIMEOUT, eventually},
    require_root,
    topology::{Pod, Topology},
};

const DEFAULT: &str = "default";
/// The Services' name and the `app` label their selector matches.
const WEB: &str = "web";
/// Requests in which a uniform choice among 3 backends misses one with probability ~1e-10.
const REQUESTS: usize = 60;
/// Long enough for the agent to poll the manifests a few times (it polls every 250 ms).
const SEVERAL_MANIFEST_POLLS: Duration = Duration::from_secs(1);

/// Between two requests of the scaling test's background traffic.
const OBSERVER_PAUSE: Duration = Duration::from_millis(10);

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);

/// Backend pods named `names`, at 10.244.0.20, .21, ...
fn add_backend_pods(topology: &Topology, names: &[&str]) -> Result<Vec<Pod>> {
    (20u8..)
        .zip(names)
        .map(|(host, name)| topology.add_backend_pod(name, Ipv4Addr::new(10, 244, 0, host)))
        .collect()
}

/// The Pod objects of `pods` in `namespace`, labelled `app: web`; `ready(pod)` is the Ready
/// condition.
fn pods_manifest(pods: &[Pod], namespace: &str, ready: impl Fn(&Pod) -> bool) -> String {
    manifest::documents(
        pods.iter()
            .map(|pod| manifest::backend_pod(pod, namespace, WEB, ready(pod))),
    )
}

fn tcp(cluster_ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(cluster_ip, SERVICE_TCP_PORT)
}

fn udp(cluster_ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(cluster_ip, SERVICE_UDP_PORT)
}

/// Whether `ip` is in 10.96.0.0/12 ([`agent::SERVICE_CIDR`]): 10.96.0.0 to 10.111.255.255.
fn in_service_cidr(ip: Ipv4Addr) -> bool {
    u32::from(ip) >> 20 == u32::from(Ipv4Addr::new(10, 96, 0, 0)) >> 20
}

fn assert_answered_by_all(tally: &Tally, backends: &[Pod], what: &str) -> Result<()> {
    for backend in backends {
        ensure!(
            tally.contains_key(&backend.name),
            "{what}: {} never answered in {REQUESTS} requests: {tally:?}",
            backend.name
        );
    }
    ensure!(
        tally.len() == backends.len(),
        "{what}: answered by pods that are not backends: {tally:?}"
    );
    Ok(())
}

#[test]
fn clusterip_spreads_tcp_and_udp_over_every_ready_backend() -> Result<()> {
    require_root("clusterip_spreads_tcp_and_udp_over_every_ready_backend");
    let topology = Topology::new()?;
    let client = topology.add_pod("client", CLIENT_IP)?;
    let web = add_backend_pods(&topology, &["web-0", "web-1", "web-2"])?;
    let manifests = ManifestDir::create(&topology)?;
    manifests.write("pods.yaml", &pods_manifest(&web, DEFAULT, |_| true))?;
    manifests.write("service.yaml", &manifest::service(DEFAULT, WEB, WEB, None))?;
    let agent = Agent::start(&topology, &[manifests.path()])?;

    let cluster_ip = agent.wait_for_service(DEFAULT, WEB)?;
    ensure!(
        in_service_cidr(cluster_ip),
        "ClusterIP {cluster_ip} is outside {}",
        agent::SERVICE_CIDR
    );
    let names: Vec<&str> = web.iter().map(|pod| pod.name.as_str()).collect();
    agent.wait_for_backends(&client, Transport::Tcp, tcp(cluster_ip), &names)?;

    let tally = client.tally(Transport::Tcp, tcp(cluster_ip), REQUESTS)?;
    assert_answered_by_all(&tally, &web, "TCP")?;
    let tally = client.tally(Transport::Udp, udp(cluster_ip), REQUESTS)?;
    assert_answered_by_all(&tally, &web, "UDP")?;

    // Backend choice is per connection: every exchange of one connection reaches the same pod.
    let mut connection = client.tcp_connect(tcp(cluster_ip))?;
    let first = connection.request()?;
    for exchange in 2..=5 {
        let backend = connection.request()?;
        ensure!(
            backend == first,
            "exchange {exchange} of one connection went to {backend}, the first to {first}"
        );
    }
    Ok(())
}

#[test]
fn scaling_changes_the_answering_backends_while_traffic_flows() -> Result<()> {
    require_root("scaling_changes_the_answering_backends_while_traffic_flows");
    let topology = Topology::new()?;
    let client = topology.add_pod("client", CLIENT_IP)?;
    let observer = topology.add_pod("observer", Ipv4Addr::new(10, 244, 0, 11))?;
    let web = add_backend_pods(&topology, &["web-0", "web-1", "web-2"])?;
    let manifests = ManifestDir::create(&topology)?;
    let only_first_ready = pods_manifest(&web, DEFAULT, |pod| pod.name == "web-0");
    manifests.write("pods.yaml", &only_first_ready)?;
    manifests.write("service.yaml", &manifest::service(DEFAULT, WEB, WEB, None))?;
    let agent = Agent::start(&topology, &[manifests.path()])?;
    let cluster_ip = agent.wait_for_service(DEFAULT, WEB)?;
    agent.wait_for_backends(&client, Transport::Tcp, tcp(cluster_ip), &["web-0"])?;

    // Another pod keeps sending requests through every step: backends that stay up must keep
    // answering while the agent rewrites the service's backend slots.
    let stop_observer = AtomicBool::new(false);
    thread::scope(|scope| -> Result<()> {
        let observation = scope.spawn(|| {
            let (mut answered, mut failures) = (0usize, Vec::new());
            while !stop_observer.load(Ordering::SeqCst) {
                match observer.tcp_request(tcp(cluster_ip)) {
                    Ok(_) => answered += 1,
                    Err(error) => failures.push(format!("{error:#}")),
                }
                // Steady traffic, not a flood competing with the agent for the CPU.
                thread::sleep(OBSERVER_PAUSE);
            }
            (answered, failures)
        });
        // Caught so that a panicking step still stops the observer: the scope would otherwise
        // wait for it forever.
        let steps = panic::catch_unwind(AssertUnwindSafe(|| -> Result<()> {
            // 1 -> 3: the other two pods become Ready.
            manifests.write("pods.yaml", &pods_manifest(&web, DEFAULT, |_| true))?;
            let all = ["web-0", "web-1", "web-2"];
            agent.wait_for_backends(&client, Transport::Tcp, tcp(cluster_ip), &all)?;
            agent.wait_for_backends(&client, Transport::Udp, udp(cluster_ip), &all)?;
            // 3 -> 1: the Deployment deletes two pods: they terminate (no new flows, open ones
            // finish), then are gone. Flows still open on a pod that is gone would break, as in
            // any cluster; the observer's are over by then.
            let deleting = manifest::documents(
                [manifest::backend_pod(&web[0], DEFAULT, WEB, true)]
                    .into_iter()
                    .chain(
                        web[1..]
                            .iter()
                            .map(|pod| manifest::terminating_backend_pod(pod, DEFAULT, WEB)),
                    ),
            );
            manifests.write("pods.yaml", &deleting)?;
            agent.wait_for_backends(&client, Transport::Tcp, tcp(cluster_ip), &["web-0"])?;
            agent.wait_for_backends(&client, Transport::Udp, udp(cluster_ip), &["web-0"])?;
            thread::sleep(OBSERVER_PAUSE * 10);
            manifests.write("pods.yaml", &pods_manifest(&web[..1], DEFAULT, |_| true))?;
            agent.wait_for_backends(&client, Transport::Tcp, tcp(cluster_ip), &["web-0"])?;
            agent.wait_for_backends(&client, Transport::Udp, udp(cluster_ip), &["web-0"])
        }));
        stop_observer.store(true, Ordering::SeqCst);
        let (answered, failures) = observation.join().expect("the observer panicked");
        steps.unwrap_or_else(|payload| panic::resume_unwind(payload))?;
        ensure!(
            failures.is_empty(),
            "{} of {} requests of the observer failed while scaling, first: {}",
            failures.len(),
            answered + failures.len(),
            failures[0]
        );
        Ok(())
    })
}

#[test]
fn deleting_a_service_stops_its_clusterip_and_recreating_it_restores_it() -> Result<()> {
    require_root("deleting_a_service_stops_its_clusterip_and_recreating_it_restores_it");
    let topology = Topology::new()?;
    let client = topology.add_pod("client", CLIENT_IP)?;
    let web = add_backend_pods(&topology, &["web-0", "web-1"])?;
    let names = ["web-0", "web-1"];
    let manifests = ManifestDir::create(&topology)?;
    manifests.write("pods.yaml", &pods_manifest(&web, DEFAULT, |_| true))?;
    manifests.write("service.yaml", &manifest::service(DEFAULT, WEB, WEB, None))?;
    let agent = Agent::start(&topology, &[manifests.path()])?;
    let old_ip = agent.wait_for_service(DEFAULT, WEB)?;
    agent.wait_for_backends(&client, Transport::Tcp, tcp(old_ip), &names)?;

    manifests.remove("service.yaml")?;
    agent.wait_for_service_removal(DEFAULT, WEB)?;
    client.wait_until_unanswered(Transport::Tcp, tcp(old_ip))?;
    client.wait_until_unanswered(Transport::Udp, udp(old_ip))?;

    // An explicit clusterIP, so the new VIP cannot be the old one by allocation.
    let new_ip = Ipv4Addr::new(10, 100, 0, 100);
    ensure!(
        new_ip != old_ip,
        "the agent allocated {new_ip}, pick another"
    );
    let recreated = manifest::service(DEFAULT, WEB, WEB, Some(new_ip));
    manifests.write("service.yaml", &recreated)?;
    let programmed_ip = agent.wait_for_service(DEFAULT, WEB)?;
    ensure!(
        programmed_ip == new_ip,
        "spec.clusterIP {new_ip} was programmed as {programmed_ip}"
    );
    agent.wait_for_backends(&client, Transport::Tcp, tcp(new_ip), &names)?;
    agent.wait_for_backends(&client, Transport::Udp, udp(new_ip), &names)?;
    ensure!(
        client.tcp_request(tcp(old_ip)).is_err(),
        "the deleted service's VIP {old_ip} answers again"
    );
    Ok(())
}

#[test]
fn a_broken_manifest_keeps_the_last_good_state() -> Result<()> {
    require_root("a_broken_manifest_keeps_the_last_good_state");
    let topology = Topology::new()?;
    let client = topology.add_pod("client", CLIENT_IP)?;
    let web = add_backend_pods(&topology, &["web-0", "web-1", "web-2"])?;
    let manifests = ManifestDir::create(&topology)?;
    let pods = manifests.write("pods.yaml", &pods_manifest(&web, DEFAULT, |_| true))?;
    let good = manifest::service(DEFAULT, WEB, WEB, None);
    manifests.write("service.yaml", &good)?;
    let agent = Agent::start(&topology, &[manifests.path()])?;
    let cluster_ip = agent.wait_for_service(DEFAULT, WEB)?;
    let names: Vec<&str> = web.iter().map(|pod| pod.name.as_str()).collect();
    agent.wait_for_backends(&client, Transport::Tcp, tcp(cluster_ip), &names)?;

    let broken = good.replace(&format!("port: {SERVICE_TCP_PORT}\n"), "port: eighty\n");
    ensure!(
        broken != good,
        "the service manifest has no `port: {SERVICE_TCP_PORT}` line"
    );
    let broken_path = manifests.write("service.yaml", &broken)?;
    thread::sleep(SEVERAL_MANIFEST_POLLS);

    ensure!(
        agent.wait_for_service(DEFAULT, WEB)? == cluster_ip,
        "the service changed its ClusterIP after a broken manifest"
    );
    let tally = client.tally(Transport::Tcp, tcp(cluster_ip), REQUESTS)?;
    assert_answered_by_all(&tally, &web, "TCP after the broken manifest")?;
    let tally = client.tally(Transport::Udp, udp(cluster_ip), REQUESTS)?;
    assert_answered_by_all(&tally, &web, "UDP after the broken manifest")?;

    let check = agent::check(&[&broken_path])?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    ensure!(
        !check.status.success(),
        "`check` accepted the broken manifest: {said}"
    );
    let path = broken_path.to_string_lossy();
    ensure!(
        said.contains(path.as_ref()),
        "`check` does not name {path}: {said}"
    );
    let check = agent::check(&[&pods]).context("checking the good pods manifest")?;
    ensure!(
        check.status.success(),
        "`check` rejected the good pods manifest: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    Ok(())
}

#[test]
fn the_same_service_name_in_two_namespaces_is_two_services() -> Result<()> {
    require_root("the_same_service_name_in_two_namespaces_is_two_services");
    let topology = Topology::new()?;
    let client = topology.add_pod("client", CLIENT_IP)?;
    let backends = add_backend_pods(&topology, &["web-a0", "web-a1", "web-b0"])?;
    let (team_a, team_b) = backends.split_at(2);
    let manifests = ManifestDir::create(&topology)?;
    manifests.write("team-a.yaml", &pods_manifest(team_a, "team-a", |_| true))?;
    manifests.write("team-b.yaml", &pods_manifest(team_b, "team-b", |_| true))?;
    manifests.write(
        "services.yaml",
        &manifest::documents([
            manifest::service("team-a", WEB, WEB, None),
            manifest::service("team-b", WEB, WEB, None),
        ]),
    )?;
    let agent = Agent::start(&topology, &[manifests.path()])?;

    let ip_a = agent.wait_for_service("team-a", WEB)?;
    let ip_b = agent.wait_for_service("team-b", WEB)?;
    ensure!(
        ip_a != ip_b,
        "team-a/web and team-b/web share ClusterIP {ip_a}"
    );
    // Each selector only selects the pods of its own namespace.
    agent.wait_for_backends(&client, Transport::Tcp, tcp(ip_a), &["web-a0", "web-a1"])?;
    agent.wait_for_backends(&client, Transport::Tcp, tcp(ip_b), &["web-b0"])?;
    agent.wait_for_backends(&client, Transport::Udp, udp(ip_a), &["web-a0", "web-a1"])?;
    agent.wait_for_backends(&client, Transport::Udp, udp(ip_b), &["web-b0"])?;
    Ok(())
}

#[test]
fn the_datapath_outlives_sigterm_a_new_agent_adopts_it_and_cleanup_removes_it() -> Result<()> {
    require_root("the_datapath_outlives_sigterm_a_new_agent_adopts_it_and_cleanup_removes_it");
    let topology = Topology::new()?;
    let client = topology.add_pod("client", CLIENT_IP)?;
    let web = add_backend_pods(&topology, &["web-0"])?;
    let manifests = ManifestDir::create(&topology)?;
    manifests.write("pods.yaml", &pods_manifest(&web, DEFAULT, |_| true))?;
    manifests.write("service.yaml", &manifest::service(DEFAULT, WEB, WEB, None))?;
    let agent = Agent::start(&topology, &[manifests.path()])?;
    let cluster_ip = agent.wait_for_service(DEFAULT, WEB)?;
    agent.wait_for_backends(&client, Transport::Tcp, tcp(cluster_ip), &["web-0"])?;

    let pin_dir = agent.pin_dir().to_path_buf();
    let status = agent.stop()?;
    ensure!(
        status.success(),
        "the agent exited with {status} on SIGTERM"
    );
    // As kube-proxy's rules stay when it stops: the service still answers, over both paths.
    for (transport, to) in [
        (Transport::Tcp, tcp(cluster_ip)),
        (Transport::Udp, udp(cluster_ip)),
    ] {
        let answer = client.request(transport, to);
        ensure!(
            answer.as_ref().is_ok_and(|name| name == "web-0"),
            "{transport} {to} after SIGTERM: {answer:?}"
        );
    }
    let links = fs::read_dir(pin_dir.join("links"))
        .context("no pinned links after SIGTERM")?
        .count();
    ensure!(links > 0, "no pinned links after SIGTERM");

    // A new agent adopts the pinned links: no new link, and the service keeps answering.
    let agent = Agent::start(&topology, &[manifests.path()])?;
    agent.wait_for_service(DEFAULT, WEB)?;
    agent.wait_for_backends(&client, Transport::Tcp, tcp(cluster_ip), &["web-0"])?;
    let log = agent.log()?;
    ensure!(
        log.contains("how=Adopted") && !log.contains("how=New"),
        "the second agent did not adopt every link:\n{log}"
    );
    agent.kill()?;

    let output = agent::cleanup(&pin_dir)?;
    ensure!(
        output.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        !pin_dir.exists(),
        "cleanup left {} behind",
        pin_dir.display()
    );
    // Nothing translates the VIP any more: the node has no route for it.
    ensure!(
        client.tcp_request(tcp(cluster_ip)).is_err(),
        "{cluster_ip} still answers after cleanup"
    );
    Ok(())
}

#[test]
fn the_link_sysctls_are_written_where_proc_sys_net_says() -> Result<()> {
    require_root("the_link_sysctls_are_written_where_proc_sys_net_says");
    // A container's own /proc/sys is read-only; the DaemonSet hands the agent the host's
    // /proc/sys/net mounted elsewhere. A directory of the same shape stands in for it here.
    let topology = Topology::new()?;
    let client = topology.add_pod("client", CLIENT_IP)?;
    let proc_sys_net = topology.scratch_dir().join("host-proc-sys-net");
    let conf = proc_sys_net.join("ipv4/conf");
    for link in ["all", client.node_link.as_str()] {
        std::fs::create_dir_all(conf.join(link))?;
    }
    let manifests = ManifestDir::create(&topology)?;
    let proc_sys_net_arg = proc_sys_net.to_str().context("non-UTF-8 scratch path")?;
    let _agent = Agent::start_with(
        &topology,
        &[manifests.path()],
        &["--proc-sys-net", proc_sys_net_arg],
    )?;
    let expected = [
        ("all", "rp_filter", "0"),
        (client.node_link.as_str(), "rp_filter", "0"),
        (client.node_link.as_str(), "accept_local", "1"),
    ];
    eventually(
        CONVERGENCE_TIMEOUT,
        "the agent wrote the link sysctls under --proc-sys-net",
        || {
            for (link, key, value) in expected {
                let path = conf.join(link).join(key);
                let written = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                ensure!(
                    written.trim() == value,
                    "{} holds {written:?}",
                    path.display()
                );
            }
            Ok(())
        },
    )
}

//! `cargo xtask demo`: a node with a client pod and the three pods of the `web` Deployment, all in
//! network namespaces of their own; `service-agent` runs on the node with the repository's
//! `examples/` manifests, and the client calls the `web` Service by its ClusterIP. Everything is
//! torn down at the end, also when something fails.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    process::ExitCode,
};

use anyhow::{Context, Result, ensure};
use integration_tests::{
    agent::{self, Agent},
    client::{Tally, Transport},
    privileged,
    topology::Topology,
};

/// The pods of examples/web-pods.yaml: their names and status.podIP must match that file.
const WEB_PODS: [(&str, Ipv4Addr); 3] = [
    ("web-7d4b9c8f5d-x2k9p", Ipv4Addr::new(10, 244, 0, 11)),
    ("web-7d4b9c8f5d-m4q7z", Ipv4Addr::new(10, 244, 0, 12)),
    ("web-7d4b9c8f5d-t8r3w", Ipv4Addr::new(10, 244, 0, 13)),
];
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
/// examples/web.yaml: Service `web` in the default namespace, port 80.
const SERVICE: (&str, &str, u16) = ("default", "web", 80);
const REQUESTS: usize = 30;
/// Requests sent once the agent has stopped, to show the datapath outlives it.
const AFTER_STOP_REQUESTS: usize = 5;

fn main() -> ExitCode {
    if !privileged("the demo") {
        return ExitCode::FAILURE;
    }
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<()> {
    let examples = agent::workspace_root().join("examples");
    println!("Building the sandbox: a node, a client pod and the pods of the web Deployment");
    let topology = Topology::new()?;
    let client = topology.add_pod("client", CLIENT_IP)?;
    for (name, ip) in WEB_PODS {
        topology.add_backend_pod(name, ip)?;
        println!("  pod {name:<22} {ip}");
    }
    println!("  pod {:<22} {CLIENT_IP}", client.name);

    println!(
        "\nStarting service-agent on node netns {} with --manifests {}",
        topology.node_netns(),
        examples.display()
    );
    let agent = Agent::start(&topology, &[&examples])?;
    let (namespace, name, port) = SERVICE;
    let cluster_ip = agent.wait_for_service(namespace, name)?;
    ensure_endpoints_match_the_pods(&agent)?;

    println!("\n$ service-agent get services");
    print!("{}", agent.get(&["services"])?);
    println!("\n$ service-agent get endpoints");
    print!("{}", agent.get(&["endpoints"])?);

    let web = SocketAddrV4::new(cluster_ip, port);
    let names: Vec<&str> = WEB_PODS.iter().map(|(name, _)| *name).collect();
    // The agent lists a service once its maps are written; the pod links may still be getting
    // their programs: wait until the traffic shows it.
    agent.wait_for_backends(&client, Transport::Tcp, web, &names)?;

    println!(
        "\n{REQUESTS} requests from pod {} to {name} ({web}), one connection each:",
        client.name
    );
    let mut tally = Tally::new();
    for request in 1..=REQUESTS {
        let backend = client.tcp_request(web)?;
        println!("  {request:>2}  answered by {backend}");
        *tally.entry(backend).or_default() += 1;
    }
    println!("\nAnswers per pod:");
    for (backend, count) in &tally {
        println!("  {backend:<22} {count:>2}  {}", "#".repeat(*count));
    }

    println!("\nSIGTERM to the agent: the programs and maps stay pinned, and keep serving");
    let pin_dir = agent.pin_dir().to_path_buf();
    let status = agent.stop()?;
    ensure!(status.success(), "the agent exited with {status}");
    for request in 1..=AFTER_STOP_REQUESTS {
        let backend = client.tcp_request(web)?;
        println!("  {request:>2}  answered by {backend} (no agent running)");
    }

    println!("\n$ service-agent cleanup --pin-dir {}", pin_dir.display());
    let output = agent::cleanup(&pin_dir)?;
    ensure!(
        output.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    print!("{}", String::from_utf8_lossy(&output.stdout));
    ensure!(
        client.tcp_request(web).is_err(),
        "{web} still answers after cleanup"
    );
    println!("  {web} no longer answers; removing the namespaces");
    Ok(())
}

/// The examples' podIPs and the sandbox's pods are two copies of the same addresses: say so
/// plainly when they drift apart, instead of letting requests time out.
fn ensure_endpoints_match_the_pods(agent: &Agent) -> Result<()> {
    let (namespace, name, _) = SERVICE;
    let services = agent.services()?;
    let service = services
        .iter()
        .find(|service| {
            service["name"]["namespace"] == namespace && service["name"]["name"] == name
        })
        .with_context(|| format!("the agent has no {namespace}/{name}"))?;
    let endpoints: BTreeSet<String> = service["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|port| port["endpoints"].as_array().into_iter().flatten())
        .filter_map(|endpoint| Some(endpoint["address"].as_str()?.to_string()))
        .collect();
    let pods: BTreeSet<String> = WEB_PODS.iter().map(|(_, ip)| ip.to_string()).collect();
    ensure!(
        endpoints == pods,
        "examples/web-pods.yaml gives {namespace}/{name} the endpoints {endpoints:?}, but the \
         demo's pods are at {pods:?}: keep WEB_PODS in tests/src/bin/demo.rs and the podIPs of \
         the examples in step"
    );
    Ok(())
}

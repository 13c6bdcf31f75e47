//! The node keeps its services through the agent's own failures: steady traffic flows while the
//! agent is killed, restarted, upgraded (across a map layout change too), while endpoints churn,
//! a map fills up, and a manifest is saved the way editors save, and every request must be
//! answered.
//!
//! Two nodes on a LAN run an agent each with the same manifests, as a DaemonSet does; the faults
//! hit node A's agent. Node A carries a client pod and two backends, node B one backend. The
//! load: from the client pod, UDP request/response, new TCP connections and one long-lived TCP
//! connection to the ClusterIP; from a client outside the cluster, the same through node A's
//! NodePort (SNATed, and for a backend on node B forwarded in XDP). The counts are printed.

use std::{
    fs,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use integration_tests::{
    agent::{self, Agent},
    lan::{self, EXTERNAL_INTERFACE, Lan},
    manifest::{self, Exposure, ManifestDir, SERVICE_TCP_PORT, SERVICE_UDP_PORT},
    poll::{CONVERGENCE_TIMEOUT, eventually},
    process::{COMMAND_TIMEOUT, output_within},
    require_root,
    steady_load::{LoadReport, SteadyLoad, Stream, StreamKind},
    topology::Pod,
};

const DEFAULT: &str = "default";
const WEB: &str = "web";
const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];
const NODE_A: u8 = 1;
const NODE_B: u8 = 2;
/// Explicit, so that both nodes' agents (each allocating on its own in manifest mode) agree.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 100);
const NODE_PORTS: (u16, u16) = (30080, 30053);
/// How long the load runs before the fault and after it has passed.
const WARM_UP: Duration = Duration::from_secs(1);
const SETTLE: Duration = Duration::from_millis(1500);
/// The pause between killing the agent and starting the next one.
const DOWN_TIME: Duration = Duration::from_secs(3);

/// The two nodes, their backend pods, the client pod on node A and the manifests both agents
/// read.
struct Bed {
    lan: Lan,
    manifests: ManifestDir,
    client: Pod,
    backends: Vec<Pod>,
}

impl Bed {
    fn new() -> Result<Self> {
        let lan = Lan::new(&NODE_NAMES)?;
        let manifests = ManifestDir::create(lan.node(NODE_A))?;
        let client = lan
            .node(NODE_A)
            .add_pod("client", lan::pod_ip(NODE_A, 10))?;
        let backends = vec![
            lan.node(NODE_A)
                .add_backend_pod("a-web-0", lan::pod_ip(NODE_A, 20))?,
            lan.node(NODE_A)
                .add_backend_pod("a-web-1", lan::pod_ip(NODE_A, 21))?,
            lan.node(NODE_B)
                .add_backend_pod("b-web-0", lan::pod_ip(NODE_B, 20))?,
        ];
        let bed = Self {
            lan,
            manifests,
            client,
            backends,
        };
        bed.write_pods(&bed.backends.iter().collect::<Vec<_>>(), &[])?;
        bed.manifests.write("web.yaml", &web_service())?;
        Ok(bed)
    }

    /// The backend pods as the manifests show them: `serving` ready, `terminating` ready but
    /// being deleted (their endpoints serve the flows they have, and get none new).
    fn write_pods(&self, serving: &[&Pod], terminating: &[&Pod]) -> Result<()> {
        let pods = serving
            .iter()
            .map(|pod| manifest::backend_pod(pod, DEFAULT, WEB, true))
            .chain(
                terminating
                    .iter()
                    .map(|pod| manifest::terminating_backend_pod(pod, DEFAULT, WEB)),
            );
        self.manifests
            .write("pods.yaml", &manifest::documents(pods))?;
        Ok(())
    }

    /// Starts the agent of node `index` on the shared manifests, with `extra` arguments.
    fn agent(&self, index: u8, extra: &[&str]) -> Result<Agent<'_>> {
        let node_ip = lan::node_ip(index).to_string();
        let mut args = vec![
            "--external-interface",
            EXTERNAL_INTERFACE,
            "--node-ip",
            &node_ip,
        ];
        args.extend_from_slice(extra);
        let agent = Agent::start_with(self.lan.node(index), &[self.manifests.path()], &args)?;
        agent.wait_for_service(DEFAULT, WEB)?;
        Ok(agent)
    }

    /// The steady load of the module's comment.
    fn start_load(&self) -> Result<SteadyLoad> {
        let outside = self.lan.client();
        let cluster_ip = |port| SocketAddrV4::new(CLUSTER_IP, port);
        let node_port = |port| SocketAddrV4::new(lan::node_ip(NODE_A), port);
        let (tcp_node_port, udp_node_port) = NODE_PORTS;
        let load = SteadyLoad::start(&[
            Stream::udp(&self.client, cluster_ip(SERVICE_UDP_PORT)),
            Stream::tcp_connections(&self.client, cluster_ip(SERVICE_TCP_PORT)),
            Stream::long_lived_tcp(&self.client, cluster_ip(SERVICE_TCP_PORT)),
            Stream::udp(&outside, node_port(udp_node_port)),
            Stream::tcp_connections(&outside, node_port(tcp_node_port)),
            Stream::long_lived_tcp(&outside, node_port(tcp_node_port)),
        ])?;
        thread::sleep(WARM_UP);
        Ok(load)
    }

    /// Waits until every stream's target answers (both agents have programmed the service and
    /// attached to their links), so that the load starts on a served node.
    fn wait_until_served(&self) -> Result<()> {
        let outside = self.lan.client();
        let (tcp_node_port, _) = NODE_PORTS;
        eventually(CONVERGENCE_TIMEOUT, "the service answers", || {
            self.client
                .tcp_request(SocketAddrV4::new(CLUSTER_IP, SERVICE_TCP_PORT))?;
            outside.tcp_request(SocketAddrV4::new(lan::node_ip(NODE_A), tcp_node_port))
        })?;
        Ok(())
    }
}

/// A NodePort Service `web` over the TCP and UDP ports of [`manifest::exposed_service`], with
/// the explicit ClusterIP and nodePorts both agents must agree on.
fn web_service() -> String {
    let exposure = Exposure {
        service_type: "NodePort",
        node_ports: Some(NODE_PORTS),
        ..Exposure::default()
    };
    manifest::exposed_service(DEFAULT, WEB, WEB, &exposure).replace(
        "  selector:",
        &format!("  clusterIP: {CLUSTER_IP}\n  selector:"),
    )
}

/// Runs `fault` under the steady load, prints what the load met (past libtest's capture, so
/// that the counts show in every run) and returns it.
fn under_load(
    bed: &Bed,
    what: &str,
    fault: impl FnOnce(&SteadyLoad) -> Result<()>,
) -> Result<LoadReport> {
    bed.wait_until_served()?;
    let load = bed.start_load()?;
    load.mark(what);
    fault(&load).with_context(|| format!("during {what}"))?;
    load.mark("fault over");
    thread::sleep(SETTLE);
    let report = load.stop()?;
    let _ = writeln!(std::io::stderr(), "--- {what} ---\n{report}");
    Ok(report)
}

/// Under the steady load, stops `agent` (SIGTERM) and starts another on node A reading only
/// `manifests`; the load's report and the new agent's log.
fn replaced_under_load(
    bed: &Bed,
    agent: Agent,
    manifests: &Path,
    what: &str,
) -> Result<(LoadReport, String)> {
    let node_ip = lan::node_ip(NODE_A).to_string();
    let mut next = None;
    let report = under_load(bed, &format!("SIGTERM, new agent on {what}"), |_| {
        ensure!(agent.stop()?.success(), "the agent failed on SIGTERM");
        next = Some(Agent::start_with(
            bed.lan.node(NODE_A),
            &[manifests],
            &[
                "--external-interface",
                EXTERNAL_INTERFACE,
                "--node-ip",
                &node_ip,
            ],
        )?);
        Ok(())
    })?;
    let log = next.context("no second agent")?.log()?;
    Ok((report, log))
}

#[test]
fn kill_9_and_a_new_agent_3_s_later_drop_no_request() -> Result<()> {
    require_root("kill_9_and_a_new_agent_3_s_later_drop_no_request");
    let bed = Bed::new()?;
    let _node_b = bed.agent(NODE_B, &[])?;
    let agent = bed.agent(NODE_A, &[])?;
    let mut next = None;
    let report = under_load(&bed, "kill -9, 3 s down, new agent", |load| {
        agent.kill()?;
        thread::sleep(DOWN_TIME);
        load.mark("new agent");
        next = Some(bed.agent(NODE_A, &[])?);
        Ok(())
    })?;
    ensure_adopted(next.as_ref())?;
    report.ensure_no_failures()
}

/// Whether `agent` reused the pinned maps and adopted every pinned link.
fn ensure_adopted(agent: Option<&Agent>) -> Result<()> {
    let log = agent.context("no second agent")?.log()?;
    ensure!(
        log.contains("origin=Reused") && log.contains("how=Adopted") && !log.contains("how=New"),
        "the second agent did not reuse the maps and adopt every link:\n{log}"
    );
    Ok(())
}

#[test]
fn sigterm_and_a_new_agent_drop_no_request() -> Result<()> {
    require_root("sigterm_and_a_new_agent_drop_no_request");
    let bed = Bed::new()?;
    let _node_b = bed.agent(NODE_B, &[])?;
    let agent = bed.agent(NODE_A, &[])?;
    let mut next = None;
    let report = under_load(&bed, "SIGTERM, new agent (an upgrade)", |_| {
        ensure!(agent.stop()?.success(), "the agent failed on SIGTERM");
        next = Some(bed.agent(NODE_A, &[])?);
        Ok(())
    })?;
    ensure_adopted(next.as_ref())?;
    report.ensure_no_failures()
}

/// A change of map sizes is a change of layout, as a release that changes a map's types is: new
/// service maps, filled from the old ones, then the programs swapped link by link, then the old
/// maps removed. Conntrack keeps its size here, so old and new programs share it during the
/// swap (a change of conntrack itself is copied, with a window of milliseconds in which a new
/// flow's first packets may be lost: see the README).
#[test]
fn an_upgrade_across_a_map_layout_change_drops_no_request() -> Result<()> {
    require_root("an_upgrade_across_a_map_layout_change_drops_no_request");
    let bed = Bed::new()?;
    let _node_b = bed.agent(NODE_B, &[])?;
    let agent = bed.agent(NODE_A, &[])?;
    let pin_dir = agent.pin_dir().to_path_buf();
    let new_sizes = ["--lb-map-max", "262144"];
    // What an agent killed while building the new layout would have left: rebuilt, not used.
    fs::create_dir(pin_dir.join("incoming-v6-lb262144-ct262144"))?;
    let mut next = None;
    let report = under_load(&bed, "SIGTERM, new agent with another map layout", |_| {
        ensure!(agent.stop()?.success(), "the agent failed on SIGTERM");
        next = Some(bed.agent(NODE_A, &new_sizes)?);
        Ok(())
    })?;
    let next = next.context("no second agent")?;
    let log = next.log()?;
    ensure!(
        log.contains("copied the previous map layout")
            && log.contains("CONNTRACK_V4")
            && log.contains("old map layout removed"),
        "the second agent did not move the maps to the new layout:\n{log}"
    );
    let mut layouts: Vec<String> = fs::read_dir(&pin_dir)?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    layouts.sort();
    ensure!(
        layouts == ["links", "v6-lb262144-ct262144"],
        "pin directory after the layout change: {layouts:?}"
    );
    report.ensure_no_failures()
}

/// A layout change that copies conntrack (its size changes): established connections carry
/// over. New flows are not asserted on: one whose first packets fall between the last copy and
/// the swap may be balanced again (the README says so).
#[test]
fn a_conntrack_layout_change_keeps_established_connections() -> Result<()> {
    require_root("a_conntrack_layout_change_keeps_established_connections");
    let bed = Bed::new()?;
    let _node_b = bed.agent(NODE_B, &[])?;
    let agent = bed.agent(NODE_A, &[])?;
    let new_sizes = ["--conntrack-map-max", "131072"];
    let mut next = None;
    let report = under_load(
        &bed,
        "SIGTERM, new agent with another conntrack size",
        |_| {
            ensure!(agent.stop()?.success(), "the agent failed on SIGTERM");
            next = Some(bed.agent(NODE_A, &new_sizes)?);
            Ok(())
        },
    )?;
    let log = next.context("no second agent")?.log()?;
    let copied = log
        .lines()
        .find(|line| line.contains("copied the previous map layout"))
        .with_context(|| format!("no layout copied:\n{log}"))?;
    ensure!(
        copied.contains("\"CONNTRACK_V4\": ") && !copied.contains("shared={\"CONNTRACK_V4\""),
        "conntrack was not copied: {copied}"
    );
    let broken: usize = report
        .streams
        .iter()
        .filter(|stream| stream.stream.kind == StreamKind::LongLivedTcp)
        .map(|stream| stream.broken())
        .sum();
    ensure!(
        broken == 0,
        "{broken} long-lived connections broke:\n{report}"
    );
    Ok(())
}

/// Backends leave the way pods do (terminating, then gone) and new ones come, while traffic
/// flows. Only the long-lived connections whose backend left may break.
#[test]
fn endpoint_churn_drops_no_request_but_those_of_removed_backends() -> Result<()> {
    require_root("endpoint_churn_drops_no_request_but_those_of_removed_backends");
    let bed = Bed::new()?;
    let spare = bed
        .lan
        .node(NODE_A)
        .add_backend_pod("a-web-2", lan::pod_ip(NODE_A, 22))?;
    let _node_b = bed.agent(NODE_B, &[])?;
    let _node_a = bed.agent(NODE_A, &[])?;
    let [a0, a1, b0] = [&bed.backends[0], &bed.backends[1], &bed.backends[2]];
    let mut removed = Vec::new();
    let report = under_load(&bed, "endpoint churn", |load| {
        // a-web-1 leaves and a-web-2 comes, then a-web-2 leaves and a-web-1 comes back.
        for (leaving, coming) in [(a1, &spare), (&spare, a1)] {
            let others = [a0, b0];
            bed.write_pods(&[&others[..], &[coming]].concat(), &[leaving])?;
            load.mark(&format!(
                "{} terminating, {} added",
                leaving.name, coming.name
            ));
            thread::sleep(Duration::from_secs(1));
            bed.write_pods(&[&others[..], &[coming]].concat(), &[])?;
            load.mark(&format!("{} removed", leaving.name));
            removed.push(leaving.name.clone());
            thread::sleep(Duration::from_secs(1));
        }
        Ok(())
    })?;
    report.ensure_no_failures_except(|_, failure| {
        failure
            .backend
            .as_ref()
            .is_some_and(|backend| removed.contains(backend))
    })
}

/// A service map too small for what the manifests ask: what was served goes on being served,
/// the log names the full map, and once room is made the rest is programmed.
#[test]
fn a_full_map_keeps_serving_and_takes_the_rest_once_room_is_made() -> Result<()> {
    require_root("a_full_map_keeps_serving_and_takes_the_rest_once_room_is_made");
    let bed = Bed::new()?;
    let _node_b = bed.agent(NODE_B, &[])?;
    // 64 service entries, 16 rev-NAT entries: web's six frontends (ClusterIP, node IP and
    // 127.0.0.1 at the nodePort, for TCP and UDP) take 24 and 6, each filler (a ClusterIP
    // service with the same three backends and two ports) 8 and 2. Five fillers fill both
    // maps; the sixth does not fit.
    let agent = bed.agent(NODE_A, &["--lb-map-max", "64"])?;
    let fillers = |range: std::ops::Range<usize>| {
        manifest::documents(
            range.map(|index| manifest::service(DEFAULT, &format!("filler-{index}"), WEB, None)),
        )
    };
    let mut last_filler = None;
    let report = under_load(&bed, "service map filled, then room made", |load| {
        bed.manifests.write("fillers.yaml", &fillers(0..6))?;
        load.mark("six fillers written");
        eventually(CONVERGENCE_TIMEOUT, "a full map reported", || {
            let log = agent.log()?;
            ensure!(log.contains("is full"), "no full map in the log yet");
            Ok(())
        })?;
        let full = agent
            .log()?
            .lines()
            .find(|line| line.contains("is full"))
            .unwrap_or_default()
            .to_owned();
        ensure!(
            full.contains("REV_NAT_V4") && full.contains("16") && full.contains("filler-5"),
            "the full map's line does not name the map, its capacity and the service: {full}"
        );
        let _ = writeln!(std::io::stderr(), "full map: {full}");
        thread::sleep(SETTLE);
        bed.manifests.write("fillers.yaml", &fillers(1..6))?;
        load.mark("filler-0 removed");
        let ip = agent.wait_for_service(DEFAULT, "filler-5")?;
        last_filler = Some(ip);
        Ok(())
    })?;
    let last_filler = last_filler.context("filler-5 never programmed")?;
    eventually(CONVERGENCE_TIMEOUT, "filler-5 answers", || {
        bed.client
            .tcp_request(SocketAddrV4::new(last_filler, SERVICE_TCP_PORT))
    })?;
    report.ensure_no_failures()
}

/// Editors save by deleting and re-creating a file, or write it in several pieces: the agent
/// must act on neither half.
#[test]
fn a_manifest_saved_by_delete_and_create_withdraws_nothing() -> Result<()> {
    require_root("a_manifest_saved_by_delete_and_create_withdraws_nothing");
    let bed = Bed::new()?;
    let _node_b = bed.agent(NODE_B, &[])?;
    let _node_a = bed.agent(NODE_A, &[])?;
    let path = bed.manifests.path().join("web.yaml");
    let report = under_load(
        &bed,
        "web.yaml deleted and re-created, then written in two halves",
        |load| {
            fs::remove_file(&path)?;
            thread::sleep(Duration::from_millis(300));
            fs::write(&path, web_service())?;
            load.mark("re-created");
            thread::sleep(Duration::from_secs(1));
            let text = web_service();
            let (first, second) = text.split_at(text.len() / 2);
            let mut file = fs::File::create(&path)?;
            file.write_all(first.as_bytes())?;
            file.sync_all()?;
            thread::sleep(Duration::from_millis(300));
            file.write_all(second.as_bytes())?;
            load.mark("written in two halves");
            Ok(())
        },
    )?;
    report.ensure_no_failures()
}

/// An agent restarted on a manifest path it cannot read must not empty the maps the previous
/// agent filled.
#[test]
fn a_new_agent_that_can_read_nothing_keeps_what_the_maps_hold() -> Result<()> {
    require_root("a_new_agent_that_can_read_nothing_keeps_what_the_maps_hold");
    let bed = Bed::new()?;
    let _node_b = bed.agent(NODE_B, &[])?;
    let agent = bed.agent(NODE_A, &[])?;
    let missing = bed.lan.node(NODE_A).scratch_dir().join("not-there");
    let (report, log) = replaced_under_load(&bed, agent, &missing, "a missing manifest path")?;
    ensure!(
        log.contains("not-there") && !log.contains(" synced "),
        "the agent on a missing path did not say so, or synced:\n{log}"
    );
    report.ensure_no_failures()
}

/// `ip netns exec` gives the agent a private mount namespace with a fresh /sys, where no bpffs
/// is mounted at /sys/fs/bpf: pins made there would vanish with the namespace, so the agent
/// refuses, saying why.
#[test]
fn the_agent_refuses_a_pin_dir_that_would_not_outlive_it() -> Result<()> {
    require_root("the_agent_refuses_a_pin_dir_that_would_not_outlive_it");
    let bed = Bed::new()?;
    let node = bed.lan.node(NODE_A);
    let pin_dir = node.run_id().pin_dir();
    let output = output_within(
        Command::new("ip")
            .args(["netns", "exec", node.node_netns()])
            .arg(agent::binary())
            .args(["run", "--manifests"])
            .arg(bed.manifests.path())
            .args(["--pod-interface", "lxc*", "--pin-dir"])
            .arg(&pin_dir)
            .arg("--state-dir")
            .arg(node.scratch_dir().join("state"))
            .arg("--api-socket")
            .arg(node.scratch_dir().join("refused.sock")),
        COMMAND_TIMEOUT,
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success(),
        "the agent ran off bpffs: {stderr}"
    );
    ensure!(
        stderr.contains("not on bpffs") && stderr.contains("nsenter"),
        "the refusal does not say why or what to do: {stderr}"
    );
    Ok(())
}

/// An agent that fails at start after loading its programs (here: an unreadable kubeconfig)
/// exits without removing anything: the previous agent's datapath keeps serving.
#[test]
fn an_agent_that_fails_at_start_leaves_the_datapath_as_it_was() -> Result<()> {
    require_root("an_agent_that_fails_at_start_leaves_the_datapath_as_it_was");
    let bed = Bed::new()?;
    let _node_b = bed.agent(NODE_B, &[])?;
    let agent = bed.agent(NODE_A, &[])?;
    // Another node address: were the failing agent to write its node settings, NodePort
    // traffic would be SNATed to an address nobody answers on.
    let node_ip = Ipv4Addr::new(192, 168, 100, 99).to_string();
    let missing = bed.lan.node(NODE_A).scratch_dir().join("no-kubeconfig");
    let report = under_load(&bed, "SIGTERM, new agent that fails at start", |_| {
        ensure!(agent.stop()?.success(), "the agent failed on SIGTERM");
        let started = Agent::start_with_kubeconfig(
            bed.lan.node(NODE_A),
            &missing,
            &[
                "--external-interface",
                EXTERNAL_INTERFACE,
                "--node-ip",
                &node_ip,
            ],
        );
        let error = started
            .err()
            .context("an agent without a kubeconfig started")?;
        ensure!(
            format!("{error:#}").contains("no-kubeconfig"),
            "the agent did not say what failed: {error:#}"
        );
        Ok(())
    })?;
    report.ensure_no_failures()
}

/// Links of interfaces deleted while no agent ran are removed by the next agent; the others
/// are adopted.
#[test]
fn a_new_agent_removes_the_links_of_interfaces_gone_meanwhile() -> Result<()> {
    require_root("a_new_agent_removes_the_links_of_interfaces_gone_meanwhile");
    let bed = Bed::new()?;
    let node = bed.lan.node(NODE_A);
    // A link the pod glob matches, with no pod behind it: only its attachment matters here.
    let ip = |args: &[&str]| {
        integration_tests::process::ip(&[&["-n", node.node_netns()], args].concat())
    };
    ip(&[
        "link",
        "add",
        "lxcgone",
        "type",
        "veth",
        "peer",
        "name",
        "gone-peer",
    ])?;
    ip(&["link", "set", "lxcgone", "up"])?;
    let agent = bed.agent(NODE_A, &[])?;
    let pin = agent.pin_dir().join("links").join("pod_ingress@lxcgone");
    eventually(CONVERGENCE_TIMEOUT, "lxcgone's link pinned", || {
        ensure!(pin.exists(), "no pin at {}", pin.display());
        Ok(())
    })?;
    ensure!(agent.stop()?.success(), "the agent failed on SIGTERM");
    ip(&["link", "del", "lxcgone"])?;
    ensure!(
        pin.exists(),
        "the pin went with the interface: nothing left to test"
    );

    let agent = bed.agent(NODE_A, &[])?;
    eventually(CONVERGENCE_TIMEOUT, "lxcgone's pin removed", || {
        ensure!(!pin.exists(), "{} is still pinned", pin.display());
        Ok(())
    })?;
    let log = agent.log()?;
    ensure!(
        log.contains("pod_ingress@lxcgone") && log.contains("how=Adopted"),
        "the new agent did not say it removed the gone link and adopted the others:\n{log}"
    );
    bed.wait_until_served()
}

/// Every manifest unreadable by a new agent (a stricter release, say): it keeps what the
/// previous agent programmed rather than serve nothing.
#[test]
fn a_new_agent_that_can_parse_nothing_keeps_what_the_maps_hold() -> Result<()> {
    require_root("a_new_agent_that_can_parse_nothing_keeps_what_the_maps_hold");
    let bed = Bed::new()?;
    let _node_b = bed.agent(NODE_B, &[])?;
    let agent = bed.agent(NODE_A, &[])?;
    let broken = bed.lan.node(NODE_A).scratch_dir().join("broken");
    fs::create_dir(&broken)?;
    fs::write(
        broken.join("web.yaml"),
        "kind: Service\nspec: [not, a, map\n",
    )?;
    let (report, log) = replaced_under_load(&bed, agent, &broken, "broken manifests")?;
    ensure!(
        log.contains("no Service could be read") && !log.contains(" synced "),
        "the agent on broken manifests did not say so, or synced:\n{log}"
    );
    report.ensure_no_failures()
}

/// Two agents on one pin directory would hand out the same ids for different backends: the
/// second refuses, and the first goes on.
#[test]
fn a_second_agent_on_the_same_pin_dir_is_refused() -> Result<()> {
    require_root("a_second_agent_on_the_same_pin_dir_is_refused");
    let bed = Bed::new()?;
    let node = bed.lan.node(NODE_A);
    let agent = bed.agent(NODE_A, &[])?;
    let output = output_within(
        Command::new(agent::binary())
            .args(["run", "--manifests"])
            .arg(bed.manifests.path())
            .args(["--pod-interface", "lxc*", "--pin-dir"])
            .arg(agent.pin_dir())
            .arg("--state-dir")
            .arg(node.scratch_dir().join("second-state"))
            .arg("--api-socket")
            .arg(node.scratch_dir().join("second.sock")),
        COMMAND_TIMEOUT,
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success() && stderr.contains("another service-agent"),
        "a second agent was not refused ({}): {stderr}",
        output.status
    );
    agent.wait_for_service(DEFAULT, WEB)?;
    bed.wait_until_served()
}

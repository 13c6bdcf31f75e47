//! `service-agent`: the node agent of the Service dataplane.

mod run;
mod source;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::SystemTime,
};

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use service_agent::{
    api::{self, Scope},
    controlplane::{ControlPlaneConfig, DEFAULT_NODE_PORT_RANGE, Ipv4Cidr, PortRange},
    dataplane::{MapSizes, pins},
    manifest,
    xdp::XdpMode,
};
use service_common::ConntrackLifetimes;

#[derive(Parser)]
#[command(
    version,
    about = "Kubernetes Service dataplane in eBPF: replaces kube-proxy on a node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the dataplane and keep it in step with the manifests or the API server until SIGTERM.
    Run(Box<RunArgs>),
    /// Print what the running agent has programmed, as kubectl would.
    Get(GetArgs),
    /// Detach every program and remove every pinned map and link under --pin-dir: what a
    /// stopped agent leaves running (kube-proxy's --cleanup).
    Cleanup {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Validate manifests without loading anything; exits non-zero with the reasons.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, default_value = "10.96.0.0/12")]
        service_cidr: Ipv4Cidr,
        #[arg(long, default_value_t = DEFAULT_NODE_PORT_RANGE)]
        node_port_range: PortRange,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// Kubernetes YAML: a file or a directory of them; repeatable. Changes are applied live.
    #[arg(
        long = "manifests",
        required_unless_present_any = ["kubeconfig", "in_cluster"],
        conflicts_with_all = ["kubeconfig", "in_cluster"]
    )]
    manifests: Vec<PathBuf>,
    /// Watch the Services and EndpointSlices of the API server this kubeconfig names (its
    /// current context) instead of reading manifests.
    #[arg(long, conflicts_with = "in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Watch the API server of the cluster the agent runs in, with its pod's service account.
    #[arg(long)]
    in_cluster: bool,
    /// With --in-cluster: the API server's own address (https://HOST:PORT) instead of the
    /// `kubernetes` Service's ClusterIP, which nothing translates until this agent has synced
    /// (Cilium's k8sServiceHost). KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT set in the
    /// container's env do the same.
    #[arg(long, requires = "in_cluster")]
    api_server: Option<String>,
    /// Also serve Services labelled service.kubernetes.io/service-proxy-name with this value
    /// (API mode; Services with another value are left to that proxy).
    #[arg(long)]
    service_proxy_name: Option<String>,
    /// Where /healthz and /readyz answer over plain HTTP (ready after the first full sync),
    /// e.g. 0.0.0.0:10256.
    #[arg(long)]
    metrics_address: Option<SocketAddr>,
    /// Host-side links of pods (a glob such as 'lxc*'); repeatable. Links created later count.
    #[arg(long = "pod-interface", required = true)]
    pod_interfaces: Vec<String>,
    /// Where ClusterIPs without an explicit spec.clusterIP are allocated.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: Ipv4Cidr,
    /// bpffs directory where the maps and the program attachments are pinned: they outlive the
    /// agent (SIGTERM, a crash, an upgrade), and the next agent adopts them. `service-agent
    /// cleanup` removes them. It must be on a bpffs that outlives the agent (the agent refuses to
    /// start elsewhere).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Capacity of the service map (slot-0 and one entry per backend, per frontend); the
    /// backend map gets half of it, the rev-NAT and frontend-address maps a quarter (Cilium's
    /// bpf-lb-map-max). A change moves the node to new maps without a moment without
    /// translation.
    #[arg(long, default_value_t = MapSizes::DEFAULT.lb)]
    lb_map_max: u32,
    /// Capacity of the conntrack map (two entries per flow; an LRU: the oldest go first).
    #[arg(long, default_value_t = MapSizes::DEFAULT.conntrack)]
    conntrack_map_max: u32,
    /// How long an established TCP flow may stay silent before its conntrack entries expire
    /// (`90s`, `5m`, `6h`, or seconds).
    #[arg(long, value_parser = parse_seconds, default_value = "6h")]
    conntrack_tcp_timeout: u32,
    /// The same for a TCP flow whose handshake is not complete.
    #[arg(long, value_parser = parse_seconds, default_value = "60s")]
    conntrack_tcp_syn_timeout: u32,
    /// The same for a TCP flow after FIN from both sides or a RST.
    #[arg(long, value_parser = parse_seconds, default_value = "10s")]
    conntrack_tcp_close_timeout: u32,
    /// The same for UDP and other flows.
    #[arg(long, value_parser = parse_seconds, default_value = "60s")]
    conntrack_other_timeout: u32,
    /// Where the agent keeps ClusterIP allocations across restarts.
    #[arg(long, default_value = "/var/lib/service-agent")]
    state_dir: PathBuf,
    /// Unix socket that `service-agent get` reads.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// Where the node's network sysctls are written (rp_filter and accept_local of the links the
    /// programs attach to). In a container, where /proc/sys is read-only, mount the host's
    /// /proc/sys/net elsewhere and name it here (deploy/daemonset.yaml uses /host/proc/sys/net).
    #[arg(long, default_value = "/proc/sys/net")]
    proc_sys_net: PathBuf,
    /// This node's IPs (NodePort frontends); repeatable.
    #[arg(long = "node-ip")]
    node_ips: Vec<Ipv4Addr>,
    /// Links that face outside the cluster (NodePort, LoadBalancer); repeatable.
    #[arg(long = "external-interface")]
    external_interfaces: Vec<String>,
    /// How the XDP fast path runs on the external links: in the driver (native), in the stack
    /// (generic), or not at all (off: the TC program does everything).
    #[arg(long, value_enum, default_value_t = XdpMode::Native)]
    xdp_mode: XdpMode,
    /// The range nodePorts are allocated from (kube-apiserver's --service-node-port-range).
    #[arg(long, default_value_t = DEFAULT_NODE_PORT_RANGE)]
    node_port_range: PortRange,
    /// cgroup v2 directory whose processes get socket-level load balancing (connect, sendmsg,
    /// recvmsg, getpeername), so that the node's own processes reach ClusterIPs and nodePorts,
    /// and pods' TCP connections go straight to a backend: usually the cgroup2 root
    /// (/sys/fs/cgroup, /sys/fs/cgroup/unified on hybrid systems). Without it, pod and external
    /// traffic is translated per packet and the node's own processes are not served.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Socket-level load balancing for the node's own processes only: pods' TCP connections are
    /// then translated per packet, as their UDP always is (Cilium's
    /// bpf-lb-sock-hostns-only, for meshes that must see the service address in the pod).
    #[arg(long)]
    socket_lb_host_only: bool,
    /// This node's name, as endpoints' nodeName gives it (in API mode the hostname by default,
    /// as for the kubelet).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
}

impl RunArgs {
    fn map_sizes(&self) -> MapSizes {
        MapSizes {
            lb: self.lb_map_max,
            conntrack: self.conntrack_map_max,
        }
    }

    fn conntrack_lifetimes(&self) -> ConntrackLifetimes {
        ConntrackLifetimes {
            tcp_established: self.conntrack_tcp_timeout,
            tcp_syn: self.conntrack_tcp_syn_timeout,
            tcp_closing: self.conntrack_tcp_close_timeout,
            other: self.conntrack_other_timeout,
        }
    }
}

/// Where the agent pins maps and links unless told otherwise.
const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/service-dataplane";

/// A lifetime flag: `90s`, `5m`, `6h`, or plain seconds; at least one second.
fn parse_seconds(text: &str) -> Result<u32, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => {
            return Err(format!(
                "{text:?}: give seconds, or a number with s, m or h"
            ));
        }
    };
    let seconds = number
        .parse::<u32>()
        .ok()
        .and_then(|number| number.checked_mul(scale))
        .ok_or_else(|| format!("{text:?} is not a duration this agent can keep"))?;
    if seconds == 0 {
        return Err("a lifetime of 0 would expire every flow at once".into());
    }
    // The kernel side compares ages as signed 32-bit seconds: 68 years is plenty.
    if seconds > i32::MAX as u32 {
        return Err(format!(
            "{text:?} is longer than a flow can be kept (68 years)"
        ));
    }
    Ok(seconds)
}

#[derive(Args)]
struct GetArgs {
    what: Resource,
    /// Only this namespace.
    #[arg(
        short,
        long,
        default_value = "default",
        conflicts_with = "all_namespaces"
    )]
    namespace: String,
    /// Every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    api_socket: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Resource {
    #[value(alias = "svc", alias = "service")]
    Services,
    #[value(alias = "ep", alias = "endpoint")]
    Endpoints,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(*args).map(|()| ExitCode::SUCCESS),
        Command::Get(args) => get(args).map(|()| ExitCode::SUCCESS),
        Command::Cleanup { pin_dir } => cleanup(&pin_dir).map(|()| ExitCode::SUCCESS),
        Command::Check {
            paths,
            service_cidr,
            node_port_range,
        } => check(&paths, service_cidr, node_port_range),
    };
    result.unwrap_or_else(|err| {
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}

fn cleanup(pin_dir: &Path) -> Result<()> {
    let removed = pins::cleanup(pin_dir)?;
    println!(
        "removed {} pinned link(s) and the map layout(s) [{}] under {}",
        removed.links,
        removed.layouts.join(", "),
        pin_dir.display()
    );
    Ok(())
}

fn get(args: GetArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let services = runtime.block_on(api::fetch(&args.api_socket))?;
    let scope = if args.all_namespaces {
        Scope::All
    } else {
        Scope::Namespace(args.namespace)
    };
    let services = api::select(services, &scope);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&services)?),
        Output::Table => {
            let now = SystemTime::now();
            let table = match args.what {
                Resource::Services => api::services_table(&services, &scope, now),
                Resource::Endpoints => api::endpoints_table(&services, &scope, now),
            };
            print!("{table}");
        }
    }
    Ok(())
}

fn check(
    paths: &[PathBuf],
    service_cidr: Ipv4Cidr,
    node_port_range: PortRange,
) -> Result<ExitCode> {
    let config = ControlPlaneConfig {
        service_cidr,
        state_dir: None,
        node_port_range,
    };
    let problems = manifest::check(paths, &config)?;
    for problem in &problems {
        eprintln!("{problem}");
    }
    if problems.is_empty() {
        println!("ok: {} path(s) valid", paths.len());
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_seconds;

    #[test]
    fn lifetimes_take_seconds_minutes_and_hours_within_what_the_kernel_compares() {
        assert_eq!(parse_seconds("90"), Ok(90));
        assert_eq!(parse_seconds("90s"), Ok(90));
        assert_eq!(parse_seconds("5m"), Ok(300));
        assert_eq!(parse_seconds("6h"), Ok(21_600));
        assert!(parse_seconds("0s").is_err());
        assert!(parse_seconds("5d").is_err());
        assert!(parse_seconds("-5").is_err());
        assert!(parse_seconds("1000000h").is_err(), "past i32::MAX seconds");
        assert_eq!(parse_seconds("596523h"), Ok(2_147_482_800));
    }
}

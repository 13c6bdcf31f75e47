//! `service-agent`: the node agent of the Service dataplane.

mod run;
mod source;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::SystemTime,
};

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};
use service_agent::{
    api::{self, Scope},
    controlplane::{ControlPlaneConfig, DEFAULT_NODE_PORT_RANGE, Ipv4Cidr, PortRange},
    manifest,
    xdp::XdpMode,
};

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
    /// bpffs directory for the maps; removed on SIGTERM.
    #[arg(long, default_value = "/sys/fs/bpf/service-dataplane")]
    pin_dir: PathBuf,
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

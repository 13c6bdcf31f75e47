//! The bench's output: medians over rounds, ratios against the routing limit and against the best
//! kube-proxy mode of the same run, as a Markdown report (printed and written to BENCHMARKS.md)
//! and a chart of connections per second against the number of services.

use std::{collections::BTreeMap, fmt::Write, fs, path::Path, time::Duration};

use anyhow::{Context, Result};
use integration_tests::steady_load::{EXCHANGE_PAUSE, REQUEST_PAUSE, REQUEST_TIMEOUT};
use plotters::prelude::*;

use crate::{
    faults::{self, FaultRun, Timing},
    kernel::{PacketCosts, median},
    load::LoadFigures,
    modes::{Mode, Programming},
};

/// Everything one mode measured at one size.
#[derive(Default)]
pub struct ModeRuns {
    pub tcp: Vec<LoadFigures>,
    pub udp: Vec<LoadFigures>,
    /// TCP connections from outside the cluster through the nodePort.
    pub node_port: Vec<LoadFigures>,
    /// TCP connections from the client pod straight to the pod IPs, with the mode's dataplane on
    /// the node: what it costs traffic that is not for a service.
    pub to_pod_ips: Vec<LoadFigures>,
    pub programming: Programming,
}

/// Medians over the rounds; errors are summed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub tcp: LoadFigures,
    pub udp: LoadFigures,
    pub node_port: LoadFigures,
    pub to_pod_ips: LoadFigures,
    pub programming: Programming,
}

impl ModeRuns {
    pub fn summary(&self) -> Summary {
        let merge = |runs: &[LoadFigures]| LoadFigures {
            per_second: median(runs.iter().map(|r| r.per_second).collect()),
            p50_us: median(runs.iter().map(|r| r.p50_us).collect()),
            p99_us: median(runs.iter().map(|r| r.p99_us).collect()),
            errors: runs.iter().map(|r| r.errors).sum(),
        };
        Summary {
            tcp: merge(&self.tcp),
            udp: merge(&self.udp),
            node_port: merge(&self.node_port),
            to_pod_ips: merge(&self.to_pod_ips),
            programming: self.programming,
        }
    }
}

pub type Results = BTreeMap<usize, BTreeMap<Mode, Summary>>;

pub struct RunDescription<'a> {
    pub command: &'a str,
    pub rounds: usize,
    pub seconds_per_run: u64,
}

pub fn markdown(results: &Results, kernel: &[PacketCosts], context: &RunDescription) -> String {
    let mut out = String::new();
    let machine = machine_description();
    writeln!(
        out,
        "# Benchmarks\n\nMade by `{}` on {machine}. {} round(s) of {} s per load and mode, \
         modes alternated within each round (base, iptables, nftables, agent); figures are medians \
         over rounds, errors are summed. Absolute numbers depend on a shared, noisy machine; the \
         ratios, measured side by side in one run, are the claim.\n",
        context.command, context.rounds, context.seconds_per_run
    )
    .unwrap();
    out.push_str(METHOD);
    if !results.is_empty() {
        load_tables(&mut out, results);
    }
    kernel_table(&mut out, kernel);
    out
}

/// The four load tables and the programming table.
fn load_tables(out: &mut String, results: &Results) {
    load_table(
        out,
        "New TCP connections per second (one HTTP request each)",
        ("conn/s", "errors"),
        results,
        |summary| summary.tcp,
    );
    load_table(
        out,
        "UDP request/response per second",
        ("req/s", "unanswered"),
        results,
        |summary| summary.udp,
    );
    load_table(
        out,
        "NodePort from outside the cluster: new TCP connections per second (one HTTP request each; \
         base: the client reaches the pods through the node's routing)",
        ("conn/s", "errors"),
        results,
        |summary| summary.node_port,
    );
    load_table(
        out,
        "Not a service: new TCP connections per second from the client pod straight to the pod \
         IPs, with each mode's dataplane on the node (base: the same load, measured once)",
        ("conn/s", "errors"),
        results,
        |summary| summary.to_pod_ips,
    );

    writeln!(
        out,
        "\n## Programming: services handed over -> the measured service answers\n"
    )
    .unwrap();
    writeln!(
        out,
        "| services | kube-proxy iptables | kube-proxy nftables | service-agent (YAML) | service-agent (JSON) | agent RSS |\n|---:|---:|---:|---:|---:|---:|"
    )
    .unwrap();
    for (services, modes) in results {
        let seconds = |mode| {
            modes.get(&mode).map_or("-".to_string(), |s: &Summary| {
                match s.programming.gave_up_after {
                    Some(limit) => format!("> {limit:.0} s (gave up)"),
                    None => format!("{:.3} s", s.programming.seconds),
                }
            })
        };
        let rss = modes
            .get(&Mode::Agent)
            .and_then(|s| s.programming.rss_bytes)
            .map_or("-".to_string(), |b| {
                format!("{:.1} MiB", b as f64 / 1048576.0)
            });
        let json = modes
            .get(&Mode::Agent)
            .and_then(|s| s.programming.json_seconds)
            .map_or("-".to_string(), |s| format!("{s:.3} s"));
        writeln!(
            out,
            "| {services} | {} | {} | {} | {json} | {rss} |",
            seconds(Mode::Iptables),
            seconds(Mode::Nftables),
            seconds(Mode::Agent)
        )
        .unwrap();
    }
}

/// The kernel programs' costs per packet, when they were measured.
fn kernel_table(out: &mut String, kernel: &[PacketCosts]) {
    if !kernel.is_empty() {
        writeln!(
            out,
            "\n## The kernel program alone (BPF_PROG_TEST_RUN, median ns per packet)\n"
        )
        .unwrap();
        writeln!(
            out,
            "| services | not a service | new flow (conntrack miss) | known flow (conntrack hit) | reply (reverse NAT) | NodePort new flow (DNAT + SNAT) | NodePort reply | NodePort new flow, XDP | NodePort reply, XDP |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        .unwrap();
        for costs in kernel {
            writeln!(
                out,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                costs.services,
                costs.passthrough_ns,
                costs.new_flow_ns,
                costs.established_ns,
                costs.reply_ns,
                costs.node_port_new_flow_ns,
                costs.node_port_reply_ns,
                costs.xdp_node_port_new_flow_ns,
                costs.xdp_node_port_reply_ns
            )
            .unwrap();
        }
        if let (Some(first), Some(last)) = (kernel.first(), kernel.last()) {
            let change = |a: f64, b: f64| format!("{:+.1}%", (b / a - 1.0) * 100.0);
            writeln!(
                out,
                "\nFrom {} to {} services: not a service {}, new flow {}, known flow {}, reply {}, NodePort new flow {}, NodePort reply {}, XDP new flow {}, XDP reply {}.",
                first.services,
                last.services,
                change(first.passthrough_ns, last.passthrough_ns),
                change(first.new_flow_ns, last.new_flow_ns),
                change(first.established_ns, last.established_ns),
                change(first.reply_ns, last.reply_ns),
                change(first.node_port_new_flow_ns, last.node_port_new_flow_ns),
                change(first.node_port_reply_ns, last.node_port_reply_ns),
                change(first.xdp_node_port_new_flow_ns, last.xdp_node_port_new_flow_ns),
                change(first.xdp_node_port_reply_ns, last.xdp_node_port_reply_ns)
            )
            .unwrap();
        }
    }
}

/// One load's table: a row per size and mode with the rate, its ratios, latencies and failures.
fn load_table(
    out: &mut String,
    title: &str,
    (rate, failures): (&str, &str),
    results: &Results,
    load: impl Fn(&Summary) -> LoadFigures,
) {
    writeln!(out, "\n## {title}\n").unwrap();
    writeln!(
        out,
        "| services | mode | {rate} | vs base | vs best kube-proxy | p50 | p99 | {failures} |\n|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    .unwrap();
    let rate_of = |summary: &Summary| load(summary).per_second;
    for (services, modes) in results {
        let measured = modes
            .iter()
            .filter(|(_, summary)| summary.programming.gave_up_after.is_none());
        for (mode, summary) in measured {
            let figures = load(summary);
            writeln!(
                out,
                "| {services} | {mode} | {:.0} | {} | {} | {} | {} | {} |",
                figures.per_second,
                ratio(figures.per_second, modes, Mode::Base, rate_of),
                versus_best_peer(*mode, figures.per_second, modes, rate_of),
                micros(figures.p50_us),
                micros(figures.p99_us),
                figures.errors
            )
            .unwrap();
        }
    }
}

/// The fault table: a row per mode and fault, with what the steady load met.
pub fn fault_table(runs: &[FaultRun], timing: Timing) -> String {
    let seconds = |duration: Duration| format!("{:.1}", duration.as_secs_f64());
    let millis = |duration: Duration| duration.as_millis();
    let mut out = format!(
        "\n## Faults under steady load: the proxy killed and restarted, or upgraded\n\n\
         {} services. Six streams at once, each with one request in flight, the next {} ms after \
         each answer ({} ms on a long-lived connection), a request failing without a right answer \
         within {} s: from the client pod, UDP request/response, a new TCP connection per request \
         and one long-lived TCP connection to the ClusterIP; from the client outside the cluster, \
         the same three through the NodePort. The load runs {} s before the fault and {} s after \
         the new proxy is up. *kill -9 + restart*: SIGKILL, {} s without a proxy, then a new one; \
         *upgrade*: SIGTERM and a new one at once (a DaemonSet's rolling update). The longest gap \
         is the longest time one stream went without an answer; a long-lived connection breaks \
         on its first failed exchange. kube-proxy's rows: its rules stay in the kernel while it is \
         down, and a new kube-proxy begins with a full sync that loads the same rules again \
         (`iptables-legacy-restore`; one `nft -f` transaction that flushes its table and fills \
         it again), so they show what that reload costs flowing traffic, not a proxy's absence. \
         Ours must read 0 failed: its datapath stays pinned in the kernel while no agent runs, \
         and the new agent adopts it.\n\n\
         | mode | fault | requests | failed | longest gap | broken long-lived connections |\n\
         |---|---|---:|---:|---:|---:|\n",
        faults::SERVICES,
        millis(REQUEST_PAUSE),
        millis(EXCHANGE_PAUSE),
        seconds(REQUEST_TIMEOUT),
        seconds(timing.before),
        seconds(timing.after),
        seconds(timing.down),
    );
    for run in runs {
        let report = &run.report;
        writeln!(
            out,
            "| {} | {} | {} | {} | {} ms | {} |",
            run.mode,
            run.fault,
            report.sent(),
            report.failed(),
            millis(report.longest_gap()),
            report.broken()
        )
        .unwrap();
    }
    out
}

const METHOD: &str = "\
## Method

Each mode has its own node namespace with a client pod and three backend pods (nginx from Debian,
one worker, answering a small 200; and a UDP echo server), identical in shape, so that netfilter
conntrack switched on by kube-proxy's rules in one node costs nothing in the others. For N
services, each has 3 endpoints and one TCP port; the measured one sits in the middle of the set
and is the only one whose endpoints exist (it also has a UDP port, and is of type NodePort). A
second client sits outside the cluster on a link of its own to the node (the node's external
interface, 192.168.100.1) for the NodePort figures: policy Cluster, so the node DNATs to a pod and
SNATs to its own address (kube-proxy: KUBE-NODEPORTS / `service-nodeports`, KUBE-EXT-* marking
for masquerade; the agent: its XDP program in native mode on that link, then TC for the replies).

- **base**: no service; the load goes straight to the three pod IPs (the routing limit).
- **kube-proxy iptables**: kube-proxy's iptables-mode rule shape (KUBE-SERVICES, KUBE-SVC-* with
  `statistic --mode random`, KUBE-SEP-* with DNAT, KUBE-MARK-MASQ, MASQUERADE), loaded with
  `iptables-legacy-restore`.
- **kube-proxy nftables**: kube-proxy's nftables-mode shape (a `service-ips` verdict map on
  daddr . l4proto . dport, per-service chains with `numgen random mod 3 vmap`, per-endpoint DNAT
  chains), loaded with `nft -f`.
- **service-agent**: this project, given the same services as Service + EndpointSlice manifests,
  with its defaults: the client pod's processes are in the cgroup the agent serves (`--cgroup`,
  the cgroup root on a real node), so their TCP connections are balanced at connect() and their
  packets need no translation (Cilium's socket load balancing does the same); UDP and traffic
  from outside are translated per packet by the TC and XDP programs.

TCP: three `wrk -t1 -c11 -H 'Connection: close'` at once from the client (one per pod IP for
base). UDP: 8 connected sockets, one request in flight each. The client has the full ephemeral
port range and `tcp_tw_reuse`; clients and backends keep no TIME_WAIT sockets
(`tcp_max_tw_buckets` 0), since the kernel's established-socket hash is shared by every namespace
and one mode's hundreds of thousands would slow the modes measured after it; conntrack
(netfilter's, and the agent's map) is flushed before every run. The *not a service* table has
every mode's client talk to the pod IPs as base does: the cost of each dataplane for traffic it
does not translate. Base's client keeps each of its three load generators on one pod, while a
service spreads every generator's connections over the three pods; on this 2-vCPU VM the spread
alone costs a service mode about a fifth of base's rate (five times the rescheduling IPIs), which
no dataplane can win back. Programming time runs from the moment the rules file is handed to the loader (or the
manifest file is renamed into the agent's directory) until an HTTP request to the measured service
is answered. The agent is measured twice, each time fresh: from YAML manifests, and from the same
objects as one JSON List (what the API server sends; YAML parsing is most of the YAML figure).
";

fn ratio(
    value: f64,
    modes: &BTreeMap<Mode, Summary>,
    to: Mode,
    figure: impl Fn(&Summary) -> f64,
) -> String {
    modes
        .get(&to)
        .map(&figure)
        .filter(|base| *base > 0.0)
        .map_or("-".to_string(), |base| format!("{:.2}x", value / base))
}

fn versus_best_peer(
    mode: Mode,
    value: f64,
    modes: &BTreeMap<Mode, Summary>,
    figure: impl Fn(&Summary) -> f64,
) -> String {
    if mode != Mode::Agent {
        return String::new();
    }
    let best = [Mode::Iptables, Mode::Nftables]
        .iter()
        .filter_map(|peer| modes.get(peer).map(&figure))
        .fold(0.0, f64::max);
    if best > 0.0 {
        format!("{:.2}x", value / best)
    } else {
        "-".to_string()
    }
}

fn micros(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

fn machine_description() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let memory_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1048576.0);
    format!(
        "{cpu}, {cores} cores, {memory_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// Connections per second against the number of services, one line per mode, to `path` (PNG).
pub fn chart(results: &Results, path: &Path) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let sizes: Vec<usize> = results.keys().copied().collect();
    let (min_n, max_n) = (
        *sizes.first().context("no results")? as f64,
        *sizes.last().context("no results")? as f64,
    );
    let top = results
        .values()
        .flat_map(|modes| modes.values().map(|s| s.tcp.per_second))
        .fold(0.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "New TCP connections per second through a ClusterIP",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d((min_n..max_n * 1.5).log_scale(), 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("services (log scale)")
        .y_desc("connections/s")
        .x_label_formatter(&|n| format!("{n:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let colours = [BLACK, RED, BLUE, RGBColor(0, 150, 0)];
    for (mode, colour) in Mode::ALL.into_iter().zip(colours) {
        let points: Vec<(f64, f64)> = results
            .iter()
            .filter_map(|(n, modes)| modes.get(&mode).map(|s| (*n, s)))
            .filter(|(_, s)| s.programming.gave_up_after.is_none())
            .map(|(n, s)| (n as f64, s.tcp.per_second))
            .collect();
        let style = colour.stroke_width(3);
        chart
            .draw_series(LineSeries::new(points.clone(), style))?
            .label(mode.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(
            points
                .into_iter()
                .map(|point| Circle::new(point, 4, colour.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// plotters draws text with ab_glyph, which needs a font: DejaVu Sans from Debian's
/// fonts-dejavu-core (installed by `cargo xtask bootstrap`).
fn register_font() -> Result<()> {
    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let bytes = fs::read(FONT).with_context(|| format!("cannot read the chart font {FONT}"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into()))
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;
    Ok(())
}

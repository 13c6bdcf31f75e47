//! `cargo xtask bench`: this project's dataplane side by side with kube-proxy's iptables and
//! nftables rule shapes and with the no-service routing limit, on network-namespace nodes built
//! like the integration tests' ones. Prints a Markdown report and writes it with a chart.
//! `--quick` is the smoke variant CI runs: small sizes, short runs, and a check that every mode
//! produced figures (never a check of how fast).

mod api;
mod faults;
mod kernel;
mod load;
mod modes;
mod nginx;
// The packet builder of the fixtures; the bench uses only part of it.
#[allow(dead_code)]
#[path = "../../../tests/packets/mod.rs"]
mod packets;
mod report;
mod services;

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use integration_tests::{manifest::ManifestDir, privileged};

use crate::{
    modes::{Bed, Mode},
    report::{ModeRuns, Results},
};

#[derive(Parser)]
#[command(about = "Benchmark the dataplane against kube-proxy's rule shapes and the routing limit")]
struct Args {
    /// Smoke run: 10 and 1,000 services, 2 s runs, one round, short faults; checks that every
    /// mode produced figures. Writes to target/bench-quick/ unless --output is given.
    #[arg(long)]
    quick: bool,
    /// Numbers of services to measure.
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Numbers of services for the kernel-program measurement.
    #[arg(long, value_delimiter = ',')]
    kernel_sizes: Option<Vec<usize>>,
    /// Numbers of services for the API-server source (10 endpoints each).
    #[arg(long, value_delimiter = ',')]
    api_sizes: Option<Vec<usize>>,
    /// Endpoint changes timed per API-server size.
    #[arg(long)]
    api_changes: Option<usize>,
    /// Seconds per load run.
    #[arg(long)]
    seconds: Option<u64>,
    /// Rounds over all modes; figures are medians over rounds.
    #[arg(long)]
    rounds: Option<usize>,
    /// Only the fault table (kill -9 + restart and upgrade under steady load, every mode):
    /// no sizes, kernel programs or API-server source. Writes to target/bench-faults/ unless
    /// --output is given (or --quick, for short faults under target/bench-quick/).
    #[arg(long)]
    faults_only: bool,
    /// Where the Markdown report goes.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Where the chart goes (PNG).
    #[arg(long)]
    chart: Option<PathBuf>,
    /// The command line quoted in the report.
    #[arg(long, default_value = "cargo xtask bench")]
    command_line: String,
}

struct Plan {
    sizes: Vec<usize>,
    kernel_sizes: Vec<usize>,
    kernel_flows: u16,
    api_sizes: Vec<usize>,
    api_changes: usize,
    faults: faults::Timing,
    run: Duration,
    rounds: usize,
    output: PathBuf,
    chart: PathBuf,
}

impl Args {
    fn plan(self) -> Plan {
        let root = integration_tests::agent::workspace_root();
        let (sizes, kernel_sizes, kernel_flows, seconds, rounds, faults, dir) = if self.quick {
            (
                vec![10, 1_000],
                vec![10, 1_000],
                2_000,
                2,
                1,
                faults::Timing::QUICK,
                root.join("target/bench-quick"),
            )
        } else {
            (
                vec![10, 1_000, 10_000, 50_000],
                vec![10, 100_000],
                20_000,
                10,
                3,
                faults::Timing::FULL,
                if self.faults_only {
                    root.join("target/bench-faults")
                } else {
                    root.clone()
                },
            )
        };
        let (api_sizes, api_changes) = if self.quick {
            (vec![1_000], 20)
        } else {
            (vec![1_000, 10_000], 200)
        };
        // The other tables measure nothing, and their sections are left out.
        let only_faults = |sizes: Option<Vec<usize>>, default| {
            if self.faults_only {
                Vec::new()
            } else {
                sizes.unwrap_or(default)
            }
        };
        Plan {
            sizes: only_faults(self.sizes, sizes),
            kernel_sizes: only_faults(self.kernel_sizes, kernel_sizes),
            kernel_flows,
            api_sizes: only_faults(self.api_sizes, api_sizes),
            api_changes: self.api_changes.unwrap_or(api_changes),
            faults,
            run: Duration::from_secs(self.seconds.unwrap_or(seconds)),
            rounds: self.rounds.unwrap_or(rounds),
            output: self.output.unwrap_or_else(|| dir.join("BENCHMARKS.md")),
            chart: self.chart.unwrap_or_else(|| dir.join("benchmarks.png")),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !privileged("the benchmark") {
        return ExitCode::FAILURE;
    }
    let command_line = args.command_line.clone();
    match bench(args.plan(), &command_line) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(plan: Plan, command_line: &str) -> Result<()> {
    if !plan.kernel_sizes.is_empty() {
        eprintln!(
            "kernel program: {:?} services, {} flows",
            plan.kernel_sizes, plan.kernel_flows
        );
    }
    let kernel = kernel::measure(&plan.kernel_sizes, plan.kernel_flows)?;

    let mut results = Results::new();
    for &services in &plan.sizes {
        let runs = measure_size(services, &plan)
            .with_context(|| format!("measuring {services} services"))?;
        results.insert(
            services,
            runs.into_iter().map(|(m, r)| (m, r.summary())).collect(),
        );
    }
    check_every_mode_measured(&results)?;
    let mut api_runs = Vec::new();
    for &services in &plan.api_sizes {
        eprintln!("API-server source: {services} services");
        let run = api::measure(services, plan.api_changes)
            .with_context(|| format!("measuring the API-server source at {services} services"))?;
        eprintln!(
            "  programmed {:.3} s after the lists; endpoint change p50 {:.2} ms, p99 {:.2} ms",
            run.initial_seconds, run.change_p50_ms, run.change_p99_ms
        );
        api_runs.push(run);
    }

    let fault_runs = faults::measure(plan.faults)?;

    let mut text = report::markdown(
        &results,
        &kernel,
        &report::RunDescription {
            command: command_line,
            rounds: plan.rounds,
            seconds_per_run: plan.run.as_secs(),
        },
    );
    if !api_runs.is_empty() {
        text.push_str(&api::markdown(&api_runs));
    }
    text.push_str(&report::fault_table(&fault_runs, plan.faults));
    println!("{text}");
    if let Some(dir) = plan.output.parent() {
        fs::create_dir_all(dir)?;
    }
    // --faults-only measured no sizes: nothing to chart.
    if !results.is_empty() {
        let chart_name = plan
            .chart
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        text.push_str(&format!(
            "\n![connections per second against services]({chart_name})\n"
        ));
        report::chart(&results, &plan.chart)?;
        eprintln!("wrote {}", plan.chart.display());
    }
    fs::write(&plan.output, text)
        .with_context(|| format!("cannot write {}", plan.output.display()))?;
    eprintln!("wrote {}", plan.output.display());
    Ok(())
}

/// One size: four beds, programming, then the rounds.
fn measure_size(services: usize, plan: &Plan) -> Result<BTreeMap<Mode, ModeRuns>> {
    let set = modes::service_set(services);
    eprintln!("{services} services: building the four test beds");
    let beds = Mode::ALL
        .into_iter()
        .map(Bed::new)
        .collect::<Result<Vec<_>>>()?;
    let agent_bed = beds
        .iter()
        .find(|bed| bed.mode == Mode::Agent)
        .context("no agent bed")?;
    let manifests = ManifestDir::create(&agent_bed.topology)?;
    let agent = agent_bed.start_agent(&manifests)?;

    let mut runs: BTreeMap<Mode, ModeRuns> = BTreeMap::new();
    let mut measured = Vec::new();
    for bed in &beds {
        let agent = (bed.mode == Mode::Agent).then_some((&agent, &manifests));
        let started = Instant::now();
        match modes::program(bed, &set, agent) {
            Ok(programming) => {
                eprintln!("  {}: programmed in {:.3} s", bed.mode, programming.seconds);
                runs.entry(bed.mode).or_default().programming = programming;
                measured.push(bed);
            }
            // kube-proxy's nftables shape takes tens of minutes at 50,000 services: a peer that
            // gives up is reported as such, and the other modes are still measured.
            Err(error) if bed.mode.is_peer() => {
                eprintln!("  {}: gave up: {error:#}", bed.mode);
                runs.entry(bed.mode).or_default().programming.gave_up_after =
                    Some(started.elapsed().as_secs_f64());
            }
            Err(error) => return Err(error.context(format!("programming {}", bed.mode))),
        }
    }
    // Again from JSON, on a fresh agent: the same work without YAML's parsing cost, which is
    // what the API-server source will see.
    agent.stop()?;
    manifests.remove("services.yaml")?;
    let agent = agent_bed.start_agent(&manifests)?;
    let started = modes::hand_over(
        agent_bed,
        &set,
        &manifests,
        "services.json",
        &set.manifests_json(),
    )?;
    let json_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "  {}: programmed from JSON in {json_seconds:.3} s",
        Mode::Agent
    );
    runs.entry(Mode::Agent)
        .or_default()
        .programming
        .json_seconds = Some(json_seconds);
    for round in 1..=plan.rounds {
        for bed in &measured {
            let agent = (bed.mode == Mode::Agent).then_some(&agent);
            let entry = runs.entry(bed.mode).or_default();
            bed.flush_conntrack(agent)?;
            let tcp = load::tcp_connections(
                &bed.client.netns,
                Some(&bed.pods_cgroup),
                &bed.tcp_targets(&set),
                plan.run,
            )
            .with_context(|| format!("TCP load through {}", bed.mode))?;
            bed.flush_conntrack(agent)?;
            let udp =
                load::udp_request_response(&bed.client.netns, &bed.udp_targets(&set), plan.run)
                    .with_context(|| format!("UDP load through {}", bed.mode))?;
            bed.flush_conntrack(agent)?;
            let node_port = load::tcp_connections(
                &bed.external_client.netns,
                None,
                &bed.node_port_targets(),
                plan.run,
            )
            .with_context(|| format!("NodePort load through {}", bed.mode))?;
            // Base's TCP run already is the client talking to the pod IPs.
            let to_pod_ips = if bed.mode == Mode::Base {
                tcp
            } else {
                bed.flush_conntrack(agent)?;
                load::tcp_connections(
                    &bed.client.netns,
                    Some(&bed.pods_cgroup),
                    &bed.pod_ip_targets(),
                    plan.run,
                )
                .with_context(|| format!("load to the pod IPs through {}", bed.mode))?
            };
            eprintln!(
                "  round {round} {}: {:.0} conn/s ({} errors), {:.0} UDP req/s, NodePort {:.0} conn/s ({} errors), to pod IPs {:.0} conn/s",
                bed.mode,
                tcp.per_second,
                tcp.errors,
                udp.per_second,
                node_port.per_second,
                node_port.errors,
                to_pod_ips.per_second
            );
            entry.tcp.push(tcp);
            entry.udp.push(udp);
            entry.node_port.push(node_port);
            entry.to_pod_ips.push(to_pod_ips);
        }
    }
    agent.stop()?;
    Ok(runs)
}

/// The smoke check: every mode produced every figure at every size (a peer that gave up on
/// programming is reported as such instead).
fn check_every_mode_measured(results: &Results) -> Result<()> {
    for (services, modes) in results {
        for mode in Mode::ALL {
            let Some(summary) = modes.get(&mode) else {
                bail!("{mode} produced no figures at {services} services");
            };
            if summary.programming.gave_up_after.is_some() {
                continue;
            }
            if summary.tcp.per_second <= 0.0
                || summary.udp.per_second <= 0.0
                || summary.node_port.per_second <= 0.0
                || summary.to_pod_ips.per_second <= 0.0
            {
                bail!("{mode} answered nothing at {services} services");
            }
        }
    }
    Ok(())
}

//! API-server mode at scale: the agent (`--kubeconfig`) against the stand-in API server holding N
//! Services with 10 endpoints each. Measured: how long after the initial lists were written the
//! maps are fully programmed (the agent's "synced" log line), how long one endpoint change takes
//! from the moment its watch event was written to the moment its sync finished (p50, p99), and
//! the agent's memory.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use integration_tests::{
    agent::Agent,
    apiserver::{
        Resource, StandInApiServer,
        objects::{self, Port, SliceEndpoint},
    },
    topology::Topology,
};

use crate::modes::resident_bytes;

pub const ENDPOINTS_PER_SERVICE: usize = 10;
/// How long the agent may take to program everything, or one change, before the run fails.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
const LOG_POLL_INTERVAL: Duration = Duration::from_millis(1);

const PORT: Port = Port {
    name: "http",
    protocol: "TCP",
    port: 80,
    target_port: 8080,
};

/// One size's figures.
pub struct ApiRun {
    pub services: usize,
    pub initial_seconds: f64,
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub changes: usize,
    pub rss_bytes: u64,
}

fn cluster_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + index as u32)
}

fn endpoint_ip(service: usize, endpoint: usize) -> Ipv4Addr {
    let offset = service * (ENDPOINTS_PER_SERVICE + 1) + endpoint;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + offset as u32)
}

fn service_name(index: usize) -> String {
    format!("svc-{index}")
}

/// The slice of service `index` with `count` ready endpoints.
fn slice(index: usize, count: usize, node: &str) -> serde_json::Value {
    let pods: Vec<String> = (0..count).map(|e| format!("svc-{index}-{e}")).collect();
    let endpoints: Vec<SliceEndpoint> = (0..count)
        .map(|e| SliceEndpoint::ready(&pods[e], endpoint_ip(index, e), node))
        .collect();
    let name = service_name(index);
    objects::endpoint_slice("default", &name, &format!("{name}-x"), &endpoints, &[PORT])
}

pub fn measure(services: usize, changes: usize) -> Result<ApiRun> {
    let topology = Topology::new()?;
    let api = StandInApiServer::start_in(topology.node_netns())?;
    api.apply_all(
        Resource::Services,
        (0..services)
            .map(|i| objects::service("default", &service_name(i), cluster_ip(i), &[PORT])),
    );
    api.apply_all(
        Resource::EndpointSlices,
        (0..services).map(|i| slice(i, ENDPOINTS_PER_SERVICE, topology.node_name())),
    );
    let kubeconfig = api.write_kubeconfig(topology.scratch_dir())?;
    let agent = Agent::start_with_kubeconfig(&topology, &kubeconfig, &[])?;

    let first_sync = wait_for_sync(&agent, 0)?;
    // Its read_ms and sync_ms split the figure between the source and the syncer.
    if let Some(line) = agent.synced_lines()?.first() {
        eprintln!("  first sync: {}", line.split(": ").nth(1).unwrap_or(line));
    }
    let lists_written = [Resource::Services, Resource::EndpointSlices]
        .map(|resource| api.list_written(resource))
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .context("the agent synced without listing")?;
    let listed = lists_written.into_iter().max().unwrap_or(first_sync);
    let initial_seconds = seconds_between(listed, first_sync);
    ensure!(
        first_sync_programmed(&agent, services)?,
        "the first sync did not program {services} services"
    );
    let rss_bytes = resident_bytes(agent.pid().context("the agent is not running")?)?;

    let mut latencies = Vec::with_capacity(changes);
    let mut counts = vec![ENDPOINTS_PER_SERVICE; services];
    for sample in 0..changes {
        let index = sample * 7919 % services;
        // One endpoint more, or back: every change writes a backend, a slot and a count.
        counts[index] = if counts[index] == ENDPOINTS_PER_SERVICE {
            ENDPOINTS_PER_SERVICE + 1
        } else {
            ENDPOINTS_PER_SERVICE
        };
        let count = counts[index];
        let syncs = agent.synced_lines()?.len();
        let resource_version = api.apply(
            Resource::EndpointSlices,
            slice(index, count, topology.node_name()),
        );
        let synced = wait_for_sync(&agent, syncs)?;
        let written = api
            .event_written(resource_version)
            .context("the change was synced before its event was written")?;
        latencies.push(seconds_between(written, synced) * 1e3);
    }
    agent.stop()?;
    latencies.sort_by(f64::total_cmp);
    Ok(ApiRun {
        services,
        initial_seconds,
        change_p50_ms: percentile(&latencies, 0.50),
        change_p99_ms: percentile(&latencies, 0.99),
        changes,
        rss_bytes,
    })
}

/// The API-mode section of the report.
pub fn markdown(runs: &[ApiRun]) -> String {
    let mut text = String::from(
        "\n## API-server source (stand-in API server, 10 endpoints per service)\n\n\
         Initial: from the moment both List responses were written to the moment the sync that \
         programmed them all finished (the agent's `synced` log line). Change: one EndpointSlice \
         gains or loses an endpoint; from the moment its watch event was written to the moment \
         the sync that wrote it finished.\n\n\
         | services | initial programming | endpoint change p50 | p99 | changes | agent RSS |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for run in runs {
        let _ = writeln!(
            text,
            "| {} | {:.3} s | {:.2} ms | {:.2} ms | {} | {:.1} MiB |",
            run.services,
            run.initial_seconds,
            run.change_p50_ms,
            run.change_p99_ms,
            run.changes,
            run.rss_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    text
}

/// Waits until the agent has logged more than `seen` "synced" lines; the time of the next one.
fn wait_for_sync(agent: &Agent, seen: usize) -> Result<SystemTime> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        if let Some(line) = agent.synced_lines()?.get(seen) {
            return log_time(line).with_context(|| format!("no timestamp in {line:?}"));
        }
        if Instant::now() >= deadline {
            bail!("no sync within {SYNC_TIMEOUT:?}");
        }
        thread::sleep(LOG_POLL_INTERVAL);
    }
}

fn first_sync_programmed(agent: &Agent, services: usize) -> Result<bool> {
    let lines = agent.synced_lines()?;
    Ok(lines
        .first()
        .is_some_and(|line| line.contains(&format!(" services={services} "))))
}

/// The RFC 3339 UTC timestamp that starts a log line (`2026-12-06T01:17:37.540757Z`).
fn log_time(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut date = date.split('-').map(|part| part.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.split(':').map(|part| part.parse::<u64>().ok());
    let (hour, minute, second) = (hms.next()??, hms.next()??, hms.next()??);
    let nanos = format!("{fraction:0<9}").get(..9)?.parse::<u32>().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = u64::try_from(era * 146_097 + day_of_era - 719_468).ok()?;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second;
    Some(SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos))
}

fn seconds_between(start: SystemTime, end: SystemTime) -> f64 {
    match end.duration_since(start) {
        Ok(elapsed) => elapsed.as_secs_f64(),
        Err(early) => -early.duration().as_secs_f64(),
    }
}

fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (quantile * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_are_read_as_utc() {
        let line = "2026-12-06T01:17:37.540757Z  INFO service_agent::run: synced services=1";
        let time = log_time(line).unwrap();
        assert_eq!(
            time.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
            Duration::new(1_796_519_857, 540_757_000)
        );
        assert_eq!(
            log_time("2024-02-29T00:00:00Z x"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_164_800))
        );
    }
}

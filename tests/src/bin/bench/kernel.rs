//! The kernel program alone: nanoseconds per packet of `pod_ingress` through BPF_PROG_TEST_RUN,
//! with the maps programmed by the real syncer for N services, for the four things a packet can
//! be: not for a service, the first packet of a flow (conntrack miss: pick a backend, write two
//! entries, DNAT), a packet of a known flow (conntrack hit, DNAT), and a reply (reverse NAT).
//! The measured service is also a NodePort, and `external_ingress` is timed for its two costliest
//! packets: an outside client's first packet (DNAT plus SNAT to the node with a claimed source
//! port) and the backend's reply (reverse NAT of both ends), and so is `external_xdp`, the XDP
//! program of the same links, for the same two packets (it passes them on: no redirect target
//! exists in a test run).
//!
//! Each packet is its own test run (repeat = 1): with `repeat` the kernel runs the program again
//! on the packet it has already rewritten, which would measure something else. The kernel times
//! each run with ktime, so the figure includes a constant ~20-30 ns of timer reads; the median
//! over many distinct flows is reported.

use std::{net::Ipv4Addr, time::SystemTime};

use anyhow::{Context, Result, ensure};
use aya::programs::{TestRun, TestRunOptions};
use service_agent::{
    dataplane::{Dataplane, EXTERNAL_INGRESS_PROGRAM, POD_INGRESS_PROGRAM, SocketLbScope},
    model::{
        DesiredState, Endpoint, Node, Protocol, Service, ServiceName, ServicePort, ServiceType,
        TrafficPolicy,
    },
    sync::Syncer,
};
use service_common::ConntrackLifetimes;

use crate::packets::{Packet, TCP, TCP_RST};

/// What one size measured: median nanoseconds per packet.
#[derive(Clone, Copy, Debug)]
pub struct PacketCosts {
    pub services: usize,
    pub passthrough_ns: f64,
    pub new_flow_ns: f64,
    pub established_ns: f64,
    pub reply_ns: f64,
    pub node_port_new_flow_ns: f64,
    pub node_port_reply_ns: f64,
    pub xdp_node_port_new_flow_ns: f64,
    pub xdp_node_port_reply_ns: f64,
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 9);
const FIRST_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The node's address, where the measured service's nodePort answers, and a client outside.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const NODE_PORT: u16 = 30080;
const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 10);
/// Another client outside, whose flows go through XDP.
const XDP_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 11);
/// Backends are drawn from a pool, as in a cluster where many services select the same pods.
const BACKEND_POOL: u32 = 30_000;
const FIRST_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 1);
const TC_ACT_OK: u32 = 0;
const XDP_PASS: u32 = 2;

/// Where a packet is run.
#[derive(Clone, Copy)]
enum Hook {
    Tc(&'static str),
    Xdp,
}

impl Hook {
    /// The verdict of a packet the program translated and lets go on.
    fn translated(self) -> u32 {
        match self {
            Hook::Tc(_) => TC_ACT_OK,
            Hook::Xdp => XDP_PASS,
        }
    }
}

/// One dataplane per size, each programmed with that many services (3 endpoints each); then
/// `flows` distinct flows to the service in the middle, alternating between the sizes packet by
/// packet so that every size sees the same machine conditions.
pub fn measure(sizes: &[usize], flows: u16) -> Result<Vec<PacketCosts>> {
    let mut beds = Vec::new();
    for &services in sizes {
        let mut dataplane = Dataplane::load_unpinned().context("cannot load the dataplane")?;
        let node = Node {
            ips: vec![NODE_IP],
            name: Some("bench-node".into()),
        };
        dataplane.maps.set_node(
            &node,
            SocketLbScope::NodeAndPods,
            ConntrackLifetimes::DEFAULT,
        )?;
        let mut syncer = Syncer::new(&dataplane.maps, node)?;
        syncer
            .sync(&desired_state(services), &mut dataplane.maps)
            .with_context(|| format!("cannot program {services} services"))?;
        let vip = offset(FIRST_VIP, services as u32 / 2);
        beds.push((dataplane, vip, Samples::default()));
    }
    for port in 10_000..10_000 + flows {
        for (dataplane, vip, samples) in &mut beds {
            samples.record(dataplane, *vip, port)?;
        }
    }
    Ok(sizes
        .iter()
        .zip(beds)
        .map(|(&services, (_, _, samples))| PacketCosts {
            services,
            passthrough_ns: median(samples.passthrough),
            new_flow_ns: median(samples.new_flow),
            established_ns: median(samples.established),
            reply_ns: median(samples.reply),
            node_port_new_flow_ns: median(samples.node_port_new_flow),
            node_port_reply_ns: median(samples.node_port_reply),
            xdp_node_port_new_flow_ns: median(samples.xdp_node_port_new_flow),
            xdp_node_port_reply_ns: median(samples.xdp_node_port_reply),
        })
        .collect())
}

#[derive(Default)]
struct Samples {
    passthrough: Vec<f64>,
    new_flow: Vec<f64>,
    established: Vec<f64>,
    reply: Vec<f64>,
    node_port_new_flow: Vec<f64>,
    node_port_reply: Vec<f64>,
    xdp_node_port_new_flow: Vec<f64>,
    xdp_node_port_reply: Vec<f64>,
}

impl Samples {
    /// The four kinds of packet for the flow from CLIENT:`port`, and the NodePort pair for the
    /// flows from EXTERNAL_CLIENT:`port` (TC) and XDP_CLIENT:`port` (XDP).
    fn record(&mut self, dataplane: &mut Dataplane, vip: Ipv4Addr, port: u16) -> Result<()> {
        self.record_pod_flow(dataplane, vip, port)?;
        let tc = Hook::Tc(EXTERNAL_INGRESS_PROGRAM);
        let (new_flow, reply) = node_port_flow(dataplane, tc, EXTERNAL_CLIENT, port)?;
        self.node_port_new_flow.push(new_flow);
        self.node_port_reply.push(reply);
        let (new_flow, reply) = node_port_flow(dataplane, Hook::Xdp, XDP_CLIENT, port)?;
        self.xdp_node_port_new_flow.push(new_flow);
        self.xdp_node_port_reply.push(reply);
        Ok(())
    }

    fn record_pod_flow(
        &mut self,
        dataplane: &mut Dataplane,
        vip: Ipv4Addr,
        port: u16,
    ) -> Result<()> {
        let mut run = |packet: &Packet| run(dataplane, Hook::Tc(POD_INGRESS_PROGRAM), packet);
        let elsewhere = Packet::new(TCP, (CLIENT, port), (Ipv4Addr::new(10, 244, 9, 9), 80));
        self.passthrough.push(run(&elsewhere)?.2);

        let request = Packet::new(TCP, (CLIENT, port), (vip, 80));
        let (verdict, out, ns) = run(&request)?;
        ensure!(verdict == TC_ACT_OK, "a new flow got verdict {verdict}");
        self.new_flow.push(ns);
        // The backend the program chose, from the rewritten destination.
        let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let backend_port = u16::from_be_bytes([out[36], out[37]]);
        ensure!(backend != vip, "the first packet was not translated");
        self.established.push(run(&request)?.2);

        let answer = Packet::new(TCP, (backend, backend_port), request.src);
        let (_, out, ns) = run(&answer)?;
        ensure!(
            out[26..30] == vip.octets(),
            "the reply was not translated back"
        );
        self.reply.push(ns);
        Ok(())
    }
}

/// An outside client's first packet to the nodePort and the backend's reply, through `hook`:
/// nanoseconds for each.
fn node_port_flow(
    dataplane: &mut Dataplane,
    hook: Hook,
    client: Ipv4Addr,
    port: u16,
) -> Result<(f64, f64)> {
    let request = Packet::new(TCP, (client, port), (NODE_IP, NODE_PORT));
    let (verdict, out, new_flow_ns) = run(dataplane, hook, &request)?;
    ensure!(
        verdict == hook.translated(),
        "a new NodePort flow got verdict {verdict}"
    );
    ensure!(
        out[26..30] == NODE_IP.octets(),
        "the NodePort flow was not SNATed to the node"
    );
    let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    let backend_port = u16::from_be_bytes([out[36], out[37]]);
    let snat_port = u16::from_be_bytes([out[34], out[35]]);

    let answer = Packet::new(TCP, (backend, backend_port), (NODE_IP, snat_port));
    let (_, out, reply_ns) = run(dataplane, hook, &answer)?;
    ensure!(
        out[30..34] == client.octets(),
        "the NodePort reply was not translated back to the client"
    );
    // The client resets the connection, which gives its SNAT port back: tens of thousands of
    // flows that stayed open would take most of the ports towards the three backends.
    run(dataplane, hook, &request.with_tcp_flags(TCP_RST))?;
    Ok((new_flow_ns, reply_ns))
}

/// Runs one packet through a program: its verdict, the output frame and the nanoseconds taken.
fn run(dataplane: &mut Dataplane, hook: Hook, packet: &Packet) -> Result<(u32, Vec<u8>, f64)> {
    let frame = packet.bytes();
    let mut out = vec![0u8; frame.len() + 64];
    let options = TestRunOptions {
        data_in: Some(&frame),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    };
    let result = match hook {
        Hook::Tc(program) => dataplane.tc_program(program).test_run(options)?,
        Hook::Xdp => dataplane.xdp_program().0.test_run(options)?,
    };
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out, result.duration.as_nanos() as f64))
}

fn desired_state(services: usize) -> DesiredState {
    let mut desired = DesiredState::default();
    for index in 0..services as u32 {
        let name = ServiceName {
            namespace: "bench".into(),
            name: format!("svc-{index}"),
        };
        let endpoints = (0..3)
            .map(|k| Endpoint {
                address: offset(FIRST_BACKEND, (3 * index + k) % BACKEND_POOL),
                port: 8000,
                ready: true,
                serving: true,
                terminating: false,
                node_name: None,
            })
            .collect();
        // Only the measured service is a NodePort: the nodePort range cannot hold one per
        // service at 100,000, and the lookup does not depend on how many there are.
        let measured = index == services as u32 / 2;
        let service = Service {
            name: name.clone(),
            service_type: if measured {
                ServiceType::NodePort
            } else {
                ServiceType::ClusterIP
            },
            cluster_ip: offset(FIRST_VIP, index),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            external_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                node_port: measured.then_some(NODE_PORT),
                endpoints,
            }],
            created: SystemTime::now(),
        };
        desired.services.insert(name, service.into());
    }
    desired
}

fn offset(base: Ipv4Addr, by: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + by)
}

pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

//! Packet fixtures through BPF_PROG_TEST_RUN: an input frame, the verdict and the exact output
//! frame the real TC programs (`pod_ingress`, `external_ingress`) must produce, with the maps
//! programmed by the real syncer from a desired model for a chosen node (as Katran's and Cilium's
//! BPF tests do).

mod packets;

use std::{collections::BTreeSet, net::Ipv4Addr, ops::RangeInclusive, time::SystemTime};

use aya::{
    maps::MapError,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use packets::{
    Icmp, Packet, TCP, TCP_ACK, TCP_FIN_ACK, TCP_RST, TCP_SYN, TCP_SYN_ACK, UDP,
    assert_checksums_valid, assert_icmp_checksums_valid, assert_icmp_error_checksums_valid,
    flow_of, icmp_frame, icmp_port_unreachable,
};
use service_agent::{
    dataplane::{Dataplane, EXTERNAL_INGRESS_PROGRAM, POD_INGRESS_PROGRAM, SocketLbScope},
    model::{
        DesiredState, Endpoint, Node, Protocol, Service, ServiceName, ServicePort, ServiceType,
        TrafficPolicy,
    },
    sync::Syncer,
};
use service_common::{
    CT_FIN_FROM_BACKEND, CT_FIN_FROM_CLIENT, CT_FORWARD, CT_RESET, CT_REVERSE, CT_SEEN_NON_SYN,
    CT_SNAT, ConntrackEntryV4, ConntrackKeyV4, ConntrackLifetimes, SNAT_PORT_COUNT,
    SNAT_PORT_FIRST, flow_closed,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// The programs, by where they are attached: links to this node's pods, links to the outside.
const POD: &str = POD_INGRESS_PROGRAM;
const EXTERNAL: &str = EXTERNAL_INGRESS_PROGRAM;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 0, 9), 40000);
const FRONTEND: (Ipv4Addr, u16) = (VIP, 80);
const DNS_FRONTEND: (Ipv4Addr, u16) = (VIP, 53);

/// The node under test and the traffic that reaches it from outside the cluster.
const NODE_NAME: &str = "node-a";
const OTHER_NODE_NAME: &str = "node-b";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const NODE_PORT: u16 = 30080;
const NODE_PORT_FRONTEND: (Ipv4Addr, u16) = (NODE_IP, NODE_PORT);
const EXTERNAL_CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(192, 168, 100, 10), 40000);
const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The source a pod sees on its own flows that a Service sent back to it (Cilium's choice).
const HAIRPIN_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
/// Source ports of SNATed flows.
const SNAT_PORTS: RangeInclusive<u16> = SNAT_PORT_FIRST..=SNAT_PORT_FIRST + (SNAT_PORT_COUNT - 1);

/// Where a SNATed flow went: (its backend, the source port the node gave it).
type SnatedFlow = ((Ipv4Addr, u16), u16);

fn backend(last_octet: u8) -> (Ipv4Addr, u16) {
    (Ipv4Addr::new(10, 244, 1, last_octet), 8080)
}

// --- The desired model ---------------------------------------------------------------------------

/// The node `node-a` with one address, where nodePorts answer and SNATed flows leave from.
fn node_a() -> Node {
    Node {
        ips: vec![NODE_IP],
        name: Some(NODE_NAME.into()),
    }
}

/// A ready endpoint at `backend` port 8080, on `node_name` when given.
fn endpoint(last_octet: u8, node_name: Option<&str>) -> Endpoint {
    Endpoint {
        address: backend(last_octet).0,
        port: backend(last_octet).1,
        ready: true,
        serving: true,
        terminating: false,
        node_name: node_name.map(Into::into),
    }
}

/// Ready endpoints at the given backends, node unknown.
fn endpoints(backends: &[u8]) -> Vec<Endpoint> {
    backends
        .iter()
        .map(|&octet| endpoint(octet, None))
        .collect()
}

fn service_port(name: &str, port: u16, protocol: Protocol, endpoints: &[Endpoint]) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        protocol,
        node_port: None,
        endpoints: endpoints.to_vec(),
    }
}

/// A ClusterIP Service `default/web` at VIP with policy Cluster: the base every test adjusts.
fn cluster_ip_service(ports: Vec<ServicePort>) -> Service {
    Service {
        name: ServiceName {
            namespace: "default".into(),
            name: "web".into(),
        },
        service_type: ServiceType::ClusterIP,
        cluster_ip: VIP,
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        external_traffic_policy: TrafficPolicy::Cluster,
        health_check_node_port: None,
        ports,
        created: SystemTime::now(),
    }
}

/// The ClusterIP service of the ClusterIP tests: TCP 80 and UDP 53 -> the backends' port 8080.
fn web_service(backends: &[u8]) -> Service {
    let endpoints = endpoints(backends);
    cluster_ip_service(vec![
        service_port("http", 80, Protocol::Tcp, &endpoints),
        service_port("dns", 53, Protocol::Udp, &endpoints),
    ])
}

/// A NodePort Service: TCP 80 at VIP, and NODE_PORT on every node IP, -> the endpoints.
fn node_port_service(policy: TrafficPolicy, endpoints: &[Endpoint]) -> Service {
    Service {
        service_type: ServiceType::NodePort,
        external_traffic_policy: policy,
        health_check_node_port: None,
        ..cluster_ip_service(vec![ServicePort {
            node_port: Some(NODE_PORT),
            ..service_port("http", 80, Protocol::Tcp, endpoints)
        }])
    }
}

/// The NodePort Service with policy Cluster, and the same nodePort for UDP too.
fn node_port_service_with_udp(endpoints: &[Endpoint]) -> Service {
    let mut service = node_port_service(TrafficPolicy::Cluster, endpoints);
    service.ports.push(ServicePort {
        node_port: Some(NODE_PORT),
        ..service_port("dns", 53, Protocol::Udp, endpoints)
    });
    service
}

/// A LoadBalancer Service: TCP 80 at VIP, LOAD_BALANCER_IP and EXTERNAL_IP, policy Cluster, no
/// nodePort (allocateLoadBalancerNodePorts: false).
fn load_balancer_service(backends: &[u8]) -> Service {
    Service {
        service_type: ServiceType::LoadBalancer,
        load_balancer_ips: vec![LOAD_BALANCER_IP],
        external_ips: vec![EXTERNAL_IP],
        ..cluster_ip_service(vec![service_port(
            "http",
            80,
            Protocol::Tcp,
            &endpoints(backends),
        )])
    }
}

fn desired(services: impl IntoIterator<Item = Service>) -> DesiredState {
    let mut desired = DesiredState::default();
    for service in services {
        desired
            .services
            .insert(service.name.clone(), service.into());
    }
    desired
}

// --- Running the programs ------------------------------------------------------------------------

/// One BPF_PROG_TEST_RUN of `program` on `frame`: (verdict, output frame). The output holds what
/// the program left in the packet whatever the verdict, a redirect included.
fn test_run(program: &SchedClassifier, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// A loaded dataplane for one node, with its maps programmed by the real syncer.
struct Fixture {
    dataplane: Dataplane,
    syncer: Syncer,
}

impl Fixture {
    /// The ClusterIP `web` service (TCP 80, UDP 53) with the given backends, on a node without
    /// name or address.
    fn new(backends: &[u8]) -> Self {
        let mut fixture = Self::on_node(Node::default());
        fixture.program(backends);
        fixture
    }

    /// A dataplane for `node` (its first IP becomes the SNAT address), with no service yet. Fails
    /// when not root (BPF needs CAP_BPF and CAP_NET_ADMIN).
    fn on_node(node: Node) -> Self {
        integration_tests::require_root("the packet fixtures");
        let mut dataplane = Dataplane::load_unpinned().expect("load the dataplane");
        dataplane
            .maps
            .set_node(
                &node,
                SocketLbScope::NodeAndPods,
                ConntrackLifetimes::DEFAULT,
            )
            .expect("write NODE_V4");
        let syncer = Syncer::new(&dataplane.maps, node).expect("read the maps");
        Self { dataplane, syncer }
    }

    /// A node with the given services.
    fn serving(node: Node, services: impl IntoIterator<Item = Service>) -> Self {
        let mut fixture = Self::on_node(node);
        fixture.sync(&desired(services));
        fixture
    }

    /// Reprograms the ClusterIP `web` service with other backends.
    fn program(&mut self, backends: &[u8]) {
        self.sync(&desired([web_service(backends)]));
    }

    fn sync(&mut self, desired: &DesiredState) {
        self.syncer
            .sync(desired, &mut self.dataplane.maps)
            .expect("program the maps");
    }

    /// Runs `pod_ingress` on `frame`: (verdict, output frame).
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(POD, frame)
    }

    /// Runs the named program ([`POD`], [`EXTERNAL`]) on `frame`: (verdict, output frame).
    fn run_on(&mut self, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        test_run(self.dataplane.tc_program(program), frame)
    }

    /// Asserts that `input` comes out unchanged with TC_ACT_OK.
    fn assert_passed_untouched(&mut self, input: &[u8]) {
        let (verdict, out) = self.run(input);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            out, input,
            "a packet that is not ours must pass byte for byte"
        );
    }

    /// Asserts that `program` turns `input` into exactly `expected`, with valid checksums.
    fn assert_translated(&mut self, program: &str, input: &Packet, expected: &Packet) {
        let (verdict, out) = self.run_on(program, &input.bytes());
        assert_eq!(verdict, TC_ACT_OK, "{input:?}");
        assert_eq!(out, expected.bytes(), "{input:?} must become {expected:?}");
        assert_checksums_valid(&out);
    }

    /// Asserts that pod_ingress translates the backend's `reply`, with TCP `flags`, to come from
    /// the frontend.
    fn assert_reply_from_frontend(&mut self, reply: &Packet, flags: u8) {
        self.assert_translated(
            POD,
            &reply.with_tcp_flags(flags),
            &reply.with_src(FRONTEND).with_tcp_flags(flags),
        );
    }

    /// Asserts that `program` drops `input`.
    fn assert_dropped(&mut self, program: &str, input: &Packet) {
        let (verdict, _) = self.run_on(program, &input.bytes());
        assert_eq!(verdict, TC_ACT_SHOT, "{input:?} must be dropped");
    }

    /// Asserts that `program` answers `input` with exactly the ICMP port unreachable a host would
    /// send, back out of the link it came in on.
    fn assert_refused(&mut self, program: &str, input: &Packet) {
        let (verdict, out) = self.run_on(program, &input.bytes());
        assert_eq!(verdict, TC_ACT_REDIRECT, "{input:?} must be refused");
        assert_eq!(out.len(), 70);
        assert_eq!(out, icmp_port_unreachable(input));
        assert_icmp_checksums_valid(&out);
    }

    /// The backend a client packet was sent to by `pod_ingress` (its destination after the
    /// program ran).
    fn backend_of(&mut self, packet: &Packet) -> (Ipv4Addr, u16) {
        let (verdict, out) = self.run(&packet.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_checksums_valid(&out);
        flow_of(&out).1
    }

    /// Runs `program` on a client's packet that must be DNATed to a backend and SNATed to the
    /// node (address NODE_IP, a port of SNAT_PORTS) with nothing else changed: (backend, port).
    fn backend_and_snat_port_of(&mut self, program: &str, request: &Packet) -> SnatedFlow {
        let (verdict, out) = self.run_on(program, &request.bytes());
        assert_dnated_and_snated(request, verdict, &out)
    }
}

/// Checks one run's result for a packet that must be DNATed to a backend and SNATed to the node:
/// returns (backend, SNAT port).
fn assert_dnated_and_snated(request: &Packet, verdict: u32, out: &[u8]) -> SnatedFlow {
    assert_eq!(verdict, TC_ACT_OK, "{request:?}");
    let ((source, snat_port), backend) = flow_of(out);
    assert_eq!(source, NODE_IP, "the source must be the node's address");
    assert!(
        SNAT_PORTS.contains(&snat_port),
        "SNAT port {snat_port} outside {SNAT_PORTS:?}"
    );
    assert_eq!(
        out,
        request
            .with_src((NODE_IP, snat_port))
            .with_dst(backend)
            .bytes(),
        "only the source and destination may change"
    );
    assert_checksums_valid(out);
    (backend, snat_port)
}

#[test]
fn tcp_to_clusterip_is_dnated_and_the_reply_reverse_natted() {
    let mut fx = Fixture::new(&[2]);
    let request = Packet::new(TCP, CLIENT, FRONTEND);
    let (verdict, out) = fx.run(&request.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, request.with_dst(backend(2)).bytes());
    assert_checksums_valid(&out);

    let reply = Packet::new(TCP, backend(2), CLIENT);
    let (verdict, out) = fx.run(&reply.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, reply.with_src(FRONTEND).bytes());
    assert_checksums_valid(&out);
}

#[test]
fn udp_to_clusterip_is_dnated_and_the_reply_reverse_natted() {
    let mut fx = Fixture::new(&[2]);
    let request = Packet::new(UDP, CLIENT, DNS_FRONTEND);
    let (verdict, out) = fx.run(&request.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, request.with_dst(backend(2)).bytes());
    assert_checksums_valid(&out);

    let reply = Packet::new(UDP, backend(2), CLIENT);
    let (verdict, out) = fx.run(&reply.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, reply.with_src(DNS_FRONTEND).bytes());
}

#[test]
fn udp_without_checksum_keeps_no_checksum() {
    let mut fx = Fixture::new(&[2]);
    let request = Packet {
        udp_without_checksum: true,
        ..Packet::new(UDP, CLIENT, DNS_FRONTEND)
    };
    let (verdict, out) = fx.run(&request.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, request.with_dst(backend(2)).bytes());
}

#[test]
fn ip_options_move_the_l4_header_and_are_kept() {
    let mut fx = Fixture::new(&[2]);
    let request = Packet {
        ip_options: vec![1, 1, 1, 0], // NOP, NOP, NOP, end of options
        ..Packet::new(TCP, CLIENT, FRONTEND)
    };
    let (verdict, out) = fx.run(&request.bytes());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, request.with_dst(backend(2)).bytes());
    assert_checksums_valid(&out);
}

#[test]
fn traffic_for_no_service_passes_untouched() {
    let mut fx = Fixture::new(&[2]);
    // Another address, the VIP on a port it does not serve, the right port with the wrong
    // protocol, and a reply-shaped packet of a flow that was never translated.
    fx.assert_passed_untouched(
        &Packet::new(TCP, CLIENT, (Ipv4Addr::new(10, 244, 1, 7), 80)).bytes(),
    );
    fx.assert_passed_untouched(&Packet::new(TCP, CLIENT, (VIP, 81)).bytes());
    fx.assert_passed_untouched(&Packet::new(UDP, CLIENT, FRONTEND).bytes());
    fx.assert_passed_untouched(&Packet::new(TCP, backend(2), (CLIENT.0, 40001)).bytes());
    // Not IPv4 at all: an ARP request and an IPv6 frame.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.resize(42, 0);
    fx.assert_passed_untouched(&arp);
    let mut ipv6 = Packet::new(TCP, CLIENT, FRONTEND).bytes();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    fx.assert_passed_untouched(&ipv6);
}

#[test]
fn packets_that_cannot_be_bounded_are_never_rewritten() {
    let mut fx = Fixture::new(&[2]);
    let full = Packet::new(TCP, CLIENT, FRONTEND).bytes();
    // Cut inside the TCP header: the ports are there, the checksum would be beyond the end.
    // (A cut inside the IPv4 header cannot be fed: BPF_PROG_TEST_RUN itself refuses an IPv4
    // frame shorter than an IPv4 header with EINVAL.)
    for len in [14 + 20 + 10, 14 + 20 + 17] {
        fx.assert_passed_untouched(&full[..len]);
    }
    // IHL claims 60 bytes of header, more than the packet holds.
    let mut options_beyond = full.clone();
    options_beyond[14] = 0x4f;
    fx.assert_passed_untouched(&options_beyond);
    // IHL below the minimum.
    let mut short_ihl = full.clone();
    short_ihl[14] = 0x44;
    fx.assert_passed_untouched(&short_ihl);
    // Total length too short to hold the TCP header it claims to carry.
    let mut short_total = full;
    short_total[16..18].copy_from_slice(&30u16.to_be_bytes());
    fx.assert_passed_untouched(&short_total);
}

#[test]
fn fragments_are_never_rewritten() {
    let mut fx = Fixture::new(&[2]);
    let first = Packet {
        fragment: 0x2000, // more fragments, offset 0: has the L4 header, but its siblings do not
        ..Packet::new(UDP, CLIENT, DNS_FRONTEND)
    };
    fx.assert_passed_untouched(&first.bytes());
    let later = Packet {
        fragment: 0x0003, // offset 24 bytes, last fragment: no L4 header at all
        ..Packet::new(UDP, CLIENT, DNS_FRONTEND)
    };
    fx.assert_passed_untouched(&later.bytes());
}

#[test]
fn a_flow_stays_on_its_backend_and_flows_spread_over_all_backends() {
    let mut fx = Fixture::new(&[2, 3, 4]);
    let flow = Packet::new(TCP, CLIENT, FRONTEND);
    let first = fx.backend_of(&flow);
    for _ in 0..20 {
        assert_eq!(
            fx.backend_of(&flow),
            first,
            "a tracked flow must keep its backend"
        );
    }
    let mut seen = BTreeSet::new();
    for port in 1..=60 {
        seen.insert(fx.backend_of(&flow.with_src((CLIENT.0, 50000 + port))));
    }
    let all: BTreeSet<_> = [backend(2), backend(3), backend(4)].into();
    assert_eq!(seen, all, "60 new flows must reach all 3 backends");
}

// kube-proxy REJECTs traffic to a Service without endpoints: a TCP client's connect() fails at
// once with ECONNREFUSED instead of timing out.
#[test]
fn tcp_to_a_service_without_endpoints_is_refused_with_port_unreachable() {
    let mut fx = Fixture::new(&[]);
    fx.assert_refused(POD, &Packet::new(TCP, CLIENT, FRONTEND));
}

// The same REJECT for UDP: the client's next receive fails with ECONNREFUSED. The answer is
// longer than the UDP datagram it replaces.
#[test]
fn udp_to_a_service_without_endpoints_is_refused_with_port_unreachable() {
    let mut fx = Fixture::new(&[]);
    fx.assert_refused(POD, &Packet::new(UDP, CLIENT, DNS_FRONTEND));
}

// A nodePort without endpoints is REJECTed for external clients too, from the node's address.
#[test]
fn an_external_client_of_a_node_port_without_endpoints_is_refused() {
    let mut fx = Fixture::serving(node_a(), [node_port_service(TrafficPolicy::Cluster, &[])]);
    fx.assert_refused(
        EXTERNAL,
        &Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND),
    );
}

// The refusal quotes a 20-byte header only: a packet with IP options is dropped instead (the
// client times out, as if the REJECT were a DROP).
#[test]
fn a_packet_with_ip_options_to_a_service_without_endpoints_is_dropped() {
    let mut fx = Fixture::new(&[]);
    let request = Packet {
        ip_options: vec![1, 1, 1, 0],
        ..Packet::new(TCP, CLIENT, FRONTEND)
    };
    fx.assert_dropped(POD, &request);
}

#[test]
fn a_flow_whose_backend_was_removed_moves_to_a_remaining_one() {
    let mut fx = Fixture::new(&[2]);
    let flow = Packet::new(UDP, CLIENT, DNS_FRONTEND);
    assert_eq!(fx.backend_of(&flow), backend(2));
    fx.program(&[3]);
    assert_eq!(
        fx.backend_of(&flow),
        backend(3),
        "stale conntrack must not pin a dead backend"
    );
    // And the reply from the new backend is translated back.
    let reply = Packet::new(UDP, backend(3), CLIENT);
    let (_, out) = fx.run(&reply.bytes());
    assert_eq!(out, reply.with_src(DNS_FRONTEND).bytes());
}

// NodePort, externalTrafficPolicy Cluster: a client outside the cluster reaches any endpoint
// through any node's IP:nodePort. The node SNATs the client to its own address (kube-proxy's
// MASQUERADE) so that the backend's reply comes back through it, whether the backend is on
// another node (the reply enters through an external link) or on this one (through a pod link).
#[test]
fn node_port_from_outside_is_dnated_and_snated_and_the_reply_restored() {
    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(
            TrafficPolicy::Cluster,
            &endpoints(&[2, 3, 4]),
        )],
    );
    let request = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    let (chosen, snat_port) = fx.backend_and_snat_port_of(EXTERNAL, &request);
    assert!([backend(2), backend(3), backend(4)].contains(&chosen));

    let reply = Packet::new(TCP, chosen, (NODE_IP, snat_port));
    let restored = Packet::new(TCP, NODE_PORT_FRONTEND, EXTERNAL_CLIENT);
    fx.assert_translated(EXTERNAL, &reply, &restored); // a backend on another node
    fx.assert_translated(POD, &reply, &restored); // a backend on this node

    // The flow's next packets keep its backend and its source port.
    for _ in 0..5 {
        assert_eq!(
            fx.backend_and_snat_port_of(EXTERNAL, &request),
            (chosen, snat_port)
        );
    }
}

// Many external clients through one node share the node's address: no two flows to the same
// backend may get the same source port, or replies would reach the wrong client. Two threads
// open flows at the same time (on both CPUs when the scheduler allows) to exercise the claim of
// a port by one flow only; then every reply must come back to its own client.
#[test]
fn concurrent_node_port_flows_get_distinct_snat_ports() {
    let mut fx = Fixture::serving(
        node_a(),
        // One backend: every flow competes for the same (backend, port) tuples.
        [node_port_service(TrafficPolicy::Cluster, &endpoints(&[2]))],
    );
    let client_ports: Vec<u16> = (0..200).map(|i| 20000 + i).collect();
    let program = &*fx.dataplane.tc_program(EXTERNAL);
    let flows: Vec<(u16, SnatedFlow)> = std::thread::scope(|scope| {
        let workers: Vec<_> = client_ports
            .chunks(client_ports.len() / 2)
            .map(|ports| {
                scope.spawn(move || {
                    ports
                        .iter()
                        .map(|&port| {
                            let request =
                                Packet::new(TCP, (EXTERNAL_CLIENT.0, port), NODE_PORT_FRONTEND);
                            let (verdict, out) = test_run(program, &request.bytes());
                            (port, assert_dnated_and_snated(&request, verdict, &out))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| worker.join().expect("a worker panicked"))
            .collect()
    });
    let tuples: BTreeSet<_> = flows.iter().map(|(_, tuple)| *tuple).collect();
    assert_eq!(
        tuples.len(),
        client_ports.len(),
        "two flows share a (backend, SNAT port)"
    );
    for (client_port, (backend, snat_port)) in flows {
        fx.assert_translated(
            EXTERNAL,
            &Packet::new(TCP, backend, (NODE_IP, snat_port)),
            &Packet::new(TCP, NODE_PORT_FRONTEND, (EXTERNAL_CLIENT.0, client_port)),
        );
    }
}

/// The conntrack key a program looks `packet` up by: [`CT_FORWARD`] for a client's packet,
/// [`CT_REVERSE`] for a backend's.
fn conntrack_key(packet: &Packet, direction: u8) -> ConntrackKeyV4 {
    ConntrackKeyV4 {
        src_address: u32::from_ne_bytes(packet.src.0.octets()),
        dst_address: u32::from_ne_bytes(packet.dst.0.octets()),
        src_port: packet.src.1.to_be(),
        dst_port: packet.dst.1.to_be(),
        protocol: packet.protocol,
        direction,
        _pad: 0,
    }
}

impl Fixture {
    /// Removes the conntrack entry `packet` would match, as LRU eviction does, and returns it.
    fn evict(&mut self, packet: &Packet, direction: u8) -> ConntrackEntryV4 {
        let key = conntrack_key(packet, direction);
        let conntrack = &mut self.dataplane.maps.conntrack;
        let entry = conntrack.get(&key, 0).expect("the entry to evict");
        conntrack.remove(&key).expect("evicting a conntrack entry");
        entry
    }

    /// The conntrack entry `packet` would match.
    fn entry(&self, packet: &Packet, direction: u8) -> ConntrackEntryV4 {
        self.dataplane
            .maps
            .conntrack
            .get(&conntrack_key(packet, direction), 0)
            .unwrap_or_else(|err| panic!("the entry of {packet:?}: {err}"))
    }

    /// Whether there is a conntrack entry `packet` would match.
    fn has_entry(&self, packet: &Packet, direction: u8) -> bool {
        match self
            .dataplane
            .maps
            .conntrack
            .get(&conntrack_key(packet, direction), 0)
        {
            Ok(_) => true,
            Err(MapError::KeyNotFound) => false,
            Err(err) => panic!("reading the entry of {packet:?}: {err}"),
        }
    }

    /// Makes the conntrack entry `packet` would match `seconds` older, as if its flow had been
    /// silent that long, and returns it as it was.
    fn age(&mut self, packet: &Packet, direction: u8, seconds: u32) -> ConntrackEntryV4 {
        let entry = self.entry(packet, direction);
        let aged = ConntrackEntryV4 {
            last_seen: entry.last_seen.checked_sub(seconds).unwrap_or_else(|| {
                panic!("the machine must have been up for more than {seconds} s")
            }),
            ..entry
        };
        self.dataplane
            .maps
            .conntrack
            .insert(conntrack_key(packet, direction), aged, 0)
            .expect("ageing a conntrack entry");
        entry
    }
}

// The two entries of a flow live in one LRU map that evicts them one at a time. A flow that
// lost its reverse entry must get it back from its next packet, keeping its port.
#[test]
fn a_snated_flow_whose_reverse_entry_was_evicted_keeps_its_port_and_replies() {
    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(
            TrafficPolicy::Cluster,
            &endpoints(&[2, 3, 4]),
        )],
    );
    let request = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    let (chosen, snat_port) = fx.backend_and_snat_port_of(EXTERNAL, &request);
    let reply = Packet::new(TCP, chosen, (NODE_IP, snat_port));
    fx.evict(&reply, CT_REVERSE);

    assert_eq!(
        fx.backend_and_snat_port_of(EXTERNAL, &request),
        (chosen, snat_port)
    );
    fx.assert_translated(
        EXTERNAL,
        &reply,
        &Packet::new(TCP, NODE_PORT_FRONTEND, EXTERNAL_CLIENT),
    );
}

// After its reverse entry was evicted, a flow's SNAT port looks free, and another client may
// get it. The first flow must then move to another port: two flows sharing one (backend, node
// port) tuple would get each other's replies.
#[test]
fn a_snat_port_taken_over_after_eviction_is_never_shared() {
    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(TrafficPolicy::Cluster, &endpoints(&[2]))],
    );
    let request = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    let (chosen, snat_port) = fx.backend_and_snat_port_of(EXTERNAL, &request);
    let reply = Packet::new(TCP, chosen, (NODE_IP, snat_port));
    // Another client claims the port, as its first packet would have.
    let other_client: (Ipv4Addr, u16) = (Ipv4Addr::new(192, 168, 100, 11), 50000);
    let mut taken = fx.evict(&reply, CT_REVERSE);
    taken.nat_address = u32::from_ne_bytes(other_client.0.octets());
    taken.nat_port = other_client.1.to_be();
    fx.dataplane
        .maps
        .conntrack
        .insert(conntrack_key(&reply, CT_REVERSE), taken, 0)
        .expect("claiming the port for another client");

    let (moved_to, new_port) = fx.backend_and_snat_port_of(EXTERNAL, &request);
    assert_eq!(moved_to, chosen);
    assert_ne!(
        new_port, snat_port,
        "two flows share a (backend, SNAT port)"
    );
    fx.assert_translated(
        EXTERNAL,
        &reply,
        &Packet::new(TCP, NODE_PORT_FRONTEND, other_client),
    );
    fx.assert_translated(
        EXTERNAL,
        &Packet::new(TCP, chosen, (NODE_IP, new_port)),
        &Packet::new(TCP, NODE_PORT_FRONTEND, EXTERNAL_CLIENT),
    );
}

// A flow whose forward entry was evicted while replies kept its reverse entry fresh (mostly
// one-way traffic, a download) gets it back from the next reply: the client's next packet stays
// on its backend and its port instead of opening a new flow.
#[test]
fn a_reply_restores_an_evicted_forward_entry() {
    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(
            TrafficPolicy::Cluster,
            &endpoints(&[2, 3, 4]),
        )],
    );
    let request = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    let (chosen, snat_port) = fx.backend_and_snat_port_of(EXTERNAL, &request);
    fx.evict(&request, CT_FORWARD);

    fx.assert_translated(
        EXTERNAL,
        &Packet::new(TCP, chosen, (NODE_IP, snat_port)),
        &Packet::new(TCP, NODE_PORT_FRONTEND, EXTERNAL_CLIENT),
    );
    assert_eq!(
        fx.backend_and_snat_port_of(EXTERNAL, &request),
        (chosen, snat_port)
    );

    // The same for a pod's flow to a ClusterIP, which is not SNATed.
    fx.sync(&desired([web_service(&[2, 3, 4])]));
    let request = Packet::new(TCP, CLIENT, FRONTEND);
    let chosen = fx.backend_of(&request);
    fx.evict(&request, CT_FORWARD);
    fx.assert_translated(
        POD,
        &Packet::new(TCP, chosen, CLIENT),
        &Packet::new(TCP, FRONTEND, CLIENT),
    );
    for _ in 0..8 {
        assert_eq!(fx.backend_of(&request), chosen);
    }
}

// A SNATed flow whose TCP connection is over (FIN both ways, or RST) gives its port back at
// once: at a high connection rate the ports would otherwise run out long before LRU eviction
// frees them. A live flow's port is never given to another. A CPU takes over only ports of its
// own share (offset modulo the CPU count), so that two never take over the same one; the test
// runs on CPU 0.
#[test]
fn the_snat_ports_of_closed_flows_are_reused_and_those_of_live_ones_never() {
    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(TrafficPolicy::Cluster, &endpoints(&[2]))],
    );
    run_on_cpu_0();
    let request = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    let (chosen, snat_port) = fx.backend_and_snat_port_of(EXTERNAL, &request);

    // The flow closes: the client's FIN, the backend's FIN.
    let reply = Packet::new(TCP, chosen, (NODE_IP, snat_port));
    fx.assert_translated(
        EXTERNAL,
        &request.with_tcp_flags(TCP_FIN_ACK),
        &request
            .with_tcp_flags(TCP_FIN_ACK)
            .with_src((NODE_IP, snat_port))
            .with_dst(chosen),
    );
    fx.assert_translated(
        EXTERNAL,
        &reply.with_tcp_flags(TCP_FIN_ACK),
        &Packet::new(TCP, NODE_PORT_FRONTEND, EXTERNAL_CLIENT).with_tcp_flags(TCP_FIN_ACK),
    );
    let closed = fx
        .dataplane
        .maps
        .conntrack
        .get(&conntrack_key(&reply, CT_REVERSE), 0)
        .expect("the closed flow's reverse entry");
    assert!(
        flow_closed(closed.flags),
        "both FINs must be recorded: flags {:#x}",
        closed.flags
    );

    // The client reuses its port for a new connection: its SYN is a new flow, balanced afresh
    // on a port of its own, since the closed flow keeps its port a moment longer (a late ACK
    // may still come).
    let (rebalanced_to, new_port) =
        fx.backend_and_snat_port_of(EXTERNAL, &request.with_tcp_flags(TCP_SYN));
    assert_eq!(rebalanced_to, chosen, "there is one backend");
    assert_ne!(
        new_port, snat_port,
        "a port that closed a moment ago was reused"
    );
    let new_reply = Packet::new(TCP, chosen, (NODE_IP, new_port));
    assert!(!flow_closed(fx.entry(&new_reply, CT_REVERSE).flags));
    assert!(!flow_closed(fx.entry(&request, CT_FORWARD).flags));
    assert!(flow_closed(fx.entry(&reply, CT_REVERSE).flags));

    // Random probes would seldom find one free port among thousands, so every port is given to
    // one holder: live flows of another client, or flows that closed a moment ago (a late ACK
    // may still come), leave a new flow nothing, and it is dropped; flows reset more than a
    // second ago leave it a port of CPU 0's share.
    let live = ConntrackEntryV4 {
        nat_address: u32::from_ne_bytes([192, 168, 100, 11]),
        flags: CT_SNAT,
        ..closed
    };
    fx.hold_every_snat_port(TCP, chosen, live);
    let newcomer = Packet::new(TCP, (EXTERNAL_CLIENT.0, 40001), NODE_PORT_FRONTEND);
    fx.assert_dropped(EXTERNAL, &newcomer);
    let just_reset = ConntrackEntryV4 {
        flags: CT_SNAT | CT_RESET,
        ..live
    };
    fx.hold_every_snat_port(TCP, chosen, just_reset);
    fx.assert_dropped(EXTERNAL, &newcomer);

    let reset = ConntrackEntryV4 {
        last_seen: closed.last_seen - 2,
        ..just_reset
    };
    fx.hold_every_snat_port(TCP, chosen, reset);
    let newcomer = Packet::new(TCP, (EXTERNAL_CLIENT.0, 40002), NODE_PORT_FRONTEND);
    let (_, port) = fx.backend_and_snat_port_of(EXTERNAL, &newcomer);
    fx.assert_in_cpu_0_share(port);
    fx.assert_translated(
        EXTERNAL,
        &Packet::new(TCP, chosen, (NODE_IP, port)).with_tcp_flags(TCP_RST),
        &Packet::new(TCP, NODE_PORT_FRONTEND, newcomer.src).with_tcp_flags(TCP_RST),
    );
}

// A flow nobody closes (UDP, a TCP peer that vanished) gives its port up once it has been idle
// past its protocol's limit: 60 s for UDP. Every port is held as above, by flows seen just now,
// then by flows last seen 61 s ago.
#[test]
fn the_snat_ports_of_idle_udp_flows_are_reused_after_a_minute() {
    let backends = endpoints(&[2]);
    let mut fx = Fixture::serving(node_a(), [node_port_service_with_udp(&backends)]);
    run_on_cpu_0();
    let request = Packet::new(UDP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    let (chosen, snat_port) = fx.backend_and_snat_port_of(EXTERNAL, &request);
    let recent = fx
        .dataplane
        .maps
        .conntrack
        .get(
            &conntrack_key(&Packet::new(UDP, chosen, (NODE_IP, snat_port)), CT_REVERSE),
            0,
        )
        .expect("the flow's reverse entry");
    let last_seen_before_limit = recent
        .last_seen
        .checked_sub(ConntrackLifetimes::DEFAULT.other + 1)
        .expect("the machine must have been up for more than a minute");

    let live = ConntrackEntryV4 {
        nat_address: u32::from_ne_bytes([192, 168, 100, 11]),
        ..recent
    };
    fx.hold_every_snat_port(UDP, chosen, live);
    let newcomer = Packet::new(UDP, (EXTERNAL_CLIENT.0, 40001), NODE_PORT_FRONTEND);
    fx.assert_dropped(EXTERNAL, &newcomer);

    let idle = ConntrackEntryV4 {
        last_seen: last_seen_before_limit,
        ..live
    };
    fx.hold_every_snat_port(UDP, chosen, idle);
    let (_, port) = fx.backend_and_snat_port_of(EXTERNAL, &newcomer);
    fx.assert_in_cpu_0_share(port);
    fx.assert_translated(
        EXTERNAL,
        &Packet::new(UDP, chosen, (NODE_IP, port)),
        &Packet::new(UDP, NODE_PORT_FRONTEND, newcomer.src),
    );
}

impl Fixture {
    /// Gives every SNAT port towards `backend` to a flow with reverse entry `holder`.
    fn hold_every_snat_port(
        &mut self,
        protocol: u8,
        backend: (Ipv4Addr, u16),
        holder: ConntrackEntryV4,
    ) {
        for port in SNAT_PORTS {
            let reply = Packet::new(protocol, backend, (NODE_IP, port));
            self.dataplane
                .maps
                .conntrack
                .insert(conntrack_key(&reply, CT_REVERSE), holder, 0)
                .expect("a reverse entry");
        }
    }

    /// Asserts that a port taken over on CPU 0 is one of CPU 0's share.
    fn assert_in_cpu_0_share(&mut self, port: u16) {
        let cpus = self.dataplane.maps.node.get(&0, 0).expect("NODE_V4").cpus;
        assert_eq!(
            u32::from(port - SNAT_PORT_FIRST) % cpus,
            0,
            "CPU 0 took over port {port}, outside its share"
        );
    }
}

/// Pins the calling thread to CPU 0: BPF_PROG_TEST_RUN runs the program on the caller's CPU.
fn run_on_cpu_0() {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

// --- Conntrack ageing ----------------------------------------------------------------------------
//
// Both entries of a flow record when it last carried a packet and how far its TCP connection got.
// A flow past its lifetime, or a bare SYN on a closed or established one, is a new flow; a reply
// on an expired reverse entry, or a SYN-ACK on a closed one, belongs to a connection this node
// did not balance.

/// A second Service, `default/keeper` (TCP 80 at 10.96.0.11), whose endpoint is backend 2: the
/// backend stays in the maps, and its TCP flows in conntrack, after it leaves `web`. A flow that
/// kept its entry would still reach it; one balanced afresh cannot.
fn keeper_of_backend_2() -> Service {
    Service {
        name: ServiceName {
            namespace: "default".into(),
            name: "keeper".into(),
        },
        cluster_ip: Ipv4Addr::new(10, 96, 0, 11),
        ..cluster_ip_service(vec![service_port(
            "http",
            80,
            Protocol::Tcp,
            &endpoints(&[2]),
        )])
    }
}

impl Fixture {
    /// `web` on backend 2, with backend 2 kept by [`keeper_of_backend_2`].
    fn web_on_backend_2() -> Self {
        Self::serving(Node::default(), [web_service(&[2]), keeper_of_backend_2()])
    }

    /// Moves `web` from backend 2 to backend 3; backend 2 stays (and its TCP flows' entries).
    fn move_web_to_backend_3(&mut self) {
        self.sync(&desired([web_service(&[3]), keeper_of_backend_2()]));
    }

    /// Asserts that pod_ingress sends the client's `packet` to `backend`, changing nothing else.
    fn assert_sent_to(&mut self, packet: &Packet, backend: (Ipv4Addr, u16), why: &str) {
        let (verdict, out) = self.run(&packet.bytes());
        assert_eq!(verdict, TC_ACT_OK, "{packet:?}");
        assert_eq!(
            flow_of(&out).1,
            backend,
            "{packet:?} went to the wrong backend: {why}"
        );
        assert_eq!(out, packet.with_dst(backend).bytes());
        assert_checksums_valid(&out);
    }
}

// The client's TCP connection to the ClusterIP closes (FIN both ways) and, while backend 2 has
// left the Service, the client reuses its port for a new connection. Its SYN is a new flow: it
// goes to a backend the Service has now, with new conntrack entries, instead of following the
// closed flow's entry to backend 2.
#[test]
fn a_syn_on_a_closed_flow_is_balanced_afresh() {
    let mut fx = Fixture::web_on_backend_2();
    let request = Packet::new(TCP, CLIENT, FRONTEND);
    let reply = Packet::new(TCP, backend(2), CLIENT);
    fx.assert_sent_to(&request, backend(2), "the only backend");
    fx.assert_reply_from_frontend(&reply, TCP_SYN_ACK);
    fx.assert_sent_to(
        &request.with_tcp_flags(TCP_FIN_ACK),
        backend(2),
        "a closing flow keeps its backend",
    );
    fx.assert_reply_from_frontend(&reply, TCP_FIN_ACK);
    assert!(flow_closed(fx.entry(&request, CT_FORWARD).flags));
    fx.move_web_to_backend_3();

    // A late ACK of the closed flow still finds its backend.
    fx.assert_sent_to(
        &request.with_tcp_flags(TCP_ACK),
        backend(2),
        "a closed flow's late ACK",
    );
    fx.assert_sent_to(
        &request.with_tcp_flags(TCP_SYN),
        backend(3),
        "a SYN on a closed flow is a new flow",
    );
    let forward = fx.entry(&request, CT_FORWARD);
    assert_eq!(
        forward.flags, 0,
        "the new flow's forward entry: {forward:?}"
    );
    let reverse = fx.entry(&Packet::new(TCP, backend(3), CLIENT), CT_REVERSE);
    assert_eq!(
        (reverse.backend_id, reverse.flags),
        (forward.backend_id, 0),
        "the new flow's reverse entry: {reverse:?}"
    );
    fx.assert_translated(
        POD,
        &Packet::new(TCP, backend(3), CLIENT),
        &Packet::new(TCP, FRONTEND, CLIENT),
    );
}

// A bare SYN on a flow whose handshake completed is a new connection on the same tuple: the old
// one died without this node seeing it end (the client's host rebooted, a FIN was lost). Other
// packets of the established flow keep its backend, even one that left the Service.
#[test]
fn a_bare_syn_on_an_established_flow_is_balanced_afresh() {
    let mut fx = Fixture::web_on_backend_2();
    let request = Packet::new(TCP, CLIENT, FRONTEND);
    let reply = Packet::new(TCP, backend(2), CLIENT);
    fx.assert_sent_to(&request, backend(2), "the only backend");
    fx.assert_reply_from_frontend(&reply, TCP_SYN_ACK);
    fx.assert_sent_to(
        &request.with_tcp_flags(TCP_ACK),
        backend(2),
        "the handshake's last ACK",
    );
    fx.move_web_to_backend_3();

    fx.assert_sent_to(
        &request.with_tcp_flags(TCP_ACK),
        backend(2),
        "an established flow keeps its backend",
    );
    // Only a bare SYN opens a connection: a SYN-ACK from the client (a simultaneous open) is
    // part of the flow.
    fx.assert_sent_to(
        &request.with_tcp_flags(TCP_SYN_ACK),
        backend(2),
        "a client's SYN-ACK is no new connection",
    );
    fx.assert_sent_to(
        &request.with_tcp_flags(TCP_SYN),
        backend(3),
        "a bare SYN on an established flow is a new flow",
    );
}

// Until the handshake completes, a SYN is a retransmission of the first one (the SYN or the
// SYN-ACK was lost): it stays on the flow's backend, even one that left the Service meanwhile.
#[test]
fn a_retransmitted_syn_keeps_its_backend_before_the_handshake_completes() {
    let mut fx = Fixture::web_on_backend_2();
    let request = Packet::new(TCP, CLIENT, FRONTEND);
    let reply = Packet::new(TCP, backend(2), CLIENT);
    fx.assert_sent_to(&request, backend(2), "the only backend");
    fx.move_web_to_backend_3();
    fx.assert_sent_to(&request, backend(2), "a retransmitted SYN");
    fx.assert_reply_from_frontend(&reply, TCP_SYN_ACK);
    fx.assert_sent_to(&request, backend(2), "a SYN retransmitted after a SYN-ACK");
    fx.assert_sent_to(
        &request.with_tcp_flags(TCP_ACK),
        backend(2),
        "the handshake's last ACK",
    );
}

// A flow silent for longer than its lifetime is over: its next packet is a new flow. The
// lifetimes are the agent's (NODE_V4): here 100 s for established TCP instead of 6 h, so a flow
// silent for 99 s goes on and one silent for 101 s starts over.
#[test]
fn an_expired_forward_entry_is_balanced_afresh_with_the_agent_s_lifetimes() {
    let mut fx = Fixture::web_on_backend_2();
    let lifetimes = ConntrackLifetimes {
        tcp_established: 100,
        ..ConntrackLifetimes::DEFAULT
    };
    fx.dataplane
        .maps
        .set_node(&Node::default(), SocketLbScope::NodeAndPods, lifetimes)
        .expect("write NODE_V4");
    let request = Packet::new(TCP, CLIENT, FRONTEND).with_tcp_flags(TCP_ACK);
    fx.assert_sent_to(&request, backend(2), "the only backend");
    fx.move_web_to_backend_3();

    let before = fx.age(&request, CT_FORWARD, 99);
    fx.assert_sent_to(
        &request,
        backend(2),
        "a flow silent for 99 s of 100 goes on",
    );
    assert!(
        fx.entry(&request, CT_FORWARD).last_seen >= before.last_seen,
        "the packet must refresh the entry"
    );
    fx.age(&request, CT_FORWARD, 101);
    fx.assert_sent_to(
        &request,
        backend(3),
        "a flow silent for 101 s of 100 is over",
    );
    let forward = fx.entry(&request, CT_FORWARD);
    let reverse = fx.entry(&Packet::new(TCP, backend(3), CLIENT), CT_REVERSE);
    assert_eq!(forward.backend_id, reverse.backend_id);
    assert_eq!(
        forward.last_seen, reverse.last_seen,
        "the new flow's entries are fresh"
    );
}

// Each packet refreshes both entries of its flow, whichever direction it goes: a flow whose
// traffic is all one way (a download, a stream of UDP datagrams) stays alive in both, and both
// know its TCP state.
#[test]
fn a_packet_in_either_direction_refreshes_both_entries() {
    let mut fx = Fixture::new(&[2]);
    let request = Packet::new(TCP, CLIENT, FRONTEND);
    let reply = Packet::new(TCP, backend(2), CLIENT);
    fx.assert_sent_to(&request, backend(2), "the only backend");

    // Replies refresh the forward entry and tell it the handshake completed, then the FIN.
    let aged = fx.age(&request, CT_FORWARD, 30);
    fx.assert_reply_from_frontend(&reply, TCP_ACK);
    let forward = fx.entry(&request, CT_FORWARD);
    assert!(
        forward.last_seen >= aged.last_seen,
        "{forward:?}, aged from {aged:?}"
    );
    assert_eq!(forward.last_seen, fx.entry(&reply, CT_REVERSE).last_seen);
    assert_eq!(forward.flags, CT_SEEN_NON_SYN, "{forward:?}");
    fx.assert_reply_from_frontend(&reply, TCP_FIN_ACK);
    assert_eq!(
        fx.entry(&request, CT_FORWARD).flags,
        CT_SEEN_NON_SYN | CT_FIN_FROM_BACKEND
    );

    // Client packets refresh the reverse entry and tell it the client's FIN.
    let aged = fx.age(&reply, CT_REVERSE, 30);
    fx.assert_sent_to(
        &request.with_tcp_flags(TCP_FIN_ACK),
        backend(2),
        "a closing flow keeps its backend",
    );
    let reverse = fx.entry(&reply, CT_REVERSE);
    assert!(
        reverse.last_seen >= aged.last_seen,
        "{reverse:?}, aged from {aged:?}"
    );
    assert_eq!(reverse.last_seen, fx.entry(&request, CT_FORWARD).last_seen);
    assert_eq!(
        reverse.flags,
        CT_SEEN_NON_SYN | CT_FIN_FROM_BACKEND | CT_FIN_FROM_CLIENT
    );
}

// A pod's UDP flow to a ClusterIP left a reverse entry (backend -> client port). After its
// lifetime of silence (the agent's: 30 s here instead of 60) the flow is over; the client then
// talks to the backend pod directly from the same port. The pod's answers must reach it as they
// are, not rewritten to come from the ClusterIP; the dead entry is deleted on the way.
#[test]
fn an_expired_reverse_entry_is_not_applied() {
    let mut fx = Fixture::new(&[2]);
    let lifetimes = ConntrackLifetimes {
        other: 30,
        ..ConntrackLifetimes::DEFAULT
    };
    fx.dataplane
        .maps
        .set_node(&Node::default(), SocketLbScope::NodeAndPods, lifetimes)
        .expect("write NODE_V4");
    let request = Packet::new(UDP, CLIENT, DNS_FRONTEND);
    assert_eq!(fx.backend_of(&request), backend(2));
    let reply = Packet::new(UDP, backend(2), CLIENT);
    fx.age(&reply, CT_REVERSE, 29);
    fx.assert_translated(POD, &reply, &reply.with_src(DNS_FRONTEND));
    fx.age(&reply, CT_REVERSE, 31);
    fx.assert_passed_untouched(&reply.bytes());
    assert!(
        !fx.has_entry(&reply, CT_REVERSE),
        "the expired entry must be deleted"
    );
    fx.assert_passed_untouched(&reply.bytes());
}

// After the client's connection through the ClusterIP closed, the client connects to the backend
// pod directly from the same port. The pod's SYN-ACK finds the closed flow's reverse entry: it
// is no reply of that flow and must pass as it is, and so must the rest of the direct
// connection's packets (the entry is deleted).
#[test]
fn a_syn_ack_on_a_closed_flow_is_not_translated() {
    let mut fx = Fixture::new(&[2]);
    let request = Packet::new(TCP, CLIENT, FRONTEND);
    let reply = Packet::new(TCP, backend(2), CLIENT);
    fx.assert_sent_to(&request, backend(2), "the only backend");
    fx.assert_sent_to(
        &request.with_tcp_flags(TCP_FIN_ACK),
        backend(2),
        "a closing flow keeps its backend",
    );
    fx.assert_reply_from_frontend(&reply, TCP_FIN_ACK);

    // The direct connection: the client's SYN to the pod IP, the pod's SYN-ACK and ACK.
    fx.assert_passed_untouched(&Packet::new(TCP, CLIENT, backend(2)).bytes());
    fx.assert_passed_untouched(&reply.with_tcp_flags(TCP_SYN_ACK).bytes());
    assert!(
        !fx.has_entry(&reply, CT_REVERSE),
        "the closed flow's entry must be deleted"
    );
    fx.assert_passed_untouched(&reply.with_tcp_flags(TCP_ACK).bytes());
}

// A pod talking to nodeIP:nodePort is DNATed only: its address is already routable in the
// cluster, and the reply comes back through this node anyway.
#[test]
fn node_port_from_a_pod_is_dnated_only() {
    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(TrafficPolicy::Cluster, &endpoints(&[2]))],
    );
    let request = Packet::new(TCP, CLIENT, NODE_PORT_FRONTEND);
    fx.assert_translated(POD, &request, &request.with_dst(backend(2)));
    let reply = Packet::new(TCP, backend(2), CLIENT);
    fx.assert_translated(POD, &reply, &reply.with_src(NODE_PORT_FRONTEND));
}

// externalTrafficPolicy Local: external traffic goes only to this node's endpoints and keeps the
// client's address (no SNAT), so the backend sees the real client; its reply, leaving the pod,
// is made to come from the nodePort again.
#[test]
fn node_port_with_policy_local_reaches_only_local_endpoints_and_keeps_the_client() {
    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(
            TrafficPolicy::Local,
            &[
                endpoint(2, Some(NODE_NAME)),
                endpoint(3, Some(OTHER_NODE_NAME)),
            ],
        )],
    );
    let request = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    fx.assert_translated(EXTERNAL, &request, &request.with_dst(backend(2)));
    let reply = Packet::new(TCP, backend(2), EXTERNAL_CLIENT);
    fx.assert_translated(POD, &reply, &reply.with_src(NODE_PORT_FRONTEND));
    // New flows never go to the other node's endpoint.
    for port in 1..=30 {
        let request = request.with_src((EXTERNAL_CLIENT.0, 50000 + port));
        fx.assert_translated(EXTERNAL, &request, &request.with_dst(backend(2)));
    }
}

// externalTrafficPolicy Local on a node without a local endpoint: kube-proxy drops (the load
// balancer's health check steers clients to other nodes), it does not REJECT. A Local service
// without any endpoint anywhere is still REJECTed.
#[test]
fn node_port_with_policy_local_and_only_remote_endpoints_drops() {
    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(
            TrafficPolicy::Local,
            &[
                endpoint(2, Some(OTHER_NODE_NAME)),
                endpoint(3, Some(OTHER_NODE_NAME)),
            ],
        )],
    );
    let request = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    fx.assert_dropped(EXTERNAL, &request);

    fx.sync(&desired([node_port_service(TrafficPolicy::Local, &[])]));
    fx.assert_refused(EXTERNAL, &request);
}

// Load-balancer IPs and external IPs are served at the service port by the node the traffic
// reaches, like a nodePort: with policy Cluster the client is SNATed to the node, and the reply
// comes from the address the client wrote to.
#[test]
fn load_balancer_and_external_ips_are_dnated_and_snated_and_the_reply_restored() {
    let mut fx = Fixture::serving(node_a(), [load_balancer_service(&[2])]);
    for frontend in [(LOAD_BALANCER_IP, 80), (EXTERNAL_IP, 80)] {
        let request = Packet::new(TCP, EXTERNAL_CLIENT, frontend);
        let (chosen, snat_port) = fx.backend_and_snat_port_of(EXTERNAL, &request);
        assert_eq!(chosen, backend(2));
        let reply = Packet::new(TCP, chosen, (NODE_IP, snat_port));
        fx.assert_translated(
            EXTERNAL,
            &reply,
            &Packet::new(TCP, frontend, EXTERNAL_CLIENT),
        );
    }
}

// Hairpin: a pod that reaches its own Service and is given itself as backend would drop a packet
// carrying its own address as source; it gets the hairpin address instead, and its reply to
// that address is made to come from the Service.
#[test]
fn a_pod_sent_to_itself_sees_the_hairpin_address() {
    let pod = (backend(2).0, 40000);
    let mut fx = Fixture::serving(Node::default(), [web_service(&[2])]);
    let request = Packet::new(TCP, pod, FRONTEND);
    fx.assert_translated(
        POD,
        &request,
        &Packet::new(TCP, (HAIRPIN_ADDRESS, pod.1), backend(2)),
    );
    fx.assert_translated(
        POD,
        &Packet::new(TCP, backend(2), (HAIRPIN_ADDRESS, pod.1)),
        &Packet::new(TCP, FRONTEND, pod),
    );
}

// Without a node address there is nothing to SNAT external traffic to: it is dropped rather than
// sent to a backend whose reply could not find its way back.
#[test]
fn external_traffic_that_needs_snat_is_dropped_without_a_node_address() {
    let mut fx = Fixture::serving(Node::default(), [load_balancer_service(&[2])]);
    fx.assert_dropped(
        EXTERNAL,
        &Packet::new(TCP, EXTERNAL_CLIENT, (LOAD_BALANCER_IP, 80)),
    );
}

// --- ICMP errors about translated flows ----------------------------------------------------------

/// The IPv4 packet inside `packet`'s frame, as an ICMP error quotes it (all of it).
fn quote(packet: &Packet) -> Vec<u8> {
    packet.bytes()[14..].to_vec()
}

impl Fixture {
    /// Asserts that `program` turns the ICMP error `input` into exactly `expected`, with every
    /// checksum valid, the quoted ones included.
    fn assert_icmp_error_translated(&mut self, program: &str, input: &[u8], expected: &[u8]) {
        let (verdict, out) = self.run_on(program, input);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            out, expected,
            "the ICMP error is not translated as expected"
        );
        assert_icmp_error_checksums_valid(&out);
    }
}

// A backend's port unreachable (or a router's time exceeded) about a pod's UDP flow to a
// ClusterIP quotes the datagram as the backend got it. The client's kernel only finds its socket
// if the quote shows the VIP it wrote to, and the error comes from the VIP (nf_nat's rule: the
// outer header looks like the reply to the translated packet).
#[test]
fn an_icmp_error_from_a_backend_is_made_to_quote_the_clusterip() {
    let mut fx = Fixture::new(&[2]);
    let request = Packet::new(UDP, CLIENT, DNS_FRONTEND);
    assert_eq!(fx.backend_of(&request), backend(2));
    for icmp in [Icmp::PORT_UNREACHABLE, Icmp::TTL_EXCEEDED] {
        let error = icmp_frame(
            backend(2).0,
            CLIENT.0,
            icmp,
            &quote(&request.with_dst(backend(2))),
        );
        let expected = icmp_frame(VIP, CLIENT.0, icmp, &quote(&request));
        fx.assert_icmp_error_translated(POD, &error, &expected);
    }
}

// Path MTU discovery through a NodePort: the backend's frag-needed about a SNATed flow quotes the
// node's address and SNAT port. It must reach the external client from the nodePort it wrote to,
// quoting its own address and port, with the MTU kept. The quoted TCP checksum is updated when the
// whole TCP header is quoted, and left alone when only the 8 bytes RFC 792 requires are.
#[test]
fn a_frag_needed_about_a_node_port_flow_reaches_the_external_client() {
    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(TrafficPolicy::Cluster, &endpoints(&[2]))],
    );
    let request = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    let (chosen, snat_port) = fx.backend_and_snat_port_of(EXTERNAL, &request);
    let sent = request.with_src((NODE_IP, snat_port)).with_dst(chosen);
    let frag_needed = Icmp::fragmentation_needed(1400);
    for quote_len in [20 + 20, 20 + 8] {
        let error = icmp_frame(chosen.0, NODE_IP, frag_needed, &quote(&sent)[..quote_len]);
        let expected = icmp_frame(
            NODE_IP,
            EXTERNAL_CLIENT.0,
            frag_needed,
            &quote(&request)[..quote_len],
        );
        fx.assert_icmp_error_translated(EXTERNAL, &error, &expected);
    }
}

// The other direction: the client's own ICMP error about the frontend's reply (here its port
// unreachable) must reach the backend quoting the backend's datagram as it was sent, through the
// node's SNAT for a NodePort flow.
#[test]
fn an_icmp_error_from_the_client_reaches_the_backend() {
    let mut fx = Fixture::new(&[2]);
    let request = Packet::new(UDP, CLIENT, DNS_FRONTEND);
    assert_eq!(fx.backend_of(&request), backend(2));
    let error = icmp_frame(
        CLIENT.0,
        VIP,
        Icmp::PORT_UNREACHABLE,
        &quote(&Packet::new(UDP, DNS_FRONTEND, CLIENT)),
    );
    let expected = icmp_frame(
        CLIENT.0,
        backend(2).0,
        Icmp::PORT_UNREACHABLE,
        &quote(&Packet::new(UDP, backend(2), CLIENT)),
    );
    fx.assert_icmp_error_translated(POD, &error, &expected);

    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(TrafficPolicy::Cluster, &endpoints(&[2]))],
    );
    let request = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    let (chosen, snat_port) = fx.backend_and_snat_port_of(EXTERNAL, &request);
    let error = icmp_frame(
        EXTERNAL_CLIENT.0,
        NODE_IP,
        Icmp::PORT_UNREACHABLE,
        &quote(&Packet::new(TCP, NODE_PORT_FRONTEND, EXTERNAL_CLIENT)),
    );
    let expected = icmp_frame(
        NODE_IP,
        chosen.0,
        Icmp::PORT_UNREACHABLE,
        &quote(&Packet::new(TCP, chosen, (NODE_IP, snat_port))),
    );
    fx.assert_icmp_error_translated(EXTERNAL, &error, &expected);
}

// An error about a flow that expired is not translated, as the flow's own packets no longer are.
#[test]
fn an_icmp_error_about_an_expired_flow_passes_untouched() {
    let mut fx = Fixture::new(&[2]);
    let request = Packet::new(UDP, CLIENT, DNS_FRONTEND);
    assert_eq!(fx.backend_of(&request), backend(2));
    let sent = quote(&request.with_dst(backend(2)));
    let error = icmp_frame(backend(2).0, CLIENT.0, Icmp::PORT_UNREACHABLE, &sent);
    let expired = ConntrackLifetimes::DEFAULT.other + 1;
    fx.age(&Packet::new(UDP, backend(2), CLIENT), CT_REVERSE, expired);
    fx.assert_passed_untouched(&error);

    // From the client's side, about the frontend's reply: looked up by the forward entry.
    let error = icmp_frame(
        CLIENT.0,
        VIP,
        Icmp::PORT_UNREACHABLE,
        &quote(&Packet::new(UDP, DNS_FRONTEND, CLIENT)),
    );
    fx.age(&request, CT_FORWARD, expired);
    fx.assert_passed_untouched(&error);
}

#[test]
fn icmp_that_is_not_about_a_translated_flow_passes_untouched() {
    let mut fx = Fixture::new(&[2]);
    // An error about a flow that never went through a frontend.
    let direct = Packet::new(UDP, CLIENT, backend(7));
    fx.assert_passed_untouched(&icmp_frame(
        backend(7).0,
        CLIENT.0,
        Icmp::PORT_UNREACHABLE,
        &quote(&direct),
    ));
    // Not an error at all.
    fx.assert_passed_untouched(&icmp_frame(
        CLIENT.0,
        VIP,
        Icmp::ECHO_REQUEST,
        b"ping payload",
    ));
}

// An error whose quote stops before the ports cannot be matched to a flow, even when it is about
// one: it passes as it is rather than be half-translated.
#[test]
fn a_truncated_icmp_error_passes_untouched() {
    let mut fx = Fixture::new(&[2]);
    let request = Packet::new(UDP, CLIENT, DNS_FRONTEND);
    assert_eq!(fx.backend_of(&request), backend(2));
    let sent = quote(&request.with_dst(backend(2)));
    for quote_len in [20, 20 + 2] {
        fx.assert_passed_untouched(&icmp_frame(
            backend(2).0,
            CLIENT.0,
            Icmp::PORT_UNREACHABLE,
            &sent[..quote_len],
        ));
    }
}

// --- The XDP fast path of external links --------------------------------------------------------
//
// BPF_PROG_TEST_RUN runs `external_xdp` as if the packet came in on the loopback link, which is
// not one of XDP_EGRESS: every packet it translates is passed on to the stack (the redirect path
// is exercised with real traffic in external.rs).

impl Fixture {
    /// Runs `external_xdp` on `frame`: (verdict, output frame).
    fn run_xdp(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let (program, _) = self.dataplane.xdp_program();
        run_xdp(program, frame)
    }

    /// Runs `external_xdp` on a client's packet that must be DNATed and SNATed and passed on to
    /// the stack: (backend, SNAT port).
    fn xdp_backend_and_snat_port_of(&mut self, request: &Packet) -> SnatedFlow {
        let (verdict, out) = self.run_xdp(&request.bytes());
        assert_eq!(verdict, XDP_PASS, "{request:?}");
        assert_dnated_and_snated(request, TC_ACT_OK, &out)
    }
}

fn run_xdp(program: &Xdp, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

// XDP translates a NodePort flow exactly as TC does (same conntrack, same bytes), with its
// checksums updated in software, and reverse-translates the reply.
#[test]
fn xdp_translates_node_port_flows_and_replies_as_tc_does() {
    let backends = endpoints(&[2, 3, 4]);
    let mut fx = Fixture::serving(node_a(), [node_port_service_with_udp(&backends)]);
    for protocol in [TCP, UDP] {
        let request = Packet::new(protocol, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
        let (verdict, out) = fx.run_xdp(&request.bytes());
        assert_eq!(verdict, XDP_PASS);
        assert_ne!(out, request.bytes(), "XDP left the request untouched");
        let (backend, snat_port) = assert_dnated_and_snated(&request, TC_ACT_OK, &out);
        // TC finds the flow XDP recorded, and makes the same packet of it.
        assert_eq!(fx.run_on(EXTERNAL, &request.bytes()), (TC_ACT_OK, out));

        let reply = Packet::new(protocol, backend, (NODE_IP, snat_port));
        let restored = Packet::new(protocol, NODE_PORT_FRONTEND, EXTERNAL_CLIENT);
        let (verdict, out) = fx.run_xdp(&reply.bytes());
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, restored.bytes());
        assert_checksums_valid(&out);
    }
    // A UDP datagram without checksum keeps none.
    let mut request = Packet::new(UDP, (EXTERNAL_CLIENT.0, 40001), NODE_PORT_FRONTEND);
    request.udp_without_checksum = true;
    let (verdict, out) = fx.run_xdp(&request.bytes());
    assert_eq!(verdict, XDP_PASS);
    let ((_, snat_port), backend) = flow_of(&out);
    let mut expected = request.with_src((NODE_IP, snat_port)).with_dst(backend);
    expected.udp_without_checksum = true;
    assert_eq!(out, expected.bytes());
}

// XDP judges conntrack entries as TC does: a reply on an expired reverse entry passes as it is,
// and a client packet on an expired forward entry is a new flow (here on a new SNAT port, since
// the old flow's reverse entry, not expired, still holds its port).
#[test]
fn xdp_does_not_apply_expired_entries() {
    let backends = endpoints(&[2]);
    let mut fx = Fixture::serving(node_a(), [node_port_service_with_udp(&backends)]);
    let expired = ConntrackLifetimes::DEFAULT.other + 1;
    let request = Packet::new(UDP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    let (chosen, snat_port) = fx.xdp_backend_and_snat_port_of(&request);
    let reply = Packet::new(UDP, chosen, (NODE_IP, snat_port));
    fx.age(&reply, CT_REVERSE, expired);
    assert_eq!(
        fx.run_xdp(&reply.bytes()),
        (XDP_PASS, reply.bytes()),
        "a reply on an expired reverse entry must pass untouched"
    );
    assert!(
        !fx.has_entry(&reply, CT_REVERSE),
        "the expired entry must be deleted"
    );

    let request = request.with_src((EXTERNAL_CLIENT.0, 40001));
    let (chosen, snat_port) = fx.xdp_backend_and_snat_port_of(&request);
    fx.age(&request, CT_FORWARD, expired);
    let (_, new_port) = fx.xdp_backend_and_snat_port_of(&request);
    assert_ne!(new_port, snat_port, "an expired forward entry was followed");
    fx.assert_translated(
        EXTERNAL,
        &Packet::new(UDP, chosen, (NODE_IP, new_port)),
        &Packet::new(UDP, NODE_PORT_FRONTEND, request.src),
    );
}

// What XDP cannot finish goes on untouched to TC at the same link: a refusal needs a new
// packet, an ICMP error its quote rewritten, traffic for no service nothing at all.
#[test]
fn xdp_leaves_refusals_icmp_and_other_traffic_to_tc_untouched() {
    let mut fx = Fixture::serving(node_a(), [node_port_service(TrafficPolicy::Cluster, &[])]);
    let refused = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    assert_eq!(
        fx.run_xdp(&refused.bytes()),
        (XDP_PASS, refused.bytes()),
        "a refusal is TC's"
    );
    fx.assert_refused(EXTERNAL, &refused);

    let not_a_service = Packet::new(TCP, EXTERNAL_CLIENT, (NODE_IP, 22));
    assert_eq!(
        fx.run_xdp(&not_a_service.bytes()),
        (XDP_PASS, not_a_service.bytes())
    );
    let icmp = icmp_port_unreachable(&not_a_service);
    assert_eq!(fx.run_xdp(&icmp), (XDP_PASS, icmp.clone()));
}

// Policy Local on a node without a local endpoint: dropped in XDP already.
#[test]
fn xdp_drops_what_policy_local_does_not_serve_here() {
    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(
            TrafficPolicy::Local,
            &[endpoint(2, Some(OTHER_NODE_NAME))],
        )],
    );
    let request = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    assert_eq!(fx.run_xdp(&request.bytes()).0, XDP_DROP);
}

// Truncated or fragmented packets are never rewritten by XDP either.
#[test]
fn xdp_never_rewrites_what_it_cannot_bound() {
    let mut fx = Fixture::serving(
        node_a(),
        [node_port_service(TrafficPolicy::Cluster, &endpoints(&[2]))],
    );
    let request = Packet::new(TCP, EXTERNAL_CLIENT, NODE_PORT_FRONTEND);
    // Longer than an Ethernet MTU: merged by GRO, with a checksum only TC may update.
    let mut merged = request.clone();
    merged.payload = vec![7; 2000];
    let merged = merged.bytes();
    assert_eq!(fx.run_xdp(&merged), (XDP_PASS, merged.clone()));
    let whole = request.bytes();
    for cut in [20, 34, 40, 50] {
        let truncated = &whole[..cut];
        assert_eq!(fx.run_xdp(truncated), (XDP_PASS, truncated.to_vec()));
    }
    let mut fragment = request.clone();
    fragment.fragment = 0x2000;
    let fragment = fragment.bytes();
    assert_eq!(fx.run_xdp(&fragment), (XDP_PASS, fragment.clone()));
}

//! Packet fixtures through BPF_PROG_TEST_RUN: an input frame, the verdict and the exact output
//! frame the real `pod_ingress` program must produce, with the maps programmed by the real
//! syncer from a desired model (as Katran's and Cilium's BPF tests do).

mod packets;

use std::{net::Ipv4Addr, time::SystemTime};

use aya::programs::{TestRun, TestRunOptions};
use packets::{Packet, TCP, UDP, assert_checksums_valid};
use service_agent::{
    dataplane::Dataplane,
    model::{DesiredState, Endpoint, Protocol, Service, ServiceName, ServicePort, ServiceType},
    sync::Syncer,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 244, 0, 9), 40000);
const FRONTEND: (Ipv4Addr, u16) = (VIP, 80);
const DNS_FRONTEND: (Ipv4Addr, u16) = (VIP, 53);

fn backend(last_octet: u8) -> (Ipv4Addr, u16) {
    (Ipv4Addr::new(10, 244, 1, last_octet), 8080)
}

/// A dataplane with one service at VIP: TCP 80 and UDP 53 -> the given backends' port 8080.
struct Fixture {
    dataplane: Dataplane,
    syncer: Syncer,
}

impl Fixture {
    /// None when not root: the caller skips (BPF needs CAP_BPF and CAP_NET_ADMIN).
    fn new(backends: &[u8]) -> Option<Self> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: BPF_PROG_TEST_RUN needs root");
            return None;
        }
        let dataplane = Dataplane::load(None).expect("load the dataplane");
        let syncer = Syncer::new(&dataplane.maps).expect("read the maps");
        let mut fixture = Self { dataplane, syncer };
        fixture.program(backends);
        Some(fixture)
    }

    fn program(&mut self, backends: &[u8]) {
        let endpoints: Vec<Endpoint> = backends
            .iter()
            .map(|&octet| Endpoint {
                address: backend(octet).0,
                port: backend(octet).1,
                ready: true,
                serving: true,
                terminating: false,
                node_name: None,
            })
            .collect();
        let port = |name: &str, port, protocol| ServicePort {
            name: name.into(),
            port,
            protocol,
            endpoints: endpoints.clone(),
        };
        let name = ServiceName {
            namespace: "default".into(),
            name: "web".into(),
        };
        let service = Service {
            name: name.clone(),
            service_type: ServiceType::ClusterIP,
            cluster_ip: VIP,
            ports: vec![
                port("http", 80, Protocol::Tcp),
                port("dns", 53, Protocol::Udp),
            ],
            created: SystemTime::now(),
        };
        let mut desired = DesiredState::default();
        desired.services.insert(name, service);
        self.syncer
            .sync(&desired, &mut self.dataplane.maps)
            .expect("program the maps");
    }

    /// Runs the program on `frame`: (verdict, output frame).
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .dataplane
            .pod_ingress()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
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

    /// The backend a client packet was sent to (its destination after the program ran).
    fn backend_of(&mut self, packet: &Packet) -> (Ipv4Addr, u16) {
        let (verdict, out) = self.run(&packet.bytes());
        assert_eq!(verdict, TC_ACT_OK);
        assert_checksums_valid(&out);
        let ip = &out[14..];
        let l4 = &ip[usize::from(ip[0] & 0x0f) * 4..];
        (
            Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    }
}

#[test]
fn tcp_to_clusterip_is_dnated_and_the_reply_reverse_natted() {
    let Some(mut fx) = Fixture::new(&[2]) else {
        return;
    };
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
    let Some(mut fx) = Fixture::new(&[2]) else {
        return;
    };
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
    let Some(mut fx) = Fixture::new(&[2]) else {
        return;
    };
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
    let Some(mut fx) = Fixture::new(&[2]) else {
        return;
    };
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
    let Some(mut fx) = Fixture::new(&[2]) else {
        return;
    };
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
    let Some(mut fx) = Fixture::new(&[2]) else {
        return;
    };
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
    let Some(mut fx) = Fixture::new(&[2]) else {
        return;
    };
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
    let Some(mut fx) = Fixture::new(&[2, 3, 4]) else {
        return;
    };
    let flow = Packet::new(TCP, CLIENT, FRONTEND);
    let first = fx.backend_of(&flow);
    for _ in 0..20 {
        assert_eq!(
            fx.backend_of(&flow),
            first,
            "a tracked flow must keep its backend"
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for port in 1..=60 {
        seen.insert(fx.backend_of(&flow.with_src((CLIENT.0, 50000 + port))));
    }
    let all: std::collections::BTreeSet<_> = [backend(2), backend(3), backend(4)].into();
    assert_eq!(seen, all, "60 new flows must reach all 3 backends");
}

#[test]
fn a_service_without_endpoints_drops_new_flows() {
    let Some(mut fx) = Fixture::new(&[]) else {
        return;
    };
    let (verdict, _) = fx.run(&Packet::new(TCP, CLIENT, FRONTEND).bytes());
    assert_eq!(verdict, TC_ACT_SHOT);
}

#[test]
fn a_flow_whose_backend_was_removed_moves_to_a_remaining_one() {
    let Some(mut fx) = Fixture::new(&[2]) else {
        return;
    };
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

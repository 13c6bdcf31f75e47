//! Kernel side of the Service dataplane.
//!
//! `pod_ingress` runs at TC ingress of every pod-facing host link. A packet from a pod to a
//! service frontend (ClusterIP:port/protocol) is DNATed to a backend, and the flow is recorded in
//! conntrack in both directions; a backend's reply to such a flow arrives on the backend's link and
//! is SNATed back to the frontend. Everything else passes untouched. The kernel routes the rewritten
//! packet. Every step is a hash lookup: nothing loops over services or endpoints.
#![no_std]
#![no_main]

mod maps;
mod nat;
mod packet;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    macros::classifier,
    programs::TcContext,
};
use service_common::{
    BackendV4, CT_FORWARD, CT_REVERSE, ConntrackEntryV4, ConntrackKeyV4, ServiceEntry, ServiceKeyV4,
};

use crate::{
    maps::{BACKENDS_V4, CONNTRACK_V4, REV_NAT_V4, SERVICES_V4},
    nat::End,
    packet::Ipv4Flow,
};

#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    let Some(flow) = packet::parse(&ctx) else {
        return TC_ACT_OK;
    };
    let frontend = ServiceKeyV4 {
        address: flow.dst_address,
        port: flow.dst_port,
        slot: 0,
        protocol: flow.protocol,
        _pad: [0; 3],
    };
    // SAFETY: map values are plain data; a concurrent update can at worst give a stale value.
    if let Some(service) = unsafe { SERVICES_V4.get(frontend) } {
        return to_service(&ctx, &flow, frontend, *service);
    }
    from_backend(&ctx, &flow)
}

/// A packet to a frontend: keep the flow's backend if it still exists, else pick one at random
/// among the frontend's slots.
#[inline(always)]
fn to_service(
    ctx: &TcContext,
    flow: &Ipv4Flow,
    frontend: ServiceKeyV4,
    service: ServiceEntry,
) -> i32 {
    let forward_key = ConntrackKeyV4 {
        src_address: flow.src_address,
        dst_address: flow.dst_address,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        protocol: flow.protocol,
        direction: CT_FORWARD,
        _pad: 0,
    };
    // A flow whose backend was removed is re-balanced rather than sent to a dead address: this
    // is what keeps UDP flows alive across a server pod's restart (kube-proxy's stale conntrack).
    let tracked = unsafe { CONNTRACK_V4.get(forward_key) }
        .and_then(|entry| unsafe { BACKENDS_V4.get(entry.backend_id) }.copied());
    let backend = match tracked {
        Some(backend) => backend,
        None => match select_backend(flow, &frontend, &service, &forward_key) {
            Some(backend) => backend,
            // No ready endpoint (count 0) or a slot caught mid-update: nowhere to send it.
            None => return TC_ACT_SHOT,
        },
    };
    match nat::rewrite(ctx, flow, End::Destination, backend.address, backend.port) {
        Ok(()) => TC_ACT_OK,
        Err(_) => TC_ACT_SHOT,
    }
}

#[inline(always)]
fn select_backend(
    flow: &Ipv4Flow,
    frontend: &ServiceKeyV4,
    service: &ServiceEntry,
    forward_key: &ConntrackKeyV4,
) -> Option<BackendV4> {
    if service.count == 0 {
        return None;
    }
    let random = unsafe { bpf_get_prandom_u32() };
    let slot_key = ServiceKeyV4 {
        slot: (random % u32::from(service.count)) as u16 + 1,
        ..*frontend
    };
    let backend_id = unsafe { SERVICES_V4.get(slot_key) }?.backend_id;
    let backend = *unsafe { BACKENDS_V4.get(backend_id) }?;
    let entry = ConntrackEntryV4 {
        backend_id,
        rev_nat_id: service.rev_nat_id,
    };
    let reverse_key = ConntrackKeyV4 {
        src_address: backend.address,
        dst_address: flow.src_address,
        src_port: backend.port,
        dst_port: flow.src_port,
        protocol: flow.protocol,
        direction: CT_REVERSE,
        _pad: 0,
    };
    // Reverse first: once the forward entry exists, replies must already be translatable. A full
    // LRU evicts rather than fails, so an error here is not worth dropping the packet for.
    let _ = CONNTRACK_V4.insert(reverse_key, entry, 0);
    let _ = CONNTRACK_V4.insert(forward_key, entry, 0);
    Some(backend)
}

/// A packet that is not for a frontend: if it is a backend's reply to a translated flow, make it
/// come from the frontend again.
#[inline(always)]
fn from_backend(ctx: &TcContext, flow: &Ipv4Flow) -> i32 {
    let reverse_key = ConntrackKeyV4 {
        src_address: flow.src_address,
        dst_address: flow.dst_address,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        protocol: flow.protocol,
        direction: CT_REVERSE,
        _pad: 0,
    };
    let Some(entry) = (unsafe { CONNTRACK_V4.get(reverse_key) }) else {
        return TC_ACT_OK;
    };
    // The frontend is gone (service deleted): nothing to translate to.
    let Some(frontend) = (unsafe { REV_NAT_V4.get(entry.rev_nat_id) }) else {
        return TC_ACT_OK;
    };
    match nat::rewrite(ctx, flow, End::Source, frontend.address, frontend.port) {
        Ok(()) => TC_ACT_OK,
        Err(_) => TC_ACT_SHOT,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

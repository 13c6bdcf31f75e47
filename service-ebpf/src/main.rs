//! Kernel side of the Service dataplane.
//!
//! `pod_ingress` runs at TC ingress of every pod-facing host link, `external_ingress` at TC
//! ingress of the links that face outside the cluster. Both do the same things:
//! - a packet to a service frontend (a ClusterIP, a node IP's nodePort, a load-balancer or
//!   external IP, with port and protocol) is DNATed to a backend, and the flow is recorded in
//!   conntrack in both directions ([`service`]);
//! - a backend's reply to such a flow is translated back to come from the frontend ([`reply`]);
//! - an ICMP error about such a flow, in either direction, is translated to match what its
//!   receiver sent ([`icmp_error`]).
//!
//! They differ in one decision: traffic that entered from outside and is not for a Local-policy
//! frontend also gets the node's address as source (SNAT), so that the reply returns through this
//! node. Everything else passes untouched and the kernel routes the rewritten packet. Every step
//! is a hash lookup: nothing loops over services or endpoints.
//!
//! The node's own processes never cross a pod link: `sock_connect4`, `sock_sendmsg4`,
//! `sock_recvmsg4` and `sock_getpeername4`, attached to a cgroup, translate their sockets'
//! addresses instead ([`socket`]). What they send is already addressed to a backend, which the
//! TC programs pass untouched.
#![no_std]
#![no_main]

mod backend;
mod checksum;
mod conntrack;
mod icmp_error;
mod maps;
mod nat;
mod packet;
mod reject;
mod reply;
mod service;
mod socket;
mod target;
mod xdp;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

use crate::target::Target;

/// Where a packet entered the node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From a pod on this node.
    Pod,
    /// From outside the pod network: a client, a router, another node.
    External,
}

#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    serve(&ctx, Origin::Pod)
}

#[classifier]
pub fn external_ingress(ctx: TcContext) -> i32 {
    serve(&ctx, Origin::External)
}

#[inline(always)]
fn serve(ctx: &TcContext, origin: Origin) -> i32 {
    let Some(flow) = packet::parse(ctx) else {
        // Not TCP or UDP the NAT can handle; an ICMP error may still be about a translated flow.
        return icmp_error::translate(ctx);
    };
    match target::of(&flow) {
        Target::Frontend(frontend, service) => {
            service::to_frontend(ctx, &flow, origin, &frontend, service)
        }
        Target::Reply(entry, frontend) => reply::rewrite(ctx, &flow, &entry, &frontend),
        Target::Other => TC_ACT_OK,
    }
}

/// The fast path of external links, ahead of `external_ingress` ([`xdp`]).
#[xdp]
pub fn external_xdp(ctx: XdpContext) -> u32 {
    xdp::serve(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    socket::to_frontend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    socket::to_frontend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    socket::from_backend(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    socket::from_backend(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

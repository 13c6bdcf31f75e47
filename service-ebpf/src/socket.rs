//! Socket-level load balancing (cgroup sock_addr hooks, as Cilium's bpf_sock.c does it): connect()
//! and sendto() to a frontend get a backend's address before the kernel routes anything, so the
//! flow needs no per-packet NAT at all; recvmsg() and getpeername() report the frontend again, so
//! the process never sees the backend's address. The node's own processes need it (there is no
//! pod link on their way where a TC program could translate); pods' TCP connections get it too
//! unless the agent says otherwise (see `NODE_SOCKET_LB_PODS`).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use service_common::{
    IPPROTO_TCP, IPPROTO_UDP, NODE_SOCKET_LB_PODS, SCOPE_CLUSTER, SCOPE_DEFAULT, SERVICE_LOCAL,
    ServiceKeyV4, SocketRevNatKeyV4, SocketRevNatV4,
};

use crate::{
    backend,
    maps::{NODE_V4, REV_NAT_V4, SERVICES_V4, SOCKET_REV_NAT_V4},
};

/// Verdicts of a sock_addr program: go on with the (possibly rewritten) address, or fail the
/// system call with the error set by bpf_set_retval (EPERM when none is).
const PROCEED: i32 = 1;
const REJECT: i32 = 0;
/// What connect() and sendto() fail with for a frontend without endpoints: what a pod gets from
/// the packet path's ICMP port unreachable, and a client from kube-proxy's REJECT rule.
const ECONNREFUSED: i32 = 111;
/// What they fail with when the reverse entry cannot be written (Cilium's choice as well).
const ENOMEM: i32 = 12;

/// connect4 (TCP and UDP) and sendmsg4 (a UDP datagram with an explicit address).
#[inline(always)]
pub fn to_frontend(ctx: &SockAddrContext) -> i32 {
    let Some(owner) = socket_owner(ctx) else {
        return PROCEED;
    };
    let sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands a valid context; fields are read whole (u32), as the verifier
    // wants for user_port, and volatile so the compiler cannot narrow the loads.
    let (protocol, address, port) = unsafe {
        (
            read_volatile(addr_of!((*sock_addr).protocol)),
            read_volatile(addr_of!((*sock_addr).user_ip4)),
            // The port is in network byte order in the low 16 bits.
            read_volatile(addr_of!((*sock_addr).user_port)) as u16,
        )
    };
    let protocol = match protocol {
        p if p == u32::from(IPPROTO_TCP) => IPPROTO_TCP,
        p if p == u32::from(IPPROTO_UDP) => IPPROTO_UDP,
        _ => return PROCEED,
    };
    // A pod's TCP connections only, and never to its own loopback (see NODE_SOCKET_LB_PODS).
    if owner == SocketOwner::Pod && (protocol != IPPROTO_TCP || is_loopback(address)) {
        return PROCEED;
    }
    let mut frontend = ServiceKeyV4 {
        address,
        port,
        slot: 0,
        protocol,
        scope: SCOPE_DEFAULT,
        _pad: [0; 2],
    };
    // SAFETY: map values are plain data; a concurrent update can at worst give a stale value.
    let Some(mut service) = (unsafe { SERVICES_V4.get(frontend) }).copied() else {
        return PROCEED;
    };
    if service.flags & SERVICE_LOCAL != 0 {
        // The node's own processes may use every endpoint (see SCOPE_CLUSTER). Without the
        // cluster slots (an agent mid-update), the local ones still serve.
        let cluster = ServiceKeyV4 {
            scope: SCOPE_CLUSTER,
            ..frontend
        };
        if let Some(entry) = unsafe { SERVICES_V4.get(cluster) } {
            service = *entry;
            frontend = cluster;
        }
    }
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // TCP: a fresh choice per connection. UDP: the socket's choice, so that every datagram an
    // unconnected socket sends to the service goes to the same backend (Cilium does the same).
    let seed = if protocol == IPPROTO_TCP {
        unsafe { bpf_get_prandom_u32() }
    } else {
        cookie as u32
    };
    // No endpoint, or slots caught mid-update: refuse at once rather than let the connection
    // go to the frontend's address, which nothing on the node answers.
    let Some((_, backend)) = backend::choose(&frontend, service.count, seed) else {
        return reject(ECONNREFUSED);
    };
    let reverse_key = SocketRevNatKeyV4 {
        cookie,
        address: backend.address,
        port: backend.port,
        _pad: 0,
    };
    let reverse = SocketRevNatV4 {
        address,
        port,
        _pad: 0,
        rev_nat_id: service.rev_nat_id,
    };
    // An unconnected socket sends many datagrams to the same backend: write only what changed.
    let known =
        unsafe { SOCKET_REV_NAT_V4.get(reverse_key) }.is_some_and(|entry| *entry == reverse);
    if !known && SOCKET_REV_NAT_V4.insert(reverse_key, reverse, 0).is_err() {
        return reject(ENOMEM);
    }
    // SAFETY: user_ip4 and user_port are writable in these hooks, as whole u32 fields.
    unsafe {
        write_volatile(addr_of_mut!((*sock_addr).user_ip4), backend.address);
        write_volatile(
            addr_of_mut!((*sock_addr).user_port),
            u32::from(backend.port),
        );
    }
    PROCEED
}

/// recvmsg4 (the source of a received UDP datagram) and getpeername4: a backend that
/// [`to_frontend`] chose for this socket is reported as the frontend the process asked for.
/// No network namespace check: the entries are keyed by socket, and only sockets that
/// [`to_frontend`] served get any.
#[inline(always)]
pub fn from_backend(ctx: &SockAddrContext) -> i32 {
    let sock_addr = ctx.sock_addr;
    // SAFETY: as in to_frontend.
    let (address, port) = unsafe {
        (
            read_volatile(addr_of!((*sock_addr).user_ip4)),
            read_volatile(addr_of!((*sock_addr).user_port)) as u16,
        )
    };
    let key = SocketRevNatKeyV4 {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        address,
        port,
        _pad: 0,
    };
    let Some(entry) = (unsafe { SOCKET_REV_NAT_V4.get(key) }).copied() else {
        return PROCEED;
    };
    let frontend_exists = unsafe { REV_NAT_V4.get(entry.rev_nat_id) }
        .is_some_and(|frontend| frontend.address == entry.address && frontend.port == entry.port);
    if frontend_exists {
        unsafe {
            write_volatile(addr_of_mut!((*sock_addr).user_ip4), entry.address);
            write_volatile(addr_of_mut!((*sock_addr).user_port), u32::from(entry.port));
        }
    } else {
        // The service is gone: the backend's own address is the truth now.
        let _ = SOCKET_REV_NAT_V4.remove(key);
    }
    // These hooks cannot refuse anything: the kernel accepts only "proceed" from them.
    PROCEED
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SocketOwner {
    /// A process in the node's network namespace (the agent's).
    Node,
    /// A process of another network namespace in the cgroup: a pod.
    Pod,
}

/// Whose socket this is, or None when the hooks must leave it alone (the agent has not written
/// NODE_V4 yet, or it serves the node's own processes only and this is a pod's).
#[inline(always)]
fn socket_owner(ctx: &SockAddrContext) -> Option<SocketOwner> {
    let node = NODE_V4.get(0)?;
    if node.netns_cookie == 0 {
        return None;
    }
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if cookie == node.netns_cookie {
        Some(SocketOwner::Node)
    } else if node.flags & NODE_SOCKET_LB_PODS != 0 {
        Some(SocketOwner::Pod)
    } else {
        None
    }
}

/// 127.0.0.0/8 (the address is in network byte order).
#[inline(always)]
fn is_loopback(address: u32) -> bool {
    address.to_ne_bytes()[0] == 127
}

#[inline(always)]
fn reject(errno: i32) -> i32 {
    // SAFETY: sets the system call's return value; allowed in connect4 and sendmsg4.
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

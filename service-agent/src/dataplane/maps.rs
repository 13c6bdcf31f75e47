//! Typed handles on the service maps, and the writes the syncer and the agent make to them.

use std::{
    mem,
    os::fd::{AsFd as _, AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap, IterableMap as _, MapData},
};
use service_common::{
    BACKENDS_V4_MAP, BackendV4, CONNTRACK_V4_MAP, ConntrackEntryV4, ConntrackKeyV4,
    ConntrackLifetimes, FRONTEND_ADDRESSES_V4_MAP, ID_WATERMARK_BACKEND, ID_WATERMARK_REV_NAT,
    ID_WATERMARKS_MAP, NODE_SOCKET_LB_PODS, NODE_V4_MAP, NodeV4, REV_NAT_V4_MAP, RevNatV4,
    SERVICES_V4_MAP, ServiceEntry, ServiceKeyV4,
};

use super::batch;
use crate::{
    model::Node,
    sync::{MapContents, MapOp, ServiceMap},
};

/// Typed handles on the maps.
pub struct ServiceMaps {
    pub services: HashMap<MapData, ServiceKeyV4, ServiceEntry>,
    pub frontend_addresses: HashMap<MapData, u32, u32>,
    pub backends: HashMap<MapData, u32, BackendV4>,
    pub rev_nat: HashMap<MapData, u32, RevNatV4>,
    pub conntrack: HashMap<MapData, ConntrackKeyV4, ConntrackEntryV4>,
    pub node: Array<MapData, NodeV4>,
    id_watermarks: Array<MapData, u32>,
}

impl ServiceMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the object has no {name} map"))
        };
        Ok(Self {
            services: HashMap::try_from(take(SERVICES_V4_MAP)?)?,
            frontend_addresses: HashMap::try_from(take(FRONTEND_ADDRESSES_V4_MAP)?)?,
            backends: HashMap::try_from(take(BACKENDS_V4_MAP)?)?,
            rev_nat: HashMap::try_from(take(REV_NAT_V4_MAP)?)?,
            conntrack: HashMap::try_from(take(CONNTRACK_V4_MAP)?)?,
            node: Array::try_from(take(NODE_V4_MAP)?)?,
            id_watermarks: Array::try_from(take(ID_WATERMARKS_MAP)?)?,
        })
    }

    /// The next backend id and the next rev-NAT id that a previous agent recorded before
    /// handing them out (0 on new maps): ids below them may still be named by conntrack.
    pub fn id_watermarks(&self) -> Result<(u32, u32)> {
        let read = |index| {
            self.id_watermarks
                .get(&index, 0)
                .with_context(|| format!("reading {ID_WATERMARKS_MAP}[{index}]"))
        };
        Ok((read(ID_WATERMARK_BACKEND)?, read(ID_WATERMARK_REV_NAT)?))
    }

    /// Records the next ids this agent will hand out: written before the writes that use them.
    pub fn set_id_watermarks(&mut self, backend: u32, rev_nat: u32) -> Result<()> {
        for (index, next) in [
            (ID_WATERMARK_BACKEND, backend),
            (ID_WATERMARK_REV_NAT, rev_nat),
        ] {
            self.id_watermarks
                .set(index, next, 0)
                .with_context(|| format!("writing {ID_WATERMARKS_MAP}[{index}]"))?;
        }
        Ok(())
    }

    /// The most entries `map` holds (for messages about a full map).
    pub fn capacity(&self, map: ServiceMap) -> u32 {
        let map = match map {
            ServiceMap::Services => self.services.map(),
            ServiceMap::Backends => self.backends.map(),
            ServiceMap::RevNat => self.rev_nat.map(),
            ServiceMap::FrontendAddresses => self.frontend_addresses.map(),
        };
        map.info().map_or(0, |info| info.max_entries())
    }

    /// Tells the kernel side which address SNATed flows leave with (0: none), which network
    /// namespace is the node's (the agent's own), whether pods' sockets are balanced at
    /// connect() too, and how long conntrack entries live.
    pub fn set_node(
        &mut self,
        node: &Node,
        socket_lb: SocketLbScope,
        lifetimes: ConntrackLifetimes,
    ) -> Result<()> {
        let snat_address = node
            .ips
            .first()
            .map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
        let cpus =
            aya::util::nr_cpus().map_err(|(path, err)| anyhow::anyhow!("reading {path}: {err}"))?;
        let node = NodeV4 {
            snat_address,
            cpus: u32::try_from(cpus).context("more CPUs than u32")?,
            netns_cookie: own_netns_cookie()?,
            flags: match socket_lb {
                SocketLbScope::NodeAndPods => NODE_SOCKET_LB_PODS,
                SocketLbScope::NodeOnly => 0,
            },
            _pad: 0,
            lifetimes,
        };
        self.node.set(0, node, 0).context("writing NODE_V4")
    }

    pub fn read_contents(&self) -> Result<MapContents> {
        let mut contents = MapContents::default();
        for item in self.services.iter() {
            let (key, value) = item.context("reading SERVICES_V4")?;
            contents.services.insert(key, value);
        }
        for item in self.backends.iter() {
            let (key, value) = item.context("reading BACKENDS_V4")?;
            contents.backends.insert(key, value);
        }
        for item in self.rev_nat.iter() {
            let (key, value) = item.context("reading REV_NAT_V4")?;
            contents.rev_nat.insert(key, value);
        }
        for address in self.frontend_addresses.keys() {
            contents
                .frontend_addresses
                .insert(address.context("reading FRONTEND_ADDRESSES_V4")?);
        }
        Ok(contents)
    }

    /// Writes a run of operations of one kind (one variant of MapOp) with one system call.
    pub fn apply_run(&mut self, run: &[MapOp]) -> Result<(), batch::Stopped> {
        let Some(first) = run.first() else {
            return Ok(());
        };
        match first {
            MapOp::PutBackend(..) => put_all(&self.backends, run, |op| match op {
                MapOp::PutBackend(id, backend) => Some((*id, *backend)),
                _ => None,
            }),
            MapOp::PutRevNat(..) => put_all(&self.rev_nat, run, |op| match op {
                MapOp::PutRevNat(id, rev_nat) => Some((*id, *rev_nat)),
                _ => None,
            }),
            MapOp::PutService(..) => put_all(&self.services, run, |op| match op {
                MapOp::PutService(key, entry) => Some((*key, *entry)),
                _ => None,
            }),
            MapOp::PutFrontendAddress(_) => put_all(&self.frontend_addresses, run, |op| match op {
                MapOp::PutFrontendAddress(address) => Some((*address, 1)),
                _ => None,
            }),
            MapOp::DeleteService(_) => delete_all(&self.services, run, |op| match op {
                MapOp::DeleteService(key) => Some(*key),
                _ => None,
            }),
            MapOp::DeleteRevNat(_) => delete_all(&self.rev_nat, run, |op| match op {
                MapOp::DeleteRevNat(id) => Some(*id),
                _ => None,
            }),
            MapOp::DeleteBackend(_) => delete_all(&self.backends, run, |op| match op {
                MapOp::DeleteBackend(id) => Some(*id),
                _ => None,
            }),
            MapOp::DeleteFrontendAddress(_) => {
                delete_all(&self.frontend_addresses, run, |op| match op {
                    MapOp::DeleteFrontendAddress(address) => Some(*address),
                    _ => None,
                })
            }
        }
    }

    /// Deletes the conntrack entries that match `stale`, read a chunk at a time and each
    /// judged again just before its delete (see [`batch::delete_where`]): how many it deleted.
    pub fn forget_flows_where(
        &mut self,
        stale: impl FnMut(&ConntrackKeyV4, &ConntrackEntryV4) -> bool,
    ) -> Result<usize> {
        let conntrack = self.conntrack.map().fd().as_fd();
        let swept = batch::delete_where(conntrack, batch::CONNTRACK_CHUNK, stale)
            .context("deleting flows from CONNTRACK_V4")?;
        Ok(swept.deleted)
    }
}

const MIXED_RUN: &str = "a run holds one kind of map operation";

fn put_all<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    run: &[MapOp],
    entry: impl Fn(&MapOp) -> Option<(K, V)>,
) -> Result<(), batch::Stopped> {
    let (keys, values): (Vec<K>, Vec<V>) = run.iter().map(|op| entry(op).expect(MIXED_RUN)).unzip();
    batch::update(map.map().fd().as_fd(), &keys, &values)
}

fn delete_all<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    run: &[MapOp],
    key: impl Fn(&MapOp) -> Option<K>,
) -> Result<(), batch::Stopped> {
    let keys: Vec<K> = run.iter().map(|op| key(op).expect(MIXED_RUN)).collect();
    batch::delete(map.map().fd().as_fd(), &keys)
}

/// Whose sockets the cgroup socket hooks balance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketLbScope {
    /// The node's own processes (TCP and UDP) and pods' TCP connections.
    NodeAndPods,
    /// The node's own processes only (`--socket-lb-host-only`).
    NodeOnly,
}

/// `SO_NETNS_COOKIE` (Linux 5.14), which the libc crate does not export.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace, as bpf_get_netns_cookie reports it for
/// sockets of that namespace: read from a throwaway socket.
fn own_netns_cookie() -> Result<u64> {
    // SAFETY: socket returns a new descriptor or -1; a valid one is owned by `socket` at once.
    let socket = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("opening a socket to read the network namespace cookie");
        }
        OwnedFd::from_raw_fd(fd)
    };
    let mut cookie = 0u64;
    let mut len = mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let read = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if read != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14)");
    }
    Ok(cookie)
}

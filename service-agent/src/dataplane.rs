//! Loading the kernel programs, owning their maps and pins.

pub mod batch;

use std::{
    fs, mem,
    os::fd::{AsFd as _, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, DevMapHash, HashMap, IterableMap as _, MapData},
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
};
use service_common::{
    BACKENDS_V4_MAP, BackendV4, CONNTRACK_V4_MAP, ConntrackEntryV4, ConntrackKeyV4,
    FRONTEND_ADDRESSES_V4_MAP, NODE_SOCKET_LB_PODS, NODE_V4_MAP, NodeV4, PIN_LAYOUT,
    REV_NAT_V4_MAP, RevNatV4, SERVICES_V4_MAP, SOCKET_REV_NAT_V4_MAP, ServiceEntry, ServiceKeyV4,
    XDP_EGRESS_MAP,
};

use crate::{
    model::Node,
    sync::{MapContents, MapOp},
};

/// The kernel object, compiled by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/service-ebpf"));

/// The maps pinned (and so kept across agent restarts): services, and the flows and sockets
/// translated to them (a connected UDP socket keeps reporting its service across a restart).
const PINNED_MAPS: [&str; 6] = [
    SERVICES_V4_MAP,
    FRONTEND_ADDRESSES_V4_MAP,
    BACKENDS_V4_MAP,
    REV_NAT_V4_MAP,
    CONNTRACK_V4_MAP,
    SOCKET_REV_NAT_V4_MAP,
];

/// The TC programs: one at ingress of pod-facing links, one at ingress of external links.
pub const POD_INGRESS_PROGRAM: &str = "pod_ingress";
pub const EXTERNAL_INGRESS_PROGRAM: &str = "external_ingress";
/// The XDP program of external links, ahead of `external_ingress` (see `xdp`).
pub const EXTERNAL_XDP_PROGRAM: &str = "external_xdp";

/// The cgroup sock_addr programs that translate the node's own sockets (see `socket_hooks`).
pub const SOCKET_PROGRAMS: [&str; 4] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
];

pub struct Dataplane {
    ebpf: Ebpf,
    pub maps: ServiceMaps,
    /// The links `external_xdp` may redirect to. Not pinned: it lists this agent's attachments.
    pub xdp_egress: DevMapHash<MapData>,
    /// Where the maps are pinned, if they are.
    pin_dir: Option<PathBuf>,
}

impl Dataplane {
    /// Loads the programs. With `pin_root`, the maps are pinned under it (and reused when a
    /// previous agent left them there: its services and flows survive the restart).
    pub fn load(pin_root: Option<&Path>) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("this agent was built with AYA_BUILD_SKIP=1 and carries no eBPF object");
        }
        let mut loader = EbpfLoader::new();
        let pin_dir = pin_root.map(|root| root.join(PIN_LAYOUT));
        if let Some(dir) = &pin_dir {
            fs::create_dir_all(dir).with_context(|| {
                format!(
                    "creating the pin directory {} (is bpffs mounted?)",
                    dir.display()
                )
            })?;
            for name in PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (are you root, on a kernel with BTF?)")?;
        for name in [POD_INGRESS_PROGRAM, EXTERNAL_INGRESS_PROGRAM] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("the object has no {name} program"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        for name in SOCKET_PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("the object has no {name} program"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        let program: &mut Xdp = ebpf
            .program_mut(EXTERNAL_XDP_PROGRAM)
            .with_context(|| format!("the object has no {EXTERNAL_XDP_PROGRAM} program"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("the verifier rejected {EXTERNAL_XDP_PROGRAM}"))?;
        let xdp_egress = DevMapHash::try_from(
            ebpf.take_map(XDP_EGRESS_MAP)
                .with_context(|| format!("the object has no {XDP_EGRESS_MAP} map"))?,
        )?;
        let maps = ServiceMaps::take(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            xdp_egress,
            pin_dir,
        })
    }

    /// One of the TC programs, by name ([`POD_INGRESS_PROGRAM`], [`EXTERNAL_INGRESS_PROGRAM`]).
    pub fn tc_program(&mut self, name: &str) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(name)
            .and_then(|program| program.try_into().ok())
            .expect("every TC program is loaded in Dataplane::load")
    }

    /// The XDP program and the map of the links it may redirect to.
    pub fn xdp_program(&mut self) -> (&mut Xdp, &mut DevMapHash<MapData>) {
        let program = self
            .ebpf
            .program_mut(EXTERNAL_XDP_PROGRAM)
            .and_then(|program| program.try_into().ok())
            .expect("the XDP program is loaded in Dataplane::load");
        (program, &mut self.xdp_egress)
    }

    /// One of the [`SOCKET_PROGRAMS`], by name.
    pub fn socket_program(&mut self, name: &str) -> &mut CgroupSockAddr {
        self.ebpf
            .program_mut(name)
            .and_then(|program| program.try_into().ok())
            .expect("every socket program is loaded in Dataplane::load")
    }

    /// Removes the pins (the maps themselves go when the last program or fd holding them does).
    pub fn remove_pins(&self) -> Result<()> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        for name in PINNED_MAPS {
            let path = dir.join(name);
            if path.exists() {
                fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            }
        }
        fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
        if let Some(root) = dir.parent() {
            // Only if empty: the root may hold other things that are not ours.
            let _ = fs::remove_dir(root);
        }
        Ok(())
    }
}

/// Typed handles on the maps.
pub struct ServiceMaps {
    pub services: HashMap<MapData, ServiceKeyV4, ServiceEntry>,
    pub frontend_addresses: HashMap<MapData, u32, u32>,
    pub backends: HashMap<MapData, u32, BackendV4>,
    pub rev_nat: HashMap<MapData, u32, RevNatV4>,
    pub conntrack: HashMap<MapData, ConntrackKeyV4, ConntrackEntryV4>,
    pub node: Array<MapData, NodeV4>,
}

impl ServiceMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
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
        })
    }

    /// Tells the kernel side which address SNATed flows leave with (0: none), which network
    /// namespace is the node's (the agent's own), and whether pods' sockets are balanced at
    /// connect() too.
    pub fn set_node(&mut self, node: &Node, socket_lb: SocketLbScope) -> Result<()> {
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

    /// The conntrack keys whose entries match `stale`: collected first, since deleting while
    /// iterating a hash map restarts the iteration.
    pub fn conntrack_keys_where(
        &self,
        mut stale: impl FnMut(&ConntrackKeyV4, &ConntrackEntryV4) -> bool,
    ) -> Result<Vec<ConntrackKeyV4>> {
        let mut keys = Vec::new();
        for item in self.conntrack.iter() {
            let (key, entry) = item.context("reading CONNTRACK_V4")?;
            if stale(&key, &entry) {
                keys.push(key);
            }
        }
        Ok(keys)
    }

    pub fn forget_flow(&mut self, key: &ConntrackKeyV4) -> Result<()> {
        match self.conntrack.remove(key) {
            // The LRU may have evicted it meanwhile: the goal is reached either way.
            Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
            Err(err) => Err(err).context("deleting a conntrack entry"),
        }
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

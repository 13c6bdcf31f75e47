//! Loading the kernel programs, owning their maps, and keeping both pinned: the datapath
//! outlives the agent (see `pins`, `links`, `layout`).

pub mod batch;
pub mod layout;
pub mod links;
mod maps;
pub mod pins;
mod syscall;

use std::{
    fs,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{DevMapHash, MapData},
    programs::{CgroupSockAddr, SchedClassifier, Xdp},
};
use service_common::{ALL_MAPS, SOCKET_REV_NAT_V4_MAP, XDP_EGRESS_MAP};

use self::{layout::Migration, pins::PinRootLock};
pub use self::{
    layout::{Layout, MapSizes, MapsOrigin},
    links::LinkPins,
    maps::{ServiceMaps, SocketLbScope},
};

/// The kernel object, compiled by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/service-ebpf"));

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
    /// The links `external_xdp` may redirect to.
    pub xdp_egress: DevMapHash<MapData>,
    /// Where maps and links are pinned, if they are.
    pinned: Option<Pinned>,
}

/// Where a pinned dataplane keeps its maps and links.
struct Pinned {
    /// Held while the agent runs: one agent per pin root.
    _lock: PinRootLock,
    links: LinkPins,
    /// Older layout directories, to retire once the links run this agent's programs.
    old_layouts: Vec<PathBuf>,
    /// How the maps came from one of them, if they did.
    migration: Option<Migration>,
    /// A layout still being built: (where, the name it gets once it serves).
    incoming: Option<(PathBuf, PathBuf)>,
}

impl Dataplane {
    /// Loads the programs with unpinned maps of the default sizes (the packet fixtures and the
    /// kernel benchmark: nothing is attached, nothing outlives the process).
    pub fn load_unpinned() -> Result<Self> {
        let ebpf = load_object(EbpfLoader::new(), MapSizes::DEFAULT)?;
        Self::from_object(ebpf, None)
    }

    /// Loads the programs with their maps pinned under `root` in the directory of `sizes`'
    /// layout: reused when a previous agent left them there (its services and flows go on),
    /// else built under a temporary name and filled from an older layout when one can be read.
    /// A layout gets its own name only once its maps hold what the node serves (copied, or
    /// after the first sync: [`Self::mark_serving`]), so an agent that stops half way never
    /// leaves a layout the next one would take for complete.
    pub fn load_pinned(root: &Path, sizes: MapSizes) -> Result<(Self, MapsOrigin)> {
        sizes.validate()?;
        pins::ensure_bpffs(root)?;
        let lock = PinRootLock::acquire(root)?;
        pins::remove_incoming(root)?;
        let layout = Layout::new(sizes);
        let dir = root.join(layout.name());
        let links = LinkPins::new(root);
        let old_layouts = pins::other_layouts(root, layout.name())?;
        if dir.exists() {
            let ebpf = load_object(pinned_loader(&dir), sizes)?;
            let pinned = Pinned {
                _lock: lock,
                links,
                old_layouts,
                migration: None,
                incoming: None,
            };
            let dataplane = Self::from_object(ebpf, Some(pinned))?;
            let origin = MapsOrigin::Reused;
            tracing::info!(pin_dir = %dir.display(), origin = ?origin, "dataplane loaded");
            return Ok((dataplane, origin));
        }
        let incoming = pins::incoming_dir(root, layout.name());
        let build = |share: bool| -> Result<(Ebpf, Option<Migration>)> {
            fs::create_dir_all(&incoming)
                .with_context(|| format!("creating the pin directory {}", incoming.display()))?;
            let migration = Migration::prepare(&old_layouts, &links, &incoming, sizes, share)?;
            Ok((load_object(pinned_loader(&incoming), sizes)?, migration))
        };
        let (ebpf, migration) = build(true)?;
        let mut pinned = Pinned {
            _lock: lock,
            links: links.clone(),
            old_layouts: old_layouts.clone(),
            migration: None,
            incoming: Some((incoming.clone(), dir.clone())),
        };
        let mut dataplane = Self::from_object(ebpf, None)?;
        let origin = match migration {
            None => MapsOrigin::New,
            Some(migration) => match migration.copy(&mut dataplane) {
                Ok(()) => {
                    let from = migration.from.clone();
                    pinned.migration = Some(migration);
                    MapsOrigin::Migrated(from)
                }
                Err(err) => {
                    // Start over with maps of its own (a shared conntrack would be purged of
                    // the old programs' flows by the first sync): the first sync fills them,
                    // and the links wait for it.
                    tracing::warn!("{err:#}; the new maps are filled by the first sync instead");
                    drop(dataplane);
                    pins::remove_layout(&incoming)?;
                    let (ebpf, _) = build(false)?;
                    dataplane = Self::from_object(ebpf, None)?;
                    MapsOrigin::New
                }
            },
        };
        dataplane.pinned = Some(pinned);
        if origin.serves() {
            dataplane.mark_serving()?;
        }
        tracing::info!(pin_dir = %incoming.display(), origin = ?origin, "dataplane loaded");
        Ok((dataplane, origin))
    }

    /// Whether the maps hold what the node should serve, so that links may run this agent's
    /// programs: reused or copied maps at once, new ones once [`Self::mark_serving`] says so.
    pub fn serving(&self) -> bool {
        self.pinned
            .as_ref()
            .is_some_and(|pinned| pinned.incoming.is_none())
    }

    /// Gives a layout built by this agent its own name: its maps hold what the node should
    /// serve, and links may run programs using them. Nothing to do for a reused layout.
    pub fn mark_serving(&mut self) -> Result<()> {
        let Some((incoming, dir)) = self
            .pinned
            .as_mut()
            .and_then(|pinned| pinned.incoming.take())
        else {
            return Ok(());
        };
        fs::rename(&incoming, &dir)
            .with_context(|| format!("renaming {} to {}", incoming.display(), dir.display()))?;
        tracing::info!(layout = %dir.display(), "map layout complete");
        Ok(())
    }

    fn from_object(mut ebpf: Ebpf, pinned: Option<Pinned>) -> Result<Self> {
        let xdp_egress = DevMapHash::try_from(
            ebpf.take_map(XDP_EGRESS_MAP)
                .with_context(|| format!("the object has no {XDP_EGRESS_MAP} map"))?,
        )?;
        let maps = ServiceMaps::take(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            xdp_egress,
            pinned,
        })
    }

    /// Where the links are pinned; None for an unpinned dataplane, which attaches nothing.
    pub fn link_pins(&self) -> Option<LinkPins> {
        self.pinned.as_ref().map(|pinned| pinned.links.clone())
    }

    /// Copies the flows the old programs recorded since the maps were copied from an older
    /// layout (when conntrack itself was copied, not shared): called just before the links get
    /// this agent's programs, and again once they all have.
    pub fn copy_late_flows(&mut self) -> Result<()> {
        let Some(migration) = self
            .pinned
            .as_mut()
            .and_then(|pinned| pinned.migration.take())
        else {
            return Ok(());
        };
        let copied = migration.copy_late_flows(self);
        if let Some(pinned) = &mut self.pinned {
            pinned.migration = Some(migration);
        }
        let flows = copied?;
        tracing::info!(
            flows,
            "copied the flows the old programs recorded since the copy"
        );
        Ok(())
    }

    /// Called once every link runs this agent's programs: the last late flows are copied, and
    /// the older layouts' pins are removed (their maps go with the last program using them).
    pub fn retire_old_layouts(&mut self) -> Result<()> {
        self.copy_late_flows()?;
        let Some(pinned) = &mut self.pinned else {
            return Ok(());
        };
        pinned.migration = None;
        for dir in std::mem::take(&mut pinned.old_layouts) {
            pins::remove_layout(&dir)?;
            tracing::info!(layout = %dir.display(), "old map layout removed");
        }
        Ok(())
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

    fn socket_rev_nat_fd(&self) -> Result<BorrowedFd<'_>> {
        let map = self
            .ebpf
            .map(SOCKET_REV_NAT_V4_MAP)
            .with_context(|| format!("the object has no {SOCKET_REV_NAT_V4_MAP} map"))?;
        Ok(map_data(map).fd().as_fd())
    }
}

/// The map data behind any kind of map.
fn map_data(map: &aya::maps::Map) -> &MapData {
    use aya::maps::Map;
    match map {
        Map::Array(data)
        | Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::DevMapHash(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data) => data,
        other => panic!("a map kind the object does not have: {other:?}"),
    }
}

/// A loader that pins every map under `dir` (reusing what is pinned there already).
fn pinned_loader(dir: &Path) -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    for name in ALL_MAPS {
        loader.map_pin_path(name, dir.join(name));
    }
    loader
}

fn load_object(mut loader: EbpfLoader<'_>, sizes: MapSizes) -> Result<Ebpf> {
    if EBPF_OBJECT.is_empty() {
        bail!("this agent was built with AYA_BUILD_SKIP=1 and carries no eBPF object");
    }
    for (name, entries) in sizes.max_entries() {
        loader.map_max_entries(name, entries);
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
    Ok(ebpf)
}

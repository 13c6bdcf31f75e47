//! Map layouts, and moving a node from one to the next without a moment without translation.
//!
//! A pinned map is reused by name, and aya does not check a reused map's key, value or size: a
//! map whose types or capacity change must get a new directory instead. The directory is named
//! after the layout version ([`PIN_LAYOUT`], bumped whenever a pinned type changes) and, when
//! they are not the defaults, the map sizes (`v6-lb65536-ct131072`).
//!
//! Across a layout change the new agent carries over the maps whose type and size did not
//! change (the same map object is pinned in the new directory too, so old and new programs
//! share it while the links are swapped), creates the others and copies every entry it can read
//! from the newest old layout into them (converting where a type changed), points the pinned
//! links at its programs, copies the flows the old programs recorded meanwhile (when conntrack
//! itself was copied), and only then removes the old layout. A layout it cannot read is not
//! copied: the links are then swapped after the first sync has filled the new maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Pod,
    maps::{DevMapHash, IterableMap as _, Map, MapData, MapInfo},
};
use service_common::{
    ALL_MAPS, BACKENDS_V4_MAP, BackendV4, CONNTRACK_V4_MAP, CONNTRACK_V4_MAX_ENTRIES, CT_FORWARD,
    CT_SEEN_NON_SYN, ConntrackEntryV4, ConntrackKeyV4, FRONTEND_ADDRESSES_V4_MAP,
    ID_WATERMARK_BACKEND, ID_WATERMARK_REV_NAT, ID_WATERMARKS_MAP, IPPROTO_TCP, PIN_LAYOUT,
    REV_NAT_V4_MAP, RevNatV4, SERVICES_V4_MAP, SERVICES_V4_MAX_ENTRIES, SOCKET_REV_NAT_V4_MAP,
    ServiceEntry, ServiceKeyV4, SocketRevNatKeyV4, SocketRevNatV4, XDP_EGRESS_MAP,
};

use super::{Dataplane, LinkPins, batch};
use crate::conntrack_gc::monotonic_coarse_seconds;

/// The capacities of the maps that grow with the cluster (`--lb-map-max`,
/// `--conntrack-map-max`). Entries are allocated as they are written (the service maps) or
/// preallocated (conntrack's LRU), so a capacity is a ceiling on kernel memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// `SERVICES_V4` entries (slot 0 and one per backend, per frontend); `BACKENDS_V4` gets
    /// half as many, `REV_NAT_V4` and `FRONTEND_ADDRESSES_V4` a quarter (the defaults'
    /// ratios).
    pub lb: u32,
    /// `CONNTRACK_V4` entries: two per flow.
    pub conntrack: u32,
}

impl MapSizes {
    pub const DEFAULT: Self = Self {
        lb: SERVICES_V4_MAX_ENTRIES,
        conntrack: CONNTRACK_V4_MAX_ENTRIES,
    };
    /// Below this the quarter-sized maps would hold almost nothing.
    pub const MIN: u32 = 16;

    pub fn validate(&self) -> Result<()> {
        if self.lb < Self::MIN || self.conntrack < Self::MIN {
            bail!(
                "map sizes must be at least {}: --lb-map-max {}, --conntrack-map-max {}",
                Self::MIN,
                self.lb,
                self.conntrack
            );
        }
        Ok(())
    }

    /// (map, max entries) for the loader.
    pub fn max_entries(&self) -> [(&'static str, u32); 5] {
        [
            (SERVICES_V4_MAP, self.lb),
            (BACKENDS_V4_MAP, self.lb / 2),
            (REV_NAT_V4_MAP, self.lb / 4),
            (FRONTEND_ADDRESSES_V4_MAP, self.lb / 4),
            (CONNTRACK_V4_MAP, self.conntrack),
        ]
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The name of the directory the maps of this build and these sizes are pinned in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout(String);

impl Layout {
    pub fn new(sizes: MapSizes) -> Self {
        if sizes == MapSizes::DEFAULT {
            Self(PIN_LAYOUT.to_owned())
        } else {
            Self(format!("{PIN_LAYOUT}-lb{}-ct{}", sizes.lb, sizes.conntrack))
        }
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The layout versions whose entries this build can read: its own, and v5 (the conntrack entry
/// of v5 had no `last_seen` in forward entries and no TCP state beyond FIN/RST).
fn readable_version(dir: &Path) -> Option<&'static str> {
    let name = dir.file_name()?.to_str()?;
    match name.split('-').next()? {
        version if version == PIN_LAYOUT => Some(PIN_LAYOUT),
        "v5" => Some("v5"),
        _ => None,
    }
}

/// Where the maps of a newly created layout came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapsOrigin {
    /// The layout's maps were pinned already: a restart or an upgrade without a layout change.
    Reused,
    /// Created and filled from an older layout's maps.
    Migrated(PathBuf),
    /// Created empty: nothing to reuse, or an older layout that could not be read.
    New,
}

impl MapsOrigin {
    /// Whether the maps already hold what the node served: the pinned links may run this
    /// agent's programs at once. Otherwise they wait for the first sync.
    pub fn serves(&self) -> bool {
        !matches!(self, MapsOrigin::New)
    }
}

/// Moving the maps of an older layout into this one.
#[derive(Debug)]
pub struct Migration {
    /// The layout directory the maps come from.
    pub from: PathBuf,
    version: &'static str,
    /// The maps whose type and size did not change: pinned in the new directory as well, they
    /// are the same map objects, which the old programs and the new ones use alike while the
    /// links are swapped: nothing needs copying, and nothing written meanwhile is lost.
    shared: BTreeSet<&'static str>,
}

impl Migration {
    /// Plans the move from `old_layouts` (newest first) into `dir`: from the one the pinned
    /// links' programs use, else the newest this build can read. With `share`, pins the maps
    /// that can be shared into `dir`, before the object is loaded (which then reuses them). None
    /// when no old layout can be read.
    pub fn prepare(
        old_layouts: &[PathBuf],
        links: &LinkPins,
        dir: &Path,
        sizes: MapSizes,
        share: bool,
    ) -> Result<Option<Self>> {
        let serving = links.serving_map_ids();
        let uses = |layout: &PathBuf| {
            MapInfo::from_pin(layout.join(SERVICES_V4_MAP))
                .is_ok_and(|info| serving.contains(&info.id()))
        };
        let readable = || {
            old_layouts
                .iter()
                .filter(|dir| readable_version(dir).is_some())
        };
        let Some(from) = readable()
            .find(|dir| uses(dir))
            .or_else(|| readable().next())
        else {
            return Ok(None);
        };
        let version = readable_version(from).expect("found readable");
        let mut shared = BTreeSet::new();
        if share && version == PIN_LAYOUT {
            let sized: BTreeMap<&str, u32> = sizes.max_entries().into_iter().collect();
            for name in ALL_MAPS {
                let old = from.join(name);
                let Ok(info) = MapInfo::from_pin(&old) else {
                    continue;
                };
                if sized
                    .get(name)
                    .is_some_and(|&wanted| wanted != info.max_entries())
                {
                    continue;
                }
                let map = MapData::from_pin(&old)
                    .with_context(|| format!("opening {}", old.display()))?;
                map.pin(dir.join(name))
                    .with_context(|| format!("pinning {} into {}", old.display(), dir.display()))?;
                shared.insert(name);
            }
        }
        Ok(Some(Self {
            from: from.clone(),
            version,
            shared,
        }))
    }

    /// Copies into `dataplane`'s new maps what the old layout's maps that were not shared hold
    /// (converting where a type changed).
    pub fn copy(&self, dataplane: &mut Dataplane) -> Result<()> {
        let (old, shared) = (&self.from, &self.shared);
        let maps = &dataplane.maps;
        let mut copied = BTreeMap::new();
        let mut copy_unless_shared = |name: &'static str, copy: &dyn Fn() -> Result<usize>| {
            if !shared.contains(name) {
                copied.insert(name, copy()?);
            }
            anyhow::Ok(())
        };
        copy_unless_shared(SERVICES_V4_MAP, &|| {
            copy::<ServiceKeyV4, ServiceEntry>(old, SERVICES_V4_MAP, fd_of(maps.services.map()))
        })?;
        copy_unless_shared(FRONTEND_ADDRESSES_V4_MAP, &|| {
            copy::<u32, u32>(
                old,
                FRONTEND_ADDRESSES_V4_MAP,
                fd_of(maps.frontend_addresses.map()),
            )
        })?;
        copy_unless_shared(BACKENDS_V4_MAP, &|| {
            copy::<u32, BackendV4>(old, BACKENDS_V4_MAP, fd_of(maps.backends.map()))
        })?;
        copy_unless_shared(REV_NAT_V4_MAP, &|| {
            copy::<u32, RevNatV4>(old, REV_NAT_V4_MAP, fd_of(maps.rev_nat.map()))
        })?;
        copy_unless_shared(CONNTRACK_V4_MAP, &|| {
            write_all(
                old,
                CONNTRACK_V4_MAP,
                fd_of(maps.conntrack.map()),
                self.flows()?,
            )
        })?;
        let sockets = dataplane.socket_rev_nat_fd()?;
        copy_unless_shared(SOCKET_REV_NAT_V4_MAP, &|| {
            copy::<SocketRevNatKeyV4, SocketRevNatV4>(old, SOCKET_REV_NAT_V4_MAP, sockets)
        })?;
        if !shared.contains(ID_WATERMARKS_MAP)
            && let Ok((backend, rev_nat)) = read_watermarks(old)
        {
            dataplane.maps.set_id_watermarks(backend, rev_nat)?;
        }
        if !shared.contains(XDP_EGRESS_MAP) {
            copy_xdp_egress(old, &mut dataplane.xdp_egress)?;
        }
        tracing::info!(
            from = %old.display(),
            shared = ?shared,
            copied = ?copied,
            "copied the previous map layout into the new maps"
        );
        Ok(())
    }

    /// The old layout's flows, converted to this build's entries.
    fn flows(&self) -> Result<Vec<(ConntrackKeyV4, ConntrackEntryV4)>> {
        let mut flows = read_all(&self.from, CONNTRACK_V4_MAP)?;
        if self.version == "v5" {
            let now = monotonic_coarse_seconds().context("reading the monotonic clock")?;
            for (key, entry) in &mut flows {
                from_v5(key, entry, now);
            }
        }
        Ok(flows)
    }

    /// After the links run the new programs: the flows the old programs recorded since the
    /// copy (a flow's first packets between the copy and the swap) are copied too, without
    /// overwriting what the new programs wrote meanwhile. Nothing to do when conntrack was
    /// shared.
    pub fn copy_late_flows(&self, dataplane: &mut Dataplane) -> Result<usize> {
        if self.shared.contains(CONNTRACK_V4_MAP) {
            return Ok(0);
        }
        let mut added = 0;
        for (key, entry) in self.flows()? {
            if dataplane.maps.conntrack.get(&key, 0).is_err()
                && dataplane
                    .maps
                    .conntrack
                    .insert(key, entry, BPF_NOEXIST)
                    .is_ok()
            {
                added += 1;
            }
        }
        Ok(added)
    }
}

fn read_watermarks(dir: &Path) -> Result<(u32, u32)> {
    let array = aya::maps::Array::<MapData, u32>::try_from(open_pinned(dir, ID_WATERMARKS_MAP)?)?;
    Ok((
        array.get(&ID_WATERMARK_BACKEND, 0)?,
        array.get(&ID_WATERMARK_REV_NAT, 0)?,
    ))
}

/// From uapi/linux/bpf.h: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

fn fd_of(map: &MapData) -> BorrowedFd<'_> {
    map.fd().as_fd()
}

fn open_pinned(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("reading the type of {}", path.display()))
}

/// Copies every entry of the hash map `name` in `dir` into `to`, whose types are the same.
fn copy<K: Pod, V: Pod>(dir: &Path, name: &str, to: BorrowedFd<'_>) -> Result<usize> {
    write_all(dir, name, to, read_all::<K, V>(dir, name)?)
}

/// Every entry of the hash map `name` pinned in `dir` (none if it is not there), read a chunk
/// per system call.
fn read_all<K: Pod, V: Pod>(dir: &Path, name: &str) -> Result<Vec<(K, V)>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let map = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let info = map
        .info()
        .with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        (info.key_size(), info.value_size()) == (size_of::<K>() as u32, size_of::<V>() as u32),
        "{} has other key or value types",
        path.display()
    );
    let mut entries = Vec::new();
    batch::lookup::<K, V>(map.fd().as_fd(), batch::CONNTRACK_CHUNK, |keys, values| {
        entries.extend(keys.iter().copied().zip(values.iter().copied()));
        Ok(())
    })
    .with_context(|| format!("reading {}", path.display()))?;
    Ok(entries)
}

/// Writes `entries` (of the map `name` in `dir`) into `to`.
fn write_all<K: Pod, V: Pod>(
    dir: &Path,
    name: &str,
    to: BorrowedFd<'_>,
    entries: Vec<(K, V)>,
) -> Result<usize> {
    let (keys, values): (Vec<K>, Vec<V>) = entries.into_iter().unzip();
    batch::update(to, &keys, &values).map_err(|stopped| {
        anyhow::Error::new(stopped.error).context(format!(
            "copying {}/{name}: {} of {} entries fit in the new map",
            dir.display(),
            stopped.written,
            keys.len()
        ))
    })?;
    Ok(keys.len())
}

/// A v5 forward entry kept no `last_seen` (0), and no entry said whether the TCP handshake was
/// over: the flow is taken as seen now, and a TCP flow as established (its lifetime is then
/// the longest; the collector ages it from here).
fn from_v5(key: &ConntrackKeyV4, entry: &mut ConntrackEntryV4, now: u32) {
    if key.direction == CT_FORWARD {
        entry.last_seen = now;
    }
    if key.protocol == IPPROTO_TCP {
        entry.flags |= CT_SEEN_NON_SYN;
    }
}

fn copy_xdp_egress(dir: &Path, to: &mut DevMapHash<MapData>) -> Result<()> {
    if !dir.join(XDP_EGRESS_MAP).exists() {
        return Ok(());
    }
    let from = DevMapHash::<MapData>::try_from(open_pinned(dir, XDP_EGRESS_MAP)?)?;
    for item in from.iter() {
        let (index, value) = item.context("reading the old XDP_EGRESS")?;
        to.insert(index, value.if_index, None, 0)
            .context("copying XDP_EGRESS")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use service_common::{CT_REVERSE, IPPROTO_UDP};

    use super::*;

    #[test]
    fn a_v5_forward_entry_is_seen_now_and_a_tcp_flow_counts_as_established() {
        let key = |protocol, direction| ConntrackKeyV4 {
            protocol,
            direction,
            ..ConntrackKeyV4::default()
        };
        let v5 = ConntrackEntryV4 {
            last_seen: 0,
            ..ConntrackEntryV4::default()
        };
        let mut forward = v5;
        from_v5(&key(IPPROTO_TCP, CT_FORWARD), &mut forward, 1000);
        assert_eq!(forward.last_seen, 1000);
        assert_ne!(forward.flags & CT_SEEN_NON_SYN, 0);

        let mut reverse = ConntrackEntryV4 {
            last_seen: 990,
            ..v5
        };
        from_v5(&key(IPPROTO_UDP, CT_REVERSE), &mut reverse, 1000);
        assert_eq!(reverse.last_seen, 990, "a v5 reverse entry kept its time");
        assert_eq!(reverse.flags & CT_SEEN_NON_SYN, 0, "UDP has no handshake");
    }

    #[test]
    fn a_layout_is_named_after_its_version_and_any_sizes_not_the_defaults() {
        assert_eq!(Layout::new(MapSizes::DEFAULT).name(), PIN_LAYOUT);
        let sizes = MapSizes {
            lb: 4096,
            ..MapSizes::DEFAULT
        };
        assert_eq!(
            Layout::new(sizes).name(),
            format!("{PIN_LAYOUT}-lb4096-ct{}", MapSizes::DEFAULT.conntrack)
        );
    }
}

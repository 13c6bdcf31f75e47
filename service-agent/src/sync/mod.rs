//! The one writer of the service maps: compares the desired model with what the maps hold and
//! writes the difference. A full resync (agent start) and an incremental change are the same call.

mod plan;

use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use service_common::IPPROTO_UDP;

pub use self::plan::{IdAllocator, MapContents, MapOp, desired_contents, diff};
use crate::{
    dataplane::ServiceMaps,
    model::{DesiredState, Node},
};

/// What one sync did, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub map_writes: usize,
    pub conntrack_purged: usize,
}

pub struct Syncer {
    /// What the maps hold: read once at start, then kept in step with every successful write.
    current: MapContents,
    ids: IdAllocator,
    node: Node,
}

impl Syncer {
    /// Reads what the maps hold now (empty on a fresh start, the previous agent's state when the
    /// maps were pinned), so the first sync only writes what differs.
    pub fn new(maps: &ServiceMaps, node: Node) -> Result<Self> {
        let current = maps.read_contents()?;
        let ids = IdAllocator::after(&current);
        Ok(Self { current, ids, node })
    }

    pub fn sync(&mut self, desired: &DesiredState, maps: &mut ServiceMaps) -> Result<SyncReport> {
        let next = desired_contents(desired, &self.node, &self.current, &mut self.ids);
        let ops = diff(&self.current, &next);
        let before = self.current.frontend_backends();
        for op in &ops {
            maps.apply(op)
                .with_context(|| format!("writing {op:?} to the service maps"))?;
            self.current.record(op);
        }
        let after = self.current.frontend_backends();
        let conntrack_purged = if before.is_subset(&after) {
            0
        } else {
            self.purge_conntrack(&before, &after, maps)?
        };
        Ok(SyncReport {
            map_writes: ops.len(),
            conntrack_purged,
        })
    }

    /// Forgets flows whose backend no longer exists, and UDP flows whose backend left their
    /// frontend: a UDP client keeps its 5-tuple forever, so without this it would keep talking to
    /// a removed endpoint (kube-proxy's stale UDP conntrack). TCP flows to a backend that left one
    /// service but still exists are left to finish (graceful termination).
    fn purge_conntrack(
        &self,
        before: &BTreeSet<(u32, u32)>,
        after: &BTreeSet<(u32, u32)>,
        maps: &mut ServiceMaps,
    ) -> Result<usize> {
        let removed: BTreeSet<&(u32, u32)> = before.difference(after).collect();
        let stale = maps.conntrack_keys_where(|key, entry| {
            !self.current.backends.contains_key(&entry.backend_id)
                || (key.protocol == IPPROTO_UDP
                    && removed.contains(&(entry.rev_nat_id, entry.backend_id)))
        })?;
        for key in &stale {
            maps.forget_flow(key)?;
        }
        Ok(stale.len())
    }
}

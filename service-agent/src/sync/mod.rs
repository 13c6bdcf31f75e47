//! The one writer of the service maps: compares the desired model with what the maps hold and
//! writes the difference. A full resync (agent start) and an incremental change are the same call;
//! the ledger makes the second cost what the change touched, not what the node serves.

mod contents;
mod ledger;
mod plan;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use service_common::IPPROTO_UDP;

pub use self::{
    contents::{IdAllocator, MapContents, MapOp, diff},
    ledger::{Ledger, Plan},
};
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
    ledger: Ledger,
}

impl Syncer {
    /// Reads what the maps hold now (empty on a fresh start, the previous agent's state when the
    /// maps were pinned), so the first sync only writes what differs.
    pub fn new(maps: &ServiceMaps, node: Node) -> Result<Self> {
        Ok(Self {
            ledger: Ledger::new(maps.read_contents()?, node),
        })
    }

    pub fn sync(&mut self, desired: &DesiredState, maps: &mut ServiceMaps) -> Result<SyncReport> {
        let plan = self.ledger.plan(desired);
        // Consecutive writes of one kind go to the kernel together, still in the plan's order.
        let runs = plan
            .ops
            .chunk_by(|a, b| std::mem::discriminant(a) == std::mem::discriminant(b));
        for run in runs {
            let written = maps.apply_run(run);
            let done = written
                .as_ref()
                .map_or_else(|stopped| stopped.written, |()| run.len());
            for op in &run[..done] {
                self.ledger.record(op);
            }
            if let Err(stopped) = written {
                // The maps hold the last good state plus the writes that succeeded: the next
                // sync compares all of them.
                self.ledger.write_failed();
                let op = &run[done.min(run.len() - 1)];
                return Err(anyhow::Error::new(stopped.error)
                    .context(format!("writing {op:?} to the service maps")));
            }
        }
        let backend_deleted = plan
            .ops
            .iter()
            .any(|op| matches!(op, MapOp::DeleteBackend(_)));
        let conntrack_purged = if backend_deleted || !plan.removed_pairs.is_empty() {
            self.purge_conntrack(&plan.removed_pairs, maps)?
        } else {
            0
        };
        Ok(SyncReport {
            map_writes: plan.ops.len(),
            conntrack_purged,
        })
    }

    /// Forgets flows whose backend no longer exists, and UDP flows whose backend left their
    /// frontend: a UDP client keeps its 5-tuple forever, so without this it would keep talking to
    /// a removed endpoint (kube-proxy's stale UDP conntrack). TCP flows to a backend that left one
    /// service but still exists are left to finish (graceful termination).
    fn purge_conntrack(
        &self,
        removed: &BTreeSet<(u32, u32)>,
        maps: &mut ServiceMaps,
    ) -> Result<usize> {
        let backends = &self.ledger.current().backends;
        let stale = maps
            .conntrack_keys_where(|key, entry| {
                !backends.contains_key(&entry.backend_id)
                    || (key.protocol == IPPROTO_UDP
                        && removed.contains(&(entry.rev_nat_id, entry.backend_id)))
            })
            .context("looking for flows of removed backends")?;
        for key in &stale {
            maps.forget_flow(key)?;
        }
        Ok(stale.len())
    }
}

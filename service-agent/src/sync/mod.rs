//! The one writer of the service maps: compares the desired model with what the maps hold and
//! writes the difference. A full resync (agent start) and an incremental change are the same call;
//! the ledger makes the second cost what the change touched, not what the node serves.

mod contents;
mod error;
mod ledger;
mod maps;
mod plan;
#[cfg(test)]
mod syncer_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use anyhow::Context as _;
use service_common::IPPROTO_UDP;

pub use self::{
    contents::{IdAllocator, MapContents, MapOp, NextIds, Removals, ServiceMap, diff},
    error::{MapFull, SyncError},
    ledger::{Ledger, Plan},
    maps::Maps,
};
use crate::model::{DesiredState, Node};

/// What one sync did, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub map_writes: usize,
    pub conntrack_purged: usize,
    /// Deletes that found their entry already gone (counted as done): the maps held less than
    /// the syncer thought, so the next sync re-reads them.
    pub already_deleted: usize,
}

pub struct Syncer {
    ledger: Ledger,
    /// What `ID_WATERMARKS` holds, as this syncer last read or wrote it.
    recorded_ids: NextIds,
    /// The maps may hold other than the ledger thinks (a sync failed part way, or a delete found
    /// nothing): the next sync reads them again, compares them whole, and removes this much
    /// first (also the backends that frontends which stay lose, after a map was full).
    reread: Option<Removals>,
    /// At start and after a failure: the next sync purges every flow that names an id the maps
    /// no longer hold, whether or not it deletes anything (a previous agent may have crashed
    /// between deleting a backend and purging its flows).
    purge_due: bool,
    /// (rev-NAT id, backend id) pairs removed by syncs that failed before their purge ran.
    unpurged_pairs: BTreeSet<(u32, u32)>,
}

impl Syncer {
    /// Reads what the maps hold now (empty on a fresh start, the previous agent's state when the
    /// maps were pinned), so the first sync only writes what differs, and the id watermarks, so
    /// that no id a conntrack entry may name is handed out again.
    pub fn new(maps: &impl Maps, node: Node) -> anyhow::Result<Self> {
        let recorded_ids = maps.id_watermarks()?;
        Ok(Self {
            ledger: Ledger::new(maps.read_contents()?, recorded_ids, node),
            recorded_ids,
            reread: None,
            purge_due: true,
            unpurged_pairs: BTreeSet::new(),
        })
    }

    /// Brings the maps to `desired`: removals first, so that a full map takes what they free.
    /// On failure the maps hold the last good state, minus what the removals took, plus whatever
    /// additions were written, none of it half-written; calling again with the same state
    /// retries from what the maps then hold. After a map was full, the retry also shrinks the
    /// frontends that stay to the backends they keep before adding anything (see
    /// [`Removals::FrontendsAndSlots`]): a backend replaced in a full map then makes room for its
    /// successor.
    pub fn sync(
        &mut self,
        desired: &DesiredState,
        maps: &mut impl Maps,
    ) -> Result<SyncReport, SyncError> {
        if let Some(removals) = self.reread {
            let contents = (maps.read_contents())
                .context("re-reading the service maps after a failed sync")
                .map_err(SyncError::Other)?;
            self.ledger.reload(contents, removals);
            self.reread = None;
        }
        let plan = self.ledger.plan(desired);
        let written = self.write(&plan, maps);
        let already_deleted = match written {
            Ok(already_deleted) => already_deleted,
            Err(error) => {
                self.reread = Some(match error {
                    SyncError::MapFull(_) => Removals::FrontendsAndSlots,
                    _ => Removals::Frontends,
                });
                self.purge_due = true;
                self.unpurged_pairs.extend(&plan.removed_pairs);
                return Err(error);
            }
        };
        self.reread = (already_deleted > 0).then_some(Removals::Frontends);
        let deleted_ids = (plan.ops.iter())
            .any(|op| matches!(op, MapOp::DeleteBackend(_) | MapOp::DeleteRevNat(_)));
        let mut removed = std::mem::take(&mut self.unpurged_pairs);
        if !removed.is_empty() {
            // Pairs of a failed sync that the maps hold again are not stale.
            let programmed = self.ledger.current().frontend_backends();
            removed.retain(|pair| !programmed.contains(pair));
        }
        removed.extend(&plan.removed_pairs);
        let conntrack_purged = if self.purge_due || deleted_ids || !removed.is_empty() {
            match self.purge_conntrack(&removed, maps) {
                Ok(purged) => purged,
                Err(error) => {
                    self.purge_due = true;
                    self.unpurged_pairs = removed;
                    return Err(SyncError::Other(error));
                }
            }
        } else {
            0
        };
        self.purge_due = false;
        Ok(SyncReport {
            map_writes: plan.ops.len(),
            conntrack_purged,
            already_deleted,
        })
    }

    /// Records the id watermarks, then writes `plan` and records each write that reached the
    /// maps in the ledger. Ok(how many deletes found nothing to delete).
    fn write(&mut self, plan: &Plan, maps: &mut impl Maps) -> Result<usize, SyncError> {
        let next = self.ledger.next_ids();
        if next != self.recorded_ids {
            (maps.set_id_watermarks(next))
                .context("recording the next backend and rev-NAT ids")
                .map_err(SyncError::Other)?;
            self.recorded_ids = next;
        }
        let mut already_deleted = 0;
        let mut run_start = 0;
        // Consecutive writes of one kind go to the kernel together, still in the plan's order.
        for run in plan
            .ops
            .chunk_by(|a, b| std::mem::discriminant(a) == std::mem::discriminant(b))
        {
            let mut rest = run;
            while !rest.is_empty() {
                let Err(stopped) = maps.apply_run(rest) else {
                    rest.iter().for_each(|op| self.ledger.record(op));
                    break;
                };
                let done = stopped.written.min(rest.len());
                rest[..done].iter().for_each(|op| self.ledger.record(op));
                let failed = done.min(rest.len() - 1);
                // A batch delete stops at the first key that is not there (ENOENT): that entry
                // is as deleted as it can be, and the rest of the run goes on.
                if done < rest.len()
                    && rest[done].is_delete()
                    && stopped.error.raw_os_error() == Some(libc::ENOENT)
                {
                    self.ledger.record(&rest[done]);
                    already_deleted += 1;
                    rest = &rest[done + 1..];
                    continue;
                }
                let at = run_start + (run.len() - rest.len()) + failed;
                return Err(self.write_failed(plan, at, stopped.error, maps));
            }
            run_start += run.len();
        }
        Ok(already_deleted)
    }

    /// The error for `plan.ops[at]` failing with `error`.
    fn write_failed(
        &self,
        plan: &Plan,
        at: usize,
        error: std::io::Error,
        maps: &impl Maps,
    ) -> SyncError {
        let op = &plan.ops[at];
        let map = op.map().name();
        let out_of_memory = match error.raw_os_error() {
            // The kernel's hash maps answer E2BIG to a new key when they hold max_entries, and
            // ENOMEM when they allocate as they fill (BPF_F_NO_PREALLOC) and cannot.
            Some(libc::E2BIG) if !op.is_delete() => false,
            Some(libc::ENOMEM) if !op.is_delete() => true,
            _ => {
                return SyncError::Write {
                    map,
                    op: op.clone(),
                    error,
                };
            }
        };
        let puts = |ops: &[MapOp]| {
            (ops.iter())
                .filter(|other| !other.is_delete() && other.map() == op.map())
                .cloned()
                .collect::<Vec<_>>()
        };
        let unwritten = puts(&plan.ops[at..]);
        SyncError::MapFull(MapFull {
            map,
            capacity: maps.capacity(op.map()),
            unwritten: unwritten.len(),
            planned: puts(&plan.ops).len(),
            services: self.ledger.services_writing(&unwritten),
            out_of_memory,
        })
    }

    /// Forgets flows that name a backend or a rev-NAT entry the maps no longer hold (after an
    /// agent restart, an id the previous agent deleted), and UDP flows whose backend left their
    /// frontend: a UDP client keeps its 5-tuple forever, so without this it would keep talking
    /// to a removed endpoint (kube-proxy's stale UDP conntrack). TCP flows to a backend that
    /// left one service but still exists are left to finish (graceful termination).
    fn purge_conntrack(
        &self,
        removed: &BTreeSet<(u32, u32)>,
        maps: &mut impl Maps,
    ) -> anyhow::Result<usize> {
        let current = self.ledger.current();
        maps.forget_flows_where(&mut |key, entry| {
            !current.backends.contains_key(&entry.backend_id)
                || !current.rev_nat.contains_key(&entry.rev_nat_id)
                || (key.protocol == IPPROTO_UDP
                    && removed.contains(&(entry.rev_nat_id, entry.backend_id)))
        })
        .context("forgetting the flows of removed backends and frontends")
    }
}

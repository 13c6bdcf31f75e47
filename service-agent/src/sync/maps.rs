//! What the syncer needs of the service maps: the agent's `ServiceMaps`, or in the syncer's
//! tests small BPF maps of the same kinds (which need no eBPF object).

use anyhow::Result;
use service_common::{ConntrackEntryV4, ConntrackKeyV4};

use super::contents::{MapContents, MapOp, NextIds};
use crate::dataplane::{ServiceMaps, batch};

pub trait Maps {
    /// Every entry of the service maps.
    fn read_contents(&self) -> Result<MapContents>;

    /// Writes a run of operations of one kind, in order, with one system call; a run that stops
    /// part way says how many were written and why the next was not.
    fn apply_run(&mut self, run: &[MapOp]) -> Result<(), batch::Stopped>;

    /// The name of the map `op` writes, and the most entries it holds.
    fn target_of(&self, op: &MapOp) -> (&'static str, u32);

    /// The ids a previous agent recorded (zeros on new maps).
    fn id_watermarks(&self) -> Result<NextIds>;

    fn set_id_watermarks(&mut self, next: NextIds) -> Result<()>;

    /// The conntrack keys whose entries match `stale`.
    fn conntrack_keys_where(
        &self,
        stale: &mut dyn FnMut(&ConntrackKeyV4, &ConntrackEntryV4) -> bool,
    ) -> Result<Vec<ConntrackKeyV4>>;

    /// Deletes a conntrack entry; one already gone is fine.
    fn forget_flow(&mut self, key: &ConntrackKeyV4) -> Result<()>;
}

impl Maps for ServiceMaps {
    fn read_contents(&self) -> Result<MapContents> {
        ServiceMaps::read_contents(self)
    }

    fn apply_run(&mut self, run: &[MapOp]) -> Result<(), batch::Stopped> {
        ServiceMaps::apply_run(self, run)
    }

    fn target_of(&self, op: &MapOp) -> (&'static str, u32) {
        ServiceMaps::target_of(self, op)
    }

    fn id_watermarks(&self) -> Result<NextIds> {
        let (backend, rev_nat) = ServiceMaps::id_watermarks(self)?;
        Ok(NextIds { backend, rev_nat })
    }

    fn set_id_watermarks(&mut self, next: NextIds) -> Result<()> {
        ServiceMaps::set_id_watermarks(self, next.backend, next.rev_nat)
    }

    fn conntrack_keys_where(
        &self,
        stale: &mut dyn FnMut(&ConntrackKeyV4, &ConntrackEntryV4) -> bool,
    ) -> Result<Vec<ConntrackKeyV4>> {
        ServiceMaps::conntrack_keys_where(self, stale)
    }

    fn forget_flow(&mut self, key: &ConntrackKeyV4) -> Result<()> {
        ServiceMaps::forget_flow(self, key)
    }
}

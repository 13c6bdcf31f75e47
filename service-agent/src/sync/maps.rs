//! What the syncer needs of the service maps: the agent's `ServiceMaps`, or in the syncer's
//! tests small BPF maps of the same kinds (which need no eBPF object).

use anyhow::Result;
use service_common::{ConntrackEntryV4, ConntrackKeyV4};

use super::contents::{MapContents, MapOp, NextIds, ServiceMap};
use crate::dataplane::{ServiceMaps, batch};

pub trait Maps {
    /// Every entry of the service maps.
    fn read_contents(&self) -> Result<MapContents>;

    /// Writes a run of operations of one kind, in order, with one system call; a run that stops
    /// part way says how many were written and why the next was not.
    fn apply_run(&mut self, run: &[MapOp]) -> Result<(), batch::Stopped>;

    /// The most entries `map` holds.
    fn capacity(&self, map: ServiceMap) -> u32;

    /// The ids a previous agent recorded (zeros on new maps).
    fn id_watermarks(&self) -> Result<NextIds>;

    fn set_id_watermarks(&mut self, next: NextIds) -> Result<()>;

    /// Deletes the conntrack entries that match `stale`, each judged again on a fresh lookup
    /// just before its delete (see [`batch::delete_where`]): how many it deleted.
    fn forget_flows_where(
        &mut self,
        stale: &mut dyn FnMut(&ConntrackKeyV4, &ConntrackEntryV4) -> bool,
    ) -> Result<usize>;
}

impl Maps for ServiceMaps {
    fn read_contents(&self) -> Result<MapContents> {
        ServiceMaps::read_contents(self)
    }

    fn apply_run(&mut self, run: &[MapOp]) -> Result<(), batch::Stopped> {
        ServiceMaps::apply_run(self, run)
    }

    fn capacity(&self, map: ServiceMap) -> u32 {
        ServiceMaps::capacity(self, map)
    }

    fn id_watermarks(&self) -> Result<NextIds> {
        let (backend, rev_nat) = ServiceMaps::id_watermarks(self)?;
        Ok(NextIds { backend, rev_nat })
    }

    fn set_id_watermarks(&mut self, next: NextIds) -> Result<()> {
        ServiceMaps::set_id_watermarks(self, next.backend, next.rev_nat)
    }

    fn forget_flows_where(
        &mut self,
        stale: &mut dyn FnMut(&ConntrackKeyV4, &ConntrackEntryV4) -> bool,
    ) -> Result<usize> {
        ServiceMaps::forget_flows_where(self, stale)
    }
}

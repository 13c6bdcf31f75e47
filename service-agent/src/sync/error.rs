//! Why a sync failed, typed so that a full map is told from other failures: the syncer's retry
//! then shrinks the frontends that stay before it adds anything (see
//! `Removals::FrontendsAndSlots`), and the message names the map, its room and the Services left
//! out, for the run loop's one log line (a full map lasts until Services go or the maps grow).

use std::{fmt, io};

use super::contents::MapOp;
use crate::model::ServiceName;

#[derive(Debug)]
pub enum SyncError {
    /// A write found no room in its map. Everything before it was written (the removals of the
    /// plan first of all); nothing after it was.
    MapFull(MapFull),
    /// A write failed for another reason.
    Write {
        map: &'static str,
        op: MapOp,
        error: io::Error,
    },
    /// Reading the maps, recording the id watermarks, or purging conntrack failed.
    Other(anyhow::Error),
}

/// A map without room for a plan's writes, and whom that leaves out.
#[derive(Debug)]
pub struct MapFull {
    pub map: &'static str,
    /// The most entries the map holds.
    pub capacity: u32,
    /// The plan's writes to this map that did not happen: the one the kernel refused and every
    /// later one, since a plan stops at its first failure.
    pub unwritten: usize,
    /// All of the plan's writes to this map.
    pub planned: usize,
    /// The Services whose entries were among the unwritten, by name.
    pub services: Vec<ServiceName>,
    /// The kernel could not allocate an entry (ENOMEM: memory-cgroup pressure on maps that
    /// allocate as they fill) rather than the map holding `capacity` entries (E2BIG).
    pub out_of_memory: bool,
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncError::MapFull(full) => full.fmt(f),
            SyncError::Write { map, op, error } => write!(f, "writing {op:?} to {map}: {error}"),
            SyncError::Other(error) => write!(f, "{error:#}"),
        }
    }
}

impl std::error::Error for SyncError {}

impl fmt::Display for MapFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let MapFull {
            map,
            capacity,
            unwritten,
            planned,
            ..
        } = self;
        if self.out_of_memory {
            write!(
                f,
                "{map} could not grow (the kernel is out of memory for BPF maps; it holds \
                 {capacity} entries at most)"
            )?;
        } else {
            write!(f, "{map} is full ({capacity} entries)")?;
        }
        write!(f, ": {unwritten} of {planned} writes did not fit")?;
        if let Some((first, others)) = self.services.split_first() {
            write!(f, ", for {first}")?;
            match others.len() {
                0 => {}
                1 => write!(f, " and 1 more Service")?,
                more => write!(f, " and {more} more Services")?,
            }
        }
        write!(f, "; the last good state keeps serving")
    }
}

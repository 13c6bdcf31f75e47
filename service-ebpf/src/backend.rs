//! Choosing a backend among a frontend's slots, the same way for the packet path (a new flow)
//! and the socket hooks (a connect or datagram of the node's own processes).

use service_common::{BackendV4, ServiceKeyV4};

use crate::maps::{BACKENDS_V4, SERVICES_V4};

/// The backend in slot `seed % count + 1` of `frontend` (the slot-0 key, whose entry gave
/// `count`), with its id. None when there is no endpoint, or when a slot or backend was caught
/// mid-update by the agent.
#[inline(always)]
pub fn choose(frontend: &ServiceKeyV4, count: u16, seed: u32) -> Option<(u32, BackendV4)> {
    if count == 0 {
        return None;
    }
    let slot_key = ServiceKeyV4 {
        slot: (seed % u32::from(count)) as u16 + 1,
        ..*frontend
    };
    // SAFETY: map values are plain data; a concurrent update can at worst give a stale value.
    let backend_id = unsafe { SERVICES_V4.get(slot_key) }?.backend_id;
    let backend = unsafe { BACKENDS_V4.get(backend_id) }.copied()?;
    Some((backend_id, backend))
}

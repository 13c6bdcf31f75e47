//! The endpoints of one service port as the model wants them: sorted by (address, port), one
//! entry per (address, port).

use std::{collections::BTreeMap, net::Ipv4Addr};

use crate::model::Endpoint;

#[derive(Default)]
pub struct EndpointSet(BTreeMap<(Ipv4Addr, u16), Endpoint>);

impl EndpointSet {
    /// Two sources may list the same address and port (an Endpoints object and a slice, or two
    /// hostNetwork pods): the most usable report wins, so a stale "not ready" cannot hide a
    /// ready endpoint.
    pub fn insert(&mut self, endpoint: Endpoint) {
        let usability = |e: &Endpoint| (e.ready, e.serving, !e.terminating);
        self.0
            .entry((endpoint.address, endpoint.port))
            .and_modify(|kept| {
                if usability(&endpoint) > usability(kept) {
                    *kept = endpoint.clone();
                }
            })
            .or_insert(endpoint);
    }

    pub fn into_sorted(self) -> Vec<Endpoint> {
        self.0.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(last_octet: u8, port: u16, ready: bool, terminating: bool) -> Endpoint {
        Endpoint {
            address: Ipv4Addr::new(10, 0, 0, last_octet),
            port,
            ready,
            serving: ready || terminating,
            terminating,
            node_name: None,
        }
    }

    #[test]
    fn sorts_and_keeps_the_most_usable_duplicate() {
        let mut set = EndpointSet::default();
        set.insert(endpoint(9, 80, true, false));
        set.insert(endpoint(2, 8080, false, true));
        set.insert(endpoint(2, 80, false, true));
        set.insert(endpoint(2, 80, true, false));
        set.insert(endpoint(2, 80, false, true));
        assert_eq!(
            set.into_sorted(),
            [
                endpoint(2, 80, true, false),
                endpoint(2, 8080, false, true),
                endpoint(9, 80, true, false),
            ]
        );
    }
}

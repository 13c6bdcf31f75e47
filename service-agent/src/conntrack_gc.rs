//! The conntrack collector: deletes the `CONNTRACK_V4` entries of flows that expired.
//!
//! The packet path already ignores an expired entry it meets (it balances a client's packet
//! afresh, leaves a reply untranslated), so the collector is not what makes expiry correct: it
//! frees the table. The map is an LRU, which evicts when full, but eviction takes the least
//! recently used entry, not a dead one, and a table full of dead flows evicts live ones sooner;
//! an idle node would also keep stale entries for ever. Entries are judged by the kernel's own
//! rule, [`conntrack_expired`], on the kernel's own clock ([`monotonic_coarse_seconds`]).
//!
//! How often it runs follows Cilium's conntrack GC (`pkg/maps/ctmap/gc/gc.go`,
//! `calculateIntervalWithConfig`): a run that deleted many entries brings the next one closer, a
//! run that found little pushes it away; see [`next_interval`].

use std::{
    io,
    os::fd::BorrowedFd,
    time::{Duration, Instant},
};

use service_common::{ConntrackEntryV4, ConntrackKeyV4, ConntrackLifetimes, conntrack_expired};

use crate::dataplane::batch;

/// Cilium's `ConntrackGCStartingInterval`: the interval before the first figures are known.
pub const STARTING_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Cilium's `ConntrackGCMinInterval`.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Cilium's `ConntrackGCMaxLRUInterval`, its bound for LRU conntrack maps as ours is (non-LRU
/// maps get 30 min there): an LRU table cannot fill up with dead entries between two runs.
pub const MAX_INTERVAL: Duration = Duration::from_secs(12 * 60 * 60);

/// Deletes expired conntrack entries, and says when it should run next.
///
/// The run loop calls [`collect`](Self::collect) once at start (maps pinned across an agent
/// restart may hold flows long dead) and then each time [`interval`](Self::interval) has passed
/// since the previous run, logging each run's [`CollectionReport`].
#[derive(Debug)]
pub struct ConntrackCollector {
    lifetimes: ConntrackLifetimes,
    max_entries: u32,
    interval: Duration,
}

/// The figures of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CollectionReport {
    /// Entries read.
    pub scanned: usize,
    /// Entries deleted because their flow expired.
    pub deleted: usize,
    /// How long the run took.
    pub took: Duration,
    /// When the next run is due, after this one: [`ConntrackCollector::interval`].
    pub next_interval: Duration,
}

impl ConntrackCollector {
    /// A collector for a conntrack map of `max_entries` whose entries live `lifetimes` (those
    /// the agent wrote into `NODE_V4`, so that the kernel and the collector judge alike).
    pub fn new(lifetimes: ConntrackLifetimes, max_entries: u32) -> Self {
        Self {
            lifetimes,
            max_entries,
            interval: STARTING_INTERVAL,
        }
    }

    /// How long to wait after a run before the next one.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Deletes the entries of the conntrack map `conntrack` (`CONNTRACK_V4`) whose flow expired,
    /// and sets the next interval from how many there were. A run that fails part way keeps the
    /// interval; what it deleted stays deleted.
    pub fn collect(&mut self, conntrack: BorrowedFd) -> io::Result<CollectionReport> {
        let started = Instant::now();
        let swept = sweep(
            conntrack,
            monotonic_coarse_seconds()?,
            &self.lifetimes,
            batch::CONNTRACK_CHUNK,
        )?;
        self.interval = next_interval(self.interval, swept.deleted, self.max_entries);
        Ok(CollectionReport {
            scanned: swept.scanned,
            deleted: swept.deleted,
            took: started.elapsed(),
            next_interval: self.interval,
        })
    }
}

/// The interval after a run that deleted `deleted` entries of a map of `max_entries`, the
/// previous interval being `previous`: Cilium's rule, ratio included. Cilium divides by the
/// map's capacity, not by the entries scanned: the question is how much of the table dead flows
/// took up, and a nearly empty table whose few entries all expired needs no hurry.
/// - nothing deleted: unchanged (Cilium too: an idle node is no reason to wait longer);
/// - under 5% of the capacity: 1.5 times longer, at most [`MAX_INTERVAL`];
/// - over 25%: shorter in proportion, `previous * (1 - ratio)` with the ratio taken as 90% at
///   most (so 1.33 to 10 times shorter), at least [`MIN_INTERVAL`];
/// - in between: unchanged.
///
/// Rounded to whole seconds, as Cilium does. Cilium also scales the ratio up when a run came
/// before its interval had passed (it can be woken by the datapath); this collector runs only
/// when its interval has passed, so that case does not arise.
pub fn next_interval(previous: Duration, deleted: usize, max_entries: u32) -> Duration {
    let ratio = deleted as f64 / f64::from(max_entries.max(1));
    let scaled = |factor: f64| Duration::from_secs_f64((previous.as_secs_f64() * factor).round());
    if ratio == 0.0 {
        previous
    } else if ratio > 0.25 {
        scaled(1.0 - ratio.min(0.9)).max(MIN_INTERVAL)
    } else if ratio < 0.05 {
        scaled(1.5).min(MAX_INTERVAL)
    } else {
        previous
    }
}

/// The clock `bpf_ktime_get_coarse_ns` reads, CLOCK_MONOTONIC_COARSE, in whole seconds: the
/// unit and clock of [`ConntrackEntryV4::last_seen`]. Not CLOCK_MONOTONIC, which runs up to a
/// tick ahead of it (a second boundary crossed here before the kernel's entries see it), nor
/// CLOCK_BOOTTIME, which also counts suspended time. The agent must run in the host's time
/// namespace (a container's default): a time namespace offsets the monotonic clocks of its
/// processes, but not the one BPF programs read.
pub fn monotonic_coarse_seconds() -> io::Result<u32> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec into `now`.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Truncated as the kernel side truncates its nanoseconds / 10^9.
    Ok(now.tv_sec as u32)
}

/// Deletes the entries of `conntrack` expired at `now`, reading `chunk` at a time and deleting
/// each chunk's expired entries before reading on.
///
/// Between the read that finds an entry expired and its delete, the packet path may write the
/// key anew: a client reusing its port starts a new flow on the tuple (the packet path treats the
/// expired entry as gone and records the new flow under the same key), or a packet meeting the
/// flow's other entry, still alive, refreshes both. Deleting then would take the live entry. So
/// each entry is looked up again just before its delete and deleted only if it is still expired
/// by the same rule ([`batch::delete_where`]): what is left of the window is the moment between
/// that lookup and the delete. An entry lost there costs its flow no more than an LRU eviction
/// does: a client packet rebuilds a missing reverse entry from the forward one, a reply a missing
/// forward entry from the reverse one (and a client packet that finds its forward entry gone
/// first is balanced as a new flow, as after an eviction).
fn sweep(
    conntrack: BorrowedFd,
    now: u32,
    lifetimes: &ConntrackLifetimes,
    chunk: usize,
) -> io::Result<batch::Swept> {
    batch::delete_where(conntrack, chunk, expired_at(now, lifetimes))
}

/// The collector's rule, for the read and the re-check alike: whether an entry is past its
/// lifetime at `now`, as the kernel judges it.
fn expired_at(
    now: u32,
    lifetimes: &ConntrackLifetimes,
) -> impl Fn(&ConntrackKeyV4, &ConntrackEntryV4) -> bool + '_ {
    move |key, entry| conntrack_expired(entry, key.protocol, now, lifetimes)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd as _, OwnedFd};

    use service_common::{
        CT_FIN_FROM_BACKEND, CT_FIN_FROM_CLIENT, CT_FORWARD, CT_RESET, CT_REVERSE, CT_SEEN_NON_SYN,
        IPPROTO_TCP, IPPROTO_UDP,
    };

    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_interval_starts_at_five_minutes() {
        let collector = ConntrackCollector::new(ConntrackLifetimes::DEFAULT, 1000);
        assert_eq!(collector.interval(), 5 * MINUTE);
    }

    #[test]
    fn the_interval_grows_by_half_when_under_5_percent_of_the_table_was_deleted() {
        assert_eq!(next_interval(5 * MINUTE, 1, 1000), Duration::from_secs(450));
        assert_eq!(
            next_interval(5 * MINUTE, 49, 1000),
            Duration::from_secs(450)
        );
        // The ratio is to the capacity, whatever was scanned: 10 deleted is 1% of 1000, even
        // if the table held only 20 entries.
        assert_eq!(
            next_interval(5 * MINUTE, 10, 1000),
            Duration::from_secs(450)
        );
        // Rounded to whole seconds.
        assert_eq!(
            next_interval(Duration::from_secs(11), 1, 1000),
            Duration::from_secs(17)
        );
    }

    #[test]
    fn the_interval_grows_to_12_hours_at_most() {
        let mut interval = 5 * MINUTE;
        for _ in 0..20 {
            interval = next_interval(interval, 1, 1000);
        }
        assert_eq!(interval, MAX_INTERVAL);
        assert_eq!(next_interval(11 * 60 * MINUTE, 1, 1000), MAX_INTERVAL);
    }

    #[test]
    fn the_interval_stays_when_nothing_or_between_5_and_25_percent_was_deleted() {
        for deleted in [0, 50, 100, 250] {
            assert_eq!(
                next_interval(5 * MINUTE, deleted, 1000),
                5 * MINUTE,
                "{deleted}"
            );
        }
    }

    #[test]
    fn the_interval_shrinks_in_proportion_when_over_25_percent_was_deleted() {
        assert_eq!(
            next_interval(5 * MINUTE, 500, 1000),
            Duration::from_secs(150)
        );
        assert_eq!(
            next_interval(5 * MINUTE, 251, 1000),
            Duration::from_secs(225)
        );
        // Above 90%, as for 90%: ten times shorter.
        assert_eq!(
            next_interval(5 * MINUTE, 1000, 1000),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn the_interval_shrinks_to_10_seconds_at_least() {
        assert_eq!(
            next_interval(Duration::from_secs(60), 900, 1000),
            MIN_INTERVAL
        );
        assert_eq!(next_interval(MIN_INTERVAL, 1000, 1000), MIN_INTERVAL);
    }

    // --- Against a real map ----------------------------------------------------------------------

    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

    /// A conntrack map like the kernel's, with room for `max_entries`.
    fn conntrack_map(max_entries: u32) -> OwnedFd {
        batch::test_map(
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<ConntrackKeyV4>(),
            size_of::<ConntrackEntryV4>(),
            max_entries,
            0,
        )
    }

    /// A key of flow number `n`, unique per `n` and `direction`.
    fn key(n: u32, protocol: u8, direction: u8) -> ConntrackKeyV4 {
        ConntrackKeyV4 {
            src_address: n,
            dst_address: 0x0a60_000a,
            src_port: 40000,
            dst_port: 80,
            protocol,
            direction,
            _pad: 0,
        }
    }

    fn entry(flags: u16, last_seen: u32) -> ConntrackEntryV4 {
        ConntrackEntryV4 {
            backend_id: 1,
            rev_nat_id: 1,
            flags,
            last_seen,
            ..ConntrackEntryV4::default()
        }
    }

    fn keys_in(map: &OwnedFd) -> Vec<ConntrackKeyV4> {
        let mut keys = Vec::new();
        batch::lookup(
            map.as_fd(),
            64,
            |chunk: &[ConntrackKeyV4], _: &[ConntrackEntryV4]| {
                keys.extend_from_slice(chunk);
                Ok(())
            },
        )
        .unwrap();
        keys.sort_unstable();
        keys
    }

    /// Lifetimes shorter than the defaults, so that the test needs the machine up for two
    /// minutes only, and so that a collector using the defaults instead would fail.
    const LIFETIMES: ConntrackLifetimes = ConntrackLifetimes {
        tcp_established: 100,
        tcp_syn: 40,
        tcp_closing: 20,
        other: 30,
    };

    #[test]
    fn a_run_deletes_the_entries_past_their_lifetime_and_keeps_the_others() {
        let map = conntrack_map(1000);
        let now = monotonic_coarse_seconds().unwrap();
        let ago = |seconds: u32| {
            now.checked_sub(seconds)
                .expect("the machine must have been up for two minutes")
        };
        // (flow, protocol, flags, lifetime): each flow is written seen 5 s before the end of its
        // lifetime (kept) and 5 s after (deleted), in both directions.
        let established = CT_SEEN_NON_SYN;
        let closed = CT_SEEN_NON_SYN | CT_FIN_FROM_CLIENT | CT_FIN_FROM_BACKEND;
        let flows = [
            (IPPROTO_UDP, 0, LIFETIMES.other),
            (IPPROTO_TCP, 0, LIFETIMES.tcp_syn),
            (IPPROTO_TCP, established, LIFETIMES.tcp_established),
            (IPPROTO_TCP, closed, LIFETIMES.tcp_closing),
            (IPPROTO_TCP, CT_RESET, LIFETIMES.tcp_closing),
        ];
        let mut keys = Vec::new();
        let mut entries = Vec::new();
        let mut kept = Vec::new();
        for (n, (protocol, flags, lifetime)) in (0u32..).zip(flows) {
            for direction in [CT_FORWARD, CT_REVERSE] {
                keys.push(key(2 * n, protocol, direction));
                entries.push(entry(flags, ago(lifetime - 5)));
                kept.push(key(2 * n, protocol, direction));
                keys.push(key(2 * n + 1, protocol, direction));
                entries.push(entry(flags, ago(lifetime + 5)));
            }
        }
        // Written by another CPU a second ahead of this clock reading: fresh, not ancient.
        keys.push(key(100, IPPROTO_UDP, CT_FORWARD));
        entries.push(entry(0, now + 1));
        kept.push(key(100, IPPROTO_UDP, CT_FORWARD));
        batch::update(map.as_fd(), &keys, &entries).unwrap();

        let mut collector = ConntrackCollector::new(LIFETIMES, 1000);
        let report = collector.collect(map.as_fd()).unwrap();
        kept.sort_unstable();
        assert_eq!(keys_in(&map), kept, "what the run kept");
        assert_eq!(
            (report.scanned, report.deleted),
            (keys.len(), keys.len() - kept.len())
        );
        // 10 of 1000 deleted: under 5%.
        assert_eq!(report.next_interval, Duration::from_secs(450));
        assert_eq!(collector.interval(), report.next_interval);

        let report = collector.collect(map.as_fd()).unwrap();
        assert_eq!((report.scanned, report.deleted), (kept.len(), 0));
        assert_eq!(report.next_interval, Duration::from_secs(450));
    }

    #[test]
    fn a_run_over_many_chunks_deletes_as_it_reads() {
        let map = conntrack_map(4096);
        let now = monotonic_coarse_seconds().unwrap();
        let expired = now
            .checked_sub(100)
            .expect("the machine must have been up for two minutes");
        let keys: Vec<_> = (0..3000).map(|n| key(n, IPPROTO_UDP, CT_FORWARD)).collect();
        // Every third flow expired.
        let entries: Vec<_> = (0..3000)
            .map(|n| entry(0, if n % 3 == 0 { expired } else { now }))
            .collect();
        batch::update(map.as_fd(), &keys, &entries).unwrap();

        let swept = sweep(map.as_fd(), now, &ConntrackLifetimes::DEFAULT, 7).unwrap();
        assert_eq!((swept.scanned, swept.deleted), (3000, 1000));
        let mut kept: Vec<_> = (0..3000)
            .filter(|n| n % 3 != 0)
            .map(|n| key(n, IPPROTO_UDP, CT_FORWARD))
            .collect();
        kept.sort_unstable();
        assert_eq!(keys_in(&map), kept);
    }

    #[test]
    fn a_flow_restarted_on_an_expired_tuple_keeps_its_new_entry() {
        let map = conntrack_map(100);
        let now = monotonic_coarse_seconds().unwrap();
        let expired = now
            .checked_sub(100)
            .expect("the machine must have been up for two minutes");
        let keys: Vec<_> = (0..4).map(|n| key(n, IPPROTO_UDP, CT_FORWARD)).collect();
        batch::update(map.as_fd(), &keys, &[entry(0, expired); 4]).unwrap();
        // Flow 1's client starts a new flow on the tuple while the collector walks the map:
        // after the read that found the old one expired, before its delete.
        let restarted = keys[1];
        let mut read = Vec::new();
        let rule = expired_at(now, &LIFETIMES);
        let swept = batch::delete_where(map.as_fd(), 64, |key, found| {
            if !read.contains(key) {
                read.push(*key);
                if *key == restarted {
                    batch::update(map.as_fd(), &[restarted], &[entry(0, now)]).unwrap();
                }
            }
            rule(key, found)
        })
        .unwrap();
        assert_eq!((swept.scanned, swept.deleted), (4, 3));
        assert_eq!(keys_in(&map), [restarted]);
    }
}

//! BPF_MAP_UPDATE_BATCH, BPF_MAP_DELETE_BATCH and BPF_MAP_LOOKUP_BATCH (Linux 5.6), which aya
//! 0.14 does not wrap: one system call writes, deletes or reads a whole run of entries. Written
//! one per call, the 90,000 entries of 10,000 services took the agent about 190 ms, most of it
//! entering and leaving the kernel; read one per call (a key, then its value), a full conntrack
//! table would cost half a million calls. Also [`delete_where`], which reads a map in batches
//! and deletes what a predicate matches (the conntrack collector and the syncer's purge), with
//! the one-key lookup and delete it needs on a borrowed descriptor.

use std::{
    io, mem,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

use super::syscall::bpf;

/// `enum bpf_cmd` values from the kernel's uapi/linux/bpf.h.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr`. The kernel accepts an attribute shorter than its
/// own union and reads the rest as zeros.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The `map_elem` member of `union bpf_attr` (its key is 8-byte aligned).
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A batch that stopped part way: how many of its entries were written, and why the next was
/// not.
#[derive(Debug)]
pub struct Stopped {
    pub written: usize,
    pub error: io::Error,
}

/// Inserts or replaces `keys[i]` -> `values[i]`, in order. The key and value types must be the
/// map's (aya's typed maps checked their sizes when they were opened).
pub fn update<K: Pod, V: Pod>(map: BorrowedFd, keys: &[K], values: &[V]) -> Result<(), Stopped> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    run(
        BPF_MAP_UPDATE_BATCH,
        map,
        keys.as_ptr().cast(),
        values.as_ptr().cast(),
        keys.len(),
    )
}

/// Deletes `keys`, in order; a key that is not there stops the batch (ENOENT), as a single
/// delete would fail.
pub fn delete<K: Pod>(map: BorrowedFd, keys: &[K]) -> Result<(), Stopped> {
    run(
        BPF_MAP_DELETE_BATCH,
        map,
        keys.as_ptr().cast(),
        std::ptr::null(),
        keys.len(),
    )
}

/// Reads every entry of the hash map `map`, up to `chunk` per system call, and hands each
/// chunk to `each` as it comes: keys and values, side by side. The kernel walks the map a bucket
/// at a time and each call resumes at the bucket where the previous one stopped, so `each` may
/// delete the entries it was given without disturbing the walk. Entries written or deleted by
/// others during the walk may be seen or missed, as in any walk of a live map. The key and value
/// types must be the map's. Stops at the first error, `each`'s or the kernel's.
pub fn lookup<K: Pod, V: Pod>(
    map: BorrowedFd,
    chunk: usize,
    mut each: impl FnMut(&[K], &[V]) -> io::Result<()>,
) -> io::Result<()> {
    let mut chunk = chunk.max(1);
    let mut keys: Vec<K> = Vec::with_capacity(chunk);
    let mut values: Vec<V> = Vec::with_capacity(chunk);
    // Where the walk resumes: an opaque token the kernel writes back (a bucket number, 4 bytes,
    // for hash maps; a key for the maps that walk by key).
    let token_len = mem::size_of::<K>().max(mem::size_of::<u32>());
    let mut resume_at = vec![0u8; token_len];
    let mut next = vec![0u8; token_len];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { resume_at.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).map_err(|_| io::Error::other("chunk too large"))?,
            map_fd: u32::try_from(map.as_raw_fd()).map_err(|_| io::Error::other("bad map fd"))?,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: a `batch` attribute; `keys` and `values` have room for `chunk` entries and the
        // tokens for a token; the kernel writes at most that much, and `attr.count` says how
        // many entries.
        let result = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let end = match result {
            Ok(_) => false,
            Err(error) => match error.raw_os_error() {
                // The walk reached the end; this call's entries are still to be handed over.
                Some(libc::ENOENT) => true,
                // The next bucket alone holds more entries than `chunk`: make room and retry.
                Some(libc::ENOSPC) if attr.count == 0 => {
                    chunk *= 2;
                    keys.reserve(chunk);
                    values.reserve(chunk);
                    continue;
                }
                _ => return Err(error),
            },
        };
        let count = (attr.count as usize).min(chunk);
        // SAFETY: the kernel wrote `count` keys and values, and any bytes are a valid Pod.
        unsafe {
            keys.set_len(count);
            values.set_len(count);
        }
        if count > 0 {
            each(&keys, &values)?;
        }
        keys.clear();
        values.clear();
        if end {
            return Ok(());
        }
        mem::swap(&mut resume_at, &mut next);
        first = false;
    }
}

/// What [`delete_where`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Entries read.
    pub scanned: usize,
    /// Entries deleted.
    pub deleted: usize,
}

/// Conntrack entries read per system call, by the collector and by the syncer's purge: 4,096
/// entries of 36 bytes (key and value) is 144 KiB of buffers, and a full table of 262,144
/// entries is read in 64 calls.
pub const CONNTRACK_CHUNK: usize = 4096;

/// Deletes the entries of the hash map `map` that `matches`, reading `chunk` at a time (see
/// [`lookup`]) and deleting each chunk's matches before reading on.
///
/// An entry is judged twice: as read, and again on a fresh lookup just before its delete, which
/// happens only if it still matches. Meanwhile others may have written the key anew (for
/// conntrack, the packet path starting a new flow on the tuple of an expired one), and deleting
/// what was read would take their entry. The re-check narrows that window to the time between
/// one lookup and one delete, at the cost of a lookup per entry deleted (none per entry that
/// does not match as read); deletes go one at a time for the same reason, since a batch would
/// widen the window to the whole chunk's re-checks. An entry gone before its re-check or its
/// delete (an LRU eviction) is skipped. Stops at the first error.
pub fn delete_where<K: Pod, V: Pod>(
    map: BorrowedFd,
    chunk: usize,
    mut matches: impl FnMut(&K, &V) -> bool,
) -> io::Result<Swept> {
    let mut swept = Swept::default();
    lookup(map, chunk, |keys: &[K], values: &[V]| {
        swept.scanned += keys.len();
        for (key, value) in keys.iter().zip(values) {
            if matches(key, value)
                && lookup_one::<K, V>(map, key)?.is_some_and(|fresh| matches(key, &fresh))
                && delete_one(map, key)?
            {
                swept.deleted += 1;
            }
        }
        Ok(())
    })?;
    Ok(swept)
}

/// The value of `key` in `map`, None when it has none. A lookup from a system call does not
/// count as a use for an LRU map's eviction.
fn lookup_one<K: Pod, V: Pod>(map: BorrowedFd, key: &K) -> io::Result<Option<V>> {
    let mut value = mem::MaybeUninit::<V>::uninit();
    let found = elem(
        BPF_MAP_LOOKUP_ELEM,
        map,
        std::ptr::from_ref(key).cast(),
        value.as_mut_ptr().cast(),
    )?;
    // SAFETY: the kernel wrote a whole value, and any bytes are a valid Pod.
    Ok(found.then(|| unsafe { value.assume_init() }))
}

/// Deletes `key` from `map`: false when it was not there.
fn delete_one<K: Pod>(map: BorrowedFd, key: &K) -> io::Result<bool> {
    elem(
        BPF_MAP_DELETE_ELEM,
        map,
        std::ptr::from_ref(key).cast(),
        std::ptr::null_mut(),
    )
}

/// One `map_elem` command: Ok(false) when the key is not there (ENOENT).
fn elem(
    command: libc::c_long,
    map: BorrowedFd,
    key: *const u8,
    value: *mut u8,
) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: u32::try_from(map.as_raw_fd()).map_err(|_| io::Error::other("bad map fd"))?,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags: 0,
    };
    // SAFETY: a `map_elem` attribute; `key` points at a key of the map's size and `value`,
    // when the command writes one, at room for a value of the map's size (the caller's types
    // are the map's).
    match unsafe { bpf(command, &mut attr) } {
        Ok(_) => Ok(true),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(error) => Err(error),
    }
}

fn run(
    command: libc::c_long,
    map: BorrowedFd,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> Result<(), Stopped> {
    if count == 0 {
        return Ok(());
    }
    let too_many = || Stopped {
        written: 0,
        error: io::Error::new(
            io::ErrorKind::InvalidInput,
            "more entries than a batch holds",
        ),
    };
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys as u64,
        values: values as u64,
        count: u32::try_from(count).map_err(|_| too_many())?,
        map_fd: u32::try_from(map.as_raw_fd()).map_err(|_| too_many())?,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: a `batch` attribute pointing at `count` keys (and values) that outlive the call;
    // the kernel only reads them, and writes back `attr.count`.
    let Err(error) = (unsafe { bpf(command, &mut attr) }) else {
        return Ok(());
    };
    Err(Stopped {
        // The kernel reports how far it got; never trust it past what was asked.
        written: (attr.count as usize).min(count),
        error,
    })
}

/// A new BPF map of `map_type` (`BPF_MAP_TYPE_*`) with `map_flags` (`BPF_F_*`) for tests. Fails
/// the test when not root (creating maps needs CAP_BPF, as the agent does): a test that cannot
/// run must not pass.
#[cfg(test)]
pub(crate) fn test_map(
    map_type: u32,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    map_flags: u32,
) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;

    const BPF_MAP_CREATE: libc::c_long = 0;
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "creating a BPF map needs root: run the tests as root (`cargo xtask test`)"
    );
    // map_type, key_size, value_size, max_entries, map_flags: the head of `union bpf_attr`.
    let mut attr: [u32; 5] = [
        map_type,
        u32::try_from(key_size).unwrap(),
        u32::try_from(value_size).unwrap(),
        max_entries,
        map_flags,
    ];
    // SAFETY: the head of a `map_create` attribute, no pointers; the kernel returns a new
    // descriptor.
    let fd = unsafe { super::syscall::bpf(BPF_MAP_CREATE, &mut attr) }
        .unwrap_or_else(|error| panic!("BPF_MAP_CREATE: {error}"));
    // SAFETY: `fd` is a new descriptor nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use aya::maps::{HashMap, Map, MapData};

    use super::*;

    const BPF_MAP_TYPE_HASH: u32 = 1;

    /// A BPF hash map of u32 -> u32 with room for `max_entries`.
    fn hash_map(max_entries: u32) -> HashMap<MapData, u32, u32> {
        let fd = test_map(BPF_MAP_TYPE_HASH, 4, 4, max_entries, 0);
        let map = Map::from_map_data(MapData::from_fd(fd).unwrap()).unwrap();
        HashMap::try_from(map).unwrap()
    }

    fn fd(map: &HashMap<MapData, u32, u32>) -> BorrowedFd<'_> {
        aya::maps::IterableMap::map(map).fd().as_fd()
    }

    fn contents(map: &HashMap<MapData, u32, u32>) -> Vec<(u32, u32)> {
        let mut entries: Vec<_> = map.iter().map(Result::unwrap).collect();
        entries.sort_unstable();
        entries
    }

    #[test]
    fn a_batch_writes_in_order_and_says_how_far_it_got() {
        let map = hash_map(3);
        update(fd(&map), &[1u32, 2], &[10u32, 20]).unwrap();
        update(fd(&map), &[2u32], &[21u32]).unwrap();
        assert_eq!(contents(&map), [(1, 10), (2, 21)]);

        // The map is full after the first of these.
        let stopped = update(fd(&map), &[3u32, 4, 5], &[30u32, 40, 50]).unwrap_err();
        assert_eq!(stopped.written, 1, "{:?}", stopped.error);
        assert_eq!(contents(&map), [(1, 10), (2, 21), (3, 30)]);

        // A missing key stops a delete where it is.
        let stopped = delete(fd(&map), &[1u32, 9, 2]).unwrap_err();
        assert_eq!(stopped.written, 1);
        assert_eq!(stopped.error.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(contents(&map), [(2, 21), (3, 30)]);
        delete(fd(&map), &[2u32, 3]).unwrap();
        assert_eq!(contents(&map), []);
    }

    /// Every entry, read `chunk` at a time (more if a bucket holds more).
    fn read_all(map: &HashMap<MapData, u32, u32>, chunk: usize) -> Vec<(u32, u32)> {
        let mut entries = Vec::new();
        lookup(fd(map), chunk, |keys: &[u32], values: &[u32]| {
            assert!(!keys.is_empty(), "an empty chunk");
            entries.extend(keys.iter().copied().zip(values.iter().copied()));
            Ok(())
        })
        .unwrap();
        entries.sort_unstable();
        entries
    }

    #[test]
    fn a_batch_lookup_reads_every_entry_once_whatever_the_chunk() {
        let map = hash_map(1000);
        assert_eq!(read_all(&map, 16), [], "an empty map");
        let keys: Vec<u32> = (0..1000).collect();
        let values: Vec<u32> = keys.iter().map(|key| key * 10).collect();
        update(fd(&map), &keys, &values).unwrap();
        let all: Vec<_> = keys.iter().copied().zip(values.iter().copied()).collect();
        // A chunk of 1 is smaller than some buckets: the lookup makes room.
        for chunk in [1, 7, 1000, 5000] {
            assert_eq!(read_all(&map, chunk), all, "chunks of {chunk}");
        }
    }

    #[test]
    fn entries_deleted_while_walking_do_not_disturb_the_walk() {
        let map = hash_map(1000);
        let keys: Vec<u32> = (0..1000).collect();
        update(fd(&map), &keys, &keys).unwrap();
        let mut seen = Vec::new();
        lookup(fd(&map), 10, |keys: &[u32], _: &[u32]| {
            seen.extend_from_slice(keys);
            delete(fd(&map), keys).map_err(|stopped| stopped.error)
        })
        .unwrap();
        seen.sort_unstable();
        assert_eq!(seen, keys);
        assert_eq!(contents(&map), []);
    }

    #[test]
    fn a_failing_chunk_stops_the_lookup() {
        let map = hash_map(100);
        let keys: Vec<u32> = (0..100).collect();
        update(fd(&map), &keys, &keys).unwrap();
        let mut calls = 0;
        let error = lookup(fd(&map), 10, |_: &[u32], _: &[u32]| {
            calls += 1;
            Err(io::Error::other("stop"))
        })
        .unwrap_err();
        assert_eq!((calls, error.to_string().as_str()), (1, "stop"));
    }

    #[test]
    fn one_key_is_looked_up_and_deleted_on_a_borrowed_descriptor() {
        let map = hash_map(4);
        update(fd(&map), &[1u32], &[10u32]).unwrap();
        assert_eq!(lookup_one::<u32, u32>(fd(&map), &1).unwrap(), Some(10));
        assert_eq!(lookup_one::<u32, u32>(fd(&map), &2).unwrap(), None);
        assert!(delete_one(fd(&map), &1u32).unwrap());
        assert!(!delete_one(fd(&map), &1u32).unwrap(), "already gone");
        assert_eq!(contents(&map), []);
    }

    #[test]
    fn delete_where_deletes_what_matches_as_read_and_still_matches_at_its_delete() {
        let map = hash_map(1000);
        // Odd values match. Of the odd ones, while the walk reads them, a tenth is rewritten
        // even (a new flow on the tuple of an expired one) and a tenth deleted (evicted).
        let keys: Vec<u32> = (0..1000).collect();
        update(fd(&map), &keys, &keys).unwrap();
        let mut read = std::collections::BTreeSet::new();
        let swept = delete_where(fd(&map), 7, |key: &u32, value: &u32| {
            if read.insert(*key) {
                match key % 20 {
                    1 => update(fd(&map), &[*key], &[key + 1]).unwrap(),
                    3 => delete(fd(&map), &[*key]).unwrap(),
                    _ => {}
                }
            }
            value % 2 == 1
        })
        .unwrap();
        assert_eq!(swept.scanned, 1000);
        assert_eq!(swept.deleted, 500 - 50 - 50);
        let rewritten = (0..1000)
            .filter(|key| key % 20 == 1)
            .map(|key| (key, key + 1));
        let evens = (0..1000).filter(|key| key % 2 == 0).map(|key| (key, key));
        let mut kept: Vec<(u32, u32)> = rewritten.chain(evens).collect();
        kept.sort_unstable();
        assert_eq!(contents(&map), kept);
    }
}

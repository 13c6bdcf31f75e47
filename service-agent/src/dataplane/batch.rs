//! BPF_MAP_UPDATE_BATCH and BPF_MAP_DELETE_BATCH (Linux 5.6), which aya 0.14 does not wrap: one
//! system call writes a whole run of entries. Written one per call, the 90,000 entries of 10,000
//! services took the agent about 190 ms, most of it entering and leaving the kernel.

use std::{
    io, mem,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

/// `enum bpf_cmd` values from the kernel's uapi/linux/bpf.h.
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
    // SAFETY: `attr` points at `count` keys (and values) that outlive the call; the kernel only
    // reads them, and writes back `attr.count`.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            &raw mut attr,
            mem::size_of::<BatchAttr>(),
        )
    };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    Err(Stopped {
        // The kernel reports how far it got; never trust it past what was asked.
        written: (attr.count as usize).min(count),
        error,
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};

    use aya::maps::{HashMap, Map, MapData};

    use super::*;

    /// A BPF hash map of u32 -> u32 with room for `max_entries` (needs root, as the agent does).
    fn hash_map(max_entries: u32) -> HashMap<MapData, u32, u32> {
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_TYPE_HASH: u32 = 1;
        // map_type, key_size, value_size, max_entries: the head of `union bpf_attr`.
        let attr: [u32; 4] = [BPF_MAP_TYPE_HASH, 4, 4, max_entries];
        // SAFETY: the kernel reads `attr` and returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                attr.as_ptr(),
                mem::size_of_val(&attr),
            )
        };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) };
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
}

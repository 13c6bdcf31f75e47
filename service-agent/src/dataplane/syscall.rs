//! The `bpf(2)` system call, for the commands aya 0.14 does not wrap or does not expose on a
//! descriptor the agent holds: the batch map calls (`batch`) and the pinned-link calls (`links`).

use std::{io, mem};

/// Runs the `bpf(2)` command `command` with `attr`, the member of `union bpf_attr` it reads.
/// The kernel accepts an attribute shorter than its own union and reads the rest as zeros.
///
/// # Safety
/// `attr` must have the layout `command` expects, with no uninitialised bytes (padding spelled
/// out as fields), and every pointer in it must point at memory the kernel may read (and, for
/// commands that write back, write) for as long as the call lasts.
pub unsafe fn bpf<A>(command: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: as the caller promises; the size passed is `attr`'s own.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            (attr as *mut A).cast::<libc::c_void>(),
            mem::size_of::<A>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

//! Software checksum updates, for where the kernel's csum helpers are not available (XDP) or do
//! not fit (fields inside an ICMP error's quote, which no helper knows the layout of).

/// A 32-bit field of a header, as loaded (network byte order).
#[inline(always)]
pub fn address(header: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
}

/// A 16-bit field of a header, as loaded.
#[inline(always)]
pub fn half(header: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([header[at], header[at + 1]])
}

/// The change of a one's-complement sum over replaced fields (RFC 1624 eqn. 3, the kernel's
/// csum_replace): the sum of ~old + new for each, kept unfolded in 64 bits. Fields are taken as
/// loaded: the one's-complement sum is the same whatever the byte order, as long as checksum
/// and data are read alike.
#[derive(Default)]
pub struct Delta(pub u64);

impl Delta {
    #[inline(always)]
    pub fn record32(&mut self, old: u32, new: u32) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    #[inline(always)]
    pub fn record16(&mut self, old: u16, new: u16) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    /// Writes `new` at `at` in `header` and records the change.
    #[inline(always)]
    pub fn replace_address(&mut self, header: &mut [u8], at: usize, new: u32) {
        self.record32(address(header, at), new);
        header[at..at + 4].copy_from_slice(&new.to_ne_bytes());
    }

    #[inline(always)]
    pub fn replace_half(&mut self, header: &mut [u8], at: usize, new: u16) {
        self.record16(half(header, at), new);
        header[at..at + 2].copy_from_slice(&new.to_ne_bytes());
    }

    /// The checksum `check` updated by this change: ~fold(~check + delta).
    #[inline(always)]
    pub fn applied_to(&self, check: u16) -> u16 {
        let mut sum = u64::from(!check) + self.0;
        // Three folds bring any sum of a few dozen 32-bit terms below 2^16 (the third catches
        // the carry of the second).
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

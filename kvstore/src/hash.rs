//! The one stable hash of the kvstore: 64-bit FNV-1a. Its values are part
//! of formats (a string key's id, and with it the key's server and its
//! records in checkpoints; digests that workers compare), so it must never
//! change. Not for integrity: checkpoints carry a CRC-32C.

/// FNV-1a, 64 bits, of `bytes`.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Builds [`IdHasher`]s: for maps keyed by ids that pskv makes or that its
/// callers choose (a key's id, a handle's token), looked up on every call.
/// std's default (SipHash, keyed per map) costs more than the rest of such
/// a lookup; these ids come from the program itself, not from an adversary
/// who would pick them to collide, so a mix of a few cycles does.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHash;

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

/// The hasher of [`IdHash`]: MurmurHash3's 64-bit finalizer (shifts and
/// two multiplies), so that every input bit reaches both the low bits (the
/// table's bucket) and the top seven (its tag): tokens that are multiples
/// of 16, or ids that differ only above bit 32, would otherwise share a
/// few buckets.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHasher(u64);

impl IdHasher {
    fn mix(&mut self, x: u64) {
        let mut y = self.0 ^ x;
        y ^= y >> 33;
        y = y.wrapping_mul(0xff51_afd7_ed55_8ccd);
        y ^= y >> 33;
        y = y.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        self.0 = y ^ (y >> 33);
    }
}

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not the maps' case (their keys are integers); correct for any.
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.mix(u64::from_le_bytes(w));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.mix(x);
    }

    fn write_u32(&mut self, x: u32) {
        self.mix(x.into());
    }

    fn write_usize(&mut self, x: usize) {
        self.mix(x as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn the_values_are_the_published_ones() {
        // The reference vectors of FNV-1a 64.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Ids that differ only in their high bits, or that are all multiples
    /// of 16 (the C ABI's handle tokens), still spread over the low bits.
    #[test]
    fn ids_spread_over_the_low_bits_and_the_tag() {
        for ids in [
            (0..1024u64).map(|i| i * 16).collect::<Vec<_>>(),
            (0..1024u64).map(|i| i << 40).collect(),
            (0..1024u64).collect(),
        ] {
            let low: std::collections::HashSet<u64> =
                ids.iter().map(|&i| IdHash.hash_one(i) & 1023).collect();
            assert!(low.len() > 600, "{} low values of 1024", low.len());
            let tags: std::collections::HashSet<u64> =
                ids.iter().map(|&i| IdHash.hash_one(i) >> 57).collect();
            assert!(tags.len() > 100, "{} tags of 128", tags.len());
        }
    }
}

//! Sizes and bit positions of the compressed formats (see the crate docs).

/// Codes per 32-bit word in 2-bit compression.
pub const CODES_PER_WORD_2BIT: usize = 16;
/// Codes per 32-bit word in 1-bit compression.
pub const CODES_PER_WORD_1BIT: usize = 32;

/// Words that hold `n` elements in 2-bit compression.
pub const fn words_2bit(n: usize) -> usize {
    n.div_ceil(CODES_PER_WORD_2BIT)
}

/// Words that hold `n` elements in 1-bit compression.
pub const fn words_1bit(n: usize) -> usize {
    n.div_ceil(CODES_PER_WORD_1BIT)
}

/// Where element `k` (0..16) of a word sits in 2-bit compression: the shift
/// of its two bits in the little-endian `u32`. Byte `k / 4`, bits
/// `0xC0 >> 2*(k % 4)` of that byte.
pub const fn shift_2bit(k: usize) -> u32 {
    (8 * (k / 4) + 6 - 2 * (k % 4)) as u32
}

/// Where element `k` (0..32) of a word sits in 1-bit compression: the shift
/// of its bit in the little-endian `u32`. Byte `k / 8`, bit `0x80 >> (k % 8)`.
pub const fn shift_1bit(k: usize) -> u32 {
    (8 * (k / 8) + 7 - (k % 8)) as u32
}

/// The 2-bit code for `+threshold`.
pub const CODE_POS: u32 = 0b11;
/// The 2-bit code for `-threshold`.
pub const CODE_NEG: u32 = 0b10;

/// The compressed message as bytes (little-endian words): what goes on the wire.
pub fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_match_mxnet_byte_masks() {
        // MXNet's masks per byte position: 0xc0, 0x30, 0x0c, 0x03.
        let pos = [0xc0u32, 0x30, 0x0c, 0x03];
        for k in 0..16 {
            let byte = k / 4;
            assert_eq!(CODE_POS << shift_2bit(k), pos[k % 4] << (8 * byte), "k={k}");
        }
        for k in 0..32 {
            assert_eq!(
                1u32 << shift_1bit(k),
                (0x80u32 >> (k % 8)) << (8 * (k / 8)),
                "k={k}"
            );
        }
        assert_eq!(words_2bit(0), 0);
        assert_eq!(words_2bit(17), 2);
        assert_eq!(words_1bit(33), 2);
    }
}

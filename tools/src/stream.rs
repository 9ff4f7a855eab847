//! Deterministic incompressible bytes, like a real permall's keys: SHA-256 of
//! a seed and a big-endian counter, block after block. A rerun of a generator
//! therefore writes the same bytes.

use sha2::{Digest as _, Sha256};

/// `len` bytes from `seed`, with a 64-bit counter: bench inputs (bench-input,
/// bench-rekey).
pub fn stream(seed: &str, len: usize) -> Vec<u8> {
    blocks(seed, len, |i| i.to_be_bytes().to_vec())
}

/// `len` bytes from `seed`, with a 32-bit counter: the bytes of the committed
/// vectors (make-vectors). It differs from [`stream`] only in the counter's
/// width, on purpose: changing it would change every vector in
/// `fixtures/vectors/`, which readers elsewhere check against.
pub fn vector_stream(seed: &str, len: usize) -> Vec<u8> {
    blocks(seed, len, |i| {
        u32::try_from(i)
            .expect("a vector stream is shorter than 2^32 blocks")
            .to_be_bytes()
            .to_vec()
    })
}

fn blocks(seed: &str, len: usize, counter: impl Fn(u64) -> Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u64;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed.as_bytes());
        h.update(counter(i));
        out.extend_from_slice(&h.finalize());
        i += 1;
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_streams_differ_only_in_the_counter_width() {
        let seed = "seed";
        let mut h = Sha256::new();
        h.update(seed.as_bytes());
        h.update(1u32.to_be_bytes());
        assert_eq!(vector_stream(seed, 64)[32..], h.finalize()[..]);
        let mut h = Sha256::new();
        h.update(seed.as_bytes());
        h.update(1u64.to_be_bytes());
        assert_eq!(stream(seed, 64)[32..], h.finalize()[..]);
        assert_eq!(stream(seed, 100).len(), 100);
        assert_eq!(stream(seed, 40)[..], stream(seed, 100)[..40]);
    }
}

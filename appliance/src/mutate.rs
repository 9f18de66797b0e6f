//! Test-only input generators for the "no input may crash the server"
//! tests: a seeded PRNG (xorshift64, so every failure reproduces) and a
//! mutator that turns a valid input into thousands of hostile ones
//! (truncations, flipped bytes, spliced garbage, lying length fields).
//! A deterministic stand-in for `appliance/fuzz`, cheap enough for
//! `cargo test`.

/// xorshift64: tiny, seeded, good enough to spread mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// One mutation of `good`: truncated, bytes flipped or overwritten
    /// with boundary values, a run of garbage spliced in, or a copied
    /// slice of itself (repeated headers).
    pub fn mutate(&mut self, good: &[u8]) -> Vec<u8> {
        let mut b = good.to_vec();
        for _ in 0..=self.below(4) {
            let len = b.len().max(1);
            match self.below(6) {
                0 => b.truncate(self.below(len)),
                1 => {
                    if !b.is_empty() {
                        let at = self.below(b.len());
                        b[at] ^= 1 << self.below(8);
                    }
                }
                2 => {
                    if !b.is_empty() {
                        let at = self.below(b.len());
                        b[at] = [0, 0x7f, 0x80, 0xff, b'\n', b' '][self.below(6)];
                    }
                }
                3 => {
                    let at = self.below(len);
                    let n = self.below(16) + 1;
                    let junk = self.bytes(n);
                    b.splice(at.min(b.len())..at.min(b.len()), junk);
                }
                4 => {
                    if b.len() > 4 {
                        let at = self.below(b.len() - 4);
                        b[at..at + 4].copy_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
                    }
                }
                _ => {
                    if !b.is_empty() {
                        let a = self.below(b.len());
                        let z = (a + self.below(64)).min(b.len());
                        let piece = b[a..z].to_vec();
                        let at = self.below(b.len());
                        b.splice(at..at, piece);
                    }
                }
            }
        }
        b
    }
}

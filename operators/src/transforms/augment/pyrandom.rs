//! CPython's `random.Random` (3.11) on MT19937: seeding from a non-negative integer
//! (`init_by_array` over its 32-bit words, least significant first), `random()` (53 bits from
//! two draws), `getrandbits`, `_randbelow` (rejection sampling on `n.bit_length()` bits),
//! `randint`, `uniform` and `choice`.
//!
//! Matching Python's generator — not only its distributions — means a row's draws can be
//! replayed by the reference harness (`random.seed(seed << 64 | key)`), so the whole augmentation
//! is checked against timm end to end, not just op by op.

use rand_mt::Mt;

pub struct PyRandom {
    mt: Mt,
}

impl PyRandom {
    /// `random.Random(n)` for the integer `n ≥ 0`.
    pub fn seeded(n: u128) -> Self {
        let mut key: Vec<u32> = (0..4).map(|i| (n >> (32 * i)) as u32).collect();
        // CPython passes the minimal number of words (at least one).
        while key.len() > 1 && key.last() == Some(&0) {
            key.pop();
        }
        PyRandom { mt: Mt::new_with_key(key) }
    }

    /// The generator of one row: `random.Random(seed << 64 | key)` (`key` as its u64 bits).
    pub fn for_row(seed: u64, key: i64) -> Self {
        PyRandom::seeded(((seed as u128) << 64) | key as u64 as u128)
    }

    /// `random()`: a double in `[0, 1)` with 53 random bits.
    pub fn random(&mut self) -> f64 {
        let a = self.mt.next_u32() >> 5;
        let b = self.mt.next_u32() >> 6;
        (a as f64 * 67108864.0 + b as f64) * (1.0 / 9007199254740992.0)
    }

    /// `getrandbits(k)` for `k` in `0..=64`: 32-bit words, least significant first, the last
    /// one shifted down to the bits still wanted.
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        assert!(k <= 64, "getrandbits({k}) past 64 bits");
        let (mut out, mut left, mut shift) = (0u64, k, 0);
        while left > 0 {
            let mut r = self.mt.next_u32();
            if left < 32 {
                r >>= 32 - left;
            }
            out |= (r as u64) << shift;
            shift += 32;
            left = left.saturating_sub(32);
        }
        out
    }

    /// `_randbelow(n)`: uniform in `[0, n)` for `n ≥ 1`.
    pub fn randbelow(&mut self, n: u64) -> u64 {
        let k = 64 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `randint(a, b)`: uniform in `[a, b]`, `a ≤ b`.
    pub fn randint(&mut self, a: i64, b: i64) -> i64 {
        a + self.randbelow((b - a + 1) as u64) as i64
    }

    /// `uniform(a, b)`: `a + (b - a) * random()`.
    pub fn uniform(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.random()
    }

    /// The index `choice(seq)` takes for a sequence of `len ≥ 1` items.
    pub fn choice_index(&mut self, len: usize) -> usize {
        self.randbelow(len as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values CPython 3.11 prints for `random.seed(s); random.random()`.
    #[test]
    fn matches_cpython_random() {
        assert_eq!(PyRandom::seeded(0).random(), 0.8444218515250481);
        assert_eq!(PyRandom::seeded(42).random(), 0.6394267984578837);
        let mut r = PyRandom::seeded(42);
        r.random();
        assert_eq!(r.random(), 0.025010755222666936);
        // random.seed(5 << 64 | 3); random(), randint(0, 100), getrandbits(40)
        let mut r = PyRandom::for_row(5, 3);
        assert_eq!(r.random(), 0.17155126742064086);
        assert_eq!(r.randint(0, 100), 83);
        assert_eq!(r.getrandbits(40), 581670527678);
    }

    #[test]
    fn randbelow_stays_in_range() {
        let mut r = PyRandom::seeded(7);
        for n in [1u64, 2, 3, 25, 1000, (1 << 33) + 5] {
            for _ in 0..50 {
                assert!(r.randbelow(n) < n);
            }
        }
        assert!((0..100).all(|_| (3..=5).contains(&r.randint(3, 5))));
    }
}

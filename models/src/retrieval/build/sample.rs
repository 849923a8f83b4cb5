//! The training sample: a uniform random sample of the table's rows without replacement,
//! drawn in one pass by reservoir sampling (Vitter's algorithm R) from a SplitMix64 stream, so
//! the same table and seed give the same sample (and hence the same trained index). A
//! reservoir needs no row count up front, which JSON lines do not have.

/// SplitMix64 (Steele, Lea and Flood 2014): a fixed, seedable stream for the training sample.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (Lemire's multiply-shift; the bias is below 2⁻³² for any table).
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

/// Reservoir sampling (algorithm R): `size` rows drawn uniformly without replacement from a
/// stream of unknown length, in one pass; the sample comes out in table order.
pub(super) struct Reservoir {
    size: usize,
    dim: usize,
    seen: u64,
    rng: SplitMix64,
    /// Table row of each slot, and the slots' vectors back to back.
    rows: Vec<u64>,
    vectors: Vec<f32>,
}

impl Reservoir {
    pub(super) fn new(size: usize, dim: usize, seed: u64) -> Reservoir {
        Reservoir { size, dim, seen: 0, rng: SplitMix64(seed), rows: Vec::new(), vectors: Vec::new() }
    }

    /// Rows offered so far.
    pub(super) fn seen(&self) -> u64 {
        self.seen
    }

    /// Offers the next rows of the table (`dim` values each, back to back).
    pub(super) fn offer(&mut self, vectors: &[f32]) {
        for vector in vectors.chunks_exact(self.dim) {
            if self.rows.len() < self.size {
                self.rows.push(self.seen);
                self.vectors.extend_from_slice(vector);
            } else {
                let slot = self.rng.below(self.seen + 1) as usize;
                if slot < self.size {
                    self.rows[slot] = self.seen;
                    self.vectors[slot * self.dim..(slot + 1) * self.dim].copy_from_slice(vector);
                }
            }
            self.seen += 1;
        }
    }

    /// The sample's vectors in table order.
    pub(super) fn into_sample(self) -> Vec<f32> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        order.sort_by_key(|&slot| self.rows[slot]);
        order.iter().flat_map(|&slot| self.vectors[slot * self.dim..(slot + 1) * self.dim].iter().copied()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reservoir_draws_the_same_uniform_sample_for_a_seed() {
        let draw = |seed: u64, batches: &[usize]| {
            let mut reservoir = Reservoir::new(100, 1, seed);
            let mut next = 0.0f32;
            for &n in batches {
                let chunk: Vec<f32> = (0..n).map(|i| next + i as f32).collect();
                next += n as f32;
                reservoir.offer(&chunk);
            }
            reservoir.into_sample()
        };
        let a = draw(7, &[1000, 3000, 6000]);
        // Batch boundaries do not matter, the seed does.
        assert_eq!(a, draw(7, &[10_000]));
        assert_ne!(a, draw(8, &[10_000]));
        assert_eq!(a.len(), 100);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "in table order, no repeats");
        // Spread over the whole stream: roughly a tenth in each tenth.
        let mut counts = [0; 10];
        for &v in &a {
            counts[(v / 1000.0) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (2..=20).contains(&c)), "{counts:?}");
        // A table smaller than the sample: all of it.
        assert_eq!(draw(1, &[30]).len(), 30);
    }
}

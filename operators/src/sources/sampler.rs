//! The order in which cn_clip's training visits its samples: a `DistributedSampler(shuffle=True,
//! seed=args.seed)` over the dataset padded to whole global batches, `set_epoch(epoch)` before
//! each epoch. torch shuffles with `torch.randperm(n, generator=Generator().manual_seed(seed +
//! epoch))`, which on the CPU is a Fisher–Yates pass over MT19937 draws (`random() % (n - i)`,
//! 64-bit draws from two 32-bit ones once `n` reaches `u32::MAX / 20`); reproducing it gives
//! the same samples in the same batches as cn_clip, and lets a resumed run skip exactly what
//! was seen.

use rand_mt::Mt;

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on the CPU.
pub fn randperm(n: usize, seed: u64) -> Vec<usize> {
    // torch's mt19937 is seeded with the low 32 bits of the seed.
    let mut mt = Mt::new((seed & 0xffff_ffff) as u32);
    let mut order: Vec<usize> = (0..n).collect();
    let wide = n as u64 >= u64::from(u32::MAX / 20);
    for i in 0..n.saturating_sub(1) {
        let draw = if wide {
            let hi = u64::from(mt.next_u32());
            let lo = u64::from(mt.next_u32());
            (hi << 32) | lo
        } else {
            u64::from(mt.next_u32())
        };
        let z = (draw % (n - i) as u64) as usize;
        order.swap(i, i + z);
    }
    order
}

/// The dataset length cn_clip trains on: `samples` padded up to whole global batches
/// (`pad_dataset`); index `i` reads sample `i % samples`.
pub fn padded_len(samples: usize, global_batch: usize) -> usize {
    samples.div_ceil(global_batch.max(1)) * global_batch.max(1)
}

/// The dataset indices rank `rank` of `world` visits in epoch `epoch`, in order, as
/// `DistributedSampler(dataset, shuffle=True, seed=seed)` after `set_epoch(epoch)` (not
/// dropping the last: the list is padded from its start to a multiple of `world`).
pub fn distributed_order(len: usize, seed: u64, epoch: u64, world: usize, rank: usize) -> Vec<usize> {
    let world = world.max(1);
    let mut indices = randperm(len, seed.wrapping_add(epoch));
    let total = len.div_ceil(world) * world;
    let mut k = 0;
    while indices.len() < total && len > 0 {
        indices.push(indices[k % len]);
        k += 1;
    }
    indices.into_iter().skip(rank).step_by(world).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn randperm_is_a_permutation_and_pads_whole_batches() {
        let mut p = randperm(1000, 7);
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<_>>());
        assert_eq!(padded_len(10, 4), 12);
        assert_eq!(padded_len(12, 4), 12);
        let (a, b) = (distributed_order(12, 1, 0, 2, 0), distributed_order(12, 1, 0, 2, 1));
        assert_eq!(a.len(), 6);
        let mut all: Vec<usize> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..12).collect::<Vec<_>>());
        assert_ne!(distributed_order(12, 1, 0, 1, 0), distributed_order(12, 1, 1, 1, 0), "epochs reshuffle");
    }
}

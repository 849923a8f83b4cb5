//! `lmdb_train`: a cn_clip LMDB split read as its training loader reads it — sample by sample in
//! the order of `DistributedSampler(shuffle=True, seed)` after `set_epoch(epoch)` over the
//! dataset padded to whole global batches (index `i` reads pair `i % num_samples`), each pair
//! with its image from `imgs` (`LMDBDataset.__getitem__`).
//!
//! Rows come out micro-batch by micro-batch and, within one, replica by replica: micro-batch
//! `i` of replica `r` is rank `r`'s DataLoader batch `i` (`batch_size` rows). `start`/`end`
//! select a range of micro-batches, so a resumed run reads exactly what was not yet trained on.
//! A missing pair or image, or a pair that is not cn_clip's tuple, is an error naming its key:
//! a training batch cannot drop a sample.
//!
//! Each sample is two random lookups; in an object store (`s3://…/lmdb/train`) they are ranged
//! GETs of a block each, the branch pages they share cached ([`crate::lmdb_file`]).

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, Int64Builder, StringBuilder};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use super::lmdb::{counts, parse_pair, split_dir};
use super::sampler::{padded_len, randperm};
use super::{Emit, ReadContext, Source};
use crate::decoders::pickle::Limits;
use crate::error::{Error, Result};
use crate::lmdb_file::LmdbFile;
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use schemars::JsonSchema;
use serde::Deserialize;

/// Which samples of which epoch, for how many replicas.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainOrder {
    /// `--seed`.
    pub seed: u64,
    /// 0-based epoch (`sampler.set_epoch`); validation reads epoch 0.
    pub epoch: u64,
    /// Replicas (DDP ranks).
    pub world: usize,
    /// Rows per replica per micro-batch (`--batch-size`).
    pub batch_size: usize,
    /// First micro-batch to read.
    #[serde(default)]
    pub start: usize,
    /// One past the last micro-batch (default: the epoch's end).
    #[serde(default)]
    pub end: Option<usize>,
    /// 0: cn_clip's sampler over the whole dataset (map-style). N: shards read as a stream in
    /// an order shuffled per epoch, through a shuffle buffer of N samples (WebDataset-style;
    /// only `train_shards` reads so), the last partial global batch dropped.
    #[serde(default)]
    pub shuffle_buffer: usize,
    /// The one replica whose samples to read (this process's rank of a data-parallel run), or
    /// all of them in turn (every replica in one process).
    #[serde(default)]
    pub rank: Option<usize>,
}

impl TrainOrder {
    /// The dataset length after padding: whole global batches.
    pub fn padded_len(&self, samples: usize) -> usize {
        padded_len(samples, self.batch_size * self.world.max(1))
    }

    /// Micro-batches per replica in an epoch (the DataLoader's `num_batches`; a stream's whole
    /// global batches).
    pub fn num_batches(&self, samples: usize) -> usize {
        let global = (self.batch_size * self.world.max(1)).max(1);
        match self.shuffle_buffer {
            0 => self.padded_len(samples) / global,
            _ => samples / global,
        }
    }

    /// The micro-batches this order reads: `start` up to `end` or the epoch's end.
    pub fn batches(&self, samples: usize) -> std::ops::Range<usize> {
        let end = self.end.unwrap_or(usize::MAX).min(self.num_batches(samples));
        self.start.min(end)..end
    }

    /// The replicas whose samples this order reads: [`TrainOrder::rank`]'s, or all.
    pub fn replicas(&self) -> std::ops::Range<usize> {
        match self.rank {
            Some(rank) => rank..rank + 1,
            None => 0..self.world.max(1),
        }
    }

    /// The `pairs` keys of the epoch, in the order rows are emitted (micro-batch, replica, row;
    /// only [`TrainOrder::rank`]'s replica when it is set).
    pub fn samples(&self, samples: usize) -> Vec<usize> {
        if samples == 0 || self.batch_size == 0 {
            return Vec::new();
        }
        let world = self.world.max(1);
        let perm = randperm(self.padded_len(samples), self.seed.wrapping_add(self.epoch));
        let batches = self.batches(samples);
        let mut out = Vec::with_capacity(batches.len() * self.replicas().len() * self.batch_size);
        for i in batches {
            for r in self.replicas() {
                for k in 0..self.batch_size {
                    // Rank r's sampler yields perm[r], perm[r + world], …; its batch i holds
                    // positions i·B … i·B + B − 1 of that list.
                    out.push(perm[(i * self.batch_size + k) * world + r] % samples);
                }
            }
        }
        out
    }
}

pub struct LmdbTrainSource {
    pub dir: PathBuf,
    pub order: TrainOrder,
}

impl Source for LmdbTrainSource {
    fn schema(&self) -> SchemaRef {
        cnclip_schemas::train_samples()
    }

    fn origin(&self) -> String {
        self.dir.join("pairs").display().to_string()
    }

    fn estimated_records(&self) -> Option<u64> {
        let (_, samples) = counts(&self.dir).ok()?;
        Some(self.order.samples(samples as usize).len() as u64)
    }

    fn read(self: Box<Self>, ctx: &ReadContext, emit: Emit<'_>) -> Result<()> {
        let (_, samples) = counts(&self.dir)?;
        let pairs = LmdbFile::open(&self.dir.join("pairs"))?;
        let imgs = LmdbFile::open(&self.dir.join("imgs"))?;
        let limits = Limits::RECORD.from_env();
        let (pairs_name, imgs_name) = (self.origin(), self.dir.join("imgs").display().to_string());
        let mut rows = Rows::default();
        for sample in self.order.samples(samples as usize) {
            let key = sample.to_string();
            let value = pairs.get(key.as_bytes())?.ok_or_else(|| Error::Record {
                location: format!("{pairs_name} key \"{key}\""),
                reason: format!("no such pair, though num_samples is {samples}"),
            })?;
            let pair = parse_pair(&value, &limits).map_err(|reason| Error::Record {
                location: format!("{pairs_name} key \"{key}\""),
                reason: reason.to_string(),
            })?;
            let image = imgs.get(pair.image_id.to_string().as_bytes())?.ok_or_else(|| Error::Record {
                location: format!("{imgs_name} key \"{}\"", pair.image_id),
                reason: format!("no image {} for pair {key}", pair.image_id),
            })?;
            rows.sample.append_value(sample as i64);
            rows.image_id.append_value(pair.image_id);
            rows.text_id.append_value(pair.text_id);
            rows.text.append_value(&pair.text);
            rows.image.append_value(&image);
            rows.len += 1;
            rows.bytes += image.len() + pair.text.len();
            if rows.len >= ctx.batch_rows.max(1) || rows.bytes >= super::BATCH_BYTES {
                emit(rows.finish()?)?;
            }
        }
        if rows.len > 0 {
            emit(rows.finish()?)?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Rows {
    sample: Int64Builder,
    image_id: Int64Builder,
    text_id: Int64Builder,
    text: StringBuilder,
    image: BinaryBuilder,
    len: usize,
    bytes: usize,
}

impl Rows {
    fn finish(&mut self) -> Result<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.sample.finish()),
            Arc::new(self.image_id.finish()),
            Arc::new(self.text_id.finish()),
            Arc::new(self.text.finish()),
            Arc::new(self.image.finish()),
        ];
        self.len = 0;
        self.bytes = 0;
        Ok(RecordBatch::try_new(cnclip_schemas::train_samples(), columns)?)
    }
}

/// A cn_clip LMDB split → train_samples, in its training loader's order.
///
/// The `lmdb_train` kind's keys; the order is the sampler's, described at the top of this
/// module.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LmdbTrainConfig {
    /// The split directory, holding `imgs/` and `pairs/` (or an object store prefix:
    /// `s3://bucket/lmdb/train`, read by ranged GETs).
    pub path: PathBuf,
    /// Which samples of which epoch, for how many replicas.
    pub order: TrainOrder,
}

impl NodeConfig for LmdbTrainConfig {
    const KIND: &'static str = "lmdb_train";
    const ROLE: Role = Role::Source;
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let dir = split_dir(cx, &self.path, &["imgs", "pairs"])?;
        if self.order.batch_size == 0 || self.order.world == 0 {
            return Err(vec!["order: batch_size and world must be at least 1".into()]);
        }
        if self.order.rank.is_some_and(|r| r >= self.order.world) {
            return Err(vec!["order: rank must be below world".into()]);
        }
        if self.order.shuffle_buffer > 0 {
            return Err(vec!["order: shuffle_buffer: an LMDB split is read with cn_clip's sampler (0)".into()]);
        }
        Ok(Operator::Source(Box::new(LmdbTrainSource { dir, order: self.order })))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(cnclip_schemas::train_samples())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_interleave_the_ranks_samplers() {
        let order = TrainOrder {
            seed: 3,
            epoch: 1,
            world: 2,
            batch_size: 2,
            start: 0,
            end: None,
            shuffle_buffer: 0,
            rank: None,
        };
        // 10 samples padded to 12 (global batch 4): 3 micro-batches per replica.
        assert_eq!(order.num_batches(10), 3);
        let all = order.samples(10);
        assert_eq!(all.len(), 12);
        let rank = |r| super::super::sampler::distributed_order(12, 3, 1, 2, r);
        let (r0, r1) = (rank(0), rank(1));
        for i in 0..3 {
            assert_eq!(&all[i * 4..i * 4 + 2], r0[i * 2..i * 2 + 2].iter().map(|s| s % 10).collect::<Vec<_>>());
            assert_eq!(&all[i * 4 + 2..i * 4 + 4], r1[i * 2..i * 2 + 2].iter().map(|s| s % 10).collect::<Vec<_>>());
        }
        let resumed = TrainOrder { start: 1, end: Some(2), ..order }.samples(10);
        assert_eq!(resumed, all[4..8]);
        // One rank's order: its rows of every micro-batch, as its own DistributedSampler gives.
        for r in 0..2 {
            let own = TrainOrder { rank: Some(r), ..order }.samples(10);
            let expected: Vec<usize> = (0..3).flat_map(|i| all[i * 4 + r * 2..i * 4 + r * 2 + 2].to_vec()).collect();
            assert_eq!(own, expected);
        }
    }
}

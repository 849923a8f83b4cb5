//! `cnclip build-index`: a FAISS IVF index (`IVF…,PQ…`, `IVF…,SQ8`, `IVF…,Flat`) over a feature
//! table, trained on a sample, filled shard by shard, merged, resumable. The builder is
//! [`cnclip_models::retrieval::build`]; this module is its flags and its summary line.
//! `make-topk-predictions --index-path DIR` searches the result.

use anyhow::{Context, Result};
use cnclip_models::retrieval::build::{self, BuildOptions, BuildReport};
use cnclip_operators::storage;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The feature table: a Parquet file, a directory of Parquet parts, or cn_clip feature JSON
    /// lines.
    #[arg(long)]
    features: String,
    /// The id column (Parquet: `id`, else `image_id` or `text_id`, whichever is there) or the
    /// id key of JSON lines (default `image_id`); int64, not negative.
    #[arg(long)]
    id_column: Option<String>,
    /// FAISS factory string of an IVF index: IVF4096,PQ64np · IVF1024,SQ8 · IVF256,Flat (`np`:
    /// no polysemous training, see below); `…,RFlat` adds a refinement stage (the exact vectors
    /// on disk re-rank the candidates).
    #[arg(long)]
    index: String,
    /// With `,RFlat`: candidates per result a search re-ranks (`k_factor · k`) unless it says
    /// otherwise (recorded in the manifest).
    #[arg(long, default_value_t = 4)]
    k_factor: usize,
    /// Vectors the index is trained on (a seeded uniform sample of the table).
    #[arg(long, default_value_t = 100_000)]
    train_sample: usize,
    /// The output directory (manifest.json, trained.index, shard-NNNNN.index, merged.index).
    #[arg(long)]
    index_path: PathBuf,
    /// Rows per shard.
    #[arg(long, default_value_t = 1_000_000)]
    shard_rows: u64,
    /// Inverted lists a search visits unless it says otherwise (recorded in the manifest).
    #[arg(long, default_value_t = 16)]
    nprobe: usize,
    /// Keep the shards apart (searched in turn) instead of merging them.
    #[arg(long)]
    no_merge: bool,
    /// Seed of the training sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl Args {
    /// The builder's options.
    fn options(self) -> BuildOptions {
        BuildOptions {
            features: self.features,
            id_column: self.id_column,
            index: self.index,
            k_factor: self.k_factor,
            train_sample: self.train_sample,
            index_path: self.index_path,
            shard_rows: self.shard_rows,
            nprobe: self.nprobe,
            no_merge: self.no_merge,
            seed: self.seed,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    cnclip_operators::signals::catch_interrupts()?;
    let start = std::time::Instant::now();
    let mut options = args.options();
    // A directory in an object store is built in the spool (from what the store holds of it, so
    // a rerun keeps its finished shards) and uploaded when the build is done.
    let target = options.index_path.clone();
    let remote = storage::is_remote(&target);
    if remote {
        options.index_path =
            storage::fetch::local_dir_for(&target).with_context(|| format!("--index-path {}", target.display()))?;
    }
    let report = build::build(&options, &|line| eprintln!("cnclip build-index: {line}"))?;
    if remote {
        eprintln!("cnclip build-index: uploading {} → {}", options.index_path.display(), target.display());
        storage::fetch::upload_dir(&options.index_path, &target)
            .with_context(|| format!("uploading the index to {}", target.display()))?;
        options.index_path = target;
    }
    summarise(&options, &report, start.elapsed().as_secs_f64());
    Ok(())
}

/// The closing lines: what the directory holds, how it was made, and how long it took.
fn summarise(options: &BuildOptions, report: &BuildReport, seconds: f64) {
    let BuildReport { manifest, trained_now, built_now, kept, add_seconds, merge_seconds, .. } = report;
    let dir = &options.index_path;
    let total = manifest.total_rows.unwrap_or(0);
    let shard_bytes: u64 = manifest.shards.iter().map(|s| s.file.bytes).sum();
    let (what, bytes) = match &manifest.merged {
        Some(m) => (format!("{}", dir.join(&m.file).display()), m.bytes),
        None => (format!("{} shards in {}", manifest.shards.len(), dir.display()), shard_bytes),
    };
    eprintln!(
        "cnclip build-index: {total} vectors of {} values, `{}` ({} lists, nprobe {}), {} shard(s) ({built_now} built \
         now, {kept} kept) → {what}: {bytes} bytes, {:.1} bytes/vector; {}, added in {add_seconds:.1} s{} ({seconds:.1} \
         s in all)",
        manifest.dim,
        manifest.index,
        manifest.nlist,
        manifest.nprobe,
        manifest.shards.len(),
        bytes as f64 / total.max(1) as f64,
        if *trained_now {
            format!("trained on {} vectors in {:.1} s", manifest.training.rows, manifest.training.seconds)
        } else {
            "trained index kept".to_string()
        },
        merge_seconds.map_or(String::new(), |s| format!(", merged in {s:.1} s")),
    );
    if let Some(refine) = &manifest.refine {
        let on_disk: u64 =
            manifest.shards.iter().flat_map(|s| s.refine.iter()).map(|r| r.vectors.bytes + r.ids.bytes).sum::<u64>()
                + refine.id_map.as_ref().map_or(0, |m| m.bytes);
        eprintln!(
            "cnclip build-index: refinement: exact vectors and id map on disk, {on_disk} bytes ({:.1} bytes/vector, \
             memory-mapped by a search), k_factor {}",
            on_disk as f64 / total.max(1) as f64,
            refine.k_factor
        );
    }
}

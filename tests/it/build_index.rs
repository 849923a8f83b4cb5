//! `cnclip build-index` (issue #13, point 3): a FAISS IVF-PQ index trained once, filled in
//! shards, merged, and searched by `make-topk-predictions --index-path DIR`.
//!
//! The gallery is 3,000 clustered unit vectors of 32 values (40 Gaussian clusters; ids
//! 10,000 + 7·row, so a search that returned row numbers instead of ids would show), built in
//! shards of 1,000 rows with `IVF16,PQ8x4np` (4-bit codes; `np`: no polysemous training, which
//! FAISS otherwise runs for seconds per codebook and cnclip's search does not use). Some rows
//! repeat others in other shards, so equal scores occur and their order is checked. Checked: the
//! shards searched in turn give exactly the merged index's neighbours and scores; the merged
//! index is byte for byte the trained index with every vector added in one piece (same codes,
//! same lists, same order); recall@10 against the exact top-10 is above a floor; a rerun after
//! a shard is deleted rebuilds that shard only; and each misuse is a clear error, never a
//! panic.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use arrow::array::{FixedSizeListArray, Float32Array, Int64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use faiss::{Idx, Index as _};

const DIM: usize = 32;
const GALLERY: usize = 3000;
const QUERIES: usize = 100;

/// A fixed stream of pseudo-random numbers (xorshift64*), uniform and Gaussian.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-12), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// `n` unit vectors around `centres` (back to back), noise of norm ~`spread`.
fn clustered(rng: &mut Rng, centres: &[Vec<f64>], n: usize, spread: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * DIM);
    for _ in 0..n {
        let centre = &centres[(rng.uniform() * centres.len() as f64) as usize % centres.len()];
        let v: Vec<f64> = centre.iter().map(|c| c + rng.gaussian() * spread / (DIM as f64).sqrt()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        out.extend(v.iter().map(|x| (x / norm) as f32));
    }
    out
}

pub(crate) struct Data {
    gallery_ids: Vec<i64>,
    gallery: Vec<f32>,
    query_ids: Vec<i64>,
    queries: Vec<f32>,
}

fn data() -> Data {
    let mut rng = Rng(0x5EED_1DE8);
    let centres: Vec<Vec<f64>> = (0..40)
        .map(|_| {
            let v: Vec<f64> = (0..DIM).map(|_| rng.gaussian()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| x / norm).collect()
        })
        .collect();
    let mut gallery = clustered(&mut rng, &centres, GALLERY, 0.8);
    // Duplicates, as real collections have (the same image twice): every fifth row from 1,000 on
    // repeats the row 1,000 before it, in another shard, under another id. Their codes and
    // scores are equal, so the order of ties between shards is exercised.
    for row in (1000..GALLERY).step_by(5) {
        gallery.copy_within((row - 1000) * DIM..(row - 999) * DIM, row * DIM);
    }
    Data {
        gallery_ids: (0..GALLERY as i64).map(|i| 10_000 + 7 * i).collect(),
        gallery,
        query_ids: (0..QUERIES as i64).collect(),
        queries: clustered(&mut rng, &centres, QUERIES, 0.8),
    }
}

/// Writes a feature table (`id` int64, `feature` fixed-size float32 lists).
fn write_table(path: &Path, ids: &[i64], vectors: &[f32], dim: usize) {
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("feature", DataType::FixedSizeList(item.clone(), dim as i32), false),
    ]));
    let features = FixedSizeListArray::new(item, dim as i32, Arc::new(Float32Array::from(vectors.to_vec())), None);
    let batch =
        RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(ids.to_vec())), Arc::new(features)])
            .unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn run(root: &Path, args: &[&str]) -> Output {
    Command::new(cnclip_tests::cnclip_bin()).args(args).current_dir(root).output().unwrap()
}

/// Runs cnclip, which must succeed; returns its stderr.
fn cnclip(root: &Path, args: &[&str]) -> String {
    let output = run(root, args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "cnclip {args:?}:\n{stderr}");
    stderr
}

/// Runs cnclip, which must fail cleanly (exit status 1: an error, not a panic or an abort);
/// returns its stderr.
fn cnclip_fails(root: &Path, args: &[&str]) -> String {
    let output = run(root, args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "cnclip {args:?} should fail with an error:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// A predictions table: query id → (neighbour ids, scores).
pub(crate) fn predictions(path: &Path) -> BTreeMap<i64, (Vec<i64>, Vec<f32>)> {
    use arrow::array::{AsArray, ListArray};
    use arrow::datatypes::{Float32Type, Int64Type};
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
            .unwrap()
            .build()
            .unwrap();
    let mut out = BTreeMap::new();
    for batch in reader {
        let batch = batch.unwrap();
        let queries = batch.column_by_name("query_id").unwrap().as_primitive::<Int64Type>();
        let neighbours = batch.column_by_name("neighbour_ids").unwrap().as_any().downcast_ref::<ListArray>().unwrap();
        let scores = batch.column_by_name("scores").unwrap().as_any().downcast_ref::<ListArray>().unwrap();
        for row in 0..batch.num_rows() {
            let ids = neighbours.value(row).as_primitive::<Int64Type>().values().to_vec();
            let s = scores.value(row).as_primitive::<Float32Type>().values().to_vec();
            out.insert(queries.value(row), (ids, s));
        }
    }
    out
}

/// The exact top-10 ids of every query (inner products in f64).
fn exact_top10(data: &Data) -> BTreeMap<i64, Vec<i64>> {
    data.query_ids
        .iter()
        .zip(data.queries.chunks_exact(DIM))
        .map(|(&q, query)| {
            let mut scored: Vec<(f64, i64)> = data
                .gallery
                .chunks_exact(DIM)
                .zip(&data.gallery_ids)
                .map(|(g, &id)| (g.iter().zip(query).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum(), id))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            (q, scored.iter().take(10).map(|s| s.1).collect())
        })
        .collect()
}

/// 10-recall@10 (the share of the exact top-10 found) and 1-recall@10 (the share of queries
/// whose nearest neighbour is in the top 10).
fn recalls(found: &BTreeMap<i64, (Vec<i64>, Vec<f32>)>, exact: &BTreeMap<i64, Vec<i64>>) -> (f64, f64) {
    let (mut overlap, mut nearest) = (0, 0);
    for (q, truth) in exact {
        let ids = &found[q].0;
        overlap += truth.iter().filter(|t| ids.contains(t)).count();
        nearest += usize::from(ids.contains(&truth[0]));
    }
    (overlap as f64 / (10 * exact.len()) as f64, nearest as f64 / exact.len() as f64)
}

pub(crate) fn setup(root: &Path) -> Data {
    let data = data();
    write_table(&root.join("gallery.parquet"), &data.gallery_ids, &data.gallery, DIM);
    write_table(&root.join("queries.parquet"), &data.query_ids, &data.queries, DIM);
    data
}

pub(crate) const BUILD: [&str; 11] = [
    "build-index",
    "--features",
    "gallery.parquet",
    "--index",
    "IVF16,PQ8x4np",
    "--train-sample",
    "2000",
    "--shard-rows",
    "1000",
    "--nprobe",
    "6",
];

fn search(root: &Path, dir: &str, output: &str) -> BTreeMap<i64, (Vec<i64>, Vec<f32>)> {
    cnclip(
        root,
        &["make-topk-predictions", "--text-feats", "queries.parquet", "--index-path", dir, "--output", output],
    );
    predictions(&root.join(output))
}

#[test]
fn shards_searched_in_turn_equal_the_merged_index_which_equals_one_built_in_one_piece() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = setup(root);

    // Shards only: three of them, searched in turn.
    let stderr = cnclip(root, &[&BUILD[..], &["--index-path", "idx", "--no-merge"]].concat());
    assert!(stderr.contains("3 shard(s) (3 built now, 0 kept)"), "{stderr}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("idx/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["shards"].as_array().unwrap().len(), 3);
    assert_eq!(manifest["total_rows"], 3000);
    assert_eq!(manifest["shards"][1]["min_id"], 10_000 + 7 * 1000);
    assert!(!root.join("idx/merged.index").exists());
    let shards = search(root, "idx", "shards.parquet");

    // The same command without --no-merge keeps everything and merges.
    let stderr = cnclip(root, &[&BUILD[..], &["--index-path", "idx"]].concat());
    assert!(stderr.contains("(0 built now, 3 kept)") && stderr.contains("merged in"), "{stderr}");
    let merged = search(root, "idx", "merged.parquet");
    assert_eq!(merged.len(), QUERIES);
    assert!(merged.values().all(|(ids, _)| ids.len() == 10));
    // Ties at equal scores occur (so the comparison below covers their order).
    assert!(merged.values().any(|(_, scores)| scores.windows(2).any(|w| w[0] == w[1])), "no tied scores");
    // Labels are the table's ids, not row numbers.
    assert!(merged.values().flat_map(|(ids, _)| ids).all(|id| id >= &10_000 && (id - 10_000) % 7 == 0));
    let differ: Vec<_> = merged.iter().filter(|(q, hits)| shards.get(q) != Some(hits)).collect();
    assert!(
        differ.is_empty() && shards.len() == merged.len(),
        "the shards searched in turn must give the merged index's neighbours and scores; {} queries differ, e.g. \
         merged {:?} vs shards {:?}",
        differ.len(),
        differ.first(),
        differ.first().map(|(q, _)| &shards[q])
    );

    // Same codes: the trained index with every vector added at once, written by FAISS itself.
    let mut whole = faiss::read_index(root.join("idx/trained.index").to_str().unwrap()).unwrap();
    let ids: Vec<Idx> = data.gallery_ids.iter().map(|&id| Idx::new(id as u64)).collect();
    whole.add_with_ids(&data.gallery, &ids).unwrap();
    let one_piece = root.join("one-piece.index");
    faiss::write_index(&whole, one_piece.to_str().unwrap()).unwrap();
    assert!(
        std::fs::read(&one_piece).unwrap() == std::fs::read(root.join("idx/merged.index")).unwrap(),
        "the merged index differs from the trained index filled in one piece"
    );

    // Recall against the exact top-10 (chance: 10 in 3,000). 4-byte codes of 32 values are
    // coarse (about 0.38 and 0.59 measured on such data) …
    let exact = exact_top10(&data);
    let (recall, nearest) = recalls(&merged, &exact);
    eprintln!("IVF16,PQ8x4np nprobe 6: 10-recall@10 {recall:.3}, 1-recall@10 {nearest:.3}");
    assert!(recall >= 0.25 && nearest >= 0.4, "IVF16,PQ8x4np: 10-recall@10 {recall:.3}, 1-recall@10 {nearest:.3}");
    // … 16-byte codes (two values per 8-bit code) much less so (about 0.86 and 0.96).
    let pq16: Vec<&str> = [&BUILD[..], &["--index-path", "pq16"]]
        .concat()
        .into_iter()
        .map(|a| if a == "IVF16,PQ8x4np" { "IVF16,PQ16np" } else { a })
        .collect();
    cnclip(root, &pq16);
    let (recall, nearest) = recalls(&search(root, "pq16", "pq16.parquet"), &exact);
    eprintln!("IVF16,PQ16np nprobe 6: 10-recall@10 {recall:.3}, 1-recall@10 {nearest:.3}");
    assert!(recall >= 0.75 && nearest >= 0.9, "IVF16,PQ16np: 10-recall@10 {recall:.3}, 1-recall@10 {nearest:.3}");
    // --nprobe overrides the build's: one list of 16 loses the neighbours in other lists.
    let one_list =
        ["make-topk-predictions", "--text-feats", "queries.parquet", "--index-path", "pq16", "--nprobe", "1"];
    cnclip(root, &[&one_list[..], &["--output", "one-list.parquet"]].concat());
    let (one, _) = recalls(&predictions(&root.join("one-list.parquet")), &exact);
    eprintln!("IVF16,PQ16np nprobe 1: 10-recall@10 {one:.3}");
    assert!(one < recall, "nprobe 1: {one:.3}, nprobe 6: {recall:.3}");
}

#[test]
fn a_rerun_after_a_shard_is_deleted_rebuilds_that_shard_only() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let build = [&BUILD[..], &["--index-path", "idx"]].concat();
    cnclip(root, &build);
    let read = |name: &str| std::fs::read(root.join("idx").join(name)).unwrap();
    let modified = |name: &str| std::fs::metadata(root.join("idx").join(name)).unwrap().modified().unwrap();
    let names = ["shard-00000.index", "shard-00001.index", "shard-00002.index", "trained.index"];
    let before: Vec<_> = names.iter().map(|n| (read(n), modified(n))).collect();
    let merged = read("merged.index");
    let first = search(root, "idx", "first.parquet");

    // Nothing to do: nothing is rewritten.
    let stderr = cnclip(root, &build);
    assert!(stderr.contains("(0 built now, 3 kept)") && !stderr.contains("merged in"), "{stderr}");
    assert!(!stderr.contains("training"), "{stderr}");

    std::fs::remove_file(root.join("idx/shard-00001.index")).unwrap();
    let stderr = cnclip(root, &build);
    assert!(stderr.contains("(1 built now, 2 kept)") && stderr.contains("shard 1:"), "{stderr}");
    assert!(!stderr.contains("shard 0:") && !stderr.contains("shard 2:") && !stderr.contains("training"), "{stderr}");
    for (name, (bytes, time)) in names.iter().zip(&before) {
        assert!(read(name) == *bytes, "{name} differs after the rebuild");
        if *name != "shard-00001.index" {
            assert_eq!(modified(name), *time, "{name} was rewritten");
        }
    }
    assert!(read("merged.index") == merged, "the merged index differs after the rebuild");
    assert_eq!(search(root, "idx", "second.parquet"), first);

    // Another shard size keeps the trained index and rebuilds the shards.
    let mut resharded = build.clone();
    let at = resharded.iter().position(|a| *a == "--shard-rows").unwrap();
    resharded[at + 1] = "700";
    let stderr = cnclip(root, &resharded);
    assert!(stderr.contains("5 shard(s) (5 built now, 0 kept)") && !stderr.contains("training"), "{stderr}");
    assert!(read("merged.index") == merged, "the merged index depends on the shard size");
}

fn build_args<'a>(index: &'a str, sample: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "build-index",
        "--features",
        "gallery.parquet",
        "--index",
        index,
        "--train-sample",
        sample,
        "--index-path",
        out,
    ]
}

#[test]
fn misuse_an_index_string_that_cannot_be_sharded_or_that_faiss_does_not_know_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    // Indexes whose shards cannot be merged, and strings FAISS does not know.
    for index in ["HNSW16", "Flat", "PQ8"] {
        let stderr = cnclip_fails(root, &build_args(index, "500", "bad"));
        assert!(stderr.contains(&format!("`{index}` is not an IVF index")), "{stderr}");
    }
    let stderr = cnclip_fails(root, &build_args("IVF16,Bogus", "500", "bad"));
    assert!(stderr.contains("not a factory string FAISS accepts"), "{stderr}");
    assert!(!root.join("bad").exists(), "nothing is written before the index string is checked");
}

#[test]
fn misuse_too_small_a_training_sample_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    // Too small a training sample: fewer vectors than lists (ours), or than PQ's 256 centroids
    // (FAISS's own check, passed on).
    let stderr = cnclip_fails(root, &build_args("IVF16,PQ8x4np", "10", "small"));
    assert!(stderr.contains("10 training vectors") && stderr.contains("16 inverted lists"), "{stderr}");
    let stderr = cnclip_fails(root, &build_args("IVF4,PQ8np", "100", "small"));
    assert!(stderr.contains("training `IVF4,PQ8np` on 100 vectors") && stderr.contains("256"), "{stderr}");
}

#[test]
fn misuse_a_negative_id_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    // A negative id (FAISS's "no result").
    write_table(&root.join("negative.parquet"), &[1, -5, 3], &[0.5; 3 * DIM], DIM);
    let stderr = cnclip_fails(
        root,
        &["build-index", "--features", "negative.parquet", "--index", "IVF1,Flat", "--index-path", "neg"],
    );
    assert!(stderr.contains("id -5 is negative"), "{stderr}");
}

#[test]
fn misuse_searching_with_other_queries_no_index_or_a_damaged_one_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    // A small index to search wrongly.
    cnclip(root, &[&build_args("IVF4,SQ8", "1000", "idx")[..], &["--shard-rows", "1000", "--no-merge"]].concat());
    let knn = |dir: &'static str, queries: &'static str| {
        ["make-topk-predictions", "--text-feats", queries, "--index-path", dir, "--output", "p.parquet"]
    };
    // Queries of another dimension.
    write_table(&root.join("q16.parquet"), &[1, 2], &[0.25; 2 * 16], 16);
    let stderr = cnclip_fails(root, &knn("idx", "q16.parquet"));
    assert!(stderr.contains("query features have 16 values, the index's 32"), "{stderr}");
    // No gallery and no index directory.
    let stderr =
        cnclip_fails(root, &["make-topk-predictions", "--text-feats", "queries.parquet", "--output", "p.parquet"]);
    assert!(stderr.contains("--image-feats is required"), "{stderr}");
    // A directory that build-index did not make.
    std::fs::create_dir(root.join("empty")).unwrap();
    let stderr = cnclip_fails(root, &knn("empty", "queries.parquet"));
    assert!(stderr.contains("not an index directory made by `cnclip build-index`"), "{stderr}");
    // A damaged shard: cut short, then the right size but not an index.
    let shard = root.join("idx/shard-00001.index");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let stderr = cnclip_fails(root, &knn("idx", "queries.parquet"));
    assert!(stderr.contains("shard-00001.index") && stderr.contains("but build-index wrote"), "{stderr}");
    std::fs::write(&shard, vec![7u8; bytes.len()]).unwrap();
    let stderr = cnclip_fails(root, &knn("idx", "queries.parquet"));
    assert!(stderr.contains("shard-00001.index: not a readable FAISS index"), "{stderr}");
    // A missing shard.
    std::fs::remove_file(&shard).unwrap();
    let stderr = cnclip_fails(root, &knn("idx", "queries.parquet"));
    assert!(stderr.contains("shard-00001.index") && stderr.contains("rerun `cnclip build-index`"), "{stderr}");
    assert!(!root.join("p.parquet").exists());
}

/// The table's three forms — fixed-size lists, variable-length lists under `image_id`, and
/// cn_clip's feature JSON lines — read to the same index, byte for byte (the training sample is
/// the same rows, k-means is deterministic).
#[test]
fn every_form_of_feature_table_builds_the_same_index() {
    use arrow::array::{Array, ListArray};
    use arrow::datatypes::Float32Type;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = setup(root);
    let rows = data.gallery.chunks_exact(DIM).map(|v| Some(v.iter().map(|x| Some(*x)).collect::<Vec<_>>()));
    let lists = ListArray::from_iter_primitive::<Float32Type, _, _>(rows);
    let schema = Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Int64, false),
        Field::new("feature", lists.data_type().clone(), false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int64Array::from(data.gallery_ids.clone())), Arc::new(lists)],
    )
    .unwrap();
    let file = std::fs::File::create(root.join("lists.parquet")).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    let lines: String = data
        .gallery_ids
        .iter()
        .zip(data.gallery.chunks_exact(DIM))
        .map(|(id, v)| format!("{}\n", serde_json::json!({"image_id": id, "feature": v})))
        .collect();
    std::fs::write(root.join("gallery.jsonl"), lines).unwrap();
    for (features, out) in [("gallery.parquet", "a"), ("lists.parquet", "b"), ("gallery.jsonl", "c")] {
        let args = ["build-index", "--features", features, "--index", "IVF16,SQ8", "--shard-rows", "1000"];
        cnclip(root, &[&args[..], &["--index-path", out]].concat());
    }
    let merged = |out: &str| std::fs::read(root.join(out).join("merged.index")).unwrap();
    assert!(merged("a") == merged("b"), "variable-length lists built another index");
    assert!(merged("a") == merged("c"), "JSON lines built another index");
}

/// `…,RFlat`: a refinement stage with the exact vectors on disk. The 4-bit, 8-byte codes that
/// find about 0.4 of the exact top-10 alone re-rank 8 × 10 candidates to nearly all of it; the
/// training is kept when the suffix is added (only the shards are rebuilt); with `--k-factor 1`
/// the neighbours are the plain index's, re-ordered; the scores are the exact inner products;
/// shards searched in turn equal the merged index, loaded or memory-mapped; a damaged vectors
/// file is named, and a rerun rebuilds that shard only; an id twice refuses the build.
#[test]
fn a_refinement_stage_reranks_the_codes_with_the_exact_vectors_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = setup(root);
    let exact = exact_top10(&data);
    let with = |index: &'static str, out: &'static str, more: &[&'static str]| {
        let mut args: Vec<&str> =
            BUILD.iter().map(|a| if *a == "IVF16,PQ8x4np" { index } else { a }).collect::<Vec<_>>();
        args.extend(["--index-path", out]);
        args.extend(more);
        args
    };
    cnclip(root, &with("IVF16,PQ8x4np", "idx", &[]));
    let plain = search(root, "idx", "plain.parquet");
    let (plain_recall, _) = recalls(&plain, &exact);

    let stderr = cnclip(root, &with("IVF16,PQ8x4np,RFlat", "idx", &["--k-factor", "8"]));
    assert!(stderr.contains("rebuilding the shards") && !stderr.contains("training"), "{stderr}");
    assert!(stderr.contains("refinement: exact vectors") && stderr.contains("k_factor 8"), "{stderr}");
    for shard in 0..3 {
        let vectors = std::fs::metadata(root.join(format!("idx/shard-{shard:05}.vectors"))).unwrap().len();
        assert_eq!(vectors, (1000 * DIM * 4) as u64);
        let ids = std::fs::metadata(root.join(format!("idx/shard-{shard:05}.ids"))).unwrap().len();
        assert_eq!(ids, 1000 * 16);
    }
    let refined = search(root, "idx", "refined.parquet");
    let (recall, nearest) = recalls(&refined, &exact);
    eprintln!("IVF16,PQ8x4np: 10-recall@10 {plain_recall:.3}; with RFlat, k_factor 8: {recall:.3} ({nearest:.3})");
    assert!(recall >= 0.95 && nearest >= 0.99, "RFlat k_factor 8: 10-recall@10 {recall:.3}, 1-recall@10 {nearest:.3}");
    assert!(plain_recall < 0.6, "the codes alone should be coarse: {plain_recall:.3}");
    // The scores are the exact inner products of the stored vectors, best first.
    let vectors: BTreeMap<i64, &[f32]> = data.gallery_ids.iter().copied().zip(data.gallery.chunks_exact(DIM)).collect();
    for (q, (ids, scores)) in &refined {
        let query = &data.queries[*q as usize * DIM..(*q as usize + 1) * DIM];
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "query {q}: {scores:?}");
        for (id, score) in ids.iter().zip(scores) {
            let exact: f64 = vectors[id].iter().zip(query).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            assert!((f64::from(*score) - exact).abs() < 1e-5, "query {q}, id {id}: {score} vs {exact}");
        }
    }
    // k_factor 1: the plain index's neighbours, re-scored.
    let k1 = ["make-topk-predictions", "--text-feats", "queries.parquet", "--index-path", "idx", "--k-factor", "1"];
    cnclip(root, &[&k1[..], &["--output", "k1.parquet"]].concat());
    let k1 = predictions(&root.join("k1.parquet"));
    for (q, (ids, _)) in &k1 {
        let mut a = ids.clone();
        let mut b = plain[q].0.clone();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "query {q}: k_factor 1 re-ranks the plain top-10 only");
    }

    // The same build with the shards apart, searched in turn: the same answer; and both with
    // their inverted lists memory-mapped (--mmap) rather than loaded.
    cnclip(root, &with("IVF16,PQ8x4np,RFlat", "apart", &["--k-factor", "8", "--no-merge"]));
    assert_eq!(search(root, "apart", "apart.parquet"), refined);
    for dir in ["idx", "apart"] {
        let args = ["make-topk-predictions", "--text-feats", "queries.parquet", "--index-path", dir, "--mmap"];
        cnclip(root, &[&args[..], &["--output", "mapped.parquet"]].concat());
        assert_eq!(predictions(&root.join("mapped.parquet")), refined, "{dir} with --mmap");
    }

    // A damaged vectors file is named; a rerun rebuilds that shard alone, to the same bytes.
    let vectors = root.join("idx/shard-00002.vectors");
    let bytes = std::fs::read(&vectors).unwrap();
    std::fs::write(&vectors, &bytes[..bytes.len() - 4]).unwrap();
    let stderr = cnclip_fails(
        root,
        &["make-topk-predictions", "--text-feats", "queries.parquet", "--index-path", "idx", "--output", "x.parquet"],
    );
    assert!(stderr.contains("shard-00002.vectors") && stderr.contains("but build-index wrote"), "{stderr}");
    let stderr = cnclip(root, &with("IVF16,PQ8x4np,RFlat", "idx", &["--k-factor", "8"]));
    assert!(stderr.contains("(1 built now, 2 kept)") && stderr.contains("shard 2:"), "{stderr}");
    assert!(std::fs::read(&vectors).unwrap() == bytes);
    assert_eq!(search(root, "idx", "again.parquet"), refined);

    // Ids in no order (every shard's range spans the others'): the build writes the global id
    // map, the lookups go through it, and the answer is as exact; a rerun keeps the map.
    let scrambled = Data {
        gallery_ids: (0..GALLERY as i64).map(|row| 10_000 + 7 * ((row * 1237) % GALLERY as i64)).collect(),
        gallery: data.gallery.clone(),
        query_ids: data.query_ids.clone(),
        queries: data.queries.clone(),
    };
    write_table(&root.join("scrambled.parquet"), &scrambled.gallery_ids, &scrambled.gallery, DIM);
    let mut args = with("IVF16,PQ8x4np,RFlat", "scrambled", &["--k-factor", "8"]);
    let at = args.iter().position(|a| *a == "gallery.parquet").unwrap();
    args[at] = "scrambled.parquet";
    let stderr = cnclip(root, &args);
    assert!(stderr.contains("wrote the global id map ids.map (48000 bytes)"), "{stderr}");
    let map_time = std::fs::metadata(root.join("scrambled/ids.map")).unwrap().modified().unwrap();
    let found = search(root, "scrambled", "scrambled-top.parquet");
    let (recall, _) = recalls(&found, &exact_top10(&scrambled));
    assert!(recall >= 0.95, "scrambled ids: 10-recall@10 {recall:.3}");
    let vectors: BTreeMap<i64, &[f32]> =
        scrambled.gallery_ids.iter().copied().zip(scrambled.gallery.chunks_exact(DIM)).collect();
    for (q, (ids, scores)) in &found {
        let query = &data.queries[*q as usize * DIM..(*q as usize + 1) * DIM];
        for (id, score) in ids.iter().zip(scores) {
            let exact: f64 = vectors[id].iter().zip(query).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            assert!((f64::from(*score) - exact).abs() < 1e-5, "scrambled, query {q}, id {id}: {score} vs {exact}");
        }
    }
    let stderr = cnclip(root, &args);
    assert!(stderr.contains("(0 built now, 3 kept)") && !stderr.contains("global id map"), "{stderr}");
    assert_eq!(std::fs::metadata(root.join("scrambled/ids.map")).unwrap().modified().unwrap(), map_time);
    assert!(!root.join("idx/ids.map").exists(), "ids in order need no map");

    // FAISS's own in-memory `…,RFlat` (no build-index directory) takes --k-factor as well.
    let in_memory = [
        "make-topk-predictions",
        "--image-feats",
        "gallery.parquet",
        "--text-feats",
        "queries.parquet",
        "--index",
        "IVF16,PQ8x4np,RFlat",
        "--nprobe",
        "6",
        "--train-sample",
        "2000",
    ];
    let mut memory_recalls = Vec::new();
    for k_factor in ["1", "8"] {
        cnclip(root, &[&in_memory[..], &["--k-factor", k_factor, "--output", "memory.parquet"]].concat());
        memory_recalls.push(recalls(&predictions(&root.join("memory.parquet")), &exact).0);
    }
    eprintln!("FAISS in-memory IVF16,PQ8x4np,RFlat: 10-recall@10 {memory_recalls:?} (k_factor 1, 8)");
    assert!(memory_recalls[0] < 0.6 && memory_recalls[1] >= 0.95, "{memory_recalls:?}");

    // --k-factor without a refinement stage, and refinements build-index does not keep.
    cnclip(root, &with("IVF16,PQ8x4np", "noref", &[]));
    let stderr = cnclip_fails(root, &[&k1_args("noref")[..], &["--k-factor", "4"]].concat());
    assert!(stderr.contains("has none of (built without `,RFlat`)"), "{stderr}");
    let stderr = cnclip_fails(root, &with("IVF16,PQ8x4np,Refine(SQ8)", "bad", &[]));
    assert!(stderr.contains("exact float32 vectors only"), "{stderr}");

    // An id twice: in one shard, refused as the shard is written; in two shards, at the end,
    // and the directory is not searchable.
    let mut in_shard = data.gallery_ids.clone();
    in_shard[10] = in_shard[20];
    write_table(&root.join("dup-in-shard.parquet"), &in_shard, &data.gallery, DIM);
    let mut across = data.gallery_ids.clone();
    across[2500] = across[5];
    write_table(&root.join("dup-across.parquet"), &across, &data.gallery, DIM);
    for (table, expected) in [
        ("dup-in-shard.parquet", format!("id {} is on rows 10 and 20", in_shard[20])),
        ("dup-across.parquet", format!("id {} is in shard 0 and shard 2", across[5])),
    ] {
        let mut args = with("IVF16,PQ8x4np,RFlat", "dup", &[]);
        let at = args.iter().position(|a| *a == "gallery.parquet").unwrap();
        args[at] = table;
        let stderr = cnclip_fails(root, &args);
        assert!(stderr.contains(&expected) && stderr.contains("ids must be unique"), "{table}: {stderr}");
        let stderr = cnclip_fails(root, &k1_args("dup"));
        assert!(stderr.contains("did not finish"), "{table}: {stderr}");
    }
}

fn k1_args(dir: &'static str) -> [&'static str; 7] {
    ["make-topk-predictions", "--text-feats", "queries.parquet", "--index-path", dir, "--output", "y.parquet"]
}

/// An HNSW coarse quantizer (`IVF…_HNSW…`), which a billion-vector index of millions of lists
/// needs to assign vectors and queries without scanning every centroid, builds, merges and
/// searches as the flat one: the shards searched in turn equal the merged index, the merged
/// index is the trained one filled in one piece, and probing every list of exact codes
/// (`,Flat`) gives the exact top-10 scores. `--ef-search` (how deep the quantizer is searched)
/// is taken, and refused, naming the directory, where the quantizer is flat.
#[test]
fn an_hnsw_coarse_quantizer_builds_merges_and_searches_as_a_flat_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = setup(root);
    let build = |index: &str, out: &str, extra: &[&str]| {
        let args = [&build_args(index, "2000", out)[..], &["--shard-rows", "1000"], extra].concat();
        cnclip(root, &args)
    };
    let search = |out: &str, extra: &[&str], output: &str| {
        let args = ["make-topk-predictions", "--text-feats", "queries.parquet", "--index-path", out, "--nprobe", "16"];
        cnclip(root, &[&args[..], extra, &["--output", output]].concat());
        predictions(&root.join(output))
    };
    let stderr = build("IVF16_HNSW8,Flat", "hnsw", &["--no-merge"]);
    assert!(stderr.contains("3 shard(s) (3 built now, 0 kept)"), "{stderr}");
    let shards = search("hnsw", &[], "shards.parquet");
    let stderr = build("IVF16_HNSW8,Flat", "hnsw", &[]);
    assert!(stderr.contains("(0 built now, 3 kept)") && stderr.contains("merged in"), "{stderr}");
    let merged = search("hnsw", &[], "merged.parquet");
    assert!(shards == merged, "the shards searched in turn differ from the merged index");

    let mut whole = faiss::read_index(root.join("hnsw/trained.index").to_str().unwrap()).unwrap();
    let ids: Vec<Idx> = data.gallery_ids.iter().map(|&id| Idx::new(id as u64)).collect();
    whole.add_with_ids(&data.gallery, &ids).unwrap();
    let one_piece = root.join("one-piece.index");
    faiss::write_index(&whole, one_piece.to_str().unwrap()).unwrap();
    assert!(
        std::fs::read(&one_piece).unwrap() == std::fs::read(root.join("hnsw/merged.index")).unwrap(),
        "the merged index differs from the trained index filled in one piece"
    );

    // Every list probed, exact codes: the exact top-10 (by score: rows repeat, so ids tie).
    for (q, query) in data.query_ids.iter().zip(data.queries.chunks_exact(DIM)) {
        let mut exact: Vec<f64> = data
            .gallery
            .chunks_exact(DIM)
            .map(|g| g.iter().zip(query).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum())
            .collect();
        exact.sort_by(|a, b| b.total_cmp(a));
        let found = &merged[q].1;
        assert_eq!(found.len(), 10);
        for (f, e) in found.iter().zip(&exact) {
            assert!((f64::from(*f) - e).abs() < 1e-5, "query {q}: scores {found:?}, exact {:?}", &exact[..10]);
        }
    }
    let (recall, _) = recalls(&merged, &exact_top10(&data));
    assert!(recall >= 0.97, "10-recall@10 {recall:.3} with every list probed");

    // --ef-search reaches the HNSW quantizer; a flat quantizer has none to set.
    assert!(search("hnsw", &["--ef-search", "64"], "deep.parquet") == merged);
    build("IVF16,Flat", "flat", &[]);
    let args = ["make-topk-predictions", "--text-feats", "queries.parquet", "--index-path", "flat", "--ef-search"];
    let stderr = cnclip_fails(root, &[&args[..], &["64", "--output", "bad.parquet"]].concat());
    assert!(stderr.contains("--ef-search 64") && stderr.contains("no HNSW coarse quantizer"), "{stderr}");
    assert!(stderr.contains("flat"), "{stderr}");
    assert!(!root.join("bad.parquet").exists());
}

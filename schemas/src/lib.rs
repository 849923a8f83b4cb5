//! Arrow schemas and table contracts shared by every cnclip job.
//!
//! Each table is one function returning its [`SchemaRef`], plus constants for its column names,
//! so producers (sources, sinks) and consumers (kNN, eval, SQL) cannot drift apart. Readers call
//! [`check`] on whatever they open: it lists *every* difference from the contract at once, with
//! the table name, so a user fixing a Parquet file sees the whole problem in one run.
//!
//! This crate deliberately depends on `arrow-schema` only — no libtorch, no FAISS — so that
//! notebooks, the SQL job and light tools can use the contracts without the native stack.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};

/// Errors raised when a table does not match its contract.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("table `{table}` does not match its contract: {}", .differences.join("; "))]
    ContractMismatch { table: String, differences: Vec<String> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Column names, as every producer and consumer spells them.
pub mod columns {
    pub const IMAGE_ID: &str = "image_id";
    pub const SAMPLE: &str = "sample";
    pub const IMAGE: &str = "image";
    pub const IMAGE_BASE64: &str = "image_base64";
    pub const PIXELS: &str = "pixels";
    pub const LABEL: &str = "label";
    pub const PATH: &str = "path";
    pub const TOKEN_IDS: &str = "token_ids";
    pub const TEXT_ID: &str = "text_id";
    pub const TEXT: &str = "text";
    pub const IMAGE_IDS: &str = "image_ids";
    pub const ID: &str = "id";
    pub const FEATURE: &str = "feature";
    pub const QUERY_ID: &str = "query_id";
    pub const NEIGHBOUR_IDS: &str = "neighbour_ids";
    pub const SCORES: &str = "scores";
    pub const SOURCE: &str = "source";
    pub const LOCATION: &str = "location";
    pub const REASON: &str = "reason";
    /// A sample's string key (WebDataset, img2dataset), kept beside the int64 id.
    pub const KEY: &str = "key";
}

/// Key-value metadata carried by feature tables.
pub mod metadata {
    pub const MODEL: &str = "cnclip.model";
    pub const CHECKPOINT: &str = "cnclip.checkpoint";
    pub const CHECKPOINT_SHA256: &str = "cnclip.checkpoint_sha256";
    pub const PRECISION: &str = "cnclip.precision";
    pub const DIM: &str = "cnclip.dim";
    pub const NORMALIZED: &str = "cnclip.normalized";
    pub const PREPROCESSING: &str = "cnclip.preprocessing";
    pub const RESOLUTION: &str = "cnclip.resolution";
    pub const CNCLIP_VERSION: &str = "cnclip.version";
}

use columns::*;

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

/// `images`: one encoded image (JPEG/PNG/… bytes, as decoded from base64) per row.
pub fn images() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(IMAGE_ID, DataType::Int64, false),
        Field::new(IMAGE, DataType::Binary, false),
    ]))
}

/// `images_base64`: images as cn_clip's TSV shards and LMDB `imgs` hold them — base64 text
/// (either alphabet, padded or not), not yet decoded.
pub fn images_base64() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(IMAGE_ID, DataType::Int64, false),
        Field::new(IMAGE_BASE64, DataType::Binary, false),
    ]))
}

/// `labeled_images`: an image classification set (cn_clip's zero-shot folder layout): the
/// image, its class index (the position of its folder among the sorted class folders, as
/// torchvision's `ImageFolder` numbers them) and its path relative to the set's root.
pub fn labeled_images() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(IMAGE_ID, DataType::Int64, false),
        Field::new(IMAGE, DataType::Binary, false),
        Field::new(LABEL, DataType::Int64, false),
        Field::new(PATH, DataType::Utf8, false),
    ]))
}

/// `pixels`: preprocessed images, ready for the vision tower — `resolution`² RGB pixels, row
/// major, 8 bits per channel, after cn_clip's resize and RGB conversion (normalisation to
/// floats happens when a batch becomes a tensor, so this stays four times smaller).
pub fn pixels(resolution: usize) -> SchemaRef {
    Arc::new(
        Schema::new(vec![
            Field::new(IMAGE_ID, DataType::Int64, false),
            Field::new(PIXELS, DataType::FixedSizeBinary((3 * resolution * resolution) as i32), false),
        ])
        .with_metadata(HashMap::from([(metadata::RESOLUTION.to_string(), resolution.to_string())])),
    )
}

/// The type of a `token_ids` column: `context_length` ids per text (`[CLS]`, WordPiece ids,
/// `[SEP]`, zero padding), int64 as `cn_clip.clip.tokenize` returns them.
pub fn token_ids_type(context_length: usize) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Int64, false)), context_length as i32)
}

/// `texts`: one caption or query per row, with the images it describes (cn_clip's JSONL
/// `{"text_id", "text", "image_ids"}`; `image_ids` may be empty for test queries).
pub fn texts() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(TEXT_ID, DataType::Int64, false),
        Field::new(TEXT, DataType::Utf8, false),
        Field::new(IMAGE_IDS, list_of(DataType::Int64), false),
    ]))
}

/// `pairs`: one (image, text) training pair per row, as cn_clip's LMDB `pairs` database holds.
pub fn pairs() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(IMAGE_ID, DataType::Int64, false),
        Field::new(TEXT_ID, DataType::Int64, false),
        Field::new(TEXT, DataType::Utf8, false),
    ]))
}

/// `train_samples`: what a training step reads per sample — the pair (`sample` is its `pairs`
/// key) with its image, as cn_clip's `LMDBDataset.__getitem__` fetches them.
pub fn train_samples() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(columns::SAMPLE, DataType::Int64, false),
        Field::new(IMAGE_ID, DataType::Int64, false),
        Field::new(TEXT_ID, DataType::Int64, false),
        Field::new(TEXT, DataType::Utf8, false),
        Field::new(IMAGE_BASE64, DataType::Binary, false),
    ]))
}

/// Element type of a feature column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureType {
    Float32,
    Float16,
}

impl FeatureType {
    fn data_type(self) -> DataType {
        match self {
            FeatureType::Float32 => DataType::Float32,
            FeatureType::Float16 => DataType::Float16,
        }
    }
}

/// What a feature table records about how its vectors were made.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMetadata {
    /// `Vision@Text` (e.g. `ViT-B-16@RoBERTa-wwm-ext-base-chinese`), or `custom`.
    pub model: String,
    /// The checkpoint's file name (not its directory).
    pub checkpoint: String,
    pub checkpoint_sha256: String,
    /// `fp32`, `fp16` or `bf16`: what the encoder computed in (features are stored as typed).
    pub precision: String,
    pub dim: usize,
    pub normalized: bool,
    pub preprocessing: String,
}

impl FeatureMetadata {
    /// As Parquet key-value metadata (plus the cnclip version).
    pub fn to_map(&self) -> HashMap<String, String> {
        HashMap::from([
            (metadata::MODEL.to_string(), self.model.clone()),
            (metadata::CHECKPOINT.to_string(), self.checkpoint.clone()),
            (metadata::CHECKPOINT_SHA256.to_string(), self.checkpoint_sha256.clone()),
            (metadata::PRECISION.to_string(), self.precision.clone()),
            (metadata::DIM.to_string(), self.dim.to_string()),
            (metadata::NORMALIZED.to_string(), self.normalized.to_string()),
            (metadata::PREPROCESSING.to_string(), self.preprocessing.clone()),
            (metadata::CNCLIP_VERSION.to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ])
    }
}

fn features(meta: &FeatureMetadata, element: FeatureType) -> SchemaRef {
    let item = Arc::new(Field::new("item", element.data_type(), false));
    Arc::new(
        Schema::new(vec![
            Field::new(ID, DataType::Int64, false),
            Field::new(FEATURE, DataType::FixedSizeList(item, meta.dim as i32), false),
        ])
        .with_metadata(meta.to_map()),
    )
}

/// `image_features`: one vector per image id.
pub fn image_features(meta: &FeatureMetadata, element: FeatureType) -> SchemaRef {
    features(meta, element)
}

/// `text_features`: one vector per text id.
pub fn text_features(meta: &FeatureMetadata, element: FeatureType) -> SchemaRef {
    features(meta, element)
}

/// `predictions`: the top-k neighbours of each query, best first.
pub fn predictions() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(QUERY_ID, DataType::Int64, false),
        Field::new(NEIGHBOUR_IDS, list_of(DataType::Int64), false),
        Field::new(SCORES, list_of(DataType::Float32), false),
    ]))
}

/// `quarantine`: records a job skipped, where they were and why.
pub fn quarantine() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(SOURCE, DataType::Utf8, false),
        Field::new(LOCATION, DataType::Utf8, false),
        Field::new(ID, DataType::Utf8, true),
        Field::new(REASON, DataType::Utf8, false),
    ]))
}

/// `bench_results`: `bench-suite`'s results, one row per run and metric (CLIP_benchmark's
/// `metrics` flattened), for notebooks comparing checkpoints.
pub fn bench_results() -> SchemaRef {
    Arc::new(Schema::new(
        ["run", "dataset", "model", "task", "metric"]
            .into_iter()
            .map(|name| Field::new(name, DataType::Utf8, false))
            .chain([Field::new("value", DataType::Float64, false)])
            .collect::<Vec<_>>(),
    ))
}

/// Checks `actual` against the contract `expected`, by column name and type.
///
/// Extra columns are allowed (notebooks add their own); missing columns, type changes and
/// nullable columns where the contract forbids nulls are reported, all at once. Metadata is not
/// compared: it describes the data, it is not part of the shape.
///
/// # Errors
/// [`Error::ContractMismatch`] naming `table` and listing every difference.
pub fn check(table: &str, expected: &Schema, actual: &Schema) -> Result<()> {
    let mut differences = Vec::new();
    for field in expected.fields() {
        match actual.field_with_name(field.name()) {
            Err(_) => differences.push(format!("missing column `{}` ({})", field.name(), field.data_type())),
            Ok(found) => {
                if !types_match(field.data_type(), found.data_type()) {
                    differences.push(format!(
                        "column `{}` is {}, expected {}",
                        field.name(),
                        found.data_type(),
                        field.data_type()
                    ));
                }
                if found.is_nullable() && !field.is_nullable() {
                    differences.push(format!("column `{}` is nullable, expected non-null", field.name()));
                }
            }
        }
    }
    if differences.is_empty() { Ok(()) } else { Err(Error::ContractMismatch { table: table.to_string(), differences }) }
}

/// Type equality that ignores the names and nullability of list items: Parquet writers from
/// other tools (pyarrow names items "element") produce the same logical type.
fn types_match(expected: &DataType, actual: &DataType) -> bool {
    match (expected, actual) {
        (DataType::List(e), DataType::List(a)) | (DataType::LargeList(e), DataType::LargeList(a)) => {
            types_match(e.data_type(), a.data_type())
        }
        (DataType::FixedSizeList(e, n), DataType::FixedSizeList(a, m)) => {
            n == m && types_match(e.data_type(), a.data_type())
        }
        (e, a) => e == a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(dim: usize) -> FeatureMetadata {
        FeatureMetadata {
            model: "ViT-B-16@RoBERTa-wwm-ext-base-chinese".into(),
            checkpoint: "epoch_latest.pt".into(),
            checkpoint_sha256: "00".repeat(32),
            precision: "fp32".into(),
            dim,
            normalized: true,
            preprocessing: "resize-bicubic-224,rgb,openai-norm".into(),
        }
    }

    #[test]
    fn feature_schema_carries_dim_and_metadata() {
        let schema = image_features(&meta(512), FeatureType::Float16);
        let DataType::FixedSizeList(item, dim) = schema.field(1).data_type() else {
            panic!("feature column is not a fixed-size list: {schema:?}");
        };
        assert_eq!(*dim, 512);
        assert_eq!(item.data_type(), &DataType::Float16);
        assert_eq!(schema.metadata()[metadata::DIM], "512");
        assert_eq!(schema.metadata()[metadata::NORMALIZED], "true");
    }

    #[test]
    fn check_accepts_pyarrow_item_names_and_extra_columns() {
        let pyarrow_like = Schema::new(vec![
            Field::new(TEXT_ID, DataType::Int64, false),
            Field::new(TEXT, DataType::Utf8, false),
            Field::new(IMAGE_IDS, DataType::List(Arc::new(Field::new("element", DataType::Int64, false))), false),
            Field::new("split", DataType::Utf8, true),
        ]);
        check("texts", &texts(), &pyarrow_like).unwrap();
    }

    #[test]
    fn check_reports_every_difference_at_once() {
        let wrong = Schema::new(vec![
            Field::new(ID, DataType::Int32, false),
            Field::new(
                FEATURE,
                DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), 256),
                true,
            ),
        ]);
        let err = check("image_features", &image_features(&meta(512), FeatureType::Float32), &wrong).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`image_features`"), "{msg}");
        assert!(msg.contains("column `id` is Int32, expected Int64"), "{msg}");
        assert!(msg.contains("column `feature` is FixedSizeList"), "{msg}");
        assert!(msg.contains("column `feature` is nullable"), "{msg}");
    }

    #[test]
    fn check_reports_missing_columns() {
        let err =
            check("images", &images(), &Schema::new(vec![Field::new(IMAGE_ID, DataType::Int64, false)])).unwrap_err();
        assert!(err.to_string().contains("missing column `image`"), "{err}");
    }
}

//! The built-in node kinds: one config type per kind (its `[nodes.NAME]` keys), registered in
//! [`register`]. Fields are public so fixed pipelines (`cnclip import`, `export`) build nodes
//! from typed values rather than TOML tables; the TOML form deserializes into the same types.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use serde::Deserialize;

use super::registry::{BuildContext, NodeConfig, Operator, Registry, Role, SinkSpec};
use crate::error::Result;
use crate::sinks::Sink;
use crate::sinks::jsonl::JsonlSink;
use crate::sinks::lmdb::{LmdbSink, LmdbWriterKind};
use crate::sinks::parquet::ParquetSink;
use crate::sinks::tsv::TsvSink;
use crate::sources::folder::ImageFolderSource;
use crate::sources::jsonl::JsonlSource;
use crate::sources::lmdb::{Database, LmdbSource};
use crate::sources::parquet::ParquetSource;
use crate::sources::tsv::TsvSource;
use crate::transforms::base64::DecodeBase64;
use crate::transforms::preprocess::{Order, Preprocess};
use crate::transforms::require_images::RequireImages;
use crate::transforms::tokenize::Tokenize;

/// Registers every built-in kind, sources first, then transforms, then sinks.
pub fn register(registry: &mut Registry) {
    registry
        .register::<TsvConfig>()
        .register::<JsonlConfig>()
        .register::<LmdbConfig>()
        .register::<LmdbTrainConfig>()
        .register::<ImageFolderConfig>()
        .register::<ParquetConfig>()
        .register::<FeatureJsonlConfig>()
        .register::<DecodeBase64Config>()
        .register::<RequireImagesConfig>()
        .register::<ExcludeIdsConfig>()
        .register::<PreprocessConfig>()
        .register::<RandomAugmentConfig>()
        .register::<TokenizeConfig>()
        .register::<WriteParquetConfig>()
        .register::<WriteJsonlConfig>()
        .register::<WriteTsvConfig>()
        .register::<crate::sinks::parts::WritePartsConfig>()
        .register::<WriteLmdbConfig>();
}

fn yes() -> bool {
    true
}

fn max_record_bytes() -> usize {
    crate::sources::MAX_RECORD_BYTES
}

/// `tsv`: cn_clip image shards (`image_id<TAB>base64`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TsvConfig {
    /// Files and globs.
    pub paths: Vec<String>,
    /// Quarantine repeated image ids (default).
    #[serde(default = "yes")]
    pub dedupe: bool,
    /// Lines longer than this are quarantined without being read whole (default 256 MiB).
    #[serde(default = "max_record_bytes")]
    pub max_record_bytes: usize,
}

impl NodeConfig for TsvConfig {
    const KIND: &'static str = "tsv";
    const ROLE: Role = Role::Source;
    const DOC: &'static str = "`paths` (files, globs) → images_base64; `dedupe` (true), `max_record_bytes` (256 MiB)";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let paths = cx.files(&self.paths)?;
        Ok(Operator::Source(Box::new(TsvSource {
            paths,
            dedupe: self.dedupe,
            max_record_bytes: self.max_record_bytes,
        })))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(cnclip_schemas::images_base64())
    }
}

/// `jsonl`: cn_clip text files (`{"text_id", "text", "image_ids"}` per line).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    pub paths: Vec<String>,
    #[serde(default = "yes")]
    pub dedupe: bool,
    #[serde(default = "max_record_bytes")]
    pub max_record_bytes: usize,
}

impl NodeConfig for JsonlConfig {
    const KIND: &'static str = "jsonl";
    const ROLE: Role = Role::Source;
    const DOC: &'static str = "`paths` (files, globs) → texts; `dedupe` (true), `max_record_bytes` (256 MiB)";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let paths = cx.files(&self.paths)?;
        Ok(Operator::Source(Box::new(JsonlSource {
            paths,
            dedupe: self.dedupe,
            max_record_bytes: self.max_record_bytes,
        })))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(cnclip_schemas::texts())
    }
}

/// `lmdb`: one database of a cn_clip LMDB split.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmdbConfig {
    /// The split directory (holding `imgs/` and `pairs/`).
    pub path: PathBuf,
    pub database: Database,
}

impl NodeConfig for LmdbConfig {
    const KIND: &'static str = "lmdb";
    const ROLE: Role = Role::Source;
    const DOC: &'static str = "`path` (a split dir), `database` = imgs | pairs → images_base64 / pairs";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let path = cx.dir(&self.path, "LMDB split")?;
        let db = path.join(match self.database {
            Database::Imgs => "imgs",
            Database::Pairs => "pairs",
        });
        if !db.join("data.mdb").is_file() {
            return Err(vec![format!("{} is not an LMDB (no data.mdb)", db.display())]);
        }
        Ok(Operator::Source(Box::new(LmdbSource { dir: path, database: self.database })))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(match self.database {
            Database::Imgs => cnclip_schemas::images_base64(),
            Database::Pairs => cnclip_schemas::pairs(),
        })
    }
}

/// `lmdb_train`: a cn_clip LMDB split in its training loader's order (see
/// [`crate::sources::lmdb_train`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmdbTrainConfig {
    /// The split directory (holding `imgs/` and `pairs/`).
    pub path: PathBuf,
    pub order: crate::sources::lmdb_train::TrainOrder,
}

impl NodeConfig for LmdbTrainConfig {
    const KIND: &'static str = "lmdb_train";
    const ROLE: Role = Role::Source;
    const DOC: &'static str =
        "`path` (a split dir), `order` = {seed, epoch, world, batch_size, start, end} → train_samples, sampler order";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let dir = cx.dir(&self.path, "LMDB split")?;
        let missing: Vec<String> = ["imgs", "pairs"]
            .iter()
            .filter(|db| !dir.join(db).join("data.mdb").is_file())
            .map(|db| format!("{} is not an LMDB (no data.mdb)", dir.join(db).display()))
            .collect();
        if !missing.is_empty() {
            return Err(missing);
        }
        if self.order.batch_size == 0 || self.order.world == 0 {
            return Err(vec!["order: batch_size and world must be at least 1".into()]);
        }
        Ok(Operator::Source(Box::new(crate::sources::lmdb_train::LmdbTrainSource { dir, order: self.order })))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(cnclip_schemas::train_samples())
    }
}

/// `image_folder`: torchvision `ImageFolder`'s layout (cn_clip's zero-shot sets).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFolderConfig {
    pub path: PathBuf,
}

impl NodeConfig for ImageFolderConfig {
    const KIND: &'static str = "image_folder";
    const ROLE: Role = Role::Source;
    const DOC: &'static str = "`path` (class folders) → labeled_images, in ImageFolder's order";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let root = cx.dir(&self.path, "image folder")?;
        Ok(Operator::Source(Box::new(ImageFolderSource::open(root).map_err(|e| vec![e.to_string()])?)))
    }

    fn known_schema(&self) -> Option<SchemaRef> {
        Some(cnclip_schemas::labeled_images())
    }
}

/// `parquet`: Parquet files sharing one schema.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    pub paths: Vec<String>,
    /// A contract (`images`, `texts`, `pairs`, …) the files must match.
    pub table: Option<String>,
    /// Quarantine a row whose id (`image_id` of an `images` table, `text_id` of a `texts`
    /// table) repeats an earlier row's, as the TSV and JSONL sources do.
    #[serde(default)]
    pub dedupe: bool,
}

impl NodeConfig for ParquetConfig {
    const KIND: &'static str = "parquet";
    const ROLE: Role = Role::Source;
    const DOC: &'static str = "`paths` (files, globs) → their schema; `table` names a contract to check; \
                               `dedupe` (images, texts) quarantines repeated ids";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        use cnclip_schemas::columns::{IMAGE_ID, TEXT_ID};
        let contract = match self.table.as_deref() {
            None => None,
            Some(name) => {
                Some((name, super::contract(name).ok_or_else(|| vec![format!("unknown table contract `{name}`")])?))
            }
        };
        let dedupe = match (self.dedupe, self.table.as_deref()) {
            (false, _) => None,
            (true, Some("images")) => Some((IMAGE_ID, "image")),
            (true, Some("texts")) => Some((TEXT_ID, "text")),
            (true, _) => return Err(vec!["`dedupe` needs `table = \"images\"` or `table = \"texts\"`".into()]),
        };
        let mut source = ParquetSource::open(cx.files(&self.paths)?, contract)?;
        source.dedupe = dedupe;
        Ok(Operator::Source(Box::new(source)))
    }
}

/// `require_images`: drops (and quarantines) the image references of a texts or pairs table
/// that are not among the images `images`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequireImagesConfig {
    /// Images tables (Parquet files, globs) with an `image_id` column, or cn_clip `.tsv` image
    /// shards (the ids of their good lines).
    pub images: Vec<String>,
    /// TSV lines longer than this name no image, as the `tsv` source's (default 256 MiB).
    #[serde(default = "max_record_bytes")]
    pub max_record_bytes: usize,
}

impl Default for RequireImagesConfig {
    fn default() -> Self {
        RequireImagesConfig { images: Vec::new(), max_record_bytes: max_record_bytes() }
    }
}

impl NodeConfig for RequireImagesConfig {
    const KIND: &'static str = "require_images";
    const ROLE: Role = Role::Transform;
    const DOC: &'static str = "texts/pairs → only the image ids found in `images` (Parquet tables or .tsv shards; \
         `max_record_bytes`); the others quarantined";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        let transform = RequireImages::new(cx.files(&self.images)?).with_max_record_bytes(self.max_record_bytes);
        Ok(Operator::Transform(Arc::new(transform)))
    }
}

/// `exclude_ids`: drops the rows whose `column` id is in the `id` column of the Parquet
/// `tables` (a resumed job's finished parts).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExcludeIdsConfig {
    /// The input's id column (`image_id`, `text_id`).
    pub column: String,
    /// Parquet files (globs) with an int64 `id` column.
    pub tables: Vec<String>,
}

impl NodeConfig for ExcludeIdsConfig {
    const KIND: &'static str = "exclude_ids";
    const ROLE: Role = Role::Transform;
    const DOC: &'static str = "any → the rows whose `column` id is not in the `id` column of the Parquet `tables`";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        use crate::transforms::exclude_ids::ExcludeIds;
        let tables = if self.tables.is_empty() { Vec::new() } else { cx.files(&self.tables)? };
        let exclude =
            ExcludeIds::open(&self.column, &tables, cnclip_schemas::columns::ID).map_err(|e| vec![e.to_string()])?;
        Ok(Operator::Transform(Arc::new(exclude)))
    }
}

/// `feature_jsonl`: cn_clip's feature files (`{"image_id": …, "feature": […]}` per line).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureJsonlConfig {
    pub paths: Vec<String>,
    /// `image_id` or `text_id`.
    pub id_key: String,
    #[serde(default = "max_record_bytes")]
    pub max_record_bytes: usize,
}

impl NodeConfig for FeatureJsonlConfig {
    const KIND: &'static str = "feature_jsonl";
    const ROLE: Role = Role::Source;
    const DOC: &'static str = "`paths`, `id_key` (image_id | text_id) → a feature table (id, feature)";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        use crate::sources::features::FeatureJsonlSource;
        let paths = cx.files(&self.paths)?;
        let source =
            FeatureJsonlSource::open(paths, &self.id_key, self.max_record_bytes).map_err(|e| vec![e.to_string()])?;
        Ok(Operator::Source(Box::new(source)))
    }
}

/// `decode_base64`: `image_base64` → `image` bytes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeBase64Config {}

impl NodeConfig for DecodeBase64Config {
    const KIND: &'static str = "decode_base64";
    const ROLE: Role = Role::Transform;
    const DOC: &'static str = "image_base64 → image (both alphabets, padded or not); bad base64 quarantined";
    fn build(self, _: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Transform(Arc::new(DecodeBase64)))
    }
}

fn default_resolution() -> usize {
    224
}
fn default_context_length() -> usize {
    crate::transforms::tokenizer::DEFAULT_CONTEXT_LENGTH
}
fn default_max_pixels() -> u64 {
    crate::decoders::image::DEFAULT_MAX_PIXELS
}

/// `preprocess`: image decode + cn_clip's resize.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessConfig {
    #[serde(default = "default_resolution")]
    pub resolution: usize,
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    #[serde(default)]
    pub order: Order,
}

impl NodeConfig for PreprocessConfig {
    const KIND: &'static str = "preprocess";
    const ROLE: Role = Role::Transform;
    const DOC: &'static str = "image → pixels (`resolution`² RGB bytes); `order`, `max_pixels`; bad images quarantined";
    fn build(self, _: &BuildContext) -> Result<Operator, Vec<String>> {
        if !(1..=4096).contains(&self.resolution) {
            return Err(vec![format!("resolution {} is not between 1 and 4096", self.resolution)]);
        }
        let preprocess = Preprocess { resolution: self.resolution, max_pixels: self.max_pixels, order: self.order };
        Ok(Operator::Transform(Arc::new(preprocess)))
    }
}

/// `random_augment`: image decode + cn_clip's `--use-augment` training transform (random
/// resized crop, flip, timm's 'original' AutoAugment), drawn per row from `seed` and the row's
/// `sample` (else `image_id`); the same `pixels` as `preprocess`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomAugmentConfig {
    #[serde(default = "default_resolution")]
    pub resolution: usize,
    pub seed: u64,
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

impl NodeConfig for RandomAugmentConfig {
    const KIND: &'static str = "random_augment";
    const ROLE: Role = Role::Transform;
    const DOC: &'static str =
        "image → pixels with cn_clip's train augmentation drawn from `seed` + `sample`; `resolution`, `max_pixels`";
    fn build(self, _: &BuildContext) -> Result<Operator, Vec<String>> {
        use crate::transforms::augment::RandomAugment;
        if !(1..=4096).contains(&self.resolution) {
            return Err(vec![format!("resolution {} is not between 1 and 4096", self.resolution)]);
        }
        let augment = RandomAugment { resolution: self.resolution, seed: self.seed, max_pixels: self.max_pixels };
        Ok(Operator::Transform(Arc::new(augment)))
    }
}

/// `tokenize`: `text` → + `token_ids`, as `cn_clip.clip.tokenize`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    #[serde(default = "default_context_length")]
    pub context_length: usize,
    #[serde(default)]
    pub preprocess: bool,
}

impl NodeConfig for TokenizeConfig {
    const KIND: &'static str = "tokenize";
    const ROLE: Role = Role::Transform;
    const DOC: &'static str = "text → + token_ids; `context_length` (52), `preprocess` (datasets' lower-casing)";
    fn build(self, _: &BuildContext) -> Result<Operator, Vec<String>> {
        if !(2..=4096).contains(&self.context_length) {
            return Err(vec![format!("context_length {} is not between 2 and 4096", self.context_length)]);
        }
        Ok(Operator::Transform(Arc::new(Tokenize { context_length: self.context_length, preprocess: self.preprocess })))
    }
}

/// `write_parquet`: any table → a zstd Parquet file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteParquetConfig {
    pub path: PathBuf,
}

impl NodeConfig for WriteParquetConfig {
    const KIND: &'static str = "write_parquet";
    const ROLE: Role = Role::Sink;
    const DOC: &'static str = "any table → `path` (zstd, row groups ≤ 64k rows / 64 MiB)";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Sink(Box::new(WriteParquetConfig { path: cx.resolve(&self.path) })))
    }
}

impl SinkSpec for WriteParquetConfig {
    fn path(&self) -> &Path {
        &self.path
    }
    fn accepts(&self, _: &SchemaRef) -> Result<(), Vec<String>> {
        Ok(())
    }
    fn open(&self, schema: &SchemaRef) -> Result<Box<dyn Sink>> {
        let table = self.path.file_stem().unwrap_or_default().to_string_lossy();
        Ok(Box::new(ParquetSink::create(&self.path, &table, schema.clone())?))
    }
}

/// `write_jsonl`: a table of ints, strings, floats and lists → JSON lines as Python writes them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteJsonlConfig {
    pub path: PathBuf,
    /// Output names for columns (`{ id = "image_id" }`).
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
}

impl NodeConfig for WriteJsonlConfig {
    const KIND: &'static str = "write_jsonl";
    const ROLE: Role = Role::Sink;
    const DOC: &'static str = "ints/strings/floats/lists → `path` (json.dumps formatting); `rename`";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Sink(Box::new(WriteJsonlConfig { path: cx.resolve(&self.path), rename: self.rename })))
    }
}

impl SinkSpec for WriteJsonlConfig {
    fn path(&self) -> &Path {
        &self.path
    }
    fn accepts(&self, schema: &SchemaRef) -> Result<(), Vec<String>> {
        JsonlSink::accepts(schema, &self.rename)
    }
    fn open(&self, schema: &SchemaRef) -> Result<Box<dyn Sink>> {
        Ok(Box::new(JsonlSink::create(&self.path, schema, &self.rename)?))
    }
}

/// `write_tsv`: images → cn_clip's `image_id<TAB>base64` lines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteTsvConfig {
    pub path: PathBuf,
}

impl NodeConfig for WriteTsvConfig {
    const KIND: &'static str = "write_tsv";
    const ROLE: Role = Role::Sink;
    const DOC: &'static str = "image or image_base64 → `path` (URL-safe base64)";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Sink(Box::new(WriteTsvConfig { path: cx.resolve(&self.path) })))
    }
}

impl SinkSpec for WriteTsvConfig {
    fn path(&self) -> &Path {
        &self.path
    }
    fn accepts(&self, schema: &SchemaRef) -> Result<(), Vec<String>> {
        TsvSink::accepts(schema).map_err(|e| vec![e.to_string()])
    }
    fn open(&self, _: &SchemaRef) -> Result<Box<dyn Sink>> {
        Ok(Box::new(TsvSink::create(&self.path)?))
    }
}

/// `write_lmdb`: cn_clip's `imgs` or `pairs` database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteLmdbConfig {
    pub path: PathBuf,
    pub database: Database,
    /// `bulk` (default) or `txn` (LMDB's own write transactions).
    #[serde(default)]
    pub writer: LmdbWriterKind,
}

impl NodeConfig for WriteLmdbConfig {
    const KIND: &'static str = "write_lmdb";
    const ROLE: Role = Role::Sink;
    const DOC: &'static str =
        "`path`, `database` = imgs (from images) | pairs (from pairs or texts); `writer` = bulk | txn";
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        Ok(Operator::Sink(Box::new(WriteLmdbConfig { path: cx.resolve(&self.path), ..self })))
    }
}

impl SinkSpec for WriteLmdbConfig {
    fn path(&self) -> &Path {
        &self.path
    }
    fn accepts(&self, schema: &SchemaRef) -> Result<(), Vec<String>> {
        LmdbSink::accepts(schema, self.database).map_err(|e| vec![e.to_string()])
    }
    fn open(&self, _: &SchemaRef) -> Result<Box<dyn Sink>> {
        Ok(Box::new(LmdbSink::create(&self.path, self.database, self.writer)?))
    }
}

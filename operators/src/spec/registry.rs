//! The node registry: every kind a pipeline may use, with its config type, its constructor and
//! its docs. The parser and the planner know no kind by name — they look kinds up here — so a
//! crate that links new kinds (`cnclip-torch`'s encoders, a test's toy transform) extends the
//! vocabulary by registering them, without editing this crate (Vector's component configs,
//! DataFusion's `FunctionRegistry`).
//!
//! A kind is a serde config type implementing [`NodeConfig`], kept beside the operator it builds
//! (`TsvConfig` in `sources/tsv.rs`, `WriteLmdbConfig` in `sinks/lmdb.rs`): `deny_unknown_fields`
//! gives the per-key messages, its `///` comments are its `--kinds` docs ([`KindDoc`]), and
//! [`NodeConfig::build`] checks the values (files exist, numbers in range) and returns the
//! runtime [`Operator`]. [`Registry::builtin`] lists this crate's kinds. Config fields are
//! public, so fixed pipelines (`cnclip import`, `export`) build nodes from typed values
//! ([`NodeDef::new`](super::NodeDef::new)); the TOML form deserializes into the same types.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use serde::de::DeserializeOwned;

use super::docs::KindDoc;
use crate::error::Result;
use crate::sinks::Sink;
use crate::sources::{Source, expand_paths};
use crate::transforms::Transform;

/// What a node does in the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads records from outside; takes no input.
    Source,
    /// Maps its input's batches to new ones.
    Transform,
    /// Writes its input to a file; nothing reads from it.
    Sink,
}

/// A node built from its configuration, ready to be wired into a graph.
pub enum Operator {
    Source(Box<dyn Source>),
    Transform(Arc<dyn Transform>),
    Sink(Box<dyn SinkSpec>),
}

impl Operator {
    pub fn role(&self) -> Role {
        match self {
            Operator::Source(_) => Role::Source,
            Operator::Transform(_) => Role::Transform,
            Operator::Sink(_) => Role::Sink,
        }
    }
}

/// A configured sink, before it is opened: validated against its input's schema at planning,
/// opened (its temporary output created) when the job starts.
pub trait SinkSpec: Send + Sync {
    /// The output it will write (two sinks may not share one).
    fn path(&self) -> &Path;

    /// Whether it can write a table of `schema`.
    ///
    /// # Errors
    /// One sentence per problem.
    fn accepts(&self, schema: &SchemaRef) -> Result<(), Vec<String>>;

    /// Creates its output at a temporary path.
    ///
    /// # Errors
    /// IO errors naming the output.
    fn open(&self, schema: &SchemaRef) -> Result<Box<dyn Sink>>;

    /// As [`open`](Self::open), for a sink whose output depends on the job (its shard, for
    /// `write_parts`); the default ignores the job.
    ///
    /// # Errors
    /// IO errors naming the output.
    fn open_in(&self, schema: &SchemaRef, cx: &SinkContext) -> Result<Box<dyn Sink>> {
        let _ = cx;
        self.open(schema)
    }
}

/// What a sink may need of the job when it opens.
#[derive(Debug, Clone, Copy)]
pub struct SinkContext {
    /// The job's share of its sources (`--shard i/n`).
    pub shard: crate::sources::Shard,
}

/// A node kind's configuration: the keys of its `[nodes.NAME]` table besides `kind` and `input`.
///
/// Its docs are its [`JsonSchema`](schemars::JsonSchema) ([`KindDoc`]): the type's `///` comment
/// says what the kind reads and writes (`image → pixels`), each field's says what its key
/// means, and `#[serde(default = "…")]` gives the default `--kinds` shows. The first paragraph
/// of each is what `--kinds` prints.
pub trait NodeConfig: DeserializeOwned + schemars::JsonSchema + Send + 'static {
    /// The `kind = "…"` that selects it.
    const KIND: &'static str;
    const ROLE: Role;

    /// Checks the values and builds the operator; relative paths are resolved by `cx`.
    ///
    /// # Errors
    /// Every problem found, one sentence each (the planner prefixes the node's name).
    fn build(self, cx: &BuildContext) -> Result<Operator, Vec<String>>;

    /// A source's output schema when its config alone fixes it (not its files): planning then
    /// checks the nodes that read it even when it cannot be built (a missing file), so a file
    /// with both problems reports both. `None` (the default): readers of a failed node are not
    /// checked.
    fn known_schema(&self) -> Option<SchemaRef> {
        None
    }
}

/// A node that could not be built: its problems, and its output schema if its config fixes it
/// ([`NodeConfig::known_schema`]).
pub(crate) type BuildFailure = (Vec<String>, Option<SchemaRef>);

/// Builds `config`, keeping its known schema for when the build fails.
pub(crate) fn build_config<C: NodeConfig>(config: C, cx: &BuildContext) -> Result<Operator, BuildFailure> {
    let schema = config.known_schema();
    config.build(cx).map_err(|problems| (problems, schema))
}

/// What a constructor may need besides its config: where relative paths start.
pub struct BuildContext {
    base: PathBuf,
}

impl BuildContext {
    pub fn new(base: &Path) -> Self {
        BuildContext { base: base.to_path_buf() }
    }

    /// `path` relative to the pipeline file's directory, with `.` and `..` folded lexically so
    /// messages show `demo/x.tsv`, not `examples/pipelines/../../demo/x.tsv`. A URL (`s3://…`,
    /// `file://…`) is kept as written.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        use std::path::Component;
        if crate::storage::is_url(path) {
            return path.to_path_buf();
        }
        let joined = if path.is_absolute() { path.to_path_buf() } else { self.base.join(path) };
        let mut out = PathBuf::new();
        for part in joined.components() {
            match part {
                Component::CurDir => {}
                Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                    out.pop();
                }
                other => out.push(other),
            }
        }
        if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
    }

    /// Files and globs, resolved and expanded (every missing file or empty glob reported).
    ///
    /// # Errors
    /// One line per path that does not exist or pattern that matches nothing.
    pub fn files(&self, patterns: &[String]) -> Result<Vec<PathBuf>, Vec<String>> {
        let resolved: Vec<String> =
            patterns.iter().map(|p| self.resolve(Path::new(p)).to_string_lossy().into_owned()).collect();
        expand_paths(&resolved)
    }

    /// A directory that must exist; `what` names it in the message.
    ///
    /// # Errors
    /// When it is not a directory.
    pub fn dir(&self, path: &Path, what: &str) -> Result<PathBuf, Vec<String>> {
        let path = self.resolve(path);
        if path.is_dir() { Ok(path) } else { Err(vec![format!("{what} {} is not a directory", path.display())]) }
    }
}

/// A registered kind: its name, role and docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: &'static str,
    pub role: Role,
    /// Its `cnclip run --kinds` line ([`fmt::Display`](std::fmt::Display)), from its config.
    pub doc: KindDoc,
}

type Constructor = Box<dyn Fn(&toml::Table, &BuildContext) -> Result<Operator, BuildFailure> + Send + Sync>;

struct Entry {
    info: KindInfo,
    build: Constructor,
}

/// The kinds a pipeline may use, in registration order (the order messages list them in).
#[derive(Default)]
pub struct Registry {
    entries: Vec<Entry>,
}

impl Registry {
    /// A registry with no kinds.
    pub fn empty() -> Self {
        Registry::default()
    }

    /// The kinds of this crate: every source, transform and sink that needs no model, sources
    /// first, then transforms, then sinks (the order `--kinds` lists them in). Each config lives
    /// beside the operator it builds.
    pub fn builtin() -> Self {
        use crate::{sinks, sources, transforms};
        let mut registry = Registry::empty();
        registry
            .register::<sources::tsv::TsvConfig>()
            .register::<sources::jsonl::JsonlConfig>()
            .register::<sources::lmdb::LmdbConfig>()
            .register::<sources::lmdb_train::LmdbTrainConfig>()
            .register::<sources::train_shards::TrainShardsConfig>()
            .register::<sources::folder::ImageFolderConfig>()
            .register::<sources::parquet::ParquetConfig>()
            .register::<sources::features::FeatureJsonlConfig>()
            .register::<sources::webdataset::WebDatasetConfig>()
            .register::<transforms::base64::DecodeBase64Config>()
            .register::<transforms::require_images::RequireImagesConfig>()
            .register::<transforms::exclude_ids::ExcludeIdsConfig>()
            .register::<transforms::preprocess::PreprocessConfig>()
            .register::<transforms::augment::RandomAugmentConfig>()
            .register::<transforms::tokenize::TokenizeConfig>()
            .register::<sinks::parquet::WriteParquetConfig>()
            .register::<sinks::jsonl::WriteJsonlConfig>()
            .register::<sinks::tsv::WriteTsvConfig>()
            .register::<sinks::webdataset::WriteWebDatasetConfig>()
            .register::<sinks::parts::WritePartsConfig>()
            .register::<sinks::lmdb::WriteLmdbConfig>()
            .register::<sinks::discard::DiscardConfig>();
        registry
    }

    /// Adds kind `C::KIND`.
    ///
    /// # Panics
    /// When a kind of that name is already registered: two crates claiming one name is a
    /// programming error, not a user's.
    pub fn register<C: NodeConfig>(&mut self) -> &mut Self {
        assert!(self.get(C::KIND).is_none(), "node kind `{}` is registered twice", C::KIND);
        self.entries.push(Entry {
            info: KindInfo { kind: C::KIND, role: C::ROLE, doc: KindDoc::of::<C>() },
            build: Box::new(|table, cx| build_config(deserialize::<C>(table).map_err(|p| (p, None))?, cx)),
        });
        self
    }

    /// Every registered kind, in registration order.
    pub fn kinds(&self) -> impl Iterator<Item = &KindInfo> {
        self.entries.iter().map(|e| &e.info)
    }

    /// The kind called `kind`, if registered.
    pub fn get(&self, kind: &str) -> Option<&KindInfo> {
        self.entries.iter().find(|e| e.info.kind == kind).map(|e| &e.info)
    }

    /// Builds a node of kind `kind` from its TOML table.
    ///
    /// # Errors
    /// An unknown kind (listing the known ones), or the config's problems.
    pub fn build(&self, kind: &str, table: &toml::Table, cx: &BuildContext) -> Result<Operator, Vec<String>> {
        self.build_or_schema(kind, table, cx).map_err(|(problems, _)| problems)
    }

    /// As [`Registry::build`], with the failed node's known schema.
    pub(crate) fn build_or_schema(
        &self,
        kind: &str,
        table: &toml::Table,
        cx: &BuildContext,
    ) -> Result<Operator, BuildFailure> {
        match self.entries.iter().find(|e| e.info.kind == kind) {
            Some(entry) => (entry.build)(table, cx),
            None => Err((vec![self.unknown(kind)], None)),
        }
    }

    /// "unknown kind `x` (sources: …; transforms: …; sinks: …)".
    pub fn unknown(&self, kind: &str) -> String {
        let list = |role: Role| self.kinds().filter(|k| k.role == role).map(|k| k.kind).collect::<Vec<_>>().join(", ");
        format!(
            "unknown kind `{kind}` (sources: {}; transforms: {}; sinks: {})",
            list(Role::Source),
            list(Role::Transform),
            list(Role::Sink)
        )
    }
}

/// A config table as `C`, its problems as one line.
fn deserialize<C: DeserializeOwned>(table: &toml::Table) -> Result<C, Vec<String>> {
    C::deserialize(toml::Value::Table(table.clone())).map_err(|e| vec![e.to_string().trim_end().replace('\n', " ")])
}

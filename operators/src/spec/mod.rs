//! Pipelines described in TOML, validated as a whole, and run on the `pipeline` runtime.
//!
//! ```toml
//! [job]                              # every key optional
//! on_error = "skip"                  # or "fail"
//! quarantine = "out/quarantine.jsonl"
//! shard = "0/1"                      # this job's share of every source: record k if k mod n = i
//! batch_rows = 256
//! threads = 0                        # worker threads for decoding; 0 = one per core
//!
//! [nodes.images]                     # a node named `images`
//! kind = "tsv"
//! paths = ["data/train_imgs.tsv", "data/more/*_imgs.tsv"]
//!
//! [nodes.decoded]
//! kind = "decode_base64"
//! input = "images"
//!
//! [nodes.pixels]
//! kind = "preprocess"
//! input = "decoded"
//! resolution = 224
//!
//! [nodes.out]
//! kind = "write_parquet"
//! input = "pixels"
//! path = "out/train_pixels.parquet"
//! ```
//!
//! One module per concern, in the order a pipeline goes through them:
//! - `parse`: TOML text → `[job]` settings and node definitions (shape only);
//! - [`registry`]: kind → config type, constructor and docs; the built-in kinds' configs live
//!   beside their operators (`sources::tsv::TsvConfig`, …) and [`Registry::builtin`] lists
//!   them, and other crates add theirs ([`Registry::register`]) — `cnclip-torch` its model
//!   kinds, so `cnclip run` hands it a pipeline that uses them;
//! - [`docs`]: a kind's `--kinds` line, read from its config's `///` comments;
//! - `plan`: builds every node and validates the graph → [`Pipeline`];
//! - `wire`: the graph on the runtime, each transform on its executor, outputs committed
//!   only when every node has succeeded → [`Report`];
//! - `stream`: a node's output handed to the caller ([`Pipeline::stream`]) instead of a sink.
//!
//! Relative paths are relative to the pipeline file. Validation reports every problem it finds
//! at once: unknown kinds and keys, missing or unknown inputs, cycles, unused outputs, files
//! that do not exist, globs that match nothing, and columns a node needs that its input lacks.

pub mod docs;
mod parse;
mod plan;
pub mod registry;
mod report;
mod stream;
mod wire;

use arrow::datatypes::SchemaRef;

pub use docs::{KeyDoc, KindDoc};
pub use parse::JobSettings;
pub use plan::{NodeDef, Pipeline, Planner};
pub use registry::{BuildContext, KindInfo, NodeConfig, Operator, Registry, Role, SinkContext, SinkSpec};
pub use report::Report;
pub use stream::{PipelineStream, RecordBatchStream};

/// The contract schema called `name`, for tables without parameters.
pub fn contract(name: &str) -> Option<SchemaRef> {
    Some(match name {
        "images" => cnclip_schemas::images(),
        "images_base64" => cnclip_schemas::images_base64(),
        "labeled_images" => cnclip_schemas::labeled_images(),
        "texts" => cnclip_schemas::texts(),
        "pairs" => cnclip_schemas::pairs(),
        "predictions" => cnclip_schemas::predictions(),
        "quarantine" => cnclip_schemas::quarantine(),
        _ => return None,
    })
}

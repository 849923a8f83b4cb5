//! Pipeline files: TOML text → job settings and node definitions. Only the shape is checked
//! here (tables where tables belong, `kind` and `input` strings, known `[job]` keys); kinds and
//! their keys are the registry's business, the graph the planner's. Every problem is collected,
//! so one bad key never hides another.

use std::path::PathBuf;

use serde::Deserialize;

use super::plan::NodeDef;
use crate::quarantine::OnError;

/// Job-wide settings (`[job]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSettings {
    pub on_error: OnError,
    pub quarantine: PathBuf,
    pub shard: String,
    pub batch_rows: usize,
    pub threads: usize,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            on_error: OnError::Skip,
            quarantine: "quarantine.jsonl".into(),
            shard: "0/1".into(),
            batch_rows: 256,
            threads: 0,
        }
    }
}

impl<'de> Deserialize<'de> for OnError {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "fail" => Ok(OnError::Fail),
            "skip" => Ok(OnError::Skip),
            other => Err(serde::de::Error::custom(format!("on_error is `{other}`, expected `fail` or `skip`"))),
        }
    }
}

/// The `[job]` keys.
const JOB_KEYS: [&str; 5] = ["on_error", "quarantine", "shard", "batch_rows", "threads"];

/// What a pipeline file says, and what is wrong with its shape.
pub(crate) struct Parsed {
    pub settings: JobSettings,
    pub defs: Vec<NodeDef>,
    pub problems: Vec<String>,
}

/// Parses a pipeline file's text.
///
/// # Errors
/// TOML that does not parse at all (one message); shape problems come back in [`Parsed`].
pub(crate) fn parse(text: &str) -> Result<Parsed, Vec<String>> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| vec![e.to_string().trim_end().to_string()])?;
    let mut parsed = Parsed { settings: JobSettings::default(), defs: Vec::new(), problems: Vec::new() };
    for (key, value) in table {
        match (key.as_str(), value) {
            ("job", toml::Value::Table(job)) => parsed.settings = job_settings(job, &mut parsed.problems),
            ("job", _) => parsed.problems.push("`job` must be a table ([job])".into()),
            ("nodes", toml::Value::Table(nodes)) => {
                for (name, node) in nodes {
                    match node_def(&name, node) {
                        Ok(def) => parsed.defs.push(def),
                        Err(problem) => parsed.problems.push(format!("node `{name}`: {problem}")),
                    }
                }
            }
            ("nodes", _) => parsed.problems.push("`nodes` must be a table of [nodes.NAME] tables".into()),
            (other, _) => {
                parsed.problems.push(format!("unknown top-level key `{other}` (expected [job] and [nodes.NAME])"))
            }
        }
    }
    if parsed.defs.is_empty() && parsed.problems.is_empty() {
        parsed.problems.push("no nodes: define at least a source and a sink as [nodes.NAME] tables".into());
    }
    Ok(parsed)
}

/// `[job]`, key by key, so one bad key does not hide the others' problems.
fn job_settings(job: toml::Table, problems: &mut Vec<String>) -> JobSettings {
    let mut good = toml::Table::new();
    for (key, value) in job {
        if !JOB_KEYS.contains(&key.as_str()) {
            problems.push(format!("[job]: unknown key `{key}` (expected one of {})", JOB_KEYS.join(", ")));
            continue;
        }
        let one: toml::Table = [(key.clone(), value.clone())].into_iter().collect();
        match toml::Value::Table(one).try_into::<JobSettings>() {
            Ok(_) => {
                good.insert(key, value);
            }
            Err(e) => problems.push(format!("[job]: {key}: {}", e.to_string().trim_end().replace('\n', " "))),
        }
    }
    toml::Value::Table(good).try_into().expect("every key checked")
}

/// What is wrong with the shape of a `[nodes.NAME]` entry.
#[derive(Debug, thiserror::Error)]
enum NodeShapeError {
    #[error("expected a table ([nodes.{name}])")]
    NotATable { name: String },
    #[error("kind must be a string, not {0}")]
    KindNotAString(toml::Value),
    #[error("missing `kind`")]
    NoKind,
    #[error("input must be a node name, not {0}")]
    InputNotAString(toml::Value),
}

/// `[nodes.NAME]`: its `kind`, its `input` and the rest of its keys (the kind's config).
fn node_def(name: &str, node: toml::Value) -> Result<NodeDef, NodeShapeError> {
    let toml::Value::Table(mut config) = node else {
        return Err(NodeShapeError::NotATable { name: name.to_string() });
    };
    let kind = match config.remove("kind") {
        Some(toml::Value::String(kind)) => kind,
        Some(other) => return Err(NodeShapeError::KindNotAString(other)),
        None => return Err(NodeShapeError::NoKind),
    };
    let input = match config.remove("input") {
        None => None,
        Some(toml::Value::String(input)) => Some(input),
        Some(other) => return Err(NodeShapeError::InputNotAString(other)),
    };
    Ok(NodeDef::toml(name, &kind, input.as_deref(), config))
}

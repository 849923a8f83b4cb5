//! Planning: node definitions → a validated [`Pipeline`]. Each node is built through the
//! registry (or from its typed config), then the graph is checked as a whole — inputs that
//! exist, sinks nobody reads, outputs somebody reads, one sink per path, no cycles — and each
//! node's output schema is derived from its input's, in dependency order, so a column a node
//! needs and its input lacks is reported before anything runs. Every problem is reported.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;

use super::parse::{JobSettings, parse};
use super::registry::{BuildContext, BuildFailure, NodeConfig, Operator, Registry, Role, build_config};
use crate::error::Problems;
use crate::sources::Shard;
use crate::storage;

type BuildTyped = Box<dyn FnOnce(&BuildContext) -> Result<Operator, BuildFailure> + Send>;

/// A node as written: its name, its input and its kind's configuration — a TOML table (from a
/// pipeline file) or a typed config (a fixed pipeline built in code).
pub struct NodeDef {
    pub name: String,
    pub input: Option<String>,
    definition: Definition,
}

enum Definition {
    Toml { kind: String, config: toml::Table },
    Typed { kind: &'static str, role: Role, build: BuildTyped },
}

impl NodeDef {
    /// A node of kind `C::KIND` from its typed config.
    pub fn new<C: NodeConfig>(name: &str, input: Option<&str>, config: C) -> Self {
        let build: BuildTyped = Box::new(move |cx| build_config(config, cx));
        NodeDef {
            name: name.into(),
            input: input.map(Into::into),
            definition: Definition::Typed { kind: C::KIND, role: C::ROLE, build },
        }
    }

    /// A node of kind `kind` with the keys of its TOML table (looked up in the registry).
    pub fn toml(name: &str, kind: &str, input: Option<&str>, config: toml::Table) -> Self {
        NodeDef {
            name: name.into(),
            input: input.map(Into::into),
            definition: Definition::Toml { kind: kind.into(), config },
        }
    }

    pub fn kind(&self) -> &str {
        match &self.definition {
            Definition::Toml { kind, .. } => kind,
            Definition::Typed { kind, .. } => kind,
        }
    }

    fn role(&self, registry: &Registry) -> Option<Role> {
        match &self.definition {
            Definition::Toml { kind, .. } => registry.get(kind).map(|k| k.role),
            Definition::Typed { role, .. } => Some(*role),
        }
    }

    fn build(self, registry: &Registry, cx: &BuildContext) -> Result<Operator, BuildFailure> {
        match self.definition {
            Definition::Toml { kind, config } => registry.build_or_schema(&kind, &config, cx),
            Definition::Typed { build, .. } => build(cx),
        }
    }
}

pub(crate) struct PlannedNode {
    pub name: String,
    pub input: Option<String>,
    pub op: Operator,
}

/// A validated pipeline, ready to run ([`Pipeline::run`]) or to stream ([`Pipeline::stream`]).
pub struct Pipeline {
    pub settings: JobSettings,
    pub shard: Shard,
    pub(crate) nodes: Vec<PlannedNode>,
    /// Each node's output schema (sinks: their input's).
    pub(crate) schemas: BTreeMap<String, SchemaRef>,
    /// Where each node's rows come from, for quarantine records.
    pub(crate) origins: BTreeMap<String, String>,
    /// The node whose output the caller consumes, if any.
    pub(crate) stream: Option<String>,
}

impl Pipeline {
    /// Parses and validates a pipeline file with the built-in kinds; relative paths are taken
    /// from `base`.
    ///
    /// # Errors
    /// Every problem found, one sentence each.
    pub fn parse(text: &str, base: &Path) -> Result<Self, Problems> {
        Planner::new(&Registry::builtin()).base(base).parse(text)
    }

    /// Validates nodes built in code (as `cnclip import`/`export` do) with the built-in kinds.
    ///
    /// # Errors
    /// Every problem found, one sentence each.
    pub fn plan(settings: JobSettings, defs: Vec<NodeDef>, base: &Path) -> Result<Self, Problems> {
        Planner::new(&Registry::builtin()).base(base).plan(settings, defs)
    }

    /// The schema of the streamed node's batches, if the pipeline streams one.
    pub fn stream_schema(&self) -> Option<SchemaRef> {
        self.stream.as_ref().map(|node| self.schemas[node].clone())
    }
}

/// Plans pipelines with a registry of kinds, from a base directory, optionally streaming one
/// node's output to the caller.
pub struct Planner<'r> {
    registry: &'r Registry,
    base: PathBuf,
    stream: Option<String>,
}

impl<'r> Planner<'r> {
    pub fn new(registry: &'r Registry) -> Self {
        Planner { registry, base: PathBuf::new(), stream: None }
    }

    /// Where relative paths start (the pipeline file's directory).
    pub fn base(mut self, base: &Path) -> Self {
        self.base = base.to_path_buf();
        self
    }

    /// Hands node `node`'s output batches to the caller ([`Pipeline::stream`]); it then needs
    /// no sink.
    pub fn stream(mut self, node: &str) -> Self {
        self.stream = Some(node.to_string());
        self
    }

    /// Parses and validates a pipeline file.
    ///
    /// # Errors
    /// Every problem found, one sentence each.
    pub fn parse(&self, text: &str) -> Result<Pipeline, Problems> {
        let parsed = parse(text).map_err(Problems)?;
        let mut problems = parsed.problems;
        match self.plan(parsed.settings, parsed.defs) {
            Ok(pipeline) if problems.is_empty() => Ok(pipeline),
            Ok(_) => Err(Problems(problems)),
            Err(more) => {
                problems.extend(more);
                Err(Problems(problems))
            }
        }
    }

    /// Validates nodes and the graph they make.
    ///
    /// # Errors
    /// Every problem found, one sentence each.
    pub fn plan(&self, settings: JobSettings, defs: Vec<NodeDef>) -> Result<Pipeline, Problems> {
        let cx = BuildContext::new(&self.base);
        let mut problems = Vec::new();
        let shard = settings.shard.parse::<Shard>().unwrap_or_else(|e| {
            problems.push(format!("[job]: {e}"));
            Shard::ALL
        });
        if settings.batch_rows == 0 {
            problems.push("[job]: batch_rows must be at least 1".into());
        }
        // Names, inputs and roles first: building consumes the definitions.
        let names: BTreeSet<String> = defs.iter().map(|d| d.name.clone()).collect();
        let shapes: Vec<(String, Option<String>, Option<Role>)> =
            defs.iter().map(|d| (d.name.clone(), d.input.clone(), d.role(self.registry))).collect();
        let mut nodes = Vec::new();
        // Failed sources whose schema their config fixes: their readers are still checked.
        let mut known = BTreeMap::new();
        for def in defs {
            let name = def.name.clone();
            let mut problem = |p: String| problems.push(format!("node `{name}`: {p}"));
            let Some(role) = def.role(self.registry) else {
                problem(self.registry.unknown(def.kind()));
                continue;
            };
            match (&def.input, role) {
                (Some(_), Role::Source) => problem(format!("a `{}` source takes no input", def.kind())),
                (None, Role::Transform | Role::Sink) => {
                    problem(format!("missing `input` (the node whose output `{}` reads)", def.kind()))
                }
                (Some(input), _) if *input == name => problem("reads from itself".into()),
                (Some(input), _) if !names.contains(input) => problem(format!("reads from unknown node `{input}`")),
                _ => {}
            }
            let (kind, input) = (def.kind().to_string(), def.input.clone());
            match def.build(self.registry, &cx) {
                Ok(op) if op.role() != role => {
                    problem(format!("kind `{kind}` is registered as a {role:?} but built a {:?}", op.role()))
                }
                Ok(op) => nodes.push(PlannedNode { name: name.clone(), input, op }),
                Err((errors, schema)) => {
                    errors.into_iter().for_each(&mut problem);
                    if let (Some(schema), Role::Source) = (schema, role) {
                        known.insert(name.clone(), schema);
                    }
                }
            }
        }
        // Cycles, from the inputs alone: a node in one may also have failed to build, and its
        // cycle must be reported all the same.
        for cycle in cycles(&shapes) {
            problems.push(format!("the graph has a cycle through {}", cycle.join(", ")));
        }
        // Who reads whom: sinks must not be read, everything else must be (or be streamed).
        for (name, _, role) in &shapes {
            let streamed = self.stream.as_deref() == Some(name.as_str());
            let readers = shapes.iter().filter(|(_, input, _)| input.as_deref() == Some(name)).count();
            match role {
                Some(Role::Sink) if readers > 0 || streamed => {
                    problems.push(format!("node `{name}` is a sink: nothing can read from it"))
                }
                Some(Role::Source | Role::Transform) if readers == 0 && !streamed => problems
                    .push(format!("node `{name}`: nothing reads its output (add a sink with input = \"{name}\")")),
                _ => {}
            }
        }
        if let Some(streamed) = &self.stream
            && !names.contains(streamed)
        {
            problems.push(format!("cannot stream node `{streamed}`: there is no such node"));
        }
        let mut seen_outputs = BTreeMap::new();
        for node in &nodes {
            // Compared resolved: `out/a.parquet` and `./out/../out/a.parquet` are one file.
            let resolved = |path: &std::path::Path| {
                storage::canonicalize(path.parent().unwrap_or(path))
                    .map(|dir| dir.join(path.file_name().unwrap_or_default()))
                    .unwrap_or_else(|_| path.to_path_buf())
            };
            if let Operator::Sink(sink) = &node.op
                && let Some(other) = seen_outputs.insert(resolved(sink.path()), node.name.clone())
            {
                problems.push(format!("nodes `{other}` and `{}` both write {}", node.name, sink.path().display()));
            }
        }
        let (schemas, origins) = derive_schemas(&nodes, &names, known, &mut problems);
        if problems.is_empty() {
            let settings = JobSettings { quarantine: cx.resolve(&settings.quarantine), ..settings };
            Ok(Pipeline { settings, shard, nodes, schemas, origins, stream: self.stream.clone() })
        } else {
            Err(Problems(problems))
        }
    }
}

type Schemas = (BTreeMap<String, SchemaRef>, BTreeMap<String, String>);

/// Each node's output schema and the origin of its rows, in dependency order; a cycle leaves
/// nodes unresolved and is reported. Nodes that failed to build count as failed inputs (their
/// readers are not checked again), except sources whose schema is `known` all the same.
fn derive_schemas(
    nodes: &[PlannedNode],
    names: &BTreeSet<String>,
    known: BTreeMap<String, SchemaRef>,
    problems: &mut Vec<String>,
) -> Schemas {
    let mut origins: BTreeMap<String, String> = known.keys().map(|name| (name.clone(), name.clone())).collect();
    let mut schemas: BTreeMap<String, SchemaRef> = known;
    let mut failed: BTreeSet<String> = names
        .iter()
        .filter(|name| !nodes.iter().any(|n| &n.name == *name) && !schemas.contains_key(*name))
        .cloned()
        .collect();
    loop {
        let mut progressed = false;
        for node in nodes {
            if schemas.contains_key(&node.name) || failed.contains(&node.name) {
                continue;
            }
            let (input_schema, origin) = match (&node.input, &node.op) {
                (None, Operator::Source(source)) => (None, source.origin()),
                (None, _) => (None, node.name.clone()),
                (Some(input), _) if failed.contains(input) || !names.contains(input) => {
                    failed.insert(node.name.clone());
                    progressed = true;
                    continue;
                }
                (Some(input), _) => match schemas.get(input) {
                    Some(schema) => (Some(schema.clone()), origins[input].clone()),
                    None => continue, // not resolved yet
                },
            };
            let result = match (&node.op, input_schema) {
                (Operator::Source(source), _) => Ok(source.schema()),
                (Operator::Transform(t), Some(schema)) => t.output_schema(&schema).map_err(|e| vec![e.to_string()]),
                (Operator::Sink(sink), Some(schema)) => sink.accepts(&schema).map(|()| schema),
                (_, None) => Err(vec![]),
            };
            progressed = true;
            match result {
                Ok(schema) => {
                    schemas.insert(node.name.clone(), schema);
                    origins.insert(node.name.clone(), origin);
                }
                Err(errors) => {
                    let input = node.input.as_deref().unwrap_or("?");
                    for e in errors {
                        problems.push(format!("node `{}` (reading `{input}`): {e}", node.name));
                    }
                    failed.insert(node.name.clone());
                }
            }
        }
        if !progressed {
            break;
        }
    }
    // Nodes left unresolved are on a cycle or read one: [`cycles`] reported it.
    (schemas, origins)
}

/// Every cycle of the graph (each node has at most one input, so each cycle is found by
/// following inputs from any of its nodes), each named by its nodes in sorted order.
fn cycles(shapes: &[(String, Option<String>, Option<Role>)]) -> Vec<Vec<String>> {
    let input: BTreeMap<&str, &str> =
        shapes.iter().filter_map(|(name, input, _)| Some((name.as_str(), input.as_deref()?))).collect();
    let mut found: BTreeSet<Vec<String>> = BTreeSet::new();
    for (start, _, _) in shapes {
        let mut path: Vec<&str> = vec![start.as_str()];
        let mut at = start.as_str();
        while let Some(&next) = input.get(at) {
            if next == at {
                break; // reads from itself: reported where inputs are checked
            }
            if let Some(position) = path.iter().position(|n| *n == next) {
                let mut cycle: Vec<String> = path[position..].iter().map(|n| n.to_string()).collect();
                cycle.sort();
                found.insert(cycle);
                break;
            }
            path.push(next);
            at = next;
        }
    }
    found.into_iter().collect()
}

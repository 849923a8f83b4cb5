//! A kind's docs — its `cnclip run --kinds` line — read from its config type, so they are
//! written once, as the config's `///` comments (Vector generates its reference docs from its
//! configs' field comments the same way).
//!
//! The config derives [`schemars::JsonSchema`], which carries the doc comments and the serde
//! defaults into a JSON Schema; [`KindDoc::of`] reads that schema: the type's comment is the
//! kind's summary (what it reads → what it writes), each field's comment its key's description,
//! a field's `#[serde(default …)]` its default, an enum's variants its values. Only the first
//! paragraph of a comment goes into the line, as rustdoc's summaries; later paragraphs are for
//! rustdoc alone.
//!
//! JSON Schema keeps no field order (`serde_json` without `preserve_order` sorts the
//! properties), so keys are listed in the order serde's derived `Deserialize` declares them
//! (read through `declared_fields`); keys of a nested table, which that does not reach, go
//! required first, then by name.

use std::fmt;

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde::de::{DeserializeOwned, Visitor};
use serde_json::{Map, Value};

/// A kind's documentation, as `cnclip run --kinds` prints it ([`fmt::Display`]: one line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindDoc {
    /// The first paragraph of the config type's doc comment.
    pub summary: String,
    /// Its keys, in the order the config declares them.
    pub keys: Vec<KeyDoc>,
}

/// One key of a kind's `[nodes.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDoc {
    pub name: String,
    /// The first paragraph of the field's doc comment.
    pub description: String,
    /// The values an enum key takes (empty for other keys).
    pub values: Vec<String>,
    /// The keys of a nested table (empty for other keys).
    pub fields: Vec<String>,
    /// The value when the key is left out, if it has a meaningful one (not empty, not none).
    pub default: Option<String>,
    /// Whether a pipeline must give it.
    pub required: bool,
}

impl KindDoc {
    /// The docs of config type `C`.
    pub fn of<C: JsonSchema + DeserializeOwned>() -> Self {
        let schema = SchemaSettings::draft2020_12()
            .for_deserialize()
            .with(|s| s.inline_subschemas = true)
            .into_generator()
            .into_root_schema_for::<C>();
        let root = schema.as_object().cloned().unwrap_or_default();
        let mut names: Vec<String> = declared_fields::<C>().iter().map(|f| f.to_string()).collect();
        let rest: Vec<String> = ordered_keys(&root).into_iter().filter(|k| !names.contains(k)).collect();
        names.extend(rest);
        let keys = names.iter().filter_map(|name| key_doc(&root, name)).collect();
        KindDoc { summary: summary(root.get("description")), keys }
    }
}

impl fmt::Display for KindDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary)?;
        if self.keys.is_empty() {
            return Ok(());
        }
        if !self.summary.ends_with('.') {
            f.write_str(".")?;
        }
        f.write_str(" Keys: ")?;
        for (i, key) in self.keys.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{key}")?;
        }
        Ok(())
    }
}

/// `` `writer` = bulk | txn (how the database is written; default bulk) ``.
impl fmt::Display for KeyDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", self.name)?;
        if !self.values.is_empty() {
            write!(f, " = {}", self.values.join(" | "))?;
        }
        if !self.fields.is_empty() {
            write!(f, " = {{{}}}", self.fields.join(", "))?;
        }
        let note = match (&self.default, self.required) {
            (Some(default), _) => Some(format!("default {default}")),
            (None, false) => Some("optional".to_string()),
            (None, true) => None,
        };
        let description = in_line(&self.description);
        let parts: Vec<&str> =
            [Some(description.as_str()), note.as_deref()].into_iter().flatten().filter(|s| !s.is_empty()).collect();
        if !parts.is_empty() {
            write!(f, " ({})", parts.join("; "))?;
        }
        Ok(())
    }
}

/// The first paragraph of a doc comment, on one line, without its final period.
fn summary(description: Option<&Value>) -> String {
    let text = description.and_then(Value::as_str).unwrap_or_default();
    let first = text.trim().split("\n\n").next().unwrap_or_default();
    let line = first.split_whitespace().collect::<Vec<_>>().join(" ");
    line.strip_suffix('.').map(str::to_string).unwrap_or(line)
}

/// A key's description as the line shows it, inside parentheses after the key: its first
/// letter lower-cased unless it starts an acronym (`TSV lines …`).
fn in_line(description: &str) -> String {
    let mut chars = description.chars();
    match (chars.next(), chars.next()) {
        (Some(first), Some(second)) if first.is_uppercase() && !second.is_uppercase() => {
            first.to_lowercase().chain(description[first.len_utf8()..].chars()).collect()
        }
        _ => description.to_string(),
    }
}

/// A table schema's keys, required ones first (in their order), then the others by name.
fn ordered_keys(object: &Map<String, Value>) -> Vec<String> {
    let mut keys: Vec<String> = object
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    let properties = object.get("properties").and_then(Value::as_object);
    keys.extend(
        properties.into_iter().flat_map(|p| p.keys()).filter(|k| !keys.contains(k)).cloned().collect::<Vec<_>>(),
    );
    keys
}

fn key_doc(root: &Map<String, Value>, name: &str) -> Option<KeyDoc> {
    let property = root.get("properties")?.get(name)?.as_object()?;
    let required = root.get("required").and_then(Value::as_array).is_some_and(|r| r.iter().any(|k| k == name));
    let mut values = Vec::new();
    variants(property, &mut values);
    let fields = nested_table(property).map(ordered_keys).unwrap_or_default();
    let default = property.get("default").and_then(|d| match d {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Array(a) if a.is_empty() => None,
        Value::Object(o) if o.is_empty() => None,
        other => Some(other.to_string()),
    });
    Some(KeyDoc {
        name: name.to_string(),
        description: summary(property.get("description")),
        values,
        fields,
        default,
        required,
    })
}

/// The values of an enum schema (`enum`, `const`, or alternatives of those), none excepted.
fn variants(schema: &Map<String, Value>, out: &mut Vec<String>) {
    let mut push = |value: &Value| {
        if let Some(s) = value.as_str()
            && !out.iter().any(|v| v == s)
        {
            out.push(s.to_string());
        }
    };
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        values.iter().for_each(&mut push);
    }
    if let Some(value) = schema.get("const") {
        push(value);
    }
    for alternatives in ["oneOf", "anyOf"] {
        for alternative in schema.get(alternatives).and_then(Value::as_array).into_iter().flatten() {
            if let Some(alternative) = alternative.as_object() {
                variants(alternative, out);
            }
        }
    }
}

/// The table schema a key holds, directly or as the non-null alternative of an `Option`.
fn nested_table(schema: &Map<String, Value>) -> Option<&Map<String, Value>> {
    if schema.get("properties").is_some() {
        return Some(schema);
    }
    schema
        .get("anyOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .find(|alternative| alternative.get("properties").is_some())
}

/// The field names `C`'s derived `Deserialize` hands to `deserialize_struct`, in declaration
/// order, renamed and skipped fields accounted for; empty when `C` deserializes otherwise (a
/// hand-written impl, a map).
pub(crate) fn declared_fields<C: DeserializeOwned>() -> &'static [&'static str] {
    match C::deserialize(FieldNames) {
        Err(Found(Some(fields))) => fields,
        _ => &[],
    }
}

/// A deserializer that only asks for the struct's field names.
struct FieldNames;

/// How [`FieldNames`] stops: with the field names, or without (not a struct).
#[derive(Debug)]
struct Found(Option<&'static [&'static str]>);

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field names read")
    }
}

impl std::error::Error for Found {}

impl serde::de::Error for Found {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Found(None)
    }
}

impl<'de> serde::Deserializer<'de> for FieldNames {
    type Error = Found;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
        Err(Found(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Found> {
        Err(Found(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Registry;

    /// The `tsv` kind's line is its config's comments: the type's summary, every field with its
    /// description and serde default.
    #[test]
    fn a_line_is_read_from_the_config_comments() {
        let registry = Registry::builtin();
        let tsv = registry.get("tsv").expect("tsv is built in");
        let line = tsv.doc.to_string();
        assert!(line.starts_with("cn_clip image shards"), "{line}");
        for field in declared_fields::<crate::sources::tsv::TsvConfig>() {
            let (plain, choice) = (format!("`{field}` ("), format!("`{field}` = "));
            assert!(line.contains(&plain) || line.contains(&choice), "{field} missing from {line}");
        }
        assert!(line.contains("default true") && line.contains("default 268435456"), "{line}");
        let lmdb = registry.get("write_lmdb").unwrap().doc.to_string();
        assert!(lmdb.contains("`database` = imgs | pairs (") && lmdb.contains("`writer` = bulk | txn ("), "{lmdb}");
        let train = registry.get("lmdb_train").unwrap().doc.to_string();
        assert!(
            train.contains("`order` = {seed, epoch, world, batch_size, end, rank, shuffle_buffer, start}"),
            "{train}"
        );
    }

    /// No built-in kind has a key, or itself, without a description: a field added without a
    /// `///` comment fails here.
    #[test]
    fn every_builtin_key_is_documented() {
        let registry = Registry::builtin();
        let mut undocumented = Vec::new();
        for kind in registry.kinds() {
            if kind.doc.summary.is_empty() {
                undocumented.push(kind.kind.to_string());
            }
            undocumented.extend(
                kind.doc.keys.iter().filter(|k| k.description.is_empty()).map(|k| format!("{}.{}", kind.kind, k.name)),
            );
        }
        assert!(undocumented.is_empty(), "undocumented: {undocumented:?}");
        assert_eq!(registry.kinds().count(), 22);
    }

    /// Keys come in declaration order, renamed and skipped fields as serde sees them.
    #[test]
    fn keys_follow_the_declaration() {
        /// Reads → writes.
        #[derive(serde::Deserialize, schemars::JsonSchema)]
        #[allow(dead_code)]
        struct Toy {
            /// Zed.
            zed: u32,
            /// Renamed.
            #[serde(rename = "alpha")]
            beta: Option<String>,
            #[serde(skip)]
            skipped: bool,
            /// Middle.
            #[serde(default = "seven")]
            middle: usize,
        }
        fn seven() -> usize {
            7
        }
        assert_eq!(declared_fields::<Toy>(), ["zed", "alpha", "middle"]);
        assert_eq!(
            KindDoc::of::<Toy>().to_string(),
            "Reads → writes. Keys: `zed` (zed); `alpha` (renamed; optional); `middle` (middle; default 7)"
        );
    }
}

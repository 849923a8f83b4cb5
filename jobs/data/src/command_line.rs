//! A job's typed options written back as the command line a user would type, for the jobs that
//! run other jobs (`demo`, training's data preparation, `bench-suite`): they call the other job
//! with its typed options and print this line, so what is shown is what runs.
//!
//! The flags come from the options' clap definition (long names, positionals, defaults) and
//! the values from their `Serialize` form, whose field names are clap's argument ids. A value
//! equal to its flag's default is left out; `None` and `false` are never written. Each job's
//! tests parse the line back and compare it with the options.

use serde_json::Value;

/// Why options cannot be written as a command line (a bug in their definition: the tests of
/// every job that is run this way render and parse its options).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the options do not serialize: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("the options serialize as {0}, not as an object of fields")]
    NotAnObject(&'static str),
    #[error("argument `{0}` has no field of that name in the options")]
    NoField(String),
    #[error("argument `{id}`: {value} cannot be written on a command line")]
    Value { id: String, value: String },
}

/// `options` as the arguments after the subcommand's name: positionals first, then each flag
/// whose value is not its default, in the order clap declares them.
///
/// # Errors
/// [`Error`] when the options' serialized form does not match their clap definition.
pub fn render<A: clap::Args + serde::Serialize>(options: &A) -> Result<Vec<String>, Error> {
    let command = A::augment_args(clap::Command::new("job"));
    let fields = match serde_json::to_value(options)? {
        Value::Object(fields) => fields,
        Value::Array(_) => return Err(Error::NotAnObject("an array")),
        _ => return Err(Error::NotAnObject("a single value")),
    };
    let (mut positionals, mut flags) = (Vec::new(), Vec::new());
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        let value = fields.get(id).ok_or_else(|| Error::NoField(id.to_string()))?;
        let texts = match value {
            Value::Null | Value::Bool(false) => continue,
            Value::Array(items) if items.is_empty() => continue,
            Value::Bool(true) => Vec::new(),
            Value::Array(items) => items.iter().map(|item| text(id, item)).collect::<Result<_, _>>()?,
            other => vec![text(id, other)?],
        };
        match arg.get_long() {
            None => positionals.push((arg.get_index().unwrap_or(usize::MAX), texts)),
            Some(long) => {
                let defaults: Vec<String> =
                    arg.get_default_values().iter().map(|d| d.to_string_lossy().into_owned()).collect();
                if !texts.is_empty() && same_values(&texts, &defaults) {
                    continue;
                }
                flags.push(format!("--{long}"));
                flags.extend(texts);
            }
        }
    }
    positionals.sort_by_key(|(index, _)| *index);
    Ok(positionals.into_iter().flat_map(|(_, texts)| texts).chain(flags).collect())
}

/// Whether a flag's values are its defaults: the same text, or the same number written
/// another way (`0.0` and clap's `0`).
fn same_values(values: &[String], defaults: &[String]) -> bool {
    let number = |text: &String| text.parse::<f64>().ok();
    values.len() == defaults.len()
        && values.iter().zip(defaults).all(|(v, d)| v == d || number(v).is_some_and(|v| number(d) == Some(v)))
}

/// One value as clap reads it back: a string as is, a number in its shortest exact form.
fn text(id: &str, value: &Value) -> Result<String, Error> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(Error::Value { id: id.to_string(), value: other.to_string() }),
    }
}

/// `argv` parsed as the options of subcommand `name`, exactly as the binary parses them: what
/// the jobs' tests compare [`render`]'s line with.
///
/// # Errors
/// clap's error for arguments the options do not take.
pub fn parse<A: clap::Args + clap::FromArgMatches>(name: &'static str, argv: &[String]) -> Result<A, clap::Error> {
    let command = A::augment_args(clap::Command::new(name).no_binary_name(true));
    A::from_arg_matches(&command.try_get_matches_from(argv)?)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[derive(clap::Args, serde::Serialize, Debug, PartialEq)]
    struct Options {
        /// A positional.
        input: PathBuf,
        /// A second positional.
        output: Option<String>,
        /// A number with a default.
        #[arg(long, default_value_t = 10)]
        top_k: usize,
        /// A float.
        #[arg(long, default_value_t = 2e-3)]
        lr: f64,
        /// A switch.
        #[arg(long)]
        debug: bool,
        /// Several values.
        #[arg(long, num_args = 1..)]
        image_data: Vec<String>,
        /// An enum.
        #[arg(long, value_enum, default_value_t = Kind::Bulk)]
        writer: Kind,
        /// Optional.
        #[arg(long)]
        seed: Option<u64>,
    }

    #[derive(clap::ValueEnum, serde::Serialize, Clone, Copy, Debug, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    enum Kind {
        Bulk,
        TxnLog,
    }

    fn round_trip(options: &Options) -> Vec<String> {
        let line = super::render(options).unwrap();
        let parsed: Options = super::parse("job", &line).unwrap();
        assert_eq!(&parsed, options, "{line:?}");
        line
    }

    #[test]
    fn defaults_are_left_out_and_the_rest_parses_back() {
        let defaults = Options {
            input: "in".into(),
            output: None,
            top_k: 10,
            lr: 0.002,
            debug: false,
            image_data: vec![],
            writer: Kind::Bulk,
            seed: None,
        };
        assert_eq!(round_trip(&defaults), ["in"]);
        let every = Options {
            input: "a b".into(),
            output: Some("out".into()),
            top_k: 3,
            lr: 1e-6,
            debug: true,
            image_data: vec!["x.tsv".into(), "y.tsv".into()],
            writer: Kind::TxnLog,
            seed: Some(0),
        };
        assert_eq!(
            round_trip(&every),
            [
                "a b",
                "out",
                "--top-k",
                "3",
                "--lr",
                "1e-6",
                "--debug",
                "--image-data",
                "x.tsv",
                "y.tsv",
                "--writer",
                "txn-log",
                "--seed",
                "0"
            ]
        );
    }
}

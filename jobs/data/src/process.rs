//! What both binaries share: logging and progress set-up, exit codes and the error line a user
//! sees.

use std::process::ExitCode;
use std::time::Duration;

use clap::builder::TypedValueParser;
use cnclip_pipeline::{ProgressMode, ProgressSettings};

/// How long jobs show their progress: flags of both binaries, given before or after the
/// subcommand, or as environment variables (so a model command run through `cnclip` and a
/// batch script's jobs all get them).
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct ProgressArgs {
    /// Progress on stderr: auto (a bar on a terminal, else a line every --progress-interval seconds), text or json lines, none.
    #[arg(
        long,
        global = true,
        env = "CNCLIP_PROGRESS",
        default_value = "auto",
        value_parser = clap::builder::PossibleValuesParser::new(ProgressMode::NAMES)
            .map(|name| name.parse::<ProgressMode>().expect("one of the names"))
    )]
    pub progress: ProgressMode,
    /// Seconds between two progress lines in a log (stderr not a terminal), or with --progress text|json.
    #[arg(long, global = true, env = "CNCLIP_PROGRESS_INTERVAL", default_value_t = 30.0, value_parser = positive_seconds)]
    pub progress_interval: f64,
}

impl ProgressArgs {
    /// Sets this process's progress display (once, in `main`).
    pub fn configure(&self) {
        cnclip_pipeline::progress::configure(ProgressSettings {
            mode: self.progress,
            interval: Duration::from_secs_f64(self.progress_interval),
        });
    }

    /// The flags as the environment variables a child process (`cnclip-torch`) reads them from.
    pub fn environment(&self) -> [(&'static str, String); 2] {
        [
            ("CNCLIP_PROGRESS", self.progress.to_string()),
            ("CNCLIP_PROGRESS_INTERVAL", self.progress_interval.to_string()),
        ]
    }
}

/// Where object storage is and how to reach it: `--storage-option KEY=VALUE` flags of both
/// binaries (given before or after the subcommand, or as `CNCLIP_STORAGE_OPTIONS=K=V,K=V`), on top
/// of the environment the stores' SDKs read (`AWS_*`, `GOOGLE_*`, `AZURE_*`); see
/// `cnclip_operators::storage::remote`.
#[derive(clap::Args, Debug, Clone, PartialEq, Default)]
pub struct StorageArgs {
    /// An object store setting, KEY=VALUE (repeatable): endpoint, region, access_key_id, secret_access_key, timeout, connect_timeout, allow_http, retries, retry_timeout, … for s3://, gs://, az://, https:// paths.
    #[arg(
        long = "storage-option",
        global = true,
        env = "CNCLIP_STORAGE_OPTIONS",
        value_delimiter = ',',
        value_name = "KEY=VALUE",
        value_parser = key_value
    )]
    pub storage_options: Vec<(String, String)>,
}

impl StorageArgs {
    /// Sets this process's object store options (once, in `main`).
    pub fn configure(&self) {
        cnclip_operators::storage::remote::configure(self.storage_options.clone());
    }

    /// The flags as the environment variable a child process (`cnclip-torch`) reads them from.
    pub fn environment(&self) -> Vec<(&'static str, String)> {
        if self.storage_options.is_empty() {
            return Vec::new();
        }
        let joined = self.storage_options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        vec![("CNCLIP_STORAGE_OPTIONS", joined)]
    }
}

/// `KEY=VALUE`, the key not empty.
fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_string(), value.to_string())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

/// A number of seconds above 0 and at most a day.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds <= 86_400.0 => Ok(seconds),
        _ => Err(format!("`{text}` is not a number of seconds above 0 (at most 86400)")),
    }
}

/// Logs to stderr, filtered by `RUST_LOG`.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
}

/// 0 on success (a closed stdout pipe, as in `cnclip tokenize … | head`, counts as success),
/// 130 or 143 for a job that SIGINT or SIGTERM stopped, 1 otherwise, with the error chain on
/// stderr.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cnclip: {}", message(&error));
            // A job asked to stop that then failed was interrupted, whatever its error says (an
            // interruption a step reported as text, as a pipeline's plan does). The shell's
            // convention: 128 + the signal's number.
            match interrupted_by(&error).or_else(cnclip_operators::signals::interrupted) {
                Some("SIGINT") => ExitCode::from(130),
                Some(_) => ExitCode::from(143),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// The error and its causes as one line, each cause once (library errors often show their
/// source in their own message too), with the hint for a record that failed the job.
fn message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    let failed_on_a_record = error.chain().any(|cause| {
        matches!(cause.downcast_ref::<cnclip_operators::Error>(), Some(cnclip_operators::Error::Record { .. }))
    });
    if failed_on_a_record {
        message.push_str(" (--on-error fail)");
    }
    message
}

/// The signal that stopped the job, if one did: named by the error, or by the
/// [`Stopped`](cnclip_operators::signals::Stopped) error a request it cut short became.
fn interrupted_by(error: &anyhow::Error) -> Option<&'static str> {
    error
        .chain()
        .find_map(|cause| match cause.downcast_ref::<cnclip_operators::Error>() {
            Some(cnclip_operators::Error::Interrupted { signal }) => Some(*signal),
            _ => None,
        })
        .or_else(|| {
            error.chain().find_map(|cause| {
                let inner = cause.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref);
                inner.and_then(|e| e.downcast_ref::<cnclip_operators::signals::Stopped>()).map(|stopped| stopped.0)
            })
        })
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}

/// Every argument of `command` and its subcommands that has no `--help` text, as `cnclip
/// SUBCOMMAND --flag` lines (clap's own `--help` and `--version` aside): the binaries' tests
/// require none.
pub fn arguments_without_help(command: &clap::Command) -> Vec<String> {
    fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let blank = |help: Option<&clap::builder::StyledStr>| help.is_none_or(|h| h.to_string().trim().is_empty());
            if blank(arg.get_help()) && blank(arg.get_long_help()) {
                let name = match (arg.get_long(), arg.get_short()) {
                    (Some(long), _) => format!("--{long}"),
                    (None, Some(short)) => format!("-{short}"),
                    (None, None) => {
                        format!("<{}>", arg.get_value_names().and_then(|v| v.first()).map_or(id, |v| v.as_str()))
                    }
                };
                missing.push(format!("{path} {name}"));
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }

    let mut missing = Vec::new();
    walk(command, command.get_name(), &mut missing);
    missing
}

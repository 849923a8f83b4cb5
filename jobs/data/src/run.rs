//! `cnclip run PIPELINE.toml`: runs a pipeline described in TOML (see
//! `cnclip_operators::spec` for the format). Every configuration problem is reported at once,
//! before anything is read; `--check` stops there.
//!
//! Both binaries run pipelines: `cnclip` with the built-in kinds, `cnclip-torch` with those and
//! the model kinds it registers. `cnclip` hands a pipeline that names a kind it does not know
//! to `cnclip-torch`, so users never choose between them.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use cnclip_operators::quarantine::OnError;
use cnclip_operators::sources::Shard;
use cnclip_operators::spec::{Planner, Registry};

#[derive(clap::Args)]
pub struct Args {
    /// The pipeline file.
    #[arg(required_unless_present = "kinds")]
    pub pipeline: Option<PathBuf>,
    /// List the node kinds this binary knows, with their keys, and exit.
    #[arg(long)]
    kinds: bool,
    /// Only validate the pipeline (files, kinds, inputs, columns) and print its nodes.
    #[arg(long)]
    check: bool,
    /// Override [job] shard: this job's share `i/n` of every source.
    #[arg(long)]
    shard: Option<Shard>,
    /// Override [job] on_error.
    #[arg(long, value_enum)]
    on_error: Option<OnError>,
    /// Override [job] threads (0: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Override [job] quarantine (`.jsonl`, or `.parquet` for a table).
    #[arg(long)]
    quarantine: Option<PathBuf>,
}

pub fn run(args: Args, registry: &Registry) -> Result<()> {
    if args.kinds {
        for kind in registry.kinds() {
            println!("{:<14} {:<9} {}", kind.kind, format!("{:?}", kind.role).to_lowercase(), kind.doc);
        }
        return Ok(());
    }
    let Some(path) = args.pipeline.clone() else { bail!("give a pipeline file (or --kinds)") };
    let text = cnclip_operators::sources::read_text(&path, cnclip_operators::sources::MAX_TEXT_BYTES)
        .with_context(|| format!("reading {}", path.display()))?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    let mut text_table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => bail!("{}: {}", path.display(), e.to_string().trim_end()),
    };
    // Command-line overrides go into [job] before validation, so they are checked too.
    let job = text_table.entry("job").or_insert_with(|| toml::Value::Table(Default::default()));
    if let toml::Value::Table(job) = job {
        if let Some(shard) = &args.shard {
            job.insert("shard".into(), toml::Value::String(shard.to_string()));
        }
        if let Some(on_error) = args.on_error {
            job.insert(
                "on_error".into(),
                toml::Value::String(if on_error == OnError::Fail { "fail" } else { "skip" }.into()),
            );
        }
        if let Some(threads) = args.threads {
            job.insert("threads".into(), toml::Value::Integer(threads as i64));
        }
        if let Some(quarantine) = &args.quarantine {
            // Relative to the working directory, like every path on the command line.
            let absolute =
                std::path::absolute(quarantine).with_context(|| format!("--quarantine {}", quarantine.display()))?;
            job.insert("quarantine".into(), toml::Value::String(absolute.to_string_lossy().into_owned()));
        }
    }
    let pipeline = match Planner::new(registry).base(&base).parse(&text_table.to_string()) {
        Ok(p) => p,
        Err(problems) => {
            let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
            bail!(
                "{}: {} problem{}:\n{}",
                path.display(),
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                list.join("\n")
            );
        }
    };
    if args.check {
        println!("{}: valid (shard {})", path.display(), pipeline.shard);
        return Ok(());
    }
    let start = std::time::Instant::now();
    cnclip_operators::signals::catch_interrupts()?;
    let report = pipeline.run()?;
    eprintln!("cnclip run: {} done in {:.1} s\n{report}", path.display(), start.elapsed().as_secs_f64());
    Ok(())
}

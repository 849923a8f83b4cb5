//! `cnclip convert`: from cn_clip checkpoints (`.pt`), Hugging Face `ChineseCLIPModel`
//! directories or cnclip's self-describing safetensors, to cn_clip `.pt` or cnclip safetensors. The output format follows the output's extension (`.pt`/`.pth` → cn_clip,
//! anything else → cnclip) unless `--format` says otherwise. A cn_clip `.pt` we write loads in
//! cn_clip's `create_model` and eval scripts.

use std::path::PathBuf;

use anyhow::{Context, Result};
use cnclip_models::checkpoint::{self, Format};
use cnclip_operators::options::Precision;
use tch::Device;

use crate::model_args::ModelArgs;

#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct Args {
    /// The checkpoint to read: a cn_clip .pt, a Hugging Face ChineseCLIPModel directory or a cnclip .safetensors.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the converted checkpoint; its extension picks the format unless --format does.
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// Output format: cn-clip (.pt) or cnclip (.safetensors); default from the extension.
    #[arg(long, value_parser = ["cn-clip", "cnclip"])]
    pub format: Option<String>,
    /// Weight precision of the output: fp32, fp16 or bf16.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
}

pub fn run(args: Args) -> Result<()> {
    let architecture = args.model.config()?;
    // A checkpoint in an object store is read from its copy in the spool.
    let input = cnclip_operators::storage::fetch::local_copy(&args.input)
        .with_context(|| format!("loading {}", args.input.display()))?;
    let (mut model, info) = checkpoint::load_clip(&input, architecture.as_ref(), Device::Cpu)
        .with_context(|| format!("loading {}", args.input.display()))?;
    model.set_kind(crate::model_args::weights_kind(args.precision)?);
    let format = match args.format.as_deref() {
        Some("cn-clip") => Format::CnClip,
        Some(_) => Format::Cnclip,
        None => match args.output.extension().and_then(|e| e.to_str()) {
            Some("pt" | "pth") => Format::CnClip,
            _ => Format::Cnclip,
        },
    };
    let state_dict = model.state_dict();
    match format {
        Format::CnClip => checkpoint::save_cn_clip(&args.output, &state_dict, &info)?,
        Format::Cnclip | Format::HuggingFace => checkpoint::own::save(&args.output, &model.config, &state_dict)?,
    }
    eprintln!("cnclip: wrote {} ({} tensors, {format:?} format)", args.output.display(), state_dict.len());
    Ok(())
}

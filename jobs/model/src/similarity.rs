//! `cnclip similarity`: cn_clip's README quick start as a command — load a checkpoint, encode
//! images and texts, print the image–text probabilities (softmax over texts per image).

use std::path::PathBuf;

use anyhow::{Context, Result};
use cnclip_models::checkpoint::load_clip;
use cnclip_models::preprocess::preprocess;
use cnclip_models::{Tokenizer, normalize};
use tch::{Kind, Tensor};

use crate::model_args::ModelArgs;
use cnclip_operators::storage;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint: a cn_clip .pt (then name the architecture) or a cnclip .safetensors.
    #[arg(long)]
    resume: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Image files (JPEG, PNG, GIF, WebP, BMP).
    #[arg(long, num_args = 1.., required = true)]
    image: Vec<PathBuf>,
    /// Candidate texts.
    #[arg(long, num_args = 1.., required = true)]
    text: Vec<String>,
    /// Sequence length, [CLS] and [SEP] included (cn_clip's --context-length).
    #[arg(long, default_value_t = cnclip_models::DEFAULT_CONTEXT_LENGTH)]
    context_length: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print features, logits and probabilities as one JSON object.
    #[arg(long)]
    json: bool,
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
    let cols = *t.size().last().unwrap_or(&0) as usize;
    let flat: Vec<f32> = Vec::try_from(t.flatten(0, -1))?;
    Ok(flat.chunks(cols.max(1)).map(<[f32]>::to_vec).collect())
}

pub fn run(args: Args) -> Result<()> {
    let device = cnclip_models::device::device(&args.device)?;
    let architecture = args.model.config()?;
    let resume = cnclip_operators::storage::fetch::local_copy(&args.resume)
        .with_context(|| format!("loading {}", args.resume.display()))?;
    let (model, _) = load_clip(&resume, architecture.as_ref(), device)
        .with_context(|| format!("loading {}", args.resume.display()))?;
    let r = model.input_resolution() as usize;
    let positions = model.config.text.text_max_position_embeddings;
    if args.context_length < 2 || args.context_length as i64 > positions {
        anyhow::bail!(
            "--context-length {}: the model's text tower takes from 2 to {positions} tokens",
            args.context_length
        );
    }
    let pixels = args
        .image
        .iter()
        .map(|path| {
            // A FIFO would block the read, /dev/zero fill memory: image files only.
            let bytes = match storage::metadata(path) {
                Ok(meta) if !meta.is_file() => anyhow::bail!(
                    "--image {}: {}, not a regular file",
                    path.display(),
                    cnclip_operators::sources::parts::kind_of(&meta)
                ),
                _ => storage::read(path).with_context(|| format!("reading {}", path.display()))?,
            };
            preprocess(&bytes, r).with_context(|| format!("image {}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let pixels = Tensor::stack(&pixels, 0).to_device(device);
    let mut ids = vec![0i64; args.text.len() * args.context_length];
    for (text, row) in args.text.iter().zip(ids.chunks_mut(args.context_length)) {
        Tokenizer::chinese().encode_into(text, row)?;
    }
    let ids = Tensor::from_slice(&ids).view([args.text.len() as i64, args.context_length as i64]).to_device(device);

    let image_features = normalize(&model.encode_image(&pixels)?);
    let text_features = normalize(&model.encode_text(&ids)?);
    let logits_per_image = image_features.matmul(&text_features.tr()) * model.logit_scale();
    let probs = logits_per_image.softmax(-1, Kind::Float);
    if args.json {
        let out = serde_json::json!({
            "image_features": rows(&image_features)?,
            "text_features": rows(&text_features)?,
            "logits_per_image": rows(&logits_per_image)?,
            "probs": rows(&probs)?,
        });
        println!("{out}");
    } else {
        for (path, row) in args.image.iter().zip(rows(&probs)?) {
            println!("{}", path.display());
            for (text, p) in args.text.iter().zip(row) {
                println!("  {p:.4}  {text}");
            }
        }
    }
    Ok(())
}

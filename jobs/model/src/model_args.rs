//! The model-selection flags shared by subcommands, named as in cn_clip's scripts.

use anyhow::{Context, Result, bail};
use cnclip_models::ClipConfig;
use cnclip_operators::options::Precision;
use tch::Kind;

#[derive(clap::Args, Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ModelArgs {
    /// Vision tower (ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14, RN50), as cn_clip's --vision-model.
    #[arg(long)]
    pub vision_model: Option<String>,
    /// Text tower (RoBERTa-wwm-ext-base-chinese, RoBERTa-wwm-ext-large-chinese, RBT3-chinese), as cn_clip's --text-model.
    #[arg(long)]
    pub text_model: Option<String>,
    /// A model config file: cn_clip's merged model_info JSON (for custom sizes).
    #[arg(long, conflicts_with_all = ["vision_model", "text_model"])]
    pub model_config: Option<std::path::PathBuf>,
}

impl ModelArgs {
    /// The named architecture, if any (cnclip checkpoints carry their own).
    pub fn config(&self) -> Result<Option<ClipConfig>> {
        if let Some(path) = &self.model_config {
            let json = cnclip_operators::sources::read_text(path, cnclip_operators::sources::MAX_TEXT_BYTES)
                .map_err(crate::quoted("--model-config"))?;
            return Ok(Some(
                ClipConfig::from_json(&json).with_context(|| format!("--model-config {}", path.display()))?,
            ));
        }
        match (&self.vision_model, &self.text_model) {
            (Some(v), Some(t)) => Ok(Some(ClipConfig::from_name(&format!("{v}@{t}"))?)),
            (None, None) => Ok(None),
            _ => bail!("--vision-model and --text-model go together"),
        }
    }
}

/// The tensor kind of `--precision` where weights are stored or timed in one kind: fp32, fp16
/// or bf16 (`amp` is a way of computing, not a kind).
///
/// # Errors
/// `amp`.
pub fn weights_kind(precision: Precision) -> Result<Kind> {
    Ok(match precision {
        Precision::Fp32 => Kind::Float,
        Precision::Fp16 => Kind::Half,
        Precision::Bf16 => Kind::BFloat16,
        Precision::Amp => bail!(
            "--precision amp computes in fp16 on a GPU and fp32 on the CPU: here give one kind, fp32, fp16 or bf16"
        ),
    })
}

//! `cnclip init-model`: a randomly initialised model saved as a cnclip checkpoint, seeded, for
//! trying the job chain (extraction, retrieval, evaluation) where no pretrained weights can be
//! downloaded. Its scores are chance-level, its files real.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use cnclip_models::Clip;
use cnclip_models::checkpoint::own;

use crate::model_args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Seed of the initialisation (libtorch's generator).
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// The checkpoint to write (cnclip's .safetensors, which records its architecture).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let Some(config) = args.model.config()? else {
        bail!("name the architecture: --vision-model V --text-model T, or --model-config FILE");
    };
    tch::manual_seed(args.seed);
    let model = Clip::new(config.clone(), tch::Device::Cpu)?;
    own::save(&args.output, &config, &model.state_dict())
        .with_context(|| format!("writing {}", args.output.display()))?;
    let (params, _) = model.parameter_counts();
    eprintln!(
        "cnclip init-model: {} ({params} parameters, seed {}) → {}",
        config.name(),
        args.seed,
        args.output.display()
    );
    Ok(())
}

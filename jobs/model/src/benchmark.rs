//! `cnclip benchmark encode`: model-only encode throughput on random weights and inputs.
//!
//! Weights do not change the speed of a forward pass, so no checkpoint is needed; this makes it
//! the portable check to run on a GPU machine. `scripts/bench/encode.py` runs the same batches
//! through cn_clip and prints both side by side.

use std::time::Instant;

use anyhow::{Context, Result};
use cnclip_models::{Clip, ClipConfig, Tokenizer};
use cnclip_operators::options::Precision;
use cnclip_operators::storage;
use tch::{Device, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Released name (ViT-B-16, RN50, …) or Vision@Text.
    #[arg(long, default_value = "ViT-B-16")]
    model: String,
    /// Images, and texts, per encoded batch.
    #[arg(long, default_value_t = 32)]
    batch_size: i64,
    /// Timed batches per tower (after one warm-up batch).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// CPU threads for libtorch (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fp32, fp16 or bf16.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
    /// Text sequence length, [CLS] and [SEP] included (cn_clip's --context-length).
    #[arg(long, default_value_t = 52)]
    context_length: usize,
}

pub fn run(args: Args) -> Result<()> {
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let device = cnclip_models::device::device(&args.device)?;
    let kind = crate::model_args::weights_kind(args.precision)?;
    let config = ClipConfig::from_name(&args.model)?;
    let mut model = Clip::new(config, device).context("building the model")?;
    model.set_kind(kind);
    let r = model.input_resolution();
    let images = Tensor::randn([args.batch_size, 3, r, r], (kind, device));
    let captions = ["一只可爱的小猫在草地上玩耍。", "左上角有一个红色的大圆形", "A photo of a dog playing frisbee."];
    let mut ids = vec![0i64; args.batch_size as usize * args.context_length];
    for (i, row) in ids.chunks_mut(args.context_length).enumerate() {
        Tokenizer::chinese().encode_into(captions[i % captions.len()], row)?;
    }
    let ids = Tensor::from_slice(&ids).view([args.batch_size, args.context_length as i64]).to_device(device);

    let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        drop(f()?); // warm-up (allocator, kernels, cuDNN autotune)
        sync(device);
        let start = Instant::now();
        for _ in 0..args.iters {
            drop(f()?);
        }
        sync(device);
        Ok(start.elapsed().as_secs_f64())
    };
    let image_s = time(&|| Ok(model.encode_image(&images)?))?;
    let text_s = time(&|| Ok(model.encode_text(&ids)?))?;
    let n = (args.batch_size as usize * args.iters) as f64;
    println!(
        "cnclip {} {} {:?} batch {} threads {}: image {:.1}/s, text {:.1}/s",
        args.model,
        args.precision,
        device,
        args.batch_size,
        tch::get_num_threads(),
        n / image_s,
        n / text_s
    );
    Ok(())
}

fn sync(device: Device) {
    if let Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

#[derive(clap::Args)]
pub struct PreprocessArgs {
    /// A cn_clip image TSV (`image_id<TAB>base64`).
    #[arg(long)]
    tsv: std::path::PathBuf,
    /// Side in pixels of the square image the preprocessing makes (the model's input resolution).
    #[arg(long, default_value_t = 224)]
    resolution: usize,
    /// Images to process (from the start of the file).
    #[arg(long, default_value_t = 2000)]
    limit: usize,
}

/// One thread: base64 decode, image decode, resize, RGB, normalise — cn_clip's per-image work.
pub fn run_preprocess(args: PreprocessArgs) -> Result<()> {
    use std::io::BufRead;
    tch::set_num_threads(1); // as the reference's torch.set_num_threads(1)
    let file = storage::open(&args.tsv).with_context(|| format!("opening {}", args.tsv.display()))?;
    let lines: Vec<Vec<u8>> = std::io::BufReader::new(file).split(b'\n').take(args.limit).collect::<Result<_, _>>()?;
    let start = Instant::now();
    let (mut scratch, mut bytes) = (Vec::new(), Vec::new());
    let mut checksum = 0f64;
    for line in &lines {
        let field = line.splitn(2, |&b| b == b'\t').nth(1).context("no tab")?;
        let field = field.strip_suffix(b"\r").unwrap_or(field);
        cnclip_operators::decoders::base64::decode_into(field, &mut scratch, &mut bytes)?;
        let pixels = cnclip_models::preprocess::preprocess(&bytes, args.resolution)?;
        checksum += pixels.double_value(&[0, 0, 0]);
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "cnclip preprocess: {} images in {seconds:.2} s, {:.1} images/s (1 thread; checksum {checksum:.3})",
        lines.len(),
        lines.len() as f64 / seconds
    );
    Ok(())
}

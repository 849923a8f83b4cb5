//! `cnclip synth`: writes the synthetic corpus (see `cnclip_operators::sources::synth`) in
//! cn_clip's layout — `{split}_imgs.tsv` (URL-safe base64 JPEGs) and `{split}_texts.jsonl` — and
//! a zero-shot set in cn_clip's layout (`zeroshot/test/NNN/*.jpg` + `zeroshot/label_cn.txt`).
//! Streams: memory stays flat for millions of rows. Files appear atomically.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use base64::Engine;
use cnclip_operators::sources::synth::{SIZE, labels, sample};
use cnclip_operators::storage;

#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct Args {
    /// Output directory for `{split}_imgs.tsv`, `{split}_texts.jsonl` and `zeroshot/` (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Image–caption pairs in the train split.
    #[arg(long, default_value_t = 1000)]
    pub train: u64,
    /// Image–caption pairs in the valid split.
    #[arg(long, default_value_t = 100)]
    pub valid: u64,
    /// Image–caption pairs in the test split.
    #[arg(long, default_value_t = 100)]
    pub test: u64,
    /// Images per zero-shot class.
    #[arg(long, default_value_t = 5)]
    pub zeroshot_per_class: u64,
    /// Random seed of the corpus: the same seed and counts give the same images and captions.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn jpeg(pixels: &[u8]) -> Result<Vec<u8>> {
    let image =
        turbojpeg::Image { pixels, width: SIZE, pitch: SIZE * 3, height: SIZE, format: turbojpeg::PixelFormat::RGB };
    Ok(turbojpeg::compress(image, 90, turbojpeg::Subsamp::Sub2x2)?.to_vec())
}

pub fn run(args: Args) -> Result<()> {
    storage::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut next_id = 0u64;
    for (split, n) in [("train", args.train), ("valid", args.valid), ("test", args.test)] {
        let first = next_id;
        cnclip_operators::write_atomically(&args.out.join(format!("{split}_imgs.tsv")), |out| -> Result<()> {
            for id in first..first + n {
                let s = sample(args.seed, id);
                let b64 = base64::engine::general_purpose::URL_SAFE.encode(jpeg(&s.pixels)?);
                writeln!(out, "{id}\t{b64}")?;
            }
            Ok(())
        })?;
        cnclip_operators::write_atomically(&args.out.join(format!("{split}_texts.jsonl")), |out| -> Result<()> {
            for id in first..first + n {
                // cn_clip's field order (serde_json's map would sort the keys).
                let caption = serde_json::to_string(&sample(args.seed, id).caption)?;
                writeln!(out, "{{\"text_id\": {id}, \"text\": {caption}, \"image_ids\": [{id}]}}")?;
            }
            Ok(())
        })?;
        next_id += n;
        eprintln!("cnclip synth: {split}: {n} images and captions");
    }
    // Zero-shot: for each class, the first samples of the stream that belong to it.
    let zeroshot = args.out.join("zeroshot");
    let labels = labels();
    let mut counts = vec![0u64; labels.len()];
    let mut index = 1u64 << 40; // a stream of its own, disjoint from the splits
    while counts.iter().any(|&c| c < args.zeroshot_per_class) {
        let s = sample(args.seed, index);
        index += 1;
        if counts[s.label] >= args.zeroshot_per_class {
            continue;
        }
        let dir = zeroshot.join("test").join(format!("{:03}", s.label));
        storage::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.jpg", counts[s.label]));
        let bytes = jpeg(&s.pixels)?;
        cnclip_operators::write_atomically(&path, |out| Ok::<_, anyhow::Error>(out.write_all(&bytes)?))?;
        counts[s.label] += 1;
    }
    cnclip_operators::write_atomically(&zeroshot.join("label_cn.txt"), |out| -> Result<()> {
        for label in &labels {
            writeln!(out, "{label}")?;
        }
        Ok(())
    })?;
    eprintln!(
        "cnclip synth: zero-shot: {} classes × {} images → {}",
        labels.len(),
        args.zeroshot_per_class,
        zeroshot.display()
    );
    Ok(())
}

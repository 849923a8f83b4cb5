//! `cnclip zeroshot-evaluation` (`zeroshot`): cn_clip's `eval/zeroshot_evaluation.py`, with its
//! flags. Two pipelines: the prompts (every class name in every template of the set cn_clip
//! picks for `--dataset`, or `--templates FILE`) → tokenize (with the datasets' text
//! preprocessing) → `encode_text`, streamed here and ensembled per class as cn_clip does
//! (normalise, mean, normalise); then the image folder (torchvision `ImageFolder`'s order,
//! converted to RGB before the resize) → preprocess → `encode_image`, streamed here and scored:
//! `softmax(100 · image_features @ classifier)`. Prints `zeroshot-top1: …` as cn_clip does (a
//! fraction), plus top-5 and mean per-class recall, and writes the ELEVATER JSON
//! (`{save_dir}/{dataset}.json`) with cn_clip's fields and its rounding to 6 decimals.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cnclip_models::checkpoint::{Checkpoint, Format};
use cnclip_models::encoders::{EncodeImageConfig, EncodeTextConfig, EncoderConfig};
use cnclip_models::zeroshot;
use cnclip_operators::options::{Devices, Precision};
use cnclip_operators::sinks::jsonl::python_float;
use cnclip_operators::sources::batches::BatchesConfig;
use cnclip_operators::sources::folder;
use cnclip_operators::sources::folder::ImageFolderConfig;
use cnclip_operators::sources::jsonl::{self, TextLine};
use cnclip_operators::spec::{JobSettings, NodeDef, Planner};
use cnclip_operators::transforms::preprocess::Order;
use cnclip_operators::transforms::preprocess::PreprocessConfig;
use cnclip_operators::transforms::tokenize::TokenizeConfig;
use tch::Tensor;

use crate::registry;
use cnclip_operators::storage;

#[derive(clap::Args, Debug, Clone, PartialEq, serde::Serialize)]
pub struct Args {
    /// The image folder (class subfolders, as torchvision's ImageFolder reads).
    #[arg(long)]
    pub datapath: PathBuf,
    /// Class names, one per line, in class-index order.
    #[arg(long)]
    pub label_file: PathBuf,
    /// The dataset's name: picks the template set as cn_clip does, and names the output JSON.
    #[arg(long, default_value = "imagenet")]
    pub dataset: String,
    /// A JSON list that reorders the predictions (and targets) before they are saved.
    #[arg(long, default_value = "")]
    pub index: String,
    /// Where `{dataset}.json` goes (created if missing).
    #[arg(long, default_value = "")]
    pub save_dir: String,
    /// Images per encoder batch, on each device (cn_clip's --img-batch-size).
    #[arg(long, default_value_t = 64)]
    pub img_batch_size: usize,
    /// Sequence length of the prompts, [CLS] and [SEP] included (cn_clip's --context-length).
    #[arg(long, default_value_t = 52)]
    pub context_length: usize,
    /// The checkpoint (cn_clip .pt, cnclip .safetensors or a Hugging Face directory; cn_clip's --resume).
    #[arg(long)]
    pub resume: PathBuf,
    /// amp (fp16 on a GPU, fp32 on the CPU), fp16, fp32 or bf16.
    #[arg(long, value_enum, default_value_t = Precision::Amp)]
    pub precision: Precision,
    /// Vision tower of a cn_clip .pt (cn_clip's --vision-model); other checkpoints record their own.
    #[arg(long, default_value = "ViT-B-16")]
    pub vision_model: String,
    /// Text tower of a cn_clip .pt (cn_clip's --text-model); other checkpoints record their own.
    #[arg(long, default_value = "RoBERTa-wwm-ext-base-chinese")]
    pub text_model: String,
    /// Decode/preprocess threads (0: one per core).
    #[arg(long, default_value_t = 4)]
    pub num_workers: usize,
    /// One template per line, `{}` where the class name goes (instead of the built-in set).
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// cpu, cuda, cuda:N (one replica each).
    #[arg(long, default_value_t = Devices::cpu())]
    pub devices: Devices,
    /// How top-1 is computed: here, or by `jobs/sql/zeroshot_top1.sql` on DataFusion.
    #[arg(long, value_enum, default_value_t = cnclip_data_jobs::evaluation_engine::Engine::Direct)]
    pub engine: cnclip_data_jobs::evaluation_engine::Engine,
    /// Run the SQL engine on a Ballista cluster (`df://HOST:PORT`, see `cnclip cluster`); its
    /// input tables are written under --save-dir, which every executor must read.
    #[arg(long, value_name = "df://HOST:PORT")]
    pub cluster: Option<String>,
}

impl Args {
    /// The options a command line with only the required flags gives (each flag's default).
    pub fn new(datapath: PathBuf, label_file: PathBuf, resume: PathBuf) -> Self {
        Args {
            datapath,
            label_file,
            dataset: "imagenet".into(),
            index: "".into(),
            save_dir: "".into(),
            img_batch_size: 64,
            context_length: 52,
            resume,
            precision: Precision::Amp,
            vision_model: "ViT-B-16".into(),
            text_model: "RoBERTa-wwm-ext-base-chinese".into(),
            num_workers: 4,
            templates: None,
            devices: Devices::cpu(),
            engine: cnclip_data_jobs::evaluation_engine::Engine::Direct,
            cluster: None,
        }
    }
}

/// The top-1 query (`jobs/sql/zeroshot_top1.sql`).
pub const TOP1_SQL: &str = include_str!("../../sql/zeroshot_top1.sql");

/// Top-1 accuracy by [`TOP1_SQL`]: `features` `[N, D]` with `labels`, `classifier` `[D, C]`;
/// on a cluster (address, a path whose directory the executors share) from Parquet files there.
fn top1_sql(features: &Tensor, labels: &[i64], classifier: &Tensor, cluster: Option<(&str, &Path)>) -> Result<f64> {
    use arrow::array::{FixedSizeListArray, Float32Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    let vectors = |t: &Tensor| -> Result<FixedSizeListArray> {
        let d = t.size()[1] as i32;
        let flat: Vec<f32> = Vec::try_from(t.contiguous().flatten(0, -1))?;
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        Ok(FixedSizeListArray::try_new(item, d, Arc::new(Float32Array::from(flat)), None)?)
    };
    let image_vectors = vectors(features)?;
    let class_vectors = vectors(&classifier.tr())?;
    let n = labels.len() as i64;
    let images = arrow::record_batch::RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("label", DataType::Int64, false),
            Field::new("feature", image_vectors.data_type().clone(), false),
        ])),
        vec![
            Arc::new(Int64Array::from((0..n).collect::<Vec<_>>())),
            Arc::new(Int64Array::from(labels.to_vec())),
            Arc::new(image_vectors),
        ],
    )?;
    let c = class_vectors.len() as i64;
    let classes = arrow::record_batch::RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("class", DataType::Int64, false),
            Field::new("feature", class_vectors.data_type().clone(), false),
        ])),
        vec![Arc::new(Int64Array::from((0..c).collect::<Vec<_>>())), Arc::new(class_vectors)],
    )?;
    let scratch = cluster.map(|(_, near)| cnclip_data_jobs::sql::scratch(near)).transpose()?;
    let scratch_dir = scratch.as_ref().map(|d| d.path());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let batches = runtime.block_on(async {
        let ctx = cnclip_data_jobs::sql::session(cluster.map(|(url, _)| url)).await?;
        cnclip_data_jobs::sql::register_batch(&ctx, "images", images, scratch_dir).await?;
        cnclip_data_jobs::sql::register_batch(&ctx, "classes", classes, scratch_dir).await?;
        anyhow::Ok(ctx.sql(TOP1_SQL).await?.collect().await?)
    })?;
    use arrow::array::{Array, AsArray};
    let batch = batches.first().context("the top-1 query returned nothing")?;
    let column = batch.column(0).as_primitive::<arrow::datatypes::Float64Type>();
    Ok(if column.is_null(0) { 0.0 } else { column.value(0) })
}

/// Streams the `features` node of a pipeline: (ids, features as one `[N, D]` tensor).
fn features(defs: Vec<NodeDef>, settings: JobSettings) -> Result<(Vec<i64>, Tensor)> {
    let registry = registry();
    let pipeline = Planner::new(&registry).stream("features").plan(settings, defs)?;
    let (mut ids, mut values, mut dim) = (Vec::new(), Vec::<f32>::new(), 0i64);
    for batch in pipeline.stream()? {
        let batch = batch?;
        use arrow::array::{Array, AsArray};
        let id = batch.column(0).as_primitive::<arrow::datatypes::Int64Type>();
        let list = batch.column(1).as_fixed_size_list();
        dim = list.value_length() as i64;
        let floats = list.values().as_primitive::<arrow::datatypes::Float32Type>().values();
        ids.extend_from_slice(id.values());
        values.extend_from_slice(&floats[list.offset() * dim as usize..][..list.len() * dim as usize]);
    }
    let n = ids.len() as i64;
    Ok((ids, Tensor::from_slice(&values).view([n, dim.max(1)])))
}

/// A small text input (the label file, the templates, the index): a local file through
/// [`read_text`](cnclip_operators::sources::read_text), which checks its kind and size, or an
/// object in a store, read whole once its size is checked.
fn read_small_text(path: &Path) -> std::io::Result<String> {
    use cnclip_operators::sources::{MAX_TEXT_BYTES, read_text};
    if !storage::is_remote(path) {
        return read_text(path, MAX_TEXT_BYTES);
    }
    let size = storage::size(path)?;
    if size > MAX_TEXT_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is {size} bytes, more than the {MAX_TEXT_BYTES} this input may have", path.display()),
        ));
    }
    storage::read_to_string(path)
}

/// What a zero-shot run measured (fractions).
#[derive(Debug, Clone, Copy)]
pub struct Metrics {
    pub top1: f64,
    pub top5: f64,
    pub mean_per_class_recall: f64,
}

pub fn run(args: Args) -> Result<()> {
    run_with(args).map(|_| ())
}

/// Runs it (printing and writing as `run` does) and returns the metrics.
pub fn run_with(args: Args) -> Result<Metrics> {
    cnclip_operators::signals::catch_interrupts()?;
    if args.cluster.is_some() && args.engine != cnclip_data_jobs::evaluation_engine::Engine::Sql {
        bail!("--cluster runs the SQL engine: add --engine sql");
    }
    let classnames: Vec<String> = read_small_text(&args.label_file)
        .with_context(|| format!("reading {}", args.label_file.display()))?
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    let templates: Vec<String> = match &args.templates {
        Some(path) => read_small_text(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(String::from)
            .collect(),
        None => zeroshot::templates_for(&args.dataset).iter().map(|t| t.to_string()).collect(),
    };
    if classnames.is_empty() {
        bail!("--label-file {}: no class names (one per line, in class folder order)", args.label_file.display());
    }
    if let Some(path) = &args.templates
        && templates.is_empty()
    {
        bail!(
            "--templates {}: no templates (one per line, each with `{{}}` where the class name goes)",
            path.display()
        );
    }
    if templates.iter().any(|t| !t.contains("{}")) {
        bail!("every template needs `{{}}` where the class name goes");
    }
    // The folder's classes against the labels, before any model runs.
    let folder_classes =
        folder::classes(&args.datapath).with_context(|| format!("--datapath {}", args.datapath.display()))?;
    if folder_classes.len() > classnames.len() {
        bail!(
            "--datapath {} has {} class folders, --label-file {} names {} classes: every folder needs its label \
             (line k of the label file names the k-th folder in sorted order)",
            args.datapath.display(),
            folder_classes.len(),
            args.label_file.display(),
            classnames.len()
        );
    }
    if folder_classes.len() < classnames.len() {
        eprintln!(
            "cnclip zeroshot-evaluation: note: --label-file names {} classes, --datapath has {} class folders: the \
             other classes compete in the classifier but have no image",
            classnames.len(),
            folder_classes.len()
        );
    }
    let hidden = folder::hidden_folders(&args.datapath);
    if !hidden.is_empty() {
        eprintln!("cnclip zeroshot-evaluation: note: hidden folders are not classes, left out: {}", hidden.join(", "));
    }
    // cn_clip's `.pt` records no architecture: the flags (with cn_clip's defaults) name it.
    let named = cnclip_models::ClipConfig::from_name(&format!("{}@{}", args.vision_model, args.text_model));
    let mut named_error = None;
    // Opened once: the encoder nodes and the parameter counts take it as it is (a checkpoint in
    // an object store, from its copy in the spool).
    let local = storage::fetch::local_copy(&args.resume).with_context(|| format!("{}", args.resume.display()))?;
    let checkpoint = Checkpoint::open(&local, |format| match format {
        Format::CnClip => named.map_err(|e| named_error = Some(e)).ok(),
        _ => None,
    });
    if let Some(e) = named_error {
        return Err(e.into());
    }
    let checkpoint = std::sync::Arc::new(checkpoint.with_context(|| format!("{}", args.resume.display()))?);
    let config = checkpoint.config().clone();
    let named = checkpoint.format() == Format::CnClip;
    let (vision, text) = match named {
        true => (Some(args.vision_model.clone()), Some(args.text_model.clone())),
        false => (None, None),
    };
    let encoder = EncoderConfig {
        checkpoint: args.resume.clone(),
        vision_model: vision,
        text_model: text,
        model_config: None,
        precision: args.precision.to_string(),
        batch_size: args.img_batch_size,
        devices: args.devices.to_string(),
        loaded: Some(std::sync::Arc::clone(&checkpoint)),
    };
    let scratch = storage::scratch_dir(None, ".cnclip-zeroshot-").context("a scratch directory")?;
    let settings = |name: &str| JobSettings {
        quarantine: scratch.path().join(format!("{name}-quarantine.jsonl")),
        threads: args.num_workers,
        ..JobSettings::default()
    };

    // The classifier: every template of every class, ensembled per class.
    let prompts: Vec<TextLine> = zeroshot::prompts(&classnames, &templates)
        .into_iter()
        .enumerate()
        .map(|(id, text)| TextLine { text_id: id as i64, text, image_ids: Vec::new() })
        .collect();
    let prompts = BatchesConfig {
        schema: cnclip_schemas::texts(),
        batches: vec![jsonl::texts_batch(&prompts)?],
        origin: "the prompts (every template of every class)".into(),
    };
    let text_defs = vec![
        NodeDef::new("prompts", None, prompts),
        NodeDef::new(
            "tokens",
            Some("prompts"),
            TokenizeConfig { context_length: args.context_length, preprocess: true },
        ),
        NodeDef::new(
            "features",
            Some("tokens"),
            EncodeTextConfig(EncoderConfig { batch_size: templates.len(), ..encoder.clone() }),
        ),
    ];
    let (_, prompt_features) = features(text_defs, settings("prompts"))?;
    let classifier = zeroshot::classifier(&prompt_features, classnames.len(), templates.len());

    // The images, scored.
    let entries = folder::entries(&args.datapath).with_context(|| format!("{}", args.datapath.display()))?;
    let image_defs = vec![
        NodeDef::new("images", None, ImageFolderConfig { path: args.datapath.clone() }),
        NodeDef::new(
            "pixels",
            Some("images"),
            PreprocessConfig {
                resolution: config.vision.image_resolution as usize,
                order: Order::ConvertThenResize,
                max_pixels: cnclip_operators::decoders::image::DEFAULT_MAX_PIXELS,
            },
        ),
        NodeDef::new("features", Some("pixels"), EncodeImageConfig(encoder)),
    ];
    // Images that cannot be read are quarantined beside the results, where the user finds them
    // (not in the scratch directory, which goes when the job ends).
    let save_dir = Path::new(&args.save_dir);
    let quarantine = save_dir.join(format!("{}.quarantine.jsonl", args.dataset));
    if !args.save_dir.is_empty() {
        storage::create_dir_all(save_dir).with_context(|| format!("creating {}", save_dir.display()))?;
    }
    let _ = storage::remove_file(&quarantine);
    let (ids, image_features) =
        features(image_defs, JobSettings { quarantine: quarantine.clone(), ..settings("images") })?;
    // The predictions are one row per image of the folder, in its order (what `--index` and the
    // ELEVATER readers index into): with an image missing, every later row would be another
    // image's. cn_clip stops on an unreadable image; so does this job, naming them.
    if ids.len() < entries.len() {
        bail!(
            "--datapath {}: {} of {} images could not be read (quarantined → {}, with their reasons): the \
             predictions would not line up with the folder's images; fix or remove them and run again",
            args.datapath.display(),
            entries.len() - ids.len(),
            entries.len(),
            quarantine.display()
        );
    }
    let targets: Vec<i64> = ids.iter().map(|&id| entries[id as usize].label as i64).collect();
    let probs = zeroshot::probabilities(&image_features, &classifier);
    let n = ids.len();
    let classes = classnames.len();
    let flat: Vec<f32> = Vec::try_from(probs.flatten(0, -1))?;
    let rows: Vec<&[f32]> = flat.chunks(classes.max(1)).collect();
    let zeroshot::Scores { top1, top5, mean_per_class_recall: mean_per_class, .. } = zeroshot::score(&rows, &targets);

    // cn_clip reorders the saved predictions by --index.
    let order: Vec<usize> = if args.index.is_empty() {
        (0..n).collect()
    } else {
        let text = read_small_text(Path::new(&args.index)).with_context(|| format!("reading {}", args.index))?;
        let index: Vec<usize> =
            serde_json::from_str(&text).with_context(|| format!("{}: a JSON list of row numbers", args.index))?;
        if let Some(bad) = index.iter().find(|&&i| i >= n) {
            bail!("{}: row {bad} of {n}", args.index);
        }
        index
    };
    // A self-describing checkpoint names its own towers (`custom` for sizes of no preset).
    let vision_name = match named {
        true => args.vision_model.clone(),
        false => config.name().split('@').next().unwrap_or("custom").to_string(),
    };
    let (params, visual) = checkpoint.parameter_counts()?;
    let round6 = |x: f32| -> String { python_float(format!("{:.6}", x as f64).parse::<f64>().unwrap_or(f64::NAN)) };
    let predictions: Vec<String> = order
        .iter()
        .map(|&r| format!("[{}]", rows[r].iter().map(|&p| round6(p)).collect::<Vec<_>>().join(", ")))
        .collect();
    let json = format!(
        "{{\"model_name\": \"CN-CLIP-{}\", \"dataset_name\": {}, \"num_trainable_params\": 0, \"num_params\": {params}, \
         \"num_visual_params\": {visual}, \"num_backbone_params\": {params}, \"n_shot\": 0, \"rnd_seeds\": [123], \
         \"predictions\": [[{}]]}}",
        vision_name,
        serde_json::to_string(&args.dataset)?,
        predictions.join(", ")
    );
    let out = save_dir.join(format!("{}.json", args.dataset));
    cnclip_operators::write_atomically(&out, |f| std::io::Write::write_all(f, json.as_bytes()))
        .with_context(|| format!("writing {}", out.display()))?;
    let fraction = |k: usize| python_float(k as f64 / n.max(1) as f64);
    let top1_text = match args.engine {
        cnclip_data_jobs::evaluation_engine::Engine::Direct => fraction(top1),
        cnclip_data_jobs::evaluation_engine::Engine::Sql => python_float(top1_sql(
            &image_features,
            &targets,
            &classifier,
            args.cluster.as_deref().map(|url| (url, out.as_path())),
        )?),
    };
    println!("Result:");
    println!("zeroshot-top1: {top1_text}");
    println!("zeroshot-top5: {}, mean-per-class-recall: {}", fraction(top5), python_float(mean_per_class));
    eprintln!(
        "cnclip zeroshot-evaluation: {n} images, {classes} classes, {} templates → {}",
        templates.len(),
        out.display()
    );
    let share = |k: usize| k as f64 / n.max(1) as f64;
    Ok(Metrics { top1: share(top1), top5: share(top5), mean_per_class_recall: mean_per_class })
}

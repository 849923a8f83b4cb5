//! `cnclip import`: cn_clip's TSV + JSONL splits into Parquet tables that notebooks and
//! `cnclip` SQL can query — `{split}_images.parquet` (the `images` contract: id + decoded image
//! bytes) and `{split}_texts.parquet` (`texts`: id, text, image ids). Bad lines go to
//! `{split}_quarantine.jsonl` (or stop the job with `--on-error fail`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, bail};
use arrow::array::{ArrayBuilder, BinaryBuilder, Int64Builder, ListBuilder, StringBuilder};
use arrow::record_batch::RecordBatch;
use cnclip_operators::decoders::base64;
use cnclip_operators::quarantine::{OnError, Quarantine, Rejected};
use cnclip_operators::sinks::parquet::ParquetSink;
use cnclip_operators::sources::{jsonl, tsv};

const BATCH_ROWS: usize = 4096;

#[derive(clap::Args)]
pub struct Args {
    /// Directory with `{split}_imgs.tsv` and `{split}_texts.jsonl`.
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    splits: String,
    /// Output directory for the Parquet tables.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = OnError::Skip)]
    on_error: OnError,
}

pub fn run(args: Args) -> Result<()> {
    std::fs::create_dir_all(&args.out)?;
    for split in args.splits.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let images_path = args.data_dir.join(format!("{split}_imgs.tsv"));
        let texts_path = args.data_dir.join(format!("{split}_texts.jsonl"));
        for path in [&images_path, &texts_path] {
            if !path.is_file() {
                bail!("split `{split}`: {} does not exist", path.display());
            }
        }
        let mut quarantine = Quarantine::new(args.on_error, args.out.join(format!("{split}_quarantine.jsonl")));

        let schema = cnclip_schemas::images();
        let mut sink = ParquetSink::create(&args.out.join(format!("{split}_images.parquet")), "images", schema.clone())?;
        let (mut ids, mut bytes) = (Int64Builder::new(), BinaryBuilder::new());
        let (mut scratch, mut decoded) = (Vec::new(), Vec::new());
        let flush = |ids: &mut Int64Builder, bytes: &mut BinaryBuilder, sink: &mut ParquetSink| -> cnclip_operators::Result<()> {
            if ids.is_empty() {
                return Ok(());
            }
            let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ids.finish()), Arc::new(bytes.finish())])
                .map_err(|e| cnclip_operators::Error::Record { location: images_path.display().to_string(), reason: e.to_string() })?;
            sink.write(&batch)
        };
        tsv::for_each_line(&images_path, |record| {
            let line = match record {
                Ok(line) => line,
                Err(rejected) => return quarantine.reject(rejected),
            };
            if let Err(reason) = base64::decode_into(line.base64, &mut scratch, &mut decoded) {
                return quarantine.reject(Rejected {
                    source: images_path.display().to_string(),
                    location: format!("image {}", line.id),
                    id: Some(line.id.to_string()),
                    reason,
                });
            }
            ids.append_value(line.image_id);
            bytes.append_value(&decoded);
            if ids.len() >= BATCH_ROWS {
                flush(&mut ids, &mut bytes, &mut sink)?;
            }
            Ok(())
        })?;
        flush(&mut ids, &mut bytes, &mut sink)?;
        let images = sink.finish()?;

        let schema = cnclip_schemas::texts();
        let item = match schema.field(2).data_type() {
            arrow::datatypes::DataType::List(item) => item.clone(),
            other => bail!("texts.image_ids is {other}"),
        };
        let mut sink = ParquetSink::create(&args.out.join(format!("{split}_texts.parquet")), "texts", schema.clone())?;
        let mut text_ids = Int64Builder::new();
        let mut texts = StringBuilder::new();
        let mut image_ids = ListBuilder::new(Int64Builder::new()).with_field(item);
        let mut rows = Vec::new();
        jsonl::for_each_line(&texts_path, |record| {
            match record {
                Ok(text) => rows.push(text),
                Err(rejected) => quarantine.reject(rejected)?,
            }
            Ok(())
        })?;
        for chunk in rows.chunks(BATCH_ROWS) {
            for text in chunk {
                text_ids.append_value(text.text_id);
                texts.append_value(&text.text);
                image_ids.values().append_slice(&text.image_ids);
                image_ids.append(true);
            }
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(text_ids.finish()), Arc::new(texts.finish()), Arc::new(image_ids.finish())],
            )?;
            sink.write(&batch)?;
        }
        let text_rows = sink.finish()?;
        let quarantined = quarantine.count();
        quarantine.finish()?;
        eprintln!("cnclip import: {split}: {images} images, {text_rows} texts, {quarantined} quarantined → {}", args.out.display());
    }
    Ok(())
}

//! `preprocess`: `images` → `pixels` — decode (JPEG, PNG, WebP, GIF, BMP; a decompression-bomb
//! limit checked from the header) and cn_clip's resize, bit-identical to its transform. Images
//! that do not decode are rejected with the decoder's reason; other columns pass through.

use std::collections::HashMap;
use std::sync::Arc;

use crate::decoders::image::{Image, PreprocessError, resize_to_rgb};
use arrow::array::{Array, BinaryArray, FixedSizeBinaryBuilder};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use cnclip_schemas::columns::{IMAGE, PIXELS};
use cnclip_schemas::metadata;
use fast_image_resize::Resizer;

use super::{InputError, Output, Transform, rebuild, reject_image, replace_field, require};
use crate::error::{Error, Result};
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use schemars::JsonSchema;
use serde::Deserialize;

/// In which order the RGB conversion and the resize happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// cn_clip's TSV/LMDB datasets: `Resize` in the image's own mode, then `convert("RGB")`.
    #[default]
    ResizeThenConvert,
    /// torchvision's `ImageFolder` (cn_clip's zero-shot evaluation): `convert("RGB")` on load.
    ConvertThenResize,
}

pub struct Preprocess {
    pub resolution: usize,
    pub max_pixels: u64,
    pub order: Order,
}

impl Preprocess {
    /// One image's `resolution`² RGB bytes.
    ///
    /// # Errors
    /// The decoder's or resizer's reason.
    pub fn image(&self, bytes: &[u8], resizer: &mut Resizer) -> Result<Vec<u8>, PreprocessError> {
        let image = Image::decode(bytes, self.max_pixels)?;
        let image = if self.order == Order::ConvertThenResize { image.into_rgb() } else { image };
        resize_to_rgb(&image, self.resolution, resizer)
    }
}

impl Transform for Preprocess {
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, InputError> {
        let description = format!(
            "cn_clip image_transform: {}, bicubic {r}x{r}, RGB u8 (normalise with OpenAI CLIP mean/std)",
            match self.order {
                Order::ResizeThenConvert => "resize then convert(RGB)",
                Order::ConvertThenResize => "convert(RGB) then resize",
            },
            r = self.resolution
        );
        pixels_schema(input, self.resolution, description)
    }

    fn apply(&self, batch: &RecordBatch, source: &str) -> Result<Output> {
        let schema = self.output_schema(&batch.schema()).map_err(|e| Error::Internal(e.to_string()))?;
        map_images(batch, source, schema, self.resolution, |_, bytes, resizer| self.image(bytes, resizer))
    }
}

/// `input` with its `image` column replaced by `pixels` (`resolution`² RGB bytes), recording
/// the resolution and how the pixels were made (`description`) in the schema's metadata.
/// Shared by the transforms that make pixels (`preprocess`, `random_augment`).
pub(crate) fn pixels_schema(
    input: &SchemaRef,
    resolution: usize,
    description: String,
) -> Result<SchemaRef, InputError> {
    let index = require(input, IMAGE, &DataType::Binary)?;
    let bytes = 3 * resolution * resolution;
    let schema = replace_field(input, index, Field::new(PIXELS, DataType::FixedSizeBinary(bytes as i32), false));
    let mut meta: HashMap<String, String> = schema.metadata().clone();
    meta.insert(metadata::RESOLUTION.into(), resolution.to_string());
    meta.insert(metadata::PREPROCESSING.into(), description);
    Ok(Arc::new(schema.as_ref().clone().with_metadata(meta)))
}

/// Each row's `image` through `pixels(row, bytes, resizer)` into the `pixels` column of
/// `schema` (from [`pixels_schema`]); a row whose image fails is rejected with the reason.
pub(crate) fn map_images<E: std::fmt::Display>(
    batch: &RecordBatch,
    source: &str,
    schema: SchemaRef,
    resolution: usize,
    mut pixels: impl FnMut(usize, &[u8], &mut Resizer) -> Result<Vec<u8>, E>,
) -> Result<Output> {
    let index = batch.schema().index_of(IMAGE).expect("checked by output_schema");
    let images = batch.column(index).as_any().downcast_ref::<BinaryArray>().expect("checked by output_schema");
    let bytes = 3 * resolution * resolution;
    let mut out = FixedSizeBinaryBuilder::with_capacity(images.len(), bytes as i32);
    let mut resizer = Resizer::new();
    let (mut keep, mut rejected) = (Vec::with_capacity(images.len()), Vec::new());
    for row in 0..images.len() {
        match pixels(row, images.value(row), &mut resizer) {
            Ok(rgb) => {
                out.append_value(&rgb)?;
                keep.push(row as u32);
            }
            Err(reason) => rejected.push(reject_image(batch, row, source, reason.to_string())),
        }
    }
    let batch = rebuild(batch, schema, index, &keep, Arc::new(out.finish()))?;
    Ok(Output { batch, rejected })
}

/// image → pixels (`resolution`² RGB bytes): cn_clip's decode and resize; bad images
/// quarantined.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PreprocessConfig {
    /// The output's side in pixels, from 1 to 4096.
    #[serde(default = "default_resolution")]
    pub resolution: usize,
    /// Images with more pixels are quarantined without being decoded.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Whether the RGB conversion comes after the resize, as in cn_clip's datasets, or before,
    /// as in `ImageFolder`.
    #[serde(default)]
    pub order: Order,
}

/// cn_clip's image resolution (ViT-B/16).
pub(crate) fn default_resolution() -> usize {
    224
}

pub(crate) fn default_max_pixels() -> u64 {
    crate::decoders::image::DEFAULT_MAX_PIXELS
}

impl NodeConfig for PreprocessConfig {
    const KIND: &'static str = "preprocess";
    const ROLE: Role = Role::Transform;
    fn build(self, _: &BuildContext) -> Result<Operator, Vec<String>> {
        if !(1..=4096).contains(&self.resolution) {
            return Err(vec![format!("resolution {} is not between 1 and 4096", self.resolution)]);
        }
        let preprocess = Preprocess { resolution: self.resolution, max_pixels: self.max_pixels, order: self.order };
        Ok(Operator::Transform(Arc::new(preprocess)))
    }
}

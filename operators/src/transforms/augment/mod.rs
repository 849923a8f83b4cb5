//! `random_augment`: `image` → `pixels` with cn_clip's training-time augmentation
//! (`--use-augment`), a drop-in for `preprocess` in training pipelines (same input, same
//! `pixels` column, bad images rejected with the same reasons).
//!
//! cn_clip 1.6.0 (`LMDBDataset._build_transform`) builds it with timm 1.0's
//! `create_transform(input_size=r, scale=(0.9, 1.0), is_training=True, color_jitter=None,
//! auto_augment='original', interpolation='bicubic', mean=CLIP mean, …)` and slips
//! `convert("RGB")` in before the last three steps, giving, per image:
//!
//! 1. `RandomResizedCropAndInterpolation`: up to 10 tries of an area fraction in `[0.9, 1]`
//!    and a log-uniform aspect ratio in `[3/4, 4/3]`, else a centred crop; the crop is resized
//!    to `r × r` with Pillow's bicubic *in the image's own mode* (as `preprocess` resizes:
//!    [`resize_to_rgb`] does the resize and the RGB conversion);
//! 2. `RandomHorizontalFlip(0.5)`; 3. `convert("RGB")` (per pixel, so it commutes with the flip);
//! 4. `AutoAugment` with timm's `auto_augment_policy_original` ([`ORIGINAL_POLICY`]): one of 25
//!    sub-policies, each two ops applied with their probability; rotate and shear negate their
//!    magnitude with probability ½. timm's hparams here are `img_mean` = (123, 117, 104) as the
//!    fill colour and `interpolation` = BICUBIC (not random, since it is not `'random'`).
//! 5. `ToTensor` + `Normalize` are left to the model, which normalises uint8 pixels.
//!
//! The 'original' policy uses ten ops (PosterizeOriginal, Rotate, Solarize, AutoContrast,
//! Equalize, Color, Invert, Contrast, Sharpness, ShearX); only those are implemented, in
//! [`ops`], by hand: they must be Pillow's arithmetic to the bit (its f32 blends, fixed-point
//! grey, a = −1 bicubic affine sampler with its odd edge rules), and no maintained crate does
//! that — `image`/`imageproc` warp and enhance with other kernels, rounding and borders, which
//! would show up as systematic differences, not noise. The crop's resize reuses the
//! Pillow-exact resampler `preprocess` uses.
//!
//! Randomness is per row and deterministic: each row's generator is CPython's `random` seeded
//! with `seed << 64 | key` ([`PyRandom`]), `key` being the row's `sample` (Int64, the pairs key
//! of training rows) or, without one, its `image_id`. The draws are made in timm's order (crop,
//! flip, sub-policy, then per op its probability and sign), so a resumed run redraws exactly the
//! same augmentation, and the reference harness can replay a row with Python's own `random`.
//! Two departures from cn_clip, whose draws depend on DataLoader worker seeding and cannot be
//! reproduced anyway: the flip is drawn from the same generator (`random() < 0.5`, where
//! torchvision uses `torch.rand`), and the same `seed` and `sample` give the same augmentation
//! in every epoch — pass a per-epoch seed (e.g. `seed + epoch`) for fresh draws each epoch.

pub mod ops;
pub mod pyrandom;

use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use cnclip_schemas::columns::{IMAGE_ID, SAMPLE};
use fast_image_resize::Resizer;

pub use ops::RgbImage;
pub use pyrandom::PyRandom;

use super::preprocess::{map_images, pixels_schema};
use super::{InputError, Output, Transform, column_list, require};
use crate::decoders::image::{Image, Mode, PreprocessError, resize_to_rgb};
use crate::error::{Error, Result};
use crate::spec::{BuildContext, NodeConfig, Operator, Role};
use schemars::JsonSchema;
use serde::Deserialize;

/// OpenAI CLIP's mean, which cn_clip passes to `create_transform`.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// timm's `img_mean` hparam, the fill of rotate and shear: `min(255, round(255 · mean))`.
pub const FILL: [u8; 3] = [123, 117, 104];
/// `RandomResizedCropAndInterpolation`'s area fraction (cn_clip's `scale=(0.9, 1.0)`).
pub const SCALE: (f64, f64) = (0.9, 1.0);
/// Its aspect-ratio range (timm's default `(3/4, 4/3)`).
pub const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// timm's `_LEVEL_DENOM`: magnitudes are tenths of an op's range.
const LEVEL_DENOM: f64 = 10.0;

#[derive(Debug, thiserror::Error)]
pub enum AugmentError {
    /// The image does not decode, is too large, or the resizer failed: `preprocess`'s reasons.
    #[error(transparent)]
    Image(#[from] PreprocessError),
    #[error("crop {crop:?} does not lie within the {width}×{height} image")]
    CropOutside { crop: CropBox, width: usize, height: usize },
    /// A row whose key column is null: nothing seeds its generator.
    #[error("no sample or image id to seed its augmentation")]
    NoKey,
}

/// The ops of the 'original' policy, by timm's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    PosterizeOriginal,
    Rotate,
    Solarize,
    AutoContrast,
    Equalize,
    Color,
    Invert,
    Contrast,
    Sharpness,
    ShearX,
}

impl OpKind {
    pub const ALL: [OpKind; 10] = [
        OpKind::PosterizeOriginal,
        OpKind::Rotate,
        OpKind::Solarize,
        OpKind::AutoContrast,
        OpKind::Equalize,
        OpKind::Color,
        OpKind::Invert,
        OpKind::Contrast,
        OpKind::Sharpness,
        OpKind::ShearX,
    ];

    /// The name in timm's `NAME_TO_OP`.
    pub fn timm_name(self) -> &'static str {
        match self {
            OpKind::PosterizeOriginal => "PosterizeOriginal",
            OpKind::Rotate => "Rotate",
            OpKind::Solarize => "Solarize",
            OpKind::AutoContrast => "AutoContrast",
            OpKind::Equalize => "Equalize",
            OpKind::Color => "Color",
            OpKind::Invert => "Invert",
            OpKind::Contrast => "Contrast",
            OpKind::Sharpness => "Sharpness",
            OpKind::ShearX => "ShearX",
        }
    }

    pub fn from_timm_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|k| k.timm_name() == name)
    }

    /// Whether timm's level function negates the magnitude at random (`_randomly_negate`).
    pub fn signed(self) -> bool {
        matches!(self, OpKind::Rotate | OpKind::ShearX)
    }
}

/// One `AugmentOp(name, prob, magnitude)` of a policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyOp {
    pub kind: OpKind,
    pub prob: f64,
    pub magnitude: u32,
}

const fn op(kind: OpKind, prob: f64, magnitude: u32) -> PolicyOp {
    PolicyOp { kind, prob, magnitude }
}

/// timm's `auto_augment_policy_original` (the ImageNet policy of arXiv:1805.09501), in order.
pub const ORIGINAL_POLICY: [[PolicyOp; 2]; 25] = {
    use OpKind::*;
    [
        [op(PosterizeOriginal, 0.4, 8), op(Rotate, 0.6, 9)],
        [op(Solarize, 0.6, 5), op(AutoContrast, 0.6, 5)],
        [op(Equalize, 0.8, 8), op(Equalize, 0.6, 3)],
        [op(PosterizeOriginal, 0.6, 7), op(PosterizeOriginal, 0.6, 6)],
        [op(Equalize, 0.4, 7), op(Solarize, 0.2, 4)],
        [op(Equalize, 0.4, 4), op(Rotate, 0.8, 8)],
        [op(Solarize, 0.6, 3), op(Equalize, 0.6, 7)],
        [op(PosterizeOriginal, 0.8, 5), op(Equalize, 1.0, 2)],
        [op(Rotate, 0.2, 3), op(Solarize, 0.6, 8)],
        [op(Equalize, 0.6, 8), op(PosterizeOriginal, 0.4, 6)],
        [op(Rotate, 0.8, 8), op(Color, 0.4, 0)],
        [op(Rotate, 0.4, 9), op(Equalize, 0.6, 2)],
        [op(Equalize, 0.0, 7), op(Equalize, 0.8, 8)],
        [op(Invert, 0.6, 4), op(Equalize, 1.0, 8)],
        [op(Color, 0.6, 4), op(Contrast, 1.0, 8)],
        [op(Rotate, 0.8, 8), op(Color, 1.0, 2)],
        [op(Color, 0.8, 8), op(Solarize, 0.8, 7)],
        [op(Sharpness, 0.4, 7), op(Invert, 0.6, 8)],
        [op(ShearX, 0.6, 5), op(Equalize, 1.0, 9)],
        [op(Color, 0.4, 0), op(Equalize, 0.6, 3)],
        [op(Equalize, 0.4, 7), op(Solarize, 0.2, 4)],
        [op(Solarize, 0.6, 5), op(AutoContrast, 0.6, 5)],
        [op(Invert, 0.6, 4), op(Equalize, 1.0, 8)],
        [op(Color, 0.6, 4), op(Contrast, 1.0, 8)],
        [op(Equalize, 0.8, 8), op(Equalize, 0.6, 3)],
    ]
};

/// What timm's level function makes of a magnitude: the op's argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OpArg {
    None,
    /// Posterize: bits to keep.
    Bits(u32),
    /// Solarize: the threshold (256 leaves the image alone).
    Threshold(u32),
    /// Color, contrast, sharpness: the blend factor; shear: the shear factor.
    Factor(f64),
    Degrees(f64),
}

/// timm's `LEVEL_TO_ARG[kind](magnitude)` after `AugmentOp` clamps the magnitude to `[0, 10]`,
/// with `negate` standing for `_randomly_negate`'s draw (ignored for unsigned ops).
pub fn level_arg(kind: OpKind, magnitude: f64, negate: bool) -> OpArg {
    let level = magnitude.clamp(0.0, LEVEL_DENOM) / LEVEL_DENOM;
    let sign = |v: f64| if negate { -v } else { v };
    match kind {
        OpKind::AutoContrast | OpKind::Equalize | OpKind::Invert => OpArg::None,
        OpKind::Rotate => OpArg::Degrees(sign(level * 30.0)),
        OpKind::PosterizeOriginal => OpArg::Bits((level * 4.0) as u32 + 4),
        OpKind::Solarize => OpArg::Threshold(((level * 256.0) as u32).min(256)),
        OpKind::Color | OpKind::Contrast | OpKind::Sharpness => OpArg::Factor(level * 1.8 + 0.1),
        OpKind::ShearX => OpArg::Factor(sign(level * 0.3)),
    }
}

/// One op at `magnitude` (and sign), as timm's `AugmentOp` applies it once chosen.
pub fn apply_op(image: &RgbImage, kind: OpKind, magnitude: f64, negate: bool) -> RgbImage {
    let arg = level_arg(kind, magnitude, negate);
    let mut out;
    match (kind, arg) {
        (OpKind::PosterizeOriginal, OpArg::Bits(bits)) => {
            out = image.clone();
            ops::posterize(&mut out, bits);
        }
        (OpKind::Solarize, OpArg::Threshold(threshold)) => {
            out = image.clone();
            ops::solarize(&mut out, threshold);
        }
        (OpKind::AutoContrast, _) => {
            out = image.clone();
            ops::auto_contrast(&mut out);
        }
        (OpKind::Equalize, _) => {
            out = image.clone();
            ops::equalize(&mut out);
        }
        (OpKind::Invert, _) => {
            out = image.clone();
            ops::invert(&mut out);
        }
        (OpKind::Rotate, OpArg::Degrees(degrees)) => out = ops::rotate(image, degrees, FILL),
        (OpKind::ShearX, OpArg::Factor(factor)) => out = ops::shear_x(image, factor, FILL),
        (OpKind::Color, OpArg::Factor(factor)) => out = ops::color(image, factor),
        (OpKind::Contrast, OpArg::Factor(factor)) => out = ops::contrast(image, factor),
        (OpKind::Sharpness, OpArg::Factor(factor)) => out = ops::sharpness(image, factor),
        (kind, arg) => unreachable!("level_arg gives {kind:?} no {arg:?}"),
    }
    out
}

/// A crop `(i, j, h, w)` as torchvision's `resized_crop` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// timm's `RandomResizedCropAndInterpolation.get_params` for a `width × height` image.
pub fn random_resized_crop_params(rng: &mut PyRandom, width: usize, height: usize) -> CropBox {
    let (img_w, img_h) = (width as i64, height as i64);
    let area = (img_w * img_h) as f64;
    let log_ratio = (RATIO.0.ln(), RATIO.1.ln());
    let crop = |i: i64, j: i64, h: i64, w: i64| CropBox {
        top: i as usize,
        left: j as usize,
        height: h as usize,
        width: w as usize,
    };
    for _ in 0..10 {
        let target_area = rng.uniform(SCALE.0, SCALE.1) * area;
        let aspect_ratio = rng.uniform(log_ratio.0, log_ratio.1).exp();
        // Python's round(): ties to even.
        let target_w = (target_area * aspect_ratio).sqrt().round_ties_even() as i64;
        let target_h = (target_area / aspect_ratio).sqrt().round_ties_even() as i64;
        if target_w <= img_w && target_h <= img_h {
            let i = rng.randint(0, img_h - target_h);
            let j = rng.randint(0, img_w - target_w);
            return crop(i, j, target_h, target_w);
        }
    }
    let in_ratio = img_w as f64 / img_h as f64;
    let (target_w, target_h) = if in_ratio < RATIO.0 {
        (img_w, (img_w as f64 / RATIO.0).round_ties_even() as i64)
    } else if in_ratio > RATIO.1 {
        ((img_h as f64 * RATIO.1).round_ties_even() as i64, img_h)
    } else {
        (img_w, img_h)
    };
    crop((img_h - target_h).div_euclid(2), (img_w - target_w).div_euclid(2), target_h, target_w)
}

/// torchvision's `resized_crop(img, i, j, h, w, (r, r), BICUBIC)` (Pillow's `crop`, then
/// `resize` in the image's mode), optionally `hflip`, then `convert("RGB")`.
///
/// # Errors
/// [`AugmentError::CropOutside`], or the resizer's error.
pub fn resized_crop(
    image: &Image,
    crop: CropBox,
    flip: bool,
    resolution: usize,
    resizer: &mut Resizer,
) -> Result<RgbImage, AugmentError> {
    let outside = crop.width == 0
        || crop.height == 0
        || crop.left + crop.width > image.width
        || crop.top + crop.height > image.height;
    if outside {
        return Err(AugmentError::CropOutside { crop, width: image.width, height: image.height });
    }
    let cut = |data: &[u8], channels: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(crop.width * crop.height * channels);
        for y in crop.top..crop.top + crop.height {
            let start = (y * image.width + crop.left) * channels;
            out.extend_from_slice(&data[start..start + crop.width * channels]);
        }
        out
    };
    let cropped = Image {
        mode: image.mode,
        width: crop.width,
        height: crop.height,
        data: if image.mode == Mode::I16 { Vec::new() } else { cut(&image.data, image.mode.channels()) },
        data16: if image.mode == Mode::I16 {
            let mut out = Vec::with_capacity(crop.width * crop.height);
            for y in crop.top..crop.top + crop.height {
                let start = y * image.width + crop.left;
                out.extend_from_slice(&image.data16[start..start + crop.width]);
            }
            out
        } else {
            Vec::new()
        },
    };
    let mut rgb = RgbImage::new(resolution, resolution, resize_to_rgb(&cropped, resolution, resizer)?);
    if flip {
        rgb.flip_left_right();
    }
    Ok(rgb)
}

/// The draws that made one row's augmentation (for tests and debugging).
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub crop: CropBox,
    pub flip: bool,
    /// The index into [`ORIGINAL_POLICY`].
    pub sub_policy: usize,
    /// The ops that ran, with whether their magnitude was negated.
    pub applied: Vec<(OpKind, bool)>,
}

/// The `random_augment` transform.
pub struct RandomAugment {
    pub resolution: usize,
    pub seed: u64,
    pub max_pixels: u64,
}

impl RandomAugment {
    /// One encoded image's augmented `resolution`² RGB pixels, for the row keyed `key`.
    ///
    /// # Errors
    /// The decoder's or resizer's reason.
    pub fn augment(&self, bytes: &[u8], key: i64, resizer: &mut Resizer) -> Result<(RgbImage, Trace), AugmentError> {
        let image = Image::decode(bytes, self.max_pixels)?;
        self.augment_image(&image, key, resizer)
    }

    /// As [`RandomAugment::augment`], from a decoded image.
    ///
    /// # Errors
    /// The resizer's reason.
    pub fn augment_image(
        &self,
        image: &Image,
        key: i64,
        resizer: &mut Resizer,
    ) -> Result<(RgbImage, Trace), AugmentError> {
        let mut rng = PyRandom::for_row(self.seed, key);
        let crop = random_resized_crop_params(&mut rng, image.width, image.height);
        let flip = rng.random() < 0.5;
        let mut rgb = resized_crop(image, crop, flip, self.resolution, resizer)?;
        let sub_policy = rng.choice_index(ORIGINAL_POLICY.len());
        let mut applied = Vec::new();
        for op in &ORIGINAL_POLICY[sub_policy] {
            if op.prob < 1.0 && rng.random() > op.prob {
                continue;
            }
            let negate = op.kind.signed() && rng.random() > 0.5;
            rgb = apply_op(&rgb, op.kind, op.magnitude as f64, negate);
            applied.push((op.kind, negate));
        }
        Ok((rgb, Trace { crop, flip, sub_policy, applied }))
    }
}

/// The column that keys each row's generator: `sample`, else `image_id` (both Int64).
fn key_column(schema: &Schema) -> Result<usize, InputError> {
    if schema.index_of(SAMPLE).is_ok() {
        require(schema, SAMPLE, &DataType::Int64)
    } else if schema.index_of(IMAGE_ID).is_ok() {
        require(schema, IMAGE_ID, &DataType::Int64)
    } else {
        Err(InputError::Mismatch(format!(
            "needs a `{SAMPLE}` or `{IMAGE_ID}` column (Int64) to seed each row's augmentation; the input has {}",
            column_list(schema)
        )))
    }
}

impl Transform for RandomAugment {
    fn output_schema(&self, input: &SchemaRef) -> Result<SchemaRef, InputError> {
        key_column(input)?;
        let description = format!(
            "cn_clip --use-augment train transform: RandomResizedCrop(scale 0.9-1, ratio 3/4-4/3, bicubic) \
             {r}x{r}, hflip 0.5, convert(RGB), timm AutoAugment 'original' (fill {FILL:?}, bicubic), \
             seed {seed} per sample; RGB u8 (normalise with OpenAI CLIP mean/std)",
            r = self.resolution,
            seed = self.seed
        );
        pixels_schema(input, self.resolution, description)
    }

    fn apply(&self, batch: &RecordBatch, source: &str) -> Result<Output> {
        let internal = |e: InputError| Error::Internal(e.to_string());
        let schema = self.output_schema(&batch.schema()).map_err(internal)?;
        let keys = batch.column(key_column(&batch.schema()).map_err(internal)?).as_primitive::<Int64Type>();
        map_images(batch, source, schema, self.resolution, |row, bytes, resizer| {
            if keys.is_null(row) {
                return Err(AugmentError::NoKey);
            }
            self.augment(bytes, keys.value(row), resizer).map(|(rgb, _)| rgb.data)
        })
    }
}

/// image → pixels with cn_clip's `--use-augment` training transform, drawn per row from `seed`
/// and the row's `sample` (else `image_id`).
///
/// The same `pixels` as `preprocess`: random resized crop, flip and timm's 'original'
/// AutoAugment, as this module's header describes.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RandomAugmentConfig {
    /// The output's side in pixels, from 1 to 4096.
    #[serde(default = "super::preprocess::default_resolution")]
    pub resolution: usize,
    /// The training run's seed (`--seed`).
    pub seed: u64,
    /// Images with more pixels are quarantined without being decoded.
    #[serde(default = "super::preprocess::default_max_pixels")]
    pub max_pixels: u64,
}

impl NodeConfig for RandomAugmentConfig {
    const KIND: &'static str = "random_augment";
    const ROLE: Role = Role::Transform;
    fn build(self, _: &BuildContext) -> Result<Operator, Vec<String>> {
        if !(1..=4096).contains(&self.resolution) {
            return Err(vec![format!("resolution {} is not between 1 and 4096", self.resolution)]);
        }
        let augment = RandomAugment { resolution: self.resolution, seed: self.seed, max_pixels: self.max_pixels };
        Ok(Operator::Transform(Arc::new(augment)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{BinaryArray, FixedSizeBinaryArray, Int64Array};
    use arrow::datatypes::Field;
    use cnclip_schemas::columns::{IMAGE, PIXELS};
    use cnclip_schemas::metadata;

    use super::*;

    /// A PNG of `w × h` RGB pixels with some structure (gradients and a block).
    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut pixels = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let block = if (w / 4..w / 2).contains(&x) && (h / 3..h / 2).contains(&y) { 90 } else { 0 };
                pixels.extend([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x * y) % 160) as u8 + block]);
            }
        }
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header().unwrap().write_image_data(&pixels).unwrap();
        out
    }

    fn batch(keys: (&str, Vec<i64>), images: Vec<Vec<u8>>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(keys.0, DataType::Int64, false),
            Field::new(IMAGE, DataType::Binary, false),
        ]));
        let images = BinaryArray::from_iter_values(images.iter());
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(keys.1)), Arc::new(images)]).unwrap()
    }

    fn pixels(batch: &RecordBatch) -> Vec<Vec<u8>> {
        let column = batch.column_by_name(PIXELS).unwrap().as_any().downcast_ref::<FixedSizeBinaryArray>().unwrap();
        (0..column.len()).map(|i| column.value(i).to_vec()).collect()
    }

    #[test]
    fn policy_is_timms_original() {
        assert_eq!(ORIGINAL_POLICY.len(), 25);
        let used: std::collections::HashSet<OpKind> = ORIGINAL_POLICY.iter().flatten().map(|op| op.kind).collect();
        assert_eq!(used.len(), OpKind::ALL.len(), "every implemented op is used, and only those");
        assert_eq!(ORIGINAL_POLICY[0], [op(OpKind::PosterizeOriginal, 0.4, 8), op(OpKind::Rotate, 0.6, 9)]);
        assert_eq!(ORIGINAL_POLICY[24], [op(OpKind::Equalize, 0.8, 8), op(OpKind::Equalize, 0.6, 3)]);
        for kind in OpKind::ALL {
            assert_eq!(OpKind::from_timm_name(kind.timm_name()), Some(kind));
        }
    }

    #[test]
    fn fill_is_timms_img_mean() {
        let fill = CLIP_MEAN.map(|m| (255.0 * m).round_ties_even().min(255.0) as u8);
        assert_eq!(fill, FILL);
    }

    #[test]
    fn level_args_are_timms() {
        assert_eq!(level_arg(OpKind::PosterizeOriginal, 8.0, false), OpArg::Bits(7));
        assert_eq!(level_arg(OpKind::PosterizeOriginal, 6.0, false), OpArg::Bits(6));
        assert_eq!(level_arg(OpKind::PosterizeOriginal, 5.0, false), OpArg::Bits(6));
        assert_eq!(level_arg(OpKind::Solarize, 5.0, false), OpArg::Threshold(128));
        assert_eq!(level_arg(OpKind::Solarize, 3.0, false), OpArg::Threshold(76));
        assert_eq!(level_arg(OpKind::Solarize, 10.0, false), OpArg::Threshold(256));
        assert_eq!(level_arg(OpKind::Rotate, 9.0, true), OpArg::Degrees(-27.0));
        assert_eq!(level_arg(OpKind::Color, 0.0, false), OpArg::Factor(0.1));
        assert_eq!(level_arg(OpKind::ShearX, 5.0, true), OpArg::Factor(-0.15));
        assert_eq!(level_arg(OpKind::Invert, 4.0, true), OpArg::None);
    }

    #[test]
    fn crops_lie_within_the_image_and_cover_at_least_nine_tenths() {
        for (w, h) in [(320, 240), (1, 1), (7, 5), (3000, 20), (20, 3000), (224, 224)] {
            for key in 0..40 {
                let crop = random_resized_crop_params(&mut PyRandom::for_row(3, key), w, h);
                assert!(crop.left + crop.width <= w && crop.top + crop.height <= h, "{w}×{h}: {crop:?}");
                assert!(crop.width >= 1 && crop.height >= 1);
                let fallback = (w as f64 / h as f64) < RATIO.0 || (w as f64 / h as f64) > RATIO.1;
                if !fallback && w * h > 100 {
                    let area = (crop.width * crop.height) as f64 / (w * h) as f64;
                    assert!(area > 0.88, "{w}×{h}: {crop:?} covers {area}");
                }
            }
        }
    }

    #[test]
    fn output_has_preprocess_shape_and_schema() {
        let augment = RandomAugment { resolution: 32, seed: 1, max_pixels: 1 << 30 };
        let input = batch((SAMPLE, vec![5, 6, 7]), vec![png(64, 48), b"not an image".to_vec(), png(17, 29)]);
        let output = augment.apply(&input, "test").unwrap();
        assert_eq!(output.batch.num_rows(), 2);
        assert_eq!(output.rejected.len(), 1);
        assert!(output.rejected[0].reason.starts_with("cannot decode image"), "{}", output.rejected[0].reason);
        let field = output.batch.schema().field_with_name(PIXELS).unwrap().clone();
        assert_eq!(field.data_type(), &DataType::FixedSizeBinary(32 * 32 * 3));
        assert_eq!(output.batch.schema().metadata()[metadata::RESOLUTION], "32");
        assert_eq!(output.batch.column(0).as_primitive::<Int64Type>().values().to_vec(), [5, 7]);
        // The same input schema through `preprocess` gives the same columns and types.
        let preprocess = super::super::preprocess::Preprocess {
            resolution: 32,
            max_pixels: 1 << 30,
            order: super::super::preprocess::Order::ResizeThenConvert,
        };
        let theirs = preprocess.output_schema(&input.schema()).unwrap();
        assert_eq!(theirs.fields(), output.batch.schema().fields());
    }

    #[test]
    fn same_seed_and_sample_redraw_the_same_pixels() {
        let augment = RandomAugment { resolution: 24, seed: 9, max_pixels: 1 << 30 };
        let images = vec![png(40, 30); 12];
        let keys: Vec<i64> = (100..112).collect();
        let first = pixels(&augment.apply(&batch((SAMPLE, keys.clone()), images.clone()), "a").unwrap().batch);
        let again = pixels(&augment.apply(&batch((SAMPLE, keys.clone()), images.clone()), "b").unwrap().batch);
        assert_eq!(first, again);
        // Rows are independent of their batch: one row alone gives the same pixels.
        let alone = pixels(&augment.apply(&batch((SAMPLE, vec![105]), vec![png(40, 30)]), "c").unwrap().batch);
        assert_eq!(alone[0], first[5]);
        // Different samples of the same image come out differently...
        let distinct: std::collections::HashSet<&Vec<u8>> = first.iter().collect();
        assert!(distinct.len() >= 11, "only {} distinct augmentations of 12", distinct.len());
        // ...and so does another seed.
        let reseeded = RandomAugment { seed: 10, ..augment };
        let other = pixels(&reseeded.apply(&batch((SAMPLE, keys), images), "d").unwrap().batch);
        assert!(first.iter().zip(&other).filter(|(a, b)| a != b).count() >= 11);
    }

    #[test]
    fn image_id_keys_rows_without_a_sample_and_the_key_is_required() {
        let augment = RandomAugment { resolution: 16, seed: 2, max_pixels: 1 << 30 };
        let by_id = pixels(&augment.apply(&batch((IMAGE_ID, vec![41]), vec![png(20, 20)]), "x").unwrap().batch);
        let by_sample = pixels(&augment.apply(&batch((SAMPLE, vec![41]), vec![png(20, 20)]), "x").unwrap().batch);
        assert_eq!(by_id, by_sample);
        let keyless = batch(("text_id", vec![41]), vec![png(20, 20)]);
        let problem = augment.output_schema(&keyless.schema()).unwrap_err().to_string();
        assert!(problem.contains("`sample` or `image_id`"), "{problem}");
    }

    #[test]
    fn registered_as_random_augment() {
        use crate::spec::registry::{BuildContext, Operator, Registry};
        let registry = Registry::builtin();
        let cx = BuildContext::new(std::path::Path::new("."));
        let build = |toml: &str| registry.build("random_augment", &toml.parse::<toml::Table>().unwrap(), &cx);
        let Ok(Operator::Transform(transform)) = build("seed = 5\nresolution = 32") else { panic!("not a transform") };
        let input = batch((SAMPLE, vec![1]), vec![png(10, 10)]);
        assert_eq!(transform.apply(&input, "t").unwrap().batch.num_rows(), 1);
        let problems = |toml: &str| build(toml).err().unwrap_or_else(|| panic!("{toml} builds")).join("; ");
        assert!(problems("resolution = 32").contains("seed"));
        assert!(problems("seed = 1\nresolution = 0").contains("resolution 0"));
        assert!(problems("seed = 1\nscale = 0.5").contains("scale"));
    }

    #[test]
    fn every_sub_policy_and_both_signs_get_drawn() {
        let augment = RandomAugment { resolution: 16, seed: 0, max_pixels: 1 << 30 };
        let image = Image::decode(&png(20, 16), 1 << 30).unwrap();
        let mut resizer = Resizer::new();
        let (mut policies, mut signs) = (std::collections::HashSet::new(), std::collections::HashSet::new());
        for key in 0..2000 {
            let (rgb, trace) = augment.augment_image(&image, key, &mut resizer).unwrap();
            assert_eq!(rgb.data.len(), 16 * 16 * 3);
            policies.insert(trace.sub_policy);
            signs.extend(trace.applied.iter().filter(|(k, _)| k.signed()).map(|&(_, negated)| negated));
        }
        assert_eq!(policies.len(), 25);
        assert_eq!(signs.len(), 2);
    }
}

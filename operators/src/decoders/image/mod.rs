//! Image decoding and the first two steps of cn_clip's image transform
//! (`cn_clip/clip/utils.py::image_transform`), in its order: `Resize((r, r), BICUBIC)` — a
//! squash, no crop, with Pillow's antialiasing — applied in the image's own Pillow mode, *then*
//! `convert("RGB")`. (`ToTensor` and the mean/std live with the models, in
//! `cnclip_models::preprocess`.)
//!
//! Mode rules follow Pillow 13's `Image.resize` and `Image.convert`:
//! - palette (`P`) and 1-bit (`1`) images are resized with nearest neighbour;
//! - `RGBA`/`LA` are resized premultiplied by alpha, and alpha is then dropped (not composited);
//! - `CMYK` is resized in CMYK and converted with Pillow's `cmyk2rgb`;
//! - 16-bit grayscale (`I;16`) is resized in 16 bits and then *clipped* to 255 by Pillow's
//!   `I → RGB` conversion (so most such images come out near white — as in cn_clip).
//!
//! The bicubic convolution is Pillow's own fixed-point algorithm (`resample.rs` says why it is
//! not fast_image_resize's); fast_image_resize serves the 16-bit grayscale case, where it agrees.

mod decode;
mod resample;

use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image as FirImage};

pub use decode::DEFAULT_MAX_PIXELS;

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("image of {width}×{height} pixels exceeds the limit of {max_pixels} (decompression bomb?)")]
    TooLarge { width: u64, height: u64, max_pixels: u64 },
    #[error("cannot resize image: {0}")]
    Resize(String),
}

/// Pillow's image modes, as far as they change preprocessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 1-bit; stored as 0/255.
    One,
    L,
    La,
    /// Palette image, stored expanded to RGB (nearest-neighbour resizing makes that equivalent).
    Palette,
    Rgb,
    Rgba,
    Cmyk,
    /// 16-bit grayscale (`I;16`), stored in `data16`.
    I16,
}

impl Mode {
    pub fn channels(self) -> usize {
        match self {
            Mode::One | Mode::L | Mode::I16 => 1,
            Mode::La => 2,
            Mode::Palette | Mode::Rgb => 3,
            Mode::Rgba | Mode::Cmyk => 4,
        }
    }
}

/// A decoded image in its Pillow mode, interleaved row-major.
#[derive(Debug, Clone)]
pub struct Image {
    pub mode: Mode,
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
    pub data16: Vec<u16>,
}

impl Image {
    /// Decodes JPEG, PNG, GIF (first frame), WebP or BMP bytes, refusing more than
    /// `max_pixels` pixels before allocating them.
    ///
    /// # Errors
    /// [`PreprocessError::Decode`] for corrupt or truncated data, [`PreprocessError::TooLarge`].
    pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Self, PreprocessError> {
        decode::decode(bytes, max_pixels)
    }
}

impl Image {
    /// Pillow's `convert("RGB")` without resizing — what torchvision's `ImageFolder` loader does
    /// before any transform (cn_clip's zero-shot evaluation), the opposite order of the
    /// TSV/LMDB datasets'.
    pub fn into_rgb(self) -> Image {
        let data = match self.mode {
            Mode::Rgb | Mode::Palette => self.data,
            Mode::One | Mode::L => self.data.iter().flat_map(|&v| [v, v, v]).collect(),
            Mode::La => self.data.chunks(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
            Mode::Rgba => self.data.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
            Mode::Cmyk => self.data.chunks(4).flat_map(cmyk_to_rgb).collect(),
            Mode::I16 => self.data16.iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        };
        Image { mode: Mode::Rgb, width: self.width, height: self.height, data, data16: Vec::new() }
    }
}

/// cn_clip's `Resize((r, r), BICUBIC)` then `convert("RGB")`: `r × r × 3` bytes, row-major.
///
/// # Errors
/// [`PreprocessError::Resize`] if the resizer rejects the buffers (it should not).
pub fn resize_to_rgb(image: &Image, resolution: usize, resizer: &mut Resizer) -> Result<Vec<u8>, PreprocessError> {
    let r = resolution;
    let resize_err = |e: &dyn std::fmt::Display| PreprocessError::Resize(e.to_string());
    let (w, h) = (image.width, image.height);
    let resize = |data: &[u8], channels| resample::resize_u8(data, w, h, channels, r, r);
    // Pillow resizes RGBA/LA as RGBa/La: premultiplied by alpha, then divided back.
    let premultiplied = |channels: usize| -> Vec<u8> {
        let mut data = image.data.clone();
        for p in data.chunks_mut(channels) {
            let alpha = p[channels - 1] as u32;
            for v in &mut p[..channels - 1] {
                *v = resample::muldiv255(*v as u32, alpha) as u8;
            }
        }
        let mut out = resize(&data, channels);
        for p in out.chunks_mut(channels) {
            let alpha = p[channels - 1] as u32;
            if alpha != 0 && alpha != 255 {
                for v in &mut p[..channels - 1] {
                    *v = (255 * *v as u32 / alpha).min(255) as u8;
                }
            }
        }
        out
    };
    let rgb = match image.mode {
        Mode::One | Mode::Palette => {
            let nearest = nearest(image, r);
            if image.mode == Mode::One { nearest.iter().flat_map(|&v| [v, v, v]).collect() } else { nearest }
        }
        Mode::L => resize(&image.data, 1).iter().flat_map(|&v| [v, v, v]).collect(),
        Mode::La => premultiplied(2).chunks(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
        Mode::Rgb => resize(&image.data, 3),
        Mode::Rgba => premultiplied(4).chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        Mode::Cmyk => resize(&image.data, 4).chunks(4).flat_map(cmyk_to_rgb).collect(),
        Mode::I16 => {
            let bytes: Vec<u8> = image.data16.iter().flat_map(|v| v.to_ne_bytes()).collect();
            let src = FirImage::from_vec_u8(image.width as u32, image.height as u32, bytes, PixelType::U16)
                .map_err(|e| resize_err(&e))?;
            let mut dst = FirImage::new(r as u32, r as u32, PixelType::U16);
            let bicubic = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
            resizer.resize(&src, &mut dst, &bicubic).map_err(|e| resize_err(&e))?;
            dst.buffer()
                .chunks(2)
                .flat_map(|b| {
                    let v = u16::from_ne_bytes([b[0], b[1]]).min(255) as u8; // Pillow's I → RGB clips
                    [v, v, v]
                })
                .collect()
        }
    };
    Ok(rgb)
}

/// Pillow's NEAREST resize (`ImagingScaleAffine`): the source coordinate starts at half a
/// step and is *accumulated* step by step in f64, then truncated — accumulated, not multiplied,
/// because the rounding of the sum decides which pixel is taken at exact boundaries.
fn nearest(image: &Image, r: usize) -> Vec<u8> {
    let c = image.mode.channels();
    let table = |n: usize| -> Vec<usize> {
        let step = n as f64 / r as f64;
        let mut at = step * 0.5;
        (0..r)
            .map(|_| {
                let i = (at as usize).min(n - 1);
                at += step;
                i
            })
            .collect()
    };
    let (xs, ys) = (table(image.width), table(image.height));
    let mut out = Vec::with_capacity(r * r * c);
    for &sy in &ys {
        for &sx in &xs {
            let at = (sy * image.width + sx) * c;
            out.extend_from_slice(&image.data[at..at + c]);
        }
    }
    out
}

/// Pillow's `cmyk2rgb` (Convert.c): `nk - round(c · nk / 255)` with `nk = 255 - k`.
fn cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    let nk = 255 - p[3] as u32;
    let channel = |c: u8| (nk - resample::muldiv255(c as u32, nk)) as u8;
    [channel(p[0]), channel(p[1]), channel(p[2])]
}

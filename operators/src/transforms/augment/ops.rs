//! The ten image operations of timm's `original` AutoAugment policy, on 8-bit RGB images, each
//! with Pillow 13's own arithmetic (the functions timm calls are named on each one):
//!
//! - look-up tables (`Image.point`): posterize, solarize, invert, and the per-channel tables
//!   autocontrast and equalize build from the histogram, in Python's integer and float steps;
//! - `ImageEnhance` (color, contrast, sharpness): a degenerate image blended with the original by
//!   `ImagingBlend`, which computes in C `float` (f32) and truncates (clipping when extrapolating);
//!   the degenerates are `convert("L")` (ITU-R 601 in 16-bit fixed point), the grey of
//!   `ImageStat`'s mean, and the 3×3 `SMOOTH` kernel in f32 (borders copied);
//! - geometry (rotate, shear_x): `Image.transform(AFFINE, resample=BICUBIC, fillcolor=…)`, i.e.
//!   `ImagingGenericTransform` sampling each output pixel centre through the inverse matrix with
//!   Pillow's bicubic (a = −1 convolution in f64, edge rows and columns repeated), and
//!   `Image.rotate`'s matrix (`round(cos, 15)`, Python's float modulo and `math.radians`).
//!
//! Every step uses the same IEEE operations in the same order as the C or Python it mirrors (no
//! fused multiply-add, which x86-64 Pillow wheels do not use either), so results are exact.

use std::f64::consts::PI;

/// An 8-bit RGB image, row-major, 3 bytes per pixel (Pillow's `RGB`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps `data` (`width × height × 3` bytes).
    ///
    /// # Panics
    /// When `data` has another length.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width * height * 3, "{width}×{height} RGB needs {} bytes", width * height * 3);
        RgbImage { width, height, data }
    }

    /// Mirrors left and right (`Image.transpose(FLIP_LEFT_RIGHT)`).
    pub fn flip_left_right(&mut self) {
        for row in self.data.chunks_exact_mut(self.width * 3) {
            let w = row.len() / 3;
            for x in 0..w / 2 {
                for c in 0..3 {
                    row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
                }
            }
        }
    }

    /// The per-channel histograms (`Image.histogram()` of an RGB image, as three arrays).
    fn histograms(&self) -> [[u64; 256]; 3] {
        let mut h = [[0u64; 256]; 3];
        for p in self.data.chunks_exact(3) {
            for c in 0..3 {
                h[c][p[c] as usize] += 1;
            }
        }
        h
    }

    /// Applies one table per channel (`Image.point` with 768 entries).
    fn map(&mut self, luts: &[[u8; 256]; 3]) {
        for p in self.data.chunks_exact_mut(3) {
            for c in 0..3 {
                p[c] = luts[c][p[c] as usize];
            }
        }
    }

    fn map_all(&mut self, lut: &[u8; 256]) {
        for v in &mut self.data {
            *v = lut[*v as usize];
        }
    }

    /// Pillow's `convert("L")`: `(R·19595 + G·38470 + B·7471 + 0x8000) >> 16`.
    fn luminance(&self) -> Vec<u8> {
        self.data
            .chunks_exact(3)
            .map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8)
            .collect()
    }
}

/// `ImageOps.posterize(img, bits)` (timm returns the image unchanged for `bits >= 8`).
pub fn posterize(image: &mut RgbImage, bits: u32) {
    if bits >= 8 {
        return;
    }
    let mask = !((1u32 << (8 - bits)) - 1);
    let lut: [u8; 256] = std::array::from_fn(|i| (i as u32 & mask) as u8);
    image.map_all(&lut);
}

/// `ImageOps.solarize(img, threshold)`: values at or above `threshold` are inverted.
pub fn solarize(image: &mut RgbImage, threshold: u32) {
    let lut: [u8; 256] = std::array::from_fn(|i| if (i as u32) < threshold { i as u8 } else { 255 - i as u8 });
    image.map_all(&lut);
}

/// `ImageOps.invert(img)`.
pub fn invert(image: &mut RgbImage) {
    for v in &mut image.data {
        *v = 255 - *v;
    }
}

/// `ImageOps.autocontrast(img)` (no cutoff, nothing ignored): per channel, the lowest used value
/// maps to 0 and the highest to 255 through `int(ix * scale + offset)`, clipped.
pub fn auto_contrast(image: &mut RgbImage) {
    let histograms = image.histograms();
    let luts: [[u8; 256]; 3] = std::array::from_fn(|c| {
        let h = &histograms[c];
        let lo = (0..256).find(|&i| h[i] != 0).unwrap_or(255);
        let hi = (0..256).rev().find(|&i| h[i] != 0).unwrap_or(0);
        if hi <= lo {
            return std::array::from_fn(|i| i as u8);
        }
        let scale = 255.0 / (hi - lo) as f64;
        let offset = -(lo as f64) * scale;
        std::array::from_fn(|ix| {
            let v = (ix as f64 * scale + offset) as i64; // Python's int(): truncation
            v.clamp(0, 255) as u8
        })
    });
    image.map(&luts);
}

/// `ImageOps.equalize(img)`: per channel, `step = (count − count of the last used value) // 255`
/// and the table `n // step` with `n` starting at `step // 2` and summing the histogram.
pub fn equalize(image: &mut RgbImage) {
    let histograms = image.histograms();
    let luts: [[u8; 256]; 3] = std::array::from_fn(|c| {
        let h = &histograms[c];
        let used: Vec<u64> = h.iter().copied().filter(|&n| n != 0).collect();
        let identity = std::array::from_fn(|i| i as u8);
        if used.len() <= 1 {
            return identity;
        }
        let step = (used.iter().sum::<u64>() - used[used.len() - 1]) / 255;
        if step == 0 {
            return identity;
        }
        let mut n = step / 2;
        std::array::from_fn(|i| {
            let v = (n / step).min(255) as u8; // Image.point clips the table to 0..=255
            n += h[i];
            v
        })
    });
    image.map(&luts);
}

/// `Image.blend(degenerate, image, factor)` as `ImagingBlend` does it: C `float` arithmetic,
/// truncated; clipped when `factor` is outside `[0, 1]`; copies at exactly 0 and 1.
fn blend(degenerate: &[u8], image: &RgbImage, factor: f64) -> RgbImage {
    let alpha = factor as f32;
    let data = if alpha == 0.0 {
        degenerate.to_vec()
    } else if alpha == 1.0 {
        image.data.clone()
    } else if (0.0..=1.0).contains(&alpha) {
        degenerate
            .iter()
            .zip(&image.data)
            .map(|(&a, &b)| (a as f32 + alpha * (b as i32 - a as i32) as f32) as u8)
            .collect()
    } else {
        degenerate
            .iter()
            .zip(&image.data)
            .map(|(&a, &b)| {
                let t = a as f32 + alpha * (b as i32 - a as i32) as f32;
                if t <= 0.0 {
                    0
                } else if t >= 255.0 {
                    255
                } else {
                    t as u8
                }
            })
            .collect()
    };
    RgbImage { width: image.width, height: image.height, data }
}

/// `ImageEnhance.Color(img).enhance(factor)`: blends with the image's grey (`convert("L")`).
pub fn color(image: &RgbImage, factor: f64) -> RgbImage {
    let grey: Vec<u8> = image.luminance().iter().flat_map(|&l| [l, l, l]).collect();
    blend(&grey, image, factor)
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blends with a flat image of the mean grey,
/// `int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)` (a float sum of `value × count`).
pub fn contrast(image: &RgbImage, factor: f64) -> RgbImage {
    let mut histogram = [0u64; 256];
    for l in image.luminance() {
        histogram[l as usize] += 1;
    }
    let count: u64 = histogram.iter().sum();
    let mut sum = 0.0f64;
    for (j, &n) in histogram.iter().enumerate() {
        sum += (j as u64 * n) as f64;
    }
    let mean = if count == 0 { 0.0 } else { sum / count as f64 };
    let grey = (mean + 0.5) as u8;
    blend(&vec![grey; image.data.len()], image, factor)
}

/// `ImageEnhance.Sharpness(img).enhance(factor)`: blends with `img.filter(ImageFilter.SMOOTH)`.
pub fn sharpness(image: &RgbImage, factor: f64) -> RgbImage {
    blend(&smooth(image), image, factor)
}

/// `ImageFilter.SMOOTH` (3×3, weights 1 and a centre 5, over 13) as `ImagingFilter3x3`: f32
/// kernel `k / 13`, an f32 sum starting at 0.5 over the rows below, at and above, clipped and
/// truncated; the first and last rows and columns are copied. Images under 3×3 are copied.
fn smooth(image: &RgbImage) -> Vec<u8> {
    let (w, h) = (image.width, image.height);
    let src = &image.data;
    let mut out = src.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let divisor = 13.0f32;
    let kernel = [1.0f32, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0].map(|k| k / divisor);
    let row = |y: usize| &src[y * w * 3..(y + 1) * w * 3];
    let k1x3 = |r: &[u8], i: usize, k: &[f32]| r[i - 3] as f32 * k[0] + r[i] as f32 * k[1] + r[i + 3] as f32 * k[2];
    for y in 1..h - 1 {
        let (below, at, above) = (row(y + 1), row(y), row(y - 1));
        let out_row = &mut out[y * w * 3..(y + 1) * w * 3];
        for (i, out) in out_row.iter_mut().enumerate().take((w - 1) * 3).skip(3) {
            let mut ss = 0.0f32 + 0.5;
            ss += k1x3(below, i, &kernel[0..3]);
            ss += k1x3(at, i, &kernel[3..6]);
            ss += k1x3(above, i, &kernel[6..9]);
            *out = ss.clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Python's float `%` (the result takes the divisor's sign).
fn py_mod(x: f64, m: f64) -> f64 {
    let r = x % m;
    if r != 0.0 { if (m < 0.0) != (r < 0.0) { r + m } else { r } } else { 0.0f64.copysign(m) }
}

/// Python's `round(x, 15)`: correctly rounded to 15 decimals, read back as the nearest double.
fn round15(x: f64) -> f64 {
    format!("{x:.15}").parse().expect("a formatted float parses")
}

/// `img.rotate(degrees, resample=BICUBIC, fillcolor=fill)` (timm's `rotate`): multiples of 90°
/// that Pillow transposes are transposed; other angles are an affine warp about the centre.
pub fn rotate(image: &RgbImage, degrees: f64, fill: [u8; 3]) -> RgbImage {
    let angle = py_mod(degrees, 360.0);
    let (w, h) = (image.width, image.height);
    if angle == 0.0 {
        return image.clone();
    }
    if angle == 180.0 {
        return transpose(image, w, h, |x, y| (w - 1 - x, h - 1 - y));
    }
    if w == h && angle == 90.0 {
        return transpose(image, h, w, |x, y| (w - 1 - y, x));
    }
    if w == h && angle == 270.0 {
        return transpose(image, h, w, |x, y| (y, h - 1 - x));
    }
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let a = -(angle * (PI / 180.0)); // -math.radians(angle)
    let mut m = [round15(a.cos()), round15(a.sin()), 0.0, round15(-a.sin()), round15(a.cos()), 0.0];
    // transform(-cx - 0, -cy - 0, matrix), whose translation terms are still 0.0, then + centre.
    let (x, y) = (-cx - 0.0, -cy - 0.0);
    let (c, f) = (m[0] * x + m[1] * y + 0.0, m[3] * x + m[4] * y + 0.0);
    m[2] = c + cx;
    m[5] = f + cy;
    affine_bicubic(image, &m, fill)
}

/// `img.transform(img.size, AFFINE, (1, factor, 0, 0, 1, 0), resample=BICUBIC, fillcolor=fill)`.
pub fn shear_x(image: &RgbImage, factor: f64, fill: [u8; 3]) -> RgbImage {
    affine_bicubic(image, &[1.0, factor, 0.0, 0.0, 1.0, 0.0], fill)
}

/// `Image.transpose`: output pixel `(x, y)` of a `w × h` image is source pixel `source(x, y)`.
fn transpose(image: &RgbImage, w: usize, h: usize, source: impl Fn(usize, usize) -> (usize, usize)) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = source(x, y);
            let at = (sy * image.width + sx) * 3;
            data.extend_from_slice(&image.data[at..at + 3]);
        }
    }
    RgbImage { width: w, height: h, data }
}

/// Pillow's `BICUBIC` macro (a = −1 cubic convolution), in its order of operations.
#[inline(always)]
fn cubic(v1: f64, v2: f64, v3: f64, v4: f64, d: f64) -> f64 {
    let p1 = v2;
    let p2 = -v1 + v3;
    let p3 = 2.0 * (v1 - v2) + v3 - v4;
    let p4 = -v1 + v2 - v3 + v4;
    p1 + d * (p2 + d * (p3 + d * p4))
}

/// `ImagingGenericTransform` with `affine_transform` and `bicubic_filter32RGB`, into an image
/// filled with `fill`: each output pixel centre maps through `m`; samples outside the source
/// keep the fill; inside, 4×4 bicubic with columns clamped to the edge, and rows past the
/// edge repeating the previous row's value (exactly Pillow's `BICUBIC_BODY`).
fn affine_bicubic(image: &RgbImage, m: &[f64; 6], fill: [u8; 3]) -> RgbImage {
    let (w, h) = (image.width, image.height);
    let (wi, hi) = (w as i64, h as i64);
    let src = &image.data;
    let mut data: Vec<u8> = std::iter::repeat_n(fill, w * h).flatten().collect();
    let xclip = |x: i64| x.clamp(0, wi - 1) as usize;
    for y in 0..h {
        for x in 0..w {
            let (xin, yin) = (x as f64 + 0.5, y as f64 + 0.5);
            let xx = m[0] * xin + m[1] * yin + m[2];
            let yy = m[3] * xin + m[4] * yin + m[5];
            if xx < 0.0 || xx >= w as f64 || yy < 0.0 || yy >= h as f64 {
                continue;
            }
            let (xx, yy) = (xx - 0.5, yy - 0.5);
            let (fx, fy) = (xx.floor() as i64, yy.floor() as i64);
            let (dx, dy) = (xx - fx as f64, yy - fy as f64);
            let (x0, y0) = (fx - 1, fy - 1);
            let cols = [xclip(x0), xclip(x0 + 1), xclip(x0 + 2), xclip(x0 + 3)];
            let out = &mut data[(y * w + x) * 3..][..3];
            for (c, o) in out.iter_mut().enumerate() {
                let row_value = |r: usize| {
                    let row = &src[r * w * 3..];
                    let v = |i: usize| row[cols[i] * 3 + c] as f64;
                    cubic(v(0), v(1), v(2), v(3), dx)
                };
                let v1 = row_value(y0.clamp(0, hi - 1) as usize);
                let v2 = if (0..hi).contains(&(y0 + 1)) { row_value((y0 + 1) as usize) } else { v1 };
                let v3 = if (0..hi).contains(&(y0 + 2)) { row_value((y0 + 2) as usize) } else { v2 };
                let v4 = if (0..hi).contains(&(y0 + 3)) { row_value((y0 + 3) as usize) } else { v3 };
                let v = cubic(v1, v2, v3, v4, dy);
                *o = if v <= 0.0 {
                    0
                } else if v >= 255.0 {
                    255
                } else {
                    v as u8
                };
            }
        }
    }
    RgbImage { width: w, height: h, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> RgbImage {
        let data = (0..w * h).flat_map(|i| [(i * 7 % 256) as u8, (i * 3 % 200) as u8 + 20, (i % 97) as u8]).collect();
        RgbImage::new(w, h, data)
    }

    #[test]
    fn lookup_tables_are_pillows() {
        let mut image = RgbImage::new(2, 1, vec![0, 127, 128, 200, 255, 7]);
        posterize(&mut image, 4);
        assert_eq!(image.data, [0, 112, 128, 192, 240, 0]);
        let mut image = RgbImage::new(2, 1, vec![0, 127, 128, 200, 255, 7]);
        solarize(&mut image, 128);
        assert_eq!(image.data, [0, 127, 127, 55, 0, 7]);
        let mut image = RgbImage::new(1, 1, vec![0, 100, 255]);
        invert(&mut image);
        assert_eq!(image.data, [255, 155, 0]);
        let mut same = gradient(5, 4);
        solarize(&mut same, 256);
        posterize(&mut same, 8);
        assert_eq!(same, gradient(5, 4));
    }

    #[test]
    fn auto_contrast_stretches_each_channel() {
        let mut image = RgbImage::new(2, 1, vec![50, 7, 9, 100, 7, 10]);
        auto_contrast(&mut image);
        // Channel 0: 50..100 → 0..254 (Pillow's float table truncates 254.99999999999994);
        // channel 1 is flat (unchanged); channel 2: 9..10 → 0..255. Pillow gives the same.
        assert_eq!(image.data, [0, 7, 0, 254, 7, 255]);
    }

    #[test]
    fn blend_shortcuts_and_clipping() {
        let image = gradient(4, 4);
        assert_eq!(color(&image, 1.0), image);
        let grey = color(&image, 0.0);
        assert!(grey.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        let flat = contrast(&image, 0.0);
        assert!(flat.data.iter().all(|&v| v == flat.data[0]));
        let strong = sharpness(&image, 1.9);
        assert_eq!(strong.data.len(), image.data.len());
    }

    #[test]
    fn rotation_by_zero_and_shear_by_zero_are_identities() {
        let image = gradient(9, 6);
        assert_eq!(rotate(&image, 0.0, [1, 2, 3]), image);
        assert_eq!(rotate(&image, 360.0, [1, 2, 3]), image);
        assert_eq!(shear_x(&image, 0.0, [1, 2, 3]), image);
        let square = gradient(5, 5);
        let quarter = rotate(&square, 90.0, [0; 3]);
        assert_eq!(rotate(&rotate(&quarter, 90.0, [0; 3]), 180.0, [0; 3]), square);
    }

    #[test]
    fn python_float_helpers() {
        assert_eq!(py_mod(-27.0, 360.0), 333.0);
        assert_eq!(py_mod(27.0, 360.0), 27.0);
        assert_eq!(round15(1.0 / 3.0), 0.333333333333333);
        assert_eq!(round15(-2.0 / 7.0), -0.285714285714286);
        assert_eq!(round15(-1.0), -1.0);
    }
}

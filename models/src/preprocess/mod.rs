//! cn_clip's image transform (`cn_clip/clip/utils.py::image_transform`) up to a tensor: the
//! decoding and `Resize` + `convert("RGB")` steps live in `cnclip_operators::decoders::image`
//! (re-exported here); this module adds `ToTensor` + `Normalize` with OpenAI's mean/std.

use fast_image_resize::Resizer;
use tch::{Kind, Tensor};

pub use cnclip_operators::decoders::image::{DEFAULT_MAX_PIXELS, Image, Mode, PreprocessError, resize_to_rgb};

/// OpenAI CLIP's normalisation, which cn_clip uses (its literals as written there).
#[allow(clippy::excessive_precision)]
pub const MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// `ToTensor` + `Normalize`: `r × r × 3` RGB bytes → a `[3, r, r]` float tensor.
pub fn normalize_to_tensor(rgb: &[u8], resolution: usize) -> Tensor {
    let r = resolution as i64;
    pixels_to_tensor(rgb, resolution).reshape([3, r, r])
}

/// `ToTensor` + `Normalize` of a batch: `n` images of `r × r × 3` RGB bytes back to back (a
/// `pixels` column's values) → one `[n, 3, r, r]` float tensor, ready for the vision tower.
///
/// # Panics
/// When `rgb` is not a whole number of `r × r × 3` images.
pub fn pixels_to_tensor(rgb: &[u8], resolution: usize) -> Tensor {
    let plane = resolution * resolution;
    assert!(
        plane > 0 && rgb.len().is_multiple_of(3 * plane),
        "{} bytes are not whole RGB images of {resolution}² pixels",
        rgb.len()
    );
    let n = rgb.len() / (3 * plane);
    // ToTensor then Normalize, in f32 as torchvision computes them, tabulated per byte value.
    let tables: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - MEAN[c]) / STD[c]));
    let r = resolution as i64;
    let tensor = Tensor::empty([n as i64, 3, r, r], (Kind::Float, tch::Device::Cpu));
    if n == 0 {
        // No elements: libtorch may leave the data pointer null, which no slice may have.
        return tensor;
    }
    // SAFETY: `tensor` is a fresh, contiguous CPU tensor of kind Float, so `data_ptr` is
    // non-null (n > 0), f32-aligned and valid for the n·3·plane elements libtorch allocated for
    // it alone. `empty` leaves them uninitialised, but f32 has no invalid bit patterns and the
    // loops below write every element before anything reads one; no other handle to the tensor
    // exists while the slice lives, and it ends before `tensor` is returned.
    let nchw = unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut f32, n * 3 * plane) };
    for (image, chw) in rgb.chunks_exact(3 * plane).zip(nchw.chunks_exact_mut(3 * plane)) {
        for (c, (table, out)) in tables.iter().zip(chw.chunks_exact_mut(plane)).enumerate() {
            for (o, pixel) in out.iter_mut().zip(image.chunks_exact(3)) {
                *o = table[pixel[c] as usize];
            }
        }
    }
    tensor
}

/// The whole transform, bytes to a normalised `[3, r, r]` tensor.
///
/// # Errors
/// As [`Image::decode`] and [`resize_to_rgb`].
pub fn preprocess(bytes: &[u8], resolution: usize) -> Result<Tensor, PreprocessError> {
    let image = Image::decode(bytes, DEFAULT_MAX_PIXELS)?;
    let rgb = resize_to_rgb(&image, resolution, &mut Resizer::new())?;
    Ok(normalize_to_tensor(&rgb, resolution))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table-driven batch equals torchvision's arithmetic (`ToTensor` divides by 255,
    /// `Normalize` subtracts the mean and divides by the std, in f32) done with torch ops.
    #[test]
    fn pixels_to_tensor_is_to_tensor_then_normalize() {
        let (n, r) = (3usize, 5usize);
        let rgb: Vec<u8> = (0..n * r * r * 3).map(|i| (i * 37 % 256) as u8).collect();
        let ours = pixels_to_tensor(&rgb, r);
        let mean = Tensor::from_slice(&MEAN).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&STD).view([1, 3, 1, 1]);
        let theirs = (Tensor::from_slice(&rgb)
            .view([n as i64, r as i64, r as i64, 3])
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float)
            / 255.0
            - mean)
            / std;
        assert_eq!(ours.size(), [3, 3, 5, 5]);
        assert!(ours.equal(&theirs), "max diff {}", (ours - theirs).abs().max().double_value(&[]));
        assert!(
            normalize_to_tensor(&rgb[..r * r * 3], r).equal(&pixels_to_tensor(&rgb[..r * r * 3], r).squeeze_dim(0))
        );
    }
}

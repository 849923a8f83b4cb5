//! Image decoding into Pillow's *modes*, because cn_clip resizes in the mode Pillow opened the
//! image in and Pillow's `resize` treats modes differently (palette and 1-bit images with
//! nearest neighbour, RGBA/LA premultiplied, 16-bit grayscale in 16 bits).
//!
//! JPEG goes through libjpeg-turbo — the decoder in Pillow's wheels, so pixels are identical —
//! (grayscale → L, colour → RGB, 4-component → CMYK as Pillow stores it), PNG through `png` with no transformations (so palettes, bit depths and
//! transparency stay visible), GIF through `gif` (first frame, palette kept), and WebP/BMP
//! through `image`. EXIF orientation is ignored, as Pillow's `Image.open` ignores it.

use std::io::Cursor;

use super::{Image, Mode, PreprocessError};

/// Refuses images with more pixels than this (Pillow's `MAX_IMAGE_PIXELS` is 89.5M and it
/// raises at twice that); callers may pass their own limit.
pub const DEFAULT_MAX_PIXELS: u64 = 2 * 89_478_485;

pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Image, PreprocessError> {
    let image = match bytes {
        [0xFF, 0xD8, 0xFF, ..] => decode_jpeg(bytes, max_pixels)?,
        [0x89, b'P', b'N', b'G', ..] => decode_png(bytes, max_pixels)?,
        [b'G', b'I', b'F', b'8', ..] => decode_gif(bytes, max_pixels)?,
        _ => decode_other(bytes, max_pixels)?,
    };
    Ok(image)
}

fn check_size(width: u64, height: u64, max_pixels: u64) -> Result<(), PreprocessError> {
    if width == 0 || height == 0 {
        return Err(PreprocessError::Decode(format!("image has no pixels ({width}×{height})")));
    }
    if width * height > max_pixels {
        return Err(PreprocessError::TooLarge { width, height, max_pixels });
    }
    Ok(())
}

fn decode_jpeg(bytes: &[u8], max_pixels: u64) -> Result<Image, PreprocessError> {
    use turbojpeg::{Colorspace, PixelFormat};

    let err = |e: &dyn std::fmt::Display| PreprocessError::Decode(format!("JPEG: {e}"));
    let mut decompressor = turbojpeg::Decompressor::new().map_err(|e| err(&e))?;
    let header = decompressor.read_header(bytes).map_err(|e| err(&e))?;
    let (width, height) = (header.width, header.height);
    check_size(width as u64, height as u64, max_pixels)?;
    // Pillow's modes: grayscale → L, 4-component (CMYK, YCCK) → CMYK, the rest → RGB.
    let (mode, format) = match header.colorspace {
        Colorspace::Gray => (Mode::L, PixelFormat::GRAY),
        Colorspace::CMYK | Colorspace::YCCK => (Mode::Cmyk, PixelFormat::CMYK),
        _ => (Mode::Rgb, PixelFormat::RGB),
    };
    let channels = mode.channels();
    let mut image = turbojpeg::Image {
        pixels: vec![0u8; width * height * channels],
        width,
        pitch: width * channels,
        height,
        format,
    };
    decompressor.decompress(bytes, image.as_deref_mut()).map_err(|e| err(&e))?;
    let mut data = image.pixels;
    if mode == Mode::Cmyk && has_adobe_marker(bytes) {
        // Adobe (Photoshop) CMYK JPEGs store inverted ink values; Pillow reads them with
        // rawmode "CMYK;I", so its CMYK pixels are the complements.
        data.iter_mut().for_each(|v| *v = 255 - *v);
    }
    Ok(Image { mode, width, height, data, data16: Vec::new() })
}

/// Whether the JPEG has an Adobe APP14 segment before its first scan.
fn has_adobe_marker(bytes: &[u8]) -> bool {
    let mut at = 2;
    while at + 4 <= bytes.len() && bytes[at] == 0xFF {
        let marker = bytes[at + 1];
        if marker == 0xDA {
            break; // start of scan
        }
        let len = u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize;
        if marker == 0xEE && bytes.get(at + 4..at + 9) == Some(b"Adobe") {
            return true;
        }
        at += 2 + len;
    }
    false
}

fn decode_png(bytes: &[u8], max_pixels: u64) -> Result<Image, PreprocessError> {
    use png::{BitDepth, ColorType, Transformations};

    let err = |e: &dyn std::fmt::Display| PreprocessError::Decode(format!("PNG: {e}"));
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(|e| err(&e))?;
    let info = reader.info();
    let (width, height) = (info.width as usize, info.height as usize);
    check_size(width as u64, height as u64, max_pixels)?;
    let (color, depth) = (info.color_type, info.bit_depth);
    let palette = info.palette.as_ref().map(|p| p.to_vec());
    let mut buf = vec![0u8; reader.output_buffer_size().ok_or_else(|| err(&"image too large"))?];
    let frame = reader.next_frame(&mut buf).map_err(|e| err(&e))?;
    let line = frame.line_size;
    let bits = depth as usize;
    // Unpacks row-aligned samples of < 8 bits.
    let unpack = |scale: u8| -> Vec<u8> {
        let mut out = Vec::with_capacity(width * height);
        for row in buf.chunks(line).take(height) {
            for x in 0..width {
                let bit = x * bits;
                let v = (row[bit / 8] >> (8 - bits - bit % 8)) & ((1u16 << bits) - 1) as u8;
                out.push(v * scale);
            }
        }
        out
    };
    // 16-bit samples: Pillow keeps the high byte for colour modes.
    let high_bytes = || -> Vec<u8> { buf[..width * height * color.samples() * 2].chunks(2).map(|s| s[0]).collect() };
    let image = |mode, data| Ok(Image { mode, width, height, data, data16: Vec::new() });
    match (color, depth) {
        (ColorType::Indexed, _) => {
            let palette = palette.ok_or_else(|| err(&"indexed image without a palette"))?;
            let indices = if depth == BitDepth::Eight { buf[..width * height].to_vec() } else { unpack(1) };
            // Expanded through the palette; resized with nearest neighbour like Pillow's "P".
            let rgb = indices
                .iter()
                .flat_map(|&i| {
                    let at = i as usize * 3;
                    palette.get(at..at + 3).map_or([0, 0, 0], |c| [c[0], c[1], c[2]])
                })
                .collect();
            image(Mode::Palette, rgb)
        }
        (ColorType::Grayscale, BitDepth::One) => image(Mode::One, unpack(255)),
        (ColorType::Grayscale, BitDepth::Two) => image(Mode::L, unpack(85)),
        (ColorType::Grayscale, BitDepth::Four) => image(Mode::L, unpack(17)),
        (ColorType::Grayscale, BitDepth::Eight) => image(Mode::L, buf[..width * height].to_vec()),
        (ColorType::Grayscale, BitDepth::Sixteen) => {
            let data16 = buf[..width * height * 2].chunks(2).map(|s| u16::from_be_bytes([s[0], s[1]])).collect();
            Ok(Image { mode: Mode::I16, width, height, data: Vec::new(), data16 })
        }
        (ColorType::GrayscaleAlpha, BitDepth::Eight) => image(Mode::La, buf[..width * height * 2].to_vec()),
        (ColorType::GrayscaleAlpha, _) => image(Mode::La, high_bytes()),
        (ColorType::Rgb, BitDepth::Eight) => image(Mode::Rgb, buf[..width * height * 3].to_vec()),
        (ColorType::Rgb, _) => image(Mode::Rgb, high_bytes()),
        (ColorType::Rgba, BitDepth::Eight) => image(Mode::Rgba, buf[..width * height * 4].to_vec()),
        (ColorType::Rgba, _) => image(Mode::Rgba, high_bytes()),
    }
}

fn decode_gif(bytes: &[u8], max_pixels: u64) -> Result<Image, PreprocessError> {
    let err = |e: &dyn std::fmt::Display| PreprocessError::Decode(format!("GIF: {e}"));
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    let mut decoder = options.read_info(Cursor::new(bytes)).map_err(|e| err(&e))?;
    let global = decoder.global_palette().map(<[u8]>::to_vec);
    let (width, height) = (decoder.width() as usize, decoder.height() as usize);
    check_size(width as u64, height as u64, max_pixels)?;
    let frame = decoder.read_next_frame().map_err(|e| err(&e))?.ok_or_else(|| err(&"no frame"))?;
    let palette = frame.palette.clone().or(global).ok_or_else(|| err(&"no palette"))?;
    // The first frame on a canvas of the logical screen size; uncovered pixels are index 0
    // (Pillow fills with the background index only when it is within the frame).
    let mut indices = vec![0u8; width * height];
    let (fx, fy, fw) = (frame.left as usize, frame.top as usize, frame.width as usize);
    for (row, chunk) in frame.buffer.chunks(fw.max(1)).enumerate() {
        let y = fy + row;
        if y >= height {
            break;
        }
        for (col, &index) in chunk.iter().enumerate() {
            if fx + col < width {
                indices[y * width + fx + col] = index;
            }
        }
    }
    // Pillow opens a GIF whose palette is the identity grey ramp as "L" (resized bicubic),
    // any other as "P" (nearest neighbour).
    let grey_ramp = palette.chunks(3).enumerate().all(|(i, c)| c.iter().all(|&v| v as usize == i));
    if grey_ramp {
        return Ok(Image { mode: Mode::L, width, height, data: indices, data16: Vec::new() });
    }
    let rgb = indices
        .iter()
        .flat_map(|&i| palette.get(i as usize * 3..i as usize * 3 + 3).map_or([0, 0, 0], |c| [c[0], c[1], c[2]]))
        .collect();
    Ok(Image { mode: Mode::Palette, width, height, data: rgb, data16: Vec::new() })
}

fn decode_other(bytes: &[u8], max_pixels: u64) -> Result<Image, PreprocessError> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    if reader.format().is_none() {
        return Err(PreprocessError::Decode("not a JPEG, PNG, GIF, WebP or BMP image".into()));
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(16));
    reader.limits(limits);
    let (w, h) = reader.into_dimensions().map_err(|e| PreprocessError::Decode(e.to_string()))?;
    check_size(w as u64, h as u64, max_pixels)?;
    let decoded = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?
        .decode()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    if let Some(mode) = bmp_palette_mode(bytes) {
        // Palette BMPs: Pillow opens an identity grey palette as "L" (bicubic), any other as
        // "P"/"1" (nearest neighbour); `image` has expanded the palette for us.
        let rgb = decoded.into_rgb8().into_raw();
        let data = if mode == Mode::L { rgb.chunks(3).map(|p| p[0]).collect() } else { rgb };
        return Ok(Image { mode, width, height, data, data16: Vec::new() });
    }
    let (mode, data) = if decoded.color().has_alpha() {
        (Mode::Rgba, decoded.into_rgba8().into_raw())
    } else if decoded.color().has_color() {
        (Mode::Rgb, decoded.into_rgb8().into_raw())
    } else {
        (Mode::L, decoded.into_luma8().into_raw())
    };
    Ok(Image { mode, width, height, data, data16: Vec::new() })
}

/// For a BMP of at most 8 bits per pixel, the mode Pillow's BmpImagePlugin gives it: "L" when
/// its palette is the grey ramp `(i, i, i)` (and it has more than two colours), else a palette
/// mode (resized with nearest neighbour either way for "1" and "P").
fn bmp_palette_mode(bytes: &[u8]) -> Option<Mode> {
    if bytes.get(..2)? != b"BM" {
        return None;
    }
    let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let header_size = u32_at(14)?;
    let (bits, colors, entry) = if header_size == 12 {
        (u16_at(24)?, 0, 3) // OS/2 BITMAPCOREHEADER: RGB triples
    } else {
        (u16_at(28)?, u32_at(46)?, 4)
    };
    if bits > 8 {
        return None;
    }
    let colors = if colors == 0 { 1usize << bits } else { colors };
    let palette = bytes.get(14 + header_size..14 + header_size + colors * entry)?;
    let grey_ramp =
        colors != 2 && palette.chunks(entry).enumerate().all(|(i, bgr)| bgr[..3].iter().all(|&v| v as usize == i));
    Some(if grey_ramp { Mode::L } else { Mode::Palette })
}

//! A deterministic synthetic Chinese image–caption corpus: coloured shapes on a plain canvas,
//! varying in shape, colour, size, position and count, each captioned as a person would
//! ("左上角有一个红色的大圆形"). Same seed, same bytes — it feeds demos, tests and benchmarks
//! without any download, and its captions really describe its images, so retrieval on it is
//! meaningful (a trained model can score well, a random one cannot).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const SIZE: usize = 96;

pub const SHAPES: [&str; 3] = ["圆形", "正方形", "三角形"];
pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("红色", [220, 40, 40]),
    ("绿色", [40, 170, 60]),
    ("蓝色", [40, 80, 220]),
    ("黄色", [235, 200, 30]),
    ("紫色", [150, 60, 190]),
    ("黑色", [25, 25, 25]),
];
const POSITIONS: [(&str, (f32, f32)); 5] = [
    ("左上角", (0.25, 0.25)),
    ("右上角", (0.75, 0.25)),
    ("左下角", (0.25, 0.75)),
    ("右下角", (0.75, 0.75)),
    ("中间", (0.5, 0.5)),
];
const COUNTS: [&str; 3] = ["一个", "两个", "三个"];

/// One generated sample: RGB pixels (`SIZE × SIZE × 3`) and its caption.
pub struct Sample {
    pub pixels: Vec<u8>,
    pub caption: String,
    /// Index into the zero-shot label list (`color × shape`).
    pub label: usize,
}

/// The zero-shot class names, one per (colour, shape), as `label_cn.txt` lists them.
pub fn labels() -> Vec<String> {
    COLORS.iter().flat_map(|(c, _)| SHAPES.iter().map(move |s| format!("{c}的{s}"))).collect()
}

fn draw(pixels: &mut [u8], shape: usize, color: [u8; 3], cx: f32, cy: f32, r: f32) {
    let inside = |x: f32, y: f32| match shape {
        0 => (x - cx).powi(2) + (y - cy).powi(2) <= r * r,
        1 => (x - cx).abs() <= r && (y - cy).abs() <= r,
        _ => {
            // Upward triangle: apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r).
            y <= cy + r && y >= cy - r && (x - cx).abs() <= (y - (cy - r)) / 2.0
        }
    };
    for y in 0..SIZE {
        for x in 0..SIZE {
            if inside(x as f32 + 0.5, y as f32 + 0.5) {
                pixels[(y * SIZE + x) * 3..][..3].copy_from_slice(&color);
            }
        }
    }
}

/// Sample `index` of the stream seeded with `seed` (independent of every other index, so a
/// corpus can be generated in parallel or resumed).
pub fn sample(seed: u64, index: u64) -> Sample {
    let mut rng = StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let background = [rng.random_range(225..=255), rng.random_range(225..=255), rng.random_range(225..=255)];
    let mut pixels: Vec<u8> = std::iter::repeat_n(background, SIZE * SIZE).flatten().collect();
    let shape = rng.random_range(0..SHAPES.len());
    let color = rng.random_range(0..COLORS.len());
    let position = rng.random_range(0..POSITIONS.len());
    let count = rng.random_range(0..COUNTS.len());
    let big = rng.random_bool(0.5);
    let (px, py) = POSITIONS[position].1;
    let r = if big { 10.0 } else { 5.0 } as f32;
    for k in 0..=count {
        // Several shapes sit side by side around the position's centre.
        let offset = (k as f32 - count as f32 / 2.0) * (2.2 * r);
        let jitter = rng.random_range(-2.0..2.0f32);
        draw(&mut pixels, shape, COLORS[color].1, px * SIZE as f32 + offset, py * SIZE as f32 + jitter, r);
    }
    let caption = format!(
        "{}有{}{}的{}{}",
        POSITIONS[position].0,
        COUNTS[count],
        COLORS[color].0,
        if big { "大" } else { "小" },
        SHAPES[shape]
    );
    Sample { pixels, caption, label: color * SHAPES.len() + shape }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_varied() {
        let a = sample(7, 3);
        let b = sample(7, 3);
        assert_eq!((a.pixels.clone(), a.caption.clone()), (b.pixels, b.caption));
        let captions: std::collections::HashSet<String> = (0..200).map(|i| sample(7, i).caption).collect();
        assert!(captions.len() > 100, "only {} distinct captions", captions.len());
        assert_ne!(sample(8, 3).pixels, a.pixels);
    }

    #[test]
    fn caption_names_the_colour_drawn_and_the_label() {
        for i in 0..50 {
            let s = sample(1, i);
            let (name, rgb) = COLORS.iter().find(|(n, _)| s.caption.contains(n)).unwrap();
            assert!(s.pixels.chunks(3).any(|p| p == rgb), "{name} missing in sample {i}: {}", s.caption);
            assert!(labels()[s.label].starts_with(name));
        }
    }
}

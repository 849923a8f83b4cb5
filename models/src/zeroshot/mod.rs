//! Zero-shot classification as cn_clip's `zeroshot_evaluation.py` does it: the prompt
//! templates it ships and how it picks a set by dataset name (any other name gets the OpenAI
//! set), the classifier built from the prompts' features (every template of a class averaged,
//! then normalised), the class probabilities `softmax(100 · image_features @ classifier)` and
//! the scores (top-1, top-5, mean per-class recall). The job (`zeroshot-evaluation`) reads the
//! images and encodes the prompts through a pipeline and writes the results.

mod templates;

use tch::{Kind, Tensor};

pub use templates::{AIRCRAFT, COUNTRY211, EUROSAT, FLOWER, FOOD, OPENAI};

/// The template set cn_clip uses for `dataset` (its `template_dict`, `openai` by default).
pub fn templates_for(dataset: &str) -> &'static [&'static str] {
    match dataset {
        "fgvc-aircraft-2013b-variants102" => AIRCRAFT,
        "food-101" => FOOD,
        "oxford-flower-102" => FLOWER,
        "eurosat_clip" | "resisc45_clip" => EUROSAT,
        "country211" => COUNTRY211,
        _ => OPENAI,
    }
}

/// Every built-in set by its name in `cvinw_zeroshot_templates.py`.
pub const SETS: [(&str, &[&str]); 6] = [
    ("openai_templates", OPENAI),
    ("flower_templates", FLOWER),
    ("food_templates", FOOD),
    ("aircraft_templates", AIRCRAFT),
    ("eurosat_templates", EUROSAT),
    ("country211_templates", COUNTRY211),
];

/// The prompts of `classnames` × `templates`, class by class: template `t` of class `c` is
/// prompt `c · templates.len() + t`, with the class name where the template has `{}`.
pub fn prompts(classnames: &[String], templates: &[String]) -> Vec<String> {
    classnames.iter().flat_map(|name| templates.iter().map(move |template| template.replacen("{}", name, 1))).collect()
}

/// The classifier `[D, C]` from the prompts' features `[C · T, D]` (in [`prompts`]' order):
/// each class's `templates` features averaged and normalised to unit length.
pub fn classifier(prompt_features: &Tensor, classes: usize, templates: usize) -> Tensor {
    tch::no_grad(|| {
        let t = templates as i64;
        let per_class: Vec<Tensor> = (0..classes as i64)
            .map(|c| {
                let mean = prompt_features.narrow(0, c * t, t).mean_dim(0, false, Kind::Float);
                &mean / mean.norm()
            })
            .collect();
        Tensor::stack(&per_class, 1)
    })
}

/// Each image's class probabilities `[N, C]`: `softmax(100 · image_features @ classifier)`.
pub fn probabilities(image_features: &Tensor, classifier: &Tensor) -> Tensor {
    tch::no_grad(|| (image_features * 100.0).matmul(classifier).softmax(-1, Kind::Float))
}

/// What a run scored, as counts over its images.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub images: usize,
    /// Images whose most probable class is theirs (ties go to the lower class index).
    pub top1: usize,
    /// Images whose class is among the five most probable.
    pub top5: usize,
    /// Top-1 recall averaged over the classes that have images.
    pub mean_per_class_recall: f64,
}

/// Scores `rows` (each image's class probabilities) against `targets` (each image's class).
pub fn score(rows: &[&[f32]], targets: &[i64]) -> Scores {
    let classes = rows.first().map_or(0, |row| row.len());
    let ranked = |row: &[f32]| -> Vec<usize> {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        order
    };
    let (mut top1, mut top5) = (0usize, 0usize);
    let (mut per_class_hits, mut per_class_count) = (vec![0usize; classes], vec![0usize; classes]);
    for (row, &target) in rows.iter().zip(targets) {
        let order = ranked(row);
        let hit1 = order.first() == Some(&(target as usize));
        top1 += usize::from(hit1);
        top5 += usize::from(order.iter().take(5).any(|&c| c == target as usize));
        if (target as usize) < classes {
            per_class_count[target as usize] += 1;
            per_class_hits[target as usize] += usize::from(hit1);
        }
    }
    let seen: Vec<f64> = per_class_count
        .iter()
        .zip(&per_class_hits)
        .filter(|(count, _)| **count > 0)
        .map(|(count, hits)| *hits as f64 / *count as f64)
        .collect();
    let mean_per_class_recall = seen.iter().sum::<f64>() / seen.len().max(1) as f64;
    Scores { images: rows.len(), top1, top5, mean_per_class_recall }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classifier_averages_each_class_templates_and_normalises() {
        let names = ["猫".to_string(), "狗".to_string()];
        let templates = ["{}".to_string(), "一只{}".to_string()];
        assert_eq!(prompts(&names, &templates), ["猫", "一只猫", "狗", "一只狗"]);
        let features = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 3.0, 0.0, 3.0, 0.0]).view([4, 2]);
        let w = classifier(&features, 2, 2);
        let half = std::f32::consts::FRAC_1_SQRT_2;
        let got: Vec<f32> = Vec::try_from(w.flatten(0, -1)).unwrap();
        // Column 0: mean (0.5, 0.5) normalised; column 1: (1, 0).
        let expected = [half, 1.0, half, 0.0];
        assert!(got.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6), "{got:?}");
    }

    #[test]
    fn scores_count_top1_top5_and_per_class_recall() {
        let rows: [&[f32]; 3] = [&[0.7, 0.2, 0.1], &[0.5, 0.5, 0.0], &[0.1, 0.3, 0.6]];
        // Image 1's tie goes to class 0 (not its class 1); image 2 is right.
        let scores = score(&rows, &[0, 1, 2]);
        assert_eq!((scores.images, scores.top1, scores.top5), (3, 2, 3));
        assert!((scores.mean_per_class_recall - 2.0 / 3.0).abs() < 1e-12);
    }
}

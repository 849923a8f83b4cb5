//! Zero-shot classification's prompt templates: the sets cn_clip ships and how its
//! `zeroshot_evaluation.py` picks one by dataset name (any other name gets the OpenAI set).

mod templates;

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

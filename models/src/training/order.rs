//! cn_clip's parameter order: `CLIP.named_parameters()`, the order in which `main.py` hands the
//! parameters to AdamW and so the integer ids of `optimizer.state_dict()`. torch walks modules
//! depth first, each module's own parameters before its children, both in registration
//! order (`__init__`'s order, not alphabetical). Our parameters carry cn_clip's dotted names;
//! the rank tables below hold the registration order of every module cn_clip's CLIP is built
//! from (CLIP, VisualTransformer, ModifiedResNet and its Bottleneck/AttentionPool2d, the
//! residual attention blocks, BertModel), and numeric segments (`resblocks.3`, `layer.10`,
//! `downsample.-1`) sort as numbers.

use std::cmp::Ordering;

/// Own parameters, in registration order across cn_clip's modules (each module uses a subset
/// in this relative order).
const OWN: [&str; 9] = [
    "class_embedding",
    "positional_embedding",
    "proj",
    "text_projection",
    "logit_scale",
    "in_proj_weight",
    "in_proj_bias",
    "weight",
    "bias",
];

/// Child modules, in registration order across cn_clip's modules.
const CHILDREN: [&str; 44] = [
    "visual",
    "bert",
    "conv1",
    "bn1",
    "conv2",
    "bn2",
    "conv3",
    "bn3",
    "downsample",
    "layer1",
    "layer2",
    "layer3",
    "layer4",
    "attnpool",
    "ln_pre",
    "transformer",
    "ln_post",
    "resblocks",
    "attn",
    "ln_1",
    "mlp",
    "ln_2",
    "k_proj",
    "q_proj",
    "v_proj",
    "c_fc",
    "c_proj",
    "out_proj",
    "embeddings",
    "encoder",
    "pooler",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "dense",
    "LayerNorm",
    "layer",
    "attention",
    "self",
    "intermediate",
    "output",
    "query",
    "key",
    "value",
];

/// Where one path segment sorts among its siblings: own parameters first, then children;
/// known names by table, numbers by value, anything else after them by name.
fn segment_key(segment: &str, last: bool) -> (u8, usize, i64, &str) {
    let table: &[&str] = if last { &OWN } else { &CHILDREN };
    let group = u8::from(!last);
    if let Some(rank) = table.iter().position(|&s| s == segment) {
        (group, rank, 0, "")
    } else if let Ok(number) = segment.parse::<i64>() {
        (group, table.len(), number, "")
    } else {
        (group, table.len() + 1, 0, segment)
    }
}

/// Compares two dotted parameter names in `named_parameters()` order.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    for i in 0..a.len().min(b.len()) {
        if a[i] != b[i] {
            return segment_key(a[i], i + 1 == a.len()).cmp(&segment_key(b[i], i + 1 == b.len()));
        }
    }
    a.len().cmp(&b.len())
}

/// Sorts parameter names into cn_clip's `named_parameters()` order.
pub fn sort(names: &mut [String]) {
    names.sort_by(|a, b| compare(a, b));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_parameters_come_before_children_and_numbers_sort_by_value() {
        let mut names: Vec<String> = [
            "visual.transformer.resblocks.10.ln_1.weight",
            "visual.proj",
            "bert.embeddings.word_embeddings.weight",
            "visual.transformer.resblocks.2.attn.in_proj_bias",
            "logit_scale",
            "visual.conv1.weight",
            "visual.transformer.resblocks.2.attn.in_proj_weight",
            "text_projection",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        sort(&mut names);
        assert_eq!(
            names,
            [
                "text_projection",
                "logit_scale",
                "visual.proj",
                "visual.conv1.weight",
                "visual.transformer.resblocks.2.attn.in_proj_weight",
                "visual.transformer.resblocks.2.attn.in_proj_bias",
                "visual.transformer.resblocks.10.ln_1.weight",
                "bert.embeddings.word_embeddings.weight",
            ]
        );
    }
}

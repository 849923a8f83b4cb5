//! Tokenizer parity with `cn_clip.clip.tokenize` (issue #3): ids must be identical, no tolerance,
//! on a varied generated corpus at context lengths 52 and 24. `tests/it/cli.rs` checks
//! the same through `cnclip tokenize`.

use cnclip_models::{Tokenizer, preprocess_text};
use cnclip_tests::corpus::texts as corpus;
use cnclip_tests::reference_token_ids;

fn assert_parity(texts: &[String], context_length: usize, transform: impl Fn(&str) -> String) {
    let transformed: Vec<String> = texts.iter().map(|t| transform(t)).collect();
    let expected = reference_token_ids(&transformed, context_length);
    assert_eq!(expected.len(), texts.len(), "reference returned one row per text");
    let tokenizer = Tokenizer::chinese();
    let mismatches: Vec<String> = transformed
        .iter()
        .zip(&expected)
        .filter_map(|(text, want)| {
            let got = tokenizer.encode(text, context_length).unwrap();
            (&got != want).then(|| format!("{text:?}\n  ours:   {got:?}\n  cn_clip: {want:?}"))
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {} texts differ at context length {context_length}; first ones:\n{}",
        mismatches.len(),
        texts.len(),
        mismatches.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Corpus size: 2,500 lines by default; `CNCLIP_TOKENIZER_LINES` asks for a longer soak.
fn lines() -> usize {
    std::env::var("CNCLIP_TOKENIZER_LINES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_500)
}

#[test]
fn tokenizer_matches_cn_clip_at_context_52() {
    assert_parity(&corpus(lines(), 52), 52, str::to_string);
}

#[test]
fn tokenizer_matches_cn_clip_at_context_24() {
    assert_parity(&corpus(lines(), 24), 24, str::to_string);
}

/// cn_clip's datasets run `_preprocess_text` first; the reference does the same in Python here.
#[test]
fn preprocessed_tokenizer_matches_cn_clip_dataset_path() {
    let texts = corpus(500, 7);
    let stdin: String = texts.iter().map(|t| serde_json::to_string(t).unwrap() + "\n").collect();
    let script = r#"
import json, sys
from cn_clip.eval.data import _preprocess_text
for line in sys.stdin:
    print(json.dumps(_preprocess_text(json.loads(line))))
"#;
    let preprocessed: Vec<String> =
        cnclip_tests::python(script, &[], &stdin).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ours: Vec<String> = texts.iter().map(|t| preprocess_text(t)).collect();
    assert_eq!(ours, preprocessed);
    assert_parity(&texts, 52, preprocess_text);
}

//! The tokenizer of `cn_clip.clip.tokenize`: BERT's basic tokenizer, then greedy WordPiece over
//! the 21,128-entry Chinese vocabulary, wrapped in `[CLS] … [SEP]`, truncated and zero-padded.
//!
//! Mirrors `cn_clip/clip/bert_tokenizer.py` (`FullTokenizer(do_lower_case=True)`) step by step,
//! because exact id parity is the contract: clean (drop NUL, U+FFFD and control characters, map
//! whitespace to spaces; control = Cc/Cf only), space out CJK ideographs, split on whitespace, then per word lower-case
//! (Python's `str.lower`, final sigma included — Rust's `str::to_lowercase` does the same),
//! strip accents (NFD, drop `Mn`), split on punctuation, and WordPiece each piece (longest match
//! first, `##` continuations, `[UNK]` for words over 200 characters or with no match).
//!
//! It is hand-written rather than built on the `tokenizers` crate: its BERT normaliser lower-cases
//! per character (no final sigma) and defaults WordPiece to 100 characters per word, so it is
//! not id-identical to cn_clip, and it is a large dependency for ~150 lines.
//! Unicode tables are Rust's and `unicode-properties`'; Python 3.11 uses Unicode 14, so only
//! characters assigned after Unicode 14 can categorise differently.

use std::sync::OnceLock;

use rustc_hash::FxHashMap;
use unicode_normalization::UnicodeNormalization;

/// Errors building a tokenizer or encoding with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vocabulary {source_name}: {reason}")]
    Vocab { source_name: String, reason: String },
    #[error("context length {0} is too small: it must hold [CLS] and [SEP] (at least 2)")]
    ContextLength(usize),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[rustfmt::skip]
mod unicode14;

/// The default context length of every released Chinese-CLIP model.
pub const DEFAULT_CONTEXT_LENGTH: usize = 52;

/// Maximum characters in one word before WordPiece gives up with `[UNK]` (as BERT's).
const MAX_INPUT_CHARS_PER_WORD: usize = 200;

static VOCAB_TXT: &str = include_str!("../../../data/vocab.txt");

/// Buffers reused across calls on one thread, so tokenizing a text allocates nothing.
#[derive(Default)]
struct Scratch {
    cleaned: String,
    word: String,
    piece: String,
    bounds: Vec<usize>,
    ids: Vec<i64>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// A WordPiece tokenizer over a BERT vocabulary.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    vocab: FxHashMap<String, i64>,
    cls: i64,
    sep: i64,
    pad: i64,
    unk: i64,
}

impl Tokenizer {
    /// The Chinese BERT vocabulary cn_clip ships (embedded; see `operators/data/NOTICE`).
    pub fn chinese() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| {
            Tokenizer::from_vocab_text("embedded vocab.txt", VOCAB_TXT).expect("the embedded vocabulary is valid")
        })
    }

    /// Builds a tokenizer from a `vocab.txt` (one token per line, id = line number).
    ///
    /// # Errors
    /// When one of `[CLS]`, `[SEP]`, `[PAD]`, `[UNK]` is missing; `source_name` names the file.
    pub fn from_vocab_text(source_name: &str, text: &str) -> Result<Self> {
        let mut vocab = FxHashMap::default();
        // As BERT's load_vocab: every line counts, tokens are stripped, a repeated token keeps
        // its last id.
        for (id, line) in text.lines().enumerate() {
            vocab.insert(line.trim().to_string(), id as i64);
        }
        let special = |token: &str| {
            vocab.get(token).copied().ok_or_else(|| Error::Vocab {
                source_name: source_name.to_string(),
                reason: format!("has no {token} token"),
            })
        };
        Ok(Tokenizer {
            cls: special("[CLS]")?,
            sep: special("[SEP]")?,
            pad: special("[PAD]")?,
            unk: special("[UNK]")?,
            vocab,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The id of `[PAD]`; cn_clip's text encoder masks positions holding it.
    pub fn pad_id(&self) -> i64 {
        self.pad
    }

    /// The WordPiece ids of `text`, without `[CLS]`/`[SEP]` (`FullTokenizer.tokenize` + ids).
    pub fn token_ids(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        SCRATCH.with_borrow_mut(|scratch| self.token_ids_into(text, scratch, &mut ids));
        ids
    }

    fn token_ids_into(&self, text: &str, scratch: &mut Scratch, ids: &mut Vec<i64>) {
        let Scratch { cleaned, word, piece, bounds, .. } = scratch;
        basic_tokenize(text, cleaned, word, |token| self.wordpiece(token, piece, bounds, ids));
    }

    /// `cn_clip.clip.tokenize([text], context_length)[0]`: `[CLS]`, at most
    /// `context_length - 2` ids, `[SEP]`, then zeros up to `context_length`.
    ///
    /// # Errors
    /// [`Error::ContextLength`] when `context_length < 2`.
    pub fn encode(&self, text: &str, context_length: usize) -> Result<Vec<i64>> {
        let mut out = vec![0; context_length];
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// [`Tokenizer::encode`] into a caller's row (its length is the context length), so batches
    /// are filled without a copy.
    ///
    /// # Errors
    /// [`Error::ContextLength`] when the row is shorter than 2.
    pub fn encode_into(&self, text: &str, row: &mut [i64]) -> Result<()> {
        let context_length = row.len();
        if context_length < 2 {
            return Err(Error::ContextLength(context_length));
        }
        SCRATCH.with_borrow_mut(|scratch| {
            let mut ids = std::mem::take(&mut scratch.ids);
            ids.clear();
            self.token_ids_into(text, scratch, &mut ids);
            let kept = ids.len().min(context_length - 2);
            row[0] = self.cls;
            row[1..=kept].copy_from_slice(&ids[..kept]);
            row[kept + 1] = self.sep;
            row[kept + 2..].fill(0);
            scratch.ids = ids;
        });
        Ok(())
    }

    /// Greedy longest-match-first WordPiece of one basic token, appending ids.
    fn wordpiece(&self, word: &str, piece: &mut String, bounds: &mut Vec<usize>, ids: &mut Vec<i64>) {
        // Fast path: the whole word is in the vocabulary (every CJK character, most words).
        if let Some(&id) = self.vocab.get(word)
            && word.chars().nth(MAX_INPUT_CHARS_PER_WORD).is_none()
        {
            ids.push(id);
            return;
        }
        // Byte offsets of each character, plus the end, so substrings are slices.
        bounds.clear();
        bounds.extend(word.char_indices().map(|(i, _)| i).chain([word.len()]));
        let n_chars = bounds.len() - 1;
        if n_chars > MAX_INPUT_CHARS_PER_WORD {
            ids.push(self.unk);
            return;
        }
        let first = ids.len();
        let mut start = 0;
        while start < n_chars {
            let mut end = n_chars;
            let mut found = None;
            while start < end {
                piece.clear();
                if start > 0 {
                    piece.push_str("##");
                }
                piece.push_str(&word[bounds[start]..bounds[end]]);
                if let Some(&id) = self.vocab.get(piece.as_str()) {
                    found = Some(id);
                    break;
                }
                end -= 1;
            }
            match found {
                Some(id) => ids.push(id),
                None => {
                    // One unmatched piece makes the whole word [UNK].
                    ids.truncate(first);
                    ids.push(self.unk);
                    return;
                }
            }
            start = end;
        }
    }
}

/// The text pre-processing cn_clip's eval and training datasets apply before `tokenize`
/// (`_preprocess_text`): lower-case, curly double quotes to `"`.
pub fn preprocess_text(text: &str) -> String {
    text.to_lowercase().replace(['\u{201c}', '\u{201d}'], "\"")
}

/// BERT's `BasicTokenizer(do_lower_case=True).tokenize`, calling `emit` with each token.
fn basic_tokenize(text: &str, cleaned: &mut String, word: &mut String, mut emit: impl FnMut(&str)) {
    // _clean_text and _tokenize_chinese_chars in one pass.
    cleaned.clear();
    for c in text.chars() {
        if is_chinese_char(c) {
            // Checked first: most characters of our corpora are ideographs (never control or
            // whitespace), and this avoids the table look-ups below.
            cleaned.push(' ');
            cleaned.push(c);
            cleaned.push(' ');
        } else if c == '\0' || c == '\u{fffd}' || is_control(c) {
            continue;
        } else if is_whitespace(c) {
            cleaned.push(' ');
        } else {
            cleaned.push(c);
        }
    }
    for raw in cleaned.split_whitespace() {
        if is_plain_ideograph(raw) {
            emit(raw);
            continue;
        }
        if raw.is_ascii() {
            word.clear();
            word.push_str(raw);
            word.make_ascii_lowercase();
        } else {
            lower_strip_accents(raw, word);
        }
        // _run_split_on_punc, then BERT's final whitespace split of the joined pieces.
        let mut start = 0;
        for (i, c) in word.char_indices() {
            if is_punctuation(c) {
                emit_words(&word[start..i], &mut emit);
                emit(&word[i..i + c.len_utf8()]);
                start = i + c.len_utf8();
            }
        }
        emit_words(&word[start..], &mut emit);
    }
}

/// A single ideograph from the blocks where lower-casing, NFD and accent stripping are the
/// identity (unlike the compatibility ideographs, which decompose): emitted as it is.
fn is_plain_ideograph(word: &str) -> bool {
    let mut chars = word.chars();
    matches!((chars.next(), chars.next()), (Some(c), None)
        if matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2CEAF))
}

/// Emits a punctuation-free piece; lower-casing or NFD can (rarely) produce whitespace in it.
fn emit_words(piece: &str, emit: &mut impl FnMut(&str)) {
    if piece.is_empty() {
    } else if piece.contains(char::is_whitespace) {
        piece.split_whitespace().for_each(emit);
    } else {
        emit(piece);
    }
}

/// `_run_strip_accents(token.lower())` into `out`: lower-case, NFD, drop `Mn` marks.
///
/// Characters unassigned in Unicode 14 are barriers that pass through unchanged, so Rust's
/// newer case and decomposition data never touch what Python would leave alone.
fn lower_strip_accents(word: &str, out: &mut String) {
    out.clear();
    let mut rest = word;
    while !rest.is_empty() {
        let split = rest.find(is_unassigned).unwrap_or(rest.len());
        let (known, tail) = rest.split_at(split);
        out.extend(known.to_lowercase().nfd().filter(|&c| !in_table(&unicode14::NONSPACING_MARK, c)));
        let unassigned_len = tail.find(|c| !is_unassigned(c)).unwrap_or(tail.len());
        out.push_str(&tail[..unassigned_len]);
        rest = &tail[unassigned_len..];
    }
}

fn in_table(table: &[(u32, u32)], c: char) -> bool {
    let cp = c as u32;
    table
        .binary_search_by(|&(start, end)| {
            if end < cp {
                std::cmp::Ordering::Less
            } else if start > cp {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

fn is_unassigned(c: char) -> bool {
    !c.is_ascii() && in_table(&unicode14::UNASSIGNED, c)
}

/// BERT's `_is_whitespace`: space, tab, newline, carriage return, or category Zs.
fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r') || (!c.is_ascii() && in_table(&unicode14::SPACE_SEPARATOR, c))
}

/// cn_clip's `_is_control`: categories Cc and Cf, except tab, newline and carriage return.
/// (Not the other C* categories: private-use and unassigned characters stay, and WordPiece
/// turns their words into `[UNK]`.)
fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && in_table(&unicode14::CONTROL, c)
}

/// BERT's `_is_punctuation`: all non-alphanumeric ASCII, and category P*.
fn is_punctuation(c: char) -> bool {
    matches!(c as u32, 33..=47 | 58..=64 | 91..=96 | 123..=126)
        || (!c.is_ascii() && in_table(&unicode14::PUNCTUATION, c))
}

/// BERT's `_is_chinese_char`: the CJK Unified Ideographs blocks (not Hangul, kana, …).
fn is_chinese_char(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(text: &str) -> Vec<i64> {
        Tokenizer::chinese().token_ids(text)
    }

    #[test]
    fn pikachu_matches_cn_clip_readme() {
        let mut expected = vec![101, 4649, 1305, 687, 102];
        expected.resize(52, 0);
        assert_eq!(Tokenizer::chinese().encode("皮卡丘", DEFAULT_CONTEXT_LENGTH).unwrap(), expected);
    }

    #[test]
    fn vocab_has_cn_clip_size_and_specials() {
        let t = Tokenizer::chinese();
        assert_eq!(t.vocab_size(), 21128);
        assert_eq!((t.pad, t.unk, t.cls, t.sep), (0, 100, 101, 102));
    }

    #[test]
    fn truncates_to_context_and_keeps_sep() {
        let row = Tokenizer::chinese().encode("一二三四五六七八九十", 6).unwrap();
        assert_eq!(row.len(), 6);
        assert_eq!(row[0], 101);
        assert_eq!(row[5], 102);
        assert_eq!(&row[1..5], &ids("一二三四")[..]);
    }

    #[test]
    fn empty_and_blank_texts_are_cls_sep() {
        for text in ["", "   \t\n", "\u{0}\u{fffd}"] {
            assert_eq!(&Tokenizer::chinese().encode(text, 4).unwrap(), &[101, 102, 0, 0], "{text:?}");
        }
    }

    #[test]
    fn context_length_below_two_is_an_error() {
        assert!(matches!(Tokenizer::chinese().encode("猫", 1), Err(Error::ContextLength(1))));
    }

    #[test]
    fn accents_case_and_punctuation_split_as_bert() {
        assert_eq!(ids("Café,OK"), ids("cafe , ok"));
        assert_eq!(ids("hello!!"), [ids("hello"), ids("!"), ids("!")].concat());
    }

    #[test]
    fn characters_newer_than_unicode_14_stay_unassigned() {
        // U+1B4F BALINESE PAMADA LINGSEMU is punctuation since Unicode 16; for cn_clip (Python
        // 3.11, Unicode 14) it is unassigned, so it joins its word and makes it [UNK].
        assert_eq!(ids("a\u{1b4f}b"), vec![100]);
        assert!(is_punctuation('。') && is_punctuation('!') && !is_punctuation('\u{1b4f}'));
        assert!(is_control('\u{200b}') && !is_control('\n') && !is_control('\u{f5bf}'));
    }

    #[test]
    fn over_long_words_become_unk() {
        assert_eq!(ids(&"a".repeat(201)), vec![100]);
        assert_ne!(ids(&"a".repeat(200)), vec![100]);
    }

    #[test]
    fn preprocess_lowercases_and_straightens_quotes() {
        assert_eq!(preprocess_text("“Hello” World"), "\"hello\" world");
    }
}

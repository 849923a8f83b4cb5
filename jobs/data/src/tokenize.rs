//! `cnclip tokenize`: `cn_clip.clip.tokenize` as a filter.
//!
//! Reads one text per line (LF or CRLF) from stdin and writes one JSON array of
//! `context_length` ids per line to stdout, in order. With `--preprocess` it first applies the
//! text normalisation cn_clip's eval and training datasets use (lower-case, curly quotes).

use std::io::{BufRead, BufWriter, Write};

use anyhow::{Context, Result};
use cnclip_operators::transforms::tokenizer::{DEFAULT_CONTEXT_LENGTH, Tokenizer, preprocess_text};

#[derive(clap::Args)]
pub struct Args {
    /// Sequence length, [CLS] and [SEP] included (cn_clip's --context-length).
    #[arg(long, default_value_t = DEFAULT_CONTEXT_LENGTH)]
    context_length: usize,
    /// Apply cn_clip's dataset text preprocessing (lower-case, “” → ") before tokenizing.
    #[arg(long)]
    preprocess: bool,
}

/// The longest context tokenized (2¹⁶): cn_clip's `tokenize()` takes any length, and every
/// model cnclip knows takes at most 512; past this bound a row alone is megabytes, and a
/// mistyped length (10⁸) would ask for gigabytes per line.
const MAX_CONTEXT_LENGTH: usize = 1 << 16;

pub fn run(args: Args) -> Result<()> {
    if args.context_length > MAX_CONTEXT_LENGTH {
        anyhow::bail!(
            "--context-length {}: at most {MAX_CONTEXT_LENGTH} (Chinese-CLIP's text towers take 512 at most)",
            args.context_length
        );
    }
    let tokenizer = Tokenizer::chinese();
    let stdin = std::io::stdin().lock();
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut row = vec![0i64; args.context_length];
    let mut line = Vec::new();
    let mut formatted = Vec::new();
    let mut reader = std::io::BufReader::with_capacity(1 << 16, stdin);
    let mut number = 0usize;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).context("reading stdin")? == 0 {
            break;
        }
        number += 1;
        let bytes = line.strip_suffix(b"\n").unwrap_or(&line);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let text = std::str::from_utf8(bytes).with_context(|| format!("stdin line {number} is not valid UTF-8"))?;
        let text = if args.preprocess { std::borrow::Cow::Owned(preprocess_text(text)) } else { text.into() };
        tokenizer.encode_into(&text, &mut row)?;
        formatted.clear();
        format_ids(&mut formatted, &row);
        out.write_all(&formatted)?;
    }
    out.flush()?;
    Ok(())
}

/// Appends `[id, id, …]\n` to `line`. Hand-rolled: `write!` per id dominated the profile.
fn format_ids(line: &mut Vec<u8>, ids: &[i64]) {
    line.push(b'[');
    for (i, &id) in ids.iter().enumerate() {
        if i > 0 {
            line.extend_from_slice(b", ");
        }
        push_decimal(line, id);
    }
    line.extend_from_slice(b"]\n");
}

fn push_decimal(out: &mut Vec<u8>, value: i64) {
    if value < 0 {
        out.push(b'-');
    }
    let mut n = value.unsigned_abs();
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_like_json_arrays() {
        let mut line: Vec<u8> = Vec::new();
        super::format_ids(&mut line, &[101, 0, -7, i64::MIN, 102]);
        let text = String::from_utf8(line).unwrap();
        assert_eq!(text, format!("[101, 0, -7, {}, 102]\n", i64::MIN));
    }
}

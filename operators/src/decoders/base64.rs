//! Base64 as cn_clip's data files use it: `base64.urlsafe_b64decode` in its datasets, while
//! tools in the wild write the standard alphabet, with or without padding. This decoder
//! accepts both alphabets (even mixed) and optional padding, and gives the bytes Python gives
//! for the padded form. Unlike Python it does not skip stray characters: a field with one is
//! an error naming the byte, so corrupt records are quarantined, not decoded into garbage.

use base64::Engine;
use base64::alphabet::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

const ENGINE: GeneralPurpose = GeneralPurpose::new(
    &STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Why a field is not base64 (a record's quarantine reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Base64Error {
    /// Byte `at` is in neither alphabet.
    #[error("byte {at} of the base64 field is {:?}, not base64", char::from(*.byte))]
    InvalidByte { at: usize, byte: u8 },
    /// `len` characters (without padding): one past a whole number of bytes.
    #[error("base64 field of {len} characters is truncated")]
    Truncated { len: usize },
    /// A tab in the field: the TSV line has more than its two fields.
    #[error("more than two tab-separated fields")]
    ExtraField,
    /// An empty field (no image).
    #[error("empty image value")]
    Empty,
    /// What else the decoder refuses.
    #[error("invalid base64: {0}")]
    Other(#[source] base64::DecodeError),
}

/// Decodes `field` into `out` (cleared first).
///
/// # Errors
/// The first invalid byte, or the bad length.
pub fn decode_into(field: &[u8], scratch: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), Base64Error> {
    scratch.clear();
    scratch.extend(field.iter().map(|&c| match c {
        b'-' => b'+',
        b'_' => b'/',
        c => c,
    }));
    out.clear();
    ENGINE.decode_vec(&scratch[..], out).map_err(|e| match e {
        base64::DecodeError::InvalidByte(at, byte) => Base64Error::InvalidByte { at, byte },
        base64::DecodeError::InvalidLength(len) => Base64Error::Truncated { len },
        other => Base64Error::Other(other),
    })
}

/// Decodes `field` into a new vector.
///
/// # Errors
/// As [`decode_into`].
pub fn decode(field: &[u8]) -> Result<Vec<u8>, Base64Error> {
    let mut out = Vec::with_capacity(field.len() / 4 * 3 + 3);
    decode_into(field, &mut Vec::with_capacity(field.len()), &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_alphabets_padded_or_not() {
        // b"\xfb\xff\xbf" is "+/+/" standard and "-_-_" URL-safe.
        for field in [&b"+/+/"[..], b"-_-_", b"-/+_"] {
            assert_eq!(decode(field).unwrap(), [0xfb, 0xff, 0xbf]);
        }
        assert_eq!(decode(b"aGk=").unwrap(), b"hi");
        assert_eq!(decode(b"aGk").unwrap(), b"hi");
        assert_eq!(decode(b"").unwrap(), b"");
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(decode(b"aG k").unwrap_err().to_string(), "byte 2 of the base64 field is ' ', not base64");
        assert!(decode(b"aGkxa").unwrap_err().to_string().contains("truncated"));
    }
}

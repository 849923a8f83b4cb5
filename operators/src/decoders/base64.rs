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

/// Decodes `field` into `out` (cleared first).
///
/// # Errors
/// A sentence naming the first invalid byte or the bad length.
pub fn decode_into(field: &[u8], scratch: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), String> {
    scratch.clear();
    scratch.extend(field.iter().map(|&c| match c {
        b'-' => b'+',
        b'_' => b'/',
        c => c,
    }));
    out.clear();
    ENGINE.decode_vec(&scratch[..], out).map_err(|e| match e {
        base64::DecodeError::InvalidByte(at, byte) => {
            format!("byte {at} of the base64 field is {:?}, not base64", byte as char)
        }
        base64::DecodeError::InvalidLength(n) => format!("base64 field of {n} characters is truncated"),
        other => format!("invalid base64: {other}"),
    })
}

/// Decodes `field` into a new vector.
///
/// # Errors
/// As [`decode_into`].
pub fn decode(field: &[u8]) -> Result<Vec<u8>, String> {
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
        assert_eq!(decode(b"aG k").unwrap_err(), "byte 2 of the base64 field is ' ', not base64");
        assert!(decode(b"aGkxa").unwrap_err().contains("truncated"));
    }
}

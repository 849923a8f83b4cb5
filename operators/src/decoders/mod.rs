//! Decoders: base64 fields to bytes, image bytes to pixels (`image`), and cn_clip's pickles
//! (`pickle`, a restricted reader that never executes code).

pub mod base64;
pub mod image;
pub mod pickle;

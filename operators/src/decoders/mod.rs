//! Decoders: base64 fields to bytes (images are decoded by `cnclip_models::preprocess`).

pub mod base64;

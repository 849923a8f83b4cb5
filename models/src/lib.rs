//! Chinese-CLIP in tch, numerically matching cn_clip 1.6.0 (`cn_clip/clip/model.py`).
//!
//! Vision towers (ViT-B/32 … ViT-H/14, ModifiedResNet-50), text towers (RoBERTa-wwm-ext base and
//! large, RBT3), the WordPiece tokenizer, image preprocessing and checkpoint IO live here; jobs
//! reach them through the library API that mirrors cn_clip's quick start.

pub mod checkpoint;
pub mod clip;
pub mod error;
pub mod tokenizer;

pub use clip::{Clip, ClipConfig, normalize};
pub use error::{Error, Result};
pub use tokenizer::{DEFAULT_CONTEXT_LENGTH, Tokenizer, preprocess_text};

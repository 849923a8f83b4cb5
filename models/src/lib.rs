//! Chinese-CLIP in tch, numerically matching cn_clip 1.6.0 (`cn_clip/clip/model.py`).
//!
//! Vision towers (ViT-B/32 … ViT-H/14, ModifiedResNet-50), text towers (RoBERTa-wwm-ext base and
//! large, RBT3), images to normalised tensors, and checkpoint IO live here; jobs reach them
//! through the library API that mirrors cn_clip's quick start. The parts without libtorch — the
//! WordPiece tokenizer, image decoding and resizing, the restricted pickle reader — live in
//! `cnclip_operators` (so the data commands link no libtorch) and are re-exported here.

pub mod checkpoint;
pub mod clip;
pub mod device;
pub mod encoders;
pub mod error;
pub mod preprocess;
pub mod retrieval;
pub mod training;
pub mod zeroshot;
/// cn_clip's tokenizer, which the data layer also uses (a pipeline `tokenize` node).
pub use cnclip_operators::transforms::tokenizer;

pub use clip::{Clip, ClipConfig, normalize};
pub use error::{Error, Result};
pub use tokenizer::{DEFAULT_CONTEXT_LENGTH, Tokenizer, preprocess_text};

pub use cnclip_operators::write_atomically;

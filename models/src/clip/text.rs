//! cn_clip's BERT text tower (`cn_clip/clip/modeling_bert.py`, `BertModel` without pooler):
//! word + position + token-type embeddings, post-LayerNorm encoder layers, and the text feature
//! `hidden[:, 0] @ text_projection` that `CLIP.encode_text` takes.
//!
//! The attention mask is cn_clip's: positions holding `[PAD]` get `-10000` added to their
//! scores (not `-inf`), passed to `scaled_dot_product_attention` as an additive float mask.

use tch::{Kind, Tensor, nn, nn::Module};

use super::config::TextConfig;
use super::layers::{LayerNorm, attention_heads, merge_heads, shallow_linear};

const LAYER_NORM_EPS: f64 = 1e-12;

#[derive(Debug, Clone, Copy)]
enum Activation {
    Gelu,
    GeluNew,
    Relu,
    Swish,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::GeluNew => x.gelu("tanh"),
            Activation::Relu => x.relu(),
            Activation::Swish => x * x.sigmoid(),
        }
    }
}

#[derive(Debug)]
struct BertLayer {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attention_output: nn::Linear,
    attention_norm: LayerNorm,
    intermediate: nn::Linear,
    output: nn::Linear,
    output_norm: LayerNorm,
    heads: i64,
    activation: Activation,
    hidden_dropout: f64,
    attention_dropout: f64,
}

impl BertLayer {
    /// The same layer on the same tensors (for a checkpointed closure to own).
    fn shallow_clone(&self) -> Self {
        BertLayer {
            query: shallow_linear(&self.query),
            key: shallow_linear(&self.key),
            value: shallow_linear(&self.value),
            attention_output: shallow_linear(&self.attention_output),
            attention_norm: self.attention_norm.shallow_clone(),
            intermediate: shallow_linear(&self.intermediate),
            output: shallow_linear(&self.output),
            output_norm: self.output_norm.shallow_clone(),
            heads: self.heads,
            activation: self.activation,
            hidden_dropout: self.hidden_dropout,
            attention_dropout: self.attention_dropout,
        }
    }

    fn new(p: &nn::Path<'_>, c: &TextConfig, activation: Activation) -> Self {
        let (hidden, inter) = (c.text_hidden_size, c.text_intermediate_size);
        let attention = p / "attention";
        let linear = |path: nn::Path<'_>, i, o| nn::linear(path, i, o, Default::default());
        BertLayer {
            query: linear(&attention / "self" / "query", hidden, hidden),
            key: linear(&attention / "self" / "key", hidden, hidden),
            value: linear(&attention / "self" / "value", hidden, hidden),
            attention_output: linear(&attention / "output" / "dense", hidden, hidden),
            attention_norm: LayerNorm::new(&attention / "output" / "LayerNorm", hidden, LAYER_NORM_EPS),
            intermediate: linear(p / "intermediate" / "dense", hidden, inter),
            output: linear(p / "output" / "dense", inter, hidden),
            output_norm: LayerNorm::new(p / "output" / "LayerNorm", hidden, LAYER_NORM_EPS),
            heads: c.text_num_attention_heads,
            activation,
            hidden_dropout: c.text_hidden_dropout_prob,
            attention_dropout: c.text_attention_probs_dropout_prob,
        }
    }

    /// `train` applies the config's dropout (attention probabilities, and each sub-layer's
    /// output before its residual LayerNorm, as `BertSelfOutput` / `BertOutput`).
    fn forward(&self, x: &Tensor, additive_mask: &Tensor, train: bool) -> Tensor {
        let q = attention_heads(&self.query.forward(x), self.heads);
        let k = attention_heads(&self.key.forward(x), self.heads);
        let v = attention_heads(&self.value.forward(x), self.heads);
        let p = if train { self.attention_dropout } else { 0.0 };
        let context = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(additive_mask), p, false, None, false);
        let out = self.attention_output.forward(&merge_heads(&context)).dropout(self.hidden_dropout, train);
        let attended = self.attention_norm.forward(&(out + x));
        let inter = self.activation.apply(&self.intermediate.forward(&attended));
        self.output_norm.forward(&(self.output.forward(&inter).dropout(self.hidden_dropout, train) + &attended))
    }
}

/// cn_clip's `BertModel` (as `CLIP.bert`).
#[derive(Debug)]
pub struct Bert {
    word_embeddings: nn::Embedding,
    position_embeddings: nn::Embedding,
    token_type_embeddings: nn::Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<BertLayer>,
    hidden_dropout: f64,
}

impl Bert {
    pub fn new(p: &nn::Path<'_>, c: &TextConfig) -> Self {
        let activation = match c.text_hidden_act.as_str() {
            "gelu_new" => Activation::GeluNew,
            "relu" => Activation::Relu,
            "swish" => Activation::Swish,
            _ => Activation::Gelu, // validated by ClipConfig::validate
        };
        let e = p / "embeddings";
        let hidden = c.text_hidden_size;
        let emb = |name: &str, n| nn::embedding(&e / name, n, hidden, Default::default());
        let layers = p / "encoder" / "layer";
        Bert {
            word_embeddings: emb("word_embeddings", c.vocab_size),
            position_embeddings: emb("position_embeddings", c.text_max_position_embeddings),
            token_type_embeddings: emb("token_type_embeddings", c.text_type_vocab_size),
            embeddings_norm: LayerNorm::new(&e / "LayerNorm", hidden, LAYER_NORM_EPS),
            layers: (0..c.text_num_hidden_layers).map(|i| BertLayer::new(&(&layers / i), c, activation)).collect(),
            hidden_dropout: c.text_hidden_dropout_prob,
        }
    }

    /// Last hidden states `[N, L, hidden]` of token ids `[N, L]`; `pad_id` positions are masked.
    /// `train` applies dropout as cn_clip's BERT in `train()` mode; `checkpointed` recomputes
    /// each layer in backward instead of keeping its activations (`--grad-checkpointing`).
    pub fn forward(&self, ids: &Tensor, pad_id: i64, train: bool, checkpointed: bool) -> Tensor {
        let (_, seq_len) = ids.size2().expect("[N, L] token ids");
        let kind = self.word_embeddings.ws.kind();
        let keep = ids.ne(pad_id).to_kind(kind);
        let additive_mask = ((keep.ones_like() - &keep) * -10000.0).unsqueeze(1).unsqueeze(2); // [N, 1, 1, L]
        let positions = Tensor::arange(seq_len, (Kind::Int64, ids.device())).unsqueeze(0);
        let embedded = self.word_embeddings.forward(ids)
            + self.position_embeddings.forward(&positions)
            + self.token_type_embeddings.forward(&ids.zeros_like());
        let mut x = self.embeddings_norm.forward(&embedded).dropout(self.hidden_dropout, train);
        for layer in &self.layers {
            x = match checkpointed {
                true => {
                    let (layer, mask) = (layer.shallow_clone(), additive_mask.shallow_clone());
                    super::layers::checkpointed(&x, move |x| layer.forward(x, &mask, train))
                }
                false => layer.forward(&x, &additive_mask, train),
            };
        }
        x
    }
}

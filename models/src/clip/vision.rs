//! cn_clip's `VisualTransformer` (ViT with class token, pre/post LayerNorm, QuickGELU MLPs,
//! output projection) — `cn_clip/clip/model.py`.
//!
//! Parameter paths are the checkpoint keys under `visual.` so that loading is a name match.
//! cn_clip runs sequence-first (`LND`) through `nn.MultiheadAttention`; we run batch-first and
//! split the same packed `in_proj_weight` into heads for `scaled_dot_product_attention`, which
//! is the same arithmetic and gives CUDA its fused kernels.

use tch::{Kind, Tensor, nn, nn::Module};

use super::layers::{LayerNorm, attention_heads, merge_heads, shallow_linear};

/// One `ResidualAttentionBlock`: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Debug)]
struct ResidualAttentionBlock {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
    ln_1: LayerNorm,
    c_fc: nn::Linear,
    c_proj: nn::Linear,
    ln_2: LayerNorm,
    heads: i64,
}

impl ResidualAttentionBlock {
    fn new(p: &nn::Path<'_>, width: i64, heads: i64) -> Self {
        let attn = p / "attn";
        let mlp = p / "mlp";
        ResidualAttentionBlock {
            in_proj_weight: attn.var("in_proj_weight", &[3 * width, width], nn::init::DEFAULT_KAIMING_UNIFORM),
            in_proj_bias: attn.zeros("in_proj_bias", &[3 * width]),
            out_proj: nn::linear(&attn / "out_proj", width, width, Default::default()),
            ln_1: LayerNorm::new(p / "ln_1", width, 1e-5),
            c_fc: nn::linear(&mlp / "c_fc", width, width * 4, Default::default()),
            c_proj: nn::linear(&mlp / "c_proj", width * 4, width, Default::default()),
            ln_2: LayerNorm::new(p / "ln_2", width, 1e-5),
            heads,
        }
    }

    /// The same block on the same tensors (for a checkpointed closure to own).
    fn shallow_clone(&self) -> Self {
        ResidualAttentionBlock {
            in_proj_weight: self.in_proj_weight.shallow_clone(),
            in_proj_bias: self.in_proj_bias.shallow_clone(),
            out_proj: shallow_linear(&self.out_proj),
            ln_1: self.ln_1.shallow_clone(),
            c_fc: shallow_linear(&self.c_fc),
            c_proj: shallow_linear(&self.c_proj),
            ln_2: self.ln_2.shallow_clone(),
            heads: self.heads,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.ln_1.forward(x);
        let qkv = h.linear(&self.in_proj_weight, Some(&self.in_proj_bias));
        let mut parts = qkv.chunk(3, -1).into_iter().map(|t| attention_heads(&t, self.heads));
        let (q, k, v) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let attended = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        let x = x + self.out_proj.forward(&merge_heads(&attended));
        let h = self.c_fc.forward(&self.ln_2.forward(&x));
        let h = &h * (&h * 1.702).sigmoid(); // QuickGELU
        &x + self.c_proj.forward(&h)
    }
}

/// cn_clip's `VisualTransformer`.
#[derive(Debug)]
pub struct VisualTransformer {
    conv1: nn::Conv2D,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    blocks: Vec<ResidualAttentionBlock>,
    ln_post: LayerNorm,
    proj: Tensor,
    pub input_resolution: i64,
}

impl VisualTransformer {
    pub fn new(
        p: &nn::Path<'_>,
        input_resolution: i64,
        patch_size: i64,
        width: i64,
        layers: i64,
        heads: i64,
        output_dim: i64,
    ) -> Self {
        let grid = input_resolution / patch_size;
        let scale = (width as f64).powf(-0.5);
        let conv = nn::ConvConfig { stride: patch_size, bias: false, ..Default::default() };
        let blocks_path = p / "transformer" / "resblocks";
        VisualTransformer {
            conv1: nn::conv2d(p / "conv1", 3, width, patch_size, conv),
            class_embedding: p.var("class_embedding", &[width], nn::Init::Randn { mean: 0.0, stdev: scale }),
            positional_embedding: p.var(
                "positional_embedding",
                &[grid * grid + 1, width],
                nn::Init::Randn { mean: 0.0, stdev: scale },
            ),
            ln_pre: LayerNorm::new(p / "ln_pre", width, 1e-5),
            blocks: (0..layers).map(|i| ResidualAttentionBlock::new(&(&blocks_path / i), width, heads)).collect(),
            ln_post: LayerNorm::new(p / "ln_post", width, 1e-5),
            proj: p.var("proj", &[width, output_dim], nn::Init::Randn { mean: 0.0, stdev: scale }),
            input_resolution,
        }
    }

    /// Image features `[N, output_dim]` (not normalised) of pixels `[N, 3, R, R]`.
    ///
    /// `mask_ratio > 0` applies FLIP's random patch masking (training only), keeping the class
    /// token and `int((L - 1) * (1 - mask_ratio))` random patches, as cn_clip does.
    /// `checkpointed` recomputes each residual block in backward instead of keeping its
    /// activations (`--grad-checkpointing`).
    pub fn forward(&self, pixels: &Tensor, mask_ratio: f64, checkpointed: bool) -> Tensor {
        let x = self.conv1.forward(&pixels.to_kind(self.proj.kind()));
        let (n, width) = (x.size()[0], x.size()[1]);
        let x = x.flatten(2, -1).transpose(1, 2); // [N, grid², width]
        let class = self.class_embedding.to_kind(x.kind()).view([1, 1, width]).expand([n, 1, width], true);
        let kind = x.kind();
        let mut x = Tensor::cat(&[class, x], 1) + self.positional_embedding.to_kind(kind);
        if mask_ratio > 0.0 {
            x = random_masking(&x, mask_ratio);
        }
        let mut x = self.ln_pre.forward(&x);
        for block in &self.blocks {
            x = match checkpointed {
                true => {
                    let block = block.shallow_clone();
                    super::layers::checkpointed(&x, move |x| block.forward(x))
                }
                false => block.forward(&x),
            };
        }
        self.ln_post.forward(&x.select(1, 0)).matmul(&self.proj)
    }
}

fn random_masking(x: &Tensor, mask_ratio: f64) -> Tensor {
    let (n, l, d) = x.size3().expect("[N, L, D] tokens");
    let keep = ((l - 1) as f64 * (1.0 - mask_ratio)) as i64;
    let noise = Tensor::rand([n, l - 1], (Kind::Float, x.device()));
    let ids_keep = noise.argsort(1, false).narrow(1, 0, keep) + 1;
    let kept = x.gather(1, &ids_keep.unsqueeze(-1).expand([n, keep, d], true), false);
    Tensor::cat(&[x.narrow(1, 0, 1), kept], 1)
}

//! Small pieces shared by the towers.

use tch::{Kind, Tensor, nn};

/// LayerNorm computed in fp32 whatever the input dtype, as cn_clip's `LayerNorm` subclass does
/// for the vision towers (so fp16 models normalise in full precision); BERT's plain
/// `nn.LayerNorm` uses this too with its own eps — in fp32 the two are the same.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new<'a>(p: impl std::borrow::Borrow<nn::Path<'a>>, dim: i64, eps: f64) -> Self {
        let p = p.borrow();
        LayerNorm { weight: p.var("weight", &[dim], nn::Init::Const(1.0)), bias: p.zeros("bias", &[dim]), eps, dim }
    }

    /// The same norm on the same tensors.
    pub fn shallow_clone(&self) -> Self {
        LayerNorm { weight: self.weight.shallow_clone(), bias: self.bias.shallow_clone(), eps: self.eps, dim: self.dim }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        x.to_kind(Kind::Float)
            .layer_norm(
                [self.dim],
                Some(&self.weight.to_kind(Kind::Float)),
                Some(&self.bias.to_kind(Kind::Float)),
                self.eps,
                false,
            )
            .to_kind(kind)
    }
}

/// The same linear layer on the same tensors.
pub fn shallow_linear(linear: &nn::Linear) -> nn::Linear {
    nn::Linear { ws: linear.ws.shallow_clone(), bs: linear.bs.as_ref().map(Tensor::shallow_clone) }
}

/// `f(x)` through torch's reentrant activation checkpointing (see
/// [`cnclip_torch_ext::checkpoint`]). A failure there is libtorch's, as a failing op's would be:
/// it panics as tch's ops do.
pub fn checkpointed(x: &Tensor, f: impl Fn(&Tensor) -> Tensor + Send + 'static) -> Tensor {
    cnclip_torch_ext::checkpoint::checkpoint(x, f).unwrap_or_else(|e| panic!("{e}"))
}

/// `[N, L, heads * d]` → `[N, heads, L, d]`.
pub fn attention_heads(x: &Tensor, heads: i64) -> Tensor {
    let (n, l, width) = x.size3().expect("[N, L, width]");
    x.view([n, l, heads, width / heads]).transpose(1, 2)
}

/// `[N, heads, L, d]` → `[N, L, heads * d]`.
pub fn merge_heads(x: &Tensor) -> Tensor {
    let (n, heads, l, d) = x.size4().expect("[N, heads, L, d]");
    x.transpose(1, 2).reshape([n, l, heads * d])
}

//! cn_clip's `ModifiedResNet` (`cn_clip/clip/model.py`, from OpenAI CLIP): a 3-convolution
//! stem with average pooling, anti-aliased strided Bottlenecks (avgpool before the stride), and
//! QKV attention pooling (`AttentionPool2d`) in place of global average pooling.
//!
//! BatchNorm uses its running statistics unless it trains (cn_clip's `train()` mode: batch
//! statistics, running statistics updated); a frozen vision tower keeps them in eval mode, as
//! cn_clip's `--freeze-vision` does. With `--use-bn-sync` on several ranks, the batch
//! statistics are those of the global batch, as torch's `SyncBatchNorm`: each layer sums its
//! batch and then its squared deviations over the ranks, through an all-reduce whose backward
//! sums the gradients over the ranks too.

use cnclip_torch_ext::c10d::ProcessGroup;
use tch::{Kind, Tensor, nn, nn::Module, nn::ModuleT};

use super::layers::{attention_heads, merge_heads};

fn conv(p: nn::Path<'_>, i: i64, o: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(p, i, o, k, nn::ConvConfig { stride, padding, bias: false, ..Default::default() })
}

/// torch's `BatchNorm2d` defaults, which cn_clip keeps.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

fn bn(p: nn::Path<'_>, n: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, n, nn::BatchNormConfig { eps: BN_EPS, momentum: BN_MOMENTUM, ..Default::default() })
}

/// How BatchNorm normalises in a forward pass.
#[derive(Clone, Copy)]
pub enum Norm<'a> {
    /// Running statistics (evaluation, a frozen tower).
    Running,
    /// This batch's statistics, running statistics updated (training).
    Batch,
    /// The statistics of the batch over all ranks of the group (`--use-bn-sync`).
    Synced(&'a ProcessGroup),
}

/// `bn` on `x` as `norm` says.
fn normalise(bn: &nn::BatchNorm, x: &Tensor, norm: Norm<'_>) -> Tensor {
    match norm {
        Norm::Running => bn.forward_t(x, false),
        Norm::Batch => bn.forward_t(x, true),
        Norm::Synced(group) => synced(bn, x, group),
    }
}

/// Batch normalisation over the ranks' global batch (torch's `SyncBatchNorm` in training): the
/// mean and the biased variance of each channel over every rank's `[N, C, H, W]`, in fp32; the
/// running statistics move by the momentum towards the mean and the unbiased variance.
///
/// # Panics
/// When a collective fails (a rank gone, the group's timeout), as a failing tch op does.
fn synced(bn: &nn::BatchNorm, x: &Tensor, group: &ProcessGroup) -> Tensor {
    let channels = x.size()[1];
    let dims: &[i64] = &[0, 2, 3];
    let x32 = x.to_kind(Kind::Float);
    let count = Tensor::from_slice(&[(x.numel() as i64 / channels) as f32]).to_device(x.device());
    let all = |t: &Tensor| group.all_reduce_sum_autograd(t).unwrap_or_else(|e| panic!("--use-bn-sync: {e}"));
    let sums = all(&Tensor::cat(&[x32.sum_dim_intlist(dims, false, Kind::Float), count], 0));
    let n = sums.narrow(0, channels, 1);
    let mean = sums.narrow(0, 0, channels) / &n;
    let centered = &x32 - mean.view([1, channels, 1, 1]);
    let var = all(&centered.square().sum_dim_intlist(dims, false, Kind::Float)) / &n;
    let mut y = &centered * (&var + BN_EPS).rsqrt().view([1, channels, 1, 1]);
    if let Some(w) = &bn.ws {
        y *= w.to_kind(Kind::Float).view([1, channels, 1, 1]);
    }
    if let Some(b) = &bn.bs {
        y += b.to_kind(Kind::Float).view([1, channels, 1, 1]);
    }
    tch::no_grad(|| {
        let momentum = BN_MOMENTUM;
        let total = n.double_value(&[0]);
        let unbiased = var.detach() * (total / (total - 1.0).max(1.0));
        let mut running_mean = bn.running_mean.shallow_clone();
        let mut running_var = bn.running_var.shallow_clone();
        running_mean.copy_(&(&running_mean * (1.0 - momentum) + mean.detach().to_kind(running_mean.kind()) * momentum));
        running_var.copy_(&(&running_var * (1.0 - momentum) + unbiased.to_kind(running_var.kind()) * momentum));
    });
    y.to_kind(x.kind())
}

fn avg_pool(x: &Tensor, k: i64) -> Tensor {
    x.avg_pool2d([k, k], [k, k], [0, 0], false, true, None)
}

#[derive(Debug)]
struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv3: nn::Conv2D,
    bn3: nn::BatchNorm,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
    stride: i64,
}

impl Bottleneck {
    const EXPANSION: i64 = 4;

    fn new(p: &nn::Path<'_>, inplanes: i64, planes: i64, stride: i64) -> Self {
        let out = planes * Self::EXPANSION;
        let downsample = (stride > 1 || inplanes != out)
            .then(|| (conv(p / "downsample" / "0", inplanes, out, 1, 1, 0), bn(p / "downsample" / "1", out)));
        Bottleneck {
            conv1: conv(p / "conv1", inplanes, planes, 1, 1, 0),
            bn1: bn(p / "bn1", planes),
            conv2: conv(p / "conv2", planes, planes, 3, 1, 1),
            bn2: bn(p / "bn2", planes),
            conv3: conv(p / "conv3", planes, out, 1, 1, 0),
            bn3: bn(p / "bn3", out),
            downsample,
            stride,
        }
    }

    fn forward(&self, x: &Tensor, norm: Norm<'_>) -> Tensor {
        // In-place ReLU and residual add, as cn_clip's `ReLU(inplace=True)` and `out += identity`:
        // fewer allocations on the largest activations of the model.
        let out = normalise(&self.bn1, &self.conv1.forward(x), norm).relu_();
        let mut out = normalise(&self.bn2, &self.conv2.forward(&out), norm).relu_();
        if self.stride > 1 {
            out = avg_pool(&out, self.stride);
        }
        let mut out = normalise(&self.bn3, &self.conv3.forward(&out), norm);
        let identity = match &self.downsample {
            Some((conv, bn)) => {
                let pooled = if self.stride > 1 { avg_pool(x, self.stride) } else { x.shallow_clone() };
                normalise(bn, &conv.forward(&pooled), norm)
            }
            None => x.shallow_clone(),
        };
        out += identity;
        out.relu_()
    }
}

/// `AttentionPool2d`: the mean token attends over all spatial tokens; its output is the feature.
#[derive(Debug)]
struct AttentionPool2d {
    positional_embedding: Tensor,
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    c_proj: nn::Linear,
    heads: i64,
}

impl AttentionPool2d {
    fn new(p: &nn::Path<'_>, spacial_dim: i64, embed_dim: i64, heads: i64, output_dim: i64) -> Self {
        let linear = |name: &str, o| nn::linear(p / name, embed_dim, o, Default::default());
        AttentionPool2d {
            positional_embedding: p.var(
                "positional_embedding",
                &[spacial_dim * spacial_dim + 1, embed_dim],
                nn::Init::Randn { mean: 0.0, stdev: (embed_dim as f64).powf(-0.5) },
            ),
            q_proj: linear("q_proj", embed_dim),
            k_proj: linear("k_proj", embed_dim),
            v_proj: linear("v_proj", embed_dim),
            c_proj: linear("c_proj", output_dim),
            heads,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x.flatten(2, -1).transpose(1, 2); // [N, HW, C]
        let kind = x.kind();
        let x = Tensor::cat(&[x.mean_dim(1, true, None), x], 1) + self.positional_embedding.to_kind(kind);
        // Only the first token's output is used, so only it needs to be a query.
        let q = attention_heads(&self.q_proj.forward(&x.narrow(1, 0, 1)), self.heads);
        let k = attention_heads(&self.k_proj.forward(&x), self.heads);
        let v = attention_heads(&self.v_proj.forward(&x), self.heads);
        let attended = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        self.c_proj.forward(&merge_heads(&attended)).squeeze_dim(1)
    }
}

/// cn_clip's `ModifiedResNet`.
#[derive(Debug)]
pub struct ModifiedResNet {
    stem: [(nn::Conv2D, nn::BatchNorm); 3],
    stages: Vec<Vec<Bottleneck>>,
    attnpool: AttentionPool2d,
    pub input_resolution: i64,
}

impl ModifiedResNet {
    pub fn new(
        p: &nn::Path<'_>,
        layers: [i64; 4],
        output_dim: i64,
        heads: i64,
        input_resolution: i64,
        width: i64,
    ) -> Self {
        let stem = [
            (conv(p / "conv1", 3, width / 2, 3, 2, 1), bn(p / "bn1", width / 2)),
            (conv(p / "conv2", width / 2, width / 2, 3, 1, 1), bn(p / "bn2", width / 2)),
            (conv(p / "conv3", width / 2, width, 3, 1, 1), bn(p / "bn3", width)),
        ];
        let mut inplanes = width;
        let stages = layers
            .iter()
            .enumerate()
            .map(|(i, &blocks)| {
                let planes = width << i;
                let stage = p / format!("layer{}", i + 1);
                (0..blocks)
                    .map(|b| {
                        let stride = if i > 0 && b == 0 { 2 } else { 1 };
                        let block = Bottleneck::new(&(&stage / b), inplanes, planes, stride);
                        inplanes = planes * Bottleneck::EXPANSION;
                        block
                    })
                    .collect()
            })
            .collect();
        ModifiedResNet {
            stem,
            stages,
            attnpool: AttentionPool2d::new(&(p / "attnpool"), input_resolution / 32, width * 32, heads, output_dim),
            input_resolution,
        }
    }

    /// Image features `[N, output_dim]` (not normalised) of pixels `[N, 3, R, R]`, BatchNorm
    /// normalising as `norm` says.
    pub fn forward(&self, pixels: &Tensor, norm: Norm<'_>) -> Tensor {
        let mut x = pixels.to_kind(self.stem[0].0.ws.kind());
        for (conv, bn) in &self.stem {
            x = normalise(bn, &conv.forward(&x), norm).relu_();
        }
        x = avg_pool(&x, 2);
        for block in self.stages.iter().flatten() {
            x = block.forward(&x, norm);
        }
        self.attnpool.forward(&x)
    }
}

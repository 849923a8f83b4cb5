//! cn_clip's `get_loss` for one rank: `logit_scale * image @ text.T`, cross-entropy in both
//! directions against the diagonal, averaged; plus the distillation term
//! (`cosineSimilarityLoss`) when a teacher is given.

use tch::{Kind, Tensor};

/// What one rank's loss sees.
pub struct LossInputs<'a> {
    /// Image features, L2-normalised, in the order this rank concatenates them.
    pub image: &'a Tensor,
    /// Text features, likewise.
    pub text: &'a Tensor,
    /// `exp(logit_scale)` of this rank's model.
    pub logit_scale: &'a Tensor,
    /// Features gathered across ranks (`logits_per_text = logits_per_image.T`) or local
    /// (`logit_scale * text @ image.T`), as cn_clip computes each case.
    pub aggregated: bool,
    /// Teacher image features (rows in the teacher's gathered order) and `--kd_loss_weight`.
    pub teacher: Option<(&'a Tensor, f64)>,
}

/// The loss, and image→text / text→image batch accuracy (fractions).
pub fn rank_loss(inputs: &LossInputs<'_>) -> (Tensor, (f64, f64)) {
    let logit_scale = inputs.logit_scale.mean(None);
    let logits_per_image = &logit_scale * inputs.image.matmul(&inputs.text.tr());
    let logits_per_text =
        if inputs.aggregated { logits_per_image.tr() } else { &logit_scale * inputs.text.matmul(&inputs.image.tr()) };
    let n = logits_per_image.size()[0];
    let truth = Tensor::arange(n, (Kind::Int64, logits_per_image.device()));
    let loss =
        (logits_per_image.cross_entropy_for_logits(&truth) + logits_per_text.cross_entropy_for_logits(&truth)) / 2.0;
    let accuracy = |logits: &Tensor| {
        tch::no_grad(|| logits.argmax(-1, false).eq_tensor(&truth).to_kind(Kind::Double).mean(None).double_value(&[]))
    };
    let acc = (accuracy(&logits_per_image), accuracy(&logits_per_text));
    match inputs.teacher {
        Some((teacher, weight)) => (&loss + cosine_similarity_loss(teacher, inputs.image) * weight, acc),
        None => (loss, acc),
    }
}

/// cn_clip's `cosineSimilarityLoss(teacher, student)`: the student's feature matrix resized
/// bilinearly (as an image, `align_corners=False`) to the teacher's shape, then one minus the
/// mean row cosine similarity.
pub fn cosine_similarity_loss(teacher: &Tensor, student: &Tensor) -> Tensor {
    let (rows, cols) = teacher.size2().expect("[N, D] teacher features");
    let resized = student
        .unsqueeze(0)
        .unsqueeze(0)
        .upsample_bilinear2d([rows, cols], false, None, None)
        .squeeze_dim(0)
        .squeeze_dim(0);
    let similarity = Tensor::cosine_similarity(teacher, &resized, 1, 1e-8);
    similarity.mean(None).neg() + 1.0
}

//! cn_clip's `cosine_lr`: linear warmup to `base_lr` over `warmup` steps, then a half cosine to
//! zero at `steps`, computed in f64 as numpy does.

/// The learning rate of (0-based) `step`.
pub fn cosine_lr(base_lr: f64, warmup: u64, steps: u64, step: u64) -> f64 {
    if step < warmup {
        base_lr * (step + 1) as f64 / warmup as f64
    } else {
        let e = (step - warmup) as f64;
        let es = steps as f64 - warmup as f64;
        0.5 * (1.0 + (std::f64::consts::PI * e / es).cos()) * base_lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_follows_the_cosine_to_zero() {
        assert_eq!(cosine_lr(1.0, 4, 10, 0), 0.25);
        assert_eq!(cosine_lr(1.0, 4, 10, 3), 1.0);
        assert_eq!(cosine_lr(1.0, 4, 10, 4), 1.0);
        assert!((cosine_lr(1.0, 4, 10, 7) - 0.5).abs() < 1e-12);
        assert!(cosine_lr(1.0, 4, 10, 10).abs() < 1e-12);
    }
}

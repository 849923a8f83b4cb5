//! Autocast per device type and the GradScaler kernel, through the shim.

use cnclip_torch_ext::amp::{AutocastDevice, autocast, unscale};
use tch::{Device, Kind, Tensor};

#[test]
fn cpu_autocast_runs_matmuls_in_bf16_and_losses_in_fp32_then_switches_off() {
    let a = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([16, 4], (Kind::Float, Device::Cpu));
    let (product, loss) = autocast(AutocastDevice::Cpu, Kind::BFloat16, || {
        let product = a.matmul(&b);
        let loss = product.mse_loss(&product.zeros_like(), tch::Reduction::Mean);
        (product, loss)
    })
    .unwrap();
    // As torch 2.11 under `torch.autocast("cpu", dtype=torch.bfloat16)`: matmul in bf16,
    // mse_loss on CPU autocast's fp32 list.
    assert_eq!(product.kind(), Kind::BFloat16);
    assert_eq!(loss.kind(), Kind::Float);
    let expected = a.to_kind(Kind::BFloat16).matmul(&b.to_kind(Kind::BFloat16));
    assert!(product.equal(&expected));
    // Off again afterwards, nested or not.
    assert_eq!(a.matmul(&b).kind(), Kind::Float);
    let inner = autocast(AutocastDevice::Cpu, Kind::BFloat16, || {
        autocast(AutocastDevice::Cpu, Kind::BFloat16, || a.matmul(&b).kind()).unwrap()
    })
    .unwrap();
    assert_eq!(inner, Kind::BFloat16);
    assert_eq!(a.matmul(&b).kind(), Kind::Float);
}

#[test]
fn unscale_multiplies_by_the_inverse_scale_and_flags_an_inf() {
    let opts = (Kind::Float, Device::Cpu);
    let g1 = Tensor::from_slice(&[2.0f32, 4.0, -8.0]);
    let g2 = Tensor::from_slice(&[1024.0f32]);
    let found = Tensor::zeros([1], opts);
    let inv = Tensor::from_slice(&[0.5f32]);
    unscale(&[&g1, &g2], &found, &inv).unwrap();
    assert_eq!(Vec::<f32>::try_from(&g1).unwrap(), [1.0, 2.0, -4.0]);
    assert_eq!(Vec::<f32>::try_from(&g2).unwrap(), [512.0]);
    assert_eq!(found.double_value(&[0]), 0.0);
    let bad = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
    unscale(&[&g1, &bad], &found, &inv).unwrap();
    assert_eq!(found.double_value(&[0]), 1.0);
    let nan = Tensor::from_slice(&[f32::NAN]);
    let found = Tensor::zeros([1], opts);
    unscale(&[&nan], &found, &inv).unwrap();
    assert_eq!(found.double_value(&[0]), 1.0);
}

#[test]
fn a_wrong_dtype_is_an_error_not_a_crash() {
    let error = autocast(AutocastDevice::Cpu, Kind::Int64, || ()).unwrap_err();
    assert!(error.to_string().contains("not an autocast dtype"), "{error}");
    let g = Tensor::from_slice(&[1.0f32]);
    let error =
        unscale(&[&g], &Tensor::zeros([2], (Kind::Float, Device::Cpu)), &Tensor::from_slice(&[1.0f64])).unwrap_err();
    assert!(error.to_string().starts_with("unscaling gradients: "), "{error}");
}

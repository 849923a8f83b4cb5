//! Activation checkpointing: the gradients (of the input and of the parameters the function
//! uses) equal those of the plain run, dropout included; the function runs once forward and
//! once more in backward; a panic in the function is an error, not an abort.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cnclip_torch_ext::checkpoint::checkpoint;
use tch::{Kind, Tensor};

fn f(x: &Tensor, w: &Tensor) -> Tensor {
    (x.matmul(w).sin().dropout(0.5, true) * 3.0).matmul(w).tanh()
}

#[test]
fn gradients_equal_the_plain_run_and_dropout_repeats() {
    tch::manual_seed(0);
    let w = Tensor::randn([8, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let x0 = Tensor::randn([4, 8], (Kind::Float, tch::Device::Cpu));
    let grads = |checkpointed: bool| -> (Tensor, Tensor, Tensor) {
        let _ = w.grad().defined().then(|| w.grad().zero_());
        let x = x0.copy().set_requires_grad(true);
        let h = &x * 2.0; // not a leaf: the node's input has a history
        tch::manual_seed(5);
        let y = if checkpointed {
            let calls = Arc::new(AtomicUsize::new(0));
            let (w2, seen) = (w.shallow_clone(), Arc::clone(&calls));
            let y = checkpoint(&h, move |x| {
                seen.fetch_add(1, Ordering::SeqCst);
                f(x, &w2)
            })
            .unwrap();
            assert_eq!(calls.load(Ordering::SeqCst), 1, "one forward run");
            y.sum(None).backward();
            assert_eq!(calls.load(Ordering::SeqCst), 2, "recomputed once in backward");
            y
        } else {
            let y = f(&h, &w);
            y.sum(None).backward();
            y
        };
        (y.detach(), x.grad().copy(), w.grad().copy())
    };
    let (y0, gx0, gw0) = grads(false);
    let (y1, gx1, gw1) = grads(true);
    assert!(y0.equal(&y1), "the output");
    assert!(gx0.allclose(&gx1, 1e-6, 1e-7, false), "the input's gradient");
    assert!(gw0.allclose(&gw1, 1e-6, 1e-7, false), "the parameter's gradient");
}

#[test]
fn without_gradients_it_runs_once_and_records_nothing() {
    let x = Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let y = tch::no_grad(|| checkpoint(&x, |x| x * 2.0).unwrap());
    assert!(!y.requires_grad());
    assert_eq!(y.sum(None).double_value(&[]), 8.0);
}

#[test]
fn a_panicking_function_is_an_error() {
    let x = Tensor::ones([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let h = &x * 1.0;
    let error = checkpoint(&h, |_| panic!("no such block")).unwrap_err();
    assert!(error.to_string().contains("no such block"), "{error}");
}

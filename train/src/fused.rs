//! libtorch's fused multi-tensor AdamW and its TF32 switches, through `shim/optim.cpp`
//! (tch binds neither). The fused update is what `torch.optim.AdamW(fused=True)` runs:
//! a few kernel launches for every parameter together instead of a dozen per tensor,
//! and no host round trip.
use std::ffi::{c_char, c_int, c_void, CStr};

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// The scalars of one AdamW update (PyTorch's names).
pub struct AdamWScalars {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One AdamW update of `params` from `grads`, with the moments `exp_avgs` and
/// `exp_avg_sqs`, `step` being the update's number counted from 1. Every list has one
/// tensor per parameter; the tensors of a list share a device and a kind.
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    step: i64,
    k: &AdamWScalars,
) -> Result<()> {
    let n = params.len();
    if grads.len() != n || exp_avgs.len() != n || exp_avg_sqs.len() != n {
        bail!(
            "fused AdamW: {n} parameters but {} gradients, {} first and {} second moments",
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len()
        );
    }
    if step < 1 {
        bail!("fused AdamW: update {step}; updates count from 1");
    }
    let Some(first) = params.first() else {
        return Ok(());
    };
    let undefined = |ts: &[Tensor]| ts.iter().position(|t| !t.defined());
    for (what, ts) in [
        ("parameter", params),
        ("gradient", grads),
        ("first moment", exp_avgs),
        ("second moment", exp_avg_sqs),
    ] {
        if let Some(i) = undefined(ts) {
            bail!("fused AdamW: {what} {i} is an undefined tensor");
        }
    }
    // libtorch's CPU kernel walks every list by the parameter's element count, contiguous,
    // without checking the others: anything else is refused here, before any memory is
    // touched.
    for (i, p) in params.iter().enumerate() {
        for (what, t) in [
            ("gradient", &grads[i]),
            ("first moment", &exp_avgs[i]),
            ("second moment", &exp_avg_sqs[i]),
        ] {
            if !t.is_contiguous()
                || !p.is_contiguous()
                || t.size() != p.size()
                || t.kind() != p.kind()
                || t.device() != first.device()
                || p.device() != first.device()
            {
                bail!(
                    "fused AdamW: parameter {i} is {:?} {:?} on {:?}, its {what} {:?} {:?} on {:?} (the first parameter's device: {:?}; every tensor contiguous)",
                    p.kind(), p.size(), p.device(), t.kind(), t.size(), t.device(), first.device()
                );
            }
        }
    }
    // The kernel reads the step from a float tensor on the parameters' device.
    let step = Tensor::full([], step as f64, (Kind::Float, first.device()));
    let ptrs = |ts: &[Tensor]| {
        ts.iter()
            .map(|t| t.as_ptr().cast::<c_void>())
            .collect::<Vec<_>>()
    };
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    // SAFETY: each pointer is a live tensor of the slices above, which outlive the call;
    // the shim copies the tensor handles (reference counts) and returns.
    let message = unsafe {
        gpt2kit_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            step.as_ptr().cast(),
            k.lr,
            k.beta1,
            k.beta2,
            k.weight_decay,
            k.eps,
        )
    };
    check(message, "fused AdamW")
}

/// Lets (or forbids) CUDA's float32 matrix products and convolutions use TF32, as
/// `torch.backends.cuda.matmul.allow_tf32` and `torch.backends.cudnn.allow_tf32` do.
/// A process-wide libtorch setting; nothing on the CPU reads it.
pub fn set_tf32(on: bool) -> Result<()> {
    // SAFETY: no arguments; the shim catches every exception.
    check(unsafe { gpt2kit_set_tf32(c_int::from(on)) }, "setting TF32")
}

/// Whether CUDA's float32 matrix products may use TF32 now.
pub fn tf32() -> Result<bool> {
    // SAFETY: no arguments; the shim catches every exception.
    match unsafe { gpt2kit_tf32() } {
        -1 => bail!("libtorch could not say whether TF32 is allowed"),
        on => Ok(on == 1),
    }
}

/// Runs `f` with libtorch's autocast on for `device`'s type in bf16, as
/// `torch.autocast(device_type, dtype=torch.bfloat16)` does for transformers' `bf16=True`:
/// matrix products and attention in bf16 over f32 weights (each weight cast once per
/// region), layer norms, softmax and the loss in f32. Only forward work belongs inside.
pub fn autocast_bf16<T>(device: tch::Device, f: impl FnOnce() -> T) -> Result<T> {
    let ty: c_int = match device {
        tch::Device::Cpu => 0,     // c10::DeviceType::CPU
        tch::Device::Cuda(_) => 1, // c10::DeviceType::CUDA
        other => bail!("bf16 autocast runs on the CPU and CUDA, not {other:?}"),
    };
    let (mut enabled, mut dtype) = (0, 0);
    // SAFETY: two out-parameters; the shim catches every exception.
    check(
        unsafe { gpt2kit_autocast_enter(ty, &mut enabled, &mut dtype) },
        "entering autocast",
    )?;
    struct Exit(c_int, c_int, c_int);
    impl Drop for Exit {
        fn drop(&mut self) {
            // SAFETY: restores what `enter` saved; the shim catches every exception.
            unsafe { gpt2kit_autocast_exit(self.0, self.1, self.2) };
        }
    }
    let _exit = Exit(ty, enabled, dtype);
    Ok(f())
}

fn check(message: *const c_char, what: &str) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is a NUL-terminated string the shim keeps until this
    // thread's next call into it.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    bail!("{what}: {text}")
}

// shim/optim.cpp, compiled by build.rs.
extern "C" {
    fn gpt2kit_fused_adamw(
        params: *const *const c_void,
        grads: *const *const c_void,
        exp_avgs: *const *const c_void,
        exp_avg_sqs: *const *const c_void,
        n: usize,
        step: *const c_void,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *const c_char;
    fn gpt2kit_set_tf32(on: c_int) -> *const c_char;
    fn gpt2kit_autocast_enter(
        device_type: c_int,
        was_enabled: *mut c_int,
        was_dtype: *mut c_int,
    ) -> *const c_char;
    fn gpt2kit_autocast_exit(
        device_type: c_int,
        was_enabled: c_int,
        was_dtype: c_int,
    ) -> *const c_char;
    fn gpt2kit_tf32() -> c_int;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn tf32_switch_reaches_libtorch() {
        let was = tf32().unwrap();
        for on in [!was, was] {
            set_tf32(on).unwrap();
            assert_eq!(tf32().unwrap(), on);
        }
    }

    /// Inside: products in bf16 over f32 inputs, layer norm in f32; after: f32 again.
    #[test]
    fn autocast_casts_products_only_and_ends() {
        let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
        let (mm, ln) = autocast_bf16(Device::Cpu, || {
            let ln = x.layer_norm([8], None::<&Tensor>, None::<&Tensor>, 1e-5, false);
            (x.mm(&w).kind(), ln.kind())
        })
        .unwrap();
        assert_eq!((mm, ln), (Kind::BFloat16, Kind::Float));
        assert_eq!(x.mm(&w).kind(), Kind::Float);
    }

    /// libtorch's refusals come back as errors (a C++ exception never reaches Rust).
    #[test]
    fn refusals_are_errors() {
        let k = AdamWScalars {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.0,
            eps: 1e-8,
        };
        let f = |kind| Tensor::zeros([4], (kind, Device::Cpu));
        let (p, m, v) = (f(Kind::Float), f(Kind::Float), f(Kind::Float));
        let e = fused_adamw(&[p.copy()], &[], &[m.copy()], &[v.copy()], 1, &k).unwrap_err();
        assert!(
            e.to_string().contains("1 parameters but 0 gradients"),
            "{e}"
        );
        let short = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let e = fused_adamw(&[p.copy()], &[short], &[m.copy()], &[v.copy()], 1, &k).unwrap_err();
        assert!(e.to_string().starts_with("fused AdamW: "), "{e}");
        let wide = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
        let strided = wide.select(1, 0);
        let e = fused_adamw(
            &[strided],
            &[f(Kind::Float)],
            &[m.copy()],
            &[v.copy()],
            1,
            &k,
        );
        assert!(e.is_err());
        // A kind the kernel has no code for: libtorch's own exception, as an error.
        let i = || Tensor::zeros([4], (Kind::Int64, Device::Cpu));
        let e = fused_adamw(&[i()], &[i()], &[i()], &[i()], 1, &k).unwrap_err();
        assert!(e.to_string().starts_with("fused AdamW: "), "{e}");
        let e = fused_adamw(
            &[p.copy()],
            &[f(Kind::Float)],
            &[m.copy()],
            &[v.copy()],
            0,
            &k,
        );
        assert!(e.unwrap_err().to_string().contains("count from 1"));
        let e = fused_adamw(
            &[p.copy()],
            &[Tensor::new()],
            &[m.copy()],
            &[v.copy()],
            1,
            &k,
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("gradient 0 is an undefined"));
        let ok = fused_adamw(&[p.copy()], &[f(Kind::Float)], &[m], &[v], 1, &k);
        assert!(ok.is_ok(), "{ok:?}");
    }
}

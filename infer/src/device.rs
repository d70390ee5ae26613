//! Parsing `--device` and `--dtype` values, checked against what this libtorch offers.
use tch::{Cuda, Device, Kind};

use crate::error::{Error, Result};

/// `cpu`, `cuda` (device 0), `cuda:N` or `mps`; the device must exist in this build and
/// on this machine, so that no command reaches libtorch with one that is not there.
pub fn parse_device(s: &str) -> Result<Device> {
    let bad = |why: String| Error::Input(format!("--device {s:?}: {why}"));
    let device = match s {
        "cpu" => Device::Cpu,
        "mps" => Device::Mps,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:") {
            Some(n) => Device::Cuda(
                n.parse::<usize>()
                    .map_err(|_| bad("expected cuda:N with N a device index".into()))?,
            ),
            None => return Err(bad("expected cpu, cuda, cuda:N or mps".into())),
        },
    };
    if device == Device::Mps && !tch::utils::has_mps() {
        return Err(bad(
            "MPS (Apple GPU) is not available on this machine (or this libtorch build)".into(),
        ));
    }
    if let Device::Cuda(i) = device {
        let n = Cuda::device_count() as usize;
        if n == 0 {
            return Err(bad(
                "CUDA is not available on this machine (or this libtorch build)".into(),
            ));
        }
        if i >= n {
            return Err(bad(format!(
                "this machine has {n} CUDA device(s), cuda:0..cuda:{}",
                n - 1
            )));
        }
    }
    Ok(device)
}

/// `f32`/`float32`, `f16`/`float16`, `bf16`/`bfloat16`; `auto` (the checkpoint's own) is `None`.
pub fn parse_dtype(s: &str) -> Result<Option<Kind>> {
    Ok(Some(match s {
        "auto" => return Ok(None),
        "f32" | "float32" | "fp32" => Kind::Float,
        "f16" | "float16" | "fp16" | "half" => Kind::Half,
        "bf16" | "bfloat16" => Kind::BFloat16,
        _ => {
            return Err(Error::Input(format!(
                "--dtype {s:?}: expected f32, f16, bf16 or auto"
            )))
        }
    }))
}

pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::Half => "f16",
        Kind::BFloat16 => "bf16",
        _ => "other",
    }
}

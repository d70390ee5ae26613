//! Parsing `--device` and `--dtype` values, checked against what this libtorch offers;
//! and libtorch's CUDA library, loaded only by runs that ask for a CUDA device.
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tch::{Cuda, Device, Kind, Tensor};

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
        let n = cuda_device_count().map_err(|why| bad(format!("CUDA is not available: {why}")))?;
        if n == 0 {
            return Err(bad(format!(
                "CUDA is not available on this machine: {}",
                why_no_cuda_device()
            )));
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

/// The CUDA devices this machine has, libtorch's CUDA library loaded first (`load_cuda`);
/// an error says why that library cannot be loaded.
pub fn cuda_device_count() -> std::result::Result<usize, String> {
    load_cuda()?;
    Ok(Cuda::device_count().max(0) as usize)
}

/// What libtorch says when a tensor is made on a CUDA device that is not there (e.g.
/// "Found no NVIDIA driver on your system").
fn why_no_cuda_device() -> String {
    match Tensor::f_zeros([1], (Kind::Float, Device::Cuda(0))) {
        Ok(_) => "no device counted".into(),
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            let first = first.trim();
            let first = first
                .strip_prefix("Internal torch error: ")
                .unwrap_or(first);
            first.chars().take(300).collect()
        }
    }
}

/// Loads `libtorch_cuda.so` (with the CUDA runtime libraries it needs) from the folder of
/// the `libtorch_cpu.so` this process runs, once. The `gpt2kit` binary does not link it:
/// loading it, cuBLAS, cuDNN and the rest costs every process ~350 MB of memory and a
/// few tenths of a second, which a CPU run never uses. Its static initialisers register
/// libtorch's CUDA backend when it is loaded; libtorch caches whether CUDA is there the
/// first time it is asked, so this runs before anything asks (`parse_device` and
/// `cuda_device_count` call it first). A process that links it already (the engine's
/// test binaries) finds it loaded. Errors name the file and the loader's reason.
pub fn load_cuda() -> std::result::Result<(), String> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let dir = torch_lib_dir().ok_or_else(|| {
                "libtorch_cpu.so is not among this process's libraries".to_string()
            })?;
            let lib = dir.join("libtorch_cuda.so");
            if !lib.exists() {
                return Err(format!(
                    "this libtorch has no CUDA library ({} does not exist)",
                    lib.display()
                ));
            }
            dlopen_global(&lib)
        })
        .clone()
}

/// The folder of the `libtorch_cpu.so` mapped into this process (from /proc/self/maps).
fn torch_lib_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
}

fn dlopen_global(lib: &Path) -> std::result::Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let name = CString::new(lib.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path; the handle is kept for the life of the process
    // (never closed: libtorch's registries hold pointers into the library).
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        return Err(format!("loading {}: {}", lib.display(), dl_error()));
    }
    Ok(())
}

/// The dynamic loader's last error on this thread.
pub(crate) fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated message owned by libc.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".to_string()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

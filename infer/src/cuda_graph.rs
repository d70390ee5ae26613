//! CUDA graphs: work recorded once and replayed with one launch (`model::graphed`
//! captures its fixed-shape decode step). libtorch's `at::cuda::CUDAGraph` lives in
//! `libtorch_cuda.so`, which CPU runs never load, so the C++ side (`shim/cuda_graph.cpp`)
//! is a shared object of its own, embedded in this crate at build time and opened from
//! memory (`memfd_create`) the first time a graph is made, after `device::load_cuda`.
//! A build without the CUDA headers (see `build.rs`) has none, and says so.
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use tch::Device;

use crate::error::{Error, Result};

type NewFn = unsafe extern "C" fn(c_int, *mut *mut c_void) -> *const c_char;
type GraphFn = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type FreeFn = unsafe extern "C" fn(*mut c_void);

/// The plugin's entry points.
struct Plugin {
    new: NewFn,
    begin: GraphFn,
    end: GraphFn,
    replay: GraphFn,
    free: FreeFn,
}

/// A captured piece of device work.
pub struct CudaGraph {
    raw: *mut c_void,
    plugin: &'static Plugin,
}

// SAFETY: the graph is an owned C++ object, used through `&self` for replays only
// (libtorch's CUDAGraph::replay takes no lock but mutates nothing shared), and freed once.
unsafe impl Send for CudaGraph {}
unsafe impl Sync for CudaGraph {}

impl CudaGraph {
    /// Records what `work` launches on CUDA device `device` (a side stream is current
    /// meanwhile; nothing runs); returns the graph and what `work` returned (tensors in
    /// the graph's memory, rewritten by every replay).
    pub fn capture<T>(device: Device, work: impl FnOnce() -> T) -> Result<(Self, T)> {
        let Device::Cuda(index) = device else {
            return Err(Error::Input(format!(
                "CUDA graphs run on CUDA devices, not {device:?}"
            )));
        };
        let plugin = plugin()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` receives an owned graph on success.
        check(
            unsafe { (plugin.new)(index as c_int, &mut raw) },
            "making a CUDA graph",
        )?;
        let graph = CudaGraph { raw, plugin };
        // SAFETY: a live graph.
        check(
            unsafe { (plugin.begin)(graph.raw) },
            "starting a CUDA graph capture",
        )?;
        // The capture ends however `work` does (a panic would otherwise leave the
        // device's stream recording for good).
        struct Ending<'a>(&'a CudaGraph, bool);
        impl Drop for Ending<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    // SAFETY: a live graph whose capture began.
                    unsafe { (self.0.plugin.end)(self.0.raw) };
                }
            }
        }
        let mut ending = Ending(&graph, false);
        // An op that cannot be recorded (one that waits on the host) fails inside
        // libtorch: an error here, the capture ended.
        let out = crate::panics::caught(work);
        let out = match out {
            Ok(out) => out,
            Err(why) => {
                drop(ending);
                return Err(Error::Torch(tch::TchError::Torch(format!(
                    "capturing a CUDA graph: {why}"
                ))));
            }
        };
        ending.1 = true;
        drop(ending);
        // SAFETY: a live graph whose capture began.
        check(
            unsafe { (plugin.end)(graph.raw) },
            "ending a CUDA graph capture",
        )?;
        Ok((graph, out))
    }

    /// Runs the recorded work again, on the current stream.
    pub fn replay(&self) -> Result<()> {
        // SAFETY: a live, captured graph.
        check(
            unsafe { (self.plugin.replay)(self.raw) },
            "replaying a CUDA graph",
        )
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: owned, freed once.
        unsafe { (self.plugin.free)(self.raw) }
    }
}

/// Says once on stderr that decode steps run uncaptured from now on, and why.
pub(crate) fn note_failure(e: &Error) {
    static SAID: OnceLock<()> = OnceLock::new();
    note_once(&SAID, || {
        format!("CUDA graphs are off for this run, decode steps run uncaptured: {e}")
    });
}

/// Says once on stderr that `--cuda-graphs on` does not apply to `what`.
pub(crate) fn note_unused(what: &str) {
    static SAID: OnceLock<()> = OnceLock::new();
    note_once(&SAID, || {
        format!("--cuda-graphs on does not apply to {what}: decode steps run as without it")
    });
}

/// A note on stderr, the first time `said` is reached (a closed stderr loses it).
fn note_once(said: &OnceLock<()>, text: impl FnOnce() -> String) {
    said.get_or_init(|| {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "note: {}", text());
    });
}

fn check(message: *const c_char, what: &str) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is a NUL-terminated string the plugin keeps until this
    // thread's next call into it.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    Err(Error::Torch(tch::TchError::Torch(format!(
        "{what}: {text}"
    ))))
}

/// Whether this build carries the CUDA graph plugin.
pub fn available() -> bool {
    cfg!(gpt2kit_cuda_graphs)
}

/// The plugin, opened once (after libtorch's CUDA library).
fn plugin() -> Result<&'static Plugin> {
    static PLUGIN: OnceLock<std::result::Result<Plugin, String>> = OnceLock::new();
    PLUGIN
        .get_or_init(open)
        .as_ref()
        .map_err(|e| Error::Input(format!("CUDA graphs: {e}")))
}

#[cfg(not(gpt2kit_cuda_graphs))]
fn open() -> std::result::Result<Plugin, String> {
    Err(
        "this build has no CUDA graph support (it was built without the CUDA headers; \
         `make setup` provides them)"
            .into(),
    )
}

#[cfg(gpt2kit_cuda_graphs)]
fn open() -> std::result::Result<Plugin, String> {
    static BYTES: &[u8] = include_bytes!(env!("GPT2KIT_CUDA_GRAPH_PLUGIN"));
    crate::device::load_cuda()?;
    // SAFETY: a plain memfd, written whole, then opened by the loader through /proc.
    let handle = unsafe {
        let fd = libc::memfd_create(c"gpt2kit-cuda-graph".as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        let mut written = 0;
        while written < BYTES.len() {
            let n = libc::write(fd, BYTES[written..].as_ptr().cast(), BYTES.len() - written);
            if n <= 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(format!("writing the CUDA graph plugin: {e}"));
            }
            written += n as usize;
        }
        let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
        let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        libc::close(fd);
        handle
    };
    if handle.is_null() {
        let why = crate::device::dl_error();
        return Err(format!("loading the CUDA graph plugin: {why}"));
    }
    let sym = |name: &CStr| {
        // SAFETY: a live handle (never closed) and a NUL-terminated name.
        let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
        match p.is_null() {
            true => Err(format!(
                "the CUDA graph plugin lacks {}",
                name.to_string_lossy()
            )),
            false => Ok(p),
        }
    };
    // SAFETY: each symbol is the shim's function of that signature (shim/cuda_graph.cpp).
    unsafe {
        Ok(Plugin {
            new: std::mem::transmute::<*mut c_void, NewFn>(sym(c"gpt2kit_graph_new")?),
            begin: std::mem::transmute::<*mut c_void, GraphFn>(sym(c"gpt2kit_graph_begin")?),
            end: std::mem::transmute::<*mut c_void, GraphFn>(sym(c"gpt2kit_graph_end")?),
            replay: std::mem::transmute::<*mut c_void, GraphFn>(sym(c"gpt2kit_graph_replay")?),
            free: std::mem::transmute::<*mut c_void, FreeFn>(sym(c"gpt2kit_graph_free")?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU the plugin still loads beside libtorch's CUDA library (its symbols
    /// resolve), and making a graph fails with libtorch's reason, not a crash.
    #[test]
    fn without_a_gpu_capture_is_a_clean_error() {
        let e = CudaGraph::capture(Device::Cpu, || ())
            .err()
            .expect("not on the CPU");
        assert!(e.to_string().contains("CUDA devices"), "{e}");
        if !available() || crate::device::cuda_device_count().is_ok_and(|n| n > 0) {
            return;
        }
        assert!(plugin().is_ok(), "{:?}", plugin().err());
        let e = CudaGraph::capture(Device::Cuda(0), || ())
            .err()
            .expect("no GPU here");
        assert!(e.to_string().contains("CUDA graph"), "{e}");
    }
}

//! How the engine runs a model: switches the caller (the CLI) builds once, from its flags
//! and environment, and passes to model loading. The library reads no environment.
use crate::error::{Error, Result};
use crate::kernels::ThreadPool;
use crate::packed::PackedCache;

/// The engine's switches. The default runs everything the machine allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// CPU models in f32, bf16 or int8 get the decode kernels (weights repacked at load).
    /// Off: libtorch everywhere, for comparison.
    pub kernels: bool,
    /// Decode steps on the kernels run fused, with no libtorch op between the products
    /// (`decode`). Off: libtorch between the kernels, for comparison.
    pub fused_decode: bool,
    /// Threads of the kernels' pool (`None`: one per available core). The pool is the
    /// process's: the first model loaded sizes it.
    pub kernel_threads: Option<usize>,
    /// Weights whose stored dtype is the run's are used in place from a private memory
    /// map of the file (`mapped`), not copied. Off: every tensor is copied out.
    pub map_weights: bool,
    /// Where the kernels' packed layout is kept between runs (`packed`): off in the
    /// library, `Auto` from the CLI.
    pub packed_cache: PackedCache,
    /// A missing packed file is not written at load (the model is packed in memory as
    /// usual); `Gpt2::packed_file_wanted` then says so, for the caller to build it later
    /// (the CLI's `infer` does, in a detached process). Off: written at load.
    pub packed_write_later: bool,
    /// Decode steps through the fixed-shape step, captured and replayed as CUDA graphs
    /// on CUDA (`model::graphed`); elsewhere it runs uncaptured. Off: the eager paths.
    pub cuda_graphs: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            kernels: true,
            fused_decode: true,
            kernel_threads: None,
            map_weights: true,
            packed_cache: PackedCache::Off,
            packed_write_later: false,
            cuda_graphs: false,
        }
    }
}

impl EngineOptions {
    /// Sizes the kernels' pool as asked, before any layer is packed. An error if the pool
    /// already runs with another number of threads.
    pub fn apply_threads(&self) -> Result<()> {
        let Some(asked) = self.kernel_threads else {
            return Ok(());
        };
        if asked == 0 {
            return Err(Error::Input("kernel threads must be at least 1".into()));
        }
        let got = ThreadPool::global_with(Some(asked)).threads();
        if got != asked {
            return Err(Error::Input(format!(
                "the kernels' pool already runs {got} threads in this process; {asked} asked"
            )));
        }
        Ok(())
    }
}

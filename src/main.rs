//! `gpt2kit`: the command line over the engine. Thin: parse flags, call the crates,
//! print. Errors in flag values exit with 2, every other failure with 1, never a panic.
use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod choices;
mod eval_cmd;
mod infer_cmd;
mod infer_io;
mod infer_settings;
mod init_cmd;
mod inspect;
mod launch_cmd;
mod merge_lora_cmd;
mod quantize_cmd;
mod quantize_gguf;
mod quantize_report;
mod serve_cmd;
mod tokenizer_cmd;
mod tp_launch;
mod train_cmd;

#[derive(Parser)]
#[command(
    name = "gpt2kit",
    version,
    about = "GPT-2 fine-tuning, quantization and fast inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Testing hook: check that the command line parses, and stop (the README's usage
    /// test).
    #[arg(long, hide = true, global = true)]
    parse_only: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model folder's config, parameter count, dtypes and sizes.
    Inspect(inspect::Args),
    /// Make a randomly initialised GPT-2 (GPT-2's initialisation) as a model folder.
    Init(init_cmd::Args),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(tokenizer_cmd::Command),
    /// Fine-tune a model on JSONL data, with eval, checkpoints and TensorBoard logs.
    Train(train_cmd::Args),
    /// Loss and perplexity of a model on JSONL data.
    Eval(eval_cmd::Args),
    /// Int8 quantization and pruning into a deployment artifact, with a report.
    Quantize(quantize_cmd::Args),
    /// Write an int8 artifact back as a plain float model folder.
    Dequantize(quantize_cmd::DequantizeArgs),
    /// Merge a LoRA adapter (peft's format) into its base model: a plain model folder.
    MergeLora(merge_lora_cmd::Args),
    /// Generate text from prompts.
    Infer(infer_cmd::Args),
    /// An OpenAI-compatible HTTP server (completions, streaming) over continuous batching.
    Serve(serve_cmd::Args),
    /// Start N local ranks of a command with torchrun's environment (RANK, WORLD_SIZE,
    /// ...); one failing stops them all.
    Launch(launch_cmd::Args),
}

fn main() -> ExitCode {
    // `eprintln!` panics when stderr is closed or full, and a panic inside the panic
    // hook aborts the process: nothing written to stderr may panic.
    std::panic::set_hook(Box::new(|info| {
        // A panic the engine catches and reports itself (`infer::panics`) prints nothing.
        if !infer::panics::quiet() {
            let _ = writeln!(io::stderr(), "gpt2kit: internal error: {info}");
        }
    }));
    let cli = Cli::parse();
    if cli.parse_only {
        return ExitCode::SUCCESS;
    }
    let mut out = Out(io::stdout().lock());
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(&args, &mut out),
        Command::Init(args) => init_cmd::run(&args, &mut out),
        Command::Tokenizer(command) => tokenizer_cmd::run(&command, &mut out),
        Command::Train(args) => train_cmd::run(&args, &mut out),
        Command::Eval(args) => eval_cmd::run(&args, &mut out),
        Command::Quantize(args) if quantize_cmd::writes_gguf(&args) => {
            quantize_gguf::run(&args, &mut out)
        }
        Command::Quantize(args) => quantize_cmd::run(&args, &mut out),
        Command::Dequantize(args) => quantize_cmd::check_dequantize(&args).and_then(|()| {
            if infer::gguf::is_gguf(&args.model) {
                quantize_gguf::dequantize(&args, &mut out)
            } else {
                quantize_cmd::run_dequantize(&args, &mut out)
            }
        }),
        Command::MergeLora(args) => merge_lora_cmd::run(&args, &mut out),
        Command::Infer(args) => infer_cmd::run(&args, &mut out),
        Command::Serve(args) => serve_cmd::run(&args, &mut out),
        Command::Launch(args) => launch_cmd::run(&args, &mut out),
    };
    let result = result.and_then(|()| out.flush().map_err(Into::into));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(io::stderr(), "error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// 2 for bad flag values and inputs (as clap's own usage errors), 128 + the signal for a
/// launch a signal stopped, 1 for the rest.
fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(i) = e.downcast_ref::<launch_cmd::Interrupted>() {
        return 128u8.saturating_add(i.sig as u8);
    }
    let usage = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<infer::Error>(),
            Some(infer::Error::Input(_))
        ) || matches!(
            c.downcast_ref::<serve::Error>(),
            Some(serve::Error::Infer(infer::Error::Input(_)))
        )
    });
    if usage {
        2
    } else {
        1
    }
}

/// A reader that closed our stdout early (`gpt2kit infer ... | head`) is not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// A flag's positive number of seconds as a duration; anything else is a usage error
/// naming the flag.
pub(crate) fn seconds(flag: &str, secs: f64) -> anyhow::Result<std::time::Duration> {
    match std::time::Duration::try_from_secs_f64(secs) {
        Ok(t) if secs > 0.0 => Ok(t),
        _ => Err(
            infer::Error::Input(format!("{flag} {secs}: give a positive number of seconds")).into(),
        ),
    }
}

/// Reads `--device` and `--dtype` into what the engine takes.
pub(crate) fn device_and_dtype(
    device: &str,
    dtype: choices::Dtype,
) -> anyhow::Result<(tch::Device, Option<tch::Kind>)> {
    Ok((infer::device::parse_device(device)?, dtype.kind()))
}

/// Where a model runs and in what: `infer`'s and `serve`'s --dtype, --device, --tp and
/// --devices.
#[derive(clap::Args)]
pub(crate) struct Placement {
    /// Weights and compute dtype; auto: the checkpoint's own.
    #[arg(long, value_enum, default_value_t = choices::Dtype::F32)]
    dtype: choices::Dtype,
    /// cpu, cuda, cuda:N or mps.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Tensor parallelism: split the model over N shards (Megatron-style), one per device
    /// of --devices, or the first N CUDA devices.
    #[arg(long)]
    tp: Option<usize>,
    /// Comma-separated devices, one per shard (e.g. cuda:0,cuda:1 or cpu,cpu); replaces --device.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
}

impl Placement {
    /// One device per tensor-parallel shard (the first also for anything unsplit), and
    /// the dtype the engine takes.
    pub(crate) fn resolve(&self) -> anyhow::Result<(Vec<tch::Device>, Option<tch::Kind>)> {
        let (device, kind) = device_and_dtype(&self.device, self.dtype)?;
        Ok((shard_devices(self.tp, &self.devices, device)?, kind))
    }
}

/// One device per tensor-parallel shard: --devices, else the first --tp CUDA devices,
/// else --device alone.
fn shard_devices(
    tp: Option<usize>,
    devices: &[String],
    device: tch::Device,
) -> anyhow::Result<Vec<tch::Device>> {
    let usage = |msg: String| -> anyhow::Error { infer::Error::Input(msg).into() };
    let listed = devices
        .iter()
        .map(|d| infer::device::parse_device(d.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    match (tp, listed.is_empty()) {
        (Some(0), _) => Err(usage("--tp must be at least 1".into())),
        (Some(n), false) if n != listed.len() => Err(usage(format!(
            "--tp {n} needs {n} --devices, got {}",
            listed.len()
        ))),
        (_, false) => Ok(listed),
        (Some(n), true) if n > 1 => {
            let have = infer::device::cuda_device_count().unwrap_or(0);
            if have < n {
                return Err(usage(format!(
                    "--tp {n} without --devices needs {n} CUDA devices, this machine has {have} \
                     (--devices cpu,cpu runs the split on the CPU)"
                )));
            }
            Ok((0..n).map(tch::Device::Cuda).collect())
        }
        _ => Ok(vec![device]),
    }
}

/// The engine's switches (`infer::EngineOptions`), for commands that load a model to run
/// it. Hidden flags, for comparisons and benchmarks; each falls back to the environment
/// variable the README documents, read here and nowhere in the crates.
#[derive(clap::Args, Clone, Debug, Default)]
pub(crate) struct EngineArgs {
    /// libtorch everywhere instead of the CPU decode kernels [env: GPT2KIT_KERNELS=0].
    #[arg(long, hide = true)]
    no_kernels: bool,
    /// libtorch between the decode kernels instead of fused decode steps
    /// [env: GPT2KIT_FUSED_DECODE=0].
    #[arg(long, hide = true)]
    no_fused_decode: bool,
    /// Threads of the decode kernels' pool [env: GPT2KIT_KERNEL_THREADS; default: one per
    /// available core].
    #[arg(long, hide = true)]
    kernel_threads: Option<std::num::NonZeroUsize>,
    /// Copy the weights out of the model files instead of using them in place from a
    /// memory map [env: GPT2KIT_MMAP=0].
    #[arg(long, hide = true)]
    no_mmap: bool,
    /// Where the decode kernels' packed weights are kept between runs: `auto` (beside
    /// the model when its folder is writable, else in $XDG_CACHE_HOME/gpt2kit/packed),
    /// `off` (pack at every start), or a folder [env: GPT2KIT_PACKED_CACHE; default: auto].
    #[arg(long, value_name = "auto|off|DIR")]
    packed_cache: Option<std::path::PathBuf>,
    /// `infer`: write a missing packed file during load instead of in a detached process
    /// after the run (what that process runs).
    #[arg(long, hide = true)]
    packed_cache_now: bool,
}

/// `infer` and `serve`: how decode steps are launched on CUDA.
#[derive(clap::Args, Clone, Debug, Default)]
pub(crate) struct GraphArgs {
    /// Decode steps as CUDA graphs, captured once per batch and attention width and replayed (`on`), or launched op by op (`off`); off the GPU `on` runs the same fixed-shape step uncaptured.
    #[arg(long, value_enum, default_value_t = OnOff::Off)]
    cuda_graphs: OnOff,
}

impl GraphArgs {
    pub(crate) fn apply(&self, options: infer::EngineOptions) -> infer::EngineOptions {
        infer::EngineOptions {
            cuda_graphs: self.cuda_graphs == OnOff::On,
            ..options
        }
    }
}

/// A switch's two values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OnOff {
    On,
    #[default]
    Off,
}

impl EngineArgs {
    /// The flags, else the environment, else the engine's defaults. As before the flags
    /// existed, an environment value that is not a positive number is ignored.
    pub(crate) fn options(&self) -> infer::EngineOptions {
        let off = |var: &str| std::env::var(var).is_ok_and(|v| v == "0");
        let env_threads = || {
            std::env::var("GPT2KIT_KERNEL_THREADS")
                .ok()
                .and_then(|s| s.parse().ok())
                .filter(|&n| n > 0)
        };
        infer::EngineOptions {
            kernels: !self.no_kernels && !off("GPT2KIT_KERNELS"),
            fused_decode: !self.no_fused_decode && !off("GPT2KIT_FUSED_DECODE"),
            kernel_threads: self.kernel_threads.map(|n| n.get()).or_else(env_threads),
            map_weights: !self.no_mmap && !off("GPT2KIT_MMAP"),
            packed_cache: packed_cache(self.packed_cache.clone()),
            packed_write_later: false,
            cuda_graphs: false,
        }
    }
}

impl EngineArgs {
    /// `options` for `infer` (a missing packed file is left to `build_packed_later`) and
    /// `quantize` (which leaves it unwritten).
    pub(crate) fn infer_options(&self) -> infer::EngineOptions {
        infer::EngineOptions {
            packed_write_later: !self.packed_cache_now,
            ..self.options()
        }
    }

    /// Writes the packed file `model` (loaded from `dir` in `dtype`) went without, in a
    /// detached process at the lowest priority, as `git gc --auto` does: writing gpt2-xl's
    /// 6.2 GB durably takes ~25 s on a 250 MB/s disk, which the run does not wait for.
    /// That process loads the model and writes the file during its load, then runs one
    /// token; a failure costs only the file.
    pub(crate) fn build_packed_later(
        &self,
        model: &infer::Gpt2,
        dir: &std::path::Path,
        dtype: &str,
    ) {
        use std::os::unix::process::CommandExt;
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        if !model.packed_file_wanted() {
            return;
        }
        let mut c = std::process::Command::new(exe);
        c.args(["infer", "--packed-cache-now", "--dtype", dtype, "--model"])
            .arg(dir)
            .args(["--prompt", "a", "--max-new-tokens", "1"]);
        if let Some(p) = &self.packed_cache {
            c.arg("--packed-cache").arg(p);
        }
        c.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0);
        // SAFETY: between fork and exec the child only calls nice(2), a system call.
        unsafe {
            c.pre_exec(|| {
                libc::nice(19);
                Ok(())
            })
        };
        let _ = c.spawn();
    }
}

/// `--packed-cache`, else GPT2KIT_PACKED_CACHE, else `auto`.
fn packed_cache(flag: Option<std::path::PathBuf>) -> infer::PackedCache {
    let value = flag.or_else(|| std::env::var_os("GPT2KIT_PACKED_CACHE").map(Into::into));
    match value.as_ref().and_then(|v| v.to_str()) {
        Some("off") => infer::PackedCache::Off,
        None | Some("auto" | "") => infer::PackedCache::Auto {
            fallback: user_cache_dir().map(|d| d.join("gpt2kit").join("packed")),
        },
        Some(_) => infer::PackedCache::Dir(value.unwrap_or_default()),
    }
}

/// The user's cache folder: $XDG_CACHE_HOME, else ~/.cache.
fn user_cache_dir() -> Option<std::path::PathBuf> {
    let set = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty());
    set("XDG_CACHE_HOME")
        .map(Into::into)
        .or_else(|| set("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
}

/// Standard output, whose write errors say so: a full stdout after a command wrote its
/// files must not read as if the files had failed.
pub(crate) struct Out<'a>(io::StdoutLock<'a>);

impl Write for Out<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(on_stdout)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(on_stdout)
    }
}

fn on_stdout(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("writing to stdout: {e}"))
}

pub(crate) fn write_json(out: &mut dyn Write, value: &serde_json::Value) -> anyhow::Result<()> {
    writeln!(out, "{value}")?;
    Ok(())
}

//! `gpt2kit serve`: the flags, read into `serve::Options` (the API key from the
//! environment too, here only), then one call to the server.
use std::path::PathBuf;
use std::time::Duration;

use crate::Out;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json), as
    /// infer loads: float or an int8 artifact.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on; 0.0.0.0 listens on every interface.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 takes a free one (printed on start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    #[command(flatten)]
    placement: crate::Placement,
    /// The model name clients send and see [default: the folder's name].
    #[arg(long)]
    served_model_name: Option<String>,
    /// Sequences decoded at once (each choice of each request is one).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_num_seqs: u64,
    /// Sequences waiting for a slot, at most; past that requests get 503.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Positions per sequence, prompt included [default: the model's n_positions].
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Every endpoint but /health needs `Authorization: Bearer KEY` [env: GPT2KIT_API_KEY].
    #[arg(long)]
    api_key: Option<String>,
    /// MiB of recent prompts' keys and values kept, so that a prompt sharing a prefix with
    /// one of them prefills only the rest (0: off; least recently used evicted first).
    #[arg(long, default_value_t = 0)]
    prefix_cache_mb: usize,
    /// MiB the decoding sequences' KV caches may take (allocated at start); fewer
    /// sequences than --max-num-seqs decode at once where it holds fewer [default: on the
    /// CPU, what the system's available memory leaves after loading].
    #[arg(long)]
    kv_cache_memory_mb: Option<usize>,
    /// Seconds to let running requests finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// A LoRA adapter (peft's folder) held beside --model, run unmerged for requests
    /// whose `model` is NAME; repeatable (vLLM's --lora-modules).
    #[arg(long, value_name = "NAME=DIR", value_parser = adapter_arg)]
    adapter: Vec<(String, PathBuf)>,
    #[command(flatten)]
    engine: crate::EngineArgs,
    #[command(flatten)]
    graphs: crate::GraphArgs,
}

/// `NAME=DIR`, both non-empty.
fn adapter_arg(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!(
            "expected NAME=DIR (an adapter's name and folder), got `{s}`"
        )),
    }
}

pub fn run(args: &Args, _out: &mut Out) -> anyhow::Result<()> {
    if std::env::var_os("WORLD_SIZE").is_some() {
        return Err(infer::Error::Input(
            "serve does not run under a launch (WORLD_SIZE is set): its --tp splits the model \
             over the devices of one process"
                .into(),
        )
        .into());
    }
    let (devices, kind) = args.placement.resolve()?;
    let t = args.shutdown_timeout;
    if !(t.is_finite() && t >= 0.0) {
        return Err(infer::Error::Input(format!(
            "--shutdown-timeout must be a number of seconds ≥ 0, got {t}"
        ))
        .into());
    }
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("GPT2KIT_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let opts = serve::Options {
        model: args.model.clone(),
        host: args.host.clone(),
        port: args.port,
        kind,
        devices,
        served_model_name: args.served_model_name.clone(),
        max_num_seqs: args.max_num_seqs as usize,
        max_queue: args.max_queue,
        max_model_len: args.max_model_len,
        api_key,
        shutdown_timeout: Duration::try_from_secs_f64(t).unwrap_or(Duration::MAX),
        prefix_cache_bytes: args.prefix_cache_mb.saturating_mul(1 << 20),
        kv_cache_bytes: args.kv_cache_memory_mb.map(|m| m.saturating_mul(1 << 20)),
        engine: args.graphs.apply(args.engine.options()),
        adapters: args.adapter.clone(),
    };
    serve::run(opts)?;
    Ok(())
}

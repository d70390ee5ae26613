//! Whether a folder holds a model the engine can load, before any weight is read: a
//! folder, every tensor config.json implies present at its size in the weight files'
//! headers, nothing left unused; and the dtype the checkpoint stores.
use std::path::Path;

use tch::Kind;

use crate::checkpoint::{TensorSource, WeightFiles};
use crate::config::Gpt2Config;
use crate::error::{Error, Result};

/// The float kind a checkpoint stores `wte` in (f32 when unknown): `--dtype auto`.
pub fn stored_kind(files: &WeightFiles) -> Kind {
    ["wte.weight", "transformer.wte.weight"]
        .iter()
        .find_map(|n| files.stored_kind(n))
        .unwrap_or(Kind::Float)
}

/// Refuses a path that is not a folder before anything is read from it.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() || (crate::gguf::is_gguf(dir) && dir.is_file()) {
        return Ok(());
    }
    let what = if dir.exists() {
        "is not a folder"
    } else {
        "does not exist"
    };
    Err(Error::ModelFolder {
        path: dir.into(),
        reason: format!(
            "{what} (expected a Hugging Face model folder with config.json, or a .gguf file)"
        ),
    })
}

/// How many names a message lists before it says "and N more".
const LIST: usize = 5;

fn listed(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(LIST)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LIST {
        s += &format!(" and {} more", names.len() - LIST);
    }
    s
}

/// The layer index of `h.N.…` (after the prefix), if the name is a block's.
fn layer_of(name: &str, prefix: &str) -> Option<i64> {
    let rest = name.strip_prefix(prefix)?.strip_prefix("h.")?;
    rest.split('.').next()?.parse().ok()
}

/// Sorts names with their layer numbers in numeric order (`h.2` before `h.10`).
fn sort_by_layer(names: &mut [String], prefix: &str) {
    names.sort_by(|a, b| (layer_of(a, prefix), a.as_str()).cmp(&(layer_of(b, prefix), b.as_str())));
}

/// Compares config.json's sizes with the shapes in the weight files' headers, before
/// any tensor is read or any layer allocated (`from_weights` runs it first; callers
/// that size work by the config before loading run it themselves). Errors name
/// config.json, the key and the tensor. Sources that cannot list their tensors
/// (in-memory ones) are not checked here; each tensor's shape is checked as it is read.
pub fn check_sizes(config: &Gpt2Config, files: &dyn TensorSource) -> Result<()> {
    let names = files.tensor_names();
    if names.is_empty() {
        return Ok(());
    }
    let prefix = if files.contains("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let config_path = files.path_of("config.json").with_file_name("config.json");
    let weights = |name: &str| files.path_of(name);
    let bad = |reason: String| Error::Config {
        path: config_path.clone(),
        reason,
    };
    let (e, v, p, i) = (
        config.n_embd,
        config.vocab_size,
        config.n_positions,
        config.inner_dim(),
    );
    // (tensor, the shape the config implies, the key behind each axis).
    let checks: [(&str, Vec<i64>, &[&str]); 4] = [
        ("ln_f.weight", vec![e], &["n_embd"]),
        ("wte.weight", vec![v, e], &["vocab_size", "n_embd"]),
        ("wpe.weight", vec![p, e], &["n_positions", "n_embd"]),
        ("h.0.mlp.c_fc.bias", vec![i], &["n_inner"]),
    ];
    for (tensor, expected, keys) in checks {
        let name = format!("{prefix}{tensor}");
        let Some(got) = files.shape_of(&name) else {
            continue; // missing tensors are reported, by name, when read
        };
        if got == expected {
            continue;
        }
        // The first axis that differs names the key (both keys when the rank differs);
        // every row of the table has as many keys as expected sizes.
        let key = match (0..keys.len()).find(|&a| got.get(a) != Some(&expected[a])) {
            Some(a) if got.len() == expected.len() => format!("{} is {}", keys[a], expected[a]),
            _ => keys
                .iter()
                .zip(&expected)
                .map(|(k, v)| format!("{k} is {v}"))
                .collect::<Vec<_>>()
                .join(" and "),
        };
        return Err(bad(format!(
            "{key}, but tensor `{name}` has shape {got:?}, expected {expected:?} (in {})",
            weights(&name).display()
        )));
    }
    // Layers: the weights must hold h.0 .. h.{n_layer-1} and nothing past them.
    let held = names
        .iter()
        .filter_map(|n| layer_of(n, prefix))
        .max()
        // saturating: the number comes from a tensor name in the file
        .map_or(0, |l| l.saturating_add(1));
    if config.n_layer > held {
        let first = format!("{prefix}h.{held}.ln_1.weight");
        return Err(bad(format!(
            "n_layer is {}, but {} holds {held} layer(s) (tensor `{first}` is missing)",
            config.n_layer,
            weights(&first).display()
        )));
    }
    let mut extra: Vec<String> = names
        .into_iter()
        .filter(|n| layer_of(n, prefix).is_some_and(|l| l >= config.n_layer))
        .filter(|n| !is_legacy_buffer(n))
        .collect();
    if !extra.is_empty() {
        // `extra[0]` below: not empty, just checked
        sort_by_layer(&mut extra, prefix);
        return Err(Error::UnusedTensors {
            path: config_path.clone(),
            reason: format!(
                "n_layer is {}, but {} holds {held} layers: {} tensor(s) would be unused: {}",
                config.n_layer,
                weights(&extra[0]).display(),
                extra.len(),
                listed(&extra)
            ),
        });
    }
    Ok(())
}

/// GPT-2's causal-mask buffers, saved by older transformers: not weights.
fn is_legacy_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

/// Refuses weights that the model did not read (transformers warns about them; a
/// silently ignored tensor is usually a config that does not describe the file).
/// GPT-2's legacy attention buffers and a stored head of a tied model are not weights.
pub(crate) fn check_all_used(config: &Gpt2Config, files: &dyn TensorSource) -> Result<()> {
    let ignorable =
        |n: &str| is_legacy_buffer(n) || (config.tie_word_embeddings && n == "lm_head.weight");
    let mut unused: Vec<String> = files
        .unused()
        .into_iter()
        .filter(|n| !ignorable(n))
        .collect();
    if unused.is_empty() {
        return Ok(());
    }
    // `unused[0]` below: not empty (checked above)
    sort_by_layer(&mut unused, "");
    Err(Error::UnusedTensors {
        path: files.path_of(&unused[0]),
        reason: format!(
            "{} tensor(s) are not used by the GPT-2 that config.json describes: {}",
            unused.len(),
            listed(&unused)
        ),
    })
}

//! The flags that take one of a closed set of names, as clap value enums: clap lists the
//! names in `--help` and refuses any other with exit code 2, naming the flag. Each enum
//! keeps the spellings the flag has always taken (aliases included, hidden from the
//! list) and maps to what the crates take; the tests below hold each against the
//! crates' own names. What each value means is said in the flag's help, which keeps
//! `--help` one line per flag.
use clap::ValueEnum;

/// The name a user types for `value` (its first name, not an alias).
pub(crate) fn name<T: ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string())
}

/// `--dtype` of `infer` and `eval`: weights' and compute dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Dtype {
    #[value(name = "f32", alias = "float32", alias = "fp32")]
    F32,
    #[value(name = "f16", alias = "float16", alias = "fp16", alias = "half")]
    F16,
    #[value(name = "bf16", alias = "bfloat16")]
    Bf16,
    #[value(name = "auto")]
    Auto,
}

impl Dtype {
    /// The kind to load the weights in; `None` keeps the checkpoint's own.
    pub(crate) fn kind(self) -> Option<tch::Kind> {
        match self {
            Self::F32 => Some(tch::Kind::Float),
            Self::F16 => Some(tch::Kind::Half),
            Self::Bf16 => Some(tch::Kind::BFloat16),
            Self::Auto => None,
        }
    }
}

/// `train --dtype`: f32, or bf16 compute with f32 master weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum TrainDtype {
    #[value(name = "f32", alias = "float32", alias = "fp32")]
    F32,
    #[value(name = "bf16", alias = "bfloat16")]
    Bf16,
}

/// `train --optim`, transformers' names for PyTorch's AdamW without and with `fused=True`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Optim {
    #[value(name = "adamw_torch")]
    AdamwTorch,
    #[value(name = "adamw_torch_fused")]
    AdamwTorchFused,
}

/// `train --lr-scheduler`, as transformers' `get_scheduler`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum LrScheduler {
    #[value(name = "constant", alias = "constant_with_warmup")]
    Constant,
    #[value(name = "linear")]
    Linear,
    #[value(name = "cosine")]
    Cosine,
}

impl LrScheduler {
    pub(crate) fn kind(self) -> train::schedule::SchedulerKind {
        use train::schedule::SchedulerKind as K;
        match self {
            Self::Constant => K::Constant,
            Self::Linear => K::Linear,
            Self::Cosine => K::Cosine,
        }
    }
}

/// `init --preset`: the model's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Preset {
    #[value(name = "tiny")]
    Tiny,
    #[value(name = "small")]
    Small,
    #[value(name = "gpt2")]
    Gpt2,
    #[value(name = "gpt2-medium")]
    Gpt2Medium,
    #[value(name = "gpt2-large")]
    Gpt2Large,
    #[value(name = "gpt2-xl")]
    Gpt2Xl,
    #[value(name = "distilgpt2")]
    Distilgpt2,
}

/// `infer --early-stopping`: transformers' three beam stopping rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum EarlyStopping {
    #[value(name = "true")]
    True,
    #[value(name = "false")]
    False,
    #[value(name = "never")]
    Never,
}

impl From<EarlyStopping> for infer::generate::EarlyStopping {
    fn from(e: EarlyStopping) -> Self {
        match e {
            EarlyStopping::True => Self::True,
            EarlyStopping::False => Self::False,
            EarlyStopping::Never => Self::Never,
        }
    }
}

/// `infer --ensemble-mode`: how the models decoded together pick tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum EnsembleMode {
    #[value(name = "mean-prob")]
    MeanProb,
    #[value(name = "mean-logprob")]
    MeanLogprob,
    #[value(name = "rerank")]
    Rerank,
    #[value(name = "vote")]
    Vote,
}

impl EnsembleMode {
    /// Each model decodes alone and the pool of candidates is scored (not a combined
    /// distribution per step).
    pub(crate) fn pooled(self) -> bool {
        matches!(self, Self::Rerank | Self::Vote)
    }

    /// How the per-step modes combine distributions.
    pub(crate) fn combine(self) -> infer::ensemble::EnsembleMode {
        match self {
            Self::MeanLogprob => infer::ensemble::EnsembleMode::MeanLogprob,
            _ => infer::ensemble::EnsembleMode::MeanProb,
        }
    }
}

/// `quantize --method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum QuantMethod {
    #[value(name = "int8-weight")]
    Int8Weight,
    #[value(name = "int8-dynamic")]
    Int8Dynamic,
    #[value(name = "none")]
    None,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k_m")]
    Q4KM,
    #[value(name = "f16")]
    F16,
    #[value(name = "bf16")]
    Bf16,
    #[value(name = "f32")]
    F32,
}

impl QuantMethod {
    /// The artifact method (`none` for the GGUF methods, which write no artifact folder).
    pub(crate) fn method(self) -> infer::quant::Method {
        use infer::quant::Method;
        match self {
            Self::Int8Weight => Method::Int8Weight,
            Self::Int8Dynamic => Method::Int8Dynamic,
            _ => Method::None,
        }
    }

    /// The GGUF method, for the methods that write a `.gguf` file.
    pub(crate) fn gguf(self) -> Option<quantize::gguf::Method> {
        use quantize::gguf::Method;
        Some(match self {
            Self::Q8_0 => Method::Q8_0,
            Self::Q4_0 => Method::Q4_0,
            Self::Q4KM => Method::Q4KM,
            Self::F16 => Method::F16,
            Self::Bf16 => Method::Bf16,
            Self::F32 => Method::F32,
            _ => return None,
        })
    }
}

/// `quantize --prune-scope`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum PruneScope {
    #[value(name = "layer")]
    Layer,
    #[value(name = "global")]
    Global,
}

/// `quantize --prune-pattern`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum PrunePattern {
    #[value(name = "unstructured")]
    Unstructured,
    #[value(name = "2:4")]
    TwoFour,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name and alias of every value, with the value.
    fn spellings<T: ValueEnum + Copy>() -> Vec<(String, T)> {
        T::value_variants()
            .iter()
            .flat_map(|v| {
                let p = v.to_possible_value().unwrap();
                p.get_name_and_aliases()
                    .map(|n| (n.to_string(), *v))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn names<T: ValueEnum>() -> Vec<String> {
        T::value_variants().iter().map(name).collect()
    }

    #[test]
    fn dtypes_read_as_the_engine_reads_them() {
        let all = spellings::<Dtype>();
        assert_eq!(all.len(), 10);
        for (n, d) in all {
            assert_eq!(infer::device::parse_dtype(&n).unwrap(), d.kind(), "{n}");
        }
        for (n, d) in spellings::<TrainDtype>() {
            let want = match d {
                TrainDtype::F32 => tch::Kind::Float,
                TrainDtype::Bf16 => tch::Kind::BFloat16,
            };
            assert_eq!(infer::device::parse_dtype(&n).unwrap(), Some(want), "{n}");
        }
    }

    #[test]
    fn schedulers_read_as_the_trainer_reads_them() {
        let all = spellings::<LrScheduler>();
        assert_eq!(all.len(), 4);
        for (n, s) in all {
            assert_eq!(train::schedule::SchedulerKind::parse(&n), Some(s.kind()));
        }
    }

    #[test]
    fn early_stopping_reads_as_generation_config_files_do() {
        for (n, e) in spellings::<EarlyStopping>() {
            assert_eq!(infer::genconfig::parse_early_stopping(&n), Some(e.into()));
        }
    }

    #[test]
    fn methods_and_presets_are_the_crates_own() {
        let artifact: Vec<String> = QuantMethod::value_variants()
            .iter()
            .filter(|m| m.gguf().is_none())
            .map(name)
            .collect();
        assert_eq!(artifact, infer::quant::Method::NAMES);
        for m in QuantMethod::value_variants()
            .iter()
            .filter(|m| m.gguf().is_none())
        {
            assert_eq!(infer::quant::Method::from_name(&name(m)), Some(m.method()));
        }
        assert_eq!(names::<Preset>(), train::init::PRESET_NAMES);
    }

    #[test]
    fn every_prune_scope_and_pattern_is_accepted() {
        for s in PruneScope::value_variants() {
            for p in PrunePattern::value_variants() {
                quantize::Prune::new(Some(0.5), &name(s), &name(p)).unwrap();
            }
        }
    }

    #[test]
    fn ensemble_modes() {
        let pooled: Vec<_> = EnsembleMode::value_variants()
            .iter()
            .filter(|m| m.pooled())
            .map(name)
            .collect();
        assert_eq!(pooled, ["rerank", "vote"]);
        assert_eq!(
            EnsembleMode::MeanLogprob.combine(),
            infer::ensemble::EnsembleMode::MeanLogprob
        );
    }
}

#!/usr/bin/env bash
# `make demo`: what the pipeline can do today, as commands a user can copy.
# The models are the small random GPT-2s that tests/reference/make_reference.py builds
# (no pretrained weights can be downloaded here), so the text is gibberish: what the
# demo shows is the machinery. Training and quantization join it as they land.
set -euo pipefail
BIN=${1:-target/release/gpt2kit}
REF=${2:-target/reference}
M="$REF/hub-tied"
run() { printf '\n$'; printf ' %q' "$@"; printf '\n'; "$@"; }

run "$BIN" inspect --model "$M"
run "$BIN" inspect --model "$REF/sharded-f16"
run "$BIN" infer --model "$M" --prompt "The quick brown fox" --max-new-tokens 12
run "$BIN" infer --model "$M" --prompt "The quick brown fox" --prompt "Hello" \
    --max-new-tokens 12 --num-beams 4 --num-return-sequences 2 --json
run "$BIN" infer --model "$M" --prompt "The quick brown fox" --max-new-tokens 16 \
    --do-sample --top-k 20 --top-p 0.9 --temperature 0.8 --seed 1 --stream --stats
run "$BIN" infer --model "$M" --prompt "The quick brown fox" --max-new-tokens 12 \
    --repetition-penalty 1.3 --no-repeat-ngram-size 2
run "$BIN" infer --model "$REF/prefixed-untied" --prompt "def main():" --max-new-tokens 8 --dtype bf16
printf '\nModels used: %s/ (Hugging Face folders; a real GPT-2 folder works the same way:\n' "$REF"
printf '  %s infer --model path/to/gpt2 --prompt "Hello" --max-new-tokens 40 --do-sample --top-p 0.95)\n' "$BIN"
printf 'Speed against transformers: make bench\n'

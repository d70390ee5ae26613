#!/usr/bin/env bash
# `make demo`: what the pipeline can do today, as commands a user can copy.
# The models are the small random GPT-2s that tests/reference/make_reference.py builds
# (no pretrained weights can be downloaded here); training, quantization and every
# decoding strategy join this demo as they land.
set -euo pipefail
BIN=${1:-target/release/gpt2kit}
REF=${2:-target/reference}
run() { printf '\n$ %s\n' "$*"; "$@"; }

run "$BIN" inspect --model "$REF/hub-tied"
run "$BIN" inspect --model "$REF/sharded-f16"
run "$BIN" infer --model "$REF/hub-tied" --prompt "The quick brown fox" --max-new-tokens 12
run "$BIN" infer --model "$REF/hub-tied" --prompt "The quick brown fox" --prompt "Hello" \
    --max-new-tokens 12 --json
run "$BIN" infer --model "$REF/prefixed-untied" --prompt "def main():" --max-new-tokens 8 --dtype bf16
printf '\nModels used: %s/ (Hugging Face folders; any real GPT-2 folder works the same way:\n' "$REF"
printf '  %s infer --model path/to/gpt2 --prompt "Hello" --max-new-tokens 40)\n' "$BIN"

#!/usr/bin/env bash
# `make demo`: the whole pipeline on the dataset that ships with the project (data/,
# made by `make data`), as commands a user can copy: train a tokenizer, initialise a
# small GPT-2, fine-tune it with eval, checkpoints and TensorBoard logs, quantize it to
# int8 (and a pruned variant) with a report, then generate with every common strategy
# from the float and the int8 model. About 2½ minutes on 2 cores after the build.
set -euo pipefail
BIN=${1:-target/release/gpt2kit}
OUT=${2:-target/demo}
VENV=${3:-}
rm -rf "$OUT"
mkdir -p "$OUT"
run() { printf '\n\033[1m$'; printf ' %q' "$@"; printf '\033[0m\n'; "$@"; }
step() { printf '\n\033[1;34m== %s\033[0m\n' "$*"; }

step "1. a byte-level BPE tokenizer and a randomly initialised 4-layer GPT-2 (4.3M parameters)"
run "$BIN" tokenizer train --data data/train.jsonl --vocab-size 4096 --out "$OUT/tokenizer"
run "$BIN" init --preset tiny --tokenizer "$OUT/tokenizer" --out "$OUT/init" --seed 0

step "2. training on data/train.jsonl, eval on data/eval.jsonl"
run "$BIN" train --model "$OUT/init" --data data/train.jsonl --eval-data data/eval.jsonl \
    --output "$OUT/run" --block-size 128 --batch-size 8 --max-steps 500 --lr 1e-3 \
    --warmup-steps 50 --lr-scheduler cosine --weight-decay 0.01 --eval-steps 100 \
    --save-steps 100 --save-total-limit 2 --logging-steps 20 --seed 0
run "$BIN" eval --model "$OUT/run/final" --data data/eval.jsonl --block-size 128

step "3. int8 quantization (and 30% magnitude pruning + int8), with what it cost"
run "$BIN" quantize --model "$OUT/run/final" --out "$OUT/int8" --method int8-weight \
    --eval data/eval.jsonl --block-size 128
run "$BIN" quantize --model "$OUT/run/final" --out "$OUT/int8-pruned30" --method int8-weight \
    --prune-sparsity 0.3 --eval data/eval.jsonl --block-size 128

step "4. generation from the trained model and from its int8 artifact"
P=(--prompt "The" --prompt "Once upon a time")
run "$BIN" infer --model "$OUT/run/final" "${P[@]}" --max-new-tokens 40 --stats
run "$BIN" infer --model "$OUT/run/final" --prompt "Once upon a time" --max-new-tokens 40 \
    --num-beams 4 --no-repeat-ngram-size 3 --num-return-sequences 2
run "$BIN" infer --model "$OUT/run/final" --prompt "Once upon a time" --max-new-tokens 40 \
    --do-sample --top-k 40 --top-p 0.9 --temperature 0.8 --repetition-penalty 1.2 --seed 1 --stream
run "$BIN" infer --model "$OUT/int8" "${P[@]}" --max-new-tokens 40 --stats
run "$BIN" infer --model "$OUT/int8" --prompt "Once upon a time" --max-new-tokens 40 \
    --do-sample --top-p 0.95 --temperature 0.7 --seed 1

step "done"
cat <<MSG
Outputs in $OUT/:
  tokenizer/        the BPE tokenizer          init/   the untrained model
  run/checkpoint-*/ resumable checkpoints      run/final/   the trained model (a Hugging Face folder)
  run/runs/         TensorBoard event files    int8/, int8-pruned30/   artifacts with quantize_report.json
Next:
  ${VENV:+$VENV/bin/}tensorboard --logdir $OUT/run/runs
  $BIN infer --model $OUT/run/final --prompt "Your prompt" --max-new-tokens 60 --do-sample --top-p 0.95
  $BIN train --model $OUT/run/final --data your.jsonl --output your-run   # fine-tune further
  $BIN infer --model path/to/gpt2 --prompt "Hello"   # a real GPT-2 folder from the Hub works as it is
  make bench                                        # speed against Hugging Face transformers
MSG

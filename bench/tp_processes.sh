#!/usr/bin/env bash
# Tensor parallelism across processes against the in-process split, on this CPU: greedy
# decode of the 124M-shaped random model (BENCH_DIR/gpt2-random, which `make bench`
# writes), one prompt, NEW tokens, as
#   - one process, decode kernels (the default);
#   - one process, libtorch only (GPT2KIT_KERNELS=0: what a split runs on);
#   - --tp 2 --devices cpu,cpu: two shards in one process, summed by a copy;
#   - gpt2kit launch --nproc-per-node 2 -- infer --tp 2: one shard per process, summed by
#     c10d's Gloo all-reduce over loopback, rank 0's logits broadcast every step.
# decode tok/s is `--stats`' decode_tokens_per_s, the median of RUNS runs; peak RSS is the
# largest process's (GNU time's %M: the launcher's figure is its largest rank's).
# Usage: bench/tp_processes.sh [BIN] [BENCH_DIR]; environment: NEW (64), RUNS (3), MODEL
# (another model folder, e.g. one `gpt2kit init --preset gpt2-medium` made).
# The table is printed and written to BENCH_DIR/tp_processes.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/gpt2kit}
BENCH_DIR=${2:-target/bench}
NEW=${NEW:-64} RUNS=${RUNS:-3}
MODEL=${MODEL:-$BENCH_DIR/gpt2-random}
export GPT2KIT_PACKED_CACHE=off
[ -x "$BIN" ] || { echo "$BIN missing: run make build" >&2; exit 1; }
[ -f "$MODEL/config.json" ] || { echo "$MODEL missing: run make bench once" >&2; exit 1; }
ARGS=(infer --model "$MODEL" --prompt "The quick brown fox jumps over the lazy dog and" \
  --max-new-tokens "$NEW" --ignore-eos --stats)
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT

# one row: NAME then the command; prints "NAME | tok/s | RSS MiB"
row() {
  local name=$1; shift
  local rates=() rss=0
  for _ in $(seq "$RUNS"); do
    /usr/bin/time -f "%M" -o "$TMP/rss" "$@" > /dev/null 2> "$TMP/err"
    rates+=("$(grep -o '"decode_tokens_per_s":[0-9.]*' "$TMP/err" | cut -d: -f2)")
    local r; r=$(tail -1 "$TMP/rss"); [ "$r" -gt "$rss" ] && rss=$r
  done
  local med; med=$(printf '%s\n' "${rates[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  printf '| %s | %.1f | %d |\n' "$name" "$med" $((rss / 1024))
}

PORT=$((29500 + RANDOM % 1000))
{
  echo "Greedy decode of $MODEL, 1 prompt, $NEW new tokens, median of $RUNS;"
  echo "$(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2}'), $(nproc) cores."
  echo
  echo "| run | decode tok/s | peak RSS (MiB, largest process) |"
  echo "|---|---|---|"
  row "one process, decode kernels" "$BIN" "${ARGS[@]}"
  row "one process, libtorch (GPT2KIT_KERNELS=0)" env GPT2KIT_KERNELS=0 "$BIN" "${ARGS[@]}"
  row "--tp 2 --devices cpu,cpu (one process)" "$BIN" "${ARGS[@]}" --tp 2 --devices cpu,cpu
  row "launch 2 ranks -- --tp 2 (Gloo)" "$BIN" launch --nproc-per-node 2 --master-port "$PORT" -- "${ARGS[@]}" --tp 2
} | tee "$BENCH_DIR/tp_processes.md"

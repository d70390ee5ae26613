#!/usr/bin/env bash
# Data-parallel training throughput on this CPU: `gpt2kit train` tokens/s in one process
# against two ranks under `gpt2kit launch --nproc-per-node 2` (Gloo over loopback), same
# global batch (one process --batch-size 8, two ranks --batch-size 4 each), block size 128,
# on a random model of the `small` preset (6 layers x 8 heads x 512 wide). A third row, one
# process held to one thread (OMP_NUM_THREADS=1), shows what each rank computes alone.
# tokens/s: the median over the steps after the first of rank 0's log_history tokens_per_s
# (global tokens of a step / the step's wall time, all-reduce included), and total tokens /
# the wall time of the whole command (start, data, the final save included). On a shared
# machine other load slows some steps: the p90 column is the steps least slowed.
# What bounds it: the one process already spreads each op over every core (libtorch's
# intra-op threads), and launch gives each of N ranks cores/N threads (OMP_NUM_THREADS),
# so with the same cores data parallelism adds no compute; a 2-rank step is at best as
# fast, and pays the all-reduce of every fp32 gradient (the tied 50257 x 512 embedding is
# most of them) over Gloo's loopback TCP on top, which the summary lines estimate.
# Usage: bench/ddp.sh [BIN] [BENCH_DIR]   (defaults target/release/gpt2kit, target/bench)
# Environment: STEPS (20), BLOCK (128), BATCH (global, 8), PRESET (small), TOKENIZER (a
# folder with tokenizer.json; default BENCH_DIR/gpt2-random's 50257 tokens, which `make
# bench` writes, else target/reference/hub-tied's 400), DATA (data/train.jsonl).
# The table is printed and written to BENCH_DIR/ddp.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/gpt2kit}
BENCH_DIR=${2:-target/bench}
STEPS=${STEPS:-20} BLOCK=${BLOCK:-128} BATCH=${BATCH:-8} PRESET=${PRESET:-small}
DATA=${DATA:-data/train.jsonl}
PY=${PYTHON:-python3}
export GPT2KIT_PACKED_CACHE=off
[ -x "$BIN" ] || { echo "$BIN missing: run make build" >&2; exit 1; }
[ -f "$DATA" ] || { echo "$DATA missing: run make data" >&2; exit 1; }
if [ -z "${TOKENIZER:-}" ]; then
  for t in "$BENCH_DIR/gpt2-random" target/reference/hub-tied; do
    [ -f "$t/tokenizer.json" ] && { TOKENIZER=$t; break; }
  done
fi
[ -f "${TOKENIZER:-}/tokenizer.json" ] || { echo "no tokenizer: set TOKENIZER" >&2; exit 1; }

MODEL=$BENCH_DIR/ddp-$PRESET
RUNS=$BENCH_DIR/ddp-runs
mkdir -p "$BENCH_DIR"
if [ ! -f "$MODEL/.ready" ] || [ "$(cat "$MODEL/.ready")" != "$TOKENIZER" ]; then
  rm -rf "$MODEL"
  "$BIN" init --preset "$PRESET" --tokenizer "$TOKENIZER" --out "$MODEL" --seed 1 >&2
  echo "$TOKENIZER" > "$MODEL/.ready"
fi
rm -rf "$RUNS" && mkdir -p "$RUNS"
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
COMMON=(--model "$MODEL" --data "$DATA" --block-size "$BLOCK" --max-steps "$STEPS"
  --lr 1e-4 --logging-steps 1)

# name, then the command's words (the output folder is RUNS/name); prints one table row.
run() {
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  if ! "$@" --output "$RUNS/$name" > "$RUNS/$name.log" 2>&1; then
    echo "$name failed:" >&2; tail -n 20 "$RUNS/$name.log" >&2; exit 1
  fi
  t1=$(date +%s.%N)
  "$PY" - "$RUNS/$name/final/trainer_state.json" "$t0" "$t1" "$name" <<'PY'
import json, statistics, sys
path, t0, t1, name = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
log = [e for e in json.load(open(path))["log_history"] if "tokens_per_s" in e]
steady = [e["tokens_per_s"] for e in log[1:]] or [log[0]["tokens_per_s"]]
steps = len(log)
p90 = statistics.quantiles(steady, n=10)[-1] if len(steady) > 1 else steady[0]
print(f"{name}\t{statistics.median(steady):.0f}\t{p90:.0f}\t{min(steady):.0f}\t{max(steady):.0f}\t{t1 - t0:.1f}\t{steps}")
PY
}

cores=$(nproc)
{
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -n1), $cores cores ($(lscpu | sed -n 's/^Thread(s) per core: *//p') thread(s) per core)"
  echo "model: $PRESET preset ($(sed -n 's/.*"n_layer": *\([0-9]*\).*/\1/p' "$MODEL/config.json") layers, n_embd $(sed -n 's/.*"n_embd": *\([0-9]*\).*/\1/p' "$MODEL/config.json"), vocab $(sed -n 's/.*"vocab_size": *\([0-9]*\).*/\1/p' "$MODEL/config.json")), block $BLOCK, global batch $BATCH ($((BATCH * BLOCK)) tokens/step), $STEPS steps"
} | tee "$RUNS/header"

rows=$RUNS/rows
: > "$rows"
run "1 process, batch $BATCH, $cores threads" "$BIN" train "${COMMON[@]}" --batch-size "$BATCH" | tee -a "$rows"
run "2 ranks (launch), batch $((BATCH / 2)) each, $(( (cores / 2) > 0 ? cores / 2 : 1 )) thread(s) each" \
  "$BIN" launch --nproc-per-node 2 --master-port "$port" -- train "${COMMON[@]}" --batch-size $((BATCH / 2)) | tee -a "$rows"
OMP_NUM_THREADS=1 run "1 process, batch $BATCH, 1 thread" "$BIN" train "${COMMON[@]}" --batch-size "$BATCH" | tee -a "$rows"

"$PY" - "$rows" "$STEPS" "$BATCH" "$BLOCK" "$(stat -c %s "$MODEL/model.safetensors")" <<'PY' | tee "$RUNS/table"
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
steps, batch, block, weight_bytes = map(int, sys.argv[2:6])
total = steps * batch * block
print("\n| run | tokens/s (median, steps 2..) | p90 | min..max | wall s | tokens/s (total / wall) |")
print("|---|---|---|---|---|---|")
for name, med, p90, lo, hi, wall, _ in rows:
    print(f"| {name} | {med} | {p90} | {lo}..{hi} | {wall} | {total / float(wall):.0f} |")
one, two = float(rows[0][1]), float(rows[1][1])
print(f"\n2 ranks / 1 process: {two / one:.2f}x (median step tokens/s); "
      f"{float(rows[1][2]) / float(rows[0][2]):.2f}x (p90, the steps least slowed by other load); "
      f"{float(rows[0][5]) / float(rows[1][5]):.2f}x (wall)")
if len(rows) > 2:  # from the p90s, the steps least slowed by other load
    one, two, t1 = (float(r[2]) for r in rows[:3])
    print(f"1 process, {rows[0][0].split(', ')[-1]} / 1 thread: {one / t1:.2f}x; "
          f"2 ranks / (2 x 1 thread): {two / (2 * t1):.2f} (1.00 = perfect scaling, no all-reduce cost)")
    # Each rank computes half the batch on one thread, as fast as the 1-thread process
    # would; the rest of a 2-rank step is the gradient all-reduce and the wait for it.
    over = batch * block / two - batch * block / 2 / t1
    print(f"2-rank step {batch * block / two:.2f} s = {batch * block / 2 / t1:.2f} s compute (half the batch, "
          f"1 thread) + {over:.2f} s all-reduce of {weight_bytes / 2**20:.0f} MiB fp32 gradients and sync")
PY
cat "$RUNS/header" "$RUNS/table" > "$BENCH_DIR/ddp.md"
echo "(written to $BENCH_DIR/ddp.md)"

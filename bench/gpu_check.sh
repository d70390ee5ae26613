#!/usr/bin/env bash
# GPU check of a built gpt2kit on a CUDA machine: CUDA loaded, cpu vs cuda tokens on the
# reference models (fp32, bf16, tensor parallel over two shards of one GPU, beams), and
# decode tokens/s of a gpt2-124M-shaped random model, TP=1 vs TP=2, fp32 and bf16.
# Then an int8-weight artifact on CUDA (TP=1 vs TP=2), the fused CPU decode step against
# libtorch between the kernels on this machine's CPU, (TESTS="bin ...") engine test
# binaries, whose CUDA cases run only where a GPU is, transformers eager and (HF_COMPILE=1,
# the default) with a static cache under torch.compile(mode="reduce-overhead"), the
# gpt2-xl shape eager and with CUDA graphs (XL=1), and (TRAIN=1, the default) training
# against transformers' Trainer (bench/bench_train_trainer.py; the machine reaches no
# registry: `make gpu-wheels` downloads accelerate, which the Trainer needs, into
# target/gpu-wheels, carried with the binary and installed here when missing).
# Usage: bench/gpu_check.sh BIN REFERENCE_DIR TOKENIZER_DIR OUT_DIR
# (TOKENIZER_DIR: a folder with a 50257-token tokenizer.json, e.g. the bench model's.)
set -uo pipefail
BIN=$1 REF=$2 TOK=$3 OUT=$4
mkdir -p "$OUT"
lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$lib
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 --version
echo "== CUDA libraries (gpt2kit loads libtorch_cuda.so when a CUDA device is asked for)"
ldd "$BIN" | grep -E "not found" || echo "every linked library found"
ls "$lib/libtorch_cuda.so" || echo "NO libtorch_cuda.so beside libtorch_cpu.so"
"$BIN" infer --model "$REF/hub-tied" --prompt "x" --max-new-tokens 1 --device cuda >/dev/null \
  && echo "CUDA loaded and ran" || echo "CUDA FAILED TO LOAD OR RUN"

same() { # name, file a, file b: do two --json outputs hold the same token ids?
  python3 - "$@" <<'PY'
import json, sys
name, a, b = sys.argv[1:]
ids = lambda f: [json.loads(l)["token_ids"] for l in open(f) if l.strip()]
x, y = ids(a), ids(b)
print(f"{name}: {'SAME' if x == y else 'DIFFERENT'} ({sum(len(r) for r in x)} tokens)")
PY
}
close() { # name, file a, file b: first-step logprob gap and agreeing prefix (bf16 may drift)
  python3 - "$@" <<'PY'
import json, sys
name, a, b = sys.argv[1:]
rows = lambda f: [json.loads(l) for l in open(f) if l.strip()]
x, y = rows(a), rows(b)
gap = max(abs(p["logprobs"][0] - q["logprobs"][0]) for p, q in zip(x, y))
agree = [next((i for i, (s, t) in enumerate(zip(p["token_ids"], q["token_ids"])) if s != t), len(p["token_ids"])) for p, q in zip(x, y)]
print(f"{name}: first-step logprob gap {gap:.4f}; tokens agree for the first {agree} of {[len(p['token_ids']) for p in x]}")
PY
}
echo "== cpu vs cuda tokens on the reference models"
for m in hub-tied prefixed-untied sharded-f16 bf16-quickgelu; do
  run() { "$BIN" infer --model "$REF/$m" --prompt "hello world" --prompt "a b" \
      --max-new-tokens 24 --json "$@" 2>>"$OUT/stderr.log"; }
  run --device cpu > "$OUT/$m.cpu"
  run --device cuda > "$OUT/$m.cuda"
  same "$m greedy cuda" "$OUT/$m.cpu" "$OUT/$m.cuda"
  case $m in sharded-f16|bf16-quickgelu) continue ;; esac
  run --tp 2 --devices cuda:0,cuda:0 > "$OUT/$m.tp2"
  same "$m greedy cuda tp2 vs cuda" "$OUT/$m.cuda" "$OUT/$m.tp2"
  run --device cpu --num-beams 4 > "$OUT/$m.beam.cpu"
  run --device cuda --num-beams 4 > "$OUT/$m.beam.cuda"
  same "$m beam4 cuda" "$OUT/$m.beam.cpu" "$OUT/$m.beam.cuda"
  run --tp 2 --devices cuda:0,cuda:0 --num-beams 4 > "$OUT/$m.beam.tp2"
  same "$m beam4 cuda tp2 vs cuda" "$OUT/$m.beam.cuda" "$OUT/$m.beam.tp2"
  run --device cuda --dtype bf16 > "$OUT/$m.bf16"
  close "$m cuda bf16 vs fp32" "$OUT/$m.cuda" "$OUT/$m.bf16"
  run --device cpu --dtype bf16 > "$OUT/$m.bf16.cpu"
  close "$m cuda bf16 vs cpu bf16" "$OUT/$m.bf16.cpu" "$OUT/$m.bf16"
  run --device cuda --cuda-graphs on > "$OUT/$m.graphs"
  same "$m greedy cuda graphs vs eager" "$OUT/$m.cuda" "$OUT/$m.graphs"
  run --device cuda --num-beams 4 --cuda-graphs on > "$OUT/$m.beam.graphs"
  same "$m beam4 cuda graphs vs eager" "$OUT/$m.beam.cuda" "$OUT/$m.beam.graphs"
  run --device cuda --do-sample --seed 7 --top-k 20 > "$OUT/$m.s1"
  run --device cuda --do-sample --seed 7 --top-k 20 > "$OUT/$m.s2"
  same "$m seeded sampling repeats on cuda" "$OUT/$m.s1" "$OUT/$m.s2"
done
echo "== gpt2-124M shape, random weights"
"$BIN" init --preset gpt2 --tokenizer "$TOK" --out "$OUT/g2" --seed 0 >/dev/null || exit 1
rm -f "$OUT/g2/model.safetensors.keep"
speed() { # label, flags...
  local label=$1; shift
  "$BIN" infer --model "$OUT/g2" --prompt "hello world, this is a test" --max-new-tokens 128 \
    --ignore-eos --warmup 1 --stats "$@" 2>&1 >/dev/null | grep '"decode_tokens_per_s"' \
    | python3 -c "import json,sys; s=json.loads(sys.stdin.read()); print('$label', 'decode tok/s', round(s['decode_tokens_per_s'],1), 'prefill ms', round(s['prefill_ms'],1))"
}
speed "cuda fp32 b1 tp1" --device cuda
speed "cuda fp32 b1 graphs" --device cuda --cuda-graphs on
speed "cuda bf16 b1 graphs" --device cuda --dtype bf16 --cuda-graphs on
speed "cuda fp32 b1 tp2(cuda:0,cuda:0)" --tp 2 --devices cuda:0,cuda:0
speed "cuda bf16 b1 tp1" --device cuda --dtype bf16
speed "cuda bf16 b1 tp2(cuda:0,cuda:0)" --tp 2 --devices cuda:0,cuda:0 --dtype bf16
speed "cuda fp32 beam5 tp1" --device cuda --num-beams 5
eight=(--prompt "hi" --prompt "prompt number two is longer")
for i in 3 4 5 6 7; do eight+=(--prompt "prompt $i"); done
speed "cuda fp32 b8 (padded) tp1" --device cuda "${eight[@]}"
speed "cuda bf16 b8 (padded) tp1" --device cuda --dtype bf16 "${eight[@]}"
speed "cuda bf16 b8 graphs" --device cuda --dtype bf16 --cuda-graphs on "${eight[@]}"
speed "cuda bf16 beam5 tp1" --device cuda --dtype bf16 --num-beams 5
echo "== int8-weight artifact of the same model on CUDA, unsplit and split"
"$BIN" quantize --model "$OUT/g2" --out "$OUT/g2-int8" --method int8-weight >/dev/null 2>>"$OUT/stderr.log" || echo "quantize failed"
i8() { "$BIN" infer --model "$OUT/g2-int8" --prompt "hello world" --prompt "a b" --max-new-tokens 24 --json "$@" 2>>"$OUT/stderr.log"; }
i8 --device cpu > "$OUT/i8.cpu"; i8 --device cuda > "$OUT/i8.cuda"; i8 --tp 2 --devices cuda:0,cuda:0 > "$OUT/i8.tp2"
same "int8-weight greedy cuda vs cpu" "$OUT/i8.cpu" "$OUT/i8.cuda"
same "int8-weight greedy cuda tp2 vs cuda" "$OUT/i8.cuda" "$OUT/i8.tp2"
i8 --device cuda --num-beams 4 > "$OUT/i8.beam"; i8 --tp 2 --devices cuda:0,cuda:0 --num-beams 4 > "$OUT/i8.beam.tp2"
same "int8-weight beam4 cuda tp2 vs cuda" "$OUT/i8.beam" "$OUT/i8.beam.tp2"
speedq() { local label=$1; shift; "$BIN" infer --model "$OUT/g2-int8" --prompt "hello world, this is a test" --max-new-tokens 128 \
    --ignore-eos --warmup 1 --stats "$@" 2>&1 >/dev/null | grep '"decode_tokens_per_s"' \
    | python3 -c "import json,sys; s=json.loads(sys.stdin.read()); print('$label', 'decode tok/s', round(s['decode_tokens_per_s'],1))"; }
speedq "cuda int8-weight b1 tp1" --device cuda
speedq "cuda int8-weight bf16 b1" --device cuda --dtype bf16
speedq "cuda int8-weight bf16 b1 graphs" --device cuda --dtype bf16 --cuda-graphs on
speedq "cuda int8-weight b1 tp2(cuda:0,cuda:0)" --tp 2 --devices cuda:0,cuda:0
echo "== CPU of this machine ($(nproc) cores): fused decode steps vs libtorch between the kernels"
for f in 1 0; do GPT2KIT_FUSED_DECODE=$f speed "cpu fp32 b1 fused=$f" --device cpu; done
for f in 1 0; do GPT2KIT_FUSED_DECODE=$f speed "cpu bf16 b1 fused=$f" --device cpu --dtype bf16; done
for f in 1 0; do GPT2KIT_FUSED_DECODE=$f speed "cpu fp32 beam5 fused=$f" --device cpu --num-beams 5; done
if [ -n "${TESTS:-}" ]; then
  echo "== engine tests on this machine (CUDA cases included)"
  for t in $TESTS; do GPT2KIT_REFERENCE_DIR="$REF" "$t" --test-threads 4 2>&1 | grep -E "test result|FAILED|panicked" ; done
fi
if [ "${HF:-1}" = 1 ] && python3 -c "import transformers" 2>/dev/null; then
  echo "== transformers on the same GPU"
  python3 - "$OUT/g2" <<'PY'
import sys, time, torch
from transformers import GPT2LMHeadModel
m = GPT2LMHeadModel.from_pretrained(sys.argv[1]).cuda().eval()
ids = torch.tensor([[31373, 995, 11, 428, 318, 257, 1332]], device="cuda")
for dtype in (torch.float32, torch.bfloat16):
    m = m.to(dtype)
    kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
    m.generate(ids, **kw); torch.cuda.synchronize()
    t = time.time(); m.generate(ids, **kw); torch.cuda.synchronize()
    print(f"transformers cuda {dtype} b1: {128 / (time.time() - t):.1f} tok/s (incl. prefill)")
PY
  if [ "${HF_COMPILE:-1}" = 1 ]; then
    echo "== transformers bf16 b1, static cache + torch.compile(mode=reduce-overhead) (compiles for minutes)"
    timeout "${HF_COMPILE_TIMEOUT:-300}" python3 - "$OUT/g2" <<'PY' || echo "(compiled transformers did not finish)"
import sys, time, torch
from transformers import GPT2LMHeadModel
try:
    m = GPT2LMHeadModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16).cuda().eval()
    m.generation_config.cache_implementation = "static"
    m.forward = torch.compile(m.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.tensor([[31373, 995, 11, 428, 318, 257, 1332]], device="cuda")
    kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
    for _ in range(2):
        m.generate(ids, **kw)
    torch.cuda.synchronize(); t = time.time(); m.generate(ids, **kw); torch.cuda.synchronize()
    print(f"transformers compiled static-cache bf16 b1: {128 / (time.time() - t):.1f} tok/s (incl. prefill)")
except Exception as e:
    print(f"(compiled transformers failed: {type(e).__name__}: {str(e).splitlines()[0][:200]})")
PY
  fi
else
  echo "(transformers not installed on this machine: no same-GPU comparison)"
fi
if [ "${XL:-1}" = 1 ]; then
  echo "== gpt2-xl shape (1.5B, random weights), bf16 b1: eager and CUDA graphs"
  if "$BIN" init --preset gpt2-xl --tokenizer "$TOK" --out "$OUT/xl" --seed 0 >/dev/null 2>>"$OUT/stderr.log"; then
    xl() { local label=$1; shift; "$BIN" infer --model "$OUT/xl" --prompt "hello world, this is a test" --max-new-tokens 64 \
        --ignore-eos --warmup 1 --stats --device cuda --dtype bf16 "$@" 2>&1 >/dev/null | grep '"decode_tokens_per_s"' \
        | python3 -c "import json,sys; s=json.loads(sys.stdin.read()); print('$label', 'decode tok/s', round(s['decode_tokens_per_s'],1), '(bf16 weights 3.1 GB a token: x3.1 = GB/s)')"; }
    xl "gpt2-xl cuda bf16 b1 eager"
    xl "gpt2-xl cuda bf16 b1 graphs" --cuda-graphs on
  else
    echo "(could not make the gpt2-xl model)"
  fi
fi
if [ "${TRAIN:-1}" = 1 ]; then
  echo "== training, 124M shape, batch 16 x 1024: gpt2kit train vs transformers' Trainer (bf16 / tf32, adamw_torch_fused)"
  wheels=$(dirname "$0")/../target/gpu-wheels
  if ! python3 -c "import transformers, accelerate" 2>/dev/null && [ -d "$wheels" ]; then
    python3 -m pip install --quiet --no-index --find-links "$wheels" accelerate \
      || echo "(could not install the carried wheels of $wheels)"
  fi
  if python3 -c "import transformers, accelerate" 2>/dev/null; then
    for dt in bf16 f32; do
      python3 "$(dirname "$0")/bench_train_trainer.py" --binary "$BIN" --model "$OUT/g2" \
        --device cuda --dtype "$dt" --batch 16 --block 1024 --steps "${TRAIN_STEPS:-50}" --warmup 3 \
        2>>"$OUT/stderr.log" | grep -v "^(transformers"
    done
  else
    echo "(transformers or accelerate missing: make gpu-wheels here, carry target/gpu-wheels)"
  fi
fi

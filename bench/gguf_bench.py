#!/usr/bin/env python3
"""Decode speed of GGUF files: gpt2kit against llama.cpp (llama-cpp-python) on the same
.gguf files, in the same run. The model is the gpt2-124M shape with random weights
(target/bench/gpt2-random), written by `gpt2kit quantize --method M --out FILE.gguf` as
f32, bf16, q8_0, q4_0 and q4_k_m (once into --dir, reused). Greedy decoding of NEW = 128
tokens after a short prompt, EOS ignored, at batch 1 and at batch 8 (8 different prompts,
rotations of the same words, decoding together: every step gives each sequence a token).

Both sides count decode tokens/s the same way: the first new token of each sequence comes
from the prompt's pass and is not counted; the other NEW - 1 per sequence, over the time
of the steps that made them (a forward pass of one token per sequence plus the argmax).
gpt2kit: `infer --stats`' `decode_tokens_per_s` (generated tokens less one per sequence,
over `decode_ms`), with `--warmup 1` (an untimed 4-token generation first), `--json` for
the tokens, `--packed-cache off` (float weights packed at start in memory: no packed
file written beside the .gguf, no detached writer running during the timed runs) and
`--dtype auto` (the file's own dtype: the bf16 file runs in bf16, as llama.cpp runs it;
quantized files run on their blocks in an f32 model).
llama.cpp: `Llama(model_path, n_threads=2, n_threads_batch=2, n_ctx=512)`; batch 1 runs
`Llama.eval` on the prompt, then NEW - 1 times: eval the last token, numpy argmax of
`llama_get_logits_ith(ctx, -1)`. Batch 8 makes a second context on the same model with
the same parameters but `n_seq_max=8`, `kv_unified=True` and `n_ctx` the 8 sequences'
cells (prompts + NEW each, rounded up to 256), and drives it
with the low-level API: one `llama_batch` of the 8 prompts (seq_id 0..7, logits on each
prompt's last token), then one `llama_decode` per step of 8 tokens (one per seq_id, at
its own position), argmax of `llama_get_logits_ith(ctx, i)` for each. Both sides do an
untimed 4-token generation in the same process before the timed one.

Every run is a fresh child process. Per format and batch: one untimed run of each side
(page cache), then 3 timed runs, the sides interleaved (ours, theirs, ours, ...); the
table gives the medians. The generated tokens of the two sides are compared (the same
prompt token ids are checked too); a difference is reported under the table, not fixed.
Bytes per token: the tensor data of the file (from its tensor offsets) less
`position_embd` (one row of it is read per token); the tied `token_embd` counts once (it
is the head, read whole every step). The KV cache is not counted. GB/s = bytes per token
× batch-1 tok/s. Load averages are printed before and after (the machine may be shared).

Usage: gguf_bench.py --binary target/release/gpt2kit --python VENV/bin/python
       [--model target/bench/gpt2-random] [--dir target/bench/gguf] [--out FILE]
       [--formats f32,bf16,q8_0,q4_0,q4_k_m] [--new 128] [--runs 3] [--hf] [--int8 DIR,...]
--hf times transformers fp32 on --model (bench/hf_generate.py, 2 threads) at both batch
sizes and prints each file's gpt2kit rate as a multiple of it.
--int8 adds gpt2kit-only rows for int8 artifacts of the same model (the 4-bit files should
beat them: fewer bytes a token), run the same way after the GGUF files.
--binary is copied to a private temporary folder first and the copy is run; --python is
an interpreter with llama_cpp, numpy and gguf.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

PROMPT = "abc defg hij klmno pq rstu vwx yz"
BATCH8 = 8
FORMATS = ["f32", "bf16", "q8_0", "q4_0", "q4_k_m"]
WARMUP_TOKENS = 4

LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp

path, n_new, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
batch = len(prompts)
llm = llama_cpp.Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=512, verbose=False)
n_vocab = llm.n_vocab()
ptoks = [llm.tokenize(p.encode(), add_bos=False, special=False) for p in prompts]


def argmax(ctx, i):
    return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())


if batch == 1:
    ctx = llm._ctx.ctx

    def generate(n):
        llm.reset()  # the next eval removes every cached position from 0 on
        llm.eval(ptoks[0])
        out = [argmax(ctx, -1)]
        t = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([out[-1]])
            out.append(argmax(ctx, -1))
        return [out], time.perf_counter() - t
else:
    n_prompt = sum(map(len, ptoks))
    params = llm.context_params  # what Llama made its context with; passed by value
    params.n_seq_max = batch
    params.kv_unified = True
    params.n_ctx = -(-(n_prompt + batch * n_new) // 256) * 256  # every sequence's cells
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if not ctx:
        sys.exit("llama_init_from_model failed")
    if llama_cpp.llama_n_seq_max(ctx) != batch:
        sys.exit(f"context has n_seq_max {llama_cpp.llama_n_seq_max(ctx)}, not {batch}")
    mem = llama_cpp.llama_get_memory(ctx)
    b = llama_cpp.llama_batch_init(max(n_prompt, batch), 0, 1)

    def fill(entries):
        b.n_tokens = len(entries)
        for j, (tok, pos, seq, logits) in enumerate(entries):
            b.token[j] = tok
            b.pos[j] = pos
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = seq
            b.logits[j] = logits
        rc = llama_cpp.llama_decode(ctx, b)
        if rc != 0:
            sys.exit(f"llama_decode returned {rc}")

    def generate(n):
        llama_cpp.llama_memory_clear(mem, True)
        entries, last = [], []
        for s, toks in enumerate(ptoks):
            entries += [(t, i, s, i == len(toks) - 1) for i, t in enumerate(toks)]
            last.append(len(entries) - 1)
        fill(entries)
        outs = [[argmax(ctx, j)] for j in last]
        t = time.perf_counter()
        for step in range(n - 1):
            fill([(outs[s][-1], len(ptoks[s]) + step, s, True) for s in range(batch)])
            for s in range(batch):
                outs[s].append(argmax(ctx, s))
        return outs, time.perf_counter() - t

generate(4)  # warm-up, untimed
outs, dt = generate(n_new)
print(json.dumps({"prompt_tokens": ptoks, "tokens": outs,
                  "decode_tokens_per_s": batch * (n_new - 1) / dt}))
"""

GGUF_BYTES_CHILD = r"""
import json, os, sys
import gguf
r = gguf.GGUFReader(sys.argv[1])
ts = sorted(r.tensors, key=lambda t: t.data_offset)
end = os.path.getsize(sys.argv[1])
sizes = {t.name: (ts[i + 1].data_offset if i + 1 < len(ts) else end) - t.data_offset
         for i, t in enumerate(ts)}
print(json.dumps({"data": sum(sizes.values()), "position_embd": sizes.get("position_embd.weight", 0),
                  "types": sorted({t.tensor_type.name for t in ts})}))
"""


def child(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def ours(binary, gguf, prompts, new, jsonl):
    cmd = [binary, "infer", "--model", gguf, "--max-new-tokens", str(new), "--ignore-eos",
           "--stats", "--json", "--warmup", "1", "--packed-cache", "off", "--dtype", "auto"]
    cmd += ["--prompt", prompts[0]] if len(prompts) == 1 else ["--prompts", jsonl]
    p = child(cmd)
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    outs = [None] * len(prompts)
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            o = json.loads(line)
            outs[o["prompt_index"]] = o["token_ids"]
    if stats["generated_tokens"] != len(prompts) * new or None in outs:
        sys.exit(f"gpt2kit generated {stats['generated_tokens']} tokens, expected {len(prompts) * new}")
    return {"tok_s": stats["decode_tokens_per_s"], "tokens": outs, "prompt_tokens": stats["prompt_tokens"]}


def theirs(python, gguf, prompts, new):
    p = child([python, "-c", LLAMA_CHILD, gguf, str(new), json.dumps(prompts)])
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {"tok_s": r["decode_tokens_per_s"], "tokens": r["tokens"],
            "prompt_tokens": sum(map(len, r["prompt_tokens"]))}


def compare(a, b):
    """'' when the token lists agree, else a short description of where they part."""
    diffs = []
    for s, (x, y) in enumerate(zip(a, b)):
        if x != y:
            k = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            diffs.append(f"seq {s} from token {k}")
    return "; ".join(diffs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/gpt2kit")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--model", default="target/bench/gpt2-random")
    ap.add_argument("--dir", default="target/bench/gguf")
    ap.add_argument("--out")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--hf", action="store_true",
                    help="also time transformers fp32 generate() on --model (bench/hf_generate.py)")
    ap.add_argument("--int8", default="",
                    help="comma-separated int8 artifact folders (gpt2kit quantize --method "
                         "int8-*) of the same model, run by gpt2kit alone on the same prompts")
    args = ap.parse_args()
    formats = [f for f in args.formats.split(",") if f]

    tmp = tempfile.mkdtemp(prefix="gguf-bench-")
    binary = os.path.join(tmp, "gpt2kit")
    shutil.copy2(args.binary, binary)
    words = PROMPT.split()
    prompts8 = [" ".join(words[i:] + words[:i]) for i in range(BATCH8)]
    jsonl = os.path.join(tmp, "prompts.jsonl")
    with open(jsonl, "w") as f:
        for p in prompts8:
            f.write(json.dumps({"prompt": p}) + "\n")

    os.makedirs(args.dir, exist_ok=True)
    files = {}
    for m in formats:
        path = os.path.join(args.dir, f"{os.path.basename(os.path.normpath(args.model))}-{m}.gguf")
        if not os.path.exists(path):
            print(f"writing {path}", flush=True)
            child([binary, "quantize", "--model", args.model, "--out", path, "--method", m,
                   "--decode-tokens", "0"])
        files[m] = path

    load_before = os.getloadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}", flush=True)
    results, notes = {}, []
    for m in formats:
        gguf = files[m]
        info = json.loads(child([args.python, "-c", GGUF_BYTES_CHILD, gguf]).stdout)
        results[m] = {"size": os.path.getsize(gguf), "bytes": info["data"] - info["position_embd"],
                      "types": info["types"]}
        for batch, prompts in ((1, [PROMPT]), (BATCH8, prompts8)):
            ours(binary, gguf, prompts, args.new, jsonl)  # untimed
            theirs(args.python, gguf, prompts, args.new)  # untimed
            a_runs, b_runs = [], []
            for _ in range(args.runs):
                a_runs.append(ours(binary, gguf, prompts, args.new, jsonl))
                b_runs.append(theirs(args.python, gguf, prompts, args.new))
            a = statistics.median(r["tok_s"] for r in a_runs)
            b = statistics.median(r["tok_s"] for r in b_runs)
            results[m][batch] = (a, b)
            print(f"{m} b{batch}: gpt2kit {[round(r['tok_s'], 1) for r in a_runs]}, "
                  f"llama.cpp {[round(r['tok_s'], 1) for r in b_runs]} tok/s", flush=True)
            if a_runs[0]["prompt_tokens"] != b_runs[0]["prompt_tokens"]:
                notes.append(f"{m} b{batch}: prompt tokens differ (gpt2kit {a_runs[0]['prompt_tokens']}, "
                             f"llama.cpp {b_runs[0]['prompt_tokens']})")
            for side, runs in (("gpt2kit", a_runs), ("llama.cpp", b_runs)):
                if any(r["tokens"] != runs[0]["tokens"] for r in runs[1:]):
                    notes.append(f"{m} b{batch}: {side}'s tokens changed between its runs")
            d = compare(a_runs[0]["tokens"], b_runs[0]["tokens"])
            if d:
                notes.append(f"{m} b{batch}: gpt2kit and llama.cpp tokens differ ({d})")
    int8 = {}
    for folder in filter(None, args.int8.split(",")):
        name = os.path.basename(os.path.normpath(folder))
        int8[name] = {}
        for batch, prompts in ((1, [PROMPT]), (BATCH8, prompts8)):
            ours(binary, folder, prompts, args.new, jsonl)  # untimed
            runs = [ours(binary, folder, prompts, args.new, jsonl)["tok_s"] for _ in range(args.runs)]
            int8[name][batch] = statistics.median(runs)
            print(f"{name} b{batch}: gpt2kit {[round(r, 1) for r in runs]} tok/s", flush=True)
    hf = {}
    if args.hf:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_generate.py")
        for batch in (1, BATCH8):
            cmd = [args.python, script, "--model", args.model, "--prompt", PROMPT,
                   "--batch", str(batch), "--new", str(args.new), "--dtype", "f32"]
            runs = []
            for _ in range(args.runs):
                r = json.loads(child(cmd).stdout.strip().splitlines()[-1])
                runs.append(r["tokens"] / r["seconds"])
            hf[batch] = statistics.median(runs)
            print(f"transformers f32 b{batch}: {[round(r, 1) for r in runs]} tok/s", flush=True)
    load_after = os.getloadavg()

    lines = [f"GGUF decode tok/s, {os.path.basename(os.path.normpath(args.model))} (random weights), greedy, {args.new} new tokens, "
             f"median of {args.runs}; ratio = gpt2kit / llama.cpp; {os.cpu_count()} cores, "
             f"llama.cpp n_threads=2.", "",
             f"| format | file MB | gpt2kit b1 tok/s | llama.cpp b1 tok/s | ratio | "
             f"gpt2kit b{BATCH8} tok/s | llama.cpp b{BATCH8} tok/s | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for m in formats:
        r = results[m]
        (a1, b1), (a8, b8) = r[1], r[BATCH8]
        lines.append(f"| {m} | {r['size'] / 1e6:.1f} | {a1:.1f} | {b1:.1f} | {a1 / b1:.2f}× | "
                     f"{a8:.1f} | {b8:.1f} | {a8 / b8:.2f}× |")
    if hf:
        lines += ["", f"Against transformers fp32 `generate()` on the safetensors folder, same prompt, "
                  f"{args.new} tokens (its time includes the prompt's pass; b{BATCH8} is the prompt "
                  f"{BATCH8} times): {hf[1]:.1f} / {hf[BATCH8]:.1f} tok/s (b1 / b{BATCH8}); gpt2kit "
                  f"on each file, × transformers: " + "; ".join(
                      f"{m} {results[m][1][0] / hf[1]:.2f}× / {results[m][BATCH8][0] / hf[BATCH8]:.2f}×"
                      for m in formats) + "."]
    if int8:
        lines += ["", f"gpt2kit's own int8 artifacts of the same model, same prompts and runs "
                  f"(`infer --model FOLDER`), tok/s b1 / b{BATCH8}: " + "; ".join(
                      f"{n} {r[1]:.1f} / {r[BATCH8]:.1f}" for n, r in int8.items()) + "."]
    lines += ["", "Bytes read per token (tensor data of the file less position_embd; KV cache not "
              "counted) and implied GB/s at batch 1, gpt2kit / llama.cpp: " + "; ".join(
                  f"{m} {results[m]['bytes'] / 1e6:.1f} MB: {results[m]['bytes'] * results[m][1][0] / 1e9:.2f}"
                  f" / {results[m]['bytes'] * results[m][1][1] / 1e9:.2f} GB/s" for m in formats) + ".",
              "", f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
              f"after: {', '.join(f'{x:.2f}' for x in load_after)}."]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    else:
        lines += ["", "Tokens: gpt2kit and llama.cpp generated the same tokens in every cell."]
    text = "\n".join(lines) + "\n"
    print()
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

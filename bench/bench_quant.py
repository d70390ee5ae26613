#!/usr/bin/env python3
"""int8 artifacts of the gpt2-shaped bench model against Hugging Face transformers fp32,
in the same run: greedy batch-1 decode tokens/s of `gpt2kit infer` on the float model
and on `int8-weight` / `int8-dynamic` artifacts (made here with `gpt2kit quantize`),
and of transformers' generate() in fp32. Prints markdown rows (and writes them to
--out when given); the rows have the columns of bench/run.py's table.

Both sides time generation only (model loading excluded), after an untimed warm-up,
as bench/run.py does. llama.cpp's Q8_0 reached 233 tok/s on the development machine
(about 6x transformers fp32 there); the last column gives our distance to it.

usage: bench_quant.py --binary target/release/gpt2kit --model target/bench/gpt2-random
"""
import argparse
import json
import os
import subprocess
import sys

PROMPT = "abc defg hij klmno pq rstu vwx yz"
NEW = 64
LLAMA_CPP_Q8_0 = 233.0


def ours(binary, model):
    cmd = [binary, "infer", "--model", model, "--max-new-tokens", str(NEW),
           "--min-new-tokens", str(NEW), "--stats", "--warmup", "1", "--prompt", PROMPT]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    return stats["generated_tokens"] / ((stats["prefill_ms"] + stats["decode_ms"]) / 1e3)


def theirs(python, model):
    cmd = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_generate.py"),
           "--model", model, "--prompt", PROMPT, "--batch", "1", "--new", str(NEW),
           "--dtype", "f32", "--beams", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return r["tokens"] / r["seconds"]


def artifact(binary, model, workdir, method):
    out = os.path.join(workdir, f"gpt2-{method}")
    if not os.path.isdir(out):
        subprocess.run([binary, "quantize", "--model", model, "--out", out, "--method", method,
                        "--decode-tokens", "0"], check=True, capture_output=True, text=True)
    return out


def size(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith(".safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True, help="the float gpt2-shaped bench model")
    ap.add_argument("--workdir", help="where the artifacts go (default: beside --model)")
    ap.add_argument("--out", help="also write the rows to this file")
    args = ap.parse_args()
    workdir = args.workdir or os.path.dirname(os.path.abspath(args.model))
    hf = theirs(sys.executable, args.model)
    base = size(args.model)
    rows = [
        "| row | gpt2kit tok/s | transformers tok/s | ratio | vs llama.cpp Q8_0 (233) | bytes |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    for label, method in [("greedy, batch 1, fp32", None),
                          ("greedy, batch 1, int8-weight", "int8-weight"),
                          ("greedy, batch 1, int8-dynamic (W8A8)", "int8-dynamic")]:
        model = args.model if method is None else artifact(args.binary, args.model, workdir, method)
        a = ours(args.binary, model)
        row = (f"| {label} | {a:.1f} | {hf:.1f} (fp32) | {a / hf:.2f}× | {a / LLAMA_CPP_Q8_0:.2f}× "
               f"| {size(model) / base * 100:.0f}% |")
        rows.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()

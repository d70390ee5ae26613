#!/usr/bin/env python3
"""`make bench`: gpt2kit against Hugging Face transformers in the same run, on the same
machine, same model shape (gpt2, 124M, random weights), same prompt, same settings and a
fixed generated length. Prints a markdown table of tokens/s and the ratio per row, and
writes it to target/bench/results.md.

Both sides time generation only (model loading excluded), after an untimed warm-up.
gpt2kit's time is prefill + decode from `--stats`; transformers' is generate()'s wall time.
"""
import argparse
import json
import os
import platform
import subprocess
import sys

PROMPT = "abc defg hij klmno pq rstu vwx yz"
NEW = 64
ROWS = [
    # (label, batch, dtype, sample, beams, extra: "draft" or "lookup" or None, target)
    ("greedy, batch 1, fp32", 1, "f32", False, 1, None, "≥ 2×"),
    ("greedy, batch 1, bf16", 1, "bf16", False, 1, None, "≥ 4× (vs transformers fp32)"),
    ("greedy, batch 8, fp32", 8, "f32", False, 1, None, "≥ 3×"),
    ("sampling top-k 50, top-p 0.95, T 0.7, fp32", 1, "f32", True, 1, None, "—"),
    ("beam 5, fp32", 1, "f32", False, 5, None, "≥ 2.5×"),
    ("greedy + 2-layer draft, 4 tokens/step, fp32", 1, "f32", False, 1, "draft", "—"),
    ("greedy + prompt lookup, 10 tokens/step, fp32", 1, "f32", False, 1, "lookup", "—"),
    ("greedy, batch 1, fp32, tensor parallel over cpu,cpu", 1, "f32", False, 1, "tp2",
     "overhead only (2 cores)"),
]
# Rows of the int8 and training benchmarks (their own scripts), by label prefix.
TARGETS = {
    "greedy, batch 1, int8-weight": "artifact ≤ 30% of fp32",
    "greedy, batch 1, int8-dynamic": "≥ 4×",
    "training": "≥ 1.2×",
}


def ours(binary, model, batch, dtype, sample, beams, extra):
    cmd = [binary, "infer", "--model", model, "--max-new-tokens", str(NEW), "--min-new-tokens", str(NEW),
           "--dtype", dtype, "--num-beams", str(beams), "--stats", "--warmup", "1"]
    cmd += ["--prompt", PROMPT] * batch
    if sample:
        cmd += ["--do-sample", "--top-k", "50", "--top-p", "0.95", "--temperature", "0.7", "--seed", "0"]
    if extra == "draft":
        cmd += ["--draft-model", os.path.join(model, "draft"), "--num-draft-tokens", "4"]
    if extra == "lookup":
        cmd += ["--prompt-lookup", "10"]
    if extra == "tp2":
        cmd += ["--devices", "cpu,cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    if "acceptance_rate" in stats:
        print(f"  (gpt2kit {extra}: acceptance {stats['acceptance_rate']:.2f}, "
              f"{stats['tokens_per_step']:.2f} tokens per target pass)", flush=True)
    tokens = stats["generated_tokens"]
    return tokens / ((stats["prefill_ms"] + stats["decode_ms"]) / 1e3)


def theirs(python, model, batch, dtype, sample, beams, extra):
    cmd = [python, os.path.join(os.path.dirname(__file__), "hf_generate.py"), "--model", model,
           "--prompt", PROMPT, "--batch", str(batch), "--new", str(NEW), "--dtype", dtype, "--beams", str(beams)]
    if sample:
        cmd.append("--sample")
    if extra == "draft":
        cmd += ["--draft", os.path.join(model, "draft")]
    if extra == "lookup":
        cmd += ["--prompt-lookup", "10"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return r["tokens"] / r["seconds"]


def refill_row(binary, model, out_dir):
    """32 prompts, each with its own max_new_tokens spread over 8-128, at most 8 live
    sequences: freed slots refilled at once, against static batches of 8 each run to
    its longest member, two ways: `--static-batches` (a batch admitted only when the last
    one is done; its finished rows leave, so its steps get cheaper), and as the
    left-padded engine before it ran them (every row decodes until the batch's longest
    member is done: each line's max_new_tokens raised to its batch's longest, only the
    requested tokens counted). Returns (refilled, static, padded) in tok/s."""
    rows = []
    for i in range(32):
        words = PROMPT.split()
        rows.append((" ".join(words[: 2 + i % (len(words) - 1)]), 8 + (i * 37) % 121))
    wanted = sum(n for _, n in rows)
    padded = [(p, max(n for _, n in rows[i // 8 * 8: i // 8 * 8 + 8])) for i, (p, _) in enumerate(rows)]

    def run(name, lines, extra):
        path = os.path.join(out_dir, name)
        with open(path, "w") as f:
            for prompt, n in lines:
                f.write(json.dumps({"prompt": prompt, "max_new_tokens": n}) + "\n")
        cmd = [binary, "infer", "--model", model, "--prompts", path, "--max-num-seqs", "8",
               "--stats", "--warmup", "1"] + extra
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
        stats = json.loads(p.stderr.strip().splitlines()[-1])
        return stats, (stats["prefill_ms"] + stats["decode_ms"]) / 1e3

    refill, t = run("refill_prompts.jsonl", rows, [])
    speeds = [refill["generated_tokens"] / t]
    static, t = run("refill_prompts.jsonl", rows, ["--static-batches"])
    speeds.append(static["generated_tokens"] / t)
    _, t = run("refill_padded_prompts.jsonl", padded, ["--static-batches"])
    speeds.append(min(wanted, refill["generated_tokens"]) / t)
    return speeds


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lines = [
        f"Machine: {cpu_name()}, {os.cpu_count()} cores; gpt2 shape (124M), random weights; "
        f"prompt of {len(PROMPT.split())} words, {NEW} generated tokens per sequence; tokens/s of generation.",
        "",
        "| row | gpt2kit tok/s | transformers tok/s | ratio | target |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    single = None  # gpt2kit's and transformers' greedy batch 1 fp32 (the first row)
    for label, batch, dtype, sample, beams, extra, target in ROWS:
        a = ours(args.binary, args.model, batch, dtype, sample, beams, extra)
        if extra == "tp2":
            # transformers has no CPU tensor parallelism: compare with gpt2kit unsplit.
            row = (f"| {label} | {a:.1f} | (gpt2kit unsplit: {single[0]:.1f}) "
                   f"| {a / single[0]:.2f}× | {target} |")
        else:
            b = theirs(sys.executable, args.model, batch, dtype, sample, beams, extra)
            if dtype == "f32":
                row = f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f}× | {target} |"
            else:
                # The target compares with transformers fp32 (the first row's run).
                row = (f"| {label} | {a:.1f} | {single[1]:.1f} (fp32); {b:.1f} ({dtype}) "
                       f"| {a / single[1]:.2f}× ({a / b:.2f}× vs {dtype}) | {target} |")
        if single is None:
            single = (a, b)
        lines.append(row)
        print(row, flush=True)
    a, b, c = refill_row(args.binary, args.model, os.path.dirname(os.path.abspath(args.out)))
    for what, base in (("static batches of 8, finished rows leave", b),
                       ("static batches of 8, padded to their longest", c)):
        row = (f"| continuous batching: 32 prompts, max_new_tokens 8-128 each, at most 8 live, "
               f"fp32 | {a:.1f} | (gpt2kit {what}: {base:.1f}) | {a / base:.2f}× | ≥ 1.4× |")
        lines.append(row)
        print(row, flush=True)
    notes = []
    here = os.path.dirname(os.path.abspath(__file__))
    for script in ("bench_quant.py", "bench_train.py"):
        cmd = [sys.executable, os.path.join(here, script), "--binary", args.binary,
               "--model", args.model]
        if script == "bench_train.py":
            cmd += ["--steps", "10"]  # 5 steps of ~5 s left the ratio swinging ±0.1
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
        for line in p.stdout.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or cells[0] in ("row", "") or set(cells[0]) <= set("-"):
                if line.strip() and not line.startswith("|"):
                    notes.append(line.strip())
                continue
            if cells[0] == "greedy, batch 1, fp32":
                continue  # bench_quant.py's float baseline repeats the first row
            target = next((t for k, t in TARGETS.items() if cells[0].startswith(k)), "—")
            # bench_quant.py adds: our speed over llama.cpp Q8_0's, the artifact's size.
            extra = (f" ({cells[4]} of llama.cpp Q8_0's 233 tok/s; {cells[5]} of the fp32 bytes)"
                     if len(cells) == 6 else "")
            row = f"| {cells[0]}{extra} | {cells[1]} | {cells[2]} | {cells[3]} | {target} |"
            lines.append(row)
            print(row, flush=True)
    lines += [""] + notes
    print("\n".join(notes), flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

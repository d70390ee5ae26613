#!/usr/bin/env python3
"""Training throughput: gpt2kit against Hugging Face transformers in one run, on the same
machine, same model (gpt2-124M shape, random weights), batch 4 x 256 tokens, fp32, AdamW
(torch.optim.AdamW on the transformers side), gradient clipping at 1.0 on both sides.

transformers runs eagerly (no torch.compile), its default attention, in train mode with
its dropouts set to 0: gpt2kit's training forward has no dropout, so both sides compute
the same thing. Both time optimizer steps only, after WARMUP untimed steps: transformers
with a wall clock around each step, gpt2kit from the per-step tokens/s it logs to
trainer_state.json (`--logging-steps 1`). Peak RSS is each process's own maximum.

Prints one markdown row: | row | gpt2kit tok/s | transformers tok/s | ratio | and a line
with peak memory.

Usage: bench_train.py --binary target/release/gpt2kit --model target/bench/gpt2-random
"""
import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

BATCH, BLOCK = 4, 256
LR = 1e-4


def make_data(path, tokens_needed, seed=0):
    # Random lowercase words; the bench tokenizer gives ~1.5-3 tokens per word.
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = 0
    with open(path, "w") as f:
        while words < tokens_needed:
            line = " ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(32))
            f.write(json.dumps({"text": line}) + "\n")
            words += 32


def ours(binary, model, steps, warmup, work):
    data = os.path.join(work, "train.jsonl")
    make_data(data, BATCH * BLOCK * (steps + warmup + 1))
    out = os.path.join(work, "out")
    cmd = [binary, "train", "--model", model, "--data", data, "--output", out,
           "--block-size", str(BLOCK), "--batch-size", str(BATCH), "--max-steps", str(steps + warmup),
           "--lr", str(LR), "--lr-scheduler", "constant", "--max-grad-norm", "1.0", "--logging-steps", "1"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(os.path.join(out, "final", "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    timed = [e for e in history if "tokens_per_s" in e and e["step"] > warmup]
    seconds = sum(BATCH * BLOCK / e["tokens_per_s"] for e in timed)
    return BATCH * BLOCK * len(timed) / seconds, rss_kb / 1024


def theirs_child(model, steps, warmup):
    import torch
    from transformers import GPT2LMHeadModel

    m = GPT2LMHeadModel.from_pretrained(
        model, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dtype=torch.float32
    )
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=LR)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + warmup):
        ids = torch.randint(0, m.config.vocab_size, (BATCH, BLOCK), generator=g)
        t0 = time.perf_counter()
        loss = m(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        float(loss)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens_per_s": BATCH * BLOCK * len(times) / sum(times), "rss_mb": rss_kb / 1024}))


def theirs(model, steps, warmup):
    p = subprocess.run([sys.executable, __file__, "--hf-child", "--model", model, "--steps", str(steps),
                        "--warmup", str(warmup)], check=True, capture_output=True, text=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return r["tokens_per_s"], r["rss_mb"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary")
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--hf-child", action="store_true")
    a = ap.parse_args()
    if a.hf_child:
        return theirs_child(a.model, a.steps, a.warmup)
    work = tempfile.mkdtemp(prefix="gpt2kit-bench-train-")
    try:
        # gpt2kit first: its peak RSS is then the only child's.
        ours_tps, ours_rss = ours(a.binary, a.model, a.steps, a.warmup, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    theirs_tps, theirs_rss = theirs(a.model, a.steps, a.warmup)
    print(f"| training, batch {BATCH} × {BLOCK}, fp32, AdamW ({a.steps} steps after {a.warmup}) "
          f"| {ours_tps:.0f} | {theirs_tps:.0f} | {ours_tps / theirs_tps:.2f}× |")
    print(f"peak RSS: gpt2kit {ours_rss:.0f} MiB, transformers {theirs_rss:.0f} MiB")


if __name__ == "__main__":
    main()

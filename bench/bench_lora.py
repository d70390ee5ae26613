#!/usr/bin/env python3
"""LoRA fine-tuning at the gpt2-xl shape (1.5B: n_embd 1600, 48 layers, 25 heads, random
weights): gpt2kit against Hugging Face transformers + peft in one run, on the same
machine, with the same settings: batch 1 × 512 tokens, LoRA r 16, lora_alpha 32,
lora_dropout 0 on `c_attn` only, gradient checkpointing on, AdamW (lr 1e-4, constant
schedule, torch.optim.AdamW on the peft side), gradient clipping at 1.0.

Two bases: fp32, and bf16. gpt2kit's bf16 row is `--base-dtype bf16` (the frozen base in
bf16, the forward in bf16, the adapter and its AdamW state in f32). On the peft side the
base is loaded with dtype=torch.bfloat16 and `get_peft_model` keeps its default
`autocast_adapter_dtype=True`, which in peft 0.21 upcasts the new lora_A/lora_B weights
to f32 (the child checks that they are f32): peft's LoRA layer then runs the base
Conv1D in bf16, casts its input to f32 for lora_B(lora_A(x)), adds, and casts the sum
back to bf16. The optimizer and gradients of the adapter are therefore f32 on both sides.

transformers runs eagerly (no torch.compile), its default attention, in train mode with
its dropouts set to 0 (gpt2kit's training forward has none), gradient checkpointing
through `gradient_checkpointing_enable(use_reentrant=False)`. Both sides time optimizer
steps only, after WARMUP untimed steps: peft with a wall clock around each step (forward,
backward, clipping, AdamW step), gpt2kit from the per-step tokens/s it logs to
trainer_state.json (`--logging-steps 1`; the timer stops before a checkpoint is saved).
gpt2kit's data is random words as JSONL, padded so that its token count is a whole
number of 512-token blocks (checked against the trainer's example count), so every
step is 512 tokens; peft's are random token ids. Peak RSS is each child's own maximum,
measured by GNU time (`/usr/bin/time -f %M`), so a child forked from this python does
not inherit its high-water mark. Nothing runs concurrently: one big process at a time.

Exact resume (gpt2kit only): the fp32 run saves a checkpoint every (WARMUP + STEPS) / 2
steps; that midway checkpoint is copied into a fresh output folder and `--resume`d to
the same final step. The resumed run's final `adapter_model.safetensors` must be
byte-identical to the uninterrupted run's, and its logged losses and gradient norms of
the steps after the checkpoint equal.

Prints a markdown table | row | gpt2kit tok/s | peft tok/s | ratio | gpt2kit peak RSS |
peft peak RSS |, peak-RSS lines against the targets, and the resume check; `--out FILE`
gets the same text.

Usage: bench_lora.py --binary BIN [--model DIR] [--steps 2] [--warmup 1]
       [--bf16-steps N] [--bases fp32,bf16] [--no-resume] [--out FILE]
  --model defaults to target/bench/gpt2-xl-random, written from target/bench/gpt2-random
  (memory_bench.write_xl) when missing; any GPT-2 folder works (target/bench/gpt2-random
  for a quick run). Run it with the python that has torch, transformers and peft.
"""
import argparse
import filecmp
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BATCH, BLOCK = 1, 512
LR = 1e-4
LORA_R, LORA_ALPHA = 16, 32
TARGET = "c_attn"


def run_timed(cmd, log):
    """Run `cmd` under GNU time: (seconds, peak RSS bytes); stdout and stderr go to `log`."""
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    tail = open(log).read().strip().splitlines()
    if p.returncode != 0:
        sys.exit(f"failed (exit {p.returncode}): {' '.join(cmd)}\n" + "\n".join(tail[-30:]))
    return wall, int(tail[-1]) * 1024


def make_data(path, model, blocks, seed=0):
    """Random lowercase words as JSONL, whose tokens (each document's plus the
    <|endoftext|> after it) fill exactly `blocks` blocks of BLOCK: the last document is
    cut to fit. Returns the number of blocks."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
    n = lambda text: len(tok.encode(text, add_special_tokens=False).ids) + 1
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    need, total, docs = blocks * BLOCK, 0, []
    while total < need:
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(32)]
        text = " ".join(words)
        if total + n(text) > need:
            # The last document: as many words as fit, then single letters to fill up.
            while words and total + n(" ".join(words)) > need:
                words.pop()
            while total + n(" ".join(words + ["a"])) <= need:
                words.append("a")
            text = " ".join(words)
        docs.append(text)
        total += n(text)
    if total != need:
        sys.exit(f"could not fill {blocks} blocks of {BLOCK} tokens exactly ({total} tokens)")
    with open(path, "w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    return blocks


def ours_cmd(binary, model, data, out, base, total, save_steps):
    cmd = [binary, "train", "--model", model, "--data", data, "--output", out,
           "--block-size", str(BLOCK), "--batch-size", str(BATCH), "--max-steps", str(total),
           "--lr", str(LR), "--lr-scheduler", "constant", "--max-grad-norm", "1.0",
           "--logging-steps", "1", "--lora-r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA),
           "--lora-dropout", "0", "--lora-target-modules", TARGET,
           "--base-dtype", "bf16" if base == "bf16" else "f32", "--gradient-checkpointing"]
    if save_steps:
        cmd += ["--save-steps", str(save_steps)]
    return cmd


def ours(binary, model, data, blocks, base, steps, warmup, work, save_steps=None):
    """gpt2kit's tokens/s over the steps after `warmup`, its peak RSS (bytes) and its
    output folder."""
    out = os.path.join(work, f"out-{base}")
    wall, rss = run_timed(ours_cmd(binary, model, data, out, base, steps + warmup, save_steps),
                          os.path.join(work, f"ours-{base}.log"))
    state = json.load(open(os.path.join(out, "final", "trainer_state.json")))
    if state["train_examples"] != blocks:
        sys.exit(f"gpt2kit made {state['train_examples']} examples of the data, not {blocks} full blocks")
    timed = [e for e in state["log_history"] if "tokens_per_s" in e and e["step"] > warmup]
    assert len(timed) == steps, state["log_history"]
    seconds = sum(BATCH * BLOCK / e["tokens_per_s"] for e in timed)
    print(f"gpt2kit {base}: {wall:.0f} s in all, step seconds "
          f"{[round(BATCH * BLOCK / e['tokens_per_s'], 1) for e in state['log_history']]}", flush=True)
    return BATCH * BLOCK * len(timed) / seconds, rss, out


def resume_check(binary, model, data, full_out, total, save_steps, work):
    """Resume the fp32 run's midway checkpoint in a fresh folder; compare with the full run."""
    ckpt = f"checkpoint-{save_steps}"
    out = os.path.join(work, "out-resumed")
    os.makedirs(out)
    shutil.copytree(os.path.join(full_out, ckpt), os.path.join(out, ckpt))
    cmd = ours_cmd(binary, model, data, out, "fp32", total, save_steps) + ["--resume", os.path.join(out, ckpt)]
    wall, _ = run_timed(cmd, os.path.join(work, "ours-resumed.log"))
    a = os.path.join(full_out, "final", "adapter_model.safetensors")
    b = os.path.join(out, "final", "adapter_model.safetensors")
    same_bytes = filecmp.cmp(a, b, shallow=False)
    diff = ""
    if not same_bytes:
        x, y = open(a, "rb").read(), open(b, "rb").read()
        first = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
        diff = f" (sizes {len(x)} and {len(y)}, first differing byte at {first})"
    hist = lambda o: {e["step"]: e for e in json.load(open(os.path.join(o, "final", "trainer_state.json")))["log_history"]
                      if "loss" in e}
    h_full, h_res = hist(full_out), hist(out)
    after = range(save_steps + 1, total + 1)
    pairs = [(s, h_full[s]["loss"], h_res.get(s, {}).get("loss"),
              h_full[s]["grad_norm"], h_res.get(s, {}).get("grad_norm")) for s in after]
    same_losses = all(l1 == l2 and g1 == g2 for _, l1, l2, g1, g2 in pairs)
    losses = ", ".join(f"step {s}: {l1!r} / {l2!r}" for s, l1, l2, _, _ in pairs)
    ok = same_bytes and same_losses
    return (f"Exact resume (gpt2kit, fp32 base): {total} steps uninterrupted against "
            f"{ckpt} resumed in a fresh folder to step {total} ({wall:.0f} s): "
            f"final adapter_model.safetensors {'byte-identical' if same_bytes else 'DIFFERENT' + diff}; "
            f"losses and grad norms after the checkpoint {'equal' if same_losses else 'DIFFERENT'} "
            f"(uninterrupted / resumed: {losses}) {'✓' if ok else '✗'}")


def theirs_child(model, base, steps, warmup):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    dtype = torch.bfloat16 if base == "bf16" else torch.float32
    m = GPT2LMHeadModel.from_pretrained(model, dtype=dtype, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=[TARGET],
                     fan_in_fan_out=True, task_type="CAUSAL_LM")
    m = get_peft_model(m, cfg)  # autocast_adapter_dtype=True: the adapter in f32
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    adapter_dtypes = sorted({str(p.dtype) for p in params})
    assert adapter_dtypes == ["torch.float32"], adapter_dtypes
    assert m.base_model.model.transformer.h[0].attn.c_attn.base_layer.weight.dtype == dtype
    opt = torch.optim.AdamW(params, lr=LR)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + warmup):
        ids = torch.randint(0, m.config.vocab_size, (BATCH, BLOCK), generator=g)
        t0 = time.perf_counter()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        float(loss)
        times.append(time.perf_counter() - t0)
    print(f"peft {base}: step seconds {[round(t, 1) for t in times]}, loss {float(loss):.4f}, "
          f"{sum(p.numel() for p in params)} trainable parameters ({adapter_dtypes[0]}), "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    timed = times[warmup:]
    print(json.dumps({"tokens_per_s": BATCH * BLOCK * len(timed) / sum(timed)}))


def theirs(model, base, steps, warmup, work):
    log = os.path.join(work, f"theirs-{base}.log")
    wall, rss = run_timed([sys.executable, os.path.abspath(__file__), "--hf-child", "--model", model,
                           "--base", base, "--steps", str(steps), "--warmup", str(warmup)], log)
    lines = open(log).read().strip().splitlines()
    print(next(l for l in lines if l.startswith(f"peft {base}:")) + f"; {wall:.0f} s in all", flush=True)
    return json.loads(next(l for l in reversed(lines) if l.startswith("{")))["tokens_per_s"], rss


def gb(b):
    return f"{b / 1e9:.2f} GB ({b / 2**30:.2f} GiB)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary")
    ap.add_argument("--model", default="target/bench/gpt2-xl-random")
    ap.add_argument("--small", default="target/bench/gpt2-random",
                    help="the model whose tokenizer the gpt2-xl-shaped model gets, when it is written")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bf16-steps", type=int, help="timed steps of the bf16 rows (default --steps)")
    ap.add_argument("--bases", default="fp32,bf16")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--hf-child", action="store_true")
    ap.add_argument("--base", default="fp32")
    a = ap.parse_args()
    if a.hf_child:
        return theirs_child(a.model, a.base, a.steps, a.warmup)
    if not a.binary:
        ap.error("--binary is required")
    start = time.perf_counter()
    if not os.path.exists(os.path.join(a.model, "config.json")) and os.path.basename(a.model.rstrip("/")) == "gpt2-xl-random":
        from memory_bench import write_xl
        write_xl(a.small, a.model)
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    shape = (cfg["n_embd"], cfg["n_layer"], cfg["n_head"])
    name = {(1600, 48, 25): "gpt2-xl", (768, 12, 12): "gpt2", (1024, 24, 16): "gpt2-medium"}.get(
        shape, "n_embd {}, {} layers, {} heads".format(*shape))
    bases = a.bases.split(",")
    load = os.getloadavg()
    work = tempfile.mkdtemp(prefix="gpt2kit-bench-lora-")
    rows, rss_lines, resume_line = [], [], None
    try:
        total_max = a.warmup + max(a.steps, a.bf16_steps or a.steps)
        data = os.path.join(work, "train.jsonl")
        blocks = make_data(data, a.model, total_max + 2)
        for base in bases:
            steps = a.bf16_steps if base == "bf16" and a.bf16_steps else a.steps
            total = steps + a.warmup
            save = total // 2 if base == "fp32" and not a.no_resume and total >= 2 else None
            ours_tps, ours_rss, out = ours(a.binary, a.model, data, blocks, base, steps, a.warmup, work, save)
            if save:
                resume_line = resume_check(a.binary, a.model, data, out, total, save, work)
                print(resume_line, flush=True)
            theirs_tps, theirs_rss = theirs(a.model, base, steps, a.warmup, work)
            rows.append(f"| LoRA r {LORA_R} `{TARGET}`, {name} shape, batch {BATCH} × {BLOCK}, {base} base, "
                        f"gradient checkpointing, AdamW ({steps} steps after {a.warmup}) | {ours_tps:.1f} | "
                        f"{theirs_tps:.1f} | {ours_tps / theirs_tps:.2f}× {'✓' if ours_tps >= 1.2 * theirs_tps else '✗'} | "
                        f"{ours_rss / 1e9:.2f} GB | "
                        f"{theirs_rss / 1e9:.2f} GB |")
            print(rows[-1], flush=True)
            target = {"fp32": 12e9, "bf16": 8e9}[base] if name == "gpt2-xl" else None
            mark = f" (target ≤ {target / 1e9:.0f} GB {'✓' if ours_rss <= target else '✗'})" if target else ""
            rss_lines.append(f"peak RSS, {base} base: gpt2kit {gb(ours_rss)}{mark}, transformers + peft {gb(theirs_rss)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"Load average at start: {load[0]:.2f} (1 min) on {os.cpu_count()} cores.", "",
             "| row | gpt2kit tok/s | transformers + peft tok/s | ratio (target ≥ 1.20×) | gpt2kit peak RSS "
             "| transformers + peft peak RSS |", "|---|---|---|---|---|---|"] + rows + [""] + rss_lines
    if resume_line:
        lines += ["", resume_line]
    lines += ["", f"Wall time of the whole bench: {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    if a.out:
        open(a.out, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Training on one device: `gpt2kit train` against transformers' Trainer at the settings
its users pick for speed (on CUDA: `bf16=True` or fp32 with `tf32=True`,
`optim="adamw_torch_fused"`, SDPA attention), same model folder, same batches, in one run.

Both sides train on the same data: one block of exactly BLOCK tokens (random words and
`<|endoftext|>`, as gpt2kit packs a text row), repeated, so that every micro-batch of
either side holds the same rows whatever order its sampler draws them in, and their loss
curves can be compared step by step. Constant learning rate, no warmup, no weight decay,
clipping at 1.0, dropout off on the transformers side (gpt2kit's training forward has
none). Timed: optimizer steps after WARMUP untimed ones, transformers with a wall clock
around each step (after a device synchronisation), gpt2kit from the per-step tokens/s it
logs to trainer_state.json.

Prints a markdown row per side pair: tokens/s, the ratio, and how far apart the loss
curves are (the largest relative gap over the compared steps, and at the first step,
where both sides hold the same weights).

Usage (CUDA, the issue's shape):
  bench_train_trainer.py --binary target/release/gpt2kit --model DIR --device cuda \
      --dtype bf16 --batch 16 --block 1024 --steps 50 --warmup 3
On the CPU (a check that the script runs): --device cpu --dtype f32 --batch 2 --block 64
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time


def one_block(tokenizer_dir, block, seed=0):
    """Text whose tokens plus `<|endoftext|>` are exactly `block`, and those ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = []
    while True:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 6)))
        ids = tok.encode(" ".join(words + [word]), add_special_tokens=False).ids
        if len(ids) + 1 < block:
            words.append(word)
        elif len(ids) + 1 == block:
            words.append(word)
            return " ".join(words), ids + [eos]
        # one word too long: try another


def ours(a, text, work):
    data = os.path.join(work, "train.jsonl")
    with open(data, "w") as f:
        for _ in range(a.batch * (a.steps + a.warmup) + 1):
            f.write(json.dumps({"text": text}) + "\n")
    out = os.path.join(work, "ours")
    cmd = [a.binary, "train", "--model", a.model, "--data", data, "--output", out,
           "--block-size", str(a.block), "--batch-size", str(a.batch),
           "--max-steps", str(a.steps + a.warmup), "--lr", str(a.lr), "--lr-scheduler", "constant",
           "--max-grad-norm", "1.0", "--logging-steps", "1", "--device", a.device,
           "--dtype", a.dtype, "--seed", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"gpt2kit train failed:\n{r.stderr}")
    with open(os.path.join(out, "final", "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    timed = [e for e in history if "tokens_per_s" in e and e["step"] > a.warmup]
    seconds = sum(a.batch * a.block / e["tokens_per_s"] for e in timed)
    return a.batch * a.block * len(timed) / seconds, losses


def theirs(a, ids, work):
    import torch
    from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    cuda = a.device.startswith("cuda")
    model = GPT2LMHeadModel.from_pretrained(
        a.model, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    row = torch.tensor(ids)
    n = a.batch * (a.steps + a.warmup)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"input_ids": row, "labels": row}

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.t = [], [], None

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    clock = Clock()
    args = TrainingArguments(
        output_dir=os.path.join(work, "theirs"), per_device_train_batch_size=a.batch,
        max_steps=a.steps + a.warmup, learning_rate=a.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        optim="adamw_torch_fused", bf16=a.dtype == "bf16", tf32=True if cuda else None,
        use_cpu=not cuda, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[clock])
    trainer.train()
    timed = clock.times[a.warmup:]
    losses = clock.losses
    if not getattr(trainer, "_loss_shifts_labels", True):
        # This transformers divides the summed loss by every label of the batch, the
        # first of each row included, though no position predicts it (it decides so when
        # the model's `loss_type` is unset): its losses and gradients are (block - 1) /
        # block of the mean over the predicted tokens, which gpt2kit reports. Clipping and
        # Adam's normalised step cancel the gradients' factor; the losses are rescaled.
        print(f"(transformers' losses rescaled by {a.block}/{a.block - 1}: it counted every label)")
        losses = [x * a.block / (a.block - 1) for x in losses]
    return a.batch * a.block * len(timed) / sum(timed), losses


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", required=True)
    p.add_argument("--model", required=True, help="a Hugging Face GPT-2 folder (tokenizer.json included)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["f32", "bf16"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50, help="timed and compared steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    a = p.parse_args()
    text, ids = one_block(a.model, a.block)
    with tempfile.TemporaryDirectory() as work:
        ours_tps, ours_losses = ours(a, text, work)
        theirs_tps, theirs_losses = theirs(a, ids, work)
    steps = min(len(ours_losses), len(theirs_losses))
    gaps = [abs(x - y) / abs(y) for x, y in zip(ours_losses[:steps], theirs_losses[:steps])]
    print(f"| {a.device} {a.dtype}, batch {a.batch} x {a.block} | gpt2kit {ours_tps:.0f} tok/s | "
          f"transformers Trainer {theirs_tps:.0f} tok/s | {ours_tps / theirs_tps:.2f}x | "
          f"losses over {steps} steps: first-step gap {gaps[0]:.2e}, largest {max(gaps):.2e} |")
    print("gpt2kit losses:     ", " ".join(f"{x:.4f}" for x in ours_losses[:steps]))
    print("transformers losses:", " ".join(f"{x:.4f}" for x in theirs_losses[:steps]))


if __name__ == "__main__":
    main()

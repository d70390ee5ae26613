#!/usr/bin/env python3
"""PyTorch / transformers references for gpt2kit's training stage.

Default mode (run by `make reference`), on the reference model MODELS/hub-tied:
  * two AdamW steps (torch.optim.AdamW, weight decay on >=2-D tensors only, gradient
    clipping with torch.nn.utils.clip_grad_norm_) on a fixed batch whose labels ignore
    some positions: losses, gradient norms and the updated weights;
  * transformers' get_scheduler learning-rate multipliers (constant_with_warmup, linear,
    cosine) over ten steps;
  * an eval JSONL file and its mean token cross-entropy, packed as gpt2kit packs it
    (<|endoftext|> after every document, blocks of EVAL_BLOCK tokens, the last partial
    block kept).
Written to MODELS/train/.

Helper modes, called by gpt2kit's tests with a folder gpt2kit wrote:
  --logits DIR --ids 1,2,3 --out FILE   transformers' fp32 logits for the ids
  --read-tensorboard DIR                 every scalar TensorBoard's reader finds, as JSON
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

LR = 1e-3
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0
EVAL_BLOCK = 16
EVAL_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a cache holds keys and values for every layer",
    "tensor layer head attention norm bias weight gradient loss step",
    "café naïve 日本語 🚀 numbers 0 1 2 42 1997",
]


def optimizer_step_reference(models, out):
    from transformers import GPT2LMHeadModel, get_scheduler

    model = GPT2LMHeadModel.from_pretrained(os.path.join(models, "hub-tied")).float()
    model.eval()  # no dropout: gpt2kit's training forward has none
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt whose tokens the loss ignores
    labels[1, 10:] = -100
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )
    losses, norms = [], []
    for _ in range(2):
        loss = model(ids, labels=labels).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)))
        losses.append(float(loss))
        opt.step()
        opt.zero_grad()
    weights = {k: v.contiguous() for k, v in model.transformer.state_dict().items() if ".attn.bias" not in k and "masked_bias" not in k}
    save_file(weights, os.path.join(out, "adamw_weights.safetensors"))

    schedules = {}
    for name in ["constant_with_warmup", "linear", "cosine"]:
        p = torch.nn.Parameter(torch.zeros(1))
        o = torch.optim.SGD([p], lr=1.0)
        s = get_scheduler(name, o, num_warmup_steps=3, num_training_steps=10)
        lrs = []
        for _ in range(10):
            lrs.append(o.param_groups[0]["lr"])
            o.step()
            s.step()
        schedules[name] = lrs
    return {
        "ids": ids.tolist(),
        "labels": labels.tolist(),
        "lr": LR,
        "betas": list(BETAS),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM,
        "losses": losses,
        "grad_norms": norms,
        "schedules": {"warmup_steps": 3, "total_steps": 10, **schedules},
    }


def eval_reference(models, out):
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    folder = os.path.join(models, "hub-tied")
    model = GPT2LMHeadModel.from_pretrained(folder).float().eval()
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    eos = model.config.eos_token_id
    stream = []
    with open(os.path.join(out, "eval.jsonl"), "w", encoding="utf-8") as f:
        for t in EVAL_TEXTS:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
            stream += tok.encode(t, add_special_tokens=False).ids + [eos]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(stream), EVAL_BLOCK):
            block = stream[i : i + EVAL_BLOCK]
            if len(block) < 2:
                continue
            ids = torch.tensor([block])
            logits = model(ids).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += len(block) - 1
    return {"eval_block_size": EVAL_BLOCK, "eval_loss": total / count, "eval_tokens": count}


def logits_mode(folder, ids, out):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).float().eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].contiguous()
    save_file({"logits": logits}, out)


def read_tensorboard(logdir):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    scalars = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("scalars", []):
            scalars.setdefault(tag, []).extend([e.step, e.value] for e in mux.Scalars(run, tag))
    print(json.dumps(scalars))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", help="the reference models folder (make_reference.py's --out)")
    ap.add_argument("--logits")
    ap.add_argument("--ids")
    ap.add_argument("--out")
    ap.add_argument("--read-tensorboard")
    a = ap.parse_args()
    if a.read_tensorboard:
        return read_tensorboard(a.read_tensorboard)
    if a.logits:
        return logits_mode(a.logits, [int(x) for x in a.ids.split(",")], a.out)
    out = os.path.join(a.models, "train")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    expected = optimizer_step_reference(a.models, out)
    expected.update(eval_reference(a.models, out))
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


if __name__ == "__main__":
    main()

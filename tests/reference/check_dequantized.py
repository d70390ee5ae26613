#!/usr/bin/env python3
"""Loads a folder written by `gpt2kit dequantize` with Hugging Face transformers and
writes its fp32 logits for the given token ids, so that the Rust test can compare them
with the engine's logits on the int8 artifact.

Fails (exit 1) if transformers reports missing or unexpected weights: a folder that
loads only partially would otherwise be silently half-random.

usage: check_dequantized.py --model DIR --ids '[[1, 2, 3], [4, 5, 6]]' --out FILE.safetensors
"""
import argparse
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="JSON list of equal-length id lists")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, info = GPT2LMHeadModel.from_pretrained(
        a.model, dtype=torch.float32, output_loading_info=True
    )
    # The causal-mask buffers are not weights; anything else missing is an error.
    missing = [k for k in info["missing_keys"] if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or info["unexpected_keys"] or info.get("mismatched_keys"):
        print(json.dumps(info, default=str), file=sys.stderr)
        sys.exit(1)
    model.eval()
    ids = torch.tensor(json.loads(a.ids), dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits.float().contiguous()
    save_file({"logits": logits}, a.out)
    print(json.dumps({"n_layer": model.config.n_layer, "shape": list(logits.shape)}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Times Hugging Face transformers' generate() for one benchmark row and prints one JSON
line: {"tokens": generated tokens (all sequences), "seconds": wall time of generate}.
The same prompt, settings and generated length as the gpt2kit row it is compared with;
2 threads (the machine's cores); one untimed warm-up run first.

Usage: hf_generate.py --model DIR --prompt TEXT --batch B --new N --dtype f32|bf16
                      [--sample] [--beams K] [--draft DIR] [--prompt-lookup N]
"""
import argparse
import json
import time

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--sample", action="store_true")
    ap.add_argument("--beams", type=int, default=1)
    ap.add_argument("--draft", help="assistant model folder (assisted generation)")
    ap.add_argument("--prompt-lookup", type=int, help="prompt_lookup_num_tokens")
    args = ap.parse_args()
    torch.set_num_threads(2)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = GPT2LMHeadModel.from_pretrained(args.model, dtype=dtype).eval()
    ids = tok([args.prompt] * args.batch, return_tensors="pt")
    kwargs = dict(
        max_new_tokens=args.new,
        min_new_tokens=args.new,  # a fixed generated length: EOS cannot stop early
        pad_token_id=tok.eos_token_id,
        num_beams=args.beams,
        do_sample=args.sample,
    )
    if args.sample:
        kwargs.update(top_k=50, top_p=0.95, temperature=0.7)
    if args.draft:
        kwargs["assistant_model"] = GPT2LMHeadModel.from_pretrained(args.draft, dtype=dtype).eval()
        kwargs["num_assistant_tokens"] = 4
        kwargs["num_assistant_tokens_schedule"] = "constant"
    if args.prompt_lookup:
        kwargs["prompt_lookup_num_tokens"] = args.prompt_lookup
    with torch.inference_mode():
        model.generate(**ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        torch.manual_seed(0)
        start = time.perf_counter()
        out = model.generate(**ids, **kwargs)
        seconds = time.perf_counter() - start
    tokens = (out.shape[1] - ids["input_ids"].shape[1]) * (1 if args.beams > 1 else args.batch)
    print(json.dumps({"tokens": int(tokens), "seconds": seconds}))


if __name__ == "__main__":
    main()

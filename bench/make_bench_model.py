#!/usr/bin/env python3
"""Writes a randomly initialised GPT-2 of the published gpt2 (124M) shape as a Hugging
Face folder, with a byte-level BPE tokenizer of the full 50257-token vocabulary trained
on generated text (no pretrained weights or tokenizer can be downloaded here). Speed does
not depend on the weights' values, only on the shape.

Also writes DIR/draft: a 2-layer model of the same width and tokenizer (speculative
decoding rows).

Usage: make_bench_model.py --out DIR
"""
import argparse
import os
import random

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

VOCAB = 50257


def corpus(seed=0, n_words=400_000):
    # Random "words" over a small alphabet give enough distinct pairs for 50k merges.
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    line = []
    for _ in range(n_words):
        line.append("".join(rng.choice(letters) for _ in range(rng.randint(1, 9))))
        if len(line) == 16:
            yield " ".join(line)
            line = []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus(), vocab_size=VOCAB, min_frequency=1, special_tokens=["<|endoftext|>"])
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")
    GPT2TokenizerFast(tokenizer_object=tok._tokenizer, eos_token="<|endoftext|>").save_pretrained(args.out)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, bos_token_id=eos, eos_token_id=eos)  # gpt2: 12 × 12 × 768
    GPT2LMHeadModel(cfg).save_pretrained(args.out)
    # A 2-layer draft with the same tokenizer, for speculative decoding rows.
    draft = os.path.join(args.out, "draft")
    GPT2TokenizerFast(tokenizer_object=tok._tokenizer, eos_token="<|endoftext|>").save_pretrained(draft)
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=2, bos_token_id=eos, eos_token_id=eos)).save_pretrained(draft)
    print(f"wrote {args.out} and {draft}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Builds small random GPT-2 models with Hugging Face transformers and writes what
transformers computes for them, for gpt2kit's Rust tests to compare against.

Each model is a Hugging Face folder under OUT/<name>/ (config.json, weights, tokenizer)
plus OUT/<name>/expected.json (token ids, greedy tokens) and
OUT/<name>/expected.safetensors (fp32 logits). The models cover both key namings
(the Hub's unprefixed `h.0...` and save_pretrained's `transformer.h.0...`), tied and
untied heads, a sharded checkpoint, f16 and bf16 files, both tokenizer formats, and the
config options of GPT-2's attention and MLP.

Run by `make reference` (and so by `make test`) in the pinned virtual environment.
"""
import argparse
import json
import os
import random

import torch
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, GPT2TokenizerFast

PROMPTS = [
    "The quick brown fox",
    "In 1997, the café on the corner served 日本語 tea",
    "Hello",
    "def main():\n    return 42  # 🚀",
]
MAX_NEW_TOKENS = 12
# Greedy tokens are compared exactly; a step whose top two logits lie closer than this
# could flip under fp32 reordering, so such a model/prompt is rejected here.
MIN_MARGIN = 1e-3

WORDS = (
    "the model reads every weight once per token so decode speed is set by memory "
    "a cache holds keys and values quick brown fox jumps over lazy dog café naïve "
    "日本語 テキスト 中文 emoji 🚀 ✨ numbers 0 1 2 42 1997 def return main print if else "
    "while for in tensor layer head attention norm bias weight gradient loss step"
).split()


def corpus(n_lines=3000, seed=0):
    rng = random.Random(seed)
    for _ in range(n_lines):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))


def train_tokenizer(vocab_size):
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        corpus(), vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"]
    )
    return tok


def hub_style_save(model, folder, dtype):
    """Writes model.safetensors as the Hub's gpt2 file does: no `transformer.` prefix,
    no lm_head, and the legacy attn.bias / attn.masked_bias buffers present."""
    cfg = model.config
    sd = {k: v.to(dtype).contiguous() for k, v in model.transformer.state_dict().items()}
    p = cfg.n_positions
    for i in range(cfg.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(p, p)).view(1, 1, p, p).to(dtype)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4, dtype=dtype)
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(folder)


def greedy_margin(model, ids, n):
    """Smallest gap between the top two logits over a greedy continuation."""
    worst = float("inf")
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[0, -1]
            top = torch.topk(logits, 2).values
            worst = min(worst, float(top[0] - top[1]))
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return worst


def until_eos(tokens, eos_list):
    """A batch row's tokens up to and including its first EOS (the rest is padding)."""
    for i, t in enumerate(tokens):
        if t in eos_list:
            return tokens[: i + 1]
    return tokens


def reference_outputs(model, hf_tok, folder):
    model.eval()
    eos = model.config.eos_token_id
    eos_list = eos if isinstance(eos, list) else [eos]
    pad = eos_list[0]
    ids = [hf_tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    out = {"prompts": PROMPTS, "ids": ids, "max_new_tokens": MAX_NEW_TOKENS}
    tensors = {}
    with torch.no_grad():
        greedy = []
        for i, row in enumerate(ids):
            x = torch.tensor([row])
            tensors[f"single.{i}"] = model(x).logits[0].float().contiguous()
            margin = greedy_margin(model, x, MAX_NEW_TOKENS)
            assert margin > MIN_MARGIN, f"{folder}: prompt {i} greedy margin {margin}"
            g = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos_list,
            )
            greedy.append(g[0, len(row):].tolist())
        out["greedy"] = greedy
        # A left-padded batch, with generate's positions (cumsum of the mask - 1).
        t = max(map(len, ids))
        batch = torch.tensor([[pad] * (t - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in ids])
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = model(batch, attention_mask=mask, position_ids=pos).logits
        tensors["batch"] = logits.float().contiguous()
        tensors["batch_mask"] = mask.contiguous()
        g = model.generate(
            batch,
            attention_mask=mask,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos_list,
        )
        out["greedy_batch"] = [until_eos(r[t:].tolist(), eos_list) for r in g]
    # The tokenizer on harder strings too.
    extra = ["", " ", "  leading spaces", "a\u0000b", "ünïcödé 😀👍🏽 한국어", "<|endoftext|>x", "\r\n\t end"]
    out["tokenizer_cases"] = [{"text": s, "ids": hf_tok(s, add_special_tokens=False)["input_ids"]} for s in extra]
    save_file(tensors, os.path.join(folder, "expected.safetensors"))
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)


def build(out, name, cfg_kwargs, seed, save, tokenizer_format, dtype=torch.float32):
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    tok = train_tokenizer(cfg_kwargs.pop("vocab_size"))
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, **cfg_kwargs)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()
    # The reference runs in fp32 on exactly the weights the file stores.
    if dtype != torch.float32:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
    if save == "hub":
        hub_style_save(model, folder, dtype)
    elif save == "sharded":
        model.to(dtype).save_pretrained(folder, max_shard_size="100KB")
        model.float()
    else:
        model.to(dtype).save_pretrained(folder)
        model.float()
    if tokenizer_format == "json":
        hf_tok = GPT2TokenizerFast(tokenizer_object=tok._tokenizer, eos_token="<|endoftext|>")
        hf_tok.save_pretrained(folder)
        for f in ("vocab.json", "merges.txt"):  # only tokenizer.json may be used
            if os.path.exists(os.path.join(folder, f)):
                os.remove(os.path.join(folder, f))
    else:
        tok.save_model(folder)  # vocab.json + merges.txt
        hf_tok = GPT2Tokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    reference_outputs(model, hf_tok, folder)
    print(f"{name}: {sorted(os.listdir(folder))}")


def ensemble_reference(out):
    """Greedy decoding of two different models that share a tokenizer, combined as
    fairseq's EnsembleModel does (mean of probabilities, optionally weighted) or as the
    renormalised mean of log-probabilities; written to OUT/ensemble.json."""
    names = ["sharded-f16", "bf16-quickgelu"]  # same corpus and vocab size: one tokenizer
    models = [GPT2LMHeadModel.from_pretrained(os.path.join(out, n), dtype=torch.float32).eval() for n in names]
    with open(os.path.join(out, names[0], "expected.json")) as f:
        prompts = json.load(f)["ids"]
    cases = []
    for mode, weights in [("mean-prob", [0.5, 0.5]), ("mean-prob", [0.8, 0.2]), ("mean-logprob", [0.5, 0.5])]:
        w = torch.tensor(weights)
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            tokens, first, tie = [], None, False
            with torch.no_grad():
                for _ in range(MAX_NEW_TOKENS):
                    logp = torch.stack([m(ids).logits[0, -1].log_softmax(-1) for m in models])  # (M, V)
                    if mode == "mean-prob":
                        combined = torch.logsumexp(logp + w.log()[:, None], dim=0)
                    else:
                        combined = (logp * w[:, None]).sum(0).log_softmax(-1)
                    top = torch.topk(combined, 2).values
                    tie |= float(top[0] - top[1]) <= MIN_MARGIN
                    if first is None:
                        first = combined.tolist()
                    nxt = int(combined.argmax())
                    tokens.append(nxt)
                    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if tie:  # a near-tie could flip under fp32 reordering: not a fair exact test
                continue
            cases.append({"mode": mode, "weights": weights, "prompt": prompt, "tokens": tokens, "first_logprobs": first})
    assert len(cases) >= 6, f"only {len(cases)} ensemble cases without near-ties"
    with open(os.path.join(out, "ensemble.json"), "w") as f:
        json.dump({"models": names, "max_new_tokens": MAX_NEW_TOKENS, "cases": cases}, f)
    print(f"ensemble: {len(cases)} cases")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    common = dict(n_positions=64, initializer_range=0.1)
    build(
        args.out, "hub-tied",
        dict(vocab_size=400, n_layer=2, n_head=4, n_embd=64, **common),
        seed=1, save="hub", tokenizer_format="json",
    )
    build(
        args.out, "prefixed-untied",
        dict(vocab_size=350, n_layer=3, n_head=2, n_embd=32, n_inner=96,
             activation_function="gelu", scale_attn_by_inverse_layer_idx=True,
             reorder_and_upcast_attn=True, tie_word_embeddings=False, **common),
        seed=2, save="pretrained", tokenizer_format="vocab-merges",
    )
    build(
        args.out, "sharded-f16",
        dict(vocab_size=300, n_layer=2, n_head=3, n_embd=48, activation_function="relu",
             scale_attn_weights=False, **common),
        seed=3, save="sharded", tokenizer_format="json", dtype=torch.float16,
    )
    build(
        args.out, "bf16-quickgelu",
        dict(vocab_size=300, n_layer=2, n_head=2, n_embd=32, activation_function="quick_gelu",
             layer_norm_epsilon=1e-6, **common),
        seed=4, save="hub", tokenizer_format="json", dtype=torch.bfloat16,
    )
    ensemble_reference(args.out)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes what Hugging Face transformers' `generate()` produces for the small random
GPT-2 models built by make_reference.py, so that gpt2kit's Rust decoders (greedy, beam
search, logits processors and sampling warpers) can be checked token for token.

For each model folder MODELS/<name>/ this writes:

* generation.json
    "cases": one entry per generate() call: the prompts (token ids), the exact
      generate() keyword arguments ("settings", plus "seed" for sampling cases: the
      value given to torch.manual_seed right before generate), the generated token ids
      of every returned sequence (prompt-major, then return index; cut right after the
      first EOS, so the padding after it is dropped), beam search's sequences_scores,
      and for non-beam cases the log-probability of every generated token under the
      processed distribution (compute_transition_scores(..., normalize_logits=True)).
    "warp_cases": index and settings of every tensor pair in warp.safetensors, and the
      processors transformers builds for those settings, in the order it applies them.
* warp.safetensors
    "ids"     prompt 0 (int64), "raw" the fp32 logits of its last position (V,),
    "warp.<i>" log_softmax of "raw" after transformers' logits processors and
              warpers for warp case i (float32, -inf where a token was removed).

All cases are deterministic (fixed seeds, two CPU threads). Random models rarely emit
their EOS token, so the cases that must stop early pass a second EOS id taken from the
greedy continuation of the same prompt (the script searches for one that works), and
asserts check that they do stop early. Since tokens are compared exactly, no greedy or
beam case may hinge on a near-tie: greedy steps need a top-two gap of MIN_MARGIN, the
returned beams clearly different scores, and every deterministic case must give the
same tokens when its scores are jittered by JITTER; each warp case must remove the same
tokens when its logits are jittered. The first step of every sampling case is checked
against the warp built for the same settings, which shows that the processors are
built the way generate() builds them.

Usage: python make_generation_reference.py --models target/reference
"""
import argparse
import json
import math
import os
import time

import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as hf_logging

# Models that get the full set of cases, and the one that gets a few greedy/beam ones.
FULL_MODELS = ("hub-tied", "prefixed-untied")
SMALL_MODELS = ("sharded-f16",)

MAX_NEW = 12
# A greedy step whose top two processed logits lie closer than this could flip under a
# different fp32 summation order, so such a case is rejected.
MIN_MARGIN = 1e-3

# Seeded sampling cases (all on prompt 0). The same settings are also written as warp
# cases, so the first step of each can be checked against warp.safetensors.
SAMPLING = [
    ("sample-default", {"do_sample": True}, 101),  # transformers' default top_k=50 applies
    ("sample-temp-topk-topp", {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9}, 102),
    ("sample-min-p", {"do_sample": True, "min_p": 0.1}, 103),
    ("sample-typical", {"do_sample": True, "typical_p": 0.8}, 104),
    ("sample-epsilon", {"do_sample": True, "epsilon_cutoff": 3e-3}, 105),
    ("sample-eta", {"do_sample": True, "eta_cutoff": 3e-3}, 106),
    ("sample-rep-topp", {"do_sample": True, "repetition_penalty": 1.2, "top_p": 0.95}, 107),
    # These random models' distributions are flat, so with the default top_k=50 the
    # epsilon and eta cutoffs above remove nothing more; here they do.
    ("sample-epsilon-topk0", {"do_sample": True, "top_k": 0, "epsilon_cutoff": 3e-3}, 109),
    ("sample-eta-temp-topk0", {"do_sample": True, "top_k": 0, "temperature": 0.3, "eta_cutoff": 3e-3}, 110),
]

# Single-step warps of prompt 0's last logits. "top_k": 0 switches off the default
# top_k=50 so that the named warper acts alone.
WARP_ONLY = [
    {"do_sample": True, "top_k": 0, "top_p": 0.5},
    {"do_sample": True, "top_k": 0, "top_p": 0.9},
    {"do_sample": True, "top_k": 1},
    {"do_sample": True, "top_k": 5},
    {"do_sample": True, "top_k": 10},
    {"do_sample": True, "top_k": 0, "temperature": 0.5},
    {"do_sample": True, "top_k": 0, "temperature": 2.0},
    {"do_sample": True, "top_k": 0, "min_p": 0.05},
    {"do_sample": True, "top_k": 0, "min_p": 0.3},
    {"do_sample": True, "top_k": 0, "typical_p": 0.5},
    {"do_sample": True, "top_k": 0, "typical_p": 0.95},
    {"do_sample": True, "top_k": 0, "epsilon_cutoff": 1e-3},
    {"do_sample": True, "top_k": 0, "eta_cutoff": 1e-3},  # removes nothing on these models
    {"do_sample": True, "top_k": 0, "eta_cutoff": 0.1},
    {"do_sample": True, "top_k": 0, "temperature": 0.3, "eta_cutoff": 1e-3},
    {"do_sample": True, "top_k": 0, "temperature": 0.5, "epsilon_cutoff": 3e-3},
    # repetition penalty (sees prompt 0's ids) before the warpers, and alone
    {"do_sample": True, "repetition_penalty": 0.8, "temperature": 0.7, "top_k": 10},
    {"do_sample": True, "top_k": 0, "repetition_penalty": 1.3},
]

# Plain beam searches: (num_beams, early_stopping, length_penalty,
# num_return_sequences, prompt index, max_new_tokens).
BEAMS = [
    (2, False, 1.0, 1, 0, 12),
    (3, True, 1.0, 1, 3, 12),
    (5, "never", 1.0, 1, 1, 10),
    (2, True, 0.5, 1, 2, 12),
    (3, False, 0.5, 2, 0, 12),
    (5, "never", 0.5, 3, 3, 10),
    (2, "never", 2.0, 1, 0, 14),
    (3, "never", 2.0, 3, 1, 12),
    (5, True, 2.0, 2, 2, 12),
    (5, False, 2.0, 1, 0, 10),
    (3, True, 0.5, 1, 3, 14),
    (2, False, 2.0, 2, 3, 12),
]

# Beam searches with a second EOS id. The cases of one group share the prompt and the
# extra EOS, so their outputs show what early_stopping changes; the script picks the
# prompt and the extra EOS (a token of that prompt's greedy continuation) for which
# every case of the group stops early and the modes differ the most. With
# length_penalty 2.0, early_stopping False and "never" keep the longest hypotheses on
# these models, so that group has only early_stopping=True. A group lists alternatives,
# tried in order until one has an extra EOS that makes all its cases stop early.
# group -> [(num_beams, length_penalty, num_return_sequences, max_new_tokens, modes), ...]
ALL_MODES = (True, False, "never")
BEAMS_EOS = {
    "a": [(3, 1.0, 3, 15, ALL_MODES)],
    "b": [(4, 0.5, 2, 12, ALL_MODES)],
    "c": [(2, 1.0, 2, 15, ALL_MODES), (2, 0.5, 2, 15, ALL_MODES)],
    "d": [(5, 2.0, 2, 12, (True,))],
}
# Returned beams of one prompt whose scores lie closer than this could swap places.
MIN_BEAM_GAP = 1e-5
# Deterministic cases must give the same tokens when every step's processed scores are
# jittered by about this much (several trials), i.e. they hinge on no near-tie anywhere
# in the search, including beam candidates that are not returned.
JITTER = 1e-5
JITTER_TRIALS = 2
# How many extra-EOS choices that pass the cheap checks a group compares at most.
MAX_CHOICES = 4


def load(folder):
    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def left_pad(prompts, pad):
    """A left-padded batch and its attention mask, as a tokenizer with padding_side='left' makes."""
    t = max(map(len, prompts))
    ids = torch.tensor([[pad] * (t - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, mask


def eos_list(settings):
    e = settings["eos_token_id"]
    return e if isinstance(e, list) else [e]


def until_eos(tokens, eos):
    """Tokens up to and including the first EOS (what follows is padding)."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def stopped_early(case):
    """Whether some returned sequence ended on an EOS before max_new_tokens."""
    eos = eos_list(case["settings"])
    n = case["settings"]["max_new_tokens"]
    return any(len(s) < n and s[-1] in eos for s in case["sequences"])


def first_new_tokens(greedy, eos, lo, hi):
    """(index, token) for positions lo..hi-1 of a greedy continuation whose token did
    not occur earlier in it: made an extra EOS, greedy decoding stops right there."""
    out = []
    for k in range(lo, min(hi, len(greedy))):
        tok = greedy[k]
        if tok not in eos and tok not in greedy[:k]:
            out.append((k, tok))
    return out


def beam_gaps_ok(case):
    """Whether the returned beams of each prompt have clearly different scores."""
    n = case["settings"].get("num_return_sequences", 1)
    sc = case["sequences_scores"]
    return all(
        abs(sc[i] - sc[i + 1]) > MIN_BEAM_GAP for i in range(len(sc) - 1) if (i + 1) % n != 0
    )


def min_margin(scores, seqs):
    """Smallest gap between the two best processed scores over the greedy steps taken."""
    worst = float("inf")
    for b, seq in enumerate(seqs):
        for s in range(len(seq)):
            top = torch.topk(scores[s][b], 2).values
            worst = min(worst, float(top[0] - top[1]))
    return worst


class Jitter(LogitsProcessor):
    """Adds small deterministic noise to the processed scores (robustness check only)."""

    def __init__(self, scale, seed):
        self.scale = scale
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids, scores):
        return scores + self.scale * torch.randn(scores.shape, generator=self.gen)


class Runner:
    """Runs generate() cases for one model and collects the ones to write."""

    def __init__(self, model, prompts):
        self.model = model
        self.prompts = prompts
        self.eos = model.config.eos_token_id
        self.cases = []

    def base(self, max_new=MAX_NEW, eos=None, **kw):
        """generate() kwargs common to every case (EOS given explicitly, pad = EOS)."""
        s = {"max_new_tokens": max_new, "do_sample": False}
        s.update(kw)
        s["eos_token_id"] = self.eos if eos is None else eos
        s["pad_token_id"] = self.eos
        return s

    def generate(self, prompts, settings, extra=None):
        """generate() on a left-padded batch of prompts; returns (output, generated ids
        per returned sequence, cut after the first EOS)."""
        ids, mask = left_pad(prompts, self.eos)
        kwargs = dict(settings)
        seed = kwargs.pop("seed", None)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True,
                logits_processor=extra, **kwargs
            )
        eos = eos_list(settings)
        return out, [until_eos(row[ids.shape[1]:].tolist(), eos) for row in out.sequences]

    def usable(self, case):
        """Whether a case is safe to compare exactly: its own near-tie checks (greedy
        margin, returned beam scores) pass and, unless it samples, jittering the
        scores changes no token."""
        if not case["_ok"]:
            return False
        if "_robust" not in case:
            case["_robust"] = case["settings"].get("do_sample", False) or all(
                self.generate(case["prompts"], case["settings"], LogitsProcessorList([Jitter(JITTER, k)]))[1]
                == case["sequences"]
                for k in range(JITTER_TRIALS)
            )
        return case["_robust"]

    def run(self, name, prompt_idx, settings, keep=True):
        """Runs generate() on the prompts (indices) with settings and returns the case.
        With keep, asserts that it is usable and records it."""
        prompts = [self.prompts[i] for i in prompt_idx]
        out, seqs = self.generate(prompts, settings)
        beam = settings.get("num_beams", 1) > 1
        case = {"name": name, "prompts": prompts, "settings": settings, "sequences": seqs}
        if beam:
            case["sequences_scores"] = [float(x) for x in out.sequences_scores]
            case["transition_logprobs"] = None
            assert all(math.isfinite(x) for x in case["sequences_scores"]), name
            case["_ok"] = beam_gaps_ok(case)
        else:
            case["sequences_scores"] = None
            trans = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            case["transition_logprobs"] = [trans[b, : len(s)].tolist() for b, s in enumerate(seqs)]
            assert all(math.isfinite(x) for row in case["transition_logprobs"] for x in row), name
            sampled = settings.get("do_sample", False)
            case["_ok"] = sampled or min_margin(out.scores, seqs) > MIN_MARGIN
        case["_first_scores"] = out.scores[0]  # for the warp cross-check; not written
        if keep:
            assert self.usable(case), f"{name}: near-tie (greedy margin, beam scores or jitter)"
            self.cases.append(case)
        return case

    def first_ok(self, tries, want=lambda case: True):
        """Runs (name, prompt indices, settings) tries in order and records the first
        one that is safe to compare and satisfies want."""
        for name, rows, settings in tries:
            case = self.run(name, rows, settings, keep=False)
            if want(case) and self.usable(case):
                self.cases.append(case)
                return case
        raise AssertionError(f"no usable variant of {tries[0][0] if tries else '?'}")

    def run_with_extra_eos(self, group, greedy, tries, lo, hi):
        """Runs a group of cases (list of (name, settings)) with eos_token_id=[eos, T].
        tries: (p, rows) pairs; T goes over the tokens of prompt p's greedy continuation
        (positions lo..hi-1) and the cases run on the prompts rows. Records the usable
        choice in which every case stops early and the outputs differ the most between
        the cases (the first such, in that order, among the first MAX_CHOICES choices
        that pass the cheap checks)."""
        choices = (
            (p, rows, tok) for p, rows in tries for _, tok in first_new_tokens(greedy[p], [self.eos], lo, hi)
        )
        candidates = []
        for p, rows, tok in choices:
            tried = [
                self.run(name.format(p=p), rows, dict(s, eos_token_id=[self.eos, tok]), keep=False)
                for name, s in group
            ]
            if not all(c["_ok"] and stopped_early(c) for c in tried):
                continue
            distinct = len({json.dumps(c["sequences"]) for c in tried})
            candidates.append((distinct, tried))
            if distinct == len(group) or len(candidates) >= MAX_CHOICES:
                break
        # sorted() is stable, so among equals the earliest choice wins.
        for _, tried in sorted(candidates, key=lambda x: -x[0]):
            if all(self.usable(c) for c in tried):  # the jitter check, costly: last
                self.cases.extend(tried)
                return
        raise AssertionError(f"no extra EOS makes {[n for n, _ in group]} stop early")


def bites(r, key):
    """A want() for first_ok: the case's tokens differ from those of the same settings
    without `key`, i.e. that setting really changes the output."""

    def want(case):
        plain = {k: v for k, v in case["settings"].items() if k != key}
        return r.generate(case["prompts"], plain)[1] != case["sequences"]

    return want


def greedy_cases(r, greedy):
    n = len(r.prompts)
    for p in range(n):
        r.run(f"greedy-p{p}", [p], r.base())
    r.run("greedy-batch", list(range(n)), r.base())
    # EOS in the middle: a single prompt, then a padded batch where only some rows stop.
    stops = []
    for p in range(n):
        cands = first_new_tokens(greedy[p], [r.eos], 2, MAX_NEW - 2)
        if cands:
            k, tok = cands[0]
            c = r.run(f"greedy-eos-mid-p{p}", [p], r.base(eos=[r.eos, tok]))
            assert stopped_early(c) and len(c["sequences"][0]) == k + 1, c["name"]
            stops.append(p)
    assert stops, "no prompt has a usable extra EOS for greedy"
    k, tok = first_new_tokens(greedy[stops[0]], [r.eos], 2, MAX_NEW - 2)[0]
    c = r.run("greedy-batch-eos-mid", list(range(n)), r.base(eos=[r.eos, tok]))
    assert stopped_early(c), c["name"]


def beam_cases(r, greedy, small=False):
    n = len(r.prompts)
    plain = BEAMS[:3] if small else BEAMS
    for nb, es, lp, nrs, p, mx in plain:
        s = r.base(max_new=mx, num_beams=nb, early_stopping=es, length_penalty=lp, num_return_sequences=nrs)
        r.run(f"beam{nb}-es-{str(es).lower()}-lp{lp}-n{nrs}-p{p}", [p], s)
    batch = [0, 1, 3] if n >= 4 else list(range(n))
    r.run("beam3-batch", batch, r.base(num_beams=3, early_stopping=False, length_penalty=1.0))
    for alternatives in list(BEAMS_EOS.values())[: 1 if small else None]:
        for i, (nb, lp, nrs, mx, modes) in enumerate(alternatives):
            group = []
            for es in modes:
                st = r.base(
                    max_new=mx, num_beams=nb, early_stopping=es, length_penalty=lp, num_return_sequences=nrs
                )
                group.append((f"beam{nb}-eos-mid-es-{str(es).lower()}-lp{lp}-n{nrs}-p{{p}}", st))
            try:
                r.run_with_extra_eos(group, greedy, [(p, [p]) for p in range(n)], 1, MAX_NEW - 1)
                break
            except AssertionError:
                if i == len(alternatives) - 1:
                    raise
    if not small:
        # A padded batch whose rows stop at different steps (extra EOS from its first prompt).
        st = r.base(num_beams=3, early_stopping=False)
        r.run_with_extra_eos([("beam3-batch-eos-mid", st)], greedy, [(batch[0], batch)], 1, MAX_NEW - 1)


def processor_cases(r, greedy):
    n = len(r.prompts)
    r.run("rep1.3-p0", [0], r.base(repetition_penalty=1.3))
    r.run("rep1.3-p1", [1], r.base(repetition_penalty=1.3))
    r.run("rep0.8-p3", [3], r.base(repetition_penalty=0.8))
    # With left padding, transformers skips the padding when penalising (it passes
    # prompt_ignore_length = number of pad positions to the processor).
    r.run("rep1.3-batch", list(range(n)), r.base(repetition_penalty=1.3))
    # Beam search runs the processors on log_softmax(logits), not on the logits, so
    # there the penalty always multiplies (log-probabilities are negative).
    st = r.base(num_beams=3, repetition_penalty=1.3, early_stopping=False)
    r.first_ok([(f"beam3-rep1.3-p{p}", [p], st) for p in range(n)], bites(r, "repetition_penalty"))
    # no_repeat_ngram_size (n-grams of the prompt count too): on the first prompt and
    # length where it changes the output; failing that, with repetition_penalty 0.8,
    # which makes greedy repeat itself.
    for size, order in ((2, (1, 0, 2, 3)), (3, (3, 0, 1, 2))):
        tries = [
            (f"ngram{size}{tag}-p{p}", [p], r.base(max_new=mx, no_repeat_ngram_size=size, **extra))
            for tag, extra in (("", {}), ("-rep0.8", {"repetition_penalty": 0.8}))
            for mx in (MAX_NEW, 24)
            for p in order
            if len(r.prompts[p]) + mx <= r.model.config.n_positions
        ]
        r.first_ok(tries, bites(r, "no_repeat_ngram_size"))
    st = r.base(num_beams=3, no_repeat_ngram_size=2, early_stopping=False)
    r.first_ok([(f"beam3-ngram2-p{p}", [p], st) for p in range(n)], bites(r, "no_repeat_ngram_size"))

    # min_new_tokens / min_length must block an extra EOS that plain greedy emits at
    # step k+1 <= 4. Tried first: an EOS a few steps in (k >= 1), and a run that still
    # stops on the extra EOS once the minimum is reached.
    blockable = [(p, tok) for p in range(n) for _, tok in first_new_tokens(greedy[p], [r.eos], 1, 4)]
    blockable += [(p, tok) for p in range(n) for _, tok in first_new_tokens(greedy[p], [r.eos], 0, 1)]
    assert blockable, "no early EOS to block"
    used = None
    for kind in ("min-new-tokens", "min-length"):
        tries = []
        for p, tok in blockable:
            if kind == "min-new-tokens":
                st = r.base(eos=[r.eos, tok], min_new_tokens=5)
            else:
                st = r.base(eos=[r.eos, tok], min_length=len(r.prompts[p]) + 5)  # counts the prompt
            tries.append((f"{kind}5-eos-blocked-p{p}", [p], st))
        # Prefer another prompt than the min_new_tokens case, then a run that stops.
        others = [t for t, (p, _) in zip(tries, blockable) if p != used]
        passes = [(others, True), (others, False), (tries, True), (tries, False)]
        for i, (subset, must_stop) in enumerate(passes):
            try:
                c = r.first_ok(
                    subset,
                    want=lambda c, must_stop=must_stop: len(c["sequences"][0]) >= 5
                    and (stopped_early(c) or not must_stop),
                )
                break
            except AssertionError:
                if i == len(passes) - 1:
                    raise
        used = r.prompts.index(c["prompts"][0])

    # bad_words_ids: a token greedy picks first, and a pair greedy emits in a row; each
    # must change the output.
    tries = [(f"bad-word-single-p{p}", [p], r.base(bad_words_ids=[[greedy[p][0]]])) for p in range(n)]
    r.first_ok(tries, bites(r, "bad_words_ids"))
    tries = [
        (f"bad-words-pair-p{p}", [p], r.base(bad_words_ids=[[g[j], g[j + 1]]]))
        for p, g in enumerate(greedy)
        for j in range(1, len(g) - 1)
        if g[j] != g[j + 1]
    ]
    r.first_ok(tries, bites(r, "bad_words_ids"))


def sampling_cases(r):
    for name, s, seed in SAMPLING:
        r.run(name, [0], dict(r.base(**s), seed=seed))
    r.run("beam3-sample", [0], dict(r.base(do_sample=True, num_beams=3), seed=108))


def describe(proc):
    """Name and scalar parameters of one logits processor, for the JSON."""
    params = {}
    for k, v in vars(proc).items():
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            v = v.item()
        if isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v)):
            params[k] = v
    return {"name": type(proc).__name__, "params": params}


def processors(model, ids, settings):
    """The logits processors generate() builds for settings and prompt ids, in its
    order (generate drops an all-ones attention mask first, hence model_kwargs={})."""
    gen_cfg, _ = model._prepare_generation_config(None, **settings)
    model._prepare_special_tokens(gen_cfg, True, device=ids.device)
    return model._get_logits_processor(
        generation_config=gen_cfg,
        input_ids_seq_length=ids.shape[1],
        encoder_input_ids=ids,
        device=ids.device,
        model_kwargs={},
    )


def warp_is_stable(procs, ids, raw, processed, trials=8, scale=1e-5):
    """Whether the set of removed tokens survives perturbing the logits by ~scale (far
    above fp32 rounding), i.e. no token sits right on a top-k/top-p/... boundary."""
    gen = torch.Generator().manual_seed(0)
    removed = torch.isinf(processed)
    for _ in range(trials):
        noisy = raw + scale * torch.randn(raw.shape, generator=gen)
        if not torch.equal(torch.isinf(procs(ids, noisy[None])[0]), removed):
            return False
    return True


def warp_cases(r, folder, sampled):
    ids = torch.tensor([r.prompts[0]], dtype=torch.long)
    tensors = {"ids": ids[0].clone()}
    described = []
    all_settings = [s for _, s, _ in SAMPLING] + WARP_ONLY
    with torch.no_grad():
        raw = r.model(ids).logits[0, -1].float()
    tensors["raw"] = raw.contiguous()
    for i, s in enumerate(all_settings):
        procs = processors(r.model, ids, s)
        processed = procs(ids, raw.clone()[None])[0]
        tensors[f"warp.{i}"] = torch.log_softmax(processed, dim=-1).float().contiguous()
        kept = int(torch.isfinite(processed).sum())
        assert kept >= 1
        assert warp_is_stable(procs, ids, raw, processed), f"warp {i} {s}: a token lies on a cutoff"
        described.append(
            {"index": i, "settings": s, "processors": [describe(p) for p in procs], "kept": kept}
        )
        # The first step of the matching sampling case must see the same distribution.
        if i < len(SAMPLING) and sampled.get(SAMPLING[i][0]) is not None:
            first = sampled[SAMPLING[i][0]][0]
            assert torch.equal(torch.isinf(first), torch.isinf(processed)), f"warp {i}: mask differs"
            fin = torch.isfinite(processed)
            assert torch.allclose(first[fin], processed[fin], atol=1e-4), f"warp {i}: values differ"
    save_file(tensors, os.path.join(folder, "warp.safetensors"))
    return described


def build(models_dir, name, small):
    folder = os.path.join(models_dir, name)
    with open(os.path.join(folder, "expected.json")) as f:
        prompts = json.load(f)["ids"]
    model = load(folder)
    r = Runner(model, prompts)
    assert r.eos is not None
    # Plain greedy continuations, used to choose extra EOS ids and banned words.
    greedy = [r.run("tmp", [p], r.base(), keep=False)["sequences"][0] for p in range(len(prompts))]
    greedy_cases(r, greedy)
    beam_cases(r, greedy, small=small)
    if not small:
        processor_cases(r, greedy)
        sampling_cases(r)
    sampled = {c["name"]: c["_first_scores"] for c in r.cases if c["settings"].get("do_sample")}
    warps = warp_cases(r, folder, sampled)
    for c in r.cases:
        c.pop("_first_scores")
        c.pop("_ok")
        c.pop("_robust", None)
        for p in c["prompts"]:
            assert len(p) + c["settings"]["max_new_tokens"] <= model.config.n_positions, c["name"]
    names = [c["name"] for c in r.cases]
    assert len(names) == len(set(names)), "duplicate case names"
    out = {"model": name, "eos_token_id": r.eos, "cases": r.cases, "warp_cases": warps}
    with open(os.path.join(folder, "generation.json"), "w") as f:
        json.dump(out, f, indent=1, allow_nan=False)
    return r.cases


def summary(name, cases):
    print(f"{name}: {len(cases)} cases")
    for c in cases:
        if isinstance(c["settings"]["eos_token_id"], list):
            n = c["settings"]["max_new_tokens"]
            lens = [len(s) for s in c["sequences"]]
            flag = "stopped early" if stopped_early(c) else "ran to max_new_tokens"
            print(f"  {c['name']}: eos {c['settings']['eos_token_id']}, lengths {lens} of {n}, {flag}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="folder holding the reference model folders")
    args = ap.parse_args()
    torch.set_num_threads(2)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.time()
    for name in FULL_MODELS + SMALL_MODELS:
        cases = build(args.models, name, small=name in SMALL_MODELS)
        summary(name, cases)
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""GGUF files written by `gpt2kit quantize` against llama.cpp's own tools (pinned in
peers.txt): gguf-py reads them, llama.cpp's quantizer and runtime check them.

`make --out DIR --tokenizer-from REF` builds a GPT-2 whose n_embd (256) is a whole
number of K-quant super-blocks, with REF's tokenizer, saved as transformers saves it.

`check --spec SPEC.json` runs every check below and prints one JSON object of results;
any mismatch exits non-zero with the reason. SPEC names the HF folder, the .gguf file
per method, the folder `gpt2kit dequantize` wrote from each, gpt2kit's greedy tokens and
eval perplexity. Checks:
  * metadata: the keys and values convert_hf_to_gguf.py writes for this folder, computed
    here from transformers' tokenizer and gguf-py's SpecialVocab (as the converter does);
  * f32/f16/bf16: tensor names, types and shapes as the converter stores them, bytes equal
    to gguf-py's `quants.quantize` of the transformers weights;
  * q8_0/q4_0/q4_k_m: names, types, shapes and bytes equal to what llama.cpp's own
    `llama_model_quantize` writes from our f32 file;
  * every file: gguf-py's dequantized tensors equal gpt2kit's loader bit for bit (the
    loader's tensors are what `gpt2kit dequantize` wrote);
  * `--calibration` files: the types llama-quantize picks given the same importance
    matrix (recomputed here with transformers), and its bytes in nearly every block;
  * llama.cpp (llama-cpp-python) loads the f32 and q8_0 files and its greedy tokens equal
    gpt2kit's; it loads q4_0 and q4_k_m and its perplexity on the data matches gpt2kit's
    within 0.5%: llama.cpp quantizes the activations to 8 bits (Q8_0/Q8_K) in its
    quantized dot products, gpt2kit multiplies them in f32, so the two cannot agree exactly.
"""
import argparse
import ctypes
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np

FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
PPL_TOLERANCE = 0.005


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def make(out, ref):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=400, n_positions=64, n_embd=256, n_layer=8, n_head=4,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    cfg.architectures = ["GPT2LMHeadModel"]
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ref, f), out)


def hf_tensors(folder):
    """The folder's f32 tensors under GGUF names, in ggml layout (Conv1D transposed)."""
    import torch
    from safetensors.torch import load_file

    sd = load_file(os.path.join(folder, "model.safetensors"))
    top = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
           "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
    blk = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
           "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    out = {}
    for name, t in sd.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        t = t.float()
        if name.endswith(CONV1D):
            t = t.transpose(0, 1)
        if name in top:
            g = top[name]
        else:
            _, n, rest = name.split(".", 2)
            layer, suffix = rest.rsplit(".", 1)
            g = f"blk.{n}.{blk[layer]}.{suffix}"
        out[g] = t.contiguous().numpy()
    return out


def expected_metadata(folder, method, n_params):
    """What convert_hf_to_gguf.py (GPT2Model, _set_vocab_gpt2) writes for `folder`."""
    import gguf
    from transformers import AutoTokenizer

    cfg = json.load(open(os.path.join(folder, "config.json")))
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = {i: t for t, i in tok.vocab.items()}
    added = tok.get_added_vocab()
    tokens, types = [], []
    for i in range(cfg["vocab_size"]):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        t = vocab[i]
        tokens.append(t)
        if t in added:
            special = tok.added_tokens_decoder[i].special or (t.startswith("<|") and t.endswith("|>"))
            types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    sv = gguf.SpecialVocab(folder, load_merges=True)
    file_type = {"f32": 0, "f16": 1, "bf16": 32, **FTYPES}[method]
    n_embd = cfg["n_embd"]
    meta = {
        "general.architecture": "gpt2",
        "general.type": "model",
        "general.size_label": gguf.size_label(n_params, 0, 0, 0),
        "gpt2.block_count": cfg["n_layer"],
        "gpt2.context_length": cfg["n_positions"],
        "gpt2.embedding_length": n_embd,
        "gpt2.feed_forward_length": 4 * n_embd,
        "gpt2.attention.head_count": cfg["n_head"],
        "gpt2.attention.layer_norm_epsilon": float(np.float32(cfg["layer_norm_epsilon"])),
        "general.file_type": file_type,
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(sv.merges),
    }
    for typ, tokid in sv.special_token_ids.items():
        meta[f"tokenizer.ggml.{ {'unk': 'unknown'}.get(typ, typ) }_token_id"] = tokid
    for typ, value in sv.add_special_token.items():
        meta[f"tokenizer.ggml.add_{typ}_token"] = value
    return meta


def check_metadata(reader, expected, label):
    ours = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    for k, v in expected.items():
        if k not in ours:
            fail(f"{label}: key {k} is missing")
        if ours[k] != v:
            shown = ours[k] if not isinstance(ours[k], list) else f"list of {len(ours[k])}"
            fail(f"{label}: key {k} is {shown!r}, the converter writes {v if not isinstance(v, list) else len(v)!r}")
    extra = set(ours) - set(expected) - {"general.name"}
    if extra:
        fail(f"{label}: keys the converter does not write: {sorted(extra)}")


def converter_type(name, ndim, method):
    import gguf

    Q = gguf.GGMLQuantizationType
    if ndim <= 1 or name.endswith("_norm.weight") or name == "position_embd.weight" or not name.endswith(".weight"):
        return Q.F32
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[method]


def check_float_file(reader, hf, method, label):
    import gguf

    names = {t.name for t in reader.tensors}
    if names != set(hf):
        fail(f"{label}: tensors {sorted(names ^ set(hf))} differ from the converter's")
    for t in reader.tensors:
        want = converter_type(t.name, hf[t.name].ndim, method)
        if t.tensor_type != want:
            fail(f"{label}: {t.name} is {t.tensor_type.name}, the converter stores {want.name}")
        if list(t.shape) != list(reversed(hf[t.name].shape)):
            fail(f"{label}: {t.name} has shape {list(t.shape)}")
        ref = gguf.quants.quantize(hf[t.name], want)
        if ref.tobytes() != bytes(t.data.tobytes()):
            fail(f"{label}: {t.name} bytes differ from gguf-py's quantize")


def llama_quantize(src, dst, method, imatrix=None):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = FTYPES[method]
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        keep = []
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append((name.encode(), arr))
            entries[i].name = keep[-1][0]
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        params.imatrix = entries
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        fail(f"llama_model_quantize({src}, {method}) failed: {rc}")


def check_quantized_file(reader, f32_path, method, label):
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "ref.gguf")
        llama_quantize(f32_path, dst, method)
        ref = {t.name: t for t in gguf.GGUFReader(dst).tensors}
        types = {}
        for t in reader.tensors:
            r = ref.get(t.name)
            if r is None:
                fail(f"{label}: {t.name} is not in llama-quantize's file")
            if t.tensor_type != r.tensor_type or list(t.shape) != list(r.shape):
                fail(f"{label}: {t.name} is {t.tensor_type.name} {list(t.shape)}, "
                     f"llama-quantize writes {r.tensor_type.name} {list(r.shape)}")
            if bytes(t.data.tobytes()) != bytes(r.data.tobytes()):
                fail(f"{label}: {t.name} ({t.tensor_type.name}) bytes differ from llama-quantize's")
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if set(ref) != {t.name for t in reader.tensors}:
            fail(f"{label}: tensor names differ from llama-quantize's")
        return types


def check_dequantized(reader, deq_dir, label):
    """gguf-py's dequantized tensors equal those gpt2kit's loader produced."""
    import gguf
    from safetensors.numpy import load_file

    ours = load_file(os.path.join(deq_dir, "model.safetensors"))
    inv = {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
           "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias",
           "output.weight": "lm_head.weight"}
    blk = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
           "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
    for t in reader.tensors:
        if t.name in inv:
            hf = inv[t.name]
        else:
            _, n, layer, suffix = t.name.split(".")
            hf = f"h.{n}.{blk[layer]}.{suffix}"
        key = hf if hf == "lm_head.weight" else f"transformer.{hf}"
        d = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        d = d.reshape(list(reversed([int(x) for x in t.shape])))
        if hf.endswith(CONV1D):
            d = d.T
        if ours[key].shape != d.shape or ours[key].tobytes() != np.ascontiguousarray(d).tobytes():
            fail(f"{label}: {t.name} dequantized by gguf-py differs from gpt2kit's loader")


def imatrix_of(folder, blocks):
    """llama.cpp's imatrix (mean x² per input column of every matrix product) over
    `blocks`, observed with forward hooks on transformers' GPT-2."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    sums = {}

    def hook(name):
        def f(_mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            s, n = sums.get(name, (0, 0))
            sums[name] = (s + (x * x).sum(0), n + x.shape[0])
        return f

    names = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up",
             "mlp.c_proj": "ffn_down"}
    for i, block in enumerate(model.transformer.h):
        for path, g in names.items():
            mod = block.get_submodule(path)
            mod.register_forward_pre_hook(hook(f"blk.{i}.{g}.weight"))
    model.lm_head.register_forward_pre_hook(hook("token_embd.weight"))
    with torch.no_grad():
        for b in blocks:
            model(torch.tensor([b]))
    return {k: (s / n).numpy() for k, (s, n) in sums.items()}


# Our importance matrix comes from gpt2kit's forward, the reference one from transformers'
# (forward hooks): they agree to float rounding, not bit for bit, and a block whose
# candidate scales tie within that rounding may pick either (about 1% of blocks seen).
# Without an imatrix nearly every block differs, so these bounds show it is used.
IMATRIX_SAME_MIN = 0.95
NO_IMATRIX_SAME_MAX = 0.5


def check_imatrix_file(reader, f32_path, method, matrix, label):
    """Types as llama-quantize with an imatrix picks them; blocks equal to its bytes."""
    import gguf

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        with_im, without = os.path.join(tmp, "im.gguf"), os.path.join(tmp, "plain.gguf")
        llama_quantize(f32_path, with_im, method, matrix)
        llama_quantize(f32_path, without, method)
        ref = {t.name: t for t in gguf.GGUFReader(with_im).tensors}
        plain = {t.name: t for t in gguf.GGUFReader(without).tensors}
        for t in reader.tensors:
            r = ref[t.name]
            if t.tensor_type != r.tensor_type or list(t.shape) != list(r.shape):
                fail(f"{label}: {t.name} is {t.tensor_type.name}, llama-quantize with the "
                     f"imatrix writes {r.tensor_type.name}")
            if t.name not in matrix:
                continue
            size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
            blocks = lambda x: np.frombuffer(bytes(x.data.tobytes()), np.uint8).reshape(-1, size)
            same = float((blocks(t) == blocks(r)).all(1).mean())
            p = plain[t.name]
            # Without the imatrix q4_0 keeps Q4_0 where it would pick Q4_1: nothing equal.
            same_plain = float((blocks(t) == blocks(p)).all(1).mean()) if p.tensor_type == t.tensor_type else 0.0
            if same < IMATRIX_SAME_MIN or same_plain > NO_IMATRIX_SAME_MAX:
                fail(f"{label}: {t.name}: {same:.1%} of blocks equal llama-quantize's with the "
                     f"imatrix, {same_plain:.1%} without it")
            out[t.name] = round(same, 4)
    return {"tensors": len(out), "min_equal_blocks": min(out.values())}


def llama(path, n_ctx):
    from llama_cpp import Llama

    return Llama(model_path=path, n_threads=2, n_ctx=n_ctx, logits_all=True, verbose=False)


def greedy(path, prompts, n_ctx):
    llm = llama(path, n_ctx)
    out = []
    for p in prompts:
        llm.reset()
        ids = list(p["prompt_ids"])
        llm.eval(ids)
        gen = []
        for _ in range(len(p["ids"])):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            gen.append(tok)
            llm.eval([tok])
        out.append(gen)
    return out


def perplexity(path, stream, block, n_ctx):
    """As `gpt2kit eval`: the token stream in blocks, every next token scored."""
    llm = llama(path, n_ctx)
    nll, n = 0.0, 0
    for s in range(0, len(stream), block):
        chunk = stream[s:s + block]
        if len(chunk) < 2:
            continue
        llm.reset()
        llm.eval(chunk)
        for i in range(len(chunk) - 1):
            logits = np.asarray(llm.scores[i], dtype=np.float64)
            m = logits.max()
            lse = m + math.log(np.exp(logits - m).sum())
            nll += lse - logits[chunk[i + 1]]
            n += 1
    return math.exp(nll / n)


def check(spec_path):
    import gguf
    from transformers import AutoTokenizer

    spec = json.load(open(spec_path))
    folder = spec["model"]
    hf = hf_tensors(folder)
    n_params = sum(int(np.prod(v.shape)) for v in hf.values())
    results = {"types": {}, "greedy": {}, "perplexity": {}}
    for method, path in spec["files"].items():
        label = f"{os.path.basename(path)}"
        reader = gguf.GGUFReader(path)
        check_metadata(reader, expected_metadata(folder, method, n_params), label)
        if method in FTYPES:
            results["types"][method] = check_quantized_file(reader, spec["files"]["f32"], method, label)
        else:
            check_float_file(reader, hf, method, label)
        check_dequantized(reader, spec["dequantized"][method], label)
    n_ctx = json.load(open(os.path.join(folder, "config.json")))["n_positions"]
    tok = AutoTokenizer.from_pretrained(folder)
    for method, prompts in spec.get("greedy", {}).items():
        for p in prompts:
            p["prompt_ids"] = tok.encode(p["prompt"])
        theirs = greedy(spec["files"][method], prompts, n_ctx)
        ours = [p["ids"] for p in prompts]
        if theirs != ours:
            fail(f"{method}: llama.cpp's greedy tokens {theirs} differ from gpt2kit's {ours}")
        results["greedy"][method] = {"prompts": len(prompts), "tokens": sum(map(len, ours))}
    if spec.get("perplexity"):
        eos = tok.convert_tokens_to_ids("<|endoftext|>")
        stream = []
        for line in open(spec["data"]):
            stream += tok.encode(json.loads(line)["text"]) + [eos]
        for method, ours in spec["perplexity"].items():
            theirs = perplexity(spec["files"][method], stream, spec["block"], n_ctx)
            rel = abs(theirs / ours - 1)
            results["perplexity"][method] = {"llama.cpp": theirs, "gpt2kit": ours, "relative": rel}
            if rel > PPL_TOLERANCE:
                fail(f"{method}: llama.cpp perplexity {theirs:.4f} vs gpt2kit {ours:.4f} ({rel:.2%})")
    if spec.get("imatrix"):
        im = spec["imatrix"]
        eos = tok.convert_tokens_to_ids("<|endoftext|>")
        stream = []
        for line in open(im["data"]):
            stream += tok.encode(json.loads(line)["text"]) + [eos]
        blocks = [stream[s:s + im["block"]] for s in range(0, len(stream), im["block"])]
        blocks = [b for b in blocks if len(b) >= 2][: im["samples"]]
        matrix = imatrix_of(folder, blocks)
        results["imatrix"] = {}
        for method, path in im["files"].items():
            results["imatrix"][method] = check_imatrix_file(
                gguf.GGUFReader(path), spec["files"]["f32"], method, matrix, os.path.basename(path))
    print(json.dumps(results))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--tokenizer-from", required=True)
    c = sub.add_parser("check")
    c.add_argument("--spec", required=True)
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.out, a.tokenizer_from)
    else:
        check(a.spec)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""`make bench`'s memory and start-up rows: peak RSS and start-to-first-token of
`gpt2kit infer --max-new-tokens 1` for gpt2 (124M) and a gpt2-xl-shaped model (1.5B:
n_embd 1600, 48 layers, 25 heads, random weights), fp32, bf16 and int8-dynamic, beside
`gpt2kit --version` alone (idle) and beside llama.cpp (llama-cpp-python) on the same
weights in a GGUF f32 file, in the same run; and both on the same GGUF q4_0 file (gpt2kit
runs its quantized matrices on their blocks, read in place from the file's mapping).

Each command runs in a child process: wall clock from spawn to exit, peak RSS from the
child's rusage (ru_maxrss). Warm page cache: one untimed run first (its time is the
"first run" column), then best and median of 3. Float rows run twice: packed at every
start (`--packed-cache off`), and with the packed file (`--packed-cache auto`, the file
removed before: the first run packs in memory and leaves the file to a detached process,
which the timed runs wait for, then map the file). llama.cpp's child constructs
`Llama(model_path, n_threads=2, use_mmap=True)` and generates one token; its idle is the
same python importing llama_cpp.

The gpt2-xl files (fp32 safetensors, its int8-dynamic artifact, the GGUF) are written once
into --dir and reused; the tensors are written one at a time, so writing needs no more
memory than the largest tensor.

Usage: memory_bench.py --binary BIN --python PY --dir target/bench --out FILE [--no-xl]
       [--prepare-only]   (write the models and files, measure nothing)
       [--baseline BIN]   (decode tok/s of the gpt2 rows, both binaries back to back)
"""
import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time

import numpy as np

PROMPT = "abc defg hij klmno pq rstu vwx yz"
XL = {"n_embd": 1600, "n_layer": 48, "n_head": 25}


def run(cmd):
    """(wall seconds, peak RSS bytes) of `cmd` in a child process. The peak comes from GNU
    time's child: a child forked from this python would start its ru_maxrss at this
    process's size (the kernel carries the pre-exec high-water mark over)."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return wall, int(p.stderr.strip().splitlines()[-1]) * 1024


def measure(cmd, n=3, after_first=lambda: None):
    first = run(cmd)
    after_first()
    runs = [run(cmd) for _ in range(n)]
    walls = [w for w, _ in runs]
    return {"first": first[0], "best": min(walls), "median": statistics.median(walls),
            "rss": max(r for _, r in runs)}


# --- the gpt2-xl-shaped model -------------------------------------------------------

def gpt2_tensors(cfg):
    """(name, shape, init) of a GPT-2's checkpoint tensors, in the hub's order."""
    e, v, p, n = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"]
    out = [("wte.weight", (v, e), "normal"), ("wpe.weight", (p, e), "normal")]
    for i in range(n):
        h = f"h.{i}."
        out += [(h + "ln_1.weight", (e,), "ones"), (h + "ln_1.bias", (e,), "zeros"),
                (h + "attn.c_attn.weight", (e, 3 * e), "normal"), (h + "attn.c_attn.bias", (3 * e,), "zeros"),
                (h + "attn.c_proj.weight", (e, e), "normal"), (h + "attn.c_proj.bias", (e,), "zeros"),
                (h + "ln_2.weight", (e,), "ones"), (h + "ln_2.bias", (e,), "zeros"),
                (h + "mlp.c_fc.weight", (e, 4 * e), "normal"), (h + "mlp.c_fc.bias", (4 * e,), "zeros"),
                (h + "mlp.c_proj.weight", (4 * e, e), "normal"), (h + "mlp.c_proj.bias", (e,), "zeros")]
    return out + [("ln_f.weight", (e,), "ones"), ("ln_f.bias", (e,), "zeros")]


def value(shape, init, pool, at):
    """ones, zeros, or N(0, 0.02) values: a window of a fixed random pool at offset `at`
    (speed and memory depend on the shapes only; drawing 1.5e9 normals would cost more
    than every measurement here)."""
    if init == "ones":
        return np.ones(shape, np.float32)
    if init == "zeros":
        return np.zeros(shape, np.float32)
    n = int(np.prod(shape))
    reps = -(-(at % len(pool) + n) // len(pool))
    return np.tile(pool, reps)[at % len(pool):at % len(pool) + n].reshape(shape)


def write_xl(src, dst):
    """gpt2-xl's shape with random weights, gpt2-random's tokenizer, safetensors fp32."""
    if os.path.exists(os.path.join(dst, ".ready")):
        return
    os.makedirs(dst, exist_ok=True)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(XL)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst)
    tensors = gpt2_tensors(cfg)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    pool = (np.random.default_rng(0).standard_normal(1 << 22, dtype=np.float32) * 0.02)
    tmp = os.path.join(dst, "model.safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for i, (name, shape, init) in enumerate(tensors):
            f.write(value(shape, init, pool, 7919 * i).tobytes())
    os.replace(tmp, os.path.join(dst, "model.safetensors"))
    open(os.path.join(dst, ".ready"), "w").close()
    print(f"wrote {dst}", flush=True)


# --- the same weights as GGUF, for llama.cpp -----------------------------------------

GGUF_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
              "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def gguf_name(name):
    """convert_hf_to_gguf.py's GPT2 tensor names."""
    name = name.removeprefix("transformer.")
    top = {"lm_head.weight": "output.weight", "wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
           "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)
    layer, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{GGUF_NAMES[layer]}.{kind}"


def write_gguf(model, path):
    """A GGUF f32 of `model`'s safetensors, written tensor by tensor (Conv1D weights
    transposed to (out, in) as convert_hf_to_gguf.py's GPT2Model does; the head tied to
    token_embd, which llama.cpp's GPT2 loader falls back to)."""
    if os.path.exists(path):
        return
    import gguf
    from safetensors import safe_open

    cfg = json.load(open(os.path.join(model, "config.json")))
    tok = json.load(open(os.path.join(model, "tokenizer.json")))
    w = gguf.GGUFWriter(path + ".tmp", "gpt2")
    w.add_block_count(cfg["n_layer"])
    w.add_context_length(cfg["n_positions"])
    w.add_embedding_length(cfg["n_embd"])
    w.add_feed_forward_length(4 * cfg["n_embd"])
    w.add_head_count(cfg["n_head"])
    w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tok["added_tokens"] if t.get("special")}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    conv1d = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
    with safe_open(os.path.join(model, "model.safetensors"), "np") as f:
        names = [n for n in f.keys() if not n.endswith((".attn.bias", ".attn.masked_bias"))]
        shapes = {}
        for n in names:
            shape = f.get_slice(n).get_shape()
            shapes[n] = shape[::-1] if n.endswith(conv1d) else shape
            w.add_tensor_info(gguf_name(n), shapes[n], np.dtype(np.float32), 4 * int(np.prod(shape)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for n in names:
            t = f.get_tensor(n)
            w.write_tensor_data(np.ascontiguousarray(t.T) if n.endswith(conv1d) else t)
    w.close()
    os.replace(path + ".tmp", path)
    print(f"wrote {path}", flush=True)


LLAMA_CHILD = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=2, use_mmap=True, n_ctx=64, verbose=False)
llm(sys.argv[2], max_tokens=1)
"""


# --- the table -----------------------------------------------------------------------

def n_params(model):
    from safetensors import safe_open
    with safe_open(os.path.join(model, "model.safetensors"), "np") as f:
        return sum(int(np.prod(f.get_slice(n).get_shape())) for n in f.keys())


def decode_tok_s(binary, model, dtype):
    cmd = [binary, "infer", "--model", model, "--prompt", PROMPT, "--max-new-tokens", "64",
           "--min-new-tokens", "64", "--dtype", dtype, "--stats", "--warmup", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    s = json.loads(p.stderr.strip().splitlines()[-1])
    return s["generated_tokens"] / ((s["prefill_ms"] + s["decode_ms"]) / 1e3)


def q4_0_path(bench_dir, model):
    """Where `make bench`'s GGUF rows keep a model's q4_0 file (gguf_bench.py's name)."""
    return os.path.join(bench_dir, "gguf", os.path.basename(model) + "-q4_0.gguf")


def packed_names(folder):
    """The packed files (`packed-<format>.gpt2kit`) in a model folder, and their
    temporary files while a writer runs."""
    return [n for n in os.listdir(folder) if n.startswith("packed-") and ".gpt2kit" in n]


def packed_files(folder):
    """["final"] once exactly one packed file is in place and no writer is running."""
    return ["tmp" if ".tmp." in n else "final" for n in packed_names(folder)]


def remove_packed(folder):
    for n in packed_names(folder):
        os.remove(os.path.join(folder, n))


def gb(b):
    return f"{b / 1e9:.2f} GB"


def table_row(label, weights, m, peer, idle):
    """One row of the table: our measurement `m` against the targets, beside `peer`'s."""
    rss_target = 1.15 * weights + idle["rss"]
    t_target = 1.5 * peer["median"] + idle["median"]
    ok = lambda good: "✓" if good else "✗"
    return (f"| {label} | {gb(weights)} | {gb(m['rss'])} {ok(m['rss'] <= rss_target)} | "
            f"≤ {gb(rss_target)} | {gb(peer['rss'])} | {m['best']:.2f} / {m['median']:.2f} s; "
            f"{m['first']:.2f} s {ok(m['median'] <= t_target)} | ≤ {t_target:.2f} s | "
            f"{peer['best']:.2f} / {peer['median']:.2f} s |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-xl", action="store_true")
    ap.add_argument("--baseline")
    ap.add_argument("--prepare-only", action="store_true")
    args = ap.parse_args()
    small = os.path.join(args.dir, "gpt2-random")
    models = [("gpt2", small, os.path.join(args.dir, "gpt2-int8-dynamic"))]
    if not args.no_xl:
        xl = os.path.join(args.dir, "gpt2-xl-random")
        write_xl(small, xl)
        models.append(("gpt2-xl", xl, os.path.join(args.dir, "gpt2-xl-int8-dynamic")))
    for _, model, int8 in models:
        if not os.path.exists(os.path.join(int8, "config.json")):
            subprocess.run([args.binary, "quantize", "--model", model, "--out", int8,
                            "--method", "int8-dynamic", "--decode-tokens", "0"], check=True,
                           stdout=subprocess.DEVNULL)
        write_gguf(model, os.path.join(args.dir, os.path.basename(model) + "-f32.gguf"))
        q4 = q4_0_path(args.dir, model)
        if not os.path.exists(q4):
            os.makedirs(os.path.dirname(q4), exist_ok=True)
            subprocess.run([args.binary, "quantize", "--model", model, "--out", q4,
                            "--method", "q4_0"], check=True, stdout=subprocess.DEVNULL)
    if args.prepare_only:
        return

    load = os.getloadavg()
    idle = measure([args.binary, "--version"])
    llama_idle = measure([args.python, "-c", "import llama_cpp"])
    lines = [f"Load average at start: {load[0]:.2f} (1 min) on {os.cpu_count()} cores.", "",
             f"Idle: `gpt2kit --version` {gb(idle['rss'])}, {idle['median']:.2f} s; "
             f"python importing llama_cpp {gb(llama_idle['rss'])}, {llama_idle['median']:.2f} s.", "",
             "| model, dtype | weights | peak RSS | RSS target | llama.cpp RSS (f32; q4_0: the same file) | first token "
             "(best / median; first run) | time target | llama.cpp (best / median) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, model, int8 in models:
        params = n_params(model)
        gguf_path = os.path.join(args.dir, os.path.basename(model) + "-f32.gguf")
        llama = measure([args.python, "-c", LLAMA_CHILD, gguf_path, PROMPT])
        int8_bytes = os.path.getsize(os.path.join(int8, "model.safetensors"))
        for dtype, path, weights in [("f32", model, 4 * params), ("bf16", model, 2 * params),
                                     ("int8-dynamic", int8, int8_bytes)]:
            d = "auto" if dtype == "int8-dynamic" else dtype
            cmd = [args.binary, "infer", "--model", path, "--prompt", PROMPT,
                   "--max-new-tokens", "1", "--dtype", d]
            # Packed at every start, then with the packed file: its first run writes it
            # (removed first), the timed runs map it.
            for way, flags in [("packed at start", ["--packed-cache", "off"]),
                               ("packed file", ["--packed-cache", "auto"])]:
                remove_packed(path)
                waited = []

                def wait_for_file():
                    """`infer` writes the packed file in a detached process after its run:
                    the timed runs start once it is in place."""
                    t = time.perf_counter()
                    while way == "packed file" and packed_files(path) != ["final"]:
                        time.sleep(0.2)
                    waited.append(time.perf_counter() - t)

                m = measure(cmd + flags, after_first=wait_for_file)
                if way == "packed file":
                    way += f" (written {waited[0]:.0f} s after the first run)"
                lines.append(table_row(f"{name} {dtype}, {way}", weights, m, llama, idle))
                print(lines[-1], flush=True)
                remove_packed(path)  # the next rows start as a fresh folder would
        # The GGUF q4_0 file, both engines on it: the file's bytes are the weights.
        q4 = q4_0_path(args.dir, model)
        peer = measure([args.python, "-c", LLAMA_CHILD, q4, PROMPT])
        m = measure([args.binary, "infer", "--model", q4, "--prompt", PROMPT, "--max-new-tokens", "1"])
        lines.append(table_row(f"{name} GGUF q4_0, read in place", os.path.getsize(q4), m, peer, idle))
        print(lines[-1], flush=True)
    if args.baseline:
        lines += ["", "Decode tok/s (gpt2, batch 1, 64 tokens), baseline binary then this one, "
                  "back to back:", "", "| dtype | baseline | this | ratio |", "|---|---|---|---|"]
        for dtype, path in [("f32", small), ("bf16", small), ("auto", models[0][2])]:
            a = decode_tok_s(args.baseline, path, dtype)
            b = decode_tok_s(args.binary, path, dtype)
            lines.append(f"| {dtype} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    open(args.out, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()

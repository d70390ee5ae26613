"""transformers' view of a tokenizer folder written by `gpt2kit tokenizer train`.

Loads DIR with `AutoTokenizer.from_pretrained` (tokenizer.json + tokenizer_config.json)
and, from a copy holding only `vocab.json` + `merges.txt`, with `GPT2Tokenizer`; encodes
each text of TEXTS.json (a JSON list of strings) without special tokens and decodes the
ids back, and writes what it got as JSON to OUT for the Rust test to compare.

    python check_tokenizer.py --dir DIR --texts TEXTS.json --out OUT.json
"""
import argparse
import json
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, GPT2Tokenizer


def view(tok, texts):
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return {
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "ids": ids,
        "decoded": [tok.decode(i, skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--texts", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    texts = json.loads(Path(a.texts).read_text(encoding="utf-8"))
    result = {"auto": view(AutoTokenizer.from_pretrained(a.dir), texts)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["vocab.json", "merges.txt"]:
            shutil.copy(Path(a.dir) / name, Path(tmp) / name)
        result["vocab_merges"] = view(GPT2Tokenizer.from_pretrained(tmp), texts)
    Path(a.out).write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()

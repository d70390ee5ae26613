"""Reference bytes and floats for gpt2kit's ggml block codecs (infer/src/gguf/blocks).

Usage: gguf_blocks.py DIR

DIR/cases.json lists cases {name, type (ggml type id), n_per_row, nrows, importance (bool)};
beside it lie NAME.x.f32 (the input rows, little-endian f32), NAME.imp.f32 (the importance
vector, when the case has one) and NAME.ours.bin (gpt2kit's bytes for the input). For each
case this writes:

  NAME.ggml.bin      ggml's own bytes: ggml_quantize_chunk from llama-cpp-python's
                     libggml-base (with the importance vector when the case has one)
  NAME.ggufpy.bin    gguf-py's bytes (gguf.quants.quantize), where gguf-py can quantize
                     the type and the case has no importance vector (gguf-py has none)
  NAME.deq_py.f32    gguf-py's dequantize of gpt2kit's bytes
  NAME.deq_ggml.f32  ggml's dequantize_row_* (or fp16/bf16 to_float) of gpt2kit's bytes

and DIR/results.json: per case, which of the files exist, and the library versions.
"""

import ctypes
import json
import os
import sys

import gguf
import llama_cpp
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

LIB = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
ggml = ctypes.CDLL(LIB)
ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
ggml.ggml_quantize_chunk.argtypes = [
    ctypes.c_int,  # type
    ctypes.c_void_p,  # src
    ctypes.c_void_p,  # dst
    ctypes.c_int64,  # start
    ctypes.c_int64,  # nrows
    ctypes.c_int64,  # n_per_row
    ctypes.c_void_p,  # imatrix
]
ggml.ggml_row_size.restype = ctypes.c_size_t
ggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

TO_FLOAT = {
    GGMLQuantizationType.F16: "ggml_fp16_to_fp32_row",
    GGMLQuantizationType.BF16: "ggml_bf16_to_fp32_row",
}


def ggml_quantize(qtype, x, nrows, n_per_row, imp):
    row = ggml.ggml_row_size(int(qtype), n_per_row)
    dst = np.zeros(row * nrows, dtype=np.uint8)
    imp_ptr = None if imp is None else imp.ctypes.data
    written = ggml.ggml_quantize_chunk(
        int(qtype), x.ctypes.data, dst.ctypes.data, 0, nrows, n_per_row, imp_ptr
    )
    assert written == dst.size, (written, dst.size)
    return dst.tobytes()


def ggml_dequantize(qtype, data, n):
    if qtype == GGMLQuantizationType.F32:
        return np.frombuffer(data, dtype=np.float32).copy()
    y = np.zeros(n, dtype=np.float32)
    src = np.frombuffer(data, dtype=np.uint8).copy()
    name = TO_FLOAT.get(qtype, "dequantize_row_" + qtype.name.lower().replace("_k", "_K"))
    getattr(ggml, name)(ctypes.c_void_p(src.ctypes.data), ctypes.c_void_p(y.ctypes.data), ctypes.c_int64(n))
    return y


def ggufpy_quantize(qtype, x, nrows, n_per_row):
    try:
        q = gguf.quants.quantize(x.reshape(nrows, n_per_row), qtype)
    except (NotImplementedError, gguf.quants.QuantError):
        return None
    return np.ascontiguousarray(q).tobytes()


def ggufpy_dequantize(qtype, data, nrows, n_per_row):
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.frombuffer(data, dtype=np.uint8).reshape(nrows, n_per_row // block * size)
    return gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)


def main(folder):
    with open(os.path.join(folder, "cases.json")) as f:
        cases = json.load(f)
    results = {
        "gguf": getattr(gguf, "__version__", "unknown"),
        "llama_cpp": llama_cpp.__version__,
        "cases": {},
    }
    for case in cases:
        name, qtype = case["name"], GGMLQuantizationType(case["type"])
        nrows, n_per_row = case["nrows"], case["n_per_row"]
        path = lambda suffix: os.path.join(folder, f"{name}.{suffix}")
        x = np.fromfile(path("x.f32"), dtype="<f4")
        imp = np.fromfile(path("imp.f32"), dtype="<f4") if case["importance"] else None
        ours = open(path("ours.bin"), "rb").read()
        out = {}
        with open(path("ggml.bin"), "wb") as f:
            f.write(ggml_quantize(qtype, x, nrows, n_per_row, imp))
        if imp is None:
            q = ggufpy_quantize(qtype, x, nrows, n_per_row)
            out["ggufpy_quantize"] = q is not None
            if q is not None:
                with open(path("ggufpy.bin"), "wb") as f:
                    f.write(q)
        ggufpy_dequantize(qtype, ours, nrows, n_per_row).astype("<f4").tofile(path("deq_py.f32"))
        ggml_dequantize(qtype, ours, x.size).astype("<f4").tofile(path("deq_ggml.f32"))
        results["cases"][name] = out
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])

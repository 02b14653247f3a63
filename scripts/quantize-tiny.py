#!/usr/bin/env python3
"""Quantizes /tmp/hearth-tiny-llama-k.f32.gguf (written by gen-tiny-models.py) with
llama.cpp's own quantizer (llama-cpp-python in .venv) into the K-quant types, into
tests/fixtures/tiny/llama-k/. Run by scripts/gen-tiny-models."""
import ctypes
import os

import llama_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = "/tmp/hearth-tiny-llama-k.f32.gguf"
TYPES = {
    "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    "q3_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
}
for name, ftype in TYPES.items():
    out = os.path.join(ROOT, "tests", "fixtures", "tiny", "llama-k", f"tiny-llama-k.{name}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(SRC.encode(), out.encode(), ctypes.byref(params))
    assert rc == 0, f"{name}: {rc}"
    print(f"{name}: {os.path.getsize(out)} bytes -> {out}")
